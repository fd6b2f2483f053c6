"""`stage=cycle`: the whole method for one resolution, in one process.

[edgeface_pretrain] -> initial -> edgeface_ft -> cyclic [-> edgeface_ft2 -> cyclic2] -> eval, each stage in
its own sub-directory of the run. A stage whose artifact was published by this very run directory
is done and skipped, so re-running the command after a crash resumes where it stopped (inside a
stage, the trainer resumes from that stage's checkpoints/last.pt).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

from hydra.utils import get_method
from omegaconf import DictConfig, open_dict

from cycle.artifacts import ArtifactStore, cycle_artifacts

log = logging.getLogger(__name__)

STAGE_FNS = {
    "edgeface_pretrain": "edgeface.pretrain.run",
    "initial": "dsr.stage.run_initial",
    "edgeface_ft": "edgeface.finetune.run",
    "cyclic": "dsr.stage.run_cyclic",
}


@dataclass
class Step:
    stage: str
    cycle_index: int
    inputs: list[str]
    output: str | None
    settings: dict = field(default_factory=dict)

    @property
    def dirname(self) -> str:
        return self.stage if self.cycle_index == 1 else f"{self.stage}{self.cycle_index}"


def stage_settings(cfg: DictConfig, stage: str, cycle_index: int = 1) -> dict:
    """The key hyper-parameters a stage will use (resolved), for plans and manifests."""
    if stage == "eval":
        return {"num_pairs": cfg.eval.num_pairs, "split": cfg.eval.split}
    s = cfg.stages[stage]
    if stage in ("initial", "cyclic"):
        out = {"epochs": s.epochs, "lr": s.lr, "lambda_identity": s.loss.identity,
               "lambda_feature_match": s.loss.feature_match, "lambda_pixel": s.loss.pixel}
        if stage == "cyclic" and cycle_index > 1:
            sc = s.second_cycle
            out.update(epochs=sc.epochs, lr=sc.lr, lambda_identity=sc.lambda_identity,
                       lambda_feature_match=sc.lambda_feature_match)
        return out
    if stage == "edgeface_ft":
        p = s.second_cycle if cycle_index > 1 else s
        return {"phase1_epochs": p.phase1_epochs, "phase2_epochs": p.phase2_epochs, "lr": s.lr,
                "backbone_lr_mult": s.backbone_lr_mult, "lambda_align": s.lambda_align, "select": s.select}
    return {"epochs": s.epochs, "lr": s.lr, "head": s.head, "variant": cfg.edgeface.variant}


def supervisor_source(cfg: DictConfig) -> str:
    return str(cfg.edgeface.weights) if cfg.edgeface.get("weights") else "edgeface_pretrained"


def step_for(cfg: DictConfig, stage: str, cycle_index: int = 1) -> Step:
    names = cycle_artifacts(cycle_index)
    pre = supervisor_source(cfg)
    io = {
        "edgeface_pretrain": ([], "edgeface_pretrained"),
        "initial": ([pre], "dsr_initial"),
        "edgeface_ft": ([names["dsr_in"], pre if cycle_index == 1 else names["edgeface_in"]], names["edgeface_out"]),
        "cyclic": ([names["dsr_in"], names["edgeface_out"]], names["dsr_out"]),
        "eval": ([], None),
    }[stage]
    return Step(stage, cycle_index, io[0], io[1], stage_settings(cfg, stage, cycle_index))


def plan(cfg: DictConfig, cycles: int = 1) -> list[Step]:
    steps = [] if cfg.edgeface.get("weights") else [step_for(cfg, "edgeface_pretrain")]
    for i in range(1, cycles + 1):
        if i == 1:
            steps.append(step_for(cfg, "initial"))
        steps += [step_for(cfg, "edgeface_ft", i), step_for(cfg, "cyclic", i)]
    if cfg.cycle.eval:
        steps.append(step_for(cfg, "eval"))
    return steps


def format_plan(cfg: DictConfig, steps: list[Step]) -> str:
    lines = [f"plan for res={cfg.res} name={cfg.name} (artifacts: {cfg.paths.artifacts_dir}/res{cfg.res}):"]
    skip = set(cfg.cycle.skip)
    for n, s in enumerate(steps, 1):
        flag = "  [skip]" if s.stage in skip and s.cycle_index == 1 else ""
        lines.append(f"  {n}. {s.dirname}{flag}")
        lines.append(f"       settings: {s.settings}")
        lines.append(f"       inputs:   {s.inputs or '-'}")
        lines.append(f"       output:   {s.output or 'results.json, report.md, figures'}")
    return "\n".join(lines)


def _cycles(cfg: DictConfig) -> int | str:
    c = cfg.cycle.cycles
    if str(c) == "auto":
        return "auto"
    c = int(c)
    if c >= 3 and not cfg.cycle.force_third:
        raise ValueError(f"cycle.cycles={c}: a third cycle risks mode collapse; set cycle.force_third=true to "
                         "run it anyway")
    if c < 1:
        raise ValueError(f"cycle.cycles must be >= 1 or auto, got {c}")
    return c


def sub_config(cfg: DictConfig, stage: str, cycle_index: int) -> DictConfig:
    sub = copy.deepcopy(cfg)  # a stage must not alter the pipeline's config
    with open_dict(sub):
        sub.stage = {"name": stage, "fn": STAGE_FNS[stage], "cycle_index": cycle_index}
    return sub


def run_step(cfg: DictConfig, step: Step, out_dir: Path) -> dict[str, float]:
    store = ArtifactStore(cfg.paths.artifacts_dir, cfg.res)
    sub_dir = out_dir / step.dirname
    skip = step.stage in set(cfg.cycle.skip) and step.cycle_index == 1
    if step.output and (skip or _published_here(store, step.output, sub_dir)):
        store.require(step.output)  # skipped stage with no artifact: a clear error naming the stage
        log.info("%s: using existing artifact %s", step.dirname, store.path(step.output))
        return store.manifest(step.output).get("metrics", {})
    log.info("==> %s (res=%s) -> %s", step.dirname, cfg.res, sub_dir)
    if step.stage == "eval":
        from eval.report import evaluate
        return evaluate(cfg, sub_dir, resolutions=[str(cfg.res)])
    return get_method(STAGE_FNS[step.stage])(sub_config(cfg, step.stage, step.cycle_index), sub_dir)


def _published_here(store: ArtifactStore, name: str, sub_dir: Path) -> bool:
    if not store.exists(name):
        return False
    produced_by = store.manifest(name).get("run_dir")
    return produced_by is not None and Path(produced_by).resolve() == sub_dir.resolve()


def run(cfg: DictConfig, out_dir: Path) -> dict[str, float]:
    cycles = _cycles(cfg)
    steps = plan(cfg, 1 if cycles == "auto" else cycles)
    if cfg.dry_run:
        print(format_plan(cfg, steps if cycles != "auto" else plan(cfg, 2)))
        return {}
    log.info("\n%s", format_plan(cfg, steps))
    results: dict[str, dict[str, float]] = {}
    evals = [s for s in steps if s.stage == "eval"]
    for step in [s for s in steps if s.stage != "eval"]:
        results[step.dirname] = run_step(cfg, step, out_dir)
    if cycles == "auto" and _second_cycle_pays(cfg, results):
        for step in (step_for(cfg, "edgeface_ft", 2), step_for(cfg, "cyclic", 2)):
            results[step.dirname] = run_step(cfg, step, out_dir)
    final: dict[str, float] = {}
    for step in evals:
        final = run_step(cfg, step, out_dir)
    last_dsr = [k for k in results if k.startswith("cyclic")][-1]
    return final or results[last_dsr]


def _second_cycle_pays(cfg: DictConfig, results: dict[str, dict[str, float]]) -> bool:
    key = cfg.cycle.metric
    before, after = results.get("initial", {}).get(key), results.get("cyclic", {}).get(key)
    if before is None or after is None:
        log.warning("cycle.cycles=auto: metric %s missing from initial/cyclic results: no 2nd cycle", key)
        return False
    gain = (after - before) / max(abs(before), 1e-8)
    decision = gain > float(cfg.cycle.min_gain)
    log.info("cycle.cycles=auto: %s %.4f -> %.4f (%+.1f%%): %s", key, before, after, 100 * gain,
             "running a 2nd cycle" if decision else "no 2nd cycle")
    return decision
