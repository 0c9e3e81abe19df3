"""The training run's comparison (docs/method.md section 7): every row at the same NFE, conditioning and seeds.

Rows: ``tuned`` (the trained policy), ``tuned_selected`` (the best checkpoint on the training split), ``base`` (the base sampler = the initial policy), ``grid_best`` (the best
constant knob values of a grid search, selected on the TRAINING split, never the held-out one), the base sampler on
the schedule of each tuner named in ``compare.tuners`` (rows ``grid``, ``gits``, ``ld3``: the full Karras grid,
GITS and LD3, tuned for the same NFE; see ``tuning/baselines.py``), every training-free sampler named in
``compare.samplers``, and ``base`` again at ``compare.large_nfe``. ``results.md`` carries the costs in denoiser
evaluations and wall time next to the table (the training's and every tuning's), so quality and cost sit side by
side.

:class:`Comparison` is built from the ``compare:`` config node; the entry point hands it the trained objects.
"""
from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from diffusion_irl.evaluation import Evaluator, generate, reference_for, scorer_for, summarise, write_outputs
from diffusion_irl.mdp.env import PolicySampler, SamplingMDP
from diffusion_irl.mdp.policies import ConstantKnobPolicy, KnobPolicy, TransitionPolicy  # noqa: F401 (types)
from diffusion_irl.plots import plot_quality_vs_cost, plot_samples, plot_schedule
from diffusion_irl.runs import compact_table, report
from diffusion_irl.sampling.samplers import Sampler
from diffusion_irl.tuning.baselines import TunedRow, distance, tune_rows, write_tuned
from diffusion_irl.tuning.grid import mean_scores, write_grid_csv
from diffusion_irl.tuning.tuners import Tuner

PERIODIC_METRICS = ("mmd", "nll", "precision", "recall", "fd", "coverage")


def reference_policy(mdp: SamplingMDP, policy, shape: Sequence[int]):
    """The base sampler as a policy on ``mdp`` (any horizon): constant reference knob values (churn follows the
    base sampler's own rule), or a fresh transition policy."""
    if policy.kind == "transition":
        return mdp.setup_policy(TransitionPolicy(eta=policy.eta, correction=False), shape)
    values = {}
    for name, vals in mdp.references(policy.knobs).items():
        if name == "churn" and policy.knobs[name].reference is None:
            continue  # the base sampler's own churn rule
        values[name] = float(vals[0])
    return mdp.setup_policy(ConstantKnobPolicy(values), shape)


@dataclass
class GridSearch:
    """Constant knob values over the Cartesian product of the knobs' grids (at most ``max_points``, a seeded
    subset beyond), each scored on ``num_samples`` samples per seed against the TRAINING split."""

    enabled: bool = True
    num_samples: int = 1000
    seeds: Sequence[int] = (1000,)
    max_points: int = 64

    def points(self, policy: KnobPolicy) -> list[dict[str, float]]:
        grid = list(itertools.product(*[policy.knobs[n].grid_values() for n in policy.names]))
        if len(grid) > self.max_points:
            keep = torch.randperm(len(grid), generator=torch.Generator().manual_seed(0))[: self.max_points]
            grid = [grid[i] for i in sorted(keep.tolist())]
        return [dict(zip(policy.names, values)) for values in grid]

    def run(self, mdp: SamplingMDP, policy: KnobPolicy, denoiser, datamodule, guide, batch_size: int,
            feature_cache, device) -> dict:
        """Returns the best values, every point's score on the training split and the cost in NFE."""
        metric = "mmd" if len(datamodule.shape) == 1 else "fd"
        score = scorer_for(datamodule, max(self.num_samples, 1000), feature_cache, split="train")
        start = time.perf_counter()
        candidates = [(values, PolicySampler(mdp, mdp.setup_policy(ConstantKnobPolicy(values), datamodule.shape),
                                             "grid", guide)) for values in self.points(policy)]
        results, cost = mean_scores(candidates, denoiser, datamodule.shape, mdp.horizon, self.num_samples, self.seeds,
                                    batch_size, device, lambda x, seed: score(x, seed)[metric])
        finite = [r for r in results if math.isfinite(r[1])]
        best = min(finite, key=lambda r: r[1]) if finite else results[0]
        return {"best": best[0], "best_score": best[1], "metric": metric, "points": results, "nfe": cost,
                "seconds": time.perf_counter() - start}


@dataclass
class CheckpointSelection:
    """``tuned_selected``: the policy among the run's periodic checkpoints (and the initial and the final policy)
    whose samples score best on the TRAINING split, ``num_samples`` per candidate and seed (never the held-out
    split). The loop's policy can drift past its best point (e.g. into mode-seeking); this picks the iterate a
    researcher would keep without looking at held-out data. Cost: candidates x num_samples x NFE x seeds."""

    enabled: bool = True
    num_samples: int = 1000
    seeds: Sequence[int] = (2000,)

    def candidates(self, run: "TrainedRun", checkpoints: Path) -> list[tuple[str, object]]:
        """``(name, policy)``: the initial policy, each ``iter*.ckpt`` in ``checkpoints`` (by file name), the final."""
        out = [("iteration 0", run.initial)]
        for path in sorted(Path(checkpoints).glob("iter*.ckpt")):
            state = torch.load(path, map_location="cpu", weights_only=False)
            policy = copy.deepcopy(run.policy)
            policy.load_state_dict({k[len("policy."):]: v for k, v in state["state_dict"].items()
                                    if k.startswith("policy.")})
            out.append((path.stem, policy))
        final = run.policy.state_dict()
        same = lambda p: all(torch.equal(v.cpu(), final[k].cpu()) for k, v in p.state_dict().items())  # noqa: E731
        out = out[:1] + [c for c in out[1:] if not same(c[1])]  # drop a checkpoint of the final state itself
        out.append((f"final (iteration {run.iterations})", run.policy))
        return out

    def run(self, run: "TrainedRun", checkpoints: Path, batch_size: int, feature_cache, device) -> dict:
        from diffusion_irl.tuning.grid import selection_scorer

        metric, score = selection_scorer(run.datamodule, max(self.num_samples, 1000), feature_cache)
        start = time.perf_counter()
        policies = dict(self.candidates(run, checkpoints))
        candidates = [(name, PolicySampler(run.mdp, policy, "selection", run.guide)) for name, policy in policies.items()]
        results, cost = mean_scores(candidates, run.denoiser, run.datamodule.shape, run.mdp.horizon, self.num_samples,
                                    self.seeds, batch_size, device, score)
        finite = [r for r in results if math.isfinite(r[1])]
        best = min(finite, key=lambda r: r[1]) if finite else results[-1]
        return {"best": best[0], "policy": policies[best[0]], "best_score": best[1], "metric": metric, "nfe": cost,
                "seconds": time.perf_counter() - start, "scores": results}


@dataclass
class TrainedRun:
    """What the comparison needs from a finished training run."""

    datamodule: object
    denoiser: object
    mdp: SamplingMDP
    policy: object
    initial: object          # the untrained policy (= the base sampler)
    discriminator: object
    train_nfe: float         # denoiser evaluations spent by training (all ranks)
    iterations: int
    train_seconds: float | None = None  # wall time of the training (None: not measured)
    warm_start: object | None = None    # the TuningResult the policy started from (warm_start=<tuner>), if any

    @property
    def guide(self):
        return self.discriminator if self.mdp.guidance == "dg" else None


class Comparison:
    """The final table of a training run (config node ``compare:``).

    Args:
        enabled: run it at all. samplers: names of training-free samplers (keys of the ``samplers:`` node) to add.
        large_nfe: the base sampler again at this budget (null: no). num_samples, seeds: per row.
        num_heldout: held-out points the samples are compared with. batch_size: sampling chunk.
        feature_cache, inception_weights: image metrics (see ``evaluation.scorer_for``).
        grid: :class:`GridSearch` settings. tuners: names of schedule tuners (keys of the ``tuners:`` node) whose
        schedules for the base sampler become rows; tuning_seed: their seed. select: :class:`CheckpointSelection`
        settings (the ``tuned_selected`` row). progress: a progress bar.
    """

    def __init__(self, enabled: bool = True, samplers: Sequence[str] = (), large_nfe: int | None = 128,
                 num_samples: int = 2000, num_heldout: int = 5000, seeds: Sequence[int] = (0, 1, 2),
                 batch_size: int = 4096, feature_cache: str | None = None, inception_weights: str | None = None,
                 grid: Mapping | GridSearch | None = None, tuners: Sequence[str] = (), tuning_seed: int = 0,
                 select: Mapping | CheckpointSelection | None = None, progress: bool = True):
        self.enabled, self.samplers, self.large_nfe = bool(enabled), list(samplers), large_nfe
        self.num_samples, self.num_heldout, self.seeds = int(num_samples), int(num_heldout), list(seeds)
        self.batch_size, self.feature_cache, self.inception_weights = int(batch_size), feature_cache, inception_weights
        self.grid = grid if isinstance(grid, GridSearch) else GridSearch(**dict(grid or {}))
        self.tuners, self.tuning_seed = list(tuners), int(tuning_seed)
        self.select = select if isinstance(select, CheckpointSelection) else CheckpointSelection(**dict(select or {}))
        self.progress = bool(progress)

    # -- during training -----------------------------------------------------------------------------------------
    def periodic_evaluation(self, mdp: SamplingMDP, datamodule, out: Path, num_samples: int, plots: bool):
        """``f(module) -> metrics``: held-out metrics of the current (deterministic) policy; with ``plots``, the
        samples and the knob schedule go to ``<out>/plots`` and to W&B."""
        state: dict = {}

        def evaluate(module) -> dict[str, float]:
            if "score" not in state:
                state["score"] = scorer_for(datamodule, self.num_heldout, self.feature_cache)
            sampler = PolicySampler(mdp, module.policy, "tuned", module.discriminator if mdp.guidance == "dg" else None)
            x, _ = generate(sampler, module.denoiser, datamodule.shape, mdp.horizon, num_samples, 0, self.batch_size,
                            module.device)
            metrics = {k: v for k, v in state["score"](x, 0).items() if k in PERIODIC_METRICS}
            it = module.iteration + 1
            report(f"iteration {it}: held-out " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            if plots and module.logger is not None and hasattr(module.logger, "log_image"):
                samples = plot_samples({f"iteration {it}": x}, out / "plots" / f"samples_{it:05d}.png")
                schedule = plot_schedule(module.policy.schedule(), mdp.ref_sigmas, out / "plots" / f"schedule_{it:05d}.png")
                for key, path in (("train/samples", samples), ("train/schedule", schedule)):  # one size per key
                    module.logger.log_image(key=key, images=[str(path)], step=module.global_step)
            return metrics

        return evaluate

    # -- after training ------------------------------------------------------------------------------------------
    def rows_to_compare(self, run: TrainedRun, training_free: Mapping[str, Sampler]) -> tuple[dict, dict | None]:
        """The samplers of the main table (tuned, base, grid_best, training-free) and the grid search's result."""
        mdp, budget = run.mdp, run.mdp.planned_nfe()
        samplers = {"tuned": PolicySampler(mdp, run.policy, "tuned", run.guide),
                    "base": PolicySampler(mdp, run.initial, "base", run.guide)}
        grid = None
        if self.grid.enabled and run.policy.kind == "knob" and run.policy.knobs:
            report(f"grid search over constant {run.policy.names} at {budget} NFE ...")
            grid = self.grid.run(mdp, run.policy, run.denoiser, run.datamodule, run.guide, self.batch_size,
                                 self.feature_cache, self._device(run))
            best = mdp.setup_policy(ConstantKnobPolicy(grid["best"]), run.datamodule.shape)
            samplers["grid_best"] = PolicySampler(mdp, best, "grid_best", run.guide)
        samplers.update(training_free)
        return samplers, grid

    @staticmethod
    def _device(run: TrainedRun) -> torch.device:
        params = list(run.policy.parameters()) if hasattr(run.policy, "parameters") else []
        return params[0].device if params else torch.device("cpu")

    def _evaluator(self, samplers: Mapping[str, Sampler], nfe: int, score, device, reference=None, keep=()):
        return Evaluator(samplers=samplers, nfe=[nfe], num_samples=self.num_samples, seeds=self.seeds, score=score,
                         reference=reference, batch_size=self.batch_size, device=str(device), progress=self.progress,
                         keep=keep)

    def _large_nfe_rows(self, run: TrainedRun, score, device) -> list:
        mdp = run.mdp
        big = SamplingMDP(mdp.base, nfe=self.large_nfe, guidance=mdp.guidance, num_classes=mdp.num_classes,
                          dg_sigma_min=mdp.dg_sigma_min, dg_sigma_max=mdp.dg_sigma_max, sigma_floor=mdp.sigma_floor)
        base = PolicySampler(big, reference_policy(big, run.policy, run.datamodule.shape), "base", run.guide)
        return self._evaluator({"base": base}, big.planned_nfe(), score, device).run(run.denoiser, run.datamodule.shape)

    def tuned_schedules(self, run: TrainedRun, tuners: Mapping[str, Tuner], out: Path) -> list[TunedRow]:
        """The base sampler on each tuner's schedule for the run's NFE (rows named after the tuners); skipped, and
        said, where a tuner cannot serve the base sampler or the budget, and under guidance (the tuned rows would
        sample without it, at another conditioning than the other rows)."""
        if not tuners:
            return []
        if run.mdp.guidance is not None:
            report(f"tuned-schedule rows skipped: the MDP samples with guidance={run.mdp.guidance}, the tuners "
                   "tune the plain base sampler")
            return []
        report(f"tuning the base sampler's schedule at {run.mdp.planned_nfe()} NFE with {list(tuners)} ...")
        rows = tune_rows(tuners, {"base": run.mdp.base}, [run.mdp.planned_nfe()], run.denoiser, run.datamodule,
                         self.tuning_seed, self._device(run), skip_impossible=True, progress=self.progress)
        for row in rows:
            row.name = row.tuner
        write_tuned(rows, out)
        return rows

    def run(self, run: TrainedRun, training_free: Mapping[str, Sampler], out: Path,
            tuners: Mapping[str, Tuner] | None = None) -> dict:
        """Evaluate every row, write results.csv / results.md (with costs) / grid.csv / schedules / plots, print
        the table. ``tuners``: the schedule tuners whose rows join the table (``compare.tuners``)."""
        device = self._device(run)
        samplers, grid = self.rows_to_compare(run, training_free)
        tuned = self.tuned_schedules(run, tuners or {}, out)
        selection = None
        if self.select.enabled:
            report("selecting the policy among the checkpoints on the training split ...")
            selection = self.select.run(run, out / "checkpoints", self.batch_size, self.feature_cache, device)
            samplers = {"tuned": samplers.pop("tuned"),
                        "tuned_selected": PolicySampler(run.mdp, selection["policy"], "tuned_selected", run.guide),
                        **samplers}
        samplers = {**{k: v for k, v in samplers.items() if k not in training_free},
                    **{row.name: row.sampler for row in tuned}, **training_free}
        score = scorer_for(run.datamodule, self.num_heldout, self.feature_cache, self.inception_weights)
        evaluator = self._evaluator(samplers, run.mdp.planned_nfe(), score, device, reference_for(run.datamodule),
                                    keep=("base", "tuned", "grid_best"))
        rows = evaluator.run(run.denoiser, run.datamodule.shape)
        if self.large_nfe:
            rows += self._large_nfe_rows(run, score, device)
        costs = {"tuned": (run.train_nfe, run.train_seconds)}
        if selection is not None:
            costs["tuned_selected"] = (run.train_nfe + selection["nfe"], (run.train_seconds or 0.0) + selection["seconds"])
        if grid is not None:
            costs["grid_best"] = (float(grid["nfe"]), grid.get("seconds"))
            write_grid_csv(grid["points"], grid["metric"], out / "grid.csv", run.policy.names)
        costs.update({row.name: (float(row.result.cost_nfe), row.result.wall_seconds) for row in tuned})
        title = (f"{run.datamodule.name}: tuned vs base at {run.mdp.planned_nfe()} NFE, {self.num_samples} samples, "
                 f"seeds {self.seeds}")
        paths = write_outputs(rows, out, title=title, sampler_order=list(samplers))
        summary = summarise(rows)
        with open(paths["md"], "a") as f:
            f.write("\n## Costs (denoiser evaluations)\n\n" + cost_table(costs, summary, run.mdp.planned_nfe()) + "\n"
                    + "\n".join(self._cost_lines(run, grid, tuned, selection)) + "\n")
        self._plots(run, evaluator.samples, out)
        plot_costs(costs, summary, run.mdp.planned_nfe(), out / "plots" / "quality_vs_cost.png")
        report(f"{title}\n" + compact_table(summary, list(samplers), {k: c for k, (c, _) in costs.items()})
               + f"\nfull table: {paths['md']}; everything is in {out}")
        return {"rows": rows, "paths": paths, "grid": grid, "summary": summary, "train_nfe": run.train_nfe,
                "tuned_schedules": tuned, "selection": selection}

    def _cost_lines(self, run: TrainedRun, grid: dict | None, tuned: Sequence[TunedRow] = (),
                    selection: dict | None = None) -> list[str]:
        """The details behind the cost table (what each tuning did)."""
        lines = [f"- training: {run.iterations} iterations, {run.train_nfe:.3g} denoiser evaluations "
                 f"({run.train_nfe / max(self.num_samples, 1):.3g} x the cost of one {self.num_samples}-sample evaluation)"]
        if run.warm_start is not None:
            w = run.warm_start
            lines.append(f"- warm start: the policy started from the {w.tuner} schedule "
                         f"[{', '.join(f'{float(s):.4g}' for s in w.sigmas)}] ({w.cost_nfe:.3g} denoiser evaluations, "
                         f"included in the training's; the `base` row is that schedule)")
        if grid is not None:
            lines.append(f"- grid search: {len(grid['points'])} constant settings of {run.policy.names}, "
                         f"{grid['nfe']:.3g} denoiser evaluations; best {grid['best']} ({grid['metric']} "
                         f"{grid['best_score']:.4g} on the training split)")
        if selection is not None:
            scores = ", ".join(f"{name} {value:.4g}" for name, value in selection["scores"])
            lines.append(f"- tuned_selected: {selection['best']}, the best of {len(selection['scores'])} policies by "
                         f"{selection['metric']} on the training split ({scores}); {selection['nfe']:.3g} denoiser "
                         "evaluations on top of the training's")
        for row in tuned:
            r = row.result
            lines.append(f"- {row.name}: the base sampler on the schedule [{', '.join(f'{float(s):.4g}' for s in r.sigmas)}]"
                         f" ({r.cost_nfe:.3g} denoiser evaluations, {r.wall_seconds:.1f} s; schedules/"
                         f"{row.name}_nfe{row.nfe}.json)")
        return lines

    def _plots(self, run: TrainedRun, kept: Mapping, out: Path) -> None:
        """The final samples (the first seed's, kept by the evaluator) and the learned schedule."""
        shown = dict(kept)
        shown["held-out data"] = run.datamodule.heldout(min(self.num_samples, len(run.datamodule.heldout())))
        plot_samples(shown, out / "plots" / "samples.png")
        ref = run.mdp.references(run.policy.knobs) if run.policy.kind == "knob" else None
        plot_schedule(run.policy.schedule(), run.mdp.ref_sigmas, out / "plots" / "schedule.png", ref)


def cost_table(costs: Mapping[str, tuple[float, float | None]], summary: Mapping, nfe: int) -> str:
    """One row per tuned sampler: what its tuning cost (denoiser evaluations, wall time) beside its quality."""
    lines = ["| row | tuning cost (denoiser evaluations) | tuning wall time | distance at "
             f"{nfe} NFE |", "|---|---|---|---|"]
    for name, (nfe_cost, seconds) in costs.items():
        metric, mean, std = distance(summary.get((name, nfe), {}))
        wall = f"{seconds:.1f} s" if seconds is not None else "–"
        lines.append(f"| {name} | {nfe_cost:.3g} | {wall} | {metric} {mean:.4g} ± {std:.2g} |")
    return "\n".join(lines) + "\n"


def plot_costs(costs: Mapping[str, tuple[float, float | None]], summary: Mapping, nfe: int, path: Path) -> Path:
    """Quality against tuning cost for the tuned rows, the training-free rows at cost 0, and the metric's floor."""
    points = {}
    for (name, row_nfe), cells in summary.items():
        if row_nfe == nfe:
            metric, mean, std = distance(cells)
            points[name] = (costs.get(name, (0.0, None))[0], mean, std)
    floor = summary.get(("reference", 0))
    metric = distance(floor)[0] if floor else "mmd"
    return plot_quality_vs_cost(points, path, metric, distance(floor)[1:] if floor else None)
