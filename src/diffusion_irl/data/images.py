"""Image data sets as :class:`~diffusion_irl.data.datamodules.DiffusionDataModule` s (pixels in [-1, 1], NCHW).

- :class:`DigitsDataModule`: scikit-learn's 8x8 digits (1797 images shipped inside the wheel: works offline),
  a fixed seeded permutation split into training and held-out sets.
- :class:`TorchvisionDataModule`: MNIST, Fashion-MNIST or CIFAR-10 read by torchvision from a local ``root``
  (torchvision's on-disk layout); the train split trains, the test split is held out. Each split is loaded once
  into one tensor.

Both accept the ``shape`` / ``num_classes`` keys of their data config and check them against the data. ``num_classes``
may also be 0: the labels are then ignored by the denoiser (unconditional training on labelled data).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from diffusion_irl.data.datamodules import DiffusionDataModule


def _check_declared(name: str, shape: Sequence[int] | None, num_classes: int | None,
                    true_shape: tuple[int, ...], true_classes: int) -> int:
    """Check the config's ``shape`` / ``num_classes`` against the data; return the number of classes to use."""
    if shape is not None and tuple(int(s) for s in shape) != true_shape:
        raise ValueError(f"data.shape={list(shape)} does not match {name}, whose images have shape {list(true_shape)}")
    if num_classes is None:
        return true_classes
    if int(num_classes) not in (0, true_classes):
        raise ValueError(f"data.num_classes={num_classes} does not match {name}, which has {true_classes} classes "
                         "(use 0 to ignore the labels)")
    return int(num_classes)


def _to_unit_range(x: Tensor, max_value: float) -> Tensor:
    """Integers in ``[0, max_value]`` -> float32 in ``[-1, 1]``."""
    return x.float().mul_(2.0 / max_value).sub_(1.0)


class DigitsDataModule(DiffusionDataModule):
    """scikit-learn ``load_digits``: 1797 images, values 0..16 mapped to [-1, 1], shape (1, 8, 8), 10 classes.

    Args:
        n_heldout: size of the held-out split (the first ``n_heldout`` indices of a permutation seeded by ``seed``;
            the rest trains).
    """

    name = "digits"

    def __init__(self, n_heldout: int = 300, seed: int = 0, batch_size: int = 128, num_workers: int = 0,
                 sigma_data: float = 0.5, shape: Sequence[int] | None = None, num_classes: int | None = None):
        super().__init__(batch_size=batch_size, num_workers=num_workers, sigma_data=sigma_data)
        if not 0 < n_heldout < 1797:
            raise ValueError(f"data.n_heldout must lie in 1..1796 (digits has 1797 images), got {n_heldout}")
        self.n_heldout, self.seed = int(n_heldout), int(seed)
        self.num_classes = _check_declared(self.name, shape, num_classes, self.shape, 10)

    @property
    def shape(self) -> tuple[int, ...]:
        return (1, 8, 8)

    def _load(self):
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = _to_unit_range(torch.from_numpy(np.ascontiguousarray(digits.images)), 16.0).unsqueeze(1)
        y = torch.from_numpy(np.asarray(digits.target)).long()
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        held, train = perm[: self.n_heldout], perm[self.n_heldout:]
        return (x[train], y[train]), (x[held], y[held])


# dataset key -> (torchvision class name, image shape, number of classes, folder torchvision reads under root)
_TORCHVISION = {
    "mnist": ("MNIST", (1, 28, 28), 10, "MNIST/raw"),
    "fashion_mnist": ("FashionMNIST", (1, 28, 28), 10, "FashionMNIST/raw"),
    "cifar10": ("CIFAR10", (3, 32, 32), 10, "cifar-10-batches-py"),
}


class TorchvisionDataModule(DiffusionDataModule):
    """MNIST / Fashion-MNIST / CIFAR-10 from torchvision's files under a local ``root``.

    Args:
        dataset: ``mnist``, ``fashion_mnist`` or ``cifar10``.
        root: directory holding torchvision's layout (``<root>/MNIST/raw/train-images-idx3-ubyte`` ...,
            ``<root>/cifar-10-batches-py/data_batch_1`` ...).
        download: let torchvision download missing files (in ``prepare_data``; needs internet).
        limit_train, limit_heldout: keep only the first n images of the split (None: all).
    """

    def __init__(self, dataset: str, root: str | os.PathLike = "./data", download: bool = False,
                 limit_train: int | None = None, limit_heldout: int | None = None, batch_size: int = 128,
                 num_workers: int = 0, sigma_data: float = 0.5, shape: Sequence[int] | None = None,
                 num_classes: int | None = None, name: str | None = None):
        super().__init__(batch_size=batch_size, num_workers=num_workers, sigma_data=sigma_data)
        if dataset not in _TORCHVISION:
            raise ValueError(f"data.dataset must be one of {sorted(_TORCHVISION)}, got {dataset!r}")
        for key, value in (("limit_train", limit_train), ("limit_heldout", limit_heldout)):
            if value is not None and value <= 0:
                raise ValueError(f"data.{key} must be > 0 or null, got {value}")
        self.dataset, self.root, self.download = dataset, os.fspath(root), bool(download)
        self.limit_train, self.limit_heldout = limit_train, limit_heldout
        self.name = name or dataset
        cls_name, self._shape, n_classes, self._folder = _TORCHVISION[dataset]
        self.num_classes = _check_declared(self.name, shape, num_classes, self._shape, n_classes)

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    def _dataset(self, train: bool, download: bool = False):
        import torchvision.datasets as tvd

        cls = getattr(tvd, _TORCHVISION[self.dataset][0])
        where = os.path.join(self.root, self._folder)
        if not download and not os.path.isdir(where):
            raise ValueError(self._missing(f"{where} does not exist"))
        try:
            return cls(self.root, train=train, download=download)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted ..."
            raise ValueError(self._missing(f"torchvision found no usable files under {where} ({err})")) from None

    def _missing(self, what: str) -> str:
        return (f"data={self.name}: {what}. Point data.root=<dir> at a directory holding torchvision's "
                f"{_TORCHVISION[self.dataset][0]} files (expected under <root>/{self._folder}/), or set "
                "data.download=true on a machine with internet access")

    def prepare_data(self) -> None:
        if self.download:
            for train in (True, False):
                self._dataset(train, download=True)

    def _split(self, train: bool, limit: int | None) -> tuple[Tensor, Tensor]:
        ds = self._dataset(train)
        data = torch.as_tensor(np.asarray(ds.data)) if not isinstance(ds.data, Tensor) else ds.data
        data = data[:limit] if limit is not None else data
        if data.ndim == 3:  # MNIST-like: [N, H, W]
            data = data.unsqueeze(1)
        else:  # CIFAR: [N, H, W, C]
            data = data.permute(0, 3, 1, 2)
        x = _to_unit_range(data.contiguous(), 255.0)
        y = torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)[: len(x)]
        if tuple(x.shape[1:]) != self._shape:
            raise ValueError(f"data={self.name}: files under {self.root} hold images of shape {tuple(x.shape[1:])}, "
                             f"expected {self._shape}")
        return x, y

    def _load(self):
        return self._split(True, self.limit_train), self._split(False, self.limit_heldout)
