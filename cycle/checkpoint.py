"""Checkpoints: plain dicts of tensors and built-in types, written atomically.

Everything saved here loads with `torch.load(..., weights_only=True)`: no pickled
classes, so a checkpoint outlives refactors of the code that wrote it.
"""
from __future__ import annotations

import io
import logging
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cycle.errors import CheckpointError, Diverged, output_error

log = logging.getLogger(__name__)


TEMP_SUFFIX = ".tmp"  # `.<name>.<random>.tmp`: what an interrupted save leaves behind


def umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def nonfinite_entries(obj: Any, prefix: str = "") -> list[str]:
    """Keys of the floating-point tensors in `obj` (nested dicts/lists) holding NaN or inf."""
    if isinstance(obj, torch.Tensor):
        ok = not obj.is_floating_point() or obj.is_quantized or bool(torch.isfinite(obj).all())
        return [] if ok else [prefix or "<tensor>"]
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return []
    return [bad for k, v in items for bad in nonfinite_entries(v, f"{prefix}.{k}" if prefix else str(k))]


def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike, what: str = "checkpoint",
                    keeps: str | None = None) -> Path:
    """Write `obj` to `path` via a temp file in the same folder and `os.replace`.

    A crash mid-write leaves the previous file intact (the replace is atomic on POSIX); so does a full
    disk or a read-only folder, which raise one `OutputError` naming the path, what is kept (`keeps`,
    default: the previous file) and the fix. A tensor
    holding NaN/inf is refused (`Diverged`): no checkpoint or artifact is ever non-finite. The file gets
    the permissions of the user's umask (mkstemp alone would make it 0600, unreadable to a group).
    """
    path = Path(path)
    bad = nonfinite_entries(obj)
    if bad:
        raise Diverged(f"refusing to write the {what} {path}: non-finite values in {', '.join(bad[:4])}"
                       f"{' ...' if len(bad) > 4 else ''}; the previous file is kept. Lower the learning rate or "
                       "the loss weights (or use trainer.amp=off) and resume.")
    buf = io.BytesIO()
    torch.save(obj, buf)  # serialise first: a failed write is then a plain OSError with its errno
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~umask())
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _unlink(tmp)
        if keeps is None and path.is_file():
            keeps = f"The previous {path.name} is intact."
        raise output_error(path, e, what, keeps=keeps) from e
    except BaseException:
        _unlink(tmp)
        raise
    return path


def _unlink(tmp: str | None) -> None:
    if tmp and os.path.exists(tmp):
        os.unlink(tmp)


def remove_orphaned_temps(folder: str | os.PathLike, name: str = "*", older_than_s: float = 0.0) -> list[Path]:
    """Delete the temp files interrupted saves of `name` left in `folder`: all of them in a run directory
    (call it with the directory locked); in a shared folder, only those older than `older_than_s`."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    cutoff = time.time() - older_than_s
    gone = [p for p in folder.glob(f".{name}.*{TEMP_SUFFIX}") if p.is_file() and p.stat().st_mtime <= cutoff]
    for p in gone:
        p.unlink(missing_ok=True)
    if gone:
        log.info("removed %d temp file(s) of interrupted saves in %s", len(gone), folder)
    return gone


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    hint: str | None = None) -> dict[str, Any]:
    """`torch.load(weights_only=True)`; an unreadable file raises `CheckpointError` ending with `hint`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, foreign pickle, ...
        reason = " ".join(str(e).split())[:200]
        raise CheckpointError(f"could not load checkpoint {path} (truncated, corrupt or not a checkpoint: "
                              f"{reason}). {hint or 'Replace or delete the file.'}") from e


def rng_state() -> dict[str, Any]:
    """RNG states of python, numpy and torch as weights_only-safe values."""
    np_state = np.random.get_state()
    state = {
        "python": _to_plain(random.getstate()),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_plain(x):
    return [_to_plain(v) for v in x] if isinstance(x, tuple) else x


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list) else x
