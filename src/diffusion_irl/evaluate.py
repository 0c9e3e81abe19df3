"""``python -m diffusion_irl.evaluate``: every sampler at every NFE budget on one denoiser, same seeds.

Writes ``results.csv`` (long form: sampler,nfe,seed,metric,value), ``results.md`` (mean ± std over seeds) and
``quality_vs_nfe.png`` in the Hydra run directory, prints the table, and logs to W&B when ``logger=wandb``.
"""
from __future__ import annotations

import logging

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from diffusion_irl.config import build, exit_on_config_error, require
from diffusion_irl.evaluation import Evaluator, reference_for, scorer_for, summarise, write_outputs
from diffusion_irl.runs import check_shapes, compact_table, log_results, output_dir, quiet_third_party, report

log = logging.getLogger(__name__)


def check_evaluate_config(cfg: DictConfig) -> None:
    ev = cfg.evaluate
    names = list(ev.samplers)
    require(len(names) > 0, "evaluate.samplers is empty: name at least one sampler")
    unknown = [n for n in names if n not in cfg.samplers]
    require(not unknown, f"evaluate.samplers names unknown sampler(s) {unknown}; known: {sorted(cfg.samplers)}")
    nfe = list(ev.nfe)
    require(len(nfe) > 0 and all(isinstance(b, int) and b > 0 for b in nfe),
            f"evaluate.nfe must be a non-empty list of positive integers, got {nfe}")
    require(isinstance(ev.num_samples, int) and ev.num_samples >= 2, f"evaluate.num_samples must be an integer >= 2, got {ev.num_samples}")
    require(len(ev.seeds) > 0, "evaluate.seeds is empty")
    require(ev.batch_size > 0, f"evaluate.batch_size must be > 0, got {ev.batch_size}")


def run(cfg: DictConfig):
    """Compose -> instantiate -> evaluate -> write. Returns the result rows."""
    check_evaluate_config(cfg)
    quiet_third_party()
    datamodule = build(cfg, "data")
    datamodule.prepare_data()  # as Lightning does before setup(): downloads when data.download=true
    samplers = {name: build(cfg, f"samplers.{name}") for name in cfg.evaluate.samplers}
    denoiser = build(cfg, "denoiser")
    check_shapes(denoiser, datamodule)
    logger = build(cfg, "logger") if cfg.get("logger") else None
    device = torch.device(cfg.device)
    if hasattr(denoiser, "to"):
        denoiser = denoiser.to(device).eval()
    torch.manual_seed(cfg.seed)

    ev = cfg.evaluate
    evaluator = Evaluator(
        samplers=samplers, nfe=list(ev.nfe), num_samples=ev.num_samples, seeds=list(ev.seeds),
        score=scorer_for(datamodule, ev.num_heldout, ev.feature_cache, ev.inception_weights),
        reference=reference_for(datamodule) if ev.reference else None,
        batch_size=ev.batch_size, device=str(device), progress=ev.progress,
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
