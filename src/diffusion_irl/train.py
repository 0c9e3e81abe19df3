"""``python -m diffusion_irl.train``: tune a sampler by f-divergence inverse RL, then compare it at the same NFE.

Compose -> check -> build (cheap objects first, so a bad config fails before any compute) -> fit the
``SamplerPolicyModule`` (config node ``system:``) with Lightning (checkpoints every ``checkpoint.every_n_epochs``
iterations, resume with ``ckpt_path=``) -> on rank 0, the comparison (config node ``compare:``,
:mod:`diffusion_irl.tuning.compare`) -> write ``results.csv``, ``results.md`` (with costs), ``grid.csv`` and
``plots/`` in the Hydra run directory.
"""
from __future__ import annotations

import time
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from diffusion_irl.config import (ConfigError, build, exit_on_config_error, has, require, require_bool, require_float,
                                  require_int, require_int_list, require_str)
from diffusion_irl.denoisers.module import check_network_shape, read_checkpoint
from diffusion_irl.mdp.policies import frozen_copy
from diffusion_irl.runs import (build_logger, check_run_dir, check_shapes, config_summary,
                                log_results, output_dir, quiet_third_party, report, warn_unread_additions)
from diffusion_irl.system import NonFiniteError, SamplerPolicyModule
from diffusion_irl.sampling.schedules import SigmaSchedule
from diffusion_irl.tuning.compare import TrainedRun
from diffusion_irl.tuning.tuners import with_schedule

SUMMARY_KEYS = ("data", "denoiser", "mdp.base", "mdp.nfe", "policy", "reward.divergence", "algo", "train.iterations",
                "seed")


BIG = 10**7          # generous upper bounds: a value above them is a typo (or a unit mistake), not a run
HUGE = 10**9
SEED_MAX = 2**32 - 1  # Lightning's seed_everything range


def check_loop_config(cfg: DictConfig) -> None:
    """Run-level keys, ``system.`` (the loop and its divergence limits), before any compute."""
    require_int(cfg, "seed", min=0, max=SEED_MAX)
    require_str(cfg, "ckpt_path", optional=True)
    require_bool(cfg, "overwrite")
    require_int(cfg, "mdp.nfe", min=1, max=100_000, hint="an NFE budget")
    require_int(cfg, "train.iterations", min=1, max=BIG)
    require_int(cfg, "train.eval_samples", min=2, max=HUGE)
    require_int(cfg, "system.rollout_batch", min=2, max=BIG, hint="trajectories per rank; advantages need 2")
    require_int(cfg, "system.disc_steps", min=0, max=BIG)
    require_int(cfg, "system.disc_batch", min=1, max=BIG)
    require_int(cfg, "system.eval_every", min=0, max=BIG, hint="0: never")
    for key in ("max_approx_kl", "max_policy_param", "max_policy_grad_norm"):
        if has(cfg, f"system.{key}"):
            value = require_float(cfg, f"system.{key}", min=0.0, optional=True)
            require(value is None or value > 0, f"system.{key}: must be > 0 or null, got {value}")
    for key, low in (("patience", 1), ("disc_patience", 0)):
        if has(cfg, f"system.{key}"):
            require_int(cfg, f"system.{key}", min=low, max=BIG)


# compare.* keys and their checks; a key absent from the config is skipped (the node may gain or lose keys)
_COMPARE_CHECKS = (
    ("enabled", lambda c, k: require_bool(c, k)),
    ("large_nfe", lambda c, k: require_int(c, k, min=1, max=100_000, optional=True)),
    ("num_samples", lambda c, k: require_int(c, k, min=2, max=HUGE)),
    ("num_heldout", lambda c, k: require_int(c, k, min=2, max=HUGE)),
    ("seeds", lambda c, k: require_int_list(c, k, min=0, max=2**63 - 1)),
    ("batch_size", lambda c, k: require_int(c, k, min=1, max=HUGE)),
    ("feature_cache", lambda c, k: require_str(c, k, optional=True)),
    ("inception_weights", lambda c, k: require_str(c, k, optional=True)),
    ("tuning_seed", lambda c, k: require_int(c, k, min=0, max=2**32 - 1)),
    ("select.enabled", lambda c, k: require_bool(c, k)),
    ("select.num_samples", lambda c, k: require_int(c, k, min=2, max=HUGE)),
    ("select.seeds", lambda c, k: require_int_list(c, k, min=0, max=2**63 - 1)),
    ("progress", lambda c, k: require_bool(c, k)),
    ("grid.enabled", lambda c, k: require_bool(c, k)),
    ("grid.num_samples", lambda c, k: require_int(c, k, min=2, max=HUGE)),
    ("grid.seeds", lambda c, k: require_int_list(c, k, min=0, max=2**63 - 1)),
    ("grid.max_points", lambda c, k: require_int(c, k, min=1, max=BIG)),
)


def check_compare_config(cfg: DictConfig) -> None:
    """Every ``compare.*`` value, so that the comparison after training cannot fail on its config."""
    for key, check in _COMPARE_CHECKS:
        if has(cfg, f"compare.{key}"):
            check(cfg, f"compare.{key}")
    names = _get_list(cfg, "compare.samplers")
    known = sorted(cfg.get("samplers") or {})
    unknown = [n for n in names if n not in known]
    require(not unknown, f"compare.samplers names unknown sampler(s) {unknown}; known: {known}")
    if has(cfg, "compare.tuners"):
        names, known = _get_list(cfg, "compare.tuners"), sorted(cfg.get("tuners") or {})
        unknown = [n for n in names if n not in known]
        require(not unknown, f"compare.tuners names unknown tuner(s) {unknown}; known: {known}")


def _get_list(cfg: DictConfig, key: str) -> list:
    value = OmegaConf.select(cfg, key)
    require(OmegaConf.is_list(value), f"{key}: must be a list, got {value!r}")
    return list(value)


def check_train_config(cfg: DictConfig) -> None:
    """Type and range checks of every run-level key, before any compute (each object checks its own arguments
    when it is built)."""
    check_loop_config(cfg)
    check_compare_config(cfg)
    start = cfg.get("warm_start")
    known = sorted(cfg.get("tuners") or {})
    require(start is None or (isinstance(start, str) and start in known),
            f"warm_start: must be null or one of the tuners {known}, got {start!r}")
    den_shape = OmegaConf.select(cfg, "denoiser.module.shape")
    if den_shape is not None:
        require(list(den_shape) == list(cfg.data.shape),
                f"denoiser.module.shape={list(den_shape)} does not match data.shape={list(cfg.data.shape)}")
    net = OmegaConf.select(cfg, "denoiser.module.net") or OmegaConf.select(cfg, "denoiser.net")
    try:
        check_network_shape(net, cfg.data.shape)
    except ValueError as exc:
        raise ConfigError(f"denoiser: {exc}") from None


def resume_checkpoint(cfg: DictConfig) -> tuple[str | None, dict | None]:
    """``ckpt_path`` resolved (``last``: the run's own last.ckpt, or a fresh start when there is none) and loaded:
    a missing file or a file that is not a checkpoint of this loop is a config error."""
    path = cfg.get("ckpt_path")
    if path is None:
        return None, None
    if path == "last":
        last = Path(OmegaConf.select(cfg, "checkpoint.dirpath")) / "last.ckpt"
        if not last.is_file():
            report(f"ckpt_path=last: no {last} yet, starting fresh")
            return None, None
        path = str(last)
    require(Path(path).is_file(), f"ckpt_path: no such file: {path}")
    try:
        ckpt = read_checkpoint(path, weights_only=False)
    except ValueError as exc:
        raise ConfigError(f"ckpt_path: {exc}") from None
    state = ckpt.get("state_dict")
    require(isinstance(state, dict) and any(k.startswith("policy.") for k in state) and "nfe_spent" in state,
            f"ckpt_path: not a checkpoint of this project: {path} (no sampler-policy state; expected a .ckpt "
            "written by python -m diffusion_irl.train)")
    return path, ckpt


def completed_iterations(ckpt: dict) -> int:
    """Iterations a loop checkpoint has completed (Lightning's fit-loop progress, else its epoch)."""
    try:
        return int(ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"])
    except (KeyError, TypeError):
        return int(ckpt.get("epoch", 0))


def check_resume(cfg: DictConfig, ckpt: dict, module: SamplerPolicyModule, path: str) -> None:
    """The checkpoint must fit the module this config builds: horizon, policy, every other part, iterations."""
    theirs, mine = ckpt["state_dict"], module.state_dict()
    if "weights" in theirs and tuple(theirs["weights"].shape) != tuple(mine["weights"].shape):
        raise ConfigError(f"ckpt_path: the checkpoint's horizon is {theirs['weights'].shape[0]} steps, this "
                          f"config's is {mine['weights'].shape[0]} (mdp.nfe or the base sampler changed): {path}")
    for part in ("policy", "discriminator", "value", ""):
        keys = [k for k in set(theirs) | set(mine) if k.startswith(f"{part}.") or (not part and k in theirs)]
        for key in sorted(keys):
            a, b = theirs.get(key), mine.get(key)
            shape_a = None if a is None else list(a.shape)
            shape_b = None if b is None else list(b.shape)
            if shape_a != shape_b:
                what = part or key.split(".")[0]
                raise ConfigError(f"ckpt_path: the checkpoint's {what} differs from this config's: {key} has shape "
                                  f"{shape_a} there and {shape_b} here (policy / mdp / {what} settings changed): "
                                  f"{path}")
    done = completed_iterations(ckpt)
    require(cfg.train.iterations >= done, f"train.iterations: {cfg.train.iterations} is below the "
                                          f"{done} iterations the checkpoint has completed: {path}")


def build_parts(cfg: DictConfig) -> dict:
    """Reward, algo, MDP, policy, data and discriminator (cheap, checked against each other), then the denoiser."""
    return build_denoiser(cfg, build_cheap_parts(cfg))


def build_cheap_parts(cfg: DictConfig) -> dict:
    """Reward, algo, MDP, policy, data and discriminator, checked against each other (no data loaded yet)."""
    parts = {key: build(cfg, key) for key in ("reward", "algo", "mdp", "policy", "data")}
    datamodule, mdp, policy = parts["data"], parts["mdp"], parts["policy"]
    require(tuple(datamodule.shape) == tuple(cfg.data.shape),
            f"data.shape={list(cfg.data.shape)} but the data has {list(datamodule.shape)}")
    try:
        mdp.setup_policy(policy, datamodule.shape)
    except ValueError as exc:
        raise ConfigError(f"policy / mdp: {exc}") from exc
    discriminator = parts["discriminator"] = build(cfg, "discriminator")
    if discriminator.shape is not None:
        require(tuple(discriminator.shape) == tuple(datamodule.shape),
                f"the discriminator works on shape {list(discriminator.shape)}, data={datamodule.name} has {list(datamodule.shape)}")
    names = list(OmegaConf.select(cfg, "compare.tuners") or []) if OmegaConf.select(cfg, "compare.enabled") else []
    parts["tuners"] = {name: build(cfg, f"tuners.{name}") for name in names}  # bad settings fail before training
    if cfg.get("warm_start"):
        parts["warm_start"] = tuner = build(cfg, f"tuners.{cfg.warm_start}")
        try:
            tuner.check(mdp.base, mdp.base.planned_nfe(mdp.horizon))
        except ValueError as exc:
            raise ConfigError(f"warm_start={cfg.warm_start}: {exc}") from None
    return parts


def warm_start(cfg: DictConfig, parts: dict) -> None:
    """``warm_start=<tuner>``: tune the base sampler's schedule for the MDP's horizon, then rebuild the MDP on that
    schedule and set the policy up again, so that training starts from the tuned schedule (the reference policy,
    the ``base`` row, is then the tuned schedule). Its cost is counted with the training's."""
    tuner = parts.get("warm_start")
    if tuner is None:
        return
    mdp, datamodule = parts["mdp"], parts["data"]
    denoiser = parts["denoiser"]
    frozen = [p for p in denoiser.parameters() if p.requires_grad] if isinstance(denoiser, torch.nn.Module) else []
    for p in frozen:
        p.requires_grad_(False)  # LD3 differentiates through D in x and sigma only
    result = tuner.tune(mdp.base, denoiser, datamodule, mdp.base.planned_nfe(mdp.horizon), cfg.seed)
    for p in frozen:
        p.requires_grad_(True)
    base = with_schedule(mdp.base, SigmaSchedule(sigmas=[float(s) for s in result.sigmas]))
    parts["mdp"] = build(cfg, "mdp", base=base)
    parts["mdp"].setup_policy(parts["policy"], datamodule.shape)
    parts["warm_start_result"] = result
    report(f"warm start ({tuner.name}): the policy starts from the schedule "
           f"[{', '.join(f'{float(s):.4g}' for s in result.sigmas)}] ({result.cost_nfe:.3g} denoiser evaluations, "
           f"{result.wall_seconds:.1f} s)")


def build_denoiser(cfg: DictConfig, parts: dict) -> dict:
    """The data (prepared and set up), then the denoiser (``cached_*``: pretrained on first use)."""
    datamodule, policy = parts["data"], parts["policy"]
    datamodule.prepare_data()
    datamodule.setup()
    parts["denoiser"] = denoiser = build(cfg, "denoiser")
    check_shapes(denoiser, datamodule)
    if getattr(policy, "finetune_denoiser", False):
        try:
            policy.attach_denoiser(denoiser)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
    return parts


def build_system(cfg: DictConfig, parts: dict, evaluate) -> SamplerPolicyModule:
    """The ``system:`` node with the built parts."""
    conditional = parts["discriminator"].num_classes > 0
    return build(cfg, "system", denoiser=parts["denoiser"], mdp=parts["mdp"], policy=parts["policy"],
                 discriminator=parts["discriminator"], reward=parts["reward"], algo=parts["algo"],
                 train_data=parts["data"].train_samples(), evaluate=evaluate,
                 train_labels=parts["data"].train_labels() if conditional else None)


def fit(cfg: DictConfig, module: SamplerPolicyModule, logger, ckpt_path: str | None = None) -> L.Trainer:
    """Lightning's fit, one epoch per iteration; the final state is always written to ``checkpoints/last.ckpt``
    (checkpoint names are stable: a resumed run overwrites, never adds ``-v1`` copies)."""
    checkpoint = build(cfg, "checkpoint", enable_version_counter=False)
    trainer = build(cfg, "trainer", callbacks=[checkpoint], logger=logger, max_epochs=cfg.train.iterations)
    last = Path(checkpoint.dirpath) / "last.ckpt"
    try:
        trainer.fit(module, ckpt_path=ckpt_path, weights_only=False)
    except NonFiniteError as exc:  # also DivergenceError
        report(f"training stopped: {exc}\nlast good checkpoint: {last if last.exists() else 'none written yet'}")
        raise
    # the callback refreshes last.ckpt only together with a periodic checkpoint (every rank calls; rank 0 writes)
    trainer.save_checkpoint(last)
    if trainer.is_global_zero:
        report(f"training done: {cfg.train.iterations} iterations, {float(module.nfe_spent):.3g} denoiser "
               f"evaluations; checkpoint {last}")
    return trainer


def prepare(cfg: DictConfig) -> tuple:
    """Everything before any compute: checks, the cheap objects, the run directory, the logger, the checkpoint to
    resume from. Returns ``(comparison, parts, out, logger, (ckpt_path, ckpt))``."""
    check_train_config(cfg)
    quiet_third_party()
    warn_unread_additions(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # before any network is built
    comparison = build(cfg, "compare")
    parts = build_cheap_parts(cfg)
    out = output_dir()
    check_run_dir(out, overwrite=cfg.overwrite, resume=cfg.get("ckpt_path"))
    resume = resume_checkpoint(cfg)
    logger = build_logger(cfg)
    return comparison, parts, out, logger, resume


def run(cfg: DictConfig) -> dict:
    comparison, parts, out, logger, (ckpt_path, ckpt) = prepare(cfg)
    build_denoiser(cfg, parts)
    report(f"run directory {out}\nconfig: {config_summary(cfg, SUMMARY_KEYS)}")
    warm_start(cfg, parts)
    initial = frozen_copy(parts["policy"])
    if logger:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    every = cfg.system.eval_every
    evaluate = comparison.periodic_evaluation(parts["mdp"], parts["data"], out, cfg.train.eval_samples,
                                              plots=bool(logger)) if every else None
    module = build_system(cfg, parts, evaluate)
    if ckpt is not None:
        check_resume(cfg, ckpt, module, ckpt_path)
    start = time.perf_counter()
    trainer = fit(cfg, module, logger, ckpt_path)
    train_seconds = time.perf_counter() - start  # this process's fit (a resumed run: since the resume)
    result = {"module": module, "trainer": trainer}
    if trainer.is_global_zero and comparison.enabled:
        warm = parts.get("warm_start_result")
        train_nfe = float(module.nfe_spent) + (warm.cost_nfe if warm is not None else 0)
        train_seconds += warm.wall_seconds if warm is not None else 0.0
        trained = TrainedRun(parts["data"], module.denoiser, parts["mdp"], module.policy,
                             initial.to(module.device), module.discriminator, train_nfe,
                             cfg.train.iterations, train_seconds, warm_start=warm)
        training_free = {name: build(cfg, f"samplers.{name}") for name in comparison.samplers}
        result.update(comparison.run(trained, training_free, out, parts["tuners"]))
        log_results(logger, result["paths"]["csv"], "compare", [out / "plots" / "samples.png",
                                                               out / "plots" / "schedule.png"])
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
