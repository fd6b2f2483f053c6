"""`build_splits`: a data config -> train/val/test FaceSets, from the generator, a folder or a .rec set."""
from __future__ import annotations

import logging
import os
from typing import Mapping

from cycle.data.faceset import FaceSet
from cycle.data.folder import _folder_splits
from cycle.data.options import DataError, _get
from cycle.data.recordio import _rec_splits
from cycle.data.synthetic import _synthetic_splits

log = logging.getLogger(__name__)


def build_splits(data_cfg: Mapping, cache_dir: str | os.PathLike) -> dict[str, FaceSet]:
    """{"train", "val", "test"} FaceSets, identity-disjoint and deterministic from data_cfg.seed."""
    if data_cfg is None:
        raise DataError("no data config: select one with data=synthetic|folder|orl|rec")
    name = _get(data_cfg, "name", None)
    # A preset with a `rec` file name reads RecordIO (data=rec or a user's preset built on it); anything
    # else but the generator is a folder dataset (folder, orl, or a user's own preset with a root).
    if name == "synthetic":
        build = _synthetic_splits
    elif _get(data_cfg, "rec", None):
        build = _rec_splits
    else:
        build = _folder_splits
    splits = build(data_cfg, cache_dir)
    for split, faces in splits.items():
        single = int((faces.class_counts() < 2).sum())
        if single:
            log.warning("%s split: %d of %d identities have a single image; they are left out of pair "
                        "protocols (verification pairs, P x K batches)", split, single, faces.num_classes)
    return splits
