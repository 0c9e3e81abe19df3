"""Policies of the sampling MDP (ALGORITHM.md section 3), behind one interface:

- ``act(state, deterministic=False) -> Action`` draws an action (or takes the policy's mode) with its log-prob;
- ``log_prob(batch) -> (logp, entropy)`` re-scores stored transitions (a dict of tensors, see ``mdp/env.py``).

Knob policies (:class:`KnobPolicy`) put a law on a few knobs per step (``mdp/actions.py``): a product over knobs of
a squashed Gaussian, a Beta (continuous, bounded) or a categorical (discrete). Each law is parametrised by a per-step
table, initialised at the knob's reference value (the base sampler), plus optionally a zero-initialised MLP of
``(log sigma_k, k / N, features of x_k)`` (``conditioning: state``). The open-loop variant (``conditioning: step``)
depends on k only, so at inference its mode is a fixed per-step schedule of knob values and costs nothing.

Transition policies (:class:`TransitionPolicy`) act with ``x_{k+1} ~ N(mean_phi, std_phi^2 I)`` on top of the
ancestral (DDPM / DDIM(eta)) step: a learned noise schedule, learned per-step noise and a zero-initialised correction
network; log-densities are summed over dimensions (exact). Both start exactly at the base sampler (the reference
policy).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Beta, Categorical, Normal

from diffusion_irl.config import plain
from diffusion_irl.mdp.actions import Knob
from diffusion_irl.sampling.solvers import ancestral_sigmas
from diffusion_irl.tensors import append_dims


@dataclass
class State:
    x: Tensor             # [B, *shape]
    sigma: Tensor         # [B]
    k: Tensor             # [B] long step index
    labels: Tensor | None = None


@dataclass
class Action:
    raw: Tensor                  # [B, num_knobs]: what is stored and re-scored (pre-squash / category index)
    values: dict[str, Tensor]    # knob name -> [B] value used by the transition
    logp: Tensor                 # [B]


def _features(x: Tensor, sigma: Tensor, k: Tensor, horizon: int, use_x: bool, sigma_data: float) -> Tensor:
    """Policy inputs: ``log(sigma) / 4``, ``k / N`` and, optionally, ``x / sqrt(sigma^2 + sigma_data^2)`` flattened."""
    s = sigma.clamp(min=1e-4)
    feats = [s.log().unsqueeze(1) / 4, (k.to(x.dtype) / horizon).unsqueeze(1)]
    if use_x:
        feats.append(x.flatten(1) / append_dims((sigma**2 + sigma_data**2).sqrt(), 2))
    return torch.cat(feats, 1)


def _as_knob(name: str, knob) -> Knob:
    """A Knob from a Knob, or from its config (with or without ``_target_``; the name defaults to the key)."""
    if isinstance(knob, Mapping):
        spec = plain(knob)
        spec.pop("_target_", None)
        spec.setdefault("name", name)
        return Knob(**spec)
    return knob


def _mlp(inp: int, out: int, hidden: int, depth: int) -> nn.Sequential:
    layers, d = [], inp
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), nn.SiLU()]
        d = hidden
    last = nn.Linear(d, out)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)  # zero-initialised: the policy starts at its per-step table (the reference)
    return nn.Sequential(*layers, last)


class _Horizon(nn.Module):
    """Shared bookkeeping: policies are sized by the MDP (``setup``) before use."""

    horizon: int = 0

    def _check_setup(self):
        if not self.horizon:
            raise RuntimeError(f"{type(self).__name__}.setup(...) must be called (by the MDP) before use")


class KnobPolicy(_Horizon):
    """Args:
        knobs: name -> :class:`Knob` (Hydra builds them from ``policy.knobs``).
        conditioning: ``step`` (open loop: a per-step table) or ``state`` (table + MLP of sigma, k and, with
            ``x_features``, of x).
        x_features: feed the (scaled, flattened) state x to the MLP (``conditioning: state`` only).
        hidden, depth: MLP size.
        eval_mode: ``deterministic`` (the mode: median / mean / argmax) or ``sample`` at evaluation.
    """

    family = "knob"

    def __init__(self, knobs: Mapping[str, Knob], conditioning: str = "step", x_features: bool = False,
                 hidden: int = 64, depth: int = 2, eval_mode: str = "deterministic", sigma_data: float = 1.0):
        super().__init__()
        if not knobs:
            raise ValueError("policy.knobs is empty: name at least one knob (step, churn, guidance, renoise)")
        knobs = {name: _as_knob(name, knob) for name, knob in knobs.items()}
        for name, knob in knobs.items():
            if not isinstance(knob, Knob):
                raise ValueError(f"policy.knobs.{name} must be a Knob, got {type(knob).__name__}")
            if knob.name != name:
                raise ValueError(f"policy.knobs.{name} has name {knob.name!r}: the key and the name must agree")
        if conditioning not in ("step", "state"):
            raise ValueError(f"policy.conditioning must be 'step' or 'state', got {conditioning!r}")
        if eval_mode not in ("deterministic", "sample"):
            raise ValueError(f"policy.eval_mode must be 'deterministic' or 'sample', got {eval_mode!r}")
        if x_features and conditioning != "state":
            raise ValueError("policy.x_features needs policy.conditioning=state")
        self.knobs = dict(knobs)
        self.names = list(knobs)
        self.conditioning, self.x_features, self.eval_mode = conditioning, bool(x_features), eval_mode
        self.hidden, self.depth, self.sigma_data = int(hidden), int(depth), float(sigma_data)
        self.tables = nn.ParameterDict()
        self.net: nn.Module | None = None

    # -- sizing ----------------------------------------------------------------------------------------------------
    def _num_params(self, knob: Knob) -> int:
        return knob.size if knob.discrete else 2

    def setup(self, horizon: int, references: Mapping[str, Tensor], shape: Sequence[int]) -> "KnobPolicy":
        """Create the per-step tables for ``horizon`` steps, initialised so the policy's mode is each knob's
        reference value at each step (``references[name]``: [horizon])."""
        self.horizon, self.shape = int(horizon), tuple(shape)
        for name, knob in self.knobs.items():
            ref = references[name].to(torch.float32)
            if knob.discrete:
                grid = torch.tensor(knob.grid_values())
                idx = (grid.unsqueeze(0) - ref.unsqueeze(1)).abs().argmin(1)
                off = min(knob.init_std, 0.9)
                probs = torch.full((horizon, knob.size), off / (knob.size - 1))
                probs[torch.arange(horizon), idx] = 1 - off
                table = probs.log()
            else:
                m = ((ref - knob.low) / (knob.high - knob.low)).clamp(1e-3, 1 - 1e-3)
                if knob.distribution == "squashed_gaussian":
                    table = torch.stack([torch.logit(m), torch.full_like(m, math.log(knob.init_std))], 1)
                else:  # beta: (logit of the mean, log concentration)
                    table = torch.stack([torch.logit(m), torch.full_like(m, math.log(4.0 / knob.init_std**2))], 1)
            self.tables[name] = nn.Parameter(table)
        if self.conditioning == "state":
            inp = 2 + (math.prod(self.shape) if self.x_features else 0)
            self.net = _mlp(inp, sum(self._num_params(k) for k in self.knobs.values()), self.hidden, self.depth)
        return self

    # -- the laws ------------------------------------------------------------------------------------------------
    def _params(self, x: Tensor, sigma: Tensor, k: Tensor) -> dict[str, Tensor]:
        self._check_setup()
        k = k.long()
        out = {name: self.tables[name][k] for name in self.names}
        if self.net is not None:
            delta = self.net(_features(x, sigma, k, self.horizon, self.x_features, self.sigma_data))
            i = 0
            for name in self.names:
                n = self._num_params(self.knobs[name])
                out[name] = out[name] + delta[:, i:i + n]
                i += n
        return out

    def _dist(self, knob: Knob, p: Tensor):
        if knob.discrete:
            return Categorical(logits=p)
        if knob.distribution == "squashed_gaussian":
            return Normal(p[:, 0], p[:, 1].clamp(-7, 2).exp())
        m, conc = torch.sigmoid(p[:, 0]).clamp(1e-4, 1 - 1e-4), p[:, 1].clamp(-3, 9).exp()
        return Beta(m * conc, (1 - m) * conc)

    def _value(self, knob: Knob, raw: Tensor) -> Tensor:
        """Knob value from the stored raw action."""
        if knob.discrete:
            return torch.tensor(knob.grid_values(), dtype=torch.float32, device=raw.device)[raw.long()]
        unit = torch.sigmoid(raw) if knob.distribution == "squashed_gaussian" else raw
        return knob.low + (knob.high - knob.low) * unit

    def _log_prob_raw(self, knob: Knob, dist, raw: Tensor) -> Tensor:
        """Log-density of the knob VALUE (change of variables included, so it matches torch.distributions)."""
        if knob.discrete:
            return dist.log_prob(raw.long())
        width = knob.high - knob.low
        if knob.distribution == "squashed_gaussian":
            # a = low + width * sigmoid(u): log|da/du| = log width + log sigmoid(u) + log sigmoid(-u)
            return dist.log_prob(raw) - (math.log(width) + F.logsigmoid(raw) + F.logsigmoid(-raw))
        return dist.log_prob(raw.clamp(1e-6, 1 - 1e-6)) - math.log(width)

    def _mode(self, knob: Knob, dist) -> Tensor:
        if knob.discrete:
            return dist.probs.argmax(-1).to(torch.float32)
        if knob.distribution == "squashed_gaussian":
            return dist.loc  # the median of the squashed law
        return dist.mean

    def _entropy(self, knob: Knob, dist) -> Tensor:
        """Exact for categorical and Beta; the pre-squash Gaussian's entropy for the squashed Gaussian."""
        return dist.entropy()

    def act(self, state: State, deterministic: bool = False) -> Action:
        params = self._params(state.x, state.sigma, state.k)
        raws, values, logp = [], {}, 0.0
        for name in self.names:
            knob = self.knobs[name]
            dist = self._dist(knob, params[name])
            raw = self._mode(knob, dist) if deterministic else dist.sample().to(torch.float32)
            if not knob.discrete and knob.distribution == "beta":
                raw = raw.clamp(1e-6, 1 - 1e-6)
            raws.append(raw)
            values[name] = self._value(knob, raw).to(state.x.dtype)
            logp = logp + self._log_prob_raw(knob, dist, raw)
        return Action(raw=torch.stack(raws, 1), values=values, logp=logp)

    def log_prob(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Re-score stored transitions: ``batch`` holds ``x, sigma, k, raw``. Returns (logp, entropy), [M] each."""
        params = self._params(batch["x"], batch["sigma"], batch["k"])
        logp, ent = 0.0, 0.0
        for j, name in enumerate(self.names):
            knob = self.knobs[name]
            dist = self._dist(knob, params[name])
            logp = logp + self._log_prob_raw(knob, dist, batch["raw"][:, j])
            ent = ent + self._entropy(knob, dist)
        return logp, ent

    @torch.no_grad()
    def schedule(self) -> dict[str, Tensor]:
        """The open-loop part: each knob's mode per step (the learned knob schedule; [horizon] per knob)."""
        self._check_setup()
        out = {}
        for name in self.names:
            knob = self.knobs[name]
            out[name] = self._value(knob, self._mode(knob, self._dist(knob, self.tables[name])))
        return out


class ConstantKnobPolicy(_Horizon):
    """A deterministic policy with the same value of each knob at every step (the grid-search baseline)."""

    family = "knob"

    def __init__(self, values: Mapping[str, float]):
        super().__init__()
        self.values = {k: float(v) for k, v in values.items()}
        self.names = list(self.values)

    def setup(self, horizon: int, references=None, shape=None) -> "ConstantKnobPolicy":
        self.horizon = int(horizon)
        return self

    def act(self, state: State, deterministic: bool = True) -> Action:
        B = state.x.shape[0]
        vals = {n: torch.full((B,), v, dtype=state.x.dtype, device=state.x.device) for n, v in self.values.items()}
        raw = torch.stack(list(vals.values()), 1) if vals else torch.zeros(B, 0, device=state.x.device)
        return Action(raw=raw, values=vals, logp=torch.zeros(B, device=state.x.device))


class TransitionPolicy(_Horizon):
    """Gaussian transition ``x_{k+1} ~ N(mean, std^2 I)`` around the ancestral step with ``eta`` (DDPM: 1).

    ``sigma_{k+1} = sigma^ref_{k+1} exp(delta_k)`` (``learn_schedule``), ``std = min(sigma_up exp(rho_k),
    sigma_{k+1})`` (``learn_noise``), ``sigma_down = sqrt(sigma_{k+1}^2 - std^2)``,
    ``mean = x + (sigma_down - sigma) (x - D) / sigma + sigma_{k+1} c(x, sigma, k)`` with ``c`` a
    zero-initialised MLP (``correction``). The last step (to sigma 0) is deterministic (``mean = D``) and carries
    no log-prob. With every parameter at zero this is exactly the base ancestral sampler.

    ``finetune_denoiser=True`` also trains a copy of the denoiser (full fine-tuning, DDPO-style): the MDP then
    denoises with the policy's copy (:meth:`attach_denoiser`), and re-scoring recomputes ``D`` with gradients.
    """

    family = "transition"

    def __init__(self, eta: float = 1.0, learn_schedule: bool = True, learn_noise: bool = True,
                 correction: bool = True, hidden: int = 128, depth: int = 2, max_delta: float = 3.0,
                 sigma_data: float = 1.0, eval_mode: str = "sample", finetune_denoiser: bool = False):
        super().__init__()
        self.finetune_denoiser = bool(finetune_denoiser)
        self.denoiser: nn.Module | None = None
        if not 0 < eta <= 1:
            raise ValueError(f"policy.eta must be in (0, 1] (a Gaussian step needs noise), got {eta}")
        if eval_mode not in ("deterministic", "sample"):
            raise ValueError(f"policy.eval_mode must be 'deterministic' or 'sample', got {eval_mode!r}")
        self.eta, self.learn_schedule, self.learn_noise, self.correction = float(eta), learn_schedule, learn_noise, correction
        self.hidden, self.depth, self.max_delta, self.sigma_data = int(hidden), int(depth), float(max_delta), float(sigma_data)
        self.eval_mode = eval_mode
        self.names: list[str] = []

    def setup(self, horizon: int, ref_sigmas: Tensor, shape: Sequence[int]) -> "TransitionPolicy":
        self.horizon, self.shape = int(horizon), tuple(shape)
        self.register_buffer("ref_sigmas", ref_sigmas.to(torch.float32).clone())
        self.delta = nn.Parameter(torch.zeros(horizon), requires_grad=self.learn_schedule)
        self.rho = nn.Parameter(torch.zeros(horizon), requires_grad=self.learn_noise)
        d = math.prod(self.shape)
        self.net = _mlp(2 + d, d, self.hidden, self.depth) if self.correction else None
        return self

    def attach_denoiser(self, denoiser: nn.Module) -> "TransitionPolicy":
        """Fine-tuning: keep a trainable copy of ``denoiser`` (the frozen original stays the reference)."""
        if not isinstance(denoiser, nn.Module) or not any(True for _ in denoiser.parameters()):
            raise ValueError("policy.finetune_denoiser needs a denoiser network with parameters (not the analytic one)")
        self.denoiser = copy.deepcopy(denoiser).train()
        for p in self.denoiser.parameters():
            p.requires_grad_(True)
        return self

    def denoise(self, D, x: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor:
        """``D(x, sigma)``: the policy's fine-tuned copy when there is one, else the given denoiser."""
        net = self.denoiser if self.denoiser is not None else D
        return net(x, sigma) if labels is None else net(x, sigma, labels)

    def sigma_next(self, k: Tensor) -> Tensor:
        """[B] next noise level of step k (0 on the last step)."""
        ref = self.ref_sigmas[k + 1]
        s = ref * torch.exp(self.max_delta * torch.tanh(self.delta[k] / self.max_delta))
        return torch.where(ref > 0, s, torch.zeros_like(s))

    def gaussian(self, x: Tensor, sigma: Tensor, k: Tensor, denoised: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(mean, std [B], sigma_next [B]) of the step from state (x, sigma, k)."""
        self._check_setup()
        k = k.long()
        s_next = torch.minimum(self.sigma_next(k), sigma * (1 - 1e-4))
        _, s_up = ancestral_sigmas(sigma, s_next, self.eta)
        std = torch.minimum(s_up * self.rho[k].exp(), s_next)
        s_down = (s_next**2 - std**2).clamp(min=0).sqrt()
        mean = x + append_dims(s_down - sigma, x.ndim) * (x - denoised) / append_dims(sigma, x.ndim)
        if self.net is not None:
            feats = _features(x, sigma, k, self.horizon, True, self.sigma_data)
            mean = mean + append_dims(s_next, x.ndim) * self.net(feats).reshape(x.shape)
        return mean, std, s_next

    @staticmethod
    def gaussian_log_prob(x_next: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        """Exact log N(x_next; mean, std^2 I), summed over dimensions ([B]); 0 where std == 0 (deterministic)."""
        d = x_next[0].numel()
        safe = torch.where(std > 0, std, torch.ones_like(std))
        z2 = ((x_next - mean).flatten(1) ** 2).sum(1) / safe**2
        lp = -0.5 * z2 - d * safe.log() - 0.5 * d * math.log(2 * math.pi)
        return torch.where(std > 0, lp, torch.zeros_like(lp))

    def log_prob(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``batch``: ``x, sigma, k, denoised, x_next``. Entropy of the Gaussian (summed over dimensions)."""
        den = batch["denoised"]
        if self.denoiser is not None:  # fine-tuning: the denoised estimate depends on the parameters
            den = self.denoise(None, batch["x"], batch["sigma"], batch.get("labels"))
        mean, std, _ = self.gaussian(batch["x"], batch["sigma"], batch["k"], den)
        d = batch["x"][0].numel()
        ent = torch.where(std > 0, d * (0.5 * math.log(2 * math.pi * math.e) + std.clamp(min=1e-12).log()),
                          torch.zeros_like(std))
        return self.gaussian_log_prob(batch["x_next"], mean, std), ent

    @torch.no_grad()
    def schedule(self) -> dict[str, Tensor]:
        self._check_setup()
        k = torch.arange(self.horizon, device=self.delta.device)
        return {"sigma_next": self.sigma_next(k), "noise_scale": self.rho.exp()}


class ValueNet(nn.Module):
    """``V(x_k, sigma_k, k)`` for GAE (``algo.baseline=value``)."""

    def __init__(self, shape: Sequence[int], horizon: int, hidden: int = 128, depth: int = 2, sigma_data: float = 1.0):
        super().__init__()
        self.horizon, self.sigma_data = int(horizon), float(sigma_data)
        self.net = _mlp(2 + math.prod(shape), 1, hidden, depth)
        nn.init.normal_(self.net[-1].weight, std=1e-3)

    def forward(self, x: Tensor, sigma: Tensor, k: Tensor) -> Tensor:
        return self.net(_features(x, sigma, k.long(), self.horizon, True, self.sigma_data)).squeeze(1)


def frozen_copy(policy: nn.Module) -> nn.Module:
    """The reference policy for the KL penalty: the policy as it starts (= the base sampler), frozen."""
    ref = copy.deepcopy(policy)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()
