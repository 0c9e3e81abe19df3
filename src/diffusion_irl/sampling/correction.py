"""A learned correction of the denoiser: ``D'(x, sigma) = D(x, sigma) + g(x, sigma)`` with a small network ``g`` whose
last layer starts at zero (so ``D' = D`` before any training). The pathwise tuner trains ``g`` with the schedule
(``tuner.correction=true``) by the gradient of its data-driven reward: a schedule alone cannot move the samples
past the denoiser's own errors, a correction can. ``g`` is an MLP for vectors (:class:`Correction`) and a small CNN
for images (:class:`ConvCorrection`); :func:`correction_for` picks by the samples' shape.

A sampler carries its correction (``sampler.correction``; :func:`with_correction`): every ``sample`` call then runs
on ``D'``, one call of ``g`` beside each denoiser evaluation, so the NFE count is unchanged (``g`` is small: its
parameter count is printed beside the tuned row). :func:`save_correction` / :func:`load_correction` keep it beside
the tuned ``schedule.json``.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn


class Correction(nn.Module):
    """``g(x, sigma)`` for vectors of ``dims`` coordinates: an MLP on ``(x / sqrt(sigma^2 + 1), log(sigma) / 4)``
    (EDM's input scaling, data of unit scale) with ``depth`` hidden layers of ``hidden`` units; its last layer is
    zero, so ``g = 0`` at initialisation. ``inputs="denoised"``: the denoiser's own output ``D(x, sigma)`` is a third
    input, ``g(x, sigma, D)`` (no extra evaluation: it is the value being corrected), so a correction that only
    depends on where ``D`` points, e.g. a pull of a blurred denoised point toward the data, is a simple function of
    the inputs.

    ``scaling="edm"``: the network's output is multiplied by EDM's ``c_out(sigma) = sigma sigma_data /
    sqrt(sigma^2 + sigma_data^2)``, the factor the denoiser's own network output carries, so the correction vanishes
    with ``sigma`` (it cannot blur the last steps, where ``D`` is the sample) and the denoiser's loss weight
    ``lambda = 1 / c_out^2`` gives every level the same scale (``none``: the raw output)."""

    INPUTS = ("state", "denoised")
    SCALINGS = ("none", "edm")

    def __init__(self, dims: int, hidden: int = 64, depth: int = 2, inputs: str = "state", scaling: str = "none",
                 sigma_data: float = 1.0):
        super().__init__()
        if int(dims) < 1:
            raise ValueError(f"a correction needs dims >= 1, got {dims}")
        _check_settings(hidden, depth, inputs, scaling, sigma_data)
        self.dims, self.hidden, self.depth, self.inputs = int(dims), int(hidden), int(depth), inputs
        self.scaling, self.sigma_data = scaling, float(sigma_data)
        layers, width = [], self.dims * (2 if inputs == "denoised" else 1) + 1
        for _ in range(self.depth):
            layers += [nn.Linear(width, self.hidden), nn.SiLU()]
            width = self.hidden
        last = nn.Linear(width, self.dims)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)

    def forward(self, x: Tensor, sigma, denoised: Tensor | None = None) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.dims:
            raise ValueError(f"this correction is for [B, {self.dims}] states, got {list(x.shape)}")
        _check_denoised(self.inputs, denoised)
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1).expand(len(x), 1)
        parts = [x / torch.sqrt(sigma**2 + 1)] + ([denoised] if denoised is not None else []) + [torch.log(sigma) / 4]
        h = torch.cat(parts, dim=1)
        return _scaled(self.net(h.to(self.net[-1].weight.dtype)).to(x.dtype), sigma, self.scaling, self.sigma_data)


def _scaled(out: Tensor, sigma: Tensor, scaling: str, sigma_data: float) -> Tensor:
    """``out`` times EDM's ``c_out(sigma)`` (``scaling="edm"``; ``sigma`` broadcast over ``out``'s trailing dims)."""
    if scaling != "edm":
        return out
    return out * (sigma * sigma_data / torch.sqrt(sigma**2 + sigma_data**2))


def _check_denoised(inputs: str, denoised: Tensor | None) -> None:
    """The denoised point is passed exactly when the correction's ``inputs`` are ``denoised``."""
    if (denoised is not None) != (inputs == "denoised"):
        raise ValueError(f"this correction's inputs are {inputs!r}: the denoised point is "
                         f"{'required' if inputs == 'denoised' else 'not an input'}")


def _check_settings(hidden: int, depth: int, inputs: str, scaling: str, sigma_data: float) -> None:
    if int(hidden) < 1 or int(depth) < 1:
        raise ValueError(f"a correction needs hidden, depth >= 1, got {hidden}, {depth}")
    if inputs not in Correction.INPUTS:
        raise ValueError(f"a correction's inputs must be one of {Correction.INPUTS}, got {inputs!r}")
    if scaling not in Correction.SCALINGS:
        raise ValueError(f"a correction's scaling must be one of {Correction.SCALINGS}, got {scaling!r}")
    if not (math.isfinite(sigma_data) and sigma_data > 0):
        raise ValueError(f"a correction's sigma_data must be > 0, got {sigma_data}")


class ConvCorrection(nn.Module):
    """``g(x, sigma[, D])`` for images ``[B, C, H, W]``: ``depth`` 3x3 convolutions of ``hidden`` channels (SiLU) on
    ``x / sqrt(sigma^2 + sigma_data^2)`` (EDM's input scaling), the denoised image ``D(x, sigma) / sigma_data``
    (``inputs="denoised"``) and a constant channel ``log(sigma) / 4``, then a 3x3 convolution to ``C`` channels that
    starts at zero (so ``g = 0`` at initialisation); ``scaling`` as for :class:`Correction`. It has no labels: for a
    class-conditional denoiser it sees the class through ``D``'s output (``inputs="denoised"``)."""

    def __init__(self, shape, hidden: int = 32, depth: int = 2, inputs: str = "state", scaling: str = "none",
                 sigma_data: float = 1.0):
        super().__init__()
        shape = tuple(int(v) for v in shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"a convolutional correction is for images [C, H, W], got shape {list(shape)}")
        _check_settings(hidden, depth, inputs, scaling, sigma_data)
        self.shape, self.hidden, self.depth, self.inputs = shape, int(hidden), int(depth), inputs
        self.scaling, self.sigma_data = scaling, float(sigma_data)
        channels = shape[0]
        layers, width = [], channels * (2 if inputs == "denoised" else 1) + 1
        for _ in range(self.depth):
            layers += [nn.Conv2d(width, self.hidden, 3, padding=1), nn.SiLU()]
            width = self.hidden
        last = nn.Conv2d(width, channels, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)

    def forward(self, x: Tensor, sigma, denoised: Tensor | None = None) -> Tensor:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"this correction is for [B, {', '.join(map(str, self.shape))}] images, got "
                             f"{list(x.shape)}")
        _check_denoised(self.inputs, denoised)
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1).expand(len(x), 1, 1, 1)
        parts = [x / torch.sqrt(sigma**2 + self.sigma_data**2)]
        parts += [denoised / self.sigma_data] if denoised is not None else []
        parts += [(torch.log(sigma) / 4).expand(len(x), 1, *x.shape[2:])]
        out = self.net(torch.cat(parts, dim=1).to(self.net[-1].weight.dtype)).to(x.dtype)
        return _scaled(out, sigma, self.scaling, self.sigma_data)


def correction_for(shape, hidden: int, depth: int, inputs: str = "state", scaling: str = "none",
                   sigma_data: float = 1.0) -> nn.Module:
    """A zero correction for samples of ``shape``: :class:`Correction` (an MLP) for vectors ``[D]``,
    :class:`ConvCorrection` for images ``[C, H, W]``."""
    shape = tuple(int(v) for v in shape)
    if len(shape) == 1:
        return Correction(shape[0], hidden, depth, inputs, scaling, sigma_data)
    if len(shape) == 3:
        return ConvCorrection(shape, hidden, depth, inputs, scaling, sigma_data)
    raise ValueError(f"a correction is for vectors [D] or images [C, H, W], got shape {list(shape)}")


class CorrectedDenoiser(nn.Module):
    """``denoiser(x, sigma, ...) + correction(x, sigma)``; a class-conditional denoiser's labels pass through to it
    (the correction itself is unconditional)."""

    def __init__(self, denoiser: Callable, correction: nn.Module):
        super().__init__()
        self.denoiser, self.correction = denoiser, correction

    @property
    def num_classes(self) -> int:
        return int(getattr(self.denoiser, "num_classes", 0) or 0)

    def forward(self, x: Tensor, sigma, *args, **kwargs) -> Tensor:
        return add_correction(self.correction, x, sigma, self.denoiser(x, sigma, *args, **kwargs))


def add_correction(correction: nn.Module, x: Tensor, sigma, denoised: Tensor) -> Tensor:
    """``denoised + g(x, sigma)``, or ``denoised + g(x, sigma, denoised)`` for a correction whose ``inputs`` are
    ``denoised``: the corrected value of a denoiser output already computed."""
    if getattr(correction, "inputs", "state") == "denoised":
        return denoised + correction(x, sigma, denoised)
    return denoised + correction(x, sigma)


def corrected(denoiser: Callable, correction: nn.Module | None) -> Callable:
    """``denoiser`` with ``correction`` added, or ``denoiser`` itself without one."""
    return denoiser if correction is None else CorrectedDenoiser(denoiser, correction)


def with_correction(sampler, correction: nn.Module | None):
    """A shallow copy of ``sampler`` whose ``sample`` runs on the corrected denoiser (the original is untouched)."""
    out = copy.copy(sampler)
    out.correction = correction
    return out


def frozen_copy(correction: nn.Module) -> nn.Module:
    """A detached copy in eval mode with no gradients (a checkpoint of a correction under training)."""
    out = copy.deepcopy(correction).eval()
    for p in out.parameters():
        p.requires_grad_(False)
    return out


def save_correction(correction: Correction | ConvCorrection, path: str | Path) -> None:
    size = ({"shape": list(correction.shape)} if isinstance(correction, ConvCorrection) else {"dims": correction.dims})
    torch.save({**size, "hidden": correction.hidden, "depth": correction.depth,
                "inputs": correction.inputs, "scaling": correction.scaling, "sigma_data": correction.sigma_data,
                "state_dict": {k: v.detach().cpu() for k, v in correction.state_dict().items()}}, str(path))


def load_correction(path: str | Path) -> Correction | ConvCorrection:
    """A correction written by :func:`save_correction`."""
    if not Path(path).is_file():
        raise ValueError(f"correction {path}: no such file")
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    out = correction_for(state["shape"] if "shape" in state else [state["dims"]], state["hidden"], state["depth"],
                         state.get("inputs", "state"), state.get("scaling", "none"), state.get("sigma_data", 1.0))
    out.load_state_dict(state["state_dict"])
    return frozen_copy(out)


def correction_scale(correction: nn.Module | None) -> float:
    """The size of the last layer's weights (0 at initialisation): how far a correction has moved."""
    if correction is None:
        return 0.0
    last = [m for m in correction.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    with torch.no_grad():
        return float(math.sqrt(float(last.weight.pow(2).sum() + last.bias.pow(2).sum())))
