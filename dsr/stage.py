"""Stages `initial` (DSR from scratch), `cyclic` (DSR continued with the fine-tuned EdgeFace) and the
ablation `pixel` (DSR from scratch, pixel loss only, no supervisor).

The supervisor EdgeFace is frozen but differentiable: its weights never change, the
identity and feature-match losses send gradients through it into the DSR. Before training, its HR
verification on the validation identities is checked against the `supervisor` floors
(`eval.supervision`), and `identity_warmup` ramps the identity-based weights in from 0.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from cycle.config import to_plain
from cycle.degrade import upsample
from cycle.errors import ConfigError
from cycle.health import HealthMonitor
from cycle.models import freeze
from cycle.runner import StageRun
from cycle.training import EMA
from dsr.losses import SUPERVISED_TERMS, DSRLoss
from dsr.model import describe
from eval.metrics import psnr, sampling_noise, ssim
from eval.supervision import TAR_KEY, judge_supervisor, supervisor_quality
from eval.validation import verification

log = logging.getLogger(__name__)


def run_initial(cfg: DictConfig, out_dir: Path) -> dict[str, float]:
    return DSRStage(cfg, out_dir, "initial").run()


def run_cyclic(cfg: DictConfig, out_dir: Path) -> dict[str, float]:
    return DSRStage(cfg, out_dir, "cyclic").run()


def run_pixel(cfg: DictConfig, out_dir: Path) -> dict[str, float]:
    return DSRStage(cfg, out_dir, "pixel").run()


class DSRStage(StageRun):
    """`initial`: a new DSR supervised by the pretrained EdgeFace. `cyclic`: the previous cycle's DSR,
    supervised by this cycle's fine-tuned EdgeFace. `pixel`: a new DSR with no supervisor (inputs and
    names: `cycle.stages`)."""
    supervision: dict | None = None   # the supervisor check's record (manifest, report)

    def build(self) -> None:
        s, cfg = self.settings, self.cfg
        self.reference, supervisor = None, None
        if self.spec.name == "cyclic":
            supervisor = self.load_input(1)
            model = self.load_input(0)
            self.reference = self.store.manifest(self.inputs[0]).get("metrics", {})
        else:  # initial, pixel: a new DSR; pixel has no input, no supervisor
            supervisor = self.load_input(0) if self.inputs else None
            model = instantiate(cfg.dsr)
        self.model = model.to(self.device)
        self.supervisor = freeze(supervisor) if supervisor is not None else None
        log.info("%s", describe(self.model, self.res))
        self.loaders()
        loss = to_plain(s.loss)
        if self.supervisor is None:  # no EdgeFace takes part: a weight that needs one is a config error
            asked = {k: loss[k] for k in SUPERVISED_TERMS if float(loss.get(k, 0)) > 0}
            if asked:
                raise ConfigError(f"stage {self.spec.name} has no supervisor EdgeFace, but stages.{self.spec.name}"
                                  f".loss sets {asked}; set them to 0")
        self.supervised = any(float(loss.get(k, 0)) > 0 for k in SUPERVISED_TERMS)
        self.identity_warmup = 0.0
        self.loss_fn = DSRLoss(self.supervisor, **loss).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=float(s.lr), betas=tuple(s.betas),
                                           weight_decay=float(s.weight_decay))
        self.train_model = self.compiled(self.model)
        self.modules, self.ema = {"dsr": self.model}, EMA(self.model, float(s.ema_decay))
        self.select, self.mode = str(s.select), "max"

    def step(self, batch):
        if self.identity_warmup:  # the identity-based weights ramp from 0 over that share of the stage's steps
            ramp = max(1, math.ceil(self.identity_warmup * self.trainer.total_steps))
            self.loss_fn.identity_scale = min(1.0, (self.trainer.step + 1) / ramp)  # by step: resumes exactly
        lr_img = batch["lr"].to(self.device, non_blocking=True)
        hr = batch["hr"].to(self.device, non_blocking=True)
        sr = self.train_model(lr_img)
        loss, terms = self.loss_fn(sr, hr, batch["label"].to(self.device))
        if self.identity_warmup:
            terms["identity_scale"] = self.loss_fn.identity_scale
        return loss, terms

    def validate(self, epoch: int) -> dict[str, float]:
        t = self.cfg.trainer
        out = evaluate_dsr(self.model, self.supervisor, self.loss_fn, self.val_loader, self.device,
                           num_pairs=int(t.val_pairs), seed=int(self.cfg.seed), limit=t.get("limit_val_batches"))
        if epoch % int(t.sample_every) == 0 or epoch + 1 == int(self.settings.epochs):
            self.logger.log_images("samples/val", sample_grid(self.model, self.val_loader, self.device),
                                   self.trainer.step, caption="VLR | bicubic | SR | HR")
        return out

    def fit(self) -> dict[str, float]:
        if self.supervised:
            self.check_supervisor()
            self.identity_warmup = float(self.settings.get("identity_warmup") or 0.0)
        metrics = super().fit()
        noise = sampling_noise(int(self.cfg.trainer.val_pairs))  # differences below it are no regression
        for code, msg in HealthMonitor().check_stage(self.result.history, reference=self.reference, noise=noise):
            self.logger.warn(code, msg, self.trainer.step)
        return metrics

    def check_supervisor(self) -> None:
        """The supervisor's HR verification on the validation identities, against the `supervisor` floors:
        logged, warned about when weak, and kept for the manifest."""
        floors, t = self.cfg.supervisor, self.cfg.trainer
        quality = supervisor_quality(self.supervisor, self.val_loader, self.device, num_pairs=int(t.val_pairs),
                                     seed=int(self.cfg.seed), limit=t.get("limit_val_batches"))
        self.supervision = judge_supervisor(quality, min_auc=float(floors.min_auc), min_tar=float(floors.min_tar),
                                            stage=self.spec.name)
        self.logger.log({"supervisor/auc": quality["auc"], f"supervisor/{TAR_KEY}": quality[TAR_KEY]}, 0)
        if self.supervision["weak"]:
            self.logger.warn("weak_supervisor", f"{self.label}: {self.supervision['verdict']}", 0)
        else:
            log.info("%s: %s", self.label, self.supervision["verdict"])

    def manifest_extra(self) -> dict:
        return {"supervisor": self.supervision} if self.supervision else {}

    def payload(self) -> dict:
        return {"format": "dsr", "res": self.res, "model": self.model.state_dict(), "arch": to_plain(self.cfg.dsr)}


@torch.no_grad()
def evaluate_dsr(model, supervisor, loss_fn, loader, device, *, num_pairs: int, seed: int,
                 limit: int | None = None) -> dict[str, float]:
    """Validation: PSNR/SSIM per image (float) and averaged, identity cosine to HR, loss,
    and verification of SR probes against HR gallery images of held-out identities."""
    was_training = model.training
    model.eval()
    psnrs, ssims, bic, cos, losses, e_sr, e_hr, labels = [], [], [], [], [], [], [], []
    for i, batch in enumerate(loader):
        if limit is not None and i >= int(limit):
            break
        lr_img, hr = batch["lr"].to(device), batch["hr"].to(device)
        sr = model(lr_img).float().clamp(0, 1)
        psnrs.append(psnr(sr.cpu(), hr.cpu()))
        ssims.append(ssim(sr.cpu(), hr.cpu()))
        bic.append(psnr(upsample(lr_img).cpu(), hr.cpu()))
        loss, _ = loss_fn(sr, hr, batch["label"].to(device))
        losses.append(float(loss) * len(hr))
        labels.append(batch["label"])
        if supervisor is None:
            continue
        a, b = supervisor(sr).float(), supervisor(hr).float()
        cos.append(torch.nn.functional.cosine_similarity(a, b).cpu())
        e_sr.append(a.cpu())
        e_hr.append(b.cpu())
    model.train(was_training)
    n = sum(len(x) for x in psnrs)
    out = {"val/psnr": float(np.mean(np.concatenate(psnrs))), "val/ssim": float(np.mean(np.concatenate(ssims))),
           "val/psnr_bicubic": float(np.mean(np.concatenate(bic))), "val/loss": sum(losses) / max(1, n)}
    if supervisor is None:  # the pixel ablation: no EdgeFace to verify with
        return out
    out["val/identity_cos"] = float(torch.cat(cos).mean())
    ver = verification(torch.cat(e_sr), torch.cat(labels).numpy(), num_pairs, seed, emb_b=torch.cat(e_hr))
    out.update({f"val/{k}": v for k, v in ver.items()})
    return out


@torch.no_grad()
def sample_grid(model, loader, device, n: int = 6) -> np.ndarray:
    """Rows of VLR (nearest up-sampled) | bicubic | SR | HR as one uint8 image."""
    batch = next(iter(loader))
    lr_img, hr = batch["lr"][:n].to(device), batch["hr"][:n].to(device)
    was_training = model.training
    model.eval()
    sr = model(lr_img).float().clamp(0, 1)
    model.train(was_training)
    nearest = torch.nn.functional.interpolate(lr_img, size=hr.shape[-1], mode="nearest")
    cols = [nearest, upsample(lr_img), sr, hr]
    rows = [torch.cat([c[i] for c in cols], dim=2) for i in range(len(hr))]
    grid = torch.cat(rows, dim=1)
    return (grid.permute(1, 2, 0).cpu().numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)
