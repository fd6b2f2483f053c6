"""Metrics of one method from its embeddings: verification, k-fold accuracy and identification, each with
a 95 % bootstrap interval over identities.

Pairs compare the method's image (probe) with the HR image (``pair_mode=sr_hr``, the deployment setting)
or with the method's image (``sr_sr``), always through the method's EdgeFace. The identification gallery
holds the HR images or the method's (``gallery=hr`` / ``sr``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from eval.bootstrap import CI_SUFFIX, interval, weights_for
from eval.errors import EvaluationError
from eval.metrics import (
    far_key,
    identification_ranks,
    kfold_accuracy,
    pair_scores_indexed,
    rank_accuracy,
    roc,
    verification_metrics,
)

__all__ = ["score_method", "interval_keys"]


def interval_keys(fars: Sequence[float], ranks: Sequence[int]) -> tuple[str, ...]:
    """The verification and identification metrics that get a ``<metric>_ci95`` interval."""
    return ("auc", "eer", *(far_key(f) for f in fars), "d_prime", "accuracy", *(f"rank{k}" for k in ranks))


def score_method(probe_emb, hr_emb, labels, idx_a, idx_b, is_same, *, fold_ids=None, gallery_idx=None,
                 probe_idx=None, pair_mode: str = "sr_hr", gallery: str = "hr", folds: int = 10,
                 fars: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1), ranks: Sequence[int] = (1, 5, 10, 20),
                 resamples: np.ndarray | None = None) -> tuple[dict, dict]:
    """Verification, k-fold accuracy and identification of one method from its embeddings.

    probe_emb: (N, D) embeddings of the method's images; hr_emb: (N, D) of the HR images through the
    same EdgeFace. Pair k compares probe_emb[idx_a[k]] with hr_emb[idx_b[k]] (``sr_hr``) or
    probe_emb[idx_b[k]] (``sr_sr``). fold_ids: the protocol's folds (identity-disjoint for a result you
    publish); None = ``folds`` round-robin folds; a single fold skips the accuracy with a note.

    resamples: optional ``(R, identities)`` bootstrap counts (``eval.bootstrap.identity_resamples``) over
    the identities ``np.unique(labels)``; a pair weighs as often as its probe's identity (labels[idx_a])
    was drawn, an identification probe as its own. Every metric of ``interval_keys`` then gets
    ``<metric>_ci95``: [low, high] (None where undefined), and ``curves["bootstrap"]`` holds the (R,)
    samples, which the caller pairs across methods (the same ``resamples`` for all of them).
    Returns (metrics, curves for the figures).
    """
    if pair_mode not in ("sr_hr", "sr_sr"):
        raise EvaluationError(f"eval.pair_mode={pair_mode!r} must be sr_hr or sr_sr")
    if gallery not in ("hr", "sr"):
        raise EvaluationError(f"eval.gallery={gallery!r} must be hr or sr")
    same = np.asarray(is_same, bool)
    idx_a, idx_b = np.asarray(idx_a), np.asarray(idx_b)
    scores = pair_scores_indexed(probe_emb, idx_a, idx_b, emb_b=hr_emb if pair_mode == "sr_hr" else None)
    gen, imp = scores[same], scores[~same]
    v = verification_metrics(gen, imp, fars)
    notes = v.pop("notes")
    identity = np.unique(np.asarray(labels), return_inverse=True)[1].ravel()
    pair_w = None if resamples is None else weights_for(resamples, identity[idx_a])
    samples: dict[str, np.ndarray] = {}
    if pair_w is not None:
        samples.update(verification_metrics(gen, imp, fars, weights=np.hstack([pair_w[:, same], pair_w[:, ~same]])))
    if fold_ids is None:
        folds = min(int(folds), int(same.sum()), int((~same).sum()))  # every fold needs both classes
    if fold_ids is not None and np.unique(np.asarray(fold_ids)).size < 2:
        acc = acc_std = float("nan")
        notes.append("accuracy not computed: the pairs form a single fold (e.g. a pairsDevTest.txt-style "
                     "one-number header), so no threshold can be tuned on other folds")
    else:
        acc, acc_std, _ = kfold_accuracy(scores, same, folds=folds, fold_ids=fold_ids)
        if pair_w is not None:
            samples["accuracy"] = kfold_accuracy(scores, same, folds=folds, fold_ids=fold_ids, weights=pair_w)
    metrics = {**v, "accuracy": acc, "accuracy_std": acc_std}
    far, tar, _ = roc(gen, imp)
    curves = {"far": far, "tar": tar, "genuine": gen, "impostor": imp}
    if gallery_idx is not None and probe_idx is not None:
        g_emb = hr_emb if gallery == "hr" else probe_emb
        labels = np.asarray(labels)
        rank, n_ids = identification_ranks(np.asarray(g_emb)[gallery_idx], labels[gallery_idx],
                                           np.asarray(probe_emb)[probe_idx], labels[probe_idx])
        ident = rank_accuracy(rank, n_ids, ranks)
        curves["cmc"] = ident.pop("cmc")
        metrics.update(ident, num_probes=int(rank.size), num_gallery_ids=n_ids)
        if resamples is not None:
            samples.update(rank_accuracy(rank, n_ids, ranks, weights=weights_for(resamples, identity[probe_idx])))
    if resamples is not None:
        for key in interval_keys(fars, ranks):
            if key in metrics:
                finite = isinstance(metrics[key], float) and np.isfinite(metrics[key])
                metrics[key + CI_SUFFIX] = interval(samples[key]) if finite and key in samples else None
        curves["bootstrap"] = {k: samples[k] for k in interval_keys(fars, ranks) if k in samples}
    metrics["notes"] = notes
    return metrics, curves
