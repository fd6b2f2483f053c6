"""Running stages: `run_stage` dispatches `stage=<name>`; `run` is `stage=cycle`, the whole method for
one resolution in one process.

[edgeface_pretrain] -> initial -> edgeface_ft -> cyclic [-> edgeface_ft2 -> cyclic2] -> eval, each stage in
its own sub-directory of the run; the order, inputs and outputs come from the stage table
(`cycle.stages`). Artifacts are keyed by their lineage (`cycle.lineage`), like a build cache: a stage
whose artifact already exists for this exact lineage is done and reused (`resume=false` retrains it),
so re-running the command after a crash resumes where it stopped (inside a stage, the trainer resumes
from that stage's checkpoints/last.pt), and sweep points share the stages they have in common. The
evaluation at the end scores exactly the artifacts of this run's plan.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from hydra.utils import get_method
from omegaconf import DictConfig, open_dict

from cycle import distributed
from cycle.artifacts import ArtifactStore
from cycle.errors import ConfigError
from cycle.lock import RunLock
from cycle.settings import check_stage
from cycle.stages import (
    EVALUATION,
    METHODS,
    PIPELINE,
    PRETRAINED_EDGEFACE,
    STAGE,
    STAGES,
    in_cycle,
    stage_inputs,
    stage_settings,
    stage_spec,
)

log = logging.getLogger(__name__)

EVAL_STEP = "eval"
# What a plan shows of each stage's settings: label -> key path in the (merged) stage settings.
_SHOWN = {
    "dsr": {"epochs": "epochs", "lr": "lr", "lambda_identity": "loss.identity",
            "lambda_feature_match": "loss.feature_match", "lambda_pixel": "loss.pixel",
            "identity_warmup": "identity_warmup"},
    "edgeface": {"epochs": "epochs", "phase1_epochs": "phase1_epochs", "phase2_epochs": "phase2_epochs",
                 "lr": "lr", "backbone_lr_mult": "backbone_lr_mult", "lambda_align": "lambda_align",
                 "head": "head", "select": "select"},
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
        return EVAL_STEP if self.stage == EVAL_STEP else stage_spec(self.stage).label(self.cycle_index)


def _shown(cfg: DictConfig, stage: str, cycle_index: int) -> dict:
    """The key hyper-parameters a stage will use (resolved), for plans."""
    if stage == EVAL_STEP:
        return {"num_pairs": cfg.eval.num_pairs, "split": cfg.eval.split}
    s = stage_settings(cfg, stage, cycle_index)
    out = {}
    for label, path in _SHOWN[stage_spec(stage).kind].items():
        node = s
        for part in path.split("."):
            node = node.get(part) if node is not None else None
        if node is not None:
            out[label] = node
    return out


def step_for(cfg: DictConfig, stage: str, cycle_index: int = 1) -> Step:
    if stage == EVAL_STEP:
        return Step(EVAL_STEP, cycle_index, [], None, _shown(cfg, stage, cycle_index))
    spec = stage_spec(stage)
    k = cycle_index if spec.repeats else 1
    inputs = [name or str(cfg.edgeface.weights) for name in stage_inputs(cfg, stage, k)]
    return Step(stage, k, inputs, spec.artifact(k), _shown(cfg, stage, k))


def plan(cfg: DictConfig, cycles: int = 1) -> list[Step]:
    """Every stage of the table in order for cycles 1..cycles (non-repeating ones in cycle 1 only; no
    EdgeFace pretraining with official weights; ablations only when `cycle.ablations` names them), then
    the evaluation."""
    steps = []
    for k in range(1, cycles + 1):
        for spec in STAGES:
            if (k > 1 and not spec.repeats) or not in_cycle(cfg, spec):
                continue
            steps.append(step_for(cfg, spec.name, k))
    if cfg.cycle.eval:
        steps.append(step_for(cfg, EVAL_STEP))
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
        raise ConfigError(f"cycle.cycles={c}: a third cycle risks mode collapse; set cycle.force_third=true to "
                          "run it anyway")
    if c < 1:
        raise ConfigError(f"cycle.cycles={c} is not allowed: it must be an integer >= 1 or auto")
    return c


def sub_config(cfg: DictConfig, stage: str, cycle_index: int) -> DictConfig:
    sub = copy.deepcopy(cfg)  # a stage must not alter the pipeline's config
    with open_dict(sub):
        sub.stage = stage
        sub.cycle.index = cycle_index
    return sub


def run_stage(cfg: DictConfig, out_dir: str | Path) -> dict[str, float]:
    """Call the function the stage table names for `cfg.stage`: `run(cfg, out_dir) -> metrics`."""
    name = str(cfg.stage)
    dotted = f"{__name__}.run" if name == PIPELINE else stage_spec(name).fn
    try:
        fn = get_method(dotted)
    except Exception as e:
        raise NotImplementedError(f"stage '{name}' is not available: {dotted} could not be loaded ({e})") from e
    return fn(cfg, Path(out_dir))


def run_step(cfg: DictConfig, step: Step, out_dir: Path, methods: list[str] | None = None) -> dict[str, float]:
    store = ArtifactStore.for_config(cfg)
    sub_dir = out_dir / step.dirname
    skip = step.stage in set(cfg.cycle.skip) and step.cycle_index == 1
    if step.output and (skip or (cfg.resume and store.exists(step.output))):
        store.verify(step.output)  # skipped stage with no artifact: a clear error naming the stage
        log.info("%s: using the artifact of this lineage %s (published by %s)", step.dirname,
                 store.path(step.output), store.manifest(step.output).get("run_dir"))
        return store.manifest(step.output).get("metrics", {})
    log.info("==> %s (res=%s) -> %s", step.dirname, cfg.res, sub_dir)
    if step.stage == EVAL_STEP:  # a data-parallel job evaluates on rank 0; the others wait for its numbers
        return distributed.main_only(get_method(EVALUATION), cfg, sub_dir, resolutions=[str(cfg.res)],
                                     methods=methods)
    # rank 0's metrics on every rank, so every rank takes the same decisions (cycle.cycles=auto)
    return distributed.broadcast_object(run_stage(sub_config(cfg, step.stage, step.cycle_index), sub_dir))


def run(cfg: DictConfig, out_dir: Path) -> dict[str, float]:
    cycles = _cycles(cfg)
    steps = plan(cfg, 1 if cycles == "auto" else cycles)
    for step in plan(cfg, 2) if cycles == "auto" else steps:  # every stage's settings, before the first runs
        if step.stage != EVAL_STEP:
            check_stage(cfg, step.stage, step.cycle_index)
    if cfg.dry_run:
        print(format_plan(cfg, steps if cycles != "auto" else plan(cfg, 2)))
        return {}
    with RunLock(out_dir):
        return _run(cfg, out_dir, cycles, steps)


def _run(cfg: DictConfig, out_dir: Path, cycles: int | str, steps: list[Step]) -> dict[str, float]:
    log.info("\n%s", format_plan(cfg, steps))
    results: dict[str, dict[str, float]] = {}
    evals = [s for s in steps if s.stage == EVAL_STEP]
    for step in [s for s in steps if s.stage != EVAL_STEP]:
        results[step.dirname] = run_step(cfg, step, out_dir)
    if cycles == "auto" and _second_cycle_pays(cfg, results):
        for step in [s for s in plan(cfg, 2) if s.cycle_index == 2]:
            results[step.dirname] = run_step(cfg, step, out_dir)
    final: dict[str, float] = {}
    every = plan(cfg, max(2, 1 if cycles == "auto" else cycles))
    methods = evaluated_methods({s.output for s in every if s.dirname in results and s.output})
    for step in evals:
        final = run_step(cfg, step, out_dir, methods=methods)
    last_dsr = [k for k in results if k.startswith("cyclic")][-1]
    return final or results[last_dsr]


def evaluated_methods(artifacts: set[str]) -> list[str]:
    """The evaluation rows whose every artifact is in `artifacts` (what this run's plan produced or
    reused): an artifact of another plan (a 2nd cycle this run did not run) is never scored."""
    pretrained = {None, PRETRAINED_EDGEFACE}
    return [m.name for m in METHODS
            if (m.dsr is None or m.dsr in artifacts) and (m.edgeface in pretrained or m.edgeface in artifacts)]


def _second_cycle_pays(cfg: DictConfig, results: dict[str, dict[str, float]]) -> bool:
    """cycle.cycles=auto: does cycle 1's DSR gain pay for a 2nd cycle? Compared under one recogniser, the
    fine-tuned EdgeFace: `initial_ft` (validation of edgeface_ft: initial DSR + fine-tuned EdgeFace) vs
    `cyclic` (cyclic DSR + the same EdgeFace). Both numbers and the decision go to the log and into the
    manifest of the cycle-1 DSR."""
    key = cfg.cycle.metric
    before, after = results.get("edgeface_ft", {}).get(key), results.get("cyclic", {}).get(key)
    decision = {"metric": key, "initial_ft": before, "cyclic": after, "min_gain": float(cfg.cycle.min_gain)}
    if before is None or after is None or not (math.isfinite(before) and math.isfinite(after)):
        decision.update(gain=None, second_cycle=False,
                        reason=f"cannot decide: {key} is missing or NaN (initial_ft {before}, cyclic {after}); "
                               "falling back to no 2nd cycle. Raise trainer.val_pairs or the validation "
                               "identities, or set cycle.cycles=1 or 2 explicitly")
        log.warning("cycle.cycles=auto: %s", decision["reason"])
    else:
        gain = (after - before) / max(abs(before), 1e-8)
        decision.update(gain=gain, second_cycle=gain > float(cfg.cycle.min_gain),
                        reason=f"{key} {before:.4f} (initial_ft) -> {after:.4f} (cyclic), {100 * gain:+.1f}% vs "
                               f"min_gain {100 * float(cfg.cycle.min_gain):.0f}%")
        log.info("cycle.cycles=auto: %s: %s", decision["reason"],
                 "running a 2nd cycle" if decision["second_cycle"] else "no 2nd cycle")
    store = ArtifactStore.for_config(cfg)
    if store.exists(STAGE["cyclic"].artifact(1)):
        distributed.main_only(store.update_manifest, STAGE["cyclic"].artifact(1), auto_second_cycle=decision)
    return bool(decision["second_cycle"])
