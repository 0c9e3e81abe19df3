"""Shared fixtures: the exact Gaussian-mixture oracle and helpers to compose Hydra configs from conf/."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffusion_irl.data.toy2d import GaussianMixture, gmm8
from diffusion_irl.denoisers.analytic import AnalyticDenoiser

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def law() -> GaussianMixture:
    return gmm8()


@pytest.fixture
def wide_mixture() -> GaussianMixture:
    """Three unequal, overlapping components: smooth enough for asymptotic convergence orders."""
    return GaussianMixture([[-2.0, 0.0], [2.0, 0.0], [0.0, 3.0]], [0.5, 0.7, 0.6], [0.3, 0.3, 0.4])


@pytest.fixture
def oracle(law) -> AnalyticDenoiser:
    return AnalyticDenoiser(law)


@pytest.fixture
def one_thread():
    """Tiny networks and tensors: one intra-op thread. On a loaded 2-core machine, OpenMP threads waiting for each
    other made such tests 5 to 20 times slower. Modules opt in with ``pytestmark = pytest.mark.usefixtures(...)``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _reset_hydra():
    """Tests that compose configs set Hydra's global state; clear it so no test sees another's run directory."""
    yield
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().cfg = None
    GlobalHydra.instance().clear()
