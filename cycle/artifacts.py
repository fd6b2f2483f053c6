"""Per-resolution artifact directory: where stages publish results and find inputs.

Layout: `<artifacts_dir>/res<r>/<name>.pt` beside `<name>.json` (the manifest:
config, metrics, parent artifacts, code version, time). Publishing over an
existing artifact moves the old pair into `history/` first (`cycle.files.move_aside`): nothing is ever
silently overwritten.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from hydra.utils import get_method
from omegaconf import DictConfig
from torch import nn

from cycle.checkpoint import load_checkpoint, save_checkpoint
from cycle.config import to_plain
from cycle.errors import UserError, output_error
from cycle.files import HISTORY, move_aside
from cycle.stages import STAGE, producer, producer_command

log = logging.getLogger(__name__)


class MissingArtifact(UserError, FileNotFoundError):
    pass


_KEPT = "The run's checkpoints are intact: re-run the same command once fixed to publish it."


def _clear_write_errors(publish):
    """A full disk or read-only folder while publishing: one message naming the artifact and the fix."""
    @functools.wraps(publish)
    def wrapper(self, name, *args, **kwargs):
        try:
            return publish(self, name, *args, **kwargs)
        except OSError as e:
            if isinstance(e, UserError):
                raise
            raise output_error(self.path(name), e, "artifact", keeps=_KEPT) from e
    return wrapper


def code_version() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=root, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class ArtifactStore:
    def __init__(self, root: str | os.PathLike, res: int | str):
        self.res = int(res)
        self.dir = Path(root) / f"res{self.res}"

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.pt"

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def require(self, name: str) -> Path:
        p = self.path(name)
        if not p.is_file():
            raise MissingArtifact(
                f"missing artifact '{name}' for res={self.res} (looked for {p}). "
                f"Run it first: {producer_command(name, self.res)} (with the same data/experiment/paths settings)")
        return p

    def load(self, name: str, map_location="cpu") -> dict[str, Any]:
        return load_checkpoint(self.require(name), map_location=map_location)

    def manifest(self, name: str) -> dict[str, Any]:
        p = self.path(name).with_suffix(".json")
        return json.loads(p.read_text()) if p.is_file() else {}

    @_clear_write_errors
    def publish(self, name: str, payload: dict[str, Any], *, cfg: DictConfig | dict | None = None,
                metrics: dict[str, float] | None = None, parents: list[str] | None = None,
                run_dir: str | os.PathLike | None = None) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        target = self.path(name)
        move_aside([target, target.with_suffix(".json")], self.dir / HISTORY, flat=True)
        if isinstance(cfg, DictConfig):
            cfg = to_plain(cfg)
        manifest = {
            "name": name,
            "res": self.res,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "code_version": code_version(),
            "run_dir": str(run_dir) if run_dir else None,
            "parents": {p: str(self.path(p)) for p in (parents or [])},
            "metrics": {k: float(v) for k, v in (metrics or {}).items()},
            "config": cfg,
        }
        save_checkpoint(payload, target, what="artifact", keeps=_KEPT)
        tmp = target.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(manifest, indent=2, default=str))
        os.replace(tmp, target.with_suffix(".json"))
        log.info("published %s", target)
        return target


def load_model(cfg: DictConfig, store: ArtifactStore, name: str | None) -> nn.Module:
    """The network of artifact `name` (eval mode, CPU), built by its stage's `loader` from the stage table.

    name=None: the official EdgeFace weights (`edgeface.weights`), loaded like `edgeface_pretrained`.
    """
    if name is None:
        path, spec = str(cfg.edgeface.weights), STAGE["edgeface_pretrain"]
        log.info("pretrained EdgeFace: official weights %s (%s)", path, cfg.edgeface.variant)
    else:
        path, spec = store.require(name), producer(name)[0]
        log.info("%s from artifact %s", spec.kind, path)
    return get_method(spec.loader)(cfg, path).eval()
