"""The compared methods: the rows of the evaluation report, derived from the stage table
(``cycle.stages.evaluation_methods``).

Each method is an image source (the probe image) and an EdgeFace, read from the per-resolution artifacts
(``cycle.artifacts``):

    hr          HR face                  + pretrained EdgeFace   (upper bound; no PSNR/SSIM)
    bicubic     bicubic(VLR)             + pretrained EdgeFace
    initial     DSR(dsr_initial)(VLR)    + pretrained EdgeFace
    initial_ft  DSR(dsr_initial)(VLR)    + EdgeFace edgeface_ft
    cyclic      DSR(dsr_cyclic)(VLR)     + EdgeFace edgeface_ft
    cyclic2     DSR(dsr_cyclic2)(VLR)    + EdgeFace edgeface_ft2

"Pretrained EdgeFace" is ``edgeface.weights`` when set, else the ``edgeface_pretrained`` artifact. A
method whose artifact is absent or does not load is skipped: results.json and report.md say why.
"""
from __future__ import annotations

from cycle.stages import METHODS, PRETRAINED_EDGEFACE, Method

__all__ = ["Method", "METHODS", "PRETRAINED"]

PRETRAINED = PRETRAINED_EDGEFACE
