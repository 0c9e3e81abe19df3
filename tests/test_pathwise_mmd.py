"""The pathwise tuner's kernel loss (``tuner.loss=mmd``): its value is the evaluator's unbiased MMD^2, its gradient
vanishes in expectation between two batches of one law (the minibatch transport plan's does not: it shrinks the
samples), and the tuner trained by it undoes a denoiser's systematic error."""
from __future__ import annotations

import pytest
import torch

from diffusion_irl.data.datamodules import ToyDataModule
from diffusion_irl.data.toy2d import gmm8
from diffusion_irl.denoisers.analytic import AnalyticDenoiser
from diffusion_irl.metrics.samples import mmd
from diffusion_irl.sampling.correction import with_correction
from diffusion_irl.sampling.noise import NoiseStream
from diffusion_irl.sampling.samplers import Euler
from diffusion_irl.sampling.schedules import SigmaSchedule
from diffusion_irl.tuning.grid import selection_scorer
from diffusion_irl.tuning.pathwise import PathwiseTuner, kernel_mmd_loss, transport_loss
from diffusion_irl.tuning.tuners import with_schedule

from .test_correction import Shrunk

pytestmark = pytest.mark.usefixtures("one_thread")


def test_kernel_mmd_loss_is_the_evaluators_unbiased_mmd():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 2, generator=g, dtype=torch.float64)
    y = 0.5 + torch.randn(70, 2, generator=g, dtype=torch.float64)
    for bandwidths in ((0.1, 0.3, 1.0, 3.0), (0.7,)):
        assert float(kernel_mmd_loss(x, y, bandwidths)) == pytest.approx(mmd(x, y, bandwidths), rel=1e-9, abs=1e-12)


def test_kernel_mmd_gradient_is_unbiased_where_transport_shrinks():
    """Fake points ``s eps`` against real ``eps'`` (standard normal, 1-D) at ``s = 1``: the population's gradient in
    ``s`` is zero. The minibatch W2^2's is ``2 sum_i Var(x_(i)) / n > 0`` in expectation (the sorted matching: a pull
    toward shrinking); the MMD's mean must be within 4 standard errors of zero, and well below the transport's."""
    g = torch.Generator().manual_seed(2)
    grads = {"mmd": [], "ot": []}
    for _ in range(300):
        eps, real = torch.randn(32, 1, generator=g, dtype=torch.float64), torch.randn(32, 1, generator=g,
                                                                                       dtype=torch.float64)
        for name, loss in (("mmd", lambda x: kernel_mmd_loss(x, real, (0.5, 1.0, 2.0))),
                           ("ot", lambda x: transport_loss(x, real))):
            s = torch.ones((), dtype=torch.float64, requires_grad=True)
            (grad,) = torch.autograd.grad(loss(s * eps), s)
            grads[name].append(float(grad))
    mean = {k: torch.tensor(v).mean() for k, v in grads.items()}
    se = {k: torch.tensor(v).std() / len(v) ** 0.5 for k, v in grads.items()}
    assert mean["ot"] > 6 * se["ot"]  # measured: 0.145 ± 0.019 (transport), -0.003 ± 0.010 (mmd)
    assert mean["mmd"].abs() < 4 * se["mmd"]


def test_kernel_mmd_gradient_in_a_shift_points_back():
    """Fake ``mu + eps`` against real ``eps'``: the gradient in ``mu`` points along ``mu`` (the loss falls toward
    the real law)."""
    g = torch.Generator().manual_seed(3)
    mu = torch.tensor([0.5, -1.0], dtype=torch.float64, requires_grad=True)
    x, real = mu + torch.randn(256, 2, generator=g, dtype=torch.float64), torch.randn(256, 2, generator=g,
                                                                                        dtype=torch.float64)
    (grad,) = torch.autograd.grad(kernel_mmd_loss(x, real, (0.5, 1.0, 2.0)), mu)
    assert float(grad @ mu.detach()) > 0


@pytest.mark.parametrize("kwargs, message", [(dict(loss="mmd", mmd_bandwidths=[]), "tuner.mmd_bandwidths"),
                                             (dict(loss="mmd", mmd_bandwidths=[1.0, 0.0]), "tuner.mmd_bandwidths"),
                                             (dict(loss="mmd", mmd_bandwidths=["a"]), "tuner.mmd_bandwidths"),
                                             (dict(loss="mmd", conditional=True), "tuner.loss=mmd")])
def test_bad_kernel_settings_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PathwiseTuner(**kwargs)


def test_kernel_mmd_loss_rejects_bad_batches():
    with pytest.raises(ValueError, match="2 rows"):
        kernel_mmd_loss(torch.zeros(1, 2), torch.zeros(5, 2), (1.0,))
    with pytest.raises(ValueError, match="one shape"):
        kernel_mmd_loss(torch.zeros(4, 2), torch.zeros(5, 3), (1.0,))
    with pytest.raises(ValueError, match="bandwidths"):
        kernel_mmd_loss(torch.zeros(4, 2), torch.zeros(5, 2), (-1.0,))


def test_kernel_tuning_with_a_correction_undoes_a_systematic_error():
    dm = ToyDataModule(gmm8(), n_train=4000, n_heldout=1000)
    dm.setup()
    D = Shrunk(AnalyticDenoiser(dm.law))
    _, score = selection_scorer(dm, 2000)
    tuner = PathwiseTuner(loss="mmd", ot_reals=2, mmd_bandwidths=[0.3, 1.0, 3.0], iterations=40, batch=128,
                          starts=None, select_every=20, select_samples=500, select_train=1000, correction=True,
                          correction_lr=3e-3)
    result = tuner.tune(Euler(), D, dm, 6, seed=0)
    settings = tuner.settings()
    assert settings["loss"] == "mmd" and settings["mmd_bandwidths"] == [0.3, 1.0, 3.0] and settings["ot_reals"] == 2
    assert "ot_mass" not in settings
    history = result.details["history"]
    assert len(history["loss"]) == 40 and all(v != v for v in history["disc_acc"])  # no discriminator: NaN
    tuned = with_correction(with_schedule(Euler(), SigmaSchedule(result.sigmas.tolist())), result.correction)
    base = score(Euler().sample(D, (2000, 2), 6, NoiseStream(seed=7)).x, 7)
    after = score(tuned.sample(D, (2000, 2), 6, NoiseStream(seed=7)).x, 7)
    assert after < 0.5 * base
