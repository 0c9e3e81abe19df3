"""The full Karras grid (docs/method.md section 9, "Full grid"): every point of the product grid
``sigma_max x rho x sigma_min`` gives the schedule

    sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,  i < N,   sigma_N = 0,

the solver samples ``num_samples`` points on it (the same per-sample noise for every point: common random numbers,
seeds derived from ``("tune", "grid", seed)``), and the samples are scored against the TRAINING split
(:func:`selection_scorer`: squared MMD for vectors, the Fréchet distance for images, both as
``evaluation.scorer_for(..., split="train")`` computes them). The point with the smallest finite score wins; a point
whose samples hold a NaN / inf scores inf. Points with ``sigma_min >= sigma_max`` are skipped (listed in ``skipped``).
Cost: ``points x num_samples x NFE`` denoiser evaluations.
"""
from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from torch import Tensor

from diffusion_irl import seeding
from diffusion_irl.evaluation import generate, scorer_for
from diffusion_irl.metrics.samples import finite_rows, mmd, mmd_self_term
from diffusion_irl.sampling.samplers import Sampler
from diffusion_irl.sampling.schedules import KarrasSchedule
from diffusion_irl.tuning.tuners import Tuner, positive_int, with_schedule

log = logging.getLogger(__name__)

KEYS = ("sigma_max", "rho", "sigma_min")


def _values(values, key: str) -> list[float]:
    values = [float(v) for v in (values or [])]
    if not values:
        raise ValueError(f"tuner.{key} is empty: give at least one value")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"tuner.{key} values must be finite and > 0, got {values}")
    return values


def selection_scorer(datamodule, num_train: int, feature_cache=None,
                     offset: int = 0) -> tuple[str, Callable[[Tensor, int], float]]:
    """``(metric, score(x, seed))`` against the first ``num_train`` points of the TRAINING split (after the first
    ``offset``: disjoint blocks give independent references).

    Vectors: the unbiased squared MMD of ``metrics.samples.mmd`` (multi-scale RBF kernel), the value
    ``scorer_for(datamodule, num_train, split="train")`` reports as ``mmd`` for up to 4000 points, without the other
    metrics that scorer computes (about 4x faster); the training points' self-term is computed once. Images: the
    Fréchet distance ``fd`` of ``scorer_for(..., split="train")``, against training images the feature classifier
    has not seen when the data reserve them (``data.classifier_reserve``; the points must then fit in the reserve),
    else with a warning: a classifier's features of its own training images are tighter than of any other image,
    so a sampler that imitates them wins the selection and loses on held-out data. Samples with a NaN / inf row
    score inf."""
    if len(datamodule.shape) != 1:
        reserve = int(getattr(datamodule, "classifier_reserve", 0) or 0)
        if reserve and offset + num_train > reserve:
            raise ValueError(f"model selection against training points [{offset}, {offset + num_train}), but "
                             f"data.classifier_reserve={reserve} keeps only the first {reserve} from the feature "
                             "classifier: raise it or lower the tuner's number of selection points")
        if not reserve:
            log.warning("image model selection scores against training images the feature classifier was trained "
                        "on (data.classifier_reserve=0); a reserve of unseen ones is the fair reference")
        score = scorer_for(datamodule, num_train, feature_cache, split="train", offset=offset)
        return "fd", lambda x, seed: float(score(x, seed)["fd"]) if bool(finite_rows(x).all()) else math.inf
    datamodule.setup()
    pool = datamodule.train_samples()
    if not 0 <= offset < len(pool):
        raise ValueError(f"offset={offset}: the training split of data={datamodule.name} has {len(pool)} points")
    train = pool[offset:offset + num_train].double()
    kyy = mmd_self_term(train)

    def score_mmd(x: Tensor, seed: int) -> float:
        return float(mmd(x.double(), train, kyy=kyy)) if bool(finite_rows(x).all()) else math.inf

    return "mmd", score_mmd


def mean_scores(candidates: Sequence[tuple[object, Sampler]], denoiser, shape: Sequence[int], steps: int,
                num_samples: int, seeds: Sequence[int], batch_size: int, device,
                score: Callable[[Tensor, int], float]) -> tuple[list[tuple[object, float]], int]:
    """``([(key, mean over seeds of score(samples, seed))], cost)``: each candidate sampler's ``num_samples``
    samples per seed, the same noise for every candidate; ``cost`` is the per-sample denoiser evaluations spent."""
    results, cost = [], 0
    for key, sampler in candidates:
        scores = []
        for seed in seeds:
            x, used = generate(sampler, denoiser, shape, steps, num_samples, seed, batch_size, device)
            cost += used * num_samples
            scores.append(score(x, seed))
        results.append((key, sum(scores) / len(scores)))
    return results, cost


class GridTuner(Tuner):
    """Product grid over Karras ``(sigma_max, rho, sigma_min)``, selected on the training split.

    Args:
        sigma_max, rho, sigma_min: the values of each axis (non-empty lists of positive numbers).
        num_samples: samples per point. num_train: training points they are scored against.
        batch_size: sampling chunk. feature_cache: image feature classifier cache (``scorer_for``).
    """

    name = "grid"

    def __init__(self, sigma_max: Sequence[float] = (2, 5, 10, 20, 80), rho: Sequence[float] = (1, 2, 3, 5, 7),
                 sigma_min: Sequence[float] = (0.002, 0.01, 0.05, 0.1, 0.3), num_samples: int = 1000,
                 num_train: int = 2000, batch_size: int = 4096, feature_cache: str | None = None):
        self.axes = {"sigma_max": _values(sigma_max, "sigma_max"), "rho": _values(rho, "rho"),
                     "sigma_min": _values(sigma_min, "sigma_min")}
        self.num_samples = positive_int(num_samples, "tuner.num_samples", 2)
        self.num_train = positive_int(num_train, "tuner.num_train", 2)
        self.batch_size = positive_int(batch_size, "tuner.batch_size")
        self.feature_cache = feature_cache
        if not self.points():
            raise ValueError(f"tuner: no grid point has sigma_min < sigma_max (sigma_max {self.axes['sigma_max']}, "
                             f"sigma_min {self.axes['sigma_min']})")

    def settings(self) -> dict:
        return {**self.axes, "num_samples": self.num_samples, "num_train": self.num_train}

    def points(self) -> list[dict[str, float]]:
        """The valid points (``sigma_min < sigma_max``), in product order."""
        grid = (dict(zip(KEYS, p)) for p in itertools.product(*(self.axes[k] for k in KEYS)))
        return [p for p in grid if p["sigma_min"] < p["sigma_max"]]

    def _tune(self, sampler, D, datamodule, steps, seed, device):
        shape = tuple(datamodule.shape)
        metric, score = selection_scorer(datamodule, self.num_train, self.feature_cache)
        noise_seed = seeding.derive_seed("tune", "grid", seed)
        candidates = [(point, with_schedule(sampler, KarrasSchedule(**point))) for point in self.points()]
        points, _ = mean_scores(candidates, D, shape, steps, self.num_samples, [noise_seed], self.batch_size, device,
                                score)  # the cost is counted by D
        finite = [p for p in points if math.isfinite(p[1])]
        if not finite:
            raise RuntimeError("grid: every point scored NaN / inf")
        best, best_score = min(finite, key=lambda p: p[1])
        sigmas = KarrasSchedule(**best)(steps)
        return sigmas, {"metric": metric, "split": "train", "best": best, "best_score": best_score,
                        "num_points": len(points), "points": points}


def write_grid_csv(points: Sequence[tuple[dict, float]], metric: str, path: str | Path,
                   names: Sequence[str] = KEYS) -> None:
    """``grid.csv``: one line per point, its ``names`` values (default ``sigma_max,rho,sigma_min``) and
    ``<metric>_train``."""
    with open(path, "w") as f:
        f.write(",".join(names) + f",{metric}_train\n")
        for point, value in points:
            f.write(",".join(f"{point[k]:g}" for k in names) + f",{value:.6g}\n")
