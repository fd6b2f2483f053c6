"""The one stage runner: the set-up every training stage shares, written once.

A stage subclasses `StageRun` and overrides only what is its own (the shape of BasicSR's `BaseModel`):

    build()          models, loss, optimizer; call `self.loaders()` and `self.load_input(i)` where needed
    step(batch)      -> (loss, {term: value}) for one training batch
    validate(epoch)  -> {"val/...": value}
    payload()        -> the plain dict of tensors it publishes
    manifest_extra() -> what the stage adds to its artifact's manifest (optional)
    fit()            one `Trainer` over `self.modules` by default; a stage with phases overrides it

`run()` does the rest in a fixed order: the range check of the stage's settings (2nd-cycle values merged)
and the trainer's, `check()`, the run-directory lock (one writer; temp files of interrupted saves are
removed; checkpoints of another lineage are moved to history/, never resumed), a write probe of the artifact
folder, device, its input artifacts (a missing one names the command that builds it), `build()`, the logger
(closed in a `finally`), `fit()`, publishing the artifact with its manifest and parents.

In a data-parallel job (`cycle.distributed`) every rank runs all of this on its shard of the training data;
rank 0 alone logs, checkpoints and publishes, and the others wait for the published artifact.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from cycle import distributed
from cycle.artifacts import ArtifactStore, load_model
from cycle.checkpoint import remove_orphaned_temps
from cycle.config import to_plain
from cycle.data import stage_loaders
from cycle.errors import ConfigError
from cycle.files import HISTORY, ensure_writable, move_aside
from cycle.health import HealthMonitor
from cycle.lineage import digest
from cycle.lock import RunLock
from cycle.logger import MetricsLogger, build_logger
from cycle.runtime import seed_everything
from cycle.settings import check_stage
from cycle.stages import SECOND_CYCLE_KEY, stage_inputs, stage_settings, stage_spec
from cycle.device import resolve_device
from cycle.training import EMA, Trainer

log = logging.getLogger(__name__)
LINEAGE_STAMP = "lineage.json"  # in <run dir>/checkpoints: the key of the artifact these checkpoints train


def stage_seed(seed: int, stage: str, cycle_index: int) -> int:
    """The seed of one stage, derived from (seed, stage, cycle index)."""
    return int(digest([int(seed), stage, int(cycle_index)])[:8], 16)


class StageRun:
    hr_only = False   # True: loaders of HR faces only, no degradation (EdgeFace pretraining)

    def __init__(self, cfg: DictConfig, out_dir: str | Path, name: str):
        self.cfg, self.out_dir = cfg, Path(out_dir)
        self.spec = stage_spec(name)
        self.cycle_index = int(cfg.cycle.index) if self.spec.repeats else 1
        if self.cycle_index < 1:
            raise ConfigError(f"cycle.index={self.cycle_index} is not allowed: it must be an integer >= 1")
        self.label = self.spec.label(self.cycle_index)
        self.settings = stage_settings(cfg, name, self.cycle_index)
        self.inputs = stage_inputs(cfg, name, self.cycle_index)
        self.output = self.spec.artifact(self.cycle_index)
        self.res = int(cfg.res)
        self.device: torch.device | None = None
        self.store = ArtifactStore.for_config(cfg)
        self.health = HealthMonitor()
        self.logger: MetricsLogger | None = None
        # set by build() for the default fit()
        self.modules: dict[str, nn.Module] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.ema: EMA | None = None
        self.select, self.mode = "val/loss", "min"

    # ------------------------------------------------------------------ hooks
    def check(self) -> None:
        """Refuse a configuration this stage cannot run, before any work."""

    def build(self) -> None:
        raise NotImplementedError

    def step(self, batch: dict) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def validate(self, epoch: int) -> dict[str, float]:
        raise NotImplementedError

    def payload(self) -> dict[str, Any]:
        raise NotImplementedError

    def manifest_extra(self) -> dict[str, Any]:
        """What this stage adds to its artifact's manifest (e.g. the DSR stages' supervisor check)."""
        return {}

    def fit(self) -> dict[str, float]:
        """Train with one Trainer; returns the metrics of the selected (published) epoch."""
        self.trainer = self.make_trainer(modules=self.modules, optimizer=self.optimizer,
                                         epochs=int(self.settings.epochs), ema=self.ema)
        self.result = self.trainer.fit(self.train_loader, self.step, self.validate, select=self.select,
                                       mode=self.mode, set_epoch=getattr(self.train_loader, "set_epoch", None))
        return self.trainer.load_best()

    # ------------------------------------------------------------------ helpers for the hooks
    def loaders(self) -> None:
        """`self.splits`, `self.train_loader`, `self.val_loader` for this stage's resolution."""
        self.splits, self.train_loader, self.val_loader = stage_loaders(self.cfg, None if self.hr_only else self.res)
        for loader in (self.train_loader, self.val_loader):
            loader.device = self.device  # trainer.degrade_on=device: batches are finished there

    def require_inputs(self) -> None:
        """Fail now, naming the command to run, if an input artifact is missing (inputs in table order)."""
        for name in self.inputs:
            if name is not None:
                self.store.require(name)

    def load_input(self, i: int) -> nn.Module:
        """Input `i` of the stage table entry, on the device (None: the official EdgeFace weights)."""
        return load_model(self.cfg, self.store, self.inputs[i]).to(self.device)

    def make_trainer(self, *, modules, optimizer, epochs: int, tag: str | None = None, logger=None,
                     ema: EMA | None = None, **trainer_overrides) -> Trainer:
        tcfg = {**to_plain(self.cfg.trainer), "warmup_frac": float(self.settings.warmup_frac), **trainer_overrides}
        return Trainer(tcfg=tcfg, run_dir=self.out_dir, logger=logger or self.logger, device=self.device,
                       modules=modules, optimizer=optimizer, epochs=epochs,
                       steps_per_epoch=len(self.train_loader), tag=tag or self.label, ema=ema,
                       resume=bool(self.cfg.resume), health=self.health, hint=self.divergence_hint())

    def divergence_hint(self) -> str:
        """The knobs a divergence message names, with this stage's keys and values."""
        second = self.cycle_index > 1 and "lr" in (self.cfg.stages[self.spec.name].get(SECOND_CYCLE_KEY) or {})
        key = f"stages.{self.spec.name}{'.' + SECOND_CYCLE_KEY if second else ''}"
        loss = f" or the loss weights under stages.{self.spec.name}.loss" if "loss" in self.settings else ""
        return (f"Lower {key}.lr (now {float(self.settings.lr):g}){loss}, keep trainer.grad_clip > 0 (now "
                f"{self.cfg.trainer.grad_clip}), or try trainer.amp=off; then re-run (resumes from the newest "
                "checkpoint) or add resume=false (starts over).")

    def compiled(self, module: nn.Module) -> nn.Module:
        return torch.compile(module) if self.cfg.get("compile") else module

    def identities(self) -> dict[str, list[str]]:
        """Identity names this stage trained and selected on (recorded for the evaluation's overlap check)."""
        return {split: list(self.splits[split].identities) for split in ("train", "val") if split in self.splits}

    def claim_checkpoints(self) -> None:
        """Checkpoints in this run directory resume this lineage only. The same command can name another
        lineage (a default changed in conf/, a parent retrained): then what is there belongs to other
        settings, and is moved to history/ rather than resumed (or, if finished, published under this key)."""
        ckpt, key = self.out_dir / "checkpoints", self.store.key(self.output)
        stamp = ckpt / LINEAGE_STAMP
        found = json.loads(stamp.read_text()).get("key") if stamp.is_file() else None
        if ckpt.is_dir() and found != key and any(ckpt.iterdir()):
            log.warning("%s: the checkpoints in %s are of lineage %s, not %s (settings or inputs changed): "
                        "starting over", self.label, ckpt, found or "unknown", key)
            move_aside([ckpt], self.out_dir / HISTORY)
        ckpt.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps({"artifact": self.output, "key": key}) + "\n")

    @property
    def parents(self) -> list[str]:
        return [name for name in self.inputs if name is not None]

    # ------------------------------------------------------------------ the fixed order
    def run(self) -> dict[str, float]:
        check_stage(self.cfg, self.spec.name, self.cycle_index)
        self.check()
        with RunLock(self.out_dir):
            self.device, self.dist = distributed.init(resolve_device(self.cfg.device))
            if self.dist.main:  # the files of the run: rank 0's
                remove_orphaned_temps(self.out_dir / "checkpoints")
                ensure_writable(self.store.dir, "artifact folder")  # not found out after training
                # the artifact folder is shared: a temp file of this artifact an hour old is no live save's
                remove_orphaned_temps(self.store.dir, self.store.path(self.output).name, older_than_s=3600)
                self.claim_checkpoints()
            distributed.barrier()  # no rank looks at the checkpoints before rank 0 has claimed them
            self.require_inputs()
            # Each stage draws from its own seed: a stage gives the same weights whether the stages before it
            # ran in this process, in another one, or were skipped (cycle.skip). A resumed run restores the RNG.
            seed_everything(stage_seed(int(self.cfg.seed), self.spec.name, self.cycle_index))
            self.build()
            self.logger = build_logger(self.cfg, self.out_dir, self.label, select=self.select, main=self.dist.main)
            self.logger.meta(0, world_size=self.dist.world_size)
            try:
                metrics = self.fit()
                metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
                distributed.main_only(self.store.publish, self.output, self.payload(), cfg=self.cfg,
                                      metrics=metrics, parents=self.parents, run_dir=self.out_dir,
                                      identities=self.identities(),
                                      extra={"world_size": self.dist.world_size, **self.manifest_extra()})
                self.logger.summary(metrics)
                return metrics
            finally:
                self.logger.close()
