"""Margin heads (insightface style): ArcFace and CosFace.

forward(embeddings, labels) -> scaled logits with the margin on the target class (feed to
cross-entropy); .logits(embeddings) -> scale * cos without margin (validation / monitoring).

Numerics: the cosine is computed in float32 with autocast disabled (fp16 loses the precision
sqrt(1 - cos^2) needs near cos = 1, and squared norms of fp16 embeddings overflow), clamped to
[-1+eps, 1-eps] so sqrt(1 - cos^2) has a finite gradient at cos = +-1. Logits are float32.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

_EPS = 1e-6  # cos clamp; in float32 1-1e-6 is representable and keeps d sqrt(1-c^2)/dc finite
# Floor on ||embedding|| in the normalisation: d(x/||x||)/dx ~ 1/||x||, so a near-zero fp16 embedding
# would get a gradient beyond fp16's range (65504). Real embeddings have norms >> 1e-3.
_NORM_EPS = 1e-3


class _MarginHead(nn.Module):
    def __init__(self, embedding_size: int, num_classes: int | None, scale: float):
        super().__init__()
        if num_classes is None:
            raise TypeError(f"{type(self).__name__} needs num_classes (the number of training identities)")
        if num_classes < 2:
            raise ValueError(f"a margin head needs at least 2 classes, got num_classes={num_classes}")
        self.embedding_size, self.num_classes, self.scale = embedding_size, num_classes, float(scale)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.normal_(self.weight, std=0.01)  # insightface arcface_torch init

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) float32 cosines, clamped away from +-1."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"expected embeddings of shape (B, {self.embedding_size}), "
                             f"got {tuple(embeddings.shape)}")
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            emb = F.normalize(embeddings.float(), dim=1, eps=_NORM_EPS)
            w = F.normalize(self.weight.float(), dim=1)
            return F.linear(emb, w).clamp(-1.0 + _EPS, 1.0 - _EPS)

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """scale * cos, no margin: logits for validation accuracy / loss."""
        return self.scale * self.cosine(embeddings)

    def _target(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if labels.shape != cos.shape[:1]:
            raise ValueError(f"labels must have shape ({cos.shape[0]},), got {tuple(labels.shape)}")
        # One host sync per step buys a readable error instead of a device-side assert from gather.
        if not torch.compiler.is_compiling() and bool(((labels < 0) | (labels >= self.num_classes)).any()):
            raise ValueError(f"labels must lie in [0, {self.num_classes}); got range "
                             f"[{int(labels.min())}, {int(labels.max())}] (does num_classes match the data?)")
        return cos.gather(1, labels.long()[:, None])

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = self.cosine(embeddings)
        idx = labels.long()[:, None]
        target = self._target(cos, labels)
        return self.scale * cos.scatter(1, idx, self.margin_fn(target))

    def margin_fn(self, target_cos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"scale={self.scale}, margin={self.margin}")


class ArcFace(_MarginHead):
    """Additive angular margin: cos(theta + m) on the target class.

    Where theta + m would pass pi (cos(theta+m) is no longer decreasing in theta), the standard
    fallback cos(theta) - m*sin(m) is used (insightface / ArcMarginProduct); easy_margin instead
    applies the margin only where cos(theta) > 0.
    """

    def __init__(self, embedding_size: int = 512, num_classes: int | None = None, scale: float = 64.0,
                 margin: float = 0.5, easy_margin: bool = False):
        super().__init__(embedding_size, num_classes, scale)
        self.margin, self.easy_margin = float(margin), easy_margin
        self.cos_m, self.sin_m = math.cos(margin), math.sin(margin)
        self.th = math.cos(math.pi - margin)  # theta < pi - m  <=>  cos(theta) > th
        self.mm = math.sin(math.pi - margin) * margin  # = m * sin(m)

    def margin_fn(self, target_cos: torch.Tensor) -> torch.Tensor:
        sin = torch.sqrt((1.0 - target_cos * target_cos).clamp_min(0.0))
        phi = target_cos * self.cos_m - sin * self.sin_m  # cos(theta + m)
        if self.easy_margin:
            return torch.where(target_cos > 0, phi, target_cos)
        return torch.where(target_cos > self.th, phi, target_cos - self.mm)


class CosFace(_MarginHead):
    """Additive cosine margin: cos(theta) - m on the target class."""

    def __init__(self, embedding_size: int = 512, num_classes: int | None = None, scale: float = 64.0,
                 margin: float = 0.35):
        super().__init__(embedding_size, num_classes, scale)
        self.margin = float(margin)

    def margin_fn(self, target_cos: torch.Tensor) -> torch.Tensor:
        return target_cos - self.margin


HEADS = {"arcface": ArcFace, "cosface": CosFace}


def build_head(name: str, embedding_size: int = 512, num_classes: int | None = None, **kw) -> _MarginHead:
    """build_head("arcface", 512, n_ids, scale=64, margin=0.5); kw go to the head's constructor."""
    key = name.lower()
    if key not in HEADS:
        raise ValueError(f"unknown margin head {name!r}; choose one of: {', '.join(HEADS)}")
    return HEADS[key](embedding_size=embedding_size, num_classes=num_classes, **kw)
