"""The exact Gaussian-mixture law and denoiser against independent references."""
import math

import torch

from diffusion_irl.data.toy2d import GaussianMixture, gmm8
from diffusion_irl.denoisers.analytic import AnalyticDenoiser, analytic_denoiser


def test_log_prob_matches_torch_distributions(wide_mixture):
    x = torch.randn(200, 2, dtype=torch.float64) * 3
    ref = wide_mixture.to_distribution().log_prob(x)
    torch.testing.assert_close(wide_mixture.log_prob(x), ref)


def test_noisy_log_prob_is_the_convolved_mixture(wide_mixture):
    x = torch.randn(100, 2, dtype=torch.float64) * 3
    for sigma in (0.1, 1.0, 5.0):
        ref = wide_mixture.noisy(sigma).to_distribution().log_prob(x)
        torch.testing.assert_close(wide_mixture.log_prob(x, sigma), ref)


def test_denoiser_matches_monte_carlo_posterior_mean(wide_mixture):
    """E[x0 | x0 + sigma n = x] by self-normalised importance weights over exact draws of x0."""
    g = torch.Generator().manual_seed(0)
    x0 = wide_mixture.sample(400_000, generator=g).double()
    D = AnalyticDenoiser(wide_mixture)
    x = torch.tensor([[0.5, 0.5], [-1.0, 2.0], [3.0, -1.0]], dtype=torch.float64)
    for sigma in (0.3, 1.0, 3.0):
        logw = -((x[:, None, :] - x0[None]) ** 2).sum(-1) / (2 * sigma**2)  # [3, N]
        w = torch.softmax(logw, dim=1)
        mc = w @ x0
        ess = 1 / (w**2).sum(1)
        assert (ess > 1000).all()
        torch.testing.assert_close(D(x, sigma), mc, atol=0.02, rtol=0)


def test_score_is_gradient_of_noisy_log_density(wide_mixture):
    x = (torch.randn(50, 2, dtype=torch.float64) * 2).requires_grad_()
    sigma = 0.7
    (grad,) = torch.autograd.grad(wide_mixture.log_prob(x, sigma).sum(), x)
    torch.testing.assert_close(wide_mixture.score(x.detach(), sigma), grad)


def test_per_sample_sigmas(wide_mixture):
    D = AnalyticDenoiser(wide_mixture)
    x = torch.randn(4, 2, dtype=torch.float64)
    sig = torch.tensor([0.1, 0.5, 2.0, 10.0], dtype=torch.float64)
    batched = D(x, sig)
    single = torch.cat([D(x[i : i + 1], float(sig[i])) for i in range(4)])
    torch.testing.assert_close(batched, single)


def test_denoiser_limits():
    law = gmm8()
    D = AnalyticDenoiser(law)
    x = torch.randn(10, 2, dtype=torch.float64)
    # sigma -> 0: D(x) -> x; sigma -> inf: D(x) -> the mixture mean (0 for gmm8)
    torch.testing.assert_close(D(x, 1e-6), x, atol=1e-6, rtol=0)
    assert D(x, 1e6).abs().max() < 1e-4


def test_analytic_refuses_non_mixture_data():
    from diffusion_irl.data.datamodules import ToyDataModule
    from diffusion_irl.data.toy2d import Checkerboard

    dm = ToyDataModule(Checkerboard(), n_train=10, n_heldout=10)
    try:
        analytic_denoiser(dm)
    except ValueError as exc:
        assert "Gaussian-mixture" in str(exc) and "checkerboard" in str(exc)
    else:
        raise AssertionError("analytic_denoiser accepted checkerboard data")


def test_gmm_validation():
    for bad in [dict(means=[[0, 0]], stds=[-1.0]), dict(means=[[0, 0], [1, 1]], stds=[1.0]),
                dict(means=[[0, 0]], stds=1.0, weights=[-1.0])]:
        try:
            GaussianMixture(**bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad}")


def test_gmm8_entropy_matches_exact_samples():
    """Monte-Carlo NLL of exact samples approaches the known value log 8 + 1 + log(2 pi 0.09) (components barely overlap)."""
    law = gmm8()
    x = law.sample(100_000, generator=torch.Generator().manual_seed(1)).double()
    nll = -law.log_prob(x).mean().item()
    assert abs(nll - (math.log(8) + 1 + math.log(2 * math.pi * 0.09))) < 0.01
