"""FID with the field's protocol: stored reference statistics (EDM's .npz), a pluggable feature network, the
cached reference statistics, the one-line config errors, and (slow) the Inception path end to end on random weights.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from diffusion_irl.config import ConfigError
from diffusion_irl.metrics.fid import (FrechetStats, InceptionFeatures, check_inception_weights, extract_features,
                                       frechet_distance, reference_features, to_uint8)

from .conftest import ROOT
from .helpers import compose_config

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyFeatures(nn.Module):
    """A tiny feature network for 1x8x8 images: a fixed random projection of the pixels to ``width`` features,
    then tanh (module level, so that spawned processes can unpickle it)."""

    def __init__(self, width: int = 6, seed: int = 0, pixels: int = 64):
        super().__init__()
        self.proj = nn.Linear(pixels, width)
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            self.proj.weight.copy_(torch.randn(width, pixels, generator=g) / 8)
            self.proj.bias.copy_(torch.randn(width, generator=g) / 8)
        self.num_features = width
        self.calls = 0  # images seen (counts what the cache spares)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += len(x)
        return torch.tanh(self.proj(x.reshape(len(x), -1)))


class StubImages:
    """A data module that holds no images (what `fid_only` needs: a name and a shape)."""

    name, shape, law, num_classes = "stub", (1, 8, 8), None, 0

    def setup(self):  # pragma: no cover - must not be called
        raise AssertionError("fid_only must not read images")


def images(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.5 * torch.randn(n, 1, 8, 8, generator=g) + shift).clamp(-1, 1)


def fid_by_hand(real: np.ndarray, fake: np.ndarray) -> float:
    """The Fréchet distance written out independently (numpy moments, scipy's matrix square root)."""
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(covmean)))


def write_stats(path, feats: np.ndarray, **extra) -> None:
    np.savez(path, mu=feats.mean(0), sigma=np.cov(feats, rowvar=False), **extra)


def test_to_uint8_gives_back_8_bit_pixels():
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    x = u.float() * (2 / 255) - 1  # how the data modules store 8-bit images
    assert torch.equal(to_uint8(x), u)
    assert torch.equal(to_uint8(torch.tensor([-3.0, 3.0])), torch.tensor([0, 255], dtype=torch.uint8))


def test_fid_against_stored_statistics_equals_fid_from_features(tmp_path, capsys):
    """A .npz written from the features of some images, the same tiny network: the evaluator's FID against the
    stored statistics equals the FID of the two feature sets computed by hand (scipy sqrtm)."""
    from diffusion_irl.evaluation import scorer_for

    net = TinyFeatures()
    real, fake = images(200, seed=0), images(150, seed=1, shift=0.2)
    real_f, fake_f = net(real).double().numpy(), net(fake).double().numpy()
    write_stats(tmp_path / "ref.npz", real_f)
    expected = fid_by_hand(real_f, fake_f)
    assert expected > 0.01  # the two sets differ

    score = scorer_for(StubImages(), fid_reference=tmp_path / "ref.npz", fid_only=True, feature_network=net)
    out = score(fake, 0)
    assert set(out) == {"nonfinite", "fid"}  # .npz only: no precision / recall
    assert out["fid"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # the same through the statistics objects
    stored = FrechetStats.load(tmp_path / "ref.npz", num_features=6)
    assert frechet_distance(FrechetStats.from_features(torch.from_numpy(fake_f)), stored) == pytest.approx(expected, rel=1e-9)
    # and it says once that it reports FID only
    score(fake, 1)
    said = capsys.readouterr().out
    assert said.count("FID only") == 1 and "precision / recall" in said


def test_fid_from_the_data_is_cached_and_keyed(tmp_path):
    """Without a .npz the reference statistics come from the data module's images, once: a second scorer reads
    them from the cache; another split or another network gets its own file. FID against a .npz of the same
    images' statistics is the same number, and precision / recall come with it (the data's features are there)."""
    from diffusion_irl.data.images import DigitsDataModule
    from diffusion_irl.evaluation import scorer_for

    dm, cache = DigitsDataModule(n_heldout=120), tmp_path / "cache"
    kw = dict(num_heldout=120, feature_cache=cache, classifier_epochs=1, progress=False)
    net = TinyFeatures()
    score = scorer_for(dm, feature_network=net, **kw)
    files = sorted(p.name for p in cache.glob("fid_ref_*.npz"))
    assert len(files) == 1 and files[0].startswith("fid_ref_digits-1x8x8_heldout120_TinyFeatures-")
    assert net.calls == 120
    fake = images(80, seed=3)
    out = score(fake, 0)
    assert {"fd", "precision", "recall", "fid", "fid_precision", "fid_recall", "fid_density", "fid_coverage"} <= set(out)

    held = dm.heldout(120)
    expected = fid_by_hand(net(held).double().numpy(), net(fake).double().numpy())
    assert out["fid"] == pytest.approx(expected, rel=1e-6)

    again = TinyFeatures()
    score2 = scorer_for(dm, feature_network=again, **kw)
    assert again.calls == 0  # the reference features came from the cache
    assert score2(fake, 0)["fid"] == out["fid"]

    scorer_for(dm, feature_network=TinyFeatures(), fid_split="train", **kw)
    scorer_for(dm, feature_network=TinyFeatures(seed=1), **kw)
    assert len(list(cache.glob("fid_ref_*.npz"))) == 3  # split and network are part of the key
    assert len(list(cache.glob("fid_ref_digits-1x8x8_train1677_*.npz"))) == 1

    write_stats(tmp_path / "ref.npz", net(held).double().numpy())
    stored = scorer_for(dm, feature_network=TinyFeatures(), fid_reference=tmp_path / "ref.npz", **kw)(fake, 0)
    assert stored["fid"] == pytest.approx(out["fid"], rel=1e-9)
    assert stored["fid_precision"] == out["fid_precision"]


def test_reference_cache_is_not_used_for_other_images(tmp_path):
    net = TinyFeatures()
    a = reference_features(net, images(50, 0), cache_dir=tmp_path, dataset="d", split="heldout")
    b = reference_features(net, images(50, 1), cache_dir=tmp_path, dataset="d", split="heldout")
    assert len(list(tmp_path.glob("*.npz"))) == 2 and not np.allclose(a.stats.mu, b.stats.mu)
    assert net.calls == 100
    c = reference_features(net, images(50, 0), cache_dir=tmp_path, dataset="d", split="heldout")
    assert net.calls == 100 and np.array_equal(c.stats.sigma, a.stats.sigma) and torch.equal(c.features, a.features)
    # the cache file is itself an EDM-format reference
    path = next(p for p in tmp_path.glob("*.npz") if np.array_equal(np.load(p)["mu"], a.stats.mu))
    assert frechet_distance(FrechetStats.load(path, 6), a.stats) == pytest.approx(0.0, abs=1e-12)


def test_feature_extraction_shows_a_progress_bar(capsys):
    feats = extract_features(TinyFeatures(), images(40, 0), batch_size=10, progress=True, desc="tiny features")
    assert feats.shape == (40, 6) and feats.dtype == torch.float32
    assert "tiny features" in capsys.readouterr().err


def test_inception_loader_checks_its_file(tmp_path):
    with pytest.raises(ValueError, match="no Inception weights file") as err:
        check_inception_weights(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    assert "\n" not in str(err.value)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a state dict")
    with pytest.raises(ValueError, match="is not torch-fidelity's Inception-v3 state dict") as err:
        InceptionFeatures(junk)
    assert "\n" not in str(err.value)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")  # a state dict of another network
    with pytest.raises(ValueError, match="is not torch-fidelity's Inception-v3 state dict"):
        InceptionFeatures(tmp_path / "other.pth")


# --- config errors: one line, before any compute -------------------------------------------------------------------
DIGITS = ["data=digits", "denoiser=unet", "denoiser.net.base_channels=8", "denoiser.net.emb_dim=16", "evaluate.samplers=[euler]", "evaluate.nfe=[4]", "evaluate.seeds=[0]",
          "evaluate.num_samples=8", "evaluate.progress=false"]


@pytest.fixture
def fid_files(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")  # only its existence is checked before compute
    f = np.random.default_rng(0).standard_normal((10, 4))
    np.savez(tmp_path / "no_sigma.npz", mu=np.zeros(2048))
    write_stats(tmp_path / "narrow.npz", f)  # 4-d statistics: Inception gives 2048
    np.savez(tmp_path / "ragged.npz", mu=np.zeros(2048), sigma=np.eye(16))
    (tmp_path / "text.npz").write_text("mu, sigma")
    return tmp_path


@pytest.mark.parametrize("overrides, message", [
    (["evaluate.inception_weights={d}/missing.pth"], "evaluate.inception_weights: no Inception weights file"),
    (["evaluate.inception_weights={d}/w.pth", "evaluate.fid_reference={d}/no_sigma.npz"], "holds \\[.mu.\\]; reference statistics need `mu` .* and `sigma`"),
    (["evaluate.inception_weights={d}/w.pth", "evaluate.fid_reference={d}/narrow.npz"], "4-d features, but the feature network gives 2048"),
    (["evaluate.inception_weights={d}/w.pth", "evaluate.fid_reference={d}/ragged.npz"], "must be \\[F\\] and \\[F, F\\]"),
    (["evaluate.inception_weights={d}/w.pth", "evaluate.fid_reference={d}/text.npz"], "not a readable .npz"),
    (["evaluate.inception_weights={d}/w.pth", "evaluate.fid_reference={d}/absent.npz"], "fid_reference: no file at"),
    (["evaluate.fid_reference={d}/narrow.npz"], "needs evaluate.inception_weights"),
    (["evaluate.fid_only=true"], "fid_only=true needs evaluate.fid_reference"),
    (["data=gmm8", "evaluate.inception_weights={d}/w.pth", "evaluate.fid_reference={d}/narrow.npz"], "FID needs image data"),
    (["evaluate.inception_weights={d}/junk.pth"], "is not torch-fidelity's Inception-v3 state dict"),
    (["evaluate.fid_split=test"], "evaluate.fid_split: must be one of"),
    (["evaluate.processes=0"], "evaluate.processes: must be a positive integer or auto"),
    (["evaluate.processes=two"], "evaluate.processes"),
])
def test_bad_fid_config_is_one_line(overrides, message, fid_files, monkeypatch):
    (fid_files / "junk.pth").write_bytes(b"not a state dict")
    monkeypatch.chdir(fid_files)
    cfg = compose_config("evaluate", DIGITS + [o.format(d=fid_files) for o in overrides])
    with pytest.raises(ConfigError, match=message) as err:
        from diffusion_irl.evaluate import run

        run(cfg)
    assert "\n" not in str(err.value)
    assert not (fid_files / "results.csv").exists()


def test_fid_only_reads_no_images(fid_files, monkeypatch, capsys):
    """`evaluate.fid_only=true`: FID against the .npz alone; the data module's images are never read, there is no
    reference row, and the run says once that precision / recall are left out. (A tiny network stands in for
    Inception, with the width check following it.)"""
    import diffusion_irl.metrics.fid as fid
    from diffusion_irl.data.images import DigitsDataModule
    from diffusion_irl.evaluate import run

    def no_images(self, stage=None):
        raise AssertionError("fid_only read the data set's images")

    monkeypatch.setattr(fid, "INCEPTION_FEATURES", 6)
    monkeypatch.setattr(fid, "InceptionFeatures", lambda path: TinyFeatures())
    monkeypatch.setattr(DigitsDataModule, "setup", no_images)
    write_stats(fid_files / "tiny.npz", TinyFeatures()(images(100, 0)).double().numpy())
    monkeypatch.chdir(fid_files)
    rows = run(compose_config("evaluate", DIGITS + [f"evaluate.inception_weights={fid_files / 'w.pth'}",
                                                    f"evaluate.fid_reference={fid_files / 'tiny.npz'}",
                                                    "evaluate.fid_only=true"], output_dir=fid_files / "run"))
    assert {r.sampler for r in rows} == {"euler"}
    assert {r.metric for r in rows} == {"nonfinite", "fid", "sample_seconds"}
    assert all(np.isfinite(r.value) for r in rows)
    said = capsys.readouterr().out
    assert said.count("FID only") == 1 and "no `reference` row" in said


def test_bad_npz_on_the_command_line(fid_files):
    env = dict(os.environ, WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, "-m", "diffusion_irl.evaluate", "data=digits",
                           f"evaluate.inception_weights={fid_files / 'w.pth'}",
                           f"evaluate.fid_reference={fid_files / 'no_sigma.npz'}", f"hydra.run.dir={fid_files / 'run'}"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("config error: evaluate.fid_reference:") and "`mu`" in lines[-1]
    assert "Traceback" not in proc.stderr


# --- the Inception network end to end, on random weights --------------------------------------------------------
def random_inception_weights(path) -> None:
    """A state dict of torch-fidelity's Inception-v3 (the format of pt_inception-2015-12-05-6726825d.pth) with
    random convolutions (He initialisation keeps the pool features away from 0)."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    with mock.patch.object(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, strict=True: None), \
            mock.patch.object(tf_inception, "load_state_dict_from_url", lambda *a, **k: {}):
        net = tf_inception.FeatureExtractorInceptionV3("random", ["2048"])
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, generator=g)
    torch.save(net.state_dict(), path)


@pytest.mark.slow
def test_inception_fid_end_to_end_on_random_weights(tmp_path, monkeypatch):
    """`evaluate data=digits evaluate.inception_weights=<file> evaluate.fid_reference=<npz>` on a handful of tiny
    images, with Inception weights in the format of the real file (random values): FID against the stored
    statistics, and precision / recall in Inception features of the held-out images (cached)."""
    from diffusion_irl.data.images import DigitsDataModule
    from diffusion_irl.evaluate import run

    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    random_inception_weights(weights)
    inception = InceptionFeatures(weights)
    held = DigitsDataModule().heldout(8)
    feats = inception(held)
    assert feats.shape == (8, 2048) and torch.isfinite(feats).all() and feats.std(0).mean() > 1e-4
    write_stats(tmp_path / "ref.npz", feats.double().numpy())

    monkeypatch.chdir(tmp_path)
    overrides = ["data=digits", "denoiser=unet", "denoiser.net.base_channels=8", "denoiser.net.emb_dim=16",
                 "evaluate.samplers=[euler]", "evaluate.nfe=[4]", "evaluate.seeds=[0]", "evaluate.num_samples=8",
                 "evaluate.num_heldout=8", "evaluate.progress=false", f"evaluate.feature_cache={tmp_path / 'cache'}",
                 f"evaluate.inception_weights={weights}", f"evaluate.fid_reference={tmp_path / 'ref.npz'}",
                 "evaluate.reference=false"]
    rows = run(compose_config("evaluate", overrides, output_dir=tmp_path / "run"))
    got = {r.metric: r.value for r in rows if r.sampler == "euler"}
    assert {"fd", "precision", "fid", "fid_precision", "fid_recall"} <= set(got)
    assert np.isfinite(got["fid"]) and got["fid"] > 0
    cached = list((tmp_path / "cache").glob("fid_ref_digits-1x8x8_heldout8_inception-2015-12-05-*.npz"))
    assert len(cached) == 1
    # the cached statistics of the same 8 images equal the test's own (so FID against either is the same)
    assert np.allclose(np.load(cached[0])["mu"], feats.double().numpy().mean(0), rtol=1e-6, atol=1e-9)
