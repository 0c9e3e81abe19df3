"""Common random numbers: a seeded noise stream keyed by step, so every sampler sees the same noise.

``NoiseStream(seed)`` draws the noise of key ``k`` from a generator seeded by ``(seed, k)`` alone. Two samplers
with the same seed and batch therefore start from the same initial noise (key 0) and, at step ``i``, inject the
same standard normal draw (key ``i + 1``), whatever they did before. Trajectories can be replayed from the seed.

``NoiseStream(seed, seeds=per_sample)`` (int64 ``[B]``, e.g. from :func:`diffusion_irl.seeding.sample_seeds`)
draws row ``b`` of key ``k`` from ``(per_sample[b], k)`` alone (:func:`counter_normal`), like EDM's per-sample
generators: sample ``i`` gets the same initial and per-step noise whatever batch, chunk or process draws it.
"""
from __future__ import annotations

import math
from enum import IntEnum

import torch
from torch import Tensor

INITIAL = 0  # key of the initial noise; step i uses key i + 1; extra draws (Restart jumps) use EXTRA + j
EXTRA = 1 << 20


class NoiseStream:
    """Standard normal draws keyed by ``(seed, key)`` (one generator per key, the batch drawn at once) or, with
    ``seeds``, by ``(seeds[b], key)`` per row ``b`` (batch-size independent). ``seed`` defaults to ``seeds[0]``."""

    def __init__(self, seed: int | None = None, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 seeds: Tensor | None = None):
        if seed is None and seeds is None:
            raise ValueError("NoiseStream needs a seed or per-sample seeds")
        self.device, self.dtype = torch.device(device), dtype
        self.seeds = None
        if seeds is not None:
            self.seeds = torch.as_tensor(seeds).to(device=self.device, dtype=torch.int64).reshape(-1)
            if self.seeds.numel() == 0:
                raise ValueError("NoiseStream: seeds is empty")
        self.seed = int(seed) if seed is not None else int(self.seeds[0])

    def _generator(self, key: int) -> torch.Generator:
        # a large odd multiplier keeps (seed, key) pairs from colliding for any realistic seed and key
        return torch.Generator(device=self.device).manual_seed((self.seed * 0x9E3779B1 + int(key)) % (2**63 - 1))

    def draw(self, key: int, shape: tuple[int, ...]) -> Tensor:
        if self.seeds is None:
            return torch.randn(shape, generator=self._generator(key), device=self.device, dtype=self.dtype)
        if len(shape) == 0 or shape[0] != len(self.seeds):
            raise ValueError(f"NoiseStream has {len(self.seeds)} per-sample seeds, asked for a batch of shape {shape}")
        return counter_normal(self.seeds, key, math.prod(shape[1:]), self.dtype).reshape(shape)

    def initial(self, shape: tuple[int, ...]) -> Tensor:
        """Standard normal initial noise (multiply by sigma_max)."""
        return self.draw(INITIAL, shape)

    def step(self, i: int, like: Tensor) -> Tensor:
        """The standard normal draw of solver step ``i``, shaped like ``like``."""
        return self.draw(i + 1, tuple(like.shape)).to(like.dtype)

    def extra(self, j: int, like: Tensor) -> Tensor:
        return self.draw(EXTRA + j, tuple(like.shape)).to(like.dtype)

    def __repr__(self) -> str:
        per = "" if self.seeds is None else f", seeds=[{len(self.seeds)}]"
        return f"NoiseStream(seed={self.seed}{per}, device={self.device})"


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


class Slot(IntEnum):
    """The named draws of one step of the sampling MDP (the ``slot`` of :meth:`SampleNoise.step`). The integer
    values are part of every stored trajectory's random stream: never renumber them."""

    CHURN = 0          # the churn move before the step (EDM's S_churn, or the churn knob)
    STEP = 1           # the base sampler's step (ancestral noise) or the transition policy's Gaussian move
    RENOISE = 2        # the renoise jump up after the step
    RENOISE_STEP = 3   # the base sampler's step back down after a renoise jump


class SampleNoise:
    """Per-sample noise streams: sample b's draw for key k depends only on ``(seeds[b], k)`` (:func:`counter_normal`).

    A trajectory of the sampling MDP is therefore replayable from its seed alone, whatever batch it was rolled out
    in. Keys: 0 is the initial noise; step i uses ``STEP_KEYS * (i + 1) + slot`` for its draw in ``slot``
    (a :class:`Slot`)."""

    STEP_KEYS = 8

    def __init__(self, seeds: Tensor):
        self.seeds = seeds.to(torch.int64)

    def draw(self, key: int, like: Tensor) -> Tensor:
        """Standard normal draws shaped like ``like`` ([B, ...]), row b from ``(seeds[b], key)``."""
        flat = counter_normal(self.seeds.to(like.device), key, like[0].numel(), like.dtype)
        return flat.reshape(like.shape)

    def initial(self, like: Tensor) -> Tensor:
        return self.draw(INITIAL, like)

    def step(self, i: int, like: Tensor, slot: Slot | int = Slot.CHURN) -> Tensor:
        """The draw of step ``i`` in ``slot``, shaped like ``like`` ([B, ...])."""
        if not 0 <= slot < self.STEP_KEYS:
            raise ValueError(f"slot must be in [0, {self.STEP_KEYS}), got {slot}")
        return self.draw(self.STEP_KEYS * (i + 1) + int(slot), like)

    def subset(self, mask: Tensor) -> "SampleNoise":
        """The streams of the samples selected by ``mask`` (a boolean mask or indices)."""
        return SampleNoise(self.seeds[mask.to(self.seeds.device)])
