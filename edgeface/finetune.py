"""Stage `edgeface_ft`: EdgeFace fine-tuned on the outputs of a frozen DSR.

Cycle 1 (`cycle.index=1`) starts from the pretrained EdgeFace (`edgeface.weights`, else the
`edgeface_pretrained` artifact) on outputs of `dsr_initial` and publishes `edgeface_ft`; cycle 2 starts
from `edgeface_ft` on outputs of `dsr_cyclic` and publishes `edgeface_ft2` (`stages.edgeface_ft.second_cycle`
epochs). Inputs and names come from the stage table, `cycle.stages`.

Two phases, each its own Trainer (tags "phase1"/"phase2") in the same run directory, so a re-run resumes
inside the phase that was running and skips a finished one (its done marker restores its final weights):
  phase 1: a fresh margin head over the training identities; backbone frozen (eval, not in the optimizer);
  phase 2: everything, two param groups (backbone at lr * backbone_lr_mult), warm-up + cosine per step.
Loss = margin loss on E(SR) + lambda_align * mean(1 - cos(E(SR), E(HR))), SR = DSR(VLR) computed in
batches on the device under no_grad. SR and HR are augmented jointly by construction: the loader augments
the HR face and degrades that result into the VLR input.

Model selection: SR-probe vs HR-gallery verification on the validation identities
(`stages.edgeface_ft.select`, with an explicit fallback when it is NaN), never SR-HR cosine alone, which a
collapsed embedding maximises.
The candidates are phase 1's network (the input backbone + trained head) and phase 2's best epoch, so a
fine-tuning that hurts verification is never published over the input backbone.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

import edgeface
from cycle.models import freeze
from cycle.runner import StageRun
from edgeface.heads import build_head
from edgeface.pretrain import SELECTABLE, SELECTION_KEY, edgeface_payload, margin_loss
from edgeface.pretrain import selection_mode as _selection_mode
from edgeface.pretrain import selection_value, train_accuracy
from eval.validation import verification

log = logging.getLogger(__name__)

_SELECTABLE = SELECTABLE | {"val/hr_auc"}


def selection_mode(select: str) -> str:
    if select == "val/sr_hr_cos":
        raise ValueError("stages.edgeface_ft.select=val/sr_hr_cos: SR-HR cosine alone rewards embedding "
                         "collapse (all faces mapped alike); select a verification metric: "
                         + ", ".join(sorted(_SELECTABLE)))
    return _selection_mode(select, _SELECTABLE, "stages.edgeface_ft.select")


def ft_loss(backbone, head, sr, hr, labels, *, lambda_align: float, train_backbone: bool):
    """Margin loss on E(SR) + lambda_align * mean(1 - cos(E(SR), E(HR))); returns (loss, terms).

    E(HR) is a stop-gradient target (computed under no_grad): the alignment pulls SR embeddings to
    where the current backbone puts the matching HR face and never pulls HR embeddings towards SR ones.
    With gradients on both sides the cheapest way to raise the cosine is to make both less
    discriminative (in the limit one constant vector: collapse); HR faces are also the gallery at
    deployment and what the cyclic DSR is supervised towards, so they should move only as the margin
    loss requires. It also saves the HR backward pass.
    In phase 1 (`train_backbone=False`) the backbone is frozen, so E(SR) needs no graph either and the
    alignment term is a constant: it is still computed, so train/loss means the same in both phases.
    """
    if not train_backbone:
        backbone.eval()  # the Trainer sets its modules to train() every epoch; frozen means eval here
    with torch.set_grad_enabled(train_backbone and torch.is_grad_enabled()):
        e_sr = backbone(sr)
    with torch.no_grad():
        e_hr = backbone(hr)
    margin = margin_loss(head, e_sr, labels)
    align = (1.0 - F.cosine_similarity(e_sr.float(), e_hr.float(), dim=1)).mean()
    loss = margin + lambda_align * align
    acc = train_accuracy(head, e_sr, labels)
    return loss, {"margin": margin.detach(), "align": align.detach(), "acc": acc}


@torch.no_grad()
def evaluate_sr(dsr, backbone, loader, device: torch.device, *, num_pairs: int, seed: int,
                limit: int | None = None) -> dict[str, float]:
    """SR probes (DSR then EdgeFace) vs HR gallery (EdgeFace) on the validation identities, plus the
    mean SR-HR cosine of the same face (`val/sr_hr_cos`) and HR vs HR AUC (`val/hr_auc`: fine-tuning
    on SR must not wreck full-resolution faces)."""
    backbone.eval()
    e_sr, e_hr, labels = [], [], []
    for i, batch in enumerate(loader):
        if limit is not None and i >= int(limit):
            break
        lr_img, hr = batch["lr"].to(device, non_blocking=True), batch["hr"].to(device, non_blocking=True)
        e_sr.append(F.normalize(backbone(dsr(lr_img)).float(), dim=1).cpu())
        e_hr.append(F.normalize(backbone(hr).float(), dim=1).cpu())
        labels.append(batch["label"])
    a, b, lab = torch.cat(e_sr), torch.cat(e_hr), torch.cat(labels).numpy()
    out = {f"val/{k}": v for k, v in verification(a, lab, num_pairs, seed, emb_b=b).items()}
    out["val/sr_hr_cos"] = float((a * b).sum(1).mean())
    out["val/hr_auc"] = verification(b, lab, num_pairs, seed)["auc"]
    return out


class _StepOffset:
    """A logger view that shifts steps: phase 2 logs after phase 1 on one step axis (the Trainer counts
    steps per phase from 0, and wandb drops rows whose step goes backwards)."""

    def __init__(self, logger, offset: int):
        self._logger, self.offset = logger, int(offset)

    def log(self, metrics, step: int) -> None:
        self._logger.log(metrics, step + self.offset)

    def warn(self, code: str, message: str, step: int) -> None:
        self._logger.warn(code, message, step + self.offset)

    def log_images(self, key, image, step: int, caption=None) -> None:
        self._logger.log_images(key, image, step + self.offset, caption=caption)

    def __getattr__(self, name):  # run_id, summary, close, ...
        return getattr(self._logger, name)


def run(cfg: DictConfig, out_dir: Path) -> dict[str, float]:
    return FinetuneStage(cfg, out_dir, "edgeface_ft").run()


class FinetuneStage(StageRun):
    """Inputs (stage table order): the DSR whose outputs it trains on, the EdgeFace it starts from."""

    def check(self) -> None:
        s = self.settings
        self.p1_epochs, self.p2_epochs = int(s.phase1_epochs), int(s.phase2_epochs)
        if self.p1_epochs < 0 or self.p2_epochs < 0 or self.p1_epochs + self.p2_epochs == 0:
            raise ValueError(f"edgeface_ft needs phase1_epochs, phase2_epochs >= 0 and not both 0; got "
                             f"{self.p1_epochs}, {self.p2_epochs}")
        self.select_metric = str(s.select)
        self.mode = selection_mode(self.select_metric)

    def build(self) -> None:
        s = self.settings
        self.backbone = self.load_input(1)  # float copy even for `_q` variants
        self.dsr = freeze(self.load_input(0))
        self.loaders()
        train_set = self.splits["train"]
        self.head_cfg = {"name": str(s.head), "scale": float(s.scale), "margin": float(s.margin)}
        self.head = build_head(self.head_cfg["name"], edgeface.EMBEDDING_SIZE, train_set.num_classes,
                               scale=self.head_cfg["scale"], margin=self.head_cfg["margin"]).to(self.device)
        self.net = self.compiled(self.backbone)
        self.modules = {"backbone": self.backbone, "head": self.head}
        self.fallback_noted: list[str] = []
        log.info("%s: %s from %s on outputs of %s; %s head over %d identities; phases %d + %d epochs",
                 self.label, self.backbone.variant, self.inputs[1] or "edgeface.weights", self.inputs[0],
                 self.head_cfg["name"], train_set.num_classes, self.p1_epochs, self.p2_epochs)

    def make_step(self, train_backbone: bool):
        lambda_align = float(self.settings.lambda_align)

        def step_fn(batch):
            lr_img = batch["lr"].to(self.device, non_blocking=True)
            hr = batch["hr"].to(self.device, non_blocking=True)
            labels = batch["label"].to(self.device, non_blocking=True)
            with torch.no_grad():  # frozen DSR: its outputs are this stage's inputs, no graph needed
                sr = self.dsr(lr_img)
            return ft_loss(self.net, self.head, sr, hr, labels, lambda_align=lambda_align,
                           train_backbone=train_backbone)
        return step_fn

    def validate(self, epoch: int) -> dict[str, float]:
        t = self.cfg.trainer
        out = evaluate_sr(self.dsr, self.backbone, self.val_loader, self.device, num_pairs=int(t.val_pairs),
                          seed=int(self.cfg.seed), limit=t.get("limit_val_batches"))
        out[SELECTION_KEY], used = selection_value(out, self.select_metric, self.mode)
        if used != self.select_metric and not self.fallback_noted:
            self.fallback_noted.append(used)
            log.warning("%s is NaN on this validation set (too few impostor pairs: raise trainer.val_pairs "
                        "or the validation identities); selecting by %s instead", self.select_metric, used)
        return out

    def fit(self) -> dict[str, float]:
        """Phase 1 (head only) then phase 2 (everything); publishes the better of the two."""
        s, mode, loader = self.settings, self.mode, self.train_loader
        lr = float(s.lr)
        done: list[tuple] = []
        offset = 0
        if self.p1_epochs:
            self.backbone.requires_grad_(False)
            opt1 = torch.optim.AdamW(self.head.parameters(), lr=lr, weight_decay=float(s.weight_decay))
            # Phase-1 validation only at its end: the backbone is frozen and verification does not use the
            # head, so every phase-1 epoch would score the same (it is the input network's baseline).
            ph1 = self.make_trainer(modules=self.modules, optimizer=opt1, epochs=self.p1_epochs, tag="phase1",
                                    val_every=self.p1_epochs)
            r1 = ph1.fit(loader, self.make_step(False), self.validate, select=SELECTION_KEY, mode=mode,
                         set_epoch=getattr(loader, "set_epoch", None))
            done.append((ph1, r1.best))
            offset = ph1.total_steps
        if self.p2_epochs:
            self.backbone.requires_grad_(True)
            groups = [{"params": list(self.backbone.parameters()), "lr": lr * float(s.backbone_lr_mult)},
                      {"params": list(self.head.parameters()), "lr": lr}]
            opt2 = torch.optim.AdamW(groups, lr=lr, weight_decay=float(s.weight_decay))
            ph2 = self.make_trainer(modules=self.modules, optimizer=opt2, epochs=self.p2_epochs, tag="phase2",
                                    logger=_StepOffset(self.logger, offset))
            # continue the loader's epoch count so phase 2 does not replay phase 1's shuffles/augmentations
            r2 = ph2.fit(loader, self.make_step(True), self.validate, select=SELECTION_KEY, mode=mode,
                         set_epoch=lambda e: loader.set_epoch(e + self.p1_epochs))
            done.append((ph2, r2.best))

        sign = 1.0 if mode == "max" else -1.0

        def score(best: dict) -> float:
            v = best.get(SELECTION_KEY, math.nan)
            return sign * v if math.isfinite(v) else -math.inf

        # ties go to the later phase (the fine-tuned network)
        winner, best = max(reversed(done), key=lambda tb: score(tb[1]))
        if winner.tag == "phase1" and len(done) == 2:
            (ph2, best2) = done[1]
            self.logger.warn(
                "ft_no_gain",
                f"phase 2 never beat the input backbone on {self.select_metric} (best {best2.get(SELECTION_KEY)} "
                f"vs {best.get(SELECTION_KEY)}): publishing the input backbone, phase-1 head. "
                "Remedy: lower stages.edgeface_ft.backbone_lr_mult or lambda_align, or train longer.",
                offset + ph2.step)
        winner.load_best()
        self.backbone.requires_grad_(False)
        metrics = {k: float(v) for k, v in best.items() if isinstance(v, (int, float))}
        metrics["selected_phase"] = 1.0 if winner.tag == "phase1" else 2.0
        return metrics

    def payload(self) -> dict:
        return edgeface_payload(self.backbone, self.head, self.splits["train"].num_classes, self.head_cfg)
