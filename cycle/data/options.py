"""Reading `data.*` config values; bad input raises `DataError` with a message that says what to fix."""
from __future__ import annotations

from typing import Mapping

from cycle.errors import UserError


class DataError(UserError, ValueError):
    """Bad data input or data configuration; the message says what to fix."""


def _get(cfg: Mapping, key: str, default=None):
    """cfg[key] with a DataError for a missing mandatory value (`???`) or a broken interpolation."""
    try:
        value = cfg.get(key, default) if hasattr(cfg, "get") else default
    except Exception as exc:  # omegaconf MissingMandatoryValue / InterpolationResolutionError
        if "Missing mandatory value" in str(exc):
            raise DataError(f"data.{key} is required: pass data.{key}=... on the command line") from None
        raise DataError(f"data.{key} could not be resolved: {exc}") from None
    return default if value is None else value


def _plain(value):
    """OmegaConf containers -> plain Python, for hashing and validation."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with hydra
        pass
    return value


def _int(cfg: Mapping, key: str, default: int, minimum: int) -> int:
    value = _get(cfg, key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DataError(f"data.{key} must be an integer >= {minimum}, got {value!r}")
    return value
