"""Shared fixtures: compose the real Hydra configs, shrunk to run on the CPU in seconds."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, open_dict

from cycle.config import compose

ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(min(2, torch.get_num_threads()))


def compose_train(overrides: list[str] | None = None, tmp_path: Path | None = None,
                  return_hydra_config: bool = False) -> DictConfig:
    """Compose conf/train.yaml with `overrides`; outputs and caches under `tmp_path`."""
    cfg = compose(overrides or [], return_hydra_config=return_hydra_config)
    if tmp_path is not None:
        with open_dict(cfg):
            cfg.paths.root = str(ROOT)
            cfg.paths.output_dir = str(tmp_path / "outputs")
            cfg.paths.artifacts_dir = str(tmp_path / "artifacts")
            cfg.paths.cache_dir = str(tmp_path / "cache")
    return cfg


@pytest.fixture
def smoke_cfg(tmp_path):
    """The smoke experiment at res=16 with everything under tmp_path (shared data cache per session)."""
    def make(*overrides: str) -> DictConfig:
        cfg = compose_train(["experiment=smoke", "device=cpu", *overrides], tmp_path)
        with open_dict(cfg):
            cfg.paths.cache_dir = str(_SESSION_CACHE)
        return cfg
    return make


_SESSION_CACHE = Path(os.environ.get("VLR_TEST_CACHE", ROOT / ".cache" / "tests"))
