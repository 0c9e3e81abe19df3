"""``python -m diffusion_irl.baselines``: the schedule-tuner and training-free baselines in one table, with costs.

For every solver of ``baselines.solvers`` and every budget of ``baselines.nfe``: the solver on its default
schedule, the solver on each tuner's schedule (``<solver>_<tuner>``; tuners from ``conf/tuners/``), the
training-free samplers of ``baselines.training_free`` on their own schedules, each solver at
``baselines.large_nfe``, and the ``reference`` row (two independent real samples: the metric's floor). Same seeds
and held-out data for every row; the tuners never see held-out data. Writes in the run directory:

- ``results.csv`` / ``results.md`` (mean ± std over seeds, then the costs of every tuning: denoiser evaluations
  and wall time beside the held-out distance), ``quality_vs_nfe.png``;
- ``schedules/<row>_nfe<k>.json`` (each tuned schedule as data) and ``tuning.json`` (every tuning's record);
- ``plots/quality_vs_cost_nfe<k>.png``: quality against tuning cost, training-free rows at cost 0, with the floor;
- ``plots/precision_recall_nfe<k>.png``: every row in the precision / recall plane (the pathwise rows as stars, the
  reference as a square). With ``tuners=divergences`` (the pathwise tuner once per f-divergence, PR at several
  lambdas), one command shows where each divergence lands next to every baseline.
"""
from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from diffusion_irl.config import (ConfigError, build, exit_on_config_error, require, require_bool, require_int,
                                  require_int_list, require_str)
from diffusion_irl.evaluation import Evaluator, reference_for, scorer_for, summarise, write_outputs
from diffusion_irl.runs import (check_run_dir, compact_table, frozen_denoiser, output_dir, quiet_third_party,
                                report, warn_unread_additions)
from diffusion_irl.tuning.baselines import by_budget, costs_by_row, costs_table, impossible, tune_rows
from diffusion_irl.plots import plot_precision_recall
from diffusion_irl.tuning.compare import plot_costs

HUGE = 10**9


def check_baselines_config(cfg: DictConfig) -> None:
    require_int(cfg, "seed", min=0, max=2**32 - 1)
    require_bool(cfg, "overwrite")
    require_str(cfg, "device")
    b = cfg.baselines
    for key, pool in (("solvers", "samplers"), ("training_free", "samplers"), ("tuners", "tuners")):
        names = list(b.get(key) or [])
        unknown = [n for n in names if n not in cfg.get(pool, {})]
        require(not unknown, f"baselines.{key} names unknown {pool} {unknown}; known: {sorted(cfg.get(pool, {}))}")
    require(len(b.solvers) > 0, "baselines.solvers is empty: name at least one solver to tune")
    require_int_list(cfg, "baselines.nfe", min=1, max=100_000)
    if b.large_nfe is not None:
        require_int(cfg, "baselines.large_nfe", min=1, max=100_000)
    for key in ("num_samples", "num_heldout", "mmd_points"):
        require_int(cfg, f"baselines.{key}", min=2, max=HUGE)
    require_int_list(cfg, "baselines.seeds", min=0, max=2**63 - 1)
    require_int(cfg, "baselines.batch_size", min=1, max=HUGE)
    for key in ("reference", "progress", "skip_impossible"):
        require_bool(cfg, f"baselines.{key}")
    require_str(cfg, "baselines.feature_cache", optional=True)
    require_str(cfg, "baselines.inception_weights", optional=True)


def run(cfg: DictConfig) -> dict:
    """Compose -> check -> tune every (solver, budget, tuner) -> evaluate every row -> write."""
    check_baselines_config(cfg)
    quiet_third_party()
    warn_unread_additions(cfg)
    b = cfg.baselines
    datamodule = build(cfg, "data")
    solvers = {name: build(cfg, f"samplers.{name}") for name in b.solvers}
    training_free = {name: build(cfg, f"samplers.{name}") for name in b.training_free or []}
    tuners = {name: build(cfg, f"tuners.{name}") for name in b.tuners or []}
    nfes = sorted(set(b.nfe))
    problems = list(impossible(tuners, solvers, nfes).values())
    if problems and not b.skip_impossible:
        raise ConfigError(f"{problems[0]}" + (f" (and {len(problems) - 1} more; baselines.skip_impossible=true "
                                              "skips them)" if len(problems) > 1 else ""))
    out = output_dir()
    check_run_dir(out, overwrite=cfg.overwrite, markers=("results.csv",))
    denoiser, device = frozen_denoiser(cfg, datamodule)
    torch.manual_seed(cfg.seed)

    tuned = tune_rows(tuners, solvers, nfes, denoiser, datamodule, cfg.seed, device, out,
                      skip_impossible=bool(b.skip_impossible), progress=bool(b.progress))
    score = scorer_for(datamodule, b.num_heldout, b.feature_cache, b.inception_weights, mmd_points=b.mmd_points)

    def evaluator(samplers, budgets, reference=None):
        return Evaluator(samplers=samplers, nfe=budgets, num_samples=b.num_samples, seeds=list(b.seeds), score=score,
                         reference=reference, batch_size=b.batch_size, device=str(device), progress=bool(b.progress))

    untuned = {**solvers, **training_free}
    rows = evaluator(untuned, nfes, reference_for(datamodule) if b.reference else None).run(denoiser, datamodule.shape)
    for nfe, samplers in by_budget(tuned).items():
        rows += evaluator(samplers, [nfe]).run(denoiser, datamodule.shape)
    if b.large_nfe is not None:
        rows += evaluator(solvers, [int(b.large_nfe)]).run(denoiser, datamodule.shape)

    order = [name for solver in solvers for name in [solver] + [f"{solver}_{t}" for t in tuners]] + list(training_free)
    title = (f"{datamodule.name}, denoiser={cfg.denoiser.get('_target_', '?').rsplit('.', 1)[-1]}: schedule tuners "
             f"and training-free solvers at NFE {nfes}, {b.num_samples} samples, seeds {list(b.seeds)}")
    paths = write_outputs(rows, out, title=title, sampler_order=order)
    summary = summarise(rows)
    with open(paths["md"], "a") as f:
        f.write("\n## Costs of the tuned rows\n\nSelected on the training split (the grid's points, GITS's "
                "coefficient), matched to the denoiser's own ODE (GITS's paths, LD3) or trained against the "
                "training split (pathwise), tuning seed "
                f"{cfg.seed}; distances on held-out data.\n\n"
                + costs_table(tuned, summary))
    plots = []
    ours = [f"{solver}_{t}" for solver in solvers for t in tuners if tuners[t].name == "pathwise"]
    for nfe in nfes:
        plots.append(plot_costs(costs_by_row(tuned, nfe), summary, nfe, out / "plots" / f"quality_vs_cost_nfe{nfe}.png"))
        pr = precision_recall_plot(summary, nfe, out / "plots" / f"precision_recall_nfe{nfe}.png", ours)
        plots += [pr] if pr is not None else []
    report(f"{title}\n{compact_table(summary, order)}\ncosts:\n{costs_table(tuned, summary)}full table: "
           f"{paths['md']}; schedules in {out / 'schedules'}; everything is in {out}")
    return {"rows": rows, "tuned": tuned, "paths": paths, "summary": summary, "plots": plots}


def precision_recall_plot(summary, nfe: int, path: Path, highlight) -> Path | None:
    """``plots/precision_recall_nfe<k>.png``: every row at ``nfe`` (and the reference) in the precision / recall
    plane; None when the metrics have no precision and recall."""
    points = {}
    for (name, row_nfe), cells in summary.items():
        if row_nfe in (nfe, 0) and "precision" in cells and "recall" in cells:
            points[name] = (cells["recall"][0], cells["recall"][1], cells["precision"][0], cells["precision"][1])
    if not points:
        return None
    return plot_precision_recall(points, path, highlight, title=f"{nfe} NFE")


@hydra.main(version_base="1.3", config_path="../../conf", config_name="baselines")
@exit_on_config_error
def main(cfg: DictConfig):
    run(cfg)


if __name__ == "__main__":
    main()
