"""Pathwise f-divergence schedule tuning (ours; docs/method.md section 10, "Pathwise gradient").

The schedule is learned against DATA, not against the denoiser's own ODE solution: a noise-conditional
discriminator ``d(x, sigma)`` is trained on the sampler's final samples against training points (both at a few small
noise levels ``disc_sigmas``: the discriminator's own instance noise), and the schedule follows the pathwise gradient
of the reward of its samples,

    grad_theta E_eps[ r(d(x_theta(eps), s)) ],   x_theta(eps) = Psi_theta(sigma_0(theta) eps) + s n,   r = -f'(u),

through the solver's differentiable loop (``tuning.ld3.solve``) with the discriminator frozen. With ``d`` at its
optimum ``log q - log p_theta``, this is exactly ``-grad_theta D_f(p_theta || q)`` for every divergence of
``rl/rewards.py`` (the identity ``d/dtheta D_f = d/dtheta E[f'(u_frozen(x_theta))]``; tests check it on Gaussians
with the exact ratio), so it is a low-variance alternative to the policy gradient of PPO for continuous knobs.

**A loss without a discriminator** (``loss=ot``): the batch's squared 2-Wasserstein distance to as many fresh
training points, ``sum_ij P_ij ||x_i - y_j||^2`` with ``P`` the exact optimal plan of the minibatch
(:func:`transport_loss`); its gradient pulls each sample toward the training point it is matched with. A batch of a
multi-modal law carries part of its mass across modes only because its mode counts differ from the real batch's
(measured on gmm8, 512 points: 7% of the mass, and the plan's cost between two independent real batches is 0.26
per coordinate); ``ot_mass < 1`` transports only that fraction of the mass (``ot.partial``), which leaves the
costliest pairs out (the floor drops to 0.007 at 0.9).

The minibatch plan is biased: between two independent batches of one law it still pulls every sample toward the
real point it is matched with, a pull that does not vanish where the sampler is already right. ``loss=mmd``
(:func:`kernel_mmd_loss`) is the unbiased estimate of the squared MMD between the batch and fresh training points,
with a multi-scale Gaussian kernel (``mmd_bandwidths``): its expected gradient is zero where the sampler's law is the
data's, so its steps shrink with the error that is left.

**What is learned** (``parametrization``):

- ``free``: ``log s_0`` (the first noise level: the initial noise is ``s_0 eps``, so the first level is a knob) and
  ``N - 1`` gaps ``log s_{k-1} - log s_k = softplus(g_k)``; the schedule is ``[s_0, ..., s_{N-1}, 0]`` (strictly
  decreasing by construction). Starts at ``init``: the solver's own schedule (``sampler``), a Karras schedule
  (``karras``, from ``init_sigma_max / init_sigma_min / init_rho``), or a schedule file (a tuner's
  ``schedule.json``: warm start from any tuned schedule).
- ``karras``: three numbers ``(log sigma_max, log sigma_min, log rho)`` of the Karras family the grid searches
  (``tuning.grid``), started at ``init_*``: the grid's space searched by gradient.

``s_0`` stays in ``[sigma_low, sigma_high]``. A schedule is read off as the average of the log-levels over the last
``average`` fraction of the iterations (Polyak averaging against the discriminator's noise). The starts run
``explore`` iterations each; the best on the training split goes on, and its schedule is scored again every
``select_every`` iterations and at the end: the best of these checkpoints is returned (the adversarial objective
is not the evaluator's distance, and a run can drift past its best point).

Cost: ``starts x (explore + 1) x batch x NFE + (iterations - explore) x batch x NFE`` forward denoiser evaluations
for the samples, plus ``select_seeds x select_samples x NFE`` per training-split score (each start before and after
exploring, each checkpoint), plus ``correction_warmup x correction_warmup_batch`` for a correction's warm-up (one
evaluation per training point, whatever the NFE); every call is counted by the
:class:`~diffusion_irl.tuning.tuners.EvaluationCounter`.
Like LD3's, the backward passes (about twice a forward pass each) are not counted separately.
"""
from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence

import numpy as np
import ot
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from diffusion_irl import seeding
from diffusion_irl.discriminator.module import discriminator_loss, forward_noise, paired_batch
from diffusion_irl.rl.rewards import Reward
from diffusion_irl.sampling.correction import (Correction, add_correction, corrected, correction_for, correction_scale,
                                               frozen_copy, with_correction)
from diffusion_irl.sampling.noise import NoiseStream
from diffusion_irl.sampling.samplers import seed_conditioned, seed_labels, with_labels
from diffusion_irl.sampling.schedules import SigmaSchedule, karras_sigmas
from diffusion_irl.tensors import append_dims
from diffusion_irl.tuning.ld3 import check_differentiable, solve
from diffusion_irl.tuning.grid import mean_scores, selection_scorer
from diffusion_irl.tuning.tuners import Tuner, positive_int, sigma_range, with_schedule

log = logging.getLogger(__name__)

LOSSES = ("adversarial", "ot", "mmd")
PARAMETRIZATIONS = ("free", "karras")
OPTIMIZERS = ("adam", "sgd")
SELECT_REFERENCES = ("shared", "disjoint")
PARTIALS = ("both", "real")


def _inverse_softplus(y: Tensor) -> Tensor:
    return y + torch.log(-torch.expm1(-y))


class FreeLevels(nn.Module):
    """``[s_0, ..., s_{N-1}, 0]`` from ``log s_0`` (kept in ``[log sigma_low, log sigma_high]`` by :meth:`project`)
    and ``N - 1`` gaps ``softplus(g_k) = log s_{k-1} - log s_k``. ``init``: a schedule ``[N + 1]`` ending in 0."""

    def __init__(self, init: Tensor, sigma_low: float, sigma_high: float):
        super().__init__()
        levels = init[:-1].double()
        self.log_low, self.log_high = math.log(sigma_low), math.log(sigma_high)
        self.log_first = nn.Parameter(levels[:1].log().clamp(self.log_low, self.log_high))
        self.gaps = nn.Parameter(_inverse_softplus((-levels.log().diff()).clamp_min(1e-6)))

    @torch.no_grad()
    def project(self) -> None:
        """Back into the bounds after an optimiser step (a clamp inside the forward pass would stop the gradient of a
        first level that stepped outside for good)."""
        self.log_first.clamp_(self.log_low, self.log_high)

    def log_levels(self) -> Tensor:
        first = self.log_first
        return first - torch.cat([first.new_zeros(1), torch.cumsum(F.softplus(self.gaps), 0)])

    def forward(self) -> Tensor:
        return torch.cat([self.log_levels().exp(), self.log_first.new_zeros(1)])


class KarrasLevels(nn.Module):
    """The Karras schedule ``(s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho``, ``i < N``, then 0,
    with ``log s_max`` (in ``[log sigma_low, log sigma_high]``), ``log s_min`` (below ``s_max``; both kept so by
    :meth:`project`) and ``log rho`` learned."""

    def __init__(self, steps: int, sigma_min: float, sigma_max: float, rho: float, sigma_low: float,
                 sigma_high: float):
        super().__init__()
        self.steps = int(steps)
        self.log_low, self.log_high = math.log(sigma_low), math.log(sigma_high)
        self.log_max = nn.Parameter(torch.tensor([math.log(sigma_max)], dtype=torch.float64))
        self.log_min = nn.Parameter(torch.tensor([math.log(sigma_min)], dtype=torch.float64))
        self.log_rho = nn.Parameter(torch.tensor([math.log(rho)], dtype=torch.float64))
        self.project()

    @torch.no_grad()
    def project(self) -> None:
        """Back into the bounds after an optimiser step."""
        self.log_max.clamp_(self.log_low, self.log_high)
        self.log_min.copy_(torch.minimum(self.log_min, self.log_max - 1e-3))

    def log_levels(self) -> Tensor:
        log_max, log_min = self.log_max, self.log_min
        rho = self.log_rho.exp()
        ramp = torch.linspace(0, 1, self.steps, dtype=log_max.dtype, device=log_max.device)
        hi, lo = (log_max / rho).exp(), (log_min / rho).exp()
        return rho * (hi + ramp * (lo - hi)).log()

    def forward(self) -> Tensor:
        return torch.cat([self.log_levels().exp(), self.log_max.new_zeros(1)])


def generator_loss(disc: nn.Module, x: Tensor, sigma: Tensor, reward: Reward, labels: Tensor | None = None) -> Tensor:
    """``-mean r(d(x, sigma[, labels]))``: minimised by the schedule (its gradient flows through ``x`` only; the
    caller keeps the discriminator's parameters out of the step)."""
    return -reward(disc(x, sigma) if labels is None else disc(x, sigma, labels)).mean()


def transport_loss(fake: Tensor, real: Tensor, labels: Tensor | None = None, mass: float = 1.0,
                   real_labels: Tensor | None = None, partial: str = "both") -> Tensor:
    """The squared 2-Wasserstein distance between two batches, per coordinate: ``sum_ij P_ij ||x_i - y_j||^2 / dim``
    with ``P`` the exact optimal plan (``ot.emd``, uniform weights ``1/n`` on the ``n`` fake and ``1/m`` on the ``m``
    real points) of the detached costs, so the gradient in ``fake`` moves each sample toward the real points it is
    matched with (their barycentre when ``m > n``; the plan's own gradient is zero almost everywhere). With ``labels``
    (the fake rows' classes) and ``real_labels`` (the real rows'; default ``labels``, for batches of one length), a
    sample is matched only with real points of its own class.

    ``mass < 1``, ``partial="both"``: only that fraction of the mass is moved, so the costliest pairs of either batch
    are left out. ``partial="real"``: every sample is moved in full and the real points have room for ``1 / mass``
    times their share, so only real mass is left over (no sample goes without a pull; a sample's law can exceed the
    data's density by at most ``1 / mass``)."""
    if partial not in PARTIALS:
        raise ValueError(f"transport_loss: partial must be one of {PARTIALS}, got {partial!r}")
    if fake.shape[1:] != real.shape[1:] or not len(fake) or not len(real):
        raise ValueError(f"transport_loss needs batches of one shape, got {list(fake.shape)} and {list(real.shape)}")
    if labels is not None and real_labels is None:
        if len(real) != len(fake):
            raise ValueError("transport_loss: batches of different lengths need real_labels beside labels")
        real_labels = labels
    x, y = fake.flatten(1).double(), real.flatten(1).to(fake.device).double()
    cost = (x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1) - 2 * x @ y.T).clamp_min(0)
    plan_cost = cost.detach()
    if labels is not None:
        labels, real_labels = labels.to(fake.device), real_labels.to(fake.device)
        plan_cost = plan_cost + (labels[:, None] != real_labels[None, :]) * (plan_cost.max() + 1) * max(len(x), len(y))
    a, b, costs = np.full(len(x), 1.0 / len(x)), np.full(len(y), 1.0 / len(y)), plan_cost.cpu().numpy()
    if mass < 1 and partial == "real":  # the samples' mass scaled to the transported total: all of it moves
        a = a * mass
        plan = ot.partial.partial_wasserstein(a, b, costs, m=min(a.sum(), b.sum()), numItermax=1_000_000)  # rounding
    elif mass < 1:
        plan = ot.partial.partial_wasserstein(a, b, costs, m=mass, numItermax=1_000_000)
    else:
        plan = ot.emd(a, b, costs, numItermax=1_000_000)
    return (torch.as_tensor(plan, device=cost.device) * cost).sum() / (mass * x.shape[1])


def kernel_mmd_loss(fake: Tensor, real: Tensor, bandwidths: Sequence[float]) -> Tensor:
    """The unbiased squared MMD (the U-statistic, Gretton et al. 2012) between two batches with the kernel
    ``k(a, b) = sum_h exp(-||a - b||^2 / (2 h^2))`` over the ``bandwidths`` ``h``, differentiable in ``fake``:
    ``mean_{i != j} k(x_i, x_j) + mean_{i != j} k(y_i, y_j) - 2 mean_{i, j} k(x_i, y_j)``. Its expectation is the
    population MMD^2, and so is its gradient's: zero when both batches come from one law (a minibatch transport
    plan's is not)."""
    if fake.shape[1:] != real.shape[1:] or len(fake) < 2 or len(real) < 2:
        raise ValueError(f"kernel_mmd_loss needs two batches of one shape, 2 rows or more each, got "
                         f"{list(fake.shape)} and {list(real.shape)}")
    if not bandwidths or any(not (math.isfinite(h) and h > 0) for h in bandwidths):
        raise ValueError(f"kernel_mmd_loss: bandwidths must be finite and > 0, got {list(bandwidths)}")
    x, y = fake.flatten(1).double(), real.flatten(1).to(fake.device).double()

    def kernel(a: Tensor, b: Tensor) -> Tensor:
        sq = (a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1) - 2 * a @ b.T).clamp_min(0)
        return sum(torch.exp(-sq / (2 * float(h) ** 2)) for h in bandwidths)

    def off_diagonal_mean(k: Tensor) -> Tensor:
        n = len(k)
        return k.masked_fill(torch.eye(n, dtype=torch.bool, device=k.device), 0).sum() / (n * (n - 1))

    return off_diagonal_mean(kernel(x, x)) + off_diagonal_mean(kernel(y, y)) - 2 * kernel(x, y).mean()


class PathwiseTuner(Tuner):
    """The schedule learned by the pathwise gradient of an f-divergence reward (see the module doc).

    Args:
        discriminator: the network ``d(x, sigma) -> logit`` (an ``nn.Module`` Hydra builds from a ``_target_``),
            ``auto``: the MLP of ``conf/discriminator/mlp.yaml`` for vectors, the CNN of ``cnn.yaml`` for images, or
            ``features`` (images): an MLP on the frozen features of the data set's classifier, the network the
            evaluator's Fréchet distance is computed in (``discriminator.networks.FeatureDiscriminator``).
        loss: ``adversarial``: the reward ``r = -f'(u)`` of the discriminator's logit (the f-divergence of
            ``divergence``). ``ot``: no discriminator; the batch's squared 2-Wasserstein distance to as many fresh
            training points (:func:`transport_loss`, the exact plan of the minibatch), whose gradient moves each
            sample toward the training point it is matched with (the ``disc_*`` and reward keys are unused).
            ``ot_mass``: the fraction of the mass transported (``< 1``: the partial plan; ``ot_partial``: ``both``
            batches may leave mass out, or only the ``real`` one, so every sample is pulled). ``ot_reals``: training
            points per sample in the real batch (``> 1``: each sample is pulled toward the barycentre of the several
            points it is matched with, a lower-variance target that costs no denoiser evaluation). ``mmd``: no
            discriminator; the unbiased squared MMD between the batch and ``ot_reals`` x as many fresh training points
            (:func:`kernel_mmd_loss`, bandwidths ``mmd_bandwidths``), an estimate whose gradient is unbiased (zero in
            expectation once the sampler's law is the data's), which the minibatch plan's is not.
        conditional: a label-conditional discriminator for a class-conditional denoiser: each sample is compared
            with training points of its own class (``seed mod num_classes``, the class it was sampled for), so the
            reward is the per-class log-ratio (``loss=ot``: each sample is matched only with training points of its
            class); false: one discriminator for the label-marginal.
        divergence, logit_clip: the reward ``r = -f'(u)`` (``rl.rewards.Reward``); lam / temperature for ``pr``.
        parametrization: ``free`` or ``karras``. init: ``sampler``, ``karras`` or a schedule file (``free`` only).
        init_sigma_max, init_sigma_min, init_rho: the Karras start. sigma_low, sigma_high: bounds of ``s_0``.
        iterations, batch: schedule steps and samples per step. lr, optimizer: the schedule's step size and
            optimiser: ``adam``, or ``sgd`` (momentum 0.9; its steps scale with the gradient, where Adam's steps
            have the same size whatever the gradient's).
        disc_lr, disc_steps, disc_warmup: the discriminator's Adam step size, its steps per iteration (on the
            iteration's samples and fresh training points), and its steps on the starting schedule's samples first.
        disc_sigmas: the noise levels both classes are compared at (each sample draws one).
        average: the fraction of the last iterations whose log-levels are averaged into a checkpoint's schedule.
        num_train: training points the real class is drawn from (with ``discriminator=features``, only among the
            ``data.classifier_reserve`` ones the feature classifier has not seen, when the data reserve any).
        disc_holdout: true: the discriminator's real points exclude the training points the selection scores
            against (they start after them), so the adversary that moves the schedule never sees the selection's
            reference, as a validation set is kept from training.
        starts: first levels of the Karras starts (``init_sigma_min``, ``init_rho``), or ``sampler``: the solver's
            own schedule as one of the starts; null: one start at ``init``.
        explore: iterations of every start before the best one (training-split score) goes on.
        select_every: the chosen start's schedule is scored on the training split every this many iterations
            and at the end; the best checkpoint (the starts' choice, or a single start itself, included) is
            returned (0: the final one).
        select_samples, select_train: samples per score, training points they are scored against.
        select_seeds: noise seeds per score (its mean is the score; each seed costs ``select_samples x NFE``).
        select_margin: 0: the best checkpoint is returned. ``z > 0`` (needs ``select_seeds >= 2``): a checkpoint
            after any step is returned only if it beats the best start by more than ``z`` standard errors of their
            per-seed difference (see :meth:`admitted`); else the best start is. On images, where the selection's
            differences are as small as its noise, this keeps a tuning from returning a worse schedule.
        select_reference: ``shared``: every selection seed scores against the same ``select_train`` training
            points. ``disjoint``: seed ``k`` against points ``[k select_train, (k + 1) select_train)``, so the
            per-seed scores are independent in the reference too and the margin's standard error includes the
            reference's noise (needs ``select_seeds x select_train`` training points).
        correction: true: a correction ``g(x, sigma)`` of the denoiser (``sampling/correction.py``,
            zero at the start) is trained with the schedule by the same gradient; the tuned row samples with
            ``D + g`` at the same NFE. ``correction_hidden``, ``correction_depth``: its width and depth; ``correction_lr``: its
            Adam step. ``correction_ema``: 0, a checkpoint takes the correction's current weights; in (0, 1), an
            exponential moving average of them with this decay (the schedule is averaged too: ``average``).
            ``correction_inputs``: ``state``, ``g(x, sigma)``; ``denoised``, ``g(x, sigma, D(x, sigma))`` (the
            denoiser's output as a third input, no extra evaluation). ``g`` is an MLP for vectors and a small CNN
            for images. ``correction_scaling``: ``none``, ``g``'s raw output; ``edm``, times EDM's ``c_out(sigma)``,
            so ``g`` vanishes with ``sigma``. ``correction_warmup``: steps of the denoiser's own loss on ``D + g``
            at the starts' levels before the first pathwise step (:meth:`warm_correction`;
            ``correction_warmup_batch`` training points each, counted as evaluations; ``correction_warmup_lr``, its
            Adam step, null for ``correction_lr``, so the pathwise steps after it may be smaller;
            ``correction_warmup_decay``: ``constant`` or ``cosine``, that step falling toward 0); with
            ``iterations=0`` the warm-up is all the tuning does, and the start that scores best with it is returned
            (each start scored once).
    """

    name = "pathwise"

    def __init__(self, discriminator: nn.Module | str = "auto", loss: str = "adversarial", divergence: str = "js",
                 logit_clip: float | None = None,
                 lam: float = 1.0, temperature: float = 0.0, conditional: bool = False, parametrization: str = "free",
                 init: str = "sampler",
                 init_sigma_max: float = 80.0, init_sigma_min: float = 0.05, init_rho: float = 7.0,
                 sigma_low: float = 0.5, sigma_high: float = 80.0, iterations: int = 150, batch: int = 128,
                 lr: float = 0.03, optimizer: str = "adam", disc_lr: float = 1e-3, disc_steps: int = 2,
                 disc_warmup: int = 50,
                 disc_sigmas: Sequence[float] = (0.0, 0.02, 0.05), average: float = 0.25, num_train: int = 20000,
                 starts: Sequence[float] | None = (80.0, 20.0, 5.0), explore: int = 40, select_every: int = 30,
                 select_samples: int = 1000, select_train: int = 2000, select_seeds: int = 1,
                 select_margin: float = 0.0, select_reference: str = "shared", correction: bool = False,
                 correction_hidden: int = 64, correction_depth: int = 2, correction_lr: float = 1e-3,
                 correction_ema: float = 0.0, correction_inputs: str = "state", correction_scaling: str = "none",
                 correction_warmup: int = 0,
                 correction_warmup_batch: int = 512, correction_warmup_lr: float | None = None,
                 correction_warmup_decay: str = "constant",
                 disc_holdout: bool = False,
                 ot_mass: float = 1.0, ot_reals: int = 1, ot_partial: str = "both",
                 mmd_bandwidths: Sequence[float] = (0.1, 0.3, 1.0, 3.0),
                 feature_cache: str | None = None):
        if not (isinstance(discriminator, nn.Module) or discriminator in ("auto", "features")):
            raise ValueError("tuner.discriminator must be auto, features or build an nn.Module (a _target_ network), "
                             f"got {discriminator!r}")
        if not isinstance(conditional, bool):
            raise ValueError(f"tuner.conditional must be true or false, got {conditional!r}")
        if loss not in LOSSES:
            raise ValueError(f"tuner.loss must be one of {LOSSES}, got {loss!r}")
        self.loss = loss
        if not (math.isfinite(ot_mass) and 0 < ot_mass <= 1):
            raise ValueError(f"tuner.ot_mass must be in (0, 1], got {ot_mass}")
        self.ot_mass = float(ot_mass)
        if ot_partial not in PARTIALS:
            raise ValueError(f"tuner.ot_partial must be one of {PARTIALS}, got {ot_partial!r}")
        self.ot_partial = ot_partial
        self.ot_reals = positive_int(ot_reals, "tuner.ot_reals")
        bandwidths = [mmd_bandwidths] if isinstance(mmd_bandwidths, (int, float)) else list(mmd_bandwidths or [])
        if not bandwidths or any(isinstance(h, bool) or not isinstance(h, (int, float)) or not math.isfinite(h)
                                 or h <= 0 for h in bandwidths):
            raise ValueError(f"tuner.mmd_bandwidths must be a non-empty list of numbers > 0, got {mmd_bandwidths!r}")
        self.mmd_bandwidths = [float(h) for h in bandwidths]
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"tuner.optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        self.discriminator, self.conditional, self.optimizer = discriminator, conditional, optimizer
        if loss == "mmd" and conditional:
            raise ValueError("tuner.loss=mmd compares the batch with the label-marginal: it has no conditional form "
                             "(use loss=ot or adversarial with tuner.conditional=true)")
        self.reward = Reward(divergence, logit_clip, lam, temperature, weighting="terminal")
        if divergence == "pr" and temperature <= 0:
            raise ValueError("tuner.divergence=pr: the PR reward is a step in the logit, whose gradient is 0; set "
                             "tuner.temperature > 0 (e.g. 0.5) to smooth it")
        if parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"tuner.parametrization must be one of {PARAMETRIZATIONS}, got {parametrization!r}")
        if parametrization == "karras" and init not in ("sampler", "karras"):
            raise ValueError("tuner.parametrization=karras starts from its init_* values (init=karras); "
                             f"a schedule file ({init!r}) needs parametrization=free")
        self.parametrization, self.init = parametrization, str(init)
        self.init_sigma_min, self.init_sigma_max = sigma_range(init_sigma_min, init_sigma_max, "tuner.init")
        self.sigma_low, self.sigma_high = sigma_range(sigma_low, sigma_high, "tuner (sigma_low, sigma_high)")
        if not init_rho > 0:
            raise ValueError(f"tuner.init_rho must be > 0, got {init_rho}")
        self.init_rho = float(init_rho)
        # 0 iterations: the correction's warm-up alone (checked below)
        self.iterations = positive_int(iterations, "tuner.iterations", 0)
        self.batch = positive_int(batch, "tuner.batch", 2)
        self.disc_steps = positive_int(disc_steps, "tuner.disc_steps")
        self.disc_warmup = positive_int(disc_warmup, "tuner.disc_warmup", 0)
        self.num_train = positive_int(num_train, "tuner.num_train", 2)
        for key, value in (("lr", lr), ("disc_lr", disc_lr)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"tuner.{key} must be > 0, got {value}")
        self.lr, self.disc_lr = float(lr), float(disc_lr)
        self.disc_sigmas = [float(s) for s in disc_sigmas]
        if not self.disc_sigmas or not all(math.isfinite(s) and s >= 0 for s in self.disc_sigmas):
            raise ValueError(f"tuner.disc_sigmas must be a non-empty list of levels >= 0, got {list(disc_sigmas)}")
        if not 0 < average <= 1:
            raise ValueError(f"tuner.average must be in (0, 1], got {average}")
        self.average = float(average)
        self.starts = [v if v == "sampler" else float(v) for v in starts] if starts else None
        if self.starts is not None:
            if not all(v == "sampler" or self.sigma_low <= v <= self.sigma_high for v in self.starts):
                raise ValueError(f"tuner.starts must be first levels in [sigma_low, sigma_high] = [{self.sigma_low}, "
                                 f"{self.sigma_high}] or 'sampler' (the solver's own schedule), got {self.starts}")
            if self.init not in ("sampler", "karras"):
                raise ValueError("tuner.starts are Karras starts; a schedule file (tuner.init) is one start: "
                                 "set tuner.starts=null")
        self.explore = positive_int(explore, "tuner.explore")
        self.select_every = positive_int(select_every, "tuner.select_every", 0)
        self.select_samples = positive_int(select_samples, "tuner.select_samples", 2)
        self.select_train = positive_int(select_train, "tuner.select_train", 2)
        self.select_seeds = positive_int(select_seeds, "tuner.select_seeds")
        if not (math.isfinite(select_margin) and select_margin >= 0):
            raise ValueError(f"tuner.select_margin must be >= 0, got {select_margin}")
        if select_margin > 0 and self.select_seeds < 2:
            raise ValueError("tuner.select_margin > 0 compares per-seed scores: set tuner.select_seeds >= 2")
        self.select_margin = float(select_margin)
        if select_reference not in SELECT_REFERENCES:
            raise ValueError(f"tuner.select_reference must be one of {SELECT_REFERENCES}, got {select_reference!r}")
        self.select_reference = select_reference
        if not isinstance(disc_holdout, bool):
            raise ValueError(f"tuner.disc_holdout must be true or false, got {disc_holdout!r}")
        self.disc_holdout = disc_holdout
        if not isinstance(correction, bool):
            raise ValueError(f"tuner.correction must be true or false, got {correction!r}")
        self.correction = correction
        self.correction_hidden = positive_int(correction_hidden, "tuner.correction_hidden")
        self.correction_depth = positive_int(correction_depth, "tuner.correction_depth")
        if not (math.isfinite(correction_lr) and correction_lr > 0):
            raise ValueError(f"tuner.correction_lr must be > 0, got {correction_lr}")
        self.correction_lr = float(correction_lr)
        if not (isinstance(correction_ema, (int, float)) and 0 <= correction_ema < 1):
            raise ValueError(f"tuner.correction_ema must be in [0, 1) (0: no average), got {correction_ema!r}")
        self.correction_ema = float(correction_ema)
        if correction_inputs not in Correction.INPUTS:
            raise ValueError(f"tuner.correction_inputs must be one of {Correction.INPUTS}, got {correction_inputs!r}")
        self.correction_inputs = correction_inputs
        if correction_scaling not in Correction.SCALINGS:
            raise ValueError(f"tuner.correction_scaling must be one of {Correction.SCALINGS}, got "
                             f"{correction_scaling!r}")
        self.correction_scaling = correction_scaling
        self.correction_warmup = positive_int(correction_warmup, "tuner.correction_warmup", 0)
        self.correction_warmup_batch = positive_int(correction_warmup_batch, "tuner.correction_warmup_batch")
        if correction_warmup_lr is not None and not (isinstance(correction_warmup_lr, (int, float))
                                                     and math.isfinite(correction_warmup_lr)
                                                     and correction_warmup_lr > 0):
            raise ValueError(f"tuner.correction_warmup_lr must be > 0 or null (null: correction_lr), got "
                             f"{correction_warmup_lr!r}")
        self.correction_warmup_lr = float(correction_warmup_lr if correction_warmup_lr is not None
                                          else correction_lr)
        if correction_warmup_decay not in ("constant", "cosine"):
            raise ValueError(f"tuner.correction_warmup_decay must be constant or cosine, got "
                             f"{correction_warmup_decay!r}")
        self.correction_warmup_decay = correction_warmup_decay
        if self.correction_warmup and not self.correction:
            raise ValueError("tuner.correction_warmup > 0 warms up the correction: set tuner.correction=true")
        if self.iterations == 0 and not self.correction_warmup:
            raise ValueError("tuner.iterations must be >= 1 (0 only with tuner.correction_warmup > 0: the warm-up "
                             "alone)")
        self.feature_cache = feature_cache

    def settings(self) -> dict:
        ot_keys = ({"ot_mass": self.ot_mass, "ot_reals": self.ot_reals, "ot_partial": self.ot_partial}
                   if self.loss == "ot" else
                   {"ot_reals": self.ot_reals, "mmd_bandwidths": self.mmd_bandwidths} if self.loss == "mmd" else {})
        return {"loss": self.loss, **ot_keys,
                "divergence": self.reward.divergence, "logit_clip": self.reward.logit_clip,
                "discriminator": self.discriminator if isinstance(self.discriminator, str) else
                type(self.discriminator).__name__, "conditional": self.conditional,
                "parametrization": self.parametrization, "init": self.init, "iterations": self.iterations,
                "batch": self.batch, "lr": self.lr, "optimizer": self.optimizer, "disc_lr": self.disc_lr,
                "disc_steps": self.disc_steps,
                "disc_warmup": self.disc_warmup, "disc_sigmas": self.disc_sigmas, "average": self.average,
                "sigma_range": [self.sigma_low, self.sigma_high], "starts": self.starts, "explore": self.explore,
                "select_every": self.select_every, "select_samples": self.select_samples,
                "select_seeds": self.select_seeds, "select_margin": self.select_margin,
                "select_reference": self.select_reference, "disc_holdout": self.disc_holdout,
                "correction": self.correction,
                **({"correction_hidden": self.correction_hidden, "correction_depth": self.correction_depth,
                    "correction_lr": self.correction_lr, "correction_ema": self.correction_ema,
                    "correction_inputs": self.correction_inputs, "correction_scaling": self.correction_scaling,
                    "correction_warmup": self.correction_warmup,
                    **({"correction_warmup_batch": self.correction_warmup_batch,
                        "correction_warmup_lr": self.correction_warmup_lr,
                        "correction_warmup_decay": self.correction_warmup_decay} if self.correction_warmup else {})}
                   if self.correction else {})}

    def check(self, sampler, nfe):
        steps = super().check(sampler, nfe)
        check_differentiable(sampler, "pathwise")
        if self.init not in ("sampler", "karras"):
            sigmas = SigmaSchedule(path=self.init).sigmas
            if len(sigmas) != steps + 1:
                raise ValueError(f"tuner.init={self.init}: {len(sigmas) - 1} steps, but {sampler.name} at {nfe} NFE "
                                 f"takes {steps}")
        return steps

    def levels(self, sampler, steps: int, first: float | str | None = None) -> nn.Module:
        """The learned schedule's module at its starting point; ``first``: a Karras start at that first level, or
        ``"sampler"``: the solver's own schedule (None: ``init``)."""
        init = "sampler" if first == "sampler" else self.init
        first = None if first == "sampler" else first
        if first is not None:
            smin, smax, rho = min(self.init_sigma_min, 0.5 * first), first, self.init_rho
        elif init == "sampler" and self.parametrization == "karras":
            schedule = getattr(sampler, "schedule", None)
            smin = float(getattr(schedule, "sigma_min", self.init_sigma_min))
            smax = float(getattr(schedule, "sigma_max", self.init_sigma_max))
            rho = float(getattr(schedule, "rho", self.init_rho))
        else:
            smin, smax, rho = self.init_sigma_min, self.init_sigma_max, self.init_rho
        if self.parametrization == "karras":
            return KarrasLevels(steps, smin, smax, rho, self.sigma_low, self.sigma_high)
        if first is not None or init == "karras":
            start = karras_sigmas(steps, smin, smax, rho)
        elif init == "sampler":
            start = sampler.sigmas(steps).double()
        else:
            start = torch.as_tensor(SigmaSchedule(path=init).sigmas, dtype=torch.float64)
        return FreeLevels(start.cpu(), self.sigma_low, self.sigma_high)

    def network(self, datamodule, num_classes: int = 0, features: tuple | None = None) -> nn.Module:
        """A fresh copy of the discriminator network (``auto``: sized for ``datamodule``'s samples; ``features``:
        on ``features = (phi, mean, std)``), label-conditional over ``num_classes`` classes when that is > 0."""
        if isinstance(self.discriminator, nn.Module):
            net = copy.deepcopy(self.discriminator)
            if int(getattr(net, "num_classes", 0) or 0) != num_classes:
                raise ValueError(f"tuner.discriminator has num_classes={getattr(net, 'num_classes', 0)}, but this "
                                 f"tuning needs {num_classes} (tuner.conditional={self.conditional})")
            return net
        from diffusion_irl.discriminator.networks import CNNDiscriminator, FeatureDiscriminator, MLPDiscriminator

        if self.discriminator == "features":
            if features is None:
                raise ValueError("tuner.discriminator=features needs the feature network and its statistics")
            return FeatureDiscriminator(*features, hidden=128, depth=2, emb_dim=32, num_classes=num_classes)
        shape, sigma_data = list(datamodule.shape), float(getattr(datamodule, "sigma_data", 0.5))
        if len(shape) == 1:
            return MLPDiscriminator(shape, hidden=128, depth=3, emb_dim=32, sigma_data=sigma_data,
                                    num_classes=num_classes)
        return CNNDiscriminator(shape, base_channels=32, channel_mults=(1, 2), emb_dim=64, sigma_data=sigma_data,
                                num_classes=num_classes)

    def feature_network(self, datamodule, train: Tensor) -> tuple[nn.Module, Tensor, Tensor]:
        """``(phi, mean, std)`` for ``discriminator=features``: the data set's classifier (trained on the training
        split, cached; the evaluator's feature network) and its feature statistics on ``train``."""
        if len(datamodule.shape) == 1:
            raise ValueError(f"tuner.discriminator=features is for images: data={datamodule.name} holds vectors "
                             f"{list(datamodule.shape)}; use discriminator=auto")
        from diffusion_irl.evaluation import feature_classifier_for

        classifier = feature_classifier_for(datamodule, self.feature_cache).eval().requires_grad_(False)
        classifier.to(train.device)
        with torch.no_grad():
            phi = torch.cat([classifier.features(chunk.float()) for chunk in train.split(1024)]).double()
        return _Features(classifier), phi.mean(0).float(), phi.std(0).float()

    def seeded_network(self, datamodule, seed: int, start: int, num_classes: int = 0,
                       features: tuple | None = None) -> nn.Module:
        """:meth:`network` initialised from ``("tune", "pathwise", "discriminator", seed, start)`` (torch's global
        generator is left as it was), so a tuning does not depend on what the process sampled before it."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seeding.derive_seed("tune", "pathwise", "discriminator", seed, start))
            net = self.network(datamodule, num_classes, features)
            if isinstance(self.discriminator, nn.Module):  # a given network: re-initialise its copy from that seed
                for module in net.modules():
                    if module is not net and hasattr(module, "reset_parameters"):
                        module.reset_parameters()
        return net

    def seeded_correction(self, shape: tuple, seed: int, start: int, sigma_data: float = 1.0) -> nn.Module | None:
        """A zero correction (``correction=true``) whose hidden layers are drawn from ``("tune", "pathwise",
        "correction", seed, start)``, else None (``sigma_data``: the data's scale, for ``correction_scaling=edm``)."""
        if not self.correction:
            return None
        if len(shape) not in (1, 3):
            raise ValueError(f"tuner.correction=true is for vectors [D] or images [C, H, W]; this data set's samples "
                             f"have shape {list(shape)}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seeding.derive_seed("tune", "pathwise", "correction", seed, start))
            return correction_for(shape, self.correction_hidden, self.correction_depth, self.correction_inputs,
                                  self.correction_scaling, sigma_data)

    def warm_correction(self, correction: nn.Module, D, train: Tensor, levels: Tensor, sigma_data: float, seed: int,
                        device, labels: Tensor | None = None) -> list[float]:
        """``correction_warmup`` Adam steps (``correction_warmup_lr``, ``correction_warmup_decay``) of the denoiser's
        own loss on the corrected denoiser,
        ``E lambda(sigma) ||D(x, sigma) + g(x, sigma) - y||^2`` with ``x = y + sigma n``, ``y`` a training point,
        ``sigma`` drawn from ``levels`` (the noise levels the starts evaluate the denoiser at: ``g`` is only ever
        called there) and EDM's weight ``lambda``: ``g`` starts as a regression of the denoiser's residual on data
        (one denoiser evaluation per point, counted; no solver), which the pathwise gradient then goes on from.
        ``labels``: the training points' classes, for a class-conditional denoiser (each point is denoised for its
        own class). Returns the loss per step."""
        from diffusion_irl.denoisers.precond import edm_loss_weight

        gen = seeding.generator("tune", "pathwise", "correction_warmup", seed)
        opt = torch.optim.Adam(correction.parameters(), lr=self.correction_warmup_lr)
        levels = levels.flatten().float()
        batch, losses, steps = self.correction_warmup_batch, [], self.correction_warmup
        for step in range(steps):
            if self.correction_warmup_decay == "cosine":  # from correction_warmup_lr toward 0
                for group in opt.param_groups:
                    group["lr"] = self.correction_warmup_lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            index = torch.randint(len(train), (batch,), generator=gen).to(train.device)
            y = train[index].float()
            sigma = levels[torch.randint(len(levels), (batch,), generator=gen)].to(y)
            x = y + append_dims(sigma, y.dim()) * torch.randn(y.shape, generator=gen).to(y)
            with torch.no_grad():
                denoised = with_labels(D, labels[index] if labels is not None else None)(x, sigma)
            out = add_correction(correction, x, sigma, denoised)
            loss = (append_dims(edm_loss_weight(sigma, sigma_data), y.dim()) * (out - y).pow(2)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        return losses

    def admitted(self, checkpoints: list[tuple], per_seed: dict[int, list[float]]) -> list[bool]:
        """Which ``checkpoints`` (finite ones, ``(iteration, schedule, score, start)``) may be returned. The
        reference, the best checkpoint scored before any step (a start), always may; with ``select_margin = z > 0``
        another only if its gain over the reference, paired over the selection seeds, exceeds ``z`` standard errors:
        ``mean(d) > z std(d) / sqrt(k)``, ``d = reference - checkpoint`` per seed."""
        firsts = [c for c in checkpoints if c[0] == 0] or checkpoints[:1]
        reference = min(firsts, key=lambda c: c[2])
        if self.select_margin <= 0:
            return [True] * len(checkpoints)
        ref = per_seed[id(reference[1])]
        out = []
        for c in checkpoints:
            d = [a - b for a, b in zip(ref, per_seed[id(c[1])])]
            mean = sum(d) / len(d)
            std = math.sqrt(sum((v - mean) ** 2 for v in d) / (len(d) - 1))
            out.append(c is reference or mean > self.select_margin * std / math.sqrt(len(d)))
        return out

    def _tune(self, sampler, D, datamodule, steps, seed, device):
        datamodule.setup()
        shape = tuple(datamodule.shape)
        available = len(datamodule.train_samples())
        reserve = int(getattr(datamodule, "classifier_reserve", 0) or 0)
        end = reserve if (self.discriminator == "features" and reserve) else available  # features: unseen images
        scoring = len(self.starts or [None]) > 1 or self.select_every > 0
        blocks = self.select_seeds if self.select_reference == "disjoint" else 1
        skip = blocks * self.select_train if (self.disc_holdout and scoring) else 0  # past the selection's points
        if end - skip < 2:
            raise ValueError(f"tuner.disc_holdout=true: the selection scores against the first {skip} training "
                             f"points, which leaves {max(end - skip, 0)} of {end} for the discriminator")
        stop = min(end, skip + self.num_train)
        train = datamodule.train_samples(stop)[skip:].to(device)
        num_classes, train_labels = 0, None
        if self.conditional:
            num_classes = int(getattr(D, "num_classes", 0) or 0)
            if num_classes <= 0:
                raise ValueError("tuner.conditional=true needs a class-conditional denoiser; this one has no classes")
            if int(getattr(datamodule, "num_classes", 0) or 0) != num_classes:
                raise ValueError(f"tuner.conditional=true: the denoiser has {num_classes} classes, data="
                                 f"{datamodule.name} has {getattr(datamodule, 'num_classes', 0)}")
            train_labels = datamodule.train_labels(stop)[skip:].long()
        adversarial = self.loss == "adversarial"  # loss=ot trains no discriminator: none is built
        features = (self.feature_network(datamodule, train) if adversarial and self.discriminator == "features"
                    else None)
        gen = seeding.generator("tune", "pathwise", seed)
        sigma_data = float(getattr(datamodule, "sigma_data", 0.5))
        firsts = self.starts or [None]
        runs = [_Run(self, sampler, D, train, shape, self.levels(sampler, steps, first),
                     self.seeded_network(datamodule, seed, i, num_classes, features) if adversarial else None,
                     gen, seed, device,
                     train_labels, num_classes, self.seeded_correction(shape, seed, i, sigma_data))
                for i, first in enumerate(firsts)]
        warmup: list[float] = []
        if self.correction_warmup:  # one warm start of g, copied into every start (counted once)
            labels = None
            if int(getattr(D, "num_classes", 0) or 0):  # each training point denoised for its own class
                labels = train_labels if train_labels is not None else datamodule.train_labels(stop)[skip:].long()
            levels = torch.cat([run.start[:-1] for run in runs])  # where the starts call the denoiser
            warmup = self.warm_correction(runs[0].correction, D, train, levels, sigma_data, seed, device,
                                          labels.to(device) if labels is not None else None)
            for run in runs[1:]:
                run.correction.load_state_dict(runs[0].correction.state_dict())
            log.info("pathwise %s: correction warmed up for %d steps, loss %.4g -> %.4g", sampler.name,
                     len(warmup), warmup[0], warmup[-1])
        nets: dict[int, nn.Module | None] = {}  # id(schedule) -> the correction it goes with (a frozen copy)

        def result_of(run: _Run) -> Tensor:
            """The run's schedule now, its correction's state recorded beside it."""
            sigmas = run.result()
            nets[id(sigmas)] = frozen_copy(run.averaged_correction()) if run.correction is not None else None
            return sigmas

        noise_seeds = [seeding.derive_seed("tune", "pathwise", "select", seed)]
        noise_seeds += [seeding.derive_seed("tune", "pathwise", "select", seed, k) for k in range(1, self.select_seeds)]
        metric, scorers = None, []
        if scoring:  # one scorer per selection seed: the same training points (shared) or its own block (disjoint)
            if blocks * self.select_train > available:
                raise ValueError(f"tuner.select_reference=disjoint needs select_seeds x select_train = {blocks} x "
                                 f"{self.select_train} training points; data={datamodule.name} has {available}")
            for k in range(blocks):
                metric, score = selection_scorer(datamodule, self.select_train, self.feature_cache,
                                                 offset=k * self.select_train)
                scorers.append(score)
            scorers = scorers * (self.select_seeds // blocks)
        per_seed: dict[int, list[float]] = {}  # id(schedule) -> its score on each selection seed

        def scores(schedules: list[Tensor]) -> list[float]:
            """Training-split scores of ``schedules``, the mean over the selection seeds (the same noise for each
            schedule; the samples are counted by D); each seed's score is kept in ``per_seed``."""
            candidates = [(i, with_correction(with_schedule(sampler, SigmaSchedule(s.tolist())), nets.get(id(s))))
                          for i, s in enumerate(schedules)]
            values = [[] for _ in schedules]
            for noise_seed, score in zip(noise_seeds, scorers):
                out, _ = mean_scores(candidates, D, shape, steps, self.select_samples, [noise_seed], 4096, device,
                                     score)
                for i, value in out:
                    values[i].append(value)
            for s, v in zip(schedules, values):
                per_seed[id(s)] = v
            return [sum(v) / len(v) for v in values]

        explore = min(self.explore, self.iterations) if len(runs) > 1 else 0
        details: dict = {"select_metric": metric}
        checkpoints: list[tuple[int, Tensor, float, object]] = []  # (iteration, schedule, training score, start)
        if len(runs) > 1:
            unmoved = explore == 0 and bool(self.select_every)  # the starts, scored as checkpoints, are the choice
            if self.select_every:  # every start is a candidate too: the result is never worse than the best start
                starts = [result_of(run) for run in runs]
                start_values = scores(starts)
                checkpoints += [(0, start, value, first) for start, value, first in zip(starts, start_values, firsts)]
            if unmoved:  # no step taken: not scored twice
                results, values = starts, start_values
            else:
                for run in runs:
                    run.train(explore)
                results = [result_of(run) for run in runs]
                values = scores(results)
            finite = [i for i, v in enumerate(values) if math.isfinite(v)]
            if not finite:
                raise RuntimeError("tuner=pathwise: every start's samples scored NaN / inf")
            best = min(finite, key=lambda i: values[i])
            details["starts"] = [{"first_level": first, "score": v, "sigmas": [float(x) for x in r]}
                                 for first, v, r in zip(firsts, values, results)]
            details["selected_start"] = firsts[best]
            runs = [runs[best]]
            if not unmoved:
                checkpoints.append((explore, results[best], values[best], firsts[best]))
        elif self.select_every:
            start = result_of(runs[0])  # a single start (a warm start from a tuned schedule) is a checkpoint too
            checkpoints.append((0, start, scores([start])[0], firsts[0]))
        run, remaining = runs[0], self.iterations - explore
        origin = details.get("selected_start", firsts[0])  # the start the later checkpoints come from
        while remaining > 0:
            chunk = min(self.select_every or remaining, remaining)
            run.train(chunk)
            remaining -= chunk
            if self.select_every:
                result = result_of(run)
                checkpoints.append((run.iteration, result, scores([result])[0], origin))
        if self.select_every:
            finite = [c for c in checkpoints if math.isfinite(c[2])]
            if not finite:
                raise RuntimeError("tuner=pathwise: every checkpoint's samples scored NaN / inf")
            admitted = self.admitted(finite, per_seed)
            iteration, sigmas, selected, origin = min((c for c, ok in zip(finite, admitted) if ok), key=lambda c: c[2])
            admitted = {id(c[1]): ok for c, ok in zip(finite, admitted)}
            details["checkpoints"] = [{"iteration": it, "score": v, "start": st, "scores": per_seed[id(sch)],
                                       "admitted": admitted.get(id(sch), False)} for it, sch, v, st in checkpoints]
            details["selected_score"] = selected
            details["selected_iteration"] = iteration
            details["selected_checkpoint_start"] = origin  # the start the returned schedule came from
        else:
            sigmas = result_of(run)
        if self.correction:
            details["correction"] = nets[id(sigmas)]
        return sigmas, {**details, "initial_sigmas": [float(v) for v in run.start], "averaged_iterations": run.kept,
                        **({"correction_warmup_losses": warmup} if warmup else {}),
                        "final_loss": run.history["loss"][-1] if run.history["loss"] else float("nan"),
                        "final_disc_acc": run.history["disc_acc"][-1] if run.history["disc_acc"] else float("nan"),
                        "grad_snr": run.grad_snr(),
                        "losses": run.history["loss"], "history": run.history}


class _Features(nn.Module):
    """A classifier's ``features`` method as a module (the feature discriminator's ``phi``)."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier.features(x)


class _Run:
    """One start of :class:`PathwiseTuner`: its schedule, discriminator, optimisers and history."""

    def __init__(self, tuner: PathwiseTuner, sampler, D, train: Tensor, shape: tuple, levels: nn.Module,
                 disc: nn.Module | None, gen: torch.Generator, seed: int, device, train_labels: Tensor | None = None,
                 num_classes: int = 0, correction: Correction | None = None):
        self.tuner, self.sampler, self.D, self.train_data, self.shape = tuner, sampler, D, train, shape
        self.levels, self.gen, self.seed, self.device = levels.to(device), gen, seed, device
        self.disc = disc.to(device) if disc is not None else None  # None: loss=ot
        self.train_labels, self.num_classes = train_labels, num_classes
        if tuner.optimizer == "sgd":
            self.opt = torch.optim.SGD(self.levels.parameters(), lr=tuner.lr, momentum=0.9)
        else:
            self.opt = torch.optim.Adam(self.levels.parameters(), lr=tuner.lr)
        # the discriminator's trainable parameters (a feature discriminator's feature network stays frozen)
        self.disc_params = [p for p in self.disc.parameters() if p.requires_grad] if disc is not None else []
        self.disc_opt = (torch.optim.Adam(self.disc_params, lr=tuner.disc_lr, betas=(0.5, 0.999))
                         if disc is not None else None)
        self.correction = correction.to(device) if correction is not None else None
        self.corr_opt = (torch.optim.Adam(self.correction.parameters(), lr=tuner.correction_lr)
                         if correction is not None else None)
        self.corr_avg = (AveragedModel(self.correction, multi_avg_fn=get_ema_multi_avg_fn(tuner.correction_ema))
                         if correction is not None and tuner.correction_ema > 0 else None)
        self.choices = torch.tensor(tuner.disc_sigmas, dtype=torch.float32)
        with torch.no_grad():
            self.start = self.levels().detach().cpu()
        self.history: dict[str, list[float]] = {k: [] for k in ("loss", "disc_acc", "logit_fake", "logit_real",
                                                                 "sigma_max", "grad_norm")}
        if correction is not None:
            self.history["correction_scale"] = []
        # the gradient itself, one column per schedule parameter (free: log s_0, then the gaps; karras: log s_max,
        # log s_min, log rho): its signal-to-noise ratio over iterations is in grad_snr()
        self.num_params = sum(p.numel() for p in self.levels.parameters())
        self.history.update({f"grad_{i}": [] for i in range(self.num_params)})
        self.log_levels: list[Tensor] = []
        self.iteration, self.kept = 0, 0
        self.warmed = False

    def draw_sigma(self, n: int) -> Tensor:
        return self.choices[torch.randint(len(self.choices), (n,), generator=self.gen)].to(self.device)

    def samples(self, it: int, grad: bool) -> tuple[Tensor, Tensor | None]:
        """The solver's final samples on the current schedule from this iteration's noise (autograd on: ``grad``),
        and their classes for a label-conditional discriminator (else None)."""
        batch = self.tuner.batch
        seeds = seeding.sample_seeds(batch, "tune", "pathwise", self.seed, it, device=self.device)
        eps = NoiseStream(device=self.device, seeds=seeds).initial((batch, *self.shape))
        labels = seed_labels(seeds, self.num_classes) if self.num_classes else None
        with torch.set_grad_enabled(grad):
            sigmas = self.levels()
            D = corrected(seed_conditioned(self.D, seeds), self.correction)
            x = solve(self.sampler, D, eps * sigmas[0].to(eps.dtype), sigmas)
        return x, labels

    def disc_step(self, fake: Tensor, labels: Tensor | None = None) -> dict:
        sigma = self.draw_sigma(len(fake))
        real = paired_batch(self.train_data, fake, sigma, torch.zeros_like(sigma), self.gen,
                            *((self.train_labels, labels) if labels is not None else ())).real
        loss, diag = discriminator_loss(self.disc, real, forward_noise(fake, sigma, self.gen), sigma, sigma,
                                        labels_real=labels, labels_fake=labels)
        self.disc_opt.zero_grad()
        loss.backward()
        self.disc_opt.step()
        return diag

    def train(self, iterations: int) -> None:
        tuner = self.tuner
        adversarial = tuner.loss == "adversarial"
        if adversarial and not self.warmed and tuner.disc_warmup > 0:
            fake, labels = self.samples(-1, grad=False)
            for _ in range(tuner.disc_warmup):
                self.disc_step(fake, labels)
        self.warmed = True
        nan = torch.tensor(float("nan"))
        for _ in range(iterations):
            it = self.iteration
            x, labels = self.samples(it, grad=True)
            if adversarial:
                for _ in range(tuner.disc_steps):
                    diag = self.disc_step(x.detach(), labels)
                for p in self.disc_params:
                    p.requires_grad_(False)
                sigma = self.draw_sigma(len(x))
                loss = generator_loss(self.disc, forward_noise(x, sigma, self.gen), sigma, tuner.reward, labels)
                for p in self.disc_params:
                    p.requires_grad_(True)
            else:  # ot, mmd: the batch against fresh training points (of the same classes), no discriminator
                k = tuner.ot_reals  # ot_reals training points per sample (free: no denoiser evaluations)
                zero = torch.zeros(k * len(x), device=x.device)
                real_labels = labels.repeat(k) if labels is not None else None
                real = paired_batch(self.train_data, x.detach().repeat(k, *[1] * (x.dim() - 1)), zero, zero, self.gen,
                                    *((self.train_labels, real_labels) if labels is not None else ())).real
                if tuner.loss == "mmd":
                    loss = kernel_mmd_loss(x, real, tuner.mmd_bandwidths).to(x.dtype)
                else:
                    loss = transport_loss(x, real, labels, tuner.ot_mass, real_labels, tuner.ot_partial).to(x.dtype)
                diag = {"disc/acc": nan, "disc/logit_fake": nan, "disc/logit_real": nan}
            self.opt.zero_grad()
            if self.corr_opt is not None:
                self.corr_opt.zero_grad()
            loss.backward()
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).double().reshape(-1)
                              for p in self.levels.parameters()])
            grad_norm = flat.norm()
            if not torch.isfinite(loss) or not torch.isfinite(grad_norm):
                raise FloatingPointError(f"tuner=pathwise: non-finite loss or gradient at iteration {it} "
                                         f"(loss {float(loss):.3g}); lower tuner.lr")
            self.opt.step()
            if self.corr_opt is not None:
                self.corr_opt.step()
                if self.corr_avg is not None:
                    self.corr_avg.update_parameters(self.correction)
                self.history["correction_scale"].append(correction_scale(self.correction))
            self.levels.project()
            with torch.no_grad():
                self.log_levels.append(self.levels.log_levels().detach().cpu())
            for key, value in (("loss", loss), ("disc_acc", diag["disc/acc"]), ("logit_fake", diag["disc/logit_fake"]),
                               ("logit_real", diag["disc/logit_real"]), ("grad_norm", grad_norm)):
                self.history[key].append(float(value.detach()))
            self.history["sigma_max"].append(float(self.log_levels[-1][0].exp()))
            for i, g in enumerate(flat.tolist()):
                self.history[f"grad_{i}"].append(g)
            self.iteration += 1
            if self.iteration % max(1, tuner.iterations // 10) == 0:
                disc = f", disc acc {self.history['disc_acc'][-1]:.3f}" if adversarial else ""
                log.info("pathwise %s: iteration %d/%d, %s loss %.4f%s, first level %.3g", self.sampler.name,
                         self.iteration, tuner.iterations, tuner.loss, self.history["loss"][-1], disc,
                         self.history["sigma_max"][-1])

    def averaged_correction(self) -> nn.Module | None:
        """The correction a checkpoint takes: its moving average (``correction_ema`` > 0, once it has been updated),
        else its current weights."""
        if self.corr_avg is None or int(self.corr_avg.n_averaged) == 0:
            return self.correction
        return self.corr_avg.module

    def grad_snr(self) -> list[float]:
        """Per schedule parameter, ``|mean| / std`` of its gradient over the iterations run so far (NaN with fewer
        than 2): below about 1/sqrt(iterations) the gradient is indistinguishable from noise about zero."""
        out = []
        for i in range(self.num_params):
            g = torch.tensor(self.history[f"grad_{i}"], dtype=torch.float64)
            out.append(float(g.mean().abs() / g.std()) if len(g) > 1 and float(g.std()) > 0 else float("nan"))
        return out

    def result(self) -> Tensor:
        """The schedule: the mean log-levels of the last ``average`` fraction of the iterations run so far."""
        if not self.log_levels:
            return self.start.double()
        self.kept = max(1, int(round(self.tuner.average * len(self.log_levels))))
        mean_log = torch.stack(self.log_levels[-self.kept:]).double().mean(0)
        return torch.cat([mean_log.exp(), mean_log.new_zeros(1)])
