"""One table over several baselines runs that differ only in their tuning seed (``seed=0,1,2``).

A single baselines run reports mean ± std over its *evaluation* seeds, for one tuning seed. Whether a tuned row is
ahead of another also depends on the tuning seed (a tuner is a randomised algorithm), so the rows of a claim are
reported over tuning seeds: each run's row is first averaged over its evaluation seeds, then the table gives the mean
± std of those per-run values over the runs that hold the row (``runs``). Training-free rows (the same in every run)
are then reported over their evaluation seeds, as in one run, since their runs agree to the last digit. Tuning costs
are the mean over the runs (``tuning.json``).

    python -m diffusion_irl.aggregate outputs/bl_seed0 outputs/bl_seed1 outputs/bl_seed2 [--metrics mmd precision
        recall] [--out table.md]

Rows are written with ``mean ± std (runs)``; a row whose gap to the best other row at its NFE exceeds two of the
larger of the two stds is marked ``*``.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from diffusion_irl.evaluation import LOWER_IS_BETTER, read_csv


def _read_csv(run: Path) -> dict[tuple[str, int, str], list[float]]:
    path = run / "results.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{run} holds no results.csv: is it a baselines run directory?")
    values: dict[tuple[str, int, str], list[float]] = defaultdict(list)
    for row in read_csv(path):
        values[(row.sampler, row.nfe, row.metric)].append(row.value)
    return values


def _read_costs(run: Path) -> dict[tuple[str, int], float]:
    path = run / "tuning.json"
    if not path.is_file():
        return {}
    return {(r["row"], int(r["nfe"])): float(r["cost_nfe"]) for r in json.loads(path.read_text())}


def _std(xs: Sequence[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def aggregate(runs: Sequence[str | Path], metrics: Sequence[str] | None = None) -> tuple[list[dict], list[str]]:
    """``(rows, metrics)`` over ``runs``: each row ``{"row", "nfe", "runs", "cost", <metric>: (mean, std)}``, in
    first-seen order; ``metrics`` defaults to mmd or fd, then precision and recall, whichever the runs hold.

    A row held by several runs whose per-run means differ (a tuned row) gets mean ± std over the runs; a row whose
    runs agree (training-free) gets mean ± std over the first run's evaluation seeds."""
    if not runs:
        raise ValueError("aggregate: give at least one run directory")
    tables = [_read_csv(Path(r)) for r in runs]
    costs = [_read_costs(Path(r)) for r in runs]
    if metrics is None:
        held = {m for t in tables for (_, _, m) in t}
        metrics = [m for m in ("mmd", "fd", "precision", "recall") if m in held]
    order: list[tuple[str, int]] = []
    for table in tables:
        for sampler, nfe, _ in table:
            if (sampler, nfe) not in order:
                order.append((sampler, nfe))
    out = []
    for sampler, nfe in order:
        row: dict = {"row": sampler, "nfe": nfe}
        holders = [t for t in tables if any((sampler, nfe, m) in t for m in metrics)]
        row["runs"] = len(holders)
        for metric in metrics:
            per_run = [statistics.fmean(t[(sampler, nfe, metric)]) for t in holders if (sampler, nfe, metric) in t]
            if not per_run:
                continue
            if len(per_run) > 1 and max(per_run) - min(per_run) > 1e-12 * max(1.0, abs(per_run[0])):
                row[metric] = (statistics.fmean(per_run), _std(per_run))
                row["over"] = "tuning seeds"
            else:
                first = next(t[(sampler, nfe, metric)] for t in holders if (sampler, nfe, metric) in t)
                row[metric] = (statistics.fmean(first), _std(first))
                row.setdefault("over", "evaluation seeds")
        spent = [c[(sampler, nfe)] for c in costs if (sampler, nfe) in c]
        row["cost"] = statistics.fmean(spent) if spent else None
        out.append(row)
    return out, list(metrics)


def _ahead(rows: list[dict], metric: str) -> set[tuple[str, int]]:
    """Rows ahead of every other non-reference row at their NFE by more than two (larger) standard deviations."""
    sign = 1.0 if metric in LOWER_IS_BETTER else -1.0
    marked = set()
    for row in rows:
        if metric not in row or row["row"] == "reference":
            continue
        mean, std = row[metric]
        others = [r for r in rows if r is not row and r["nfe"] == row["nfe"] and metric in r and r["row"] != "reference"]
        if others and all(sign * (o[metric][0] - mean) > 2 * max(std, o[metric][1]) for o in others):
            marked.add((row["row"], row["nfe"]))
    return marked


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def markdown(rows: list[dict], metrics: Sequence[str]) -> str:
    ahead = _ahead(rows, metrics[0]) if metrics else set()
    head = ["row", "NFE", *metrics, "over", "tuning cost (denoiser evaluations)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["row"] + (" *" if (row["row"], row["nfe"]) in ahead else ""), str(row["nfe"]) if row["nfe"] else "–"]
        for metric in metrics:
            cells.append(f"{_fmt(row[metric][0])} ± {row[metric][1]:.2g}" if metric in row else "")
        over = row.get("over", "")
        cells.append(f"{row['runs']} {over}" if over == "tuning seeds" else over)
        cells.append("" if row["cost"] is None or math.isnan(row["cost"]) else f"{row['cost']:.3g}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"`*`: ahead of every other row at its NFE by more than two standard deviations in {metrics[0]}.")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffusion_irl.aggregate", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="baselines run directories (one per tuning seed)")
    parser.add_argument("--metrics", nargs="+", default=None,
                        help="metrics (default: mmd or fd, then precision and recall, whichever the runs hold)")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    table = markdown(*aggregate(args.runs, args.metrics))
    print(table, end="")
    if args.out:
        Path(args.out).write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
