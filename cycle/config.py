"""Typed top-level schema of the train config, and `compose()` for code that is not `train.py`.

`res` and `stage` are string-valued enums built from `RESOLUTIONS` and the stage table: `res=32` typed
on the command line arrives as the int 32 and is accepted, `res=20` fails at composition listing 16,
24, 32, and an unknown `stage=` lists the stages. Every top-level key is declared, so a typo at the top
level fails too. The schema is registered by the Hydra plugin in `hydra_plugins/vlr_cyclic` (Hydra
imports it before composing), so no project import is needed first.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Sequence

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from cycle.lineage import run_tag
from cycle.stages import STAGE_NAMES

RESOLUTIONS = ("16", "24", "32")  # the one list of supported VLR sizes
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class _ByValue(StrEnum):
    @classmethod
    def _missing_(cls, value):  # OmegaConf converts ints by value: 32 -> "32"
        return cls.__members__.get(str(value))


Res = _ByValue("Res", [(r, r) for r in RESOLUTIONS])
StageName = _ByValue("StageName", [(s, s) for s in STAGE_NAMES])


def check_res(res) -> str:
    """`res` as its config string ('16'); anything else names the supported sizes."""
    key = str(getattr(res, "value", res)).strip()
    if isinstance(res, bool) or key not in RESOLUTIONS:
        raise ValueError(f"res={res!r} is not supported; choose one of {', '.join(RESOLUTIONS)}")
    return key


@dataclass
class CycleSchema:
    cycles: Any = 1
    min_gain: float = 0.10
    metric: str = "val/tar@far=1e-2"
    force_third: bool = False
    skip: list = field(default_factory=list)
    eval: bool = True
    index: int = 1
    ablations: list = field(default_factory=list)


@dataclass
class TrainSchema:
    stage: StageName = StageName["cycle"]
    res: Res = Res["16"]
    seed: int = 42
    device: str = "auto"
    name: str = "default"
    dry_run: bool = False
    resume: bool = True
    compile: bool = False
    cycle: CycleSchema = field(default_factory=CycleSchema)
    paths: Any = None
    resolutions: Any = None
    degradation: Any = None
    stages: Any = None
    data: Any = None
    dsr: Any = None
    edgeface: Any = None
    logger: Any = None
    trainer: Any = None
    eval: Any = None
    loss: Any = None
    local: Any = None
    cluster: Any = None
    supervisor: Any = None
    optimized_metric: Any = None


def register() -> None:
    """Make `train_schema` and the `run_subdir` resolver available to Hydra (idempotent). The stage
    settings' resolver, `if_official_weights`, registers with `cycle.stages`, which every process that
    resolves them imports (a spawned data-parallel worker too)."""
    ConfigStore.instance().store(name="train_schema", node=TrainSchema)
    OmegaConf.register_new_resolver("run_subdir", run_subdir, replace=True)


def run_subdir(overrides: str, *, _root_) -> str:
    """The last part of a run directory: the overrides that distinguish the run, plus what overrides cannot
    show (the data files and the EdgeFace weights file, by content: `cycle.lineage.run_tag`)."""
    return ",".join(p for p in (str(overrides), run_tag(_root_)) if p)


def compose(overrides: Sequence[str] = (), *, return_hydra_config: bool = False,
            config_name: str = "train") -> DictConfig:
    """Compose `conf/train.yaml` with command-line style overrides, outside `train.py`.

        from cycle.config import compose
        cfg = compose(["stage=cyclic", "res=32", "data=orl"])

    The one composition helper tests, benchmarks and notebooks share. It clears and restores nothing
    else: any Hydra instance initialised before is replaced.
    """
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return hydra_compose(config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)


def to_plain(node) -> Any:
    """A config node as plain Python (resolved; enums as strings): safe for JSON, wandb, checkpoints."""
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True)
