"""A source split (folder files or .rec records) -> FaceSet: a decoded cache built in resumable chunks, or streamed.

`data.cache=disk` (default): the split is decoded once into `cache_dir/faces/<name>-<split>-<hash>.npy`.
The build writes chunks of `CHUNK` images with `os.pwrite` into `<...>.partial` (no whole-split array in
memory) and records its progress in `<...>.progress.json` every few seconds, after syncing the data; a
killed build (even `kill -9`) continues from the last recorded chunk when the same command runs again.
A lock file serialises processes that need the same cache (DDP ranks, sweep jobs); the others wait and
then load it. Progress: a bar on a terminal, and a log line with rate and ETA every 30 s.

`data.cache=none`: nothing is written; the loader workers decode each image from the source when it is
drawn (`Streamed`), for sets larger than the local disk. Unreadable files then surface during training:
a warning and a black image (a `DataError` with `data.strict=true`).

A source is any object with `__len__`, `size` (S), `load(i) -> uint8 (S, S, 3)` (raising on a bad
file) and `name(i)` (for messages); it is pickled once per build worker and once per loader worker.
"""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Mapping

import numpy as np

from cycle.data.cache import _cache_paths, _faceset, _load_cached, _workers, _write_meta
from cycle.data.faceset import FaceSet
from cycle.data.options import DataError, _get, _int

log = logging.getLogger(__name__)

CHUNK = 256          # images per decoding task and per write
SAVE_EVERY_S = 2.0   # progress is recorded at most this often (each record costs an fdatasync)
LOG_EVERY_S = 30.0
CACHE_MODES = ("disk", "none")


def source_options(cfg: Mapping) -> tuple[int, int, str]:
    """(split seed, image size, resize mode) of an image source, checked with `data.cache` before any scan."""
    seed = _int(cfg, "seed", 0, 0)
    size = _int(cfg, "image_size", 112, 16)
    resize = _get(cfg, "resize", "resize")
    if resize not in ("resize", "center_crop"):
        raise DataError(f"data.resize={resize!r} must be 'resize' or 'center_crop'")
    cache_mode(cfg)
    return seed, size, resize


def cache_mode(cfg: Mapping) -> str:
    mode = str(_get(cfg, "cache", "disk"))
    if mode not in CACHE_MODES:
        raise DataError(f"data.cache={mode!r} must be disk (decode once into cache_dir) or none (stream from "
                        "the source through the loader workers)")
    return mode


class Streamed:
    """Array-like view of a source that decodes on access (data.cache=none)."""

    def __init__(self, source, size: int, strict: bool):
        self.source, self.strict = source, strict
        self.shape, self.dtype = (len(source), size, size, 3), np.dtype(np.uint8)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        if isinstance(index, (slice, list, np.ndarray)):
            rows = np.arange(len(self))[index]
            return np.stack([self[int(i)] for i in rows]) if len(rows) else np.zeros((0, *self.shape[1:]), np.uint8)
        try:
            return self.source.load(int(index))
        except DataError:
            raise
        except Exception as exc:  # any decoder failure = a corrupt file
            if self.strict:
                raise DataError(f"unreadable image {self.source.name(int(index))} ({type(exc).__name__}: {exc}) "
                                "and data.strict=true") from None
            log.warning("unreadable image %s (%s: %s): using a black image (data.strict=true makes this an "
                        "error; data.cache=disk finds and drops such files before training)",
                        self.source.name(int(index)), type(exc).__name__, exc)
            return np.zeros(self.shape[1:], np.uint8)


# ------------------------------------------------------------------------------------ building the cache

_SOURCE = None  # the source in a build worker (set by the pool initializer)


def _init_worker(source) -> None:
    global _SOURCE
    _SOURCE = source


def _decode_rows(span: tuple[int, int]) -> tuple[int, np.ndarray, dict[int, str]]:
    start, stop = span
    out, errors = np.zeros((stop - start, _SOURCE.size, _SOURCE.size, 3), np.uint8), {}
    for i in range(start, stop):
        try:
            out[i - start] = _SOURCE.load(i)
        except Exception as exc:  # any decoder failure = a corrupt file; the parent reports it
            errors[i] = f"{type(exc).__name__}: {exc}"
    return start, out, errors


def _bounded_imap(pool, spans, ahead: int):
    """pool.imap, but at most `ahead` chunks decoded and not yet written: memory stays bounded when the
    disk is slower than the decoders (imap queues every finished result)."""
    pending = collections.deque()
    for span in spans:
        pending.append(pool.apply_async(_decode_rows, (span,)))
        if len(pending) >= ahead:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


class _Progress:
    def __init__(self, what: str, total: int, done: int):
        self.what, self.total, self.start_done, self.done = what, total, done, done
        self.t0 = self.last_log = time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=done, unit="img", desc=what, smoothing=0.05)
            except ImportError:  # pragma: no cover - tqdm ships with the dependencies
                pass

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        now = time.monotonic()
        if now - self.last_log >= LOG_EVERY_S:
            self.last_log = now
            rate = (self.done - self.start_done) / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            log.info("%s: %d/%d images (%.1f%%), %.0f img/s, ETA %s", self.what, self.done, self.total,
                     100.0 * self.done / self.total, rate, f"{int(eta // 3600)}h{int(eta % 3600 // 60):02d}m")

    def close(self) -> float:
        if self.bar is not None:
            self.bar.close()
        return (self.done - self.start_done) / max(time.monotonic() - self.t0, 1e-9)


@contextlib.contextmanager
def _locked(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process building %s", path.with_suffix(""))
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _save_progress(path: Path, state: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)


def build_rows(npy: Path, source, size: int, workers: int, what: str) -> dict[int, str]:
    """Decode every row of `source` into `npy.partial`, resuming a killed build; {row: reason} of failures."""
    n = len(source)
    partial, progress = npy.with_suffix(".partial"), npy.with_suffix(".progress.json")
    state = None
    if partial.exists() and progress.exists():
        try:
            state = json.loads(progress.read_text())
            if state["n"] != n or state["size"] != size or partial.stat().st_size < state["offset"]:
                state = None
        except (OSError, ValueError, KeyError):
            state = None
    if state is None:
        arr = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
        state = {"n": n, "size": size, "offset": int(arr.offset), "done": 0, "bad": {}}
        del arr  # a sparse file with its .npy header; rows are written with pwrite below
        _save_progress(progress, state)
    elif state["done"]:
        log.info("%s: resuming an interrupted build at image %d of %d", what, state["done"], n)
    done, bad = int(state["done"]), {int(k): v for k, v in state["bad"].items()}
    row_bytes = size * size * 3
    spans = [(s, min(s + CHUNK, n)) for s in range(done, n, CHUNK)]
    bar = _Progress(what, n, done)
    fd = os.open(partial, os.O_RDWR)
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pool = ctx.Pool(workers, _init_worker, (source,)) if workers > 1 and len(spans) > 1 else None
    last_save = time.monotonic()
    try:
        if pool is None:
            _init_worker(source)
        results = _bounded_imap(pool, spans, 2 * workers) if pool else map(_decode_rows, spans)
        for start, block, errors in results:  # in order: `done` is always a prefix
            os.pwrite(fd, block.tobytes(), state["offset"] + start * row_bytes)
            bad.update(errors)
            done = start + len(block)
            bar.update(done - start)
            if time.monotonic() - last_save >= SAVE_EVERY_S or done == n:
                os.fdatasync(fd)  # the rows reach the disk before the record that says they are there
                _save_progress(progress, {**state, "done": done, "bad": bad})
                last_save = time.monotonic()
    finally:
        os.close(fd)
        if pool is not None:
            pool.terminate()
            pool.join()
    rate = bar.close()
    log.info("%s: decoded %d images at %.0f img/s (%d process(es))", what, n - int(state["done"]), rate, workers)
    return bad


def _commit(npy: Path, ok: np.ndarray, size: int) -> None:
    """`npy.partial` -> `npy`, dropping failed rows block by block (bounded memory)."""
    partial = npy.with_suffix(".partial")
    if ok.all():
        os.replace(partial, npy)
        return
    src = np.load(partial, mmap_mode="r")
    compact = npy.with_suffix(".compact")
    dst = np.lib.format.open_memmap(compact, mode="w+", dtype=np.uint8, shape=(int(ok.sum()), size, size, 3))
    offset, row_bytes = int(dst.offset), size * size * 3
    del dst
    row = 0
    with open(compact, "r+b") as f:
        for start in range(0, len(ok), 4096):
            block = np.asarray(src[start:start + 4096][ok[start:start + 4096]])
            os.pwrite(f.fileno(), block.tobytes(), offset + row * row_bytes)
            row += len(block)
    del src
    os.replace(compact, npy)
    partial.unlink()


def report_skipped(where, skipped: list[list[str]], strict: bool) -> None:
    if not skipped:
        return
    listed = "; ".join(f"{f} ({why})" for f, why in skipped[:10]) + (" ..." if len(skipped) > 10 else "")
    if strict:
        raise DataError(f"{len(skipped)} unreadable image file(s) under {where} and data.strict=true: {listed}")
    log.warning("skipped %d unreadable image file(s) under %s (data.strict=true makes this an error): %s",
                len(skipped), where, listed)


def source_split(cfg: Mapping, cache_dir, split: str, source, files: list[str], key: dict, where: str,
                 size: int) -> FaceSet:
    """The FaceSet of one split: `files[i]` is "identity/item" of `source` row i; `key` determines the content."""
    strict = bool(_get(cfg, "strict", False))
    if not files:  # a split configured to 0 identities
        return FaceSet(np.zeros((0, size, size, 3), np.uint8), np.zeros(0, np.int64), [], [])
    name = str(_get(cfg, "name", "folder"))
    if cache_mode(cfg) == "none":
        ident = [f.split("/", 1)[0] for f in files]
        identities = sorted(set(ident))
        index = {m: i for i, m in enumerate(identities)}
        return FaceSet(Streamed(source, size, strict), np.array([index[i] for i in ident], np.int64),
                       identities, list(files))
    npy, meta_path = _cache_paths(cache_dir, name, split, key)
    cached = _load_cached(npy, meta_path)
    if cached is None:
        with _locked(npy.with_suffix(".lock")):
            cached = _load_cached(npy, meta_path)  # another process may have built it while we waited
            if cached is None:
                cached = _build(cfg, npy, meta_path, split, source, files, where, size, strict, name)
    report_skipped(where, cached[1]["skipped"], strict)
    return _faceset(*cached, npy, size)


def _build(cfg, npy: Path, meta_path: Path, split, source, files, where, size, strict, name):
    t0 = time.perf_counter()
    bad = build_rows(npy, source, size, _workers(cfg, len(files)), f"{name} {split} cache")
    skipped = [[files[i], bad[i]] for i in sorted(bad)]
    if skipped and strict:  # the user fixes the files; their new size/mtime give a new cache key
        npy.with_suffix(".partial").unlink(missing_ok=True)
        npy.with_suffix(".progress.json").unlink(missing_ok=True)
        report_skipped(where, skipped, strict)
    ok = np.ones(len(files), bool)
    ok[list(bad)] = False
    kept = [f for f, good in zip(files, ok) if good]
    ident = [f.split("/", 1)[0] for f in kept]
    identities = sorted(set(ident))
    lost = sorted(set(f.split("/", 1)[0] for f in files) - set(identities))
    if lost:
        log.warning("%s split: %d identities lost every image to decoding errors: %s", split, len(lost), lost[:5])
    index = {m: i for i, m in enumerate(identities)}
    meta = {"n": len(kept), "identities": identities, "labels": [index[i] for i in ident], "files": kept,
            "skipped": skipped}
    _write_meta(meta_path, meta)  # before the .npy appears: a crash in between resumes at "done = n"
    _commit(npy, ok, size)
    npy.with_suffix(".progress.json").unlink(missing_ok=True)
    log.info("%s %s: %d images of %d identities in %.1f s -> %s", name, split, len(kept), len(identities),
             time.perf_counter() - t0, npy)
    return (np.load(npy, mmap_mode="r") if kept else None), meta
