"""Wrappers that turn a raw network into the project's one object, the denoiser ``D(x, sigma) ~ E[x0 | x]``.

Contract (docs/method.md section 1): ``D(x, sigma, class_labels=None)`` takes ``x`` [B, *shape] and ``sigma`` (a float,
a 0-d tensor or a [B] tensor) and returns a tensor of x's shape and dtype; ``D.shape`` is one sample's shape.
Samplers call only ``D(x, sigma)``.

- :class:`EDMPrecond`: ``D(x, s) = c_skip(s) x + c_out(s) F(c_in(s) x, c_noise(s))`` (Karras et al. 2022, Table 1).
- :class:`VPEpsDenoiser`: a discrete-time VP epsilon-prediction network (DDPM, diffusers ``UNet2DModel``) seen through
  the change of variables ``x_vp = x / sqrt(1 + sigma^2)``, ``t = t(sigma)``, ``D = x - sigma eps(x_vp, t)``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from diffusion_irl.tensors import append_dims, batch_sigma


def edm_coefficients(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EDM preconditioning ``(c_skip, c_out, c_in, c_noise)`` for sigma of any shape (elementwise).

    ``c_skip = sd^2 / (s^2 + sd^2)``, ``c_out = s sd / sqrt(s^2 + sd^2)``, ``c_in = 1 / sqrt(s^2 + sd^2)``,
    ``c_noise = log(s) / 4``.
    """
    sd2 = sigma_data**2
    var = sigma**2 + sd2
    c_skip = sd2 / var
    c_out = sigma * sigma_data / var.sqrt()
    c_in = var.rsqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def edm_loss_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """EDM loss weight ``lambda(s) = 1 / c_out(s)^2 = (s^2 + sd^2) / (s sd)^2``."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def _param_dtype(module: nn.Module, default: torch.dtype) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    return default


def _check_shape(x: Tensor, shape: tuple[int, ...], who: str) -> None:
    if tuple(x.shape[1:]) != shape:
        raise ValueError(f"{who} expects x of shape [B, {', '.join(map(str, shape))}], got {tuple(x.shape)}")


class EDMPrecond(nn.Module):
    """EDM-preconditioned denoiser around a raw network ``net(x_in [B, *shape], c_noise [B], class_labels=None)``.

    Args:
        net: the raw network F (its output has the shape of its input).
        sigma_data: data standard deviation ``sd``.
        shape: one sample's shape, e.g. ``(2,)`` or ``(1, 8, 8)``.

    The coefficients are computed in x's dtype; the network runs in its own parameter dtype and its output is cast
    back, so ``D(x, s)`` has x's shape and dtype.
    """

    def __init__(self, net: nn.Module, sigma_data: float, shape: Sequence[int]):
        super().__init__()
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.net = net
        self.sigma_data = float(sigma_data)
        self.shape = tuple(int(s) for s in shape)

    @property
    def num_classes(self) -> int:
        """Number of classes the network is conditioned on (0: unconditional; index ``num_classes`` is "null")."""
        return int(getattr(self.net, "num_classes", 0) or 0)

    def forward(self, x: Tensor, sigma: float | Tensor, class_labels: Tensor | None = None) -> Tensor:
        _check_shape(x, self.shape, "EDMPrecond")
        s = batch_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = edm_coefficients(s, self.sigma_data)
        dtype = _param_dtype(self.net, x.dtype)
        f = self.net((append_dims(c_in, x.ndim) * x).to(dtype), c_noise.to(dtype), class_labels=class_labels)
        return append_dims(c_skip, x.ndim) * x + append_dims(c_out, x.ndim) * f.to(x.dtype)

    def extra_repr(self) -> str:
        return f"sigma_data={self.sigma_data}, shape={self.shape}"


class VPEpsDenoiser(nn.Module):
    """A discrete-time VP epsilon-prediction network as an EDM denoiser.

    ``sigma_t = sqrt((1 - abar_t) / abar_t)`` for ``t = 0..T-1`` is the discrete table (ascending in t). For any
    sigma, ``t(sigma)`` interpolates linearly in ``log sigma`` between neighbouring table entries (continuous t,
    clamped to ``[0, T-1]``); a sigma equal to a table entry (up to float32 rounding, relative 1e-6) maps to its exact
    integer t. Then ``D(x, sigma) = x - sigma * eps(x / sqrt(1 + sigma^2), t(sigma))``.

    Args:
        eps_model: ``eps_model(x_vp, t [B], **kw)`` returning a tensor or an object with ``.sample`` (diffusers);
            class labels are passed as ``class_labels=`` when given.
        alphas_cumprod: [T] cumulative products ``abar_t``, decreasing, in (0, 1].
        shape: one sample's shape.
        num_classes: classes the model is conditioned on (0: unconditional).
    """

    _SNAP_RTOL = 1e-6

    def __init__(self, eps_model: nn.Module, alphas_cumprod: Tensor | Sequence[float], shape: Sequence[int],
                 num_classes: int = 0):
        super().__init__()
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if abar.numel() < 2:
            raise ValueError(f"alphas_cumprod needs at least 2 entries, got {abar.numel()}")
        if not ((abar > 0) & (abar <= 1)).all():
            raise ValueError("alphas_cumprod must lie in (0, 1] (an entry of 0 means sigma = inf, e.g. a zero-SNR "
                             "schedule, which this adapter does not support)")
        sigmas = ((1 - abar) / abar).sqrt()
        if not (sigmas[1:] > sigmas[:-1]).all():
            raise ValueError("alphas_cumprod must be strictly decreasing (sigma_t strictly increasing in t)")
        if sigmas[0] <= 0:
            raise ValueError("alphas_cumprod[0] must be < 1 (sigma_0 must be > 0)")
        self.eps_model = eps_model
        self.shape = tuple(int(s) for s in shape)
        self.num_classes = int(num_classes)
        self.register_buffer("alphas_cumprod", abar, persistent=False)
        self.register_buffer("sigmas", sigmas, persistent=False)
        self.register_buffer("log_sigmas", sigmas.log(), persistent=False)

    @property
    def num_timesteps(self) -> int:
        return self.sigmas.numel()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: float | Tensor) -> Tensor:
        """Continuous timestep for sigma (any shape; returned in the table's dtype, same shape)."""
        sigma = torch.as_tensor(sigma, device=self.log_sigmas.device, dtype=self.log_sigmas.dtype)
        log_sigma = sigma.clamp(min=torch.finfo(sigma.dtype).tiny).log()
        ls = self.log_sigmas
        hi = torch.searchsorted(ls, log_sigma.reshape(-1).contiguous()).clamp(1, ls.numel() - 1).reshape(sigma.shape)
        lo = hi - 1
        w = ((log_sigma - ls[lo]) / (ls[hi] - ls[lo])).clamp(0, 1)
        t = lo.to(ls.dtype) + w
        # Snap sigmas that are a table entry up to float32 rounding onto their exact integer timestep.
        nearest = t.round().long().clamp(0, ls.numel() - 1)
        close = (sigma - self.sigmas[nearest]).abs() <= self._SNAP_RTOL * self.sigmas[nearest]
        return torch.where(close, nearest.to(t.dtype), t)

    def t_to_sigma(self, t: float | Tensor) -> Tensor:
        """Inverse of :meth:`sigma_to_t`: log-linear interpolation of the table at continuous t in ``[0, T-1]``."""
        t = torch.as_tensor(t, device=self.log_sigmas.device, dtype=self.log_sigmas.dtype).clamp(0, self.num_timesteps - 1)
        lo = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - lo.to(t.dtype)
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[lo + 1]).exp()

    def forward(self, x: Tensor, sigma: float | Tensor, class_labels: Tensor | None = None) -> Tensor:
        _check_shape(x, self.shape, "VPEpsDenoiser")
        s = batch_sigma(sigma, x)
        # One noise level for the whole batch (a scalar expanded to [B], as the samplers pass it): t(sigma) once.
        shared = s.numel() > 1 and s.stride(0) == 0
        t = self.sigma_to_t(s[:1]).expand(s.shape) if shared else self.sigma_to_t(s)
        dtype = _param_dtype(self.eps_model, x.dtype)
        x_vp = x / append_dims((1 + s**2).sqrt(), x.ndim)
        kwargs = {} if class_labels is None else {"class_labels": class_labels}
        eps = self.eps_model(x_vp.to(dtype), t.to(dtype), **kwargs)
        eps = getattr(eps, "sample", eps)
        return x - append_dims(s, x.ndim) * eps.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"shape={self.shape}, T={self.num_timesteps}, sigma_min={self.sigma_min:.4g}, "
                f"sigma_max={self.sigma_max:.4g}")
