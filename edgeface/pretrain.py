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
from cycle.runner import StageRun
from eval.validation import embed_loader, verification
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
    return PretrainStage(cfg, out_dir, "edgeface_pretrain").run()


class PretrainStage(StageRun):
    hr_only = True

    def check(self) -> None:
        if self.cfg.edgeface.get("weights"):
            raise ValueError(
                f"stage edgeface_pretrain has nothing to do: edgeface.weights={self.cfg.edgeface.weights} is set, "
                "so those official weights are the pretrained EdgeFace and the later stages load them directly. "
                "Leave edgeface.weights unset (null) to pretrain one on the training identities instead.")
        self.select_metric = str(self.settings.select)
        self.mode = selection_mode(self.select_metric)

    def build(self) -> None:
        s = self.settings
        self.loaders()
        train_set = self.splits["train"]
        variant = str(self.cfg.edgeface.variant)
        self.backbone = edgeface.build(variant, quantized=False).to(self.device)  # `_q`: its float network
        self.head_cfg = {"name": str(s.head), "scale": float(s.scale), "margin": float(s.margin)}
        self.head = build_head(self.head_cfg["name"], edgeface.EMBEDDING_SIZE, train_set.num_classes,
                               scale=self.head_cfg["scale"], margin=self.head_cfg["margin"]).to(self.device)
        self.optimizer = torch.optim.AdamW([*self.backbone.parameters(), *self.head.parameters()], lr=float(s.lr),
                                           weight_decay=float(s.weight_decay))
        self.net = self.compiled(self.backbone)
        self.modules, self.select = {"backbone": self.backbone, "head": self.head}, SELECTION_KEY
        log.info("edgeface_pretrain: %s (%d params), %s head over %d identities, %d train / %d val images",
                 variant, edgeface.count_parameters(self.backbone), self.head_cfg["name"], train_set.num_classes,
                 len(train_set), len(self.splits["val"]))

    def step(self, batch):
        hr = batch["hr"].to(self.device, non_blocking=True)
        labels = batch["label"].to(self.device, non_blocking=True)
        emb = self.net(hr)
        loss = margin_loss(self.head, emb, labels)
        return loss, {"margin": loss.detach(), "acc": train_accuracy(self.head, emb, labels)}

    def validate(self, epoch: int) -> dict[str, float]:
        t = self.cfg.trainer
        out = evaluate_hr(self.backbone, self.val_loader, self.device, num_pairs=int(t.val_pairs),
                          seed=int(self.cfg.seed), limit=t.get("limit_val_batches"))
        out[SELECTION_KEY], _ = selection_value(out, self.select_metric, self.mode)
        return out

    def payload(self) -> dict:
        return edgeface_payload(self.backbone, self.head, self.splits["train"].num_classes, self.head_cfg)
