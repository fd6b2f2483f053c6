"""EdgeFace: official-weight-compatible face-embedding backbones, checkpoint loader, margin heads.

    import edgeface
    model = edgeface.load("edgeface_xs_gamma_06.pt")       # variant inferred, eval mode
    emb = model.embed(faces)                                # (B,3,112,112) RGB [0,1] -> unit (B,512)
"""
from edgeface.backbones import (
    EMBEDDING_SIZE,
    INPUT_SIZE,
    VARIANTS,
    EdgeFace,
    LoRaLin,
    build,
    count_parameters,
    dequantize,
    quantize,
)
from edgeface.heads import ArcFace, CosFace, build_head
from edgeface.loader import CheckpointMismatch, guess_variant, load, save

__all__ = [
    "EMBEDDING_SIZE", "INPUT_SIZE", "VARIANTS", "EdgeFace", "LoRaLin", "build", "count_parameters",
    "dequantize", "quantize", "ArcFace", "CosFace", "build_head", "CheckpointMismatch", "guess_variant",
    "load", "save",
]
