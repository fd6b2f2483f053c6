"""Per-resolution artifact directory: where stages publish results and find inputs.

Layout: `<artifacts_dir>/res<r>/<name>.pt` beside `<name>.json` (the manifest:
config, metrics, parent artifacts, code version, time). Publishing over an
existing artifact moves the old pair into `history/` first: nothing is ever
silently overwritten.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from cycle.checkpoint import load_checkpoint, save_checkpoint
from cycle.config import to_plain

log = logging.getLogger(__name__)

# Which stage produces each artifact, so a missing input names the command to run.
PRODUCERS = {
    "edgeface_pretrained": "edgeface_pretrain",
    "dsr_initial": "initial",
    "edgeface_ft": "edgeface_ft",
    "dsr_cyclic": "cyclic",
    "edgeface_ft2": "edgeface_ft stage.cycle_index=2",
    "dsr_cyclic2": "cyclic stage.cycle_index=2",
}


class MissingArtifact(FileNotFoundError):
    pass


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
            stage = PRODUCERS.get(name, "the stage that produces it")
            raise MissingArtifact(
                f"missing artifact '{name}' for res={self.res} (looked for {p}). "
                f"Run it first: python train.py stage={stage.split()[0]} res={self.res}"
                + (f" {' '.join(stage.split()[1:])}" if " " in stage else "")
                + " (with the same data/experiment/paths settings)")
        return p

    def load(self, name: str, map_location="cpu") -> dict[str, Any]:
        return load_checkpoint(self.require(name), map_location=map_location)

    def manifest(self, name: str) -> dict[str, Any]:
        p = self.path(name).with_suffix(".json")
        return json.loads(p.read_text()) if p.is_file() else {}

    def publish(self, name: str, payload: dict[str, Any], *, cfg: DictConfig | dict | None = None,
                metrics: dict[str, float] | None = None, parents: list[str] | None = None,
                run_dir: str | os.PathLike | None = None) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        target = self.path(name)
        if target.exists():
            stamp = time.strftime("%Y%m%d-%H%M%S")
            hist = self.dir / "history"
            hist.mkdir(exist_ok=True)
            for src in (target, target.with_suffix(".json")):
                if src.exists():
                    shutil.move(str(src), hist / f"{src.stem}.{stamp}{src.suffix}")
            log.warning("artifact %s existed: previous version moved to %s", target, hist)
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
        save_checkpoint(payload, target)
        tmp = target.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(manifest, indent=2, default=str))
        os.replace(tmp, target.with_suffix(".json"))
        log.info("published %s", target)
        return target


def cycle_artifacts(index: int) -> dict[str, str]:
    """Artifact names read and written by cycle `index` (1, 2, ...).

    Cycle 1 fine-tunes EdgeFace from the pretrained one on `dsr_initial` outputs and
    continues that DSR; cycle k > 1 starts from cycle k-1's EdgeFace and DSR.
    """
    if index < 1:
        raise ValueError(f"cycle index must be >= 1, got {index}")
    sfx = "" if index == 1 else str(index)
    prev = "" if index <= 2 else str(index - 1)
    return {
        "dsr_in": "dsr_initial" if index == 1 else f"dsr_cyclic{prev}",
        "edgeface_in": "edgeface_pretrained" if index == 1 else f"edgeface_ft{prev}",
        "edgeface_out": f"edgeface_ft{sfx}",
        "dsr_out": f"dsr_cyclic{sfx}",
    }
