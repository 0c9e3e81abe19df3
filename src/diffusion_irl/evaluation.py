"""NFE-matched comparison of samplers on one denoiser with common random numbers (docs/method.md section 7).

Every sampler gets the same initial noise and the same per-step noise for each seed (sample ``i`` of seed ``s``
draws from its own per-sample seed ``sample_seeds(num_samples, "evaluate", s)[i]``, whatever the batch size), the
same held-out data, and the same metric code. A ``reference`` row scores fresh exact samples of the data law
(the metric's noise floor at that sample size); for data without an exact sampler, a sample of the training split
stands in (still scored against held-out data).
"""
from __future__ import annotations

import csv
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffusion_irl import seeding
from diffusion_irl.sampling.noise import NoiseStream
from diffusion_irl.sampling.samplers import Sampler

log = logging.getLogger(__name__)

REFERENCE = "reference"
COLUMNS = ("sampler", "nfe", "seed", "metric", "value")
# metrics where lower is better (the others are higher-is-better); used for plots and the table's arrows
LOWER_IS_BETTER = {"mmd", "sliced_w2", "w2", "nll", "fd", "fid", "nonfinite", "sample_seconds"}


@dataclass
class Row:
    sampler: str
    nfe: int
    seed: int
    metric: str
    value: float


@dataclass
class Run:
    """One (sampler, budget, seed) cell: the samples' metrics plus bookkeeping."""

    sampler: str
    budget: int
    nfe: int
    steps: int
    seed: int
    metrics: dict[str, float]  # includes sample_seconds (sampling time) for sampler rows


def generate(sampler: Sampler, denoiser: Callable, shape: Sequence[int], steps: int, num_samples: int, seed: int,
             batch_size: int, device: torch.device | str = "cpu") -> tuple[Tensor, int]:
    """Draw ``num_samples`` samples in chunks of ``batch_size``. Sample ``i`` draws its initial and per-step noise
    from its own seed ``sample_seeds(num_samples, "evaluate", seed)[i]`` (``NoiseStream(seeds=...)``), so every
    sampler sees the same noise and the samples do not depend on the batch size (or on how chunks are split across
    devices).
    Returns the samples (on CPU) and the NFE counted per sample."""
    out, nfe = [], None
    per_sample = seeding.sample_seeds(num_samples, "evaluate", seed, device=device)
    for start in range(0, num_samples, batch_size):
        noise = NoiseStream(device=device, seeds=per_sample[start:start + batch_size])
        res = sampler.sample(denoiser, (len(noise.seeds), *shape), steps, noise)
        if nfe is not None and res.nfe != nfe and not getattr(sampler, "variable_nfe", False):
            raise RuntimeError(f"{sampler.name}: chunks used different NFE ({nfe} vs {res.nfe})")
        nfe = res.nfe if nfe is None else max(nfe, res.nfe)  # samplers with per-sample NFE (renoise): the largest
        out.append(res.x.detach().float().cpu())
    return torch.cat(out), int(nfe)


@dataclass
class Evaluator:
    """Runs every sampler at every NFE budget for every seed and scores the samples with ``score(x, seed)``."""

    samplers: Mapping[str, Sampler]
    nfe: Sequence[int]
    num_samples: int
    seeds: Sequence[int]
    score: Callable[[Tensor, int], dict[str, float]]
    reference: Callable[[int, int], Tensor] | None = None  # (num_samples, seed) -> real samples
    batch_size: int = 4096
    device: str = "cpu"
    progress: bool = True
    keep: Sequence[str] = ()  # samplers whose samples of the first seed are kept in ``samples`` (for figures)
    runs: list[Run] = field(default_factory=list)
    samples: dict[str, Tensor] = field(default_factory=dict)

    def plan(self) -> list[tuple[str, int, int]]:
        """(sampler, budget, steps) for every cell that fits its budget; budgets that give the same steps as a
        smaller budget are run once."""
        cells = []
        for name, sampler in self.samplers.items():
            seen = set()
            for budget in sorted(self.nfe):
                steps = sampler.steps_for_budget(budget)
                if steps is None:
                    log.info("%s: NFE budget %d is too small (skipped)", name, budget)
                    continue
                if steps not in seen:
                    seen.add(steps)
                    cells.append((name, budget, steps))
        return cells

    def run(self, denoiser: Callable, shape: Sequence[int]) -> list[Row]:
        cells = self.plan()
        total = len(self.seeds) * (len(cells) + (self.reference is not None))
        bar = tqdm(total=total, desc="evaluate", disable=not self.progress, dynamic_ncols=True)
        for seed in self.seeds:
            if self.reference is not None:
                x = self.reference(self.num_samples, seed)
                self.runs.append(Run(REFERENCE, 0, 0, 0, seed, self.score(x, seed)))
                bar.update()
            for name, budget, steps in cells:
                bar.set_postfix_str(f"seed {seed} {name} nfe<={budget}")
                t0 = time.perf_counter()
                x, used = generate(self.samplers[name], denoiser, shape, steps, self.num_samples, seed,
                                   self.batch_size, self.device)
                sample_seconds = time.perf_counter() - t0
                if name in self.keep and seed == self.seeds[0]:
                    self.samples[name] = x
                if used > budget:
                    raise RuntimeError(f"{name} used {used} NFE for a budget of {budget}")
                metrics = self.score(x, seed)
                metrics["sample_seconds"] = sample_seconds
                self.runs.append(Run(name, budget, used, steps, seed, metrics))
                bar.update()
        bar.close()
        return self.rows()

    def rows(self) -> list[Row]:
        return [Row(r.sampler, r.nfe, r.seed, m, float(v)) for r in self.runs for m, v in r.metrics.items()]


# --- summaries and outputs -----------------------------------------------------------------------------------------

def summarise(rows: Sequence[Row]) -> dict[tuple[str, int], dict[str, tuple[float, float, int]]]:
    """(sampler, nfe) -> metric -> (mean, std over seeds, number of seeds). Non-finite values count as NaN."""
    acc: dict[tuple[str, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        acc[(r.sampler, r.nfe)][r.metric].append(r.value)
    out = {}
    for key, metrics in acc.items():
        out[key] = {}
        for m, vals in metrics.items():
            t = torch.tensor(vals, dtype=torch.float64)
            std = float(t.std()) if len(vals) > 1 else 0.0
            out[key][m] = (float(t.mean()), std, len(vals))
    return out


def _fmt(mean: float, std: float) -> str:
    if not math.isfinite(mean):
        return "nan"
    mag = max(abs(mean), abs(std), 1e-12)
    digits = 4 if mag < 10 else 2 if mag < 1000 else 0
    if mag < 1e-3:
        return f"{mean:.2e} ± {std:.1e}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def metric_order(rows: Sequence[Row]) -> list[str]:
    preferred = ["mmd", "sliced_w2", "w2", "fd", "fid", "precision", "recall", "density", "coverage", "nll",
                 "mode_coverage", "hq_fraction", "nonfinite", "sample_seconds"]
    names = list(dict.fromkeys(r.metric for r in rows))
    return [m for m in preferred if m in names] + [m for m in names if m not in preferred]


def markdown_table(rows: Sequence[Row], metrics: Sequence[str] | None = None, sampler_order: Sequence[str] | None = None) -> str:
    """Mean ± std over seeds, one line per (sampler, NFE); ↓ lower is better, ↑ higher is better."""
    summary = summarise(rows)
    metrics = list(metrics) if metrics is not None else metric_order(rows)
    present = list(dict.fromkeys(r.sampler for r in rows))
    order = [s for s in (sampler_order or present) if s in present and s != REFERENCE]
    order = ([REFERENCE] if REFERENCE in present else []) + order + [s for s in present if s not in order and s != REFERENCE]
    head = ["sampler", "NFE", "seeds"] + [f"{m} {'↓' if m in LOWER_IS_BETTER else '↑'}" for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in order:
        for (s, nfe) in sorted(k for k in summary if k[0] == name):
            cells = summary[(s, nfe)]
            n = max(v[2] for v in cells.values())
            vals = [_fmt(*cells[m][:2]) if m in cells else "" for m in metrics]
            lines.append("| " + " | ".join([s, "–" if s == REFERENCE else str(nfe), str(n)] + vals) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[Row], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([r.sampler, r.nfe, r.seed, r.metric, repr(r.value)])


def read_csv(path: Path) -> list[Row]:
    with open(path) as f:
        return [Row(d["sampler"], int(d["nfe"]), int(d["seed"]), d["metric"], float(d["value"])) for d in csv.DictReader(f)]


def plot_quality_vs_nfe(rows: Sequence[Row], path: Path, metrics: Sequence[str] | None = None, title: str = "") -> None:
    """One panel per metric: mean ± std over seeds against NFE (log scale), one line per sampler, the reference
    row as a horizontal band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(rows)
    metrics = [m for m in (metrics or metric_order(rows)) if m not in ("sample_seconds",)][:8]
    samplers = [s for s in dict.fromkeys(r.sampler for r in rows) if s != REFERENCE]
    ncol = min(4, len(metrics))
    nrow = math.ceil(len(metrics) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.4 * nrow), squeeze=False)
    for ax, m in zip(axes.flat, metrics):
        for s in samplers:
            pts = sorted((nfe, *summary[(s, nfe)][m][:2]) for (name, nfe) in summary if name == s and m in summary[(s, nfe)])
            pts = [p for p in pts if math.isfinite(p[1])]
            if pts:
                x, y, e = zip(*pts)
                ax.errorbar(x, y, yerr=e, marker="o", ms=3, capsize=2, label=s)
        if (REFERENCE, 0) in summary and m in summary[(REFERENCE, 0)]:
            mu, sd, _ = summary[(REFERENCE, 0)][m]
            if math.isfinite(mu):
                ax.axhline(mu, color="k", ls="--", lw=1, label=REFERENCE)
                ax.axhspan(mu - sd, mu + sd, color="k", alpha=0.1)
        ax.set_xscale("log", base=2)
        vals = [v[0] for c in summary.values() for mm, v in c.items() if mm == m and math.isfinite(v[0])]
        if m in LOWER_IS_BETTER and vals and max(vals) > 20 * max(min(abs(v) for v in vals), 1e-9):
            # distances span decades at small NFE; symlog also copes with the unbiased MMD dipping below 0
            lin = 1.0 if m == "nll" else max(1e-4, sorted(abs(v) for v in vals)[len(vals) // 4])
            ax.set_yscale("symlog", linthresh=lin)
        ax.set_title(f"{m} ({'lower' if m in LOWER_IS_BETTER else 'higher'} is better)", fontsize=10)
        ax.set_xlabel("NFE")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 9), fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# what each metric measures, at the end of every results.md (recall alone can mislead)
METRIC_LEGEND = """
## What the metrics measure

- `mmd`, `sliced_w2`, `w2`, `fd`, `fid`: distances between the samples and held-out data (lower is better).
- `precision`: the share of samples that fall inside the data's k-NN balls (fidelity; higher is better).
- `recall`: the share of held-out data points that fall inside the *samples'* k-NN balls (coverage of the data;
  higher is better). Recall alone does not measure fidelity: widely dispersed samples have huge k-NN balls that
  cover every data point, so their recall is 1.0 while their precision and distances are poor. Read it next to
  precision and a distance.
- `density`: the mean number of data k-NN balls holding a sample, / k (about 1 for equal laws); `coverage`: the
  share of data k-NN balls holding at least one sample (Naeem et al. 2020).
- `nll`: negative log-likelihood of the samples under the exact data law (when known); `mode_coverage`: the share
  of the mixture's modes that receive samples.
"""


def write_outputs(rows: Sequence[Row], out_dir: Path, title: str = "", sampler_order: Sequence[str] | None = None) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "results.csv", "md": out_dir / "results.md", "png": out_dir / "quality_vs_nfe.png"}
    write_csv(rows, paths["csv"])
    table = markdown_table(rows, sampler_order=sampler_order)
    paths["md"].write_text((f"# {title}\n\n" if title else "") + table + METRIC_LEGEND)
    plot_quality_vs_nfe(rows, paths["png"], title=title)
    return paths


# --- scoring -------------------------------------------------------------------------------------------------------

def scorer_for(datamodule, num_heldout: int | None = None, feature_cache: str | Path | None = None,
               inception_weights: str | None = None, classifier_epochs: int = 5,
               split: str = "heldout") -> Callable[[Tensor, int], dict[str, float]]:
    """The metric function for a datamodule: 2D/vector data -> ``metrics.samples.sample_metrics`` against held-out
    data (plus exact-law metrics when the law is known); images -> Fréchet distance and precision / recall in the
    features of a classifier trained on the training split (cached), plus Inception FID when weights are local.

    ``split="train"`` scores against (the first ``num_heldout`` points of) the training split instead: for model
    selection (the grid search), so that the held-out split is only ever used for the final comparison."""
    if split not in ("heldout", "train"):
        raise ValueError(f"split must be 'heldout' or 'train', got {split!r}")
    datamodule.setup()
    pool = datamodule.heldout if split == "heldout" else datamodule.train_samples
    available = len(pool())
    n = available if num_heldout is None else min(int(num_heldout), available)
    heldout = pool(n)
    if len(datamodule.shape) == 1:
        from diffusion_irl.metrics.samples import sample_metrics

        law, cache = datamodule.law, {}  # held-out-only terms, reused across samplers (same heldout throughout)

        def score(x: Tensor, seed: int) -> dict[str, float]:
            return sample_metrics(x, heldout, law, generator=seeding.generator("metrics", seed), cache=cache)

        return score

    from diffusion_irl.metrics.features import image_metrics, inception_fid, train_feature_classifier

    if datamodule.num_classes <= 0:
        raise ValueError(f"image metrics need a labelled data set to train the feature classifier; data={datamodule.name} has no labels")
    cache = None
    if feature_cache is not None:
        cache = Path(feature_cache) / f"feature_classifier_{datamodule.name}_{'x'.join(map(str, datamodule.shape))}.pt"
        cache.parent.mkdir(parents=True, exist_ok=True)
    n_val = min(n, len(datamodule.heldout()))
    net = train_feature_classifier(datamodule.train_samples(), datamodule.train_labels(), datamodule.heldout(n_val),
                                   datamodule.heldout_labels(n_val), datamodule.num_classes, epochs=classifier_epochs,
                                   cache_path=cache)
    # train_feature_classifier prints the held-out accuracy (also when loaded from the cache)

    image_cache: dict = {}  # held-out features and Fréchet statistics, computed once for every sampler

    def score(x: Tensor, seed: int) -> dict[str, float]:
        metrics = image_metrics(x, heldout, net, cache=image_cache)
        fid = inception_fid(x, heldout, inception_weights) if inception_weights else None
        if fid is not None:
            metrics["fid"] = fid
        return metrics

    return score


def reference_for(datamodule) -> Callable[[int, int], Tensor]:
    """Fresh exact samples where the law is known; otherwise a seeded subsample of the training split."""
    if datamodule.law is not None:
        return lambda n, seed: datamodule.exact_samples(n, generator=seeding.generator("reference", seed))

    def from_train(n: int, seed: int) -> Tensor:
        x = datamodule.train_samples()
        idx = torch.randperm(len(x), generator=seeding.generator("reference", seed))[: min(n, len(x))]
        return x[idx]

    return from_train
