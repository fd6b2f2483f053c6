"""The one EdgeFace checkpoint loader.

Reads, always with `torch.load(weights_only=True)` and `strict=True`:
  * official float state_dicts (`edgeface_xs_gamma_06.pt`, ...), bare or wrapped under
    'state_dict' / 'model' / ..., with or without 'module.' (DDP), '_orig_mod.' (torch.compile)
    or 'model.' prefixes;
  * official dynamically quantized `_q` state_dicts (loaded into a quantized model; pass
    `quantized=False` for a float copy to fine-tune);
  * the project's own files written by `save`: {"format": "edgeface", "variant", "quantized",
    "state_dict", **extra}.
Quantized state_dicts hold qint8 tensors, a torch.dtype and a tuple per linear; torch's
weights_only unpickler accepts all three (checked on torch 2.14), so no safe-globals are needed.
"""
from __future__ import annotations

import functools
import os
import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch

from cycle.checkpoint import save_checkpoint
from cycle.errors import UserError
from edgeface.backbones import VARIANTS, EdgeFace, _arch, dequantize, empty, quantize

FORMAT = "edgeface"
OFFICIAL_WEIGHTS_HINT = (
    "The official EdgeFace weights are published at https://github.com/otroshi/edgeface (checkpoints/) "
    "and on Hugging Face (idiap/EdgeFace-*); weights are never downloaded at run time. Download one and "
    "pass its local path, e.g. edgeface.weights=/path/to/edgeface_xs_gamma_06.pt"
)
# Containers under which training scripts commonly nest a state_dict, most specific first.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "models", "backbone", "edgeface", "net", "module")
# Shortest run of dotted names in front of one of EdgeNeXt's top-level children.
_PREFIX_RE = re.compile(r"^((?:[^.]+\.)*?)(?:stem|stages|norm_pre|head)\.")
_PACKED = "_packed_params._packed_params"
_SHOW = 8  # keys listed per category in a mismatch report


class CheckpointMismatch(UserError, ValueError):
    """A checkpoint that does not fit the requested EdgeFace architecture.

    Attributes: missing, unexpected (key lists), mismatched ([(key, ckpt_shape, model_shape)]),
    guess (the best-fitting variant name or None) and guess_score (fraction of keys/shapes matching).
    """

    def __init__(self, message: str, *, missing=(), unexpected=(), mismatched=(), guess=None,
                 guess_score=0.0):
        super().__init__(message)
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        self.guess, self.guess_score = guess, guess_score


# ---------------------------------------------------------------- state_dict signatures


def _shape(value: Any) -> tuple | str | None:
    """Comparable shape of a state_dict entry; a packed quantized linear compares by its weight shape."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, tuple) and value and isinstance(value[0], torch.Tensor):
        return tuple(value[0].shape)
    if isinstance(value, torch.dtype):
        return "dtype"
    return None


def signature(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _shape(v) for k, v in state_dict.items()}


@functools.lru_cache(maxsize=None)
def _variant_signature(variant: str, quantized: bool) -> dict[str, Any]:
    """Keys/shapes of a variant, built on the meta device (no memory, ~0.1 s) and cached."""
    with torch.device("meta"):
        model = EdgeFace(variant)
    sig = signature(model.state_dict())
    if quantized:  # a dynamically quantized nn.Linear stores scale, zero_point and packed (weight, bias)
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear):
                p = f"{name}."
                weight_shape = sig.pop(p + "weight")
                sig.pop(p + "bias", None)
                sig.update({p + "scale": (), p + "zero_point": (), p + "_packed_params.dtype": "dtype",
                            p + _PACKED: weight_shape})
    return sig


def _candidates() -> list[tuple[str, bool]]:
    # Every variant in its official form, plus the float form of the `_q` ones (a dequantized copy).
    return [(v, _arch(v).quantized) for v in VARIANTS] + [(v, False) for v in VARIANTS if _arch(v).quantized]


def _score(sig: Mapping[str, Any], ref: Mapping[str, Any]) -> float:
    hits = sum(1 for k, s in sig.items() if k in ref and ref[k] == s)
    return hits / max(1, len(set(sig) | set(ref)))


def guess_variant(state_dict: Mapping[str, Any]) -> tuple[str | None, bool, float]:
    """(variant, quantized, score) of the architecture whose keys/shapes best fit `state_dict`.

    score is the fraction of (key, shape) pairs shared over all keys; 1.0 is an exact fit.
    """
    sig = signature(_normalize_keys(dict(state_dict)))
    best = max(_candidates(), key=lambda c: _score(sig, _variant_signature(*c)))
    score = _score(sig, _variant_signature(*best))
    return (best[0], best[1], score) if score > 0 else (None, False, 0.0)


# ---------------------------------------------------------------- unwrapping


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(k, str) for k in obj)
            and any(isinstance(v, torch.Tensor) for v in obj.values())
            and not any(isinstance(v, Mapping) for v in obj.values()))


def _unwrap(obj: Any, depth: int = 0) -> dict[str, Any] | None:
    if _is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping) and depth < 3:
        for key in _WRAPPER_KEYS:
            if key in obj:
                found = _unwrap(obj[key], depth + 1)
                if found is not None:
                    return found
    return None


def _normalize_keys(sd: dict[str, Any]) -> dict[str, Any]:
    """Map keys onto EdgeFace's "model.<timm key>" layout, whatever wrapper prefix they carry.

    Finds the one prefix shared by all keys in front of EdgeNeXt's top-level children
    ('module.', 'module.model.', '_orig_mod.model.', '' for a bare timm EdgeNeXt, ...).
    Keys of some other architecture are returned unchanged, for the mismatch report.
    """
    prefixes = set()
    for k in sd:
        m = _PREFIX_RE.match(k)
        if m is None:
            return sd
        prefixes.add(m.group(1))
    if len(prefixes) != 1:
        return sd
    (prefix,) = prefixes
    return {"model." + k[len(prefix):]: v for k, v in sd.items()}


# ---------------------------------------------------------------- reporting


def _fmt_list(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    return shown + (f", ... and {len(items) - _SHOW} more" if len(items) > _SHOW else "")


def _check(sd: Mapping[str, Any], model: EdgeFace, source: str) -> None:
    """Raise CheckpointMismatch unless `sd` has exactly the keys and shapes of `model`."""
    got, want = signature(sd), signature(model.state_dict())
    missing = [k for k in want if k not in got]
    unexpected = [k for k in got if k not in want]
    mismatched = [(k, got[k], want[k]) for k in want if k in got and got[k] != want[k]]
    if not (missing or unexpected or mismatched):
        return
    guess, guess_q, score = guess_variant(sd)
    kind = "quantized" if model.quantized else "float"
    lines = [f"{source} does not fit EdgeFace {model.variant!r} ({kind}): "
             f"{len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} shape-mismatched keys"]
    if guess is not None:
        exact = "exactly" if score == 1.0 else f"best ({score:.0%} of keys/shapes)"
        lines.append(f"  the checkpoint matches {exact} variant {guess!r}"
                     f"{' (quantized)' if guess_q else ''}; pass variant={guess!r} or leave variant=None")
    if missing:
        lines.append(f"  missing: {_fmt_list(missing)}")
    if unexpected:
        lines.append(f"  unexpected: {_fmt_list(unexpected)}")
    if mismatched:
        lines.append("  shape mismatch (checkpoint vs model): "
                     + _fmt_list([f"{k} {list(a) if isinstance(a, tuple) else a} vs "
                                  f"{list(b) if isinstance(b, tuple) else b}" for k, a, b in mismatched]))
    raise CheckpointMismatch("\n".join(lines), missing=missing, unexpected=unexpected, mismatched=mismatched,
                             guess=guess, guess_score=score)


# ---------------------------------------------------------------- public API


def _read(path: Path) -> Any:
    if not path.is_file():
        where = "is a directory, not a checkpoint file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"EdgeFace weights {path} {where}. {OFFICIAL_WEIGHTS_HINT}")
    try:
        with warnings.catch_warnings():
            # torch's own qtensor rebuild (for `_q` files) touches TypedStorage; nothing a user can act on.
            warnings.filterwarnings("ignore", message=r"TypedStorage is deprecated")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, pickled nn.Module, not a torch file at all
        raise ValueError(
            f"could not read EdgeFace checkpoint {path} with torch.load(weights_only=True). It must be a "
            "complete torch file holding a state_dict (tensors), not a pickled model object; re-save such "
            f"a model with torch.save(model.state_dict(), path). torch said: {e}") from e


def load(path: str | os.PathLike, variant: str | None = None, *, quantized: bool | None = None) -> EdgeFace:
    """Load any EdgeFace checkpoint strictly; returns an eval-mode EdgeFace on the CPU.

    variant: None infers it (from the project format's "variant", else from the key shapes).
    quantized: None keeps the checkpoint's form; False returns a float model (dequantizing a `_q`
    file, e.g. for fine-tuning); True returns a dynamically quantized one.
    """
    path = Path(path)
    obj = _read(path)
    source = f"checkpoint {path}"
    sd = _unwrap(obj)
    if sd is None:
        keys = list(obj)[:20] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointMismatch(f"{source} holds no state_dict (found {keys}); expected an EdgeFace "
                                 f"state_dict, bare or under one of {list(_WRAPPER_KEYS)}")
    sd = _normalize_keys(sd)
    stored_q = any(k.endswith(_PACKED) for k in sd)
    if variant is None and isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        variant = obj["variant"]
    if variant is None:
        guess, _, score = guess_variant(sd)
        if guess is None:
            raise CheckpointMismatch(
                f"{source} does not look like any EdgeFace variant ({', '.join(VARIANTS)}); "
                f"its keys: {_fmt_list(list(sd))}", unexpected=list(sd))
        if score < 1.0:  # inferring the variant never relaxes strictness: report against the closest
            _check(sd, empty(guess, quantized=stored_q), source)
        variant = guess
    _arch(variant)  # ValueError listing VARIANTS for a bad name

    model = empty(variant, quantized=stored_q)
    _check(sd, model, source)
    # Keys were renamed/unwrapped above, which drops torch's per-module `_metadata` (versions).
    # Quantized linears read their state by version, and the exact key match just checked means the
    # checkpoint is in the current layout, so the model's own metadata is the right one.
    sd = OrderedDict(sd)
    sd._metadata = model.state_dict()._metadata  # type: ignore[attr-defined]
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:  # e.g. a dtype the copy cannot take; keys/shapes were checked above
        raise CheckpointMismatch(f"{source}: {e}") from e
    if quantized is not None and quantized != stored_q:
        model = quantize(model) if quantized else dequantize(model)
    return model.eval()


def save(model: EdgeFace, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write the project's EdgeFace format atomically; `load(path)` restores it without arguments.

    extra: more weights_only-safe entries (metrics, config, head state, ...) stored beside the weights.
    """
    extra = dict(extra or {})
    clash = {"format", "variant", "quantized", "state_dict"} & set(extra)
    if clash:
        raise ValueError(f"extra may not override reserved keys {sorted(clash)}")
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    model = getattr(model, "module", model)  # DDP wrapper
    obj = {"format": FORMAT, "variant": model.variant, "quantized": model.quantized,
           "state_dict": {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v)
                          for k, v in model.state_dict().items()}, **extra}
    return save_checkpoint(obj, path)
