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
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
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


def frozen_denoiser(cfg, datamodule):
    """``(denoiser, device)``: the data prepared, ``cfg.denoiser`` built, checked against the data's shape, moved to
    ``cfg.device`` in eval mode and frozen (tuners such as LD3 differentiate through D in x and sigma only)."""
    import torch

    from diffusion_irl.config import build

    datamodule.prepare_data()
    denoiser = build(cfg, "denoiser")
    check_shapes(denoiser, datamodule)
    device = torch.device(cfg.device)
    if hasattr(denoiser, "to"):
        denoiser = denoiser.to(device).eval()
    if isinstance(denoiser, torch.nn.Module):
        denoiser.requires_grad_(False)
    return denoiser, device


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


# -- the run directory: writable, and never another run's results ------------------------------------------------
RESULT_MARKERS = ("results.csv", "checkpoints/last.ckpt")


def check_run_dir(out: Path, overwrite: bool = False, resume: str | None = None,
                  markers: Sequence[str] = RESULT_MARKERS) -> None:
    """The run directory must be writable and must not hold another run's results (``markers``), unless this run
    resumes it (``resume`` is ``"last"`` or a checkpoint inside it) or ``overwrite`` is true."""
    import os
    import tempfile

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise ConfigError(f"run directory {out} is not writable ({exc.strerror or exc}): pick another "
                          "hydra.run.dir") from None
    found = [m for m in markers if (out / m).exists()]
    if not found or overwrite:
        return
    if resume == "last" or (resume and Path(os.path.abspath(resume)).is_relative_to(out.resolve())):
        return
    raise ConfigError(f"run directory {out} already holds another run's results ({', '.join(found)}): resume it "
                      "with ckpt_path=last, pick another hydra.run.dir, or pass overwrite=true")


def _writable_or_exit(path: str) -> None:
    try:
        check_run_dir(Path(path), overwrite=True)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


class RunDirCheck(Callback):
    """Hydra callback (conf/hydra/default.yaml): a run directory that cannot be created or written is one
    ``config error`` line and exit 2, before Hydra itself writes there (its traceback otherwise)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _writable_or_exit(str(config.hydra.run.dir))

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _writable_or_exit(str(config.hydra.sweep.dir))


# -- `+key=value` additions that nothing reads -------------------------------------------------------------------
def unread_additions(cfg: DictConfig) -> list[str]:
    """Warnings for ``+key=value`` overrides that add a plain setting no code reads: the parent node has no
    ``_target_`` (whose arguments instantiation would check) and the key is new (so, likely, a typo)."""
    import difflib

    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        overrides = list(HydraConfig.get().overrides.task)
    except (ValueError, AttributeError):  # outside @hydra.main and without a Hydra config
        return []
    out = []
    for o in OverridesParser.create().parse_overrides(overrides):
        if not o.is_add() or o.package is not None or isinstance(OmegaConf.select(cfg, o.key_or_group), DictConfig):
            continue  # a config group appended (+sampler@samplers.dg=dg) or a whole node: Hydra checks those
        parent_key, _, leaf = o.key_or_group.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        if not isinstance(parent, DictConfig) or "_target_" in parent:
            continue
        known = [k for k in parent if k != leaf]
        close = difflib.get_close_matches(leaf, known, n=1)
        hint = f"did you mean {'.'.join(filter(None, [parent_key, close[0]]))}?" if close else \
            f"known keys here: {', '.join(map(str, known))}"
        out.append(f"warning: +{o.key_or_group} adds a key that nothing reads ({hint})")
    return out


def warn_unread_additions(cfg: DictConfig) -> None:
    for line in unread_additions(cfg):
        report(line, logging.WARNING)


# -- Weights & Biases: a valid mode, and no hang on an unreachable server ----------------------------------------
WANDB_MODES = ("online", "offline", "disabled", "dryrun", "run", "shared")
WANDB_PROBE_SECONDS = 3.0


def _wandb_server_error(url: str, timeout: float) -> str | None:
    """None when a TCP connection to the W&B server opens within ``timeout`` seconds, else why not."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout):
            return None
    except OSError as exc:
        return str(exc.strerror or exc)


def _wandb_api_key(url: str) -> bool:
    import netrc
    import os
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(urlparse(url).hostname or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(cfg: DictConfig) -> str:
    """The W&B mode this run will use (``WANDB_MODE`` wins over ``logger.mode``), checked: a bad mode or online
    without an API key is a config error; online with no reachable server falls back to offline (one warning)."""
    import os

    env = os.environ.get("WANDB_MODE")
    mode = env if env is not None else OmegaConf.select(cfg, "logger.mode", default="offline")
    source = "WANDB_MODE" if env is not None else "logger.mode"
    if mode not in WANDB_MODES:
        raise ConfigError(f"{source}: {mode!r} is not a W&B mode; use online, offline or disabled")
    if mode not in ("online", "run", "shared"):
        return mode
    url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    error = _wandb_server_error(url, float(os.environ.get("DIFFUSION_IRL_WANDB_PROBE_S", WANDB_PROBE_SECONDS)))
    if error is not None:
        report(f"warning: W&B server {url} is unreachable ({error}): logging offline into the run directory "
               "instead (upload later with `wandb sync`)", logging.WARNING)
        os.environ["WANDB_MODE"] = "offline"  # wandb reads the environment too
        return "offline"
    if not _wandb_api_key(url):
        raise ConfigError(f"{source}: W&B online mode needs an API key: run `wandb login` or set WANDB_API_KEY "
                          "(or use WANDB_MODE=offline)")
    return mode


def build_logger(cfg: DictConfig):
    """The ``logger:`` node (False when null), with the W&B mode checked first."""
    from diffusion_irl.config import build

    node = cfg.get("logger")
    if not node:
        return False
    if str(node.get("_target_", "")).endswith("WandbLogger"):
        return build(cfg, "logger", mode=wandb_mode(cfg))
    return build(cfg, "logger")
