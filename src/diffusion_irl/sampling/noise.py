"""Common random numbers: a seeded noise stream keyed by step, so every sampler sees the same noise.

``NoiseStream(seed)`` draws the noise of key ``k`` from a generator seeded by ``(seed, k)`` alone. Two samplers
with the same seed and batch therefore start from the same initial noise (key 0) and, at step ``i``, inject the
same standard normal draw (key ``i + 1``), whatever they did before. Trajectories can be replayed from the seed.
"""
from __future__ import annotations

import torch
from torch import Tensor

INITIAL = 0  # key of the initial noise; step i uses key i + 1; extra draws (Restart jumps) use EXTRA + j
EXTRA = 1 << 20


class NoiseStream:
    def __init__(self, seed: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.seed, self.device, self.dtype = int(seed), torch.device(device), dtype

    def _generator(self, key: int) -> torch.Generator:
        # a large odd multiplier keeps (seed, key) pairs from colliding for any realistic seed and key
        return torch.Generator(device=self.device).manual_seed((self.seed * 0x9E3779B1 + int(key)) % (2**63 - 1))

    def draw(self, key: int, shape: tuple[int, ...]) -> Tensor:
        return torch.randn(shape, generator=self._generator(key), device=self.device, dtype=self.dtype)

    def initial(self, shape: tuple[int, ...]) -> Tensor:
        """Standard normal initial noise (multiply by sigma_max)."""
        return self.draw(INITIAL, shape)

    def step(self, i: int, like: Tensor) -> Tensor:
        """The standard normal draw of solver step ``i``, shaped like ``like``."""
        return self.draw(i + 1, tuple(like.shape)).to(like.dtype)

    def extra(self, j: int, like: Tensor) -> Tensor:
        return self.draw(EXTRA + j, tuple(like.shape)).to(like.dtype)
