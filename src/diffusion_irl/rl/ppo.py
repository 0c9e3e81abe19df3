"""The PPO update as pure functions (ALGORITHM.md section 5; cleanrl's ppo_continuous_action in spirit).

Loss: ``-E[min(rho A, clip(rho, 1-eps, 1+eps) A)] + beta KL(pi || pi_ref) - c H(pi)``, ``rho = exp(logp_new - logp_old)``.
Diagnostics (namespaced ``ppo/...``): approx-KL ``E[(rho - 1) - log rho]``, clip fraction, entropy, KL to the reference.
"""
from __future__ import annotations

import torch
from torch import Tensor


def per_step_advantages(returns: Tensor, eps: float = 1e-8, normalise: bool = True) -> Tensor:
    """Advantages with the per-step batch-mean baseline: ``A_k = G_k - mean_b G_k``, then (optionally) divided by the
    per-step std over the batch. ``returns`` is [B, N] (the global batch: gather across ranks before calling)."""
    if returns.ndim != 2:
        raise ValueError(f"returns must be [batch, steps], got {tuple(returns.shape)}")
    adv = returns - returns.mean(0, keepdim=True)
    if normalise and returns.shape[0] > 1:
        adv = adv / (adv.std(0, keepdim=True) + eps)
    return adv


def ppo_loss(logp_new: Tensor, logp_old: Tensor, advantages: Tensor, clip_eps: float = 0.2,
             logp_ref: Tensor | None = None, kl_coef: float = 0.0, entropy: Tensor | None = None,
             ent_coef: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate loss over a minibatch of transitions (all inputs the same shape).

    ``logp_ref``: log-probs of the reference policy for the KL penalty, estimated on policy samples with the
    non-negative ``k3`` estimator ``(r - 1) - log r``, ``r = pi_ref / pi``. Returns ``(loss, diagnostics)``."""
    if clip_eps <= 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
    log_ratio = logp_new - logp_old
    ratio = log_ratio.exp()
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)
    loss = -surrogate.mean()
    diag: dict[str, Tensor] = {}
    with torch.no_grad():
        diag["ppo/approx_kl"] = ((ratio - 1) - log_ratio).mean()
        diag["ppo/clipfrac"] = ((ratio - 1).abs() > clip_eps).float().mean()
        diag["ppo/ratio_mean"] = ratio.mean()
    if logp_ref is not None:
        log_r = logp_ref - logp_new
        kl = ((log_r.exp() - 1) - log_r).mean()
        loss = loss + kl_coef * kl
        diag["ppo/kl_ref"] = kl.detach()
    if entropy is not None:
        ent = entropy.mean()
        loss = loss - ent_coef * ent
        diag["ppo/entropy"] = ent.detach()
    diag["ppo/policy_loss"] = -surrogate.mean().detach()
    return loss, diag
