"""Config helpers shared by the entry points: one readable error for a bad config, before any compute."""
from __future__ import annotations

import copy
import functools
import sys
from collections.abc import Callable, Sequence
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


# -- typed checks of config values (one ConfigError naming the key, before any compute) ---------------------------
_ABSENT = object()


def _get(cfg: DictConfig, key: str) -> Any:
    try:
        value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_resolution_failure=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{key}: {exc}".splitlines()[0]) from exc
    if value is _ABSENT:
        raise ConfigError(f"{key}: missing from the config")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bounds(kind: str, lo: Any, hi: Any) -> str:
    if kind in ("an integer", "integers") and lo == 1:
        kind = "a positive integer" if kind == "an integer" else "positive integers"
        return kind + (f" <= {hi}" if hi is not None else "")
    if lo is not None and hi is not None:
        return f"{kind} in [{lo}, {hi}]"
    return f"{kind} >= {lo}" if lo is not None else (f"{kind} <= {hi}" if hi is not None else kind)


def require_int(cfg: DictConfig, key: str, min: int | None = None, max: int | None = None,
                optional: bool = False, hint: str = "") -> int | None:
    """``cfg[key]`` as an int within ``[min, max]`` (``null`` allowed when ``optional``)."""
    value = _get(cfg, key)
    if value is None and optional:
        return None
    want = _bounds("an integer", min, max) + (" or null" if optional else "") + (f" ({hint})" if hint else "")
    if not _is_int(value) or (min is not None and value < min) or (max is not None and value > max):
        raise ConfigError(f"{key}: must be {want}, got {value!r}")
    return value


def require_float(cfg: DictConfig, key: str, min: float | None = None, max: float | None = None,
                  optional: bool = False) -> float | None:
    """``cfg[key]`` as a finite number within ``[min, max]`` (an int is accepted)."""
    import math

    value = _get(cfg, key)
    if value is None and optional:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (min is not None and value < min) or (max is not None and value > max):
        raise ConfigError(f"{key}: must be {_bounds('a finite number', min, max)}"
                          f"{' or null' if optional else ''}, got {value!r}")
    return float(value)


def require_bool(cfg: DictConfig, key: str) -> bool:
    value = _get(cfg, key)
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: must be true or false, got {value!r}")
    return value


def require_choice(cfg: DictConfig, key: str, choices: Sequence[Any]) -> Any:
    value = _get(cfg, key)
    if value not in list(choices):
        raise ConfigError(f"{key}: must be one of {list(choices)}, got {value!r}")
    return value


def require_str(cfg: DictConfig, key: str, optional: bool = False) -> str | None:
    value = _get(cfg, key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: must be a non-empty string{' or null' if optional else ''}, got {value!r}")
    return value


def require_int_list(cfg: DictConfig, key: str, min: int | None = None, max: int | None = None) -> list[int]:
    """A non-empty list of integers within ``[min, max]``."""
    value = _get(cfg, key)
    items = list(value) if OmegaConf.is_list(value) or isinstance(value, (list, tuple)) else None
    if not items or not all(_is_int(v) and (min is None or v >= min) and (max is None or v <= max) for v in items):
        raise ConfigError(f"{key}: must be a non-empty list of {_bounds('integers', min, max)}, got {value!r}")
    return items


def has(cfg: DictConfig, key: str) -> bool:
    """Whether ``key`` is present in the config (even as null)."""
    return OmegaConf.select(cfg, key, default=_ABSENT, throw_on_resolution_failure=False) is not _ABSENT
