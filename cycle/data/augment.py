"""Training augmentation of HR batches (flip, small rotation, colour jitter) and its `data.augment` check."""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from cycle.data.options import DataError, _plain

AUGMENT_KEYS = {"flip": False, "rotate_deg": 0.0, "color_jitter": 0.0}


def _check_augment(augment: Mapping | None) -> dict:
    aug = dict(AUGMENT_KEYS)
    augment = _plain(augment) or {}
    unknown = sorted(set(augment) - set(AUGMENT_KEYS))
    if unknown:
        raise DataError(f"data.augment: unknown key(s) {unknown}; known: {sorted(AUGMENT_KEYS)}")
    aug.update({k: v for k, v in augment.items() if v is not None})
    for k in ("rotate_deg", "color_jitter"):
        if isinstance(aug[k], bool) or not isinstance(aug[k], (int, float)) or aug[k] < 0:
            raise DataError(f"data.augment.{k} must be a number >= 0, got {aug[k]!r}")
    if aug["color_jitter"] >= 1:
        raise DataError(f"data.augment.color_jitter must be < 1, got {aug['color_jitter']}")
    aug["flip"] = bool(aug["flip"])
    return aug


def augment_batch(hr: torch.Tensor, aug: Mapping, gens: list[torch.Generator]) -> torch.Tensor:
    """Flip, small rotation and colour jitter of HR images (B,3,H,W), each image's draws from its own
    generator; the VLR image is made afterwards from the result, so (VLR, HR) stay aligned."""
    u = torch.stack([torch.rand(5, generator=g) for g in gens]).to(hr.device, hr.dtype)  # fixed draws per image
    if aug["flip"]:
        flip = (u[:, 0] < 0.5).view(-1, 1, 1, 1)
        hr = torch.where(flip, hr.flip(-1), hr)
    if aug["rotate_deg"] > 0:
        a = torch.deg2rad((u[:, 1] * 2 - 1) * aug["rotate_deg"])
        cos, sin, zero = a.cos(), a.sin(), torch.zeros_like(a)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        grid = F.affine_grid(theta, list(hr.shape), align_corners=False)
        hr = F.grid_sample(hr, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    j = aug["color_jitter"]
    if j > 0:  # brightness, contrast, saturation factors in [1-j, 1+j]
        b, c, s = ((1 + (u[:, 2:5] * 2 - 1) * j).T).view(3, -1, 1, 1, 1)
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=hr.dtype, device=hr.device).view(1, 3, 1, 1)
        hr = hr * b
        mean = (hr * weights).sum(1, keepdim=True).mean((2, 3), keepdim=True)
        hr = (hr - mean) * c + mean
        gray = (hr * weights).sum(1, keepdim=True)
        hr = gray + (hr - gray) * s
    return hr.clamp(0.0, 1.0)
