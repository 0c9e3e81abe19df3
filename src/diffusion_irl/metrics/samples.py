"""Sample quality of vectors against held-out data (docs/method.md section 7).

Every function takes torch tensors ``[N, d]`` (any device, any float dtype; computed on the CPU in float64) and
returns Python floats. Randomness (projections, subsamples) comes from a ``torch.Generator``; ``generator=None``
means a fixed seed (0), so that every sampler of an evaluation is scored with the same projections and subsets.

- :func:`sliced_w2`, :func:`exact_w2`: Wasserstein-2 distances (sliced, and exact on subsamples via POT).
- :func:`mmd`: squared MMD, multi-scale RBF kernel, unbiased U-statistic.
- :func:`prdc_metrics`: k-NN precision / recall / density / coverage (Kynkaanniemi et al. 2019, Naeem et al. 2020).
- :func:`gmm_nll`, :func:`mode_coverage`, :func:`hq_fraction`: exact quantities for a known Gaussian mixture.
- :func:`sample_metrics`: all of the above in one dict, robust to non-finite samples (the evaluator's entry point).
"""
from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Sequence

import numpy as np
import ot
import torch
from prdc import compute_prdc
from torch import Tensor

DEFAULT_SEED = 0
DEFAULT_BANDWIDTHS = (0.1, 0.3, 1.0, 3.0)


def _cpu64(x: Tensor) -> Tensor:
    x = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if x.ndim != 2:
        raise ValueError(f"expected samples of shape [N, d], got {tuple(x.shape)}")
    return x


def _generator(generator: torch.Generator | None) -> torch.Generator:
    return torch.Generator().manual_seed(DEFAULT_SEED) if generator is None else generator


def _subsample(x: Tensor, n: int | None, generator: torch.Generator) -> Tensor:
    """A uniform subset of ``min(n, len(x))`` rows, without replacement (all rows, in order, when n is None)."""
    if n is None or len(x) <= n:
        return x
    return x[torch.randperm(len(x), generator=generator)[:n]]


def finite_rows(x: Tensor) -> Tensor:
    """Boolean mask [N]: rows whose entries are all finite (a diverging sampler produces NaN / inf rows)."""
    return torch.isfinite(x.reshape(len(x), -1)).all(dim=1)


# --------------------------------------------------------------------------------------------------------------
# Wasserstein
# --------------------------------------------------------------------------------------------------------------
def _w2_1d_sq(xs: Tensor, ys: Tensor) -> Tensor:
    """Exact squared W2 between 1D empirical measures, column by column: xs [N, P], ys [M, P] sorted along dim 0.

    ``W2^2 = int_0^1 (F^-1(t) - G^-1(t))^2 dt`` with both quantile functions piecewise constant; with N != M the
    integral runs over the merged breakpoints ``{i/N} u {j/M}`` (held as integers in units of ``1/(N M)``).
    """
    n, m = len(xs), len(ys)
    if n == m:
        return ((xs - ys) ** 2).mean(0)
    cuts = torch.unique(torch.cat([torch.arange(1, n + 1) * m, torch.arange(1, m + 1) * n]))  # sorted, ends at n*m
    left = torch.cat([cuts.new_zeros(1), cuts[:-1]])
    widths = (cuts - left).double() / (n * m)
    # on (left, cut] the quantile index is floor(left / m) for x and floor(left / n) for y
    return (widths[:, None] * (xs[left // m] - ys[left // n]) ** 2).sum(0)


def sliced_w2(x: Tensor, y: Tensor, n_projections: int = 256, generator: torch.Generator | None = None) -> float:
    """Sliced Wasserstein-2: ``sqrt( E_theta[ W2^2(theta.x, theta.y) ] )``, theta uniform on the unit sphere.

    The expectation is a Monte-Carlo mean over ``n_projections`` random directions (drawn from ``generator``); each
    1D W2 is exact between the projected empirical measures (sorted projections; merged quantiles when N != M).
    For a pure translation ``y = x + v`` it equals ``||v|| / sqrt(d)`` (since ``E[(theta.v)^2] = ||v||^2 / d``).
    """
    x, y = _cpu64(x), _cpu64(y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimension mismatch: {x.shape[1]} vs {y.shape[1]}")
    theta = torch.randn(n_projections, x.shape[1], generator=_generator(generator), dtype=torch.float64)
    theta = theta / theta.norm(dim=1, keepdim=True)
    xs = (x @ theta.T).sort(dim=0).values
    ys = (y @ theta.T).sort(dim=0).values
    return math.sqrt(float(_w2_1d_sq(xs, ys).mean()))


def exact_w2(x: Tensor, y: Tensor, max_points: int = 1000, generator: torch.Generator | None = None) -> float:
    """Exact W2 between uniform subsamples of at most ``max_points`` rows of each set.

    Optimal transport with squared Euclidean cost and uniform weights (``ot.emd2``); returns ``sqrt`` of the cost.
    The subsample (without replacement, from ``generator``) makes it an estimate with a positive small-sample bias.
    """
    g = _generator(generator)
    x, y = _subsample(_cpu64(x), max_points, g), _subsample(_cpu64(y), max_points, g)
    cost = ot.dist(x.numpy(), y.numpy(), metric="sqeuclidean")
    a, b = np.full(len(x), 1.0 / len(x)), np.full(len(y), 1.0 / len(y))
    w2_sq = ot.emd2(a, b, cost, numItermax=10_000_000)
    return math.sqrt(max(float(w2_sq), 0.0))


# --------------------------------------------------------------------------------------------------------------
# MMD
# --------------------------------------------------------------------------------------------------------------
def _kernel_sum(a: Tensor, b: Tensor, bandwidths: Sequence[float], chunk: int, same: bool) -> float:
    """``sum_{i,j} k(a_i, b_j)`` with ``k = sum_b exp(-||a_i - b_j||^2 / (2 b^2))``, in row blocks of ``chunk``.

    With ``same`` (a is b), only blocks on and above the diagonal are computed (the kernel matrix is symmetric).
    """
    coefs = [-0.5 / float(bw) ** 2 for bw in bandwidths]
    a2, b2 = (a**2).sum(1), (b**2).sum(1)
    total = 0.0
    for i in range(0, len(a), chunk):
        j0 = i if same else 0
        sq = (a2[i : i + chunk, None] + b2[None, j0:] - 2 * a[i : i + chunk] @ b[j0:].T).clamp_min_(0)
        for c in coefs:
            kern = torch.exp(sq * c)
            if same:  # the diagonal block counts once, the blocks right of it twice (for the mirrored ones)
                total += 2 * float(kern.sum()) - float(kern[:, : min(chunk, len(a) - i)].sum())
            else:
                total += float(kern.sum())
    return total


def mmd_self_term(y: Tensor, bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS, chunk: int = 1024) -> float:
    """``1/(m(m-1)) sum_{i!=j} k(y_i, y_j)``: the part of :func:`mmd` that depends on ``y`` alone (cacheable)."""
    y = _cpu64(y)
    m = len(y)
    return (_kernel_sum(y, y, bandwidths, chunk, True) - m * len(bandwidths)) / (m * (m - 1))


def mmd(x: Tensor, y: Tensor, bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS, chunk: int = 1024,
        kyy: float | None = None) -> float:
    """Squared MMD with the multi-scale RBF kernel ``k(a, b) = sum_b exp(-||a - b||^2 / (2 b^2))``.

    Unbiased U-statistic (Gretton et al. 2012, eq. 3)::

        MMD^2_u = 1/(n(n-1)) sum_{i!=j} k(x_i, x_j) + 1/(m(m-1)) sum_{i!=j} k(y_i, y_j) - 2/(nm) sum_{i,j} k(x_i, y_j)

    It is an unbiased estimate of the population MMD^2, hence can be slightly negative when the laws are equal.
    Memory is ``O(chunk * max(n, m))``; the cost is ``O((n + m)^2 d)``. ``kyy``: a cached
    ``mmd_self_term(y, bandwidths)`` (the evaluator scores many sample sets against the same held-out points).
    """
    x, y = _cpu64(x), _cpu64(y)
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise ValueError(f"mmd needs at least 2 samples per set, got {n} and {m}")
    nb = len(bandwidths)  # k(a, a) = number of bandwidths: the diagonal removed below
    kxx = (_kernel_sum(x, x, bandwidths, chunk, True) - n * nb) / (n * (n - 1))
    if kyy is None:
        kyy = (_kernel_sum(y, y, bandwidths, chunk, True) - m * nb) / (m * (m - 1))
    kxy = _kernel_sum(x, y, bandwidths, chunk, False) / (n * m)
    return kxx + kyy - 2 * kxy


# --------------------------------------------------------------------------------------------------------------
# k-NN precision / recall / density / coverage
# --------------------------------------------------------------------------------------------------------------
def prdc_metrics(real: Tensor, fake: Tensor, k: int = 5) -> dict[str, float]:
    """k-NN precision, recall, density and coverage of ``fake`` against ``real`` (``prdc.compute_prdc``).

    Precision: share of fake points inside the union of real k-NN balls; recall: share of real points inside the
    union of fake k-NN balls; density: mean number of real balls holding a fake point, / k (about 1 for equal laws);
    coverage: share of real balls holding at least one fake point. The values depend on the set sizes: compare
    sets of equal sizes (``sample_metrics`` does). Memory is ``O(N^2)``.
    """
    real, fake = _cpu64(real), _cpu64(fake)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"prdc with k={k} needs more than k points per set, got {len(real)} and {len(fake)}")
    with contextlib.redirect_stdout(io.StringIO()):  # compute_prdc prints the set sizes
        out = compute_prdc(real_features=real.numpy(), fake_features=fake.numpy(), nearest_k=k)
    return {key: float(out[key]) for key in ("precision", "recall", "density", "coverage")}


# --------------------------------------------------------------------------------------------------------------
# Known Gaussian mixtures
# --------------------------------------------------------------------------------------------------------------
def gmm_nll(x: Tensor, law) -> float:
    """Mean negative log-likelihood ``-1/N sum_i log p(x_i)`` of the samples under the law's exact density."""
    return -float(law.log_prob(_cpu64(x)).mean())


def _normalised_distances(x: Tensor, law) -> Tensor:
    """``||x_i - mu_j|| / s_j``: [N, K] (NaN rows stay NaN)."""
    means, stds = law.means.to(torch.float64), law.stds.to(torch.float64)
    return torch.cdist(x, means, compute_mode="donot_use_mm_for_euclid_dist") / stds[None, :]


def hq_fraction(x: Tensor, law, n_std: float = 3.0) -> float:
    """Fraction of samples within ``n_std`` component stds of a component mean: ``min_j ||x - mu_j|| / s_j <= n_std``.

    A non-finite sample counts as not high-quality. For exact samples of a well-separated mixture in d dims this is
    ``P(chi_d <= n_std)``, e.g. ``1 - exp(-n_std^2 / 2) = 0.9889`` for d = 2, n_std = 3.
    """
    x = _cpu64(x)
    if len(x) == 0:
        return float("nan")
    ok = finite_rows(x)
    hq = torch.zeros(len(x), dtype=torch.bool)
    hq[ok] = _normalised_distances(x[ok], law).min(dim=1).values <= n_std
    return float(hq.double().mean())


def mode_coverage(x: Tensor, law, min_fraction: float = 0.25, n_std: float = 3.0) -> float:
    """Fraction of mixture components that the samples cover.

    Rule: each finite sample is assigned to its most responsible component at sigma = 0 (``argmax_j r_j(x)``);
    component j is covered when at least ``min_fraction * N * w_j`` samples assigned to it are also high-quality,
    i.e. within ``n_std * s_j`` of ``mu_j``. N counts every sample (non-finite ones too), so a mode is covered only
    when it holds a fair share (a quarter of its weight, by default) of good samples.
    """
    x = _cpu64(x)
    n = len(x)
    k = law.num_components
    if n == 0:
        return float("nan")
    ok = finite_rows(x)
    xf = x[ok]
    assigned = law.responsibilities(xf).argmax(dim=1)
    dist = _normalised_distances(xf, law).gather(1, assigned[:, None])[:, 0]
    good = assigned[dist <= n_std]
    counts = torch.bincount(good, minlength=k).double()
    covered = counts >= min_fraction * n * law.weights.to(torch.float64)
    return float(covered.double().mean())


# --------------------------------------------------------------------------------------------------------------
# The evaluator's entry point
# --------------------------------------------------------------------------------------------------------------
_DISTANCE_KEYS = ("mmd", "sliced_w2", "w2", "precision", "recall", "density", "coverage")


def sample_metrics(
    samples: Tensor,
    heldout: Tensor,
    law=None,
    *,
    generator: torch.Generator | None = None,
    w2_points: int = 1000,
    prdc_k: int = 5,
    prdc_points: int = 2000,
    mmd_points: int = 4000,
    n_projections: int = 256,
    bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS,
    cache: dict | None = None,
) -> dict[str, float]:
    """All sample metrics of ``samples`` [N, d] against ``heldout`` [M, d] (never training data).

    Keys: ``nonfinite`` (share of samples with a NaN / inf entry; always present), ``mmd``, ``sliced_w2``, ``w2``,
    ``precision``, ``recall``, ``density``, ``coverage``; plus ``nll`` when ``law.has_density``; plus
    ``mode_coverage`` and ``hq_fraction`` when ``law`` is a Gaussian mixture (has ``means``).

    The distances use the finite samples only (NaN when fewer than 2 remain); ``hq_fraction`` and ``mode_coverage``
    count a non-finite sample as a failure; ``nll`` is the mean over finite samples.
    Subsampling (uniform, without replacement, seeded): MMD on at most ``mmd_points`` rows of each set; exact W2 on
    at most ``w2_points``; prdc on ``min(prdc_points, N_finite, M)`` rows of each set (equal sizes, because prdc
    values depend on them). Each metric draws from its own generator, seeded from ``generator`` (default seed 0),
    so that a metric does not depend on which others ran. About 0.5-1 s for 2000 vs 10000 points in 2D on 2 cores.
    ``cache``: a dict the caller keeps across calls with the same ``heldout`` (it must not change in between):
    quantities of the held-out set alone are computed once per seed. Results are identical with or without it.
    """
    x_all, y = _cpu64(samples), _cpu64(heldout)
    ok = finite_rows(x_all)
    x = x_all[ok]
    out: dict[str, float] = {"nonfinite": float(1.0 - ok.double().mean()) if len(x_all) else float("nan")}
    seeds = torch.randint(0, 2**62, (4,), generator=_generator(generator)).tolist()
    gens = [torch.Generator().manual_seed(s) for s in seeds]

    if len(x) < 2:
        out.update({key: float("nan") for key in _DISTANCE_KEYS})
    else:
        # the held-out subset is drawn first, so it depends on the seed alone and its self-term can be cached
        y_mmd = _subsample(y, mmd_points, gens[0])
        key = ("mmd_kyy", seeds[0], len(y), mmd_points, tuple(bandwidths))
        if cache is not None and key not in cache:
            cache[key] = mmd_self_term(y_mmd, bandwidths)
        out["mmd"] = mmd(_subsample(x, mmd_points, gens[0]), y_mmd, bandwidths,
                         kyy=cache[key] if cache is not None else None)
        out["sliced_w2"] = sliced_w2(x, y, n_projections, gens[1])
        out["w2"] = exact_w2(x, y, w2_points, gens[2])
        n_prdc = min(prdc_points, len(x), len(y))
        if n_prdc > prdc_k:
            out.update(prdc_metrics(_subsample(y, n_prdc, gens[3]), _subsample(x, n_prdc, gens[3]), prdc_k))
        else:
            out.update({key: float("nan") for key in ("precision", "recall", "density", "coverage")})

    if law is not None and getattr(law, "has_density", False):
        out["nll"] = gmm_nll(x, law) if len(x) else float("nan")
    if law is not None and hasattr(law, "means"):
        out["mode_coverage"] = mode_coverage(x_all, law)
        out["hq_fraction"] = hq_fraction(x_all, law)
    return out
