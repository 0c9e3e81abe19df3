"""``python -m diffusion_irl.train``: tune a sampler by f-divergence inverse RL, then compare it at the same NFE.

Compose -> check -> instantiate (cheap objects first, so a bad config fails before any compute) -> fit the
``SamplerPolicyModule`` with Lightning (checkpoints every ``checkpoint.every_n_epochs`` iterations, resume with
``ckpt_path=``) -> on rank 0, the comparison of ALGORITHM.md section 7 with the same seeds for every row:

- ``tuned``: the trained policy; ``base``: the base sampler (the initial policy) at the same NFE;
- ``grid_best``: the best constant knob value of a grid search at the same NFE, selected on the TRAINING split;
- every training-free sampler of ``compare.samplers`` at the same NFE; ``base`` again at ``compare.large_nfe``.

Writes ``results.csv`` (the evaluator's columns), ``results.md`` (mean ± std over seeds, plus the costs in
denoiser evaluations), ``grid.csv``, ``quality_vs_nfe.png`` and ``plots/`` in the Hydra run directory.
"""
from __future__ import annotations

import itertools
import logging
import math
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from diffusion_irl.config import ConfigError, build, exit_on_config_error, require
from diffusion_irl.evaluate import check_shapes, output_dir
from diffusion_irl.evaluation import (Evaluator, generate, markdown_table, reference_for, scorer_for, summarise,
                                      write_outputs)
from diffusion_irl.mdp.env import PolicySampler, SamplingMDP
from diffusion_irl.mdp.policies import ConstantKnobPolicy, KnobPolicy, TransitionPolicy, frozen_copy
from diffusion_irl.plots import plot_samples, plot_schedule
from diffusion_irl.system import NonFiniteError, SamplerPolicyModule

log = logging.getLogger(__name__)


def check_train_config(cfg: DictConfig) -> None:
    nfe = cfg.mdp.get("nfe")
    require(isinstance(nfe, int) and nfe > 0, f"mdp.nfe must be a positive integer (an NFE budget), got {nfe}")
    t = cfg.train
    require(isinstance(t.iterations, int) and t.iterations >= 1, f"train.iterations must be an integer >= 1, got {t.iterations}")
    require(t.rollout_batch >= 2, f"train.rollout_batch must be >= 2, got {t.rollout_batch}")
    require(t.disc_steps >= 0 and t.disc_batch >= 1, f"train.disc_steps >= 0 and train.disc_batch >= 1 needed, got {t.disc_steps}, {t.disc_batch}")
    c = cfg.compare
    unknown = [n for n in c.samplers if n not in cfg.get("samplers", {})]
    require(not unknown, f"compare.samplers names unknown sampler(s) {unknown}; known: {sorted(cfg.get('samplers', {}))}")
    require(len(c.seeds) > 0 and c.num_samples >= 2, "compare.seeds must be non-empty and compare.num_samples >= 2")
    require(c.large_nfe is None or (isinstance(c.large_nfe, int) and c.large_nfe > 0),
            f"compare.large_nfe must be a positive integer or null, got {c.large_nfe}")
    den_shape = OmegaConf.select(cfg, "denoiser.module.shape")
    if den_shape is not None:
        require(list(den_shape) == list(cfg.data.shape),
                f"denoiser.module.shape={list(den_shape)} does not match data.shape={list(cfg.data.shape)}")


def reference_policy(mdp: SamplingMDP, policy):
    """The base sampler as a policy on ``mdp`` (any horizon): constant reference knob values (churn follows the
    base sampler's own rule), or a fresh transition policy."""
    if isinstance(policy, TransitionPolicy):
        ref = TransitionPolicy(eta=policy.eta, correction=False)
        mdp.setup_policy(ref, policy.shape)
        return ref
    values = {}
    for name, vals in mdp.references(policy.knobs).items():
        if name == "churn" and policy.knobs[name].reference is None:
            continue  # the base sampler's own churn rule
        values[name] = float(vals[0])
    return ConstantKnobPolicy(values).setup(mdp.horizon)


def grid_search(mdp: SamplingMDP, policy: KnobPolicy, denoiser, datamodule, cfg: DictConfig, guide, device) -> dict:
    """Constant knob values over the Cartesian product of the knobs' grids, each scored against the TRAINING split
    (selection never sees the held-out data). Returns the best values, every point's score and the cost in NFE."""
    g = cfg.compare.grid
    grids = [policy.knobs[n].grid_values() for n in policy.names]
    points = list(itertools.product(*grids))
    if len(points) > g.max_points:
        keep = torch.randperm(len(points), generator=torch.Generator().manual_seed(0))[: g.max_points]
        points = [points[i] for i in sorted(keep.tolist())]
    metric = "mmd" if len(datamodule.shape) == 1 else "fd"
    score = scorer_for(datamodule, max(g.num_samples, 1000), cfg.compare.feature_cache, split="train")
    results, cost = [], 0
    for values in points:
        const = ConstantKnobPolicy(dict(zip(policy.names, values))).setup(mdp.horizon)
        sampler = PolicySampler(mdp, const, "grid", guide)
        vals = []
        for seed in g.seeds:
            x, used = generate(sampler, denoiser, datamodule.shape, mdp.horizon, g.num_samples, seed,
                               cfg.compare.batch_size, device)
            cost += used * g.num_samples
            vals.append(score(x, seed)[metric])
        results.append((dict(zip(policy.names, values)), sum(vals) / len(vals)))
    finite = [r for r in results if math.isfinite(r[1])]
    best = min(finite, key=lambda r: r[1]) if finite else results[0]
    return {"best": best[0], "best_score": best[1], "metric": metric, "points": results, "nfe": cost}


def make_periodic_eval(mdp: SamplingMDP, datamodule, cfg: DictConfig, out: Path):
    """Held-out metrics of the current (deterministic) policy; the knob schedule plot goes to W&B when on."""
    n = cfg.train.eval_samples
    state: dict = {}

    def evaluate(module: SamplerPolicyModule) -> dict[str, float]:
        if "score" not in state:
            state["score"] = scorer_for(datamodule, cfg.compare.num_heldout, cfg.compare.feature_cache)
        sampler = PolicySampler(mdp, module.policy, "tuned", module.discriminator if mdp.guidance == "dg" else None)
        x, _ = generate(sampler, module.denoiser, datamodule.shape, mdp.horizon, n, 12345, cfg.compare.batch_size,
                        module.device)
        metrics = {k: v for k, v in state["score"](x, 0).items() if k in ("mmd", "nll", "precision", "recall", "fd", "coverage")}
        logger = module.logger
        if logger is not None and hasattr(logger, "log_image"):
            it = module.iteration + 1
            paths = [str(plot_samples({f"iteration {it}": x}, out / "plots" / f"samples_{it:05d}.png"))]
            paths.append(str(plot_schedule(module.policy.schedule(), mdp.ref_sigmas, out / "plots" / f"schedule_{it:05d}.png")))
            logger.log_image(key="train/samples_and_schedule", images=paths, step=module.global_step)
        return metrics

    return evaluate


def compare(cfg: DictConfig, datamodule, denoiser, mdp: SamplingMDP, policy, initial, module, out: Path, device) -> dict:
    c = cfg.compare
    guide = module.discriminator if mdp.guidance == "dg" else None
    budget = mdp.planned_nfe()
    samplers = {"tuned": PolicySampler(mdp, policy, "tuned", guide), "base": PolicySampler(mdp, initial, "base", guide)}
    grid = None
    if c.grid.enabled and isinstance(policy, KnobPolicy):
        print(f"grid search over constant {policy.names} at {budget} NFE ...")
        grid = grid_search(mdp, policy, denoiser, datamodule, cfg, guide, device)
        samplers["grid_best"] = PolicySampler(mdp, ConstantKnobPolicy(grid["best"]).setup(mdp.horizon), "grid_best", guide)
    for name in c.samplers:
        samplers[name] = build(cfg, f"samplers.{name}")
    score = scorer_for(datamodule, c.num_heldout, c.feature_cache, c.inception_weights)
    ev = Evaluator(samplers=samplers, nfe=[budget], num_samples=c.num_samples, seeds=list(c.seeds), score=score,
                   reference=reference_for(datamodule), batch_size=c.batch_size, device=str(device), progress=c.progress,
                   keep=("base", "tuned", "grid_best"))
    rows = ev.run(denoiser, datamodule.shape)
    order = list(samplers)
    if c.large_nfe:
        big = SamplingMDP(mdp.base, nfe=c.large_nfe, guidance=mdp.guidance, num_classes=mdp.num_classes,
                          dg_sigma_min=mdp.dg_sigma_min, dg_sigma_max=mdp.dg_sigma_max, sigma_floor=mdp.sigma_floor)
        ev_big = Evaluator(samplers={"base": PolicySampler(big, reference_policy(big, policy), "base", guide)},
                           nfe=[big.planned_nfe()], num_samples=c.num_samples, seeds=list(c.seeds), score=score,
                           batch_size=c.batch_size, device=str(device), progress=c.progress)
        rows += ev_big.run(denoiser, datamodule.shape)
    # outputs
    train_nfe = float(module.nfe_spent)
    costs = [f"- training: {cfg.train.iterations} iterations, {train_nfe:.3g} denoiser evaluations "
             f"({train_nfe / max(c.num_samples, 1):.3g} x the cost of one {c.num_samples}-sample evaluation)"]
    if grid is not None:
        costs.append(f"- grid search: {len(grid['points'])} constant settings of {policy.names}, {grid['nfe']:.3g} denoiser "
                     f"evaluations; best {grid['best']} ({grid['metric']} {grid['best_score']:.4g} on the training split)")
        with open(out / "grid.csv", "w") as f:
            f.write(",".join(policy.names) + f",{grid['metric']}_train\n")
            for values, s in grid["points"]:
                f.write(",".join(f"{values[n]:g}" for n in policy.names) + f",{s:.6g}\n")
    title = (f"{datamodule.name}: tuned vs base at {budget} NFE, {c.num_samples} samples, seeds {list(c.seeds)}")
    paths = write_outputs(rows, out, title=title, sampler_order=order)
    with open(paths["md"], "a") as f:
        f.write("\n## Costs (denoiser evaluations)\n\n" + "\n".join(costs) + "\n")
    # figures: final samples (the first seed's, kept by the evaluator) and the learned schedule
    shown = dict(ev.samples)
    shown["held-out data"] = datamodule.heldout(min(c.num_samples, len(datamodule.heldout())))
    plot_samples(shown, out / "plots" / "samples.png")
    ref = mdp.references(policy.knobs) if isinstance(policy, KnobPolicy) else None
    plot_schedule(policy.schedule(), mdp.ref_sigmas, out / "plots" / "schedule.png", ref)
    print(paths["md"].read_text())
    print(f"results written to {out}")
    return {"rows": rows, "paths": paths, "grid": grid, "summary": summarise(rows), "train_nfe": train_nfe}


def run(cfg: DictConfig) -> dict:
    check_train_config(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    # cheap objects first: a bad reward / algo / policy / MDP fails before any data, pretraining or rollout
    reward = build(cfg, "reward")
    algo = build(cfg, "algo")
    mdp = build(cfg, "mdp")
    policy = build(cfg, "policy")
    datamodule = build(cfg, "data")
    require(tuple(datamodule.shape) == tuple(cfg.data.shape), f"data.shape={list(cfg.data.shape)} but the data has {list(datamodule.shape)}")
    try:
        mdp.setup_policy(policy, datamodule.shape)
    except ValueError as exc:
        raise ConfigError(f"policy / mdp: {exc}") from exc
    discriminator = build(cfg, "discriminator")
    if discriminator.shape is not None:
        require(tuple(discriminator.shape) == tuple(datamodule.shape),
                f"the discriminator works on shape {list(discriminator.shape)}, data={datamodule.name} has {list(datamodule.shape)}")
    datamodule.prepare_data()
    datamodule.setup()
    denoiser = build(cfg, "denoiser")
    check_shapes(denoiser, datamodule)
    if getattr(policy, "finetune_denoiser", False):
        try:
            policy.attach_denoiser(denoiser)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
    out = output_dir()
    initial = frozen_copy(policy)
    logger = build(cfg, "logger") if cfg.get("logger") else False
    # the loop has no validation stage (trainer/rl.yaml: check_val_every_n_epoch null), so Lightning would defer every
    # save to a validation end that never comes: no periodic checkpoint and no last.ckpt until the run ends
    save_on_epoch_end = {} if cfg.checkpoint.get("save_on_train_epoch_end") is not None else {"save_on_train_epoch_end": True}
    checkpoint = build(cfg, "checkpoint", **save_on_epoch_end)
    if logger:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    module = SamplerPolicyModule(
        denoiser, mdp, policy, discriminator, reward, algo, datamodule.train_samples(), cfg.train.rollout_batch,
        cfg.train.disc_steps, cfg.train.disc_batch, cfg.seed, cfg.train.eval_every,
        make_periodic_eval(mdp, datamodule, cfg, out) if cfg.train.eval_every else None)
    trainer = build(cfg, "trainer", callbacks=[checkpoint], logger=logger, max_epochs=cfg.train.iterations)
    try:
        trainer.fit(module, ckpt_path=cfg.get("ckpt_path"))
    except NonFiniteError as exc:
        last = Path(checkpoint.dirpath) / "last.ckpt"
        print(f"training stopped: {exc}\nlast good checkpoint: {last if last.exists() else 'none written yet'}")
        raise
    # the callback refreshes last.ckpt only together with a periodic checkpoint: write the final state (every rank
    # calls this; only rank 0 writes)
    trainer.save_checkpoint(Path(checkpoint.dirpath) / "last.ckpt")
    result = {"module": module, "trainer": trainer}
    if trainer.is_global_zero:
        print(f"training done: {cfg.train.iterations} iterations, {float(module.nfe_spent):.3g} denoiser evaluations; "
              f"checkpoint {Path(checkpoint.dirpath) / 'last.ckpt'}")
        if cfg.compare.enabled:
            device = module.device
            initial = initial.to(device)
            result.update(compare(cfg, datamodule, module.denoiser, mdp, module.policy, initial, module, out, device))
            if logger and hasattr(logger, "log_table"):
                import csv

                with open(result["paths"]["csv"]) as f:
                    data = list(csv.reader(f))
                logger.log_table(key="compare/results", columns=data[0], data=data[1:])
                logger.log_image(key="compare/plots", images=[str(out / "plots" / "samples.png"),
                                                               str(out / "plots" / "schedule.png")])
    return result


@hydra.main(version_base="1.3", config_path="../../conf", config_name="train")
@exit_on_config_error
def main(cfg: DictConfig):
    try:
        run(cfg)
    except NonFiniteError:
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
