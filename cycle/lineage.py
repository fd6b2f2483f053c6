"""Lineage: what identifies an artifact, the way a build cache keys its outputs.

An artifact's key is a hash of everything that determines it: the data (settings, root and a content
fingerprint of the files), the identity split, the degradation, res, seed, the trainer settings, the
stage's own settings (2nd-cycle values merged), the network it trains, and the keys of its parents (or
the content hash of the official EdgeFace weights). Different settings never share an artifact; the same
command computes the same keys and finds its artifacts again; `python -m eval` computes them from the
configuration it is given. `LINEAGE_VERSION` is part of every key: bump it when training changes
meaning so old artifacts stop matching.

The fingerprint of a folder data set is its file list with sizes and modification times (no pixels
are read): renaming, adding, removing or rewriting a file changes it. It is computed once per process
(`forget()` drops what was computed).
"""
from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cycle.stages import STAGE, producer, resolve_input, stage_settings, stage_spec, uses_official_weights

LINEAGE_VERSION = 1
KEY_CHARS = 12
# Settings that change how fast or how loudly a run goes, never what it trains.
_DATA_IGNORED = {"num_workers", "prepare_workers"}
_TRAINER_IGNORED = {"num_workers", "progress", "log_every", "ckpt_every", "sample_every",
                    "degrade_on"}  # same batches on either side (tests/test_distributed.py)


def digest(obj: Any, chars: int | None = None) -> str:
    """sha256 of the canonical JSON of `obj` (sorted keys)."""
    h = hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
    return h[:chars] if chars else h


@lru_cache(maxsize=256)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """Content hash of a file, computed once per process for an unchanged file."""
    st = os.stat(path)
    return _file_sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=32)
def _listing_digest(root: str) -> tuple[str, int]:
    """Walked once per process (a run computes every key from it): data changing under a running job is
    not followed."""
    h, count = hashlib.sha256(), 0
    for dirpath, dirnames, filenames in os.walk(root):  # symlinked folders are not followed
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            try:
                st = os.stat(path)
            except OSError:  # dangling link: not data
                continue
            h.update(f"{os.path.relpath(path, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            count += 1
    return h.hexdigest(), count


def forget() -> None:
    """Drop the per-process fingerprints and file hashes (data or weights changed in this process)."""
    _listing_digest.cache_clear()
    _file_sha256.cache_clear()


def data_fingerprint(data: DictConfig) -> dict:
    """{root, content (sha256 of the file list with sizes and mtimes), files}; root None for generated data."""
    root = data.get("root") if "root" in data and not OmegaConf.is_missing(data, "root") else None
    if not root:
        return {"root": None, "content": None, "files": 0}
    path = Path(str(root)).expanduser().resolve()
    if not path.is_dir():
        return {"root": str(path), "content": None, "files": 0}  # the data layer reports the real error
    content, count = _listing_digest(str(path))
    return {"root": str(path), "content": content, "files": count}


def data_identity(cfg: DictConfig) -> dict:
    """The data settings that shape training (root, split, subsets, augmentation...) and the fingerprint."""
    settings = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k not in _DATA_IGNORED}
    return {"settings": settings, "fingerprint": data_fingerprint(cfg.data)}


def weights_identity(cfg: DictConfig) -> dict:
    """The official EdgeFace weights by content (the path alone may be overwritten)."""
    path = str(cfg.edgeface.weights)
    try:
        sha = file_sha256(path)
    except OSError:
        sha = None  # loading reports the missing file with where to get it
    return {"path": path, "sha256": sha, "variant": str(cfg.edgeface.variant)}


def _plain(node) -> Any:
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True) if OmegaConf.is_config(node) else node


def stage_material(cfg: DictConfig, name: str, cycle_index: int = 1, _memo: dict | None = None) -> dict:
    """Everything that determines the artifact of stage `name` at `cycle_index` (what its key hashes)."""
    memo = {} if _memo is None else _memo
    spec = stage_spec(name)
    k = cycle_index if spec.repeats else 1
    trainer = {key: v for key, v in _plain(cfg.trainer).items() if key not in _TRAINER_IGNORED}
    parents = {}
    for ref in spec.inputs:
        artifact = resolve_input(ref, k, uses_official_weights(cfg))
        if artifact is None:
            parents["edgeface.weights"] = weights_identity(cfg)["sha256"]
        else:
            parents[artifact] = artifact_key(cfg, artifact, memo)
    model = _plain(cfg.dsr) if spec.kind == "dsr" else {"variant": str(cfg.edgeface.variant)}
    return {"version": LINEAGE_VERSION, "stage": spec.name, "cycle": k, "res": str(cfg.res), "seed": int(cfg.seed),
            "data": data_identity(cfg), "degradation": _plain(cfg.degradation),
            "settings": _plain(stage_settings(cfg, spec.name, k)), "trainer": trainer, "model": model,
            "parents": parents}


def artifact_key(cfg: DictConfig, artifact: str, _memo: dict | None = None) -> str:
    """The key of `artifact` (e.g. dsr_cyclic2) under this configuration."""
    memo = {} if _memo is None else _memo
    if artifact not in memo:
        spec, k = producer(artifact)
        memo[artifact] = digest(stage_material(cfg, spec.name, k, memo), KEY_CHARS)
    return memo[artifact]


def artifact_keys(cfg: DictConfig, max_cycles: int = 2) -> dict[str, str]:
    """Keys of every artifact the stage table can produce for cycles 1..max_cycles."""
    memo: dict[str, str] = {}
    names = {s.artifact(k) for s in STAGE.values() for k in range(1, (max_cycles if s.repeats else 1) + 1)}
    if uses_official_weights(cfg):
        names.discard(STAGE["edgeface_pretrain"].artifact(1))
    return {n: artifact_key(cfg, n, memo) for n in sorted(names)}


def run_tag(cfg: DictConfig) -> str:
    """What a run directory adds for inputs its overrides cannot show: the data files and the weights
    file by content. "" for generated data without official weights."""
    parts = []
    fp = data_fingerprint(cfg.data)
    if fp["root"]:
        parts.append(f"data-{digest(fp, 8)}")
    if uses_official_weights(cfg):
        parts.append(f"weights-{digest(weights_identity(cfg), 8)}")
    return ",".join(parts)
