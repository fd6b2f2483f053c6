"""report.md from a results.json dict: the table columns, the regressions between stages, the protocol text.

``render_markdown`` needs nothing but the dict, so a report can be re-rendered from its results.json.
A value is bold, and a stage is said to be worse than another, only when the paired bootstrap difference
(results.json ``best`` / ``comparisons``) excludes zero; otherwise the report says "within noise".
"""
from __future__ import annotations

import math

from eval.methods import METHODS

__all__ = ["ACROSS", "COLUMNS", "COMPARISONS", "COMPARED_METRICS", "REGRESSION_METRICS", "regressions",
           "within_noise", "identity_supervision", "render_markdown"]

# Table columns: (metric, header, format, +1 higher is better / -1 lower is better / 0 not ranked).
COLUMNS = (
    ("psnr", "PSNR (dB)", ".2f", 1), ("ssim", "SSIM", ".4f", 1), ("psnr_y", "PSNR-Y (dB)", ".2f", 1),
    ("ssim_y", "SSIM-Y", ".4f", 1), ("auc", "AUC", ".4f", 1),
    ("eer", "EER", ".4f", -1), ("tar@far=1e-3", "TAR@FAR=1e-3", ".4f", 1),
    ("tar@far=1e-2", "TAR@FAR=1e-2", ".4f", 1), ("accuracy", "accuracy", ".4f", 1),
    ("rank1", "rank-1", ".4f", 1), ("rank5", "rank-5", ".4f", 1), ("d_prime", "d'", ".2f", 1),
    ("genuine_mean", "genuine mean", ".3f", 0), ("impostor_mean", "impostor mean", ".3f", 0),
    # the independent judge (eval.judge), shown only when configured
    ("judge_auc", "judge AUC", ".4f", 1), ("judge_tar@far=1e-2", "judge TAR@FAR=1e-2", ".4f", 1),
    ("judge_rank1", "judge rank-1", ".4f", 1),
)
JUDGE_KEYS = ("auc", "tar@far=1e-2", "rank1")  # what the judge columns take from its scoring
# Later stage vs the earlier one it should beat; a stage that loses is stated plainly in the report.
COMPARISONS = (("initial", "bicubic"), ("initial_ft", "initial"), ("cyclic", "initial"),
               ("cyclic", "initial_ft"), ("cyclic2", "cyclic"), ("initial", "pixel"), ("cyclic", "pixel"))
REGRESSION_METRICS = ("auc", "eer", "tar@far=1e-2", "accuracy", "rank1", "psnr", "ssim", "psnr_y", "ssim_y")
# Paired differences kept in results.json's comparisons: the regression metrics and the judge's columns.
COMPARED_METRICS = REGRESSION_METRICS + tuple(f"judge_{k}" for k in JUDGE_KEYS)
# The ablation `pixel` (cycle.ablations=[pixel]): identity-supervised DSRs against it, on these columns. The
# judge's columns decide when present: the EdgeFace columns score a DSR with the EdgeFace that supervised it.
ABLATION = "pixel"
SUPERVISED = ("initial", "cyclic")
SUPERVISION_METRICS = ("psnr", "auc", "judge_auc", "judge_rank1")
CI = "_ci95"
# The cross-resolution table and figure (several resolutions in one report): these metrics per method.
ACROSS = ("psnr", "auc", "tar@far=1e-2", "rank1")
ACROSS_KEY = "resolutions"  # its entry in results["figures"]
IMAGE_METRICS = ("psnr", "ssim", "psnr_y", "ssim_y")  # per-image averages: not subject to the pairs' sampling noise


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def _worse(table: dict[str, dict]):
    """(later, earlier, metric, header, a, b, fmt) wherever the later stage's point estimate is worse."""
    spec = {c[0]: c for c in COLUMNS}
    for later, earlier in COMPARISONS:
        if later not in table or earlier not in table:
            continue
        for metric in REGRESSION_METRICS:
            a, b = table[later].get(metric), table[earlier].get(metric)
            if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
                continue
            _, header, fmt, sign = spec[metric]
            if sign * (a - b) < 0 and format(a, fmt) != format(b, fmt):
                yield later, earlier, metric, header, a, b, fmt


def _difference(d: dict, fmt: str = "") -> str:
    lo, hi = d["ci95"]  # two significant digits: a difference can be far below the column's precision
    return f"difference {d['diff']:+.2g}, 95 % interval [{lo:.2g}, {hi:.2g}]"


def regressions(table: dict[str, dict], comparisons: dict | None = None, noise: float = 0.0) -> list[str]:
    """Plain statements where a later stage is worse than the one it should improve on.

    With ``comparisons`` (results.json's, per ``"<later> vs <earlier>"``) only where the paired bootstrap
    difference excludes zero; without (no bootstrap) wherever the shown values differ, or with `noise`
    (``sampling_noise`` of the pairs) only verification differences larger than it.
    """
    out = []
    for later, earlier, metric, header, a, b, fmt in _worse(table):
        line = f"{later} is worse than {earlier} on {header} ({format(a, fmt)} vs {format(b, fmt)})"
        if comparisons is None:
            if metric in IMAGE_METRICS or abs(a - b) > noise:
                out.append(line)
            continue
        d = (comparisons.get(f"{later} vs {earlier}") or {}).get(metric)
        if d is not None and d["verdict"] == "worse":
            out.append(f"{line[:-1]}; {_difference(d, fmt)})")
    return out


def within_noise(table: dict[str, dict], comparisons: dict) -> list[str]:
    """Where a later stage's value is worse but the paired bootstrap interval of the difference holds zero."""
    out = []
    for later, earlier, metric, header, a, b, fmt in _worse(table):
        d = (comparisons.get(f"{later} vs {earlier}") or {}).get(metric)
        if d is not None and d["verdict"] == "within noise":
            out.append(f"{later} vs {earlier} on {header}: {format(a, fmt)} vs {format(b, fmt)}, within noise "
                       f"({_difference(d, fmt)})")
    return out


def identity_supervision(table: dict[str, dict], comparisons: dict | None) -> list[str]:
    """Plain statements: did identity supervision (initial, cyclic) beat the pixel-only DSR, inside or outside
    the paired 95 % interval? Empty without the `pixel` row."""
    if ABLATION not in table:
        return []
    spec = {c[0]: c for c in COLUMNS}
    out = []
    for method in (m for m in SUPERVISED if m in table):
        diffs = (comparisons or {}).get(f"{method} vs {ABLATION}") or {}
        shown = [k for k in SUPERVISION_METRICS if isinstance(table[method].get(k), float)
                 and isinstance(table[ABLATION].get(k), float)]
        if not shown:
            continue
        decide = next((k for k in ("judge_auc", "auc") if k in shown), shown[0])
        parts = []
        for k in shown:
            _, header, fmt, sign = spec[k]
            a, b = table[method][k], table[ABLATION][k]
            d = diffs.get(k)
            if d is None:
                word = "no interval"
            elif d["verdict"] == "within noise":
                word = f"inside the interval, {_difference(d)}"
            else:
                word = f"{'better' if d['verdict'] == 'better' else 'worse'}, outside the interval, {_difference(d)}"
            parts.append(f"{header} {format(a, fmt)} vs {format(b, fmt)} ({word})")
        d = diffs.get(decide)
        header = spec[decide][1]
        if d is None:
            a, b = table[method][decide], table[ABLATION][decide]
            verdict = (f"{'beat' if spec[decide][3] * (a - b) > 0 else 'did not beat'} pixel-only on {header} "
                       "(point estimates; no intervals)")
        elif d["verdict"] == "better":
            verdict = f"beat pixel-only on {header}, outside the interval"
        elif d["verdict"] == "worse":
            verdict = f"LOST to pixel-only on {header}, outside the interval: identity supervision hurt here"
        else:
            verdict = f"did not beat pixel-only on {header}: the difference is inside the interval"
        out.append(f"Identity supervision ({method}) {verdict}. " + "; ".join(parts) + ".")
    if out and not any("judge_auc" in table[m] for m in (ABLATION, *SUPERVISED) if m in table):
        out.append("The EdgeFace columns score each DSR with the EdgeFace that supervised it, which favours the "
                   "identity-supervised DSRs; an independent recogniser (eval.judge=dlib) does not.")
    return out


def _protocol_text(results: dict) -> list[str]:
    cfg, info = results.get("config") or {}, results.get("protocol") or {}
    ev = cfg.get("eval", {})
    if info.get("kind") == "lfw":
        lines = [f"- Pairs: LFW-format `{info['pairs_file']}` (images under `{info['root']}`): "
                 f"{info['num_pairs']} pairs ({info['num_genuine']} genuine) of {info['num_identities']} "
                 "identities; "
                 + (f"accuracy over its {info['num_folds']} folds, each threshold chosen on the other folds only."
                    if info.get("num_folds", 2) > 1 else "one fold, so no k-fold accuracy.")]
        if info.get("num_dropped"):
            lines.append(f"- {info['num_dropped']} pairs dropped for missing/unreadable images "
                         "(eval.allow_missing=true).")
    else:
        lines = [f"- Pairs: {info.get('num_pairs')} balanced pairs ({info.get('num_genuine')} genuine) among the "
                 f"{info.get('num_identities')} held-out `{info.get('split')}` identities ({info.get('num_images')} "
                 f"images, seed {info.get('seed')}), drawn within {info.get('num_folds', ev.get('folds'))} "
                 "identity-disjoint folds (as LFW View 2); accuracy: each fold's threshold chosen on the other "
                 "folds only, so no test identity or image is seen when tuning it."]
    mode = ev.get("pair_mode", "sr_hr")
    lines.append("- Pairs compare " + ("the method's image (probe) with the HR image (gallery), the deployment "
                                       "setting" if mode == "sr_hr" else "two images of the same method")
                 + f" (eval.pair_mode={mode}); cosine similarity of the method's EdgeFace embeddings.")
    lines.append(f"- Identification: closed set, one {ev.get('gallery', 'hr').upper()} gallery image per identity, "
                 "all other images are probes (a probe's own image is never in the gallery).")
    d = cfg.get("degradation") or {}
    q = info.get("quality") or {}
    lines.append(f"- VLR = degradation of HR: down={d.get('down')}"
                 + (f" ({q['down_kernel']})" if q.get("down_kernel") else "")
                 + f", blur_sigma={d.get('blur_sigma')}, noise_std={d.get('noise_std')}, "
                 f"jpeg_quality={d.get('jpeg_quality')}. `bicubic` baseline: "
                 + (q.get("bicubic_kernel") or "bicubic up-sampling") + ".")
    if q:
        lines.append(f"- PSNR/SSIM against the HR image, on RGB in [0, 1] and on the Y channel ({q['y']}); "
                     f"{q['crop_border']} px cropped from each border (eval.crop_border); SSIM: {q['ssim']}; "
                     f"{q['aggregate']}.")
    b = info.get("bootstrap") or {}
    if b.get("resamples"):
        lines.append(f"- Intervals: 95 % percentile intervals from {b['resamples']} bootstrap resamples of the test "
                     f"identities (seed {b['seed']}; a pair counts as often as its probe's identity is drawn), the "
                     "same resamples for every method, so differences between methods are paired.")
    if info.get("judge"):
        lines.append(f"- Judge columns: {info['judge']}; the same pairs and gallery as the EdgeFace columns. A DSR "
                     "that only fools the fine-tuned EdgeFace gains nothing there.")
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
            columns = [c for c in COLUMNS
                       if not c[0].startswith("judge_") or any(c[0] in v for v in table.values())]
            lines.append("| method | " + " | ".join(c[1] for c in columns) + " |")
            lines.append("|---|" + "---:|" * len(columns))
            best = (results.get("best") or {}).get(res, {})
            for m, v in table.items():
                cells = []
                for metric, _, fmt, _ in columns:
                    cell = _fmt(v.get(metric), fmt) if metric in v else "-"
                    b = best.get(metric, {})
                    if b.get("bold") and m in (b["method"], *b.get("tied", ())):
                        cell = f"**{cell}**"
                    ci = v.get(metric + CI)
                    if ci:
                        cell += f" [{_fmt(ci[0], fmt)}, {_fmt(ci[1], fmt)}]"
                    cells.append(cell)
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
            lines += ["", "[low, high]: 95 % bootstrap interval over identities. Bold: the best VLR method of a column "
                      "(`hr` is the upper bound and not ranked), only where its paired bootstrap difference to every "
                      "other VLR method excludes zero. n/a: not defined (e.g. too few impostor pairs for that FAR); "
                      "-: not applicable."]
            headers = {c[0]: c for c in COLUMNS}
            noise = [f"{headers[k][1]} ({b['method']} vs {b['vs']}, {_difference(b, headers[k][2])})"
                     for k, b in best.items() if not b.get("bold") and k in headers]
            if noise:
                lines += ["", "Best value within noise (not bold): " + "; ".join(noise) + "."]
        else:
            lines.append("No method could be evaluated at this resolution.")
        skipped = results.get("skipped", {}).get(res, {})
        if skipped:
            lines += ["", "Skipped:", ""] + [f"- `{m}`: {why}" for m, why in skipped.items()]
        regs = results.get("regressions", {}).get(res, [])
        comparisons = (results.get("comparisons") or {}).get(res)
        if regs:
            why = ("paired bootstrap difference, its 95 % interval excludes zero" if comparisons
                   else "no intervals: eval.bootstrap=0")
            lines += ["", f"Regressions ({why}):", ""]
            lines += [f"- {r}" for r in regs]
        supervision = identity_supervision(table, comparisons)
        if supervision:
            lines += ["", "Does identity supervision help? (against the pixel-only ablation `pixel`)", ""]
            lines += [f"- {r}" for r in supervision]
        checks = _supervisor_checks(results, res)
        if checks:
            lines += ["", "Supervisor check (HR verification of the supervising EdgeFace on the validation "
                      "identities, before each DSR stage trained):", ""] + [f"- {c}" for c in checks]
        noise = within_noise(table, comparisons) if comparisons else []
        if noise:
            lines += ["", "Worse but within noise (the interval of the difference includes zero):", ""]
            lines += [f"- {r}" for r in noise]
        figs = results.get("figures", {}).get(res, [])
        if figs:
            lines += ["", "Figures:", ""] + [f"![{f}](figures/{f})" for f in figs if f.endswith(".png")]
            other = [f"[{f}](figures/{f})" for f in figs if not f.endswith(".png")]
            if other:
                lines += ["", "Also: " + ", ".join(other)]
    lines += _bins_section(results)
    if len([r for r in res_keys if results[r]]) > 1:
        lines += _across(results, res_keys)
    notes = results.get("notes") or []
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _supervisor_checks(results: dict, res: str) -> list[str]:
    """The supervisor check recorded in each evaluated DSR artifact's manifest (`eval.supervision`)."""
    out = []
    for artifact, manifest in ((results.get("artifacts") or {}).get(res) or {}).items():
        check = (manifest or {}).get("supervisor") if isinstance(manifest, dict) else None
        if check:
            out.append(f"`{artifact}`: {'WEAK ' if check.get('weak') else ''}{check.get('verdict')}")
    return out


BIN_COLUMNS = ("accuracy", "auc", "eer", "tar@far=1e-3", "tar@far=1e-2", "psnr", "ssim")


def _bins_section(results: dict) -> list[str]:
    """One table per insightface .bin set and resolution (eval.bins)."""
    bins, infos = results.get("bins") or {}, results.get("bins_protocol") or {}
    if not bins:
        return []
    mode = ((results.get("config") or {}).get("eval") or {}).get("pair_mode", "sr_hr")
    lines = ["", "## insightface verification sets (.bin)", "",
             "Each file's own pairs; pair i = images 2i and 2i+1. The first image of each pair is the VLR probe "
             "(degraded as above, then the method); the second is "
             + ("the HR reference" if mode == "sr_hr" else "processed by the method as well")
             + f" (eval.pair_mode={mode}). Accuracy: the insightface protocol, 10 folds of consecutive pairs, each "
             "threshold chosen on the other folds (mean +- std over folds). No identities, so no identification."]
    spec = {c[0]: c for c in COLUMNS}
    cols = [spec[m] for m in BIN_COLUMNS]  # accuracy first: the figure insightface papers quote
    for stem, per_res in bins.items():
        info = infos.get(stem, {})
        for res, table in per_res.items():
            lines += ["", f"### {stem}, {res}x{res} px ({info.get('num_pairs')} pairs, "
                      f"{info.get('num_genuine')} genuine)", ""]
            if not table:
                lines.append("No method could be evaluated.")
                continue
            lines.append("| method | " + " | ".join(c[1] for c in cols) + " |")
            lines.append("|---|" + "---:|" * len(cols))
            for m, v in table.items():
                cells = [_fmt(v.get(metric), fmt) if metric in v else "-" for metric, _, fmt, _ in cols]
                if "accuracy_std" in v:
                    cells[0] += f" +- {_fmt(v['accuracy_std'], '.4f')}"
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines
