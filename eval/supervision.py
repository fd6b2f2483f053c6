"""Is the supervisor good enough to supervise? The quality check a DSR stage runs before it trains.

The identity and feature-match losses pull the DSR's faces towards what the frozen EdgeFace calls the
same person. A weak EdgeFace (pre-trained from scratch on a few people) has a poor notion of identity,
and those terms can then cost PSNR and make faces *less* recognisable than plain super-resolution does
(BENCHMARKS.md, "Identity supervision"). So before training, the supervisor's HR-vs-HR verification on
the validation identities is measured; below the floors in `supervisor` (conf/train.yaml) the stage
warns at start, and the numbers go to train.log, the artifact's manifest and report.md with the remedies.
"""
from __future__ import annotations

import math

import torch

from eval.validation import embed_loader, verification

TAR_KEY = "tar@far=1e-2"
REMEDIES = ("official EdgeFace weights (edgeface.weights=/path/to/edgeface_<variant>.pt, README \"Official "
            "weights\"); longer EdgeFace pre-training (stages.edgeface_pretrain.epochs) or more training "
            "identities; lower identity weights (stages.{stage}.loss.identity / feature_match) or a warm-up "
            "(stages.{stage}.identity_warmup); and the pixel-only ablation (cycle.ablations=[pixel]) to see "
            "whether identity supervision helps at all")


@torch.no_grad()
def supervisor_quality(supervisor: torch.nn.Module, loader, device: torch.device, *, num_pairs: int, seed: int,
                       limit: int | None = None) -> dict[str, float]:
    """HR-vs-HR verification of `supervisor` over `loader` (the validation identities): AUC, TAR@FAR=1e-2,
    and how many identities and images it rests on."""
    emb, labels = embed_loader(loader, lambda b: supervisor(b["hr"].to(device)), limit=limit)
    ver = verification(emb, labels, num_pairs, seed)
    return {"auc": ver["auc"], TAR_KEY: ver[TAR_KEY], "identities": int(len(set(labels.tolist()))),
            "images": int(len(labels))}


def judge_supervisor(quality: dict[str, float], *, min_auc: float, min_tar: float, stage: str = "<stage>") -> dict:
    """The record the manifest and the report keep: the numbers, the floors, `weak` and a one-line verdict.

    A NaN TAR (too few impostor pairs) is judged on the AUC alone."""
    auc, tar = float(quality["auc"]), float(quality[TAR_KEY])
    below = [f"AUC {auc:.3f} < {min_auc:g}"] if not auc >= min_auc else []
    if math.isfinite(tar) and tar < min_tar:
        below.append(f"TAR@FAR=1e-2 {tar:.3f} < {min_tar:g}")
    shown = f"AUC {auc:.3f}, TAR@FAR=1e-2 {tar:.3f} ({quality['identities']} identities, {quality['images']} images)"
    verdict = (f"weak supervisor: HR verification on the validation identities {shown}: "
               f"{'; '.join(below)}. Identity supervision may then hurt. Remedies: {REMEDIES.format(stage=stage)}"
               if below else f"supervisor HR verification on the validation identities: {shown}")
    return {**quality, "min_auc": float(min_auc), "min_tar": float(min_tar), "weak": bool(below),
            "verdict": verdict}
