"""Compose the project's Hydra configs in tests."""
from __future__ import annotations

import functools
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from .conftest import CONF


def compose_config(name: str, overrides: list[str] | None = None, output_dir: str | Path | None = None) -> DictConfig:
    """Compose ``conf/<name>.yaml`` with overrides. With ``output_dir``, the Hydra runtime is set as in a real run
    (so ``${hydra:runtime.output_dir}`` resolves to it) and the returned config keeps no ``hydra`` node."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides or [], return_hydra_config=output_dir is not None)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(output_dir)
            cfg.hydra.job.name = name
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
    return cfg


@functools.lru_cache(maxsize=None)
def _sampler_config(name: str) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=f"sampler/{name}").sampler


def load_sampler(name: str):
    """A fresh sampler from ``conf/sampler/<name>.yaml`` (composed once by Hydra: its defaults list pulls in the
    schedule)."""
    return instantiate(OmegaConf.create(OmegaConf.to_container(_sampler_config(name))))
