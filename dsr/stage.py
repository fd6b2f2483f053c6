"""Stages `initial` (DSR from scratch) and `cyclic` (DSR continued with the fine-tuned EdgeFace).

The supervisor EdgeFace is frozen but differentiable: its weights never change, the
identity and feature-match losses send gradients through it into the DSR.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from cycle.config import to_plain
from cycle.degrade import upsample
from cycle.health import HealthMonitor
from cycle.models import freeze
from cycle.runner import StageRun
from cycle.training import EMA
from dsr.losses import DSRLoss
from dsr.model import describe
from eval.metrics import psnr, sampling_noise, ssim
from eval.validation import verification

log = logging.getLogger(__name__)


def run_initial(cfg: DictConfig, out_dir: Path) -> dict[str, float]:
    return DSRStage(cfg, out_dir, "initial").run()


def run_cyclic(cfg: DictConfig, out_dir: Path) -> dict[str, float]:
    return DSRStage(cfg, out_dir, "cyclic").run()


class DSRStage(StageRun):
    """`initial`: a new DSR supervised by the pretrained EdgeFace. `cyclic`: the previous cycle's DSR,
    supervised by this cycle's fine-tuned EdgeFace (inputs and names: `cycle.stages`)."""

    def build(self) -> None:
        s, cfg = self.settings, self.cfg
        if self.spec.name == "cyclic":
            supervisor = self.load_input(1)
            model = self.load_input(0)
            self.reference = self.store.manifest(self.inputs[0]).get("metrics", {})
        else:
            supervisor = self.load_input(0)
            model = instantiate(cfg.dsr)
            self.reference = None
        self.model = model.to(self.device)
        self.supervisor = freeze(supervisor)
        log.info("%s", describe(self.model, self.res))
        self.loaders()
        self.loss_fn = DSRLoss(self.supervisor, **to_plain(s.loss)).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=float(s.lr), betas=tuple(s.betas),
                                           weight_decay=float(s.weight_decay))
        self.train_model = self.compiled(self.model)
        self.modules, self.ema = {"dsr": self.model}, EMA(self.model, float(s.ema_decay))
        self.select, self.mode = str(s.select), "max"

    def step(self, batch):
        lr_img = batch["lr"].to(self.device, non_blocking=True)
        hr = batch["hr"].to(self.device, non_blocking=True)
        sr = self.train_model(lr_img)
        return self.loss_fn(sr, hr, batch["label"].to(self.device))

    def validate(self, epoch: int) -> dict[str, float]:
        t = self.cfg.trainer
        out = evaluate_dsr(self.model, self.supervisor, self.loss_fn, self.val_loader, self.device,
                           num_pairs=int(t.val_pairs), seed=int(self.cfg.seed), limit=t.get("limit_val_batches"))
        if epoch % int(t.sample_every) == 0 or epoch + 1 == int(self.settings.epochs):
            self.logger.log_images("samples/val", sample_grid(self.model, self.val_loader, self.device),
                                   self.trainer.step, caption="VLR | bicubic | SR | HR")
        return out

    def fit(self) -> dict[str, float]:
        metrics = super().fit()
        noise = sampling_noise(int(self.cfg.trainer.val_pairs))  # differences below it are no regression
        for code, msg in HealthMonitor().check_stage(self.result.history, reference=self.reference, noise=noise):
            self.logger.warn(code, msg, self.trainer.step)
        return metrics

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
        a, b = supervisor(sr).float(), supervisor(hr).float()
        cos.append(torch.nn.functional.cosine_similarity(a, b).cpu())
        e_sr.append(a.cpu())
        e_hr.append(b.cpu())
        labels.append(batch["label"])
    model.train(was_training)
    n = sum(len(x) for x in psnrs)
    out = {"val/psnr": float(np.mean(np.concatenate(psnrs))), "val/ssim": float(np.mean(np.concatenate(ssims))),
           "val/psnr_bicubic": float(np.mean(np.concatenate(bic))),
           "val/identity_cos": float(torch.cat(cos).mean()), "val/loss": sum(losses) / max(1, n)}
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
