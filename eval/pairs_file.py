"""The LFW ``pairs.txt`` protocol: a file of pairs (and its folds), read with file:line errors.

* ``read_lfw_pairs``: the pairs of a ``pairs.txt`` (10 folds, or one fold for a dev/test header);
* ``load_lfw_pairs``: those pairs resolved to image files under a root, missing images reported;
* ``lfw_image_path``: ``root/<name>/<name>_<i:04d>.<ext>``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from cycle.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["LFWPair", "LFWPairs", "MissingImagesError", "PairsFileError", "read_lfw_pairs", "lfw_image_path",
           "load_lfw_pairs"]

LFW_EXTS = ("jpg", "png", "jpeg", "pgm", "bmp")


class LFWPair(NamedTuple):
    name1: str
    index1: int
    name2: str
    index2: int
    is_same: bool
    fold: int  # 0-based


class PairsFileError(UserError, ValueError):
    """A pairs file that cannot be used (missing, empty, binary, malformed); the message gives file:line."""


class MissingImagesError(UserError, FileNotFoundError):
    """Images referenced by a pairs file are absent; ``missing`` lists them, ``num_pairs`` the pairs hit."""

    def __init__(self, message: str, missing: list[str], num_pairs: int):
        super().__init__(message)
        self.missing = missing
        self.num_pairs = num_pairs


def _read_pairs_text(path: Path) -> str:
    """The text of a pairs file; every way it can be unusable is a `PairsFileError` naming the file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PairsFileError(f"{path}: pairs file not found (eval.pairs_file names an LFW-format pairs.txt)") from None
    except IsADirectoryError:
        raise PairsFileError(f"{path}: is a folder; eval.pairs_file must name the pairs.txt file inside it") from None
    except OSError as e:
        raise PairsFileError(f"{path}: cannot read the pairs file ({e.strerror or e})") from None
    if b"\0" in data:
        line = data[:data.index(b"\0")].count(b"\n") + 1
        raise PairsFileError(f"{path}:{line}: binary data (a NUL byte), not a text pairs file: eval.pairs_file "
                             "must name an LFW-format pairs.txt")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise PairsFileError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); eval.pairs_file must "
                             "name an LFW-format pairs.txt") from None


def _parse_lfw_pairs(path) -> tuple[list[LFWPair], list[int]]:
    path = Path(path)
    entries = []
    for no, line in enumerate(_read_pairs_text(path).splitlines(), 1):
        tok = line.split()
        if tok and not tok[0].startswith("#"):
            entries.append((no, tok))
    if not entries:
        raise PairsFileError(f"{path}:1: no pairs (the file is empty or holds only comments/blank lines)")

    header = None
    no, tok = entries[0]
    if all(t.isdigit() for t in tok):
        if len(tok) not in (1, 2) or int(tok[-1]) < 1:
            raise PairsFileError(f"{path}:{no}: header must be '<folds> <pairs per class>' (e.g. '10 300') "
                                 f"or '<pairs per class>', got {' '.join(tok)!r}")
        header = (int(tok[0]), int(tok[1])) if len(tok) == 2 else (1, int(tok[0]))
        entries = entries[1:]
    else:
        log.warning("%s: no '<folds> <pairs>' header; folds are taken from the same/different blocks", path)

    rows, lines = [], []
    for no, tok in entries:
        try:
            if len(tok) == 3:
                row = (tok[0], int(tok[1]), tok[0], int(tok[2]), True)
            elif len(tok) == 4:
                row = (tok[0], int(tok[1]), tok[2], int(tok[3]), False)
            else:
                raise ValueError
        except ValueError:
            raise PairsFileError(
                f"{path}:{no}: expected 'name i j' or 'name1 i name2 j', got {' '.join(tok)!r}"
            ) from None
        if row[1] < 1 or row[3] < 1:
            raise PairsFileError(f"{path}:{no}: image numbers start at 1, got {' '.join(tok)!r}")
        if not row[4] and row[0] == row[2]:
            raise PairsFileError(
                f"{path}:{no}: a different-person line names the same person twice: {' '.join(tok)!r}"
            )
        if row[4] and row[1] == row[3]:
            log.warning("%s:%d: same-person pair compares an image with itself", path, no)
        rows.append(row)
        lines.append(no)
    if not rows:
        raise PairsFileError(f"{path}:{no}: a header but no pair lines after it")

    same = np.array([r[4] for r in rows])
    if header and len(rows) == 2 * header[0] * header[1]:
        # The standard layout: fold k is lines [k * 2N, (k + 1) * 2N) of the body.
        fold = np.arange(len(rows)) // (2 * header[1])
    else:
        # Shorter/longer folds: a fold is a block of same-person lines followed by different-person
        # lines, so a new fold starts wherever a same-person line follows a different-person line.
        fold = np.r_[0, np.cumsum(same[1:] & ~same[:-1])]
        found = int(fold[-1]) + 1
        starts = [lines[k] for k in np.r_[0, np.flatnonzero(np.diff(fold)) + 1]]
        if header and found != header[0]:
            raise PairsFileError(
                f"{path}: header announces {header[0]} folds of {header[1]} + {header[1]} pairs "
                f"({2 * header[0] * header[1]} lines) but the file has {len(rows)} pair lines in {found} "
                f"same/different block(s) starting at lines {starts[:12]}"
            )
    for f in range(int(fold[-1]) + 1):
        k = np.flatnonzero(fold == f)
        ns, nd = int(same[k].sum()), int((~same[k]).sum())
        if header and (ns, nd) != (header[1], header[1]):
            log.warning("%s: fold %d (lines %d-%d) has %d same / %d different pairs, header says %d each",
                        path, f, lines[k[0]], lines[k[-1]], ns, nd, header[1])
    pairs = [LFWPair(*r, fold=int(f)) for r, f in zip(rows, fold)]
    return pairs, lines


def read_lfw_pairs(path) -> list[LFWPair]:
    """Parse an LFW-format ``pairs.txt`` into ``(name1, i, name2, j, is_same, fold)`` tuples.

    Format: a header ``"<folds> <N>"`` (``"10 300"``; a single number N means one fold, as in
    ``pairsDevTest.txt``), then per fold N ``"name i j"`` (same person) lines followed by N
    ``"name1 i name2 j"`` (different people) lines; whitespace is any mix of spaces/tabs, blank and
    ``#`` lines are ignored. Files with other per-fold counts are accepted when their folds can be
    recovered from the same/different blocks (warning per fold); errors give file:line.
    """
    return _parse_lfw_pairs(path)[0]


class _ImageFinder:
    """Resolves ``<root>/<name>/<name>_<i:04d>.<ext>`` with one directory listing per name."""

    def __init__(self, root, exts: Sequence[str]):
        self.root, self.exts, self._dirs = Path(root), tuple(exts), {}

    def __call__(self, name: str, i: int) -> Path | None:
        if name not in self._dirs:
            d = self.root / name
            self._dirs[name] = set(os.listdir(d)) if d.is_dir() else set()
        files = self._dirs[name]
        for ext in self.exts:
            for e in (ext, ext.upper()):
                fname = f"{name}_{i:04d}.{e}"
                if fname in files:
                    return self.root / name / fname
        return None


def lfw_image_path(root, name: str, i: int, exts: Sequence[str] = LFW_EXTS) -> Path:
    """Path of LFW image ``i`` (1-based) of ``name``: ``<root>/<name>/<name>_<i:04d>.<ext>``,
    the first extension of ``exts`` that exists; FileNotFoundError names what was tried."""
    p = _ImageFinder(root, exts)(name, i)
    if p is None:
        raise FileNotFoundError(f"no image {Path(root) / name / f'{name}_{i:04d}'}.{{{','.join(exts)}}}")
    return p


@dataclass
class LFWPairs:
    """Resolved pairs: each image once in ``paths``; pairs as indices into it."""

    paths: list[Path]
    idx_a: np.ndarray
    idx_b: np.ndarray
    is_same: np.ndarray
    fold: np.ndarray
    num_dropped: int = 0  # pairs dropped because an image was missing (allow_missing=True)
    missing: list[str] = field(default_factory=list)


def load_lfw_pairs(pairs_file, root, allow_missing: bool = False, exts: Sequence[str] = LFW_EXTS) -> LFWPairs:
    """Read ``pairs_file`` and resolve its images under ``root``.

    Missing images raise :class:`MissingImagesError` (count, first few with their lines) unless
    ``allow_missing``: then the pairs that need them are dropped, with a warning, and counted in
    ``num_dropped``.
    """
    pairs, lines = _parse_lfw_pairs(pairs_file)
    find = _ImageFinder(root, exts)
    resolved: dict[tuple[str, int], Path | None] = {}
    for p in pairs:
        for key in ((p.name1, p.index1), (p.name2, p.index2)):
            if key not in resolved:
                resolved[key] = find(*key)
    missing = [k for k, v in resolved.items() if v is None]
    bad = [k for k, p in enumerate(pairs)
           if resolved[p.name1, p.index1] is None or resolved[p.name2, p.index2] is None]
    names = [f"{n}/{n}_{i:04d}.{{{','.join(exts)}}}" for n, i in missing]
    if missing:
        first_line = {}
        for k in bad:
            for key in ((pairs[k].name1, pairs[k].index1), (pairs[k].name2, pairs[k].index2)):
                first_line.setdefault(key, lines[k])
        shown = ", ".join(f"{names[m]} (line {first_line[missing[m]]})" for m in range(min(5, len(missing))))
        msg = (f"{len(missing)} of {len(resolved)} images referenced by {pairs_file} are missing under "
               f"{root} ({len(bad)} of {len(pairs)} pairs affected); first: {shown}")
        if not allow_missing or len(bad) == len(pairs):
            hint = ("no pair is complete" if allow_missing
                    else "set allow_missing (eval.allow_missing=true) to evaluate the rest")
            raise MissingImagesError(f"{msg}. Check the image root; {hint}.", names, len(bad))
        log.warning("%s; dropping those pairs", msg)
    drop = set(bad)
    keep = [p for k, p in enumerate(pairs) if k not in drop]
    index: dict[Path, int] = {}
    ia, ib = [], []
    for p in keep:
        ia.append(index.setdefault(resolved[p.name1, p.index1], len(index)))
        ib.append(index.setdefault(resolved[p.name2, p.index2], len(index)))
    return LFWPairs(
        paths=list(index),
        idx_a=np.array(ia, np.int64),
        idx_b=np.array(ib, np.int64),
        is_same=np.array([p.is_same for p in keep], bool),
        fold=np.array([p.fold for p in keep], np.int64),
        num_dropped=len(bad),
        missing=names,
    )
