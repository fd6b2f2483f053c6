"""The test set of the evaluation: which faces every method is scored on, and which pairs of them.

    proto = build_protocol(cfg)   # independent of the resolution

Protocol (``eval.*``, conf/eval/default.yaml): pairs are ``eval.num_pairs`` balanced pairs of the
``eval.split`` identities drawn within ``eval.folds`` identity-disjoint folds (LFW View 2 style), or the
pairs of an LFW-format ``eval.pairs_file`` (images under ``data.root``, its own folds). Identification: one
gallery image per identity, every other image a probe (whether the gallery image is the HR one or the
method's is ``eval.gallery``, see ``eval.scoring``).

The pure pair generators are in ``eval.protocols``; this module applies them to the configured data.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from omegaconf import DictConfig, OmegaConf

from cycle.data import FaceSet, build_splits, load_image
from eval.errors import EvaluationError
from eval.pairs_file import load_lfw_pairs
from eval.protocols import balanced_fold_pairs, identification_split

log = logging.getLogger(__name__)

__all__ = ["Protocol", "build_protocol", "lfw_faces"]


@dataclass
class Protocol:
    faces: FaceSet
    idx_a: np.ndarray
    idx_b: np.ndarray
    is_same: np.ndarray
    fold: np.ndarray                   # pair folds: identity-disjoint (balanced) or the file's (LFW)
    gallery: np.ndarray | None         # identification split; None when impossible (see notes)
    probes: np.ndarray | None
    info: dict
    notes: list[str] = field(default_factory=list)

    @property
    def identity(self) -> np.ndarray:
        """Identity of every face as 0 .. identities-1 (sorted labels): the columns the bootstrap resamples."""
        return np.unique(self.faces.labels, return_inverse=True)[1].ravel()


def _identification_split(labels: np.ndarray, seed: int, notes: list[str]):
    try:
        return identification_split(labels, seed)
    except ValueError as e:
        notes.append(f"identification not evaluated: {e}")
        return None, None


def _balanced_protocol(cfg: DictConfig) -> Protocol:
    ev = cfg.eval
    split = str(ev.split)
    splits = build_splits(cfg.data, cfg.paths.cache_dir)
    if split not in splits:
        raise EvaluationError(f"eval.split={split!r} is not one of {', '.join(splits)}")
    faces = splits[split]
    if faces.num_classes < 2:
        raise EvaluationError(
            f"the {split} split has {faces.num_classes} identit{'y' if faces.num_classes == 1 else 'ies'}; "
            f"verification and identification need at least 2: raise data.split.{split} or add identities")
    seed = int(ev.seed)
    try:
        ia, ib, same, fold = balanced_fold_pairs(faces.labels, int(ev.num_pairs), seed, int(ev.folds))
    except ValueError as e:
        raise EvaluationError(f"no verification pairs from the {split} split: {e}") from None
    notes: list[str] = []
    num_folds = int(np.unique(fold).size)
    if num_folds < int(ev.folds):
        notes.append(f"accuracy uses {num_folds} identity-disjoint folds, not eval.folds={ev.folds}: the {split} "
                     f"split has {faces.num_classes} identities (each fold needs 2)")
    gallery, probes = _identification_split(faces.labels, seed, notes)
    info = {"kind": "balanced", "split": split, "num_identities": faces.num_classes, "num_images": len(faces),
            "num_pairs": int(ia.size), "num_genuine": int(same.sum()), "num_folds": num_folds,
            "folds": "identity-disjoint", "seed": seed}
    return Protocol(faces, ia, ib, same, fold, gallery, probes, info, notes)


def lfw_faces(paths: Sequence[Path], size: int = 112, resize: str = "resize"):
    """Decode the images of a pairs file like the folder data (``cycle.data.load_image``).

    Returns (FaceSet of the readable images, labelled by identity folder name; row of each path in it,
    -1 when unreadable; {path: reason} of the unreadable ones).
    """
    images = np.zeros((len(paths), size, size, 3), np.uint8)
    bad: dict[Path, str] = {}
    for k, p in enumerate(paths):
        try:
            images[k] = load_image(p, size, resize)
        except Exception as e:  # any decoder failure = an unreadable file, reported by the caller
            bad[Path(p)] = f"{type(e).__name__}: {e}"
    ok = np.array([Path(p) not in bad for p in paths], bool)
    row = np.where(ok, np.cumsum(ok) - 1, -1)
    kept = [Path(p) for p, good in zip(paths, ok) if good]
    names = [p.parent.name for p in kept]
    identities = sorted(set(names))
    index = {n: i for i, n in enumerate(identities)}
    faces = FaceSet(images=images[ok], labels=np.array([index[n] for n in names], np.int64),
                    identities=identities, files=[f"{p.parent.name}/{p.name}" for p in kept])
    return faces, row, bad


def _lfw_protocol(cfg: DictConfig) -> Protocol:
    ev, data = cfg.eval, cfg.data
    if data.get("name") == "synthetic" or OmegaConf.is_missing(data, "root") or not data.get("root"):
        raise EvaluationError(f"eval.pairs_file={ev.pairs_file} needs the image folder of the pairs: "
                              "data=folder data.root=DIR (images at DIR/<name>/<name>_<i:04d>.<ext>)")
    root, allow = Path(str(data.root)).expanduser(), bool(ev.allow_missing)
    lp = load_lfw_pairs(str(ev.pairs_file), root, allow_missing=allow)  # MissingImagesError names the files
    faces, row, bad = lfw_faces(lp.paths, int(data.get("image_size") or 112), str(data.get("resize") or "resize"))
    notes = []
    if lp.num_dropped:
        notes.append(f"{lp.num_dropped} pairs dropped: {len(lp.missing)} missing images "
                     f"(eval.allow_missing=true), e.g. {', '.join(lp.missing[:3])}")
    # unreadable images are treated like missing ones: their pairs go, and they leave the gallery too
    hit = (row[lp.idx_a] < 0) | (row[lp.idx_b] < 0)
    if bad:
        listed = "; ".join(f"{p} ({why})" for p, why in list(bad.items())[:5])
        if not allow or hit.all():
            raise EvaluationError(f"{len(bad)} image(s) of {ev.pairs_file} could not be read: {listed}. "
                                  + ("No pair is left." if allow else
                                     "Set eval.allow_missing=true to evaluate the other pairs."))
        log.warning("%d unreadable image(s), dropping %d pairs: %s", len(bad), int(hit.sum()), listed)
        notes.append(f"{int(hit.sum())} pairs dropped: {len(bad)} unreadable images, e.g. {listed}")
    ia, ib, same, fold = row[lp.idx_a[~hit]], row[lp.idx_b[~hit]], lp.is_same[~hit], lp.fold[~hit]
    gallery, probes = _identification_split(faces.labels, int(ev.seed), notes)
    info = {"kind": "lfw", "pairs_file": str(ev.pairs_file), "root": str(root), "num_identities": faces.num_classes,
            "num_images": len(faces), "num_pairs": int(ia.size), "num_genuine": int(same.sum()),
            "num_folds": int(np.unique(fold).size), "num_dropped": int(lp.num_dropped + hit.sum())}
    return Protocol(faces, ia, ib, same, fold, gallery, probes, info, notes)


def build_protocol(cfg: DictConfig) -> Protocol:
    """The faces and pairs every method is scored on (independent of the resolution)."""
    return _lfw_protocol(cfg) if cfg.eval.get("pairs_file") else _balanced_protocol(cfg)
