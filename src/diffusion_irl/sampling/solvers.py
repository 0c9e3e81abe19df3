"""Pure, batched sampler functions over a denoiser ``D(x, sigma)`` (docs/method.md section 2).

Conventions (k-diffusion / EDM style):
- ``sigmas`` is a decreasing 1D tensor ending with 0 (``schedules.py``); sigma arguments of the single-step
  functions may be scalars or per-sample tensors [B].
- Stochastic samplers take ``noise``: a :class:`~diffusion_irl.sampling.noise.NoiseStream` (or anything with
  ``step(i, like)`` / ``extra(j, like)`` returning standard normal tensors).
- ``callback(info)`` is called once per step with a :class:`StepInfo`: the state ``(x, sigma, step)`` at the start
  of the step, the denoised estimate, the next state, and for steps that contain a Gaussian move
  ``x' ~ N(mean, std^2 I)`` its ``mean`` and ``std`` (a per-sample [B] tensor) and the draw ``x'``.
- Memory does not grow with the number of steps: nothing is kept unless the callback keeps it.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion_irl.tensors import append_dims, batch_sigma

Denoiser = Callable[[Tensor, Tensor], Tensor]


@dataclass
class StepInfo:
    x: Tensor                  # state at the start of the step
    sigma: Tensor              # [B] noise level of x
    step: int                  # step index i
    sigma_next: Tensor         # [B] noise level after the step
    x_next: Tensor             # state after the step
    denoised: Tensor | None = None
    mean: Tensor | None = None  # Gaussian part of the step, x' ~ N(mean, std^2 I)
    std: Tensor | None = None   # [B]
    noised: Tensor | None = None  # the Gaussian draw x' (= x_next for ancestral steps, x_hat for churn)
    kind: str = ""


def _s(sigma, x: Tensor) -> Tensor:
    return batch_sigma(sigma, x)


def to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """ODE slope ``dx/dsigma = (x - D(x, sigma)) / sigma``."""
    return (x - denoised) / append_dims(sigma, x.ndim)


# --- single steps ------------------------------------------------------------------------------------------------

def euler_step(D: Denoiser, x: Tensor, sigma, sigma_next, denoised: Tensor | None = None):
    """``x + (sigma_next - sigma) d``. Returns ``(x_next, denoised)``; 1 NFE (0 if ``denoised`` is given)."""
    sigma, sigma_next = _s(sigma, x), _s(sigma_next, x)
    if denoised is None:
        denoised = D(x, sigma)
    return x + append_dims(sigma_next - sigma, x.ndim) * to_d(x, sigma, denoised), denoised


def heun_step(D: Denoiser, x: Tensor, sigma, sigma_next, denoised: Tensor | None = None):
    """EDM Algorithm 1 step: Euler, then the trapezoidal correction unless ``sigma_next == 0``.

    Returns ``(x_next, denoised)``; 2 NFE (1 when every sigma_next is 0)."""
    sigma, sigma_next = _s(sigma, x), _s(sigma_next, x)
    if denoised is None:
        denoised = D(x, sigma)
    d = to_d(x, sigma, denoised)
    dt = append_dims(sigma_next - sigma, x.ndim)
    x_euler = x + dt * d
    last = sigma_next == 0
    if bool(last.all()):
        return x_euler, denoised
    safe_next = torch.where(last, torch.ones_like(sigma_next), sigma_next)
    d_prime = to_d(x_euler, safe_next, D(x_euler, safe_next))
    x_heun = x + dt * 0.5 * (d + d_prime)
    return torch.where(append_dims(last, x.ndim), x_euler, x_heun), denoised


def ancestral_sigmas(sigma, sigma_next, eta: float = 1.0):
    """``sigma_up = min(sigma_next, eta sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2))``,
    ``sigma_down = sqrt(sigma_next^2 - sigma_up^2)``. eta = 1 is DDPM's posterior; eta = 0 is deterministic."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).clamp(min=0).sqrt())
    sigma_down = (sigma_next**2 - sigma_up**2).clamp(min=0).sqrt()
    return sigma_down, sigma_up


def ancestral_step(D: Denoiser, x: Tensor, sigma, sigma_next, eps: Tensor, eta: float = 1.0,
                   denoised: Tensor | None = None):
    """DDPM / DDIM(eta) / Euler-ancestral step as a Gaussian move: ``x_next ~ N(mean, sigma_up^2 I)`` with
    ``mean = x + (sigma_down - sigma) d``. Returns ``(x_next, denoised, mean, sigma_up)``; 1 NFE."""
    sigma, sigma_next = _s(sigma, x), _s(sigma_next, x)
    if denoised is None:
        denoised = D(x, sigma)
    sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next, eta)
    mean = x + append_dims(sigma_down - sigma, x.ndim) * to_d(x, sigma, denoised)
    return mean + append_dims(sigma_up, x.ndim) * eps, denoised, mean, sigma_up


def churn(x: Tensor, sigma, gamma, eps: Tensor, S_noise: float = 1.0):
    """EDM Algorithm 2 lines 5-6: ``sigma_hat = sigma (1 + gamma)``,
    ``x_hat = x + sqrt(sigma_hat^2 - sigma^2) S_noise eps``: a Gaussian move N(x, std^2 I).
    Returns ``(x_hat, sigma_hat, std)``."""
    sigma = _s(sigma, x)
    gamma = torch.as_tensor(gamma, dtype=x.dtype, device=x.device).expand_as(sigma)
    if (gamma < 0).any():
        raise ValueError("churn gamma must be >= 0")
    sigma_hat = sigma * (1 + gamma)
    std = (sigma_hat**2 - sigma**2).sqrt() * S_noise
    return x + append_dims(std, x.ndim) * eps, sigma_hat, std


def dpmpp_2m_step(x: Tensor, sigma, sigma_next, denoised: Tensor, old_denoised: Tensor | None = None,
                  sigma_prev=None) -> Tensor:
    """DPM-Solver++(2M) update in ``lambda = -log sigma`` on the data prediction (Lu et al. 2022, k-diffusion).

    First order when there is no history or ``sigma_next == 0`` (then ``x_next = denoised``)."""
    sigma, sigma_next = _s(sigma, x), _s(sigma_next, x)
    if bool((sigma_next == 0).all()):
        return denoised
    t, t_next = -sigma.log(), -sigma_next.log()
    h = t_next - t
    ratio = append_dims(sigma_next / sigma, x.ndim)
    coef = append_dims(-torch.expm1(-h), x.ndim)
    if old_denoised is None:
        return ratio * x + coef * denoised
    h_last = t - (-_s(sigma_prev, x).log())
    r = append_dims(h_last / h, x.ndim)
    denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
    return ratio * x + coef * denoised_d


# --- whole samplers ----------------------------------------------------------------------------------------------

def _call(callback, **kw):
    if callback is not None:
        callback(StepInfo(**kw))


def _ode_loop(step_fn, kind: str, D: Denoiser, x: Tensor, sigmas: Tensor, callback=None) -> Tensor:
    """Apply a deterministic single-step solver ``step_fn(D, x, sigma, sigma_next) -> (x_next, denoised)`` along
    ``sigmas``."""
    for i in range(len(sigmas) - 1):
        x_next, den = step_fn(D, x, sigmas[i], sigmas[i + 1])
        _call(callback, x=x, sigma=_s(sigmas[i], x), step=i, sigma_next=_s(sigmas[i + 1], x), x_next=x_next,
              denoised=den, kind=kind)
        x = x_next
    return x


@torch.no_grad()
def sample_euler(D: Denoiser, x: Tensor, sigmas: Tensor, callback=None) -> Tensor:
    """Euler on the probability-flow ODE (= DDIM with eta 0). NFE = number of steps."""
    return _ode_loop(euler_step, "euler", D, x, sigmas, callback)


@torch.no_grad()
def sample_heun(D: Denoiser, x: Tensor, sigmas: Tensor, callback=None) -> Tensor:
    """EDM Algorithm 1 (Heun, 2nd order). NFE = 2 * steps - 1."""
    return _ode_loop(heun_step, "heun", D, x, sigmas, callback)


@torch.no_grad()
def sample_ancestral(D: Denoiser, x: Tensor, sigmas: Tensor, noise, eta: float = 1.0, callback=None) -> Tensor:
    """DDPM ancestral (eta 1), DDIM(eta), Euler-ancestral: all are this update in sigma-space. NFE = steps."""
    for i in range(len(sigmas) - 1):
        eps = noise.step(i, x) if eta > 0 else torch.zeros_like(x)  # eta = 0 (DDIM): sigma_up = 0, nothing to draw
        x_next, den, mean, std = ancestral_step(D, x, sigmas[i], sigmas[i + 1], eps, eta)
        _call(callback, x=x, sigma=_s(sigmas[i], x), step=i, sigma_next=_s(sigmas[i + 1], x), x_next=x_next,
              denoised=den, mean=mean, std=std, noised=x_next, kind="ancestral")
        x = x_next
    return x


def edm_gammas(sigmas: Tensor, S_churn: float, S_tmin: float, S_tmax: float) -> Tensor:
    """``gamma_i = min(S_churn / N, sqrt(2) - 1)`` for ``S_tmin <= sigma_i <= S_tmax``, else 0."""
    if S_churn < 0:
        raise ValueError(f"S_churn must be >= 0, got {S_churn}")
    n = len(sigmas) - 1
    g = min(S_churn / n, math.sqrt(2) - 1)
    s = sigmas[:-1]
    return torch.where((s >= S_tmin) & (s <= S_tmax), torch.full_like(s, g), torch.zeros_like(s))


@torch.no_grad()
def sample_edm_sde(D: Denoiser, x: Tensor, sigmas: Tensor, noise, S_churn: float = 0.0, S_tmin: float = 0.0,
                   S_tmax: float = float("inf"), S_noise: float = 1.0, gammas: Tensor | None = None,
                   callback=None) -> Tensor:
    """EDM Algorithm 2: churn (a Gaussian move to ``sigma_hat``), then a Heun step from ``sigma_hat``.

    ``gammas`` [steps] overrides the S_churn rule (a per-step churn schedule). NFE = 2 * steps - 1."""
    if gammas is None:
        gammas = edm_gammas(sigmas, S_churn, S_tmin, S_tmax)
    for i in range(len(sigmas) - 1):
        eps = noise.step(i, x)
        x_hat, sigma_hat, std = churn(x, sigmas[i], gammas[i], eps, S_noise)
        x_next, den = heun_step(D, x_hat, sigma_hat, sigmas[i + 1])
        _call(callback, x=x, sigma=_s(sigmas[i], x), step=i, sigma_next=_s(sigmas[i + 1], x), x_next=x_next,
              denoised=den, mean=x, std=std, noised=x_hat, kind="edm_sde")
        x = x_next
    return x


@torch.no_grad()
def sample_dpmpp_2m(D: Denoiser, x: Tensor, sigmas: Tensor, callback=None) -> Tensor:
    """DPM-Solver++(2M). NFE = steps."""
    old = None
    for i in range(len(sigmas) - 1):
        den = D(x, _s(sigmas[i], x))
        x_next = dpmpp_2m_step(x, sigmas[i], sigmas[i + 1], den, old, sigmas[i - 1] if i > 0 else None)
        _call(callback, x=x, sigma=_s(sigmas[i], x), step=i, sigma_next=_s(sigmas[i + 1], x), x_next=x_next,
              denoised=den, kind="dpmpp_2m")
        old, x = den, x_next
    return x


def restart_index(sigmas: Tensor, t_min: float) -> int:
    """The index j of the noise level where Restart jumps back: the first non-zero ``sigma_j <= t_min`` (the last
    non-zero one if none is that small)."""
    nonzero = sigmas[:-1]
    below = (nonzero <= t_min).nonzero()
    return int(below[0]) if len(below) else len(nonzero) - 1


@torch.no_grad()
def sample_restart(D: Denoiser, x: Tensor, sigmas: Tensor, noise, t_max: float, restart_sigmas: Callable[[float, float], Tensor],
                   t_min: float, K: int = 1, S_noise: float = 1.0, callback=None) -> Tensor:
    """Restart (Xu et al. 2023) on a Heun ODE solver: on reaching ``sigma_j`` (the first level <= t_min), K times:
    jump to ``t_max`` with ``x += sqrt(t_max^2 - sigma_j^2) S_noise eps`` (a Gaussian move) and re-solve the ODE
    from ``t_max`` back to ``sigma_j`` on ``restart_sigmas(sigma_j, t_max)`` (decreasing, from t_max to sigma_j).

    NFE = 2 * steps - 1 + K * 2 * (len(restart_sigmas) - 1)."""
    if K < 0:
        raise ValueError(f"restart K must be >= 0, got {K}")
    j_restart = restart_index(sigmas, t_min)
    step = 0
    for i in range(len(sigmas) - 1):
        x_next, den = heun_step(D, x, sigmas[i], sigmas[i + 1])
        _call(callback, x=x, sigma=_s(sigmas[i], x), step=step, sigma_next=_s(sigmas[i + 1], x), x_next=x_next,
              denoised=den, kind="heun")
        x, step = x_next, step + 1
        if i + 1 == j_restart:
            s_min = float(sigmas[j_restart])
            if t_max <= s_min:
                continue
            sub = restart_sigmas(s_min, t_max)
            for k in range(K):
                eps = noise.extra(k, x)
                std = torch.full((x.shape[0],), math.sqrt(t_max**2 - s_min**2) * S_noise, dtype=x.dtype, device=x.device)
                x_jump = x + append_dims(std, x.ndim) * eps
                _call(callback, x=x, sigma=_s(s_min, x), step=step, sigma_next=_s(t_max, x), x_next=x_jump,
                      mean=x, std=std, noised=x_jump, kind="restart_jump")
                x, step = x_jump, step + 1
                for m in range(len(sub) - 1):
                    x_next, den = heun_step(D, x, sub[m], sub[m + 1])
                    _call(callback, x=x, sigma=_s(sub[m], x), step=step, sigma_next=_s(sub[m + 1], x), x_next=x_next,
                          denoised=den, kind="heun")
                    x, step = x_next, step + 1
    return x
