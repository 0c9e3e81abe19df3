"""Policies of the sampling MDP (docs/method.md section 3), behind one interface:

- ``kind``: ``"knob"`` (actions are knob values the MDP applies to the base sampler's step) or ``"transition"``
  (the policy's Gaussian move is the step); the MDP tells policies apart by this attribute alone;
- ``setup(horizon, shape, reference) -> policy`` sizes the policy for the MDP's horizon, starting at the base
  sampler (a :class:`Reference`); ``SamplingMDP.setup_policy(policy, shape)`` calls it;
- ``act(state, deterministic=False) -> Action`` draws an action (or takes the policy's mode) with its log-prob;
- ``log_prob(batch) -> (logp, entropy)`` re-scores stored transitions (a dict of tensors, see ``mdp/env.py``).

Knob policies (:class:`KnobPolicy`) put a law on a few knobs per step (``mdp/laws.py``): a product over knobs of
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
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from diffusion_irl.config import plain
from diffusion_irl.mdp.actions import Knob
from diffusion_irl.mdp.laws import KnobLaw
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


@dataclass
class Reference:
    """What the base sampler does on each of the MDP's N steps: a fresh policy starts there (the reference policy).

    sigmas: [N + 1] the base sampler's noise levels (transition policies start on its ancestral step).
    knobs: knob name -> [N] the knob value that reproduces the base sampler at each step (knob policies)."""

    sigmas: Tensor | None = None
    knobs: Mapping[str, Tensor] = field(default_factory=dict)


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


class Policy(nn.Module):
    """What every policy shares. Class attributes: ``kind`` (``"knob"`` or ``"transition"``), ``names`` (the knobs
    it sets, in ``Action.raw`` order), ``knobs`` (name -> :class:`Knob` of the knobs it puts a law on; empty for
    fixed-value and transition policies), ``eval_mode`` and ``per_step_table`` (its deterministic actions depend on
    the step index alone, so ``PolicySampler`` computes them once per batch)."""

    kind: ClassVar[str] = ""
    eval_mode: str = "deterministic"
    per_step_table: bool = False
    horizon: int = 0

    def __init__(self):
        super().__init__()
        self.names: list[str] = []
        self.knobs: dict[str, Knob] = {}

    def setup(self, horizon: int, shape: Sequence[int] = (), reference: Reference | None = None) -> "Policy":
        """Size the policy for ``horizon`` steps on states of ``shape`` (without the batch dimension), starting at
        ``reference`` (the base sampler). Returns the policy."""
        raise NotImplementedError  # pragma: no cover

    def _check_setup(self):
        if not self.horizon:
            raise RuntimeError(f"{type(self).__name__}.setup(...) must be called (by the MDP) before use")


class KnobPolicy(Policy):
    """Args:
        knobs: name -> :class:`Knob` (Hydra builds them from ``policy.knobs``).
        conditioning: ``step`` (open loop: a per-step table) or ``state`` (table + MLP of sigma, k and, with
            ``x_features``, of x).
        x_features: feed the (scaled, flattened) state x to the MLP (``conditioning: state`` only).
        hidden, depth: MLP size.
        eval_mode: ``deterministic`` (the mode: median / mean / argmax) or ``sample`` at evaluation.
    """

    kind = "knob"

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
        self.laws: dict[str, KnobLaw] = {name: knob.law for name, knob in knobs.items()}
        self.conditioning, self.x_features, self.eval_mode = conditioning, bool(x_features), eval_mode
        self.per_step_table = conditioning == "step"
        self.hidden, self.depth, self.sigma_data = int(hidden), int(depth), float(sigma_data)
        self.tables = nn.ParameterDict()
        self.net: nn.Module | None = None

    # -- sizing ----------------------------------------------------------------------------------------------------
    def setup(self, horizon: int, shape: Sequence[int] = (), reference: Reference | None = None) -> "KnobPolicy":
        """Create the per-step tables ([horizon, law.num_params] per knob), initialised so the policy's mode is
        each knob's reference value at each step (``reference.knobs[name]``: [horizon]), and, with
        ``conditioning: state``, the zero-initialised MLP."""
        knob_refs = reference.knobs if reference is not None else {}
        missing = [name for name in self.names if name not in knob_refs]
        if missing:
            raise ValueError(f"KnobPolicy.setup needs the reference values of knobs {missing} (Reference.knobs)")
        self.horizon, self.shape = int(horizon), tuple(shape)
        for name, law in self.laws.items():
            ref = knob_refs[name].to(torch.float32)
            if ref.shape != (self.horizon,):
                raise ValueError(f"the reference of knob {name} has shape {tuple(ref.shape)}, not [{self.horizon}]")
            self.tables[name] = nn.Parameter(law.init_params(ref))
        if self.conditioning == "state":
            inputs = 2 + (math.prod(self.shape) if self.x_features else 0)
            outputs = sum(law.num_params for law in self.laws.values())
            self.net = _mlp(inputs, outputs, self.hidden, self.depth)
        return self

    # -- the laws ------------------------------------------------------------------------------------------------
    def _params(self, x: Tensor, sigma: Tensor, k: Tensor) -> dict[str, Tensor]:
        """Each knob's law parameters [B, num_params] at states ``(x [B, *shape], sigma [B], k [B])``."""
        self._check_setup()
        k = k.long()
        out = {name: self.tables[name][k] for name in self.names}
        if self.net is not None:
            delta = self.net(_features(x, sigma, k, self.horizon, self.x_features, self.sigma_data))
            start = 0
            for name in self.names:
                width = self.laws[name].num_params
                out[name] = out[name] + delta[:, start:start + width]
                start += width
        return out

    def act(self, state: State, deterministic: bool = False) -> Action:
        """Each knob's raw action [B] (drawn, or the mode), its value [B] in x's dtype, and the summed log-prob."""
        params = self._params(state.x, state.sigma, state.k)
        raws, values, logp = [], {}, 0.0
        for name in self.names:
            law = self.laws[name]
            dist = law.dist(params[name])
            raw = law.draw(dist, deterministic)
            raws.append(raw)
            values[name] = law.value(raw).to(state.x.dtype)
            logp = logp + law.log_prob(dist, raw)
        return Action(raw=torch.stack(raws, 1), values=values, logp=logp)

    def log_prob(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Re-score stored transitions: ``batch`` holds ``x, sigma, k, raw``. Returns (logp, entropy), [M] each."""
        params = self._params(batch["x"], batch["sigma"], batch["k"])
        logp, ent = 0.0, 0.0
        for column, name in enumerate(self.names):
            law = self.laws[name]
            dist = law.dist(params[name])
            logp = logp + law.log_prob(dist, batch["raw"][:, column])
            ent = ent + law.entropy(dist)
        return logp, ent

    @torch.no_grad()
    def schedule(self) -> dict[str, Tensor]:
        """The open-loop part: each knob's mode per step (the learned knob schedule; [horizon] per knob)."""
        self._check_setup()
        out = {}
        for name in self.names:
            law = self.laws[name]
            out[name] = law.value(law.mode(law.dist(self.tables[name])))
        return out


class ConstantKnobPolicy(Policy):
    """A deterministic policy with the same value of each knob at every step (the grid-search baseline)."""

    kind = "knob"

    def __init__(self, values: Mapping[str, float]):
        super().__init__()
        self.values = {k: float(v) for k, v in values.items()}
        self.names = list(self.values)

    def setup(self, horizon: int, shape: Sequence[int] = (), reference: Reference | None = None) -> "ConstantKnobPolicy":
        """Only the horizon matters: the values are fixed."""
        self.horizon, self.shape = int(horizon), tuple(shape)
        return self

    def act(self, state: State, deterministic: bool = True) -> Action:
        B = state.x.shape[0]
        vals = {n: torch.full((B,), v, dtype=state.x.dtype, device=state.x.device) for n, v in self.values.items()}
        raw = torch.stack(list(vals.values()), 1) if vals else torch.zeros(B, 0, device=state.x.device)
        return Action(raw=raw, values=vals, logp=torch.zeros(B, device=state.x.device))


class TransitionPolicy(Policy):
    """Gaussian transition ``x_{k+1} ~ N(mean, std^2 I)`` around the ancestral step with ``eta`` (DDPM: 1).

    ``sigma_{k+1} = sigma^ref_{k+1} exp(delta_k)`` (``learn_schedule``), ``std = min(sigma_up exp(rho_k),
    sigma_{k+1})`` (``learn_noise``), ``sigma_down = sqrt(sigma_{k+1}^2 - std^2)``,
    ``mean = x + (sigma_down - sigma) (x - D) / sigma + sigma_{k+1} c(x, sigma, k)`` with ``c`` a
    zero-initialised MLP (``correction``). The last step (to sigma 0) is deterministic (``mean = D``) and carries
    no log-prob. With every parameter at zero this is exactly the base ancestral sampler.

    ``finetune_denoiser=True`` also trains a copy of the denoiser (full fine-tuning, DDPO-style): the MDP then
    denoises with the policy's copy (:meth:`attach_denoiser`), and re-scoring recomputes ``D`` with gradients.
    """

    kind = "transition"

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

    def setup(self, horizon: int, shape: Sequence[int] = (), reference: Reference | None = None) -> "TransitionPolicy":
        """Zero schedule / noise offsets ([horizon] each) around the base's noise levels (``reference.sigmas``,
        [horizon + 1]) and the zero-initialised correction MLP on states of ``shape``."""
        if reference is None or reference.sigmas is None:
            raise ValueError("TransitionPolicy.setup needs the base sampler's noise levels (Reference.sigmas)")
        self.horizon, self.shape = int(horizon), tuple(shape)
        self.register_buffer("ref_sigmas", reference.sigmas.to(torch.float32).clone())
        self.delta = nn.Parameter(torch.zeros(horizon), requires_grad=self.learn_schedule)
        self.rho = nn.Parameter(torch.zeros(horizon), requires_grad=self.learn_noise)
        dims = math.prod(self.shape)
        self.net = _mlp(2 + dims, dims, self.hidden, self.depth) if self.correction else None
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
