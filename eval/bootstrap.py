"""Seeded bootstrap over identities: 95 % intervals of the metrics and paired differences between methods.

    counts = identity_resamples(num_identities, 1000, seed)   # (1000, identities), drawn once
    w = counts[:, identity_of_each_pair]                       # (1000, pairs): a pair counts as often as
                                                                 # its probe identity was drawn
    verification_metrics(gen, imp, weights=...)                 # eval.metrics: the same code, one row each

Identities, not pairs, are resampled because pairs of one identity are correlated (they share images and
the identity's difficulty): resampling pairs would give intervals that are too narrow. Every method of an
evaluation uses the same ``counts``, so the difference of two methods in one resample is a paired
difference and its interval says whether the ranking is more than noise. Intervals are percentile
intervals (2.5 %, 97.5 %) over the resamples.
"""
from __future__ import annotations

import numpy as np

__all__ = ["CI_SUFFIX", "identity_resamples", "weights_for", "interval", "paired_difference", "weighted_means"]

CI_SUFFIX = "_ci95"
_Q = (2.5, 97.5)


def identity_resamples(num_identities: int, num_resamples: int, seed: int) -> np.ndarray:
    """``(num_resamples, num_identities)`` int32 counts: how often each identity is drawn in each resample
    (``num_identities`` draws with replacement). Deterministic from ``seed``."""
    if num_identities < 1 or num_resamples < 1:
        raise ValueError(f"need >= 1 identity and >= 1 resample, got {num_identities} and {num_resamples}")
    rng = np.random.default_rng([int(seed), 0xB007])  # a stream of its own: pairs and splits are unchanged
    draws = rng.integers(0, num_identities, (num_resamples, num_identities))
    draws += num_identities * np.arange(num_resamples)[:, None]
    counts = np.bincount(draws.ravel(), minlength=num_resamples * num_identities)
    return counts.reshape(num_resamples, num_identities).astype(np.int32)


def weights_for(counts: np.ndarray, identity: np.ndarray) -> np.ndarray:
    """Per-sample integer weights ``(resamples, samples)``: each sample counts as often as its identity was
    drawn. ``identity``: column of ``counts`` of every sample (pair: its probe's identity; image: its own).
    """
    return counts[:, np.asarray(identity, np.int64)]


def weighted_means(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per-row weighted mean of per-sample values (e.g. per-image PSNR): ``(R,)``, NaN for an empty row."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return weights @ np.asarray(values, np.float64) / weights.sum(1)


def interval(samples) -> list[float] | None:
    """95 % percentile interval of bootstrap samples (NaN resamples ignored); None if none is finite."""
    s = np.asarray(samples, np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return None
    lo, hi = np.percentile(s, _Q)
    return [float(lo), float(hi)]


def paired_difference(a_samples, b_samples, a: float, b: float, higher_is_better: bool = True) -> dict | None:
    """``a - b`` with the 95 % interval of the paired bootstrap differences, and a verdict for ``a``:
    ``better`` / ``worse`` when the interval excludes zero, else ``within noise``. None without samples."""
    ci = interval(np.asarray(a_samples, np.float64) - np.asarray(b_samples, np.float64))
    if ci is None or not (np.isfinite(a) and np.isfinite(b)):
        return None
    diff = float(a - b)
    if ci[0] > 0 or ci[1] < 0:
        verdict = "better" if (ci[0] > 0) == higher_is_better else "worse"
    else:
        verdict = "within noise"
    return {"diff": diff, "ci95": ci, "verdict": verdict}
