"""Two-dimensional laws with exact samplers; Gaussian mixtures also with exact (noisy) densities.

The Gaussian mixture is the project's oracle (docs/method.md section 1): for
``p = sum_j w_j N(mu_j, s_j^2 I)`` the forward-noised marginal is
``q_sigma = sum_j w_j N(mu_j, (s_j^2 + sigma^2) I)`` and the exact denoiser is
``D(x, sigma) = sum_j r_j(x) [mu_j + s_j^2 / (s_j^2 + sigma^2) (x - mu_j)]``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from diffusion_irl.tensors import batch_sigma


class Law:
    """A law on R^d with an exact sampler. ``log_prob`` is implemented only where the density is known."""

    dim: int = 2
    name: str = "law"

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def has_density(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class GaussianMixture(Law):
    """Isotropic Gaussian mixture ``sum_j w_j N(mu_j, s_j^2 I)``.

    Args:
        means: [K, d] component means.
        stds: [K] (or a scalar) isotropic component standard deviations, > 0.
        weights: [K] non-negative weights (normalised here); uniform when omitted.
    """

    name = "gmm"

    def __init__(self, means: Sequence | Tensor, stds: Sequence | float | Tensor, weights: Sequence | Tensor | None = None):
        means_t = torch.as_tensor(means, dtype=torch.float64)
        if means_t.ndim == 1:
            means_t = means_t[:, None]
        if means_t.ndim != 2 or means_t.shape[0] == 0:
            raise ValueError(f"gmm means must be a non-empty [K, d] list, got shape {tuple(means_t.shape)}")
        k = means_t.shape[0]
        stds_t = torch.as_tensor(stds, dtype=torch.float64)
        if stds_t.ndim == 0:
            stds_t = stds_t.expand(k).clone()
        if stds_t.shape != (k,):
            raise ValueError(f"gmm stds must be a scalar or have one entry per component ({k}), got {tuple(stds_t.shape)}")
        if (stds_t <= 0).any():
            raise ValueError(f"gmm stds must be > 0, got {stds_t.tolist()}")
        if weights is None:
            weights_t = torch.full((k,), 1.0 / k, dtype=torch.float64)
        else:
            weights_t = torch.as_tensor(weights, dtype=torch.float64)
            if weights_t.shape != (k,):
                raise ValueError(f"gmm weights must have one entry per component ({k}), got {tuple(weights_t.shape)}")
            if (weights_t < 0).any() or weights_t.sum() <= 0:
                raise ValueError(f"gmm weights must be non-negative with a positive sum, got {weights_t.tolist()}")
            weights_t = weights_t / weights_t.sum()
        self.means, self.stds, self.weights = means_t, stds_t, weights_t
        self.dim = means_t.shape[1]

    @property
    def has_density(self) -> bool:
        return True

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.num_components}, d={self.dim})"

    def sample(self, n: int, generator: torch.Generator | None = None, return_components: bool = False):
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = (self.means[comp] + self.stds[comp, None] * noise).float()
        return (x, comp) if return_components else x

    def _params(self, x: Tensor):
        return (self.means.to(x.device, x.dtype), self.stds.to(x.device, x.dtype), self.weights.to(x.device, x.dtype))

    def component_log_probs(self, x: Tensor, sigma: float | Tensor = 0.0) -> Tensor:
        """``log w_j + log N(x; mu_j, (s_j^2 + sigma^2) I)`` for every component: shape [B, K]."""
        means, stds, weights = self._params(x)
        var = stds[None, :] ** 2 + batch_sigma(sigma, x)[:, None] ** 2  # [B, K]
        sq = torch.cdist(x, means) ** 2 if x.dtype != torch.float64 else ((x[:, None, :] - means[None]) ** 2).sum(-1)
        return weights.log()[None] - 0.5 * sq / var - 0.5 * self.dim * torch.log(2 * math.pi * var)

    def log_prob(self, x: Tensor, sigma: float | Tensor = 0.0) -> Tensor:
        """Exact log-density of the noisy marginal ``q_sigma`` at x ([B, d] -> [B]); sigma = 0 is the data law."""
        return torch.logsumexp(self.component_log_probs(x, sigma), dim=1)

    def responsibilities(self, x: Tensor, sigma: float | Tensor = 0.0) -> Tensor:
        """Posterior component probabilities ``r_j(x)`` under ``q_sigma``: [B, K]."""
        return torch.softmax(self.component_log_probs(x, sigma), dim=1)

    def denoise(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """Exact ``E[x0 | x0 + sigma n = x]`` (docs/method.md section 1): [B, d]."""
        means, stds, _ = self._params(x)
        s = batch_sigma(sigma, x)[:, None]
        r = self.responsibilities(x, s[:, 0])  # [B, K]
        shrink = stds[None, :] ** 2 / (stds[None, :] ** 2 + s**2)  # [B, K]
        # sum_j r_j [mu_j + shrink_j (x - mu_j)] = sum_j r_j (1 - shrink_j) mu_j + (sum_j r_j shrink_j) x
        return (r * (1 - shrink)) @ means + (r * shrink).sum(1, keepdim=True) * x

    def score(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """``grad_x log q_sigma(x) = (D(x, sigma) - x) / sigma^2``."""
        s = batch_sigma(sigma, x)[:, None]
        return (self.denoise(x, s[:, 0]) - x) / s**2

    def noisy(self, sigma: float) -> "GaussianMixture":
        """The forward-noised marginal ``q_sigma`` as a mixture."""
        return GaussianMixture(self.means, torch.sqrt(self.stds**2 + float(sigma) ** 2), self.weights)

    def to_distribution(self) -> torch.distributions.MixtureSameFamily:
        """The same law as a ``torch.distributions`` object (used by tests as an independent reference)."""
        comps = torch.distributions.Independent(
            torch.distributions.Normal(self.means, self.stds[:, None].expand_as(self.means)), 1
        )
        return torch.distributions.MixtureSameFamily(torch.distributions.Categorical(probs=self.weights), comps)


def gmm8(radius: float = 4.0, std: float = 0.3) -> GaussianMixture:
    """8 equal components on a circle (docs/method.md section 8: radius 4, std 0.3)."""
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    law = GaussianMixture(torch.stack([radius * angles.cos(), radius * angles.sin()], 1), std)
    law.name = "gmm8"
    return law


def gmm25(spacing: float = 2.0, std: float = 0.1) -> GaussianMixture:
    """25 equal components on a 5x5 grid centred at the origin."""
    ticks = (torch.arange(5, dtype=torch.float64) - 2) * spacing
    grid = torch.cartesian_prod(ticks, ticks)
    law = GaussianMixture(grid, std)
    law.name = "gmm25"
    return law


class _SamplerLaw(Law):
    """A 2D law known only through its exact sampler (no closed-form density)."""

    def __init__(self, noise: float = 0.0, scale: float = 1.0):
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.noise, self.scale = float(noise), float(scale)

    def _draw(self, n: int, g: torch.Generator | None) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        x = self._draw(n, generator).double()
        if self.noise > 0:
            x = x + self.noise * torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (self.scale * x).float()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(noise={self.noise}, scale={self.scale})"


def _uniform(n: int, g, lo: float = 0.0, hi: float = 1.0) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


class Checkerboard(_SamplerLaw):
    """Uniform on the black squares of a 4x4 checkerboard on [-2, 2]^2 (times ``scale``)."""

    name = "checkerboard"

    def _draw(self, n, g):
        x1 = _uniform(n, g, -2, 2)
        x2 = _uniform(n, g, 0, 1) + torch.randint(0, 2, (n,), generator=g).double() * 2 - 2
        x2 = x2 + (torch.floor(x1) % 2)
        return torch.stack([x1, x2], 1)


class SwissRoll(_SamplerLaw):
    """The 2D Swiss roll (sklearn's parametrisation, rescaled to about [-2.5, 2.5]^2)."""

    name = "swissroll"

    def _draw(self, n, g):
        t = 1.5 * math.pi * (1 + 2 * _uniform(n, g))
        return torch.stack([t * t.cos(), t * t.sin()], 1) / 5.0


class Moons(_SamplerLaw):
    """Two interleaving half circles (sklearn's make_moons), centred."""

    name = "moons"

    def _draw(self, n, g):
        t = math.pi * _uniform(n, g)
        upper = torch.rand(n, generator=g) < 0.5
        x = torch.where(upper, t.cos(), 1 - t.cos())
        y = torch.where(upper, t.sin(), 0.5 - t.sin())
        return torch.stack([x - 0.5, y - 0.25], 1) * 2


class Spirals(_SamplerLaw):
    """Two interleaved Archimedean spirals."""

    name = "spirals"

    def _draw(self, n, g):
        r = torch.sqrt(_uniform(n, g)) * 3 * math.pi
        sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
        return sign[:, None] * torch.stack([-r * r.cos(), r * r.sin()], 1) / 3.0


class Rings(_SamplerLaw):
    """Four concentric circles of radii 0.5, 1, 1.5, 2 (before ``scale``), equally likely."""

    name = "rings"

    def _draw(self, n, g):
        radius = 0.5 * (1 + torch.randint(0, 4, (n,), generator=g).double())
        t = 2 * math.pi * _uniform(n, g)
        return torch.stack([radius * t.cos(), radius * t.sin()], 1) * 1.5
