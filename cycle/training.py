"""The one training loop every stage uses.

It owns what stages share: AMP (`cycle.device`), gradient accumulation and clipping, a
per-optimizer-step LR schedule with warm-up, EMA, periodic atomic checkpoints and
auto-resume from `<run dir>/checkpoints/last.pt`, a NaN guard that keeps the last
good checkpoint, preemption (save, then hand the signal to submitit to requeue),
progress bars and metric logging. Stages supply `step_fn` and `validate_fn`.

Data-parallel (`cycle.distributed`): rank 0's weights are broadcast at the start, gradients are averaged over
ranks before clipping, a stop (preemption signal, non-finite loss) on one rank stops every rank at the same
step, and only rank 0 writes checkpoints (the others wait for them where they read them).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from cycle import distributed
from cycle.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from cycle.device import amp_dtype, autocast
from cycle.errors import Diverged

log = logging.getLogger(__name__)

DIVERGENCE_HINT = ("Lower the learning rate or the loss weights, keep trainer.grad_clip > 0, or try trainer.amp=off; "
                   "then re-run (resumes) or add resume=false (starts over).")
RESUME_HINT = ("Re-run with resume=false to start this stage over (the run directory's contents move to "
               "history/, nothing is deleted).")


class NonFiniteLoss(Diverged):
    """A non-finite loss, gradient norm or weight: the step is not applied and nothing is saved."""


# ---------------------------------------------------------------- EMA
class EMA:
    """Exponential moving average of a module's state (params and buffers): timm's `ModelEmaV3`.

    The decay warms up as min(decay, (1 + n) / (10 + n)) at the n-th update, the schedule this project
    always used: timm's warm-up 1 - (1 + s / gamma) ** -power with gamma=9, power=1 is that curve at
    s = n + 1. The checkpoint entry stays {"decay", "num_updates", "shadow": state_dict of tensors}, so it
    loads with weights_only=True and older checkpoints resume.
    """

    def __init__(self, module: nn.Module, decay: float = 0.999):
        from timm.utils import ModelEmaV3  # timm is imported lazily (slow), as in edgeface.backbones

        self.module = module
        self.decay = float(decay)
        self.num_updates = 0
        self._ema = ModelEmaV3(module, decay=self.decay, use_warmup=True, warmup_gamma=9.0, warmup_power=1.0)

    @property
    def shadow(self) -> dict[str, torch.Tensor]:
        return self._ema.module.state_dict()

    @torch.no_grad()
    def update(self) -> None:
        self.num_updates += 1
        # timm's get_decay(step) uses s = step - 1; s = n + 1 gives (1 + n) / (10 + n)
        self._ema.update(self.module, step=self.num_updates + 2)

    @contextlib.contextmanager
    def applied(self):
        """Temporarily load the EMA weights into the module (validation, export)."""
        backup = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        self.module.load_state_dict(self.shadow)
        try:
            yield self.module
        finally:
            self.module.load_state_dict(backup)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.decay = self._ema.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        self._ema.module.load_state_dict(state["shadow"])


# ---------------------------------------------------------------- schedule
def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                  min_factor: float = 0.01) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to `min_factor`, stepped per optimizer step."""
    total_steps = max(1, int(total_steps))
    warmup_steps = min(int(warmup_steps), total_steps - 1) if total_steps > 1 else 0

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------- preemption
class PreemptionGuard:
    """Turns SIGUSR1/SIGUSR2/SIGTERM into a flag checked at step boundaries.

    The loop saves its checkpoint first, then calls the handler that was installed
    before (submitit's, which requeues the job) or exits.
    """

    SIGNALS = tuple(s for s in (getattr(signal, "SIGUSR1", None), getattr(signal, "SIGUSR2", None),
                                signal.SIGTERM) if s is not None)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        try:
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handler)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = {}
        return self

    def _handler(self, signum, frame):
        log.warning("received signal %d: will checkpoint at the next step", signum)
        self.received = signum

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        return False

    def forward_signal(self) -> None:
        signum = self.received
        prev = self._previous.get(signum)
        self.__exit__()
        if callable(prev):
            prev(signum, None)  # submitit: checkpoint() -> requeue
        raise SystemExit(f"stopped by signal {signum} after saving the checkpoint; re-run to resume")


# ---------------------------------------------------------------- loop
def epoch_line(tag: str, row: Mapping[str, float], epochs: int, select: str | None = None) -> str:
    """One line per epoch for the console and train.log: the epoch, the losses, every validation metric
    (the selecting one first, starred) and the time, e.g.
    `initial epoch 3/5: train/loss=0.4121 | *val/psnr=24.31 val/auc=0.8123 ... | 12.4 s`."""
    def fmt(k):
        v = row[k]
        return f"{k}={v:.4g}" if isinstance(v, (int, float)) else f"{k}={v}"
    train = [fmt(k) for k in row if k == "train/loss"]
    val = sorted((k for k in row if k.startswith("val/")), key=lambda k: k != select)
    shown = [("*" if k == select else "") + fmt(k) for k in val]
    parts = [" ".join(train), " ".join(shown), f"{row.get('time/epoch_s', 0.0):.1f} s"]
    return f"{tag} epoch {int(row.get('epoch', 0))}/{epochs}: " + " | ".join(p for p in parts if p)


@dataclass
class FitResult:
    best: dict[str, float]
    last: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    step: int = 0


class Trainer:
    """Trains `modules` with `optimizer` for `epochs` over a loader; resumable."""

    def __init__(self, *, tcfg: Mapping, run_dir: str | Path, logger, device: torch.device,
                 modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer, epochs: int,
                 steps_per_epoch: int, tag: str = "main", ema: EMA | None = None,
                 warmup_steps: int | None = None, resume: bool = True, health=None,
                 hint: str = DIVERGENCE_HINT):
        self.t = tcfg
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.logger = logger
        self.device = device
        self.modules = modules
        self.optimizer = optimizer
        self.epochs = int(epochs)
        self.accum = max(1, int(tcfg.get("grad_accum", 1)))
        limit = tcfg.get("limit_train_batches")
        self.batches_per_epoch = int(steps_per_epoch) if not limit else min(int(steps_per_epoch), int(limit))
        self.steps_per_epoch = max(1, self.batches_per_epoch // self.accum)
        self.total_steps = self.epochs * self.steps_per_epoch
        if warmup_steps is None:
            warmup_steps = int(tcfg.get("warmup_frac", 0.05) * self.total_steps)
        self.scheduler = warmup_cosine(optimizer, self.total_steps, warmup_steps)
        self.ema = ema
        self.tag = tag
        self.dtype = amp_dtype(device, tcfg.get("amp", "auto"))
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.grad_clip = float(tcfg.get("grad_clip", 0) or 0)
        self.health = health
        self.hint = hint  # the knobs a divergence message names
        self.saved: tuple[Path, int] | None = None  # newest last.pt written (or resumed from) and its step
        self.step = 0
        self.epoch = 0
        self.history: list[dict[str, float]] = []
        self.best: dict[str, float] = {}
        self.resumed = False
        if resume:
            self._try_resume()
        distributed.broadcast_modules(self.modules.values())  # every rank starts from rank 0's weights

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": "vlr-train-state", "tag": self.tag, "step": self.step, "epoch": self.epoch,
            "modules": {k: m.state_dict() for k, m in self.modules.items()},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None, "scaler": self.scaler.state_dict(),
            "rng": rng_state(), "history": self.history, "best": self.best,
            "logger_run_id": getattr(self.logger, "run_id", None),
        }

    def save(self, name: str = "last.pt") -> Path:
        path = self.ckpt_dir / name
        if distributed.is_main():  # ranks hold the same weights; the RNG saved is rank 0's
            save_checkpoint(self.state_dict(), path)
        self.saved = (path, self.step)
        return path

    def _try_resume(self) -> None:
        path = self.ckpt_dir / "last.pt"
        if not path.is_file() or self.done_marker().is_file():  # a finished phase restores from its marker
            return
        state = load_checkpoint(path, map_location=self.device, hint=RESUME_HINT)
        if state.get("tag") != self.tag:
            return  # belongs to another phase of this stage
        for k, m in self.modules.items():
            m.load_state_dict(state["modules"][k])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.history, self.best = list(state["history"]), dict(state["best"])
        self.resumed = True
        self.saved = (path, self.step)
        log.info("resumed %s from %s at step %d (epoch %d)", self.tag, path, self.step, self.epoch)

    def done_marker(self) -> Path:
        return self.ckpt_dir / f"{self.tag}.done.pt"

    # -------------------------------------------------------------- loop
    def fit(self, loader, step_fn: Callable[[dict], tuple[torch.Tensor, dict]],
            validate_fn: Callable[[int], dict[str, float]] | None = None, *, select: str | None = None,
            mode: str = "max", set_epoch: Callable[[int], None] | None = None) -> FitResult:
        """Run the remaining epochs. `select` names the validation metric that picks
        `checkpoints/<tag>.best.pt` (EMA weights when EMA is on)."""
        done = self.done_marker()
        if done.is_file():  # this phase finished earlier: restore its final weights
            state = load_checkpoint(done, map_location=self.device, hint=RESUME_HINT)
            for k, m in self.modules.items():
                m.load_state_dict(state["modules"][k])
            log.info("%s already finished (%s): skipping", self.tag, done)
            return FitResult(best=state["best"], last=state["last"], history=state["history"],
                             step=state["step"])
        sign = 1.0 if mode == "max" else -1.0
        last: dict[str, float] = self.history[-1] if self.history else {}
        log_every = int(self.t.get("log_every", 10))
        ckpt_every = int(self.t.get("ckpt_every", 200))
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.tag, dynamic_ncols=True,
                   disable=not self.t.get("progress", True) or not distributed.is_main(), mininterval=2.0)
        stop = False
        with PreemptionGuard() as guard:
            while self.epoch < self.epochs:
                for m in self.modules.values():
                    m.train()
                if set_epoch is not None:
                    set_epoch(self.epoch)
                skip = (self.step - self.epoch * self.steps_per_epoch) * self.accum  # mid-epoch resume
                sums: dict[str, float] = {}
                count = 0
                t0 = time.time()
                self.optimizer.zero_grad(set_to_none=True)
                for i, batch in enumerate(loader):
                    if i >= self.steps_per_epoch * self.accum:
                        break
                    if i < skip:
                        continue
                    terms = self._micro_step(batch, step_fn, last_micro=(i + 1) % self.accum == 0)
                    for k, v in terms.items():
                        sums[k] = sums.get(k, 0.0) + v
                    count += 1
                    if (i + 1) % self.accum:
                        continue
                    self.step += 1
                    bar.update(1)
                    if self.step % log_every == 0:
                        row = {f"train/{k}": v / count for k, v in sums.items()}
                        row["lr"] = self.optimizer.param_groups[0]["lr"]
                        self.logger.log(row, self.step)
                        bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in list(row.items())[:4]})
                    if distributed.any_rank(guard.received is not None, self.device):
                        guard.received = guard.received or signal.SIGUSR2  # a signal another rank got
                        self.save()
                        bar.close()
                        guard.forward_signal()
                    if ckpt_every and self.step % ckpt_every == 0:
                        self.save()
                epoch_row = {f"train/{k}": v / max(1, count) for k, v in sums.items()}
                epoch_row["epoch"] = self.epoch + 1
                epoch_row["time/epoch_s"] = time.time() - t0
                self._sync_buffers()
                if validate_fn is not None and ((self.epoch + 1) % int(self.t.get("val_every", 1)) == 0
                                                or self.epoch + 1 == self.epochs):
                    for m in self.modules.values():
                        m.eval()
                    with self._ema_applied():
                        val = validate_fn(self.epoch)
                    epoch_row.update(val)
                    better = select in val and (select not in self.best
                                                or sign * val[select] > sign * self.best[select])
                    if select and better:
                        self.best = dict(epoch_row)
                        self._save_weights(f"{self.tag}.best.pt")
                self.epoch += 1
                self.history.append(epoch_row)
                last = epoch_row
                self.logger.log(epoch_row, self.step)
                log.info("%s", epoch_line(self.tag, epoch_row, self.epochs, select))
                if self.health is not None:
                    for code, msg in self.health.check_epoch(self.history):
                        self.logger.warn(code, msg, self.step)
                self.save()
                stop = distributed.any_rank(guard.received is not None, self.device)
                if stop and self.epoch < self.epochs:
                    guard.received = guard.received or signal.SIGUSR2
                    bar.close()
                    guard.forward_signal()  # signal during validation/saving: state is saved, requeue now
            if stop:  # after the last epoch: finish the phase, then requeue
                guard.received = guard.received or signal.SIGUSR2
                self._finish(done, last)
                bar.close()
                guard.forward_signal()
        bar.close()
        self._finish(done, last)
        return FitResult(best=self.best, last=last, history=self.history, step=self.step)

    def _finish(self, done: Path, last: dict[str, float]) -> None:
        if not self.best:
            self.best = dict(last)
            self._save_weights(f"{self.tag}.best.pt")
        # the done marker holds the raw final weights (what the modules hold now); best.pt holds EMA
        self._save_weights(done.name, ema=False, extra={"best": self.best, "last": last,
                                                        "history": self.history, "step": self.step})

    def _micro_step(self, batch, step_fn, last_micro: bool) -> dict[str, float]:
        try:
            with autocast(self.device, self.dtype):
                loss, terms = step_fn(batch)
            if distributed.any_rank(not bool(torch.isfinite(loss.detach()).all()), self.device):
                bad = [k for k, v in terms.items() if not math.isfinite(float(v))] or ["loss"]
                raise self._diverged(f"non-finite loss (terms: {', '.join(bad)})")
            self.scaler.scale(loss / self.accum).backward()
            if last_micro:
                distributed.average_gradients(p for g in self.optimizer.param_groups for p in g["params"])
                params = [p for g in self.optimizer.param_groups for p in g["params"]]
                self.scaler.unscale_(self.optimizer)
                # the norm before clipping; clipping an infinite gradient would turn it into NaN weights
                norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip > 0 else math.inf)
                if not self.scaler.is_enabled() and not torch.isfinite(norm):  # fp16: the scaler skips the step
                    raise self._diverged(f"non-finite gradient norm ({float(norm)}) with a finite loss")
                self.scaler.step(self.optimizer)
                if not _all_finite(params):
                    raise self._diverged("non-finite weights after the update (the step overflowed)")
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                if self.ema is not None:
                    self.ema.update()
        except torch.cuda.OutOfMemoryError as e:
            raise RuntimeError(
                f"CUDA out of memory at trainer.batch_size={self.t.get('batch_size')}. Lower trainer.batch_size "
                "(and raise trainer.grad_accum to keep the effective batch), or use trainer.amp=auto.") from e
        out = {"loss": float(loss.detach())}
        out.update({k: float(v) for k, v in terms.items() if k != "loss"})
        return out

    def _diverged(self, what: str) -> NonFiniteLoss:
        if self.saved:
            where = (f"The newest checkpoint, written before it, is {self.saved[0]} (step {self.saved[1]}); "
                     "a re-run resumes from it.")
        else:
            where = "No checkpoint was written before it."
        return NonFiniteLoss(f"training diverged at step {self.step + 1} of {self.tag}: {what}. The update was not "
                             f"saved: no checkpoint or artifact holds non-finite values. {where} {self.hint}")

    def _sync_buffers(self) -> None:
        """Rank 0's buffers (BatchNorm statistics, which each rank updates from its own shard) on every rank,
        so validation sees the same model everywhere."""
        if distributed.world_size() > 1:
            mods = list(self.modules.values()) + ([self.ema._ema.module] if self.ema is not None else [])
            distributed.broadcast_modules(mods)

    def _ema_applied(self):
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def _save_weights(self, name: str, extra: dict | None = None, ema: bool = True) -> Path:
        with self._ema_applied() if ema else contextlib.nullcontext():
            state = {"modules": {k: copy.deepcopy(m.state_dict()) for k, m in self.modules.items()}}
        state.update(extra or {})
        path = self.ckpt_dir / name
        if distributed.is_main():
            save_checkpoint(state, path)
        return path

    def load_best(self) -> dict[str, float]:
        """Load the selected weights into the modules (what the stage publishes)."""
        distributed.barrier()  # rank 0 wrote them
        state = load_checkpoint(self.ckpt_dir / f"{self.tag}.best.pt", map_location=self.device, hint=RESUME_HINT)
        for k, m in self.modules.items():
            m.load_state_dict(state["modules"][k])
        return self.best


@torch.no_grad()
def _all_finite(params) -> bool:
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all()) if params else True
