"""Guidance as denoiser wrappers: samplers only ever see ``D(x, sigma)`` (docs/method.md section 2).

- :class:`DGDenoiser`: discriminator guidance (Kim et al. 2023) in EDM form,
  ``D_dg(x, s) = D(x, s) + w s^2 grad_x l(x, s)`` inside a sigma window, ``D`` outside. Since
  ``D = x + s^2 grad log q_s``, a logit equal to ``log q_A,s - log q_B,s`` turns the denoiser of B into the denoiser
  of A *exactly* at ``w = 1`` (the tests check this on Gaussian mixtures, where both sides are closed forms).
- :class:`CFGDenoiser`: classifier-free guidance ``D_u + w (D_c - D_u)`` in one batched call of 2B rows (w = 1 is
  exactly the conditional denoiser, w = 0 exactly the unconditional one).
- :class:`DiscriminatorGuided`: any base sampler run on ``DGDenoiser(D, d)``; its config is ``conf/sampler/dg.yaml``.
  It is not in ``conf/evaluate.yaml``'s default list because it needs a trained discriminator
  (``python -m diffusion_irl.train_discriminator``); add it to an evaluation with::

      python -m diffusion_irl.evaluate +sampler@samplers.dg=dg \\
          samplers.dg.discriminator_path=outputs/train_discriminator/<date>/<time>/checkpoints/last.ckpt \\
          'evaluate.samplers=[heun,dg]'

  The evaluator counts one NFE per guided call (the discriminator is not a denoiser evaluation; its calls are
  counted separately in ``DGDenoiser.disc_evals``).
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
from torch import Tensor, nn

from diffusion_irl.sampling.noise import NoiseStream
from diffusion_irl.sampling.samplers import SampleOutput, Sampler
from diffusion_irl.tensors import append_dims, batch_sigma


def _per_sample(value: float | Tensor, x: Tensor, what: str) -> Tensor:
    """A float or a [B] tensor as a [B] tensor in x's dtype and device."""
    t = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        return t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"{what} must be a float or of shape [{x.shape[0]}], got {tuple(t.shape)}")
    return t


def _dtype_of(module: nn.Module, default: torch.dtype) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    return default


def _call_denoiser(denoiser: Callable, x: Tensor, sigma, class_labels: Tensor | None) -> Tensor:
    return denoiser(x, sigma) if class_labels is None else denoiser(x, sigma, class_labels=class_labels)


class DGDenoiser(nn.Module):
    """``D + w sigma^2 grad_x logit(x, sigma)`` for samples with ``sigma_min <= sigma <= sigma_max``, ``D`` elsewhere.

    Args:
        denoiser: ``D(x, sigma[, class_labels])``.
        discriminator: ``d(x, sigma) -> logit [B]``, positive on the target law (forward-noised data).
        weight: ``w``, a float or a per-sample [B] tensor (may be changed between calls, e.g. by a policy).
        sigma_min, sigma_max: the guidance window (inclusive).

    Works inside ``torch.no_grad()``: the gradient is taken under ``torch.enable_grad()`` on a detached copy of x
    and the correction is detached. The discriminator is not evaluated when no sample is guided.
    """

    nfe_per_call = 1  # the discriminator is not a denoiser evaluation: see disc_evals

    def __init__(self, denoiser: Callable, discriminator: Callable, weight: float | Tensor = 1.0,
                 sigma_min: float = 0.0, sigma_max: float = math.inf):
        super().__init__()
        if not 0 <= sigma_min <= sigma_max:
            raise ValueError(f"guidance window needs 0 <= sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
        self.denoiser, self.discriminator = denoiser, discriminator
        self.weight, self.sigma_min, self.sigma_max = weight, float(sigma_min), float(sigma_max)
        self.disc_evals = 0

    @property
    def shape(self):
        return getattr(self.denoiser, "shape", None)

    def logit_grad(self, x: Tensor, sigma: Tensor) -> Tensor:
        """``grad_x logit(x, sigma)`` (detached, x's dtype), whatever the grad mode outside."""
        dtype = _dtype_of(self.discriminator, x.dtype) if isinstance(self.discriminator, nn.Module) else x.dtype
        with torch.enable_grad():
            xg = x.detach().to(dtype).requires_grad_(True)
            logit = self.discriminator(xg, sigma.detach().to(dtype))
            (grad,) = torch.autograd.grad(logit.sum(), xg)
        self.disc_evals += 1
        return grad.detach().to(x.dtype)

    def forward(self, x: Tensor, sigma: float | Tensor, class_labels: Tensor | None = None) -> Tensor:
        s = batch_sigma(sigma, x)
        d = _call_denoiser(self.denoiser, x, sigma, class_labels)
        w = _per_sample(self.weight, x, "guidance weight")
        w = torch.where((s >= self.sigma_min) & (s <= self.sigma_max), w, torch.zeros_like(w))
        if not bool((w != 0).any()):
            return d
        return d + append_dims(w * s**2, x.ndim) * self.logit_grad(x, s)

    def extra_repr(self) -> str:
        return f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}"


class CFGDenoiser(nn.Module):
    """Classifier-free guidance ``D_u + w (D_c - D_u)``, computed as ``lerp(D_u, D_c, w)`` from one call on 2B rows.

    Args:
        denoiser: a class-conditional ``D(x, sigma, class_labels)`` whose null class is ``num_classes``.
        class_labels: [B] long, values in ``0..num_classes-1``.
        weight: ``w``, a float or [B] (1: the conditional denoiser, 0: the unconditional one, > 1: guided).
        num_classes: number of real classes (the null label index).
    """

    nfe_per_call = 2

    def __init__(self, denoiser: Callable, class_labels: Tensor, weight: float | Tensor, num_classes: int):
        super().__init__()
        class_labels = torch.as_tensor(class_labels).long().reshape(-1)
        if num_classes < 1 or ((class_labels < 0) | (class_labels >= num_classes)).any():
            raise ValueError(f"class_labels must lie in 0..{num_classes - 1} (num_classes={num_classes})")
        self.denoiser, self.class_labels, self.weight, self.num_classes = denoiser, class_labels, weight, int(num_classes)

    @property
    def shape(self):
        return getattr(self.denoiser, "shape", None)

    def forward(self, x: Tensor, sigma: float | Tensor, class_labels: Tensor | None = None) -> Tensor:
        b = x.shape[0]
        labels = (self.class_labels if class_labels is None else class_labels.long().reshape(-1)).to(x.device)
        if labels.shape != (b,):
            raise ValueError(f"CFGDenoiser has {labels.numel()} class labels for a batch of {b}")
        s = batch_sigma(sigma, x)
        out = self.denoiser(torch.cat([x, x]), torch.cat([s, s]),
                            class_labels=torch.cat([labels, torch.full_like(labels, self.num_classes)]))
        cond, uncond = out[:b], out[b:]
        return torch.lerp(uncond, cond, append_dims(_per_sample(self.weight, x, "guidance weight"), x.ndim))


class DiscriminatorGuided(Sampler):
    """A base sampler run on :class:`DGDenoiser` (discriminator guidance); same schedule, steps and planned NFE.

    Args:
        base: the sampler to guide (Euler, Heun, ...).
        discriminator_path: a checkpoint of ``python -m diffusion_irl.train_discriminator``, loaded lazily (at the
            first ``sample``) with :func:`~diffusion_irl.discriminator.load_discriminator`.
        discriminator: a ready ``d(x, sigma) -> logit`` (wins over the path).
        weight, sigma_min, sigma_max: as :class:`DGDenoiser`; ``sigma_max=None`` means no upper bound.
    """

    name = "dg"

    def __init__(self, base: Sampler, discriminator_path: str | os.PathLike | None = None,
                 discriminator: Callable | None = None, weight: float = 1.0, sigma_min: float = 0.0,
                 sigma_max: float | None = math.inf):
        if not isinstance(base, Sampler):
            raise TypeError(f"sampler.base must be a Sampler, got {type(base).__name__}")
        sigma_max = math.inf if sigma_max is None else float(sigma_max)
        if not 0 <= sigma_min <= sigma_max:
            raise ValueError(f"dg needs 0 <= sigma_min <= sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        if not math.isfinite(weight):
            raise ValueError(f"dg weight must be finite, got {weight}")
        if discriminator is None and discriminator_path is not None and not os.path.isfile(discriminator_path):
            raise FileNotFoundError(f"discriminator_path: no checkpoint at {os.fspath(discriminator_path)!r}")
        super().__init__(base.schedule)
        self.base, self.discriminator_path, self._discriminator = base, discriminator_path, discriminator
        self.weight, self.sigma_min, self.sigma_max = float(weight), float(sigma_min), sigma_max
        self.stochastic, self.min_steps = base.stochastic, base.min_steps

    def planned_nfe(self, steps: int) -> int:
        return self.base.planned_nfe(steps)

    def steps_for_budget(self, nfe: int, max_steps: int = 100_000) -> int | None:
        return self.base.steps_for_budget(nfe, max_steps)

    def sigmas(self, steps: int) -> Tensor:
        return self.base.sigmas(steps)

    def discriminator(self, device: torch.device | str = "cpu") -> Callable:
        """The discriminator (loaded from ``discriminator_path`` on first use), on ``device``."""
        if self._discriminator is None:
            if self.discriminator_path is None:
                raise ValueError("the dg sampler needs a trained discriminator: set discriminator_path (e.g. "
                                 "samplers.dg.discriminator_path=outputs/train_discriminator/.../checkpoints/last.ckpt)")
            from diffusion_irl.discriminator.module import load_discriminator

            self._discriminator = load_discriminator(self.discriminator_path)
        if isinstance(self._discriminator, nn.Module):
            self._discriminator = self._discriminator.to(device)
        return self._discriminator

    def guided(self, denoiser: Callable, device: torch.device | str = "cpu") -> DGDenoiser:
        return DGDenoiser(denoiser, self.discriminator(device), self.weight, self.sigma_min, self.sigma_max)

    def sample(self, denoiser: Callable, shape: tuple[int, ...], steps: int, noise: NoiseStream,
               callback: Callable | None = None, trajectory: bool = False, x_init: Tensor | None = None) -> SampleOutput:
        device = x_init.device if x_init is not None else getattr(noise, "device", "cpu")
        return self.base.sample(self.guided(denoiser, device), shape, steps, noise, callback=callback,
                                trajectory=trajectory, x_init=x_init)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(base={self.base!r}, weight={self.weight}, sigma_min={self.sigma_min}, "
                f"sigma_max={self.sigma_max}, discriminator_path={self.discriminator_path!r})")
