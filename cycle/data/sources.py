"""`build_splits`: a data config -> train/val/test FaceSets, from the generator or from a folder."""
from __future__ import annotations

import logging
import os
from typing import Mapping

from cycle.data.faceset import FaceSet
from cycle.data.folder import _folder_splits
from cycle.data.options import DataError, _get
from cycle.data.synthetic import _synthetic_splits

log = logging.getLogger(__name__)


def build_splits(data_cfg: Mapping, cache_dir: str | os.PathLike) -> dict[str, FaceSet]:
    """{"train", "val", "test"} FaceSets, identity-disjoint and deterministic from data_cfg.seed."""
    if data_cfg is None:
        raise DataError("no data config: select one with data=synthetic|folder|orl")
    name = _get(data_cfg, "name", None)
    # Anything but the generator is a folder dataset (folder, orl, or a user's own preset with a root).
    build = _synthetic_splits if name == "synthetic" else _folder_splits
    splits = build(data_cfg, cache_dir)
    for split, faces in splits.items():
        single = int((faces.class_counts() < 2).sum())
        if single:
            log.warning("%s split: %d of %d identities have a single image; they are left out of pair "
                        "protocols (verification pairs, P x K batches)", split, single, faces.num_classes)
    return splits
