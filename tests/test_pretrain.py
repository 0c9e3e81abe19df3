"""Pretraining end to end on CPU: the Hydra entry point, its checkpoints, and that the EDM loss falls."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import open_dict

from diffusion_irl.config import ConfigError
from diffusion_irl.denoisers import EDMPrecond, VPEpsDenoiser, load_denoiser
from diffusion_irl.pretrain import pretrain

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
QUIET = ["logger=none", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
SMALL_MLP = ["denoiser.net.hidden=64", "denoiser.net.depth=2", "denoiser.net.emb_dim=32"]
SMALL_GMM8 = ["data=gmm8", "data.n_train=4096", "data.n_heldout=1024"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: conftest.one_thread


def compose_pretrain(out_dir: Path, overrides: list[str]):
    """Compose conf/pretrain.yaml as the entry point would, with ``out_dir`` as the Hydra run directory."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("pretrain", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture
def run_pretrain(tmp_path):
    def run(overrides: list[str], name: str = "run") -> tuple[float, Path]:
        out = tmp_path / name
        loss = pretrain(compose_pretrain(out, overrides + QUIET))
        return loss, out / "checkpoints" / "last.ckpt"

    yield run
    HydraConfig.instance().cfg = None


def test_cli_smoke_gmm8(tmp_path):
    """`python -m diffusion_irl.pretrain` through the real @hydra.main, in a subprocess."""
    cmd = [sys.executable, "-m", "diffusion_irl.pretrain", *SMALL_GMM8, *SMALL_MLP, "trainer.max_steps=20", *QUIET,
           f"hydra.run.dir={tmp_path}"]
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and f"checkpoint: {ckpt}" in res.stdout and "held-out loss" in res.stdout
    D = load_denoiser(ckpt)
    assert isinstance(D, EDMPrecond) and D.shape == (2,)
    x = torch.randn(16, 2)
    out = D(x, torch.rand(16) * 10 + 0.01)
    assert out.shape == (16, 2) and torch.isfinite(out).all()
    assert torch.load(ckpt, weights_only=True)["global_step"] == 20


def test_digits_unet_run_and_checkpoint(run_pretrain, tmp_path):
    overrides = ["data=digits", "denoiser=unet", "denoiser.net.base_channels=8", "denoiser.net.emb_dim=16",
                 "trainer.max_steps=15"]
    loss, ckpt = run_pretrain(overrides)
    assert ckpt.is_file() and torch.isfinite(torch.tensor(loss))
    D = load_denoiser(ckpt)
    assert D.shape == (1, 8, 8) and D.num_classes == 10
    x = torch.randn(4, 1, 8, 8)
    assert D(x, 1.0).shape == (4, 1, 8, 8)  # no labels: the null class
    assert D(x, 1.0, class_labels=torch.tensor([0, 1, 2, 10])).shape == (4, 1, 8, 8)

    # the checkpoint is the `denoiser=checkpoint` config's input; pretrain itself refuses a non-trainable denoiser
    with pytest.raises(ConfigError, match="not one"):
        run_pretrain(["data=digits", "denoiser=checkpoint", f"denoiser.path={ckpt}"], name="refused")


def test_gmm8_edm_loss_falls(run_pretrain):
    """300 Adam steps take the held-out EDM loss from ~1.0 (F = 0 gives 1 when sigma_data is the data's std) most of
    the way to the exact denoiser's 0.666 (measured: 1.01 -> 0.81)."""
    overrides = [*SMALL_GMM8, *SMALL_MLP, "trainer.max_steps=300"]
    cfg = compose_pretrain(Path("unused"), overrides + QUIET)
    L.seed_everything(cfg.seed)
    dm, module = instantiate(cfg.data), instantiate(cfg.denoiser)  # the same seed gives pretrain's initial weights
    before = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).validate(
        module, dm, verbose=False)[0]["val/loss"]
    after, _ = run_pretrain(overrides)
    assert 0.9 < before < 1.2
    assert after < 0.9 and after < before - 0.1


@pytest.mark.parametrize("overrides", [
    ["data=gmm8", "denoiser=mlp"], ["data=digits", "denoiser=unet"], ["data=cifar10", "denoiser=unet"],
    ["data=digits", "denoiser=unet", "data.num_classes=0"], ["trainer=ddp"],
])
def test_denoiser_configs_instantiate(tmp_path, overrides):
    cfg = compose_pretrain(tmp_path, overrides)
    try:
        module = instantiate(cfg.denoiser)
        assert list(module.shape) == list(cfg.data.shape)
        assert module.num_classes == cfg.data.num_classes and module.sigma_data == cfg.data.sigma_data
        assert module.hparams["net"]["_target_"] == cfg.denoiser.net._target_
        assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    finally:
        HydraConfig.instance().cfg = None


def test_diffusers_config_instantiates(tmp_path):
    from diffusers import DDPMScheduler, UNet2DModel

    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                norm_num_groups=4).save_pretrained(tmp_path / "m")
    DDPMScheduler().save_pretrained(tmp_path / "m")
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("pretrain", overrides=["data=digits", "denoiser=diffusers", f"denoiser.path={tmp_path / 'm'}"])
    D = instantiate(cfg.denoiser)
    assert isinstance(D, VPEpsDenoiser) and D.shape == (1, 8, 8) and D.num_timesteps == 1000


@pytest.mark.timeout(300)
def test_wandb_offline_logger(run_pretrain, tmp_path, monkeypatch):
    """The default logger writes an offline W&B run under the Hydra run directory (no network)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    cfg = compose_pretrain(out, [*SMALL_GMM8, *SMALL_MLP, "trainer.max_steps=3", "logger=wandb",
                                 "trainer.enable_progress_bar=false"])
    try:
        pretrain(cfg)
    finally:
        import wandb

        wandb.finish()
    assert cfg.logger.mode == "offline"
    assert any((out / "wandb").glob("offline-run-*"))
