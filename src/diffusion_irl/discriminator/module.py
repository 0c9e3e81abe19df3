"""Discriminator training (docs/method.md section 4): the balanced logistic loss and a Lightning module around it.

Positives ("real", logit > 0) are forward-noised data ``x0 + sigma n``; negatives ("fake") are sampler states at the
same noise levels. With the two classes weighted equally at each noise level, the loss is minimised by
``logit = log q_sigma(x) - log p_sigma(x)`` (exact at the optimum, whatever the class sizes in the batch); the
rewards of ``rl/rewards.py`` and discriminator guidance (``sampling/guidance.py``) read that log-ratio.

A checkpoint rebuilds its discriminator alone: the network's Hydra config is kept in the hyper-parameters and
:func:`load_discriminator` returns the module in eval mode.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_irl.config import module_and_config, plain
from diffusion_irl.tensors import append_dims, batch_sigma


def forward_noise(x0: Tensor, sigma: float | Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``x0 + sigma n``, ``n ~ N(0, I)``, with a per-sample sigma (a scalar or [B]); ``n`` is drawn on the
    generator's device (so a CPU generator serves data on any device) and lands on ``x0``'s."""
    device = generator.device if generator is not None else x0.device
    n = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype).to(x0.device)
    return x0 + append_dims(batch_sigma(sigma, x0), x0.ndim) * n


@dataclass
class DiscriminatorBatch:
    """Positives and negatives at the same noise levels: ``real`` [B, *shape] (data forward-noised at ``sigma``),
    ``fake`` [B, *shape] (sampler states at ``sigma``), ``sigma`` [B] and ``step`` [B] (the step index, for the
    per-step balance)."""

    real: Tensor
    fake: Tensor
    sigma: Tensor
    step: Tensor
    labels: Tensor | None = None   # [B] the class of both the fake state and its real partner (label-conditional)

    def as_tuple(self) -> tuple[Tensor, ...]:
        """``(real, fake, sigma_real, sigma_fake, step_real, step_fake)``, the standalone training batch."""
        return self.real, self.fake, self.sigma, self.sigma.clone(), self.step, self.step.clone()


def same_label_indices(data_labels: Tensor, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """For each entry of ``labels`` [B], a uniformly random index of ``data_labels`` holding the same class (a
    ``ValueError`` names a class the data do not hold)."""
    data_labels = data_labels.reshape(-1).long().cpu()
    order = torch.argsort(data_labels, stable=True)
    num = int(max(int(data_labels.max()), int(labels.max())) + 1) if len(labels) else 1
    counts = torch.bincount(data_labels, minlength=num)
    starts = torch.cumsum(counts, 0) - counts
    wanted = labels.reshape(-1).long().cpu()
    missing = sorted({int(c) for c in wanted[counts[wanted] == 0]})
    if missing:
        raise ValueError(f"the training data hold no sample of class(es) {missing}")
    u = torch.rand(len(wanted), generator=generator)
    return order[starts[wanted] + (u * counts[wanted]).long().clamp(max=counts[wanted] - 1)]


def paired_batch(data: Tensor, fake: Tensor, sigma: Tensor, step: Tensor, generator: torch.Generator | None = None,
                 data_labels: Tensor | None = None, labels: Tensor | None = None) -> DiscriminatorBatch:
    """Pair each fake state with a random point of ``data`` (the training split) forward-noised at the fake
    state's sigma, so both classes hold the same noise levels; with ``labels`` (the fake states' classes) and
    ``data_labels``, a point of the same class. The random draws come from ``generator`` on the data's device; the
    batch lands on the fake states' device."""
    if (labels is None) != (data_labels is None):
        raise ValueError("give both the fake states' labels and the data's labels, or neither")
    if labels is None:
        idx = torch.randint(len(data), (len(fake),), generator=generator)
    else:
        idx = same_label_indices(data_labels, labels, generator)
    real = forward_noise(data[idx.to(data.device)], sigma.to(data.device), generator).to(fake.device)
    return DiscriminatorBatch(real=real, fake=fake, sigma=sigma, step=step,
                              labels=None if labels is None else labels.to(fake.device))


def _per_step_mean(values: Tensor, step: Tensor, num_steps: int) -> tuple[Tensor, Tensor]:
    """Mean of ``values`` within each step index (NaN where absent) and the presence mask, both [num_steps]."""
    step = step.reshape(-1).long().to(values.device)
    if step.numel() != values.numel():
        raise ValueError(f"step indices must have one entry per sample ({values.numel()}), got {step.numel()}")
    if step.numel() and (step.min() < 0 or step.max() >= num_steps):
        raise ValueError(f"step indices must lie in 0..{num_steps - 1}, got {int(step.min())}..{int(step.max())}")
    sums = values.new_zeros(num_steps).index_add(0, step, values)
    counts = torch.bincount(step, minlength=num_steps).to(values.dtype)
    present = counts > 0
    return torch.where(present, sums / counts.clamp(min=1), torch.full_like(sums, float("nan"))), present


def _balanced(values: Tensor, step: Tensor | None, num_steps: int | None) -> Tensor:
    """Plain mean without steps; with steps, the mean over the steps present of the per-step means."""
    if step is None:
        return values.mean()
    means, present = _per_step_mean(values, step, num_steps)
    return means[present].mean()


def discriminator_loss(net: nn.Module, real: Tensor, fake: Tensor, sigma_real: float | Tensor,
                       sigma_fake: float | Tensor, step_real: Tensor | None = None, step_fake: Tensor | None = None,
                       num_steps: int | None = None, r1_gamma: float = 0.0, labels_real: Tensor | None = None,
                       labels_fake: Tensor | None = None) -> tuple[Tensor, dict[str, Any]]:
    """Logistic loss ``softplus(-l)`` on real, ``softplus(l)`` on fake, each class weighing one half.

    With step indices ([B] long, values ``0..num_steps-1``; ``num_steps`` defaults to the largest index + 1), each
    class's loss is first averaged within each step, then over the steps present: every step and every class weighs
    the same, however many samples each holds. ``r1_gamma > 0`` adds ``r1_gamma / 2 * E_real ||grad_x l||^2``
    (balanced per step like the loss). ``labels_real`` / ``labels_fake`` [B] go to a label-conditional network.
    Returns ``(loss, diag)``, diag holding detached scalars ``disc/loss``, ``disc/acc`` (fraction of real + fake
    samples on the right side of 0), ``disc/logit_real``, ``disc/logit_fake``, ``disc/r1`` (when used) and, with
    steps, ``disc/acc_per_step`` [num_steps] (NaN where a step is absent).
    """
    if r1_gamma < 0:
        raise ValueError(f"r1_gamma must be >= 0, got {r1_gamma}")
    if (step_real is None) != (step_fake is None):
        raise ValueError("give step indices for both real and fake samples, or for neither")
    if step_real is not None and num_steps is None:
        num_steps = int(max(step_real.max(), step_fake.max())) + 1
    if r1_gamma > 0:
        real = real.detach().requires_grad_(True)
    if (labels_real is None) != (labels_fake is None):
        raise ValueError("give labels for both real and fake samples, or for neither")
    if labels_real is None:
        logit_real, logit_fake = net(real, sigma_real), net(fake, sigma_fake)
    else:
        logit_real, logit_fake = net(real, sigma_real, labels_real), net(fake, sigma_fake, labels_fake)
    loss = 0.5 * (_balanced(F.softplus(-logit_real), step_real, num_steps)
                  + _balanced(F.softplus(logit_fake), step_fake, num_steps))
    diag: dict[str, Any] = {}
    if r1_gamma > 0:
        (grad,) = torch.autograd.grad(logit_real.sum(), real, create_graph=True)
        r1 = _balanced(grad.flatten(1).pow(2).sum(1), step_real, num_steps)
        loss = loss + 0.5 * r1_gamma * r1
        diag["disc/r1"] = r1.detach()
    correct = torch.cat([(logit_real > 0), (logit_fake < 0)]).to(logit_real.dtype).detach()
    diag.update({"disc/loss": loss.detach(), "disc/acc": correct.mean(),
                 "disc/logit_real": logit_real.detach().mean(), "disc/logit_fake": logit_fake.detach().mean()})
    if step_real is not None:
        steps = torch.cat([step_real.reshape(-1), step_fake.reshape(-1)])
        diag["disc/acc_per_step"] = _per_step_mean(correct, steps, num_steps)[0]
    return loss, diag


class DiscriminatorModule(L.LightningModule):
    """A noise-conditional discriminator ``net(x, sigma) -> logit [B]`` trained with :func:`discriminator_loss`.

    Args:
        net: an ``nn.Module`` or its Hydra config (a mapping with ``_target_``, instantiated here). Checkpoints are
            self-contained when the config is known: given as a mapping, or exposed as ``net.config``.
        lr, betas, weight_decay: Adam's (GAN-style betas by default).
        r1_gamma: weight of the R1 penalty on real samples (0: none).

    Standalone training batches are ``(real, fake, sigma_real, sigma_fake, step_real, step_fake)``. An outer module
    (the RL loop) can own the optimiser instead: :meth:`make_optimizer` builds it and :meth:`loss` computes the loss.
    """

    def __init__(self, net: nn.Module | Mapping, lr: float = 2e-4, betas: Sequence[float] = (0.5, 0.999),
                 weight_decay: float = 0.0, r1_gamma: float = 0.0):
        super().__init__()
        net, net_config = module_and_config(net, "discriminator.net")
        betas = [float(b) for b in plain(betas)]
        if not lr > 0:
            raise ValueError(f"discriminator.lr must be > 0, got {lr}")
        if not r1_gamma >= 0:
            raise ValueError(f"discriminator.r1_gamma must be >= 0, got {r1_gamma}")
        if weight_decay < 0 or len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"discriminator needs weight_decay >= 0 and two betas in [0, 1); got {weight_decay}, {betas}")
        self.save_hyperparameters(dict(net=net_config, lr=float(lr), betas=betas, weight_decay=float(weight_decay),
                                       r1_gamma=float(r1_gamma)))
        self.net = net
        self.lr, self.betas, self.weight_decay, self.r1_gamma = float(lr), tuple(betas), float(weight_decay), float(r1_gamma)

    @property
    def shape(self) -> tuple[int, ...] | None:
        return getattr(self.net, "shape", None)

    @property
    def num_classes(self) -> int:
        """Classes of a label-conditional network (0: unconditional)."""
        return int(getattr(self.net, "num_classes", 0))

    def forward(self, x: Tensor, sigma: float | Tensor, labels: Tensor | None = None) -> Tensor:
        return self.net(x, sigma) if labels is None else self.net(x, sigma, labels)

    def batch_loss(self, batch: DiscriminatorBatch, num_steps: int | None = None) -> tuple[Tensor, dict[str, Any]]:
        """:meth:`loss` of a :class:`DiscriminatorBatch` (per-step balanced; its labels, when it has them)."""
        return self.loss(batch.real, batch.fake, batch.sigma, batch.sigma, batch.step, batch.step, num_steps,
                         labels_real=batch.labels, labels_fake=batch.labels)

    def loss(self, real: Tensor, fake: Tensor, sigma_real: float | Tensor, sigma_fake: float | Tensor,
             step_real: Tensor | None = None, step_fake: Tensor | None = None, num_steps: int | None = None,
             r1_gamma: float | None = None, labels_real: Tensor | None = None,
             labels_fake: Tensor | None = None) -> tuple[Tensor, dict[str, Any]]:
        """:func:`discriminator_loss` of this network (``r1_gamma`` defaults to the module's)."""
        return discriminator_loss(self.net, real, fake, sigma_real, sigma_fake, step_real, step_fake, num_steps,
                                  self.r1_gamma if r1_gamma is None else r1_gamma, labels_real, labels_fake)

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make_optimizer()

    def _log(self, prefix: str, diag: dict[str, Any], batch: int) -> None:
        for key, value in diag.items():
            if value.ndim == 0:
                self.log(f"{prefix}/{key.split('/', 1)[1]}", value, prog_bar=key in ("disc/loss", "disc/acc"),
                         batch_size=batch, sync_dist=prefix == "val")

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        real, fake, sigma_real, sigma_fake, step_real, step_fake = batch
        loss, diag = self.loss(real, fake, sigma_real, sigma_fake, step_real, step_fake)
        self._log("train", diag, real.shape[0])
        return loss

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        """Held-out loss and accuracy (no R1: validation runs without gradients)."""
        real, fake, sigma_real, sigma_fake, step_real, step_fake = batch
        _, diag = self.loss(real, fake, sigma_real, sigma_fake, step_real, step_fake, r1_gamma=0.0)
        self._log("val", diag, real.shape[0])


def load_discriminator(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> DiscriminatorModule:
    """The :class:`DiscriminatorModule` stored in a Lightning checkpoint, rebuilt from the file alone; eval mode,
    parameters frozen (gradients with respect to x still flow, as guidance needs)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"discriminator checkpoint not found: {path!r} (a .ckpt written by "
                                "python -m diffusion_irl.train_discriminator, e.g. outputs/.../checkpoints/last.ckpt)")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    hp = dict(ckpt.get("hyper_parameters", {}))
    if hp.get("net") is None:
        raise ValueError(f"{path}: the checkpoint does not record its network config (the DiscriminatorModule was "
                         "given an nn.Module without a `config` attribute), so it cannot be rebuilt from the file alone")
    module = DiscriminatorModule(**hp)
    module.load_state_dict(ckpt["state_dict"])
    return module.to(map_location).requires_grad_(False).eval()
