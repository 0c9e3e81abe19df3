"""LightningDataModules for every data set.

Contract shared by all of them (the evaluator and the pretraining job rely on it):

- ``shape``: the shape of one sample, e.g. ``(2,)`` or ``(1, 8, 8)``; ``sigma_data``: the data std used by
  EDM preconditioning; ``num_classes``: 0 for unlabelled data; ``law``: an exact :class:`~diffusion_irl.data.toy2d.Law`
  or ``None``.
- ``train_dataloader()`` / ``val_dataloader()`` yield ``(x, y)`` batches: ``x`` float [B, *shape], ``y`` long [B]
  (zeros for unlabelled data). The validation split is the held-out split.
- ``heldout(n)``: the first ``n`` held-out samples as one tensor (metrics are computed against these, never against
  training data); ``train_samples(n)``: the first ``n`` training samples.
- ``exact_samples(n, generator)``: fresh draws from the exact law (the evaluator's ``reference`` row); raises where
  the law is unknown.
"""
from __future__ import annotations

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from diffusion_irl import seeding
from diffusion_irl.data.toy2d import Law


class DiffusionDataModule(L.LightningDataModule):
    """Base class: subclasses fill ``_train`` and ``_heldout`` (pairs of tensors x, y) in ``_load``."""

    name: str = "data"
    law: Law | None = None
    num_classes: int = 0
    # images: the first classifier_reserve training points are never shown to the evaluator's feature classifier;
    # model selection in its features (grid, GITS, pathwise) scores against them (evaluation.feature_classifier_for)
    classifier_reserve: int = 0

    def __init__(self, batch_size: int = 512, num_workers: int = 0, sigma_data: float = 0.5):
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"data.batch_size must be > 0, got {batch_size}")
        if sigma_data <= 0:
            raise ValueError(f"data.sigma_data must be > 0, got {sigma_data}")
        self.batch_size, self.num_workers, self.sigma_data = int(batch_size), int(num_workers), float(sigma_data)
        self._train: tuple[Tensor, Tensor] | None = None
        self._heldout: tuple[Tensor, Tensor] | None = None

    # -- subclasses -------------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:  # pragma: no cover - interface
        raise NotImplementedError

    def _load(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:  # pragma: no cover - interface
        """Return ``((x_train, y_train), (x_heldout, y_heldout))``."""
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self._train is None:
            self._train, self._heldout = self._load()

    def _loader(self, split: tuple[Tensor, Tensor], shuffle: bool) -> DataLoader:
        return DataLoader(
            TensorDataset(*split), batch_size=self.batch_size, shuffle=shuffle, drop_last=shuffle,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self._train, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self._heldout, shuffle=False)

    def heldout(self, n: int | None = None) -> Tensor:
        self.setup()
        return self._take(self._heldout[0], n, "held-out")

    def heldout_labels(self, n: int | None = None) -> Tensor:
        self.setup()
        return self._take(self._heldout[1], n, "held-out")

    def train_samples(self, n: int | None = None) -> Tensor:
        self.setup()
        return self._take(self._train[0], n, "training")

    def train_labels(self, n: int | None = None) -> Tensor:
        self.setup()
        return self._take(self._train[1], n, "training")

    def _take(self, x: Tensor, n: int | None, what: str) -> Tensor:
        if n is None:
            return x
        if n > len(x):
            raise ValueError(f"{self.name}: asked for {n} {what} samples but the split holds {len(x)}")
        return x[:n]

    def exact_samples(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        if self.law is None:
            raise ValueError(f"data={self.name} has no exact sampler")
        return self.law.sample(n, generator=generator)


class ToyDataModule(DiffusionDataModule):
    """A 2D law: training and held-out sets are separate exact draws (different seeds).

    Args:
        law: the exact law (``diffusion_irl.data.toy2d``).
        n_train, n_heldout: sizes of the two draws.
        seed: the training draw uses ``seed``, the held-out draw ``derive_seed("heldout", seed)``.
        shape, num_classes: optional declarations (the data config states them for interpolation into other
            configs); checked against the law (``[law.dim]``, 0), a mismatch is a ``ValueError``.
    """

    def __init__(self, law: Law, n_train: int = 50_000, n_heldout: int = 10_000, seed: int = 0,
                 batch_size: int = 512, num_workers: int = 0, sigma_data: float = 1.0, name: str | None = None,
                 shape: list[int] | tuple[int, ...] | None = None, num_classes: int | None = None):
        super().__init__(batch_size=batch_size, num_workers=num_workers, sigma_data=sigma_data)
        if n_train <= 0 or n_heldout <= 0:
            raise ValueError(f"data.n_train and data.n_heldout must be > 0, got {n_train} and {n_heldout}")
        self.law, self.n_train, self.n_heldout, self.seed = law, int(n_train), int(n_heldout), int(seed)
        self.name = name or getattr(law, "name", "toy2d")
        if shape is not None and tuple(int(s) for s in shape) != self.shape:
            raise ValueError(f"data.shape={list(shape)} does not match the law {self.name}: its samples have shape "
                             f"{list(self.shape)}")
        if num_classes is not None and int(num_classes) != 0:
            raise ValueError(f"data.num_classes={num_classes}, but the 2D law {self.name} is unlabelled (use 0)")

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.law.dim,)

    def _load(self):
        g_train = torch.Generator().manual_seed(self.seed)
        g_held = seeding.generator("heldout", self.seed)
        x_train = self.law.sample(self.n_train, generator=g_train)
        x_held = self.law.sample(self.n_heldout, generator=g_held)
        zeros = lambda x: torch.zeros(len(x), dtype=torch.long)  # noqa: E731
        return (x_train, zeros(x_train)), (x_held, zeros(x_held))
