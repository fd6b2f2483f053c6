"""insightface verification sets (`.bin`: lfw, cfp_fp, agedb_30, calfw, cplfw), read safely and scored like LFW.

    python -m eval eval.bins=[/data/lfw.bin,/data/cfp_fp.bin] res=16

Format facts relied on (insightface `recognition/arcface_torch/eval/verification.py`, which reads a set with
``pickle.load(f, encoding="bytes")``): a `.bin` is a pickle of ``(bins, issame_list)``; ``bins`` holds 2N
encoded images (JPEG/PNG bytes, aligned 112x112 faces; Python 2 ``str`` in the original files, hence
bytes), ``issame_list`` N booleans (a list or a numpy bool array); pair i is images 2i and 2i+1.
insightface scores 10 folds of consecutive pairs (scikit-learn's ``KFold`` without shuffling) and picks each
fold's threshold on the other nine; so does this module (``eval.folds`` folds, 10 by default).

A pickle can run code when loaded, so a `.bin` goes through ``load_bin``'s restricted unpickler: it only
builds bytes, lists, tuples, bools and numpy arrays (resolving nothing but numpy's array and dtype
reconstructors, and ``_codecs.encode`` as a latin-1-only stand-in, which Python 3 protocol-2 pickles
use for bytes), and afterwards accepts only encoded-image bytes (or uint8 arrays) and booleans. Any other
global (``os.system``, ``builtins.eval``, ...) fails before it is called, with a message; nothing runs.

VLR probe: the first image of each pair (2i) is degraded by the project's degradation (``cycle.degrade``,
the training settings) and passed through each method; the second (2i+1) is the HR reference
(``eval.pair_mode=sr_hr``) or goes through the method as well (``sr_sr``). There are no identity labels,
so identification is not evaluated on these sets.
"""
from __future__ import annotations

import importlib
import io
import logging
import pickle
from pathlib import Path

import numpy as np

from cycle.data import FaceSet, load_image
from eval.errors import EvaluationError
from eval.testset import Protocol

log = logging.getLogger(__name__)

__all__ = ["load_bin", "bin_protocol", "kfold_ids"]

# (module, name) a .bin may reference: numpy's array/dtype reconstruction, under its numpy 1 and 2 names.
_ALLOWED = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")}
_ALLOWED |= {("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
             ("numpy", "ndarray"), ("numpy", "dtype")}


def _latin1(text: str, encoding: str = "utf-8") -> bytes:
    """What a protocol <= 2 pickle written by Python 3 calls to rebuild bytes; only this one codec is served."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"it calls _codecs.encode with {type(text).__name__}, {encoding!r}")
    return text.encode("latin1")


class _BinUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):
            return _latin1
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"it references {module}.{name}")
        module = module.replace("numpy.core.", "numpy._core.") if hasattr(np, "_core") else module
        return getattr(importlib.import_module(module), name)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it uses persistent ids")


def load_bin(path: str | Path) -> tuple[list[bytes], np.ndarray]:
    """(2N encoded images, N is-same booleans) of an insightface .bin, through the restricted unpickler."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise EvaluationError(f"eval.bins: {path} not found (insightface verification sets are lfw.bin, "
                              "cfp_fp.bin, agedb_30.bin, ... from its training-data packages)")
    try:
        with open(path, "rb") as f:
            obj = _BinUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise EvaluationError(f"{path} is not an insightface .bin set: {exc}, which a .bin never contains. "
                              "Refused to load it; nothing in it was run") from None
    except Exception as exc:  # truncated or not a pickle at all
        raise EvaluationError(f"{path} is not a readable insightface .bin set ({type(exc).__name__}: {exc}); "
                              "copy it again") from None
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2 and isinstance(obj[0], (list, tuple))):
        raise EvaluationError(f"{path}: expected a pickled (images, issame_list) pair, got {type(obj).__name__}")
    images, same = obj
    out = []
    for k, b in enumerate(images):
        if isinstance(b, np.ndarray) and b.dtype == np.uint8 and b.ndim == 1:
            b = b.tobytes()
        if not isinstance(b, (bytes, bytearray)):
            raise EvaluationError(f"{path}: image {k} is {type(b).__name__}, expected encoded image bytes")
        out.append(bytes(b))
    if isinstance(same, np.ndarray):
        if same.dtype != np.bool_ or same.ndim != 1:
            raise EvaluationError(f"{path}: issame_list is a {same.dtype} array of shape {same.shape}, expected bool")
    elif isinstance(same, (list, tuple)) and all(isinstance(s, (bool, np.bool_)) for s in same):
        same = np.array(same, bool)
    else:
        raise EvaluationError(f"{path}: issame_list must be a list or array of booleans")
    if len(out) != 2 * len(same) or not len(same):
        raise EvaluationError(f"{path}: {len(out)} images for {len(same)} pairs; a .bin holds 2 images per pair")
    return out, same


def kfold_ids(n: int, folds: int) -> np.ndarray:
    """Fold of each of n consecutive pairs, as scikit-learn's KFold(folds, shuffle=False) splits them."""
    sizes = np.full(folds, n // folds) + (np.arange(folds) < n % folds)
    return np.repeat(np.arange(folds), sizes)


def bin_protocol(path: str | Path, size: int = 112, folds: int = 10, allow_missing: bool = False) -> Protocol:
    """The faces and pairs of a .bin set: pair i = (probe 2i, reference 2i+1), its own k folds."""
    path = Path(path).expanduser()
    images, same = load_bin(path)
    n = len(same)
    if n < folds:
        raise EvaluationError(f"{path}: {n} pairs, fewer than eval.folds={folds}")
    faces = np.zeros((2 * n, size, size, 3), np.uint8)
    bad = {}
    for k, b in enumerate(images):
        try:
            faces[k] = load_image(io.BytesIO(b), size, "resize")
        except Exception as exc:  # any decoder failure = an unreadable image, reported below
            bad[k] = f"{type(exc).__name__}: {exc}"
    notes = []
    keep = np.ones(n, bool)
    if bad:
        listed = "; ".join(f"image {k} ({why})" for k, why in list(bad.items())[:5])
        if not allow_missing:
            raise EvaluationError(f"{path}: {len(bad)} unreadable image(s): {listed}. Set eval.allow_missing=true "
                                  "to evaluate the other pairs")
        keep[[k // 2 for k in bad]] = False
        notes.append(f"{path.stem}: {int((~keep).sum())} pairs dropped for {len(bad)} unreadable images, e.g. {listed}")
    fold = kfold_ids(n, folds)[keep]
    pairs = np.flatnonzero(keep)
    # A .bin names no identities: one pseudo-identity per image, named so it can never equal a training
    # identity (data=rec names identities by their label, "0", "1", ...).
    fs = FaceSet(images=faces, labels=np.arange(2 * n, dtype=np.int64),
                 identities=[f"{path.stem}:{k}" for k in range(2 * n)],
                 files=[f"{path.stem}/{k}" for k in range(2 * n)])
    info = {"kind": "bin", "file": str(path), "num_pairs": int(keep.sum()), "num_genuine": int(same[keep].sum()),
            "num_images": 2 * n, "num_folds": folds, "num_dropped": int((~keep).sum()), "probe": "first image"}
    log.info("%s: %d pairs (%d genuine), %d folds", path, info["num_pairs"], info["num_genuine"], folds)
    return Protocol(fs, 2 * pairs, 2 * pairs + 1, same[keep], fold, None, None, info, notes)
