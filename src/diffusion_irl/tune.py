"""``python -m diffusion_irl.tune``: tune one solver's schedule for one NFE budget (docs/method.md section 9).

``tuner=grid`` (the full Karras grid, selected on the training split), ``tuner=gits`` (GITS: dynamic programming
against a fine teacher) or ``tuner=ld3`` (LD3: a learned schedule matching a teacher from a slack ball). Writes in
the Hydra run directory:

- ``schedule.json``: the schedule as data (``{"sigmas": [...], "tuner", "solver", "nfe", "steps"}``), readable by
  ``SigmaSchedule`` (``conf/schedule/sigmas.yaml``);
- ``tuning.json``: tuner, solver, nfe, steps, sigmas, cost in denoiser evaluations, wall time, the tuner's settings
  (and for the grid the best point and its training-split score);
- ``grid.csv`` (grid only): every point's training-split score.
- ``history.csv`` (ld3, pathwise): the per-iteration curves (loss; pathwise also discriminator accuracy and logits,
  first level, gradient norm).

Evaluate the result as a row of the evaluator (held-out data)::

    python -m diffusion_irl.evaluate +sampler@samplers.euler_gits=euler \\
        schedule@samplers.euler_gits.schedule=sigmas samplers.euler_gits.schedule.path=<run dir>/schedule.json \\
        evaluate.nfe=[6] evaluate.samplers=[euler,euler_gits]

(in Python: :func:`diffusion_irl.tuning.tuners.load_tuned_sampler`).
"""
from __future__ import annotations

import json

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from diffusion_irl.config import ConfigError, build, exit_on_config_error, require
from diffusion_irl.runs import frozen_denoiser, output_dir, quiet_third_party, report
from diffusion_irl.tuning.grid import write_grid_csv
from diffusion_irl.tuning.tuners import TuningResult


def check_tune_config(cfg: DictConfig) -> None:
    nfe = cfg.get("nfe")
    require(isinstance(nfe, int) and not isinstance(nfe, bool) and nfe > 0,
            f"nfe must be a positive integer (the NFE budget), got {nfe}")
    require(bool(cfg.get("tuner")), "tuner is missing: pick tuner=grid, tuner=gits or tuner=ld3")
    for key in ("schedule", "tuning", "grid"):
        require(bool(cfg.out.get(key)), f"out.{key} must name a file")


def _choice(group: str, default: str) -> str:
    try:
        return HydraConfig.get().runtime.choices.get(group) or default
    except ValueError:  # outside @hydra.main
        return default


def evaluate_command(result: TuningResult, path) -> str:
    """The evaluator's command line that runs ``path`` as the row ``<sampler>_<tuner>``."""
    sampler = _choice("sampler@sampler", result.solver)
    row = f"{sampler}_{result.tuner}"
    return (f"python -m diffusion_irl.evaluate +sampler@samplers.{row}={sampler} "
            f"schedule@samplers.{row}.schedule=sigmas samplers.{row}.schedule.path={path} "
            f"evaluate.nfe=[{result.nfe}] evaluate.samplers=[{sampler},{row}]")


def write_results(cfg: DictConfig, result: TuningResult, data: str) -> dict:
    out = output_dir()
    out.mkdir(parents=True, exist_ok=True)
    paths = {key: out / cfg.out[key] for key in ("schedule", "tuning")}
    result.write_schedule(paths["schedule"])
    record = {**result.record(), "seed": cfg.seed, "data": data}
    paths["tuning"].write_text(json.dumps(record, indent=2) + "\n")
    if "points" in result.details:
        paths["grid"] = out / cfg.out.grid
        write_grid_csv(result.details["points"], result.details["metric"], paths["grid"])
    if result.write_history(out / cfg.out.history):
        paths["history"] = out / cfg.out.history
    return paths


def summary(result: TuningResult) -> str:
    line = (f"{result.tuner}: {result.solver} at {result.nfe} NFE ({result.steps} steps), sigmas "
            f"[{', '.join(f'{float(s):.4g}' for s in result.sigmas)}]; cost {result.cost_nfe:.4g} denoiser "
            f"evaluations, {result.wall_seconds:.1f} s")
    if "best" in result.details:
        best = ", ".join(f"{k} {v:g}" for k, v in result.details["best"].items())
        line += (f"; best of {result.details['num_points']} points: {best} ({result.details['metric']} "
                 f"{result.details['best_score']:.4g} on the training split)")
    return line


def run(cfg: DictConfig) -> TuningResult:
    """Compose -> check -> build -> tune -> write ``schedule.json`` / ``tuning.json`` (/ ``grid.csv``)."""
    check_tune_config(cfg)
    quiet_third_party()
    datamodule = build(cfg, "data")
    sampler, tuner = build(cfg, "sampler"), build(cfg, "tuner")
    try:
        tuner.check(sampler, cfg.nfe)
    except ValueError as exc:
        raise ConfigError(f"tuner={tuner.name}, nfe={cfg.nfe}: {exc}") from None
    denoiser, device = frozen_denoiser(cfg, datamodule)
    torch.manual_seed(cfg.seed)
    result = tuner.tune(sampler, denoiser, datamodule, cfg.nfe, cfg.seed, device)
    paths = write_results(cfg, result, datamodule.name)
    report(f"{summary(result)}\n-> {paths['schedule']}, {paths['tuning']}\nevaluate it with: "
           f"{evaluate_command(result, paths['schedule'])}")
    return result


@hydra.main(version_base="1.3", config_path="../../conf", config_name="tune")
@exit_on_config_error
def main(cfg: DictConfig):
    run(cfg)


if __name__ == "__main__":
    main()
