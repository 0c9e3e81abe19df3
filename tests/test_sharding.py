"""Sample generation and feature extraction sharded over processes (2 CPU processes, gloo): the samples, and the
evaluator's table, do not depend on the number of processes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from diffusion_irl.evaluation import (REFERENCE, Evaluator, ImageFeaturizer, ImageScorer, SampleScorer, read_csv,
                                      reference_for, resolve_processes, write_outputs)
from diffusion_irl.metrics.fid import reference_features

from .helpers import compose_config, load_sampler
from .test_fid import TinyFeatures, images

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyImageDenoiser(nn.Module):
    """A tiny image denoiser for 1x8x8 images: the exact denoiser of N(0, 0.25 I) data plus a small seeded
    convolution (so that batches go through a real layer)."""

    shape = (1, 8, 8)

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            self.conv.weight.copy_(torch.randn(1, 1, 3, 3, generator=g) / 3)
            self.conv.bias.zero_()

    def forward(self, x, sigma, class_labels=None):
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
        return 0.25 / (0.25 + s**2) * x + 0.05 * torch.tanh(self.conv(x / (s**2 + 0.25).sqrt()))


def without_timings(rows):
    return [r for r in rows if r.metric != "sample_seconds"]


def run_both(make, shape, denoiser, tmp_path):
    """The same evaluator at processes=1 and processes=2: (samples, rows, results.csv rows) of each."""
    out = {}
    for processes in (1, 2):
        ev = make(processes)
        rows = ev.run(denoiser, shape)
        write_outputs(rows, tmp_path / f"p{processes}")
        table = read_csv(tmp_path / f"p{processes}" / "results.csv")
        out[processes] = (ev.samples, without_timings(rows), without_timings(table))
    return out


def test_sharded_2d_samples_and_table_match_one_process(tmp_path, oracle):
    """gmm8, its exact denoiser, a deterministic (euler) and a stochastic (ddpm) sampler, 300 samples in chunks
    of 64 (5 chunks: 3 on rank 0, 2 on rank 1): the same samples bit for bit, the same results.csv."""
    from diffusion_irl.data.datamodules import ToyDataModule
    from diffusion_irl.data.toy2d import gmm8

    dm = ToyDataModule(gmm8(), n_train=100, n_heldout=400)
    dm.setup()
    samplers = {"euler": load_sampler("euler"), "ddpm": load_sampler("ddpm")}

    def make(processes):
        return Evaluator(samplers=samplers, nfe=[6], num_samples=300, seeds=[0, 1],
                         score=SampleScorer(dm.heldout(), dm.law), reference=reference_for(dm), batch_size=64,
                         progress=False, keep=("euler", "ddpm"), processes=processes)

    out = run_both(make, (2,), oracle, tmp_path)
    (s1, rows1, csv1), (s2, rows2, csv2) = out[1], out[2]
    assert set(s1) == set(s2) == {"euler", "ddpm"}
    for name in s1:
        assert s1[name].shape == (300, 2) and torch.equal(s1[name], s2[name]), name
    assert rows1 == rows2 and csv1 == csv2 and len(csv1) > 30
    assert {r.sampler for r in csv1} == {REFERENCE, "euler", "ddpm"}


def test_sharded_image_samples_and_features_match_one_process(tmp_path):
    """A tiny image denoiser and tiny feature networks: rank 1 gathers feature rows, not images; the samples kept
    for figures, the features and every metric (fd, precision, ..., fid, fid_precision, ...) are identical."""
    real = images(120, seed=5)
    featurizer = ImageFeaturizer({"classifier": TinyFeatures(4, seed=1), "fid": TinyFeatures(6, seed=2)},
                                 {"classifier": 4, "fid": 6}, batch_size=16)
    refs = {name: reference_features(net, real, keep_rows=None) for name, net in featurizer.networks.items()}
    samplers = {"euler": load_sampler("euler"), "ddpm": load_sampler("ddpm")}

    def make(processes):
        return Evaluator(samplers=samplers, nfe=[5], num_samples=100, seeds=[3],
                         score=ImageScorer(featurizer, refs, prdc_points=100), batch_size=24, progress=False,
                         keep=("ddpm",), processes=processes)

    out = run_both(make, (1, 8, 8), TinyImageDenoiser(), tmp_path)
    (s1, rows1, csv1), (s2, rows2, csv2) = out[1], out[2]
    assert s1["ddpm"].shape == (100, 1, 8, 8) and torch.equal(s1["ddpm"], s2["ddpm"])
    assert rows1 == rows2 and csv1 == csv2
    metrics = {r.metric for r in rows1}
    assert {"fd", "precision", "recall", "fid", "fid_precision", "fid_recall", "nonfinite"} <= metrics


@pytest.mark.slow  # two entry-point runs and a spawn: about 30 s on a loaded 2-core machine
def test_entry_point_table_is_the_same_with_two_processes(tmp_path, monkeypatch):
    """`python -m diffusion_irl.evaluate evaluate.processes=2` writes the results.csv of processes=1."""
    from diffusion_irl.evaluate import run

    monkeypatch.chdir(tmp_path)
    small = ["evaluate.num_samples=200", "evaluate.num_heldout=300", "evaluate.seeds=[0]", "evaluate.nfe=[4]",
             "evaluate.progress=false", "data.n_train=100", "data.n_heldout=300", "evaluate.samplers=[heun,edm_sde]",
             "evaluate.batch_size=50"]
    for processes in (1, 2):
        cfg = compose_config("evaluate", small + [f"evaluate.processes={processes}"], output_dir=tmp_path / f"p{processes}")
        run(cfg)
    one, two = (without_timings(read_csv(tmp_path / f"p{p}" / "results.csv")) for p in (1, 2))
    assert one == two and {r.sampler for r in one} == {REFERENCE, "heun", "edm_sde"}


class RaisesOnRankOne:
    """Euler that raises on every chunk but the first (with 2 processes, rank 1 makes chunk 1)."""

    name = "raises"

    def __init__(self):
        self.inner = load_sampler("euler")

    def steps_for_budget(self, budget):
        return self.inner.steps_for_budget(budget)

    def sample(self, denoiser, shape, steps, noise):
        if len(noise.seeds) < 10:  # the last, short chunk
            raise ValueError("deliberate failure in a spawned process")
        return self.inner.sample(denoiser, shape, steps, noise)


@pytest.mark.slow  # a spawn: about 20 s on a loaded 2-core machine
def test_a_failing_process_stops_the_evaluation_with_its_error(oracle):
    """An exception in rank 1 reaches the caller (with rank 1's message) instead of a hang."""
    ev = Evaluator(samplers={"raises": RaisesOnRankOne()}, nfe=[4], num_samples=15, seeds=[0],
                   score=lambda x, seed: {"mean": float(x.mean())}, batch_size=10, progress=False, processes=2)
    with pytest.raises(Exception, match="deliberate failure in a spawned process"):
        ev.run(oracle, (2,))


def test_processes_values():
    assert resolve_processes(1) == 1 and resolve_processes(3) == 3
    assert resolve_processes("auto", "cpu") == 1
    for bad in (0, -1, "two", True, 1.5):
        with pytest.raises(ValueError, match="positive integer or 'auto'"):
            resolve_processes(bad)


def test_sharding_inside_a_process_group_is_refused(tmp_path, oracle):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ev = Evaluator(samplers={"euler": load_sampler("euler")}, nfe=[4], num_samples=10, seeds=[0],
                       score=lambda x, seed: {}, progress=False, processes=2)
        with pytest.raises(RuntimeError, match="inside an initialised torch.distributed process group"):
            ev.run(oracle, (2,))
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sharded_on_cuda_matches_one_process(tmp_path):
    """On CUDA: 2 processes (one per device, or both on one device) give the samples and the table of one."""
    real = images(120, seed=5)
    featurizer = ImageFeaturizer({"fid": TinyFeatures(6, seed=2)}, {"fid": 6}, batch_size=16).to("cuda")
    refs = {"fid": reference_features(featurizer.networks["fid"], real, keep_rows=None)}
    samplers = {"euler": load_sampler("euler"), "ddpm": load_sampler("ddpm")}

    def make(processes):
        return Evaluator(samplers=samplers, nfe=[5], num_samples=100, seeds=[3], device="cuda",
                         score=ImageScorer(featurizer, refs, prdc_points=100), batch_size=24, progress=False,
                         keep=("euler", "ddpm"), processes=processes)

    out = run_both(make, (1, 8, 8), TinyImageDenoiser().to("cuda"), tmp_path)
    (s1, rows1, _), (s2, rows2, _) = out[1], out[2]
    for name in ("euler", "ddpm"):
        assert s1[name].device.type == "cpu" and torch.equal(s1[name], s2[name]), name
    assert rows1 == rows2
