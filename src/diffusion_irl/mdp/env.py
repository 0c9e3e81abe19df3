"""The sampling MDP (ALGORITHM.md section 3) on top of the foundation samplers' single-step functions.

State ``s_k = (x_k, sigma_k, k)``; ``x_0 = sigma_max * n``; horizon N = the base sampler's step count for the NFE
budget. The transition is the base sampler's step (``solvers.py``: Euler, Heun, EDM churn + Heun, ancestral / DDIM)
modified by the action, so this module owns no sampler maths of its own:

- knob actions (``KnobPolicy``): churn before the step, the next noise level, a guidance weight inside the
  denoiser (CFG or discriminator guidance), a renoise jump after the step (extra NFE, counted per sample);
- transition actions (``TransitionPolicy``): ``x_{k+1} ~ N(mean, std^2 I)`` around the ancestral step.

Every Gaussian draw comes from per-sample counter-based streams (``SampleNoise``), so a trajectory is replayable
from its seed alone; rollouts keep states, actions, old log-probs and per-sample NFE. With the reference policy in
deterministic mode a rollout reproduces the base sampler exactly (tests check this).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from diffusion_irl.mdp.actions import Knob
from diffusion_irl.mdp.policies import Action, KnobPolicy, State, TransitionPolicy
from diffusion_irl.sampling import solvers
from diffusion_irl.sampling.noise import SampleNoise
from diffusion_irl.sampling.samplers import Ancestral, EDMStochastic, Euler, Heun, Sampler, SampleOutput
from diffusion_irl.tensors import append_dims

BASES = (Euler, Heun, EDMStochastic, Ancestral)


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
        N, B = self.sigma.shape
        out = {"x": self.x.flatten(0, 1), "sigma": self.sigma.flatten(), "logp": self.logp.flatten(),
               "mask": self.mask.flatten(),
               "k": torch.arange(N, device=self.sigma.device).repeat_interleave(B)}
        if self.raw is not None:
            out["raw"] = self.raw.flatten(0, 1)
        if self.denoised is not None:
            out["denoised"] = self.denoised.flatten(0, 1)
            out["x_next"] = self.x_next.flatten(0, 1)
        if self.labels is not None:
            out["labels"] = self.labels.repeat(N)
        return out


class SamplingMDP:
    """Args:
        base: the base sampler (Euler, Heun, EDM stochastic Heun or ancestral / DDIM(eta)); its schedule gives the
            reference noise levels and its churn rule the reference churn.
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
        if not isinstance(base, BASES):
            raise ValueError(f"the MDP's base sampler must be one of {[b.__name__ for b in BASES]} "
                             f"(single-step samplers), got {type(base).__name__}")
        if (nfe is None) == (steps is None):
            raise ValueError("give the MDP exactly one of nfe (a budget) and steps")
        if nfe is not None:
            if int(nfe) != nfe or nfe <= 0:
                raise ValueError(f"mdp.nfe must be a positive integer, got {nfe}")
            per_call = 2 if guidance == "cfg" else 1  # the budget counts CFG's two denoiser calls (planned_nfe)
            steps = base.steps_for_budget(int(nfe) // per_call) if int(nfe) >= per_call else None
            if steps is None:
                raise ValueError(f"mdp.nfe={nfe} is too small for the base sampler {base.name} "
                                 f"(it needs {base.planned_nfe(base.min_steps) * per_call})")
        if steps < 1:
            raise ValueError(f"mdp.steps must be >= 1, got {steps}")
        if guidance not in (None, "cfg", "dg"):
            raise ValueError(f"mdp.guidance must be null, 'cfg' or 'dg', got {guidance!r}")
        if guidance == "cfg" and num_classes <= 0:
            raise ValueError("mdp.guidance=cfg needs a class-conditional denoiser: set mdp.num_classes (> 0)")
        self.base, self.steps, self.nfe_budget = base, int(steps), nfe
        self.guidance, self.num_classes = guidance, int(num_classes)
        self.dg_sigma_min, self.dg_sigma_max, self.sigma_floor = float(dg_sigma_min), float(dg_sigma_max), float(sigma_floor)
        self.ref_sigmas = base.sigmas(self.steps).to(torch.float64)
        if isinstance(base, EDMStochastic):
            self.ref_churn = solvers.edm_gammas(self.ref_sigmas, base.S_churn, base.S_tmin, base.S_tmax)
            self.S_noise = base.S_noise
        else:
            self.ref_churn, self.S_noise = torch.zeros(self.steps, dtype=torch.float64), 1.0
        self.eta = base.eta if isinstance(base, Ancestral) else None
        self.second_order = isinstance(base, (Heun, EDMStochastic))

    @property
    def horizon(self) -> int:
        return self.steps

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
                out[name] = self.ref_churn.float()
            elif name == "guidance":
                if self.guidance is None:
                    raise ValueError("the guidance knob needs mdp.guidance=cfg or dg")
                out[name] = torch.full((self.steps,), 1.0 if self.guidance == "cfg" else 0.0)
            else:
                out[name] = torch.zeros(self.steps)
        return out

    def setup_policy(self, policy, shape) -> None:
        if isinstance(policy, TransitionPolicy):
            if self.eta is None:
                raise ValueError("a transition policy needs an ancestral base sampler (sampler=ddpm / ddim with eta > 0)")
            policy.setup(self.steps, self.ref_sigmas.float(), shape)
        elif hasattr(policy, "knobs"):
            if "churn" in policy.knobs and self.eta is not None:
                raise ValueError("the churn knob needs an ODE / EDM base sampler (euler, heun, edm_sde), not ancestral")
            policy.setup(self.steps, self.references(policy.knobs), shape)
        else:
            policy.setup(self.steps)

    def labels_for(self, seeds: Tensor) -> Tensor | None:
        return torch.remainder(seeds, self.num_classes).long() if self.num_classes > 0 else None

    # -- one step ------------------------------------------------------------------------------------------------
    def _denoiser(self, D: Callable, labels: Tensor | None, weight: Tensor | None, discriminator) -> tuple[Callable, int]:
        """The denoiser a step uses, and its denoiser evaluations per call."""
        if self.guidance == "cfg":
            from diffusion_irl.sampling.guidance import CFGDenoiser
            w = weight if weight is not None else 1.0
            return CFGDenoiser(D, labels, w, self.num_classes), 2
        if self.guidance == "dg" and weight is not None:
            if discriminator is None:
                raise ValueError("mdp.guidance=dg needs the discriminator at rollout time")
            from diffusion_irl.sampling.guidance import DGDenoiser
            return DGDenoiser(_with_labels(D, labels), discriminator, weight, self.dg_sigma_min, self.dg_sigma_max), 1
        return _with_labels(D, labels), 1

    def _solver_step(self, D, x, sigma, sigma_next, noise: SampleNoise, k: int, slot: int):
        """The base sampler's deterministic or ancestral move; returns (x_next, denoised, evaluations per sample)."""
        if self.eta is not None:
            eps = noise.step(k, x, slot) if self.eta > 0 else torch.zeros_like(x)
            x_next, den, _, _ = solvers.ancestral_step(D, x, sigma, sigma_next, eps, self.eta)
            return x_next, den, torch.ones_like(sigma)
        if self.second_order:
            x_next, den = solvers.heun_step(D, x, sigma, sigma_next)
            return x_next, den, 1.0 + (sigma_next > 0).to(sigma.dtype)
        x_next, den = solvers.euler_step(D, x, sigma, sigma_next)
        return x_next, den, torch.ones_like(sigma)

    def knob_step(self, D, state: State, action: Action, noise: SampleNoise, discriminator=None):
        """Apply knob values to step k. Returns (x_next, sigma_next, nfe [B])."""
        x, sigma, k = state.x, state.sigma, int(state.k[0])
        v = action.values
        ref_next = float(self.ref_sigmas[k + 1])
        gamma = v.get("churn")
        if gamma is None and float(self.ref_churn[k]) > 0:
            gamma = torch.full_like(sigma, float(self.ref_churn[k]))
        if gamma is not None and bool((gamma > 0).any()):
            x, sigma, _ = solvers.churn(x, sigma, gamma, noise.step(k, x, 0), self.S_noise)
        if ref_next == 0:
            sigma_next = torch.zeros_like(sigma)
        elif "step" in v:
            sigma_next = torch.minimum((ref_next * v["step"].exp()).clamp(min=self.sigma_floor), sigma * (1 - 1e-3))
        else:
            sigma_next = torch.full_like(sigma, ref_next)
        Dk, per_call = self._denoiser(D, state.labels, v.get("guidance"), discriminator)
        x_next, _, nfe = self._solver_step(Dk, x, sigma, sigma_next, noise, k, 1)
        nfe = nfe * per_call
        r = v.get("renoise")
        if r is not None and ref_next > 0:
            jump = r > 0
            if bool(jump.any()):
                idx = jump.nonzero().squeeze(1)
                sub_noise = noise.subset(idx)
                s_lo = sigma_next[idx]
                s_hi = s_lo * (1 + r[idx])
                xj = x_next[idx]
                xj = xj + append_dims((s_hi**2 - s_lo**2).sqrt(), xj.ndim) * sub_noise.step(k, xj, 2)
                sub_labels = state.labels[idx] if state.labels is not None else None
                sub_w = v["guidance"][idx] if "guidance" in v else None
                Dj, per_call_j = self._denoiser(D, sub_labels, sub_w, discriminator)
                xj, _, nfe_j = self._solver_step(Dj, xj, s_hi, s_lo, sub_noise, k, 3)
                x_next = x_next.index_copy(0, idx, xj)
                nfe = nfe.index_add(0, idx, nfe_j * per_call_j)
        return x_next, sigma_next, nfe

    # -- whole trajectories --------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, denoiser: Callable, policy, seeds: Tensor, shape, deterministic: bool = False,
                x_init: Tensor | None = None, discriminator=None, keep: bool = True) -> Rollout:
        """Roll out ``len(seeds)`` trajectories. ``keep=False`` stores only the final states (evaluation)."""
        seeds = seeds.to(torch.int64)
        B, N = len(seeds), self.steps
        device = seeds.device
        dtype = x_init.dtype if x_init is not None else torch.float32
        noise = SampleNoise(seeds)
        if x_init is None:
            x_init = noise.initial(torch.empty((B, *shape), device=device, dtype=dtype)) * float(self.ref_sigmas[0])
        x = x_init
        sigma = torch.full((B,), float(self.ref_sigmas[0]), device=device, dtype=dtype)
        labels = self.labels_for(seeds)
        transition = getattr(policy, "family", "knob") == "transition"
        rec: dict[str, list] = {key: [] for key in ("x", "sigma", "x_next", "sigma_next", "logp", "nfe", "mask",
                                                    "raw", "denoised")}
        values: dict[str, list] = {}
        for k in range(N):
            state = State(x, sigma, torch.full((B,), k, device=device, dtype=torch.long), labels)
            if transition:
                den = policy.denoise(denoiser, x, sigma, labels)
                mean, std, sigma_next = policy.gaussian(x, sigma, state.k, den)
                x_next = mean if deterministic else mean + append_dims(std, x.ndim) * noise.step(k, x, 1)
                logp = policy.gaussian_log_prob(x_next, mean, std)
                nfe, mask = torch.ones_like(sigma), std > 0
                if keep:
                    rec["denoised"].append(den)
            else:
                action = policy.act(state, deterministic)
                x_next, sigma_next, nfe = self.knob_step(denoiser, state, action, noise, discriminator)
                logp, mask = action.logp, torch.ones(B, dtype=torch.bool, device=device)
                if keep:
                    rec["raw"].append(action.raw)
                    for name, val in action.values.items():
                        values.setdefault(name, []).append(val)
            if not torch.isfinite(x_next).all():
                raise FloatingPointError(f"non-finite state at step {k} of the sampling MDP (sigma {float(sigma.max()):.3g})")
            if keep:
                for key, val in (("x", x), ("sigma", sigma), ("x_next", x_next), ("sigma_next", sigma_next),
                                 ("logp", logp), ("nfe", nfe), ("mask", mask)):
                    rec[key].append(val)
            else:
                rec["nfe"].append(nfe)
            x, sigma = x_next, sigma_next
        if not keep:
            nfe = torch.stack(rec["nfe"])
            empty = torch.empty(0, device=device)
            return Rollout(x=empty, sigma=empty, x_next=x.unsqueeze(0), sigma_next=sigma.unsqueeze(0), logp=empty,
                           nfe=nfe, mask=empty, seeds=seeds, labels=labels)
        st = {key: torch.stack(val) for key, val in rec.items() if val}
        return Rollout(x=st["x"], sigma=st["sigma"], x_next=st["x_next"], sigma_next=st["sigma_next"], logp=st["logp"],
                       nfe=st["nfe"], mask=st["mask"], seeds=seeds, raw=st.get("raw"), denoised=st.get("denoised"),
                       labels=labels, knob_values={n: torch.stack(v) for n, v in values.items()})


def _with_labels(D: Callable, labels: Tensor | None) -> Callable:
    if labels is None:
        return D
    return lambda x, sigma: D(x, sigma, labels)


class _OpenLoopActions:
    """The actions of a deterministic open-loop knob policy (``conditioning: step``: a function of k alone), computed
    once for every step by one ``act`` over the N step indices; each rollout step broadcasts its row to the batch.
    The same actions bit for bit, without the per-step, per-sample distribution work, which cost several times an
    Euler step's own overhead (benchmarks/bench_rl.py). Only for ``SamplingMDP.rollout`` (one k per step)."""

    family = "knob"

    def __init__(self, policy: KnobPolicy, steps: int, like: Tensor):
        self.names = policy.names
        k = torch.arange(steps, device=like.device)
        state = State(like[:1].expand(steps, *like.shape[1:]), torch.ones(steps, device=like.device, dtype=like.dtype), k)
        with torch.no_grad():
            self.table = policy.act(state, deterministic=True)

    def act(self, state: State, deterministic: bool = True) -> Action:
        k, B, t = int(state.k[0]), state.x.shape[0], self.table
        return Action(raw=t.raw[k].expand(B, -1), values={n: v[k].expand(B) for n, v in t.values.items()},
                      logp=t.logp[k].expand(B))


class PolicySampler(Sampler):
    """A policy on the MDP as a foundation ``Sampler``, so the evaluator compares it with every other sampler on the
    same initial noise (``NoiseStream.initial``). Stochastic draws come from per-sample seeds derived from the
    stream's seed. The policy acts in its ``eval_mode`` (deterministic by default). NFE reported = the mean
    per-sample NFE, rounded up."""

    stochastic = True

    def __init__(self, mdp: SamplingMDP, policy, name: str = "tuned", discriminator=None, deterministic: bool | None = None):
        super().__init__(mdp.base.schedule)
        self.variable_nfe = "renoise" in getattr(policy, "names", [])
        self.mdp, self.policy, self.name, self.discriminator = mdp, policy, name, discriminator
        self.deterministic = (getattr(policy, "eval_mode", "deterministic") == "deterministic"
                              if deterministic is None else deterministic)

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
        seeds = (noise.seed * 1_000_003 + torch.arange(B, device=x0.device)).to(torch.int64)
        was_training = getattr(self.policy, "training", False)
        if hasattr(self.policy, "eval"):
            self.policy.eval()
        try:
            policy = self.policy
            if self.deterministic and isinstance(policy, KnobPolicy) and policy.conditioning == "step":
                policy = _OpenLoopActions(policy, self.mdp.steps, x0)
            ro = self.mdp.rollout(denoiser, policy, seeds, tuple(shape[1:]), deterministic=self.deterministic,
                                  x_init=x0, discriminator=self.discriminator, keep=trajectory)
        finally:
            if was_training:
                self.policy.train()
        nfe = int(math.ceil(float(ro.nfe.sum(0).mean()) - 1e-9))
        traj = [x0, *ro.x_next.unbind(0)] if trajectory else None
        return SampleOutput(x=ro.final, nfe=nfe, steps=self.mdp.steps, sigmas=self.mdp.ref_sigmas.float(), trajectory=traj)

    def __repr__(self) -> str:
        return f"PolicySampler({self.name}, base={self.mdp.base!r}, steps={self.mdp.steps})"
