"""Rewards from a noise-conditional discriminator's logit (docs/method.md section 4).

The discriminator is trained to tell forward-noised data q_sigma (positives) from policy states p^pi (negatives);
at its optimum its logit is ``l = log q_sigma(x) - log p^pi(x)``, so the density ratio is ``u = p^pi / q = exp(-l)``.
Minimising ``D_f(p^pi || q) = E_q[f(u)]`` by policy gradient treats ``r = -f'(u)`` as the reward of reaching x.

| name        | f(u)                                  | reward r(l)                               |
|-------------|---------------------------------------|-------------------------------------------|
| kl          | u log u                               | l - 1                                     |
| reverse_kl  | -log u                                | exp(l)            (l clipped)             |
| js          | u log u - (1+u) log((1+u)/2)          | softplus(l) - log 2                       |
| chi2        | (u - 1)^2                             | 2 (1 - exp(-l))   (l clipped)             |
| pr(lambda)  | max(lambda u, 1) - max(lambda, 1)     | -lambda 1[l < log lambda], smoothed:      |
|             |                                       | -lambda sigmoid((log lambda - l) / T)     |
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

DIVERGENCES = ("kl", "reverse_kl", "js", "chi2", "pr")
WEIGHTINGS = ("dense", "terminal", "ramp")


def f_divergence_generator(name: str, u: Tensor, lam: float = 1.0) -> Tensor:
    """The generator ``f(u)`` of each divergence (used by tests and diagnostics)."""
    if name == "kl":
        return u * u.log()
    if name == "reverse_kl":
        return -u.log()
    if name == "js":
        return u * u.log() - (1 + u) * ((1 + u) / 2).log()
    if name == "chi2":
        return (u - 1) ** 2
    if name == "pr":
        return torch.clamp(lam * u, min=1.0) - max(lam, 1.0)
    raise ValueError(f"unknown divergence {name!r}; choose one of {DIVERGENCES}")


def reward_from_logit(name: str, logit: Tensor, lam: float = 1.0, temperature: float = 0.0) -> Tensor:
    """``r = -f'(u)`` at ``u = exp(-logit)``, written in the logit for numerical stability.

    For ``pr``, ``temperature = 0`` gives the exact step ``-lam 1[l < log lam]``; ``temperature > 0`` smooths it
    with a sigmoid of that width in logit units."""
    if name == "kl":
        return logit - 1
    if name == "reverse_kl":
        return logit.exp()
    if name == "js":
        return F.softplus(logit) - math.log(2.0)
    if name == "chi2":
        return 2 * (1 - (-logit).exp())
    if name == "pr":
        if lam <= 0:
            raise ValueError(f"the PR divergence needs lambda > 0, got {lam}")
        if temperature > 0:
            return -lam * torch.sigmoid((math.log(lam) - logit) / temperature)
        return -lam * (logit < math.log(lam)).to(logit.dtype)
    raise ValueError(f"unknown divergence {name!r}; choose one of {DIVERGENCES}")


class Reward:
    """Config-facing reward: divergence name, logit clipping, PR parameters.

    Args:
        divergence: one of ``kl, reverse_kl, js, chi2, pr``.
        logit_clip: logits are clipped to ``[-logit_clip, logit_clip]`` before the reward (null: no clipping).
        lam, temperature: PR-divergence lambda (> 0) and smoothing temperature (>= 0).
        weighting: per-step weights of the rewards, ``dense``, ``terminal`` or ``ramp`` (:func:`step_weights`).
        nfe_cost: reward ``-nfe_cost`` per denoiser evaluation spent in a step (the quality / efficiency
            temperature; matters for knobs whose NFE varies, e.g. renoise).
    """

    def __init__(self, divergence: str = "kl", logit_clip: float | None = 5.0, lam: float = 1.0,
                 temperature: float = 0.0, weighting: str = "dense", nfe_cost: float = 0.0):
        if divergence not in DIVERGENCES:
            raise ValueError(f"reward.divergence must be one of {DIVERGENCES}, got {divergence!r}")
        if logit_clip is not None and logit_clip <= 0:
            raise ValueError(f"reward.logit_clip must be > 0 or null, got {logit_clip}")
        if lam <= 0 or temperature < 0:
            raise ValueError(f"reward.lam must be > 0 and reward.temperature >= 0, got {lam}, {temperature}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"reward.weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if nfe_cost < 0:
            raise ValueError(f"reward.nfe_cost must be >= 0, got {nfe_cost}")
        self.divergence, self.logit_clip, self.lam, self.temperature = divergence, logit_clip, float(lam), float(temperature)
        self.weighting, self.nfe_cost = weighting, float(nfe_cost)

    def weights(self, horizon: int, dtype=torch.float32) -> Tensor:
        return step_weights(self.weighting, horizon, dtype)

    def __call__(self, logit: Tensor) -> Tensor:
        if self.logit_clip is not None:
            logit = logit.clamp(-self.logit_clip, self.logit_clip)
        return reward_from_logit(self.divergence, logit, self.lam, self.temperature)


def step_weights(kind: str, horizon: int, dtype=torch.float32) -> Tensor:
    """Per-step weights ``w_k`` for the rewards of states ``x_1 .. x_N`` (index k-1): ``dense`` (all ones),
    ``terminal`` (only the final state), ``ramp`` (``k / N``, growing towards the data)."""
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    if kind == "dense":
        return torch.ones(horizon, dtype=dtype)
    if kind == "terminal":
        w = torch.zeros(horizon, dtype=dtype)
        w[-1] = 1
        return w
    if kind == "ramp":
        return torch.arange(1, horizon + 1, dtype=dtype) / horizon
    raise ValueError(f"unknown step weighting {kind!r}: use dense, terminal or ramp")


def returns_to_go(rewards: Tensor, weights: Tensor) -> Tensor:
    """``G_k = sum_{j >= k} w_j r_j`` over the last dim: ``rewards[..., j]`` is the reward of reaching state
    ``x_{j+1}``, so ``G_k`` is the return of the action taken at step k. Shapes [..., N] -> [..., N]."""
    weighted = rewards * weights
    return weighted.flip(-1).cumsum(-1).flip(-1)
