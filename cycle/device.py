"""The training device and mixed precision: `resolve_device` (the `device` setting, checked), `amp_dtype`
(the `trainer.amp` setting) and `autocast`. Its own module so that evaluation and start-up pick a device
without importing the training loop."""
from __future__ import annotations

import contextlib
import logging

import torch

from cycle.errors import ConfigError

log = logging.getLogger(__name__)


def resolve_device(spec: str = "auto") -> torch.device:
    spec = str(spec)
    if spec == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        log.info("device=auto resolved to %s", dev)
        return dev
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={spec} was requested but CUDA is not available on this machine "
                          f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}). "
                          "Use device=cpu or device=auto, or install a CUDA build of torch.")
    try:
        return torch.device(spec)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device={spec!r} is not a device: use auto, cpu, cuda or cuda:N") from None


def amp_dtype(device: torch.device, amp: str = "auto") -> torch.dtype | None:
    """bf16 where supported, fp16 otherwise on CUDA; off on CPU unless forced."""
    amp = str(amp)
    if amp in ("off", "false", "False", "none", "None"):
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if amp != "auto":
        raise ValueError(f"trainer.amp must be auto|bf16|fp16|off, got {amp}")
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
