"""The law a knob policy puts on one knob at one step (docs/method.md section 3): one small class per law.

A law turns the knob's per-step parameters ``params`` ([B, num_params]: a row of the policy's table, plus the
MLP's output) into a ``torch.distributions`` object over the *raw* action ([B]: what rollouts store and PPO
re-scores: the pre-squash Gaussian draw, the Beta draw on (0, 1), or the category index), and the raw action into
the knob's value ([B]). Log-probabilities are those of the knob VALUE (change of variables included), so they
match ``torch.distributions`` on the value.

Adding a law means writing one class: a :class:`ContinuousLaw` subclass registers itself under its
``distribution`` name (the ``Knob.distribution`` config value); discrete knobs always use :class:`CategoricalLaw`.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Beta, Categorical, Distribution, Normal

if TYPE_CHECKING:
    from diffusion_irl.mdp.actions import Knob

CONTINUOUS_LAWS: dict[str, type[ContinuousLaw]] = {}
"""``Knob.distribution`` name -> law class of continuous knobs (filled as the classes are defined)."""


class KnobLaw:
    """The law of one knob. Subclasses define every method below; shapes: ``params`` [B, num_params], ``raw`` and
    values [B] (a batch of B states, or the N steps of a per-step table)."""

    def __init__(self, knob: Knob):
        self.knob = knob

    @property
    def num_params(self) -> int:
        """Parameters per step (columns of the policy's table)."""
        raise NotImplementedError  # pragma: no cover

    def init_params(self, reference: Tensor) -> Tensor:
        """The table ``[N, num_params]`` whose mode is ``reference`` ([N] float32: the knob's value per step)."""
        raise NotImplementedError  # pragma: no cover

    def dist(self, params: Tensor) -> Distribution:
        """The distribution of the raw action given ``params`` ([B, num_params])."""
        raise NotImplementedError  # pragma: no cover

    def value(self, raw: Tensor) -> Tensor:
        """The knob value [B] of the raw action [B]."""
        raise NotImplementedError  # pragma: no cover

    def log_prob(self, dist: Distribution, raw: Tensor) -> Tensor:
        """Log-density [B] of the knob value reached by ``raw`` under ``dist``."""
        raise NotImplementedError  # pragma: no cover

    def mode(self, dist: Distribution) -> Tensor:
        """The deterministic raw action [B] (median / mean / argmax), float32."""
        raise NotImplementedError  # pragma: no cover

    def draw(self, dist: Distribution, deterministic: bool) -> Tensor:
        """The raw action [B] an ``act`` takes: the mode, or a draw from ``dist`` (the global torch generator)."""
        return self.mode(dist) if deterministic else dist.sample().to(torch.float32)

    def entropy(self, dist: Distribution) -> Tensor:
        """Entropy [B] (of the raw action; see each law)."""
        return dist.entropy()


class CategoricalLaw(KnobLaw):
    """A discrete knob: categorical over ``knob.grid_values()`` (logits per step); the raw action is the index."""

    @property
    def num_params(self) -> int:
        return self.knob.size

    def init_params(self, reference: Tensor) -> Tensor:
        """Log-probabilities with ``1 - init_std`` (at most 0.9 off) on the grid value nearest the reference."""
        knob, steps = self.knob, len(reference)
        grid = torch.tensor(knob.grid_values())
        nearest = (grid.unsqueeze(0) - reference.unsqueeze(1)).abs().argmin(1)
        off_mass = min(knob.init_std, 0.9)
        probs = torch.full((steps, knob.size), off_mass / (knob.size - 1))
        probs[torch.arange(steps), nearest] = 1 - off_mass
        return probs.log()

    def dist(self, params: Tensor) -> Distribution:
        return Categorical(logits=params)

    def value(self, raw: Tensor) -> Tensor:
        return torch.tensor(self.knob.grid_values(), dtype=torch.float32, device=raw.device)[raw.long()]

    def log_prob(self, dist: Distribution, raw: Tensor) -> Tensor:
        return dist.log_prob(raw.long())

    def mode(self, dist: Distribution) -> Tensor:
        return dist.probs.argmax(-1).to(torch.float32)


class ContinuousLaw(KnobLaw):
    """A continuous knob on ``[low, high]``: two parameters per step, the first the logit of the normalised mode
    ``m = (value - low) / (high - low)``. Subclasses set ``distribution`` (their config name) and
    :meth:`init_spread` (the second parameter at the start)."""

    distribution: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.distribution:
            CONTINUOUS_LAWS[cls.distribution] = cls

    @property
    def num_params(self) -> int:
        return 2

    @property
    def width(self) -> float:
        return self.knob.high - self.knob.low

    def init_spread(self) -> float:
        raise NotImplementedError  # pragma: no cover

    def init_params(self, reference: Tensor) -> Tensor:
        """``(logit m, spread)`` per step; ``m`` is clamped 1e-3 of the range inside the bounds."""
        unit = ((reference - self.knob.low) / (self.knob.high - self.knob.low)).clamp(1e-3, 1 - 1e-3)
        return torch.stack([torch.logit(unit), torch.full_like(unit, self.init_spread())], 1)


class SquashedGaussianLaw(ContinuousLaw):
    """``value = low + width * sigmoid(u)``, ``u ~ N(mu, exp(log_std)^2)``; params ``(mu, log_std)``; the raw action
    is ``u``. The entropy is the pre-squash Gaussian's."""

    distribution = "squashed_gaussian"

    def init_spread(self) -> float:
        return math.log(self.knob.init_std)

    def dist(self, params: Tensor) -> Distribution:
        return Normal(params[:, 0], params[:, 1].clamp(-7, 2).exp())

    def value(self, raw: Tensor) -> Tensor:
        return self.knob.low + (self.knob.high - self.knob.low) * torch.sigmoid(raw)

    def log_prob(self, dist: Distribution, raw: Tensor) -> Tensor:
        # value = low + width * sigmoid(u): log|d value / du| = log width + log sigmoid(u) + log sigmoid(-u)
        return dist.log_prob(raw) - (math.log(self.width) + F.logsigmoid(raw) + F.logsigmoid(-raw))

    def mode(self, dist: Distribution) -> Tensor:
        return dist.loc  # the median of the squashed law


class BetaLaw(ContinuousLaw):
    """``value = low + width * b``, ``b ~ Beta(m c, (1 - m) c)``; params ``(logit m, log c)``; the raw action is
    ``b``, kept 1e-6 inside (0, 1). Exact entropy (of ``b``)."""

    distribution = "beta"

    def init_spread(self) -> float:
        return math.log(4.0 / self.knob.init_std**2)

    def dist(self, params: Tensor) -> Distribution:
        mean = torch.sigmoid(params[:, 0]).clamp(1e-4, 1 - 1e-4)
        concentration = params[:, 1].clamp(-3, 9).exp()
        return Beta(mean * concentration, (1 - mean) * concentration)

    def value(self, raw: Tensor) -> Tensor:
        return self.knob.low + (self.knob.high - self.knob.low) * raw

    def log_prob(self, dist: Distribution, raw: Tensor) -> Tensor:
        return dist.log_prob(raw.clamp(1e-6, 1 - 1e-6)) - math.log(self.width)

    def mode(self, dist: Distribution) -> Tensor:
        return dist.mean

    def draw(self, dist: Distribution, deterministic: bool) -> Tensor:
        return super().draw(dist, deterministic).clamp(1e-6, 1 - 1e-6)


def law_of(knob: Knob) -> KnobLaw:
    """The law of ``knob``: categorical when discrete, else its ``distribution``'s class."""
    if knob.discrete:
        return CategoricalLaw(knob)
    return CONTINUOUS_LAWS[knob.distribution](knob)
