"""What the benchmarks share: the real config, timing, matmul peak, peak memory, machine facts, tables."""
from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import gc
import math
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Callable

import torch
from omegaconf import open_dict
from torch.utils.data import DataLoader

from cycle import config

ROOT = Path(__file__).resolve().parents[1]


def compose(overrides: list[str] | None = None):
    """conf/train.yaml composed with `overrides`, paths rooted at the repository (as train.py does)."""
    cfg = config.compose(overrides or [])
    with open_dict(cfg):
        cfg.paths.root = str(ROOT)
    return cfg


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], object], device: torch.device, steps: int, warmup: int = 1,
               budget_s: float | None = None, min_steps: int = 3) -> list[float]:
    """Seconds of each of `steps` calls after `warmup` untimed ones; stops early (after
    `min_steps`) once the timed calls have used `budget_s`, so a busy machine cannot blow the run."""
    for _ in range(warmup):
        step()
    sync(device)
    times: list[float] = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
        if budget_s is not None and len(times) >= min_steps and sum(times) > budget_s:
            break
    return times


def interleaved(steps: dict[str, Callable[[], object]], device: torch.device, reps: int, warmup: int = 1,
                budget_s: float | None = None, min_reps: int = 2) -> dict[str, list[float]]:
    """Time several steps as A, B, A, B, ... so a change in machine load hits all of them alike;
    stops after `min_reps` rounds once the timed rounds have used `budget_s`."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(reps):
        for name, fn in steps.items():
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
        if budget_s is not None and i + 1 >= min_reps and sum(map(sum, times.values())) > budget_s:
            break
    return times


def loader_throughput(loader: DataLoader, batches: int = 30, warmup: int = 2) -> float:
    """Samples per second of iterating `loader` (after `warmup` batches, which include worker start-up)."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    n, t0 = 0, time.perf_counter()
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        n += len(batch["index"])
    return n / (time.perf_counter() - t0)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def matmul_peak(device: torch.device, n: int = 2048, reps: int = 5, dtype: torch.dtype = torch.float32,
                via: str = "matmul") -> float:
    """Best GFLOP/s of an n x n x n matrix product (2 n^3 FLOPs) over `reps` calls.

    via="matmul": torch.matmul (MKL on CPU). via="conv1x1": the same product as a 1x1 convolution,
    i.e. oneDNN, the library the networks' convolutions run on; on AMD CPUs MKL's sgemm can reach
    less than half of what oneDNN reaches (measured), so the peak is the better of the two.
    """
    if via == "matmul":
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        fn = a.__matmul__
    elif via == "conv1x1":
        side = math.isqrt(n)  # n pixels as a side x (n / side) image
        while n % side:
            side -= 1
        a = torch.randn(1, n, side, n // side, device=device, dtype=dtype)
        b = torch.randn(n, n, 1, 1, device=device, dtype=dtype)
        fn = lambda w: torch.conv2d(a, w)  # noqa: E731
    else:
        raise ValueError(f"via must be 'matmul' or 'conv1x1', got {via!r}")
    with torch.no_grad():
        fn(b)
        sync(device)
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            fn(b)
            sync(device)
            best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


# ---------------------------------------------------------------- peak memory

def _proc_status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    """Give freed heap pages back to the OS, so a later step's allocations show up in RSS again."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    """Reset VmHWM (peak RSS) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory above the level at entry, in bytes (`.peak`).

    CUDA: torch.cuda.max_memory_allocated (tensor memory). CPU: peak resident set size, Linux
    VmHWM reset at entry after returning freed heap pages to the OS; where the reset is not
    allowed, a thread samples VmRSS every 2 ms (may miss short spikes); elsewhere NaN.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = float("nan")
        self.method = ""

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda max_memory_allocated"
            return self
        _malloc_trim()
        self.base = _proc_status("VmRSS")
        self._stop = None
        if self.base is None:
            self.method = "unavailable"
        elif _reset_hwm():
            self.method = "peak RSS (VmHWM)"
        else:
            self.method = "sampled RSS"
            self._max = self.base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._max = max(self._max, _proc_status("VmRSS") or 0)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self._stop is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, _proc_status("VmRSS") or 0) - self.base
        elif self.base is not None:
            self.peak = (_proc_status("VmHWM") or self.base) - self.base
        return False


# ---------------------------------------------------------------- machine and output

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device | None = None) -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "cpu": cpu_model(), "cores": cores, "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device if device is not None and device.type == "cuda" else 0)
    return info


def md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(x, spec: str = ".1f", none: str = "-") -> str:
    if x is None or (isinstance(x, float) and x != x):
        return none
    return format(x, spec)
