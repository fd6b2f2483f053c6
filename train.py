"""The one training entry: compose the config, seed, dispatch to the stage the stage table names.

    python train.py                              # full cycle at res=16 on embedded synthetic faces
    python train.py stage=cyclic res=32
    python train.py -m res=16,24,32 hydra/launcher=submitit_slurm
    python train.py -m hparams_search=cyclic_optuna res=16   # Optuna: main() returns `optimized_metric`
"""
from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cycle import distributed
from cycle.errors import WRITE_ERRNOS, UserError, exit_on, output_error
from cycle.files import HISTORY, move_aside
from cycle.lock import RunLock
from cycle.logger import FINAL_METRICS
from cycle.pipeline import format_plan, run_stage, step_for
from cycle.runtime import prepare, seed_everything
from cycle.stages import PIPELINE
from edgeface.supervisor import load_edgeface

log = logging.getLogger("train")
# Our launcher YAMLs deliberately shadow the plugin's schemas of the same name (to set our defaults).
warnings.filterwarnings("ignore", message=r"(?s).*hydra/launcher/submitit_.*validated against ConfigStore schema",
                        category=UserWarning)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """A user error (bad setting, data, disk, lock, divergence) ends as one line on stderr and exit 1."""
    try:
        return train(cfg)
    except UserError as e:
        exit_on(e, log)
    except OSError as e:  # a write this code did not wrap: still one line naming the path
        if e.errno not in WRITE_ERRNOS or e.filename is None:
            raise
        exit_on(output_error(e.filename, e), log)


def train(cfg: DictConfig) -> float | None:
    cfg = prepare(cfg)
    seed_everything(int(cfg.seed))
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    log.info("stage=%s res=%s name=%s -> %s", cfg.stage, cfg.res, cfg.name, out_dir)
    if cfg.dry_run and str(cfg.stage) != PIPELINE:
        print(format_plan(cfg, [step_for(cfg, str(cfg.stage), int(cfg.cycle.index))]))
        return None
    if cfg.edgeface.get("weights"):  # a wrong file or variant fails now, naming edgeface=<variant>, not later
        load_edgeface(cfg, str(cfg.edgeface.weights))
    with RunLock(out_dir):  # one writer per run directory: the same command twice refuses at once
        if not cfg.resume:  # start over: the previous results move aside, never overwritten (by rank 0)
            distributed.main_only(move_aside, [p for p in out_dir.iterdir() if not p.name.startswith(".")
                                               and p.suffix != ".log" and p.name != HISTORY], out_dir / HISTORY)
        metrics = run_stage(cfg, out_dir)
    if cfg.dry_run:  # stage=cycle printed its plan: nothing ran, nothing to record
        return None
    if metrics:
        log.info("final metrics: %s", {k: round(float(v), 4) for k, v in metrics.items()})
    # what `python -m eval.summary <sweep dir>` tabulates for every job of a sweep
    if distributed.is_main():
        final = {k: _finite(v) for k, v in (metrics or {}).items()}
        (out_dir / FINAL_METRICS).write_text(json.dumps(final, indent=1))
    return optimized(cfg, metrics or {})


def _finite(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def optimized(cfg: DictConfig, metrics: dict[str, float]) -> float | None:
    """The value a sweeper (Optuna) optimises: `optimized_metric`, a key of the run's final metrics."""
    key = cfg.get("optimized_metric")
    if not key:
        return None
    if key not in metrics:
        raise KeyError(f"optimized_metric={key} is not among the final metrics of stage={cfg.stage}: "
                       f"{', '.join(sorted(metrics)) or 'none'}. Pick one of them, e.g. optimized_metric=val/psnr "
                       "for a DSR stage or optimized_metric=cyclic/auc for stage=cycle.")
    return float(metrics[key])


if __name__ == "__main__":
    main()
