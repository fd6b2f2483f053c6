"""The one training entry: compose the config, seed, resolve the device, dispatch to a stage.

    python train.py                              # full cycle at res=16 on embedded synthetic faces
    python train.py stage=cyclic res=32
    python train.py -m res=16,24,32 hydra/launcher=submitit_slurm
"""
from __future__ import annotations

import logging
import os
import random
import shutil
import time
import warnings
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_method
from omegaconf import DictConfig, open_dict

import cycle.config  # noqa: F401  (registers the typed schema: res in 16/24/32)

log = logging.getLogger("train")
# Our launcher YAMLs deliberately shadow the plugin's schemas of the same name (to set our defaults).
warnings.filterwarnings("ignore", message=r"(?s).*hydra/launcher/submitit_.*validated against ConfigStore schema",
                        category=UserWarning)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare(cfg: DictConfig) -> DictConfig:
    """Make paths absolute (jobs may run elsewhere) and check the device early."""
    from cycle.training import resolve_device

    root = Path(cfg.paths.root)
    if not root.is_absolute():
        base = hydra.utils.get_original_cwd() if HydraConfig.initialized() else os.getcwd()
        with open_dict(cfg):
            cfg.paths.root = str((Path(base) / root).resolve())
    device = resolve_device(cfg.device)  # a missing CUDA fails here, before any work
    n_gpu = torch.cuda.device_count() if device.type == "cuda" else 0
    if n_gpu > 1 and str(cfg.device) in ("auto", "cuda") and HydraConfig.initialized():
        # local multirun: pin job N to GPU N (mod count) so parallel jobs do not share one GPU
        job_num = HydraConfig.get().job.get("num")
        if job_num is not None:
            with open_dict(cfg):
                cfg.device = f"cuda:{int(job_num) % n_gpu}"
            log.info("job %s pinned to %s", job_num, cfg.device)
    return cfg


def run_stage(cfg: DictConfig, out_dir: str | Path) -> dict[str, float]:
    """Call the stage function named by `cfg.stage.fn`: `run(cfg, out_dir) -> metrics`."""
    name = cfg.stage.name
    try:
        fn = get_method(cfg.stage.fn)
    except Exception as e:
        raise NotImplementedError(f"stage '{name}' is not available: {cfg.stage.fn} could not be loaded ({e})") from e
    return fn(cfg, Path(out_dir))


def archive_previous(out_dir: Path) -> Path | None:
    """resume=false in a used run directory: move the old results aside, never overwrite them."""
    old = [p for p in out_dir.iterdir() if not p.name.startswith(".") and p.suffix != ".log" and p.name != "archive"]
    if not old:
        return None
    dest = out_dir / "archive" / time.strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True)
    for p in old:
        shutil.move(str(p), dest / p.name)
    log.warning("resume=false: previous contents of %s moved to %s", out_dir, dest)
    return dest


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    cfg = prepare(cfg)
    seed_everything(int(cfg.seed))
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    log.info("stage=%s res=%s name=%s -> %s", cfg.stage.name, cfg.res, cfg.name, out_dir)
    if cfg.dry_run and cfg.stage.name != "cycle":
        from cycle.pipeline import format_plan, step_for
        print(format_plan(cfg, [step_for(cfg, cfg.stage.name, int(cfg.stage.get("cycle_index", 1)))]))
        return None
    if not cfg.resume:
        archive_previous(out_dir)
    metrics = run_stage(cfg, out_dir)
    if metrics:
        log.info("final metrics: %s", {k: round(float(v), 4) for k, v in metrics.items()})
    return None


if __name__ == "__main__":
    main()
