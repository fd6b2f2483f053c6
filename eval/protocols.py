"""Evaluation protocols: which images are compared with which.

* ``balanced_pairs``: balanced genuine/impostor verification pairs among (held-out) identities.
* ``balanced_fold_pairs``: the same within identity-disjoint folds (LFW View 2 style k-fold protocol).
* ``read_lfw_pairs`` / ``load_lfw_pairs``: the LFW ``pairs.txt`` 10-fold protocol.
* ``identification_split``: closed-set gallery/probe split, one gallery image per identity.

All randomness comes from ``np.random.default_rng(seed)``: same labels + seed -> same output.
Indices refer to positions in the ``labels`` sequence given.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from cycle.errors import UserError
from cycle.logger import log_once

log = logging.getLogger(__name__)

__all__ = [
    "balanced_pairs",
    "balanced_fold_pairs",
    "identity_folds",
    "identification_split",
    "LFWPair",
    "LFWPairs",
    "MissingImagesError",
    "PairsFileError",
    "read_lfw_pairs",
    "lfw_image_path",
    "load_lfw_pairs",
]

LFW_EXTS = ("jpg", "png", "jpeg", "pgm", "bmp")


def _identities(labels) -> tuple[np.ndarray, list[np.ndarray]]:
    """Integer identity per sample (sorted label order) and each identity's sample indices."""
    lab = np.unique(np.asarray(labels).ravel(), return_inverse=True)[1].astype(np.int64)
    order = np.argsort(lab, kind="stable")
    bounds = np.r_[0, np.flatnonzero(np.diff(lab[order])) + 1, lab.size]
    return lab, [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


# ----------------------------------------------------------------------------------------------
# (a) balanced verification pairs
# ----------------------------------------------------------------------------------------------


def _unrank_pairs(k: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """k-th pair (i < j) of n items in lexicographic order, vectorised (avoids n^2 tables)."""
    k = k.astype(np.int64)
    start = lambda i: i * (2 * n - i - 1) // 2  # noqa: E731  index of the first pair (i, i+1)
    i = np.floor(((2 * n - 1) - np.sqrt((2.0 * n - 1) ** 2 - 8.0 * k)) / 2).astype(np.int64)
    i = np.clip(i, 0, n - 2)
    i += start(i + 1) <= k  # float rounding can be off by one either way
    i -= start(i) > k
    return i, k - start(i) + i + 1


def _spread(caps: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Split n as evenly as possible over bins of capacity caps (water-filling, random remainder)."""
    lo, hi = 0, int(caps.max())
    while lo < hi:  # smallest level q with sum(min(caps, q)) >= n
        q = (lo + hi) // 2
        lo, hi = (q + 1, hi) if np.minimum(caps, q).sum() < n else (lo, q)
    quota = np.minimum(caps, lo - 1) if lo > 0 else np.zeros_like(caps)
    rest = n - int(quota.sum())
    if rest:
        quota[rng.choice(np.flatnonzero(caps >= lo), rest, replace=False)] += 1
    return quota


def _genuine_pairs(groups: list[np.ndarray], n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    # Quotas spread evenly over identities so large identities do not dominate the genuine scores.
    sizes = np.array([g.size for g in groups], np.int64)
    quota = _spread(sizes * (sizes - 1) // 2, n, rng)
    a, b = [], []
    for g, q in zip(groups, quota):
        if q:
            i, j = _unrank_pairs(rng.choice(g.size * (g.size - 1) // 2, int(q), replace=False), g.size)
            a.append(g[i])
            b.append(g[j])
    return np.concatenate(a), np.concatenate(b)


def _impostor_pairs(lab: np.ndarray, groups: list[np.ndarray], n: int, capacity: int, rng):
    """n distinct different-identity pairs: identity pair uniform, then one image of each."""
    num = lab.size
    if capacity <= 4 * n and num * (num - 1) // 2 <= 20_000_000:  # dense: rejection would stall
        i, j = np.triu_indices(num, 1)
        keep = lab[i] != lab[j]
        sel = rng.choice(int(keep.sum()), n, replace=False)
        return i[keep][sel], j[keep][sel]
    sizes = np.array([g.size for g in groups])
    flat, starts = np.concatenate(groups), np.r_[0, np.cumsum(sizes)[:-1]]
    seen: set[int] = set()
    a, b = [], []
    stalled = 0
    while len(seen) < n and stalled < 20:
        m = 2 * (n - len(seen)) + 64
        ia = rng.integers(0, len(groups), m)
        ib = rng.integers(0, len(groups) - 1, m)
        ib += ib >= ia
        x = flat[starts[ia] + (rng.random(m) * sizes[ia]).astype(np.int64)]
        y = flat[starts[ib] + (rng.random(m) * sizes[ib]).astype(np.int64)]
        before = len(seen)
        for u, v in zip(np.minimum(x, y).tolist(), np.maximum(x, y).tolist()):
            key = u * num + v
            if key not in seen and len(seen) < n:
                seen.add(key)
                a.append(u)
                b.append(v)
        stalled = stalled + 1 if len(seen) == before else 0
    return np.array(a, np.int64), np.array(b, np.int64)


def balanced_pairs(labels, num_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Balanced verification pairs among the samples of ``labels``.

    Returns ``(idx_a, idx_b, is_same)``: ``num_pairs // 2`` genuine and as many impostor pairs,
    shuffled, with random orientation (a/b), no self-pairs and no duplicate (unordered) pairs.
    Genuine pairs are spread as evenly as possible over the identities with >= 2 images (each
    identity contributes about the same number); identities with a single image can only appear in
    impostor pairs (logged). Impostor pairs pick a uniformly random pair of identities, then one
    image of each. When fewer distinct pairs exist than asked for, every class is capped to the
    smaller of the two capacities (a warning says so) so the set stays balanced.
    """
    lab, groups = _identities(labels)
    if len(groups) < 2:
        raise ValueError(f"balanced_pairs needs at least 2 identities, got {len(groups)}")
    per_class = int(num_pairs) // 2
    if per_class < 1:
        raise ValueError(f"num_pairs must be >= 2, got {num_pairs}")
    sizes = np.array([g.size for g in groups], np.int64)
    eligible = [g for g in groups if g.size >= 2]
    if not eligible:
        raise ValueError("no identity has 2 or more images: genuine pairs are impossible")
    if len(eligible) < len(groups):
        single = len(groups) - len(eligible)
        log_once(log, logging.INFO, "balanced_pairs: %d of %d identities have < 2 images; used for impostor "
                 "pairs only", single, len(groups))
    cap_gen = int((sizes * (sizes - 1) // 2).sum())
    cap_imp = int((lab.size**2 - int((sizes**2).sum())) // 2)
    n = min(per_class, cap_gen, cap_imp)
    if n < per_class:
        log_once(log, logging.WARNING, "balanced_pairs: asked for %d pairs per class but only %d genuine / %d "
                 "impostor pairs exist; using %d of each", per_class, cap_gen, cap_imp, n)
    rng = np.random.default_rng(seed)
    ga, gb = _genuine_pairs(eligible, n, rng)
    ia, ib = _impostor_pairs(lab, groups, n, cap_imp, rng)
    if ia.size < n:  # the sampler stalled on a pathological label distribution: stay balanced
        log.warning("balanced_pairs: found only %d distinct impostor pairs; using that many of each", ia.size)
        ga, gb = ga[: ia.size], gb[: ia.size]
    a, b = np.r_[ga, ia], np.r_[gb, ib]
    same = np.r_[np.ones(ga.size, bool), np.zeros(ia.size, bool)]
    swap = rng.random(a.size) < 0.5
    a, b = np.where(swap, b, a), np.where(swap, a, b)
    perm = rng.permutation(a.size)
    log_once(log, logging.INFO, "balanced_pairs: %d genuine + %d impostor pairs from %d identities (seed %d)",
             ga.size, ia.size, len(groups), seed)
    return a[perm].astype(np.int64), b[perm].astype(np.int64), same[perm]


def identity_folds(labels, folds: int, seed: int) -> np.ndarray:
    """Fold (0 .. folds-1) of every sample, identity-disjoint: whole identities are dealt to folds.

    Identities are shuffled and dealt round-robin, those with >= 2 images first, so every fold gets
    about as many identities and as many genuine-capable ones (each needs one to draw genuine pairs).
    """
    lab, groups = _identities(labels)
    rng = np.random.default_rng(seed)
    sizes = np.array([g.size for g in groups])
    order = np.r_[rng.permutation(np.flatnonzero(sizes >= 2)), rng.permutation(np.flatnonzero(sizes < 2))]
    fold_of_id = np.empty(len(groups), np.int64)
    fold_of_id[order] = np.arange(order.size) % folds
    return fold_of_id[lab]


def balanced_fold_pairs(labels, num_pairs: int, seed: int, folds: int = 10
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Identity-disjoint k-fold verification pairs, like LFW's View 2.

    Identities are assigned to folds (``identity_folds``), then ``balanced_pairs`` draws about
    ``num_pairs / folds`` balanced pairs *within* each fold, so no identity (and no image) of a test fold
    is seen when the threshold is tuned on the other folds. Returns ``(idx_a, idx_b, is_same, fold)``,
    grouped by fold. Each fold needs 2 identities, one of them with >= 2 images: with fewer, the number
    of folds is lowered (a warning says so; ``np.unique(fold).size`` is the number used).
    """
    lab, groups = _identities(labels)
    eligible = sum(g.size >= 2 for g in groups)
    k = min(int(folds), len(groups) // 2, eligible)
    if k < 2:
        raise ValueError(f"identity-disjoint folds need at least 4 identities, 2 of them with >= 2 images; "
                         f"have {len(groups)} identities, {eligible} with >= 2 images")
    if k < folds:
        log.warning("balanced_fold_pairs: %d identities (%d with >= 2 images) allow %d identity-disjoint folds, "
                    "not %d", len(groups), eligible, k, folds)
    fold = identity_folds(lab, k, seed)
    per_class = int(num_pairs) // 2
    if per_class < k:
        raise ValueError(f"num_pairs={num_pairs} gives fewer than one pair per class in each of {k} folds")
    quota = per_class // k + (np.arange(k) < per_class % k)
    seeds = np.random.default_rng(seed).integers(0, 2**62, k)
    a, b, same, f_out = [], [], [], []
    for f in range(k):
        members = np.flatnonzero(fold == f)
        ia, ib, s = balanced_pairs(lab[members], 2 * int(quota[f]), int(seeds[f]))
        a.append(members[ia])
        b.append(members[ib])
        same.append(s)
        f_out.append(np.full(s.size, f, np.int64))
    return np.concatenate(a), np.concatenate(b), np.concatenate(same), np.concatenate(f_out)


# ----------------------------------------------------------------------------------------------
# (c) closed-set identification split
# ----------------------------------------------------------------------------------------------


def identification_split(labels, seed: int, gallery_per_id: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Closed-set gallery/probe split: ``(gallery_idx, probe_idx)``, sorted, disjoint.

    Each identity puts ``gallery_per_id`` random images in the gallery and all its other images in
    the probe set, so a probe's own image is never in the gallery. Identities with
    <= ``gallery_per_id`` images go entirely to the gallery: they have no probe and act as
    distractors (logged). Every probe identity is therefore present in the gallery.
    """
    if gallery_per_id < 1:
        raise ValueError(f"gallery_per_id must be >= 1, got {gallery_per_id}")
    lab, groups = _identities(labels)
    if len(groups) < 2:
        raise ValueError(f"identification needs at least 2 identities, got {len(groups)}")
    rng = np.random.default_rng(seed)
    # Random order within each identity, then the first gallery_per_id of each go to the gallery.
    order = np.lexsort((rng.random(lab.size), lab))
    first = np.r_[0, np.flatnonzero(np.diff(lab[order])) + 1]
    rank = np.arange(lab.size) - np.repeat(first, np.diff(np.r_[first, lab.size]))
    in_gallery = np.zeros(lab.size, bool)
    in_gallery[order[rank < gallery_per_id]] = True
    distractors = sum(g.size <= gallery_per_id for g in groups)
    if distractors == len(groups):
        raise ValueError(f"no identity has more than {gallery_per_id} image(s): no probes to identify")
    if distractors:
        log_once(log, logging.INFO, "identification_split: %d of %d identities have <= %d image(s): "
                 "gallery-only distractors", distractors, len(groups), gallery_per_id)
    return np.flatnonzero(in_gallery), np.flatnonzero(~in_gallery)


# ----------------------------------------------------------------------------------------------
# (b) LFW pairs.txt
# ----------------------------------------------------------------------------------------------


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
