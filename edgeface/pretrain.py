"""Stage `edgeface_pretrain`: EdgeFace + margin head trained on HR faces of the training identities.

Only for data without an official pretrained EdgeFace (the embedded synthetic faces). With
`edgeface.weights` set the official network *is* the pretrained EdgeFace, so this stage refuses to
run (the `cycle` pipeline already leaves it out).

Where the result lives: the content is resolution-independent (HR faces only, no degradation), but
it is published per resolution, as `<artifacts_dir>/res<r>/edgeface_pretrained.pt`, because every
stage looks for its inputs in its own resolution's directory. A sweep over 16/24/32 therefore trains
it once per resolution (same seed and data, so the same network up to floating-point nondeterminism).

For a `_q` variant the float full-rank network is trained (quantize it afterwards for CPU inference);
the artifact is a float `edgeface` file that `edgeface.load(path)` restores without arguments.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

import edgeface
from cycle.artifacts import ArtifactStore
from cycle.config import to_plain
from cycle.data import stage_loaders
from cycle.health import HealthMonitor
from cycle.logger import build_logger
from cycle.training import Trainer, resolve_device
from cycle.validation import embed_loader, verification
from edgeface.heads import build_head
from edgeface.loader import FORMAT

log = logging.getLogger(__name__)

ARTIFACT = "edgeface_pretrained"
SELECTION_KEY = "val/selection"  # the select metric, or its fallback where it is NaN: what the Trainer ranks
_MIN_METRICS = {"val/eer"}  # lower is better
_FALLBACK = {"max": "val/auc", "min": "val/eer"}  # never NaN while both kinds of pairs exist
SELECTABLE = {"val/auc", "val/eer", "val/tar@far=1e-2"}


def selection_mode(select: str, selectable=SELECTABLE, knob: str = "stages.edgeface_pretrain.select") -> str:
    """"max" or "min" for a validation metric that may pick the published epoch."""
    if select not in selectable:
        raise ValueError(f"{knob}={select!r} is not a validation metric of this stage; choose one of: "
                         f"{', '.join(sorted(selectable))}")
    return "min" if select in _MIN_METRICS else "max"


def selection_value(metrics: dict[str, float], select: str, mode: str) -> tuple[float, str]:
    """(value, metric used). TAR@FAR=1e-2 is NaN with < 100 impostor pairs (small validation sets), and
    the Trainer cannot rank NaN: fall back to AUC (EER for lower-is-better metrics). Whether it is NaN
    depends only on the validation labels and trainer.val_pairs, fixed for a run, so every epoch of a
    run ranks by the same metric."""
    v = metrics.get(select, math.nan)
    if math.isfinite(v):
        return float(v), select
    fb = _FALLBACK[mode]
    return float(metrics[fb]), fb


def edgeface_payload(backbone: torch.nn.Module, head: torch.nn.Module, num_classes: int,
                     head_cfg: dict | None = None) -> dict:
    """The project's EdgeFace file (the format `edgeface.save` writes) with the margin head beside it.

    Built as a dict rather than written with `edgeface.save` because `ArtifactStore.publish` does the
    writing (manifest, history of older versions). `edgeface.load(path)` ignores the extra keys.
    """
    model = getattr(backbone, "_orig_mod", backbone)  # torch.compile wrapper
    if model.quantized:
        raise ValueError("only float EdgeFace networks are trained and published; got a quantized one")
    cpu = lambda sd: {k: v.detach().cpu() for k, v in sd.items()}  # noqa: E731
    return {"format": FORMAT, "variant": model.variant, "quantized": False,
            "state_dict": cpu(model.state_dict()), "head": cpu(head.state_dict()),
            "head_config": dict(head_cfg or {}), "num_classes": int(num_classes)}


def margin_loss(head: torch.nn.Module, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(emb, labels), labels)


@torch.no_grad()
def train_accuracy(head: torch.nn.Module, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 over the training identities, on margin-free logits (a margin would understate it)."""
    return (head.logits(emb.detach()).argmax(1) == labels).float().mean()


@torch.no_grad()
def evaluate_hr(backbone: torch.nn.Module, loader, device: torch.device, *, num_pairs: int, seed: int,
                limit: int | None = None) -> dict[str, float]:
    """HR vs HR verification on the validation identities (`val/` keys)."""
    backbone.eval()
    emb, labels = embed_loader(loader, lambda b: backbone(b["hr"].to(device, non_blocking=True)),
                               limit=None if limit is None else int(limit))
    return {f"val/{k}": v for k, v in verification(emb, labels, num_pairs, seed).items()}


def run(cfg: DictConfig, out_dir: Path) -> dict[str, float]:
    out_dir = Path(out_dir)
    if cfg.edgeface.get("weights"):
        raise ValueError(
            f"stage edgeface_pretrain has nothing to do: edgeface.weights={cfg.edgeface.weights} is set, so "
            "those official weights are the pretrained EdgeFace and the later stages load them directly. "
            "Leave edgeface.weights unset (null) to pretrain one on the training identities instead.")
    device = resolve_device(cfg.device)
    s, t = cfg.stages.edgeface_pretrain, cfg.trainer
    select = str(s.select)
    mode = selection_mode(select)
    variant = str(cfg.edgeface.variant)
    store = ArtifactStore(cfg.paths.artifacts_dir, cfg.res)

    splits, train_loader, val_loader = stage_loaders(cfg, None)  # None: HR faces only
    train_set = splits["train"]

    backbone = edgeface.build(variant, quantized=False).to(device)  # `_q`: its float full-rank network
    head_cfg = {"name": str(s.head), "scale": float(s.scale), "margin": float(s.margin)}
    head = build_head(head_cfg["name"], edgeface.EMBEDDING_SIZE, train_set.num_classes,
                      scale=head_cfg["scale"], margin=head_cfg["margin"]).to(device)
    opt = torch.optim.AdamW([*backbone.parameters(), *head.parameters()], lr=float(s.lr),
                            weight_decay=float(s.weight_decay))
    net = torch.compile(backbone) if cfg.get("compile") else backbone
    log.info("edgeface_pretrain: %s (%d params), %s head over %d identities, %d train / %d val images",
             variant, edgeface.count_parameters(backbone), head_cfg["name"], train_set.num_classes,
             len(train_set), len(splits["val"]))

    logger = build_logger(cfg, out_dir, "edgeface_pretrain")
    try:
        trainer = Trainer(tcfg={**to_plain(t), "warmup_frac": float(s.warmup_frac)}, run_dir=out_dir,
                          logger=logger, device=device, modules={"backbone": backbone, "head": head},
                          optimizer=opt, epochs=int(s.epochs), steps_per_epoch=len(train_loader),
                          tag="edgeface_pretrain", resume=bool(cfg.resume), health=HealthMonitor())

        def step_fn(batch):
            hr = batch["hr"].to(device, non_blocking=True)
            labels = batch["label"].to(device, non_blocking=True)
            emb = net(hr)
            loss = margin_loss(head, emb, labels)
            return loss, {"margin": loss.detach(), "acc": train_accuracy(head, emb, labels)}

        def validate(epoch: int) -> dict[str, float]:
            out = evaluate_hr(backbone, val_loader, device, num_pairs=int(t.val_pairs), seed=int(cfg.seed),
                              limit=t.get("limit_val_batches"))
            out[SELECTION_KEY], _ = selection_value(out, select, mode)
            return out

        trainer.fit(train_loader, step_fn, validate, select=SELECTION_KEY, mode=mode,
                    set_epoch=getattr(train_loader, "set_epoch", None))
        metrics = trainer.load_best()
        metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        store.publish(ARTIFACT, edgeface_payload(backbone, head, train_set.num_classes, head_cfg),
                      cfg=cfg, metrics=metrics, parents=[], run_dir=out_dir)
        logger.summary(metrics)
        return metrics
    finally:
        logger.close()
