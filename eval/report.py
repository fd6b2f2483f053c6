"""The evaluation report: every method of the cycle, per resolution, on held-out faces or LFW pairs.

    from eval.report import evaluate
    flat = evaluate(cfg, out_dir, resolutions=["16", "24", "32"])

Methods (table rows), read from the per-resolution artifacts (``cycle.artifacts``):

    hr          HR face                  + pretrained EdgeFace   (upper bound; no PSNR/SSIM)
    bicubic     bicubic(VLR)             + pretrained EdgeFace
    initial     DSR(dsr_initial)(VLR)    + pretrained EdgeFace
    initial_ft  DSR(dsr_initial)(VLR)    + EdgeFace edgeface_ft
    cyclic      DSR(dsr_cyclic)(VLR)     + EdgeFace edgeface_ft
    cyclic2     DSR(dsr_cyclic2)(VLR)    + EdgeFace edgeface_ft2

"Pretrained EdgeFace" is ``edgeface.weights`` when set, else the ``edgeface_pretrained`` artifact. A
method whose artifact is absent or does not load is skipped: results.json and report.md say why.

Protocol (``eval.*``, conf/eval/default.yaml): the VLR faces are ``cycle.degrade.degrade`` of the HR
faces (the training degradation, deterministic noise from ``eval.seed``). Each image is embedded once
per method; pairs compare the method's image (probe) with the HR image (``pair_mode=sr_hr``, the
deployment setting) or with the method's image (``sr_sr``), always through the method's EdgeFace.
Pairs are ``eval.num_pairs`` balanced pairs of the ``eval.split`` identities, or the pairs of an
LFW-format ``eval.pairs_file`` (images under ``data.root``, its own 10 folds). Identification: one
gallery image per identity (HR or the method's, ``eval.gallery``), every other image a probe.

Outputs in ``out_dir``: results.json ``{"<res>": {"<method>": {metric: value}}, "config", "artifacts",
"skipped", "notes", "regressions", "protocol"}`` (NaN as null), report.md and figures/. Previous
outputs there are moved to ``history/<time>/``, never overwritten.

Returns the flat dict that ``stage=cycle`` logs as its final metrics: the headline metrics (``HEADLINE``
and every ``tar@far=...``) of every evaluated method, keyed ``"<method>/<metric>"`` (e.g. ``cyclic/auc``)
for one resolution and ``"res<r>/<method>/<metric>"`` for several; finite values only.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from cycle.artifacts import PRODUCERS, ArtifactStore
from cycle.config import RESOLUTIONS, to_plain
from cycle.data import FaceSet, build_splits, load_image, make_loader
from cycle.degrade import upsample
from cycle.training import resolve_device
from eval import figures
from eval.metrics import identification, kfold_accuracy, pair_scores_indexed, psnr, roc, ssim, verification_metrics
from eval.protocols import balanced_pairs, identification_split, load_lfw_pairs

log = logging.getLogger(__name__)

__all__ = ["METHODS", "Method", "EvaluationError", "evaluate", "score_method", "render_markdown",
           "regressions", "lfw_faces"]


@dataclass(frozen=True)
class Method:
    name: str
    source: str              # "hr", "bicubic" or the DSR artifact that makes the probe image
    edgeface: str | None     # EdgeFace artifact; None = the pretrained EdgeFace
    description: str

    @property
    def dsr(self) -> str | None:
        return None if self.source in ("hr", "bicubic") else self.source


METHODS = (
    Method("hr", "hr", None, "HR face + pretrained EdgeFace (upper bound)"),
    Method("bicubic", "bicubic", None, "bicubic(VLR) + pretrained EdgeFace"),
    Method("initial", "dsr_initial", None, "DSR initial + pretrained EdgeFace"),
    Method("initial_ft", "dsr_initial", "edgeface_ft", "DSR initial + fine-tuned EdgeFace (edgeface_ft)"),
    Method("cyclic", "dsr_cyclic", "edgeface_ft", "DSR cyclic + fine-tuned EdgeFace (edgeface_ft)"),
    Method("cyclic2", "dsr_cyclic2", "edgeface_ft2", "DSR cyclic2 + 2nd-cycle EdgeFace (edgeface_ft2)"),
)
PRETRAINED = "edgeface_pretrained"

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
# Metrics in the flat dict evaluate() returns (plus every tar@far=...); results.json has them all.
HEADLINE = ("psnr", "ssim", "auc", "eer", "accuracy", "rank1", "rank5", "d_prime", "genuine_mean", "impostor_mean")
COLLAPSE_GAP = 0.05  # genuine - impostor mean cosine below this: embeddings may have collapsed


class EvaluationError(RuntimeError):
    """Evaluation cannot run as configured; the message says what to change."""


# ----------------------------------------------------------------------------------------------
# protocols: which faces, which pairs
# ----------------------------------------------------------------------------------------------


@dataclass
class Protocol:
    faces: FaceSet
    idx_a: np.ndarray
    idx_b: np.ndarray
    is_same: np.ndarray
    fold: np.ndarray | None            # pair folds (LFW); None = eval.folds round-robin folds
    gallery: np.ndarray | None         # identification split; None when impossible (see notes)
    probes: np.ndarray | None
    info: dict
    notes: list[str] = field(default_factory=list)


def _identification_split(labels: np.ndarray, seed: int, notes: list[str]):
    try:
        return identification_split(labels, seed)
    except ValueError as e:
        notes.append(f"identification not evaluated: {e}")
        return None, None


def _balanced_protocol(cfg: DictConfig) -> Protocol:
    ev = cfg.eval
    split = str(ev.split)
    splits = build_splits(cfg.data, cfg.paths.cache_dir)
    if split not in splits:
        raise EvaluationError(f"eval.split={split!r} is not one of {', '.join(splits)}")
    faces = splits[split]
    if faces.num_classes < 2:
        raise EvaluationError(
            f"the {split} split has {faces.num_classes} identit{'y' if faces.num_classes == 1 else 'ies'}; "
            f"verification and identification need at least 2: raise data.split.{split} or add identities")
    seed = int(ev.seed)
    try:
        ia, ib, same = balanced_pairs(faces.labels, int(ev.num_pairs), seed)
    except ValueError as e:
        raise EvaluationError(f"no verification pairs from the {split} split: {e}") from None
    notes: list[str] = []
    gallery, probes = _identification_split(faces.labels, seed, notes)
    info = {"kind": "balanced", "split": split, "num_identities": faces.num_classes, "num_images": len(faces),
            "num_pairs": int(ia.size), "num_genuine": int(same.sum()), "seed": seed}
    return Protocol(faces, ia, ib, same, None, gallery, probes, info, notes)


def lfw_faces(paths: Sequence[Path], size: int = 112, resize: str = "resize"):
    """Decode the images of a pairs file like the folder data (``cycle.data.load_image``).

    Returns (FaceSet of the readable images, labelled by identity folder name; row of each path in it,
    -1 when unreadable; {path: reason} of the unreadable ones).
    """
    images = np.zeros((len(paths), size, size, 3), np.uint8)
    bad: dict[Path, str] = {}
    for k, p in enumerate(paths):
        try:
            images[k] = load_image(p, size, resize)
        except Exception as e:  # any decoder failure = an unreadable file, reported by the caller
            bad[Path(p)] = f"{type(e).__name__}: {e}"
    ok = np.array([Path(p) not in bad for p in paths], bool)
    row = np.where(ok, np.cumsum(ok) - 1, -1)
    kept = [Path(p) for p, good in zip(paths, ok) if good]
    names = [p.parent.name for p in kept]
    identities = sorted(set(names))
    index = {n: i for i, n in enumerate(identities)}
    faces = FaceSet(images=images[ok], labels=np.array([index[n] for n in names], np.int64),
                    identities=identities, files=[f"{p.parent.name}/{p.name}" for p in kept])
    return faces, row, bad


def _lfw_protocol(cfg: DictConfig) -> Protocol:
    ev, data = cfg.eval, cfg.data
    if data.get("name") == "synthetic" or OmegaConf.is_missing(data, "root") or not data.get("root"):
        raise EvaluationError(f"eval.pairs_file={ev.pairs_file} needs the image folder of the pairs: "
                              "data=folder data.root=DIR (images at DIR/<name>/<name>_<i:04d>.<ext>)")
    root, allow = Path(str(data.root)).expanduser(), bool(ev.allow_missing)
    lp = load_lfw_pairs(str(ev.pairs_file), root, allow_missing=allow)  # MissingImagesError names the files
    faces, row, bad = lfw_faces(lp.paths, int(data.get("image_size") or 112), str(data.get("resize") or "resize"))
    notes = []
    if lp.num_dropped:
        notes.append(f"{lp.num_dropped} pairs dropped: {len(lp.missing)} missing images "
                     f"(eval.allow_missing=true), e.g. {', '.join(lp.missing[:3])}")
    # unreadable images are treated like missing ones: their pairs go, and they leave the gallery too
    hit = (row[lp.idx_a] < 0) | (row[lp.idx_b] < 0)
    if bad:
        listed = "; ".join(f"{p} ({why})" for p, why in list(bad.items())[:5])
        if not allow or hit.all():
            raise EvaluationError(f"{len(bad)} image(s) of {ev.pairs_file} could not be read: {listed}. "
                                  + ("No pair is left." if allow else
                                     "Set eval.allow_missing=true to evaluate the other pairs."))
        log.warning("%d unreadable image(s), dropping %d pairs: %s", len(bad), int(hit.sum()), listed)
        notes.append(f"{int(hit.sum())} pairs dropped: {len(bad)} unreadable images, e.g. {listed}")
    ia, ib, same, fold = row[lp.idx_a[~hit]], row[lp.idx_b[~hit]], lp.is_same[~hit], lp.fold[~hit]
    gallery, probes = _identification_split(faces.labels, int(ev.seed), notes)
    info = {"kind": "lfw", "pairs_file": str(ev.pairs_file), "root": str(root), "num_identities": faces.num_classes,
            "num_images": len(faces), "num_pairs": int(ia.size), "num_genuine": int(same.sum()),
            "num_folds": int(np.unique(fold).size), "num_dropped": int(lp.num_dropped + hit.sum())}
    return Protocol(faces, ia, ib, same, fold, gallery, probes, info, notes)


def build_protocol(cfg: DictConfig) -> Protocol:
    """The faces and pairs every method is scored on (independent of the resolution)."""
    return _lfw_protocol(cfg) if cfg.eval.get("pairs_file") else _balanced_protocol(cfg)


# ----------------------------------------------------------------------------------------------
# metrics of one method
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# models and embeddings of one resolution
# ----------------------------------------------------------------------------------------------


def _at_res(cfg: DictConfig, res: str) -> DictConfig:
    sub = copy.deepcopy(cfg)  # cfg.dsr follows ${res}: the DSR built and checked is the one for `res`
    with open_dict(sub):
        sub.res = res
    return sub


@dataclass
class _Models:
    edgefaces: dict = field(default_factory=dict)   # artifact (None = pretrained) -> module
    dsrs: dict = field(default_factory=dict)        # DSR artifact -> module
    failed: dict = field(default_factory=dict)      # artifact -> reason
    manifests: dict = field(default_factory=dict)   # artifact -> manifest


def _load(kind: str, name: str | None, cfg: DictConfig, store: ArtifactStore, device, models: _Models):
    """Load an artifact once; a failure is recorded (the methods needing it are skipped), not raised."""
    from dsr.stage import load_dsr  # lazy: dsr.stage pulls the training stack in
    from edgeface.supervisor import load_supervisor

    table = models.edgefaces if kind == "edgeface" else models.dsrs
    key = name if name is not None else PRETRAINED
    if name in table or key in models.failed:
        return
    official = kind == "edgeface" and name is None and cfg.edgeface.get("weights")
    if not official and not store.exists(key):
        stage = PRODUCERS.get(key, "?").split()
        models.failed[key] = (f"artifact not found in {store.dir} (made by python train.py stage={stage[0]} "
                              f"res={store.res}{''.join(' ' + s for s in stage[1:])})")
        return
    try:
        if kind == "edgeface":
            table[name] = load_supervisor(cfg, store, name).to(device).eval()
        else:
            table[name] = load_dsr(cfg, store.require(name)).to(device).eval()
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        models.failed[key] = f"failed to load: {str(e).splitlines()[0]}"
        log.error("res=%s: %s %s", store.res, key, models.failed[key])
        return
    models.manifests["edgeface_weights" if official else key] = (
        {"path": str(cfg.edgeface.weights), "official": True, "variant": str(cfg.edgeface.variant)}
        if official else store.manifest(key))


@dataclass
class _Extraction:
    emb: dict            # method -> (N, D) float32 probe embeddings
    hr_emb: dict         # EdgeFace artifact (None = pretrained) -> (N, D) HR embeddings
    quality: dict        # image source -> (psnr (N,), ssim (N,))
    samples: dict        # image source (+ "vlr") -> (n, 3, H, W) float32, in sample order


@torch.no_grad()
def _extract(cfg: DictConfig, res: int, faces: FaceSet, methods: list[Method], models: _Models, device,
             sample_idx: np.ndarray) -> _Extraction:
    """One pass over the faces: each image source made once per batch, each method embedded once."""
    ev = cfg.eval
    loader = make_loader(faces, batch_size=int(ev.batch_size), res=res, degradation=cfg.degradation,
                         train=False, num_workers=int(cfg.data.get("num_workers") or 0), seed=int(ev.seed))
    n = len(faces)
    emb: dict[str, np.ndarray] = {}
    hr_emb: dict[str | None, np.ndarray] = {}
    quality: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    picked: dict[str, list] = {}
    picked_idx: list[np.ndarray] = []
    ef_keys = list(dict.fromkeys(m.edgeface for m in methods))

    def put(table, key, idx, value):
        value = value.float().cpu().numpy()
        if key not in table:
            table[key] = np.zeros((n, *value.shape[1:]), np.float32)
        table[key][idx] = value

    for batch in loader:
        idx = batch["index"].numpy()
        hr, lr = batch["hr"].to(device), batch["lr"].to(device)
        hr_cpu = batch["hr"]
        for k in ef_keys:
            put(hr_emb, k, idx, models.edgefaces[k](hr))
        images = {"hr": hr}
        for m in methods:
            if m.source not in images:
                img = upsample(lr) if m.source == "bicubic" else models.dsrs[m.source](lr).float().clamp(0, 1)
                images[m.source] = img
                q = quality.setdefault(m.source, (np.zeros(n), np.zeros(n)))
                q[0][idx], q[1][idx] = psnr(img.cpu(), hr_cpu), ssim(img.cpu(), hr_cpu)
            if m.source == "hr":
                emb[m.name] = hr_emb[m.edgeface]
            else:
                put(emb, m.name, idx, models.edgefaces[m.edgeface](images[m.source]))
        sel = np.flatnonzero(np.isin(idx, sample_idx))
        if sel.size:
            picked_idx.append(idx[sel])
            for src, img in {**images, "vlr": lr}.items():
                picked.setdefault(src, []).append(img[sel].float().cpu().numpy())
    samples = {}
    if picked_idx:
        got = np.concatenate(picked_idx)
        order = [int(np.flatnonzero(got == i)[0]) for i in sample_idx if i in got]
        samples = {src: np.concatenate(v)[order] for src, v in picked.items()}
    return _Extraction(emb, hr_emb, quality, samples)


# ----------------------------------------------------------------------------------------------
# one resolution
# ----------------------------------------------------------------------------------------------


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
        cols += [(label, ext.samples[src]) for label, src in
                 (("bicubic", "bicubic"), ("initial", "dsr_initial"), ("cyclic", "dsr_cyclic"),
                  ("cyclic2", "dsr_cyclic2")) if src in ext.samples]
        cols.append(("HR", ext.samples["hr"]))
        made += figures.sample_grid(cols, Path(f"{stem}_samples"), f"Samples, {tag}", formats)
    return [p.name for p in made]


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def regressions(table: dict[str, dict]) -> list[str]:
    """Plain statements where a later stage is worse than the one it should improve on."""
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
            if sign * (a - b) < 0 and format(a, fmt) != format(b, fmt):
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
                      + (f"; with {n} pairs, verification differences below ~{1 / math.sqrt(n):.3f} are within "
                         "sampling noise" if n else "") + "):", ""] + [f"- {r}" for r in regs]
        figs = results.get("figures", {}).get(res, [])
        if figs:
            lines += ["", "Figures:", ""] + [f"![{f}](figures/{f})" for f in figs if f.endswith(".png")]
            other = [f"[{f}](figures/{f})" for f in figs if not f.endswith(".png")]
            if other:
                lines += ["", "Also: " + ", ".join(other)]
    notes = results.get("notes") or []
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


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
    if not olds:
        return
    dest = out_dir / "history" / time.strftime("%Y%m%d-%H%M%S", time.localtime(olds[0].stat().st_mtime))
    dest.mkdir(parents=True, exist_ok=True)
    for p in olds:
        shutil.move(str(p), dest / p.name)
    log.warning("previous evaluation in %s moved to %s", out_dir, dest)


def _resolutions(cfg: DictConfig, resolutions) -> list[str]:
    if resolutions is None:
        resolutions = cfg.eval.get("resolutions") or [cfg.res]
    out = []
    for r in resolutions:
        key = str(r.value if hasattr(r, "value") else r)
        if key not in RESOLUTIONS:
            raise EvaluationError(f"resolution {r!r} is not one of {', '.join(RESOLUTIONS)}")
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
        for line in extra["regressions"][res]:
            log.warning("res=%s: %s", res, line)
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
