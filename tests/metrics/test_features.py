"""Feature classifier, feature-space image metrics and the (weights-gated) Inception FID."""
from __future__ import annotations

import math

import pytest
import torch

from diffusion_irl.metrics import FeatureClassifier, image_metrics, inception_fid, train_feature_classifier

CORNERS = [(0, 0), (0, 5), (5, 0), (5, 5)]


def patches(n: int, classes: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8x8 1-channel images in [-1, 1]: a bright 3x3 patch near the class's corner (jittered by a pixel) + noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes)[torch.randint(len(classes), (n,), generator=g)]
    x = -1 + 0.3 * torch.randn(n, 1, 8, 8, generator=g)
    jitter = torch.randint(0, 2, (n, 2), generator=g)
    for i in range(n):
        r, c = CORNERS[int(y[i])]
        r, c = min(r + int(jitter[i, 0]), 5), min(c + int(jitter[i, 1]), 5)
        x[i, 0, r : r + 3, c : c + 3] += 2
    return x.clamp(-1, 1), y


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cache = tmp_path_factory.mktemp("clf") / "classifier.pt"
    xt, yt = patches(600, [0, 1, 2, 3], seed=0)
    xv, yv = patches(300, [0, 1, 2, 3], seed=1)
    model = train_feature_classifier(xt, yt, xv, yv, 4, epochs=3, width=16, cache_path=cache, progress=False)
    return model, cache, (xt, yt, xv, yv)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_classifier_shapes(shape):
    net = FeatureClassifier(in_channels=shape[0], num_classes=10, width=8, feature_dim=24)
    x = torch.rand(5, *shape) * 2 - 1
    assert net(x).shape == (5, 10)
    assert net.features(x).shape == (5, 24)


def test_classifier_learns_and_is_cached(trained):
    model, cache, (xt, yt, xv, yv) = trained
    assert not model.loaded_from_cache
    assert model.val_accuracy > 0.95  # measured 1.0 on held-out images
    assert cache.is_file()
    again = train_feature_classifier(xt, yt, xv, yv, 4, epochs=3, width=16, cache_path=cache, progress=False)
    assert again.loaded_from_cache and again.val_accuracy == model.val_accuracy
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    # a cache made for another configuration is not used
    other = train_feature_classifier(xt[:64], yt[:64], xv, yv, 4, epochs=1, width=8, cache_path=cache, progress=False)
    assert not other.loaded_from_cache


def test_training_is_deterministic_with_the_seed():
    xt, yt = patches(128, [0, 1, 2, 3], seed=0)
    xv, yv = patches(64, [0, 1, 2, 3], seed=1)
    kw = dict(epochs=1, width=8, feature_dim=16, progress=False)
    a = train_feature_classifier(xt, yt, xv, yv, 4, seed=3, **kw)
    b = train_feature_classifier(xt, yt, xv, yv, 4, seed=3, **kw)
    c = train_feature_classifier(xt, yt, xv, yv, 4, seed=4, **kw)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_image_metrics_detects_a_missing_class(trained):
    model = trained[0]
    heldout, _ = patches(400, [0, 1, 2, 3], seed=10)
    same, _ = patches(400, [0, 1, 2, 3], seed=11)
    missing, _ = patches(400, [0, 1, 2], seed=12)
    good, bad = image_metrics(same, heldout, model), image_metrics(missing, heldout, model)
    assert set(good) == {"fd", "precision", "recall", "density", "coverage", "nonfinite"}
    # measured (width 16): fd 0.47 for the same classes, 13.3 with a class missing
    assert bad["fd"] > 5 * good["fd"]
    assert good["recall"] > 0.85 and bad["recall"] < good["recall"] - 0.15
    assert bad["coverage"] < good["coverage"] - 0.15
    assert good["nonfinite"] == 0.0


def test_image_metrics_with_nonfinite_images(trained):
    model = trained[0]
    heldout, _ = patches(200, [0, 1, 2, 3], seed=10)
    samples, _ = patches(200, [0, 1, 2, 3], seed=11)
    dirty = samples.clone()
    dirty[:20, 0, 3, 3] = float("nan")
    dirty[20:30] = float("inf")
    out = image_metrics(dirty, heldout, model)
    assert out["nonfinite"] == pytest.approx(0.15)
    assert out["fd"] == pytest.approx(image_metrics(samples[30:], heldout, model)["fd"], rel=1e-5)
    nan = image_metrics(torch.full((4, 1, 8, 8), float("nan")), heldout, model)
    assert nan["nonfinite"] == 1.0 and math.isnan(nan["fd"]) and math.isnan(nan["precision"])


def test_inception_fid_without_weights_is_none(tmp_path):
    x = torch.zeros(4, 1, 8, 8)
    assert inception_fid(x, x, None) is None
    assert inception_fid(x, x, tmp_path / "pt_inception-2015-12-05-6726825d.pth") is None


def test_image_metrics_cache_gives_identical_results(trained):
    model = trained[0]
    heldout, _ = patches(300, [0, 1, 2, 3], seed=20)
    first, _ = patches(200, [0, 1, 2, 3], seed=21)
    second, _ = patches(200, [0, 1, 2], seed=22)
    cache: dict = {}
    for x in (first, second, first):  # the third call reuses held-out statistics after another sample set
        plain = image_metrics(x, heldout, model)
        cached = image_metrics(x, heldout, model, cache=cache)
        assert cached.keys() == plain.keys()
        for k in plain:
            assert cached[k] == pytest.approx(plain[k], rel=1e-9, abs=1e-12), k
    assert len(cache) == 1
