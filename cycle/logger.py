"""Metrics logging: always a local `metrics.jsonl`, optionally wandb, and a PNG of the curves.

wandb runs offline unless `WANDB_MODE` says otherwise; the run id is kept in the
run directory so a resumed job continues the same wandb run.
"""
from __future__ import annotations

import json
import logging
import math
import os
import secrets
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig

from cycle.config import to_plain

log = logging.getLogger(__name__)
FINAL_METRICS = "final_metrics.json"  # a run's final metrics (train.py writes it; sweep summaries read it)
_said: set[tuple[str, str]] = set()


def log_once(logger: logging.Logger, level: int, msg: str, *args) -> None:
    """Log a message the first time this process produces it (same text), at DEBUG afterwards: a
    protocol recomputed every validation epoch says what it did once, not 34 times."""
    key = (logger.name, msg % args if args else msg)
    logger.log(level if key not in _said else logging.DEBUG, msg, *args)
    _said.add(key)


class MetricsLogger:
    def __init__(self, run_dir: str | os.PathLike, cfg: DictConfig | None = None, *, backend: str = "none",
                 project: str = "vlr-cyclic", name: str | None = None, group: str | None = None,
                 mode: str = "offline", tags: list[str] | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._file = self.path.open("a")
        self._wandb = None
        self.run_id: str | None = None
        self.select: str | None = None  # the metric that selects the checkpoint: always plotted
        if backend == "wandb":
            self._init_wandb(cfg, project, name, group, mode, tags)
        elif backend not in ("none", None):
            raise ValueError(f"unknown logger backend '{backend}' (use wandb or none)")

    def _init_wandb(self, cfg, project, name, group, mode, tags):
        import wandb  # imported lazily: slow, and optional at run time

        id_file = self.run_dir / "wandb_run_id.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id)
        config = to_plain(cfg) if cfg is not None else None
        self._wandb = wandb.init(project=project, name=name, group=group, id=run_id, resume="allow",
                                 dir=str(self.run_dir), config=config, tags=tags,
                                 mode=os.environ.get("WANDB_MODE", mode))
        self.run_id = run_id

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        row = {"step": int(step), "time": time.time()}
        for k, v in metrics.items():
            row[k] = _scalar(v)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k not in ("step", "time")}, step=int(step))

    def meta(self, step: int, **entries: Any) -> None:
        """Facts about the run (e.g. world_size): one `{"meta": {...}}` row (no curve), and wandb's config."""
        self._file.write(json.dumps({"step": int(step), "time": time.time(), "meta": entries}) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.config.update(entries, allow_val_change=True)

    def warn(self, code: str, message: str, step: int) -> None:
        """A training-health warning: console, metrics.jsonl and wandb."""
        log.warning("[%s] %s", code, message)
        self._file.write(json.dumps({"step": int(step), "time": time.time(), "warning": code,
                                     "message": message}) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({f"warnings/{code}": 1}, step=int(step))

    def log_images(self, key: str, image, step: int, caption: str | None = None) -> None:
        """`image`: HxWx3 uint8 array, also written as PNG in the run directory."""
        from PIL import Image

        out = self.run_dir / "samples"
        out.mkdir(exist_ok=True)
        Image.fromarray(image).save(out / f"{key.replace('/', '_')}_{step:07d}.png")
        if self._wandb is not None:
            import wandb
            self._wandb.log({key: wandb.Image(image, caption=caption)}, step=int(step))

    def summary(self, metrics: Mapping[str, Any]) -> None:
        if self._wandb is not None:
            for k, v in metrics.items():
                self._wandb.summary[k] = _scalar(v)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
            try:
                plot_metrics(self.path, self.run_dir / "curves.png", select=self.select)
            except Exception as e:  # a plot must never lose a finished run
                log.warning("could not plot curves: %s", e)
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _scalar(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN; keep it visible
    return v


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.is_file() else []


def panel_keys(keys, select: str | None = None, max_panels: int = 12) -> list[str]:
    """The curves worth a panel, most important first: the selection metric, every loss, the other
    validation metrics, then the rest (epoch, timings) while room is left; the first two groups always."""
    keys = [k for k in keys if not k.startswith("lr")]
    losses = [k for k in keys if k.startswith("train/") or k.endswith("loss")]
    must = list(dict.fromkeys(([select] if select in keys else []) + sorted(losses)))
    vals = sorted(k for k in keys if k.startswith("val/") and k not in must)
    rest = sorted(k for k in keys if k not in must and k not in vals)
    return must + (vals + rest)[:max(0, max_panels - len(must))]


def plot_metrics(jsonl: str | os.PathLike, png: str | os.PathLike, max_panels: int = 12,
                 select: str | None = None) -> Path | None:
    """One panel per logged numeric key (losses, PSNR, verification), against step; `select` (the metric
    that picks the checkpoint) and the losses always get one."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for row in read_metrics(jsonl):
        for k, v in row.items():
            if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool):
                series[k].append((row["step"], float(v)))
    keys = panel_keys(list(series), select, max_panels)
    if not keys:
        return None
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        steps, vals = zip(*series[k])
        ax.plot(steps, vals, lw=1.2, marker="o" if len(vals) <= 30 else None, markersize=3)  # epochs: points
        ax.set_title(k + ("  (selects the checkpoint)" if k == select else ""), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return Path(png)


def sweep_point() -> str:
    """The overrides that distinguish this job from the other points of its sweep (Hydra's
    `override_dirname`, without res/stage/name and other keys listed in train.yaml); '' outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    return str(HydraConfig.get().job.get("override_dirname") or "") if HydraConfig.initialized() else ""


class NullLogger:
    """What ranks other than 0 of a data-parallel job log to: nothing (rank 0 writes metrics.jsonl, wandb,
    sample grids). Warnings still reach the console."""

    run_id: str | None = None
    select: str | None = None

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        pass

    def warn(self, code: str, message: str, step: int) -> None:
        log.warning("[%s] %s", code, message)

    def log_images(self, key: str, image, step: int, caption: str | None = None) -> None:
        pass

    def meta(self, step: int, **entries: Any) -> None:
        pass

    def summary(self, metrics: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def build_logger(cfg: DictConfig, run_dir: str | os.PathLike, stage: str, select: str | None = None,
                 main: bool = True) -> MetricsLogger | NullLogger:
    """wandb run `res<r>/<stage>[/<overrides>]` in group `<name>[/<overrides>]`: every point of a sweep is
    told apart by name, and the stages of one point (stage=cycle) share a group. `main=False` (a rank other
    than 0 of a data-parallel job): a NullLogger."""
    if not main:
        return NullLogger()
    lc = cfg.logger
    point = sweep_point()
    group = lc.get("group") or cfg.name
    logger = MetricsLogger(run_dir, cfg, backend=lc.backend, project=lc.get("project", "vlr-cyclic"),
                           name="/".join(filter(None, (f"res{cfg.res}/{stage}", point)))[:128],
                           group="/".join(filter(None, (str(group), point)))[:128],  # wandb's limit
                           mode=lc.get("mode", "offline"), tags=[f"res{cfg.res}", stage])
    logger.select = select
    return logger
