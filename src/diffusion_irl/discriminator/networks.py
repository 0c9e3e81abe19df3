"""Noise-conditional discriminators ``d(x, sigma) -> logit [B]`` (docs/method.md sections 2 and 4).

A positive logit means "real": forward-noised data ``q_sigma``. Trained with the logistic loss against samples of a
law ``p_sigma`` (balanced classes), the optimal logit is ``log q_sigma(x) - log p_sigma(x)``.

Both networks take ``x`` [B, *shape] and ``sigma`` (a float, a 0-d tensor or a [B] tensor; 0 is allowed: the clean
terminal state). The noise level enters as Fourier features of ``log(max(sigma, sigma_floor)) / 4`` (EDM's
``c_noise``; the floor keeps sigma = 0 finite), the input as ``x / sqrt(sigma^2 + sigma_data^2)`` (EDM's ``c_in``), so
one network sees inputs of unit scale from sigma = 80 down to 0. ``spectral_norm=True`` wraps every linear and
convolution layer with :func:`torch.nn.utils.parametrizations.spectral_norm`. Each network keeps its constructor
arguments in ``self.config`` (with ``_target_``) so a checkpoint can rebuild it.

With ``num_classes > 0`` a network is label-conditional: ``d(x, sigma, labels)``, a class embedding added to the
noise embedding, trained on real and fake samples of the same label, so that its optimum is the conditional
log-ratio ``log q_sigma(x | y) - log p_sigma(x | y)`` (a class-conditional sampler must match every class, not only
the label-marginal).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from diffusion_irl.denoisers.networks import FourierEmbedding
from diffusion_irl.tensors import append_dims, batch_sigma


def _param_dtype(module: nn.Module, default: torch.dtype) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    return default


class _NoiseConditional(nn.Module):
    """Shared parts: argument checks, the layer factory (spectral norm or not), input scaling, sigma embedding."""

    def __init__(self, shape: Sequence[int], emb_dim: int, spectral_norm: bool, sigma_floor: float, sigma_data: float,
                 num_classes: int = 0):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        if sigma_floor <= 0 or sigma_data <= 0 or emb_dim <= 0:
            raise ValueError(f"discriminator needs sigma_floor > 0, sigma_data > 0, emb_dim > 0; got {sigma_floor}, "
                             f"{sigma_data}, {emb_dim}")
        if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 0:
            raise ValueError(f"discriminator.net.num_classes must be an integer >= 0, got {num_classes}")
        self.spectral_norm, self.sigma_floor, self.sigma_data = bool(spectral_norm), float(sigma_floor), float(sigma_data)
        self.num_classes = int(num_classes)
        self.fourier = FourierEmbedding(emb_dim)
        self.emb = nn.Sequential(self.layer(nn.Linear(emb_dim, emb_dim)), nn.SiLU(),
                                 self.layer(nn.Linear(emb_dim, emb_dim)), nn.SiLU())
        # label-conditional: the class embedding joins the noise embedding (logit = log q(x | y) - log p(x | y))
        self.label_emb = nn.Embedding(self.num_classes, emb_dim) if self.num_classes > 0 else None

    def layer(self, module: nn.Module) -> nn.Module:
        return _spectral_norm(module) if self.spectral_norm else module

    def inputs(self, x: Tensor, sigma: float | Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(c_in(sigma) x, emb(sigma) [+ emb(label)])`` in the network's dtype. A label-conditional network
        (``num_classes > 0``) needs ``labels`` [B]; an unconditional one refuses them."""
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"{type(self).__name__} expects x of shape [B, {', '.join(map(str, self.shape))}], "
                             f"got {tuple(x.shape)}")
        if (labels is None) != (self.label_emb is None):
            raise ValueError(f"{type(self).__name__} with num_classes={self.num_classes} "
                             + ("needs the class labels of the samples" if labels is None else
                                "is unconditional: it takes no labels (set discriminator.net.num_classes)"))
        s = batch_sigma(sigma, x)
        dtype = _param_dtype(self, x.dtype)
        x_in = x * append_dims((s**2 + self.sigma_data**2).rsqrt(), x.ndim)
        c_noise = s.clamp(min=self.sigma_floor).log() / 4
        emb = self.fourier(c_noise).to(dtype)
        if labels is not None:
            labels = labels.to(x.device).long().reshape(-1)
            if len(labels) != len(x) or (len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes)):
                raise ValueError(f"labels must be {len(x)} class indices in 0..{self.num_classes - 1}")
            emb = emb + self.label_emb(labels).to(dtype)
        return x_in.to(dtype), self.emb(emb)


class MLPDiscriminator(_NoiseConditional):
    """Residual MLP for vectors: ``h <- h + W2 silu(W1 silu(h) + E emb)``, ``depth`` blocks, a linear head to 1.

    Args:
        shape: one sample's shape, ``[d]`` (or an int d).
        hidden: width; depth: residual blocks; emb_dim: noise-embedding width.
        spectral_norm: wrap every linear layer with spectral normalisation.
        sigma_floor: the smallest sigma the embedding distinguishes (sigma = 0 is embedded as this).
        sigma_data: data std of the input scaling ``x / sqrt(sigma^2 + sigma_data^2)``.
    """

    def __init__(self, shape: int | Sequence[int], hidden: int = 128, depth: int = 3, emb_dim: int = 32,
                 spectral_norm: bool = False, sigma_floor: float = 1e-3, sigma_data: float = 1.0, num_classes: int = 0):
        shape = [int(shape)] if isinstance(shape, int) else [int(s) for s in shape]
        if len(shape) != 1 or shape[0] <= 0 or hidden <= 0 or depth < 1:
            raise ValueError(f"MLPDiscriminator needs a vector shape [d], hidden > 0, depth >= 1; got {shape}, "
                             f"{hidden}, {depth}")
        super().__init__(shape, emb_dim, spectral_norm, sigma_floor, sigma_data, num_classes)
        self.config = dict(_target_=f"{__name__}.MLPDiscriminator", shape=shape, hidden=hidden, depth=depth,
                           emb_dim=emb_dim, spectral_norm=bool(spectral_norm), sigma_floor=float(sigma_floor),
                           sigma_data=float(sigma_data), num_classes=self.num_classes)
        lin = lambda i, o: self.layer(nn.Linear(i, o))  # noqa: E731
        self.inp = lin(shape[0], hidden)
        self.fc1 = nn.ModuleList(lin(hidden, hidden) for _ in range(depth))
        self.proj = nn.ModuleList(lin(emb_dim, hidden) for _ in range(depth))
        self.fc2 = nn.ModuleList(lin(hidden, hidden) for _ in range(depth))
        self.out = lin(hidden, 1)

    def forward(self, x: Tensor, sigma: float | Tensor, labels: Tensor | None = None) -> Tensor:
        x_in, emb = self.inputs(x, sigma, labels)
        h = self.inp(x_in)
        for fc1, proj, fc2 in zip(self.fc1, self.proj, self.fc2):
            h = h + fc2(F.silu(fc1(F.silu(h)) + proj(emb)))
        return self.out(F.silu(h)).squeeze(-1).to(x.dtype)


class CNNDiscriminator(_NoiseConditional):
    """A small convolutional discriminator for images [C, H, W] (8x8 digits, 28x28, 32x32).

    Per level: two 3x3 convolutions with the noise embedding added in between (``h + conv(silu(conv(silu(h)) +
    E emb))`` after a 1x1 channel change), then a stride-2 convolution except at the last level; adaptive average
    pooling to ``pool x pool``, a linear layer plus the embedding, a linear head to 1.

    Args:
        shape: ``[C, H, W]``.
        base_channels, channel_mults: level i has ``channel_mults[i] * base_channels`` channels.
        emb_dim, spectral_norm, sigma_floor, sigma_data: as :class:`MLPDiscriminator`.
        pool: side of the pooled feature map fed to the head.
    """

    def __init__(self, shape: Sequence[int], base_channels: int = 32, channel_mults: Sequence[int] = (1, 2),
                 emb_dim: int = 64, spectral_norm: bool = False, sigma_floor: float = 1e-3, sigma_data: float = 1.0,
                 pool: int = 4, num_classes: int = 0):
        shape = [int(s) for s in shape]
        channel_mults = [int(m) for m in channel_mults]
        if len(shape) != 3 or min(shape) <= 0 or base_channels <= 0 or not channel_mults or pool < 1:
            raise ValueError(f"CNNDiscriminator needs shape [C, H, W], base_channels > 0, a non-empty channel_mults "
                             f"and pool >= 1; got {shape}, {base_channels}, {channel_mults}, {pool}")
        super().__init__(shape, emb_dim, spectral_norm, sigma_floor, sigma_data, num_classes)
        self.config = dict(_target_=f"{__name__}.CNNDiscriminator", shape=shape, base_channels=base_channels,
                           channel_mults=channel_mults, emb_dim=emb_dim, spectral_norm=bool(spectral_norm),
                           sigma_floor=float(sigma_floor), sigma_data=float(sigma_data), pool=pool,
                           num_classes=self.num_classes)
        conv = lambda i, o, k=3, stride=1: self.layer(nn.Conv2d(i, o, k, stride=stride, padding=k // 2))  # noqa: E731
        self.conv_in = conv(shape[0], base_channels)
        self.levels = nn.ModuleList()
        ch = base_channels
        for i, mult in enumerate(channel_mults):
            out = mult * base_channels
            self.levels.append(nn.ModuleDict(dict(
                skip=conv(ch, out, 1), conv1=conv(out, out), proj=self.layer(nn.Linear(emb_dim, out)),
                conv2=conv(out, out), down=conv(out, out, stride=2) if i < len(channel_mults) - 1 else nn.Identity(),
            )))
            ch = out
        self.pool = int(pool)
        self.fc = self.layer(nn.Linear(ch * pool * pool, ch))
        self.fc_emb = self.layer(nn.Linear(emb_dim, ch))
        self.out = self.layer(nn.Linear(ch, 1))

    def forward(self, x: Tensor, sigma: float | Tensor, labels: Tensor | None = None) -> Tensor:
        x_in, emb = self.inputs(x, sigma, labels)
        h = self.conv_in(x_in)
        for lvl in self.levels:
            h = lvl["skip"](h)
            z = lvl["conv1"](F.silu(h)) + lvl["proj"](emb)[:, :, None, None]
            h = lvl["down"](h + lvl["conv2"](F.silu(z)))
        h = F.adaptive_avg_pool2d(F.silu(h), self.pool).flatten(1)
        h = self.fc(h) + self.fc_emb(emb)
        return self.out(F.silu(h)).squeeze(-1).to(x.dtype)


class FeatureDiscriminator(nn.Module):
    """A discriminator in the space of a frozen feature network: ``d(x, sigma) = h((phi(x) - mean) / std, sigma)``,
    with ``h`` an :class:`MLPDiscriminator` on the standardised features (its noise embedding tells the levels apart).

    For images whose sample quality is judged in a classifier's features (the evaluator's Fréchet distance): a
    pixel-space CNN can keep finding differences those features do not see, and its reward then pulls away from
    what is measured. ``phi`` is never trained (its parameters are frozen and it stays in eval mode); the gradient
    still flows through it to ``x``.

    Args:
        features: the network ``phi: [B, *shape] -> [B, F]`` (e.g. ``FeatureClassifier.features``; an
            ``nn.Module``).
        mean, std: ``[F]`` statistics of ``phi`` on training data (std floored at 1e-6).
        hidden, depth, emb_dim, num_classes: the MLP head's (see :class:`MLPDiscriminator`).
    """

    def __init__(self, features: nn.Module, mean: Tensor, std: Tensor, hidden: int = 128, depth: int = 2,
                 emb_dim: int = 32, num_classes: int = 0):
        super().__init__()
        mean, std = torch.as_tensor(mean, dtype=torch.float32).reshape(-1), torch.as_tensor(std, dtype=torch.float32)
        if std.reshape(-1).shape != mean.shape:
            raise ValueError(f"FeatureDiscriminator: mean and std must have the same size, got {tuple(mean.shape)} "
                             f"and {tuple(std.shape)}")
        self.features = features.eval().requires_grad_(False)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std.reshape(-1).clamp_min(1e-6))
        self.head = MLPDiscriminator([mean.numel()], hidden, depth, emb_dim, sigma_data=1.0, num_classes=num_classes)
        self.num_classes = self.head.num_classes

    def train(self, mode: bool = True) -> "FeatureDiscriminator":
        super().train(mode)
        self.features.eval()
        return self

    def forward(self, x: Tensor, sigma: float | Tensor, labels: Tensor | None = None) -> Tensor:
        phi = self.features(x.to(self.mean.dtype))
        return self.head((phi - self.mean) / self.std, sigma, labels).to(x.dtype)
