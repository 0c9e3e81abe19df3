"""Denoisers: EDM preconditioning, raw networks, DenoiserModule (EMA, checkpoints), VP/epsilon adapters."""
from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from diffusion_irl.denoisers import (
    MLP, DenoiserModule, EDMPrecond, UNet, VPEpsDenoiser, edm_coefficients, edm_loss_weight, load_denoiser,
    load_diffusers_denoiser,
)


class ZeroNet(nn.Module):
    """F = 0; records what it was called with."""

    def forward(self, x_in, c_noise, class_labels=None):
        self.seen = (x_in, c_noise, class_labels)
        return torch.zeros_like(x_in)


# -- EDM preconditioning ------------------------------------------------------------------------------------------
def test_edm_coefficients_match_the_formulas():
    sd = 0.7
    s = torch.tensor([0.002, 0.1, 0.7, 3.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm_coefficients(s, sd)
    for i, si in enumerate(s.tolist()):
        assert c_skip[i].item() == pytest.approx(sd**2 / (si**2 + sd**2), rel=1e-12)
        assert c_out[i].item() == pytest.approx(si * sd / math.sqrt(si**2 + sd**2), rel=1e-12)
        assert c_in[i].item() == pytest.approx(1 / math.sqrt(si**2 + sd**2), rel=1e-12)
        assert c_noise[i].item() == pytest.approx(math.log(si) / 4, rel=1e-12)
    torch.testing.assert_close(edm_loss_weight(s, sd), 1 / c_out**2)
    # sigma = sd: the skip and the network share the signal equally
    c_skip, c_out, c_in, _ = edm_coefficients(torch.tensor(sd), sd)
    assert c_skip.item() == pytest.approx(0.5) and c_in.item() == pytest.approx(1 / (sd * math.sqrt(2)))


@pytest.mark.parametrize("sigma", [0.5, torch.tensor(2.0), torch.tensor([0.01, 0.5, 3.0, 80.0])])
def test_zero_network_gives_c_skip_x(sigma):
    net, sd = ZeroNet(), 0.5
    D = EDMPrecond(net, sd, (2,))
    x = torch.randn(4, 2)
    s = torch.as_tensor(sigma, dtype=torch.float32).expand(4)
    c_skip, _, c_in, c_noise = edm_coefficients(s, sd)
    torch.testing.assert_close(D(x, sigma), c_skip[:, None] * x)
    x_in, c_noise_seen, labels = net.seen
    torch.testing.assert_close(x_in, c_in[:, None] * x)
    torch.testing.assert_close(c_noise_seen, c_noise)
    assert c_noise_seen.shape == (4,) and labels is None


def test_precond_keeps_dtype_and_checks_shape():
    D = EDMPrecond(MLP(2, hidden=16, depth=1, emb_dim=8), 1.0, (2,))
    x = torch.randn(3, 2, dtype=torch.float64)
    assert D(x, 1.0).dtype == torch.float64
    with pytest.raises(ValueError, match="shape"):
        D(torch.randn(3, 3), 1.0)
    with pytest.raises(ValueError, match="sigma"):
        D(torch.randn(3, 2), torch.ones(2))


# -- networks -----------------------------------------------------------------------------------------------------
def test_mlp_shapes_and_labels():
    net = MLP(2, hidden=32, depth=2, emb_dim=16)
    assert net(torch.randn(5, 2), torch.randn(5)).shape == (5, 2)
    cond = MLP([2], hidden=32, depth=2, emb_dim=16, num_classes=3)
    x, c = torch.randn(4, 2), torch.zeros(4)
    out = {k: cond(x, c, torch.full((4,), k)) for k in range(4)}  # 3 = null class
    torch.testing.assert_close(cond(x, c), out[3])  # None -> null class
    assert not torch.allclose(out[0], out[1])
    with pytest.raises(ValueError, match="0..3"):
        cond(x, c, torch.full((4,), 4))
    with pytest.raises(ValueError, match="unconditional"):
        net(x, c, torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("channels,size,mults", [
    (1, 8, (1, 2)), (1, 28, (1, 2)), (3, 32, (1, 2)),
    (1, 8, (1, 2, 2)), (1, 28, (1, 2, 2, 2)), (3, 32, (1, 2, 2, 2)),  # 28 -> padded to 32 for three downsamplings
])
def test_unet_shapes(channels, size, mults):
    net = UNet(channels, base_channels=8, channel_mults=mults, emb_dim=16, num_classes=10)
    x = torch.randn(2, channels, size, size)
    out = net(x, torch.randn(2), torch.tensor([3, 10]))
    assert out.shape == x.shape
    D = EDMPrecond(net, 0.5, (channels, size, size))
    assert D(x, torch.tensor([0.1, 10.0])).shape == x.shape


def test_unet_label_conditioning():
    torch.manual_seed(0)
    net = UNet(1, base_channels=8, emb_dim=16, num_classes=2)
    for name, p in net.named_parameters():  # the output conv and each block's last conv are zero at init
        if "conv_out" in name or "conv2" in name:
            nn.init.normal_(p, std=0.1)
    x, c = torch.randn(2, 1, 8, 8), torch.zeros(2)
    a, b = net(x, c, torch.tensor([0, 0])), net(x, c, torch.tensor([1, 1]))
    assert not torch.allclose(a, b)
    torch.testing.assert_close(net(x, c), net(x, c, torch.tensor([2, 2])))


# -- DenoiserModule -----------------------------------------------------------------------------------------------
MLP_CFG = {"_target_": "diffusion_irl.denoisers.networks.MLP", "dim": 2, "hidden": 16, "depth": 1, "emb_dim": 8}


def test_ema_update_ramps_up_then_decays():
    module = DenoiserModule(MLP_CFG, shape=[2], sigma_data=1.0, ema_decay=0.5)
    p_net, p_ema = next(module.net.parameters()), next(module.ema.parameters())
    torch.testing.assert_close(p_net, p_ema)
    assert not p_ema.requires_grad
    start = p_ema.detach().clone()
    with torch.no_grad():
        p_net.add_(1.0)
    module.update_ema()  # n = 0: decay = min(0.5, 1/10) = 0.1
    torch.testing.assert_close(p_ema, start + 0.9)
    module.update_ema()  # n = 1: decay = min(0.5, 2/11)
    torch.testing.assert_close(p_ema, start + 0.9 + (1 - 2 / 11) * 0.1)
    for _ in range(20):
        module.update_ema()
    assert int(module.ema_updates) == 22
    with torch.no_grad():
        p_net.add_(1.0)
    before = p_ema.detach().clone()
    module.update_ema()  # decay capped at 0.5
    torch.testing.assert_close(p_ema, 0.5 * before + 0.5 * p_net)


def test_module_loss_denoiser_and_label_dropout():
    torch.manual_seed(0)
    net_cfg = dict(MLP_CFG, num_classes=3)
    module = DenoiserModule(net_cfg, shape=[2], sigma_data=1.0, label_dropout=1.0)
    assert module.num_classes == 3 and module.hparams["net"]["num_classes"] == 3
    seen = []
    module.net.register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs["class_labels"]),
                                     with_kwargs=True)
    loss = module.edm_loss(module.net, torch.randn(8, 2), torch.zeros(8, dtype=torch.long), label_dropout=1.0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert (seen[-1] == 3).all()  # every label dropped to the null class
    D = module.denoiser()
    assert isinstance(D, EDMPrecond) and not D.training
    assert all(not p.requires_grad for p in D.parameters())
    assert D(torch.randn(5, 2), 0.3).shape == (5, 2) and D.num_classes == 3


def test_module_accepts_an_instance_with_config():
    module = DenoiserModule(MLP(2, hidden=16, depth=1, emb_dim=8), shape=(2,), sigma_data=1.0)
    assert module.hparams["net"]["_target_"].endswith("networks.MLP")


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(256, 2) * 2
    loader = DataLoader(TensorDataset(x, torch.zeros(256, dtype=torch.long)), batch_size=64)
    module = DenoiserModule(MLP_CFG, shape=[2], sigma_data=2.0,
                            optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.01})
    trainer = L.Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    assert int(module.ema_updates) == 6
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    xs, s = torch.randn(7, 2), torch.rand(7) * 5 + 0.01
    for ema in (True, False):
        D = load_denoiser(path, ema=ema)
        assert isinstance(D, EDMPrecond) and D.shape == (2,) and D.sigma_data == 2.0
        torch.testing.assert_close(D(xs, s), module.denoiser(ema=ema)(xs, s))
    assert not torch.allclose(load_denoiser(path)(xs, s), load_denoiser(path, ema=False)(xs, s))


def test_load_denoiser_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="denoiser.path"):
        load_denoiser(tmp_path / "nope.ckpt")


# -- VP / epsilon adapter -----------------------------------------------------------------------------------------
def _linear_abar(T=1000, b0=1e-4, b1=0.02):
    return torch.cumprod(1 - torch.linspace(b0, b1, T, dtype=torch.float64), 0)


class LinearEps(nn.Module):
    """eps(x_vp, t) = a x_vp + t / 1000; records its inputs."""

    def forward(self, x_vp, t, class_labels=None):
        self.seen = (x_vp, t, class_labels)
        return 0.3 * x_vp + (t / 1000).view(-1, *([1] * (x_vp.ndim - 1)))


def test_vp_sigma_table_and_timesteps():
    abar = _linear_abar()
    D = VPEpsDenoiser(LinearEps(), abar, (2,))
    sig = ((1 - abar) / abar).sqrt()
    torch.testing.assert_close(D.sigmas, sig)
    assert (D.sigmas[1:] > D.sigmas[:-1]).all()
    assert D.sigma_min == pytest.approx(sig[0].item()) and D.sigma_max == pytest.approx(sig[-1].item())
    ks = torch.tensor([0, 1, 17, 500, 998, 999])
    for table in (sig, sig.float()):  # exact integers in float64 and after float32 rounding
        t = D.sigma_to_t(table[ks])
        assert torch.equal(t, ks.to(t.dtype))
    torch.testing.assert_close(D.t_to_sigma(ks.double()), sig[ks])
    # continuous in between: log-linear, and t_to_sigma inverts sigma_to_t
    mid = (sig[10].log() * 0.75 + sig[11].log() * 0.25).exp()
    assert D.sigma_to_t(mid).item() == pytest.approx(10.25, abs=1e-9)
    s = torch.logspace(math.log10(sig[0].item()), math.log10(sig[-1].item()), 50, dtype=torch.float64)
    torch.testing.assert_close(D.t_to_sigma(D.sigma_to_t(s)), s)
    assert D.sigma_to_t(torch.tensor([1e-6, 1e6])).tolist() == [0.0, 999.0]  # clamped


def test_vp_denoiser_change_of_variables():
    model = LinearEps()
    D = VPEpsDenoiser(model, _linear_abar(), (2,))
    x = torch.randn(4, 2)
    s = torch.tensor([0.05, 0.5, 5.0, 50.0])
    x_vp = x / (1 + s[:, None] ** 2).sqrt()
    t = D.sigma_to_t(s).float()
    torch.testing.assert_close(D(x, s), x - s[:, None] * (0.3 * x_vp + t[:, None] / 1000))
    torch.testing.assert_close(model.seen[0], x_vp)
    D(x, 0.5, class_labels=torch.ones(4, dtype=torch.long))
    assert model.seen[2] is not None


# -- diffusers -------------------------------------------------------------------------------------------------------
def _tiny_unet(num_class_embeds=None):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=num_class_embeds)


@pytest.mark.parametrize("layout", ["model_dir", "pipeline_dir"])
def test_diffusers_unet_round_trip(tmp_path, layout):
    from diffusers import DDPMPipeline, DDPMScheduler

    unet = _tiny_unet().eval()
    scheduler = DDPMScheduler(num_train_timesteps=200, beta_schedule="squaredcos_cap_v2")
    if layout == "model_dir":
        unet.save_pretrained(tmp_path)
        scheduler.save_pretrained(tmp_path)
    else:
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path)
    D = load_diffusers_denoiser(str(tmp_path))
    assert D.shape == (1, 8, 8) and D.num_timesteps == 200 and not D.training
    torch.testing.assert_close(D.alphas_cumprod, scheduler.alphas_cumprod.double())
    ks = torch.tensor([0, 57, 199])
    s = D.sigmas[ks].float()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        ref = x - s.view(-1, 1, 1, 1) * unet(x / (1 + s.view(-1, 1, 1, 1) ** 2).sqrt(), ks).sample
        torch.testing.assert_close(D(x, s), ref, rtol=0, atol=0)


def test_diffusers_defaults_labels_and_errors(tmp_path):
    from diffusers import DDPMScheduler

    unet = _tiny_unet(num_class_embeds=3).eval()
    unet.save_pretrained(tmp_path / "m")  # no scheduler config: the given betas are used
    D = load_diffusers_denoiser(str(tmp_path / "m"), num_train_timesteps=100, beta_end=0.03)
    torch.testing.assert_close(
        D.alphas_cumprod, DDPMScheduler(num_train_timesteps=100, beta_end=0.03).alphas_cumprod.double())
    assert D.num_classes == 3
    x, labels = torch.randn(2, 1, 8, 8), torch.tensor([0, 2])
    s = D.sigmas[torch.tensor([5, 80])].float()
    with torch.no_grad():
        eps = unet(x / (1 + s.view(-1, 1, 1, 1) ** 2).sqrt(), torch.tensor([5, 80]), class_labels=labels).sample
        torch.testing.assert_close(D(x, s, labels), x - s.view(-1, 1, 1, 1) * eps, rtol=0, atol=0)

    DDPMScheduler(prediction_type="v_prediction").save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="epsilon"):
        load_diffusers_denoiser(str(tmp_path / "m"))
    with pytest.raises(ValueError, match="denoiser.path"):
        load_diffusers_denoiser(str(tmp_path / "missing"))
