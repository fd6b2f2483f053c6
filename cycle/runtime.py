"""Start-up shared by `train.py` and `python -m eval`: absolute paths, the device check, seeding, and the
check that the run directory can be created (`OutputCheck`, a Hydra callback: Hydra creates it before
any of our code runs)."""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.utils import get_original_cwd
from omegaconf import DictConfig, open_dict

from cycle import distributed
from cycle.errors import OutputError, exit_on
from cycle.files import ensure_writable
from cycle.device import resolve_device

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare(cfg: DictConfig) -> DictConfig:
    """Make paths absolute (jobs may run elsewhere), check the device early, and join the process group of a
    data-parallel job (torchrun / Slurm tasks: `cycle.distributed`), pinned to this process's GPU."""
    root = Path(cfg.paths.root)
    if not root.is_absolute():
        base = get_original_cwd() if HydraConfig.initialized() else os.getcwd()
        with open_dict(cfg):
            cfg.paths.root = str((Path(base) / root).resolve())
    device = resolve_device(cfg.device)  # a missing CUDA fails here, before any work
    if not distributed.launcher_env().main:  # one train.log per run directory, rank 0's; the console shows all
        root_log = logging.getLogger()
        for handler in [h for h in root_log.handlers if isinstance(h, logging.FileHandler)]:
            root_log.removeHandler(handler)
            handler.close()
    device, env = distributed.init(device)
    if env.world_size > 1:
        with open_dict(cfg):
            cfg.device = str(device)
        return cfg
    n_gpu = torch.cuda.device_count() if device.type == "cuda" else 0
    if n_gpu > 1 and str(cfg.device) in ("auto", "cuda") and HydraConfig.initialized():
        # local multirun: pin job N to GPU N (mod count) so parallel jobs do not share one GPU
        job_num = HydraConfig.get().job.get("num")
        if job_num is not None:
            with open_dict(cfg):
                cfg.device = f"cuda:{int(job_num) % n_gpu}"
            log.info("job %s pinned to %s", job_num, cfg.device)
    return cfg


class OutputCheck(Callback):
    """Create the run (or sweep) directory before Hydra does, so that a read-only, full or impossible
    output path ends in one line naming the path and the fix instead of Hydra's traceback."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._make(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._make(config.hydra.sweep.dir)

    @staticmethod
    def _make(path) -> None:
        try:
            ensure_writable(str(path), "run directory")
        except OutputError as e:
            exit_on(e)  # SystemExit: Hydra turns a callback's exceptions into warnings
