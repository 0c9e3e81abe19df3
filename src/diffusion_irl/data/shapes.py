"""A procedural image law with unlimited samples: one anti-aliased shape on a plain background per image.

Every image is drawn independently from the same law, so the training and held-out splits are exact i.i.d. draws
of any size (two seeded streams, disjoint by construction), and the metrics' floor (two independent real samples)
can be made as small as a table needs. Four classes, the label being the shape:

- 0 disk, 1 square (rotated), 2 triangle (equilateral, rotated), 3 ring.

Each image draws, independently: the centre (uniform in the middle ``[0.3, 0.7]`` of the frame), the size
(circumradius ``[0.2, 0.35]`` of the side), the rotation, the shape's intensity (uniform in ``[0.2, 1]``) and the
background's (uniform in ``[-1, -0.2]``). A pixel's value is ``bg + (fg - bg) * coverage``, the coverage of the pixel
by the shape approximated from its signed distance (``clamp(0.5 - d, 0, 1)`` in pixels: a one-pixel anti-aliased
edge). Pixels lie in ``[-1, 1]``; shape ``(1, R, R)``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from diffusion_irl import seeding
from diffusion_irl.data.datamodules import DiffusionDataModule
from diffusion_irl.data.images import _check_declared

CLASSES = ("disk", "square", "triangle", "ring")


def _rotate(px: Tensor, py: Tensor, angle: Tensor) -> tuple[Tensor, Tensor]:
    c, s = torch.cos(angle), torch.sin(angle)
    return c * px + s * py, -s * px + c * py


def signed_distance(kind: Tensor, px: Tensor, py: Tensor, size: Tensor, angle: Tensor) -> Tensor:
    """Signed distance (negative inside) from the points ``(px, py)`` (relative to the centre; [N, R, R]) to shape
    ``kind`` [N] of circumradius ``size`` [N] rotated by ``angle`` [N] (all per image, broadcast over pixels)."""
    size, angle = size.view(-1, 1, 1), angle.view(-1, 1, 1)
    radius = torch.sqrt(px ** 2 + py ** 2)
    qx, qy = _rotate(px, py, angle)
    disk = radius - size
    half = size / math.sqrt(2.0)  # a square inscribed in the circle of radius `size`
    dx, dy = qx.abs() - half, qy.abs() - half
    square = torch.sqrt(dx.clamp_min(0) ** 2 + dy.clamp_min(0) ** 2) + torch.maximum(dx, dy).clamp_max(0)
    # equilateral triangle inscribed in the circle: the max over its three edges' half-plane distances (exact
    # inside and near the edges, which is all the one-pixel coverage uses)
    edges = [(-qx * math.sin(a) + qy * math.cos(a)) for a in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3,
                                                               math.pi / 2 + 4 * math.pi / 3)]
    triangle = torch.stack(edges).amax(0) - size / 2
    ring = (radius - 0.75 * size).abs() - 0.25 * size
    k = kind.view(-1, 1, 1)
    return torch.where(k == 0, disk, torch.where(k == 1, square, torch.where(k == 2, triangle, ring)))


def render(kind: Tensor, generator: torch.Generator, resolution: int) -> Tensor:
    """Images [N, 1, R, R] in [-1, 1] of the shapes ``kind`` [N], every other factor drawn from ``generator``."""
    n, R = len(kind), int(resolution)
    u = torch.rand(n, 7, generator=generator, dtype=torch.float64)
    cx, cy = (0.3 + 0.4 * u[:, 0]) * R, (0.3 + 0.4 * u[:, 1]) * R
    size = (0.2 + 0.15 * u[:, 2]) * R
    angle = 2 * math.pi * u[:, 3]
    fg, bg = 0.2 + 0.8 * u[:, 4], -1.0 + 0.8 * u[:, 5]
    grid = torch.arange(R, dtype=torch.float64) + 0.5
    py, px = torch.meshgrid(grid, grid, indexing="ij")
    d = signed_distance(kind, px - cx.view(-1, 1, 1), py - cy.view(-1, 1, 1), size, angle)
    coverage = (0.5 - d).clamp(0.0, 1.0)
    img = bg.view(-1, 1, 1) + (fg - bg).view(-1, 1, 1) * coverage
    return img.unsqueeze(1).float()


def sample_shapes(n: int, generator: torch.Generator, resolution: int = 16) -> tuple[Tensor, Tensor]:
    """``n`` draws of the law: ``(images [n, 1, R, R], labels [n])``, classes uniform."""
    labels = torch.randint(len(CLASSES), (int(n),), generator=generator)
    return render(labels, generator, resolution), labels


class ShapesDataModule(DiffusionDataModule):
    """The procedural shapes law (see the module doc) at ``resolution`` x ``resolution``, 4 classes.

    Args:
        n_train, n_heldout: sizes of the two splits: independent draws from streams seeded by ``("shapes", "train",
            seed)`` and ``("shapes", "heldout", seed)``.
        resolution: the side R of the images (>= 8).
        classifier_reserve: the first N training images are not shown to the evaluator's feature classifier; image
            model selection (grid, GITS, pathwise) scores against them, images the classifier has not memorised
            (0: it trains on every training image, and selection compares with images it has seen).
    """

    name = "shapes"

    def __init__(self, n_train: int = 20_000, n_heldout: int = 10_000, resolution: int = 16, seed: int = 0,
                 batch_size: int = 128, num_workers: int = 0, sigma_data: float = 0.5,
                 shape: Sequence[int] | None = None, num_classes: int | None = None, classifier_reserve: int = 0):
        super().__init__(batch_size=batch_size, num_workers=num_workers, sigma_data=sigma_data)
        if isinstance(resolution, bool) or int(resolution) != resolution or resolution < 8:
            raise ValueError(f"data.resolution must be an integer >= 8, got {resolution}")
        if n_train <= 0 or n_heldout <= 0:
            raise ValueError(f"data.n_train and data.n_heldout must be > 0, got {n_train} and {n_heldout}")
        self.resolution, self.n_train, self.n_heldout, self.seed = int(resolution), int(n_train), int(n_heldout), int(seed)
        self.num_classes = _check_declared(self.name, shape, num_classes, self.shape, len(CLASSES))
        if isinstance(classifier_reserve, bool) or int(classifier_reserve) != classifier_reserve \
                or not 0 <= classifier_reserve < n_train:
            raise ValueError(f"data.classifier_reserve must be an integer in [0, n_train = {n_train}), got "
                             f"{classifier_reserve}")
        self.classifier_reserve = int(classifier_reserve)

    @property
    def shape(self) -> tuple[int, ...]:
        return (1, self.resolution, self.resolution)

    def _load(self):
        train = sample_shapes(self.n_train, seeding.generator("shapes", "train", self.seed), self.resolution)
        held = sample_shapes(self.n_heldout, seeding.generator("shapes", "heldout", self.seed), self.resolution)
        return train, held
