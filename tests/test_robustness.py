"""Robustness of the entry points: unique run directories that are never overwritten by accident, divergence as a
first-class stop, every config value checked (one line, before any compute), W&B that never hangs, and the silent
surprises of resuming and of `+key=` typos."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import types
from functools import partial
from pathlib import Path

import pytest
import torch
from hydra.core.hydra_config import HydraConfig

from diffusion_irl.config import ConfigError
from diffusion_irl.system import DivergenceError, DivergenceLimits, SamplerPolicyModule
from diffusion_irl.train import check_train_config, run

from .conftest import ROOT
from .helpers import compose_config

QUIET = ["logger=none", "trainer.enable_progress_bar=false", "compare.progress=false"]
TRAIN_ONLY = [*QUIET, "denoiser=analytic", "mdp.nfe=10", "system.rollout_batch=32", "system.disc_steps=2",
              "system.eval_every=0", "compare.enabled=false", "data.n_train=2000", "data.n_heldout=500"]
EVAL_SMALL = ["evaluate.num_samples=200", "evaluate.num_heldout=300", "evaluate.seeds=[0]", "evaluate.nfe=[8]",
              "evaluate.progress=false", "data.n_train=100", "data.n_heldout=300", "evaluate.samplers=[euler]"]
ENV = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")

pytestmark = pytest.mark.usefixtures("one_thread")


def train(out: Path, overrides: list[str]) -> dict:
    try:
        return run(compose_config("train", overrides, output_dir=out))
    finally:
        HydraConfig.instance().cfg = None


def cli(module: str, args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"diffusion_irl.{module}", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env or ENV, timeout=240)


@pytest.fixture(scope="module")
def two_iterations(tmp_path_factory):
    """A finished 2-iteration run (checkpoint every iteration): the directory and its last.ckpt."""
    out = tmp_path_factory.mktemp("two_iterations") / "run"
    train(out, [*TRAIN_ONLY, "train.iterations=2", "checkpoint.every_n_epochs=1"])
    return out, out / "checkpoints" / "last.ckpt"


# --- 1. run directories: unique, never another run's results, stable checkpoint names ------------------------------

def test_run_directories_are_unique_to_the_microsecond():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from .conftest import CONF

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True)
    assert re.search(r"\d{2}-\d{2}-\d{2}-\d{6}$", str(cfg.hydra.run.dir)), cfg.hydra.run.dir
    assert re.search(r"\d{2}-\d{2}-\d{2}-\d{6}$", str(cfg.hydra.sweep.dir)), cfg.hydra.sweep.dir
    assert cfg.overwrite is False


def test_a_directory_with_results_is_refused_unless_resumed_or_overwritten(two_iterations, tmp_path, monkeypatch):
    from diffusion_irl.runs import check_run_dir

    out, last = two_iterations
    with pytest.raises(ConfigError, match=r"already holds another run's results \(checkpoints/last.ckpt\).*"
                                          "overwrite=true"):
        train(out, [*TRAIN_ONLY, "train.iterations=2"])
    check_run_dir(out, resume="last")
    check_run_dir(out, resume=str(last))
    check_run_dir(out, overwrite=True)
    (tmp_path / "results.csv").write_text("sampler,nfe,seed,metric,value\n")
    with pytest.raises(ConfigError, match=r"results.csv"):
        check_run_dir(tmp_path, resume=str(last))  # a checkpoint of another directory does not resume this one
    with pytest.raises(ConfigError, match="is not writable"):
        check_run_dir(tmp_path / "results.csv" / "run")  # a file where the directory should be


def test_resume_keeps_stable_checkpoint_names(two_iterations, tmp_path):
    import shutil

    src, _ = two_iterations
    out = tmp_path / "run"
    shutil.copytree(src, out)
    train(out, [*TRAIN_ONLY, "train.iterations=3", "checkpoint.every_n_epochs=1", "ckpt_path=last"])
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["iter00000.ckpt", "iter00001.ckpt", "iter00002.ckpt", "last.ckpt"], names
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 3


# --- 2. divergence stops the run -------------------------------------------------------------------------------------

def test_a_diverged_policy_stops_the_run_with_exit_1(tmp_path):
    proc = cli("train", ["logger=none", "denoiser=analytic", "train.iterations=3", "algo.lr=1e30", "compare.seeds=[0]",
                         "compare.num_samples=500", "compare.samplers=[euler]", "compare.large_nfe=null",
                         "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "training diverged at iteration 0: policy parameters exploded" in proc.stdout
    assert not (tmp_path / "results.csv").exists()


def _fake_module(**limits):
    fake = types.SimpleNamespace(policy=torch.nn.Linear(2, 2), limits=DivergenceLimits(**limits),
                                 streaks={"approx_kl": 0, "disc": 0}, iteration=7)
    fake._streak = partial(SamplerPolicyModule._streak, fake)
    fake._diverged = partial(SamplerPolicyModule._diverged, fake)
    return partial(SamplerPolicyModule.check_divergence, fake)


def test_divergence_symptoms():
    check = _fake_module(max_approx_kl=1.0, patience=3, disc_patience=2)
    acc = {"disc/acc": torch.tensor(0.6)}
    for _ in range(5):
        check({"ppo/approx_kl": 0.003, "ppo/grad_norm": 0.5}, acc)  # the default run's range: never trips
    check({"ppo/approx_kl": 5.0}, acc)
    check({"ppo/approx_kl": 5.0}, acc)
    check({"ppo/approx_kl": 0.1}, acc)  # the streak is broken
    check({"ppo/approx_kl": float("inf")}, acc)
    check({"ppo/approx_kl": 5.0}, acc)
    with pytest.raises(DivergenceError, match=r"iteration 7: approx-KL 5 > system.max_approx_kl=1.0 for 3 "
                                              "consecutive iterations"):
        check({"ppo/approx_kl": 5.0}, acc)
    check = _fake_module(disc_patience=2)
    check({}, {"disc/acc": torch.tensor(1.0)})
    with pytest.raises(DivergenceError, match="discriminator accuracy stuck at 0.000 for 2 consecutive"):
        check({}, {"disc/acc": torch.tensor(0.0)})
    with pytest.raises(DivergenceError, match="policy gradient norm nan"):
        _fake_module()({"ppo/grad_norm": float("nan")}, acc)


def test_divergence_limits_are_config_keys():
    cfg = compose_config("train", [])
    assert cfg.system.max_approx_kl == 10.0 and cfg.system.patience == 3 and cfg.system.disc_patience == 10
    assert cfg.system.max_policy_param == 1.0e6 and cfg.system.max_policy_grad_norm == 1.0e8
    with pytest.raises(ConfigError, match=r"^system.patience: must be"):
        check_train_config(compose_config("train", ["system.patience=0"]))


# --- 3 and 4. every value checked before any compute -----------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["compare.grid.seeds=[]"], r"^compare.grid.seeds: must be a non-empty list"),
    (["compare.seeds=[]"], r"^compare.seeds: must be a non-empty list"),
    (["compare.num_samples=abc"], r"^compare.num_samples: must be an integer"),
    (["compare.large_nfe=0"], r"^compare.large_nfe: must be a positive integer"),
    (["compare.enabled=maybe"], r"^compare.enabled: must be true or false"),
    (["compare.grid.max_points=-1"], r"^compare.grid.max_points: must be a positive integer"),
    (["system.rollout_batch=big"], r"^system.rollout_batch: must be an integer in \[2, .*got 'big'"),
    (["system.disc_batch=abc"], r"^system.disc_batch: must be a positive integer.*got 'abc'"),
    (["seed=abc"], r"^seed: must be an integer in \[0, 4294967295\], got 'abc'"),
    (["system.rollout_batch=100.5"], r"^system.rollout_batch: .*got 100.5"),
    (["system.rollout_batch=1e12"], r"^system.rollout_batch: .*got 1000000000000.0"),
    (["system.rollout_batch=1000000000000"], r"^system.rollout_batch: must be an integer in \[2, 10000000\]"),
    (["system.eval_every=-1"], r"^system.eval_every: must be an integer in \[0, "),
    (["train.eval_samples=1.5"], r"^train.eval_samples: "),
    (["overwrite=yes"], r"^overwrite: must be true or false"),
    (["denoiser=unet"], r"^denoiser: the U-Net denoiser works on images \[2, H, W\].* shape \[2\]"),
    (["denoiser=cached_unet"], r"^denoiser: the U-Net denoiser works on images"),
    (["data=digits", "denoiser=mlp"], r"^denoiser: the MLP denoiser works on vectors"),
])
def test_every_train_value_is_checked(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        check_train_config(compose_config("train", overrides))
    assert "\n" not in str(info.value)


def test_bad_values_are_one_line_and_exit_2(tmp_path):
    for args in (["seed=abc"], ["compare.grid.seeds=[]"], ["data=gmm8", "denoiser=unet"]):
        proc = cli("train", [*args, f"hydra.run.dir={tmp_path / args[0][:4]}"])
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.startswith("config error: ") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    (tmp_path / "a_file").write_text("")  # a run directory that cannot be created (as a read-only one)
    proc = cli("train", ["debug=smoke", f"hydra.run.dir={tmp_path / 'a_file' / 'run'}"])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"config error: run directory {tmp_path / 'a_file' / 'run'} is not writable (Not a directory): pick another "
        "hydra.run.dir"], proc.stderr[-2000:]
    proc = cli("pretrain", ["data=gmm8", "denoiser=unet", f"hydra.run.dir={tmp_path / 'pre'}"])
    assert proc.returncode == 2 and proc.stderr.startswith("config error: denoiser: the U-Net"), proc.stderr[-2000:]
    assert not (tmp_path / "pre" / "checkpoints").exists()


def test_evaluate_and_pretrain_values_are_checked(tmp_path):
    from diffusion_irl.evaluate import check_evaluate_config
    from diffusion_irl.pretrain import check_pretrain_config

    with pytest.raises(ConfigError, match=r"^evaluate.batch_size: must be a positive integer.*'abc'"):
        check_evaluate_config(compose_config("evaluate", ["evaluate.batch_size=abc"]))
    with pytest.raises(ConfigError, match=r"^seed: must be an integer"):
        check_evaluate_config(compose_config("evaluate", ["seed=-1"]))
    with pytest.raises(ConfigError, match=r"^denoiser: the U-Net denoiser works on images"):
        check_pretrain_config(compose_config("pretrain", ["data=gmm8", "denoiser=unet"]))


@pytest.mark.parametrize("content", [b"", os.urandom(4096)])
def test_a_denoiser_file_that_is_not_a_checkpoint(content, tmp_path, monkeypatch):
    from diffusion_irl.evaluate import run as evaluate

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(content)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=f"not a checkpoint of this project: {re.escape(str(bad))}"):
        evaluate(compose_config("evaluate", [*EVAL_SMALL, "denoiser=checkpoint", f"denoiser.path={bad}"]))


def test_resume_mismatches_are_config_errors(two_iterations, tmp_path):
    _, last = two_iterations
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(os.urandom(1000))
    cases = [
        (["ckpt_path=/nope"], r"^ckpt_path: no such file: /nope$"),
        ([f"ckpt_path={garbage}"], r"^ckpt_path: not a checkpoint of this project: "),
        ([f"ckpt_path={last}", "mdp.nfe=6"], r"^ckpt_path: the checkpoint's horizon is 10 steps, this config's is 6"),
        ([f"ckpt_path={last}", "policy.conditioning=state"], r"^ckpt_path: the checkpoint's policy differs"),
        ([f"ckpt_path={last}", "train.iterations=1"],
         r"^train.iterations: 1 is below the 2 iterations the checkpoint has completed"),
    ]
    for i, (overrides, message) in enumerate(cases):
        with pytest.raises(ConfigError, match=message):
            train(tmp_path / f"r{i}", [*TRAIN_ONLY, *overrides])
        assert not (tmp_path / f"r{i}" / "checkpoints").exists()


def test_bad_wandb_mode_is_one_line(tmp_path, monkeypatch):
    from diffusion_irl.runs import build_logger

    monkeypatch.setenv("WANDB_MODE", "ofline")
    with pytest.raises(ConfigError, match=r"^WANDB_MODE: 'ofline' is not a W&B mode"):
        build_logger(compose_config("train", ["logger=wandb"], output_dir=tmp_path))


# --- 5. W&B online without a server, or without a key ---------------------------------------------------------------

def test_unreachable_wandb_server_falls_back_to_offline(tmp_path, monkeypatch, capsys):
    from diffusion_irl.runs import build_logger

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    start = time.monotonic()
    logger = build_logger(compose_config("train", ["logger=wandb"], output_dir=tmp_path))
    assert time.monotonic() - start < 5
    assert logger._wandb_init["mode"] == "offline" and os.environ["WANDB_MODE"] == "offline"
    out = capsys.readouterr().out
    assert out.count("W&B server http://127.0.0.1:9 is unreachable") == 1 and "logging offline" in out


def test_online_wandb_without_an_api_key_is_one_line(tmp_path, monkeypatch):
    from diffusion_irl.runs import build_logger

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        monkeypatch.setenv("WANDB_MODE", "online")
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.delenv("WANDB_API_KEY", raising=False)
        monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
        with pytest.raises(ConfigError, match=r"^WANDB_MODE: W&B online mode needs an API key"):
            build_logger(compose_config("train", ["logger=wandb"], output_dir=tmp_path))
    finally:
        server.close()


# --- 6. silent surprises -------------------------------------------------------------------------------------------

def test_a_changed_learning_rate_is_applied_on_resume(two_iterations, tmp_path, capsys):
    _, last = two_iterations
    result = train(tmp_path / "resumed", [*TRAIN_ONLY, "train.iterations=3", "algo.lr=0.001", f"ckpt_path={last}"])
    policy_optimizer = result["trainer"].optimizers[0]
    assert policy_optimizer.param_groups[0]["lr"] == 0.001
    out = capsys.readouterr().out
    assert "resumed with changed optimiser settings, applied: policy optimiser lr 0.01 -> 0.001" in out


def test_an_added_key_that_nothing_reads_is_reported(tmp_path):
    from diffusion_irl.runs import unread_additions

    cfg = compose_config("train", ["+train.iteratons=5", "+sampler@samplers.dg=dg", "+system.foo=1"],
                         output_dir=tmp_path)
    assert unread_additions(cfg) == ["warning: +train.iteratons adds a key that nothing reads (did you mean "
                                     "train.iterations?)"]  # system: has a _target_, its build refuses `foo`


def test_budgets_below_every_sampler_are_a_config_error(tmp_path, monkeypatch):
    from diffusion_irl.evaluate import run as evaluate

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^evaluate.nfe: every budget in \[4, 6\] is below every sampler's "
                                          r"fewest NFE \(restart 7\)"):
        evaluate(compose_config("evaluate", [*EVAL_SMALL, "evaluate.nfe=[4,6]", "evaluate.samplers=[restart]"]))
    assert not (tmp_path / "results.csv").exists()


def test_results_md_says_what_recall_measures(tmp_path, monkeypatch):
    from diffusion_irl.evaluate import run as evaluate

    monkeypatch.chdir(tmp_path)
    evaluate(compose_config("evaluate", EVAL_SMALL))
    md = (tmp_path / "results.md").read_text()
    assert "## What the metrics measure" in md and "`recall`: the share of held-out data points" in md
    assert "recall is 1.0" in md
    with pytest.raises(ConfigError, match="already holds another run's results"):
        evaluate(compose_config("evaluate", EVAL_SMALL))
    evaluate(compose_config("evaluate", [*EVAL_SMALL, "overwrite=true"]))
