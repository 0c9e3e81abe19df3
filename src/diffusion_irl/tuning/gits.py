"""GITS (Chen et al. 2024, "On the Trajectory Regularity of ODE-based Diffusion Sampling"; docs/method.md section 9).

The variant implemented here:

1. Fine grid: ``M`` Karras levels ``s_0 = sigma_max > ... > s_{M-1} = sigma_min`` (exponent ``rho``) and
   ``s_M = 0``: ``M + 1`` levels in all.
2. Teacher: Heun (EDM Algorithm 1; the last step, to 0, is Euler) along the fine grid from ``num_warmup`` initial
   noises ``x_0 = sigma_max eps`` (seeds from ``("tune", "gits", seed)``). It keeps every state ``x_i`` and the
   first denoiser evaluation of each step, ``D_i = D(x_i, s_i)``. Cost: ``num_warmup (2M - 1)`` evaluations.
3. Cost matrix, for ``i < j``::

       x_hat_{i->j} = x_i + (s_j - s_i) (x_i - D_i) / s_i        (one Euler step from the teacher's state)
       C[i, j]      = mean_b || x_hat_{i->j} - x_j ||_2            (per-sample L2 norm, mean over the noises)

   The Euler step is the first-order step of every solver here (DDIM, DPM-Solver++, iPNDM and UniPC all reduce
   to it at first order in sigma-space), as in GITS; it reuses ``D_i``, so the matrix costs nothing beyond the
   teacher. ``C[i, j] = inf`` for ``j <= i``.
4. Dynamic programming: the ``N``-step path ``0 = i_0 < i_1 < ... < i_N = M`` that minimises
   ``sum_k coeff^(k-1) C[i_{k-1}, i_k]`` (``V_k(j) = min_{i<j} V_{k-1}(i) + coeff^(k-1) C[i, j]``,
   ``V_0 = [0, inf, ...]``). ``coeff = 1`` is the plain sum; GITS's reference code also offers coefficients
   around 1 (0.8 to 1.2) that discount or amplify the later steps' costs, since an absolute L2 error is larger
   at high noise. Its levels
   ``s_{i_0}, ..., s_{i_N}`` are the schedule: ``N + 1`` sigmas, first ``sigma_max``, last 0 (the last non-zero
   level is chosen by the path, not fixed to ``sigma_min``). Needs ``M >= N``.
   With ``end_at_sigma_min`` (the default, as GITS does) the ``N`` steps end at the fine grid's last non-zero
   level ``sigma_min`` (the DP runs from level 0 to level ``M - 1``, costs ``C[i, M - 1]`` for the final step),
   and that level then stands for 0 in the schedule: GITS takes the state at ``sigma_min`` as the sample, so the
   solver's last step goes to 0 instead (for ``sigma_min = 0.002`` the two endpoints differ by ``0.002 d``).
   Needs ``M - 1 >= N``. Without it, the path may jump to 0 from a high level, which is cheap in L2 to the
   teacher but replaces the last stretch of the trajectory by the posterior mean (it shrinks every mode; seen on
   gmm8 at 10 NFE, where the path ended at sigma 0.9).
5. ``coeff`` may be a list: one DP path per coefficient, then the path whose samples (``select_samples``, the
   same noise for each) score best on the training split (the grid's scorer: squared MMD / FD) wins. Its cost,
   ``len(coeff) x select_samples x NFE``, is counted with the teacher's. GITS's reference code writes out paths
   for coefficients from 0.8 to 1.2 for the user to choose from; this is that choice, made on training data.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from diffusion_irl import seeding
from diffusion_irl.sampling.samplers import seed_conditioned
from diffusion_irl.sampling.schedules import SigmaSchedule, karras_sigmas
from diffusion_irl.sampling.solvers import heun_step, to_d
from diffusion_irl.tensors import append_dims
from diffusion_irl.tuning.grid import mean_scores, selection_scorer
from diffusion_irl.tuning.tuners import Tuner, initial_noise, positive_int, sigma_range, with_schedule


@torch.no_grad()
def teacher_trajectory(D, x: Tensor, sigmas: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Heun along ``sigmas`` ([M + 1], ending in 0) from ``x``: the states ``[x_0 .. x_M]`` and the denoised
    estimates ``[D_0 .. D_{M-1}]`` (the first evaluation of each step). NFE: ``2M - 1``."""
    states, denoised = [x], []
    for i in range(len(sigmas) - 1):
        x, den = heun_step(D, x, sigmas[i], sigmas[i + 1])
        states.append(x)
        denoised.append(den)
    return states, denoised


def cost_matrix(states: list[Tensor], denoised: list[Tensor], sigmas: Tensor) -> Tensor:
    """``C[i, j] = mean_b || x_i + (s_j - s_i) (x_i - D_i) / s_i - x_j ||`` for ``i < j`` (float64
    [M + 1, M + 1]; ``inf`` on and below the diagonal)."""
    levels = len(sigmas)
    targets = torch.stack(states).double()  # [M + 1, B, ...]
    sigmas = sigmas.to(device=targets.device, dtype=torch.float64)
    C = torch.full((levels, levels), float("inf"), dtype=torch.float64, device=targets.device)
    for i in range(levels - 1):
        x = targets[i]
        d = to_d(x, sigmas[i].expand(x.shape[0]), denoised[i].double())
        h = append_dims(sigmas[i + 1:] - sigmas[i], x.ndim + 1)  # [L - i - 1, 1, ...]
        err = x.unsqueeze(0) + h * d.unsqueeze(0) - targets[i + 1:]
        C[i, i + 1:] = err.flatten(2).norm(dim=2).mean(dim=1)
    return C.cpu()


def best_path(C: Tensor, steps: int, coeff: float = 1.0) -> list[int]:
    """The ``steps``-step path from index 0 to the last index of the cost matrix ``C`` ([L, L], ``C[i, j]`` the cost
    of the move ``i -> j``; ``inf`` forbids it) with the smallest total cost ``sum_m coeff^m C[i_m, i_{m+1}]`` (step
    ``m`` counted from the start; ``coeff > 1`` weighs the late, low-noise steps more), by dynamic programming:
    ``V_k(j) = min_i V_{k-1}(i) + coeff^(k-1) C[i, j]``. ``ValueError`` when no such path exists."""
    L = C.shape[0]
    C = C.double()
    V = torch.full((L,), float("inf"), dtype=torch.float64)
    V[0] = 0.0
    parents = []
    for m in range(steps):
        total = V[:, None] + float(coeff) ** m * C  # [from, to]
        V, arg = total.min(dim=0)
        parents.append(arg)
    if not torch.isfinite(V[L - 1]):
        raise ValueError(f"no {steps}-step path from level 0 to level {L - 1}")
    path = [L - 1]
    for arg in reversed(parents):
        path.append(int(arg[path[-1]]))
    return path[::-1]


class GITSTuner(Tuner):
    """GITS: the DP path of least local (one Euler step) error against a fine Heun teacher (see the module doc).

    Args:
        levels: M, the fine grid's non-zero levels. rho, sigma_min, sigma_max: its Karras parameters.
        num_warmup: teacher trajectories. batch_size: teacher chunk. end_at_sigma_min: the last step goes from
        ``sigma_min`` to 0 (see the module doc). coeff: the DP's weight ``coeff^m`` on step ``m``'s cost; a list:
        one path per value, and the path whose ``select_samples`` samples score best against ``num_train``
        points of the TRAINING split (the grid's scorer) wins (its cost is counted).
    """

    name = "gits"

    def __init__(self, levels: int = 100, rho: float = 7.0, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 num_warmup: int = 256, batch_size: int = 1024, end_at_sigma_min: bool = True,
                 coeff: float | Sequence[float] = 1.0, select_samples: int = 1000, num_train: int = 2000,
                 feature_cache: str | None = None):
        self.levels = positive_int(levels, "tuner.levels", 2)
        self.sigma_min, self.sigma_max = sigma_range(sigma_min, sigma_max, "tuner")
        if not rho > 0:
            raise ValueError(f"tuner.rho must be > 0, got {rho}")
        self.rho = float(rho)
        self.num_warmup = positive_int(num_warmup, "tuner.num_warmup")
        self.batch_size = positive_int(batch_size, "tuner.batch_size")
        self.end_at_sigma_min = bool(end_at_sigma_min)
        coeffs = [float(c) for c in ([coeff] if isinstance(coeff, (int, float)) else list(coeff))]
        if not coeffs or not all(0 < c < float("inf") for c in coeffs):
            raise ValueError(f"tuner.coeff must be a positive number or a non-empty list of them, got {coeff}")
        self.coeffs = coeffs
        self.select_samples = positive_int(select_samples, "tuner.select_samples", 2)
        self.num_train = positive_int(num_train, "tuner.num_train", 2)
        self.feature_cache = feature_cache

    def settings(self) -> dict:
        return {"levels": self.levels, "rho": self.rho, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
                "num_warmup": self.num_warmup, "teacher": f"heun on the {self.levels}-level grid",
                "local_step": "euler", "end_at_sigma_min": self.end_at_sigma_min, "coeff": self.coeffs,
                **({"select_samples": self.select_samples, "num_train": self.num_train, "selection": "train split"}
                   if len(self.coeffs) > 1 else {})}

    def check(self, sampler, nfe):
        steps = super().check(sampler, nfe)
        need = steps + 1 if self.end_at_sigma_min else steps
        if self.levels < need:
            raise ValueError(f"tuner.levels={self.levels} is too few for {steps} steps: the path visits {need} of "
                             f"the M fine levels, so M must be >= {need}")
        return steps

    def fine_sigmas(self) -> Tensor:
        return karras_sigmas(self.levels, self.sigma_min, self.sigma_max, self.rho)

    def _tune(self, sampler, D, datamodule, steps, seed, device):
        sigmas = self.fine_sigmas().to(device)
        x_T, seeds = initial_noise(self.num_warmup, datamodule.shape, self.sigma_max, ("tune", "gits", seed), device)
        C = torch.zeros(len(sigmas), len(sigmas), dtype=torch.float64)
        for start in range(0, self.num_warmup, self.batch_size):
            chunk = x_T[start:start + self.batch_size]
            states, denoised = teacher_trajectory(seed_conditioned(D, seeds[start:start + self.batch_size]), chunk,
                                                  sigmas)
            C += cost_matrix(states, denoised, sigmas) * (len(chunk) / self.num_warmup)
        candidates = [self._path(C, sigmas.cpu(), steps, coeff) for coeff in self.coeffs]
        if len(candidates) == 1:
            return candidates[0]
        # several coefficients: the path whose samples score best on the TRAINING split (the grid's scorer)
        metric, score = selection_scorer(datamodule, self.num_train, self.feature_cache)
        noise_seed = seeding.derive_seed("tune", "gits-select", seed)
        schedules = [(i, with_schedule(sampler, SigmaSchedule(sigmas=levels.tolist())))
                     for i, (levels, _) in enumerate(candidates)]
        scored, _ = mean_scores(schedules, D, datamodule.shape, steps, self.select_samples, [noise_seed],
                                self.batch_size, device, score)  # the cost is counted by D
        scores = [value for _, value in scored]
        best = min(range(len(candidates)), key=lambda i: scores[i])
        levels, details = candidates[best]
        return levels, {**details, "selected_coeff": self.coeffs[best], "metric": metric, "split": "train",
                        "coeff_scores": dict(zip(map(str, self.coeffs), scores))}

    def _path(self, C: Tensor, sigmas: Tensor, steps: int, coeff: float) -> tuple[Tensor, dict]:
        last = len(sigmas) - 1  # the fine grid's 0; last - 1 is sigma_min
        path = best_path(C[:last, :last] if self.end_at_sigma_min else C, steps, coeff)
        total = float(sum(coeff ** m * C[a, b] for m, (a, b) in enumerate(zip(path[:-1], path[1:]))))
        levels = sigmas[path]
        if self.end_at_sigma_min:
            levels[-1] = 0.0  # the path ends at sigma_min, which stands for 0
        return levels, {"path": path, "path_cost": total, "coeff": coeff}
