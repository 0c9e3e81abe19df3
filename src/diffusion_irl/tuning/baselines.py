"""The schedule-tuner baselines (docs/method.md section 9): every tuner on every solver at every NFE budget, as
rows of one comparison, with the cost of each tuning beside its quality.

A tuned row is the solver run on the schedule its tuner produced for that budget, named ``<solver>_<tuner>``
(``euler_grid``, ``ipndm_gits``, ...). Its schedule is data (:class:`SigmaSchedule`), so it serves exactly one step
count: an evaluator runs it at that budget only. Tuning never sees held-out data; the rows are scored on it like
every other row, with the same seeds.

Used by ``python -m diffusion_irl.baselines`` (the table alone) and by the training run's comparison
(``tuning/compare.py``: the base sampler on each tuned schedule, beside the trained policy).
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffusion_irl.runs import report
from diffusion_irl.sampling.correction import with_correction
from diffusion_irl.sampling.samplers import Sampler
from diffusion_irl.sampling.schedules import SigmaSchedule
from diffusion_irl.tuning.grid import write_grid_csv
from diffusion_irl.tuning.tuners import Tuner, TuningResult, with_schedule


@dataclass
class TunedRow:
    """One solver on one tuner's schedule for one budget."""

    name: str           # <solver>_<tuner>
    solver: str         # the solver's row name (its key under ``samplers:``)
    tuner: str
    nfe: int            # the budget it was tuned for
    sampler: Sampler    # the solver on the tuned schedule
    result: TuningResult


def row_name(solver: str, tuner: str) -> str:
    return f"{solver}_{tuner}"


def impossible(tuners: Mapping[str, Tuner], solvers: Mapping[str, Sampler],
               nfes: Sequence[int]) -> dict[tuple[int, str, str], str]:
    """``{(nfe, solver, tuner): reason}`` for every combination that cannot be tuned (checked before any compute);
    each reason names its combination."""
    problems = {}
    for nfe in nfes:
        for solver, sampler in solvers.items():
            for name, tuner in tuners.items():
                try:
                    tuner.check(sampler, nfe)
                except ValueError as exc:
                    problems[(nfe, solver, name)] = f"tuner {name} for {solver} at {nfe} NFE: {exc}"
    return problems


def tune_rows(tuners: Mapping[str, Tuner], solvers: Mapping[str, Sampler], nfes: Sequence[int], denoiser,
              datamodule, seed: int = 0, device: torch.device | str = "cpu", out: Path | None = None,
              skip_impossible: bool = False, progress: bool = True) -> list[TunedRow]:
    """Tune every solver at every budget with every tuner. ``out``: write ``schedules/<row>_nfe<k>.json`` (for the
    grid ``schedules/<row>_nfe<k>_grid.csv``, for LD3 and pathwise ``<row>_nfe<k>_history.csv``, the per-iteration
    curves) and one ``tuning.json`` holding every result's record. A
    combination a tuner cannot meet is a ``ValueError`` naming all of them, or is skipped (and reported) with
    ``skip_impossible``."""
    problems = impossible(tuners, solvers, nfes)
    if problems and not skip_impossible:
        raise ValueError("; ".join(problems.values()))
    for line in problems.values():
        report(f"skipped: {line}")
    plan = [(nfe, solver, name) for nfe in nfes for solver in solvers for name in tuners
            if (nfe, solver, name) not in problems]
    rows = []
    for nfe, solver, name in tqdm(plan, desc="tune", disable=not progress or not plan, dynamic_ncols=True):
        result = tuners[name].tune(solvers[solver], denoiser, datamodule, nfe, seed, device)
        schedule = SigmaSchedule(sigmas=[float(s) for s in result.sigmas])
        sampler = with_correction(with_schedule(solvers[solver], schedule), result.correction)  # None: D alone
        rows.append(TunedRow(row_name(solver, name), solver, name, int(nfe), sampler, result))
        report(f"{name} for {solver} at {nfe} NFE: sigmas [{', '.join(f'{float(s):.4g}' for s in result.sigmas)}], "
               f"{result.cost_nfe:.3g} denoiser evaluations, {result.wall_seconds:.1f} s")
    if out is not None:
        write_tuned(rows, Path(out))
    return rows


def write_tuned(rows: Sequence[TunedRow], out: Path) -> Path:
    """``<out>/schedules/<row>_nfe<k>.json`` for each row (readable by ``schedule=sigmas``) and ``<out>/tuning.json``
    (every record); returns the path of ``tuning.json``."""
    folder = out / "schedules"
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for row in rows:
        stem = f"{row.name}_nfe{row.nfe}"
        row.result.write_schedule(folder / f"{stem}.json")
        if "points" in row.result.details:
            write_grid_csv(row.result.details["points"], row.result.details["metric"], folder / f"{stem}_grid.csv")
        row.result.write_history(folder / f"{stem}_history.csv")
        records.append({"row": row.name, "schedule": f"schedules/{stem}.json", **row.result.record()})
    path = out / "tuning.json"
    path.write_text(json.dumps(records, indent=2) + "\n")
    return path


def by_budget(rows: Sequence[TunedRow]) -> dict[int, dict[str, Sampler]]:
    """``{nfe: {row name: sampler}}``: the tuned rows to evaluate at each budget."""
    out: dict[int, dict[str, Sampler]] = {}
    for row in rows:
        out.setdefault(row.nfe, {})[row.name] = row.sampler
    return out


def distance(cells: Mapping[str, tuple[float, float, int]]) -> tuple[str, float, float]:
    """``(metric, mean, std)`` of a summary cell's distance: MMD², else FD, else FID."""
    for metric in ("mmd", "fd", "fid"):
        if metric in cells:
            return metric, cells[metric][0], cells[metric][1]
    return "?", float("nan"), float("nan")


def costs_table(rows: Sequence[TunedRow], summary: Mapping, extra: Mapping[tuple[str, int], tuple[float, float | None]]
                = ()) -> str:
    """Markdown: one line per tuned row (and per ``extra`` entry ``(row, nfe) -> (cost, seconds)``, e.g. the RL
    training): the budget, the tuning cost in denoiser evaluations and wall time, and the held-out distance."""
    lines = ["| row | NFE | tuning cost (denoiser evaluations) | tuning wall time | held-out distance |",
             "|---|---|---|---|---|"]
    entries = [((row.name, row.nfe), (float(row.result.cost_nfe), row.result.wall_seconds)) for row in rows]
    entries += list(dict(extra).items())
    for (name, nfe), (cost, seconds) in entries:
        used = [key for key in summary if key[0] == name and key[1] <= nfe]
        metric, mean, std = distance(summary[max(used, key=lambda k: k[1])]) if used else ("?", float("nan"), 0.0)
        wall = f"{seconds:.1f} s" if seconds is not None else "–"
        lines.append(f"| {name} | {nfe} | {cost:.3g} | {wall} | {metric} {mean:.4g} ± {std:.2g} |")
    return "\n".join(lines) + "\n"


def costs_by_row(rows: Sequence[TunedRow], nfe: int) -> dict[str, tuple[float, float]]:
    """``{row name: (cost, seconds)}`` of the rows tuned for ``nfe`` (for ``compare.plot_costs``)."""
    return {row.name: (float(row.result.cost_nfe), row.result.wall_seconds) for row in rows if row.nfe == nfe}
