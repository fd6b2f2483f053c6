"""The decoded-array caches under `cache_dir/faces/`: key -> paths, load, atomic write, build workers."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from cycle.data.faceset import FaceSet
from cycle.data.options import _get

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when decoding changes: it is part of every cache key


def _cache_paths(cache_dir, name: str, split: str, key_material: dict) -> tuple[Path, Path]:
    digest = hashlib.sha1(json.dumps(key_material, sort_keys=True).encode()).hexdigest()[:16]
    base = Path(cache_dir) / "faces" / f"{name}-{split}-{digest}"
    return base.with_suffix(".npy"), base.with_suffix(".json")


def _load_cached(npy: Path, meta_path: Path) -> tuple[np.ndarray, dict] | None:
    if not (npy.exists() and meta_path.exists()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        images = np.load(npy, mmap_mode="r") if meta["n"] else None
    except (OSError, ValueError, KeyError) as exc:
        log.warning("face cache %s is unreadable (%s): rebuilding it", npy, exc)
        return None
    if images is not None and len(images) != meta["n"]:
        log.warning("face cache %s does not match its manifest: rebuilding it", npy)
        return None
    return images, meta


def _write_meta(meta_path: Path, meta: dict) -> None:
    tmp = meta_path.with_name(f"{meta_path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, meta_path)  # atomic: a manifest only ever describes a complete .npy


def _faceset(images, meta: dict, npy: Path, size: int) -> FaceSet:
    if images is None:
        images = np.zeros((0, size, size, 3), np.uint8)
    return FaceSet(images=images, labels=np.asarray(meta["labels"], np.int64),
                   identities=list(meta["identities"]), files=list(meta["files"]),
                   cache_path=str(npy) if meta["n"] else None)


def _workers(cfg: Mapping, jobs: int) -> int:
    wanted = _get(cfg, "prepare_workers", None) or os.cpu_count() or 1
    return max(1, min(int(wanted), jobs // 200 or 1))  # small jobs: process start-up costs more than it saves
