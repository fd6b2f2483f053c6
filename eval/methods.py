"""The compared methods: the rows of the evaluation report, derived from the stage table
(``cycle.stages.evaluation_methods``).

Each method is an image source (the probe image) and an EdgeFace, read from the per-resolution artifacts
(``cycle.artifacts``):

    hr          HR face                  + pretrained EdgeFace   (upper bound; no PSNR/SSIM)
    bicubic     bicubic(VLR)             + pretrained EdgeFace
    initial     DSR(dsr_initial)(VLR)    + pretrained EdgeFace
    pixel       DSR(dsr_pixel)(VLR)      + pretrained EdgeFace   (ablation: cycle.ablations=[pixel])
    initial_ft  DSR(dsr_initial)(VLR)    + EdgeFace edgeface_ft
    cyclic      DSR(dsr_cyclic)(VLR)     + EdgeFace edgeface_ft
    cyclic2     DSR(dsr_cyclic2)(VLR)    + EdgeFace edgeface_ft2

"Pretrained EdgeFace" is ``edgeface.weights`` when set, else the ``edgeface_pretrained`` artifact. A
method whose artifact is absent or does not load is skipped: results.json and report.md say why.
"""
from __future__ import annotations

from omegaconf import DictConfig

from cycle.artifacts import ArtifactStore
from cycle.stages import METHODS, PRETRAINED_EDGEFACE, STAGE, Method, in_cycle, producer

__all__ = ["Method", "METHODS", "PRETRAINED", "default_methods", "method_cycle"]

PRETRAINED = PRETRAINED_EDGEFACE


def default_methods(cfg: DictConfig, store: ArtifactStore) -> list[Method]:
    """Methods of the cycles this configuration runs: 2nd-cycle rows only with cycle.cycles >= 2, or with
    `auto` when the cycle-1 DSR's manifest records the decision to run a 2nd cycle; an ablation's row only
    when `cycle.ablations` names it."""
    cycles = cfg.cycle.cycles
    if str(cycles) == "auto":
        decision = store.manifest(STAGE["cyclic"].artifact(1)).get("auto_second_cycle") or {}
        n = 2 if decision.get("second_cycle") else 1
    else:
        n = int(cycles)
    return [m for m in METHODS if method_cycle(m) <= n
            and all(in_cycle(cfg, producer(a)[0]) for a in (m.dsr, m.edgeface) if a)]


def method_cycle(m: Method) -> int:
    """The latest cycle whose artifact a method uses (1 for hr/bicubic)."""
    return max([producer(a)[1] for a in (m.dsr, m.edgeface) if a] or [1])
