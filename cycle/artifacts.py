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
from cycle.lineage import artifact_key, data_identity, file_sha256, stage_material
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


class ProvenanceError(UserError, ValueError):
    """A parent artifact whose recorded lineage or content does not match what this run needs."""


class ArtifactStore:
    """The artifacts of one resolution.

    With a configuration (`ArtifactStore.for_config(cfg)`, what every stage and the evaluation use) an
    artifact's file name carries its lineage key (`cycle.lineage`): `<root>/res<r>/<name>-<key>.pt`, so
    runs with different settings never share or overwrite an artifact and the same configuration finds
    its own again. Without one (inspecting a folder by hand) names are plain: `<name>.pt`.
    """

    def __init__(self, root: str | os.PathLike, res: int | str, cfg: DictConfig | None = None):
        self.res = int(res)
        self.dir = Path(root) / f"res{self.res}"
        self.cfg = cfg
        self._keys: dict[str, str] = {}

    @classmethod
    def for_config(cls, cfg: DictConfig) -> "ArtifactStore":
        return cls(cfg.paths.artifacts_dir, cfg.res, cfg)

    def key(self, name: str) -> str | None:
        if self.cfg is None:
            return None
        if name not in self._keys:
            self._keys[name] = artifact_key(self.cfg, name)
        return self._keys[name]

    def path(self, name: str) -> Path:
        key = self.key(name)
        return self.dir / (f"{name}-{key}.pt" if key else f"{name}.pt")

    def exists(self, name: str) -> bool:
        p = self.path(name)
        return p.is_file() and p.with_suffix(".json").is_file()  # the manifest is written last

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

    def verify(self, name: str) -> Path:
        """`require`, then refuse a file whose content or recorded data/degradation differs from what its
        manifest and this configuration say (a copied, edited or truncated artifact)."""
        path = self.require(name)
        if self.cfg is None:
            return path
        man, problems = self.manifest(name), []
        if not man:
            problems.append("it has no manifest beside it")
        recorded = man.get("sha256")
        if recorded and recorded != file_sha256(path):
            problems.append(f"its content changed after it was published (sha256 {file_sha256(path)[:12]}, "
                            f"manifest {recorded[:12]})")
        lineage = man.get("lineage") or {}
        data_now = data_identity(self.cfg)
        if "data" in lineage and lineage["data"] != data_now:
            problems.append(f"it was trained on other data ({_diff(lineage['data'], data_now)})")
        degradation_now = to_plain(self.cfg.degradation)
        if "degradation" in lineage and lineage["degradation"] != degradation_now:
            problems.append("it was trained with another degradation "
                            f"({_diff(lineage['degradation'], degradation_now)})")
        if problems:
            raise ProvenanceError(f"artifact {path} cannot be used: {'; '.join(problems)}. Rebuild it with "
                                  f"{producer_command(name, self.res)} (same data/experiment/paths settings)")
        return path

    @_clear_write_errors
    def publish(self, name: str, payload: dict[str, Any], *, cfg: DictConfig | dict | None = None,
                metrics: dict[str, float] | None = None, parents: list[str] | None = None,
                run_dir: str | os.PathLike | None = None, identities: dict[str, list] | None = None,
                extra: dict[str, Any] | None = None) -> Path:
        """Write `payload` and its manifest: config, metrics, lineage (key, what it hashes, parents by key and
        sha256), the data fingerprint, the train/val identity names (for the evaluation's overlap check)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        target = self.path(name)
        move_aside([target, target.with_suffix(".json")], self.dir / HISTORY, flat=True)
        if isinstance(cfg, DictConfig):
            cfg = to_plain(cfg)
        save_checkpoint(payload, target, what="artifact", keeps=_KEPT)
        lineage = stage_material(self.cfg, *_stage_of(name)) if self.cfg is not None else None
        manifest = {
            "name": name,
            "res": self.res,
            "key": self.key(name),
            "sha256": file_sha256(target),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "code_version": code_version(),
            "run_dir": str(run_dir) if run_dir else None,
            "parents": {p: self._parent_record(p) for p in (parents or [])},
            "data": lineage["data"]["fingerprint"] if lineage else None,
            "identities": {k: [str(n) for n in v] for k, v in (identities or {}).items()},
            "metrics": {k: float(v) for k, v in (metrics or {}).items()},
            **(extra or {}),
            "lineage": lineage,
            "config": cfg,
        }
        tmp = target.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(manifest, indent=2, default=str))
        os.replace(tmp, target.with_suffix(".json"))
        log.info("published %s", target)
        return target

    def _parent_record(self, name: str) -> dict[str, Any]:
        path = self.path(name)
        sha = self.manifest(name).get("sha256") or (file_sha256(path) if path.is_file() else None)
        return {"path": str(path), "key": self.key(name), "sha256": sha}

    def update_manifest(self, name: str, **entries: Any) -> None:
        """Add entries to a published manifest (atomically), e.g. a decision taken after publishing."""
        p = self.path(name).with_suffix(".json")
        man = json.loads(p.read_text())
        man.update(entries)
        tmp = p.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(man, indent=2, default=str))
        os.replace(tmp, p)


def _stage_of(artifact: str) -> tuple[str, int]:
    spec, k = producer(artifact)
    return spec.name, k


def _diff(recorded: Any, now: Any, prefix: str = "") -> str:
    """The first keys where two nested dicts differ, as `key: recorded -> now`."""
    if isinstance(recorded, dict) and isinstance(now, dict):
        out = [_diff(recorded.get(k), now.get(k), f"{prefix}{k}.") for k in sorted(set(recorded) | set(now))
               if recorded.get(k) != now.get(k)]
        return ", ".join(out[:3])
    return f"{prefix.rstrip('.')}: {recorded!r} -> {now!r}"


def load_model(cfg: DictConfig, store: ArtifactStore, name: str | None) -> nn.Module:
    """The network of artifact `name` (eval mode, CPU), built by its stage's `loader` from the stage table.

    name=None: the official EdgeFace weights (`edgeface.weights`), loaded like `edgeface_pretrained`.
    """
    if name is None:
        path, spec = str(cfg.edgeface.weights), STAGE["edgeface_pretrain"]
        log.info("pretrained EdgeFace: official weights %s (%s)", path, cfg.edgeface.variant)
    else:
        path, spec = store.verify(name), producer(name)[0]
        log.info("%s from artifact %s", spec.kind, path)
    return get_method(spec.loader)(cfg, path).eval()
