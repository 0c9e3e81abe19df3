"""The pathwise tuner's transport loss (``tuner.loss=ot``): the exact minibatch W2^2 is the sorted matching in one
dimension, its gradient in a shift is unbiased for the population's, it matches within classes, its partial form
drops the costliest mass, and the tuner trained by it improves a denoiser with a systematic error."""
from __future__ import annotations

import pytest
import torch

from diffusion_irl.data.datamodules import ToyDataModule
from diffusion_irl.data.toy2d import gmm8
from diffusion_irl.denoisers.analytic import AnalyticDenoiser
from diffusion_irl.sampling.correction import with_correction
from diffusion_irl.sampling.noise import NoiseStream
from diffusion_irl.sampling.samplers import Euler
from diffusion_irl.sampling.schedules import SigmaSchedule
from diffusion_irl.tuning.grid import selection_scorer
from diffusion_irl.tuning.pathwise import PathwiseTuner, _Run, transport_loss
from diffusion_irl.tuning.tuners import with_schedule

from .test_correction import Shrunk

pytestmark = pytest.mark.usefixtures("one_thread")


def test_transport_loss_in_one_dimension_is_the_sorted_matching():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, generator=g, dtype=torch.float64)
    y = 2 + 0.5 * torch.randn(64, 1, generator=g, dtype=torch.float64)
    expected = (x.sort(0).values - y.sort(0).values).pow(2).mean()
    assert float(transport_loss(x, y)) == pytest.approx(float(expected), rel=1e-9)


def test_transport_loss_gradient_in_a_shift_is_unbiased():
    """Fake points ``mu + eps`` against real ``eps'`` (both standard normal in 3-D): any plan with uniform marginals
    gives the gradient ``2 (mean x - mean y) / d`` in ``mu`` exactly, whose expectation is the population's
    ``grad_mu W2^2(N(mu, I), N(0, I)) / d = 2 mu / d``."""
    g = torch.Generator().manual_seed(1)
    mu0 = torch.tensor([0.5, -1.0, 0.25], dtype=torch.float64)
    grads = []
    for _ in range(200):
        mu = mu0.clone().requires_grad_(True)
        eps, real = torch.randn(32, 3, generator=g, dtype=torch.float64), torch.randn(32, 3, generator=g,
                                                                                       dtype=torch.float64)
        x = mu + eps
        (grad,) = torch.autograd.grad(transport_loss(x, real), mu)
        assert torch.allclose(grad, 2 * (x.detach().mean(0) - real.mean(0)) / 3, atol=1e-10)
        grads.append(grad)
    grads = torch.stack(grads)
    se = grads.std(0) / len(grads) ** 0.5
    assert ((grads.mean(0) - 2 * mu0 / 3).abs() < 4 * se).all()


def test_transport_loss_matches_within_classes():
    """Two classes, each fake point sitting on the real point of the other class: the class-blind plan moves
    nothing, the label-aware one must carry every point to its own class."""
    real = torch.tensor([[0.0, 0.0], [4.0, 0.0]])
    fake = torch.tensor([[4.0, 0.0], [0.0, 0.0]])
    labels = torch.tensor([0, 1])
    assert float(transport_loss(fake, real)) == pytest.approx(0.0, abs=1e-12)
    assert float(transport_loss(fake, real, labels)) == pytest.approx(16.0 / 2)


def test_partial_transport_drops_the_costliest_mass():
    """With 10% of the fake points far away, the partial plan of 90% of the mass leaves them out (their gradient
    is zero) and scores the rest as the balanced plan scores the inliers alone."""
    g = torch.Generator().manual_seed(2)
    real = torch.randn(100, 2, generator=g, dtype=torch.float64)
    fake = torch.randn(100, 2, generator=g, dtype=torch.float64)
    fake[:10] += 50.0
    fake.requires_grad_(True)
    loss = transport_loss(fake, real, mass=0.9)
    loss.backward()
    assert fake.grad[:10].abs().max() < 1e-9 and fake.grad[10:].abs().sum() > 0
    loss = float(loss.detach())
    assert loss < 0.5 * float(transport_loss(fake.detach(), real))
    assert loss < float(transport_loss(fake.detach()[10:], real[:90])) * 1.5
    # partial="real": every sample is moved in full (the outliers too), only real mass is left over
    fake.grad = None
    transport_loss(fake, real, mass=0.9, partial="real").backward()
    assert (fake.grad[:10].norm(dim=1) > 0.1).all()  # the outliers are pulled back (zero with partial="both")
    x = torch.tensor([[0.0], [0.1], [0.2], [5.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[0.0], [0.1], [0.2], [0.3], [5.1]], dtype=torch.float64)
    full = transport_loss(x, y[[0, 1, 2, 4]], mass=1.0)
    roomy = transport_loss(x, y, mass=0.8, partial="real")  # 5 reals, room for 1.25 x 1/5 = 1/4 each: one per sample
    assert float(roomy.detach()) == pytest.approx(float(full.detach()), rel=1e-9)
    with pytest.raises(ValueError, match="partial"):
        transport_loss(x, y, mass=0.8, partial="fake")
    with pytest.raises(ValueError, match="one shape"):
        transport_loss(fake[:, :1], real)
    with pytest.raises(ValueError, match="real_labels"):
        transport_loss(fake[:5], real, labels=torch.zeros(5, dtype=torch.long))


def test_more_real_points_pull_each_sample_toward_the_barycentre_of_its_matches():
    """``m = k n`` real points: the plan gives each fake point mass ``1/n`` split over real points of mass ``1/m``, so
    its gradient is ``2 (x_i - mean of its matches) / (n d)``; with the real batch ``k`` copies of the fake batch
    shifted by ``+-1`` the loss is exactly 1 per coordinate and every gradient is zero (both shifts pull equally).
    Labels given for the reals keep the matching within classes."""
    x = torch.tensor([[0.0, 0.0], [10.0, 0.0]], dtype=torch.float64, requires_grad=True)
    shifts = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    real = (x.detach()[None] + shifts[:, None]).reshape(-1, 2)
    loss = transport_loss(x, real)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(0.5) and x.grad.abs().max() < 1e-12  # 1 per point / 2 coordinates
    x.grad = None
    transport_loss(x, real[:2]).backward()  # n = m = 2, one shift each: a nonzero pull
    assert x.grad.abs().max() > 0.1
    labels, real_labels = torch.tensor([1, 0]), torch.tensor([0, 1] * 4)  # each fake belongs to the far point's class
    far = transport_loss(x.detach(), real, labels, real_labels=real_labels)
    assert float(far) == pytest.approx((100 + 1) / 2, rel=1e-9)  # mean squared distance 101 to the other point's four


@pytest.mark.parametrize("kwargs, message", [(dict(loss="wgan"), "tuner.loss"), (dict(ot_mass=0.0), "tuner.ot_mass"),
                                             (dict(ot_mass=1.5), "tuner.ot_mass"),
                                             (dict(ot_partial="fake"), "tuner.ot_partial"),
                                             (dict(ot_reals=0), "tuner.ot_reals")])
def test_bad_transport_settings_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PathwiseTuner(**kwargs)


@pytest.mark.parametrize("mass", [1.0, 0.9])
def test_transport_tuning_with_a_correction_undoes_a_systematic_error(mass):
    dm = ToyDataModule(gmm8(), n_train=4000, n_heldout=1000)
    dm.setup()
    D = Shrunk(AnalyticDenoiser(dm.law))
    _, score = selection_scorer(dm, 2000)
    tuner = PathwiseTuner(loss="ot", iterations=40, batch=128, starts=None, select_every=20, select_samples=500,
                          select_train=1000, correction=True, correction_lr=3e-3, ot_mass=mass)
    result = tuner.tune(Euler(), D, dm, 6, seed=0)
    assert tuner.settings()["loss"] == "ot" and tuner.settings()["ot_mass"] == mass
    history = result.details["history"]
    assert len(history["loss"]) == 40 and all(v != v for v in history["disc_acc"])  # no discriminator: NaN
    tuned = with_correction(with_schedule(Euler(), SigmaSchedule(result.sigmas.tolist())), result.correction)
    base = score(Euler().sample(D, (2000, 2), 6, NoiseStream(seed=7)).x, 7)
    after = score(tuned.sample(D, (2000, 2), 6, NoiseStream(seed=7)).x, 7)
    # measured: base 0.64; tuned with its correction 0.030 (mass 1) and 0.027 (mass 0.9) after 40 iterations, where
    # the adversarial loss reached 0.14 after 60 (tests/test_correction.py)
    assert after < 0.5 * base


def test_a_checkpoint_takes_the_moving_average_of_the_correction():
    """``correction_ema=d``: after each step the average is ``d avg + (1 - d) w`` (the first step's weights to begin
    with), and a checkpoint samples with it; ``correction_ema=0`` takes the current weights."""
    dm = ToyDataModule(gmm8(), n_train=500, n_heldout=100)
    dm.setup()
    D, train = Shrunk(AnalyticDenoiser(dm.law)), dm.train_samples()
    for decay in (0.0, 0.6):
        tuner = PathwiseTuner(loss="ot", batch=32, starts=None, correction=True, correction_hidden=8,
                              correction_lr=1e-2, correction_ema=decay)
        assert tuner.settings()["correction_ema"] == decay
        run = _Run(tuner, Euler(), D, train, (2,), tuner.levels(Euler(), 4), None, torch.Generator().manual_seed(0),
                   0, "cpu", correction=tuner.seeded_correction((2,), 0, 0))
        assert run.averaged_correction() is run.correction  # nothing to average yet
        expected = None
        for _ in range(4):
            run.train(1)
            weights = [p.detach().clone() for p in run.correction.parameters()]
            expected = weights if expected is None else [decay * e + (1 - decay) * w for e, w in zip(expected, weights)]
        got = list(run.averaged_correction().parameters())
        assert all(torch.allclose(g, e, atol=1e-6) for g, e in zip(got, expected))
        moved = [not torch.allclose(g, w) for g, w in zip(got, weights)]
        assert any(moved) == (decay > 0)  # the average lags the current weights
    with pytest.raises(ValueError, match="tuner.correction_ema"):
        PathwiseTuner(correction_ema=1.0)
