"""The synthetic dataset (`data=synthetic`): rendered once per split into its cache by `cycle.data.render`."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Mapping

import numpy as np

from cycle.data import render
from cycle.data.cache import CACHE_VERSION, _cache_paths, _faceset, _load_cached, _workers, _write_meta
from cycle.data.chunked import cache_mode
from cycle.data.faceset import FaceSet
from cycle.data.options import DataError, _get, _int
from cycle.data.splits import SPLITS, split_identities

log = logging.getLogger(__name__)


def _synthetic_splits(cfg: Mapping, cache_dir) -> dict[str, FaceSet]:
    seed = _int(cfg, "seed", 0, 0)
    n_ids = _int(cfg, "num_identities", 300, 3)
    per = _int(cfg, "images_per_identity", 14, 1)
    looks = _int(cfg, "num_looks", 16, 1)
    size = _int(cfg, "image_size", 112, 16)
    jitter = _get(cfg, "pose_jitter", 1.0)
    if isinstance(jitter, bool) or not isinstance(jitter, (int, float)) or jitter < 0:
        raise DataError(f"data.pose_jitter must be a number >= 0, got {jitter!r}")
    name = str(_get(cfg, "name", "synthetic"))
    if cache_mode(cfg) == "none":
        log.warning("data.cache=none: the synthetic faces are rendered into the cache anyway (they are small)")
    names = [f"id{i:05d}" for i in range(n_ids)]
    out = {}
    parts = split_identities(names, _get(cfg, "split"), seed)
    for split in SPLITS:
        members = parts[split]
        ids = [int(m[2:]) for m in members]
        key = {"v": CACHE_VERSION, "gen": render.GENERATOR_VERSION, "seed": seed, "looks": looks,
               "size": size, "per": per, "pose_jitter": float(jitter), "ids": ids}
        npy, meta_path = _cache_paths(cache_dir, name, split, key)
        cached = _load_cached(npy, meta_path)
        if cached is None:
            jobs = [(i, j) for i in ids for j in range(per)]
            labels = np.repeat(np.arange(len(ids)), per).tolist()
            meta = {"n": len(jobs), "identities": members, "labels": labels,
                    "files": [f"{m}/{j:02d}" for m in members for j in range(per)], "skipped": []}
            workers = _workers(cfg, len(jobs))
            images = _build_synthetic(npy, jobs, seed, looks, size, float(jitter), workers, split)
            _write_meta(meta_path, meta)
            cached = images, meta
        out[split] = _faceset(*cached, npy, size)
    return out


def _build_synthetic(npy: Path, jobs, seed, looks, size, jitter, workers, split):
    if not jobs:
        return None
    npy.parent.mkdir(parents=True, exist_ok=True)
    tmp = npy.with_name(f"{npy.name}.tmp{os.getpid()}")
    t0 = time.perf_counter()
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(jobs), size, size, 3))
    render.render_many(jobs, seed=seed, num_looks=looks, size=size, pose_jitter=jitter, out=arr,
                       workers=workers)
    arr.flush()
    del arr
    os.replace(tmp, npy)
    dt = time.perf_counter() - t0
    log.info("synthetic %s: rendered %d faces in %.1f s (%.0f img/s, %d process(es)) -> %s",
             split, len(jobs), dt, len(jobs) / dt, workers, npy)
    return np.load(npy, mmap_mode="r")
