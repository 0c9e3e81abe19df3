"""The evaluator end to end on a tiny configuration, and its refusal of bad configs."""
import csv
import os
import subprocess
import sys

import pytest

from diffusion_irl.config import ConfigError
from diffusion_irl.evaluate import run
from diffusion_irl.evaluation import read_csv

from .conftest import ROOT
from .helpers import compose_config

SMALL = ["evaluate.num_samples=300", "evaluate.num_heldout=500", "evaluate.seeds=[0,1]", "evaluate.nfe=[3,8]",
         "evaluate.progress=false", "data.n_train=100", "data.n_heldout=500"]


def test_evaluate_writes_results(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_config("evaluate", SMALL + ["evaluate.samplers=[euler,heun,ddpm,restart]"])
    rows = run(cfg)
    with open(tmp_path / "results.csv") as f:
        data = list(csv.DictReader(f))
    assert list(data[0]) == ["sampler", "nfe", "seed", "metric", "value"]
    samplers = {d["sampler"] for d in data}
    assert samplers == {"reference", "euler", "heun", "ddpm", "restart"}
    # the NFE column is the counted NFE, never above the budget: heun fits 3 (2 steps) and 7 (4 steps)
    assert {int(d["nfe"]) for d in data if d["sampler"] == "heun"} == {3, 7}
    assert {int(d["nfe"]) for d in data if d["sampler"] == "euler"} == {3, 8}
    assert {int(d["nfe"]) for d in data if d["sampler"] == "restart"} == {7}  # 2 main steps (3) + 1 restart of 2 Heun steps (4)
    assert {d["seed"] for d in data} == {"0", "1"}
    metrics = {d["metric"] for d in data}
    assert {"mmd", "sliced_w2", "w2", "precision", "recall", "nll", "mode_coverage"} <= metrics
    table = (tmp_path / "results.md").read_text()
    assert "| reference |" in table and "±" in table
    assert (tmp_path / "quality_vs_nfe.png").stat().st_size > 10_000
    assert len(rows) == len(data)
    assert read_csv(tmp_path / "results.csv") == rows  # the CSV round-trips exactly (values written with repr)
    # more NFE helps Euler on the exact denoiser
    mmd = {int(d["nfe"]): float(d["value"]) for d in data if d["sampler"] == "euler" and d["metric"] == "mmd" and d["seed"] == "0"}
    assert mmd[8] < mmd[3]


def test_same_noise_for_every_sampler(tmp_path, monkeypatch):
    """DDIM with eta 0 on the Karras schedule is Euler: with common random numbers their rows are identical."""
    monkeypatch.chdir(tmp_path)
    cfg = compose_config("evaluate", SMALL + [
        "evaluate.samplers=[euler,euler_ancestral]", "samplers.euler_ancestral.eta=0.0", "evaluate.reference=false"])
    rows = run(cfg)
    by = {(r.sampler, r.nfe, r.seed, r.metric): r.value for r in rows if r.metric != "sample_seconds"}
    for (s, nfe, seed, m), v in by.items():
        if s == "euler":
            assert by[("euler_ancestral", nfe, seed, m)] == pytest.approx(v, abs=1e-6)


def _policy_sampler():
    """A deterministic open-loop policy with a churn knob on EDM's stochastic base: its noise is per-sample."""
    from diffusion_irl.mdp.actions import Knob
    from diffusion_irl.mdp.env import PolicySampler, SamplingMDP
    from diffusion_irl.mdp.policies import KnobPolicy
    from diffusion_irl.sampling.samplers import EDMStochastic

    mdp = SamplingMDP(EDMStochastic(S_churn=20.0, S_tmin=0.05, S_tmax=50.0), nfe=9)
    policy = KnobPolicy({"churn": Knob("churn", 0, 1, discrete=True, num=5)})
    mdp.setup_policy(policy, (2,))
    return PolicySampler(mdp, policy)


@pytest.mark.parametrize("name", ["ddpm", "euler", "policy"])
def test_samples_do_not_depend_on_the_batch_size(name):
    """Sample i of (sampler, NFE, seed) draws its noise from its own seed: batch sizes 7 and 64 give the same bits."""
    import torch

    from diffusion_irl.data.toy2d import gmm8
    from diffusion_irl.denoisers.analytic import AnalyticDenoiser
    from diffusion_irl.evaluation import Evaluator, generate
    from diffusion_irl.metrics.samples import sample_metrics
    from diffusion_irl.sampling.samplers import Ancestral, Euler
    from diffusion_irl.sampling.schedules import DiscreteVPSchedule

    law = gmm8()
    oracle = AnalyticDenoiser(law)
    sampler = {"ddpm": lambda: Ancestral(DiscreteVPSchedule(), eta=1.0), "euler": Euler, "policy": _policy_sampler}[name]()
    steps = sampler.steps_for_budget(9)
    a, nfe_a = generate(sampler, oracle, (2,), steps, 50, seed=3, batch_size=7)
    b, nfe_b = generate(sampler, oracle, (2,), steps, 50, seed=3, batch_size=64)
    assert a.shape == (50, 2) and nfe_a == nfe_b and torch.isfinite(a).all()
    assert torch.equal(a, b)
    c, _ = generate(sampler, oracle, (2,), steps, 50, seed=4, batch_size=64)
    assert not torch.equal(a, c)
    # and so do the metric values of the evaluator
    held = law.sample(200, torch.Generator().manual_seed(0))
    rows = {}
    for batch_size in (7, 64):
        ev = Evaluator(samplers={name: sampler}, nfe=[9], num_samples=50, seeds=[3],
                       score=lambda x, seed: sample_metrics(x, held, law, generator=torch.Generator().manual_seed(seed)),
                       batch_size=batch_size, progress=False)
        rows[batch_size] = {(r.sampler, r.nfe, r.metric): r.value for r in ev.run(oracle, (2,)) if r.metric != "sample_seconds"}
    assert rows[7] and rows[7] == rows[64]


@pytest.mark.parametrize("override, message", [
    (["evaluate.samplers=[heun,nope]"], "unknown sampler"),
    (["evaluate.nfe=[0,8]"], "positive integers"),
    (["evaluate.num_samples=1"], "num_samples"),
    (["data=checkerboard"], "Gaussian-mixture"),
    (["samplers.heun.schedule.sigma_min=-1"], "samplers.heun"),
    (["samplers.ddim.eta=-0.5"], "eta"),
])
def test_bad_config_fails_before_compute(override, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_config("evaluate", SMALL + override)
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    assert not (tmp_path / "results.csv").exists()


def test_command_line_error_is_one_line(tmp_path):
    env = dict(os.environ, WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, "-m", "diffusion_irl.evaluate", "evaluate.nfe=[-4]", f"hydra.run.dir={tmp_path}"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("config error: evaluate.nfe")
    assert "Traceback" not in proc.stderr
    # an unknown key is refused by Hydra itself, also before any compute
    proc = subprocess.run([sys.executable, "-m", "diffusion_irl.evaluate", "evaluate.nfee=[4]", f"hydra.run.dir={tmp_path}"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode != 0 and "nfee" in proc.stderr


@pytest.mark.parametrize("data, extra", [
    ("gmm8", ["data.n_train=2048", "data.n_heldout=512", "denoiser.net.hidden=32", "denoiser.net.depth=2"]),
    ("digits", ["denoiser=unet", "denoiser.net.base_channels=8", "denoiser.net.emb_dim=16"]),
])
def test_evaluate_accepts_a_pretrain_checkpoint(data, extra, tmp_path, monkeypatch):
    """pretrain -> checkpoints/last.ckpt -> `evaluate denoiser=checkpoint denoiser.path=...` (2D and image metrics)."""
    import torch

    from diffusion_irl.pretrain import pretrain

    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = compose_config("pretrain", [f"data={data}", *extra, "trainer.max_steps=10", "logger=none",
                                          "trainer.enable_progress_bar=false"], output_dir=tmp_path / "pre")
        pretrain(cfg)
        ckpt = tmp_path / "pre" / "checkpoints" / "last.ckpt"
        assert ckpt.is_file()
        overrides = [f"data={data}", "denoiser=checkpoint", f"denoiser.path={ckpt}", "evaluate.samplers=[euler,heun]",
                     "evaluate.nfe=[4]", "evaluate.seeds=[0]", "evaluate.num_samples=64", "evaluate.progress=false",
                     f"evaluate.feature_cache={tmp_path / 'cache'}"]
        rows = run(compose_config("evaluate", overrides, output_dir=tmp_path / "ev"))
    finally:
        torch.set_num_threads(threads)
    metrics = {r.metric for r in rows}
    assert {"euler", "heun", "reference"} == {r.sampler for r in rows}
    assert ({"mmd", "precision"} if data == "gmm8" else {"fd", "precision", "recall"}) <= metrics
    assert (tmp_path / "ev" / "results.csv").is_file()


def test_checkpoint_of_other_data_is_refused(tmp_path, monkeypatch):
    """A 2D denoiser on 8x8 images: one clear error before any sampling."""
    from diffusion_irl.pretrain import pretrain

    monkeypatch.chdir(tmp_path)
    cfg = compose_config("pretrain", ["data=gmm8", "data.n_train=512", "data.n_heldout=128", "trainer.max_steps=2",
                                      "denoiser.net.hidden=16", "denoiser.net.depth=1", "logger=none",
                                      "trainer.enable_progress_bar=false"], output_dir=tmp_path / "pre")
    pretrain(cfg)
    ckpt = tmp_path / "pre" / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match="shape"):
        run(compose_config("evaluate", ["data=digits", "denoiser=checkpoint", f"denoiser.path={ckpt}"],
                           output_dir=tmp_path / "ev"))


def test_evaluate_logs_to_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_config("evaluate", SMALL + ["evaluate.samplers=[euler]", "evaluate.seeds=[0]", "logger=wandb"],
                         output_dir=tmp_path)
    run(cfg)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = [p.name for p in runs[0].rglob("*")]
    assert any(name.endswith(".wandb") for name in files)
    assert any("quality_vs_nfe" in name for name in files), files


def test_evaluate_prepares_data_before_setup(tmp_path, monkeypatch):
    """Like Lightning, the evaluator calls prepare_data() (where data.download=true downloads) before setup()."""
    from diffusion_irl.data.datamodules import ToyDataModule

    calls = []
    monkeypatch.setattr(ToyDataModule, "prepare_data", lambda self: calls.append("prepare"))
    original_setup = ToyDataModule.setup
    monkeypatch.setattr(ToyDataModule, "setup", lambda self, stage=None: (calls.append("setup"), original_setup(self, stage)))
    monkeypatch.chdir(tmp_path)
    run(compose_config("evaluate", SMALL + ["evaluate.samplers=[euler]", "evaluate.seeds=[0]"]))
    assert calls and calls[0] == "prepare" and "setup" in calls


def test_compact_terminal_table_holds_the_few_numbers_that_matter():
    from diffusion_irl.runs import compact_table

    summary = {("tuned", 10): {"mmd": (0.0055, 0.0009, 3), "precision": (0.95, 0.01, 3), "recall": (0.96, 0.01, 3),
                               "nll": (2.9, 0.1, 3)},
               ("reference", 0): {"mmd": (0.0003, 0.0008, 3), "precision": (0.99, 0.0, 3), "recall": (0.99, 0.0, 3)}}
    table = compact_table(summary, ["tuned"], costs={"tuned": 3.07e5})
    lines = table.splitlines()
    assert lines[0].split() == ["sampler", "NFE", "mmd", "precision", "recall", "cost", "(NFE)"]
    assert "nll" not in table and max(len(line) for line in lines) <= 100  # fits a normal terminal
    assert lines[2].split()[:3] == ["tuned", "10", "0.0055"] and lines[2].endswith("3.07e+05")
    assert lines[3].split()[:2] == ["reference", "–"]


def test_every_row_samples_the_same_classes_from_the_same_seeds():
    """A class-conditional denoiser: a training-free sampler gets class ``seed mod num_classes`` for each sample
    (whatever the chunking), exactly the classes the sampling MDP draws for the policy rows; so the rows of one
    table share their conditioning."""
    import torch
    from torch import nn

    from diffusion_irl.evaluation import generate
    from diffusion_irl.mdp.env import PolicySampler, SamplingMDP
    from diffusion_irl.mdp.actions import Knob
    from diffusion_irl.mdp.policies import KnobPolicy
    from diffusion_irl.sampling.samplers import Euler
    from diffusion_irl import seeding

    class LabelEcho(nn.Module):
        """Denoises every sample to its class index (so the final sample says which class it was given)."""
        num_classes = 3

        def forward(self, x, sigma, labels=None):
            assert labels is not None, "the evaluator passed no labels to a conditional denoiser"
            return labels.to(x.dtype).view(-1, 1).expand_as(x)

    seeds = seeding.sample_seeds(10, "evaluate", 5)
    expected = torch.remainder(seeds, 3).float()
    for batch in (10, 4):
        x, _ = generate(Euler(), LabelEcho(), (1,), 4, 10, seed=5, batch_size=batch)
        torch.testing.assert_close(x.squeeze(1), expected)  # the last Euler step lands on D(x, sigma) = the label
    mdp = SamplingMDP(Euler(), steps=4, num_classes=3)
    policy = KnobPolicy({"step": Knob("step", low=-0.5, high=0.5)})
    mdp.setup_policy(policy, (1,))
    x, _ = generate(PolicySampler(mdp, policy), LabelEcho(), (1,), 4, 10, seed=5, batch_size=4)
    torch.testing.assert_close(x.squeeze(1), expected)
