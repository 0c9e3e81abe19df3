"""Image datamodules: sklearn digits, and torchvision MNIST / CIFAR-10 read from small fake directories."""
from __future__ import annotations

import hashlib
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from diffusion_irl.data.datamodules import ToyDataModule
from diffusion_irl.data.images import DigitsDataModule, TorchvisionDataModule
from diffusion_irl.data.toy2d import gmm8

CONF = Path(__file__).resolve().parents[1] / "conf"


# -- fake torchvision directories ---------------------------------------------------------------------------------
def _idx(path: Path, array: np.ndarray) -> None:
    """Write an unsigned-byte IDX file (the MNIST format: magic 0x08 type, ndim, big-endian sizes)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def make_fake_mnist(root: Path, n_train: int = 20, n_test: int = 10, folder: str = "MNIST") -> dict:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        images[0] = 0
        images[1] = 255
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        _idx(raw / f"{split}-images-idx3-ubyte", images)
        _idx(raw / f"{split}-labels-idx1-ubyte", labels)
        out[split] = (images, labels)
    return out


def make_fake_cifar10(root: Path, monkeypatch, per_batch: int = 4, n_test: int = 6) -> dict:
    """Write CIFAR-10's pickled batches and point torchvision's checksum table at the fake files' md5s, so that its
    own integrity check runs unchanged against them."""
    import torchvision.datasets as tvd

    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(1)
    md5 = lambda p: hashlib.md5(p.read_bytes()).hexdigest()  # noqa: E731
    train_list, out = [], {"train": []}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        with open(base / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels, "batch_label": name}, f)
        if name == "test_batch":
            out["test"] = (data, labels)
            test_list = [[name, md5(base / name)]]
        else:
            out["train"].append((data, labels))
            train_list.append([name, md5(base / name)])
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    monkeypatch.setattr(tvd.CIFAR10, "train_list", train_list)
    monkeypatch.setattr(tvd.CIFAR10, "test_list", test_list)
    monkeypatch.setattr(tvd.CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names",
                                              "md5": md5(base / "batches.meta")})
    return out


# -- digits ---------------------------------------------------------------------------------------------------------
def test_digits_shapes_range_and_split():
    dm = DigitsDataModule(n_heldout=300, seed=0, batch_size=64, shape=[1, 8, 8], num_classes=10)
    x_tr, x_he = dm.train_samples(), dm.heldout()
    assert dm.shape == (1, 8, 8) and dm.num_classes == 10 and dm.name == "digits"
    assert x_tr.shape == (1497, 1, 8, 8) and x_he.shape == (300, 1, 8, 8) and x_tr.dtype == torch.float32
    assert x_tr.min() == -1 and x_tr.max() == 1
    assert set(dm.train_labels().unique().tolist()) == set(range(10))
    # the two splits partition the 1797 images exactly (as a multiset: digits has duplicate images)
    from sklearn.datasets import load_digits

    full = Counter(r.tobytes() for r in (load_digits().images / 8 - 1).astype(np.float32).reshape(-1, 64))
    split = Counter(r.tobytes() for r in torch.cat([x_tr, x_he]).reshape(-1, 64).numpy())
    assert split == full
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 8, 8) and y.dtype == torch.long
    torch.testing.assert_close(DigitsDataModule(seed=0).heldout(), x_he)
    assert not torch.equal(DigitsDataModule(seed=1).heldout(), x_he)


def test_digits_declared_keys_are_checked():
    with pytest.raises(ValueError, match="data.shape"):
        DigitsDataModule(shape=[1, 28, 28])
    with pytest.raises(ValueError, match="data.num_classes"):
        DigitsDataModule(num_classes=3)
    assert DigitsDataModule(num_classes=0).num_classes == 0  # labels ignored: unconditional


def test_toy_datamodule_declared_keys_are_checked():
    assert ToyDataModule(gmm8(), n_train=10, n_heldout=10, shape=[2], num_classes=0).shape == (2,)
    with pytest.raises(ValueError, match="data.shape"):
        ToyDataModule(gmm8(), shape=[3])
    with pytest.raises(ValueError, match="data.num_classes"):
        ToyDataModule(gmm8(), num_classes=2)


# -- torchvision ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_fake_mnist_loads_through_torchvision(tmp_path, dataset, folder):
    fake = make_fake_mnist(tmp_path, folder=folder)
    dm = TorchvisionDataModule(dataset, root=tmp_path, batch_size=8, shape=[1, 28, 28], num_classes=10)
    x_tr, x_he = dm.train_samples(), dm.heldout()
    assert x_tr.shape == (20, 1, 28, 28) and x_he.shape == (10, 1, 28, 28)
    torch.testing.assert_close(x_tr[:, 0], torch.from_numpy(fake["train"][0]).float() / 127.5 - 1)
    assert x_tr[0].max() == -1 and x_tr[1].min() == 1
    assert torch.equal(dm.heldout_labels(), torch.from_numpy(fake["t10k"][1]).long())
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 28, 28) and y.shape == (8,)
    limited = TorchvisionDataModule(dataset, root=tmp_path, limit_train=5, limit_heldout=3)
    assert len(limited.train_samples()) == 5 and len(limited.heldout_labels()) == 3


def test_fake_cifar10_loads_through_torchvision(tmp_path, monkeypatch):
    fake = make_fake_cifar10(tmp_path, monkeypatch)
    dm = TorchvisionDataModule("cifar10", root=str(tmp_path), shape=[3, 32, 32], num_classes=10)
    x_tr, x_he = dm.train_samples(), dm.heldout()
    assert x_tr.shape == (20, 3, 32, 32) and x_he.shape == (6, 3, 32, 32)
    first = torch.from_numpy(fake["train"][0][0][0]).float().view(3, 32, 32) / 127.5 - 1  # CIFAR rows are CHW
    torch.testing.assert_close(x_tr[0], first)
    assert dm.heldout_labels().tolist() == fake["test"][1]
    assert -1 <= x_tr.min() and x_tr.max() <= 1


def test_cifar10_corrupted_files_are_one_clear_error(tmp_path, monkeypatch):
    make_fake_cifar10(tmp_path, monkeypatch)
    monkeypatch.undo()  # torchvision's real checksums: the fake files fail its integrity check
    with pytest.raises(ValueError, match="data.root"):
        TorchvisionDataModule("cifar10", root=tmp_path).setup()


@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist", "cifar10"])
def test_missing_root_is_one_clear_error(tmp_path, dataset):
    dm = TorchvisionDataModule(dataset, root=tmp_path / "nowhere")  # lazy: constructing is fine
    with pytest.raises(ValueError, match=r"data\.root=") as err:
        dm.setup()
    assert "data.download=true" in str(err.value)


def test_missing_files_is_one_clear_error(tmp_path):
    make_fake_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(ValueError, match=r"data\.root="):
        TorchvisionDataModule("mnist", root=tmp_path).heldout()


def test_torchvision_declared_keys_are_checked(tmp_path):
    with pytest.raises(ValueError, match="data.shape"):
        TorchvisionDataModule("cifar10", root=tmp_path, shape=[1, 28, 28])
    with pytest.raises(ValueError, match="data.dataset"):
        TorchvisionDataModule("imagenet", root=tmp_path)


@pytest.mark.parametrize("name", ["digits", "mnist", "fashion_mnist", "cifar10", "gmm8"])
def test_data_configs_compose_and_instantiate(tmp_path, name):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("pretrain", overrides=[f"data={name}"] + ([f"data.root={tmp_path}"] if "root" in
                                                                  _keys(name) else []))
    dm = instantiate(cfg.data)
    assert list(dm.shape) == list(cfg.data.shape) and dm.num_classes == cfg.data.num_classes
    assert dm.sigma_data == cfg.data.sigma_data


def _keys(name: str) -> set:
    from omegaconf import OmegaConf

    return set(OmegaConf.load(CONF / "data" / f"{name}.yaml").keys())
