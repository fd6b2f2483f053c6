"""The evaluation report: every method of the cycle, per resolution, on held-out faces or LFW pairs.

    from eval.report import evaluate
    flat = evaluate(cfg, out_dir, resolutions=["16", "24", "32"])

The parts, each in its module: the compared methods (``eval.methods``), the faces and pairs
(``eval.testset``), models and embeddings of one resolution (``eval.extract``), the metrics of one
method (``eval.scoring``), report.md (``eval.render``) and the figures (``eval.figures``). This module
runs them for each resolution and writes the outputs.

Outputs in ``out_dir``: results.json ``{"<res>": {"<method>": {metric: value, "<metric>_ci95": [low, high]}},
"comparisons", "best", "config", "artifacts", "skipped", "notes", "regressions", "protocol"}`` (NaN as null),
report.md and figures/. Previous outputs there are moved to ``history/<time>/``, never overwritten.

Intervals: ``eval.bootstrap`` resamples of the test identities (one seeded count matrix for every method
and resolution, so differences are paired). ``comparisons[res]["<later> vs <earlier>"]
[metric]`` = {diff, ci95, verdict} for the stage pairs of ``eval.render.COMPARISONS``; ``best[res][metric]``
names the best VLR method (``tied``: methods with identical values in every resample, e.g. one DSR's PSNR
under two EdgeFaces) and whether its paired difference to every other excludes zero (``bold``).
With ``eval.bins`` (insightface .bin sets) also ``"bins": {"<file stem>": {"<res>": {"<method>": {metric: value}}}}``
and ``"bins_protocol": {"<file stem>": {...}}``.

Returns the flat dict that ``stage=cycle`` logs as its final metrics: the headline metrics (``HEADLINE``
and every ``tar@far=...``) of every evaluated method, keyed ``"<method>/<metric>"`` (e.g. ``cyclic/auc``)
for one resolution and ``"res<r>/<method>/<metric>"`` for several; finite values only.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from omegaconf import DictConfig, OmegaConf

from cycle.artifacts import ArtifactStore
from cycle.config import check_res, to_plain
from cycle.degrade import DEFAULTS as DEGRADATION_DEFAULTS
from cycle.degrade import DOWN_KERNELS, UPSAMPLE_KERNEL
from cycle.files import HISTORY, move_aside
from cycle.device import resolve_device
from eval import figures
from eval.bins import bin_protocol, load_bin
from eval.bootstrap import CI_SUFFIX, identity_resamples, interval, paired_difference, weighted_means, weights_for
from eval.errors import EvaluationError
from eval.extract import QUALITY_KEYS, _at_res, _extract, _Extraction, _load, _Models
from eval.judge import JUDGE_DESCRIPTION, JudgeUnavailable, build_judge
from eval.leakage import check_overlap
from eval.methods import METHODS, PRETRAINED, Method, default_methods
from eval.metrics import sampling_noise
from eval.render import (
    ACROSS,
    ACROSS_KEY,
    COLUMNS,
    COMPARED_METRICS,
    COMPARISONS,
    JUDGE_KEYS,
    regressions,
    render_markdown,
)
from eval.scoring import score_method
from eval.testset import Protocol, build_protocol, lfw_faces

log = logging.getLogger(__name__)

__all__ = ["METHODS", "Method", "EvaluationError", "evaluate", "score_method", "render_markdown",
           "regressions", "lfw_faces"]

# Metrics in the flat dict evaluate() returns (plus every tar@far=...); results.json has them all.
HEADLINE = ("psnr", "ssim", "psnr_y", "ssim_y", "auc", "eer", "accuracy", "rank1", "rank5", "d_prime", "genuine_mean",
            "impostor_mean")
COLLAPSE_GAP = 0.05  # genuine - impostor mean cosine below this: embeddings may have collapsed


def _sample_indices(labels: np.ndarray, n: int) -> np.ndarray:
    """First image of each of the first n identities: the grid shows n different people."""
    return np.sort(np.unique(labels, return_index=True)[1])[:n]


def _comparisons(table: dict[str, dict], samples: dict[str, dict]) -> tuple[dict, dict]:
    """Paired bootstrap differences: each stage against the one it should beat, and the best per column."""
    signs = {c[0]: c[3] for c in COLUMNS}
    pairs: dict[str, dict] = {}
    for later, earlier in COMPARISONS:
        if later in table and earlier in table:
            entry = {}
            for metric in COMPARED_METRICS:
                if metric in samples[later] and metric in samples[earlier]:
                    d = paired_difference(samples[later][metric], samples[earlier][metric], table[later][metric],
                                          table[earlier][metric], signs[metric] > 0)
                    if d is not None:
                        entry[metric] = d
            pairs[f"{later} vs {earlier}"] = entry
    best: dict[str, dict] = {}
    for metric, sign in signs.items():
        vals = {m: v[metric] for m, v in table.items() if m != "hr" and metric in samples[m]
                and isinstance(v.get(metric), float) and math.isfinite(v[metric])}
        if len(vals) < 2 or not sign:
            continue
        top = (max if sign > 0 else min)(vals, key=vals.get)
        tied = [m for m in vals if m != top and np.array_equal(samples[m][metric], samples[top][metric])
                and vals[m] == vals[top]]
        # the weakest comparison decides: the best must beat every other VLR method, not just the runner-up
        diffs = {m: paired_difference(samples[top][metric], samples[m][metric], vals[top], vals[m], sign > 0)
                 for m in vals if m != top and m not in tied}
        diffs = {m: d for m, d in diffs.items() if d is not None}
        if diffs:
            vs = min(diffs, key=lambda m: sign * diffs[m]["ci95"][0 if sign > 0 else 1])
            best[metric] = {"method": top, "tied": tied, "bold": all(d["verdict"] == "better" for d in diffs.values()),
                            "vs": vs, **diffs[vs]}
    return pairs, best


def _evaluate_resolution(cfg: DictConfig, res: str, proto: Protocol, device, fig_dir: Path | None,
                         resamples: np.ndarray | None, methods: Sequence[str] | None = None, judge=None) -> dict:
    cfg_r = _at_res(cfg, res)
    ev = cfg.eval
    store = ArtifactStore.for_config(cfg_r)
    models = _Models()
    runnable, skipped = [], {}
    chosen = [m for m in METHODS if m.name in methods] if methods is not None else default_methods(cfg_r, store)
    for m in chosen:
        if m.dsr:
            _load("dsr", m.dsr, cfg_r, store, device, models)
        if m.dsr not in models.failed:  # no DSR, no need for its EdgeFace: the reason names the DSR
            _load("edgeface", m.edgeface, cfg_r, store, device, models)
        reasons = [f"{k}: {models.failed[k]}" for k in (m.dsr, m.edgeface or PRETRAINED) if k in models.failed]
        if reasons:
            skipped[m.name] = "; ".join(reasons)
        else:
            runnable.append(m)
    for name, why in skipped.items():
        log.warning("res=%s: method %s skipped (%s)", res, name, why)
    out = {"metrics": {}, "skipped": skipped, "manifests": models.manifests, "notes": [], "figures": [],
           "comparisons": {}, "best": {}}
    if not runnable:
        return out
    leaks = check_overlap(cfg_r, res, store, runnable, list(proto.faces.identities), out["notes"])
    t0 = time.perf_counter()
    sample_idx = _sample_indices(proto.faces.labels, int(ev.num_samples))
    ext = _extract(cfg_r, int(res), proto.faces, runnable, models, device, sample_idx, judge=judge)
    log.info("res=%s: embedded %d faces for %d methods in %.1f s", res, len(proto.faces), len(runnable),
             time.perf_counter() - t0)
    curves, notes, samples = {}, {}, {}
    image_w = None if resamples is None else weights_for(resamples, proto.identity)
    for m in runnable:
        metrics, curves[m.name] = score_method(
            ext.emb[m.name], ext.hr_emb[m.edgeface], proto.faces.labels, proto.idx_a, proto.idx_b, proto.is_same,
            fold_ids=proto.fold, gallery_idx=proto.gallery, probe_idx=proto.probes, pair_mode=str(ev.pair_mode),
            gallery=str(ev.gallery), folds=int(ev.folds), fars=[float(f) for f in ev.fars],
            ranks=[int(r) for r in ev.ranks], resamples=resamples)
        samples[m.name] = curves[m.name].pop("bootstrap", {})
        for note in metrics.pop("notes"):
            notes.setdefault(note, []).append(m.name)
        if m.source != "hr":
            q = ext.quality[m.source]
            quality = {k: float(np.mean(q[k])) for k in QUALITY_KEYS}
            if image_w is not None:
                for k in QUALITY_KEYS:
                    samples[m.name][k] = weighted_means(q[k], image_w)
                    quality[k + CI_SUFFIX] = interval(samples[m.name][k])
            metrics = {**quality, **metrics}
            if metrics["genuine_mean"] - metrics["impostor_mean"] < COLLAPSE_GAP:
                out["notes"].append(
                    f"res {res}, {m.name}: genuine and impostor mean cosine are close "
                    f"({metrics['genuine_mean']:.3f} vs {metrics['impostor_mean']:.3f}): the embeddings may "
                    "have collapsed; check the fine-tuning (lower the LR or the margin, fewer epochs)")
        if ext.judge:  # the independent judge sees only the images: its own embeddings of probe and HR gallery
            judged, judge_curves = score_method(
                ext.judge[m.source], ext.judge["hr"], proto.faces.labels, proto.idx_a, proto.idx_b, proto.is_same,
                fold_ids=proto.fold, gallery_idx=proto.gallery, probe_idx=proto.probes,
                pair_mode=str(ev.pair_mode), gallery=str(ev.gallery), folds=int(ev.folds),
                fars=[float(f) for f in ev.fars], ranks=[int(r) for r in ev.ranks], resamples=resamples)
            for k in JUDGE_KEYS:
                for suffix in ("", CI_SUFFIX):
                    if k + suffix in judged:
                        metrics[f"judge_{k}{suffix}"] = judged[k + suffix]
                if k in judge_curves.get("bootstrap", {}):  # paired differences on the judge's columns too
                    samples[m.name][f"judge_{k}"] = judge_curves["bootstrap"][k]
        if m.name in leaks:
            metrics["overlap_identities"] = leaks[m.name]
        out["metrics"][m.name] = metrics
    if resamples is not None:
        out["comparisons"], out["best"] = _comparisons(out["metrics"], samples)
    out["notes"] += [f"res {res}: {note} ({', '.join(ms)})" for note, ms in notes.items()]
    if fig_dir is not None:
        try:
            out["figures"] = _figures(res, runnable, curves, ext, fig_dir, list(ev.figure_formats))
        except Exception as e:  # a plotting failure must not cost the metrics: say so in the report
            log.exception("res=%s: figures failed", res)
            out["notes"].append(f"res {res}: figures failed: {type(e).__name__}: {e}")
    return out


def _figures(res: str, methods: list[Method], curves: dict, ext: _Extraction, fig_dir: Path,
             formats: list[str]) -> list[str]:
    stem = fig_dir / f"res{res}"
    tag = f"{res}x{res} px"
    made = []
    made += figures.roc({m: (c["far"], c["tar"]) for m, c in curves.items()}, Path(f"{stem}_roc"),
                        f"ROC, {tag}", formats)
    cmc = {m: c["cmc"] for m, c in curves.items() if "cmc" in c}
    if cmc:
        made += figures.cmc(cmc, Path(f"{stem}_cmc"), f"CMC, {tag}", formats)
    made += figures.score_histograms({m: (c["genuine"], c["impostor"]) for m, c in curves.items()},
                                     Path(f"{stem}_scores"), f"Genuine / impostor cosine scores, {tag}", formats)
    quality = {m.name: (ext.quality[m.source]["psnr"], ext.quality[m.source]["ssim"]) for m in methods
               if m.source in ext.quality}
    if quality:
        made += figures.quality_bars(quality, Path(f"{stem}_quality"), f"Image quality vs HR, {tag}", formats)
    if ext.samples:
        cols = [(f"VLR {res}px", ext.samples["vlr"])]
        sources = {m.source: m.name for m in reversed(METHODS) if m.source != "hr"}  # first method per image
        cols += [(sources[src], ext.samples[src]) for src in reversed(sources) if src in ext.samples]
        cols.append(("HR", ext.samples["hr"]))
        made += figures.sample_grid(cols, Path(f"{stem}_samples"), f"Samples, {tag}", formats)
    return [p.name for p in made]


def _quality_conventions(cfg: DictConfig) -> dict:
    """How PSNR/SSIM are measured, in words: the numbers of the literature differ by these choices."""
    down = str((cfg.get("degradation") or {}).get("down") or DEGRADATION_DEFAULTS["down"])
    return {"channels": "RGB (psnr, ssim) and Y (psnr_y, ssim_y)",
            "y": "ITU-R BT.601 studio swing as BasicSR/MATLAB rgb2ycbcr: Y = 16 + 65.481 R + 128.553 G + 24.966 B "
                 "on [0, 1] RGB, in [16, 235] / 255, metrics with data range 1",
            "crop_border": int(cfg.eval.get("crop_border") or 0),
            "ssim": "Gaussian window sigma 1.5 (11x11), K1 0.01, K2 0.03, valid region, mean over channels",
            "aggregate": "per image, then the mean over images",
            "down_kernel": DOWN_KERNELS.get(down, down), "bicubic_kernel": UPSAMPLE_KERNEL}


def _evaluate_bins(cfg: DictConfig, res_list: list[str], device, notes: list[str], methods=None,
                   judge=None) -> tuple[dict, dict]:
    """Every method on each insightface .bin set (``eval.bins``), per resolution: {stem: {res: {method: metrics}}}."""
    ev, table, infos = cfg.eval, {}, {}
    for path in ev.bins:
        proto = bin_protocol(str(path), int(cfg.data.get("image_size") or 112), int(ev.folds), bool(ev.allow_missing))
        stem = Path(str(path)).stem
        infos[stem], table[stem] = proto.info, {}
        notes += proto.notes
        for res in res_list:
            # no bootstrap: a .bin has no identity labels to resample (its pairs are not independent)
            r = _evaluate_resolution(cfg, res, proto, device, None, None, methods, judge)
            table[stem][res] = r["metrics"]
            notes += [f"{stem}: {n}" for n in r["notes"]]
            log.info("%s res=%s: %s", stem, res, ", ".join(f"{m} accuracy {v['accuracy']:.4f}"
                                                           for m, v in r["metrics"].items()))
    return table, infos


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None  # strict JSON has no NaN/inf
    return obj


def _config(cfg: DictConfig) -> dict:
    try:
        return to_plain(cfg)
    except Exception:  # an unresolvable optional key must not cost the report
        return OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)


def _archive_previous(out_dir: Path) -> None:
    olds = [p for p in (out_dir / "results.json", out_dir / "report.md", out_dir / "figures") if p.exists()]
    if olds:  # stamped with the time the previous evaluation was written
        move_aside(olds, out_dir / HISTORY, stamp=time.strftime("%Y%m%d-%H%M%S",
                                                                time.localtime(olds[0].stat().st_mtime)))


def _resolutions(cfg: DictConfig, resolutions) -> list[str]:
    if resolutions is None:
        resolutions = cfg.eval.get("resolutions") or [cfg.res]
    out = []
    for r in resolutions:
        try:
            key = check_res(r)
        except ValueError as e:
            raise EvaluationError(str(e)) from None
        if key not in out:
            out.append(key)
    return out


def _check_settings(ev: DictConfig) -> None:
    """Fail on a bad eval.* value before any data or model is loaded."""
    from matplotlib.backend_bases import FigureCanvasBase

    if ev.pair_mode not in ("sr_hr", "sr_sr"):
        raise EvaluationError(f"eval.pair_mode={ev.pair_mode!r} must be sr_hr or sr_sr")
    if ev.gallery not in ("hr", "sr"):
        raise EvaluationError(f"eval.gallery={ev.gallery!r} must be hr or sr")
    if int(ev.folds) < 2:
        raise EvaluationError(f"eval.folds={ev.folds} must be >= 2")
    if int(ev.num_pairs) < 2 or int(ev.batch_size) < 1 or int(ev.num_samples) < 0:
        raise EvaluationError("eval.num_pairs must be >= 2, eval.batch_size >= 1, eval.num_samples >= 0")
    if int(ev.get("crop_border") or 0) < 0:
        raise EvaluationError(f"eval.crop_border={ev.crop_border} must be >= 0 (pixels cropped from each border)")
    boot = int(ev.get("bootstrap") or 0)
    if 0 < boot < 1000:
        raise EvaluationError(f"eval.bootstrap={boot}: use >= 1000 resamples for a 95 % interval, or 0 for none")
    for b in ev.get("bins") or []:
        if not Path(str(b)).expanduser().is_file():
            raise EvaluationError(f"eval.bins: {b} not found (pass the insightface .bin files, e.g. "
                                  "eval.bins=[/data/lfw.bin,/data/cfp_fp.bin])")
    stems = [Path(str(b)).stem for b in ev.get("bins") or []]
    if len(set(stems)) < len(stems):
        raise EvaluationError(f"eval.bins: two files share a name ({stems}); results are keyed by file name")
    known = FigureCanvasBase.get_supported_filetypes()
    bad = [f for f in ev.figure_formats if str(f) not in known]
    if bad:
        raise EvaluationError(f"eval.figure_formats: {bad} not supported; use any of {', '.join(sorted(known))}")


def evaluate(cfg: DictConfig, out_dir: str | Path, resolutions: Sequence | None = None,
             methods: Sequence[str] | None = None) -> dict[str, float]:
    """Evaluate every available method at each resolution; write results.json, report.md, figures/.

    methods: the method names to score (`stage=cycle` passes those of its own plan); None = the methods of
    the cycles this configuration runs (`default_methods`). Every evaluated artifact's lineage must be
    disjoint from the evaluated identities (`eval.leakage`).

    resolutions: e.g. ["16", "24"]; None = cfg.eval.resolutions, else [cfg.res]. Raises
    EvaluationError when the protocol cannot run (e.g. fewer than 2 identities) or no method at any
    resolution could be evaluated (after writing the report that lists why).
    """
    out_dir = Path(out_dir)
    res_list = _resolutions(cfg, resolutions)
    _check_settings(cfg.eval)
    try:
        judge = build_judge(cfg.eval.get("judge"))  # a missing extra fails before any work
    except JudgeUnavailable as e:
        raise EvaluationError(str(e)) from None
    device = resolve_device(cfg.device)
    for path in cfg.eval.get("bins") or []:
        load_bin(str(path))  # a malformed or unsafe .bin fails now, not after the main evaluation
    proto = build_protocol(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    _archive_previous(out_dir)
    fig_dir = out_dir / "figures" if cfg.eval.get("figures", True) else None
    results: dict[str, Any] = {}
    boot = int(cfg.eval.get("bootstrap") or 0)
    # one count matrix for every method and resolution: the differences between methods are paired
    resamples = identity_resamples(int(proto.identity.max()) + 1, boot, int(cfg.eval.seed)) if boot else None
    extra = {"config": _config(cfg), "protocol": {**proto.info, "quality": _quality_conventions(cfg), "bootstrap": {
        "resamples": boot, "over": "identities", "seed": int(cfg.eval.seed), "interval": "percentile, 95 %"}},
             "artifacts": {}, "skipped": {}, "comparisons": {}, "best": {}, "regressions": {}, "figures": {},
             "notes": list(proto.notes)}
    if judge is not None:
        extra["protocol"]["judge"] = JUDGE_DESCRIPTION
    for res in res_list:
        r = _evaluate_resolution(cfg, res, proto, device, fig_dir, resamples, methods, judge)
        results[res] = r["metrics"]
        extra["artifacts"][res] = r["manifests"]
        extra["skipped"][res] = r["skipped"]
        extra["comparisons"][res] = r["comparisons"]
        extra["best"][res] = r["best"]
        extra["regressions"][res] = regressions(r["metrics"], r["comparisons"])
        extra["figures"][res] = r["figures"]
        extra["notes"] += list(dict.fromkeys(r["notes"]))
        # the report lists every regression; the log warns only about those beyond the noise: the paired
        # bootstrap's verdict, or without intervals (eval.bootstrap=0) the sampling noise of the pairs
        noise = sampling_noise(proto.info.get("num_pairs") or 1)
        loud = set(extra["regressions"][res]) if r["comparisons"] else set(regressions(r["metrics"], noise=noise))
        for line in extra["regressions"][res]:
            if line in loud:
                log.warning("res=%s: %s", res, line)
            else:
                log.info("res=%s: %s (within the sampling noise, %.3f)", res, line, noise)
    if fig_dir is not None and len(res_list) > 1:  # the same methods across resolutions, one line each
        try:
            made = figures.resolution_summary({r: results[r] for r in res_list if results[r]}, ACROSS,
                                              fig_dir / "resolutions", list(cfg.eval.figure_formats))
            extra["figures"][ACROSS_KEY] = [p.name for p in made]
        except Exception as e:  # a plotting failure must not cost the metrics
            log.exception("cross-resolution figure failed")
            extra["notes"].append(f"cross-resolution figure failed: {type(e).__name__}: {e}")
    if cfg.eval.get("bins"):
        extra["bins"], extra["bins_protocol"] = _evaluate_bins(cfg, res_list, device, extra["notes"], methods, judge)
    results.update(extra)
    results = _jsonable(results)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / "report.md").write_text(render_markdown(results))
    log.info("evaluation report: %s", out_dir / "report.md")
    if not any(results[res] for res in res_list):
        raise EvaluationError(f"no method could be evaluated at res {', '.join(res_list)}: "
                              f"{out_dir / 'report.md'} lists the missing artifacts; run the training first "
                              "(python train.py stage=cycle res=...)")
    flat = {}
    for res in res_list:
        prefix = "" if len(res_list) == 1 else f"res{res}/"
        for method, metrics in results[res].items():
            for k, v in metrics.items():
                headline = k in HEADLINE or (k.startswith("tar@far=") and not k.endswith(CI_SUFFIX))
                if headline and v is not None and math.isfinite(v):
                    flat[f"{prefix}{method}/{k}"] = float(v)
    return flat
