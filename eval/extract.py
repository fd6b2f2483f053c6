"""Models and embeddings of one resolution: each artifact loaded once, each image embedded once per method.

The VLR faces are ``cycle.degrade.degrade`` of the HR faces (the training degradation, deterministic
noise from ``eval.seed``), made by the evaluation loader. One pass over the faces makes each image source
(HR, bicubic, each DSR) once per batch, embeds it through each method's EdgeFace, measures its PSNR/SSIM
against HR (on RGB and on the BT.601 Y channel, ``eval.crop_border`` pixels cropped from each border, as
BasicSR) and keeps a few sample images for the figures.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from omegaconf import DictConfig, open_dict

from cycle.artifacts import ArtifactStore, load_model
from cycle.data import FaceSet, make_loader
from cycle.degrade import upsample
from cycle.stages import producer_command
from eval.methods import PRETRAINED, Method
from eval.metrics import psnr, ssim

log = logging.getLogger(__name__)

QUALITY_KEYS = ("psnr", "ssim", "psnr_y", "ssim_y")  # per-image image quality against HR: RGB, then Y


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
    table = models.edgefaces if kind == "edgeface" else models.dsrs
    key = name if name is not None else PRETRAINED
    if name in table or key in models.failed:
        return
    official = kind == "edgeface" and name is None and cfg.edgeface.get("weights")
    if not official and not store.exists(key):
        models.failed[key] = f"artifact not found in {store.dir} (made by {producer_command(key, store.res)})"
        return
    try:
        table[name] = load_model(cfg, store, None if official else key).to(device).eval()
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
    quality: dict        # image source -> {"psnr", "ssim", "psnr_y", "ssim_y"} -> (N,) per image
    samples: dict        # image source (+ "vlr") -> (n, 3, H, W) float32, in sample order
    judge: dict = field(default_factory=dict)   # image source -> (N, D) embeddings of the independent judge


@torch.no_grad()
def _extract(cfg: DictConfig, res: int, faces: FaceSet, methods: list[Method], models: _Models, device,
             sample_idx: np.ndarray, judge=None) -> _Extraction:
    """One pass over the faces: each image source made once per batch, each method embedded once (and each
    image source once by the independent `judge`, when one is configured)."""
    ev = cfg.eval
    loader = make_loader(faces, batch_size=int(ev.batch_size), res=res, degradation=cfg.degradation,
                         train=False, num_workers=int(cfg.data.get("num_workers") or 0), seed=int(ev.seed))
    n = len(faces)
    emb: dict[str, np.ndarray] = {}
    hr_emb: dict[str | None, np.ndarray] = {}
    quality: dict[str, dict[str, np.ndarray]] = {}
    crop = int(ev.get("crop_border") or 0)
    picked: dict[str, list] = {}
    picked_idx: list[np.ndarray] = []
    ef_keys = list(dict.fromkeys(m.edgeface for m in methods))
    judged: dict[str, np.ndarray] = {}

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
                q = quality.setdefault(m.source, {k: np.zeros(n) for k in QUALITY_KEYS})
                for y_channel, suffix in ((False, ""), (True, "_y")):
                    kw = dict(crop_border=crop, y_channel=y_channel)
                    q["psnr" + suffix][idx] = psnr(img.cpu(), hr_cpu, **kw)
                    q["ssim" + suffix][idx] = ssim(img.cpu(), hr_cpu, **kw)
            if m.source == "hr":
                emb[m.name] = hr_emb[m.edgeface]
            else:
                put(emb, m.name, idx, models.edgefaces[m.edgeface](images[m.source]))
        if judge is not None:
            for src, img in images.items():
                put(judged, src, idx, torch.from_numpy(judge.embed(img)))
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
    return _Extraction(emb, hr_emb, quality, samples, judged)
