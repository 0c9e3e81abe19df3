"""Config-facing samplers: a schedule plus one solver from ``solvers.py``, an NFE planner, and counted NFE.

Every sampler answers two questions the evaluator asks:
- ``steps_for_budget(nfe)``: the largest number of steps whose planned NFE fits the budget (None if none fits);
- ``sample(D, shape, steps, noise)``: the samples and the NFE *counted* while producing them.

The single-step samplers (:class:`SingleStepSampler`: Euler, Heun, EDM stochastic Heun, ancestral / DDIM) also
expose one step, ``step(D, x, sigma, sigma_next, noise)``, and its stochastic parts (an optional churn move before
the step, ancestral noise inside it), which the sampling MDP (``mdp/env.py``) modifies by its actions. Samplers
whose step depends on more than the current state (the multistep histories of DPM-Solver++(2M/3M), iPNDM and
UniPC, Restart's jumps) have
``single_step = False``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from diffusion_irl.sampling import solvers
from diffusion_irl.sampling.correction import corrected
from diffusion_irl.sampling.noise import NoiseStream
from diffusion_irl.sampling.schedules import KarrasSchedule, Schedule, karras_sigmas
from diffusion_irl.tensors import batch_sigma

NoiseFn = Callable[[Tensor], Tensor]
"""``noise(like)``: a standard normal draw shaped like ``like`` ([B, *shape]), fresh for this step."""


class NFECounter(nn.Module):
    """Wraps ``D`` and counts its evaluations (one batched call = one NFE)."""

    def __init__(self, denoiser: Callable):
        super().__init__()
        self.denoiser, self.nfe = denoiser, 0

    @property
    def num_classes(self) -> int:
        """The wrapped denoiser's classes (0: unconditional)."""
        return int(getattr(self.denoiser, "num_classes", 0) or 0)

    def forward(self, x: Tensor, sigma: Tensor, *args, **kwargs) -> Tensor:
        self.nfe += 1
        return self.denoiser(x, sigma, *args, **kwargs)


class LabelledDenoiser(nn.Module):
    """A class-conditional denoiser bound to the labels of a batch: ``D(x, sigma)`` calls ``D(x, sigma, labels)``
    (a call that passes its own labels goes through unchanged; a call on another number of rows is an error)."""

    def __init__(self, denoiser: Callable, labels: Tensor):
        super().__init__()
        self.denoiser, self.labels = denoiser, labels

    @property
    def num_classes(self) -> int:
        return int(getattr(self.denoiser, "num_classes", 0) or 0)

    def forward(self, x: Tensor, sigma, *args, **kwargs) -> Tensor:
        if args or kwargs:
            return self.denoiser(x, sigma, *args, **kwargs)
        if len(x) != len(self.labels):
            raise RuntimeError(f"a batch of {len(self.labels)} labelled samples got a denoiser call on {len(x)} rows")
        return self.denoiser(x, sigma, self.labels)


def with_labels(denoiser: Callable, labels: Tensor | None) -> Callable:
    """``denoiser`` bound to ``labels`` [B] (:class:`LabelledDenoiser`), or ``denoiser`` itself without labels."""
    return denoiser if labels is None else LabelledDenoiser(denoiser, labels)


def seed_labels(seeds: Tensor, num_classes: int) -> Tensor | None:
    """The class of each per-sample seed, ``seed mod num_classes`` (None when ``num_classes`` is 0): the one rule by
    which the sampling MDP, the evaluator and the schedule tuners condition a class-conditional denoiser."""
    return torch.remainder(seeds, int(num_classes)).long() if int(num_classes) > 0 else None


def seed_conditioned(denoiser: Callable, seeds: Tensor) -> Callable:
    """``denoiser`` bound to the classes of ``seeds`` (:func:`seed_labels`) when it is class-conditional, else
    ``denoiser`` itself."""
    return with_labels(denoiser, seed_labels(seeds, int(getattr(denoiser, "num_classes", 0) or 0)))


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
    single_step = False  # True for SingleStepSampler: the sampling MDP can take it as its base sampler
    correction = None  # a learned correction g (or the schedule's): sample() runs on D + g (sampling/correction.py)

    def __init__(self, schedule: Schedule | None = None):
        self.schedule = schedule if schedule is not None else KarrasSchedule()

    def planned_nfe(self, steps: int) -> int:
        return self.nfe_per_step * steps + self.nfe_offset

    @property
    def fixed_steps(self) -> int | None:
        """The step count of a schedule of fixed length (a tuned ``SigmaSchedule``); None for a schedule of any
        length."""
        steps = getattr(getattr(self, "schedule", None), "steps", None)
        return None if steps is None else int(steps)

    def steps_for_budget(self, nfe: int, max_steps: int = 100_000) -> int | None:
        """Largest ``steps >= min_steps`` with ``planned_nfe(steps) <= nfe``; None when even the smallest does not fit.
        A schedule of fixed length (a tuned ``SigmaSchedule``) serves only its own step count: that count when it
        fits the budget, else None (so an evaluator runs it once, at the budget it was tuned for)."""
        if int(nfe) != nfe or nfe <= 0:
            raise ValueError(f"an NFE budget must be a positive integer, got {nfe}")
        fixed = self.fixed_steps
        if fixed is not None:
            return fixed if self.planned_nfe(fixed) <= nfe else None
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

    @property
    def differentiable(self) -> bool:
        """Whether :meth:`solve_differentiable` exists: a deterministic solve that backpropagates to ``x`` and to
        ``sigmas`` (what LD3 and the pathwise tuner need)."""
        return _has_differentiable_solve(type(self))

    def solve_differentiable(self, D, x: Tensor, sigmas: Tensor) -> Tensor:
        """The solver from ``x`` (already scaled) along ``sigmas`` with autograd on: the same loop as :meth:`sample`
        (same options), differentiable in ``x`` and ``sigmas``."""
        raise ValueError(f"sampler {self.name} has no differentiable solve; these have one: "
                         f"{', '.join(differentiable_samplers())}")

    def sample(self, denoiser: Callable, shape: tuple[int, ...], steps: int, noise: NoiseStream,
               callback: Callable | None = None, trajectory: bool = False, x_init: Tensor | None = None) -> SampleOutput:
        """Draw ``shape[0]`` samples. The initial state is ``sigmas[0] * noise.initial(shape)`` unless ``x_init``
        (already scaled) is given. ``trajectory=True`` keeps every state (memory grows with steps)."""
        if steps < self.min_steps:
            raise ValueError(f"{self.name} needs at least {self.min_steps} steps, got {steps}")
        correction = self.correction if self.correction is not None else getattr(self.schedule, "correction", None)
        D = NFECounter(corrected(denoiser, correction))
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


class SingleStepSampler(Sampler):
    """A sampler whose step ``k`` is a function of ``(x_k, sigma_k, sigma_{k+1})`` and fresh noise alone: an optional
    churn move (EDM Algorithm 2 lines 5-6: :meth:`churn`, with the per-step rule :meth:`churn_schedule`) followed
    by :meth:`step`. ``sample`` runs the same single-step functions of ``solvers.py`` as :meth:`step`.

    Class attributes: ``supports_churn`` (a churn move may precede the step: the MDP's churn knob),
    ``is_ancestral`` (the step is the ancestral / DDIM Gaussian move a transition policy replaces),
    ``S_noise`` (the churn noise's inflation)."""

    single_step = True
    supports_churn = True
    is_ancestral = False
    S_noise = 1.0

    @property
    def step_draws_noise(self) -> bool:
        """Whether :meth:`step` itself draws noise (the churn move aside)."""
        return False

    def churn_schedule(self, sigmas: Tensor) -> Tensor:
        """The churn ``gamma_k`` this sampler applies before each step of the schedule ``sigmas`` ([N + 1]); [N],
        in ``sigmas``' dtype. None by default (zeros)."""
        return torch.zeros(len(sigmas) - 1, dtype=sigmas.dtype, device=sigmas.device)

    def churn(self, x: Tensor, sigma, gamma, eps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The churn move ``sigma_hat = sigma (1 + gamma)``, ``x_hat = x + sqrt(sigma_hat^2 - sigma^2) S_noise eps``
        (``x``, ``eps``: [B, *shape]; ``sigma``, ``gamma``: scalars or [B]). Returns ``(x_hat, sigma_hat [B],
        std [B])``."""
        return solvers.churn(x, sigma, gamma, eps, self.S_noise)

    def step(self, D, x: Tensor, sigma, sigma_next, noise: NoiseFn | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """One step from ``x`` ([B, *shape]) at ``sigma`` to ``sigma_next`` (scalars or [B]). ``noise(like)`` gives
        the step's standard normal draw (only called when :attr:`step_draws_noise`). Returns ``(x_next, denoised,
        nfe)``: the next state, the denoised estimate at ``(x, sigma)`` and the denoiser evaluations spent by each
        sample ([B], x's dtype)."""
        raise NotImplementedError  # pragma: no cover


class Euler(SingleStepSampler):
    name = "euler"

    def step(self, D, x, sigma, sigma_next, noise=None):
        sigma, sigma_next = batch_sigma(sigma, x), batch_sigma(sigma_next, x)
        x_next, denoised = solvers.euler_step(D, x, sigma, sigma_next)
        return x_next, denoised, torch.ones_like(sigma)

    def _solve(self, D, x, sigmas, noise, callback):
        return solvers.sample_euler(D, x, sigmas, callback=callback)

    def solve_differentiable(self, D, x, sigmas):
        return solvers.solve_euler(D, x, sigmas)


def _heun_step(D, x: Tensor, sigma, sigma_next) -> tuple[Tensor, Tensor, Tensor]:
    """Heun's step with its per-sample NFE: 2, or 1 where ``sigma_next`` is 0 (no correction)."""
    sigma, sigma_next = batch_sigma(sigma, x), batch_sigma(sigma_next, x)
    x_next, denoised = solvers.heun_step(D, x, sigma, sigma_next)
    return x_next, denoised, 1.0 + (sigma_next > 0).to(sigma.dtype)


class Heun(SingleStepSampler):
    name = "heun"
    nfe_per_step, nfe_offset = 2, -1

    def step(self, D, x, sigma, sigma_next, noise=None):
        return _heun_step(D, x, sigma, sigma_next)

    def _solve(self, D, x, sigmas, noise, callback):
        return solvers.sample_heun(D, x, sigmas, callback=callback)

    def solve_differentiable(self, D, x, sigmas):
        return solvers.solve_heun(D, x, sigmas)


class Ancestral(SingleStepSampler):
    """DDPM (eta 1 on the discrete VP schedule), DDIM(eta), Euler-ancestral (Karras schedule): one update."""

    name = "ancestral"
    supports_churn = False
    is_ancestral = True

    def __init__(self, schedule: Schedule | None = None, eta: float = 1.0):
        super().__init__(schedule)
        if eta < 0:
            raise ValueError(f"sampler.eta must be >= 0, got {eta}")
        self.eta = float(eta)
        self.stochastic = self.eta > 0

    @property
    def step_draws_noise(self) -> bool:
        return self.eta > 0  # eta = 0 (DDIM): sigma_up = 0, nothing to draw

    def step(self, D, x, sigma, sigma_next, noise=None):
        sigma, sigma_next = batch_sigma(sigma, x), batch_sigma(sigma_next, x)
        if self.step_draws_noise:
            if noise is None:
                raise ValueError(f"{self.name} with eta={self.eta} draws noise at every step: pass noise")
            eps = noise(x)
        else:
            eps = torch.zeros_like(x)
        x_next, denoised, _, _ = solvers.ancestral_step(D, x, sigma, sigma_next, eps, self.eta)
        return x_next, denoised, torch.ones_like(sigma)

    def _solve(self, D, x, sigmas, noise, callback):
        return solvers.sample_ancestral(D, x, sigmas, noise, eta=self.eta, callback=callback)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eta={self.eta}, schedule={self.schedule!r})"


class EDMStochastic(SingleStepSampler):
    """EDM Algorithm 2 (stochastic Heun with churn): the churn move of :meth:`churn_schedule`, then Heun's step."""

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

    def churn_schedule(self, sigmas: Tensor) -> Tensor:
        """EDM's rule: ``gamma_k = min(S_churn / N, sqrt(2) - 1)`` for ``S_tmin <= sigma_k <= S_tmax``, else 0."""
        return solvers.edm_gammas(sigmas, self.S_churn, self.S_tmin, self.S_tmax)

    def step(self, D, x, sigma, sigma_next, noise=None):
        return _heun_step(D, x, sigma, sigma_next)

    def _solve(self, D, x, sigmas, noise, callback):
        return solvers.sample_edm_sde(D, x, sigmas, noise, gammas=self.churn_schedule(sigmas), S_noise=self.S_noise,
                                      callback=callback)


class DPMpp2M(Sampler):
    name = "dpmpp_2m"

    def _solve(self, D, x, sigmas, noise, callback):
        return solvers.sample_dpmpp_2m(D, x, sigmas, callback=callback)

    def solve_differentiable(self, D, x, sigmas):
        return solvers.solve_dpmpp_2m(D, x, sigmas)


class IPNDM(Sampler):
    """iPNDM (docs/method.md section 9): fixed-step Adams–Bashforth in sigma on ``d = (x - D) / sigma``, orders 1, 2,
    3 then ``max_order`` (4), with the fixed-step weights (as GITS and AMED's iPNDM) or, with ``variable_step``,
    the weights of the Lagrange interpolant on the actual sigmas. ``afs`` (analytic first step) replaces the first
    evaluation, at sigma_max, by ``data_mean``: it saves one NFE (planned NFE = steps - 1, and at least 2 steps)."""

    name = "ipndm"

    def __init__(self, schedule: Schedule | None = None, max_order: int = 4, afs: bool = False,
                 data_mean: float = 0.0, variable_step: bool = False):
        super().__init__(schedule)
        if not 1 <= int(max_order) <= len(solvers.IPNDM_COEFFS):
            raise ValueError(f"ipndm max_order must be in 1..{len(solvers.IPNDM_COEFFS)}, got {max_order}")
        self.max_order, self.afs, self.data_mean = int(max_order), bool(afs), float(data_mean)
        self.variable_step = bool(variable_step)
        self.nfe_offset = -1 if self.afs else 0
        self.min_steps = 2 if self.afs else 1

    def _solve(self, D, x, sigmas, noise, callback):
        return solvers.sample_ipndm(D, x, sigmas, max_order=self.max_order, afs=self.afs, data_mean=self.data_mean,
                                    variable_step=self.variable_step, callback=callback)

    def solve_differentiable(self, D, x, sigmas):
        return solvers.solve_ipndm(D, x, sigmas, max_order=self.max_order, afs=self.afs, data_mean=self.data_mean,
                                   variable_step=self.variable_step)

    def __repr__(self) -> str:
        return (f"IPNDM(max_order={self.max_order}, afs={self.afs}, variable_step={self.variable_step}, "
                f"schedule={self.schedule!r})")


class DPMpp3M(Sampler):
    """DPM-Solver++(3M) (docs/method.md section 9), with diffusers' ``lower_order_final`` rule (below 15 steps the
    last two steps use orders 2 and 1) and a first-order final step to sigma 0."""

    name = "dpmpp_3m"

    def __init__(self, schedule: Schedule | None = None, lower_order_final: bool = True):
        super().__init__(schedule)
        self.lower_order_final = bool(lower_order_final)

    def _solve(self, D, x, sigmas, noise, callback):
        return solvers.sample_dpmpp_3m(D, x, sigmas, lower_order_final=self.lower_order_final, callback=callback)

    def solve_differentiable(self, D, x, sigmas):
        return solvers.solve_dpmpp_3m(D, x, sigmas, lower_order_final=self.lower_order_final)


class UniPC(Sampler):
    """UniPC, bh2 variant on the data prediction (docs/method.md section 9): predictor UniP-p and corrector UniC-p,
    the corrector reusing the next evaluation (1 NFE per step, no corrector after the last step). ``order`` is
    diffusers' ``solver_order``; ``lower_order_final`` caps the order at ``steps - i`` as diffusers does."""

    name = "unipc"

    def __init__(self, schedule: Schedule | None = None, order: int = 3, lower_order_final: bool = True):
        super().__init__(schedule)
        if int(order) < 1:
            raise ValueError(f"unipc order must be >= 1, got {order}")
        self.order, self.lower_order_final = int(order), bool(lower_order_final)

    def _solve(self, D, x, sigmas, noise, callback):
        return solvers.sample_unipc(D, x, sigmas, order=self.order, lower_order_final=self.lower_order_final,
                                    callback=callback)

    def solve_differentiable(self, D, x, sigmas):
        return solvers.solve_unipc(D, x, sigmas, order=self.order, lower_order_final=self.lower_order_final)

    def __repr__(self) -> str:
        return f"UniPC(order={self.order}, schedule={self.schedule!r})"


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


def _has_differentiable_solve(cls: type) -> bool:
    return cls.solve_differentiable is not Sampler.solve_differentiable


def differentiable_samplers() -> list[str]:
    """The names of the samplers with a differentiable solve (the ones LD3 and the pathwise tuner can tune)."""
    names, todo = set(), [Sampler]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if _has_differentiable_solve(cls):
            names.add(cls.name)
    return sorted(names)
