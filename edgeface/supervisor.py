"""Where a stage gets its EdgeFace: official weights, or the project's published artifacts."""
from __future__ import annotations

import logging

from omegaconf import DictConfig

from cycle.artifacts import ArtifactStore
from edgeface.backbones import EdgeFace
from edgeface.loader import load

log = logging.getLogger(__name__)


def load_supervisor(cfg: DictConfig, store: ArtifactStore, artifact: str | None = None) -> EdgeFace:
    """A float EdgeFace in eval mode.

    artifact=None: the *pretrained* EdgeFace, i.e. `edgeface.weights` (official file, `_q` files
    dequantized) when given, else the `edgeface_pretrained` artifact. Otherwise the named artifact
    (e.g. `edgeface_ft`). The configured variant is enforced, so a wrong-variant file fails with the
    key report instead of supervising with the wrong network.
    """
    variant = str(cfg.edgeface.variant)
    if artifact is None and cfg.edgeface.get("weights"):
        path = cfg.edgeface.weights
        log.info("pretrained EdgeFace: official weights %s (%s)", path, variant)
    else:
        path = store.require(artifact or "edgeface_pretrained")
        log.info("EdgeFace from artifact %s", path)
    model = load(path, variant=variant, quantized=False)
    return model.eval()
