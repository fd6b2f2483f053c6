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

from cycle.artifacts import ArtifactStore, cycle_artifacts
from cycle.config import to_plain
from cycle.data import stage_loaders
from cycle.degrade import upsample
from cycle.health import HealthMonitor
from cycle.logger import build_logger
from cycle.training import EMA, Trainer, resolve_device
from cycle.validation import verification
from dsr.losses import DSRLoss, freeze
from dsr.model import describe
from edgeface.supervisor import load_supervisor
from eval.metrics import psnr, ssim

log = logging.getLogger(__name__)


def run_initial(cfg: DictConfig, out_dir: Path) -> dict[str, float]:
    return _run(cfg, Path(out_dir), "initial")


def run_cyclic(cfg: DictConfig, out_dir: Path) -> dict[str, float]:
    return _run(cfg, Path(out_dir), "cyclic")


def stage_hparams(cfg: DictConfig, kind: str, cycle_index: int) -> dict:
    """Epochs, LR and loss weights of this stage (2nd-cycle values for cycle_index > 1)."""
    s = cfg.stages[kind]
    hp = {"epochs": int(s.epochs), "lr": float(s.lr), "loss": to_plain(s.loss)}
    if kind == "cyclic" and cycle_index > 1:
        sc = s.second_cycle
        hp.update(epochs=int(sc.epochs), lr=float(sc.lr))
        hp["loss"].update(identity=float(sc.lambda_identity), feature_match=float(sc.lambda_feature_match))
    return hp


def load_dsr(cfg: DictConfig, path: str | Path) -> torch.nn.Module:
    """Build the configured DSR for cfg.res and load a published DSR artifact into it (strict)."""
    from cycle.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    if int(state.get("res", cfg.res)) != int(cfg.res):
        raise ValueError(f"{path} is a DSR for res={state['res']}, not res={cfg.res}")
    model = instantiate(cfg.dsr)
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path} does not match the configured DSR architecture (cfg.dsr): {e}") from e
    return model.eval()


def _run(cfg: DictConfig, out_dir: Path, kind: str) -> dict[str, float]:
    device = resolve_device(cfg.device)
    res = int(cfg.res)
    idx = int(cfg.stage.get("cycle_index", 1)) if kind == "cyclic" else 1
    names = cycle_artifacts(idx)
    store = ArtifactStore(cfg.paths.artifacts_dir, res)
    hp = stage_hparams(cfg, kind, idx)
    s = cfg.stages[kind]
    t = cfg.trainer
    label = kind if idx == 1 else f"{kind}{idx}"

    if kind == "cyclic":
        dsr_path = store.require(names["dsr_in"])  # fails naming `stage=initial` when absent
        sup_name = names["edgeface_out"]
        supervisor = load_supervisor(cfg, store, sup_name)
        model = load_dsr(cfg, dsr_path)
        parents, out_name = [names["dsr_in"], sup_name], names["dsr_out"]
        reference = store.manifest(names["dsr_in"]).get("metrics", {})
    else:
        supervisor = load_supervisor(cfg, store, None)
        model = instantiate(cfg.dsr)
        parents = [] if cfg.edgeface.get("weights") else ["edgeface_pretrained"]
        out_name, reference = "dsr_initial", None
    model = model.to(device)
    supervisor = freeze(supervisor.to(device))
    log.info("%s", describe(model, res))

    _, train_loader, val_loader = stage_loaders(cfg, res)
    loss_fn = DSRLoss(supervisor, **hp["loss"]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], betas=tuple(s.betas), weight_decay=float(s.weight_decay))
    train_model = torch.compile(model) if cfg.get("compile") else model

    logger = build_logger(cfg, out_dir, label)
    try:
        trainer = Trainer(tcfg={**to_plain(t), "warmup_frac": float(s.warmup_frac)},
                          run_dir=out_dir, logger=logger, device=device, modules={"dsr": model}, optimizer=opt,
                          epochs=hp["epochs"], steps_per_epoch=len(train_loader), tag=label,
                          ema=EMA(model, float(s.ema_decay)), resume=bool(cfg.resume), health=HealthMonitor())

        def step_fn(batch):
            lr_img = batch["lr"].to(device, non_blocking=True)
            hr = batch["hr"].to(device, non_blocking=True)
            sr = train_model(lr_img)
            loss, terms = loss_fn(sr, hr, batch["label"].to(device))
            return loss, terms

        def validate(epoch: int) -> dict[str, float]:
            out = evaluate_dsr(model, supervisor, loss_fn, val_loader, device, num_pairs=int(t.val_pairs),
                               seed=int(cfg.seed), limit=t.get("limit_val_batches"))
            if epoch % int(t.sample_every) == 0 or epoch + 1 == hp["epochs"]:
                logger.log_images("samples/val", sample_grid(model, val_loader, device), trainer.step,
                                  caption="VLR | bicubic | SR | HR")
            return out

        result = trainer.fit(train_loader, step_fn, validate, select=str(s.select), mode="max",
                             set_epoch=getattr(train_loader, "set_epoch", None))
        metrics = trainer.load_best()
        for code, msg in HealthMonitor().check_stage(result.history, reference=reference):
            logger.warn(code, msg, trainer.step)
        metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        store.publish(out_name, {"format": "dsr", "res": res, "model": model.state_dict(),
                                 "arch": to_plain(cfg.dsr)},
                      cfg=cfg, metrics=metrics, parents=parents, run_dir=out_dir)
        logger.summary(metrics)
        return metrics
    finally:
        logger.close()


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
