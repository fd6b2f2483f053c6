"""Figures of the evaluation report: ROC, CMC, score histograms, PSNR/SSIM bars, sample grid.

Built with matplotlib's object API on an Agg canvas (no pyplot): nothing global changes at import or
when a figure is drawn, so the report works headless and inside notebooks with another backend.
Every function takes plain arrays keyed by method name and writes ``<stem>.<fmt>`` per format.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

# One colour/line per method, identical in every figure (colour-blind-safe Okabe-Ito palette).
STYLES = {
    "hr": {"color": "#000000", "linestyle": "--"},
    "bicubic": {"color": "#999999", "linestyle": ":"},
    "initial": {"color": "#0072B2", "linestyle": "-"},
    "initial_ft": {"color": "#56B4E9", "linestyle": "-."},
    "cyclic": {"color": "#D55E00", "linestyle": "-"},
    "cyclic2": {"color": "#009E73", "linestyle": "-"},
}
RC = {
    "font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8, "legend.fontsize": 7, "xtick.labelsize": 7,
    "ytick.labelsize": 7, "axes.spines.top": False, "axes.spines.right": False, "savefig.dpi": 200,
    "pdf.fonttype": 42,  # TrueType in PDFs: editable text, accepted by publishers
}


def _style(method: str) -> dict:
    return dict(STYLES.get(method, {"color": None, "linestyle": "-"}))


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, stem: Path, formats: Sequence[str]) -> list[Path]:
    import logging

    # PDF font subsetting logs a dozen INFO lines per figure under Hydra's INFO root logger
    logging.getLogger("fontTools").setLevel(logging.WARNING)
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for fmt in formats:
        path = stem.with_suffix(f".{fmt}")
        fig.savefig(path, format=fmt, bbox_inches="tight")
        out.append(path)
    return out


def _rc():
    import matplotlib

    return matplotlib.rc_context(RC)


def roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], stem: Path, title: str,
        formats: Sequence[str] = ("png",)) -> list[Path]:
    """TAR against FAR on a log axis, one step curve per method; curves: method -> (far, tar)."""
    with _rc():
        fig = _figure(3.4, 2.8)
        ax = fig.add_subplot()
        lowest = 1.0
        for method, (far, tar) in curves.items():
            far, tar = np.asarray(far), np.asarray(tar)
            keep = far > 0  # FAR = 0 has no place on a log axis; the curve starts at the first impostor
            if not keep.any():
                continue
            lowest = min(lowest, float(far[keep].min()))
            ax.step(far[keep], tar[keep], where="post", label=method, linewidth=1.2, **_style(method))
        ax.set_xscale("log")
        ax.set_xlim(max(lowest, 1e-6), 1.0)
        ax.set_ylim(0.0, 1.01)
        ax.set_xlabel("false accept rate (FAR)")
        ax.set_ylabel("true accept rate (TAR)")
        ax.set_title(title)
        ax.grid(True, which="major", linewidth=0.4, alpha=0.5)
        ax.legend(loc="lower right", frameon=False)
        return _save(fig, stem, formats)


def cmc(curves: Mapping[str, np.ndarray], stem: Path, title: str, formats: Sequence[str] = ("png",),
        max_rank: int = 20) -> list[Path]:
    """Cumulative match characteristic: identification rate at rank 1..max_rank per method."""
    with _rc():
        fig = _figure(3.4, 2.8)
        ax = fig.add_subplot()
        top = 1
        for method, curve in curves.items():
            c = np.asarray(curve)[:max_rank]
            top = max(top, c.size)
            ax.plot(np.arange(1, c.size + 1), c, marker="o", markersize=2.5, linewidth=1.2, label=method,
                    **_style(method))
        ax.set_xlim(0.5, top + 0.5)
        ax.set_ylim(0.0, 1.01)
        ax.set_xlabel("rank")
        ax.set_ylabel("identification rate")
        ax.set_title(title)
        ax.grid(True, linewidth=0.4, alpha=0.5)
        ax.legend(loc="lower right", frameon=False)
        return _save(fig, stem, formats)


def score_histograms(scores: Mapping[str, tuple[np.ndarray, np.ndarray]], stem: Path, title: str,
                     formats: Sequence[str] = ("png",)) -> list[Path]:
    """Genuine and impostor cosine-score densities, one panel per method, shared bins and axes."""
    methods = list(scores)
    cols = min(3, max(1, len(methods)))
    rows = -(-len(methods) // cols)
    every = np.concatenate([np.r_[g, i] for g, i in scores.values()]) if methods else np.zeros(1)
    bins = np.linspace(min(-0.2, float(every.min())), max(1.0, float(every.max())), 61)
    with _rc():
        fig = _figure(2.3 * cols, 1.9 * rows)
        axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False).ravel()
        for ax, method in zip(axes, methods):
            gen, imp = scores[method]
            # one filled step artist per class (not a patch per bar): fast to draw, small PDFs
            for values, color, label in ((imp, "#D55E00", "impostor"), (gen, "#0072B2", "genuine")):
                ax.stairs(np.histogram(values, bins=bins, density=True)[0], bins, fill=True, alpha=0.5,
                          color=color, label=label)
            ax.set_title(method)
            ax.set_xlabel("cosine similarity")
        for ax in axes[len(methods):]:
            ax.set_visible(False)
        axes[0].set_ylabel("density")
        axes[0].legend(frameon=False)
        fig.suptitle(title, fontsize=9)
        return _save(fig, stem, formats)


def quality_bars(values: Mapping[str, tuple[np.ndarray, np.ndarray]], stem: Path, title: str,
                 formats: Sequence[str] = ("png",)) -> list[Path]:
    """Mean PSNR and SSIM per method with one-standard-deviation error bars; values: method -> (psnr, ssim)."""
    methods = list(values)
    with _rc():
        fig = _figure(max(3.4, 0.75 * len(methods) * 2 + 1), 2.4)
        for k, (ax, name) in enumerate(zip(fig.subplots(1, 2), ("PSNR (dB)", "SSIM"))):
            per = [np.asarray(values[m][k], np.float64) for m in methods]
            per = [v[np.isfinite(v)] for v in per]  # identical images have PSNR = inf
            means = [float(v.mean()) if v.size else np.nan for v in per]
            stds = [float(v.std()) if v.size else 0.0 for v in per]
            x = np.arange(len(methods))
            ax.bar(x, means, yerr=stds, capsize=2, width=0.65, error_kw={"linewidth": 0.8},
                   color=[_style(m)["color"] or "#666666" for m in methods])
            for xi, m, sd in zip(x, means, stds):
                if np.isfinite(m):  # above the error bar, so the cap never hides the number
                    ax.annotate(f"{m:.2f}" if k == 0 else f"{m:.3f}", (xi, m + sd), ha="center", va="bottom",
                                fontsize=6, xytext=(0, 2), textcoords="offset points")
            ax.set_xticks(x, methods, rotation=30, ha="right")
            ax.set_ylabel(name)
            if k == 1:
                ax.set_ylim(0, 1.05)
        fig.suptitle(title, fontsize=9)
        return _save(fig, stem, formats)


def sample_grid(columns: Sequence[tuple[str, np.ndarray]], stem: Path, title: str,
                formats: Sequence[str] = ("png",)) -> list[Path]:
    """Rows of faces, one column per (label, images (n, 3, H, W) float in [0, 1]); low-resolution
    columns are shown with nearest-neighbour pixels so their true resolution stays visible."""
    n = min(len(c[1]) for c in columns)
    with _rc():
        fig = _figure(1.0 * len(columns), 1.0 * n + 0.3)
        axes = fig.subplots(n, len(columns), squeeze=False)
        for j, (label, images) in enumerate(columns):
            for i in range(n):
                ax = axes[i, j]
                ax.imshow(np.clip(np.asarray(images[i], np.float32).transpose(1, 2, 0), 0, 1),
                          interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                for s in ax.spines.values():
                    s.set_visible(False)
            axes[0, j].set_title(label, fontsize=7)
        fig.suptitle(title, fontsize=9)
        return _save(fig, stem, formats)


def resolution_summary(table: Mapping[str, Mapping[str, Mapping[str, float]]], metrics: Sequence[str],
                       stem: Path, formats: Sequence[str] = ("png",)) -> list[Path]:
    """Metric against input resolution, one line per method; table: res -> method -> metric -> value."""
    res = sorted(table, key=int)
    methods = list(dict.fromkeys(m for r in res for m in table[r]))
    with _rc():
        fig = _figure(2.6 * len(metrics), 2.4)
        for ax, metric in zip(fig.subplots(1, len(metrics), squeeze=False).ravel(), metrics):
            for m in methods:
                y = [table[r].get(m, {}).get(metric) for r in res]
                y = [np.nan if v is None else float(v) for v in y]
                ax.plot([int(r) for r in res], y, marker="o", markersize=3, linewidth=1.2, label=m, **_style(m))
            ax.set_xticks([int(r) for r in res])
            ax.set_xlabel("input resolution (px)")
            ax.set_ylabel(metric)
            ax.grid(True, linewidth=0.4, alpha=0.5)
        ax.legend(frameon=False)
        return _save(fig, stem, formats)


def sweep_comparison(labels: Sequence[str], values: Mapping[str, Sequence[float | None]], stem: Path,
                     x: Sequence[float] | None = None, xlabel: str | None = None,
                     formats: Sequence[str] = ("png",)) -> list[Path]:
    """Every job of a sweep on each metric, one panel per metric: a curve against `x` when the jobs differ
    in one numeric override (log axis when it spans more than a decade), else one bar per job."""
    metrics = list(values)
    with _rc():
        fig = _figure(max(2.6 * len(metrics), 3.4), 2.6 + (0 if x is not None else 0.05 * max(map(len, labels))))
        for ax, metric in zip(fig.subplots(1, len(metrics), squeeze=False).ravel(), metrics):
            y = np.array([np.nan if v is None else float(v) for v in values[metric]])
            if x is not None:
                order = np.argsort(x)
                xs = np.asarray(x, np.float64)[order]
                ax.plot(xs, y[order], marker="o", markersize=3, linewidth=1.2, color="#0072B2")
                if xs.min() > 0 and xs.max() / xs.min() > 10:
                    ax.set_xscale("log")
                ax.set_xlabel(xlabel or "")
            else:
                pos = np.arange(len(labels))
                ax.bar(pos, np.nan_to_num(y, nan=0.0), width=0.65, color="#0072B2")
                ax.set_xticks(pos, list(labels), rotation=45, ha="right", fontsize=6)
                ax.set_xlabel(xlabel or "job")
            ax.set_title(metric)
            ax.grid(True, linewidth=0.4, alpha=0.5)
        return _save(fig, stem, formats)
