"""``python -m diffusion_irl.pretrain data=... denoiser=...``: EDM-train a denoiser and checkpoint it.

Compose, instantiate (datamodule, DenoiserModule, logger, ModelCheckpoint, Trainer), fit, validate. Writes
``<run dir>/checkpoints/last.ckpt`` (load it with ``denoiser=checkpoint denoiser.path=...`` or
:func:`diffusion_irl.denoisers.load_denoiser`), prints its path and the final held-out loss, and returns that loss.
"""
from __future__ import annotations

import os

import hydra
import lightning as L
from omegaconf import DictConfig

from diffusion_irl.config import build, exit_on_config_error, require
from diffusion_irl.denoisers.module import DenoiserModule


def pretrain(cfg: DictConfig) -> float:
    """Run one pretraining job from a composed config (needs a Hydra context for ``${hydra:...}``)."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build(cfg, "data")
    module = build(cfg, "denoiser")
    require(isinstance(module, DenoiserModule),
            f"pretrain trains a DenoiserModule; denoiser={cfg.denoiser.get('_target_')} is not one (use denoiser=mlp "
            "or denoiser=unet)")
    logger = build(cfg, "logger") if cfg.get("logger") else False
    checkpoint = build(cfg, "checkpoint")
    trainer = build(cfg, "trainer", callbacks=[checkpoint], logger=logger)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
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
