"""One table and one figure comparing every job of a sweep (multirun) on the chosen metrics.

    python -m eval.summary outputs/default                    # the latest sweep in that directory
    python -m eval.summary outputs/default/optuna/cyclic_res16 --metrics val/psnr,val/auc
    python -m eval.summary outputs/default --all              # every job ever run there

Every `python train.py -m ...` (and `python -m eval -m ...`) writes the same at its end, through the Hydra
callback `SweepSummary` (conf/train.yaml, hydra.callbacks). A job is a directory with `.hydra/overrides.yaml`;
its numbers are the `final_metrics.json` that train.py / eval write there. Columns: the overrides that
differ between the jobs, then the metrics (the best value per column in bold). Writes `summary.md` and
`summary.png` in the sweep directory.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from cycle.files import HISTORY
from cycle.logger import FINAL_METRICS
from eval import figures

log = logging.getLogger(__name__)

SUMMARY_MD, SUMMARY_PNG = "summary.md", "summary.png"
# Shown when no metric is asked for: these (the last part of a key: val/psnr, cyclic/auc), in this order.
DEFAULT_METRICS = ("psnr", "ssim", "auc", "tar@far=1e-2", "eer")
# Whose metrics come first: a stage's validation, then the evaluation's methods from the last DSR back.
SOURCE_ORDER = ("val", "cyclic2", "cyclic", "initial_ft", "initial", "bicubic", "hr")
LOWER_IS_BETTER = ("eer", "loss")
MAX_DEFAULT_COLUMNS = 8


@dataclass
class Job:
    dir: Path
    overrides: dict[str, str]
    metrics: dict[str, float | None] | None   # None: no final_metrics.json (failed, or still running)
    started: float


def collect(sweep_dir: str | Path, since: float | None = None) -> list[Job]:
    """The jobs under `sweep_dir` whose run started at or after `since` (a time stamp; None = all)."""
    jobs = []
    for ov in sorted(Path(sweep_dir).glob("**/.hydra/overrides.yaml")):
        run_dir = ov.parent.parent
        if HISTORY in run_dir.relative_to(sweep_dir).parts:
            continue
        started = ov.stat().st_mtime
        if since is not None and started < since:
            continue
        items = yaml.safe_load(ov.read_text()) or []
        overrides = dict(str(i).split("=", 1) if "=" in str(i) else (str(i), "") for i in items)
        fm = run_dir / FINAL_METRICS
        metrics = json.loads(fm.read_text()) if fm.is_file() else None
        jobs.append(Job(run_dir, overrides, metrics, started))
    return jobs


def latest_sweep_start(sweep_dir: str | Path) -> float | None:
    """When the latest sweep in `sweep_dir` started: Hydra writes multirun.yaml there first."""
    p = Path(sweep_dir) / "multirun.yaml"
    return p.stat().st_mtime - 1.0 if p.is_file() else None


def distinguishing(jobs: Sequence[Job]) -> list[str]:
    """The override keys whose value is not the same in every job (in the order first seen)."""
    keys = list(dict.fromkeys(k for j in jobs for k in j.overrides))
    return [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1]


def choose_metrics(jobs: Sequence[Job], metrics: Sequence[str] | None = None,
                   optimized: str | None = None) -> list[str]:
    """`metrics` if given; else `optimized` and the DEFAULT_METRICS of the most telling source first:
    `val/...` of a stage, or for stage=cycle the last DSR method (cyclic2, cyclic, then initial, ...)."""
    if metrics:
        return list(metrics)
    have = list(dict.fromkeys(k for j in jobs if j.metrics for k in j.metrics))
    prefixes = list(dict.fromkeys(k.rsplit("/", 1)[0] for k in have if "/" in k))

    def rank(prefix: str) -> int:
        last = prefix.rsplit("/", 1)[-1]
        return SOURCE_ORDER.index(last) if last in SOURCE_ORDER else len(SOURCE_ORDER)

    picked = [optimized] if optimized in have else []
    for prefix in sorted(prefixes, key=rank):
        keys = [f"{prefix}/{t}" for t in DEFAULT_METRICS]
        picked += [k for k in keys if k in have and k not in picked]
    return (picked or have)[:MAX_DEFAULT_COLUMNS]


def _lower_is_better(metric: str) -> bool:
    return metric.rsplit("/", 1)[-1] in LOWER_IS_BETTER or metric.endswith("loss")


def _value(job: Job, metric: str) -> float | None:
    v = (job.metrics or {}).get(metric)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def label(n: int, job: Job, keys: Sequence[str]) -> str:
    """`<job number>: <values of the distinguishing overrides>` (the keys name the axis)."""
    return f"{n}: " + ",".join(job.overrides.get(k, "-") for k in keys) if keys else str(n)


def render(jobs: Sequence[Job], metrics: Sequence[str], sweep_dir: Path) -> str:
    keys = distinguishing(jobs)
    best = {}
    for m in metrics:
        vals = [v for v in (_value(j, m) for j in jobs) if v is not None]
        if vals:
            best[m] = (min if _lower_is_better(m) else max)(vals)
    lines = [f"# Sweep summary: {sweep_dir}", "",
             f"{len(jobs)} jobs; columns: the overrides that differ between them, then the final metrics "
             "(bold: the best per column).", ""]
    lines.append("| " + " | ".join(["job", *keys, *metrics]) + " |")
    lines.append("|---|" + "---|" * len(keys) + "---:|" * len(metrics))
    for n, j in enumerate(jobs):
        cells = [str(n), *(j.overrides.get(k, "-") for k in keys)]
        for m in metrics:
            v = _value(j, m)
            cell = "n/a" if v is None else f"{v:.4g}"
            cells.append(f"**{cell}**" if v is not None and v == best.get(m) else cell)
        lines.append("| " + " | ".join(cells) + " |")
    missing = [j for j in jobs if j.metrics is None]
    if missing:
        lines += ["", f"No {FINAL_METRICS} (failed or still running): "
                  + ", ".join(f"`{j.dir.relative_to(sweep_dir)}`" for j in missing)]
    lines += ["", "Run directories:", ""]
    lines += [f"- {n}: `{j.dir.relative_to(sweep_dir)}`" for n, j in enumerate(jobs)]
    return "\n".join(lines) + "\n"


def _numeric(jobs: Sequence[Job], key: str) -> list[float] | None:
    try:
        return [float(j.overrides[key]) for j in jobs]
    except (KeyError, ValueError):
        return None


def write_summary(sweep_dir: str | Path, metrics: Sequence[str] | None = None, *, since: float | None = None,
                  optimized: str | None = None) -> tuple[Path, Path | None] | None:
    """summary.md and summary.png in `sweep_dir` for its jobs (since `since`); None when there are none."""
    sweep_dir = Path(sweep_dir)
    jobs = collect(sweep_dir, since)
    if not jobs:
        return None
    if optimized is None:  # the sweep's own optimized_metric (Optuna), from a job's saved config
        cfg_file = jobs[0].dir / ".hydra" / "config.yaml"
        optimized = (yaml.safe_load(cfg_file.read_text()) or {}).get("optimized_metric") if cfg_file.is_file() else None
    metrics = choose_metrics(jobs, metrics, optimized)
    md = sweep_dir / SUMMARY_MD
    md.write_text(render(jobs, metrics, sweep_dir))
    png = None
    keys = distinguishing(jobs)
    x = _numeric(jobs, keys[0]) if len(keys) == 1 else None  # one numeric knob: a curve against it
    values = {m: [_value(j, m) for j in jobs] for m in metrics}
    if any(v is not None for vs in values.values() for v in vs):
        xlabel = keys[0] if x else "job: " + ",".join(k.rsplit(".", 1)[-1] for k in keys)
        png = figures.sweep_comparison([label(n, j, keys) for n, j in enumerate(jobs)], values,
                                       sweep_dir / Path(SUMMARY_PNG).stem, x=x, xlabel=xlabel)[0]
    log.info("sweep summary of %d jobs: %s", len(jobs), md)
    return md, png


class SweepSummary(Callback):
    """Hydra callback: the sweep summary at the end of every multirun (the jobs started by it)."""

    def __init__(self, metrics: Sequence[str] | None = None):
        self.metrics = list(metrics) if metrics else None
        self.started: float | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        import time

        self.started = time.time() - 1.0

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            write_summary(sweep_dir, self.metrics, since=self.started, optimized=config.get("optimized_metric"))
        except Exception as e:  # a summary must never fail a finished sweep
            log.warning("sweep summary failed (%s: %s); re-run it with: python -m eval.summary %s",
                        type(e).__name__, e, sweep_dir)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.summary", description=__doc__.split("\n")[0])
    ap.add_argument("sweep_dir", type=Path, help="the sweep's directory (hydra.sweep.dir)")
    ap.add_argument("--metrics", default=None, help="comma-separated final-metric keys, e.g. val/psnr,val/auc")
    ap.add_argument("--all", action="store_true", help="every job under the directory, not only the latest sweep")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.sweep_dir.is_dir():
        print(f"error: {args.sweep_dir} is not a directory; pass a sweep's hydra.sweep.dir", file=sys.stderr)
        return 2
    out = write_summary(args.sweep_dir, args.metrics.split(",") if args.metrics else None,
                        since=None if args.all else latest_sweep_start(args.sweep_dir))
    if out is None:
        print(f"error: no job (.hydra/overrides.yaml) under {args.sweep_dir}"
              + ("" if args.all else " since its latest multirun.yaml; --all takes every job"), file=sys.stderr)
        return 1
    print(f"summary: {out[0]}" + (f"\nfigure: {out[1]}" if out[1] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
