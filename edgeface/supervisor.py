"""How the stage table loads an EdgeFace artifact (or the official weights) for a configuration."""
from __future__ import annotations

import os

from omegaconf import DictConfig

from edgeface.backbones import EdgeFace
from edgeface.loader import CheckpointMismatch, load


def load_edgeface(cfg: DictConfig, path: str | os.PathLike) -> EdgeFace:
    """A float EdgeFace in eval mode (`_q` files dequantized, so it can supervise and be fine-tuned).

    The configured variant is enforced, so a wrong-variant file fails with the key report instead of
    supervising with the wrong network.
    """
    try:
        return load(path, variant=str(cfg.edgeface.variant), quantized=False).eval()
    except CheckpointMismatch as e:
        if e.guess is None:
            raise
        # the loader's hint is for its Python API; a configuration picks the variant with its config group
        option = e.guess.removeprefix("edgeface_")
        msg = str(e).replace(f"pass variant={e.guess!r} or leave variant=None",
                             f"select it on the command line with edgeface={option}, e.g. "
                             f"python train.py edgeface={option} edgeface.weights={path}")
        raise CheckpointMismatch(msg, missing=e.missing, unexpected=e.unexpected, mismatched=e.mismatched,
                                 guess=e.guess, guess_score=e.guess_score) from None
