"""Small tensor helpers shared by denoisers, samplers and metrics."""
from __future__ import annotations

import torch
from torch import Tensor


def append_dims(t: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims so that ``t`` (shape [B] or []) broadcasts against an ``ndim`` tensor."""
    missing = ndim - t.ndim
    if missing < 0:
        raise ValueError(f"tensor of {t.ndim} dims cannot be broadcast to {ndim} dims")
    return t.reshape(*t.shape, *([1] * missing))


def batch_sigma(sigma: float | Tensor, x: Tensor) -> Tensor:
    """Return sigma as a tensor of shape [B] on x's device and dtype (a scalar is repeated per sample)."""
    sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or of shape [{x.shape[0]}], got {tuple(sigma.shape)}")
    return sigma
