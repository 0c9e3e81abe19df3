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


def solve_euler(D: Denoiser, x: Tensor, sigmas: Tensor, callback=None) -> Tensor:
    """Euler on the probability-flow ODE (= DDIM with eta 0). NFE = number of steps.

    The ``solve_*`` loops (Euler, Heun, DPM-Solver++(2M), iPNDM, DPM-Solver++(3M), UniPC) run with autograd as the
    caller has it, so a tuner can backpropagate to ``x`` and ``sigmas`` (LD3, pathwise); each ``sample_*`` is the
    same loop under ``torch.no_grad``."""
    return _ode_loop(euler_step, "euler", D, x, sigmas, callback)


def solve_heun(D: Denoiser, x: Tensor, sigmas: Tensor, callback=None) -> Tensor:
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


def solve_dpmpp_2m(D: Denoiser, x: Tensor, sigmas: Tensor, callback=None) -> Tensor:
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


# --- multistep solvers at 5-10 NFE (docs/method.md section 9) -------------------------------------------------------

IPNDM_COEFFS = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))
"""Adams–Bashforth weights of iPNDM for orders 1..4, newest slope first (docs/method.md section 9)."""


def ipndm_step(x: Tensor, sigma, sigma_next, ds: list[Tensor], old_sigmas: list | None = None) -> Tensor:
    """One iPNDM step (explicit Adams–Bashforth in sigma): with ``h = sigma_next - sigma`` and the slopes
    ``ds = [d_i, d_{i-1}, ...]`` (newest first, 1 to 4 of them, each [B, *shape]), ``x_next = x + h sum_j w_j ds[j]``.

    Fixed-step weights (``old_sigmas`` None, as GITS and AMED's iPNDM): ``w = IPNDM_COEFFS[len(ds) - 1]``, i.e.
    ``d_0``; ``(3 d_1 - d_0) / 2``; ``(23 d_2 - 16 d_1 + 5 d_0) / 12``;
    ``(55 d_i - 59 d_{i-1} + 37 d_{i-2} - 9 d_{i-3}) / 24``.
    Variable-step weights (``old_sigmas = [sigma_{i-1}, ...]``, scalars or [B]): ``w_j`` integrates the Lagrange
    polynomial through ``(sigma_{i-j}, d_{i-j})`` over ``[sigma, sigma_next]``: with
    ``u_j = (sigma_{i-j} - sigma) / h``, ``sum_j w_j u_j^m = 1 / (m + 1)`` for
    ``m < len(ds)`` (the fixed weights on a uniform grid). 0 NFE."""
    if not 1 <= len(ds) <= len(IPNDM_COEFFS):
        raise ValueError(f"iPNDM takes 1 to {len(IPNDM_COEFFS)} slopes, got {len(ds)}")
    sigma, sigma_next = _s(sigma, x), _s(sigma_next, x)
    h = sigma_next - sigma
    if old_sigmas is None or len(ds) == 1:
        slope = sum(c * d for c, d in zip(IPNDM_COEFFS[len(ds) - 1], ds))
    else:
        u = torch.stack([torch.zeros_like(h)] + [(_s(s, x) - sigma) / h for s in old_sigmas[: len(ds) - 1]], -1)
        V = torch.stack([u**m for m in range(len(ds))], -2)  # [B, m, j]
        rhs = torch.tensor([1 / (m + 1) for m in range(len(ds))], dtype=x.dtype, device=x.device).expand_as(u)
        w = torch.linalg.solve(V, rhs)
        slope = sum(append_dims(w[:, j], x.ndim) * d for j, d in enumerate(ds))
    return x + append_dims(h, x.ndim) * slope


def solve_ipndm(D: Denoiser, x: Tensor, sigmas: Tensor, max_order: int = 4, afs: bool = False,
                data_mean: float | Tensor = 0.0, variable_step: bool = False, callback=None) -> Tensor:
    """iPNDM: :func:`ipndm_step` of order ``min(i + 1, max_order)`` at step i on ``d_i = (x_i - D(x_i, sigma_i)) /
    sigma_i`` (lower-order warm start; fixed-step weights as in docs/method.md section 9, or the variable-step ones
    with ``variable_step``). ``afs`` (analytic first step): ``D(x_0, sigma_0)`` is replaced by ``data_mean`` (a float
    or a tensor broadcastable to x), so ``d_0 = (x_0 - data_mean) / sigma_0``. NFE = steps (steps - 1 with afs)."""
    if not 1 <= max_order <= len(IPNDM_COEFFS):
        raise ValueError(f"iPNDM max_order must be in 1..{len(IPNDM_COEFFS)}, got {max_order}")
    ds: list[Tensor] = []
    old_sigmas: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        sigma = _s(sigmas[i], x)
        den = torch.zeros_like(x) + data_mean if (afs and i == 0) else D(x, sigma)
        ds = [to_d(x, sigma, den)] + ds[: max_order - 1]
        x_next = ipndm_step(x, sigma, sigmas[i + 1], ds, old_sigmas if variable_step else None)
        _call(callback, x=x, sigma=sigma, step=i, sigma_next=_s(sigmas[i + 1], x), x_next=x_next, denoised=den,
              kind="ipndm")
        x, old_sigmas = x_next, [sigma] + old_sigmas[: max_order - 2]
    return x


def _zero_safe(sigma: Tensor, sigma_next: Tensor) -> tuple[Tensor, Tensor]:
    """``(last, safe_next)``: where ``sigma_next == 0`` (a final step to the data), ``safe_next = sigma / 2`` keeps the
    higher-order formulas finite; the caller then takes ``denoised`` there."""
    last = sigma_next == 0
    return last, torch.where(last, sigma / 2, sigma_next)


def dpmpp_multistep_step(x: Tensor, sigma, sigma_next, denoised: Tensor, old: list[Tensor] = (),
                         old_sigmas: list = (), order: int = 3) -> Tensor:
    """DPM-Solver++ multistep update (order 1, 2 or 3) in ``lambda = -log sigma`` on the data prediction, in
    sigma-space (x_sigma = x_vp / alpha: the VP scale factors cancel). ``old = [D_{i-1}, D_{i-2}]`` and
    ``old_sigmas = [sigma_{i-1}, sigma_{i-2}]`` (newest first); the order used is ``min(order, 1 + len(old))``.

    With ``h = log(sigma / sigma_next)``, ``phi = 1 - e^{-h}``, ``h_0 = log(sigma_{i-1} / sigma)``,
    ``h_1 = log(sigma_{i-2} / sigma_{i-1})``, ``r_0 = h_0 / h``, ``r_1 = h_1 / h``:
    - order 1: ``x_next = (sigma_next / sigma) x + phi D_i`` (DDIM);
    - order 2 (midpoint): ``... + phi (D_i + (D_i - D_{i-1}) / (2 r_0))``;
    - order 3: with ``D1_0 = (D_i - D_{i-1}) / r_0``, ``D1_1 = (D_{i-1} - D_{i-2}) / r_1``,
      ``D1 = D1_0 + r_0 (D1_0 - D1_1) / (r_0 + r_1)``, ``D2 = (D1_0 - D1_1) / (r_0 + r_1)``:
      ``x_next = (sigma_next / sigma) x + phi D_i + (1 - phi / h) D1 + ((phi - h) / h^2 + 1/2) D2``.
    Where ``sigma_next == 0`` the update is first order: ``x_next = D_i``. Shapes: x, D's [B, *shape]; sigmas scalars
    or [B]."""
    sigma, sigma_next = _s(sigma, x), _s(sigma_next, x)
    last, safe_next = _zero_safe(sigma, sigma_next)
    order = min(order, 1 + len(old))
    ratio = safe_next / sigma
    h = (sigma / safe_next).log()
    phi = -torch.expm1(-h)
    a = lambda t: append_dims(t, x.ndim)  # noqa: E731
    out = a(ratio) * x + a(phi) * denoised
    if order == 2:
        r0 = (_s(old_sigmas[0], x) / sigma).log() / h
        out = out + a(phi / (2 * r0)) * (denoised - old[0])
    elif order >= 3:
        s1, s2 = _s(old_sigmas[0], x), _s(old_sigmas[1], x)
        r0, r1 = (s1 / sigma).log() / h, (s2 / s1).log() / h
        d1_0, d1_1 = (denoised - old[0]) / a(r0), (old[0] - old[1]) / a(r1)
        d1 = d1_0 + a(r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / a(r0 + r1)
        out = out + a(1 - phi / h) * d1 + a((phi - h) / h**2 + 0.5) * d2
    return torch.where(a(last), denoised, out)


def multistep_order(i: int, steps: int, max_order: int, lower_order_final: bool, final_below: int | None) -> int:
    """The order of a multistep solver at step ``i`` of ``steps``: ``min(max_order, i + 1)`` (warm start), and with
    ``lower_order_final`` also at most ``steps - i`` (the last steps drop order), only when ``steps < final_below``
    (DPM-Solver++: 15) or always (``final_below=None``: UniPC)."""
    order = min(max_order, i + 1)
    if lower_order_final and (final_below is None or steps < final_below):
        order = min(order, steps - i)
    return order


def solve_dpmpp_3m(D: Denoiser, x: Tensor, sigmas: Tensor, lower_order_final: bool = True, callback=None) -> Tensor:
    """DPM-Solver++(3M): :func:`dpmpp_multistep_step` at order 1, 2, then 3; with ``lower_order_final`` and fewer
    than 15 steps, the last two steps use orders 2 and 1; a step to sigma 0 is always first order (``x = D``).
    NFE = steps."""
    n = len(sigmas) - 1
    old, old_sigmas = [], []
    for i in range(n):
        sigma = _s(sigmas[i], x)
        den = D(x, sigma)
        order = multistep_order(i, n, 3, lower_order_final, 15)
        x_next = dpmpp_multistep_step(x, sigma, sigmas[i + 1], den, old, old_sigmas, order)
        _call(callback, x=x, sigma=sigma, step=i, sigma_next=_s(sigmas[i + 1], x), x_next=x_next, denoised=den,
              kind="dpmpp_3m")
        old, old_sigmas, x = [den] + old[:1], [sigma] + old_sigmas[:1], x_next
    return x


def _unipc_b(h: Tensor, order: int) -> Tensor:
    """UniPC's right-hand side for B(h) = e^{-h} - 1 (bh2), on the data prediction: with ``hh = -h``,
    ``g_1 = (e^{hh} - 1) / hh - 1``, ``g_{k+1} = g_k / hh - 1 / (k+1)!``, ``b_k = k! g_k / B(h)``. [B, order]."""
    hh = -h
    b_h = torch.expm1(hh)
    g, fact, out = torch.expm1(hh) / hh - 1, 1.0, []
    for k in range(1, order + 1):
        out.append(g * fact / b_h)
        fact *= k + 1
        g = g / hh - 1 / fact
    return torch.stack(out, dim=-1)


def unipc_update(x: Tensor, sigma, sigma_next, denoised: Tensor, old: list[Tensor] = (), old_sigmas: list = (),
                 order: int = 2, denoised_next: Tensor | None = None) -> Tensor:
    """UniPC-bh2 on the data prediction in ``lambda = -log sigma`` (sigma-space: the VP scale factors cancel).

    Without ``denoised_next``, the predictor UniP-p (p = ``order``); with ``denoised_next = D(x_pred, sigma_next)``,
    the corrector UniC-p of the same step (its own order is p + 1). ``old = [D_{i-1}, ...]``, ``old_sigmas`` (newest
    first) give the ``p - 1`` earlier data predictions used. With ``h = log(sigma / sigma_next)``,
    ``phi = 1 - e^{-h}`` (so ``B(h) = -phi``), ``r_k = log(sigma / sigma_{i-k}) / h`` (< 0),
    ``D1_k = (D_{i-k} - D_i) / r_k`` and the matrix ``R[m, k] = r_k^m`` (``r_p = 1``), b = :func:`_unipc_b`:
    - predictor: ``x_next = (sigma_next / sigma) x + phi D_i + phi sum_k rho_k D1_k``, with ``rho = 1/2`` for p = 2,
      else ``rho = R[:p-1, :p-1]^{-1} b[:p-1]``;
    - corrector: ``x_next = (sigma_next / sigma) x + phi D_i + phi (sum_k rho_k D1_k + rho_p (D_next - D_i))`` with
      ``rho = R^{-1} b`` (``rho = [1/2]`` for p = 1).
    Where ``sigma_next == 0``: ``x_next = D_i`` (first order). Shapes: x, D's [B, *shape]; sigmas scalars or [B]."""
    sigma, sigma_next = _s(sigma, x), _s(sigma_next, x)
    last, safe_next = _zero_safe(sigma, sigma_next)
    a = lambda t: append_dims(t, x.ndim)  # noqa: E731
    h = (sigma / safe_next).log()
    phi = -torch.expm1(-h)
    out = a(safe_next / sigma) * x + a(phi) * denoised
    rks = [(sigma / _s(s, x)).log() / h for s in old_sigmas[: order - 1]] + [torch.ones_like(h)]
    d1s = [(m - denoised) / a(r) for m, r in zip(old[: order - 1], rks)]
    if denoised_next is None:
        if order == 2:
            rhos = torch.full_like(h, 0.5)[:, None]
        elif order > 2:
            R = torch.stack([torch.stack([r**m for r in rks[:-1]], -1) for m in range(order - 1)], -2)
            rhos = torch.linalg.solve(R, _unipc_b(h, order)[:, : order - 1])
        res = sum(a(rhos[:, k]) * d for k, d in enumerate(d1s)) if d1s else 0
    else:
        if order == 1:
            rhos = torch.full_like(h, 0.5)[:, None]
        else:
            R = torch.stack([torch.stack([r**m for r in rks], -1) for m in range(order)], -2)
            rhos = torch.linalg.solve(R, _unipc_b(h, order))
        res = sum(a(rhos[:, k]) * d for k, d in enumerate(d1s)) + a(rhos[:, -1]) * (denoised_next - denoised)
    out = out + a(phi) * res
    return torch.where(a(last), denoised, out)


def solve_unipc(D: Denoiser, x: Tensor, sigmas: Tensor, order: int = 3, lower_order_final: bool = True,
                callback=None) -> Tensor:
    """UniPC (bh2, data prediction): at step i, the predictor UniP-p (p = ``min(order, i + 1)``, and with
    ``lower_order_final`` at most ``steps - i``) gives ``x_pred``; then, except after the last step, the denoiser at
    ``(x_pred, sigma_{i+1})`` feeds the corrector UniC-p, which gives ``x_{i+1}``, and is reused as ``D_{i+1}`` by the
    next predictor (1 NFE per step). Each step's ``StepInfo.x_next`` is the corrected state. NFE = steps."""
    if order < 1:
        raise ValueError(f"UniPC order must be >= 1, got {order}")
    n = len(sigmas) - 1
    old, old_sigmas = [], []
    sigma = _s(sigmas[0], x)
    den = D(x, sigma)
    for i in range(n):
        p = multistep_order(i, n, order, lower_order_final, None)
        x_next = unipc_update(x, sigma, sigmas[i + 1], den, old, old_sigmas, p)
        sigma_next, den_next = _s(sigmas[i + 1], x), None
        if i + 1 < n:
            den_next = D(x_next, sigma_next)
            x_next = unipc_update(x, sigma, sigma_next, den, old, old_sigmas, p, denoised_next=den_next)
        _call(callback, x=x, sigma=sigma, step=i, sigma_next=sigma_next, x_next=x_next, denoised=den, kind="unipc")
        old, old_sigmas = ([den] + old)[: order - 1], ([sigma] + old_sigmas)[: order - 1]
        x, sigma, den = x_next, sigma_next, den_next
    return x


def _without_grad(solve: Callable, name: str) -> Callable:
    """``solve`` under ``torch.no_grad``, named ``name`` (the samplers' entry points)."""
    fn = torch.no_grad()(solve)
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = f"{solve.__name__} without autograd. " + (solve.__doc__ or "")
    return fn


sample_euler = _without_grad(solve_euler, "sample_euler")
sample_heun = _without_grad(solve_heun, "sample_heun")
sample_dpmpp_2m = _without_grad(solve_dpmpp_2m, "sample_dpmpp_2m")
sample_ipndm = _without_grad(solve_ipndm, "sample_ipndm")
sample_dpmpp_3m = _without_grad(solve_dpmpp_3m, "sample_dpmpp_3m")
sample_unipc = _without_grad(solve_unipc, "sample_unipc")
