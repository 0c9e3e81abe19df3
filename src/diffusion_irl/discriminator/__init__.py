"""Noise-conditional discriminators ``d(x, sigma) -> logit`` (positive = forward-noised data), their balanced
logistic loss, and the Lightning module that trains and checkpoints them (docs/method.md sections 2 and 4)."""
from diffusion_irl.discriminator.module import (DiscriminatorModule, discriminator_loss, forward_noise,
                                                load_discriminator)
from diffusion_irl.discriminator.networks import CNNDiscriminator, MLPDiscriminator

__all__ = [
    "CNNDiscriminator", "DiscriminatorModule", "MLPDiscriminator", "discriminator_loss", "forward_noise",
    "load_discriminator",
]
