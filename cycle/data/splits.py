"""Identity-disjoint train/val/test splits and the identity selection they start from."""
from __future__ import annotations

import logging
from typing import Mapping

import numpy as np

from cycle.data.faceset import FaceSet
from cycle.data.options import DataError, _get, _int, _plain

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def split_identities(names: list[str], split: Mapping | None, seed: int) -> dict[str, list[str]]:
    """Identity-disjoint train/val/test. `split.val`/`split.test`: a fraction (< 1) or a count (>= 1)."""
    split = dict(_plain(split) or {})
    unknown = sorted(set(split) - {"val", "test"})
    if unknown:
        raise DataError(f"data.split: unknown key(s) {unknown}; use val and test (train gets the rest)")
    n = len(names)
    counts = {}
    for key in ("val", "test"):
        v = split.get(key) or 0
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (v >= 1 and v != int(v)):
            raise DataError(f"data.split.{key} must be a fraction in [0, 1) or a whole count >= 1, got {v!r}")
        counts[key] = int(v) if v >= 1 else (max(1, round(v * n)) if v > 0 else 0)
    if counts["val"] + counts["test"] >= n:
        raise DataError(f"data.split val={split.get('val')} test={split.get('test')} leaves no training "
                        f"identities out of {n}: lower the split or add identities")
    order = [sorted(names)[i] for i in np.random.default_rng(seed).permutation(n)]
    nt, nv = counts["test"], counts["val"]
    return {"test": sorted(order[:nt]), "val": sorted(order[nt:nt + nv]), "train": sorted(order[nt + nv:])}


def _select(cfg: Mapping, found: dict[str, list[str]], seed: int) -> dict[str, list[str]]:
    min_images = _int(cfg, "min_images", 1, 1)
    keep = {k: v for k, v in found.items() if len(v) >= min_images}
    if len(keep) < len(found):
        log.info("data.min_images=%d: dropped %d identities", min_images, len(found) - len(keep))
    max_per = _get(cfg, "max_images_per_identity", None)
    if max_per:
        keep = {k: v[:int(max_per)] for k, v in keep.items()}
    max_ids = _get(cfg, "max_identities", None)
    if max_ids and len(keep) > int(max_ids):  # a seeded subset, not the alphabetically first ones
        chosen = np.random.default_rng(seed + 1).choice(sorted(keep), int(max_ids), replace=False)
        keep = {k: keep[k] for k in sorted(chosen)}
    if not keep:
        raise DataError(f"no identity has data.min_images={min_images} images")
    return keep


def require_pairs(splits: Mapping[str, FaceSet], split: str, purpose: str) -> None:
    """Refuse, with the fix, a split on which pair protocols are impossible: fewer than 2 identities, or no
    identity with 2 images (no genuine pair). Checked before training, not found after an epoch."""
    faces = splits[split]
    if faces.num_classes >= 2 and (faces.class_counts() >= 2).any():
        return
    if faces.num_classes < 2:
        problem = f"the {split} split has {faces.num_classes} identit{'y' if faces.num_classes == 1 else 'ies'}"
        fix = f"raise data.split.{split} (a count >= 2 or a larger fraction) or add identities"
    elif any((f.class_counts() >= 2).any() for f in splits.values()):
        problem = f"every one of the {faces.num_classes} identities of the {split} split has a single image"
        fix = ("set data.min_images=2 to leave single-image identities out, or raise data.split."
               f"{split} so that it draws identities with several images")
    else:
        problem = f"every identity of this data set has a single image ({faces.num_classes} in the {split} split)"
        fix = "use a data set with at least 2 images of (some of) its identities"
    raise DataError(f"{problem}: {purpose} needs genuine pairs (two images of one identity) among >= 2 "
                    f"identities; {fix}")


def pairable_identities(faces: FaceSet, min_images: int = 2) -> np.ndarray:
    """Class indices with at least `min_images` images: the ones genuine pairs can be drawn from."""
    counts = faces.class_counts()
    keep = np.flatnonzero(counts >= min_images)
    if len(keep) < faces.num_classes:
        log.warning("%d of %d identities have fewer than %d images and are excluded from pair protocols",
                    faces.num_classes - len(keep), faces.num_classes, min_images)
    return keep
