"""The stage table: the one place that says what each stage is.

Everything else derives from `STAGES`: the values `stage=` accepts (the typed schema), the order of the
cycle pipeline, the artifact each stage reads and publishes (with its 2nd-cycle name), the command a
missing artifact names, how an artifact is loaded, the evaluation rows (`eval`'s methods), and a stage's
settings with the 2nd-cycle overrides merged in (`stage_settings`).

Adding a stage = one `Stage` entry here + its `run(cfg, out_dir)` function + `conf/stages/<name>.yaml`.
An ablation (`ablation=True`, e.g. `pixel`) runs in `stage=cycle` and is evaluated only when
`cycle.ablations` names it.

Cycles. `edgeface_ft` and `cyclic` run once per cycle (`repeats=True`); cycle k > 1 publishes under the
cycle-1 name with k appended (`edgeface_ft2`, `dsr_cyclic2`). An input `Input(stage, -1)` is that
stage's artifact of the previous cycle; "cycle 0" of a repeating stage is its `first` stage (the DSR
before the first `cyclic` is `initial`'s, the EdgeFace before the first `edgeface_ft` is
`edgeface_pretrain`'s, or the official weights `edgeface.weights` when given).

This module imports no stage: stage functions and model loaders are named by their dotted paths.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from cycle.errors import ConfigError

PIPELINE = "cycle"                     # `stage=cycle`: every stage below in order, then the evaluation
EVALUATION = "eval.report.evaluate"    # what `stage=cycle` runs last: evaluate(cfg, out_dir, resolutions)
PRETRAINED_EDGEFACE = "edgeface_pretrained"
SECOND_CYCLE_KEY = "second_cycle"      # block of a stage's settings that overrides them for cycles > 1


@dataclass(frozen=True)
class Input:
    stage: str           # the stage whose artifact is read
    offset: int = 0      # 0: this cycle's; -1: the previous cycle's (cycle 0 = that stage's `first`)


@dataclass(frozen=True)
class Stage:
    name: str
    fn: str                          # dotted path of `run(cfg, out_dir) -> dict[str, float]`
    output: str                      # artifact name in cycle 1
    kind: str                        # "edgeface" | "dsr": which network the artifact holds
    loader: str                      # dotted path of `load(cfg, path) -> nn.Module` (eval mode)
    inputs: tuple[Input, ...] = ()
    repeats: bool = False            # runs once per cycle
    first: str | None = None         # a repeating stage's stand-in for cycle 0
    methods: tuple[str, ...] = ()    # evaluation row fed by cycle 1, 2, ... of this stage ("" = none)
    description: str = ""
    ablation: bool = False           # runs only when named in `cycle.ablations`

    def label(self, cycle_index: int = 1) -> str:
        """Run sub-directory, logger tag: `cyclic`, `cyclic2`."""
        return self.name if cycle_index == 1 else f"{self.name}{cycle_index}"

    def artifact(self, cycle_index: int = 1) -> str:
        return self.output if cycle_index == 1 else f"{self.output}{cycle_index}"

    def method(self, cycle_index: int = 1) -> str | None:
        return (self.methods[cycle_index - 1] or None) if cycle_index <= len(self.methods) else None


EDGEFACE_LOADER = "edgeface.supervisor.load_edgeface"
DSR_LOADER = "cycle.models.load_dsr"

STAGES: tuple[Stage, ...] = (
    Stage("edgeface_pretrain", "edgeface.pretrain.run", PRETRAINED_EDGEFACE, "edgeface", EDGEFACE_LOADER,
          description="EdgeFace on HR faces (only without edgeface.weights)"),
    Stage("pixel", "dsr.stage.run_pixel", "dsr_pixel", "dsr", DSR_LOADER, methods=("pixel",), ablation=True,
          description="DSR with initial's schedule and the pixel loss only (ablation: cycle.ablations=[pixel])"),
    Stage("initial", "dsr.stage.run_initial", "dsr_initial", "dsr", DSR_LOADER,
          inputs=(Input("edgeface_ft", -1),), methods=("initial",),
          description="DSR from scratch, supervised by the pretrained EdgeFace"),
    Stage("edgeface_ft", "edgeface.finetune.run", "edgeface_ft", "edgeface", EDGEFACE_LOADER,
          inputs=(Input("cyclic", -1), Input("edgeface_ft", -1)), repeats=True, first="edgeface_pretrain",
          methods=("initial_ft",), description="EdgeFace fine-tuned on outputs of the previous DSR"),
    Stage("cyclic", "dsr.stage.run_cyclic", "dsr_cyclic", "dsr", DSR_LOADER,
          inputs=(Input("cyclic", -1), Input("edgeface_ft")), repeats=True, first="initial",
          methods=("cyclic", "cyclic2"), description="DSR continued, supervised by the fine-tuned EdgeFace"),
)
STAGE = {s.name: s for s in STAGES}
STAGE_NAMES = (PIPELINE, *STAGE)  # what `stage=` accepts
ABLATIONS = tuple(s.name for s in STAGES if s.ablation)  # what `cycle.ablations` accepts


def stage_spec(name: str) -> Stage:
    try:
        return STAGE[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; choose one of: {', '.join(STAGE_NAMES)}") from None


def uses_official_weights(cfg: DictConfig) -> bool:
    return bool(cfg.edgeface.get("weights"))


def if_official_weights(official, scratch, *, _root_):
    """`${if_official_weights:a,b}` in a stage's settings: `a` when the supervisor starts from official
    EdgeFace weights (`edgeface.weights` set), else `b`: for the settings whose best value depends on how
    good the supervisor is (the identity loss weights; README "Identity supervision")."""
    return official if _root_.edgeface.get("weights") else scratch


# Registered on import: this module is imported wherever stage settings are resolved, in every process.
OmegaConf.register_new_resolver("if_official_weights", if_official_weights, replace=True)


def ablations(cfg: DictConfig) -> list[str]:
    """The ablation stages `cycle.ablations` asks for; an unknown name lists the ablations there are."""
    names = [str(a) for a in (cfg.cycle.get("ablations") or [])]
    unknown = [a for a in names if a not in ABLATIONS]
    if unknown:
        raise ConfigError(f"cycle.ablations={names}: unknown {unknown}; choose from: {', '.join(ABLATIONS)}")
    return names


def in_cycle(cfg: DictConfig, spec: Stage) -> bool:
    """Whether `stage=cycle` runs `spec`: every stage, ablations only when asked for, and no EdgeFace
    pretraining with official weights."""
    if spec.ablation:
        return spec.name in ablations(cfg)
    return not (spec.output == PRETRAINED_EDGEFACE and uses_official_weights(cfg))


def resolve_input(ref: Input, cycle_index: int, official_weights: bool = False) -> str | None:
    """The artifact an input names at `cycle_index`; None = the official EdgeFace weights file."""
    k = cycle_index + ref.offset
    spec = STAGE[ref.stage]
    if spec.repeats and k >= 1:
        return spec.artifact(k)
    if spec.repeats:  # cycle 0: the stage that comes before the first cycle
        spec = STAGE[spec.first]
    if spec.name == "edgeface_pretrain" and official_weights:
        return None
    return spec.artifact(1)


def stage_inputs(cfg: DictConfig, name: str, cycle_index: int = 1) -> list[str | None]:
    """The artifacts stage `name` reads at `cycle_index`, in its `inputs` order (None: official weights)."""
    return [resolve_input(ref, cycle_index, uses_official_weights(cfg)) for ref in stage_spec(name).inputs]


def producer(artifact: str) -> tuple[Stage, int]:
    """(stage, cycle index) that publishes `artifact`, e.g. dsr_cyclic2 -> (cyclic, 2)."""
    for spec in STAGES:
        m = re.fullmatch(re.escape(spec.output) + r"(\d*)", artifact)
        if m and (not m.group(1) or spec.repeats):
            return spec, int(m.group(1) or 1)
    raise ValueError(f"no stage publishes an artifact named {artifact!r}")


def producer_command(artifact: str, res) -> str:
    """The command that builds `artifact`: `python train.py stage=cyclic res=16 cycle.index=2`."""
    spec, k = producer(artifact)
    return f"python train.py stage={spec.name} res={res}" + (f" cycle.index={k}" if k > 1 else "")


def stage_settings(cfg: DictConfig, name: str, cycle_index: int = 1) -> DictConfig:
    """`stages.<name>` resolved, with its `second_cycle` block merged over it for cycles > 1."""
    node = OmegaConf.to_container(cfg.stages[name], resolve=True)
    second = node.pop(SECOND_CYCLE_KEY, None) or {}
    merged = OmegaConf.create(node)
    if cycle_index > 1:
        merged = OmegaConf.merge(merged, second)
    return merged


@dataclass(frozen=True)
class Method:
    """One row of the evaluation: which image the probe is, and which EdgeFace embeds it."""
    name: str
    source: str              # "hr", "bicubic" or the DSR artifact that makes the probe image
    edgeface: str | None     # EdgeFace artifact; None = the pretrained EdgeFace
    description: str

    @property
    def dsr(self) -> str | None:
        return None if self.source in ("hr", "bicubic") else self.source


def evaluation_methods(max_cycles: int = 2) -> tuple[Method, ...]:
    """hr, bicubic, then each stage's evaluation row in pipeline order, for cycles 1..max_cycles.

    A DSR stage's row pairs its DSR with the EdgeFace that supervised it; an EdgeFace stage's row pairs
    its EdgeFace with the DSR it was fine-tuned on. The pretrained EdgeFace is None (official weights
    or the `edgeface_pretrained` artifact, whichever the configuration uses).
    """
    def pretrained_or(artifact: str | None) -> str | None:
        return None if artifact in (None, PRETRAINED_EDGEFACE) else artifact

    methods = [Method("hr", "hr", None, "HR face + pretrained EdgeFace (upper bound)"),
               Method("bicubic", "bicubic", None, "bicubic(VLR) + pretrained EdgeFace")]
    for k in range(1, max_cycles + 1):
        for spec in STAGES:
            name = spec.method(k)
            if name is None or (k > 1 and not spec.repeats):
                continue
            ins = [resolve_input(ref, k) for ref in spec.inputs]
            if spec.kind == "dsr":
                dsr = spec.artifact(k)
                ef = next((a for a, r in zip(ins, spec.inputs) if STAGE[r.stage].kind == "edgeface"), None)
            else:
                ef = spec.artifact(k)
                dsr = next(a for a, r in zip(ins, spec.inputs) if STAGE[r.stage].kind == "dsr")
            ef = pretrained_or(ef)
            methods.append(Method(name, dsr, ef, f"{_dsr_label(dsr)} + {_edgeface_label(ef)}"))
    return tuple(methods)


def _dsr_label(artifact: str) -> str:
    spec, k = producer(artifact)
    return f"DSR {spec.label(k)}"


def _edgeface_label(artifact: str | None) -> str:
    if artifact is None:
        return "pretrained EdgeFace"
    return f"{'fine-tuned' if producer(artifact)[1] == 1 else '2nd-cycle'} EdgeFace ({artifact})"


METHODS = evaluation_methods()
