"""DenoiserModule: EDM training of a raw network (Lightning), with EMA weights and self-contained checkpoints.

Loss (docs/method.md section 1): ``lambda(s) ||D(x0 + s n, s) - x0||^2`` with ``ln s ~ N(P_mean, P_std^2)``,
``lambda = 1 / c_out^2``, averaged over batch and dimensions (so the number is per dimension, ~1 at the start).

A checkpoint rebuilds its denoiser alone: the network's Hydra config (``_target_`` + arguments) is kept in the
hyper-parameters, the EMA copy is part of the state dict, and :func:`load_denoiser` returns ``D = EDMPrecond(net)``.
"""
from __future__ import annotations

import copy
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import hydra.utils
import lightning as L
import torch
from torch import Tensor, nn

from diffusion_irl.config import module_and_config, plain
from diffusion_irl.denoisers.precond import EDMPrecond, edm_loss_weight


def check_network_shape(net: Mapping | nn.Module | None, shape: Sequence[int]) -> None:
    """The project's networks against one sample's ``shape`` (a ``ValueError`` before any training): the MLP works
    on vectors ``[dim]``, the U-Net on images ``[in_channels, H, W]``."""
    if net is None:
        return
    config = plain(net) if isinstance(net, Mapping) else plain(getattr(net, "config", None))
    if not isinstance(config, Mapping):
        return
    target, shape = str(config.get("_target_", "")), [int(s) for s in plain(shape)]
    kind = target.rsplit(".", 1)[-1]
    if kind == "MLP":
        dim = config.get("dim")
        dims = [int(dim)] if isinstance(dim, int) else [int(d) for d in (dim or [])]
        if len(shape) != 1 or dims != shape:
            raise ValueError(f"the MLP denoiser works on vectors of shape {dims}, the data's samples have shape "
                             f"{shape}: use denoiser=unet (or cached_unet) for images")
    elif kind == "UNet":
        channels = config.get("in_channels")
        if len(shape) != 3 or channels != shape[0]:
            raise ValueError(f"the U-Net denoiser works on images [{channels}, H, W], the data's samples have shape "
                             f"{shape}: use denoiser=mlp (or cached_mlp) for vectors")


class DenoiserModule(L.LightningModule):
    """Trains ``D = EDMPrecond(net, sigma_data, shape)`` with the EDM loss.

    Args:
        net: the raw network ``net(x_in, c_noise [B], class_labels=None)``, either an ``nn.Module`` or its Hydra
            config (a mapping with ``_target_``, instantiated here). Checkpoints are self-contained when the config
            is known: given as a mapping, or exposed by the module as ``net.config`` (the project's MLP / UNet do).
        shape: one sample's shape; checked against the datamodule's at fit time.
        sigma_data: data std used by the preconditioning.
        P_mean, P_std: training noise levels ``ln s ~ N(P_mean, P_std^2)``.
        ema_decay: EMA decay, ramped up as ``min(ema_decay, (1 + n) / (10 + n))`` after n updates so that short runs
            are not dominated by the initial weights; updated after every optimizer step.
        optimizer: ``functools.partial`` of a torch optimizer (Hydra ``_partial_: true``) or its config;
            default ``Adam(lr=1e-3)``.
        label_dropout: probability of replacing a label by the null class (``num_classes``) during training, for
            classifier-free guidance; used only when the network is class-conditional.
    """

    def __init__(self, net: nn.Module | Mapping, shape: Sequence[int], sigma_data: float, P_mean: float = -1.2,
                 P_std: float = 1.2, ema_decay: float = 0.999,
                 optimizer: Callable[..., torch.optim.Optimizer] | Mapping | None = None, label_dropout: float = 0.0):
        super().__init__()
        net, net_config = module_and_config(net, "denoiser.net")
        if isinstance(optimizer, Mapping):
            optimizer_config = plain(optimizer)
            optimizer = hydra.utils.instantiate(optimizer_config)
        else:
            optimizer_config = None if optimizer is None else repr(optimizer)
        if sigma_data <= 0 or P_std <= 0 or not 0 <= ema_decay < 1 or not 0 <= label_dropout <= 1:
            raise ValueError("DenoiserModule needs sigma_data > 0, P_std > 0, 0 <= ema_decay < 1, "
                             f"0 <= label_dropout <= 1; got {sigma_data}, {P_std}, {ema_decay}, {label_dropout}")
        shape = [int(s) for s in plain(shape)]
        check_network_shape(net_config, shape)
        self.save_hyperparameters(dict(net=net_config, shape=shape, sigma_data=float(sigma_data), P_mean=float(P_mean),
                                       P_std=float(P_std), ema_decay=float(ema_decay), optimizer=optimizer_config,
                                       label_dropout=float(label_dropout)))
        self.net = net
        self.ema = copy.deepcopy(net).requires_grad_(False)  # used only in validation (eval) and denoiser()
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        self.shape, self.sigma_data = tuple(shape), float(sigma_data)
        self.P_mean, self.P_std, self.ema_decay, self.label_dropout = P_mean, P_std, ema_decay, label_dropout
        self.num_classes = int(getattr(net, "num_classes", 0) or 0)
        self._optimizer = optimizer or functools.partial(torch.optim.Adam, lr=1e-3)

    # -- the denoiser ----------------------------------------------------------------------------------------------
    def _precond(self, net: nn.Module) -> EDMPrecond:
        return EDMPrecond(net, self.sigma_data, self.shape)

    def denoiser(self, ema: bool = True) -> EDMPrecond:
        """A detached copy ``D(x, sigma)`` of the EMA (or online) weights, in eval mode, without gradients."""
        net = copy.deepcopy(self.ema if ema else self.net)
        return self._precond(net).requires_grad_(False).eval()

    def forward(self, x: Tensor, sigma: float | Tensor, class_labels: Tensor | None = None) -> Tensor:
        return self._precond(self.net)(x, sigma, class_labels)

    # -- loss ------------------------------------------------------------------------------------------------------
    def edm_loss(self, net: nn.Module, x0: Tensor, y: Tensor | None, generator: torch.Generator | None = None,
                 label_dropout: float = 0.0) -> Tensor:
        """Per-dimension EDM loss of ``EDMPrecond(net)`` on a batch ``x0`` [B, *shape] (labels y [B] or None)."""
        b = x0.shape[0]
        rnd = torch.randn((b,), generator=generator, device=x0.device, dtype=x0.dtype)
        sigma = (rnd * self.P_std + self.P_mean).exp()
        n = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        labels = None
        if self.num_classes > 0 and y is not None:
            labels = y.long()
            if label_dropout > 0:
                drop = torch.rand((b,), generator=generator, device=x0.device) < label_dropout
                labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        x = x0 + sigma.view(-1, *([1] * (x0.ndim - 1))) * n
        d = self._precond(net)(x, sigma, labels)
        per_sample = ((d - x0) ** 2).flatten(1).mean(1)
        return (edm_loss_weight(sigma, self.sigma_data) * per_sample).mean()

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        data_shape = getattr(dm, "shape", None)
        if data_shape is not None and tuple(data_shape) != self.shape:
            raise ValueError(f"denoiser.shape {self.shape} does not match the data's shape {tuple(data_shape)}")

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x0, y = batch
        loss = self.edm_loss(self.net, x0, y, label_dropout=self.label_dropout)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=x0.shape[0])
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Held-out loss with noise fixed per batch index (comparable across evaluations): EMA and online weights."""
        x0, y = batch
        out = {}
        for key, net in (("val/loss", self.ema), ("val/loss_online", self.net)):
            g = torch.Generator(device=x0.device).manual_seed(1_000 + batch_idx)
            out[key] = self.edm_loss(net, x0, y, generator=g)
        self.log("val/loss", out["val/loss"], prog_bar=True, sync_dist=True, batch_size=x0.shape[0])
        self.log("val/loss_online", out["val/loss_online"], sync_dist=True, batch_size=x0.shape[0])

    # -- optimisation and EMA --------------------------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self._optimizer(self.net.parameters())

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.update_ema()

    @torch.no_grad()
    def update_ema(self) -> None:
        """``ema <- d ema + (1 - d) net`` with ``d = min(ema_decay, (1 + n) / (10 + n))``; buffers are copied."""
        n = float(self.ema_updates)
        decay = min(self.ema_decay, (1 + n) / (10 + n))
        for p_ema, p in zip(self.ema.parameters(), self.net.parameters()):
            p_ema.lerp_(p.detach(), 1 - decay)
        for b_ema, b in zip(self.ema.buffers(), self.net.buffers()):
            b_ema.copy_(b)
        self.ema_updates += 1


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    weights_only: bool = True) -> dict:
    """``torch.load`` of a Lightning checkpoint; anything else (an empty file, random bytes, another pickle) is a
    ``ValueError`` saying "not a checkpoint of this project: <path>"."""
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as exc:  # torch.load raises many kinds (EOFError, UnpicklingError, RuntimeError, ...)
        raise ValueError(f"not a checkpoint of this project: {os.fspath(path)} ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"not a checkpoint of this project: {os.fspath(path)} (holds a {type(ckpt).__name__})")
    return ckpt


def load_denoiser(path: str | os.PathLike, ema: bool = True, map_location: str | torch.device = "cpu") -> EDMPrecond:
    """The denoiser ``D(x, sigma)`` stored in a DenoiserModule checkpoint (EMA weights by default), eval, no grad."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"denoiser checkpoint not found: {path!r} (set denoiser.path=<a .ckpt written by "
                                "python -m diffusion_irl.pretrain, e.g. outputs/.../checkpoints/last.ckpt>)")
    ckpt = read_checkpoint(path, map_location)
    hp = ckpt.get("hyper_parameters") or {}
    if "state_dict" not in ckpt or not isinstance(hp, Mapping) or not {"sigma_data", "shape"} <= set(hp):
        raise ValueError(f"not a checkpoint of this project: {path} (no DenoiserModule state; expected a .ckpt "
                         "written by python -m diffusion_irl.pretrain)")
    if hp.get("net") is None:
        raise ValueError(f"{path}: the checkpoint does not record its network config (the DenoiserModule was given "
                         "an nn.Module without a `config` attribute), so it cannot be rebuilt from the file alone")
    net = hydra.utils.instantiate(hp["net"])
    prefix = "ema." if ema else "net."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    net.load_state_dict(state)
    net.to(map_location)
    return EDMPrecond(net, hp["sigma_data"], hp["shape"]).requires_grad_(False).eval()


NOT_IN_DENOISER_KEY = ("classifier_reserve",)


def cached_denoiser(data: Mapping, module: Mapping, max_steps: int = 2000, cache_dir: str | os.PathLike = ".cache/diffusion_irl/denoisers",
                    seed: int = 0, ema: bool = True, map_location: str | torch.device = "cpu",
                    progress: bool = True) -> EDMPrecond:
    """A denoiser pretrained by our own EDM training (``module``: a DenoiserModule config, ``data``: a datamodule
    config), trained on first use and cached under ``cache_dir`` by a hash of both configs, the steps and the seed.

    The embedded default of ``python -m diffusion_irl.train`` uses it so that one command works from a fresh clone;
    for real runs pretrain once with ``python -m diffusion_irl.pretrain`` and pass ``denoiser=checkpoint``. Under
    multi-process DDP, warm the cache with a single process first (ranks do not wait for each other here)."""
    import hashlib
    import json

    if int(max_steps) < 1:
        raise ValueError(f"denoiser.max_steps must be >= 1, got {max_steps}")
    data_cfg, module_cfg = plain(data), plain(module)
    check_network_shape(module_cfg.get("net"), module_cfg.get("shape") or data_cfg.get("shape") or [])
    # keys that do not change the denoiser's training stay out of the hash (the evaluator's classifier reserve)
    trained_on = {k: v for k, v in data_cfg.items() if k not in NOT_IN_DENOISER_KEY}
    key = json.dumps({"data": trained_on, "module": module_cfg, "max_steps": int(max_steps), "seed": int(seed)},
                     sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    path = os.path.join(os.fspath(cache_dir), f"denoiser_{digest}.ckpt")
    if not os.path.isfile(path):
        print(f"pretraining the denoiser for {max_steps} steps (cached for later runs at {path})")
        L.seed_everything(int(seed), workers=True, verbose=False)
        datamodule = hydra.utils.instantiate(data_cfg)
        denoiser_module = hydra.utils.instantiate(module_cfg, _recursive_=False)
        trainer = L.Trainer(max_steps=int(max_steps), max_epochs=-1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=progress, enable_model_summary=False, accelerator="auto", devices=1,
                            limit_val_batches=0, num_sanity_val_steps=0)
        trainer.fit(denoiser_module, datamodule=datamodule)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        trainer.save_checkpoint(tmp)
        os.replace(tmp, path)  # atomic: a half-written file is never picked up
    return load_denoiser(path, ema=ema, map_location=map_location)
