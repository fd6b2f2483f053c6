"""Evaluation protocols: which images are compared with which.

* ``balanced_pairs``: balanced genuine/impostor verification pairs among (held-out) identities.
* ``balanced_fold_pairs``: the same within identity-disjoint folds (LFW View 2 style k-fold protocol).
* ``identification_split``: closed-set gallery/probe split, one gallery image per identity.

All randomness comes from ``np.random.default_rng(seed)``: same labels + seed -> same output.
Indices refer to positions in the ``labels`` sequence given. The LFW ``pairs.txt`` protocol (a file of
pairs, not generated ones) is in ``eval.pairs_file``.
"""

from __future__ import annotations

import logging

import numpy as np

from cycle.logger import log_once

log = logging.getLogger(__name__)

__all__ = [
    "balanced_pairs",
    "balanced_fold_pairs",
    "identity_folds",
    "identification_split",
]


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
