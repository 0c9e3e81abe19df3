"""Config-facing samplers: a schedule plus one solver from ``solvers.py``, an NFE planner, and counted NFE.

Every sampler answers two questions the evaluator asks:
- ``steps_for_budget(nfe)``: the largest number of steps whose planned NFE fits the budget (None if none fits);
- ``sample(D, shape, steps, noise)``: the samples and the NFE *counted* while producing them.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from diffusion_irl.sampling import solvers
from diffusion_irl.sampling.noise import NoiseStream
from diffusion_irl.sampling.schedules import KarrasSchedule, Schedule, karras_sigmas


class NFECounter(nn.Module):
    """Wraps ``D`` and counts its evaluations (one batched call = one NFE)."""

    def __init__(self, denoiser: Callable):
        super().__init__()
        self.denoiser, self.nfe = denoiser, 0

    def forward(self, x: Tensor, sigma: Tensor, *args, **kwargs) -> Tensor:
        self.nfe += 1
        return self.denoiser(x, sigma, *args, **kwargs)


@dataclass
class SampleOutput:
    x: Tensor
    nfe: int  # counted
    steps: int
    sigmas: Tensor
    trajectory: list[Tensor] | None = field(default=None, repr=False)


class Sampler:
    """Base class. Subclasses set ``nfe_per_step`` / ``nfe_offset`` (planned NFE = a * steps + b) or override
    ``planned_nfe``, and implement ``_solve``."""

    name = "sampler"
    stochastic = False
    nfe_per_step, nfe_offset = 1, 0
    min_steps = 1

    def __init__(self, schedule: Schedule | None = None):
        self.schedule = schedule if schedule is not None else KarrasSchedule()

    def planned_nfe(self, steps: int) -> int:
        return self.nfe_per_step * steps + self.nfe_offset

    def steps_for_budget(self, nfe: int, max_steps: int = 100_000) -> int | None:
        """Largest ``steps >= min_steps`` with ``planned_nfe(steps) <= nfe``; None when even the smallest does not fit."""
        if int(nfe) != nfe or nfe <= 0:
            raise ValueError(f"an NFE budget must be a positive integer, got {nfe}")
        best = None
        for steps in range(self.min_steps, max_steps + 1):
            if self.planned_nfe(steps) > nfe:
                break
            best = steps
        return best

    def sigmas(self, steps: int) -> Tensor:
        return self.schedule(steps)

    def _solve(self, D, x: Tensor, sigmas: Tensor, noise: NoiseStream, callback) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def sample(self, denoiser: Callable, shape: tuple[int, ...], steps: int, noise: NoiseStream,
               callback: Callable | None = None, trajectory: bool = False, x_init: Tensor | None = None) -> SampleOutput:
        """Draw ``shape[0]`` samples. The initial state is ``sigmas[0] * noise.initial(shape)`` unless ``x_init``
        (already scaled) is given. ``trajectory=True`` keeps every state (memory grows with steps)."""
        if steps < self.min_steps:
            raise ValueError(f"{self.name} needs at least {self.min_steps} steps, got {steps}")
        D = NFECounter(denoiser)
        sigmas = self.sigmas(steps)
        x = x_init if x_init is not None else noise.initial(tuple(shape)) * float(sigmas[0])
        states = [x] if trajectory else None

        def cb(info: solvers.StepInfo):
            if states is not None:
                states.append(info.x_next)
            if callback is not None:
                callback(info)

        x = self._solve(D, x, sigmas, noise, cb if (trajectory or callback) else None)
        return SampleOutput(x=x, nfe=D.nfe, steps=steps, sigmas=sigmas, trajectory=states)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(schedule={self.schedule!r})"


class Euler(Sampler):
    name = "euler"

    def _solve(self, D, x, sigmas, noise, callback):
        return solvers.sample_euler(D, x, sigmas, callback=callback)


class Heun(Sampler):
    name = "heun"
    nfe_per_step, nfe_offset = 2, -1

    def _solve(self, D, x, sigmas, noise, callback):
        return solvers.sample_heun(D, x, sigmas, callback=callback)


class Ancestral(Sampler):
    """DDPM (eta 1 on the discrete VP schedule), DDIM(eta), Euler-ancestral (Karras schedule): one update."""

    name = "ancestral"

    def __init__(self, schedule: Schedule | None = None, eta: float = 1.0):
        super().__init__(schedule)
        if eta < 0:
            raise ValueError(f"sampler.eta must be >= 0, got {eta}")
        self.eta = float(eta)
        self.stochastic = self.eta > 0

    def _solve(self, D, x, sigmas, noise, callback):
        return solvers.sample_ancestral(D, x, sigmas, noise, eta=self.eta, callback=callback)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eta={self.eta}, schedule={self.schedule!r})"


class EDMStochastic(Sampler):
    """EDM Algorithm 2 (stochastic Heun with churn)."""

    name = "edm_sde"
    stochastic = True
    nfe_per_step, nfe_offset = 2, -1

    def __init__(self, schedule: Schedule | None = None, S_churn: float = 40.0, S_tmin: float = 0.05,
                 S_tmax: float = 50.0, S_noise: float = 1.003):
        super().__init__(schedule)
        if S_churn < 0 or S_noise < 0 or S_tmin < 0 or S_tmax < S_tmin:
            raise ValueError(f"need S_churn >= 0, S_noise >= 0, 0 <= S_tmin <= S_tmax; got S_churn={S_churn}, "
                             f"S_noise={S_noise}, S_tmin={S_tmin}, S_tmax={S_tmax}")
        self.S_churn, self.S_tmin, self.S_tmax, self.S_noise = float(S_churn), float(S_tmin), float(S_tmax), float(S_noise)

    def _solve(self, D, x, sigmas, noise, callback):
        return solvers.sample_edm_sde(D, x, sigmas, noise, self.S_churn, self.S_tmin, self.S_tmax, self.S_noise,
                                      callback=callback)


class DPMpp2M(Sampler):
    name = "dpmpp_2m"

    def _solve(self, D, x, sigmas, noise, callback):
        return solvers.sample_dpmpp_2m(D, x, sigmas, callback=callback)


class Restart(Sampler):
    """Restart (Xu et al. 2023) over Heun: K jumps from ``t_min`` back to ``t_max``, each re-solved with
    ``restart_steps`` Heun steps on a Karras sub-schedule. The planner spends the rest of the budget on the main
    schedule."""

    name = "restart"
    stochastic = True
    min_steps = 2

    def __init__(self, schedule: Schedule | None = None, t_min: float = 0.06, t_max: float = 0.30, K: int = 1,
                 restart_steps: int = 2, S_noise: float = 1.0, rho: float = 7.0):
        super().__init__(schedule)
        if not 0 < t_min < t_max:
            raise ValueError(f"restart needs 0 < t_min < t_max, got t_min={t_min}, t_max={t_max}")
        if K < 0 or restart_steps < 1:
            raise ValueError(f"restart needs K >= 0 and restart_steps >= 1, got K={K}, restart_steps={restart_steps}")
        self.t_min, self.t_max, self.K, self.restart_steps = float(t_min), float(t_max), int(K), int(restart_steps)
        self.S_noise, self.rho = float(S_noise), float(rho)

    def planned_nfe(self, steps: int) -> int:
        # the jump happens at a non-zero level; when t_max is below it, no restart happens (then fewer NFE are used)
        return 2 * steps - 1 + self.K * 2 * self.restart_steps

    def _restart_sigmas(self, s_min: float, t_max: float) -> Tensor:
        return karras_sigmas(self.restart_steps + 1, s_min, t_max, self.rho)[:-1]  # drop the appended 0

    def _solve(self, D, x, sigmas, noise, callback):
        return solvers.sample_restart(D, x, sigmas, noise, t_max=self.t_max, restart_sigmas=self._restart_sigmas,
                                      t_min=self.t_min, K=self.K, S_noise=self.S_noise, callback=callback)
