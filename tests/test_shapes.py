"""The procedural shapes law (data/shapes.py): geometry checked against closed forms, seeded i.i.d. splits, config."""
from __future__ import annotations

import math

import pytest
import torch

from diffusion_irl.data.shapes import CLASSES, ShapesDataModule, render, sample_shapes, signed_distance

from .helpers import compose_config


def _centred(kind: int, size: float, R: int = 64, angle: float = 0.3):
    grid = torch.arange(R, dtype=torch.float64) + 0.5
    py, px = torch.meshgrid(grid, grid, indexing="ij")
    d = signed_distance(torch.tensor([kind]), (px - R / 2)[None], (py - R / 2)[None], torch.tensor([size],
                        dtype=torch.float64), torch.tensor([angle], dtype=torch.float64))
    return (0.5 - d).clamp(0, 1).sum().item()  # the shape's area in pixels (anti-aliased coverage)


@pytest.mark.parametrize("kind, area", [
    (0, lambda r: math.pi * r ** 2),                                  # disk of radius r
    (1, lambda r: 2 * r ** 2),                                        # square inscribed in the circle of radius r
    (2, lambda r: 3 * math.sqrt(3) / 4 * r ** 2),                     # equilateral triangle inscribed in it
    (3, lambda r: math.pi * (r ** 2 - (0.5 * r) ** 2)),               # ring between 0.5 r and r
])
def test_each_shape_covers_its_closed_form_area(kind, area):
    """The coverage of a large centred shape sums to its exact area (within 2%), whatever its rotation."""
    for angle in (0.0, 0.7):
        assert _centred(kind, 20.0, angle=angle) == pytest.approx(area(20.0), rel=0.02)


def test_law_range_classes_and_determinism():
    x, y = sample_shapes(4000, torch.Generator().manual_seed(1), 16)
    assert x.shape == (4000, 1, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and torch.isfinite(x).all()
    counts = torch.bincount(y, minlength=len(CLASSES))
    assert len(counts) == 4 and (counts > 850).all()  # uniform classes (1000 expected each)
    x2, y2 = sample_shapes(4000, torch.Generator().manual_seed(1), 16)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    # every image has a foreground brighter than its background: its brightest pixel beats its darkest
    flat = x.flatten(1)
    assert (flat.amax(1) - flat.amin(1) > 0.3).all()


def test_rings_have_a_hole_and_disks_do_not():
    """The centre pixel of a centred ring is background; of a disk, foreground (labels are what they say)."""
    g = torch.Generator().manual_seed(0)
    img = render(torch.tensor([0, 3] * 50), g, 32)
    centre = img[:, 0, 14:18, 14:18].mean((1, 2))  # centres are within [0.3, 0.7] of the frame
    edges = img[:, 0, 0, :].mean(1)                # the top row is always background
    disk, ring = (centre - edges)[0::2], (centre - edges)[1::2]
    assert (disk > 0.1).float().mean() > 0.9 and (ring.abs() < disk.abs()).float().mean() > 0.7


def test_splits_are_independent_seeded_draws_of_the_requested_sizes():
    dm = ShapesDataModule(n_train=300, n_heldout=200, resolution=8)
    dm.setup()
    assert dm.train_samples().shape == (300, 1, 8, 8) and dm.heldout().shape == (200, 1, 8, 8)
    assert dm.num_classes == 4 and dm.train_labels().max() <= 3
    assert not torch.equal(dm.train_samples()[:200], dm.heldout())
    again = ShapesDataModule(n_train=300, n_heldout=200, resolution=8)
    assert torch.equal(again.train_samples(), dm.train_samples())  # a pure function of the seed
    other = ShapesDataModule(n_train=300, n_heldout=200, resolution=8, seed=1)
    assert not torch.equal(other.train_samples(), dm.train_samples())
    # the held-out split does not depend on the training split's size (its own stream)
    bigger = ShapesDataModule(n_train=500, n_heldout=200, resolution=8)
    assert torch.equal(bigger.heldout(), dm.heldout())


@pytest.mark.parametrize("kwargs, match", [
    ({"resolution": 4}, "data.resolution"), ({"resolution": 12.5}, "data.resolution"),
    ({"n_heldout": 0}, "data.n_train and data.n_heldout"), ({"shape": [1, 8, 8]}, "data.shape"),
    ({"num_classes": 10}, "data.num_classes"), ({"n_train": 100, "classifier_reserve": 100}, "classifier_reserve"),
    ({"classifier_reserve": -1}, "classifier_reserve"),
])
def test_bad_settings_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShapesDataModule(**kwargs)


def test_shapes_config_resolution_sets_the_shape(tmp_path):
    cfg = compose_config("pretrain", ["data=shapes", "data.resolution=12", "denoiser=unet"], output_dir=tmp_path)
    assert list(cfg.data.shape) == [1, 12, 12] and list(cfg.denoiser.shape) == [1, 12, 12]
    from hydra.utils import instantiate

    dm = instantiate(cfg.data)
    assert dm.shape == (1, 12, 12) and dm.num_classes == cfg.data.num_classes == 4
