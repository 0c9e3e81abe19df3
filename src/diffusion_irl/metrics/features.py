"""Image sample quality in the features of a classifier trained here (docs/method.md section 7).

Images are float tensors ``[N, C, H, W]`` in ``[-1, 1]``.

- :class:`FeatureClassifier`: a small CNN (adaptive pooling: 8x8 digits, 28x28 MNIST, 32x32 CIFAR alike);
  ``features(x)`` is its penultimate layer, the space in which the metrics are computed.
- :func:`train_feature_classifier`: trains it on training data, measures its accuracy on held-out data, caches it.
- :func:`image_metrics`: Frechet distance (torchmetrics ``FrechetInceptionDistance`` with the classifier as its
  feature extractor) and k-NN precision / recall / density / coverage in the same features.
- :func:`inception_fid`: the usual Inception FID (:mod:`diffusion_irl.metrics.fid`), only when the Inception weights
  file is present locally.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from diffusion_irl.metrics.samples import _subsample, finite_rows, prdc_metrics

log = logging.getLogger(__name__)

_PRDC_KEYS = ("precision", "recall", "density", "coverage")


class FeatureClassifier(nn.Module):
    """Small CNN classifier: three 3x3 conv blocks (strides 1, 2, 2), adaptive average pooling to 2x2, a hidden
    layer of ``feature_dim`` units (the features) and a linear head.

    Args:
        in_channels: image channels (1 or 3).
        num_classes: number of classes.
        width: channels of the first block (then 2x, 4x).
        feature_dim: size F of the penultimate features.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.config = {"in_channels": int(in_channels), "num_classes": int(num_classes), "width": int(width),
                       "feature_dim": int(feature_dim)}
        self.num_features = int(feature_dim)
        self.val_accuracy: float = float("nan")
        self.loaded_from_cache = False

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(min(8, c_out), c_out), nn.ReLU()]

        self.body = nn.Sequential(
            *block(in_channels, width, 1), *block(width, 2 * width, 2), *block(2 * width, 4 * width, 2),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16 * width, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features: [N, C, H, W] -> [N, F]."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits: [N, C, H, W] -> [N, num_classes]."""
        return self.head(self.body(x))


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def _accuracy(model: FeatureClassifier, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    model.eval()
    dev = _device(model)
    correct = 0
    for i in range(0, len(x), batch_size):
        logits = model(x[i : i + batch_size].to(dev, torch.float32))
        correct += int((logits.argmax(1).cpu() == y[i : i + batch_size].cpu()).sum())
    return correct / max(len(x), 1)


def _load_cached(path: Path, config: dict) -> FeatureClassifier | None:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("config") != config:
            log.info("feature classifier cache %s was made for %s, not %s: retraining", path, payload.get("config"), config)
            return None
        model = FeatureClassifier(**{k: config[k] for k in ("in_channels", "num_classes", "width", "feature_dim")})
        model.load_state_dict(payload["state_dict"])
    except Exception as err:  # a corrupt or foreign file: retrain and overwrite it
        log.warning("could not load feature classifier cache %s (%s): retraining", path, err)
        return None
    model.val_accuracy = float(payload["val_accuracy"])
    model.loaded_from_cache = True
    return model


def train_feature_classifier(
    x_train: Tensor,
    y_train: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    num_classes: int,
    *,
    epochs: int = 5,
    batch_size: int = 128,
    lr: float = 1e-3,
    width: int = 32,
    feature_dim: int = 128,
    cache_path: str | os.PathLike | None = None,
    seed: int = 0,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> FeatureClassifier:
    """Train a :class:`FeatureClassifier` on ``(x_train, y_train)`` and measure its accuracy on ``(x_val, y_val)``.

    Adam, cross-entropy, ``epochs`` passes over shuffled mini-batches, no augmentation. Deterministic given ``seed``
    (initialisation and shuffling; the global RNG state is left untouched). The held-out accuracy is printed (when
    ``progress``) and stored as ``model.val_accuracy``.

    With ``cache_path`` (a ``.pt`` file): when the file exists and was made for the same configuration (image shape,
    classes, width, feature size), the model is loaded from it without training (``model.loaded_from_cache`` is
    True); otherwise the model is trained and its ``state_dict``, configuration and accuracy are written there.

    Returns the model in eval mode, on ``device`` (default: the device of ``x_train``).
    """
    if x_train.ndim != 4:
        raise ValueError(f"expected images [N, C, H, W], got {tuple(x_train.shape)}")
    device = torch.device(device) if device is not None else x_train.device
    config = {"in_channels": int(x_train.shape[1]), "num_classes": int(num_classes), "width": int(width),
              "feature_dim": int(feature_dim), "image_shape": [int(s) for s in x_train.shape[1:]]}
    path = Path(cache_path) if cache_path is not None else None
    if path is not None and path.is_file():
        model = _load_cached(path, config)
        if model is not None:
            if progress:
                print(f"feature classifier loaded from {path} (held-out accuracy {model.val_accuracy:.4f})")
            return model.to(device).eval()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FeatureClassifier(config["in_channels"], num_classes, width, feature_dim)
    model.to(device)
    start = time.time()
    _fit_classifier(model, x_train, y_train.long(), epochs, batch_size, lr, seed, progress, device)
    model.val_accuracy = _accuracy(model, x_val, y_val)
    if progress:
        print(f"feature classifier: held-out accuracy {model.val_accuracy:.4f} on {len(x_val)} images "
              f"({time.time() - start:.1f} s)")
    if path is not None:
        _save_cached(model, config, path)
    return model.eval()


def _fit_classifier(model: nn.Module, x_train: Tensor, y_train: Tensor, epochs: int, batch_size: int, lr: float,
                    seed: int, progress: bool, device: torch.device) -> None:
    """Adam on cross-entropy, ``epochs`` passes over mini-batches shuffled by a generator seeded with ``seed``."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    shuffle = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        total, count = 0.0, 0
        for idx in torch.randperm(len(x_train), generator=shuffle).split(batch_size):
            xb, yb = x_train[idx].to(device, torch.float32), y_train[idx].to(device)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + float(loss.detach()) * len(idx), count + len(idx)
        if progress:
            print(f"feature classifier epoch {epoch + 1}/{epochs}: train loss {total / max(count, 1):.4f}")


def _save_cached(model: nn.Module, config: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"config": config, "state_dict": state, "val_accuracy": model.val_accuracy}, tmp)
    os.replace(tmp, path)  # atomic: concurrent ranks never read a half-written file


class _RecordingFeatures(nn.Module):
    """Feature extractor for torchmetrics' FID: images in [0, 1] -> ``net.features(2 x - 1)`` [N, F].

    torchmetrics reads ``num_features`` to size its statistics and, with ``normalize=True``, passes float images
    through unchanged. Every output is also recorded, so that prdc reuses the features instead of recomputing them.
    """

    def __init__(self, net: FeatureClassifier):
        super().__init__()
        self.net = net
        self.num_features = int(net.num_features)
        self.recorded: list[Tensor] = []

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        feats = self.net.features(x * 2 - 1)
        self.recorded.append(feats.detach().cpu())
        return feats

    def take(self) -> Tensor:
        out, self.recorded = torch.cat(self.recorded), []
        return out


def _finite_images(x: Tensor) -> tuple[Tensor, float]:
    """Finite images clamped to [-1, 1], and the share of images with a non-finite pixel."""
    ok = finite_rows(x)
    share = float(1.0 - ok.double().mean()) if len(x) else float("nan")
    return x[ok].clamp(-1, 1), share


def image_metrics(
    samples: Tensor,
    heldout: Tensor,
    feature_net: FeatureClassifier,
    *,
    prdc_k: int = 5,
    prdc_points: int = 2000,
    batch_size: int = 500,
    generator: torch.Generator | None = None,
    cache: dict | None = None,
) -> dict[str, float]:
    """Frechet distance and k-NN precision / recall / density / coverage in ``feature_net.features``.

    ``fd = ||mu_s - mu_h||^2 + Tr(S_s + S_h - 2 (S_s S_h)^(1/2))`` over all finite samples and all held-out images
    (torchmetrics ``FrechetInceptionDistance`` with the classifier as its feature extractor). prdc uses
    ``min(prdc_points, N_finite, M)`` rows of each set (seeded subsample; ``generator=None`` is seed 0).
    Samples are clamped to [-1, 1]; images with a non-finite pixel are dropped and counted in ``nonfinite``; with
    fewer than 2 finite samples every other key is NaN.
    ``cache``: a dict the caller keeps across calls with the same ``heldout`` and ``feature_net`` (neither may change
    in between): the held-out features and their Fréchet statistics are then computed once. Same results either way.
    """
    x, nonfinite = _finite_images(samples.detach())
    out: dict[str, float] = {"nonfinite": nonfinite}
    if len(x) < 2:
        return {**out, "fd": float("nan"), **{k: float("nan") for k in _PRDC_KEYS}}
    was_training = feature_net.training
    feature_net.eval()
    device = _device(feature_net)
    def feed(images: Tensor, real: bool) -> Tensor:
        for i in range(0, len(images), batch_size):
            fid.update((images[i : i + batch_size].to(device, torch.float32) + 1) / 2, real=real)
        return extractor.take()

    if cache is not None and "image_metrics_real" in cache:
        fid, extractor, real_feats = cache["image_metrics_real"]
        fid.reset()  # drops the previous samples' statistics, keeps the held-out ones (reset_real_features=False)
    else:
        extractor = _RecordingFeatures(feature_net)
        fid = FrechetInceptionDistance(feature=extractor, normalize=True, reset_real_features=False).to(device)
        real_feats = feed(heldout.detach().clamp(-1, 1), real=True)
        if cache is not None:
            cache["image_metrics_real"] = (fid, extractor, real_feats)
    fake_feats = feed(x, real=False)
    out["fd"] = float(fid.compute())
    feature_net.train(was_training)

    g = torch.Generator().manual_seed(0) if generator is None else generator
    n = min(prdc_points, len(real_feats), len(fake_feats))
    if n > prdc_k:
        out.update(prdc_metrics(_subsample(real_feats, n, g), _subsample(fake_feats, n, g), prdc_k))
    else:
        out.update({k: float("nan") for k in _PRDC_KEYS})
    return out


def inception_fid(
    samples: Tensor,
    heldout: Tensor,
    weights_path: str | os.PathLike | None,
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> float | None:
    """Inception FID of ``samples`` against ``heldout`` with the field's protocol (:mod:`diffusion_irl.metrics.fid`:
    torch-fidelity's Inception-v3 pool features of 8-bit images, torch-fidelity's Fréchet distance).

    Runs only when the Inception weights file (torch-fidelity's ``pt_inception-2015-12-05-6726825d.pth``) exists at
    ``weights_path``, so nothing is ever downloaded; returns None (and logs one line) otherwise. 1-channel images
    are repeated to 3; images with a non-finite pixel are dropped. Returns NaN with fewer than 2 finite samples.
    The evaluator computes the held-out side once (``evaluation.scorer_for``); this function recomputes it.
    """
    from diffusion_irl.metrics.fid import FrechetStats, InceptionFeatures, extract_features, frechet_distance

    if weights_path is None or not Path(weights_path).is_file():
        log.info("inception_fid skipped: no Inception weights file at %s", weights_path)
        return None
    x, _ = _finite_images(samples.detach())
    if len(x) < 2:
        return float("nan")
    net = InceptionFeatures(weights_path).to(torch.device(device) if device is not None else samples.device)
    real = extract_features(net, heldout.detach().clamp(-1, 1), batch_size=batch_size)
    fake = extract_features(net, x, batch_size=batch_size)
    return frechet_distance(FrechetStats.from_features(fake), FrechetStats.from_features(real))
