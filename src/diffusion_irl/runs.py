"""What every entry point shares: the run directory, the run's log, shape checks, a quiet terminal, W&B tables.

Entry points (``pretrain``, ``train``, ``evaluate``, ``train_discriminator``) compose a config, check it, build the
objects, run them and write results; the helpers they have in common live here, not in one another.

The run's story goes through :func:`report`: under ``@hydra.main`` it is a log record (the terminal shows the
message alone; ``<run dir>/<job name>.log`` keeps it with a timestamp, see ``conf/hydra/default.yaml``); outside
Hydra (tests, notebooks) it is printed.
"""
from __future__ import annotations

import csv
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from diffusion_irl.config import ConfigError

log = logging.getLogger("diffusion_irl")

# third-party chatter that says nothing about the run: Lightning's advertisement and hardware inventory, a
# deprecation inside its own code, the frozen denoiser it finds "in eval mode", the checkpoint-format notice
_QUIET_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r"Found \d+ module\(s\) in eval mode at the start of training.*",
    r"The '\w+_dataloader' does not have many workers.*",
    r"The number of training batches \(\d+\) is smaller than the logging interval.*",
)
_QUIET_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning")


def quiet_third_party() -> None:
    """Silence third-party tips and warnings that are ours to silence (errors and real warnings still show)."""
    for pattern in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _hydra_console() -> bool:
    return any(getattr(h, "name", None) == "console" for h in logging.getLogger().handlers)


def report(message: str, level: int = logging.INFO) -> None:
    """One line (or block) of the run's story: logged under Hydra (terminal + run log), printed otherwise."""
    if _hydra_console():
        log.log(level, message)
    else:
        print(message)


def record(message: str) -> None:
    """A line for the run's log file only (not the terminal, where the progress bar already shows it)."""
    entry = log.makeRecord(log.name, logging.INFO, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(entry)


def output_dir() -> Path:
    """The Hydra run directory (the working directory when called outside ``@hydra.main``)."""
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # called outside @hydra.main (tests compose the config themselves)
        return Path.cwd()


def check_shapes(denoiser, datamodule) -> None:
    """The denoiser must work on the data's sample shape (a config error otherwise)."""
    shape = tuple(getattr(denoiser, "shape", datamodule.shape))
    if shape != tuple(datamodule.shape):
        raise ConfigError(f"the denoiser works on samples of shape {shape} but data={datamodule.name} has shape "
                          f"{tuple(datamodule.shape)}: pick a denoiser trained on this data")


def config_summary(cfg: DictConfig, keys: Sequence[str]) -> str:
    """``group=choice`` of the config's main objects, for the first line of the run's log."""
    try:
        choices = dict(HydraConfig.get().runtime.choices)
    except ValueError:  # outside @hydra.main
        choices = {}
    parts = []
    for key in keys:
        group = key.replace("mdp.base", "sampler@mdp.base")
        if group in choices and choices[group] is not None:
            parts.append(f"{key}={choices[group]}")
            continue
        node = OmegaConf.select(cfg, key)
        if isinstance(node, DictConfig) and "_target_" in node:
            parts.append(f"{key}={str(node._target_).rsplit('.', 1)[-1]}")
        elif node is not None and not isinstance(node, DictConfig):
            parts.append(f"{key}={node}")
    return ", ".join(parts)


def log_results(logger, csv_path: Path, key: str, images: Sequence[Path] = ()) -> None:
    """The results table as ``<key>/results`` and each figure as ``<key>/<file stem>`` (one size per key) in W&B,
    when the logger can take them."""
    if not logger or not hasattr(logger, "log_table"):
        return
    with open(csv_path) as f:
        data = list(csv.reader(f))
    logger.log_table(key=f"{key}/results", columns=data[0], data=data[1:])
    for path in map(Path, images):
        if path.exists():
            logger.log_image(key=f"{key}/{path.stem}", images=[str(path)])


COMPACT_METRICS = ("mmd", "fd", "fid", "precision", "recall")


def compact_table(summary: Mapping[tuple[str, int], Mapping[str, tuple[float, float, int]]],
                  order: Sequence[str], costs: Mapping[str, float] | None = None) -> str:
    """A terminal-width table: sampler, NFE, the distance (mean ± std), precision, recall and the tuning cost in
    denoiser evaluations (everything else stays in results.md / results.csv)."""
    present = [m for m in COMPACT_METRICS if any(m in cells for cells in summary.values())]
    head = f"{'sampler':<16}{'NFE':>5}" + "".join(f"{m:>20}" if m in ("mmd", "fd", "fid") else f"{m:>11}"
                                                 for m in present) + f"{'cost (NFE)':>12}"
    lines = [head, "-" * len(head)]
    names = list(dict.fromkeys([*order, *(s for s, _ in summary)]))
    for name in names:
        for sampler, nfe in sorted(k for k in summary if k[0] == name):
            cells = summary[(sampler, nfe)]
            line = f"{sampler[:15]:<16}{'–' if sampler == 'reference' else nfe:>5}"
            for m in present:
                mean, std, _ = cells.get(m, (float("nan"), 0.0, 0))
                line += f"{mean:>11.4g} ± {std:<6.2g}" if m in ("mmd", "fd", "fid") else f"{mean:>11.3f}"
            cost = (costs or {}).get(sampler)
            lines.append(line + (f"{cost:>12.3g}" if cost is not None else f"{'–':>12}"))
    return "\n".join(lines)
