"""The exact Gaussian-mixture denoiser (docs/method.md section 1): the project's oracle."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from diffusion_irl.data.toy2d import GaussianMixture


class AnalyticDenoiser(nn.Module):
    """``D(x, sigma) = E[x0 | x]`` in closed form for a Gaussian-mixture data law (computed in float64)."""

    def __init__(self, law: GaussianMixture):
        super().__init__()
        if not isinstance(law, GaussianMixture):
            raise TypeError(f"the analytic denoiser needs a GaussianMixture law, got {law!r}")
        self.law = law
        self.shape = (law.dim,)

    def forward(self, x: Tensor, sigma, class_labels=None) -> Tensor:
        sigma = torch.as_tensor(sigma, device=x.device)
        return self.law.denoise(x.double(), sigma.double()).to(x.dtype)

    def extra_repr(self) -> str:
        return repr(self.law)


def analytic_denoiser(data) -> AnalyticDenoiser:
    """Build the exact denoiser of ``data`` (a datamodule whose ``law`` is a Gaussian mixture); anything else is
    refused with one clear error."""
    law = getattr(data, "law", None)
    name = getattr(data, "name", type(data).__name__)
    if not isinstance(law, GaussianMixture):
        raise ValueError(
            f"denoiser=analytic is exact only for Gaussian-mixture data (data=gmm8, gmm25 or gmm); data={name} "
            f"is not one. Use a trained denoiser instead (denoiser=checkpoint denoiser.path=...)."
        )
    return AnalyticDenoiser(law)
