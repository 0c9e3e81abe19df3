"""``python -m diffusion_irl.pretrain data=... denoiser=...``: EDM-train a denoiser and checkpoint it.

Compose, instantiate (datamodule, DenoiserModule, logger, ModelCheckpoint, Trainer), fit, validate. Writes
``<run dir>/checkpoints/last.ckpt`` (load it with ``denoiser=checkpoint denoiser.path=...`` or
:func:`diffusion_irl.denoisers.load_denoiser`), prints its path and the final held-out loss, and returns that loss.
"""
from __future__ import annotations

import os

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from diffusion_irl.config import (ConfigError, build, exit_on_config_error, require, require_bool, require_int,
                                  require_str)
from diffusion_irl.denoisers.module import DenoiserModule, check_network_shape, read_checkpoint
from diffusion_irl.runs import build_logger, check_run_dir, output_dir, warn_unread_additions


def check_pretrain_config(cfg: DictConfig) -> None:
    """Run-level keys and the network against the data's shape, before any compute."""
    require_int(cfg, "seed", min=0, max=2**32 - 1)
    require_bool(cfg, "overwrite")
    require_str(cfg, "ckpt_path", optional=True)
    try:
        check_network_shape(OmegaConf.select(cfg, "denoiser.net"), cfg.data.shape)
    except ValueError as exc:
        raise ConfigError(f"denoiser: {exc}") from None


def check_resume(cfg: DictConfig, dirpath: str) -> str | None:
    """``ckpt_path`` resolved (``last``: this run's last.ckpt if any) and checked: a DenoiserModule checkpoint."""
    path = cfg.get("ckpt_path")
    if path == "last":
        path = os.path.join(dirpath, "last.ckpt")
        if not os.path.isfile(path):
            return None
    if path is None:
        return None
    require(os.path.isfile(path), f"ckpt_path: no such file: {path}")
    try:
        ckpt = read_checkpoint(path, weights_only=False)
    except ValueError as exc:
        raise ConfigError(f"ckpt_path: {exc}") from None
    state = ckpt.get("state_dict")
    require(isinstance(state, dict) and any(k.startswith("net.") for k in state),
            f"ckpt_path: not a checkpoint of this project: {path} (no DenoiserModule state)")
    return path


def pretrain(cfg: DictConfig) -> float:
    """Run one pretraining job from a composed config (needs a Hydra context for ``${hydra:...}``)."""
    check_pretrain_config(cfg)
    warn_unread_additions(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build(cfg, "data")
    module = build(cfg, "denoiser")
    require(isinstance(module, DenoiserModule),
            f"pretrain trains a DenoiserModule; denoiser={cfg.denoiser.get('_target_')} is not one (use denoiser=mlp "
            "or denoiser=unet)")
    check_run_dir(output_dir(), overwrite=cfg.overwrite, resume=cfg.get("ckpt_path"),
                  markers=("checkpoints/last.ckpt",))
    checkpoint = build(cfg, "checkpoint", enable_version_counter=False)
    ckpt_path = check_resume(cfg, checkpoint.dirpath)
    logger = build_logger(cfg)
    trainer = build(cfg, "trainer", callbacks=[checkpoint], logger=logger)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    heldout = float(trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/loss"])
    last = os.path.join(checkpoint.dirpath, "last.ckpt")
    if trainer.is_global_zero:
        print(f"checkpoint: {last}")
        print(f"held-out loss (EMA): {heldout:.5f}")
    return heldout


@hydra.main(version_base="1.3", config_path="../../conf", config_name="pretrain")
@exit_on_config_error
def main(cfg: DictConfig) -> float:
    return pretrain(cfg)


if __name__ == "__main__":
    main()
