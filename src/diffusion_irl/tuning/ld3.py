"""LD3 (Tong et al. 2025, "Learning to Discretize Denoising Diffusion ODEs"; docs/method.md section 9).

The variant implemented here:

- **Parametrisation** (:class:`LogSigmaLevels`): ``N`` logits ``xi`` give ``N`` positive increments
  ``w = softmax(xi)`` (summing to 1) in log sigma, ``log s_k = log sigma_max - (log sigma_max - log sigma_min)
  sum_{m<k} w_m`` for ``k = 0..N``: strictly decreasing, ``s_0 = sigma_max``, ``s_N = sigma_min``. The schedule is
  ``[s_0, ..., s_{N-1}, 0]``: the solver's last step goes from ``s_{N-1}`` straight to 0, so the last increment
  ``w_{N-1}`` sets how far above ``sigma_min`` the last non-zero level sits. The logits start at the Karras schedule
  of exponent ``init_rho`` with ``N + 1`` levels from ``sigma_max`` to ``sigma_min``.
- **Teacher pairs**: ``num_pairs`` initial noises ``x_T = sigma_max eps`` (seeds from ``("tune", "ld3", seed)``)
  and ``x_0^teacher`` = Heun (EDM Algorithm 1) with ``teacher_steps`` steps on the default Karras schedule (rho 7)
  from ``sigma_max`` to ``sigma_min``, then 0. Cost: ``num_pairs (2 teacher_steps - 1)`` evaluations.
- **Student**: the tuned solver run on the learned schedule with autograd on (:func:`solve`: the sampler's own
  loop with its own options, ``Sampler.solve_differentiable``; Euler, Heun, DPM-Solver++(2M), iPNDM,
  DPM-Solver++(3M) and UniPC have one).
- **Slack**: the student starts from ``x_T' = x_T + r ||x_T|| u_b`` with ``u_b`` a per-pair free vector projected
  onto the unit ball (``u <- u / max(1, ||u||)``), optimised jointly with the logits.
- **Loss**: ``L(xi, u) = mean_b || phi(Psi_xi(x_T'_b)) - phi(x_0^teacher_b) ||_2^2 / dim phi``. ``distance``
  chooses ``phi``: ``l2`` (the identity), ``features`` (the data set's feature classifier, the network the
  evaluator's image metrics use, trained on the training split and cached: a learned feature distance in the
  place of LD3's LPIPS), or ``auto`` (l2 for vectors, features for labelled images). Adam on ``(xi, u)`` for
  ``iterations`` full-batch steps; the schedule of the smallest loss seen is returned. Cost per iteration: ``num_pairs x NFE`` forward
  evaluations (the backward passes are not counted).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from diffusion_irl.sampling.samplers import differentiable_samplers, seed_conditioned
from diffusion_irl.sampling.schedules import karras_sigmas
from diffusion_irl.sampling.solvers import sample_heun
from diffusion_irl.tensors import append_dims
from diffusion_irl.tuning.tuners import Tuner, initial_noise, positive_int, sigma_range


class LogSigmaLevels(nn.Module):
    """``N`` logits -> ``N + 1`` levels ``s_0 = sigma_max > ... > s_N = sigma_min`` (increments
    ``softmax(logits)`` of the log range); ``forward()`` is the schedule ``[s_0 .. s_{N-1}, 0]`` (float64)."""

    def __init__(self, steps: int, sigma_min: float, sigma_max: float, init_rho: float = 7.0):
        super().__init__()
        self.log_max, self.log_min = math.log(sigma_max), math.log(sigma_min)
        start = karras_sigmas(steps + 1, sigma_min, sigma_max, init_rho)[:-1]  # N + 1 levels, max .. min
        increments = -start.log().diff() / (self.log_max - self.log_min)
        self.logits = nn.Parameter(increments.clamp_min(1e-12).log())

    def levels(self) -> Tensor:
        w = torch.softmax(self.logits, dim=0)
        cum = torch.cat([w.new_zeros(1), torch.cumsum(w, dim=0)])
        return torch.exp(self.log_max - (self.log_max - self.log_min) * cum)

    def forward(self) -> Tensor:
        levels = self.levels()
        return torch.cat([levels[:-1], levels.new_zeros(1)])


def solve(sampler, D, x: Tensor, sigmas: Tensor) -> Tensor:
    """``sampler``'s solver from ``x`` along ``sigmas`` with autograd on (differentiable in ``x`` and ``sigmas``)."""
    return sampler.solve_differentiable(D, x, sigmas.to(x.dtype))


def check_differentiable(sampler, tuner: str) -> None:
    if not sampler.differentiable:
        raise ValueError(f"tuner={tuner} backpropagates through the solvers {differentiable_samplers()} only; "
                         f"sampler {sampler.name} is not one of them")


def project_ball(u: Tensor) -> Tensor:
    """Each row of ``u`` scaled into the unit ball: ``u / max(1, ||u||)``."""
    norm = u.flatten(1).norm(dim=1).clamp_min(1.0)
    return u / append_dims(norm, u.ndim)


def ld3_loss(sampler, D, sigmas: Tensor, x_T: Tensor, u: Tensor | None, radius: Tensor, target: Tensor,
             features=None) -> Tensor:
    """``mean_b || phi(Psi(x_T + r_b proj(u_b))) - phi(x_0^teacher_b) ||^2 / dim phi`` (``u`` None: no slack;
    ``features`` None: ``phi`` is the identity, else ``target`` holds the teacher's features)."""
    start = x_T if u is None else x_T + append_dims(radius, x_T.ndim) * project_ball(u)
    out = solve(sampler, D, start, sigmas)
    if features is not None:
        out = features(out)
    return (out - target).flatten(1).pow(2).sum(1).mean() / target[0].numel()


class LD3Tuner(Tuner):
    """LD3: the schedule learned by matching a Heun teacher from a slack ball (see the module doc).

    Args:
        num_pairs: teacher pairs. teacher_steps: the teacher's Heun steps. sigma_min, sigma_max: the span of the
        learned levels (and the teacher's). iterations, lr: Adam. slack: the ball's radius ``r`` relative to
        ``||x_T||`` (0: no slack). init_rho: the Karras exponent the levels start from.
    """

    name = "ld3"

    def __init__(self, num_pairs: int = 100, teacher_steps: int = 100, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, iterations: int = 300, lr: float = 0.05, slack: float = 0.05,
                 init_rho: float = 7.0, distance: str = "auto", feature_cache: str | None = None):
        self.num_pairs = positive_int(num_pairs, "tuner.num_pairs")
        self.teacher_steps = positive_int(teacher_steps, "tuner.teacher_steps", 2)
        self.sigma_min, self.sigma_max = sigma_range(sigma_min, sigma_max, "tuner")
        self.iterations = positive_int(iterations, "tuner.iterations")
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"tuner.lr must be > 0, got {lr}")
        if not (math.isfinite(slack) and 0 <= slack < 1):
            raise ValueError(f"tuner.slack must be in [0, 1), got {slack}")
        if not init_rho > 0:
            raise ValueError(f"tuner.init_rho must be > 0, got {init_rho}")
        self.lr, self.slack, self.init_rho = float(lr), float(slack), float(init_rho)
        if distance not in ("auto", "l2", "features"):
            raise ValueError(f"tuner.distance must be auto, l2 or features, got {distance!r}")
        self.distance, self.feature_cache = distance, feature_cache

    def settings(self) -> dict:
        return {"num_pairs": self.num_pairs, "teacher": f"heun, {self.teacher_steps} steps, karras rho 7",
                "sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "iterations": self.iterations,
                "lr": self.lr, "slack": self.slack, "init_rho": self.init_rho, "distance": self.distance}

    def feature_network(self, datamodule):
        """``phi`` of the loss: None (L2) or the data set's feature classifier (frozen; its ``features`` are
        differentiable in x)."""
        images = len(datamodule.shape) > 1
        if self.distance == "l2" or (self.distance == "auto" and not (images and datamodule.num_classes > 0)):
            return None
        if not images:
            raise ValueError("tuner.distance=features needs image data (vectors use l2)")
        from diffusion_irl.evaluation import feature_classifier_for

        return feature_classifier_for(datamodule, self.feature_cache).eval().requires_grad_(False)

    def check(self, sampler, nfe):
        steps = super().check(sampler, nfe)
        check_differentiable(sampler, "ld3")
        return steps

    def teacher(self, D, shape, seed: int, device) -> tuple[Tensor, Tensor, Callable]:
        """``(x_T, x_0^teacher, D_pairs)``: Heun with ``teacher_steps`` steps on Karras (rho 7) from ``sigma_max``;
        ``D_pairs`` is ``D`` conditioned on the pairs' classes (itself when unconditional)."""
        x_T, seeds = initial_noise(self.num_pairs, shape, self.sigma_max, ("tune", "ld3", seed), device)
        D = seed_conditioned(D, seeds)
        sigmas = karras_sigmas(self.teacher_steps, self.sigma_min, self.sigma_max, 7.0).to(device)
        return x_T, sample_heun(D, x_T, sigmas), D

    def _tune(self, sampler, D, datamodule, steps, seed, device):
        x_T, target, D = self.teacher(D, tuple(datamodule.shape), seed, device)
        net = self.feature_network(datamodule)
        features = net.to(device).features if net is not None else None
        if features is not None:
            with torch.no_grad():
                target = features(target)
        levels = LogSigmaLevels(steps, self.sigma_min, self.sigma_max, self.init_rho).to(device)
        u = torch.zeros_like(x_T, requires_grad=True) if self.slack > 0 else None
        radius = self.slack * x_T.flatten(1).norm(dim=1)
        opt = torch.optim.Adam([levels.logits] + ([u] if u is not None else []), lr=self.lr)
        losses, best = [], (float("inf"), None)
        for _ in range(self.iterations):
            sigmas = levels()
            loss = ld3_loss(sampler, D, sigmas, x_T, u, radius, target, features)
            losses.append(float(loss.detach()))
            if losses[-1] < best[0]:
                best = (losses[-1], sigmas.detach().cpu())
            opt.zero_grad()
            loss.backward()
            opt.step()
        if best[1] is None:
            raise RuntimeError(f"ld3: the loss was never finite (first {losses[:3]})")
        return best[1], {"initial_loss": losses[0], "best_loss": best[0], "final_loss": losses[-1],
                         "losses": losses, "distance": "l2" if features is None else "features"}
