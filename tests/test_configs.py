"""Every file in conf/ is composed and instantiated here (a new file without a case fails the last test)."""
from pathlib import Path

import pytest
import torch

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


@pytest.mark.parametrize("name", cover("denoiser/checkpoint.yaml", "denoiser/diffusers.yaml"))
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
