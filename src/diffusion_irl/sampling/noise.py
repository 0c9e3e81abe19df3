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


# --- per-sample, counter-based noise (replayable trajectories) ------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _i64(c: int) -> int:
    """An unsigned 64-bit constant as the signed int64 torch stores (multiplication wraps modulo 2^64)."""
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _MIX1, _MIX2 = _i64(0x9E3779B97F4A7C15), _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)


def _srl(z: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _splitmix64(z: Tensor) -> Tensor:
    z = z + _GOLDEN
    z = (z ^ _srl(z, 30)) * _MIX1
    z = (z ^ _srl(z, 27)) * _MIX2
    return z ^ _srl(z, 31)


def counter_normal(seeds: Tensor, key: int, numel: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal draws ``[B, numel]``: row b is a pure function of ``(seeds[b], key)`` (splitmix64 hash of a
    counter, then Box-Muller), so it does not depend on the batch it is drawn in, the device or the draw order."""
    seeds = seeds.to(torch.int64).reshape(-1, 1)
    j = torch.arange(numel, device=seeds.device, dtype=torch.int64).reshape(1, -1)
    base = _splitmix64(_splitmix64(seeds) + int(key) * 0x632BE5AB) + 2 * j

    def uniform(z):  # 53 random bits -> (0, 1)
        return (_srl(_splitmix64(z), 11).to(torch.float64) + 0.5) * 2.0**-53

    u1, u2 = uniform(base), uniform(base + 1)
    return ((-2 * u1.log()).sqrt() * torch.cos(2 * torch.pi * u2)).to(dtype)


class SampleNoise:
    """Per-sample noise streams: sample b's draw for key k depends only on ``(seeds[b], k)`` (:func:`counter_normal`).

    A trajectory of the sampling MDP is therefore replayable from its seed alone, whatever batch it was rolled out
    in. Keys: 0 is the initial noise; step i uses ``STEP_KEYS * (i + 1) + slot`` for its ``slot``-th draw."""

    STEP_KEYS = 8

    def __init__(self, seeds: Tensor):
        self.seeds = seeds.to(torch.int64)

    def draw(self, key: int, like: Tensor) -> Tensor:
        flat = counter_normal(self.seeds.to(like.device), key, like[0].numel(), like.dtype)
        return flat.reshape(like.shape)

    def initial(self, like: Tensor) -> Tensor:
        return self.draw(INITIAL, like)

    def step(self, i: int, like: Tensor, slot: int = 0) -> Tensor:
        if not 0 <= slot < self.STEP_KEYS:
            raise ValueError(f"slot must be in [0, {self.STEP_KEYS}), got {slot}")
        return self.draw(self.STEP_KEYS * (i + 1) + slot, like)

    def subset(self, mask: Tensor) -> "SampleNoise":
        return SampleNoise(self.seeds[mask.to(self.seeds.device)])
