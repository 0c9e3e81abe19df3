"""NFE-matched comparison of samplers on one denoiser with common random numbers (docs/method.md section 7).

Every sampler gets the same initial noise and the same per-step noise for each seed (sample ``i`` of seed ``s``
draws from its own per-sample seed ``sample_seeds(num_samples, "evaluate", s)[i]``, whatever the batch size), the
same held-out data, and the same metric code. A ``reference`` row scores fresh exact samples of the data law
(the metric's noise floor at that sample size); for data without an exact sampler, a sample of the training split
stands in (still scored against held-out data).

``Evaluator(processes=N)`` shards the sampling and the feature extraction over N processes (one per device, gloo
between them); the samples do not depend on N, and neither does the table (``tests/test_sharding.py``).
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
from diffusion_irl.sampling.samplers import Sampler, seed_conditioned

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


def conditioned(denoiser: Callable, sampler: Sampler, seeds: Tensor) -> Callable:
    """The denoiser the evaluator hands ``sampler`` for the samples of per-sample ``seeds``. A class-conditional
    denoiser (``num_classes > 0``) gets sample ``i``'s class ``seeds[i] mod num_classes``: the rule of the sampling
    MDP (``SamplingMDP.labels_for``), so every row of a table, trained or training-free, samples the same classes
    from the same seeds whatever the chunking. Samplers that draw these labels themselves (``labels_from_seeds``:
    the MDP's policy sampler) and unconditional denoisers get ``denoiser`` unchanged."""
    if getattr(sampler, "labels_from_seeds", False):
        return denoiser
    return seed_conditioned(denoiser, seeds)


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
        res = sampler.sample(conditioned(denoiser, sampler, noise.seeds), (len(noise.seeds), *shape), steps, noise)
        if nfe is not None and res.nfe != nfe and not getattr(sampler, "variable_nfe", False):
            raise RuntimeError(f"{sampler.name}: chunks used different NFE ({nfe} vs {res.nfe})")
        nfe = res.nfe if nfe is None else max(nfe, res.nfe)  # samplers with per-sample NFE (renoise): the largest
        out.append(res.x.detach().float().cpu())
    return torch.cat(out), int(nfe)


def resolve_processes(processes: int | str, device: torch.device | str = "cpu") -> int:
    """``evaluate.processes``: a positive integer, or ``"auto"`` = the number of visible CUDA devices when
    ``device`` is a CUDA device, 1 otherwise."""
    if processes == "auto":
        if torch.device(device).type == "cuda" and torch.cuda.is_available():
            return max(1, torch.cuda.device_count())
        return 1
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"processes must be a positive integer or 'auto', got {processes!r}")
    return int(processes)


def _merge_nfe(sampler: Sampler, nfe: int | None, used: int | None) -> int | None:
    """The NFE of a cell from the NFE of its chunks: all equal, or the largest for per-sample NFE (renoise)."""
    if nfe is not None and used is not None and used != nfe and not getattr(sampler, "variable_nfe", False):
        raise RuntimeError(f"{sampler.name}: chunks used different NFE ({nfe} vs {used})")
    return used if nfe is None else nfe if used is None else max(nfe, used)


def _sample_chunks(sampler: Sampler, denoiser: Callable, shape: Sequence[int], steps: int, num_samples: int, seed: int,
                   batch_size: int, device: torch.device, rank: int = 0, world: int = 1, featurizer=None,
                   keep: bool = False) -> tuple[list, int | None, float]:
    """The chunks of one (sampler, steps, seed) cell that fall to ``rank`` of ``world``: chunk ``c`` holds samples
    ``[c * batch_size, (c + 1) * batch_size)`` (the chunks of :func:`generate`, so the same batches and per-sample
    seeds whatever the number of processes), and rank ``r`` makes chunks ``r, r + world, ...``.

    Returns ``([(c, rows, images or None)], nfe or None, sampling seconds)``: ``rows`` are ``featurizer(x)`` (on
    the CPU) or, without a featurizer, the samples themselves; ``images`` are kept (on the CPU) when ``keep``."""
    per_sample = seeding.sample_seeds(num_samples, "evaluate", seed, device=device)
    out, nfe, seconds = [], None, 0.0
    for c in range(rank, math.ceil(num_samples / batch_size), world):
        t0 = time.perf_counter()
        noise = NoiseStream(device=device, seeds=per_sample[c * batch_size:(c + 1) * batch_size])
        res = sampler.sample(conditioned(denoiser, sampler, noise.seeds), (len(noise.seeds), *shape), steps, noise)
        x = res.x.detach().float()
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        seconds += time.perf_counter() - t0
        nfe = _merge_nfe(sampler, nfe, int(res.nfe))
        if featurizer is None:
            out.append((c, x.cpu(), None))
        else:
            out.append((c, featurizer(x), x.cpu() if keep else None))
    return out, nfe, seconds


def _assemble(parts: Sequence[tuple[int, Tensor, Tensor | None]], keep: bool) -> tuple[Tensor, Tensor | None]:
    """Rows (and kept images) of every chunk, in sample order."""
    parts = sorted(parts, key=lambda p: p[0])
    rows = torch.cat([p[1] for p in parts])
    if not keep:
        return rows, None
    images = [p[2] if p[2] is not None else p[1] for p in parts]
    return rows, torch.cat(images)


@dataclass
class _ShardJob:
    """What every process of a sharded evaluation needs (pickled to the spawned processes)."""

    samplers: dict
    cells: list
    seeds: list
    num_samples: int
    batch_size: int
    shape: tuple
    device: str
    keep: tuple
    world: int
    init_method: str


SHARD_TIMEOUT_S = 4 * 3600  # the longest a process waits in a gather for the others (a dead process ends it sooner)
SHARD_START_TIMEOUT_S = 600  # the longest the spawned processes may take to start


def _rank_device(device: str, rank: int) -> torch.device:
    """Rank ``r`` on CUDA: device ``(index + r) mod count``; on the CPU, the CPU."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return dev
    return torch.device("cuda", ((dev.index or 0) + rank) % max(1, torch.cuda.device_count()))


def _to_cpu(obj):
    """A CPU copy of a module / featurizer that lives on another device (what is pickled to the other processes)."""
    if obj is None or not hasattr(obj, "to"):
        return obj
    devices = set()
    modules = obj.networks.values() if isinstance(obj, ImageFeaturizer) else [obj]
    for m in modules:
        if isinstance(m, torch.nn.Module):
            devices |= {t.device.type for t in [*m.parameters(), *m.buffers()]}
    if devices <= {"cpu"}:
        return obj
    import copy

    return copy.deepcopy(obj).to("cpu")


class _PeerFailure(RuntimeError):
    """A collective failed: another process of the sharded evaluation is gone (its own error is the cause)."""


def _init_group(job: _ShardJob, rank: int) -> None:
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=job.init_method, rank=rank, world_size=job.world,
                            timeout=datetime.timedelta(seconds=SHARD_TIMEOUT_S))


def _shard_loop(job: _ShardJob, rank: int, denoiser: Callable, featurizer, device: torch.device,
                on_seed: Callable | None = None, before_cell: Callable | None = None,
                on_cell: Callable | None = None) -> None:
    """Every cell of every seed: this rank's chunks, then a gather of (chunks, nfe, seconds) to rank 0, which
    hands them to ``on_cell`` (rank 0 also runs ``on_seed(seed)`` before each seed's cells, and
    ``before_cell(seed, name)`` before each cell)."""
    import torch.distributed as dist

    for seed in job.seeds:
        if on_seed is not None:
            on_seed(seed)
        for name, budget, steps in job.cells:
            keep = name in job.keep and seed == job.seeds[0]
            if before_cell is not None:
                before_cell(seed, name)
            mine = _sample_chunks(job.samplers[name], denoiser, job.shape, steps, job.num_samples, seed,
                                  job.batch_size, device, rank, job.world, featurizer, keep)
            gathered = [None] * job.world if rank == 0 else None
            try:
                dist.gather_object(mine, gathered, dst=0)
            except Exception as exc:
                raise _PeerFailure(f"gathering the features of {name} (seed {seed}) failed: {exc}") from exc
            if on_cell is not None:
                on_cell(seed, name, budget, steps, keep, gathered)


def _shard_child(index: int, job: _ShardJob, denoiser: Callable, featurizer, ready_dir: str, threads: int) -> None:
    """Rank ``index + 1`` of a sharded evaluation (a spawned process)."""
    import torch.distributed as dist

    rank = index + 1
    torch.set_num_threads(threads)
    device = _rank_device(job.device, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if hasattr(denoiser, "to"):
        denoiser = denoiser.to(device)
    if featurizer is not None:
        featurizer = featurizer.to(device)
    Path(ready_dir, f"ready{rank}").touch()
    _init_group(job, rank)
    try:
        _shard_loop(job, rank, denoiser, featurizer, device)
    finally:
        dist.destroy_process_group()


@dataclass
class Evaluator:
    """Runs every sampler at every NFE budget for every seed and scores the samples with ``score(x, seed)``.

    ``processes > 1`` (or ``"auto"``: one per visible CUDA device when ``device`` is CUDA) shards every cell over
    that many processes (this one is rank 0; the others are spawned, one per device, talking over gloo): each
    makes whole chunks of ``batch_size`` samples with their per-sample seeds, so the samples do not depend on the
    number of processes; the processes gather the scorer's feature rows (``score.featurizer``; the samples
    themselves for a scorer without one) and rank 0 scores them (``score.from_features``, else ``score``). The
    ``reference`` row is computed by rank 0. Every process gets this one's CPU thread count (CPU kernels round
    differently with other counts). ``processes == 1`` runs everything here, without torch.distributed."""

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
    processes: int | str = 1  # processes that share the sampling and the feature extraction (see above)

    def __post_init__(self):
        self.processes = resolve_processes(self.processes, self.device)

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

    def _reference_run(self, seed: int) -> None:
        x = self.reference(self.num_samples, seed)
        self.runs.append(Run(REFERENCE, 0, 0, 0, seed, self.score(x, seed)))

    def _score_rows(self, rows: Tensor, seed: int) -> dict[str, float]:
        from_features = getattr(self.score, "from_features", None)
        return from_features(rows, seed) if from_features is not None else self.score(rows, seed)

    def _finish_cell(self, name: str, budget: int, steps: int, seed: int, rows: Tensor, images: Tensor | None,
                     used: int, sample_seconds: float) -> None:
        if images is not None:
            self.samples[name] = images
        if used > budget:
            raise RuntimeError(f"{name} used {used} NFE for a budget of {budget}")
        metrics = self._score_rows(rows, seed)
        metrics["sample_seconds"] = sample_seconds
        self.runs.append(Run(name, budget, used, steps, seed, metrics))

    def run(self, denoiser: Callable, shape: Sequence[int]) -> list[Row]:
        if self.processes > 1:
            return self._run_sharded(denoiser, shape)
        cells = self.plan()
        featurizer = getattr(self.score, "featurizer", None)
        total = len(self.seeds) * (len(cells) + (self.reference is not None))
        bar = tqdm(total=total, desc="evaluate", disable=not self.progress, dynamic_ncols=True)
        for seed in self.seeds:
            if self.reference is not None:
                self._reference_run(seed)
                bar.update()
            for name, budget, steps in cells:
                bar.set_postfix_str(f"seed {seed} {name} nfe<={budget}")
                keep = name in self.keep and seed == self.seeds[0]
                if featurizer is None:
                    t0 = time.perf_counter()
                    x, used = generate(self.samplers[name], denoiser, shape, steps, self.num_samples, seed,
                                       self.batch_size, self.device)
                    self._finish_cell(name, budget, steps, seed, x, x if keep else None, used,
                                      time.perf_counter() - t0)
                else:  # images: features chunk by chunk, exactly as the sharded path makes them
                    parts, used, seconds = _sample_chunks(self.samplers[name], denoiser, shape, steps,
                                                          self.num_samples, seed, self.batch_size,
                                                          torch.device(self.device), featurizer=featurizer, keep=keep)
                    rows, images = _assemble(parts, keep)
                    self._finish_cell(name, budget, steps, seed, rows, images, used, seconds)
                bar.update()
        bar.close()
        return self.rows()

    def _run_sharded(self, denoiser: Callable, shape: Sequence[int]) -> list[Row]:
        import tempfile

        import torch.distributed as dist
        import torch.multiprocessing as mp

        if dist.is_available() and dist.is_initialized():
            raise RuntimeError("Evaluator(processes > 1) cannot run inside an initialised torch.distributed process "
                               "group; use processes=1 there")
        cells, world = self.plan(), self.processes
        featurizer = getattr(self.score, "featurizer", None)
        device = torch.device(self.device)
        total = len(self.seeds) * (len(cells) + (self.reference is not None))
        bar = tqdm(total=total, desc=f"evaluate ({world} processes)", disable=not self.progress, dynamic_ncols=True)

        def on_seed(seed: int) -> None:
            if self.reference is not None:
                bar.set_postfix_str(f"seed {seed} reference")
                self._reference_run(seed)
                bar.update()

        def on_cell(seed, name, budget, steps, keep, gathered) -> None:
            parts = [p for rank_parts, _, _ in gathered for p in rank_parts]
            used = None
            for _, nfe, _ in gathered:
                used = _merge_nfe(self.samplers[name], used, nfe)
            rows, images = _assemble(parts, keep)
            if len(rows) != self.num_samples:
                raise RuntimeError(f"{name}: gathered {len(rows)} samples, expected {self.num_samples}")
            self._finish_cell(name, budget, steps, seed, rows, images, int(used), max(s for _, _, s in gathered))
            bar.update()

        def before_cell(seed: int, name: str) -> None:
            bar.set_postfix_str(f"seed {seed} {name}")

        with tempfile.TemporaryDirectory(prefix="diffusion_irl_evaluate_") as tmp:
            job = _ShardJob(dict(self.samplers), cells, list(self.seeds), int(self.num_samples), int(self.batch_size),
                            tuple(shape), str(self.device), tuple(self.keep), world, f"file://{tmp}/rendezvous")
            # every process gets this one's thread count: CPU kernels (convolutions, reductions) round differently
            # with other thread counts, and the samples must not depend on the number of processes
            context = mp.start_processes(_shard_child, args=(job, _to_cpu(denoiser), _to_cpu(featurizer), tmp,
                                                             torch.get_num_threads()),
                                         nprocs=world - 1, join=False, start_method="spawn")
            try:
                _wait_started(context, Path(tmp), world)
                _init_group(job, 0)
                _shard_loop(job, 0, denoiser, featurizer, device, on_seed, before_cell, on_cell)
                dist.destroy_process_group()
                while not context.join(timeout=1.0):
                    pass
            except BaseException as err:
                if isinstance(err, _PeerFailure):  # raise the error of the process that failed, with its traceback
                    try:
                        context.join(timeout=30.0)
                    except Exception as child_error:
                        raise child_error from None
                raise
            finally:
                for p in context.processes:  # first, so that no process reports the group's end as its own error
                    if p.is_alive():
                        p.terminate()
                if dist.is_initialized():
                    dist.destroy_process_group()
                bar.close()
        return self.rows()

    def rows(self) -> list[Row]:
        return [Row(r.sampler, r.nfe, r.seed, m, float(v)) for r in self.runs for m, v in r.metrics.items()]


def _wait_started(context, tmp: Path, world: int) -> None:
    """Until every spawned process is ready to join the group; raises the error of one that failed on the way."""
    deadline = time.monotonic() + SHARD_START_TIMEOUT_S
    while not all((tmp / f"ready{rank}").exists() for rank in range(1, world)):
        if context.join(timeout=0.2):
            raise RuntimeError("the evaluation processes exited before joining the process group")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the evaluation processes did not start within {SHARD_START_TIMEOUT_S} s")


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
    preferred = ["mmd", "sliced_w2", "w2", "fd", "fid", "precision", "recall", "density", "coverage",
                 "fid_precision", "fid_recall", "fid_density", "fid_coverage", "nll", "mode_coverage", "hq_fraction",
                 "nonfinite", "sample_seconds"]
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
- `fd`, `precision`, ... (images) are computed in the features of a classifier trained here on the data set;
  `fid`, `fid_precision`, `fid_recall`, `fid_density`, `fid_coverage` in the FID network's features (Inception-v3
  pool features), `fid` against stored reference statistics when `evaluate.fid_reference` is set.
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
#
# A scorer is a callable ``score(x, seed) -> metrics``. The scorers built here split it in two, so that sharded
# evaluation moves features instead of images: ``featurizer`` (None, or a picklable callable ``images -> rows
# [N, R]`` with ``.to(device)``, run by every process on the samples it made) and ``from_features(rows, seed)`` (run
# once, by rank 0, on the gathered rows). ``score(x, seed) == from_features(featurizer(x), seed)``; without a
# featurizer the rows are the samples themselves (2-D data: they are tiny).

class SampleScorer:
    """Vectors: :func:`~diffusion_irl.metrics.samples.sample_metrics` against the held-out points (plus the
    exact-law metrics when the law is known). The held-out-only terms are computed once (``cache``)."""

    featurizer = None

    def __init__(self, heldout: Tensor, law=None, mmd_points: int = 4000):
        if int(mmd_points) < 2:
            raise ValueError(f"mmd_points must be >= 2, got {mmd_points}")
        self.heldout, self.law, self.cache, self.mmd_points = heldout, law, {}, int(mmd_points)

    def from_features(self, x: Tensor, seed: int) -> dict[str, float]:
        from diffusion_irl.metrics.samples import sample_metrics

        return sample_metrics(x, self.heldout, self.law, generator=seeding.generator("metrics", seed), cache=self.cache,
                              mmd_points=self.mmd_points)

    def __call__(self, x: Tensor, seed: int) -> dict[str, float]:
        return self.from_features(x, seed)


class _ClassifierFeatures(torch.nn.Module):
    """``FeatureClassifier.features`` as a feature network (``num_features``, ``.to``)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.num_features = net, int(net.num_features)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.net.features(x)


class ImageFeaturizer:
    """Images ``[N, C, H, W]`` -> rows ``[N, 1 + sum of widths]``: a finite flag, then the features of each network
    (in the order given), float32 on the CPU. Images with a non-finite pixel get flag 0 and NaN features (no network
    sees them); the others are clamped to [-1, 1]. Each network runs in batches of ``batch_size``."""

    def __init__(self, networks: Mapping[str, Callable[[Tensor], Tensor]], widths: Mapping[str, int],
                 batch_size: int = 250, device: str | torch.device | None = None):
        self.networks = dict(networks)
        self.widths = {name: int(widths[name]) for name in self.networks}
        self.batch_size = int(batch_size)
        self.device = torch.device(device) if device is not None else None

    @property
    def num_columns(self) -> int:
        return 1 + sum(self.widths.values())

    def to(self, device: str | torch.device) -> "ImageFeaturizer":
        for net in self.networks.values():
            if isinstance(net, torch.nn.Module):
                net.to(device)
        self.device = torch.device(device)
        return self

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        from diffusion_irl.metrics.fid import extract_features
        from diffusion_irl.metrics.samples import finite_rows

        x = x.detach()
        ok = finite_rows(x)
        rows = torch.full((len(x), self.num_columns), float("nan"))
        rows[:, 0] = ok.float().cpu()
        good, col = x[ok].clamp(-1, 1), 1
        for name, net in self.networks.items():
            width = self.widths[name]
            if len(good):
                feats = extract_features(net, good, batch_size=self.batch_size, device=self.device)
                if feats.shape[1] != width:
                    raise ValueError(f"feature network {name!r} gave {feats.shape[1]} features, expected {width}")
                rows[ok.cpu(), col:col + width] = feats
            col += width
        return rows

    def split(self, rows: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(finite mask [N], {network: features of the finite rows})."""
        finite, out, col = rows[:, 0] > 0.5, {}, 1
        for name, width in self.widths.items():
            out[name] = rows[finite, col:col + width]
            col += width
        return finite, out


class ImageScorer:
    """Images: for each network, the Fréchet distance and k-NN precision / recall / density / coverage against its
    :class:`~diffusion_irl.metrics.fid.ReferenceFeatures`, plus ``nonfinite``. The feature classifier's metrics
    are ``fd``, ``precision``, ...; the FID network's are ``fid``, ``fid_precision``, ... (precision / recall only
    where the reference holds real features, not only ``mu`` / ``sigma``)."""

    NAMES = {"classifier": ("fd", ""), "fid": ("fid", "fid_")}

    def __init__(self, featurizer: ImageFeaturizer, references: Mapping, prdc_k: int = 5, prdc_points: int = 2000):
        self.featurizer, self.references = featurizer, dict(references)
        self.prdc_k, self.prdc_points = int(prdc_k), int(prdc_points)

    def from_features(self, rows: Tensor, seed: int) -> dict[str, float]:
        from diffusion_irl.metrics.fid import feature_metrics

        finite, feats = self.featurizer.split(rows)
        out = {"nonfinite": float(1.0 - finite.double().mean()) if len(rows) else float("nan")}
        for name, ref in self.references.items():
            distance, prefix = self.NAMES.get(name, (f"{name}_fd", f"{name}_"))
            metrics = feature_metrics(feats[name], ref, prdc_k=self.prdc_k, prdc_points=self.prdc_points)
            out[distance] = metrics.pop("fd")
            out.update({prefix + k: v for k, v in metrics.items()})
        return out

    def __call__(self, x: Tensor, seed: int) -> dict[str, float]:
        return self.from_features(self.featurizer(x), seed)


def feature_classifier_for(datamodule, feature_cache: str | Path | None = None, epochs: int = 5,
                           num_val: int | None = None):
    """The image data set's feature classifier (``metrics.features.FeatureClassifier``): trained on the training
    split only, cached under ``feature_cache`` by data set and shape, its accuracy measured (and printed, also when
    loaded from the cache) on up to ``num_val`` held-out images. The evaluator's image metrics and LD3's feature
    distance use the same network. With ``datamodule.classifier_reserve = N > 0`` it trains on the training points
    after the first N (and is cached under its own name), so that model selection can compare with images it has
    not seen."""
    from diffusion_irl.metrics.features import train_feature_classifier

    if datamodule.num_classes <= 0:
        raise ValueError(f"image metrics need a labelled data set to train the feature classifier; data={datamodule.name} has no labels")
    datamodule.setup()
    reserve = int(getattr(datamodule, "classifier_reserve", 0) or 0)
    if reserve >= len(datamodule.train_samples()):
        raise ValueError(f"data.classifier_reserve={reserve} leaves no training images for the feature classifier")
    cache = None
    if feature_cache is not None:
        suffix = f"_reserve{reserve}" if reserve else ""
        cache = Path(feature_cache) / (f"feature_classifier_{datamodule.name}_{'x'.join(map(str, datamodule.shape))}"
                                       f"{suffix}.pt")
        cache.parent.mkdir(parents=True, exist_ok=True)
    n_val = len(datamodule.heldout()) if num_val is None else min(int(num_val), len(datamodule.heldout()))
    return train_feature_classifier(datamodule.train_samples()[reserve:], datamodule.train_labels()[reserve:],
                                    datamodule.heldout(n_val),
                                    datamodule.heldout_labels(n_val), datamodule.num_classes, epochs=epochs,
                                    cache_path=cache)


def scorer_for(datamodule, num_heldout: int | None = None, feature_cache: str | Path | None = None,
               inception_weights: str | None = None, classifier_epochs: int = 5, split: str = "heldout", *,
               fid_reference: str | Path | None = None, fid_split: str = "heldout", fid_only: bool = False,
               feature_network: Callable[[Tensor], Tensor] | None = None, device: str | torch.device | None = None,
               feature_batch_size: int = 250, prdc_points: int = 2000, progress: bool = True, offset: int = 0,
               mmd_points: int = 4000):
    """The metric function for a datamodule: 2D/vector data -> :class:`SampleScorer` against held-out data (MMD on at
    most ``mmd_points`` rows of each set: its own noise falls about as ``1 / mmd_points``);
    images -> :class:`ImageScorer`: Fréchet distance and precision / recall in the features of a classifier trained
    on the training split (cached), plus FID and precision / recall in the FID network's features.

    The FID network is ``feature_network`` (any callable images -> features, e.g. a tiny one in tests) or
    Inception from the local file ``inception_weights`` (skipped with one log line when no file is there; the
    entry points refuse a missing file before this). Its reference statistics are read from ``fid_reference`` (an
    ``.npz`` with ``mu`` / ``sigma``) or computed once from the data and cached under ``feature_cache``: from the
    same images as the other metrics (``fid_split="heldout"``) or from the whole training split
    (``fid_split="train"``, as published reference statistics are). Precision / recall in those features use a
    subset of ``prdc_points`` real features of the same images. ``fid_only=True`` reads no images at all (FID
    against ``fid_reference`` alone, which it then requires). The networks run on ``device`` (default: the CPU).

    ``split="train"`` scores against (the first ``num_heldout`` points of) the training split instead: for model
    selection (the grid search), so that the held-out split is only ever used for the final comparison; the FID
    reference then also comes from the training split. ``offset`` skips that many points of the split first (disjoint
    references for independent scores: points ``[offset, offset + num_heldout)``)."""
    from diffusion_irl.metrics.fid import (FrechetStats, InceptionFeatures, ReferenceFeatures, feature_width,
                                           reference_features)
    from diffusion_irl.runs import report

    if split not in ("heldout", "train"):
        raise ValueError(f"split must be 'heldout' or 'train', got {split!r}")
    if fid_split not in ("heldout", "train"):
        raise ValueError(f"fid_split must be 'heldout' or 'train', got {fid_split!r}")
    image_data = len(datamodule.shape) > 1
    fid_net = feature_network
    if fid_net is None and inception_weights and image_data:
        if Path(inception_weights).is_file():
            fid_net = InceptionFeatures(inception_weights)
        else:
            log.info("Inception FID skipped: no Inception weights file at %s", inception_weights)
    if (fid_reference is not None or fid_only) and not image_data:
        raise ValueError(f"FID against reference statistics needs image data; data={datamodule.name} has shape "
                         f"{list(datamodule.shape)}")
    if fid_reference is not None and fid_net is None:
        raise ValueError("fid_reference needs a feature network: set inception_weights (or pass feature_network)")
    if fid_only and fid_reference is None:
        raise ValueError("fid_only needs fid_reference: with no images read, FID needs stored reference statistics")
    if fid_net is not None:
        fid_net = fid_net.to(device) if (device is not None and isinstance(fid_net, torch.nn.Module)) else fid_net
        width = feature_width(fid_net, tuple(datamodule.shape))
    stored = FrechetStats.load(fid_reference, width) if fid_reference is not None else None

    if fid_only:
        report("FID only: no images are read, so the scores are FID against the reference statistics of "
               f"{fid_reference}; precision / recall (they need real features, not only mu / sigma) and the "
               "feature classifier's metrics are not computed", logging.WARNING)
        featurizer = ImageFeaturizer({"fid": fid_net}, {"fid": width}, feature_batch_size, device)
        return ImageScorer(featurizer, {"fid": ReferenceFeatures(stored, None)}, prdc_points=prdc_points)

    datamodule.setup()
    pool = datamodule.heldout if split == "heldout" else datamodule.train_samples
    offset = int(offset)
    available = len(pool()) - offset
    if offset < 0 or available <= 0:
        raise ValueError(f"offset={offset}: the {split} split of data={datamodule.name} has "
                         f"{available + offset} points")
    n = available if num_heldout is None else min(int(num_heldout), available)
    heldout = pool(offset + n)[offset:]
    if not image_data:
        return SampleScorer(heldout, datamodule.law, mmd_points)

    net = feature_classifier_for(datamodule, feature_cache, classifier_epochs, num_val=n)
    classifier = _ClassifierFeatures(net.eval())
    if device is not None:
        classifier.to(device)
    networks, widths = {"classifier": classifier}, {"classifier": classifier.num_features}
    references = {"classifier": reference_features(classifier, heldout, keep_rows=None, batch_size=feature_batch_size,
                                                   device=device)}
    if fid_net is not None:
        dataset = f"{datamodule.name}-{'x'.join(map(str, datamodule.shape))}"
        if fid_split == "train":
            images, label = datamodule.train_samples(), "train"
        else:
            images, label = heldout, split
        ref = reference_features(fid_net, images, keep_rows=prdc_points, cache_dir=feature_cache, dataset=dataset,
                                 split=label, batch_size=feature_batch_size, device=device, progress=progress,
                                 desc=f"FID reference features ({label}, {len(images)} images)")
        if stored is not None:  # FID against the stored statistics; precision / recall against the data's features
            ref = ReferenceFeatures(stored, ref.features)
        networks["fid"], widths["fid"], references["fid"] = fid_net, width, ref
    return ImageScorer(ImageFeaturizer(networks, widths, feature_batch_size, device), references,
                       prdc_points=prdc_points)


def reference_for(datamodule) -> Callable[[int, int], Tensor]:
    """Fresh exact samples where the law is known; otherwise a seeded subsample of the training split."""
    if datamodule.law is not None:
        return lambda n, seed: datamodule.exact_samples(n, generator=seeding.generator("reference", seed))

    def from_train(n: int, seed: int) -> Tensor:
        x = datamodule.train_samples()
        idx = torch.randperm(len(x), generator=seeding.generator("reference", seed))[: min(n, len(x))]
        return x[idx]

    return from_train
