"""The PPO update as pure functions (docs/method.md section 5; cleanrl's ppo_continuous_action in spirit).

Loss: ``-E[min(rho A, clip(rho, 1-eps, 1+eps) A)] + beta KL(pi || pi_ref) - c H(pi)``, ``rho = exp(logp_new - logp_old)``.
Diagnostics (namespaced ``ppo/...``): approx-KL ``E[(rho - 1) - log rho]``, clip fraction, entropy, KL to the reference.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn


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


def gae(rewards: Tensor, values: Tensor, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation with discount 1 over a finite horizon: ``rewards[b, k]`` is the (weighted)
    reward of action k, ``values[b, k] = V(s_k)``, ``V(s_N) = 0``. Returns (advantages, value targets), [B, N] each.
    ``lam = 1`` gives ``G_k - V(s_k)``; ``lam = 0`` the one-step TD error."""
    if not 0 <= lam <= 1:
        raise ValueError(f"gae lambda must be in [0, 1], got {lam}")
    B, N = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for k in reversed(range(N)):
        v_next = values[:, k + 1] if k + 1 < N else torch.zeros_like(last)
        delta = rewards[:, k] + v_next - values[:, k]
        last = delta + lam * last
        adv[:, k] = last
    return adv, adv + values


def normalise_per_step(adv: Tensor, mean: Tensor, std: Tensor, eps: float = 1e-8) -> Tensor:
    """``(adv - mean_k) / (std_k + eps)`` with per-step statistics of the global batch ([N] each)."""
    return (adv - mean) / (std + eps)


def explained_variance(pred: Tensor, target: Tensor) -> Tensor:
    """``1 - Var[target - pred] / Var[target]`` (1: perfect value function; <= 0: no better than a constant)."""
    var = target.var()
    return 1 - (target - pred).var() / var if var > 0 else torch.tensor(float("nan"))


class PPO:
    """PPO hyper-parameters (config group ``algo/``).

    Args:
        lr: policy learning rate (Adam). value_lr: value network's.
        epochs, minibatches: K_p passes over the rollout's transitions, each split into this many minibatches.
        clip_eps: ratio clipping. kl_coef: weight of KL(pi || pi_ref) (pi_ref = the initial policy = the base
            sampler). ent_coef: entropy bonus.
        baseline: ``mean`` (per-step batch mean over all ranks) or ``value`` (a value network with GAE).
        gae_lambda: GAE's lambda (``baseline=value``). value_coef: weight of the value loss.
        normalise: divide advantages by their per-step std over the global batch.
        max_grad_norm: gradient clipping of the policy (null: none).
    """

    BASELINES = ("mean", "value")

    def __init__(self, lr: float = 3e-3, epochs: int = 4, minibatches: int = 4, clip_eps: float = 0.2,
                 kl_coef: float = 0.0, ent_coef: float = 0.0, baseline: str = "mean", gae_lambda: float = 0.95,
                 value_lr: float = 1e-3, value_coef: float = 0.5, normalise: bool = True,
                 max_grad_norm: float | None = 1.0):
        if lr <= 0 or value_lr <= 0:
            raise ValueError(f"algo.lr and algo.value_lr must be > 0, got {lr}, {value_lr}")
        if epochs < 1 or minibatches < 1:
            raise ValueError(f"algo.epochs and algo.minibatches must be >= 1, got {epochs}, {minibatches}")
        if clip_eps <= 0:
            raise ValueError(f"algo.clip_eps must be > 0, got {clip_eps}")
        if kl_coef < 0 or ent_coef < 0:
            raise ValueError(f"algo.kl_coef and algo.ent_coef must be >= 0, got {kl_coef}, {ent_coef}")
        if baseline not in self.BASELINES:
            raise ValueError(f"algo.baseline must be one of {self.BASELINES}, got {baseline!r}")
        if not 0 <= gae_lambda <= 1:
            raise ValueError(f"algo.gae_lambda must be in [0, 1], got {gae_lambda}")
        self.lr, self.epochs, self.minibatches, self.clip_eps = float(lr), int(epochs), int(minibatches), float(clip_eps)
        self.kl_coef, self.ent_coef, self.baseline, self.gae_lambda = float(kl_coef), float(ent_coef), baseline, float(gae_lambda)
        self.value_lr, self.value_coef, self.normalise = float(value_lr), float(value_coef), bool(normalise)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)


def _mean_diagnostics(diagnostics: list[dict[str, Tensor]]) -> dict[str, float]:
    if not diagnostics:
        return {}
    return {key: float(torch.stack([d[key].float() for d in diagnostics]).mean()) for key in diagnostics[0]}


def ppo_update(policy: nn.Module, transitions: Mapping[str, Tensor], algo: "PPO", optimizer: torch.optim.Optimizer,
               generator: torch.Generator, ref_policy: nn.Module | None = None, value: nn.Module | None = None,
               value_optimizer: torch.optim.Optimizer | None = None,
               backward: Callable[[Tensor], None] = Tensor.backward,
               check: Callable[[str, Tensor], None] | None = None) -> dict[str, float]:
    """``algo.epochs`` passes of ``algo.minibatches`` minibatches of clipped-surrogate PPO over one rollout.

    ``transitions``: flat [M] tensors with at least ``logp`` (old log-probs), ``adv`` (advantages), ``mask`` (which
    transitions carry a log-prob) and whatever ``policy.log_prob(batch)`` reads; ``target`` too when ``value`` is
    given (its regression target). ``generator`` orders the minibatches (CPU). ``backward`` replaces
    ``loss.backward()`` (Lightning's ``manual_backward`` under DDP); ``check(name, tensor)`` may raise on a bad loss
    before any optimiser step. Returns the diagnostics of every minibatch, averaged (``ppo/...`` keys)."""
    trainable = [p for p in policy.parameters() if p.requires_grad]
    active = transitions["mask"].nonzero().squeeze(1)
    num_active = len(active)
    size = max(1, math.ceil(num_active / algo.minibatches))
    diagnostics: list[dict[str, Tensor]] = []
    for _ in range(algo.epochs):
        order = active[torch.randperm(num_active, generator=generator).to(active.device)]
        for start in range(0, num_active, size):
            chosen = order[start:start + size]
            batch = {key: val[chosen] for key, val in transitions.items()}
            logp, entropy = policy.log_prob(batch)
            logp_ref = ref_policy.log_prob(batch)[0] if ref_policy is not None else None
            loss, diag = ppo_loss(logp, batch["logp"], batch["adv"], algo.clip_eps, logp_ref, algo.kl_coef,
                                  entropy, algo.ent_coef)
            if check is not None:
                check("PPO loss", loss)
            optimizer.zero_grad(set_to_none=True)
            backward(loss)
            if algo.max_grad_norm is not None:
                diag["ppo/grad_norm"] = torch.nn.utils.clip_grad_norm_(trainable, algo.max_grad_norm)
            optimizer.step()
            if value is not None:
                diag.update(value_update(value, batch, algo.value_coef, value_optimizer, backward, check))
            diagnostics.append(diag)
    return _mean_diagnostics(diagnostics)


def value_update(value: nn.Module, batch: Mapping[str, Tensor], coef: float, optimizer: torch.optim.Optimizer,
                 backward: Callable[[Tensor], None] = Tensor.backward,
                 check: Callable[[str, Tensor], None] | None = None) -> dict[str, Tensor]:
    """One regression step of ``V(x, sigma, k)`` towards ``batch["target"]`` (loss ``coef * MSE``)."""
    pred = value(batch["x"], batch["sigma"], batch["k"])
    loss = coef * (pred - batch["target"]).pow(2).mean()
    if check is not None:
        check("value loss", loss)
    optimizer.zero_grad(set_to_none=True)
    backward(loss)
    optimizer.step()
    return {"ppo/value_loss": loss.detach(), "ppo/explained_variance": explained_variance(pred.detach(), batch["target"])}
