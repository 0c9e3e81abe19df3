"""What every schedule tuner shares (docs/method.md section 9, "Schedule tuners"): the :class:`TuningResult` record,
the cost counter, the budget check, initial noise and the sampler with a tuned schedule.

A tuner turns ``(sampler, NFE budget)`` into a schedule as data: ``N + 1`` strictly decreasing sigmas ending in 0,
``N = sampler.steps_for_budget(nfe)``. Its cost is counted, never estimated: every denoiser call goes through an
:class:`EvaluationCounter`, and ``cost_nfe`` is the number of *per-sample* denoiser evaluations (a batched call on
``B`` samples counts ``B``), the unit of ``compare.GridSearch`` and of the comparison's cost table. Held-out data
play no part in any tuner's selection (docs/method.md section 7).
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from diffusion_irl import seeding
from diffusion_irl.sampling.correction import correction_scale, save_correction
from diffusion_irl.sampling.noise import NoiseStream
from diffusion_irl.sampling.samplers import NFECounter, Sampler
from diffusion_irl.sampling.schedules import Schedule, SigmaSchedule, check_sigmas, write_sigmas


class EvaluationCounter(NFECounter):
    """:class:`NFECounter` (``nfe``: batched calls) that also counts per-sample evaluations:
    ``evaluations = sum over calls of the batch size``."""

    def __init__(self, denoiser: Callable):
        super().__init__(denoiser)
        self.evaluations = 0

    def forward(self, x: Tensor, sigma: Tensor, *args, **kwargs) -> Tensor:
        self.evaluations += int(x.shape[0])
        return super().forward(x, sigma, *args, **kwargs)


@dataclass
class TuningResult:
    """One tuned schedule and what it cost.

    ``sigmas``: [steps + 1] float64, ending in 0. ``cost_nfe``: per-sample denoiser evaluations spent by the tuner
    (forward calls; the backward passes of LD3 and the pathwise tuner are not counted separately). ``denoiser_calls``: batched calls.
    ``settings``: the tuner's settings. ``details``: tuner-specific results (grid: best point, its training-split
    score and every point; gits: the path's levels and cost; ld3: the loss curve). ``correction``: a learned
    correction of the denoiser that goes with the schedule (pathwise with ``correction=true``), else None."""

    tuner: str
    solver: str
    nfe: int
    steps: int
    sigmas: Tensor
    cost_nfe: int
    wall_seconds: float
    denoiser_calls: int = 0
    settings: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    correction: nn.Module | None = None

    def record(self) -> dict:
        """The JSON record of ``tuning.json`` (``details`` without bulky per-point lists)."""
        details = {k: v for k, v in self.details.items() if k not in ("points", "losses", "history")}
        return {"tuner": self.tuner, "solver": self.solver, "nfe": self.nfe, "steps": self.steps,
                "sigmas": [float(s) for s in self.sigmas], "cost_nfe": self.cost_nfe,
                "denoiser_calls": self.denoiser_calls, "wall_seconds": self.wall_seconds,
                "settings": self.settings, **details, **self._correction_record()}

    def _correction_record(self) -> dict:
        if self.correction is None:
            return {}
        return {"correction_parameters": sum(p.numel() for p in self.correction.parameters()),
                "correction_scale": correction_scale(self.correction)}

    def history(self) -> dict[str, list[float]] | None:
        """The tuner's per-iteration curves (pathwise: loss, discriminator accuracy and logits, first level,
        gradient norm; LD3: loss), or None for tuners without iterations."""
        if "history" in self.details:
            return self.details["history"]
        return {"loss": self.details["losses"]} if "losses" in self.details else None

    def write_history(self, path: str | Path) -> bool:
        """``history.csv``: one line per iteration of :meth:`history` (nothing written, False, without one)."""
        history = self.history()
        if not history:
            return False
        keys = list(history)
        with open(path, "w") as f:
            f.write(",".join(["iteration", *keys]) + "\n")
            for i in range(max(len(v) for v in history.values())):
                cells = (f"{history[k][i]:.6g}" if i < len(history[k]) else "" for k in keys)
                f.write(",".join([str(i), *cells]) + "\n")
        return True

    def write_schedule(self, path: str | Path) -> None:
        """``schedule.json``: readable by :class:`SigmaSchedule` (``schedule.path=...``). With a correction, also
        ``<stem>_correction.pt`` beside it, named in the JSON's ``correction`` (:func:`load_tuned_sampler` reads
        both)."""
        meta = {"tuner": self.tuner, "solver": self.solver, "nfe": self.nfe, "steps": self.steps}
        if self.correction is not None:
            file = Path(path).with_name(f"{Path(path).stem}_correction.pt")
            save_correction(self.correction, file)
            meta["correction"] = file.name
        write_sigmas(self.sigmas, path, meta)


class Tuner:
    """Base class: ``tune(sampler, denoiser, datamodule, nfe, seed, device) -> TuningResult``.

    Subclasses set ``name`` and implement ``_tune(sampler, D, datamodule, steps, seed, device) -> (sigmas,
    details)`` where ``D`` is the counted denoiser, and may refine :meth:`check` (settings against the budget).
    Constructors validate their settings (``ValueError``) so that a bad config fails before any compute."""

    name = "tuner"

    def settings(self) -> dict:  # pragma: no cover - interface
        raise NotImplementedError

    def check(self, sampler: Sampler, nfe: int) -> int:
        """The solver's steps for the budget, or ``ValueError`` when it cannot meet it (before any compute)."""
        if int(nfe) != nfe or nfe <= 0:
            raise ValueError(f"nfe must be a positive integer, got {nfe}")
        steps = sampler.steps_for_budget(int(nfe))
        if steps is None:
            raise ValueError(f"sampler {sampler.name} cannot meet an NFE budget of {nfe}: its smallest plan needs "
                             f"{sampler.planned_nfe(sampler.min_steps)} NFE")
        if not hasattr(sampler, "schedule"):
            raise ValueError(f"sampler {sampler.name} has no schedule to tune")
        return steps

    def _tune(self, sampler: Sampler, D: EvaluationCounter, datamodule, steps: int, seed: int,
              device) -> tuple[Tensor, dict]:  # pragma: no cover - interface
        raise NotImplementedError

    def tune(self, sampler: Sampler, denoiser: Callable, datamodule, nfe: int, seed: int = 0,
             device: torch.device | str = "cpu") -> TuningResult:
        steps = self.check(sampler, nfe)
        D = EvaluationCounter(denoiser)
        start = time.perf_counter()
        sigmas, details = self._tune(sampler, D, datamodule, steps, seed, device)
        correction = details.pop("correction", None)
        seconds = time.perf_counter() - start
        sigmas = check_sigmas(sigmas.detach().double().cpu(), f"{self.name} schedule")
        if len(sigmas) != steps + 1:
            raise RuntimeError(f"{self.name} produced {len(sigmas) - 1} steps for a {steps}-step budget")
        return TuningResult(self.name, sampler.name, int(nfe), steps, sigmas, D.evaluations, seconds, D.nfe,
                            self.settings(), details, correction)


def with_schedule(sampler: Sampler, schedule: Schedule) -> Sampler:
    """A shallow copy of ``sampler`` that runs on ``schedule`` (the original is untouched)."""
    if not hasattr(sampler, "schedule"):
        raise ValueError(f"sampler {sampler.name} has no schedule to replace")
    out = copy.copy(sampler)
    out.schedule = schedule
    return out


def load_tuned_sampler(sampler: Sampler, path: str | Path) -> Sampler:
    """``sampler`` with its schedule replaced by ``SigmaSchedule(path=path)`` (a tuner's ``schedule.json``, with the
    correction it names, if any): the evaluator can run it as a row, at the budget it was tuned for."""
    return with_schedule(sampler, SigmaSchedule(path=str(path)))


def initial_noise(n: int, shape: Sequence[int], sigma_max: float, parts: Sequence[int | str],
                  device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """``(sigma_max * eps, seeds)``: ``eps ~ N(0, I)`` drawn per sample from ``seeds = seeding.sample_seeds(n,
    *parts)``. A class-conditional denoiser samples class ``seed mod num_classes`` from them
    (:func:`~diffusion_irl.sampling.samplers.seed_conditioned`), as in every row of the evaluator."""
    seeds = seeding.sample_seeds(n, *parts, device=device)
    return NoiseStream(device=device, seeds=seeds).initial((n, *shape)) * float(sigma_max), seeds


def positive_int(value, key: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value}")
    return int(value)


def sigma_range(sigma_min: float, sigma_max: float, key: str) -> tuple[float, float]:
    if not 0 < float(sigma_min) < float(sigma_max):
        raise ValueError(f"{key}: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    return float(sigma_min), float(sigma_max)
