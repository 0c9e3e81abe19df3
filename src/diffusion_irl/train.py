"""``python -m diffusion_irl.train``: tune a sampler by f-divergence inverse RL, then compare it at the same NFE.

Compose -> check -> build (cheap objects first, so a bad config fails before any compute) -> fit the
``SamplerPolicyModule`` (config node ``system:``) with Lightning (checkpoints every ``checkpoint.every_n_epochs``
iterations, resume with ``ckpt_path=``) -> on rank 0, the comparison (config node ``compare:``,
:mod:`diffusion_irl.tuning.compare`) -> write ``results.csv``, ``results.md`` (with costs), ``grid.csv`` and
``plots/`` in the Hydra run directory.
"""
from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from diffusion_irl.config import ConfigError, build, exit_on_config_error, require
from diffusion_irl.mdp.policies import frozen_copy
from diffusion_irl.runs import check_shapes, config_summary, log_results, output_dir, quiet_third_party, report
from diffusion_irl.system import NonFiniteError, SamplerPolicyModule
from diffusion_irl.tuning.compare import TrainedRun

SUMMARY_KEYS = ("data", "denoiser", "mdp.base", "mdp.nfe", "policy", "reward.divergence", "algo", "train.iterations",
                "seed")


def _positive_int(value, minimum: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def check_train_config(cfg: DictConfig) -> None:
    """Range checks of the run-level keys (each object checks its own arguments when it is built)."""
    nfe = cfg.mdp.get("nfe")
    require(_positive_int(nfe), f"mdp.nfe must be a positive integer (an NFE budget), got {nfe}")
    require(_positive_int(cfg.train.iterations), f"train.iterations must be an integer >= 1, got {cfg.train.iterations}")
    s = cfg.system
    require(_positive_int(s.rollout_batch, 2), f"system.rollout_batch must be >= 2, got {s.rollout_batch}")
    require(_positive_int(s.disc_steps, 0) and _positive_int(s.disc_batch),
            f"system.disc_steps >= 0 and system.disc_batch >= 1 needed, got {s.disc_steps}, {s.disc_batch}")
    c = cfg.compare
    unknown = [n for n in c.samplers if n not in cfg.get("samplers", {})]
    require(not unknown, f"compare.samplers names unknown sampler(s) {unknown}; known: {sorted(cfg.get('samplers', {}))}")
    require(len(c.seeds) > 0 and c.num_samples >= 2, "compare.seeds must be non-empty and compare.num_samples >= 2")
    require(c.large_nfe is None or _positive_int(c.large_nfe),
            f"compare.large_nfe must be a positive integer or null, got {c.large_nfe}")
    den_shape = OmegaConf.select(cfg, "denoiser.module.shape")
    if den_shape is not None:
        require(list(den_shape) == list(cfg.data.shape),
                f"denoiser.module.shape={list(den_shape)} does not match data.shape={list(cfg.data.shape)}")


def build_parts(cfg: DictConfig) -> dict:
    """Reward, algo, MDP, policy, data and discriminator (cheap, checked against each other), then the denoiser."""
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
    return build(cfg, "system", denoiser=parts["denoiser"], mdp=parts["mdp"], policy=parts["policy"],
                 discriminator=parts["discriminator"], reward=parts["reward"], algo=parts["algo"],
                 train_data=parts["data"].train_samples(), evaluate=evaluate)


def fit(cfg: DictConfig, module: SamplerPolicyModule, logger) -> L.Trainer:
    """Lightning's fit, one epoch per iteration; the final state is always written to ``checkpoints/last.ckpt``."""
    checkpoint = build(cfg, "checkpoint")
    trainer = build(cfg, "trainer", callbacks=[checkpoint], logger=logger, max_epochs=cfg.train.iterations)
    last = Path(checkpoint.dirpath) / "last.ckpt"
    try:
        trainer.fit(module, ckpt_path=cfg.get("ckpt_path"), weights_only=False)
    except NonFiniteError as exc:
        report(f"training stopped: {exc}\nlast good checkpoint: {last if last.exists() else 'none written yet'}")
        raise
    # the callback refreshes last.ckpt only together with a periodic checkpoint (every rank calls; rank 0 writes)
    trainer.save_checkpoint(last)
    if trainer.is_global_zero:
        report(f"training done: {cfg.train.iterations} iterations, {float(module.nfe_spent):.3g} denoiser "
               f"evaluations; checkpoint {last}")
    return trainer


def run(cfg: DictConfig) -> dict:
    check_train_config(cfg)
    quiet_third_party()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    comparison = build(cfg, "compare")
    parts = build_parts(cfg)
    out = output_dir()
    report(f"run directory {out}\nconfig: {config_summary(cfg, SUMMARY_KEYS)}")
    initial = frozen_copy(parts["policy"])
    logger = build(cfg, "logger") if cfg.get("logger") else False
    if logger:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    every = cfg.system.eval_every
    evaluate = comparison.periodic_evaluation(parts["mdp"], parts["data"], out, cfg.train.eval_samples,
                                              plots=bool(logger)) if every else None
    module = build_system(cfg, parts, evaluate)
    trainer = fit(cfg, module, logger)
    result = {"module": module, "trainer": trainer}
    if trainer.is_global_zero and comparison.enabled:
        trained = TrainedRun(parts["data"], module.denoiser, parts["mdp"], module.policy,
                             initial.to(module.device), module.discriminator, float(module.nfe_spent),
                             cfg.train.iterations)
        training_free = {name: build(cfg, f"samplers.{name}") for name in comparison.samplers}
        result.update(comparison.run(trained, training_free, out))
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
