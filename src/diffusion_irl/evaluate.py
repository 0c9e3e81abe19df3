"""``python -m diffusion_irl.evaluate``: every sampler at every NFE budget on one denoiser, same seeds.

Writes ``results.csv`` (long form: sampler,nfe,seed,metric,value), ``results.md`` (mean ± std over seeds) and
``quality_vs_nfe.png`` in the Hydra run directory, prints the table, and logs to W&B when ``logger=wandb``.
"""
from __future__ import annotations

import logging

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from diffusion_irl.config import (ConfigError, build, exit_on_config_error, require, require_bool, require_choice,
                                  require_int, require_int_list, require_str)
from diffusion_irl.denoisers.module import check_network_shape
from diffusion_irl.evaluation import Evaluator, reference_for, resolve_processes, scorer_for, summarise, write_outputs
from diffusion_irl.runs import (build_logger, check_run_dir, check_shapes, compact_table,
                                log_results, output_dir, quiet_third_party, report, warn_unread_additions)

log = logging.getLogger(__name__)


HUGE = 10**9


def check_evaluate_config(cfg: DictConfig) -> None:
    """Type and range checks of every ``evaluate.*`` and run-level key, before any compute."""
    require_int(cfg, "seed", min=0, max=2**32 - 1)
    require_bool(cfg, "overwrite")
    require_str(cfg, "device")
    ev = cfg.evaluate
    names = list(ev.samplers)
    require(len(names) > 0, "evaluate.samplers is empty: name at least one sampler")
    unknown = [n for n in names if n not in cfg.samplers]
    require(not unknown, f"evaluate.samplers names unknown sampler(s) {unknown}; known: {sorted(cfg.samplers)}")
    require_int_list(cfg, "evaluate.nfe", min=1, max=100_000)
    require_int(cfg, "evaluate.num_samples", min=2, max=HUGE)
    require_int(cfg, "evaluate.num_heldout", min=2, max=HUGE)
    require_int_list(cfg, "evaluate.seeds", min=0, max=2**63 - 1)
    require_int(cfg, "evaluate.batch_size", min=1, max=HUGE)
    for key in ("reference", "progress"):
        require_bool(cfg, f"evaluate.{key}")
    require_str(cfg, "evaluate.feature_cache", optional=True)
    check_fid_config(cfg, "evaluate")
    processes = OmegaConf.select(cfg, "evaluate.processes")
    try:
        resolve_processes(processes, cfg.device)
    except ValueError:
        raise ConfigError(f"evaluate.processes: must be a positive integer or auto, got {processes!r}") from None
    try:
        check_network_shape(OmegaConf.select(cfg, "denoiser.net"), cfg.data.shape)
    except ValueError as exc:
        raise ConfigError(f"denoiser: {exc}") from None


def check_fid_config(cfg: DictConfig, node: str = "evaluate") -> None:
    """The FID keys of ``<node>``: the Inception weights file must exist, the reference statistics must be an
    ``.npz`` with ``mu`` [2048] and ``sigma`` [2048, 2048] (and need the weights), ``fid_only`` needs both, and
    FID needs image data (``data.shape`` of rank 3). Reads the ``.npz`` (no network is built)."""
    from diffusion_irl.metrics.fid import INCEPTION_FEATURES, FrechetStats, check_inception_weights

    weights = require_str(cfg, f"{node}.inception_weights", optional=True)
    reference = require_str(cfg, f"{node}.fid_reference", optional=True)
    require_choice(cfg, f"{node}.fid_split", ["heldout", "train"])
    fid_only = require_bool(cfg, f"{node}.fid_only")
    require_int(cfg, f"{node}.feature_batch_size", min=1, max=HUGE)
    if weights is not None:
        try:
            check_inception_weights(weights)
        except ValueError as exc:
            raise ConfigError(f"{node}.inception_weights: {exc}") from None
    if reference is not None or fid_only:
        require(reference is not None, f"{node}.fid_only=true needs {node}.fid_reference (stored statistics: no "
                                       "images are read)")
        require(weights is not None, f"{node}.fid_reference needs {node}.inception_weights (the features the "
                                     "statistics were computed in)")
        shape = OmegaConf.select(cfg, "data.shape")
        require(shape is None or len(shape) == 3, f"{node}.fid_reference: FID needs image data, but data.shape is "
                                                  f"{list(shape) if shape is not None else None}")
        try:
            FrechetStats.load(reference, INCEPTION_FEATURES)
        except ValueError as exc:
            raise ConfigError(f"{node}.fid_reference: {exc}") from None


def check_budgets(samplers: dict, budgets: list[int]) -> None:
    """At least one sampler must fit at least one budget (else only the reference row would come out), and a
    sampler on a schedule of fixed length (a tuned schedule) must fit one of the budgets."""
    for name, s in samplers.items():
        steps = s.fixed_steps
        if steps is not None and s.steps_for_budget(max(budgets)) is None:
            raise ConfigError(f"samplers.{name}: its schedule holds {steps} steps ({s.planned_nfe(steps)} NFE), more "
                              f"than every budget of evaluate.nfe={budgets}: tune it for one of these budgets")
    if any(s.steps_for_budget(b) is not None for s in samplers.values() for b in budgets):
        return
    minimum = ", ".join(f"{name} {s.planned_nfe(s.min_steps)}" for name, s in samplers.items())
    raise ConfigError(f"evaluate.nfe: every budget in {budgets} is below every sampler's fewest NFE "
                      f"({minimum}): raise evaluate.nfe")


def run(cfg: DictConfig):
    """Compose -> instantiate -> evaluate -> write. Returns the result rows."""
    check_evaluate_config(cfg)
    quiet_third_party()
    warn_unread_additions(cfg)
    datamodule = build(cfg, "data")
    samplers = {name: build(cfg, f"samplers.{name}") for name in cfg.evaluate.samplers}
    check_budgets(samplers, list(cfg.evaluate.nfe))
    check_run_dir(output_dir(), overwrite=cfg.overwrite, markers=("results.csv",))
    logger = build_logger(cfg) or None
    datamodule.prepare_data()  # as Lightning does before setup(): downloads when data.download=true
    denoiser = build(cfg, "denoiser")
    check_shapes(denoiser, datamodule)
    device = torch.device(cfg.device)
    if hasattr(denoiser, "to"):
        denoiser = denoiser.to(device).eval()
    torch.manual_seed(cfg.seed)

    ev = cfg.evaluate
    fid_net = None
    if ev.inception_weights is not None and len(datamodule.shape) == 3:
        from diffusion_irl.metrics.fid import InceptionFeatures

        try:
            fid_net = InceptionFeatures(ev.inception_weights)
        except ValueError as exc:
            raise ConfigError(f"evaluate.inception_weights: {exc}") from None
    reference = ev.reference
    if reference and ev.fid_only and datamodule.law is None:
        report("evaluate.fid_only=true: no `reference` row (it is a sample of the training split, and no images "
               "are read)")
        reference = False
    processes = resolve_processes(ev.processes, device)
    if processes > 1:
        report(f"sampling and feature extraction sharded over {processes} processes")
    evaluator = Evaluator(
        samplers=samplers, nfe=list(ev.nfe), num_samples=ev.num_samples, seeds=list(ev.seeds),
        score=scorer_for(datamodule, ev.num_heldout, ev.feature_cache, ev.inception_weights,
                         fid_reference=ev.fid_reference, fid_split=ev.fid_split, fid_only=ev.fid_only,
                         feature_network=fid_net, device=device, feature_batch_size=ev.feature_batch_size,
                         progress=ev.progress),
        reference=reference_for(datamodule) if reference else None,
        batch_size=ev.batch_size, device=str(device), progress=ev.progress, processes=processes,
    )
    rows = evaluator.run(denoiser, datamodule.shape)
    title = f"{datamodule.name}, denoiser={cfg.denoiser.get('_target_', '?').rsplit('.', 1)[-1]}, {ev.num_samples} samples, seeds {list(ev.seeds)}"
    paths = write_outputs(rows, output_dir(), title=title, sampler_order=list(samplers))
    report(f"{title}\n{compact_table(summarise(rows), list(samplers))}\nfull table: {paths['md']}; "
           f"everything is in {paths['csv'].parent}")
    if logger is not None:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        log_results(logger, paths["csv"], "evaluate", [paths["png"]])
        logger.experiment.finish()
    return rows


@hydra.main(version_base="1.3", config_path="../../conf", config_name="evaluate")
@exit_on_config_error
def main(cfg: DictConfig):
    run(cfg)


if __name__ == "__main__":
    main()
