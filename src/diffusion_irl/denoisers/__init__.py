"""Denoisers ``D(x, sigma) ~ E[x0 | x]``: EDM/VP wrappers, raw networks, the training module, pretrained loaders."""
from diffusion_irl.denoisers.module import DenoiserModule, load_denoiser
from diffusion_irl.denoisers.networks import MLP, UNet
from diffusion_irl.denoisers.precond import EDMPrecond, VPEpsDenoiser, edm_coefficients, edm_loss_weight
from diffusion_irl.denoisers.pretrained import load_diffusers_denoiser

__all__ = [
    "DenoiserModule", "EDMPrecond", "MLP", "UNet", "VPEpsDenoiser", "edm_coefficients", "edm_loss_weight",
    "load_denoiser", "load_diffusers_denoiser",
]
