"""The overlap check: no evaluated identity may have been seen in training or model selection.

Each published artifact's manifest records the identity names its stage trained on (`train`) and selected
its checkpoint on (`val`), and its parents by path. A method's lineage is every artifact it uses and
their parents, recursively; the identities it may not be scored on are the union of their `train` and
`val` names. Official EdgeFace weights were trained on data this project cannot see: their identities
are unknown, and the report says so instead of claiming disjointness.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cycle.artifacts import ArtifactStore


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
