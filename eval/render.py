"""report.md from a results.json dict: the table columns, the regressions between stages, the protocol text.

``render_markdown`` needs nothing but the dict, so a report can be re-rendered from its results.json.
"""
from __future__ import annotations

import math

from eval.methods import METHODS
from eval.metrics import sampling_noise

__all__ = ["ACROSS", "COLUMNS", "COMPARISONS", "REGRESSION_METRICS", "regressions", "render_markdown"]

# Table columns: (metric, header, format, +1 higher is better / -1 lower is better / 0 not ranked).
COLUMNS = (
    ("psnr", "PSNR (dB)", ".2f", 1), ("ssim", "SSIM", ".4f", 1), ("auc", "AUC", ".4f", 1),
    ("eer", "EER", ".4f", -1), ("tar@far=1e-3", "TAR@FAR=1e-3", ".4f", 1),
    ("tar@far=1e-2", "TAR@FAR=1e-2", ".4f", 1), ("accuracy", "accuracy", ".4f", 1),
    ("rank1", "rank-1", ".4f", 1), ("rank5", "rank-5", ".4f", 1), ("d_prime", "d'", ".2f", 1),
    ("genuine_mean", "genuine mean", ".3f", 0), ("impostor_mean", "impostor mean", ".3f", 0),
)
# Later stage vs the earlier one it should beat; a stage that loses is stated plainly in the report.
COMPARISONS = (("initial", "bicubic"), ("initial_ft", "initial"), ("cyclic", "initial"),
               ("cyclic", "initial_ft"), ("cyclic2", "cyclic"))
REGRESSION_METRICS = ("auc", "eer", "tar@far=1e-2", "accuracy", "rank1", "psnr", "ssim")
# The cross-resolution table and figure (several resolutions in one report): these metrics per method.
ACROSS = ("psnr", "auc", "tar@far=1e-2", "rank1")
ACROSS_KEY = "resolutions"  # its entry in results["figures"]
IMAGE_METRICS = ("psnr", "ssim")  # per-image averages: not subject to the pairs' sampling noise


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def regressions(table: dict[str, dict], noise: float = 0.0) -> list[str]:
    """Plain statements where a later stage is worse than the one it should improve on; with `noise`
    (``sampling_noise`` of the pairs), only verification differences larger than it."""
    out = []
    spec = {c[0]: c for c in COLUMNS}
    for later, earlier in COMPARISONS:
        if later not in table or earlier not in table:
            continue
        for metric in REGRESSION_METRICS:
            a, b = table[later].get(metric), table[earlier].get(metric)
            if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
                continue
            _, header, fmt, sign = spec[metric]
            margin = 0.0 if metric in IMAGE_METRICS else noise
            if sign * (a - b) < -margin and format(a, fmt) != format(b, fmt):
                out.append(f"{later} is worse than {earlier} on {header} ({format(a, fmt)} vs {format(b, fmt)})")
    return out


def _protocol_text(results: dict) -> list[str]:
    cfg, info = results.get("config") or {}, results.get("protocol") or {}
    ev = cfg.get("eval", {})
    if info.get("kind") == "lfw":
        lines = [f"- Pairs: LFW-format `{info['pairs_file']}` (images under `{info['root']}`): "
                 f"{info['num_pairs']} pairs ({info['num_genuine']} genuine) of {info['num_identities']} "
                 f"identities; accuracy over its {info['num_folds']} folds, each threshold chosen on the other "
                 "folds only."]
        if info.get("num_dropped"):
            lines.append(f"- {info['num_dropped']} pairs dropped for missing/unreadable images "
                         "(eval.allow_missing=true).")
    else:
        lines = [f"- Pairs: {info.get('num_pairs')} balanced pairs ({info.get('num_genuine')} genuine) among the "
                 f"{info.get('num_identities')} held-out `{info.get('split')}` identities ({info.get('num_images')} "
                 f"images, seed {info.get('seed')}); accuracy: {ev.get('folds')}-fold, each threshold chosen on "
                 "the other folds only."]
    mode = ev.get("pair_mode", "sr_hr")
    lines.append("- Pairs compare " + ("the method's image (probe) with the HR image (gallery), the deployment "
                                       "setting" if mode == "sr_hr" else "two images of the same method")
                 + f" (eval.pair_mode={mode}); cosine similarity of the method's EdgeFace embeddings.")
    lines.append(f"- Identification: closed set, one {ev.get('gallery', 'hr').upper()} gallery image per identity, "
                 "all other images are probes (a probe's own image is never in the gallery).")
    d = cfg.get("degradation") or {}
    lines.append(f"- VLR = degradation of HR: down={d.get('down')}, blur_sigma={d.get('blur_sigma')}, "
                 f"noise_std={d.get('noise_std')}, jpeg_quality={d.get('jpeg_quality')}. PSNR/SSIM: RGB in "
                 "[0, 1] against the HR image, per image then averaged.")
    return lines


def _across(results: dict, res_keys: list[str]) -> list[str]:
    """One table: a row per method, a column per (metric, resolution)."""
    spec = {c[0]: c for c in COLUMNS}
    methods = list(dict.fromkeys(m for r in res_keys for m in results[r]))
    lines = ["", "## Across resolutions", "",
             "| method | " + " | ".join(f"{spec[m][1]} @{r}" for m in ACROSS for r in res_keys) + " |",
             "|---|" + "---:|" * (len(ACROSS) * len(res_keys))]
    for method in methods:
        cells = [_fmt(results[r].get(method, {}).get(m), spec[m][2]) if m in results[r].get(method, {}) else "-"
                 for m in ACROSS for r in res_keys]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    figs = (results.get("figures") or {}).get(ACROSS_KEY, [])
    lines += [""] + [f"![{f}](figures/{f})" for f in figs if f.endswith(".png")]
    return lines


def render_markdown(results: dict) -> str:
    """report.md from a results.json dict (so a report can be re-rendered from its results)."""
    res_keys = [k for k in results if k.isdigit()]
    lines = ["# Very-low-resolution face recognition: evaluation report", ""]
    lines += _protocol_text(results)
    lines += ["", "Methods:", ""]
    lines += [f"- `{m.name}`: {m.description}" for m in METHODS]
    for res in res_keys:
        table = results[res]
        lines += ["", f"## {res}x{res} px", ""]
        if table:
            lines.append("| method | " + " | ".join(c[1] for c in COLUMNS) + " |")
            lines.append("|---|" + "---:|" * len(COLUMNS))
            best = {}
            for metric, _, fmt, sign in COLUMNS:
                vals = [(m, v[metric]) for m, v in table.items()
                        if m != "hr" and isinstance(v.get(metric), (int, float)) and math.isfinite(v[metric])]
                if sign and vals:
                    best[metric] = format((max if sign > 0 else min)(v for _, v in vals), fmt)
            for m, v in table.items():
                cells = []
                for metric, _, fmt, _ in COLUMNS:
                    cell = _fmt(v.get(metric), fmt) if metric in v else "-"
                    if m != "hr" and cell == best.get(metric):
                        cell = f"**{cell}**"
                    cells.append(cell)
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
            lines += ["", "Bold: best per column among the VLR methods (`hr` is the upper bound and not ranked); "
                      "n/a: not defined (e.g. too few impostor pairs for that FAR); -: not applicable."]
        else:
            lines.append("No method could be evaluated at this resolution.")
        skipped = results.get("skipped", {}).get(res, {})
        if skipped:
            lines += ["", "Skipped:", ""] + [f"- `{m}`: {why}" for m, why in skipped.items()]
        regs = results.get("regressions", {}).get(res, [])
        if regs:
            n = (results.get("protocol") or {}).get("num_pairs")
            lines += ["", "Regressions (any difference at the shown precision"
                      + (f"; with {n} pairs, verification differences below ~{sampling_noise(n):.3f} are within "
                         "sampling noise" if n else "") + "):", ""] + [f"- {r}" for r in regs]
        figs = results.get("figures", {}).get(res, [])
        if figs:
            lines += ["", "Figures:", ""] + [f"![{f}](figures/{f})" for f in figs if f.endswith(".png")]
            other = [f"[{f}](figures/{f})" for f in figs if not f.endswith(".png")]
            if other:
                lines += ["", "Also: " + ", ".join(other)]
    if len([r for r in res_keys if results[r]]) > 1:
        lines += _across(results, res_keys)
    notes = results.get("notes") or []
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"
