"""The sampling MDP (docs/method.md section 3) on top of the foundation samplers' single steps.

State ``s_k = (x_k, sigma_k, k)``; ``x_0 = sigma_max * n``; horizon N = the base sampler's step count for the NFE
budget. The transition is the base sampler's own step (``SingleStepSampler.step``: Euler, Heun, EDM churn + Heun,
ancestral / DDIM) modified by the action, so this module owns no sampler maths of its own:

- knob actions (``policy.kind == "knob"``): churn before the step (``base.churn``), the next noise level, a
  guidance weight inside the denoiser (CFG or discriminator guidance), a renoise jump after the step (extra NFE,
  counted per sample);
- transition actions (``policy.kind == "transition"``): ``x_{k+1} ~ N(mean, std^2 I)`` around the ancestral step.

Every Gaussian draw comes from per-sample counter-based streams (``SampleNoise``, in named ``Slot``s), so a
trajectory is replayable from its seed alone; rollouts keep states, actions, old log-probs and per-sample NFE. With
the reference policy in deterministic mode a rollout reproduces the base sampler exactly (tests check this).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from diffusion_irl.mdp.actions import Knob
from diffusion_irl.mdp.policies import Action, KnobPolicy, Policy, Reference, State
from diffusion_irl.sampling.noise import SampleNoise, Slot
from diffusion_irl.sampling.samplers import NoiseFn, Sampler, SampleOutput, seed_labels, with_labels
from diffusion_irl.seeding import sample_seeds
from diffusion_irl.tensors import append_dims


@dataclass
class Rollout:
    """B trajectories of N steps. Per-step tensors are [N, B, ...]; ``x_next[k]`` is the state reached by action k
    (``x_next[-1]`` the final sample)."""

    x: Tensor             # [N, B, *shape] states x_k
    sigma: Tensor         # [N, B]
    x_next: Tensor        # [N, B, *shape]
    sigma_next: Tensor    # [N, B]
    logp: Tensor          # [N, B] log-prob of the action under the rollout policy
    nfe: Tensor           # [N, B] denoiser evaluations spent by each sample at each step
    mask: Tensor          # [N, B] True where the action carries a log-prob (PPO trains on these)
    seeds: Tensor         # [B]
    raw: Tensor | None = None        # [N, B, num_knobs] (knob policies)
    denoised: Tensor | None = None   # [N, B, *shape] (transition policies re-score with it)
    labels: Tensor | None = None     # [B]
    knob_values: dict[str, Tensor] = field(default_factory=dict)  # name -> [N, B]

    @property
    def final(self) -> Tensor:
        return self.x_next[-1]

    @property
    def steps(self) -> int:
        return self.x.shape[0]

    def transitions(self) -> dict[str, Tensor]:
        """Flatten to [N * B] transitions (step-major) for PPO: ``x, sigma, k, logp, mask`` and the action."""
        steps, batch = self.sigma.shape
        out = {"x": self.x.flatten(0, 1), "sigma": self.sigma.flatten(), "logp": self.logp.flatten(),
               "mask": self.mask.flatten(),
               "k": torch.arange(steps, device=self.sigma.device).repeat_interleave(batch)}
        if self.raw is not None:
            out["raw"] = self.raw.flatten(0, 1)
        if self.denoised is not None:
            out["denoised"] = self.denoised.flatten(0, 1)
            out["x_next"] = self.x_next.flatten(0, 1)
        if self.labels is not None:
            out["labels"] = self.labels.repeat(steps)
        return out


@dataclass
class StepResult:
    """What one MDP step produced for a batch of B states."""

    x_next: Tensor                   # [B, *shape]
    sigma_next: Tensor               # [B]
    nfe: Tensor                      # [B] denoiser evaluations per sample
    logp: Tensor                     # [B] log-prob of the action
    mask: Tensor                     # [B] True where the action carries a log-prob
    raw: Tensor | None = None        # [B, num_knobs] (knob policies)
    denoised: Tensor | None = None   # [B, *shape] (transition policies)
    knob_values: dict[str, Tensor] = field(default_factory=dict)  # name -> [B]


class _Recorder:
    """Collects a rollout's per-step results: all of them (``keep``), or only the per-sample NFE (evaluation)."""

    PER_STEP = ("x", "sigma", "x_next", "sigma_next", "logp", "nfe", "mask", "raw", "denoised")

    def __init__(self, keep: bool):
        self.keep = keep
        self.lists: dict[str, list[Tensor]] = {key: [] for key in self.PER_STEP}
        self.knob_values: dict[str, list[Tensor]] = {}

    def add(self, state: State, result: StepResult) -> None:
        if not self.keep:
            self.lists["nfe"].append(result.nfe)
            return
        for key, value in (("x", state.x), ("sigma", state.sigma), ("x_next", result.x_next),
                           ("sigma_next", result.sigma_next), ("logp", result.logp), ("nfe", result.nfe),
                           ("mask", result.mask), ("raw", result.raw), ("denoised", result.denoised)):
            if value is not None:
                self.lists[key].append(value)
        for name, value in result.knob_values.items():
            self.knob_values.setdefault(name, []).append(value)

    def rollout(self, seeds: Tensor, labels: Tensor | None, x_final: Tensor, sigma_final: Tensor) -> Rollout:
        """The :class:`Rollout`; without ``keep`` only its final states ([1, B, ...]) and NFE ([N, B])."""
        if not self.keep:
            empty = torch.empty(0, device=seeds.device)
            return Rollout(x=empty, sigma=empty, x_next=x_final.unsqueeze(0), sigma_next=sigma_final.unsqueeze(0),
                           logp=empty, nfe=torch.stack(self.lists["nfe"]), mask=empty, seeds=seeds, labels=labels)
        stacked = {key: torch.stack(values) for key, values in self.lists.items() if values}
        return Rollout(x=stacked["x"], sigma=stacked["sigma"], x_next=stacked["x_next"],
                       sigma_next=stacked["sigma_next"], logp=stacked["logp"], nfe=stacked["nfe"],
                       mask=stacked["mask"], seeds=seeds, raw=stacked.get("raw"), denoised=stacked.get("denoised"),
                       labels=labels, knob_values={name: torch.stack(v) for name, v in self.knob_values.items()})


class SamplingMDP:
    """Args:
        base: the base sampler, a single-step sampler (Euler, Heun, EDM stochastic Heun or ancestral /
            DDIM(eta)); its schedule gives the reference noise levels and its churn rule the reference churn.
        nfe: the NFE budget that sets the horizon (``base.steps_for_budget(nfe)``), or ``steps`` directly.
        guidance: ``null``, ``cfg`` (class-conditional denoiser) or ``dg`` (discriminator guidance; the
            discriminator is given at rollout time) for the ``guidance`` knob.
        num_classes: the conditional denoiser's number of classes (labels are drawn per trajectory from its seed).
        dg_sigma_min, dg_sigma_max: the sigma window of discriminator guidance.
        sigma_floor: the smallest non-zero noise level the ``step`` knob may choose.
    """

    def __init__(self, base: Sampler, nfe: int | None = None, steps: int | None = None, guidance: str | None = None,
                 num_classes: int = 0, dg_sigma_min: float = 0.0, dg_sigma_max: float = float("inf"),
                 sigma_floor: float = 1e-3):
        if not getattr(base, "single_step", False):
            raise ValueError("the MDP's base sampler must be a single-step sampler (euler, heun, edm_sde, ancestral / "
                             f"ddim: each step a function of the current state alone), got {type(base).__name__}")
        if (nfe is None) == (steps is None):
            raise ValueError("give the MDP exactly one of nfe (a budget) and steps")
        if nfe is not None:
            steps = self._steps_for_budget(base, nfe, guidance)
        if steps < 1:
            raise ValueError(f"mdp.steps must be >= 1, got {steps}")
        if guidance not in (None, "cfg", "dg"):
            raise ValueError(f"mdp.guidance must be null, 'cfg' or 'dg', got {guidance!r}")
        if guidance == "cfg" and num_classes <= 0:
            raise ValueError("mdp.guidance=cfg needs a class-conditional denoiser: set mdp.num_classes (> 0)")
        self.base, self.steps, self.nfe_budget = base, int(steps), nfe
        self.guidance, self.num_classes = guidance, int(num_classes)
        self.dg_sigma_min, self.dg_sigma_max, self.sigma_floor = float(dg_sigma_min), float(dg_sigma_max), float(sigma_floor)
        self.ref_sigmas = base.sigmas(self.steps).to(torch.float64)          # [N + 1]
        self.base_churn = base.churn_schedule(self.ref_sigmas)               # [N] the base's own churn gamma_k

    @staticmethod
    def _steps_for_budget(base: Sampler, nfe, guidance: str | None) -> int:
        """The horizon for an NFE budget; the budget counts CFG's two denoiser calls (``planned_nfe``)."""
        if int(nfe) != nfe or nfe <= 0:
            raise ValueError(f"mdp.nfe must be a positive integer, got {nfe}")
        per_call = 2 if guidance == "cfg" else 1
        steps = base.steps_for_budget(int(nfe) // per_call) if int(nfe) >= per_call else None
        if steps is None:
            raise ValueError(f"mdp.nfe={nfe} is too small for the base sampler {base.name} "
                             f"(it needs {base.planned_nfe(base.min_steps) * per_call})")
        return steps

    @property
    def horizon(self) -> int:
        return self.steps

    @property
    def eta(self) -> float | None:
        """The ancestral base sampler's eta; None for the other bases (read from ``base``)."""
        return self.base.eta if self.base.is_ancestral else None

    def planned_nfe(self) -> int:
        """NFE of one trajectory without renoise jumps (CFG counts its two denoiser calls)."""
        return self.base.planned_nfe(self.steps) * (2 if self.guidance == "cfg" else 1)

    # -- policies ----------------------------------------------------------------------------------------------------
    def references(self, knobs: Mapping[str, Knob]) -> dict[str, Tensor]:
        """Per-step reference value of each knob (what reproduces the base sampler); [N] each."""
        out = {}
        for name, knob in knobs.items():
            if knob.reference is not None:
                out[name] = torch.full((self.steps,), float(knob.reference))
            elif name == "churn":
                out[name] = self.base_churn.float()
            elif name == "guidance":
                if self.guidance is None:
                    raise ValueError("the guidance knob needs mdp.guidance=cfg or dg")
                out[name] = torch.full((self.steps,), 1.0 if self.guidance == "cfg" else 0.0)
            else:
                out[name] = torch.zeros(self.steps)
        return out

    def setup_policy(self, policy: Policy, shape) -> Policy:
        """Size ``policy`` (any kind) for this MDP's horizon and states of ``shape`` (no batch dimension), starting
        at the base sampler; refuses a policy the base sampler cannot serve. Returns the policy."""
        if policy.kind == "transition" and not self.base.is_ancestral:
            raise ValueError("a transition policy needs an ancestral base sampler (sampler=ddpm / ddim with eta > 0)")
        if policy.kind == "knob" and "churn" in policy.knobs and not self.base.supports_churn:
            raise ValueError("the churn knob needs an ODE / EDM base sampler (euler, heun, edm_sde), not ancestral")
        if policy.kind not in ("knob", "transition"):
            raise ValueError(f"a policy's kind must be 'knob' or 'transition', got {policy.kind!r}")
        reference = Reference(sigmas=self.ref_sigmas.float(), knobs=self.references(policy.knobs))
        return policy.setup(self.steps, tuple(shape), reference)

    def labels_for(self, seeds: Tensor) -> Tensor | None:
        return seed_labels(seeds, self.num_classes)

    # -- one step ------------------------------------------------------------------------------------------------
    def _denoiser(self, D: Callable, labels: Tensor | None, weight: Tensor | None, discriminator) -> tuple[Callable, int]:
        """The denoiser a step uses, and its denoiser evaluations per call."""
        if self.guidance == "cfg":
            from diffusion_irl.sampling.guidance import CFGDenoiser
            return CFGDenoiser(D, labels, weight if weight is not None else 1.0, self.num_classes), 2
        if self.guidance == "dg" and weight is not None:
            if discriminator is None:
                raise ValueError("mdp.guidance=dg needs the discriminator at rollout time")
            from diffusion_irl.sampling.guidance import DGDenoiser
            return DGDenoiser(with_labels(D, labels), discriminator, weight, self.dg_sigma_min, self.dg_sigma_max), 1
        return with_labels(D, labels), 1

    def knob_step(self, D, state: State, action: Action, noise: SampleNoise, discriminator=None):
        """Apply the knob values of ``action`` to step k of the base sampler from ``state`` (B states).
        Returns (x_next [B, *shape], sigma_next [B], nfe [B])."""
        k, values = int(state.k[0]), action.values
        x, sigma = self._churn(state.x, state.sigma, k, values.get("churn"), noise)
        sigma_next = self._next_sigma(sigma, k, values.get("step"))
        denoiser, per_call = self._denoiser(D, state.labels, values.get("guidance"), discriminator)
        x_next, _, nfe = self.base.step(denoiser, x, sigma, sigma_next, _draws(noise, k, Slot.STEP))
        nfe = nfe * per_call
        if values.get("renoise") is not None and float(self.ref_sigmas[k + 1]) > 0:
            x_next, nfe = self._renoise(D, state, values, x_next, sigma_next, nfe, noise, discriminator)
        return x_next, sigma_next, nfe

    def _churn(self, x: Tensor, sigma: Tensor, k: int, gamma: Tensor | None, noise: SampleNoise) -> tuple[Tensor, Tensor]:
        """The churn move before step k: the knob's gamma [B], else the base's own; (x, sigma) when none is > 0."""
        if gamma is None and float(self.base_churn[k]) > 0:
            gamma = torch.full_like(sigma, float(self.base_churn[k]))
        if gamma is None or not bool((gamma > 0).any()):
            return x, sigma
        x_hat, sigma_hat, _ = self.base.churn(x, sigma, gamma, noise.step(k, x, Slot.CHURN))
        return x_hat, sigma_hat

    def _next_sigma(self, sigma: Tensor, k: int, step: Tensor | None) -> Tensor:
        """sigma_{k+1} [B]: the reference level, offset by ``exp(step)`` (kept in [sigma_floor, sigma)); 0 last."""
        ref_next = float(self.ref_sigmas[k + 1])
        if ref_next == 0:
            return torch.zeros_like(sigma)
        if step is None:
            return torch.full_like(sigma, ref_next)
        return torch.minimum((ref_next * step.exp()).clamp(min=self.sigma_floor), sigma * (1 - 1e-3))

    def _renoise(self, D, state: State, values: Mapping[str, Tensor], x_next: Tensor, sigma_next: Tensor,
                 nfe: Tensor, noise: SampleNoise, discriminator) -> tuple[Tensor, Tensor]:
        """The renoise jump after step k: samples with ``r > 0`` jump up to ``sigma_hi = sigma_next (1 + r)`` and take
        the base's step back down to ``sigma_next`` (their own noise streams). Returns (x_next, nfe), [B] rows."""
        k, renoise = int(state.k[0]), values["renoise"]
        jumping = renoise > 0
        if not bool(jumping.any()):
            return x_next, nfe
        rows = jumping.nonzero().squeeze(1)
        row_noise = noise.subset(rows)
        sigma_lo = sigma_next[rows]
        sigma_hi = sigma_lo * (1 + renoise[rows])
        x_jump = x_next[rows]
        jump_std = append_dims((sigma_hi**2 - sigma_lo**2).sqrt(), x_jump.ndim)
        x_jump = x_jump + jump_std * row_noise.step(k, x_jump, Slot.RENOISE)
        row_labels = state.labels[rows] if state.labels is not None else None
        row_weight = values["guidance"][rows] if "guidance" in values else None
        denoiser, per_call = self._denoiser(D, row_labels, row_weight, discriminator)
        step_noise = _draws(row_noise, k, Slot.RENOISE_STEP)
        x_back, _, row_nfe = self.base.step(denoiser, x_jump, sigma_hi, sigma_lo, step_noise)
        return x_next.index_copy(0, rows, x_back), nfe.index_add(0, rows, row_nfe * per_call)

    def _knob_move(self, D, policy, state: State, noise: SampleNoise, deterministic: bool, discriminator) -> StepResult:
        """A knob policy acts, then :meth:`knob_step`."""
        action = policy.act(state, deterministic)
        x_next, sigma_next, nfe = self.knob_step(D, state, action, noise, discriminator)
        return StepResult(x_next, sigma_next, nfe, action.logp, torch.ones_like(nfe, dtype=torch.bool),
                          raw=action.raw, knob_values=action.values)

    @staticmethod
    def _transition_move(D, policy, state: State, noise: SampleNoise, deterministic: bool) -> StepResult:
        """A transition policy's Gaussian move ``x_next ~ N(mean, std^2 I)`` (its mean when ``deterministic``)."""
        x, sigma, k = state.x, state.sigma, int(state.k[0])
        denoised = policy.denoise(D, x, sigma, state.labels)
        mean, std, sigma_next = policy.gaussian(x, sigma, state.k, denoised)
        x_next = mean if deterministic else mean + append_dims(std, x.ndim) * noise.step(k, x, Slot.STEP)
        logp = policy.gaussian_log_prob(x_next, mean, std)
        return StepResult(x_next, sigma_next, torch.ones_like(sigma), logp, std > 0, denoised=denoised)

    # -- whole trajectories --------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, denoiser: Callable, policy, seeds: Tensor, shape, deterministic: bool = False,
                x_init: Tensor | None = None, discriminator=None, keep: bool = True) -> Rollout:
        """Roll out ``len(seeds)`` trajectories (seeds [B]) of states shaped ``shape``; ``x_init`` [B, *shape]
        (already scaled) replaces the initial noise. ``keep=False`` stores only the final states (evaluation)."""
        seeds = seeds.to(torch.int64)
        batch, device = len(seeds), seeds.device
        noise = SampleNoise(seeds)
        if x_init is None:
            like = torch.empty((batch, *shape), device=device, dtype=torch.float32)
            x_init = noise.initial(like) * float(self.ref_sigmas[0])
        x = x_init
        sigma = torch.full((batch,), float(self.ref_sigmas[0]), device=device, dtype=x.dtype)
        labels = self.labels_for(seeds)
        recorder = _Recorder(keep)
        for k in range(self.steps):
            state = State(x, sigma, torch.full((batch,), k, device=device, dtype=torch.long), labels)
            if policy.kind == "transition":
                result = self._transition_move(denoiser, policy, state, noise, deterministic)
            else:
                result = self._knob_move(denoiser, policy, state, noise, deterministic, discriminator)
            if not torch.isfinite(result.x_next).all():
                raise FloatingPointError(f"non-finite state at step {k} of the sampling MDP (sigma {float(sigma.max()):.3g})")
            recorder.add(state, result)
            x, sigma = result.x_next, result.sigma_next
        return recorder.rollout(seeds, labels, x, sigma)


def _draws(noise: SampleNoise, k: int, slot: Slot) -> NoiseFn:
    """The base step's noise: step k's draw in ``slot``, shaped like its argument."""
    return lambda like: noise.step(k, like, slot)


class _OpenLoopActions:
    """The actions of a deterministic open-loop knob policy (``per_step_table``: a function of k alone), computed
    once for every step by one ``act`` over the N step indices; each rollout step broadcasts its row to the batch.
    The same actions bit for bit, without the per-step, per-sample distribution work, which cost several times an
    Euler step's own overhead (benchmarks/bench_rl.py). Only for ``SamplingMDP.rollout`` (one k per step)."""

    kind = "knob"

    def __init__(self, policy: KnobPolicy, steps: int, like: Tensor):
        self.names = policy.names
        k = torch.arange(steps, device=like.device)
        state = State(like[:1].expand(steps, *like.shape[1:]), torch.ones(steps, device=like.device, dtype=like.dtype), k)
        with torch.no_grad():
            self.table = policy.act(state, deterministic=True)

    def act(self, state: State, deterministic: bool = True) -> Action:
        k, batch, table = int(state.k[0]), state.x.shape[0], self.table
        return Action(raw=table.raw[k].expand(batch, -1), values={n: v[k].expand(batch) for n, v in table.values.items()},
                      logp=table.logp[k].expand(batch))


class PolicySampler(Sampler):
    """A policy on the MDP as a foundation ``Sampler``, so the evaluator compares it with every other sampler on the
    same initial noise (``NoiseStream.initial``). Stochastic draws come from per-sample seeds derived from the
    stream's seed. The policy acts in its ``eval_mode`` (deterministic by default). NFE reported = the mean
    per-sample NFE, rounded up."""

    stochastic = True

    def __init__(self, mdp: SamplingMDP, policy, name: str = "tuned", discriminator=None, deterministic: bool | None = None):
        super().__init__(mdp.base.schedule)
        self.variable_nfe = "renoise" in policy.names
        self.mdp, self.policy, self.name, self.discriminator = mdp, policy, name, discriminator
        self.labels_from_seeds = mdp.num_classes > 0  # the MDP draws class seed mod num_classes itself
        self.deterministic = policy.eval_mode == "deterministic" if deterministic is None else deterministic

    def planned_nfe(self, steps: int) -> int:
        return self.mdp.planned_nfe() if steps == self.mdp.steps else 10**9

    def steps_for_budget(self, nfe: int, max_steps: int = 100_000) -> int | None:
        return self.mdp.steps if self.mdp.planned_nfe() <= nfe else None

    def sigmas(self, steps: int) -> Tensor:
        return self.mdp.ref_sigmas.float()

    def sample(self, denoiser, shape, steps, noise, callback=None, trajectory=False, x_init=None) -> SampleOutput:
        if steps != self.mdp.steps:
            raise ValueError(f"{self.name} was tuned for {self.mdp.steps} steps, asked for {steps}")
        B = shape[0]
        x0 = x_init if x_init is not None else noise.initial(tuple(shape)) * float(self.mdp.ref_sigmas[0])
        per_sample = getattr(noise, "seeds", None)  # the stream's per-sample seeds: results independent of the batch
        seeds = per_sample.to(x0.device) if per_sample is not None else sample_seeds(B, "policy", noise.seed, device=x0.device)
        module = self.policy if isinstance(self.policy, nn.Module) else None
        was_training = module is not None and module.training
        if module is not None:
            module.eval()
        try:
            policy = self.policy
            if self.deterministic and policy.per_step_table:
                policy = _OpenLoopActions(policy, self.mdp.steps, x0)
            rollout = self.mdp.rollout(denoiser, policy, seeds, tuple(shape[1:]), deterministic=self.deterministic,
                                       x_init=x0, discriminator=self.discriminator, keep=trajectory)
        finally:
            if was_training:
                module.train()
        nfe = int(math.ceil(float(rollout.nfe.sum(0).mean()) - 1e-9))
        traj = [x0, *rollout.x_next.unbind(0)] if trajectory else None
        return SampleOutput(x=rollout.final, nfe=nfe, steps=self.mdp.steps, sigmas=self.mdp.ref_sigmas.float(),
                            trajectory=traj)

    def __repr__(self) -> str:
        return f"PolicySampler({self.name}, base={self.mdp.base!r}, steps={self.mdp.steps})"
