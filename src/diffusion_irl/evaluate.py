"""``python -m diffusion_irl.evaluate``: every sampler at every NFE budget on one denoiser, same seeds.

Writes ``results.csv`` (long form: sampler,nfe,seed,metric,value), ``results.md`` (mean ± std over seeds) and
``quality_vs_nfe.png`` in the Hydra run directory, prints the table, and logs to W&B when ``logger=wandb``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from diffusion_irl.config import ConfigError, build, exit_on_config_error, require
from diffusion_irl.evaluation import Evaluator, reference_for, scorer_for, write_outputs

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


def check_shapes(denoiser, datamodule) -> None:
    shape = tuple(getattr(denoiser, "shape", datamodule.shape))
    if shape != tuple(datamodule.shape):
        raise ConfigError(f"the denoiser works on samples of shape {shape} but data={datamodule.name} has shape "
                          f"{tuple(datamodule.shape)}: pick a denoiser trained on this data")


def output_dir() -> Path:
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # called outside @hydra.main (tests compose the config themselves)
        return Path.cwd()


def run(cfg: DictConfig):
    """Compose -> instantiate -> evaluate -> write. Returns the result rows."""
    check_evaluate_config(cfg)
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
    print(paths["md"].read_text())
    print(f"results written to {paths['csv'].parent}")
    if logger is not None:
        log_to_wandb(logger, paths, cfg)
    return rows


def log_to_wandb(logger, paths, cfg) -> None:
    """The same table and plot in W&B (logger=wandb; offline unless the user turns it on)."""
    import csv

    with open(paths["csv"]) as f:
        data = list(csv.reader(f))
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    logger.log_table(key="evaluate/results", columns=data[0], data=data[1:])
    logger.log_image(key="evaluate/quality_vs_nfe", images=[str(paths["png"])])
    logger.experiment.finish()


@hydra.main(version_base="1.3", config_path="../../conf", config_name="evaluate")
@exit_on_config_error
def main(cfg: DictConfig):
    run(cfg)


if __name__ == "__main__":
    main()
