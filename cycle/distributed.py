"""Data-parallel training inside one job: the process group, who writes, and the gradient all-reduce.

One process per GPU (or per CPU worker with device=cpu). Ranks come from the launcher:

    torchrun --standalone --nproc_per_node=N train.py ...      RANK / WORLD_SIZE / LOCAL_RANK (+ MASTER_*)
    hydra.launcher.tasks_per_node=N (submitit's srun)          SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID

CUDA uses NCCL with each process pinned to `cuda:<local rank>`; the CPU uses gloo. A single process (no
launcher variables) never creates a process group and every helper here is a no-op, so one-process runs
are unchanged.

Gradients are averaged with an explicit all-reduce over the optimizer's parameters rather than by wrapping
modules in `DistributedDataParallel`: the EdgeFace stages train a margin head that is called outside the
backbone and `edgeface_ft` freezes the backbone in its first phase, so "the parameters this optimizer steps"
is the one set that is right for every stage, and the stages' `step()` functions stay unchanged.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def launcher_env(environ: dict | None = None) -> DistEnv:
    """Rank, world size and local rank from torchrun's or Slurm's variables (torchrun's win). Slurm's count only
    inside an srun step of several tasks (SLURM_STEP_NUM_TASKS, which submitit's srun sets): a single process
    in a batch script or salloc of --ntasks=4 has SLURM_NTASKS=4 but no peers, and would wait for them."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if int(env.get("SLURM_STEP_NUM_TASKS", 1)) > 1 and "SLURM_PROCID" in env:
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return DistEnv()


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init(device: torch.device) -> tuple[torch.device, DistEnv]:
    """Join the job's process group once per process (idempotent); returns the device this rank uses."""
    env = launcher_env()
    if env.world_size == 1:
        return device, env
    if device.type == "cuda":
        if torch.cuda.device_count() <= env.local_rank:
            raise RuntimeError(f"rank {env.rank} has local rank {env.local_rank} but this node shows "
                               f"{torch.cuda.device_count()} GPU(s): start as many processes per node as GPUs "
                               "(--nproc_per_node / hydra.launcher.tasks_per_node = gpus_per_node)")
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    if not active():
        if "MASTER_ADDR" not in os.environ:  # started by srun (submitit): export MASTER_ADDR/PORT, RANK, ...
            from submitit.helpers import TorchDistributedEnvironment
            TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size,
                                device_id=device if device.type == "cuda" else None)
        log.info("rank %d/%d (local %d) joined the %s process group on %s",
                 env.rank, env.world_size, env.local_rank, backend, device)
    return device, env


def barrier() -> None:
    if active():
        dist.barrier()


@torch.no_grad()
def broadcast_modules(modules: Iterable[nn.Module]) -> None:
    """Rank 0's parameters and buffers to every rank (initial weights, BatchNorm statistics)."""
    if not active():
        return
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            dist.broadcast(t.data, src=0)


@torch.no_grad()
def average_gradients(params: Iterable[torch.Tensor]) -> None:
    """Average gradients over ranks (one flat all-reduce). A parameter without a gradient on this rank
    contributes zeros, so every rank makes the same collective call whatever its batch touched."""
    if not active():
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is True on one (a preemption signal seen by one task stops all at the same step)."""
    if not active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_object(obj):
    """Rank 0's (picklable, trusted: it comes from our own rank 0) object on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main_only(fn, *args, **kwargs):
    """Run `fn` on rank 0 only, then let every rank continue together with rank 0's result. Every rank reaches
    the barrier: an exception on rank 0 is re-raised on rank 0 only after the others were released with None."""
    if not active():
        return fn(*args, **kwargs)
    result, error = None, None
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: B902 - re-raised below, after the collective
            error = exc
    result = broadcast_object(None if error else result)
    if error is not None:
        raise error
    return result


def spawn_local(fn, nprocs: int, *args) -> None:
    """Run `fn(rank, *args)` in `nprocs` fresh processes on this machine, as a torchrun job of one thread each
    (gloo on the CPU): the tests and `python -m bench.ddp`. `fn` must be importable (module level)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_local_worker, args=(nprocs, port, fn, args), nprocs=nprocs, join=True)


def _local_worker(rank: int, nprocs: int, port: int, fn, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(nprocs), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    init(torch.device("cpu"))
    try:
        fn(rank, *args)
    finally:
        if active():
            dist.destroy_process_group()
