"""The overlap check: no evaluated identity may have been seen in training or model selection.

Each published artifact's manifest records the identity names its stage trained on (`train`) and selected
its checkpoint on (`val`), and its parents by path. A method's lineage is every artifact it uses and
their parents, recursively; the identities it may not be scored on are the union of their `train` and
`val` names. Official EdgeFace weights were trained on data this project cannot see: their identities
are unknown, and the report says so instead of claiming disjointness.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from cycle.artifacts import ArtifactStore
from cycle.stages import Method
from eval.errors import EvaluationError

log = logging.getLogger(__name__)


@dataclass
class Lineage:
    seen: set[str] = field(default_factory=set)          # train + val identity names along the lineage
    artifacts: list[str] = field(default_factory=list)   # manifests read
    unknown: list[str] = field(default_factory=list)     # what has no identity record (official weights, ...)


def _walk(manifest_path: Path, out: Lineage, visited: set[str]) -> None:
    key = str(manifest_path)
    if key in visited:
        return
    visited.add(key)
    if not manifest_path.is_file():
        out.unknown.append(f"{manifest_path.stem} (no manifest)")
        return
    man = json.loads(manifest_path.read_text())
    out.artifacts.append(man.get("name", manifest_path.stem))
    ids = man.get("identities") or {}
    if not ids:
        out.unknown.append(f"{man.get('name', manifest_path.stem)} (training identities not recorded)")
    for names in ids.values():
        out.seen.update(map(str, names))
    if "edgeface.weights" in ((man.get("lineage") or {}).get("parents") or {}):
        out.unknown.append("official EdgeFace weights (training identities unknown)")
    for parent in (man.get("parents") or {}).values():
        path = parent["path"] if isinstance(parent, dict) else parent
        _walk(Path(path).with_suffix(".json"), out, visited)


def method_lineage(store: ArtifactStore, artifacts: list[str | None], official_weights: bool) -> Lineage:
    """Identities seen along the lineage of `artifacts` (None = the pretrained EdgeFace)."""
    out, visited = Lineage(), set()
    for name in artifacts:
        if name is None and official_weights:
            out.unknown.append("official EdgeFace weights (training identities unknown)")
            continue
        _walk(store.path(name or "edgeface_pretrained").with_suffix(".json"), out, visited)
    return out


def overlap(evaluated: list[str], lineage: Lineage) -> list[str]:
    """Evaluated identity names that the lineage trained or selected on, sorted."""
    return sorted(set(map(str, evaluated)) & lineage.seen)


def check_overlap(cfg: DictConfig, res: str, store: ArtifactStore, methods: list[Method], evaluated: list[str],
                  notes: list[str]) -> dict[str, int]:
    """Refuse (or, with eval.allow_overlap, mark) methods whose lineage trained or selected on an evaluated
    identity; note lineages whose identities are unknown. Returns method -> overlapping identity count."""
    official = bool(cfg.edgeface.get("weights"))
    leaks, unknown = {}, {}
    for m in methods:
        lin = method_lineage(store, [a for a in (m.dsr,) if a] + [m.edgeface], official)
        for what in lin.unknown:
            unknown.setdefault(what, []).append(m.name)
        hit = overlap(evaluated, lin)
        if not hit:
            continue
        msg = (f"res {res}, {m.name}: overlap: {len(hit)} of the {len(evaluated)} evaluated identities were seen "
               f"in training or validation along its lineage ({', '.join(lin.artifacts)}), e.g. "
               f"{', '.join(hit[:5])}")
        if not cfg.eval.get("allow_overlap"):
            raise EvaluationError(f"{msg}. Evaluate on identities held out from training (eval.split=test with the "
                                  "data settings the models were trained with, or a pairs file of other people), "
                                  "or set eval.allow_overlap=true to report anyway, marked as not held out")
        log.warning("%s (eval.allow_overlap=true: reported, marked)", msg)
        notes.append(f"{msg}: eval.allow_overlap=true, so this is NOT a held-out result")
        leaks[m.name] = len(hit)
    for what, names in unknown.items():
        notes.append(f"res {res}: {what}: disjointness from the evaluated identities is not claimed for "
                     f"{', '.join(names)}")
    return leaks
