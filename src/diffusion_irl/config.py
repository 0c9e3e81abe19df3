"""Config helpers shared by the entry points: one readable error for a bad config, before any compute."""
from __future__ import annotations

import copy
import functools
import sys
from collections.abc import Callable
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A bad config key or value, reported as one line naming the key."""


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def build(cfg: DictConfig, key: str, **kwargs: Any) -> Any:
    """``instantiate(cfg[key])`` with every failure turned into one :class:`ConfigError` naming ``key``."""
    node = OmegaConf.select(cfg, key)
    if node is None:
        raise ConfigError(f"config key `{key}` is missing")
    try:
        return instantiate(node, **kwargs)
    except (InstantiationException, OmegaConfBaseException, ValueError, TypeError) as exc:
        cause = _root_cause(exc)
        raise ConfigError(f"{key}: {type(cause).__name__}: {cause}") from exc


def plain(cfg: Any) -> Any:
    """A config node as plain Python containers (resolved), or a deep copy of anything else."""
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else copy.deepcopy(cfg)


def module_and_config(spec: Any, key: str):
    """``(module, config)`` from an ``nn.Module`` (its ``config`` attribute, if any, is the config) or from its Hydra
    config (a mapping with ``_target_``, instantiated here). Lightning modules keep the config in their
    hyper-parameters so that a checkpoint rebuilds the network alone. ``key`` names the argument in errors."""
    from collections.abc import Mapping

    from torch import nn

    if isinstance(spec, Mapping):
        config = plain(spec)
        module = instantiate(config)
    else:
        module, config = spec, plain(getattr(spec, "config", None))
    if not isinstance(module, nn.Module):
        raise TypeError(f"{key} must build an nn.Module, got {type(module).__name__}")
    return module, config


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def exit_on_config_error(fn: Callable) -> Callable:
    """Entry-point decorator: a :class:`ConfigError` prints ``config error: ...`` on stderr and exits with 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            print(f"config error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
