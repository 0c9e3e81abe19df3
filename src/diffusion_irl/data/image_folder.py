"""EDM-style image data sets (the output of NVlabs/edm's ``dataset_tool.py``) as a
:class:`~diffusion_irl.data.datamodules.DiffusionDataModule`.

Layout: a zip file or a directory holding image files (PNG, any depth of subfolders, e.g. ``00000/img00000000.png``)
and optionally ``dataset.json`` = ``{"labels": [[relative file name, integer label], ...]}`` (or ``"labels": null``).
Images are taken in sorted order of their relative names (as EDM does), must all be ``resolution`` x ``resolution``
with ``channels`` channels (no resizing: ``dataset_tool.py`` resizes), and are scaled to [-1, 1].

Such data sets have no test split: a seeded permutation holds out ``heldout`` images (the metrics' reference) and
the rest trains, disjoint. Only the images the two splits need are decoded (``limit_train`` caps the training split,
which matters for ImageNet: 1.28M images would take 63 GB as float32).
"""
from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from diffusion_irl.config import ConfigError
from diffusion_irl.data.datamodules import DiffusionDataModule
from diffusion_irl.data.images import _to_unit_range

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


class _Files:
    """The files of a zip or a directory, by relative POSIX name."""

    def __init__(self, path: str):
        self.path = path
        self.zip = zipfile.ZipFile(path) if os.path.isfile(path) else None
        if self.zip is not None:
            self.names = [n for n in self.zip.namelist() if not n.endswith("/")]
        else:
            root = Path(path)
            self.names = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]

    def read(self, name: str) -> bytes:
        if self.zip is not None:
            return self.zip.read(name)
        return (Path(self.path) / name).read_bytes()

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()


class ImageFolderDataModule(DiffusionDataModule):
    """Images from an EDM ``dataset_tool.py`` zip or directory, with the labels of its ``dataset.json``.

    Args:
        path: the zip file or the directory; a relative path is taken under ``root`` when ``root`` is set.
        root: the directory of data sets (``data.root``, as for the torchvision data sets), or None.
        resolution, channels: every image's size and channel count (1: grayscale, 3: RGB); a mismatch is an error.
        num_classes: 0 ignores the labels (unconditional); > 0 needs ``dataset.json`` labels in ``0..num_classes-1``.
        heldout: size of the held-out split (the first ``heldout`` indices of a permutation seeded by ``seed``).
        limit_train: keep only the first n images of the training split (None: all the others).
        shape: optional declaration (``[channels, resolution, resolution]``), checked.
        name: the data set's name (the feature classifier's cache file uses it); default: the path's stem.
    """

    def __init__(self, path: str | os.PathLike, resolution: int, channels: int = 3, num_classes: int = 0,
                 heldout: int = 10_000, limit_train: int | None = None, seed: int = 0, batch_size: int = 128,
                 num_workers: int = 0, sigma_data: float = 0.5, shape: Sequence[int] | None = None,
                 name: str | None = None, root: str | os.PathLike | None = None):
        super().__init__(batch_size=batch_size, num_workers=num_workers, sigma_data=sigma_data)
        checks = (("resolution", resolution, 1), ("channels", channels, 1), ("num_classes", num_classes, 0),
                  ("heldout", heldout, 1), ("seed", seed, 0))
        for key, value, low in checks:
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"data.{key}: must be an integer >= {low}, got {value!r}")
        if channels not in (1, 3):
            raise ConfigError(f"data.channels: must be 1 (grayscale) or 3 (RGB), got {channels}")
        if limit_train is not None and (not isinstance(limit_train, int) or limit_train < 1):
            raise ConfigError(f"data.limit_train: must be a positive integer or null, got {limit_train!r}")
        if path is None or not str(path):
            raise ConfigError("data.path: not set (a dataset_tool.py zip or a directory of images)")
        path = os.path.expanduser(os.fspath(path))
        if root is not None and str(root) and not os.path.isabs(path):
            path = os.path.join(os.path.expanduser(os.fspath(root)), path)
        self.path = path
        self.resolution, self.channels, self.num_classes = int(resolution), int(channels), int(num_classes)
        self.n_heldout, self.limit_train, self.seed = int(heldout), limit_train, int(seed)
        if shape is not None and [int(s) for s in shape] != list(self.shape):
            raise ConfigError(f"data.shape={list(shape)} does not match data.channels={channels} and "
                              f"data.resolution={resolution} (shape {list(self.shape)})")
        self.name = name or Path(self.path.rstrip("/")).name.removesuffix(".zip") or "image_folder"

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.channels, self.resolution, self.resolution)

    # -- reading --------------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """The path must exist (checked before any network is loaded)."""
        if not os.path.exists(self.path):
            raise ConfigError(f"data.path: no such file or directory: {self.path} (a dataset_tool.py zip or a "
                              "directory of images)")
        if os.path.isfile(self.path) and not zipfile.is_zipfile(self.path):
            raise ConfigError(f"data.path: {self.path} is neither a zip file nor a directory")

    def _labels(self, files: _Files, images: list[str]) -> Tensor:
        meta = "dataset.json" if "dataset.json" in files.names else None
        raw = None
        if meta is not None:
            try:
                raw = json.loads(files.read(meta)).get("labels")
            except (ValueError, AttributeError) as exc:
                raise ConfigError(f"data.path: {self.path}: dataset.json is not a JSON object with `labels` "
                                  f"({type(exc).__name__})") from None
        if self.num_classes == 0:
            return torch.zeros(len(images), dtype=torch.long)
        if raw is None:
            raise ConfigError(f"data.num_classes={self.num_classes}, but {self.path} has no labels (dataset.json "
                              "with `labels`): use data.num_classes=0")
        table = {str(k).replace("\\", "/"): v for k, v in raw}
        missing = [n for n in images if n not in table]
        if missing:
            raise ConfigError(f"data.path: dataset.json of {self.path} has no label for {missing[0]} "
                              f"({len(missing)} images without one)")
        values = [table[n] for n in images]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"data.path: dataset.json of {self.path} holds non-integer labels; only class indices "
                              "are supported")
        y = torch.tensor(values, dtype=torch.long)
        if int(y.min()) < 0 or int(y.max()) >= self.num_classes:
            raise ConfigError(f"data.num_classes={self.num_classes}, but the labels of {self.path} span "
                              f"{int(y.min())}..{int(y.max())}")
        return y

    def _decode(self, files: _Files, name: str) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(files.read(name))) as img:
                if img.mode == "LA":
                    img = img.convert("L")
                elif img.mode not in ("L", "RGB"):
                    img = img.convert("RGB")
                array = np.array(img, dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as exc:
            raise ConfigError(f"data.path: {name} in {self.path} is not a readable image ({type(exc).__name__})") \
                from None
        if array.ndim == 2:
            array = array[:, :, None]
        h, w, c = array.shape
        if (h, w) != (self.resolution, self.resolution):
            raise ConfigError(f"data.resolution={self.resolution}, but {name} in {self.path} is {w}x{h}")
        if c != self.channels:
            raise ConfigError(f"data.channels={self.channels}, but {name} in {self.path} has {c} channel(s)")
        return array.transpose(2, 0, 1)

    def _load(self):
        self.prepare_data()
        files = _Files(self.path)
        try:
            images = sorted(n for n in files.names if n.lower().endswith(IMAGE_EXTENSIONS))
            if not images:
                raise ConfigError(f"data.path: no images ({', '.join(IMAGE_EXTENSIONS)}) in {self.path}")
            if self.n_heldout >= len(images):
                raise ConfigError(f"data.heldout={self.n_heldout} must be below the number of images in "
                                  f"{self.path} ({len(images)})")
            y = self._labels(files, images)
            self._decode(files, images[0])  # a wrong resolution / channel count fails before decoding the rest
            perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.seed))
            held, train = perm[: self.n_heldout], perm[self.n_heldout:]
            if self.limit_train is not None:
                train = train[: self.limit_train]

            def split(idx: Tensor) -> tuple[Tensor, Tensor]:
                x = torch.empty((len(idx), *self.shape), dtype=torch.uint8)
                for row, i in enumerate(idx.tolist()):
                    x[row] = torch.from_numpy(np.ascontiguousarray(self._decode(files, images[i])))
                return _to_unit_range(x, 255.0), y[idx]

            return split(train), split(held)
        finally:
            files.close()
