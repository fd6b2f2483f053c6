"""`python -m eval`: compare hr / bicubic / initial / initial_ft / cyclic (/ cyclic2) and write a report.

    python -m eval res=16,24,32                                   # held-out synthetic identities
    python -m eval res=32 data=orl name=orl                       # held-out ORL identities
    python -m eval data=folder data.root=DIR eval.pairs_file=FILE # LFW pairs.txt protocol, 10 folds
    python -m eval eval.bins=[/data/lfw.bin,/data/cfp_fp.bin] res=16   # + insightface .bin sets

Same conf/ as train.py (any train override works: name=, paths.*, degradation.*, eval.*). Writes
results.json, report.md and figures/ in ${paths.output_dir}/${name}/eval/<time> and prints the report
path. `res=16,24,32` evaluates all three in one process (Hydra alone would need -m for a list): the
argument is rewritten to eval.resolutions=[16,24,32] before Hydra parses the command line.
"""
from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cycle.config import check_res
from cycle.errors import UserError, exit_on
from cycle.logger import FINAL_METRICS
from cycle.runtime import prepare
from eval.report import evaluate

log = logging.getLogger("eval")

RUN_DIR = "${paths.output_dir}/${name}/eval/${now:%Y-%m-%d_%H-%M-%S}"
DEFAULTS = {
    "hydra.run.dir": RUN_DIR,
    "hydra.sweep.dir": RUN_DIR,     # -m res=16,24,32: one job per resolution, beside each other
    "hydra.sweep.subdir": "res${res}",
    "hydra.job.name": "eval",       # log file eval.log, not __main__.log
}


class UsageError(ValueError):
    pass


def translate_argv(argv: list[str]) -> list[str]:
    """Rewrite `res=16,24,32` (or `res=[16,24]`) into `eval.resolutions=[...]` and add the eval run dir.

    Under -m/--multirun the list is left to Hydra (one job per resolution). Each value is checked
    against 16/24/32 here, since Hydra would only see the list.
    """
    multirun = any(a in ("-m", "--multirun") for a in argv)
    out = []
    for arg in argv:
        m = re.fullmatch(r"res=\[?([^\]]*)\]?", arg)
        if m and not multirun and ("," in arg or "[" in arg):
            values = [v.strip().strip("'\"") for v in m.group(1).split(",") if v.strip()]
            if not values:
                raise UsageError(f"{arg}: no resolution given (e.g. res=16,24,32)")
            for v in values:
                try:
                    check_res(v)
                except ValueError as e:
                    raise UsageError(f"{arg}: {e} (e.g. res=16,24,32)") from None
            out.append(f"eval.resolutions=[{','.join(values)}]")
        else:
            out.append(arg)
    given = {a.split("=", 1)[0].lstrip("+~") for a in out if "=" in a}
    # first: argparse takes overrides as one run of positionals, so none may follow a flag like --cfg job
    return [f"{k}={v}" for k, v in DEFAULTS.items() if k not in given] + out


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        cfg = prepare(cfg)  # absolute paths, device check: the same start-up as train.py
        flat = evaluate(cfg, out_dir, resolutions=None)
    except UserError as e:
        # bad input (settings, data, pairs file, artifacts, lineage) is one line, not a traceback; the report
        # (if any) was written before
        exit_on(e, log)
    (out_dir / FINAL_METRICS).write_text(json.dumps(flat, indent=1))  # for the summary of `-m` sweeps
    print(f"report: {out_dir / 'report.md'}")


def cli() -> None:
    try:
        sys.argv = [sys.argv[0], *translate_argv(sys.argv[1:])]
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
