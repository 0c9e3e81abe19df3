"""FID as published sampler papers report it (EDM's protocol), with a pluggable feature network.

Images are float tensors ``[N, C, H, W]`` in ``[-1, 1]``.

- **Feature network**: any callable ``images -> features [N, F]``; ``num_features`` (F) and ``key`` (what the
  reference-statistics cache is keyed by) are read from it when present (:func:`feature_width`,
  :func:`network_key`). :class:`InceptionFeatures` is the usual one: the 2048-d pool features of Inception-v3 (the
  2015-12-05 TensorFlow graph) from torch-fidelity's ``FeatureExtractorInceptionV3``, which resizes to 299 with
  TensorFlow 1's bilinear rule, loaded from the local weights file ``pt_inception-2015-12-05-6726825d.pth``
  (nothing is downloaded). Images are quantised to 8 bits as EDM writes its PNGs (``x * 127.5 + 128``, clipped and
  truncated) and 1-channel images are repeated to 3.
- **Statistics** (:class:`FrechetStats`): ``mu`` = the mean feature, ``sigma`` = the unbiased covariance
  (torch-fidelity's ``fid_features_to_statistics``); stored as ``.npz`` with the keys ``mu`` [F] and ``sigma``
  [F, F], the format of EDM's ``fid-refs/*.npz``.
- **Distance** (:func:`frechet_distance`): torch-fidelity's ``fid_statistics_to_metric``,
  ``||mu_1 - mu_2||^2 + Tr(S_1) + Tr(S_2) - 2 sum_i sqrt(lambda_i(S_1 S_2))``.
- **Reference features** (:func:`reference_features`): the statistics of the real images plus a seeded subset of
  their features (for precision / recall, which need points, not moments), computed once and cached in an ``.npz``
  whose name holds the data set, split, image count, network key and a digest of the images and the network.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffusion_irl.metrics.samples import _subsample, prdc_metrics

log = logging.getLogger(__name__)

INCEPTION_FEATURES = 2048
INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
PRDC_KEYS = ("precision", "recall", "density", "coverage")

FeatureNet = Callable[[Tensor], Tensor]


# --- feature networks ----------------------------------------------------------------------------------------------

def to_uint8(x: Tensor) -> Tensor:
    """Images in [-1, 1] -> uint8 as EDM's generator writes them: ``(x * 127.5 + 128).clip(0, 255)``, truncated.
    Data stored as 8-bit pixels ``u / 127.5 - 1`` come back as exactly ``u``."""
    return (x.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def file_digest(path: str | os.PathLike, chars: int = 8) -> str:
    """The first ``chars`` hex digits of the file's SHA-256 (torch-fidelity's file names carry the first 8)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:chars]


def check_inception_weights(path: str | os.PathLike | None) -> Path:
    """The path as a ``Path`` if a file is there; otherwise one-line ``ValueError``."""
    if path is None or not Path(path).is_file():
        raise ValueError(f"no Inception weights file at {path} (torch-fidelity's {INCEPTION_WEIGHTS_FILE}; "
                         "nothing is downloaded)")
    return Path(path)


class InceptionFeatures(nn.Module):
    """Inception-v3 pool features [N, 2048] of images in [-1, 1] (see the module docstring), from local weights.

    Raises ``ValueError`` (one line) when the file is missing or is not torch-fidelity's Inception state dict."""

    num_features = INCEPTION_FEATURES

    def __init__(self, weights_path: str | os.PathLike):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = check_inception_weights(weights_path)
        try:
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", [str(INCEPTION_FEATURES)],
                                                   feature_extractor_weights_path=str(path))
        except Exception as err:  # not a state dict, or one with other keys / shapes
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"{path} is not torch-fidelity's Inception-v3 state dict ({first[:200]})") from None
        self.key = f"inception-2015-12-05-{file_digest(path)}"
        self.weights_path = str(path)

    def train(self, mode: bool = True) -> "InceptionFeatures":
        return super().train(False)  # always in eval mode (batch norm with its stored statistics)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"Inception features need images [N, 1 or 3, H, W], got {tuple(x.shape)}")
        u = to_uint8(x)
        if u.shape[1] == 1:
            u = u.repeat(1, 3, 1, 1)
        return self.net(u)[0]


def feature_width(net: FeatureNet, image_shape: tuple[int, ...] | None = None) -> int:
    """``net.num_features``, or the width of its output on one blank image of ``image_shape``."""
    width = getattr(net, "num_features", None)
    if width is not None:
        return int(width)
    if image_shape is None:
        raise ValueError("the feature network has no num_features: pass the image shape to probe it")
    with torch.no_grad():
        return int(net(torch.zeros(1, *image_shape, device=_net_device(net))).reshape(1, -1).shape[1])


def network_key(net: FeatureNet) -> str:
    """What identifies the network in cache names: ``net.key`` if set, else its class name plus a digest of its
    parameters (an ``nn.Module``) or its qualified name (a function)."""
    key = getattr(net, "key", None)
    if key:
        return str(key)
    if isinstance(net, nn.Module):
        h = hashlib.sha256()
        for name, t in net.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return f"{type(net).__name__}-{h.hexdigest()[:8]}"
    return getattr(net, "__qualname__", type(net).__name__)


def _net_device(net) -> torch.device:
    if isinstance(net, nn.Module):
        for p in net.parameters():
            return p.device
        for b in net.buffers():
            return b.device
    return torch.device("cpu")


@torch.no_grad()
def extract_features(net: FeatureNet, images: Tensor, *, batch_size: int = 250,
                     device: str | torch.device | None = None, progress: bool = False,
                     desc: str = "features") -> Tensor:
    """``net`` over ``images`` in batches of ``batch_size`` (moved to ``device``, default: the network's device):
    float32 features [N, F] on the CPU, with a progress bar when ``progress``."""
    dev = torch.device(device) if device is not None else _net_device(net)
    out = []
    starts = range(0, len(images), batch_size)
    for i in tqdm(starts, desc=desc, disable=not progress or len(starts) < 2, dynamic_ncols=True, leave=False):
        feats = net(images[i: i + batch_size].to(dev, torch.float32))
        out.append(feats.reshape(len(feats), -1).float().cpu())
    if not out:
        return torch.zeros(0, 0)
    return torch.cat(out)


# --- statistics and the distance -----------------------------------------------------------------------------------

@dataclass
class FrechetStats:
    """Mean [F] and unbiased covariance [F, F] of features, in float64 (EDM's ``mu`` / ``sigma``)."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int = 0  # number of feature rows (0: unknown, e.g. read from a file that does not say)

    @property
    def num_features(self) -> int:
        return int(self.mu.shape[0])

    @classmethod
    def from_features(cls, features: Tensor) -> "FrechetStats":
        from torch_fidelity.metric_fid import fid_features_to_statistics

        features = torch.as_tensor(features).detach().to("cpu", torch.float64)
        if features.ndim != 2 or len(features) < 2:
            raise ValueError(f"Fréchet statistics need features [N >= 2, F], got {tuple(features.shape)}")
        stats = fid_features_to_statistics(features)
        return cls(np.asarray(stats["mu"], np.float64), np.atleast_2d(np.asarray(stats["sigma"], np.float64)),
                   len(features))

    def save(self, path: str | os.PathLike) -> Path:
        """An ``.npz`` with ``mu`` and ``sigma`` (EDM's format), written atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, mu=self.mu, sigma=self.sigma)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, num_features: int | None = None) -> "FrechetStats":
        """Read an ``.npz`` with ``mu`` [F] and ``sigma`` [F, F]; ``num_features``: the width the feature network
        gives, which F must equal. Every problem is a one-line ``ValueError``."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"no file at {path}")
        try:
            data = np.load(path, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise TypeError("a single array, not an archive of named arrays")
            with data:
                keys = sorted(data.files)
                arrays = {k: np.asarray(data[k], np.float64) for k in ("mu", "sigma") if k in keys}
        except Exception as err:
            why = f"{type(err).__name__}: {err}".splitlines()[0]
            raise ValueError(f"{path} is not a readable .npz file ({why})") from None
        if "mu" not in arrays or "sigma" not in arrays:
            raise ValueError(f"{path} holds {keys}; reference statistics need `mu` [F] and `sigma` [F, F] "
                             "(the format of EDM's fid-refs/*.npz)")
        mu, sigma = arrays["mu"], arrays["sigma"]
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise ValueError(f"{path}: `mu` has shape {list(mu.shape)} and `sigma` {list(sigma.shape)}; "
                             "they must be [F] and [F, F]")
        if num_features is not None and len(mu) != int(num_features):
            raise ValueError(f"{path} holds statistics of {len(mu)}-d features, but the feature network gives "
                             f"{int(num_features)}")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise ValueError(f"{path}: `mu` or `sigma` holds non-finite values")
        return cls(mu, sigma, 0)


def frechet_distance(a: FrechetStats, b: FrechetStats) -> float:
    """The Fréchet distance between the Gaussians ``N(a.mu, a.sigma)`` and ``N(b.mu, b.sigma)`` (torch-fidelity's
    ``fid_statistics_to_metric``, float64)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    if a.num_features != b.num_features:
        raise ValueError(f"Fréchet statistics of {a.num_features}-d and {b.num_features}-d features")
    stat = lambda s: {"mu": np.asarray(s.mu, np.float64), "sigma": np.asarray(s.sigma, np.float64)}  # noqa: E731
    return float(fid_statistics_to_metric(stat(a), stat(b), verbose=False)[KEY_METRIC_FID])


# --- reference features (statistics + a subset for precision / recall), cached --------------------------------------

@dataclass
class ReferenceFeatures:
    """The real side of a feature-space comparison: Fréchet statistics and (when real images were seen) a seeded
    subset of their features for precision / recall."""

    stats: FrechetStats
    features: Tensor | None = None

    @property
    def num_features(self) -> int:
        return self.stats.num_features


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(text)).strip("-")[:80]


def _images_digest(images: Tensor) -> str:
    h = hashlib.blake2b(digest_size=8)
    h.update(str((tuple(images.shape), str(images.dtype))).encode())
    h.update(memoryview(images.detach().cpu().contiguous().numpy()).cast("B"))
    return h.hexdigest()


def reference_cache_path(cache_dir: str | os.PathLike, images: Tensor, dataset: str, split: str, net_key: str,
                         keep_rows: int | None) -> Path:
    """``<cache_dir>/fid_ref_<dataset>_<split><N>_<network>_<digest>.npz``; the digest covers the images, the network
    key and ``keep_rows``, so that a changed data set, split or network never reads a stale file."""
    digest = hashlib.blake2b(f"{_images_digest(images)}|{net_key}|{keep_rows}".encode(), digest_size=8).hexdigest()
    name = f"fid_ref_{_slug(dataset)}_{_slug(split)}{len(images)}_{_slug(net_key)}_{digest}.npz"
    return Path(cache_dir) / name


def reference_features(net: FeatureNet, images: Tensor, *, keep_rows: int | None = 2000,
                       cache_dir: str | os.PathLike | None = None, dataset: str = "data", split: str = "heldout",
                       batch_size: int = 250, device: str | torch.device | None = None, progress: bool = False,
                       desc: str | None = None) -> ReferenceFeatures:
    """Features of the real ``images`` through ``net``: their Fréchet statistics and a subset of ``keep_rows`` rows
    (seed 0; all rows when None) for precision / recall. With ``cache_dir``, read from / written to
    :func:`reference_cache_path` (keys ``mu``, ``sigma`` as in EDM's files, plus ``features``, ``count``, ``key``)."""
    key = network_key(net)
    path = None
    if cache_dir is not None:
        path = reference_cache_path(cache_dir, images, dataset, split, key, keep_rows)
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as data:
                    if str(data["key"]) == key:
                        stats = FrechetStats(np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64),
                                             int(data["count"]))
                        log.info("reference features of %s/%s loaded from %s", dataset, split, path)
                        return ReferenceFeatures(stats, torch.from_numpy(np.asarray(data["features"], np.float32)))
            except Exception as err:  # a corrupt or foreign file: recompute and overwrite it
                log.warning("could not read reference features %s (%s): recomputing", path, err)
    feats = extract_features(net, images.detach().clamp(-1, 1), batch_size=batch_size, device=device, progress=progress,
                             desc=desc or f"reference features ({dataset} {split}, {len(images)} images)")
    ref = ReferenceFeatures(FrechetStats.from_features(feats),
                            _subsample(feats, keep_rows, torch.Generator().manual_seed(0)).clone())
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, mu=ref.stats.mu, sigma=ref.stats.sigma, features=ref.features.numpy(), count=ref.stats.count,
                 key=np.array(key))
        os.replace(tmp, path)  # atomic: a concurrent run never reads a half-written file
    return ref


def feature_metrics(fake: Tensor, reference: ReferenceFeatures, *, prdc_k: int = 5, prdc_points: int = 2000,
                    generator: torch.Generator | None = None) -> dict[str, float]:
    """``fd`` (Fréchet distance to ``reference.stats``) and, when ``reference.features`` is there, k-NN precision /
    recall / density / coverage on ``min(prdc_points, N, M)`` rows of each set (seeded; real rows drawn first).
    NaN where there are too few rows."""
    fake = torch.as_tensor(fake).detach().to("cpu", torch.float64)
    out = {"fd": float("nan")}
    if len(fake) >= 2:
        out["fd"] = frechet_distance(FrechetStats.from_features(fake), reference.stats)
    if reference.features is None:
        return out
    g = torch.Generator().manual_seed(0) if generator is None else generator
    n = min(prdc_points, len(reference.features), len(fake))
    if n > prdc_k:
        out.update(prdc_metrics(_subsample(reference.features, n, g), _subsample(fake, n, g), prdc_k))
    else:
        out.update({k: float("nan") for k in PRDC_KEYS})
    return out
