"""Metrics of one method from its embeddings: verification, k-fold accuracy and identification.

Pairs compare the method's image (probe) with the HR image (``pair_mode=sr_hr``, the deployment setting)
or with the method's image (``sr_sr``), always through the method's EdgeFace. The identification gallery
holds the HR images or the method's (``gallery=hr`` / ``sr``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from eval.errors import EvaluationError
from eval.metrics import identification, kfold_accuracy, pair_scores_indexed, roc, verification_metrics

__all__ = ["score_method"]


def score_method(probe_emb, hr_emb, labels, idx_a, idx_b, is_same, *, fold_ids=None, gallery_idx=None,
                 probe_idx=None, pair_mode: str = "sr_hr", gallery: str = "hr", folds: int = 10,
                 fars: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1), ranks: Sequence[int] = (1, 5, 10, 20),
                 ) -> tuple[dict, dict]:
    """Verification, k-fold accuracy and identification of one method from its embeddings.

    probe_emb: (N, D) embeddings of the method's images; hr_emb: (N, D) of the HR images through the
    same EdgeFace. Pair k compares probe_emb[idx_a[k]] with hr_emb[idx_b[k]] (``sr_hr``) or
    probe_emb[idx_b[k]] (``sr_sr``). Returns (metrics, curves for the figures).
    """
    if pair_mode not in ("sr_hr", "sr_sr"):
        raise EvaluationError(f"eval.pair_mode={pair_mode!r} must be sr_hr or sr_sr")
    if gallery not in ("hr", "sr"):
        raise EvaluationError(f"eval.gallery={gallery!r} must be hr or sr")
    same = np.asarray(is_same, bool)
    scores = pair_scores_indexed(probe_emb, idx_a, idx_b, emb_b=hr_emb if pair_mode == "sr_hr" else None)
    gen, imp = scores[same], scores[~same]
    v = verification_metrics(gen, imp, fars)
    notes = v.pop("notes")
    if fold_ids is None:
        folds = min(int(folds), int(same.sum()), int((~same).sum()))  # every fold needs both classes
    acc, acc_std, _ = kfold_accuracy(scores, same, folds=folds, fold_ids=fold_ids)
    metrics = {**v, "accuracy": acc, "accuracy_std": acc_std}
    far, tar, _ = roc(gen, imp)
    curves = {"far": far, "tar": tar, "genuine": gen, "impostor": imp}
    if gallery_idx is not None and probe_idx is not None:
        g_emb = hr_emb if gallery == "hr" else probe_emb
        labels = np.asarray(labels)
        ident = identification(np.asarray(g_emb)[gallery_idx], labels[gallery_idx],
                               np.asarray(probe_emb)[probe_idx], labels[probe_idx], ranks)
        curves["cmc"] = ident.pop("cmc")
        metrics.update(ident)
    metrics["notes"] = notes
    return metrics, curves
