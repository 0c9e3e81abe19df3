"""Pretrained diffusers ``UNet2DModel`` (epsilon prediction, discrete VP schedule) as a denoiser ``D(x, sigma)``.

Layouts understood (all local; nothing is downloaded unless ``path`` is a hub id and the machine is online):

- a model directory: ``<path>/config.json`` + weights, optionally ``<path>/scheduler_config.json``;
- a pipeline directory (``DDPMPipeline.save_pretrained``): ``<path>/unet/`` and ``<path>/scheduler/``
  (``subfolder`` defaults to ``unet`` when ``<path>/config.json`` is absent and ``<path>/unet/config.json`` exists).

The schedule comes from the first ``scheduler_config.json`` found in ``<path>/scheduler/``, ``<path>/`` or
``<path>/<subfolder>/``; without one, from the ``num_train_timesteps`` / ``beta_*`` arguments. ``alphas_cumprod``
is computed by diffusers' own ``DDPMScheduler`` so every beta schedule it knows is reproduced exactly.
"""
from __future__ import annotations

import json
import os

import torch

from diffusion_irl.denoisers.precond import VPEpsDenoiser

_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                  "rescale_betas_zero_snr")


def _find_scheduler_config(path: str, subfolder: str | None) -> str | None:
    candidates = [os.path.join(path, "scheduler", "scheduler_config.json"), os.path.join(path, "scheduler_config.json")]
    if subfolder:
        candidates.append(os.path.join(path, subfolder, "scheduler_config.json"))
    return next((c for c in candidates if os.path.isfile(c)), None)


def load_diffusers_denoiser(path: str, subfolder: str | None = None, num_train_timesteps: int = 1000,
                            beta_start: float = 1e-4, beta_end: float = 0.02, beta_schedule: str = "linear",
                            device: str | torch.device = "cpu") -> VPEpsDenoiser:
    """Load a diffusers ``UNet2DModel`` and its schedule; return ``D(x, sigma)`` (eval mode, no grad) on ``device``.

    Raises ``ValueError`` when the scheduler's ``prediction_type`` is not ``epsilon``, and a ``ValueError`` naming
    ``denoiser.path`` when nothing loadable is found.
    """
    from diffusers import DDPMScheduler, UNet2DModel

    path = os.fspath(path)
    local = os.path.isdir(path)
    if local and subfolder is None and not os.path.isfile(os.path.join(path, "config.json")) \
            and os.path.isfile(os.path.join(path, "unet", "config.json")):
        subfolder = "unet"
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if not local and not looks_like_hub_id:
        raise ValueError(f"diffusers model directory not found: {path!r} (set denoiser.path=<a local directory "
                         "holding a UNet2DModel saved with save_pretrained>)")
    try:
        unet = UNet2DModel.from_pretrained(path, subfolder=subfolder)
    except (OSError, EnvironmentError, ValueError) as err:
        raise ValueError(f"could not load a diffusers UNet2DModel from {path!r}"
                         f"{f' (subfolder {subfolder!r})' if subfolder else ''}: {err}\n(set denoiser.path=<a local "
                         "directory with config.json and diffusion_pytorch_model.safetensors>)") from err

    schedule = dict(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                    beta_schedule=beta_schedule)
    prediction_type = "epsilon"
    sched_file = _find_scheduler_config(path, subfolder) if local else None
    if sched_file is not None:
        with open(sched_file) as f:
            sched_cfg = json.load(f)
        schedule.update({k: sched_cfg[k] for k in _SCHEDULE_KEYS if k in sched_cfg})
        prediction_type = sched_cfg.get("prediction_type", "epsilon")
    if prediction_type != "epsilon":
        raise ValueError(f"{sched_file}: prediction_type is {prediction_type!r}; load_diffusers_denoiser supports "
                         "epsilon-prediction models only")
    alphas_cumprod = DDPMScheduler(**schedule).alphas_cumprod

    cfg = unet.config
    size = cfg.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    # diffusers has no "null" class: labels are passed through unchanged, 0..num_class_embeds-1.
    num_classes = int(cfg.num_class_embeds or 0) if cfg.class_embed_type is None else 0
    denoiser = VPEpsDenoiser(unet, alphas_cumprod, shape=(cfg.in_channels, *size), num_classes=num_classes)
    return denoiser.to(device).requires_grad_(False).eval()
