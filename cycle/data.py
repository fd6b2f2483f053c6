"""Face data for every stage: splits, decoded-array caches, (VLR, HR) loaders.

A dataset is either the procedural synthetic faces (`data=synthetic`) or a folder
with one sub-folder per identity (`data=folder`, `data=orl`). Each split is decoded
once into a uint8 (N, 112, 112, 3) .npy file under `cache_dir/faces/`, named by a
hash of everything that determines its content, and memory-mapped afterwards.
VLR images are made on the fly from the (augmented) HR image by `cycle.degrade`.

Bad input raises `DataError` with a message that says what to fix; it is checked
in the main process before any worker starts.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from cycle import synthetic
from cycle.degrade import check_res, degrade

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when decoding changes: it is part of every cache key
SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".pgm", ".ppm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")
AUGMENT_KEYS = {"flip": False, "rotate_deg": 0.0, "color_jitter": 0.0}


class DataError(ValueError):
    """Bad data input or data configuration; the message says what to fix."""


@dataclass
class FaceSet:
    images: np.ndarray      # uint8 (N, S, S, 3), memory-mapped from `cache_path`
    labels: np.ndarray      # int64 (N,), contiguous 0..num_classes-1 within this split
    identities: list[str]   # identity name per class index
    files: list[str] | None = None   # per sample "identity/file" (folder) or "identity/index" (synthetic)
    cache_path: str | None = None    # lets worker processes re-open the memory map instead of copying it

    @property
    def num_classes(self) -> int:
        return len(self.identities)

    def __len__(self) -> int:
        return len(self.labels)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)

    def __getstate__(self):  # pickled for spawn-started workers: ship the path, not the pixels
        state = dict(self.__dict__)
        if self.cache_path is not None:
            state["images"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.images is None:
            self.images = np.load(self.cache_path, mmap_mode="r")


# ---------------------------------------------------------------- config helpers

def _get(cfg: Mapping, key: str, default=None):
    """cfg[key] with a DataError for a missing mandatory value (`???`) or a broken interpolation."""
    try:
        value = cfg.get(key, default) if hasattr(cfg, "get") else default
    except Exception as exc:  # omegaconf MissingMandatoryValue / InterpolationResolutionError
        if "Missing mandatory value" in str(exc):
            raise DataError(f"data.{key} is required: pass data.{key}=... on the command line") from None
        raise DataError(f"data.{key} could not be resolved: {exc}") from None
    return default if value is None else value


def _plain(value):
    """OmegaConf containers -> plain Python, for hashing and validation."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with hydra
        pass
    return value


def _int(cfg: Mapping, key: str, default: int, minimum: int) -> int:
    value = _get(cfg, key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DataError(f"data.{key} must be an integer >= {minimum}, got {value!r}")
    return value


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


# ---------------------------------------------------------------- cache files

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


def _pool(workers: int):
    # fork, as torch's DataLoader on Linux: no re-import of the caller's __main__.
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn").Pool(workers)


def _workers(cfg: Mapping, jobs: int) -> int:
    wanted = _get(cfg, "prepare_workers", None) or os.cpu_count() or 1
    return max(1, min(int(wanted), jobs // 200 or 1))  # small jobs: process start-up costs more than it saves


# ---------------------------------------------------------------- synthetic

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
    names = [f"id{i:05d}" for i in range(n_ids)]
    out = {}
    parts = split_identities(names, _get(cfg, "split"), seed)
    for split in SPLITS:
        members = parts[split]
        ids = [int(m[2:]) for m in members]
        key = {"v": CACHE_VERSION, "gen": synthetic.GENERATOR_VERSION, "seed": seed, "looks": looks,
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
    synthetic.render_many(jobs, seed=seed, num_looks=looks, size=size, pose_jitter=jitter, out=arr,
                          workers=workers)
    arr.flush()
    del arr
    os.replace(tmp, npy)
    dt = time.perf_counter() - t0
    log.info("synthetic %s: rendered %d faces in %.1f s (%.0f img/s, %d process(es)) -> %s",
             split, len(jobs), dt, len(jobs) / dt, workers, npy)
    return np.load(npy, mmap_mode="r")


# ---------------------------------------------------------------- folders

def _scan_folder(cfg: Mapping) -> tuple[Path, dict[str, list[str]]]:
    """root/<identity>/<image> -> {identity: sorted image file names}; clear errors for bad layouts."""
    value = _get(cfg, "root", None)
    if not value:
        raise DataError("data.root is required: pass data.root=/path/to/faces (one sub-folder per identity)")
    root = Path(str(value)).expanduser()
    if not root.exists():
        raise DataError(f"data.root={root} does not exist")
    if not root.is_dir():
        raise DataError(f"data.root={root} is not a directory (expected one sub-folder per identity)")
    exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}"
                 for e in (_plain(_get(cfg, "extensions", None)) or IMAGE_EXTENSIONS))
    entries = sorted((e for e in os.scandir(root) if not e.name.startswith(".")), key=lambda e: e.name)
    dirs = [e for e in entries if e.is_dir()]
    if not dirs:
        loose = sum(1 for e in entries if e.is_file() and e.name.lower().endswith(exts))
        if loose:
            raise DataError(f"data.root={root} holds {loose} images but no identity sub-folders: "
                            f"expected root/<identity>/<image>")
        raise DataError(f"data.root={root} is empty: expected one sub-folder per identity")
    found, ignored, empty = {}, [], []
    for d in dirs:
        files = sorted(f.name for f in os.scandir(d.path) if f.is_file() and not f.name.startswith("."))
        images = [f for f in files if f.lower().endswith(exts)]
        ignored += [f"{d.name}/{f}" for f in files if not f.lower().endswith(exts)]
        if images:
            found[d.name] = images
        else:
            empty.append(d.name)
    if ignored:
        log.info("data.root=%s: ignored %d non-image file(s), e.g. %s",
                 root, len(ignored), ", ".join(ignored[:3]))
    if not found:
        raise DataError(f"data.root={root}: no image files ({', '.join(exts)}) in any of its {len(dirs)} "
                        f"sub-folder(s); {len(ignored)} other file(s) ignored")
    if empty:
        log.warning("data.root=%s: %d identity folder(s) without images skipped: %s",
                    root, len(empty), ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else ""))
    return root, found


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


def load_image(path, size: int = 112, resize: str = "resize") -> np.ndarray:
    """Any Pillow-readable image -> uint8 (size, size, 3). `resize`: 'resize' (whole image,
    aspect not kept) or 'center_crop' (central square, then resize). Raises OSError/ValueError."""
    with Image.open(path) as im:
        im.load()  # decodes fully: truncated files fail here, not later
        if im.mode.startswith("I;16") or im.mode in ("I", "F"):  # 16-bit/float greyscale: rescale, don't clip
            arr = np.asarray(im, np.float32)
            top = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1e-6)
            im = Image.fromarray((np.clip(arr / top, 0, 1) * 255 + 0.5).astype(np.uint8))
        im = im.convert("RGB")
        if resize == "center_crop":
            w, h = im.size
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        return np.asarray(im, np.uint8)


def _decode_chunk(args):
    paths, size, resize = args
    out, errors = np.zeros((len(paths), size, size, 3), np.uint8), {}
    for i, p in enumerate(paths):
        try:
            out[i] = load_image(p, size, resize)
        except Exception as exc:  # any decoder failure = a corrupt file; the parent reports it
            errors[i] = f"{type(exc).__name__}: {exc}"
    return out, errors


def _decode_folder(npy: Path, root: Path, files: list[str], size: int, resize: str, workers: int):
    """Decode into a temporary memmap; returns (memmap, its path, ok mask, {file: reason})."""
    npy.parent.mkdir(parents=True, exist_ok=True)
    tmp = npy.with_name(f"{npy.name}.tmp{os.getpid()}")
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(files), size, size, 3))
    chunk = 64
    tasks = [([str(root / f) for f in files[i:i + chunk]], size, resize) for i in range(0, len(files), chunk)]
    bad: dict[str, str] = {}
    pool = _pool(workers) if workers > 1 else None
    try:
        results = pool.imap(_decode_chunk, tasks) if pool else map(_decode_chunk, tasks)
        for t, (block, errors) in enumerate(results):
            arr[t * chunk:t * chunk + len(block)] = block
            bad.update({files[t * chunk + i]: msg for i, msg in errors.items()})
    finally:
        if pool:
            pool.close()
            pool.join()
    ok = np.array([f not in bad for f in files], bool)
    return arr, tmp, ok, bad


def _commit(arr: np.memmap, tmp: Path, ok: np.ndarray, npy: Path) -> None:
    """Move the decoded rows into place atomically, dropping the rows that failed to decode."""
    if ok.all():
        arr.flush()
        del arr
        os.replace(tmp, npy)
        return
    part = npy.with_name(f"{npy.name}.tmp{os.getpid()}b")
    final = np.lib.format.open_memmap(part, mode="w+", dtype=np.uint8, shape=(int(ok.sum()), *arr.shape[1:]))
    row = 0
    for start in range(0, len(arr), 4096):  # in blocks: a big dataset does not fit in memory
        block = arr[start:start + 4096][ok[start:start + 4096]]
        final[row:row + len(block)] = block
        row += len(block)
    final.flush()
    del arr, final
    tmp.unlink()
    os.replace(part, npy)


def _report_skipped(root, skipped: list[list[str]], strict: bool) -> None:
    if not skipped:
        return
    listed = "; ".join(f"{f} ({why})" for f, why in skipped[:10]) + (" ..." if len(skipped) > 10 else "")
    if strict:
        raise DataError(f"{len(skipped)} unreadable image file(s) under {root} and data.strict=true: "
                        f"{listed}")
    log.warning("skipped %d unreadable image file(s) under %s (data.strict=true makes this an error): %s",
                len(skipped), root, listed)


def _folder_split(cfg, cache_dir, root: Path, split: str, members: list[str], found, size, resize, strict):
    files = [f"{m}/{f}" for m in members for f in found[m]]
    if not files:  # a split configured to 0 identities
        return FaceSet(np.zeros((0, size, size, 3), np.uint8), np.zeros(0, np.int64), [], [])
    stats = []
    for f in files:
        st = os.stat(root / f)
        stats.append([f, st.st_size, st.st_mtime_ns])
    key = {"v": CACHE_VERSION, "root": str(root.resolve()), "size": size, "resize": resize, "files": stats}
    name = str(_get(cfg, "name", "folder"))
    npy, meta_path = _cache_paths(cache_dir, name, split, key)
    cached = _load_cached(npy, meta_path)
    if cached is not None:
        _report_skipped(root, cached[1]["skipped"], strict)
        return _faceset(*cached, npy, size)
    t0 = time.perf_counter()
    arr, tmp, ok, bad = _decode_folder(npy, root, files, size, resize, _workers(cfg, len(files)))
    skipped = [[f, bad[f]] for f in files if f in bad]
    if skipped and strict:
        arr = None  # unmap before removing the file
        tmp.unlink(missing_ok=True)
    _report_skipped(root, skipped, strict)  # raises in strict mode
    _commit(arr, tmp, ok, npy)
    kept = [f for f, good in zip(files, ok) if good]
    ident = [f.split("/", 1)[0] for f in kept]
    identities = sorted(set(ident))
    lost = [m for m in members if m not in set(identities)]
    if lost:
        log.warning("%s split: %d identities lost every image to decoding errors: %s",
                    split, len(lost), lost[:5])
    index = {m: i for i, m in enumerate(identities)}
    meta = {"n": len(kept), "identities": identities, "labels": [index[i] for i in ident],
            "files": kept, "skipped": skipped}
    _write_meta(meta_path, meta)
    log.info("%s %s: decoded %d images of %d identities in %.1f s -> %s",
             name, split, len(kept), len(identities), time.perf_counter() - t0, npy)
    return _faceset(np.load(npy, mmap_mode="r") if kept else None, meta, npy, size)


def _folder_splits(cfg: Mapping, cache_dir) -> dict[str, FaceSet]:
    seed = _int(cfg, "seed", 0, 0)
    size = _int(cfg, "image_size", 112, 16)
    resize = _get(cfg, "resize", "resize")
    if resize not in ("resize", "center_crop"):
        raise DataError(f"data.resize={resize!r} must be 'resize' or 'center_crop'")
    strict = bool(_get(cfg, "strict", False))
    root, found = _scan_folder(cfg)
    found = _select(cfg, found, seed)
    parts = split_identities(list(found), _get(cfg, "split"), seed)
    log.info("data.root=%s: %d identities, %d images; split train/val/test = %s identities", root, len(found),
             sum(map(len, found.values())), "/".join(str(len(parts[s])) for s in SPLITS))
    return {s: _folder_split(cfg, cache_dir, root, s, parts[s], found, size, resize, strict) for s in SPLITS}


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


def pairable_identities(faces: FaceSet, min_images: int = 2) -> np.ndarray:
    """Class indices with at least `min_images` images: the ones genuine pairs can be drawn from."""
    counts = faces.class_counts()
    keep = np.flatnonzero(counts >= min_images)
    if len(keep) < faces.num_classes:
        log.warning("%d of %d identities have fewer than %d images and are excluded from pair protocols",
                    faces.num_classes - len(keep), faces.num_classes, min_images)
    return keep


# ---------------------------------------------------------------- sampling

def _key_seed(*parts: int) -> int:
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1, np.uint64)
    return int(state[0] >> 1)  # torch.Generator.manual_seed takes < 2**63


class _EpochMixin:
    """Epoch counter: set_epoch(e) pins the next epoch; otherwise each pass advances by one."""

    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _take_epoch(self) -> int:
        epoch, self.epoch = self.epoch, self.epoch + 1
        return epoch


class EpochSampler(_EpochMixin, Sampler):
    """Yields (index, epoch, slot) keys; shuffled per (seed, epoch) when `shuffle`."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        epoch = self._take_epoch()
        order = range(self.n)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        for slot, i in enumerate(order):
            yield int(i), epoch, slot


class PKBatchSampler(_EpochMixin, Sampler):
    """Batches of P distinct identities x K images each (drawn with replacement only for
    identities with fewer than K images). Identities with one image are skipped when K > 1."""

    def __init__(self, labels: np.ndarray, p: int, k: int, seed: int = 0):
        self.p, self.k, self.seed = p, k, seed
        labels = np.asarray(labels)
        num_classes = int(labels.max()) + 1 if len(labels) else 0
        self.by_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
        self.classes = [c for c, idx in enumerate(self.by_class) if len(idx) >= min(2, k)]
        if len(self.classes) < p:
            raise DataError(f"P x K sampler needs P={p} identities with >= {min(2, k)} images; "
                            f"this split has {len(self.classes)}: lower P or use more identities")
        self.num_batches = max(1, sum(len(self.by_class[c]) for c in self.classes) // (p * k))

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        epoch = self._take_epoch()
        rng = np.random.default_rng([self.seed, epoch, 7])
        queue: list[int] = []
        slot = 0
        for _ in range(self.num_batches):
            chosen: list[int] = []
            while len(chosen) < self.p:
                if not queue:
                    queue = list(rng.permutation(self.classes))
                c = queue.pop()
                if c not in chosen:
                    chosen.append(c)
            batch = []
            for c in chosen:
                idx = self.by_class[c]
                pick = rng.choice(idx, self.k, replace=len(idx) < self.k)
                for i in pick:
                    batch.append((int(i), epoch, slot))
                    slot += 1
            yield batch


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Pin the shuffle/augmentation epoch of a loader from make_loader (e.g. after resume)."""
    for s in (loader.batch_sampler, loader.sampler):
        if hasattr(s, "set_epoch"):
            s.set_epoch(epoch)
            return


# ---------------------------------------------------------------- dataset

def _check_augment(augment: Mapping | None) -> dict:
    aug = dict(AUGMENT_KEYS)
    augment = _plain(augment) or {}
    unknown = sorted(set(augment) - set(AUGMENT_KEYS))
    if unknown:
        raise DataError(f"data.augment: unknown key(s) {unknown}; known: {sorted(AUGMENT_KEYS)}")
    aug.update({k: v for k, v in augment.items() if v is not None})
    for k in ("rotate_deg", "color_jitter"):
        if isinstance(aug[k], bool) or not isinstance(aug[k], (int, float)) or aug[k] < 0:
            raise DataError(f"data.augment.{k} must be a number >= 0, got {aug[k]!r}")
    if aug["color_jitter"] >= 1:
        raise DataError(f"data.augment.color_jitter must be < 1, got {aug['color_jitter']}")
    aug["flip"] = bool(aug["flip"])
    return aug


def augment_batch(hr: torch.Tensor, aug: Mapping, gens: list[torch.Generator]) -> torch.Tensor:
    """Flip, small rotation and colour jitter of HR images (B,3,H,W), each image's draws from its own
    generator; the VLR image is made afterwards from the result, so (VLR, HR) stay aligned."""
    u = torch.stack([torch.rand(5, generator=g) for g in gens]).to(hr.dtype)  # fixed draws per image
    if aug["flip"]:
        flip = (u[:, 0] < 0.5).view(-1, 1, 1, 1)
        hr = torch.where(flip, hr.flip(-1), hr)
    if aug["rotate_deg"] > 0:
        a = torch.deg2rad((u[:, 1] * 2 - 1) * aug["rotate_deg"])
        cos, sin, zero = a.cos(), a.sin(), torch.zeros_like(a)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        grid = F.affine_grid(theta, list(hr.shape), align_corners=False)
        hr = F.grid_sample(hr, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    j = aug["color_jitter"]
    if j > 0:  # brightness, contrast, saturation factors in [1-j, 1+j]
        b, c, s = ((1 + (u[:, 2:5] * 2 - 1) * j).T).view(3, -1, 1, 1, 1)
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=hr.dtype).view(1, 3, 1, 1)
        hr = hr * b
        mean = (hr * weights).sum(1, keepdim=True).mean((2, 3), keepdim=True)
        hr = (hr - mean) * c + mean
        gray = (hr * weights).sum(1, keepdim=True)
        hr = gray + (hr - gray) * s
    return hr.clamp(0.0, 1.0)


class FacePairs(Dataset):
    """Map-style dataset over a FaceSet, keyed by the samplers' (index, epoch, slot).

    Items are cheap (uint8 HR + a seed); `collate` does augmentation and degradation on the
    whole batch, which is ~10x faster than per image on a busy CPU. Each image's randomness
    comes from a generator seeded by its key, so a batch does not depend on the number of
    workers, and evaluation noise depends on the sample index only.
    """

    def __init__(self, faces: FaceSet, res: int | None, degradation: Mapping | None, train: bool,
                 augment: Mapping | None, seed: int):
        self.faces, self.res, self.train, self.seed = faces, res, train, seed
        self.degradation = _plain(degradation)
        self.aug = _check_augment(augment) if train else None

    def __len__(self) -> int:
        return len(self.faces)

    def __getitem__(self, key) -> tuple[torch.Tensor, int, int, int]:
        index, epoch, slot = key if isinstance(key, tuple) else (int(key), 0, 0)
        seed = _key_seed(self.seed, epoch, slot, index, 1) if self.train else _key_seed(self.seed, index, 2)
        hr = torch.from_numpy(np.array(self.faces.images[index])).permute(2, 0, 1)
        return hr, int(self.faces.labels[index]), index, seed

    def collate(self, items) -> dict[str, torch.Tensor]:
        # One intra-op thread, as in DataLoader workers: these ops are too small to split, and on a
        # busy 2-core machine a 2-thread barrier per op made loading ~10x slower (measured).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._collate(items)
        finally:
            torch.set_num_threads(threads)

    def _collate(self, items) -> dict[str, torch.Tensor]:
        hr = torch.stack([it[0] for it in items]).float().div_(255.0)
        gens = [torch.Generator().manual_seed(it[3]) for it in items]
        if self.aug is not None and (self.aug["flip"] or self.aug["rotate_deg"] or self.aug["color_jitter"]):
            hr = augment_batch(hr, self.aug, gens)
        batch = {"hr": hr, "label": torch.tensor([it[1] for it in items], dtype=torch.int64),
                 "index": torch.tensor([it[2] for it in items], dtype=torch.int64)}
        if self.res is not None:
            batch["lr"] = degrade(hr, self.res, self.degradation, generator=gens)
        return batch


class FaceLoader(DataLoader):
    """A DataLoader with `set_epoch(e)`: pins the shuffle/augmentation epoch (e.g. after resume)."""

    def set_epoch(self, epoch: int) -> None:
        set_epoch(self, epoch)


def make_loader(faces: FaceSet, *, batch_size: int, res: int | None, degradation: Mapping | None, train: bool,
                pk: tuple[int, int] | None = None, augment: Mapping | None = None, num_workers: int = 0,
                seed: int = 0, drop_last: bool | None = None) -> FaceLoader:
    """DataLoader of {"hr", "lr", "label", "index"} batches (see module doc). `loader.set_epoch(e)`
    pins the epoch (resume); otherwise every pass over the loader advances it by one."""
    if not isinstance(faces, FaceSet):
        raise DataError(f"make_loader expects a FaceSet from build_splits, got {type(faces).__name__}")
    if len(faces) == 0:
        raise DataError("this split is empty: raise data.split or add identities")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise DataError(f"num_workers must be an integer >= 0, got {num_workers!r}")
    try:
        res = None if res is None else check_res(res)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    dataset = FacePairs(faces, res, degradation, train, augment, seed)
    dataset.collate([dataset[(0, 0, 0)]])  # fail here, in the caller's process, on a bad degradation config
    kwargs = dict(num_workers=num_workers, persistent_workers=num_workers > 0, collate_fn=dataset.collate,
                  pin_memory=torch.cuda.is_available())
    if pk is not None:
        if not train:
            raise DataError("the P x K sampler is for training (train=True)")
        p, k = (int(v) for v in pk)
        if p < 1 or k < 1 or p * k != batch_size:
            raise DataError(f"pk=({p}, {k}) needs batch_size = P*K = {p * k}, got batch_size={batch_size}")
        return FaceLoader(dataset, batch_sampler=PKBatchSampler(faces.labels, p, k, seed), **kwargs)
    if drop_last is None:
        drop_last = train and len(faces) >= batch_size  # a split smaller than one batch still yields it
    elif drop_last and len(faces) < batch_size:
        raise DataError(f"drop_last=True with {len(faces)} samples < batch_size={batch_size} gives no batch")
    return FaceLoader(dataset, batch_size=batch_size, sampler=EpochSampler(len(faces), seed, shuffle=train),
                      drop_last=drop_last, **kwargs)


def loader_throughput(loader: DataLoader, batches: int = 30, warmup: int = 2) -> float:
    """Samples per second of iterating `loader` (after `warmup` batches, which include worker start-up)."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    n, t0 = 0, time.perf_counter()
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        n += len(batch["index"])
    return n / (time.perf_counter() - t0)


def stage_loaders(cfg: Mapping, res: int | None) -> tuple[dict[str, FaceSet], DataLoader, DataLoader]:
    """The splits and the (train, val) loaders every training stage uses, from the composed config.

    res=None gives HR-only batches (EdgeFace pre-training).
    """
    t = cfg.trainer
    splits = build_splits(cfg.data, cfg.paths.cache_dir)
    pk = tuple(t.pk) if t.get("pk") else None
    common = dict(batch_size=int(t.batch_size), res=res, degradation=cfg.degradation,
                  num_workers=int(t.num_workers), seed=int(cfg.seed))
    train = make_loader(splits["train"], train=True, pk=pk, augment=cfg.data.augment, **common)
    val = make_loader(splits["val"], train=False, **common)
    return splits, train, val
