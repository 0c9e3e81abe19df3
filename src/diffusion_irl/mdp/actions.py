"""Knob actions (docs/method.md section 3): low-dimensional per-step choices that modify a base sampler's step.

| knob       | value                                   | effect at step k                                              | reference |
|------------|-----------------------------------------|---------------------------------------------------------------|-----------|
| `step`     | log-offset a of the next noise level    | ``sigma_{k+1} = sigma^ref_{k+1} exp(a)`` (the last step -> 0)  | 0         |
| `churn`    | gamma >= 0                              | EDM churn ``sigma_hat = sigma_k (1 + gamma)`` with fresh noise | base's    |
| `guidance` | weight w                                | CFG ``D_u + w (D_c - D_u)`` or DG ``D + w sigma^2 grad l``     | config    |
| `renoise`  | r >= 0                                  | after the step, jump up to ``sigma_{k+1}(1 + r)`` and step back (extra NFE) | 0 |

A knob is continuous on ``[low, high]`` (squashed Gaussian or Beta policy) or discrete on ``grid``
(categorical); ``Knob.law`` is the law object (``mdp/laws.py``) a knob policy puts on it. The same knob objects
define the grid search over constant values (``grid_values``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from diffusion_irl.mdp.laws import CONTINUOUS_LAWS, KnobLaw, law_of

KNOBS = ("step", "churn", "guidance", "renoise")
CONTINUOUS = tuple(CONTINUOUS_LAWS)  # the continuous laws' names: squashed_gaussian, beta


@dataclass
class Knob:
    """One knob. Args:
        name: one of ``step, churn, guidance, renoise``.
        low, high: bounds of a continuous knob (and of the default grid).
        discrete: categorical over ``grid`` instead of a continuous law on ``[low, high]``.
        grid: the values of a discrete knob and of the constant-knob grid search (default: ``num`` points
            evenly spaced on ``[low, high]``).
        distribution: ``squashed_gaussian`` or ``beta`` for continuous knobs.
        reference: the value that reproduces the base sampler (null: the knob's natural one: 0, or the base
            sampler's own churn for ``churn``); the policy starts there.
        init_std: exploration at the start: std of the pre-squash Gaussian (in units of the logit of the
            normalised knob), or ``1 / sqrt(concentration)``-like spread for Beta; for discrete knobs, the
            probability mass kept off the reference value.
    """

    name: str
    low: float = 0.0
    high: float = 1.0
    discrete: bool = False
    grid: Sequence[float] | None = None
    num: int = 9
    distribution: str = "squashed_gaussian"
    reference: float | None = None
    init_std: float = 0.5

    def __post_init__(self):
        if self.name not in KNOBS:
            raise ValueError(f"unknown knob {self.name!r}; choose from {KNOBS}")
        if not self.low < self.high:
            raise ValueError(f"knob {self.name}: the range is empty (low={self.low} >= high={self.high})")
        if self.name in ("churn", "renoise") and self.low < 0:
            raise ValueError(f"knob {self.name}: values must be >= 0, got low={self.low}")
        if self.distribution not in CONTINUOUS:
            raise ValueError(f"knob {self.name}: distribution must be one of {CONTINUOUS}, got {self.distribution!r}")
        if self.init_std <= 0:
            raise ValueError(f"knob {self.name}: init_std must be > 0, got {self.init_std}")
        if self.grid is not None:
            self.grid = [float(g) for g in self.grid]
            if len(self.grid) < 2:
                raise ValueError(f"knob {self.name}: a grid needs at least 2 values, got {self.grid}")
        elif self.num < 2:
            raise ValueError(f"knob {self.name}: num must be >= 2, got {self.num}")
        if self.discrete and self.name == "step" and self.reference is None and 0.0 not in self.grid_values():
            raise ValueError(f"knob step: a discrete grid must contain the reference 0, got {self.grid_values()}")

    def grid_values(self) -> list[float]:
        if self.grid is not None:
            return list(self.grid)
        return torch.linspace(self.low, self.high, self.num).tolist()

    @property
    def size(self) -> int:
        """Number of categories (discrete) or 1 (continuous)."""
        return len(self.grid_values()) if self.discrete else 1

    @property
    def law(self) -> KnobLaw:
        """The law a knob policy puts on this knob (``mdp/laws.py``)."""
        return law_of(self)


@dataclass
class KnobValues:
    """The knob values of one step for a batch: name -> [B] tensor. Missing knobs take their reference."""

    values: dict[str, torch.Tensor] = field(default_factory=dict)

    def get(self, name: str):
        return self.values.get(name)
