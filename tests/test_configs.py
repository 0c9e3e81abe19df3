"""Every file in conf/ is composed and instantiated here (a new file without a case fails the last test)."""
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from diffusion_irl.config import ConfigError, build

from .conftest import CONF
from .helpers import compose_config

ALL_FILES = sorted(str(p.relative_to(CONF)) for p in CONF.rglob("*.yaml"))
COVERED: set[str] = set()


def cover(*files):
    COVERED.update(files)
    return files


def group(name):
    return sorted(p.stem for p in (CONF / name).glob("*.yaml"))


@pytest.mark.parametrize("primary", cover("evaluate.yaml", "pretrain.yaml", "hydra/default.yaml"))
def test_primary_configs_compose(primary, tmp_path):
    cfg = compose_config(primary.split("/")[0].removesuffix(".yaml") if "/" not in primary else "evaluate",
                         output_dir=tmp_path)
    assert "data" in cfg and "denoiser" in cfg


def test_hydra_run_dir_is_under_outputs():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="evaluate", return_hydra_config=True)
    assert cfg.hydra.run.dir.startswith("outputs/") and cfg.hydra.sweep.dir.startswith("outputs/")


@pytest.mark.parametrize("name", cover(*[f"data/{n}.yaml" for n in group("data")]))
def test_data_configs(name, tmp_path):
    stem = Path(name).stem
    cfg = compose_config("evaluate", [f"data={stem}"], output_dir=tmp_path)
    dm = build(cfg, "data")
    assert tuple(dm.shape) == tuple(cfg.data.shape)
    assert dm.num_classes == cfg.data.num_classes
    if len(dm.shape) == 1:  # 2D laws: draw and check the split sizes
        cfg = compose_config("evaluate", [f"data={stem}", "data.n_train=64", "data.n_heldout=32"], output_dir=tmp_path)
        dm = build(cfg, "data")
        dm.setup()
        assert dm.train_samples().shape == (64, 2) and dm.heldout().shape == (32, 2)
        assert not torch.equal(dm.train_samples()[:32], dm.heldout())


OPTIONAL_SAMPLERS = {"dg"}  # not in evaluate.yaml's default list (it needs a trained discriminator): test_dg_sampler_config


@pytest.mark.parametrize("name", cover(*[f"sampler/{n}.yaml" for n in group("sampler") if n not in OPTIONAL_SAMPLERS]))
def test_sampler_configs(name, tmp_path):
    stem = Path(name).stem
    cfg = compose_config("evaluate", output_dir=tmp_path)
    assert stem in cfg.samplers, f"evaluate.yaml does not include sampler {stem}"
    sampler = build(cfg, f"samplers.{stem}")
    assert sampler.steps_for_budget(128) is not None


cover("denoiser/analytic.yaml", "denoiser/mlp.yaml", "denoiser/unet.yaml", "hydra/launcher/slurm.yaml")


def test_denoiser_analytic(tmp_path):
    cfg = compose_config("evaluate", ["denoiser=analytic"], output_dir=tmp_path)
    D = build(cfg, "denoiser")
    assert D(torch.zeros(3, 2), 1.0).shape == (3, 2)


@pytest.mark.parametrize("name, data", [("mlp", "gmm8"), ("unet", "digits")])
def test_trainable_denoisers(name, data, tmp_path):
    cfg = compose_config("pretrain", [f"denoiser={name}", f"data={data}"], output_dir=tmp_path)
    module = build(cfg, "denoiser")
    D = module.denoiser(ema=False)
    shape = tuple(cfg.data.shape)
    assert D(torch.randn(2, *shape), torch.tensor([0.5, 2.0])).shape == (2, *shape)


@pytest.mark.parametrize("name", cover("denoiser/checkpoint.yaml", "denoiser/diffusers.yaml", "denoiser/edm.yaml"))
def test_loaded_denoisers_need_an_existing_path(name, tmp_path):
    stem = Path(name).stem
    missing = tmp_path / "nothing_here"
    cfg = compose_config("evaluate", [f"denoiser={stem}", f"denoiser.path={missing}"], output_dir=tmp_path)
    with pytest.raises(ConfigError, match="nothing_here"):
        build(cfg, "denoiser")


@pytest.mark.parametrize("name", cover(*[f"trainer/{n}.yaml" for n in group("trainer")]))
def test_trainer_configs(name, tmp_path):
    stem = Path(name).stem
    extra = ["trainer.accelerator=cpu", "trainer.devices=2"] if stem == "ddp" else []
    cfg = compose_config("pretrain", [f"trainer={stem}"] + extra, output_dir=tmp_path)
    trainer = build(cfg, "trainer")
    assert trainer.max_steps == cfg.trainer.max_steps


@pytest.mark.parametrize("name", cover(*[f"logger/{n}.yaml" for n in group("logger")]))
def test_logger_configs(name, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    stem = Path(name).stem
    cfg = compose_config("pretrain", [f"logger={stem}"], output_dir=tmp_path)
    logger = build(cfg, "logger") if cfg.get("logger") else None  # logger=none composes to an empty node
    assert (logger is None) == (stem == "none")


def test_slurm_launcher_composes():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import get_class

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="pretrain", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher.partition == "gpu" and launcher.max_num_timeout == 3
    assert get_class(launcher._target_).__name__ == "SlurmLauncher"


def test_every_config_file_is_covered():
    """Each case above registers the files it composes when this module is imported."""
    missing = sorted(set(ALL_FILES) - COVERED)
    assert not missing, f"config files without a composition test: {missing}"


# ---- begin: discriminator and discriminator guidance (train_discriminator.py, sampling/guidance.py) ----------------
@pytest.mark.parametrize("name", cover("sampler/dg.yaml"))
def test_dg_sampler_config(name, tmp_path):
    from diffusion_irl.sampling.guidance import DiscriminatorGuided
    from diffusion_irl.sampling.samplers import Heun

    cfg = compose_config("evaluate", ["+sampler@samplers.dg=dg", "evaluate.samplers=[heun,dg]"], output_dir=tmp_path)
    sampler = build(cfg, "samplers.dg")
    assert isinstance(sampler, DiscriminatorGuided) and isinstance(sampler.base, Heun)
    assert sampler.discriminator_path is None and sampler.sigma_max == float("inf")
    assert sampler.steps_for_budget(128) == build(cfg, "samplers.heun").steps_for_budget(128)
    missing = tmp_path / "no_disc.ckpt"
    cfg = compose_config("evaluate", ["+sampler@samplers.dg=dg", f"samplers.dg.discriminator_path={missing}"],
                         output_dir=tmp_path)
    with pytest.raises(ConfigError, match="discriminator_path"):
        build(cfg, "samplers.dg")


@pytest.mark.parametrize("name, data", [("mlp", "gmm8"), ("cnn", "digits")])
@pytest.mark.parametrize("spectral_norm", [False, True])
def test_discriminator_configs(name, data, spectral_norm, tmp_path):
    from diffusion_irl.discriminator import DiscriminatorModule

    cfg = compose_config("train_discriminator", [f"data={data}", f"discriminator={name}",
                                                 f"discriminator.net.spectral_norm={str(spectral_norm).lower()}"],
                         output_dir=tmp_path)
    module = build(cfg, "discriminator")
    shape = tuple(cfg.data.shape)
    assert isinstance(module, DiscriminatorModule) and module.shape == shape
    assert module.hparams["net"]["sigma_data"] == cfg.data.sigma_data
    assert module(torch.randn(3, *shape), torch.tensor([0.0, 1.0, 80.0])).shape == (3,)
    assert build(cfg, "checkpoint").dirpath == str(tmp_path / "checkpoints")
    assert build(cfg, "sampler").steps_for_budget(cfg.train.nfe) is not None


cover("discriminator/mlp.yaml", "discriminator/cnn.yaml", "train_discriminator.yaml")
# ---- end: discriminator and discriminator guidance ----------------------------------------------------------------


# ---- begin: the RL loop (train.py, mdp/, rl/: train.yaml, policy/, reward/, algo/, trainer/rl*, experiment/,
# denoiser/cached_*) -------------------------------------------------------------------------------------------------
# Experiments are selected with `experiment=<name>`: train.yaml lists `experiment: null` in its defaults, so Hydra
# refuses `+experiment=<name>` (see tests/test_train.py).
RL_QUIET = ["logger=none", "denoiser=analytic"]
POLICY_SETUP = {  # the base sampler / MDP each policy file is meant for (see its header comment)
    "churn": ["sampler@mdp.base=edm_sde"],
    "guidance": ["mdp.guidance=dg"],
    "transition": ["sampler@mdp.base=ddpm"],
}


def _rl_state(shape, horizon):
    from diffusion_irl.mdp.policies import State

    return State(x=torch.randn(4, *shape), sigma=torch.full((4,), 1.0), k=torch.full((4,), horizon - 1, dtype=torch.long))


@pytest.mark.parametrize("name", cover("train.yaml"))
def test_train_config(name, tmp_path):
    from diffusion_irl.mdp.env import SamplingMDP
    from diffusion_irl.mdp.policies import KnobPolicy
    from diffusion_irl.train import check_train_config

    cfg = compose_config("train", RL_QUIET, output_dir=tmp_path)
    check_train_config(cfg)
    mdp, policy = build(cfg, "mdp"), build(cfg, "policy")
    assert isinstance(mdp, SamplingMDP) and isinstance(policy, KnobPolicy) and mdp.planned_nfe() == cfg.mdp.nfe == 10
    mdp.setup_policy(policy, tuple(cfg.data.shape))
    assert build(cfg, "discriminator").shape == tuple(cfg.data.shape)
    assert build(cfg, "checkpoint").dirpath == str(tmp_path / "checkpoints")
    for sampler in cfg.compare.samplers:
        assert build(cfg, f"samplers.{sampler}").steps_for_budget(mdp.planned_nfe()) is not None
    assert compose_config("train", output_dir=tmp_path).denoiser._target_.endswith("cached_denoiser")


@pytest.mark.parametrize("name", cover(*[f"policy/{n}.yaml" for n in group("policy")]))
def test_policy_configs(name, tmp_path):
    stem = Path(name).stem
    cfg = compose_config("train", [*RL_QUIET, f"policy={stem}", *POLICY_SETUP.get(stem, [])], output_dir=tmp_path)
    mdp, policy = build(cfg, "mdp"), build(cfg, "policy")
    shape = tuple(cfg.data.shape)
    mdp.setup_policy(policy, shape)
    assert policy.horizon == mdp.horizon and policy.sigma_data == cfg.data.sigma_data
    if stem == "transition":
        assert policy.eval_mode == "sample" and mdp.eta == 1.0
        torch.testing.assert_close(policy.schedule()["sigma_next"][:-1], mdp.ref_sigmas[1:-1].float())
        return
    assert set(policy.names) == set(cfg.policy.knobs)
    refs = mdp.references(policy.knobs)
    for knob, sched in policy.schedule().items():  # the policy starts at the base sampler's knob values
        k = policy.knobs[knob]
        if k.discrete:
            grid = torch.tensor(k.grid_values())
            want, tol = grid[(grid.unsqueeze(0) - refs[knob].unsqueeze(1)).abs().argmin(1)], 1e-6
        else:  # a continuous knob's initial mode is kept 1e-3 of the range inside its bounds (e.g. dg guidance 0)
            want, tol = refs[knob], 1.01e-3 * (k.high - k.low)
        torch.testing.assert_close(sched, want.float(), atol=tol, rtol=0)
    action = policy.act(_rl_state(shape, mdp.horizon))
    assert torch.isfinite(action.logp).all() and set(action.values) == set(policy.names)


@pytest.mark.parametrize("name", cover(*[f"reward/{n}.yaml" for n in group("reward")]))
def test_reward_configs(name, tmp_path):
    from diffusion_irl.rl.rewards import Reward

    stem = Path(name).stem
    cfg = compose_config("train", [*RL_QUIET, f"reward={stem}"], output_dir=tmp_path)
    reward = build(cfg, "reward")
    assert isinstance(reward, Reward) and reward.divergence == stem
    r = reward(torch.linspace(-20, 20, 41))
    assert torch.isfinite(r).all() and bool((r[1:] >= r[:-1]).all())  # more "data-like" states earn more
    assert reward.weights(5).shape == (5,)


@pytest.mark.parametrize("name", cover(*[f"algo/{n}.yaml" for n in group("algo")]))
def test_algo_configs(name, tmp_path):
    from diffusion_irl.rl.ppo import PPO

    stem = Path(name).stem
    cfg = compose_config("train", [*RL_QUIET, f"algo={stem}"], output_dir=tmp_path)
    algo = build(cfg, "algo")
    assert isinstance(algo, PPO) and algo.baseline == ("value" if stem == "ppo_value" else "mean")
    assert algo.clip_eps == cfg.algo.clip_eps and algo.lr == cfg.algo.lr


@pytest.mark.parametrize("name", cover("trainer/rl.yaml", "trainer/rl_ddp.yaml"))
def test_rl_trainer_configs(name, tmp_path):
    stem = Path(name).stem
    extra = ["trainer.accelerator=cpu", "trainer.devices=2"] if stem == "rl_ddp" else []
    cfg = compose_config("train", [*RL_QUIET, f"trainer={stem}", *extra], output_dir=tmp_path)
    trainer = build(cfg, "trainer", callbacks=[build(cfg, "checkpoint")], logger=False, max_epochs=3)
    assert trainer.max_epochs == 3 and trainer.max_steps == -1 and trainer.limit_val_batches == 0
    if stem == "rl_ddp":
        assert trainer.num_devices == 2 and trainer.strategy._ddp_kwargs.get("find_unused_parameters") is True


# the edm_* presets are shared with the evaluator, which has no discriminator group: the RL loop takes
# discriminator=cnn on the command line (README, "Reproducing the published tables"; more in tests/test_edm.py)
EXPERIMENT_SETUP = {n: ["discriminator=cnn"] for n in group("experiment") if n.startswith("edm_")}


@pytest.mark.parametrize("name", cover(*[f"experiment/{n}.yaml" for n in group("experiment")]))
def test_experiment_configs(name, tmp_path):
    from diffusion_irl.train import check_train_config

    stem = Path(name).stem
    cfg = compose_config("train", ["logger=none", *EXPERIMENT_SETUP.get(stem, []), f"experiment={stem}"],
                         output_dir=tmp_path)
    check_train_config(cfg)
    mdp, policy = build(cfg, "mdp"), build(cfg, "policy")
    mdp.setup_policy(policy, tuple(cfg.data.shape))
    assert mdp.planned_nfe() <= cfg.mdp.nfe
    build(cfg, "reward"), build(cfg, "algo")
    assert build(cfg, "discriminator").shape == tuple(cfg.data.shape)


@pytest.mark.parametrize("name, overrides", [
    ("denoiser/cached_mlp.yaml", ["data=gmm8", "denoiser.module.net.hidden=32", "denoiser.module.net.depth=1",
                                  "denoiser.module.net.emb_dim=16", "denoiser.max_steps=5"]),
    ("denoiser/cached_unet.yaml", ["data=digits", "denoiser.module.net.base_channels=8",
                                   "denoiser.module.net.emb_dim=16", "denoiser.max_steps=2"]),
])
def test_cached_denoiser_configs(name, overrides, tmp_path, one_thread):
    from diffusion_irl.denoisers import EDMPrecond

    cover(name)
    stem = Path(name).stem
    args = ["logger=none", f"denoiser={stem}", f"denoiser.cache_dir={tmp_path / 'cache'}", "+denoiser.progress=false",
            *overrides]
    cfg = compose_config("train", args, output_dir=tmp_path)
    D = build(cfg, "denoiser")  # pretrains for max_steps and caches
    cached = list((tmp_path / "cache").glob("denoiser_*.ckpt"))
    assert len(cached) == 1 and isinstance(D, EDMPrecond) and D.shape == tuple(cfg.data.shape)
    assert D.num_classes == cfg.data.num_classes
    build(cfg, "denoiser")  # the second use loads the cache
    assert list((tmp_path / "cache").glob("denoiser_*.ckpt")) == cached
    if stem == "cached_unet":  # the evaluator's classifier reserve does not change the denoiser: the same cache
        build(compose_config("train", [*args, "data=shapes", "data.resolution=8"], output_dir=tmp_path), "denoiser")
        shapes = set((tmp_path / "cache").glob("denoiser_*.ckpt")) - set(cached)
        build(compose_config("train", [*args, "data=shapes", "data.resolution=8", "data.classifier_reserve=100"],
                             output_dir=tmp_path), "denoiser")
        assert len(shapes) == 1 and set((tmp_path / "cache").glob("denoiser_*.ckpt")) == set(cached) | shapes
    x = torch.randn(2, *D.shape)
    assert D(x, torch.tensor([0.5, 2.0])).shape == x.shape


cover("denoiser/cached_mlp.yaml", "denoiser/cached_unet.yaml")
# ---- end: the RL loop -----------------------------------------------------------------------------------------------


# ---- begin: SLURM multi-node DDP launcher of the RL loop (hydra/launcher/slurm_ddp.yaml; more in tests/test_slurm.py)
@pytest.mark.parametrize("name", cover("hydra/launcher/slurm_ddp.yaml"))
def test_slurm_ddp_launcher_composes(name):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the `slurm` extra")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hydra/launcher=slurm_ddp", "trainer=rl_ddp", "trainer.devices=4",
                                                      "trainer.num_nodes=2"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
# ---- end: SLURM multi-node DDP launcher ---------------------------------------------------------------------------


# ---- begin: the CPU-only SLURM layout (trainer/rl_ddp_cpu.yaml, hydra/launcher/slurm_ddp_cpu.yaml; run on a real
# one-node cluster in tests/test_slurm_cluster.py)
@pytest.mark.parametrize("name", cover("trainer/rl_ddp_cpu.yaml"))
def test_rl_ddp_cpu_trainer_config(name, tmp_path):
    cfg = compose_config("train", [*RL_QUIET, "trainer=rl_ddp_cpu"], output_dir=tmp_path)
    trainer = build(cfg, "trainer", callbacks=[build(cfg, "checkpoint")], logger=False, max_epochs=3)
    assert trainer.num_devices == 2 and type(trainer.accelerator).__name__ == "CPUAccelerator"
    assert trainer.strategy._ddp_kwargs.get("find_unused_parameters") is True   # as trainer=rl_ddp
    assert trainer.strategy._get_process_group_backend() == "gloo"


@pytest.mark.parametrize("name", cover("hydra/launcher/slurm_ddp_cpu.yaml"))
def test_slurm_ddp_cpu_launcher_composes(name):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the `slurm` extra")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    def launcher(*overrides):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides), return_hydra_config=True).hydra.launcher

    cpu = launcher("hydra/launcher=slurm_ddp_cpu", "trainer=rl_ddp_cpu")
    assert (cpu.nodes, cpu.tasks_per_node, cpu.gpus_per_node, cpu.cpus_per_task, cpu.mem_gb) == (1, 2, 0, 1, 4)
    params = instantiate(cpu).params            # what submitit submits with
    assert (params["tasks_per_node"], params["gpus_per_node"], params["mem_gb"]) == (2, 0, 4)
    assert launcher("hydra/launcher=slurm_ddp_cpu", "trainer=rl_ddp_cpu", "trainer.devices=3",
                    "hydra.launcher.mem_gb=2").mem_gb == 2
    # the GPU launchers ask for no memory unless told: a small cluster does not refuse the job
    assert launcher("hydra/launcher=slurm").mem_gb is None
    assert launcher("hydra/launcher=slurm_ddp", "trainer=rl_ddp", "trainer.devices=2").mem_gb is None
# ---- end: the CPU-only SLURM layout ---------------------------------------------------------------------------------


# --- the nodes that mirror the object graph --------------------------------------------------------------------------

@pytest.mark.parametrize("name", cover("system/default.yaml", "policy/shared/knob.yaml"))
def test_system_node_builds_the_loop(name, tmp_path):
    from diffusion_irl.system import SamplerPolicyModule
    from diffusion_irl.train import build_parts, build_system

    cfg = compose_config("train", [*RL_QUIET, "denoiser=analytic", "data.n_train=64", "data.n_heldout=32"],
                         output_dir=tmp_path)
    assert cfg.policy.hidden == 64 and cfg.policy.conditioning == "step"  # from policy/shared/knob.yaml
    module = build_system(cfg, build_parts(cfg), evaluate=None)
    assert isinstance(module, SamplerPolicyModule)
    assert (module.rollout_batch, module.disc_steps, module.disc_batch) == (cfg.system.rollout_batch,
                                                                            cfg.system.disc_steps, cfg.system.disc_batch)
    assert module.seed == cfg.seed


@pytest.mark.parametrize("name", cover("checkpoint/steps.yaml", "checkpoint/iterations.yaml"))
def test_checkpoint_configs(name, tmp_path):
    stem = Path(name).stem
    primary = "train" if stem == "iterations" else "pretrain"
    cfg = compose_config(primary, [f"checkpoint={stem}"], output_dir=tmp_path)
    callback = build(cfg, "checkpoint")
    assert callback.dirpath == str(tmp_path / "checkpoints") and callback.save_last
    if stem == "iterations":
        assert callback._every_n_epochs == 20 and callback._save_on_train_epoch_end is True


SCHEDULE_USERS = {  # a sampler whose config takes the schedule, and the class; time_uniform is only selectable
    "karras": ("euler", "KarrasSchedule"), "discrete_vp": ("ddpm", "DiscreteVPSchedule"),
    "logsnr_uniform": ("dpmpp_3m", "LogSNRUniformSchedule"), "time_uniform": (None, "TimeUniformSchedule"),
}


@pytest.mark.parametrize("name", cover(*[f"schedule/{n}.yaml" for n in SCHEDULE_USERS]))
def test_schedule_configs(name, tmp_path):
    stem = Path(name).stem
    user, cls = SCHEDULE_USERS[stem]
    overrides = [] if user else [f"schedule@samplers.euler.schedule={stem}"]  # select it for a sampler
    user = user or "euler"
    cfg = compose_config("evaluate", overrides, output_dir=tmp_path)
    schedule = build(cfg, f"samplers.{user}.schedule")   # the samplers' schedules come from the schedule group
    sigmas = schedule(8)
    assert sigmas.shape == (9,) and float(sigmas[-1]) == 0 and bool((sigmas[:-1] > sigmas[1:]).all())
    assert cfg.samplers[user].schedule._target_.endswith(cls) and type(schedule).__name__ == cls


@pytest.mark.parametrize("name", cover("samplers/training_free.yaml"))
def test_one_list_of_training_free_samplers(name, tmp_path):
    train_cfg = compose_config("train", output_dir=tmp_path)
    eval_cfg = compose_config("evaluate", output_dir=tmp_path)
    names = ["ddpm", "ddim", "euler", "euler_ancestral", "heun", "edm_sde", "restart", "dpmpp_2m", "ipndm", "dpmpp_3m",
             "unipc"]
    assert list(train_cfg.compare.samplers) == list(eval_cfg.evaluate.samplers) == names
    assert list(train_cfg.samplers) == names


@pytest.mark.parametrize("name", cover("debug/smoke.yaml"))
def test_debug_smoke(name, tmp_path):
    cfg = compose_config("train", ["debug=smoke"], output_dir=tmp_path)
    assert cfg.denoiser._target_.endswith("analytic_denoiser") and cfg.train.iterations == 2
    assert cfg.compare.enabled is False and not cfg.get("logger")


def test_group_files_state_the_values_a_run_uses(tmp_path):
    """No primary config silently overrides a group file's value (a reader of conf/reward/kl.yaml is not misled)."""
    from omegaconf import OmegaConf

    cfg = compose_config("train", output_dir=tmp_path)
    for group_name, option in (("reward", "kl"), ("discriminator", "mlp"), ("algo", "ppo"), ("system", "default")):
        stated = OmegaConf.load(CONF / group_name / f"{option}.yaml")
        for key in stated:
            if key == "defaults" or OmegaConf.is_interpolation(stated, key) or isinstance(stated[key], DictConfig):
                continue
            assert cfg[group_name][key] == stated[key], (group_name, key)


# ---- begin: schedule tuners (tune.py, tuning/grid.py, gits.py, ld3.py, pathwise.py: tune.yaml, tuner/, schedule/sigmas.yaml) ---
@pytest.mark.parametrize("name", cover("tune.yaml", "tuner/grid.yaml", "tuner/gits.yaml", "tuner/ld3.yaml",
                                           "tuner/pathwise.yaml"))
def test_tuner_configs(name, tmp_path):
    from diffusion_irl.sampling.samplers import Euler
    from diffusion_irl.tuning.tuners import Tuner

    stem = "grid" if name == "tune.yaml" else Path(name).stem
    cfg = compose_config("tune", [f"tuner={stem}"], output_dir=tmp_path)
    assert cfg.nfe == 6 and cfg.sampler._target_.endswith("Euler") and cfg.denoiser._target_.endswith("analytic_denoiser")
    tuner = build(cfg, "tuner")
    assert isinstance(tuner, Tuner) and tuner.name == stem
    assert tuner.check(build(cfg, "sampler"), cfg.nfe) == 6 and isinstance(build(cfg, "sampler"), Euler)
    if stem == "grid":
        assert len(tuner.points()) == 125


@pytest.mark.parametrize("name", cover("baselines.yaml", "tuners/all.yaml", "tuners/divergences.yaml",
                                       "tuners/correction.yaml", "tuners/kernel.yaml"))
def test_baselines_and_tuners_configs(name, tmp_path):
    """baselines.yaml composes the shared tuner list (tuners/all.yaml); train.yaml's comparison names it too."""
    from diffusion_irl.tuning.tuners import Tuner

    cfg = compose_config("baselines", output_dir=tmp_path)
    assert list(cfg.baselines.tuners) == ["grid", "gits", "ld3", "pathwise"]
    assert list(cfg.baselines.solvers) == ["euler", "ipndm"]
    for tuner in cfg.baselines.tuners:
        assert isinstance(build(cfg, f"tuners.{tuner}"), Tuner)
    for sampler in [*cfg.baselines.solvers, *cfg.baselines.training_free]:
        build(cfg, f"samplers.{sampler}")
    divergences = compose_config("baselines", ["tuners=divergences"], output_dir=tmp_path)
    variants = {name: build(divergences, f"tuners.{name}") for name in divergences.baselines.tuners}
    assert [v.reward.divergence for k, v in variants.items() if k.startswith("pw_")] == [
        "reverse_kl", "kl", "chi2", "pr", "pr"]
    assert variants["pw_pr0_25"].reward.lam == 0.25 and variants["pathwise"].reward.divergence == "js"
    correction = compose_config("baselines", ["tuners=correction"], output_dir=tmp_path)
    assert list(correction.baselines.tuners) == ["grid", "gits", "ld3", "pathwise", "pw_adv", "pw_ot", "pw_reg",
                                                 "pw_warm", "pw_mmd"]
    adv, ot, reg, warm, kernel = (build(correction, f"tuners.{name}")
                                  for name in ("pw_adv", "pw_ot", "pw_reg", "pw_warm", "pw_mmd"))
    assert adv.correction and adv.loss == "adversarial" and ot.correction and ot.loss == "ot" and ot.ot_mass == 0.9
    assert reg.iterations == 0 and reg.correction_warmup == 2000 and reg.correction_scaling == "edm"
    assert warm.loss == "ot" and warm.correction_warmup == 1900 and (warm.correction_warmup_lr, warm.correction_lr) == (
        3e-3, 3e-4)
    assert kernel.loss == "mmd" and kernel.mmd_bandwidths == [0.2, 0.6, 2.0] and kernel.select_samples == 5000
    assert kernel.correction and kernel.select_train == 10000
    schedule_only = compose_config("baselines", ["tuners=kernel"], output_dir=tmp_path)
    assert list(schedule_only.baselines.tuners) == ["grid", "gits", "ld3", "pathwise", "mmd"]
    mmd = build(schedule_only, "tuners.mmd")
    assert mmd.loss == "mmd" and not mmd.correction and (mmd.select_samples, mmd.select_train) == (5000, 10000)
    train = compose_config("train", output_dir=tmp_path)
    assert list(train.compare.tuners) == ["grid", "gits", "ld3", "pathwise"]
    assert sorted(train.tuners) == ["gits", "grid", "ld3", "pathwise"]


@pytest.mark.parametrize("name", cover("schedule/sigmas.yaml"))
def test_sigmas_schedule_config(name, tmp_path):
    from diffusion_irl.sampling.schedules import SigmaSchedule, write_sigmas

    path = tmp_path / "schedule.json"
    write_sigmas(torch.tensor([10.0, 3.0, 1.0, 0.3, 0.0], dtype=torch.float64), path)
    cfg = compose_config("evaluate", ["+sampler@samplers.euler_tuned=euler", "schedule@samplers.euler_tuned.schedule=sigmas",
                                      f"samplers.euler_tuned.schedule.path={path}"], output_dir=tmp_path)
    sampler = build(cfg, "samplers.euler_tuned")
    assert isinstance(sampler.schedule, SigmaSchedule) and sampler.sigmas(4).tolist() == [10.0, 3.0, 1.0, 0.3, 0.0]
    assert "euler_tuned" in cfg.evaluate.samplers and build(cfg, "samplers.euler").schedule.sigma_max == 80.0
    cfg = compose_config("evaluate", ["+sampler@samplers.euler_tuned=euler", "schedule@samplers.euler_tuned.schedule=sigmas",
                                      "samplers.euler_tuned.schedule.sigmas=[5.0,1.0,0.1]"], output_dir=tmp_path)
    assert build(cfg, "samplers.euler_tuned").sigmas(3).tolist() == [5.0, 1.0, 0.1, 0.0]
    with pytest.raises(ConfigError, match="exactly one of sigmas"):
        build(compose_config("evaluate", ["+sampler@samplers.euler_tuned=euler",
                                          "schedule@samplers.euler_tuned.schedule=sigmas"], output_dir=tmp_path),
              "samplers.euler_tuned")
# ---- end: schedule tuners ------------------------------------------------------------------------------------------
