"""Typed top-level schema of the train config.

`res` is a string-valued enum: `res=32` typed on the command line arrives as the
int 32 and is accepted, `res=20` fails at composition listing 16, 24, 32. Every
top-level key is declared, so a typo at the top level fails too.
"""
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from hydra.core.config_store import ConfigStore

RESOLUTIONS = ("16", "24", "32")


class _ResBase(StrEnum):
    @classmethod
    def _missing_(cls, value):  # OmegaConf converts ints by value: 32 -> "32"
        return cls.__members__.get(str(value))


Res = _ResBase("Res", [(r, r) for r in RESOLUTIONS])


@dataclass
class TrainSchema:
    res: Res = Res["16"]
    seed: int = 42
    device: str = "auto"
    name: str = "default"
    dry_run: bool = False
    resume: bool = True
    compile: bool = False
    paths: Any = None
    resolutions: Any = None
    degradation: Any = None
    stage: Any = None
    stages: Any = None
    data: Any = None
    dsr: Any = None
    edgeface: Any = None
    logger: Any = None
    trainer: Any = None
    cycle: Any = None
    eval: Any = None
    loss: Any = None
    local: Any = None


def register() -> None:
    """Make `train_schema` available to the defaults list (idempotent)."""
    ConfigStore.instance().store(name="train_schema", node=TrainSchema)


register()


def to_plain(node) -> Any:
    """A config node as plain Python (resolved; enums as strings): safe for JSON, wandb, checkpoints."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True, enum_to_str=True)
