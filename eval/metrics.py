"""Evaluation metrics: image quality, verification, identification. One implementation of each.

Conventions
-----------
* Images are batches ``(B, C, H, W)`` (or one ``(C, H, W)`` image), torch tensors or numpy arrays.
  Float inputs are used as given; integer inputs (uint8 ...) are converted to float64 *before* any
  arithmetic, so differences never wrap around, and they are rejected when their values exceed
  ``data_range`` (uint8 data with the default ``data_range=1.0`` is a bug, not a 255 dB image).
* PSNR and SSIM are returned per image (float64 array of length B); the caller averages them.
* Y channel (``y_channel=True``): ITU-R BT.601 luma as in BasicSR / MATLAB ``rgb2ycbcr``. With the
  RGB image scaled to [0, 1] (``x / data_range``),
  ``Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255``, i.e. the studio range 16..235 of the
  0..255 scale mapped to [16/255, 235/255], and the metric is computed on Y with range 1. This equals
  BasicSR's ``calculate_psnr/calculate_ssim(..., test_y_channel=True)`` (0..255 Y, range 255).
* Verification scores: higher = more similar; a pair is accepted when ``score >= threshold``.
  FAR = accepted impostors / impostors, TAR = accepted genuines / genuines, FNR = 1 - TAR.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Sequence

import numpy as np
import torch

__all__ = [
    "psnr",
    "ssim",
    "rgb_to_y",
    "roc",
    "verification_metrics",
    "far_key",
    "kfold_accuracy",
    "identification",
    "identification_ranks",
    "rank_accuracy",
    "pair_scores",
    "pair_scores_indexed",
    "sampling_noise",
]

# BT.601 studio-swing luma (BasicSR `rgb2ycbcr(y_only=True)`), for RGB in [0, 1] -> Y on 0..255.
_Y_WEIGHTS = (65.481, 128.553, 24.966)
_Y_OFFSET = 16.0

# SSIM constants of Wang et al. 2004 / scikit-image with gaussian_weights=True.
_SSIM_SIGMA = 1.5
_SSIM_TRUNCATE = 3.5  # scipy.ndimage default; radius = int(3.5 * 1.5 + 0.5) = 5 -> 11x11 window
_SSIM_K1, _SSIM_K2 = 0.01, 0.03


# ----------------------------------------------------------------------------------------------
# image quality
# ----------------------------------------------------------------------------------------------


def _as_image_batch(x, name: str, data_range: float):
    """(B, C, H, W) view of x: numpy for CPU data, a torch tensor for accelerator tensors.

    CPU work runs in numpy: its single-threaded element-wise ops are as fast here as torch's and do
    not stall when the cores are shared (torch's 2-thread OpenMP ran small chunks ~50x slower on a
    busy machine). Integers are checked here and cast per chunk later, never subtracted as ints.
    """
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bool or x.is_complex():
            raise TypeError(f"{name}: unsupported dtype {x.dtype}")
        x = x.detach()
        if x.device.type == "cpu":
            x = (x.float() if x.dtype == torch.bfloat16 else x).numpy()  # numpy has no bfloat16
    elif not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}")
    elif not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise TypeError(f"{name}: unsupported dtype {x.dtype}")
    is_int = not x.is_floating_point() if isinstance(x, torch.Tensor) else np.issubdtype(x.dtype, np.integer)
    if is_int and (x.numel() if isinstance(x, torch.Tensor) else x.size):
        # uint8 data with data_range=1 is a caller bug, not a very noisy image: refuse it.
        lo, hi = float(x.min()), float(x.max())
        if hi > data_range or lo < 0:
            raise ValueError(
                f"{name}: integer images with values in [{lo:g}, {hi:g}] but data_range={data_range}; "
                "pass data_range=255 for uint8 images or convert them to floats in [0, 1]"
            )
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"{name}: expected (B, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
    return x


def _float64(a, like):
    if isinstance(like, torch.Tensor):
        a = a if isinstance(a, torch.Tensor) else torch.from_numpy(a)
        return a.to(device=like.device, dtype=torch.float64)
    return (a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a).astype(np.float64)


def _float64_chunks(x, y, data_range: float, crop_border: int, y_channel: bool):
    """Yield float64 (x, y) chunks, cropped and Y-converted, with the data range the metric uses.

    Casting chunk by chunk (never the whole batch) keeps the float64 working set in cache; casting
    *before* subtracting is what prevents uint8 wrap-around.
    """
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    xt = _as_image_batch(x, "x", data_range)
    yt = _as_image_batch(y, "y", data_range)
    if tuple(xt.shape) != tuple(yt.shape):
        raise ValueError(f"x and y shapes differ: {tuple(xt.shape)} vs {tuple(yt.shape)}")
    c = crop_border
    if c:
        if c < 0 or 2 * c >= min(xt.shape[-2:]):
            raise ValueError(f"crop_border={c} invalid for images of size {tuple(xt.shape[-2:])}")
        xt, yt = xt[..., c:-c, c:-c], yt[..., c:-c, c:-c]
    if y_channel and xt.shape[1] != 3:
        raise ValueError(f"y_channel needs RGB images (3 channels), got {xt.shape[1]}")
    # ~0.1 M values per chunk was fastest on CPU (measured 40 k .. 1 M); GPUs want big launches.
    pixels = 50_000_000 if isinstance(xt, torch.Tensor) else 100_000
    per = max(1, pixels // max(1, int(np.prod(xt.shape[1:]))))
    for s in range(0, xt.shape[0], per):
        xs = _float64(xt[s : s + per], xt)
        ys = _float64(yt[s : s + per], xt)
        if y_channel:
            xs, ys = rgb_to_y(xs / data_range), rgb_to_y(ys / data_range)
        yield xs, ys, (1.0 if y_channel else float(data_range))


def _np(a) -> np.ndarray:
    return a.cpu().numpy() if isinstance(a, torch.Tensor) else a


def rgb_to_y(x):
    """BT.601 luma of RGB images in [0, 1], (B, 3, H, W) -> (B, 1, H, W) in [16/255, 235/255].

    Works on numpy arrays and torch tensors alike (plain arithmetic).
    """
    if x.shape[-3] != 3:
        raise ValueError(f"y_channel needs RGB images (3 channels), got {x.shape[-3]}")
    wr, wg, wb = _Y_WEIGHTS
    return (x[..., 0:1, :, :] * wr + x[..., 1:2, :, :] * wg + x[..., 2:3, :, :] * wb + _Y_OFFSET) / 255.0


def psnr(x, y, data_range: float = 1.0, crop_border: int = 0, y_channel: bool = False) -> np.ndarray:
    """Per-image PSNR in dB (float64, length B); +inf for identical images.

    Same value as ``skimage.metrics.peak_signal_noise_ratio(x_i, y_i, data_range=data_range)``.
    """
    out = []
    for xs, ys, r in _float64_chunks(x, y, data_range, crop_border, y_channel):
        d = xs - ys
        mse = _np((d * d).reshape(d.shape[0], -1).mean(1))
        with np.errstate(divide="ignore"):
            out.append(10.0 * np.log10(r * r / mse))
    return np.concatenate(out)


def _gaussian_window() -> list[float]:
    # Same normalised kernel as scipy.ndimage.gaussian_filter(sigma=1.5, truncate=3.5).
    radius = int(_SSIM_TRUNCATE * _SSIM_SIGMA + 0.5)
    k = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-0.5 * (k / _SSIM_SIGMA) ** 2)
    return (g / g.sum()).tolist()


def _filter_valid(m, g: Sequence[float]):
    """Separable 'valid' Gaussian filter over the last two dims (numpy or torch), in float64.

    float64 conv2d on CPU has no fast kernel (~25x slower here); adding shifted slices of small,
    cache-sized chunks is the fastest float64 path and uses the kernel's symmetry (6 multiplies).
    Rows first: whole-row slices are contiguous.
    """
    r = len(g) // 2
    h = m.shape[-2] - 2 * r
    a = m[..., r : r + h, :] * g[r]
    for k in range(r):
        t = m[..., k : k + h, :] + m[..., 2 * r - k : 2 * r - k + h, :]
        t *= g[k]
        a += t
    w = m.shape[-1] - 2 * r
    b = a[..., r : r + w] * g[r]
    for k in range(r):
        t = a[..., k : k + w] + a[..., 2 * r - k : 2 * r - k + w]
        t *= g[k]
        b += t
    return b


def ssim(x, y, data_range: float = 1.0, crop_border: int = 0, y_channel: bool = False) -> np.ndarray:
    """Per-image SSIM (float64, length B), Gaussian-window SSIM of Wang et al. 2004.

    Equals ``skimage.metrics.structural_similarity(x_i, y_i, channel_axis=0, data_range=data_range,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`` on float64 data: per-channel
    mean of the SSIM map over the 'valid' region (5 px trimmed on each side), averaged over channels.
    """
    g = _gaussian_window()
    out = []
    for xs, ys, r in _float64_chunks(x, y, data_range, crop_border, y_channel):
        if min(xs.shape[-2:]) < len(g):
            raise ValueError(f"SSIM needs images of at least {len(g)}x{len(g)} pixels, got {xs.shape[-2:]}")
        c1, c2 = (_SSIM_K1 * r) ** 2, (_SSIM_K2 * r) ** 2
        stack = torch.stack if isinstance(xs, torch.Tensor) else np.stack
        # Only var_x + var_y enters SSIM, so x^2 + y^2 is filtered once instead of x^2 and y^2.
        ux, uy, uxxyy, uxy = _filter_valid(stack([xs, ys, xs * xs + ys * ys, xs * ys]), g)
        # SSIM map = (2 ux uy + c1)(2 cov + c2) / ((ux^2 + uy^2 + c1)(var_x + var_y + c2)), in place
        uxuy = ux * uy
        ux *= ux
        uy *= uy
        uu = ux
        uu += uy
        s_map = uxuy * 2 + c1
        uxy -= uxuy
        uxy *= 2
        uxy += c2
        s_map *= uxy
        uxxyy -= uu
        uxxyy += c2
        uu += c1
        uu *= uxxyy
        s_map /= uu
        out.append(_np(s_map.reshape(s_map.shape[0], -1).mean(1)))
    return np.concatenate(out)


# ----------------------------------------------------------------------------------------------
# verification
# ----------------------------------------------------------------------------------------------


def _to_numpy(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _scores(a, name: str) -> np.ndarray:
    s = _to_numpy(a).astype(np.float64).ravel()
    if s.size == 0:
        raise ValueError(f"{name}: no scores")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{name}: {int((~np.isfinite(s)).sum())} scores are NaN or infinite")
    return s


def _weights(weights, n: int, name: str = "weights") -> np.ndarray:
    """(R, n) per-sample weights, one row per resample (integer counts stay integers, anything else is
    float64); None = one row of ones (every sample once)."""
    if weights is None:
        return np.ones((1, n), np.int32)
    w = _to_numpy(weights)
    w = w if np.issubdtype(w.dtype, np.integer) else w.astype(np.float64)
    if w.ndim != 2 or w.shape[1] != n:
        raise ValueError(f"{name}: expected shape (resamples, {n}), got {w.shape}")
    if w.size and (not np.all(np.isfinite(w)) or w.min() < 0):
        raise ValueError(f"{name}: weights must be finite and >= 0")
    return w


def _work_dtype(w: np.ndarray):
    """Dtype for cumulative sums of weights: int32 for counts whose sums fit (exact, and half the memory
    traffic of float64), int64 for larger counts, else float64."""
    if not np.issubdtype(w.dtype, np.integer):
        return np.float64
    return np.int32 if w.size == 0 or int(w.max()) * w.shape[1] < 2**31 else np.int64


def _cumsum0(w: np.ndarray) -> np.ndarray:
    """Row-wise cumulative sums with a leading zero column: out[:, m] = sum of the first m columns."""
    out = np.empty((w.shape[0], w.shape[1] + 1), w.dtype)
    out[:, 0] = 0
    np.cumsum(w, axis=1, out=out[:, 1:])
    return out


def _roc_counts(genuine: np.ndarray, impostor: np.ndarray, weights: np.ndarray):
    """Cumulative (accepted impostor weight, accepted genuine weight) at each distinct score, descending,
    per weight row: ``(R, distinct + 1)`` arrays, and the thresholds.

    ``weights`` is ``(R, n_genuine + n_impostor)``; a row of ones counts pairs. Integer weights (bootstrap
    counts) are summed exactly, as integers.
    """
    scores = np.concatenate([genuine, impostor])
    order = np.argsort(-scores, kind="mergesort")
    scores = scores[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]  # last index of each distinct value
    is_gen = order < genuine.size
    n_gen_upto = np.r_[0, np.cumsum(is_gen)[last]]  # genuines among the pairs accepted at each point
    w = weights.astype(_work_dtype(weights), copy=False)  # no copy for int32 bootstrap counts
    # Leading point (0, 0) with threshold +inf, as sklearn >= 1.3.
    tps = _cumsum0(w[:, order[is_gen]])[:, n_gen_upto]
    fps = _cumsum0(w[:, order[~is_gen]])[:, np.r_[0, last + 1] - n_gen_upto]
    return fps.astype(np.float64), tps.astype(np.float64), np.r_[np.inf, scores[last]]


def roc(genuine, impostor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full ROC: (FAR, TAR, thresholds), one point per distinct score plus (0, 0) at +inf.

    Identical to ``sklearn.metrics.roc_curve(labels, scores, drop_intermediate=False)`` on the
    concatenated genuine (label 1) / impostor (label 0) scores. Thresholds are decreasing.
    """
    g, i = _scores(genuine, "genuine"), _scores(impostor, "impostor")
    fps, tps, thr = _roc_counts(g, i, _weights(None, g.size + i.size))
    return fps[0] / i.size, tps[0] / g.size, thr


def far_key(far: float) -> str:
    """Metric name for a FAR target: 1e-3 -> 'tar@far=1e-3', 0.05 -> 'tar@far=5e-2', 0.015 -> '...=0.015'."""
    mant, exp = f"{far:.0e}".split("e")
    short = f"{mant}e{int(exp)}"
    return f"tar@far={short if float(short) == far else f'{far:g}'}"


def sampling_noise(num_pairs: int) -> float:
    """Rough 1-sigma-scale noise of a verification rate (AUC, TAR, accuracy) measured on `num_pairs`
    pairs, 1 / sqrt(n) (the binomial std is at most 0.5 / sqrt(n)): differences below it are not
    evidence of a change. 6,000 pairs -> 0.013."""
    return 1.0 / math.sqrt(max(1, int(num_pairs)))


def _weighted_moments(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row weighted mean and standard deviation (ddof=0): two matrix-vector products on scores
    centred first, so E[x^2] - E[x]^2 does not cancel."""
    c = x.mean()
    xc = x - c
    w = w.astype(np.float64, copy=False)
    total = w.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):  # a row weighing nothing: NaN
        m1 = w @ xc / total
        var = np.maximum(w @ (xc * xc) / total - m1 * m1, 0.0)
    return m1 + c, np.sqrt(var)


def verification_metrics(genuine, impostor, fars: Iterable[float] = (1e-4, 1e-3, 1e-2, 1e-1),
                         weights=None) -> dict:
    """Verification metrics from genuine and impostor similarity scores.

    Returns a dict of floats/ints plus ``'notes'`` (list of str, empty when nothing to report):

    * ``auc``: area under the full ROC (== sklearn ``roc_auc_score``).
    * ``eer``: equal error rate where FNR = FAR on the piecewise-linear ROC (the usual
      ``brentq(lambda x: 1 - x - interp1d(far, tar)(x), 0, 1)`` recipe, computed exactly);
      ``eer_threshold``: the largest threshold whose FNR <= FAR (first operating point at or past it).
    * ``tar@far=1e-4`` ...: TAR at the operating point with the largest TAR among those with
      FAR <= target, i.e. the lowest threshold still meeting the target (never interpolated);
      ``threshold@far=...`` is that threshold. With fewer than ceil(1/target) impostor scores no
      non-zero FAR <= target exists, so the value is NaN and a line in ``notes`` says so.
    * ``d_prime`` = |mu_g - mu_i| / sqrt((var_g + var_i) / 2) (population variances, ddof=0).
    * ``genuine_mean/std``, ``impostor_mean/std`` (ddof=0), ``num_genuine``, ``num_impostor``.

    ``weights``: optional ``(R, n_genuine + n_impostor)`` non-negative weights per pair (genuine first),
    one row per resample, e.g. bootstrap counts. Every metric above is then computed once per row, by the
    same code, and returned as an ``(R,)`` array (NaN where a row weighs no genuine or no impostor pair);
    counts and notes are left out. Integer weights give the metrics of the sample with each pair repeated
    that often (thresholds may then sit at a zero-weight score with the same TAR/FAR).
    """
    g, i = _scores(genuine, "genuine"), _scores(impostor, "impostor")
    w = _weights(weights, g.size + i.size)
    fps, tps, thr = _roc_counts(g, i, w)
    n_gen, n_imp = tps[:, -1], fps[:, -1]
    rows = np.arange(w.shape[0])
    with np.errstate(divide="ignore", invalid="ignore"):
        far, tar = fps / n_imp[:, None], tps / n_gen[:, None]
    empty = (n_gen <= 0) | (n_imp <= 0)
    # trapezoids under the ROC (== np.trapezoid(tar, far)), one fused multiply-sum per row
    out: dict = {"auc": np.einsum("ij,ij->i", np.diff(far, axis=1), tar[:, 1:] + tar[:, :-1]) / 2}

    fnr = 1.0 - tar
    k = np.maximum(np.argmax(fnr <= far, axis=1), 1)  # exists: at the last point FAR = 1 >= FNR = 0
    d0, d1 = fnr[rows, k - 1] - far[rows, k - 1], fnr[rows, k] - far[rows, k]  # k >= 1: FNR(0) = 1 > FAR(0) = 0
    with np.errstate(divide="ignore", invalid="ignore"):
        t = d0 / (d0 - d1)
    out["eer"] = far[rows, k - 1] + t * (far[rows, k] - far[rows, k - 1])
    out["eer_threshold"] = thr[k]

    notes: list[str] = []
    for target in fars:
        key = far_key(target)
        need = math.ceil(round(1.0 / target, 9))
        allowed = np.floor(target * n_imp * (1 + 1e-9))  # impostor weight that may be accepted
        j = (fps <= allowed[:, None]).sum(1) - 1  # fps is non-decreasing along each row
        short = n_imp < need  # no non-zero FAR <= target exists
        out[key] = np.where(short, np.nan, tar[rows, j])
        out["threshold" + key[3:]] = np.where(short, np.nan, thr[j])
        if weights is None and short[0]:
            notes.append(f"{key} is NaN: needs >= {need} impostor scores, have {i.size}")

    gm, gs = _weighted_moments(g, w[:, :g.size])
    im, is_ = _weighted_moments(i, w[:, g.size:])
    den, diff = np.sqrt((gs**2 + is_**2) / 2), np.abs(gm - im)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["d_prime"] = np.where(den > 0, diff / den, np.where(diff > 0, np.inf, 0.0))
    out.update(genuine_mean=gm, genuine_std=gs, impostor_mean=im, impostor_std=is_)
    for key, v in out.items():
        v[empty] = np.nan
    if weights is not None:
        return out
    out = {key: float(v[0]) for key, v in out.items()}
    out.update(num_genuine=int(g.size), num_impostor=int(i.size), notes=notes)
    return out


class _Below:
    """Weight of a set of pairs scoring below x, per weight row: one sort and one cumulative sum, then
    every query is a binary search (the k-fold search over thresholds never re-sorts or re-sums)."""

    def __init__(self, s: np.ndarray, w: np.ndarray, mask: np.ndarray):
        idx = np.flatnonzero(mask)
        idx = idx[np.argsort(s[idx], kind="stable")]
        self.s, self.cum = s[idx], _cumsum0(w[:, idx])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """(R, len(x)): weight of the pairs with score < x."""
        return self.cum[:, np.searchsorted(self.s, x, side="left")]

    def per_row(self, x: np.ndarray) -> np.ndarray:
        """(R,): weight of the pairs with score < x[r] in row r."""
        return self.cum[np.arange(self.cum.shape[0]), np.searchsorted(self.s, x, side="left")]

    @property
    def total(self) -> np.ndarray:
        return self.cum[:, -1]


def _threshold_candidates(s: np.ndarray, is_same: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct scores ``u`` of these pairs and the candidates ``k`` (accept ``u[k:]``) that can maximise the
    accuracy for *any* non-negative weights: 0, len(u), and each k whose group k-1 holds an impostor and
    group k a genuine (elsewhere moving the threshold by one group never loses). With positive weights
    the largest maximiser is always among them, so the result equals a search over every midpoint."""
    order = np.argsort(s, kind="stable")
    s, lab = s[order], is_same[order]
    first = np.r_[0, np.flatnonzero(np.diff(s)) + 1]
    has_gen = np.logical_or.reduceat(lab, first)
    has_imp = np.logical_or.reduceat(~lab, first)
    k = np.flatnonzero(has_imp[:-1] & has_gen[1:]) + 1
    return s[first], np.r_[0, k, first.size]


def kfold_accuracy(scores, is_same, folds: int = 10, fold_ids=None, weights=None):
    """K-fold verification accuracy; each fold's threshold is tuned on the *other* folds only.

    ``fold_ids`` (one id per pair: LFW pairs.txt folds, or the identity-disjoint folds of
    ``eval.protocols.balanced_fold_pairs``) overrides ``folds``. Without it, pairs are assigned
    round-robin per class in their given order, so every fold is balanced, but folds then share
    identities: pass ``fold_ids`` for a protocol you publish.
    Returns (mean accuracy over folds, std over folds (ddof=0), thresholds per fold in sorted
    fold-id order).

    ``weights``: optional ``(R, n_pairs)`` per-pair weights, one row per resample (bootstrap counts);
    thresholds are re-tuned and accuracies weighted per row by the same code, and the result is the
    ``(R,)`` array of mean accuracies over the folds a row weighs (NaN if none).
    """
    s = _scores(scores, "scores")
    same = _to_numpy(is_same).astype(bool).ravel()
    if same.size != s.size:
        raise ValueError(f"{s.size} scores but {same.size} is_same labels")
    if fold_ids is None:
        if not 2 <= folds <= s.size:
            raise ValueError(f"folds={folds} needs 2 <= folds <= number of pairs ({s.size})")
        fold_ids = np.empty(s.size, np.int64)
        for cls in (True, False):
            idx = np.flatnonzero(same == cls)
            fold_ids[idx] = np.arange(idx.size) % folds
    else:
        fold_ids = _to_numpy(fold_ids).ravel()
        if fold_ids.size != s.size:
            raise ValueError(f"{s.size} scores but {fold_ids.size} fold ids")
    ids = np.unique(fold_ids)
    if ids.size < 2:
        raise ValueError("k-fold accuracy needs at least 2 folds")
    w = _weights(weights, s.size)
    w = w.astype(_work_dtype(w), copy=False)
    every_g, every_i = _Below(s, w, same), _Below(s, w, ~same)
    accs, thresholds = [], []
    for f in ids:
        test = fold_ids == f
        fold_g, fold_i = _Below(s, w, test & same), _Below(s, w, test & ~same)
        # Threshold from the other folds: candidate k accepts u[k:]; correct = genuines >= u[k] + impostors
        # < u[k] = (all genuines) - (genuines < u[k]) + (impostors < u[k]), over the training pairs only.
        u, cand = _threshold_candidates(s[~test], same[~test])
        x = np.r_[u, np.inf][cand]
        gain = (every_i(x) - fold_i(x)) - (every_g(x) - fold_g(x))
        k = cand[cand.size - 1 - np.argmax(gain[:, ::-1], axis=1)]  # ties: the largest threshold
        mid = (u[np.clip(k - 1, 0, u.size - 1)] + u[np.minimum(k, u.size - 1)]) / 2
        t = np.where(k == 0, -np.inf, np.where(k == u.size, np.inf, mid))
        # test fold: genuines >= t and impostors < t
        right = (fold_g.total - fold_g.per_row(t)) + fold_i.per_row(t)
        with np.errstate(divide="ignore", invalid="ignore"):
            accs.append(right.astype(np.float64) / (fold_g.total + fold_i.total).astype(np.float64))
        thresholds.append(t)
    accs = np.asarray(accs)  # (folds, R)
    if weights is not None:
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a row weighing no fold: NaN
            return np.nanmean(accs, axis=0)
    return float(accs[:, 0].mean()), float(accs[:, 0].std()), np.asarray(thresholds)[:, 0]


# ----------------------------------------------------------------------------------------------
# embeddings: pair scores and identification
# ----------------------------------------------------------------------------------------------


def _normalized(emb, name: str, dtype=np.float64) -> np.ndarray:
    e = _to_numpy(emb).astype(dtype, copy=True)
    if e.ndim != 2:
        raise ValueError(f"{name}: expected (N, D) embeddings, got shape {e.shape}")
    e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)  # zero vectors score 0
    return e


def pair_scores(emb_a, emb_b) -> np.ndarray:
    """Cosine similarity of row-wise pairs (rows L2-normalised first), float64 (N,)."""
    a, b = _normalized(emb_a, "emb_a"), _normalized(emb_b, "emb_b")
    if a.shape != b.shape:
        raise ValueError(f"emb_a and emb_b shapes differ: {a.shape} vs {b.shape}")
    return np.einsum("ij,ij->i", a, b)


def pair_scores_indexed(emb, idx_a, idx_b, emb_b=None, chunk: int = 16384) -> np.ndarray:
    """Cosine scores of pairs given as indices: ``cos(emb[idx_a[k]], emb_b[idx_b[k]])``.

    Each image is embedded once and normalised once; pairs are gathered in chunks, so 100k pairs
    cost O(pairs x D) with bounded memory. ``emb_b`` (default ``emb``) lets one side come from
    another domain (e.g. SR probes vs HR gallery) with the same indexing.
    """
    a = _normalized(emb, "emb")
    b = a if emb_b is None else _normalized(emb_b, "emb_b")
    ia = _to_numpy(idx_a).astype(np.int64).ravel()
    ib = _to_numpy(idx_b).astype(np.int64).ravel()
    if ia.size != ib.size:
        raise ValueError(f"{ia.size} idx_a but {ib.size} idx_b")
    for name, idx, n in (("idx_a", ia, a.shape[0]), ("idx_b", ib, b.shape[0])):
        if idx.size and (idx.min() < 0 or idx.max() >= n):  # negative indices would silently wrap
            raise ValueError(f"{name} out of range [0, {n}): min {idx.min()}, max {idx.max()}")
    out = np.empty(ia.size, np.float64)
    for s in range(0, ia.size, chunk):
        out[s : s + chunk] = np.einsum("ij,ij->i", a[ia[s : s + chunk]], b[ib[s : s + chunk]])
    return out


def identification_ranks(gallery_emb, gallery_labels, probe_emb, probe_labels) -> tuple[np.ndarray, int]:
    """Closed-set rank of every probe (cosine similarity) and the number of gallery identities.

    Similarities are one float64 matrix product (probes x gallery): float32 rounding would turn nearly
    equal scores into ties, which count against the probe. A gallery identity's score is its best
    gallery image. A probe's rank is 1 + the number of *other* identities scoring >= its own
    identity (ties count against the probe, so collapsed embeddings cannot look perfect).
    The caller keeps each probe's own image out of the gallery; every probe label must be in it.
    """
    g = _normalized(gallery_emb, "gallery_emb")
    p = _normalized(probe_emb, "probe_emb")
    gl, pl = _to_numpy(gallery_labels).ravel(), _to_numpy(probe_labels).ravel()
    if gl.size != g.shape[0] or pl.size != p.shape[0]:
        raise ValueError("labels and embeddings have different lengths")
    if p.shape[0] == 0:
        raise ValueError("identification needs at least one probe")
    ids, g_id = np.unique(gl, return_inverse=True)
    pos = np.searchsorted(ids, pl)
    pos = np.minimum(pos, ids.size - 1)
    absent = ids[pos] != pl
    if absent.any():
        missing = np.unique(pl[absent])
        raise ValueError(
            f"{int(absent.sum())} probes have labels absent from the gallery "
            f"(e.g. {missing[:5].tolist()}); closed-set identification needs every probe identity in it"
        )
    # Group gallery columns by identity so a per-identity max is one reduceat.
    order = np.argsort(g_id, kind="stable")
    starts = np.r_[0, np.flatnonzero(np.diff(g_id[order])) + 1]
    one_per_id = g.shape[0] == ids.size
    g_sorted = g[order].T.copy()
    rank = np.empty(p.shape[0], np.int64)
    for s in range(0, p.shape[0], 4096):  # bounds the (probes x gallery) matrix
        sim = p[s : s + 4096] @ g_sorted
        if not one_per_id:
            sim = np.maximum.reduceat(sim, starts, axis=1)
        own = sim[np.arange(sim.shape[0]), pos[s : s + 4096]]
        rank[s : s + 4096] = (sim >= own[:, None]).sum(1)  # includes itself -> 1 + others >= own
    return rank, int(ids.size)


def rank_accuracy(rank, num_ids: int, ranks: Sequence[int] = (1, 5, 10, 20), weights=None) -> dict:
    """Rank-k accuracies and the CMC from probe ranks (``identification_ranks``).

    ``cmc[k-1]`` = fraction of probes with rank <= k, k = 1 .. num_ids, so it is
    non-decreasing and ends at 1; ``rank{k}`` beyond the gallery size is 1.0. ``weights``: optional
    ``(R, n_probes)`` per-probe weights, one row per resample; each ``rank{k}`` is then an ``(R,)``
    array (NaN for a row weighing no probe) and the CMC is left out.
    """
    rank = _to_numpy(rank).astype(np.int64).ravel()
    w = _weights(weights, rank.size)
    total = w.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = {f"rank{k}": w @ (rank <= k) / total for k in ranks}  # k beyond the gallery: every probe
    if weights is not None:
        return out
    cmc = np.bincount(rank - 1, minlength=num_ids).cumsum() / rank.size
    return {**{k: float(v[0]) for k, v in out.items()}, "cmc": cmc}


def identification(
    gallery_emb, gallery_labels, probe_emb, probe_labels, ranks: Sequence[int] = (1, 5, 10, 20)
) -> dict:
    """Closed-set identification: rank-k accuracy and CMC, cosine similarity.

    ``identification_ranks`` then ``rank_accuracy``: see them for the rules (float64 similarities,
    ties against the probe, best gallery image per identity).
    """
    rank, n_ids = identification_ranks(gallery_emb, gallery_labels, probe_emb, probe_labels)
    return {**rank_accuracy(rank, n_ids, ranks), "num_probes": int(rank.size), "num_gallery_ids": n_ids}
