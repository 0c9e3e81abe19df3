"""Figures people would rather look at than read: final samples side by side, and the learned knob schedule."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Lay out, write ``path`` (its folder created) and close ``fig``."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def plot_samples(samples: Mapping[str, Tensor], path: Path, max_points: int = 2000, max_images: int = 64) -> Path:
    """2D data: one scatter panel per entry (same axes); images: one grid per entry."""
    plt = _plt()
    names = list(samples)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        x = samples[name].detach().float().cpu()
        if x.ndim == 2 and x.shape[1] == 2:
            x = x[:max_points]
            ax.scatter(x[:, 0], x[:, 1], s=1.5, alpha=0.5)
            ax.set_xlim(-7, 7)
            ax.set_ylim(-7, 7)
            ax.set_aspect("equal")
        else:
            x = x[:max_images]
            n = x.shape[0]
            cols = int(math.ceil(math.sqrt(n)))
            rows = int(math.ceil(n / cols))
            c, h, w = x.shape[1:]
            grid = torch.ones(c, rows * (h + 1), cols * (w + 1))
            for i in range(n):
                r, q = divmod(i, cols)
                grid[:, r * (h + 1):r * (h + 1) + h, q * (w + 1):q * (w + 1) + w] = (x[i].clamp(-1, 1) + 1) / 2
            img = grid.permute(1, 2, 0).squeeze(-1)
            ax.imshow(img, cmap="gray" if c == 1 else None, vmin=0, vmax=1)
            ax.axis("off")
        ax.set_title(name, fontsize=9)
    return _save(fig, path)


def plot_schedule(schedule: Mapping[str, Tensor], ref_sigmas: Tensor, path: Path,
                  reference: Mapping[str, Tensor] | None = None) -> Path:
    """Each knob's learned per-step value against the reference noise level sigma_k (log axis), with the base
    sampler's value (dashed) where given."""
    plt = _plt()
    names = list(schedule)
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    sig = ref_sigmas[:-1].detach().float().cpu()
    for ax, name in zip(axes[0], names):
        vals = schedule[name].detach().float().cpu()
        ax.plot(sig[: len(vals)], vals, "o-", label="learned")
        if reference is not None and name in reference:
            ax.plot(sig[: len(vals)], reference[name].detach().float().cpu()[: len(vals)], "k--", label="base")
        ax.set_xscale("log")
        ax.set_xlabel("sigma_k (reference schedule)")
        ax.set_ylabel(name)
        ax.invert_xaxis()
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_quality_vs_cost(points: Mapping[str, tuple[float, float, float]], path: Path, metric: str = "mmd",
                         floor: tuple[float, float] | None = None) -> Path:
    """Quality (mean ± std over seeds, lower is better) against the tuning cost in denoiser evaluations, one point
    per tuned row (``name -> (cost, mean, std)``; a cost of 0 is drawn at the left edge as "training-free"), with
    the metric's floor (two independent real samples) as a band."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    costs = [c for c, _, _ in points.values() if c > 0]
    free_x = min(costs) / 10 if costs else 1.0
    for name, (cost, mean, std) in points.items():
        x = cost if cost > 0 else free_x
        ax.errorbar([x], [mean], yerr=[std], fmt="o", capsize=3)
        ax.annotate(name, (x, mean), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if floor is not None:
        ax.axhspan(floor[0] - floor[1], floor[0] + floor[1], color="0.85", label="floor (two real samples)")
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("tuning cost (denoiser evaluations; left edge: training-free)")
    ax.set_ylabel(f"{metric} (lower is better)")
    return _save(fig, path)


def plot_precision_recall(points: Mapping[str, tuple[float, float, float, float]], path: Path,
                          highlight: Sequence[str] = (), title: str | None = None) -> Path:
    """Precision against recall, one point per row (``name -> (recall, recall std, precision, precision std)``,
    means ± std over seeds); rows in ``highlight`` (the trained samplers) are drawn as stars, ``reference`` (two
    independent real samples: where equal laws land) as a square."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for name, (rec, rec_std, prec, prec_std) in points.items():
        marker = "s" if name == "reference" else "*" if name in highlight else "o"
        ax.errorbar([rec], [prec], xerr=[rec_std], yerr=[prec_std], fmt=marker, capsize=2,
                    markersize=10 if marker == "*" else 5)
        ax.annotate(name, (rec, prec), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xlabel("recall (coverage of the data) ↑")
    ax.set_ylabel("precision (fidelity) ↑")
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)
