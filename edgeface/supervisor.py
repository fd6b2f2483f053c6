"""How the stage table loads an EdgeFace artifact (or the official weights) for a configuration."""
from __future__ import annotations

import os

from omegaconf import DictConfig

from edgeface.backbones import EdgeFace
from edgeface.loader import load


def load_edgeface(cfg: DictConfig, path: str | os.PathLike) -> EdgeFace:
    """A float EdgeFace in eval mode (`_q` files dequantized, so it can supervise and be fine-tuned).

    The configured variant is enforced, so a wrong-variant file fails with the key report instead of
    supervising with the wrong network.
    """
    return load(path, variant=str(cfg.edgeface.variant), quantized=False).eval()
