"""Raw networks ``F(x_in, c_noise, class_labels=None)`` for EDM preconditioning (:class:`~.precond.EDMPrecond`).

Both networks take ``x_in`` [B, *shape] and ``c_noise`` [B] (``log(sigma) / 4``) and return a tensor of x_in's
shape. Class conditioning: ``class_labels`` is a long [B] tensor with values in ``0..num_classes``, where the extra
index ``num_classes`` is the "null" (unconditional) class; ``class_labels=None`` means all-null. Each network keeps
its constructor arguments in ``self.config`` (with ``_target_``) so a checkpoint can rebuild it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FourierEmbedding(nn.Module):
    """Fixed sinusoidal embedding of a scalar: ``[cos(2 pi f_k c), sin(2 pi f_k c)]`` with geometric ``f_k``.

    Frequencies span ``[min_freq, max_freq]``; the default range resolves ``c_noise = log(sigma)/4`` over
    sigma in [1e-3, 1e2] (c_noise in about [-1.7, 1.2]) from coarse to fine.
    """

    def __init__(self, dim: int, min_freq: float = 0.05, max_freq: float = 16.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"embedding dim must be even, got {dim}")
        freqs = torch.exp(torch.linspace(math.log(min_freq), math.log(max_freq), dim // 2))
        self.register_buffer("freqs", 2 * math.pi * freqs, persistent=False)

    def forward(self, c: Tensor) -> Tensor:
        arg = c.reshape(-1, 1).to(self.freqs.dtype) * self.freqs[None]
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class NoiseLabelEmbedding(nn.Module):
    """``emb = MLP(Fourier(c_noise)) + Embedding(label)``: [B] -> [B, emb_dim] (label part only if num_classes > 0)."""

    def __init__(self, emb_dim: int, num_classes: int = 0):
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = int(num_classes)
        self.fourier = FourierEmbedding(emb_dim)
        self.mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None

    def forward(self, c_noise: Tensor, class_labels: Tensor | None, batch: int) -> Tensor:
        c_noise = c_noise.reshape(-1)
        if c_noise.numel() == 1 and batch != 1:
            c_noise = c_noise.expand(batch)
        emb = self.mlp(self.fourier(c_noise).to(self.mlp[0].weight.dtype))
        if self.label is None:
            if class_labels is not None:
                raise ValueError("class_labels given to an unconditional network (num_classes = 0)")
            return emb
        if class_labels is None:
            class_labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=emb.device)
        class_labels = class_labels.reshape(-1).long()
        if class_labels.numel() != batch:
            raise ValueError(f"class_labels must have shape [{batch}], got {tuple(class_labels.shape)}")
        if ((class_labels < 0) | (class_labels > self.num_classes)).any():
            raise ValueError(f"class_labels must lie in 0..{self.num_classes} ({self.num_classes} = null class)")
        return emb + self.label(class_labels)


# -- MLP (low-dimensional data) -----------------------------------------------------------------------------------
class _MLPBlock(nn.Module):
    """Pre-norm residual block: ``h + W2 silu(W1 silu(LN(h)) + E emb)``."""

    def __init__(self, hidden: int, emb_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb = nn.Linear(emb_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        z = self.fc1(F.silu(self.norm(h))) + self.emb(emb)
        return h + self.fc2(F.silu(z))


class MLP(nn.Module):
    """Residual MLP for vectors: ``F(x_in [B, dim], c_noise [B], class_labels) -> [B, dim]``.

    Args:
        dim: data dimension (an int, or a one-element shape list such as ``[2]``).
        hidden: width; depth: number of residual blocks; emb_dim: noise/label embedding width.
        num_classes: 0 for unconditional; otherwise labels ``0..num_classes-1`` plus the null index ``num_classes``.
    """

    def __init__(self, dim: int | Sequence[int], hidden: int = 256, depth: int = 4, emb_dim: int = 64,
                 num_classes: int = 0):
        super().__init__()
        if not isinstance(dim, int):
            dims = list(dim)
            if len(dims) != 1:
                raise ValueError(f"MLP works on vectors: dim must be an int or a one-element shape, got {dims}")
            dim = int(dims[0])
        if dim <= 0 or hidden <= 0 or depth < 1:
            raise ValueError(f"MLP needs dim > 0, hidden > 0, depth >= 1; got {dim}, {hidden}, {depth}")
        self.config = dict(_target_=f"{__name__}.MLP", dim=dim, hidden=hidden, depth=depth, emb_dim=emb_dim,
                           num_classes=num_classes)
        self.dim, self.num_classes = dim, int(num_classes)
        self.embed = NoiseLabelEmbedding(emb_dim, num_classes)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(_MLPBlock(hidden, emb_dim) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, x_in: Tensor, c_noise: Tensor, class_labels: Tensor | None = None) -> Tensor:
        emb = F.silu(self.embed(c_noise, class_labels, x_in.shape[0]))
        h = self.inp(x_in)
        for blk in self.blocks:
            h = blk(h, emb)
        return self.out(F.silu(self.out_norm(h)))


# -- U-Net (images) --------------------------------------------------------------------------------------------------
def _groups(channels: int) -> int:
    """GroupNorm groups: at most 32, at least 4 channels per group where possible, dividing ``channels``."""
    g = max(1, min(32, channels // 4))
    while channels % g:
        g -= 1
    return g


class ResBlock(nn.Module):
    """``skip(h) + conv(drop(silu(GN(conv(silu(GN(h))) + E emb))))``, the second conv zero-initialised."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        z = self.conv1(F.silu(self.norm1(h))) + self.emb(emb)[:, :, None, None]
        z = self.conv2(self.drop(F.silu(self.norm2(z))))
        return self.skip(h) + z


class UNet(nn.Module):
    """A small DDPM-style U-Net: ``F(x_in [B, C, H, W], c_noise [B], class_labels) -> [B, C, H, W]``.

    ``len(channel_mults)`` resolution levels (``channel_mults[i] * base_channels`` channels), ``num_res_blocks``
    ResBlocks per level on the way down and ``num_res_blocks + 1`` on the way up (with skip concatenation), two in the
    middle; strided-conv downsampling, nearest-neighbour + conv upsampling. Inputs whose side is not a multiple of
    ``2^(levels-1)`` are zero-padded on the bottom/right and the output is cropped back, so 8x8, 28x28 and 32x32 all
    work for any depth.
    """

    def __init__(self, in_channels: int, base_channels: int = 32, channel_mults: Sequence[int] = (1, 2),
                 num_res_blocks: int = 1, emb_dim: int = 128, num_classes: int = 0, dropout: float = 0.0):
        super().__init__()
        channel_mults = tuple(int(m) for m in channel_mults)
        if in_channels <= 0 or base_channels <= 0 or not channel_mults or num_res_blocks < 1:
            raise ValueError("UNet needs in_channels > 0, base_channels > 0, a non-empty channel_mults and "
                             f"num_res_blocks >= 1; got {in_channels}, {base_channels}, {channel_mults}, {num_res_blocks}")
        self.config = dict(_target_=f"{__name__}.UNet", in_channels=in_channels, base_channels=base_channels,
                           channel_mults=list(channel_mults), num_res_blocks=num_res_blocks, emb_dim=emb_dim,
                           num_classes=num_classes, dropout=dropout)
        self.in_channels, self.num_classes = int(in_channels), int(num_classes)
        self.factor = 2 ** (len(channel_mults) - 1)
        self.embed = NoiseLabelEmbedding(emb_dim, num_classes)
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        ch = base_channels
        skip_chs = [ch]
        self.down = nn.ModuleList()
        for level, mult in enumerate(channel_mults):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, mult * base_channels, emb_dim, dropout))
                ch = mult * base_channels
                skip_chs.append(ch)
            sample = None
            if level < len(channel_mults) - 1:
                sample = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
                skip_chs.append(ch)
            self.down.append(nn.ModuleDict({"blocks": blocks, "sample": sample or nn.Identity()}))
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout), ResBlock(ch, ch, emb_dim, dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(ch + skip_chs.pop(), mult * base_channels, emb_dim, dropout))
                ch = mult * base_channels
            sample = nn.Conv2d(ch, ch, 3, padding=1) if level > 0 else nn.Identity()
            self.up.append(nn.ModuleDict({"blocks": blocks, "sample": sample}))
        self.norm_out = nn.GroupNorm(_groups(ch), ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x_in: Tensor, c_noise: Tensor, class_labels: Tensor | None = None) -> Tensor:
        if x_in.ndim != 4 or x_in.shape[1] != self.in_channels:
            raise ValueError(f"UNet expects [B, {self.in_channels}, H, W], got {tuple(x_in.shape)}")
        height, width = x_in.shape[-2:]
        pad_h, pad_w = (-height) % self.factor, (-width) % self.factor
        if pad_h or pad_w:
            x_in = F.pad(x_in, (0, pad_w, 0, pad_h))
        emb = F.silu(self.embed(c_noise, class_labels, x_in.shape[0]))

        h = self.conv_in(x_in)
        skips = [h]
        for level in self.down:
            for blk in level["blocks"]:
                h = blk(h, emb)
                skips.append(h)
            if not isinstance(level["sample"], nn.Identity):
                h = level["sample"](h)
                skips.append(h)
        for blk in self.mid:
            h = blk(h, emb)
        for level in self.up:
            for blk in level["blocks"]:
                h = blk(torch.cat([h, skips.pop()], dim=1), emb)
            if not isinstance(level["sample"], nn.Identity):
                h = level["sample"](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        out = self.conv_out(F.silu(self.norm_out(h)))
        return out[..., :height, :width]
