"""The one HR -> VLR degradation of the project, and the bicubic up-sampling baseline.

Training, evaluation and benchmarks all call `degrade`, so the VLR faces a model
is trained on match the ones it is scored on unless a config says otherwise.
Every step is a torch op (JPEG excepted), so gradients flow through it.
"""
from __future__ import annotations

import io
import math
from functools import lru_cache
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

DOWN_MODES = ("area", "bicubic", "lanczos")
# The kernels in words, for reports: published numbers depend on them (MATLAB imresize, which most SR papers
# use, is bicubic a = -0.5 with anti-aliasing; torch and OpenCV bicubic up-sampling use a = -0.75).
DOWN_KERNELS = {
    "area": "box average over each output pixel's footprint (torch 'area')",
    "bicubic": "anti-aliased bicubic (Keys a = -0.5, kernel stretched by the scale factor; PIL BICUBIC, "
               "the kernel of MATLAB imresize)",
    "lanczos": "anti-aliased Lanczos-3 (kernel stretched by the scale factor; PIL LANCZOS)",
}
UPSAMPLE_KERNEL = ("bicubic, Keys a = -0.75, align_corners=False, no anti-aliasing, clamped to [0, 1] "
                   "(torch F.interpolate)")
DEFAULTS = {"down": "area", "blur_sigma": 0.0, "noise_std": 0.0, "jpeg_quality": None}


def _bicubic(x: np.ndarray) -> np.ndarray:  # Keys kernel with a = -0.5, as PIL
    a, x = -0.5, np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _lanczos3(x: np.ndarray) -> np.ndarray:
    return np.where(np.abs(x) < 3, np.sinc(x) * np.sinc(x / 3), 0.0)


_KERNELS = {"bicubic": _bicubic, "lanczos": _lanczos3}


@lru_cache(maxsize=64)
def _resample_matrix(n_in: int, n_out: int, mode: str) -> torch.Tensor:
    """(n_out, n_in) anti-aliased resampling weights, built the way PIL's resample does
    (kernel stretched by the down-scale factor, rows normalised), so results match PIL."""
    kernel = _KERNELS[mode]  # zero outside its support, so no explicit window
    scale = n_in / n_out
    stretch = max(scale, 1.0)
    centers = (np.arange(n_out) + 0.5) * scale
    taps = np.arange(n_in) + 0.5
    w = kernel((taps[None, :] - centers[:, None]) / stretch)
    w /= w.sum(axis=1, keepdims=True)
    return torch.from_numpy(w)


def _options(cfg: Mapping | None) -> dict:
    opts = dict(DEFAULTS)
    if cfg is not None:
        unknown = sorted(set(cfg.keys()) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"degradation: unknown key(s) {unknown}; known keys are {sorted(DEFAULTS)}")
        opts.update({k: cfg[k] for k in cfg.keys()})
    if opts["down"] not in DOWN_MODES:
        raise ValueError(f"degradation.down={opts['down']!r} is not one of {', '.join(DOWN_MODES)}")
    for key in ("blur_sigma", "noise_std"):
        value = opts[key]
        if value is None:
            value = 0.0
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value < 0:
            raise ValueError(f"degradation.{key} must be a number >= 0, got {opts[key]!r}")
        opts[key] = float(value)
    q = opts["jpeg_quality"]
    if q is not None and (isinstance(q, bool) or not isinstance(q, int) or not 1 <= q <= 100):
        raise ValueError(f"degradation.jpeg_quality must be null or an integer in 1..100, got {q!r}")
    return opts


def check_res(res) -> int:
    """`res` as an int > 0; accepts the config's string-valued res ('16')."""
    try:
        value = int(res)
    except (TypeError, ValueError):
        value = None
    if value is None or isinstance(res, bool) or value <= 0 or (isinstance(res, float) and res != value):
        raise ValueError(f"res must be a positive integer (16, 24 or 32 in this project), got {res!r}")
    return value


def _check_image(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4) or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a float tensor (3,H,W) or (B,3,H,W) in [0,1], got {shape}")


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = min(int(math.ceil(3 * sigma)), x.shape[-1] - 1, x.shape[-2] - 1)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    out = []
    for img in x:
        arr = (img.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        pil = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=int(quality))
        dec = np.asarray(Image.open(buf).convert(pil.mode)).reshape(arr.shape)
        out.append(torch.from_numpy(dec.copy()).permute(2, 0, 1))
    return torch.stack(out).to(device=x.device, dtype=x.dtype) / 255.0


def _noise(x: torch.Tensor, generator) -> torch.Tensor:
    if isinstance(generator, (list, tuple)):  # one generator per image: noise independent of the batch
        if len(generator) != len(x):
            raise ValueError(f"degrade: {len(generator)} generators for a batch of {len(x)} images")
        return torch.stack([_noise(img[None], g)[0] for img, g in zip(x, generator)])
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)


def degrade(hr: torch.Tensor, res, cfg: Mapping | None = None,
            generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """HR (3,H,W) or (B,3,H,W) in [0,1] -> VLR of the same rank at (res, res), in [0,1].

    Order: Gaussian blur (sigma in HR pixels) -> down-sampling (area = torch's 'area';
    bicubic and lanczos = PIL's anti-aliased filters) -> Gaussian noise (0-1 scale,
    drawn from `generator`, or from generator[i] for image i) -> JPEG re-encode at `jpeg_quality`.
    """
    _check_image(hr, "hr")
    res = check_res(res)
    opts = _options(cfg)
    if res > min(hr.shape[-2:]):
        raise ValueError(f"res={res} is larger than the HR image {tuple(hr.shape[-2:])}: "
                         "degrade only down-samples")
    x = hr.unsqueeze(0) if hr.dim() == 3 else hr
    if opts["blur_sigma"] > 0:
        x = _gaussian_blur(x, opts["blur_sigma"])
    if opts["down"] == "area":
        x = F.interpolate(x, size=(res, res), mode="area")
    else:
        wy = _resample_matrix(x.shape[-2], res, opts["down"]).to(x.device, x.dtype)
        wx = _resample_matrix(x.shape[-1], res, opts["down"]).to(x.device, x.dtype)
        x = wy @ x @ wx.T
    if opts["noise_std"] > 0:
        x = x + opts["noise_std"] * _noise(x, generator)
    x = x.clamp(0.0, 1.0)
    if opts["jpeg_quality"] is not None:
        x = _jpeg(x, opts["jpeg_quality"])
    return x.squeeze(0) if hr.dim() == 3 else x


def upsample(lr: torch.Tensor, size: int = 112) -> torch.Tensor:
    """Bicubic up-sampling of (3,r,r) or (B,3,r,r) to (size, size), clamped to [0,1]: the baseline."""
    _check_image(lr, "lr")
    x = lr.unsqueeze(0) if lr.dim() == 3 else lr
    x = F.interpolate(x, size=(int(size), int(size)), mode="bicubic", align_corners=False).clamp(0.0, 1.0)
    return x.squeeze(0) if lr.dim() == 3 else x
