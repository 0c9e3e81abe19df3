"""The learned correction of the denoiser (``sampling/correction.py``) and the pathwise tuner that trains it: zero
at the start, carried by a sampler and by a tuned schedule file, and able to undo a denoiser's systematic error that
no schedule can."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from diffusion_irl.data.datamodules import ToyDataModule
from diffusion_irl.data.toy2d import gmm8
from diffusion_irl.denoisers.analytic import AnalyticDenoiser
from diffusion_irl.sampling.correction import (ConvCorrection, Correction, CorrectedDenoiser, correction_for,
                                               load_correction, save_correction, with_correction)
from diffusion_irl.sampling.noise import NoiseStream
from diffusion_irl.sampling.samplers import DPMpp2M, Euler, with_labels
from diffusion_irl.sampling.schedules import SigmaSchedule
from diffusion_irl.tuning.baselines import tune_rows, write_tuned
from diffusion_irl.tuning.grid import selection_scorer
from diffusion_irl.tuning.pathwise import PathwiseTuner
from diffusion_irl.tuning.tuners import load_tuned_sampler, with_schedule

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def datamodule():
    dm = ToyDataModule(gmm8(), n_train=4000, n_heldout=4000)
    dm.setup()
    return dm


class Shrunk(nn.Module):
    """A denoiser with a systematic error: the exact one, times 0.8 (its samples collapse toward the origin at any
    NFE)."""

    def __init__(self, D):
        super().__init__()
        self.D = D

    def forward(self, x, sigma, *args, **kwargs):
        return 0.8 * self.D(x, sigma)


def _moved(correction: Correction, seed: int = 0) -> Correction:
    with torch.no_grad():
        torch.manual_seed(seed)
        for p in correction.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return correction


def test_a_correction_starts_at_zero_and_a_sampler_carries_it(datamodule):
    D = AnalyticDenoiser(datamodule.law)
    torch.manual_seed(0)
    g = Correction(2, hidden=16, depth=2)
    x, sigma = torch.randn(5, 2), torch.full((5,), 1.5)
    assert torch.equal(CorrectedDenoiser(D, g)(x, sigma), D(x, sigma))
    _moved(g)
    assert not torch.allclose(CorrectedDenoiser(D, g)(x, sigma), D(x, sigma))
    # (D + g) - D is g up to float32 rounding of D's output (about 1e-7 of |D|)
    assert torch.allclose(CorrectedDenoiser(D, g)(x, sigma) - D(x, sigma), g(x, sigma), atol=1e-5)
    for sampler in (Euler(), DPMpp2M()):
        plain = sampler.sample(D, (64, 2), 6, NoiseStream(seed=3))
        out = with_correction(sampler, g).sample(D, (64, 2), 6, NoiseStream(seed=3))
        assert out.nfe == plain.nfe  # g runs beside each evaluation; the NFE count is the denoiser's
        assert not torch.allclose(out.x, plain.x)
        assert sampler.correction is None  # the original is untouched
    with pytest.raises(ValueError, match=r"for \[B, 2\] states"):
        g(torch.randn(3, 4), 1.0)


def test_a_correction_of_the_denoised_point_sees_the_denoisers_output(datamodule, tmp_path):
    D = AnalyticDenoiser(datamodule.law)
    g = Correction(2, hidden=16, depth=2, inputs="denoised")
    x, sigma = torch.randn(5, 2), torch.full((5,), 1.5)
    assert torch.equal(CorrectedDenoiser(D, g)(x, sigma), D(x, sigma))  # zero at the start too
    _moved(g)
    d = D(x, sigma)
    assert torch.allclose(CorrectedDenoiser(D, g)(x, sigma) - d, g(x, sigma, d), atol=1e-5)
    # the output depends on the denoised point: the same state with another D gives another correction
    assert not torch.allclose(g(x, sigma, d), g(x, sigma, 0.5 * d))
    with pytest.raises(ValueError, match="the denoised point is required"):
        g(x, sigma)
    with pytest.raises(ValueError, match="the denoised point is not an input"):
        Correction(2, inputs="state")(x, sigma, d)
    with pytest.raises(ValueError, match="inputs must be one of"):
        Correction(2, inputs="noise")
    save_correction(g, tmp_path / "g.pt")
    loaded = load_correction(tmp_path / "g.pt")
    assert loaded.inputs == "denoised" and torch.equal(loaded(x, sigma, d), g(x, sigma, d))
    # a file written before corrections had inputs holds no "inputs" key: it is a state-only correction
    old = _moved(Correction(2, hidden=8, depth=1))
    torch.save({"dims": 2, "hidden": 8, "depth": 1, "state_dict": old.state_dict()}, tmp_path / "old.pt")
    assert load_correction(tmp_path / "old.pt").inputs == "state"
    assert torch.equal(load_correction(tmp_path / "old.pt")(x, sigma), old(x, sigma))
    tuner = PathwiseTuner(correction=True, correction_inputs="denoised")
    assert tuner.seeded_correction((2,), 0, 0).inputs == "denoised"
    assert tuner.settings()["correction_inputs"] == "denoised"
    with pytest.raises(ValueError, match="tuner.correction_inputs must be one of"):
        PathwiseTuner(correction_inputs="x")


@pytest.mark.parametrize("inputs", ["state", "denoised"])
def test_a_correction_travels_with_its_schedule_file(datamodule, tmp_path, inputs):
    D = AnalyticDenoiser(datamodule.law)
    g = _moved(Correction(2, hidden=8, depth=1))
    save_correction(g, tmp_path / "g.pt")
    loaded = load_correction(tmp_path / "g.pt")
    x = torch.randn(7, 2)
    assert torch.equal(loaded(x, 0.7), g(x, 0.7)) and not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(ValueError, match="no such file"):
        load_correction(tmp_path / "missing.pt")

    # a tuning with correction=true: the row samples with D + g, and so does its schedule.json read back by the
    # evaluator's schedule=sigmas (schedule.path=...) or by load_tuned_sampler
    tuner = PathwiseTuner(iterations=6, batch=32, disc_warmup=2, starts=None, select_every=3, select_samples=100,
                          select_train=500, correction=True, correction_hidden=8, correction_lr=1e-2,
                          correction_inputs=inputs)
    rows = tune_rows({"pathwise": tuner}, {"euler": Euler()}, [6], D, datamodule, seed=0, out=tmp_path)
    row = rows[0]
    assert row.result.correction is not None and row.sampler.correction is row.result.correction
    assert row.result.correction.inputs == inputs
    tuning = write_tuned(rows, tmp_path)
    record = json.loads(tuning.read_text())[0]
    assert record["correction_parameters"] == sum(p.numel() for p in row.result.correction.parameters())
    meta = json.loads((tmp_path / "schedules" / "euler_pathwise_nfe6.json").read_text())
    assert meta["correction"] == "euler_pathwise_nfe6_correction.pt"
    expected = row.sampler.sample(D, (50, 2), 6, NoiseStream(seed=1)).x
    path = tmp_path / "schedules" / "euler_pathwise_nfe6.json"
    for sampler in (with_schedule(Euler(), SigmaSchedule(path=str(path))), load_tuned_sampler(Euler(), path)):
        assert torch.allclose(sampler.sample(D, (50, 2), 6, NoiseStream(seed=1)).x, expected)
    assert SigmaSchedule(sigmas=[1.0, 0.5, 0.0]).correction is None


def test_pathwise_correction_undoes_a_systematic_denoiser_error(datamodule):
    D = Shrunk(AnalyticDenoiser(datamodule.law))
    _, score = selection_scorer(datamodule, 2000)

    def train_score(sampler):
        return score(sampler.sample(D, (2000, 2), 6, NoiseStream(seed=7)).x, 7)

    results = {}
    for correction in (False, True):
        tuner = PathwiseTuner(iterations=60, batch=128, disc_warmup=20, starts=None, select_every=20,
                              select_samples=500, select_train=1000, correction=correction, correction_lr=3e-3)
        results[correction] = tuner.tune(Euler(), D, datamodule, 6, seed=0)
    schedule_only, with_g = results[False], results[True]
    assert schedule_only.correction is None and with_g.correction is not None
    assert with_g.cost_nfe == schedule_only.cost_nfe  # g costs no denoiser evaluations
    assert len(with_g.details["history"]["correction_scale"]) == 60
    assert with_g.details["history"]["correction_scale"][-1] > 0
    tuned = [with_correction(with_schedule(Euler(), SigmaSchedule(r.sigmas.tolist())), r.correction)
             for r in (schedule_only, with_g)]
    base, only, corrected = train_score(Euler()), train_score(tuned[0]), train_score(tuned[1])
    # measured: base 0.64, the schedule alone 0.43, schedule and correction 0.14 (0.05 and 0.18 on seeds 1, 2)
    assert only < base and corrected < 0.5 * only


def test_correction_settings_are_checked():
    with pytest.raises(ValueError, match="tuner.correction must be true or false"):
        PathwiseTuner(correction="yes")
    with pytest.raises(ValueError, match="tuner.correction_lr must be > 0"):
        PathwiseTuner(correction_lr=0.0)
    with pytest.raises(ValueError, match="tuner.correction_hidden must be"):
        PathwiseTuner(correction_hidden=0)
    with pytest.raises(ValueError, match=r"is for vectors \[D\] or images \[C, H, W\]"):
        PathwiseTuner(correction=True).seeded_correction((8, 8), 0, 0)
    assert PathwiseTuner(correction=False).seeded_correction((2,), 0, 0) is None
    assert PathwiseTuner(correction=True).settings()["correction_lr"] == 1e-3


def test_an_edm_scaled_correction_vanishes_with_sigma(tmp_path):
    raw = _moved(Correction(2, hidden=8, depth=1))
    scaled = Correction(2, hidden=8, depth=1, scaling="edm", sigma_data=2.0)
    scaled.load_state_dict(raw.state_dict())
    x = torch.randn(6, 2)
    for sigma in (1e-4, 0.3, 5.0, 80.0):
        c_out = sigma * 2.0 / (sigma**2 + 4.0) ** 0.5
        assert torch.allclose(scaled(x, sigma), c_out * raw(x, sigma), rtol=1e-5, atol=1e-8)
    assert scaled(x, 1e-4).abs().max() < 1e-3 * raw(x, 1e-4).abs().max()  # it cannot move the last steps
    save_correction(scaled, tmp_path / "g.pt")
    loaded = load_correction(tmp_path / "g.pt")
    assert (loaded.scaling, loaded.sigma_data) == ("edm", 2.0) and torch.equal(loaded(x, 0.3), scaled(x, 0.3))
    torch.save({"dims": 2, "hidden": 8, "depth": 1, "state_dict": raw.state_dict()}, tmp_path / "old.pt")
    assert load_correction(tmp_path / "old.pt").scaling == "none"  # a file from before the key: raw output
    with pytest.raises(ValueError, match="scaling must be one of"):
        Correction(2, scaling="vp")
    with pytest.raises(ValueError, match="sigma_data must be > 0"):
        Correction(2, scaling="edm", sigma_data=0.0)
    tuner = PathwiseTuner(correction=True, correction_scaling="edm")
    g = tuner.seeded_correction((2,), 0, 0, sigma_data=2.84)
    assert (g.scaling, g.sigma_data) == ("edm", 2.84) and tuner.settings()["correction_scaling"] == "edm"
    with pytest.raises(ValueError, match="tuner.correction_scaling must be one of"):
        PathwiseTuner(correction_scaling="x")


def test_a_warm_up_regresses_the_correction_toward_the_data(datamodule):
    """The denoiser's own loss on D + g at the sampler's levels (``correction_warmup``) moves D + g toward the exact
    denoiser of the data; its points are counted in the tuning's cost, once for all starts."""
    exact = AnalyticDenoiser(datamodule.law)
    D = Shrunk(exact)
    levels = torch.tensor([2.0, 1.0, 0.5])
    tuner = PathwiseTuner(correction=True, correction_inputs="denoised", correction_scaling="edm",
                          correction_lr=1e-2, correction_warmup=150, correction_warmup_batch=256)
    g = tuner.seeded_correction((2,), 0, 0, sigma_data=datamodule.sigma_data)
    train = datamodule.train_samples().float()

    def error(denoiser):
        gen = torch.Generator().manual_seed(5)
        out = 0.0
        for s in levels.tolist():
            x = train[:1000] + s * torch.randn(1000, 2, generator=gen)
            with torch.no_grad():
                out += float((denoiser(x, torch.full((1000,), s)) - exact(x, torch.full((1000,), s))).pow(2).mean())
        return out

    before = error(D)
    losses = tuner.warm_correction(g, D, train, levels, datamodule.sigma_data, 0, "cpu")
    assert len(losses) == 150 and sum(losses[-20:]) < sum(losses[:20])
    after = error(CorrectedDenoiser(D, g))
    assert after < 0.25 * before, (before, after)

    kwargs = dict(iterations=2, batch=16, explore=1, starts=[20, 5], select_every=0, correction=True,
                  loss="ot", correction_scaling="edm")
    cold = PathwiseTuner(**kwargs).tune(Euler(), D, datamodule, 6, seed=0)
    warm = PathwiseTuner(**kwargs, correction_warmup=3, correction_warmup_batch=40).tune(Euler(), D, datamodule, 6,
                                                                                         seed=0)
    assert warm.cost_nfe - cold.cost_nfe == 3 * 40  # one warm start shared by both starts
    assert len(warm.details["correction_warmup_losses"]) == 3 and "correction_warmup_losses" not in cold.details
    assert warm.settings["correction_warmup"] == 3 and warm.settings["correction_warmup_batch"] == 40
    with pytest.raises(ValueError, match="set tuner.correction=true"):
        PathwiseTuner(correction_warmup=10)
    with pytest.raises(ValueError, match="tuner.correction_warmup must be"):
        PathwiseTuner(correction=True, correction_warmup=-1)


def test_the_warm_up_has_its_own_step_and_may_decay_it(datamodule, monkeypatch):
    """``correction_warmup_lr`` is the warm-up's Adam step (``correction_lr`` stays the pathwise steps');
    ``correction_warmup_decay=cosine`` takes it from that value toward 0 over the warm-up."""
    D = Shrunk(AnalyticDenoiser(datamodule.law))
    train = datamodule.train_samples().float()
    levels = torch.tensor([2.0, 1.0, 0.5])
    seen = []
    step = torch.optim.Adam.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    for decay, expected in [("constant", [0.02] * 8),
                            ("cosine", [0.02 * 0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)])]:
        seen.clear()
        tuner = PathwiseTuner(correction=True, correction_lr=1e-5, correction_warmup_lr=0.02,
                              correction_warmup_decay=decay, correction_warmup=8, correction_warmup_batch=16)
        g = tuner.seeded_correction((2,), 0, 0, sigma_data=datamodule.sigma_data)
        tuner.warm_correction(g, D, train, levels, datamodule.sigma_data, 0, "cpu")
        assert seen == pytest.approx(expected)
        assert tuner.settings()["correction_warmup_lr"] == 0.02 and tuner.correction_lr == 1e-5
    assert PathwiseTuner(correction=True, correction_lr=4e-3, correction_warmup=1).correction_warmup_lr == 4e-3
    with pytest.raises(ValueError, match="correction_warmup_lr must be > 0"):
        PathwiseTuner(correction=True, correction_warmup=1, correction_warmup_lr=0.0)
    with pytest.raises(ValueError, match="correction_warmup_decay must be constant or cosine"):
        PathwiseTuner(correction=True, correction_warmup=1, correction_warmup_decay="linear")


def test_the_warm_up_alone_scores_each_start_once(datamodule):
    """``iterations=0``: no step is taken, so each start is one checkpoint, scored once (its samples counted once)."""
    D = Shrunk(AnalyticDenoiser(datamodule.law))
    tuner = PathwiseTuner(iterations=0, starts=[20, 5], select_samples=50, select_train=200, correction=True,
                          correction_scaling="edm", correction_warmup=2, correction_warmup_batch=10)
    result = tuner.tune(Euler(), D, datamodule, 6, seed=0)
    checkpoints = result.details["checkpoints"]
    assert [c["iteration"] for c in checkpoints] == [0, 0] and [c["start"] for c in checkpoints] == [20, 5]
    assert result.cost_nfe == 2 * 10 + 2 * 50 * 6


class _ConditionalBlur(nn.Module):
    """A class-conditional image denoiser with a systematic error: the denoiser of a unit Gaussian, ``x / (1 +
    sigma^2)``, plus a small class offset; it records the labels it is called with."""

    num_classes = 4

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, sigma, labels=None):
        assert labels is not None
        self.calls.append(labels.clone())
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return x / (1 + s**2) + 0.01 * labels.to(x.dtype).reshape(-1, 1, 1, 1)


def test_an_image_correction_is_convolutional_and_round_trips(tmp_path):
    g = correction_for((3, 8, 8), hidden=8, depth=2, inputs="denoised", scaling="edm", sigma_data=0.5)
    assert isinstance(g, ConvCorrection) and isinstance(correction_for((2,), 8, 1), Correction)
    x, sigma = torch.randn(4, 3, 8, 8), torch.full((4,), 0.7)
    D = _ConditionalBlur()
    labels = torch.tensor([0, 1, 2, 3])
    d = D(x, sigma, labels)
    assert torch.equal(g(x, sigma, d), torch.zeros_like(x))  # zero at the start
    _moved(g)
    out = g(x, sigma, d)
    assert out.shape == x.shape and out.abs().max() > 0
    assert not torch.allclose(g(x, sigma, d), g(x, sigma, 0.5 * d))
    assert g(x, 1e-4, d).abs().max() < 1e-2 * out.abs().max()  # EDM scaling: vanishes with sigma
    # convolutional: a shifted image gives a shifted correction away from the borders (3 layers: 3 pixels)
    wide = _moved(ConvCorrection((1, 16, 16), hidden=8, depth=2, inputs="state"))
    xs = torch.randn(2, 1, 16, 16)
    shifted, plain = wide(torch.roll(xs, 1, dims=3), 0.7), torch.roll(wide(xs, 0.7), 1, dims=3)
    assert torch.allclose(shifted[..., 4:-4], plain[..., 4:-4], atol=1e-5)
    assert not torch.allclose(shifted, wide(xs, 0.7))
    save_correction(g, tmp_path / "g.pt")
    loaded = load_correction(tmp_path / "g.pt")
    assert isinstance(loaded, ConvCorrection) and loaded.shape == (3, 8, 8)
    assert torch.equal(loaded(x, sigma, d), g(x, sigma, d))
    with pytest.raises(ValueError, match=r"for \[B, 3, 8, 8\] images"):
        g(torch.randn(2, 1, 8, 8), 0.5, torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="the denoised point is required"):
        g(x, sigma)
    with pytest.raises(ValueError, match="for images"):
        ConvCorrection((8, 8))
    with pytest.raises(ValueError, match="vectors"):
        correction_for((2, 8), 8, 1)


def test_an_image_warm_up_alone_corrects_a_class_conditional_denoiser(tmp_path):
    """``iterations=0 correction_warmup=N`` on images: the tuned row is the start's schedule with a convolutional
    ``g`` regressed on the denoiser's own loss, each training image denoised for its own class; the row samples
    with ``D + g`` and its schedule file brings ``g`` along."""
    from diffusion_irl.data.shapes import ShapesDataModule

    dm = ShapesDataModule(n_train=400, n_heldout=200, resolution=8)
    dm.setup()
    D = _ConditionalBlur()
    tuner = PathwiseTuner(iterations=0, starts=None, init="karras", init_sigma_max=5.0, init_sigma_min=0.05,
                          select_every=0, correction=True, correction_hidden=16, correction_depth=2,
                          correction_inputs="denoised", correction_scaling="edm", correction_lr=1e-2,
                          correction_warmup=60, correction_warmup_batch=32)
    result = tuner.tune(Euler(), D, dm, 6, seed=0)
    g = result.correction
    assert isinstance(g, ConvCorrection) and result.cost_nfe == 60 * 32  # the warm-up's points only
    losses = result.details["correction_warmup_losses"]
    assert len(losses) == 60 and sum(losses[-10:]) < 0.8 * sum(losses[:10]), losses
    # every warm-up call carried labels of the data set's classes
    assert all(len(c) == 32 and int(c.min()) >= 0 and int(c.max()) < 4 for c in D.calls[:60])
    train, levels = dm.train_samples(200).float(), [3.0, 1.0, 0.3]
    labels = dm.train_labels(200).long()

    def loss(denoiser):
        gen, out = torch.Generator().manual_seed(3), 0.0
        for s in levels:
            x = train + s * torch.randn(train.shape, generator=gen)
            with torch.no_grad():
                out += float((denoiser(x, torch.full((len(x),), s), labels) - train).pow(2).mean())
        return out

    assert loss(CorrectedDenoiser(D, g)) < 0.8 * loss(D)
    rows = tune_rows({"pathwise": tuner}, {"euler": Euler()}, [6], D, dm, seed=0, out=tmp_path)
    write_tuned(rows, tmp_path)
    path = tmp_path / "schedules" / "euler_pathwise_nfe6.json"
    again = load_tuned_sampler(Euler(), path)
    assert isinstance(again.schedule.correction, ConvCorrection)
    labelled = with_labels(D, torch.arange(8) % 4)
    assert torch.allclose(again.sample(labelled, (8, 1, 8, 8), 6, NoiseStream(seed=1)).x,
                          rows[0].sampler.sample(labelled, (8, 1, 8, 8), 6, NoiseStream(seed=1)).x)
    with pytest.raises(ValueError, match="tuner.iterations must be >= 1"):
        PathwiseTuner(iterations=0)
