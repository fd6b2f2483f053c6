"""`make bench-quality`: the full cycle (experiment=demo) per data set and resolution, then one comparison
table per data set and resolution from each run's evaluation results.json, written to bench/quality.md.

    python -m bench.quality                                   # data synthetic, orl x res 16, 24, 32
    python -m bench.quality --res 16 --data orl --extra device=cuda trainer.batch_size=128
    python -m bench.quality --collect                         # only rebuild the tables from finished runs
    python -m bench.quality --prefix quality2                 # fresh runs (new names, new artifacts)

Each run is `python train.py stage=cycle experiment=demo res=R data=D name=<prefix>_D` in its own process,
logged to outputs/<prefix>_logs/. Runs resume where they stopped (train.py's auto-resume), a failed run is
reported in the table and the others still run, and quality.md is rewritten after every run.
Not run in CI: at demo scale the three resolutions x two data sets take about an hour on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from bench.common import ROOT, fmt, machine, md_table
from cycle.config import RESOLUTIONS as CONFIG_RESOLUTIONS

DATA = ("synthetic", "orl")
RESOLUTIONS = tuple(int(r) for r in CONFIG_RESOLUTIONS)
# (results.json metric, header, format), as in the evaluation report
COLUMNS = (("psnr", "PSNR (dB)", ".2f"), ("ssim", "SSIM", ".4f"), ("auc", "AUC", ".4f"), ("eer", "EER", ".4f"),
           ("tar@far=1e-3", "TAR@FAR=1e-3", ".4f"), ("tar@far=1e-2", "TAR@FAR=1e-2", ".4f"),
           ("accuracy", "accuracy", ".4f"), ("rank1", "rank-1", ".4f"))
METHOD_ORDER = ("hr", "bicubic", "pixel", "initial", "initial_ft", "cyclic", "cyclic2")
_RUN_DIR = re.compile(r"\[train\]\[INFO\] - stage=\S+ res=\S+ name=\S+ -> (.+?)\s*$", re.M)


def command(data: str, res: int, extra: list[str] | None = None, prefix: str = "quality") -> list[str]:
    """train.py arguments (without the interpreter) of one quality run."""
    return ["train.py", "stage=cycle", "experiment=demo", f"res={res}", f"data={data}", f"name={prefix}_{data}",
            *(extra or [])]


def _rel(path: Path | str) -> str:
    p = Path(path)
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def find_results(data: str, res: int, prefix: str, log: Path | None = None) -> Path | None:
    """The run's eval/results.json: from the run directory train.py logged, else the newest under outputs/."""
    if log is not None and log.is_file():
        dirs = _RUN_DIR.findall(log.read_text(errors="replace"))
        if dirs:
            p = Path(dirs[-1]) / "eval" / "results.json"
            if p.is_file():
                return p
    found = sorted((ROOT / "outputs" / f"{prefix}_{data}" / f"res{res}" / "cycle").glob("*/eval/results.json"),
                   key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def run_one(data: str, res: int, extra: list[str], prefix: str, log_dir: Path, timeout: float | None) -> dict:
    args = command(data, res, extra, prefix)
    log = log_dir / f"{data}_res{res}.log"
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), "WANDB_SILENT": "true"}
    print(f"[quality] {data} res={res}: python {shlex.join(args)}  (log: {_rel(log)})", flush=True)
    t0 = time.perf_counter()
    try:
        with open(log, "w") as f:
            rc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    wall = time.perf_counter() - t0
    print(f"[quality] {data} res={res}: exit {rc} after {wall / 60:.1f} min", flush=True)
    return {"data": data, "res": res, "command": "python " + shlex.join(args), "rc": rc, "wall_s": wall,
            "log": _rel(log), "results": find_results(data, res, prefix, log)}


def _tail(log: str, n: int = 3) -> str:
    p = ROOT / log
    if not p.is_file():
        return ""
    lines = [ln.strip() for ln in p.read_text(errors="replace").splitlines() if ln.strip()]
    return " / ".join(lines[-n:])[-400:]


def table(results: dict, res: int) -> list[str]:
    """The comparison table of one resolution of an evaluation results.json, plus its regressions."""
    methods = results.get(str(res)) or {}
    if not methods:
        return ["No method was evaluated at this resolution."]
    names = [m for m in METHOD_ORDER if m in methods] + [m for m in methods if m not in METHOD_ORDER]
    rows = [[f"`{m}`"] + [fmt(methods[m].get(k), f, "n/a" if k in methods[m] else "-") for k, _, f in COLUMNS]
            for m in names]
    lines = [md_table(["method"] + [h for _, h, _ in COLUMNS], rows)]
    regs = (results.get("regressions") or {}).get(str(res)) or []
    if regs:
        lines += ["", "Regressions (as the evaluation report states them):", ""] + [f"- {r}" for r in regs]
    skipped = dict((results.get("skipped") or {}).get(str(res)) or {})
    cycles = str(((results.get("config") or {}).get("cycle") or {}).get("cycles", 1))
    if cycles == "1":
        skipped.pop("cyclic2", None)  # a one-cycle run has no 2nd cycle: nothing to report
    if skipped:
        why = "; ".join(f"`{m}`: {reason}" for m, reason in skipped.items())
        lines += ["", "Skipped: " + why.replace(f"{ROOT}{os.sep}", "")]
    return lines


def render(runs: list[dict], info: dict) -> str:
    lines = ["# Quality benchmark (`make bench-quality`)", "",
             f"`{info['command']}`, {info['date']}. Machine: {info['cpu']}, {info['cores']} cores"
             f"{', GPU ' + info['gpu'] if info.get('gpu') else ', no GPU'}; torch {info['torch']}. "
             "Each run is the full cycle at demo scale (`experiment=demo`: edgeface_pretrain, initial, "
             "edgeface_ft, cyclic, eval) on identity-disjoint splits; metrics are on the test identities "
             "(probe = the method's image, gallery = HR).", ""]
    for data in dict.fromkeys(r["data"] for r in runs):
        lines += [f"## data={data}", ""]
        for r in (r for r in runs if r["data"] == data):
            lines += [f"### {r['res']}x{r['res']}", "", f"`{r['command']}`"]
            status = f"exit {r['rc']}" if r.get("rc") is not None else "collected"
            wall = f", {r['wall_s'] / 60:.1f} min" if r.get("wall_s") else ""
            path = r.get("results")
            lines += ["", f"Status: {status}{wall}; results: {_rel(path) if path else 'none'}; "
                          f"log: {r.get('log') or '-'}.", ""]
            results = None
            if path:
                try:
                    results = json.loads(Path(path).read_text())
                except (OSError, ValueError) as e:
                    lines += [f"Could not read {_rel(path)}: {e}", ""]
            if results is not None:
                proto = results.get("protocol") or {}
                if proto:
                    lines += [f"Protocol: {proto.get('num_pairs', '?')} pairs ({proto.get('num_genuine', '?')} "
                              f"genuine) over {proto.get('num_images', '?')} images of "
                              f"{proto.get('num_identities', '?')} {proto.get('split', '')} identities.", ""]
                lines += table(results, r["res"]) + [""]
            elif r.get("log"):
                lines += [f"No evaluation results. Last log lines: `{_tail(r['log'])}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], prog="python -m bench.quality")
    ap.add_argument("--res", type=int, nargs="+", default=list(RESOLUTIONS), choices=RESOLUTIONS)
    ap.add_argument("--data", nargs="+", default=list(DATA), help="data presets (conf/data/)")
    ap.add_argument("--extra", nargs="+", default=[], action="extend",
                    help="more train.py overrides for every run, e.g. device=cuda trainer.batch_size=128")
    ap.add_argument("--prefix", default="quality", help="run names are <prefix>_<data>; a new prefix = fresh runs")
    ap.add_argument("--collect", action="store_true", help="run nothing: tabulate the latest finished runs")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per run (default: none)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "quality.md"))
    args = ap.parse_args(argv)

    info = machine()
    info["command"] = "python -m bench.quality " + " ".join(argv if argv is not None else sys.argv[1:])
    info["date"] = datetime.date.today().isoformat()
    log_dir = ROOT / "outputs" / f"{args.prefix}_logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    runs: list[dict] = []
    t0 = time.perf_counter()
    for data in args.data:
        for res in args.res:
            if args.collect:
                log = log_dir / f"{data}_res{res}.log"
                runs.append({"data": data, "res": res, "rc": None,
                             "command": "python " + shlex.join(command(data, res, args.extra, args.prefix)),
                             "log": _rel(log) if log.is_file() else None,
                             "results": find_results(data, res, args.prefix, log)})
            else:
                runs.append(run_one(data, res, args.extra, args.prefix, log_dir, args.timeout))
            out.write_text(render(runs, info) + "\n")  # after every run: a crash keeps what was measured
    print(render(runs, info))
    print(f"\n[quality] {len(runs)} run(s) in {(time.perf_counter() - t0) / 60:.1f} min -> {_rel(out)}")
    failed = [r for r in runs if r.get("rc") not in (None, 0) or not r.get("results")]
    if failed:
        print(f"[quality] {len(failed)} run(s) without results: "
              + ", ".join(f"{r['data']} res={r['res']}" for r in failed), file=sys.stderr)
    return runs


if __name__ == "__main__":
    sys.exit(1 if any(r.get("rc") not in (None, 0) or not r.get("results") for r in main()) else 0)
