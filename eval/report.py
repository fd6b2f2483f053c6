"""The evaluation report: every method of the cycle, per resolution, on held-out faces or LFW pairs.

    from eval.report import evaluate
    flat = evaluate(cfg, out_dir, resolutions=["16", "24", "32"])

The parts, each in its module: the compared methods (``eval.methods``), the faces and pairs
(``eval.testset``), models and embeddings of one resolution (``eval.extract``), the metrics of one
method (``eval.scoring``), report.md (``eval.render``) and the figures (``eval.figures``). This module
runs them for each resolution and writes the outputs.

Outputs in ``out_dir``: results.json ``{"<res>": {"<method>": {metric: value}}, "config", "artifacts",
"skipped", "notes", "regressions", "protocol"}`` (NaN as null), report.md and figures/. Previous
outputs there are moved to ``history/<time>/``, never overwritten.

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
from cycle.files import HISTORY, move_aside
from cycle.training import resolve_device
from eval import figures
from eval.errors import EvaluationError
from eval.extract import _at_res, _extract, _Extraction, _load, _Models
from eval.methods import METHODS, PRETRAINED, Method
from eval.metrics import sampling_noise
from eval.render import ACROSS, ACROSS_KEY, regressions, render_markdown
from eval.scoring import score_method
from eval.testset import Protocol, build_protocol, lfw_faces

log = logging.getLogger(__name__)

__all__ = ["METHODS", "Method", "EvaluationError", "evaluate", "score_method", "render_markdown",
           "regressions", "lfw_faces"]

# Metrics in the flat dict evaluate() returns (plus every tar@far=...); results.json has them all.
HEADLINE = ("psnr", "ssim", "auc", "eer", "accuracy", "rank1", "rank5", "d_prime", "genuine_mean", "impostor_mean")
COLLAPSE_GAP = 0.05  # genuine - impostor mean cosine below this: embeddings may have collapsed


def _sample_indices(labels: np.ndarray, n: int) -> np.ndarray:
    """First image of each of the first n identities: the grid shows n different people."""
    return np.sort(np.unique(labels, return_index=True)[1])[:n]


def _evaluate_resolution(cfg: DictConfig, res: str, proto: Protocol, device, fig_dir: Path | None) -> dict:
    cfg_r = _at_res(cfg, res)
    ev = cfg.eval
    store = ArtifactStore(cfg.paths.artifacts_dir, res)
    models = _Models()
    runnable, skipped = [], {}
    for m in METHODS:
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
    out = {"metrics": {}, "skipped": skipped, "manifests": models.manifests, "notes": [], "figures": []}
    if not runnable:
        return out
    t0 = time.perf_counter()
    sample_idx = _sample_indices(proto.faces.labels, int(ev.num_samples))
    ext = _extract(cfg_r, int(res), proto.faces, runnable, models, device, sample_idx)
    log.info("res=%s: embedded %d faces for %d methods in %.1f s", res, len(proto.faces), len(runnable),
             time.perf_counter() - t0)
    curves, notes = {}, {}
    for m in runnable:
        metrics, curves[m.name] = score_method(
            ext.emb[m.name], ext.hr_emb[m.edgeface], proto.faces.labels, proto.idx_a, proto.idx_b, proto.is_same,
            fold_ids=proto.fold, gallery_idx=proto.gallery, probe_idx=proto.probes, pair_mode=str(ev.pair_mode),
            gallery=str(ev.gallery), folds=int(ev.folds), fars=[float(f) for f in ev.fars],
            ranks=[int(r) for r in ev.ranks])
        for note in metrics.pop("notes"):
            notes.setdefault(note, []).append(m.name)
        if m.source != "hr":
            p, s = ext.quality[m.source]
            metrics = {"psnr": float(np.mean(p)), "ssim": float(np.mean(s)), **metrics}
            if metrics["genuine_mean"] - metrics["impostor_mean"] < COLLAPSE_GAP:
                out["notes"].append(
                    f"res {res}, {m.name}: genuine and impostor mean cosine are close "
                    f"({metrics['genuine_mean']:.3f} vs {metrics['impostor_mean']:.3f}): the embeddings may "
                    "have collapsed; check the fine-tuning (lower the LR or the margin, fewer epochs)")
        out["metrics"][m.name] = metrics
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
    quality = {m.name: ext.quality[m.source] for m in methods if m.source in ext.quality}
    if quality:
        made += figures.quality_bars(quality, Path(f"{stem}_quality"), f"Image quality vs HR, {tag}", formats)
    if ext.samples:
        cols = [(f"VLR {res}px", ext.samples["vlr"])]
        sources = {m.source: m.name for m in reversed(METHODS) if m.source != "hr"}  # first method per image
        cols += [(sources[src], ext.samples[src]) for src in reversed(sources) if src in ext.samples]
        cols.append(("HR", ext.samples["hr"]))
        made += figures.sample_grid(cols, Path(f"{stem}_samples"), f"Samples, {tag}", formats)
    return [p.name for p in made]


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
    known = FigureCanvasBase.get_supported_filetypes()
    bad = [f for f in ev.figure_formats if str(f) not in known]
    if bad:
        raise EvaluationError(f"eval.figure_formats: {bad} not supported; use any of {', '.join(sorted(known))}")


def evaluate(cfg: DictConfig, out_dir: str | Path, resolutions: Sequence | None = None) -> dict[str, float]:
    """Evaluate every available method at each resolution; write results.json, report.md, figures/.

    resolutions: e.g. ["16", "24"]; None = cfg.eval.resolutions, else [cfg.res]. Raises
    EvaluationError when the protocol cannot run (e.g. fewer than 2 identities) or no method at any
    resolution could be evaluated (after writing the report that lists why).
    """
    out_dir = Path(out_dir)
    res_list = _resolutions(cfg, resolutions)
    _check_settings(cfg.eval)
    device = resolve_device(cfg.device)
    proto = build_protocol(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    _archive_previous(out_dir)
    fig_dir = out_dir / "figures" if cfg.eval.get("figures", True) else None
    results: dict[str, Any] = {}
    extra = {"config": _config(cfg), "protocol": proto.info, "artifacts": {}, "skipped": {}, "regressions": {},
             "figures": {}, "notes": list(proto.notes)}
    for res in res_list:
        r = _evaluate_resolution(cfg, res, proto, device, fig_dir)
        results[res] = r["metrics"]
        extra["artifacts"][res] = r["manifests"]
        extra["skipped"][res] = r["skipped"]
        extra["regressions"][res] = regressions(r["metrics"])
        extra["figures"][res] = r["figures"]
        extra["notes"] += list(dict.fromkeys(r["notes"]))
        # the report lists every regression; the log warns only about those beyond the sampling noise
        noise = sampling_noise(proto.info.get("num_pairs") or 1)
        loud = set(regressions(r["metrics"], noise=noise))
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
                if (k in HEADLINE or k.startswith("tar@far=")) and v is not None and math.isfinite(v):
                    flat[f"{prefix}{method}/{k}"] = float(v)
    return flat
