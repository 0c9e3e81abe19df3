"""Every seed of the project is derived here, from named parts, so no two purposes share a random stream.

``derive_seed("rollout", seed, iteration, rank)`` hashes its parts (integers, or short names that say what the
stream is for) with splitmix64 into a 62-bit seed: a pure function of the parts, independent of the machine, the
batch size and the number of processes. ``sample_seeds(n, *parts)`` gives ``n`` consecutive per-sample seeds
starting at ``derive_seed(*parts)`` (EDM's per-sample generators, as a counter), so sample ``i`` of a run has the
same noise whatever chunk or rank draws it.
"""
from __future__ import annotations

import zlib

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1
_SEED_BITS = 62  # leaves room for + n in int64 and for torch.Generator.manual_seed


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _as_int(part: int | str) -> int:
    if isinstance(part, str):
        return zlib.crc32(part.encode()) | (1 << 40)  # names and small integers never coincide
    if isinstance(part, bool) or int(part) != part:
        raise TypeError(f"seed parts are integers or names, got {part!r}")
    return int(part) & _MASK64


def derive_seed(*parts: int | str) -> int:
    """A seed in ``[0, 2**62)`` that is a pure function of ``parts`` (order matters)."""
    if not parts:
        raise ValueError("derive_seed needs at least one part")
    z = 0
    for part in parts:
        z = _splitmix64(z ^ _as_int(part))
    return z >> (64 - _SEED_BITS)


def sample_seeds(n: int, *parts: int | str, device: torch.device | str = "cpu") -> Tensor:
    """``n`` per-sample seeds (int64): ``derive_seed(*parts) + arange(n)``."""
    start = derive_seed(*parts)
    return torch.arange(start, start + int(n), dtype=torch.int64, device=device)


def generator(*parts: int | str, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` seeded with ``derive_seed(*parts)``."""
    return torch.Generator(device=device).manual_seed(derive_seed(*parts))
