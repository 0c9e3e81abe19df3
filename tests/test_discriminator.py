"""The discriminator: it learns the exact log-ratio of two known noisy mixtures, its loss is balanced per step, R1
and spectral norm do what they say, and the training entry point runs end to end and checkpoints."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffusion_irl.config import ConfigError
from diffusion_irl.data.toy2d import GaussianMixture, gmm8
from diffusion_irl.discriminator import (CNNDiscriminator, DiscriminatorModule, MLPDiscriminator, discriminator_loss,
                                         forward_noise, load_discriminator)
from diffusion_irl.train_discriminator import train_discriminator

from .helpers import compose_config


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: conftest.one_thread


def reweighted_gmm8() -> GaussianMixture:
    """gmm8 with weights 4:1 alternating: log-ratio to gmm8 of log 1.6 and log 0.4 at sigma 0."""
    b = gmm8()
    return GaussianMixture(b.means, b.stds, torch.tensor([4.0, 1.0] * 4))


def test_recovers_the_exact_log_ratio():
    """Trained on A = reweighted gmm8 (real) vs B = gmm8 (fake) at sigma in {0, 1, 5}, the logit approaches
    ``log q_A,sigma - log q_B,sigma``. Measured (1000 Adam steps, ~6 s): mean absolute error over samples of both laws
    0.035 / 0.043 / 0.013 at sigma 0 / 1 / 5 (0.030 overall), against a spread (mean |true - its mean|) of 0.63 at
    sigma 0 and 0.45 at sigma 1; at sigma 5 the true ratio is nearly constant (spread 0.006)."""
    torch.manual_seed(0)
    a, b = reweighted_gmm8(), gmm8()
    levels = torch.tensor([0.0, 1.0, 5.0])
    net = MLPDiscriminator([2], hidden=64, depth=2, emb_dim=32, sigma_data=2.84)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    steps, n = 1000, 256
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        k = torch.arange(3).repeat_interleave(n)
        s = levels[k]
        loss, _ = discriminator_loss(net, forward_noise(a.sample(3 * n), s), forward_noise(b.sample(3 * n), s), s, s,
                                     k, k, num_steps=3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    g = torch.Generator().manual_seed(1)
    errors = []
    for sigma in levels.tolist():
        x = torch.cat([forward_noise(a.sample(2000, g), sigma, g), forward_noise(b.sample(2000, g), sigma, g)])
        true = a.log_prob(x.double(), sigma) - b.log_prob(x.double(), sigma)
        with torch.no_grad():
            err = (net(x, sigma).double() - true).abs().mean().item()
        spread = (true - true.mean()).abs().mean().item()
        print(f"sigma {sigma}: log-ratio MAE {err:.4f} (spread of the true log-ratio {spread:.4f})")
        errors.append(err)
        if sigma < 2:
            assert err < 0.25 * spread
    print(f"log-ratio MAE over all levels: {sum(errors) / 3:.4f}")
    assert sum(errors) / 3 < 0.1


class FirstCoordinate(nn.Module):
    """logit = x[:, 0] (no parameters): a hand-checkable discriminator."""

    def forward(self, x, sigma):
        return x[:, 0]


def test_balanced_per_step_loss_ignores_duplicates():
    torch.manual_seed(0)
    net = MLPDiscriminator([2], hidden=16, depth=1)
    real, fake = torch.randn(6, 2), torch.randn(5, 2)
    k_real, k_fake = torch.tensor([0, 0, 1, 1, 1, 2]), torch.tensor([0, 1, 2, 2, 2])
    s_real, s_fake = torch.tensor([3.0, 3.0, 1.0, 1.0, 1.0, 0.0]), torch.tensor([3.0, 1.0, 0.0, 0.0, 0.0])
    loss, _ = discriminator_loss(net, real, fake, s_real, s_fake, k_real, k_fake, num_steps=3)
    # duplicate the real samples of step 1 (three times) and one fake sample of step 2: nothing changes
    dup = torch.tensor([2, 3, 4] * 3)
    real2, k_real2, s_real2 = torch.cat([real, real[dup]]), torch.cat([k_real, k_real[dup]]), torch.cat([s_real, s_real[dup]])
    fake2, k_fake2, s_fake2 = torch.cat([fake, fake[2:]]), torch.cat([k_fake, k_fake[2:]]), torch.cat([s_fake, s_fake[2:]])
    loss2, _ = discriminator_loss(net, real2, fake2, s_real2, s_fake2, k_real2, k_fake2, num_steps=3)
    torch.testing.assert_close(loss2, loss)
    # ... whereas the plain (step-less) mean does change
    plain, _ = discriminator_loss(net, real, fake, s_real, s_fake)
    plain2, _ = discriminator_loss(net, real2, fake2, s_real2, s_fake2)
    assert abs((plain2 - plain).item()) > 1e-4
    # by hand: each step's class mean, averaged over steps, the two classes halved
    sp = nn.functional.softplus
    with torch.no_grad():
        lr, lf = net(real, s_real), net(fake, s_fake)
    by_hand = 0.5 * (torch.stack([sp(-lr[k_real == k]).mean() for k in range(3)]).mean()
                     + torch.stack([sp(lf[k_fake == k]).mean() for k in range(3)]).mean())
    torch.testing.assert_close(loss.detach(), by_hand)


def test_accuracy_diagnostics_by_hand():
    real = torch.tensor([[1.0, 0], [-1.0, 0], [2.0, 0]])   # right, wrong, right
    fake = torch.tensor([[-1.0, 0], [3.0, 0]])              # right, wrong
    _, diag = discriminator_loss(FirstCoordinate(), real, fake, 1.0, 1.0, torch.tensor([0, 1, 1]),
                                 torch.tensor([0, 0]), num_steps=3)
    assert diag["disc/acc"].item() == pytest.approx(3 / 5)
    acc = diag["disc/acc_per_step"]
    assert acc.shape == (3,) and acc[0].item() == pytest.approx(2 / 3) and acc[1].item() == pytest.approx(1 / 2)
    assert math.isnan(acc[2].item())
    assert diag["disc/logit_real"].item() == pytest.approx(2 / 3) and diag["disc/logit_fake"].item() == pytest.approx(1.0)
    sp = nn.functional.softplus
    expected = 0.5 * (sp(-real[:, 0]).mean() + sp(fake[:, 0]).mean())
    _, plain = discriminator_loss(FirstCoordinate(), real, fake, 1.0, 1.0)
    assert plain["disc/loss"].item() == pytest.approx(expected.item())
    assert "disc/acc_per_step" not in plain and "disc/r1" not in plain
    with pytest.raises(ValueError, match="both"):
        discriminator_loss(FirstCoordinate(), real, fake, 1.0, 1.0, step_real=torch.tensor([0, 1, 1]))


class Constant(nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor(0.3))

    def forward(self, x, sigma):
        return self.bias + 0 * x.flatten(1).sum(1)


def test_r1_penalty():
    torch.manual_seed(0)
    real, fake = torch.randn(8, 2), torch.randn(8, 2)
    loss0, _ = discriminator_loss(Constant(), real, fake, 1.0, 1.0)
    loss, diag = discriminator_loss(Constant(), real, fake, 1.0, 1.0, r1_gamma=10.0)
    assert diag["disc/r1"].item() == 0.0 and loss.item() == pytest.approx(loss0.item())
    net = MLPDiscriminator([2], hidden=16, depth=1)
    base, _ = discriminator_loss(net, real, fake, 1.0, 1.0)
    loss, diag = discriminator_loss(net, real, fake, 1.0, 1.0, r1_gamma=2.0)
    assert diag["disc/r1"].item() > 0
    assert loss.item() == pytest.approx(base.item() + diag["disc/r1"].item(), rel=1e-5)
    # the penalty is differentiable in the parameters (create_graph)
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())
    # by hand with the linear logit x[:, 0]: ||grad||^2 = 1 for every sample
    _, diag = discriminator_loss(FirstCoordinate(), real, fake, 1.0, 1.0, r1_gamma=1.0)
    assert diag["disc/r1"].item() == pytest.approx(1.0)


@pytest.mark.parametrize("make", [lambda: MLPDiscriminator([2], hidden=32, depth=2, spectral_norm=True),
                                  lambda: CNNDiscriminator([1, 8, 8], base_channels=8, emb_dim=16, spectral_norm=True)])
def test_spectral_norm_keeps_unit_singular_values(make):
    torch.manual_seed(0)
    net = make()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    shape = net.shape
    for _ in range(20):  # training moves the raw weights; the parametrisation keeps the norm
        x = torch.randn(16, *shape)
        loss = nn.functional.softplus(-net(x, torch.rand(16) * 5)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    layers = [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert layers and all(hasattr(m, "parametrizations") for m in layers)
    for m in layers:
        top = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2).item()
        assert top == pytest.approx(1.0, abs=0.05), (m, top)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_cnn_shapes_and_sigma_zero(shape):
    torch.manual_seed(0)
    net = CNNDiscriminator(shape, base_channels=8, emb_dim=16, sigma_data=0.5)
    x = torch.randn(3, *shape)
    for sigma in (0.0, 0.002, 80.0, torch.tensor([0.0, 1.0, 80.0])):
        out = net(x, sigma)
        assert out.shape == (3,) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="expects x of shape"):
        net(torch.randn(2, 2), 1.0)


def test_mlp_sigma_conditioning_and_validation():
    torch.manual_seed(0)
    net = MLPDiscriminator(2, hidden=16, depth=1)
    x = torch.randn(4, 2)
    assert net(x, 0.0).shape == (4,)
    torch.testing.assert_close(net(x, 0.0), net(x, 1e-5))  # below the floor, every sigma is the floor
    assert not torch.allclose(net(x, 0.0), net(x, 1.0))
    assert net(x.double(), 1.0).dtype == torch.float64  # the network runs in its own dtype, output in x's
    with pytest.raises(ValueError):
        MLPDiscriminator([1, 8, 8])
    with pytest.raises(ValueError, match="lr"):
        DiscriminatorModule(MLPDiscriminator([2]), lr=0.0)
    with pytest.raises(ValueError, match="r1_gamma"):
        DiscriminatorModule(MLPDiscriminator([2]), r1_gamma=-1.0)


def test_module_from_config_and_optimizer():
    cfg = {"_target_": "diffusion_irl.discriminator.networks.MLPDiscriminator", "shape": [2], "hidden": 8, "depth": 1}
    module = DiscriminatorModule(cfg, lr=1e-3, r1_gamma=1.0)
    assert module.hparams["net"] == cfg and module.shape == (2,)
    opt = module.make_optimizer()
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["lr"] == 1e-3 and opt.defaults["betas"] == (0.5, 0.999)
    loss, diag = module.loss(torch.randn(4, 2), torch.randn(4, 2), 1.0, 1.0)
    assert torch.isfinite(loss) and "disc/r1" in diag


QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "logger=none"]
TINY = ["train.nfe=5", "train.num_fake=64", "train.num_heldout=32", "train.batch_size=32", "trainer.max_steps=6",
        "data.n_train=256", "data.n_heldout=128"]
SMALL_MLP = ["discriminator.net.hidden=16", "discriminator.net.depth=1"]


def test_train_discriminator_end_to_end(tmp_path, capsys):
    cfg = compose_config("train_discriminator", TINY + SMALL_MLP + QUIET, output_dir=tmp_path)
    acc = train_discriminator(cfg)
    out = capsys.readouterr().out
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and "held-out accuracy" in out and 0.0 <= acc <= 1.0
    assert "per step" in out and out.count(",") >= 2  # heun at 5 NFE: 3 steps
    assert torch.load(ckpt, weights_only=True)["global_step"] == 6

    # load_discriminator rebuilds the same network from the file alone
    module = load_discriminator(ckpt)
    assert isinstance(module, DiscriminatorModule) and not module.training
    trained = DiscriminatorModule(cfg.discriminator.net)
    trained.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    x, sigma = torch.randn(10, 2), torch.tensor([0.0, 0.1, 1.0, 10.0, 80.0] * 2)
    with torch.no_grad():
        torch.testing.assert_close(module(x, sigma), trained.eval()(x, sigma), rtol=0, atol=0)


@pytest.mark.parametrize("noise_terminal", [False, True])
def test_train_discriminator_terminal_only(tmp_path, noise_terminal, capsys):
    cfg = compose_config("train_discriminator", TINY + SMALL_MLP + QUIET + [
        "train.terminal_only=true", f"train.noise_terminal={str(noise_terminal).lower()}",
        "discriminator.net.spectral_norm=true", "discriminator.r1_gamma=1.0"], output_dir=tmp_path)
    train_discriminator(cfg)
    line = [s for s in capsys.readouterr().out.splitlines() if "held-out accuracy" in s][0]
    per_step = line.split("per step: ")[1].rstrip(")").split(", ")
    # sigma-0 final samples only fill the last step; noised ones every step
    assert len(per_step) == 3 and (per_step[:2] == ["-", "-"]) != noise_terminal
    module = load_discriminator(tmp_path / "checkpoints" / "last.ckpt")
    assert module.r1_gamma == 1.0 and module.hparams["net"]["spectral_norm"] is True


@pytest.mark.parametrize("override, message", [
    ("train.nfe=0", "train.nfe"), ("train.num_fake=-3", "train.num_fake"), ("train.batch_size=0", "train.batch_size"),
    ("train.terminal_only=maybe", "terminal_only"), ("discriminator.lr=0", "lr"),
    ("sampler=restart", "too small"), ("discriminator=cnn", "shape"),
])
def test_train_discriminator_refuses_bad_configs(tmp_path, override, message):
    cfg = compose_config("train_discriminator", TINY + QUIET + [override], output_dir=tmp_path)
    with pytest.raises(ConfigError, match=message):
        train_discriminator(cfg)
    assert not (tmp_path / "checkpoints").exists()


def test_paired_batch_noises_data_at_the_fake_states_sigma():
    from diffusion_irl.discriminator.module import paired_batch

    data = torch.zeros(100, 2)
    sigma = torch.tensor([0.0, 1.0, 3.0]).repeat_interleave(4000)
    fake = torch.randn(len(sigma), 2)
    step = torch.tensor([2, 1, 0]).repeat_interleave(4000)
    batch = paired_batch(data, fake, sigma, step, torch.Generator().manual_seed(0))
    assert batch.real.shape == fake.shape and batch.fake is fake and batch.step is step
    stds = batch.real.view(3, 4000, 2).std(dim=(1, 2))
    torch.testing.assert_close(stds, torch.tensor([0.0, 1.0, 3.0]), atol=0.05, rtol=0.03)
    again = paired_batch(data, fake, sigma, step, torch.Generator().manual_seed(0))
    assert torch.equal(again.real, batch.real)  # a pure function of the generator
    real, fake2, s_real, s_fake, k_real, k_fake = batch.as_tuple()
    assert torch.equal(s_real, s_fake) and torch.equal(k_real, k_fake)


# ---- label-conditional discriminator ----------------------------------------------------------------------------
def test_label_conditional_discriminator_sees_what_the_label_marginal_hides():
    """Real: class 0 near -1, class 1 near +1. Fake: the classes swapped. The label-marginals are the same law, so an
    unconditional discriminator stays at chance; a label-conditional one separates them (conditional log-ratio)."""
    from diffusion_irl.discriminator.module import discriminator_loss

    g = torch.Generator().manual_seed(0)
    n = 512
    labels = torch.randint(2, (n,), generator=g)
    centre = labels.float() * 2 - 1
    accuracy = {}
    for num_classes in (0, 2):
        torch.manual_seed(0)
        net = MLPDiscriminator([1], hidden=32, depth=2, emb_dim=16, num_classes=num_classes)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        for _ in range(300):
            real = (centre + 0.3 * torch.randn(n, generator=g)).unsqueeze(1)
            fake = (-centre + 0.3 * torch.randn(n, generator=g)).unsqueeze(1)
            kw = dict(labels_real=labels, labels_fake=labels) if num_classes else {}
            loss, diag = discriminator_loss(net, real, fake, 0.0, 0.0, **kw)
            opt.zero_grad()
            loss.backward()
            opt.step()
        accuracy[num_classes] = float(diag["disc/acc"])
    assert accuracy[2] > 0.95 and accuracy[0] < 0.6, accuracy


def test_label_conditional_networks_check_their_labels():
    net = MLPDiscriminator([2], hidden=16, depth=1, emb_dim=8, num_classes=3)
    x = torch.randn(4, 2)
    assert net(x, 0.5, torch.tensor([0, 1, 2, 0])).shape == (4,)
    with pytest.raises(ValueError, match="needs the class labels"):
        net(x, 0.5)
    with pytest.raises(ValueError, match="class indices in 0..2"):
        net(x, 0.5, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match="is unconditional"):
        MLPDiscriminator([2], hidden=16, depth=1, emb_dim=8)(x, 0.5, torch.zeros(4, dtype=torch.long))
    cnn = CNNDiscriminator([1, 8, 8], base_channels=8, channel_mults=[1], emb_dim=8, num_classes=10)
    assert cnn(torch.randn(2, 1, 8, 8), torch.tensor([0.0, 1.0]), torch.tensor([3, 9])).shape == (2,)
    assert cnn.config["num_classes"] == 10 and net.config["num_classes"] == 3


def test_paired_batch_draws_real_points_of_the_same_class():
    from diffusion_irl.discriminator.module import paired_batch, same_label_indices

    data_labels = torch.tensor([2, 0, 1, 2, 0, 1, 1, 2])
    data = data_labels.float().unsqueeze(1) * 10  # each point says its class
    labels = torch.randint(3, (200,), generator=torch.Generator().manual_seed(1))
    idx = same_label_indices(data_labels, labels, torch.Generator().manual_seed(2))
    assert torch.equal(data_labels[idx], labels) and len(set(idx.tolist())) == 8  # every point of a class is used
    fake = torch.zeros(200, 1)
    batch = paired_batch(data, fake, torch.zeros(200), torch.zeros(200, dtype=torch.long),
                         torch.Generator().manual_seed(3), data_labels=data_labels, labels=labels)
    assert torch.equal(batch.real.squeeze(1), labels.float() * 10) and torch.equal(batch.labels, labels)
    with pytest.raises(ValueError, match=r"no sample of class\(es\) \[3\]"):
        same_label_indices(data_labels, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="or neither"):
        paired_batch(data, fake, torch.zeros(200), torch.zeros(200), labels=labels)
