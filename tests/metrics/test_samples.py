"""Sample metrics against closed forms, exact mixtures and independent references."""
from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch

from diffusion_irl.data.toy2d import GaussianMixture, Moons, gmm8
from diffusion_irl.metrics import (
    exact_w2,
    gmm_nll,
    hq_fraction,
    mmd,
    mode_coverage,
    prdc_metrics,
    sample_metrics,
    sliced_w2,
)

# Noise floor of the unbiased MMD between two exact gmm8 draws of 1000 and 2000 points: mean ~0, std 0.0015 over
# 10 seeds (max |value| 0.0023), so 0.006 is about 4 standard deviations.
MMD_FLOOR = 0.006


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _half_modes(law: GaussianMixture) -> GaussianMixture:
    """The same mixture restricted to its first half of components."""
    k = law.num_components // 2
    return GaussianMixture(law.means[:k], law.stds[:k])


# ------------------------------------------------------------------------------------------------- distances
def test_mmd_matches_dense_reference_and_chunking():
    x, y = torch.randn(150, 3, generator=_gen(0)), torch.randn(230, 3, generator=_gen(1)) + 0.2
    x64, y64 = x.double(), y.double()

    def k(a, b):
        return sum(torch.exp(-torch.cdist(a, b) ** 2 / (2 * bw**2)) for bw in (0.1, 0.3, 1.0, 3.0))

    n, m = len(x), len(y)
    kxx, kyy = k(x64, x64), k(y64, y64)
    ref = ((kxx.sum() - kxx.diag().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diag().sum()) / (m * (m - 1))
           - 2 * k(x64, y64).mean())
    assert mmd(x, y) == pytest.approx(float(ref), abs=1e-10)
    assert mmd(x, y, chunk=7) == pytest.approx(float(ref), abs=1e-10)


def test_two_exact_draws_are_near_zero_and_metrics_grow_with_a_shift():
    law = gmm8()
    x, y = law.sample(1000, _gen(0)), law.sample(2000, _gen(1))
    floor = mmd(x, y)
    assert abs(floor) < MMD_FLOOR
    mmds = [mmd(x + torch.tensor([s, 0.0]), y) for s in (0.0, 0.3, 1.0, 3.0)]
    assert all(a < b for a, b in zip(mmds, mmds[1:])), mmds
    assert mmds[1] > 3 * MMD_FLOOR

    # sliced W2 has a larger small-sample floor on a mixture (0.21 +- 0.07 at these sizes): use a single Gaussian
    a, b = torch.randn(2000, 2, generator=_gen(2)), torch.randn(2000, 2, generator=_gen(3))
    sws = [sliced_w2(a + torch.tensor([s, 0.0]), b) for s in (0.0, 0.3, 1.0, 3.0)]
    assert sws[0] < 0.08
    assert all(p < q for p, q in zip(sws, sws[1:])), sws
    w2s = [exact_w2(a + torch.tensor([s, 0.0]), b, max_points=500) for s in (0.0, 1.0, 3.0)]
    assert all(p < q for p, q in zip(w2s, w2s[1:])), w2s


@pytest.mark.parametrize("seed", [0, 1])
def test_w2_closed_form_for_translated_gaussians(seed):
    # W2(N(m1, s^2 I), N(m2, s^2 I)) = ||m1 - m2||; sliced W2 = ||m1 - m2|| / sqrt(d)
    d, s = 2, 0.5
    shift = torch.tensor([1.2, -0.9])  # norm 1.5
    x = s * torch.randn(1000, d, generator=_gen(seed))
    y = s * torch.randn(1000, d, generator=_gen(seed + 100)) + shift
    assert exact_w2(x, y) == pytest.approx(1.5, abs=0.08)
    assert sliced_w2(x, y, n_projections=1024) == pytest.approx(1.5 / math.sqrt(d), abs=0.06)


def test_sliced_w2_of_a_pure_translation():
    d = 3
    v = torch.tensor([0.5, -1.0, 2.0])
    x = torch.randn(500, d, generator=_gen(0))
    # exact identity for the drawn directions: each 1D W2^2 is (theta . v)^2
    theta = torch.randn(64, d, generator=_gen(7), dtype=torch.float64)
    theta = theta / theta.norm(dim=1, keepdim=True)
    exact = float(((theta @ v.double()) ** 2).mean().sqrt())
    assert sliced_w2(x, x + v, n_projections=64, generator=_gen(7)) == pytest.approx(exact, rel=1e-6)
    # and in expectation over directions, ||v|| / sqrt(d) (4096 directions: relative MC error < 1%)
    assert sliced_w2(x, x + v, n_projections=4096) == pytest.approx(float(v.norm()) / math.sqrt(d), rel=0.03)


def test_sliced_w2_unequal_sizes_is_the_exact_1d_w2():
    # 1D by hand: x = {0, 1}, y = {0, 0.5, 1}: the quantile functions differ by 0.5 on (1/3, 2/3): W2^2 = 1/12
    x, y = torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [0.5], [1.0]])
    assert sliced_w2(x, y, n_projections=8) == pytest.approx(math.sqrt(1 / 12), rel=1e-9)
    # against POT's 1D solver on random unequal sets
    a, b = torch.randn(37, 1, generator=_gen(1)), 2 * torch.randn(53, 1, generator=_gen(2)) + 1
    ref = ot.wasserstein_1d(a[:, 0].double().numpy(), b[:, 0].double().numpy(), p=2)
    assert sliced_w2(a, b, n_projections=4) == pytest.approx(math.sqrt(float(ref)), rel=1e-9)
    # and exact_w2 agrees in 1D (no subsampling)
    assert exact_w2(a, b) == pytest.approx(math.sqrt(float(ref)), rel=1e-6)


def test_seeded_and_generator_dependent():
    x, y = torch.randn(300, 2, generator=_gen(0)), torch.randn(400, 2, generator=_gen(1))
    assert sliced_w2(x, y) == sliced_w2(x, y)
    assert sliced_w2(x, y, generator=_gen(3)) == sliced_w2(x, y, generator=_gen(3))
    assert sliced_w2(x, y, generator=_gen(3)) != sliced_w2(x, y, generator=_gen(4))
    assert exact_w2(x, y, max_points=100, generator=_gen(5)) == exact_w2(x, y, max_points=100, generator=_gen(5))


# ------------------------------------------------------------------------------------------------- mixtures
def test_gmm_nll_matches_torch_distributions():
    law = gmm8()
    x = law.sample(500, _gen(0)) + 0.1 * torch.randn(500, 2, generator=_gen(1))
    ref = -law.to_distribution().log_prob(x.double()).mean()
    assert gmm_nll(x, law) == pytest.approx(float(ref), rel=1e-9)


def test_mode_coverage():
    law = gmm8()
    assert mode_coverage(law.sample(2000, _gen(0)), law) == 1.0
    assert mode_coverage(_half_modes(law).sample(2000, _gen(1)), law) == 0.5
    # a mode holding ~0.3% of the samples (less than a quarter of its 1/8 share) is not covered
    starved = GaussianMixture(law.means, law.stds, [0.02] + [1.0] * 7)
    assert mode_coverage(starved.sample(2000, _gen(2)), law) == 7 / 8
    # samples assigned to a mode but far from it (poor quality) do not cover it
    assert mode_coverage(law.sample(2000, _gen(3)) * 1.5, law) == 0.0


def test_hq_fraction():
    law = gmm8()
    expected = 1 - math.exp(-(3.0**2) / 2)  # P(chi_2 <= 3) = 0.9889
    n = 4000
    tol = 5 * math.sqrt(expected * (1 - expected) / n)
    assert hq_fraction(law.sample(n, _gen(0)), law) == pytest.approx(expected, abs=tol)
    assert hq_fraction(law.sample(500, _gen(1)) + 100.0, law) == 0.0
    # d dimensions and per-component stds: within n_std * s_j of mu_j
    law3 = GaussianMixture([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0]], [0.5, 2.0])
    x = torch.tensor([[0.0, 1.4, 0.0], [0.0, 1.6, 0.0], [10.0, 5.9, 0.0], [10.0, 6.1, 0.0]])
    assert hq_fraction(x, law3) == 0.5


# ------------------------------------------------------------------------------------------------- prdc
def test_prdc_half_the_modes_is_precise_but_not_diverse():
    law = gmm8()
    real = law.sample(1000, _gen(0))
    full = prdc_metrics(real, law.sample(1000, _gen(1)), k=5)
    half = prdc_metrics(real, _half_modes(law).sample(1000, _gen(2)), k=5)
    assert full["precision"] > 0.9 and full["recall"] > 0.9 and full["coverage"] > 0.9
    assert half["precision"] > 0.9
    assert half["recall"] < 0.6 and half["coverage"] < 0.6
    assert 0.7 < full["density"] < 1.3


# ------------------------------------------------------------------------------------------------- aggregator
def test_sample_metrics_keys_and_values():
    law = gmm8()
    samples, heldout = law.sample(500, _gen(0)), law.sample(1000, _gen(1))
    out = sample_metrics(samples, heldout, law)
    assert set(out) == {"nonfinite", "mmd", "sliced_w2", "w2", "precision", "recall", "density", "coverage",
                        "nll", "mode_coverage", "hq_fraction"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    assert out["nonfinite"] == 0.0 and out["mode_coverage"] == 1.0 and abs(out["mmd"]) < 2 * MMD_FLOOR
    assert out == sample_metrics(samples, heldout, law)  # seeded by default
    # laws without a density or without components
    moons = Moons(noise=0.05)
    assert "nll" not in sample_metrics(moons.sample(300, _gen(2)), moons.sample(300, _gen(3)), moons)
    assert set(sample_metrics(samples[:300], heldout[:300])) == {
        "nonfinite", "mmd", "sliced_w2", "w2", "precision", "recall", "density", "coverage"}

    class DensityOnly:
        has_density = True

        def log_prob(self, x):
            return torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(1)

    out = sample_metrics(torch.zeros(10, 2), torch.randn(10, 2, generator=_gen(4)), DensityOnly(), prdc_k=3)
    assert out["nll"] == pytest.approx(math.log(2 * math.pi))
    assert "mode_coverage" not in out


def test_sample_metrics_with_nonfinite_rows():
    law = gmm8()
    clean, heldout = law.sample(500, _gen(0)), law.sample(1000, _gen(1))
    dirty = torch.cat([clean, torch.full((50, 2), float("nan")), torch.tensor([[float("inf"), 0.0]] * 50)])
    out = sample_metrics(dirty, heldout, law)
    ref = sample_metrics(clean, heldout, law)
    assert out["nonfinite"] == pytest.approx(100 / 600)
    for key in ("mmd", "sliced_w2", "w2", "precision", "recall", "density", "coverage", "nll"):
        assert out[key] == pytest.approx(ref[key]), key
    # non-finite samples count as failures for the quality fractions
    assert out["hq_fraction"] == pytest.approx(ref["hq_fraction"] * 500 / 600)

    nan = sample_metrics(torch.full((50, 2), float("nan")), heldout, law)
    assert nan["nonfinite"] == 1.0 and nan["hq_fraction"] == 0.0 and nan["mode_coverage"] == 0.0
    assert all(math.isnan(nan[k]) for k in ("mmd", "sliced_w2", "w2", "precision", "recall", "nll"))


def test_sample_metrics_half_modes_is_worse_than_exact():
    law = gmm8()
    heldout = law.sample(1000, _gen(0))
    good = sample_metrics(law.sample(500, _gen(1)), heldout, law)
    bad = sample_metrics(_half_modes(law).sample(500, _gen(2)), heldout, law)
    assert bad["mmd"] > good["mmd"] + 5 * MMD_FLOOR
    assert bad["sliced_w2"] > good["sliced_w2"] and bad["w2"] > good["w2"]
    assert bad["mode_coverage"] == 0.5 and bad["recall"] < good["recall"] - 0.3
    assert np.isclose(bad["hq_fraction"], good["hq_fraction"], atol=0.02)


def test_sample_metrics_cache_gives_identical_results():
    from diffusion_irl.data.toy2d import gmm8
    from diffusion_irl.metrics.samples import sample_metrics

    law = gmm8()
    held = law.sample(3000, generator=torch.Generator().manual_seed(1))
    cache = {}
    for seed in (0, 1):
        x = law.sample(500, generator=torch.Generator().manual_seed(10 + seed))
        plain = sample_metrics(x, held, law, generator=torch.Generator().manual_seed(seed), mmd_points=2000)
        for _ in range(2):  # the second call uses the cached held-out term
            cached = sample_metrics(x, held, law, generator=torch.Generator().manual_seed(seed), mmd_points=2000, cache=cache)
            assert cached == plain
    assert len(cache) == 2


def test_a_sample_scorer_takes_its_mmd_points():
    from diffusion_irl import seeding
    from diffusion_irl.evaluation import SampleScorer

    law = gmm8()
    held = law.sample(3000, generator=torch.Generator().manual_seed(1))
    x = law.sample(1500, generator=torch.Generator().manual_seed(2))
    got = {}
    for points in (500, 4000):
        got[points] = SampleScorer(held, law, mmd_points=points)(x, 0)["mmd"]
        assert got[points] == sample_metrics(x, held, law, generator=seeding.generator("metrics", 0),
                                             mmd_points=points)["mmd"]
    assert got[500] != got[4000]  # 4000: every sample against 3000 held-out points; 500: subsamples of both
    assert SampleScorer(held, law)(x, 0)["mmd"] == got[4000]  # the default
    with pytest.raises(ValueError, match="mmd_points must be >= 2"):
        SampleScorer(held, law, mmd_points=1)
