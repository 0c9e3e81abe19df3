"""python -m diffusion_irl.aggregate: rows over tuning seeds from several baselines run directories."""
from __future__ import annotations

import json
import statistics

import pytest

from diffusion_irl.aggregate import aggregate, main


def _run(path, rows: dict, costs: dict | None = None):
    """A baselines run directory: results.csv rows {(sampler, nfe): {metric: [per evaluation seed]}}."""
    path.mkdir()
    lines = ["sampler,nfe,seed,metric,value"]
    for (sampler, nfe), metrics in rows.items():
        for metric, values in metrics.items():
            lines += [f"{sampler},{nfe},{i},{metric},{v!r}" for i, v in enumerate(values)]
    (path / "results.csv").write_text("\n".join(lines) + "\n")
    (path / "tuning.json").write_text(json.dumps([{"row": r, "nfe": n, "cost_nfe": c} for (r, n), c in
                                                  (costs or {}).items()]))
    return path


def test_tuned_rows_are_over_tuning_seeds_and_training_free_rows_over_evaluation_seeds(tmp_path, capsys):
    base = {("euler", 6): {"mmd": [0.010, 0.012, 0.014]}, ("reference", 0): {"mmd": [0.0, 0.001, 0.002]}}
    runs = [_run(tmp_path / f"s{seed}", {**base, ("euler_pw", 6): {"mmd": [v + 0.001 * seed for v in (0.004, 0.005, 0.006)]}},
                 {("euler_pw", 6): 100.0 * (seed + 1)}) for seed in range(3)]
    _run(tmp_path / "grid_only", {("euler_grid", 6): {"mmd": [0.009, 0.009, 0.009]}})
    rows = {r["row"]: r for r in aggregate([*runs, tmp_path / "grid_only"], ["mmd"])[0]}
    pw = rows["euler_pw"]
    assert pw["runs"] == 3 and pw["over"] == "tuning seeds" and pw["cost"] == pytest.approx(200.0)
    per_run = [0.005, 0.006, 0.007]  # each run's mean over its evaluation seeds
    assert pw["mmd"] == pytest.approx((statistics.fmean(per_run), statistics.stdev(per_run)))
    # the same training-free row in every run: its spread over evaluation seeds, not a spurious 0
    assert rows["euler"]["over"] == "evaluation seeds"
    assert rows["euler"]["mmd"] == pytest.approx((0.012, 0.002))
    assert rows["euler_grid"]["runs"] == 1 and rows["euler_grid"]["mmd"][1] == 0.0
    assert main([str(r) for r in runs] + ["--out", str(tmp_path / "t.md")]) == 0
    table = capsys.readouterr().out
    assert (tmp_path / "t.md").read_text() == table
    line = next(l for l in table.splitlines() if l.startswith("| euler_pw"))
    assert "*" in line.split("|")[1]  # 0.006 ± 0.001 is ahead of euler's 0.012 ± 0.002 by more than 2 std
    assert "3 tuning seeds" in line


def test_a_gain_within_two_standard_deviations_is_not_marked(tmp_path, capsys):
    run = _run(tmp_path / "r", {("a", 6): {"mmd": [0.010, 0.012, 0.014]}, ("b", 6): {"mmd": [0.009, 0.011, 0.013]}})
    main([str(run)])
    assert "*" not in "".join(l.split("|")[1] for l in capsys.readouterr().out.splitlines() if l.startswith("| a")
                              or l.startswith("| b"))


def test_a_directory_that_is_no_baselines_run_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results.csv"):
        aggregate([tmp_path], ["mmd"])
