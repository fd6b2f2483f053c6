"""Model helpers every stage uses: freezing a supervisor, loading a published DSR."""
from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from cycle.checkpoint import load_checkpoint


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and requires_grad False on every parameter; returns the module.

    Gradients still flow THROUGH the module to its inputs; only its own weights (and, in
    eval mode, BatchNorm running statistics) stay fixed.
    """
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def load_dsr(cfg: DictConfig, path: str | Path) -> torch.nn.Module:
    """Build the configured DSR for cfg.res (`instantiate(cfg.dsr)`) and load a published DSR into it (strict)."""
    state = load_checkpoint(path)
    if int(state.get("res", cfg.res)) != int(cfg.res):
        raise ValueError(f"{path} is a DSR for res={state['res']}, not res={cfg.res}")
    model = instantiate(cfg.dsr)
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path} does not match the configured DSR architecture (cfg.dsr): {e}") from e
    return model.eval()
