"""denoiser=edm (NVlabs/edm network pickles), data=image_folder (EDM's dataset_tool.py output), the edm_* presets
and slurm/evaluate.sbatch.

Nothing is downloaded: each test writes a stand-in EDM repository (``torch_utils/``, ``dnnlib/``,
``training/networks.py`` with a tiny ``EDMPrecond`` that has the call and the attributes of EDM's), pickles
``{"ema": net, ...}`` with that repository on ``sys.path``, then takes it off ``sys.path`` and out of ``sys.modules``
so that loading must go through ``denoiser.repo``. (EDM's real ``torch_utils.persistence`` also embeds each class's
source in the pickle; the stand-in pickles by reference, which needs the same modules at load time.)
"""
from __future__ import annotations

import importlib
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_irl.config import ConfigError, build

from .conftest import CONF, ROOT
from .helpers import compose_config

pytestmark = pytest.mark.usefixtures("one_thread")

EDM_MODULES = ("torch_utils", "dnnlib", "training")

NETWORKS_PY = '''
"""A tiny stand-in for EDM's training/networks.py: EDMPrecond's call, attributes and float16 switch."""
import numpy as np
import torch
from torch.nn import functional as F

import dnnlib
from torch_utils import persistence


@persistence.persistent_class
class TinyModel(torch.nn.Module):
    def __init__(self, channels, label_dim):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.noise = torch.nn.Linear(1, channels)
        self.label = torch.nn.Linear(label_dim, channels, bias=False) if label_dim else None

    def forward(self, x, noise_labels, class_labels=None):
        dt = x.dtype  # weights cast to the input's dtype, as EDM's layers do
        h = F.conv2d(x, self.conv.weight.to(dt), self.conv.bias.to(dt), padding=1)
        emb = F.linear(noise_labels.reshape(-1, 1).to(dt), self.noise.weight.to(dt), self.noise.bias.to(dt))
        if self.label is not None:
            emb = emb + F.linear(class_labels.to(dt), self.label.weight.to(dt))
        return h + emb[:, :, None, None]


@persistence.persistent_class
class EDMPrecond(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0,
                 sigma_max=float("inf"), sigma_data=0.5):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16, self.sigma_min, self.sigma_max, self.sigma_data = use_fp16, sigma_min, sigma_max, sigma_data
        self.model = TinyModel(img_channels, label_dim)
        self.calls = dnnlib.EasyDict(last_dtype=None)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        class_labels = None if self.label_dim == 0 else torch.zeros([1, self.label_dim], device=x.device) \\
            if class_labels is None else class_labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype = torch.float16 if (self.use_fp16 and not force_fp32) else torch.float32  # EDM: also x on CUDA
        self.calls.last_dtype = dtype
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        assert F_x.dtype == dtype
        return c_skip * x + c_out * F_x.to(torch.float32)
'''


def _purge_edm_modules() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in EDM_MODULES:
            del sys.modules[name]


@pytest.fixture(autouse=True)
def _restore_sys_path():
    """The loader leaves denoiser.repo on sys.path (copies of the network import from it): undo that per test."""
    saved = list(sys.path)
    _purge_edm_modules()
    yield
    sys.path[:] = saved
    _purge_edm_modules()


def make_repo(root: Path, networks: bool = True) -> Path:
    repo = root / "edm"
    (repo / "torch_utils").mkdir(parents=True)
    (repo / "torch_utils" / "__init__.py").write_text("")
    (repo / "torch_utils" / "persistence.py").write_text(
        '"""Stand-in: EDM\'s persistence embeds the source of each decorated class in the pickle."""\n'
        "def persistent_class(cls):\n    return cls\n")
    (repo / "dnnlib").mkdir()
    (repo / "dnnlib" / "__init__.py").write_text(
        "class EasyDict(dict):\n"
        "    def __getattr__(self, name):\n        return self[name]\n"
        "    def __setattr__(self, name, value):\n        self[name] = value\n")
    if networks:
        (repo / "training").mkdir()
        (repo / "training" / "__init__.py").write_text("")
        (repo / "training" / "networks.py").write_text(NETWORKS_PY)
    return repo


def _one_hot(labels: torch.Tensor, n: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, n).float()


def make_pickle(repo: Path, path: Path, channels: int = 3, resolution: int = 8, label_dim: int = 0,
                use_fp16: bool = False, seed: int = 0, batch: int = 4) -> dict:
    """Pickle ``{"ema": EDMPrecond(...), ...}`` with ``repo`` importable, compute the network's own outputs on a
    few inputs, then take the repository off sys.path. Returns the inputs and outputs."""
    sys.path.insert(0, str(repo))
    importlib.invalidate_caches()
    try:
        networks = importlib.import_module("training.networks")
        torch.manual_seed(seed)
        net = networks.EDMPrecond(resolution, channels, label_dim=label_dim, use_fp16=use_fp16).eval()
        g = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(batch, channels, resolution, resolution, generator=g)
        sigma = torch.tensor([0.01, 0.5, 2.0, 80.0])[:batch]
        labels = torch.arange(batch) % max(label_dim, 1)
        with torch.no_grad():
            ref = {"x": x, "sigma": sigma, "labels": labels,
                   "plain": net(x, sigma, class_labels=_one_hot(labels, label_dim) if label_dim else None),
                   "null": net(x, sigma)}
            for fp16 in (False, True):
                net.use_fp16 = fp16
                ref[f"fp16={fp16}"] = net(x, sigma, class_labels=_one_hot(labels, label_dim) if label_dim else None)
            net.use_fp16 = use_fp16
        with open(path, "wb") as f:
            pickle.dump({"ema": net, "loss_fn": None, "augment_pipe": None,
                         "dataset_kwargs": {"resolution": resolution}}, f)
    finally:
        sys.path.remove(str(repo))
        _purge_edm_modules()
    return ref


def edm_overrides(pkl: Path, repo: Path | None, *extra: str) -> list[str]:
    return ["denoiser=edm", f"denoiser.path={pkl}", *([f"denoiser.repo={repo}"] if repo else []), *extra]


# -- loading ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("label_dim", [0, 3])
def test_edm_pickle_loads_and_matches_the_network(label_dim, tmp_path):
    repo = make_repo(tmp_path)
    pkl = tmp_path / "net.pkl"
    ref = make_pickle(repo, pkl, label_dim=label_dim)
    assert str(repo) not in sys.path and "training.networks" not in sys.modules
    cfg = compose_config("evaluate", edm_overrides(pkl, repo), output_dir=tmp_path)
    D = build(cfg, "denoiser")
    assert sys.modules["training.networks"].__file__ == str(repo / "training" / "networks.py")
    assert D.shape == (3, 8, 8) and D.num_classes == label_dim and not D.training
    assert not any(p.requires_grad for p in D.parameters())
    x, sigma, labels = ref["x"], ref["sigma"], ref["labels"]
    with torch.no_grad():
        out = D(x, sigma, labels) if label_dim else D(x, sigma)
        assert out.dtype == torch.float32 and out.shape == x.shape
        torch.testing.assert_close(out, ref["plain"], rtol=0, atol=0)
        # a float sigma is one noise level for the batch
        torch.testing.assert_close(D(x, 2.0), D(x, torch.full((4,), 2.0)))
        if label_dim:
            # our null class (index num_classes) and no labels at all are EDM's all-zero label
            torch.testing.assert_close(D(x, sigma, torch.full((4,), label_dim)), ref["null"], rtol=0, atol=0)
            torch.testing.assert_close(D(x, sigma), ref["null"], rtol=0, atol=0)
            assert not torch.equal(ref["null"], ref["plain"])
            with pytest.raises(ValueError, match="class_labels"):
                D(x, sigma, torch.full((4,), label_dim + 1))
        else:
            # an unconditional network ignores labels, as EDM's does
            torch.testing.assert_close(D(x, sigma, torch.zeros(4, dtype=torch.long)), ref["plain"], rtol=0, atol=0)


def test_edm_labels_cycle_and_classifier_free_guidance(tmp_path):
    from diffusion_irl.sampling.guidance import CFGDenoiser

    repo = make_repo(tmp_path)
    pkl = tmp_path / "cond.pkl"
    ref = make_pickle(repo, pkl, label_dim=3, batch=4)
    D = build(compose_config("evaluate", edm_overrides(pkl, repo, "denoiser.labels=cycle"), output_dir=tmp_path),
              "denoiser")
    x, sigma = ref["x"], ref["sigma"]
    with torch.no_grad():
        torch.testing.assert_close(D(x, sigma), D(x, sigma, torch.tensor([0, 1, 2, 0])), rtol=0, atol=0)
        torch.testing.assert_close(D(x, sigma), ref["plain"], rtol=0, atol=0)  # ref labels are arange % 3 too
        labels = torch.tensor([2, 0, 1, 1])
        cond, null = D(x, sigma, labels), D(x, sigma, torch.full((4,), 3))
        torch.testing.assert_close(CFGDenoiser(D, labels, 1.0, 3)(x, sigma), cond)
        torch.testing.assert_close(CFGDenoiser(D, labels, 0.0, 3)(x, sigma), null)
    cfg = compose_config("evaluate", edm_overrides(pkl, repo, "denoiser.labels=random"), output_dir=tmp_path)
    with pytest.raises(ConfigError, match="denoiser.labels"):
        build(cfg, "denoiser")


@pytest.mark.parametrize("saved, override, want", [
    (False, None, torch.float32), (False, True, torch.float16), (True, None, torch.float16),
    (True, False, torch.float32),
])
def test_edm_use_fp16_is_respected(saved, override, want, tmp_path):
    repo = make_repo(tmp_path)
    pkl = tmp_path / "net.pkl"
    ref = make_pickle(repo, pkl, use_fp16=saved)
    extra = [] if override is None else [f"denoiser.use_fp16={str(override).lower()}"]
    D = build(compose_config("evaluate", edm_overrides(pkl, repo, *extra), output_dir=tmp_path), "denoiser")
    assert D.use_fp16 is (want == torch.float16)
    with torch.no_grad():
        out = D(ref["x"], ref["sigma"])
    assert D.net.calls.last_dtype == want and out.dtype == torch.float32   # computed in want, returned in float32
    torch.testing.assert_close(out, ref[f"fp16={want == torch.float16}"], rtol=0, atol=0)
    if want == torch.float16:
        assert not torch.equal(out, ref["fp16=False"])


# -- one line per error --------------------------------------------------------------------------------------------
def _random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def _pickled(obj):
    return lambda path: path.write_bytes(pickle.dumps(obj))


@pytest.mark.parametrize("case, write, message", [
    ("missing file", None, r"denoiser\.path: no such file"),
    ("empty file", lambda p: p.write_bytes(b""), r"denoiser\.path: .* is empty"),
    ("random bytes", _random_bytes, r"denoiser\.path: .* is not an EDM network pickle"),
    ("a torch checkpoint", lambda p: torch.save({"state_dict": {}}, p), r"denoiser\.path: .* is not an EDM network"),
    ("not a dict", _pickled([1, 2, 3]), r"denoiser\.path: .* holds a list"),
    ("no ema", _pickled({"net": 1, "loss_fn": None}), r"denoiser\.path: .* has no `ema` entry \(keys: net, loss_fn\)"),
    ("ema not a network", _pickled({"ema": {"img_resolution": 8}}), r"denoiser\.path: the `ema` entry .* lacks"),
    ("ema a plain module", _pickled({"ema": torch.nn.Linear(2, 2)}), r"lacks img_resolution, img_channels"),
])
def test_bad_pickles_are_one_line(case, write, message, tmp_path):
    repo = make_repo(tmp_path)
    pkl = tmp_path / "net.pkl"
    if write is not None:
        write(pkl)
    cfg = compose_config("evaluate", edm_overrides(pkl, repo), output_dir=tmp_path)
    with pytest.raises(ConfigError, match=message) as err:
        build(cfg, "denoiser")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("case, message", [
    ("repo not set", r"denoiser\.repo: not set"),
    ("no such repo", r"denoiser\.repo: no such directory"),
    ("repo without torch_utils", r"denoiser\.repo: .* has no torch_utils/ package"),
    ("repo without training", r"denoiser\.repo: unpickling .* needs the module 'training'"),
])
def test_bad_repos_are_one_line(case, message, tmp_path):
    repo = make_repo(tmp_path)
    pkl = tmp_path / "net.pkl"
    make_pickle(repo, pkl)
    other = tmp_path / "other"
    if case == "repo without torch_utils":
        (other / "dnnlib").mkdir(parents=True)
        (other / "dnnlib" / "__init__.py").write_text("")
    elif case == "repo without training":
        other = make_repo(tmp_path / "partial", networks=False)
    given = {"repo not set": None, "no such repo": tmp_path / "nowhere"}.get(case, other)
    cfg = compose_config("evaluate", edm_overrides(pkl, given), output_dir=tmp_path)
    with pytest.raises(ConfigError, match=message) as err:
        build(cfg, "denoiser")
    assert "\n" not in str(err.value)


def test_network_of_other_shape_is_refused_before_sampling(tmp_path, monkeypatch):
    """A 3x8x8 network on digits (1x8x8): the project's shape check, one config error."""
    from diffusion_irl.evaluate import run

    monkeypatch.chdir(tmp_path)
    repo = make_repo(tmp_path)
    pkl = tmp_path / "net.pkl"
    make_pickle(repo, pkl, channels=3, resolution=8)
    cfg = compose_config("evaluate", ["data=digits", *edm_overrides(pkl, repo), "evaluate.progress=false"],
                         output_dir=tmp_path / "ev")
    with pytest.raises(ConfigError, match=r"shape \(3, 8, 8\) but data=digits has shape \(1, 8, 8\)") as err:
        run(cfg)
    assert "\n" not in str(err.value) and not (tmp_path / "ev" / "results.csv").exists()


@pytest.mark.slow  # a fresh interpreter: 7 to 22 s on the shared 2 cores
def test_command_line_error_is_one_line(tmp_path):
    repo = make_repo(tmp_path)
    pkl = tmp_path / "garbage.pkl"
    _random_bytes(pkl)
    env = dict(os.environ, WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, "-m", "diffusion_irl.evaluate", *edm_overrides(pkl, repo),
                           f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=180)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("config error: denoiser") and "is not an EDM network pickle" in last
    assert "Traceback" not in proc.stderr


# -- EDM-style image folders ---------------------------------------------------------------------------------------
def write_images(root: Path, n: int = 30, resolution: int = 8, channels: int = 3, num_classes: int | None = 3,
                 as_zip: bool = False, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """dataset_tool.py's layout: 00000/img00000000.png ... and dataset.json {"labels": [[name, label], ...]}.
    Returns the images [n, C, H, W] uint8 (in file-name order) and the labels."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, resolution, resolution, channels), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n)  # every image distinct
    labels = rng.integers(0, num_classes or 1, n)
    files = {}
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(images[i, :, :, 0] if channels == 1 else images[i]).save(buf, format="PNG")
        files[f"{i // 1000:05d}/img{i:08d}.png"] = buf.getvalue()
    if num_classes:
        names = sorted(f for f in files if f.endswith(".png"))
        files["dataset.json"] = json.dumps({"labels": [[name, int(y)] for name, y in zip(names, labels)]}).encode()
    if as_zip:
        root.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(root, "w") as z:
            for name, data in files.items():
                z.writestr(name, data)
    else:
        for name, data in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
    return images.transpose(0, 3, 1, 2), labels


def _folder(path, **kw):
    from diffusion_irl.data.image_folder import ImageFolderDataModule

    args = dict(resolution=8, channels=3, num_classes=3, heldout=10, seed=0, batch_size=4)
    return ImageFolderDataModule(path, **{**args, **kw})


def test_image_folder_loads_pngs_and_labels_with_a_disjoint_heldout_split(tmp_path):
    images, labels = write_images(tmp_path / "set", n=30)
    dm = _folder(tmp_path / "set")
    assert dm.shape == (3, 8, 8) and dm.num_classes == 3 and dm.name == "set" and dm.law is None
    x_tr, x_he = dm.train_samples(), dm.heldout()
    assert x_tr.shape == (20, 3, 8, 8) and x_he.shape == (10, 3, 8, 8) and x_tr.dtype == torch.float32
    assert x_tr.min() >= -1 and x_tr.max() <= 1
    want = torch.from_numpy(images).float() / 127.5 - 1
    ids = lambda x: ((x[:, 0, 0, 0] + 1) * 127.5).round().long()  # noqa: E731 - pixel (0, 0, 0) is the index
    tr, he = ids(x_tr), ids(x_he)
    assert set(tr.tolist()).isdisjoint(he.tolist()) and sorted(tr.tolist() + he.tolist()) == list(range(30))
    torch.testing.assert_close(x_tr, want[tr], rtol=0, atol=1e-6)
    assert torch.equal(dm.train_labels(), torch.from_numpy(labels)[tr]) and torch.equal(
        dm.heldout_labels(), torch.from_numpy(labels)[he])
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 8, 8) and y.dtype == torch.long
    assert torch.equal(_folder(tmp_path / "set").heldout(), x_he)          # the split is seeded
    assert not torch.equal(_folder(tmp_path / "set", seed=1).heldout(), x_he)
    assert len(_folder(tmp_path / "set", limit_train=7).train_samples()) == 7
    assert torch.equal(_folder(tmp_path / "set", num_classes=0).train_labels(), torch.zeros(20, dtype=torch.long))


def test_image_folder_reads_a_zip_like_the_directory(tmp_path):
    write_images(tmp_path / "dir", n=16, channels=1, num_classes=None, seed=3)
    write_images(tmp_path / "set.zip", n=16, channels=1, num_classes=None, seed=3, as_zip=True)
    a, b = _folder(tmp_path / "dir", channels=1, num_classes=0, heldout=4), \
        _folder(tmp_path / "set.zip", channels=1, num_classes=0, heldout=4)
    assert a.shape == (1, 8, 8) and b.name == "set"
    assert torch.equal(a.train_samples(), b.train_samples()) and torch.equal(a.heldout(), b.heldout())


def _corrupt_png(root: Path) -> None:
    write_images(root, n=12)
    (root / "00000" / "img00000003.png").write_bytes(b"not a png")


@pytest.mark.parametrize("write, kwargs, message", [
    (None, {}, r"data\.path: no such file or directory"),
    (lambda r: write_images(r, n=12), {"resolution": 16}, r"data\.resolution=16, but 00000/img00000000\.png .* is 8x8"),
    (lambda r: write_images(r, n=12), {"channels": 1}, r"data\.channels=1, but .* has 3 channel"),
    (lambda r: write_images(r, n=12, num_classes=None), {}, r"data\.num_classes=3, but .* has no labels"),
    (lambda r: write_images(r, n=12, num_classes=3), {"num_classes": 2}, r"data\.num_classes=2, but the labels"),
    (lambda r: write_images(r, n=12), {"heldout": 12}, r"data\.heldout=12 must be below the number of images"),
    (lambda r: (r / "a").mkdir(parents=True), {}, r"data\.path: no images"),
    (_corrupt_png, {}, r"data\.path: 00000/img00000003\.png .* is not a readable image"),
])
def test_image_folder_errors_are_one_line(write, kwargs, message, tmp_path):
    root = tmp_path / "set"
    if write is not None:
        write(root)
    dm = _folder(root, **kwargs)  # lazy: constructing reads nothing
    with pytest.raises(ConfigError, match=message) as err:
        dm.setup()
    assert "\n" not in str(err.value)


def test_image_folder_declared_keys_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.shape"):
        _folder(tmp_path, shape=[3, 16, 16])
    with pytest.raises(ConfigError, match=r"data\.channels"):
        _folder(tmp_path, channels=2)
    with pytest.raises(ConfigError, match=r"data\.heldout"):
        _folder(tmp_path, heldout=0)


@pytest.mark.parametrize("name, file, classes", [("imagenet64", "imagenet-64x64.zip", 1000),
                                                 ("ffhq64", "ffhq-64x64.zip", 0), ("afhqv2_64", "afhqv2-64x64.zip", 0)])
def test_edm_data_configs_find_their_zip_under_data_root(name, file, classes, tmp_path):
    images, labels = write_images(tmp_path / file, n=6, resolution=64, num_classes=classes or None, as_zip=True)
    cfg = compose_config("evaluate", [f"data={name}", f"data.root={tmp_path}", "data.heldout=2"], output_dir=tmp_path)
    dm = build(cfg, "data")
    assert list(dm.shape) == list(cfg.data.shape) == [3, 64, 64] and dm.num_classes == classes == cfg.data.num_classes
    dm.prepare_data()
    assert dm.heldout().shape == (2, 3, 64, 64) and len(dm.train_samples()) == 4
    if classes:
        assert sorted(dm.train_labels().tolist() + dm.heldout_labels().tolist()) == sorted(labels.tolist())


# -- the presets and the evaluator end to end ---------------------------------------------------------------------
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("edm_*.yaml"))
TABLE_SAMPLERS = ["ipndm", "dpmpp_3m", "unipc", "euler", "heun"]


@pytest.mark.parametrize("name", PRESETS)
def test_edm_presets_compose_for_the_evaluator_and_the_rl_loop(name, tmp_path):
    from diffusion_irl.evaluate import check_evaluate_config
    from diffusion_irl.sampling.schedules import KarrasSchedule
    from diffusion_irl.train import check_train_config

    assert set(PRESETS) >= {"edm_cifar10_uncond", "edm_cifar10_cond", "edm_imagenet64_cond"}
    cfg = compose_config("evaluate", [f"experiment={name}"], output_dir=tmp_path)
    check_evaluate_config(cfg)
    assert cfg.denoiser._target_.endswith("load_edm_denoiser")
    ev = cfg.evaluate
    assert list(ev.samplers) == TABLE_SAMPLERS and list(ev.nfe) == [4, 5, 6, 8, 10]
    assert ev.num_samples == 50000 and len(ev.seeds) == 3 and "fid_reference" in ev
    for sampler in TABLE_SAMPLERS:
        schedule = build(cfg, f"samplers.{sampler}").schedule
        assert isinstance(schedule, KarrasSchedule)
        assert (schedule.sigma_min, schedule.sigma_max, schedule.rho) == (0.002, 80.0, 7.0)
    conditional = name.endswith("_cond")
    assert (cfg.denoiser.labels == "cycle") == conditional
    if conditional:
        assert ev.batch_size % cfg.data.num_classes == 0
    train = compose_config("train", ["logger=none", "discriminator=cnn", f"experiment={name}"], output_dir=tmp_path)
    check_train_config(train)
    mdp = build(train, "mdp")
    assert mdp.planned_nfe() <= train.mdp.nfe and mdp.num_classes == (train.data.num_classes if conditional else 0)
    assert list(train.compare.samplers) == TABLE_SAMPLERS


@pytest.mark.parametrize("preset, label_dim", [("edm_cifar10_uncond", 0), ("edm_cifar10_cond", 3)])
def test_evaluator_runs_on_an_edm_pickle_end_to_end(preset, label_dim, tmp_path, monkeypatch):
    """A preset, shrunk: an 8x8 RGB image folder, a tiny EDM network, two samplers at NFE 4, 8 samples."""
    from diffusion_irl.evaluate import run

    monkeypatch.chdir(tmp_path)
    write_images(tmp_path / "images", n=40, num_classes=3)
    repo = make_repo(tmp_path)
    pkl = tmp_path / "net.pkl"
    make_pickle(repo, pkl, label_dim=label_dim)
    overrides = [f"experiment={preset}", "data=image_folder", f"data.path={tmp_path / 'images'}", "data.resolution=8",
                 "data.num_classes=3", "data.heldout=16", *edm_overrides(pkl, repo), "evaluate.samplers=[euler,heun]",
                 "evaluate.nfe=[4]", "evaluate.seeds=[0]", "evaluate.num_samples=8", "evaluate.num_heldout=16",
                 "evaluate.batch_size=6", "evaluate.progress=false", f"evaluate.feature_cache={tmp_path / 'cache'}"]
    rows = run(compose_config("evaluate", overrides, output_dir=tmp_path / "ev"))
    assert {r.sampler for r in rows} == {"euler", "heun", "reference"}
    assert {r.nfe for r in rows if r.sampler == "heun"} == {3} and {r.nfe for r in rows if r.sampler == "euler"} == {4}
    metrics = {r.metric for r in rows}
    assert {"fd", "precision", "recall"} <= metrics
    assert all(np.isfinite(r.value) for r in rows if r.metric == "fd")
    assert (tmp_path / "ev" / "results.csv").is_file() and (tmp_path / "ev" / "results.md").is_file()


def test_rl_loop_runs_on_an_edm_pickle(tmp_path, monkeypatch):
    """python -m diffusion_irl.train on the conditional preset, shrunk: one iteration on the tiny network, the MDP
    passing its own labels (seed mod 3), no comparison."""
    from hydra.core.hydra_config import HydraConfig

    from diffusion_irl.train import run

    monkeypatch.chdir(tmp_path)
    write_images(tmp_path / "images", n=40, num_classes=3)
    repo = make_repo(tmp_path)
    pkl = tmp_path / "net.pkl"
    make_pickle(repo, pkl, label_dim=3)
    overrides = ["experiment=edm_cifar10_cond", "discriminator=cnn", "discriminator.net.base_channels=8",
                 "data=image_folder", f"data.path={tmp_path / 'images'}", "data.resolution=8", "data.num_classes=3",
                 "data.heldout=16", *edm_overrides(pkl, repo), "logger=none", "trainer.enable_progress_bar=false",
                 "train.iterations=1", "system.rollout_batch=8", "system.disc_steps=1", "system.disc_batch=16",
                 "system.eval_every=0", "compare.enabled=false"]
    try:
        result = run(compose_config("train", overrides, output_dir=tmp_path / "run"))
    finally:
        HydraConfig.instance().cfg = None
    module = result["module"]
    assert module.mdp.num_classes == 3 and module.mdp.horizon == 6 and float(module.nfe_spent) == 8 * 6
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_the_uncond_preset_runs_a_diffusers_pipeline_side_by_side(tmp_path, monkeypatch):
    """The same preset with denoiser=diffusers: a tiny DDPM pipeline directory (unet/, scheduler/), epsilon
    prediction, on the same 8x8 image folder."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from diffusion_irl.denoisers.precond import VPEpsDenoiser
    from diffusion_irl.evaluate import run

    monkeypatch.chdir(tmp_path)
    write_images(tmp_path / "images", n=40, num_classes=3)
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(tmp_path / "ddpm")
    overrides = ["experiment=edm_cifar10_uncond", "data=image_folder", f"data.path={tmp_path / 'images'}",
                 "data.resolution=8", "data.num_classes=3", "data.heldout=16", "denoiser=diffusers",
                 f"denoiser.path={tmp_path / 'ddpm'}", "evaluate.samplers=[ipndm,unipc]", "evaluate.nfe=[4]",
                 "evaluate.seeds=[0]", "evaluate.num_samples=8", "evaluate.num_heldout=16", "evaluate.progress=false",
                 f"evaluate.feature_cache={tmp_path / 'cache'}"]
    cfg = compose_config("evaluate", overrides, output_dir=tmp_path / "ev")
    assert isinstance(build(cfg, "denoiser"), VPEpsDenoiser)
    rows = run(cfg)
    assert {r.sampler for r in rows} == {"ipndm", "unipc", "reference"}
    assert {"fd", "precision"} <= {r.metric for r in rows}
    assert all(np.isfinite(r.value) for r in rows if r.metric == "fd")


# -- slurm/evaluate.sbatch -------------------------------------------------------------------------------------------
SBATCH = ROOT / "slurm" / "evaluate.sbatch"


def _run_sbatch(tmp_path, env_extra: dict, *args: str) -> list[str]:
    submit = tmp_path / "submit"
    (submit / ".venv" / "bin").mkdir(parents=True, exist_ok=True)
    (submit / ".venv" / "bin" / "activate").write_text("")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "python.log"
    exe = bin_dir / "python"
    exe.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > "{log}"\n')
    exe.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_GPUS_ON_NODE", "CUDA_VISIBLE_DEVICES")}
    env.update({"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(submit), "SLURM_JOB_ID": "77",
                **env_extra})
    proc = subprocess.run(["bash", str(SBATCH), *args], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return log.read_text().splitlines()


@pytest.mark.parametrize("env, processes", [({"SLURM_GPUS_ON_NODE": "4"}, "4"), ({"SLURM_GPUS_ON_NODE": ""}, "auto"),
                                            ({"CUDA_VISIBLE_DEVICES": "0,1"}, "auto")])
def test_evaluate_sbatch_passes_its_arguments_through(env, processes, tmp_path):
    from diffusion_irl.evaluate import check_evaluate_config

    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    text = SBATCH.read_text()
    assert "#SBATCH --ntasks=1" in text and "#SBATCH --gpus-per-node=" in text
    user = ["experiment=edm_cifar10_uncond", "denoiser.repo=/path/to/edm", "evaluate.nfe=[4,8]"]
    args = _run_sbatch(tmp_path, env, *user)
    assert args[:2] == ["-m", "diffusion_irl.evaluate"] and args[-3:] == user
    assert f"evaluate.processes={processes}" in args and "hydra.run.dir=outputs/evaluate/slurm-77" in args
    # what the script passes composes with the evaluator's config and passes its checks
    cfg = compose_config("evaluate", [a for a in args[2:] if not a.startswith("hydra.")], output_dir=tmp_path)
    check_evaluate_config(cfg)
    assert cfg.device == "cuda" and str(cfg.evaluate.processes) == processes and list(cfg.evaluate.nfe) == [4, 8]
