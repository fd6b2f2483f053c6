"""Data-parallel training on the CPU (gloo, 2 processes of 1 thread): ranks, sharding, gradients, resume."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from omegaconf import open_dict
from test_dsr_stage import publish_edgeface, with_artifacts
from torch import nn

from cycle import distributed
from cycle.artifacts import ArtifactStore
from cycle.data.samplers import EpochSampler, PKBatchSampler
from cycle.logger import read_metrics
from cycle.runner import LINEAGE_STAMP
from cycle.training import Trainer


def test_ranks_come_from_torchrun_or_slurm():
    assert distributed.launcher_env({}) == distributed.DistEnv(0, 1, 0)
    assert distributed.launcher_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (
        distributed.DistEnv(3, 4, 1))
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1"}
    assert distributed.launcher_env(slurm) == distributed.DistEnv(5, 8, 1)
    # one task, or a batch script of --ntasks=8 outside srun: no peers to wait for; torchrun's variables win
    assert distributed.launcher_env({**slurm, "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1"}).world_size == 1
    assert distributed.launcher_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}).world_size == 1
    assert distributed.launcher_env({**slurm, "RANK": "0", "WORLD_SIZE": "2"}) == distributed.DistEnv(0, 2, 0)


@pytest.mark.parametrize("n", [10, 11])
def test_epoch_sampler_shards_every_sample_once_and_evenly(n):
    shards = [list(EpochSampler(n, seed=3, rank=r, world_size=2)) for r in range(2)]
    one = list(EpochSampler(n, seed=3))
    assert len(shards[0]) == len(shards[1]) == len(EpochSampler(n, world_size=2)) == -(-n // 2)
    union = sorted(shards[0] + shards[1], key=lambda key: key[2])
    assert union[:n] == one  # same keys (index, epoch, global slot) as one process: same augmentation
    assert {i for i, _, _ in union} == set(range(n))  # odd n: one sample padded twice, none missed


def test_pk_sampler_shards_whole_pk_batches_evenly():
    labels = np.repeat(np.arange(12), 4)
    ranks = [list(PKBatchSampler(labels, p=3, k=2, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(PKBatchSampler(labels, 3, 2, rank=1, world_size=2)) == 4
    for batch in ranks[0] + ranks[1]:
        ids = labels[[i for i, _, _ in batch]]
        assert len(batch) == 6 and all((ids == c).sum() == 2 for c in set(ids))  # P x K kept per rank
    slots = sorted(s for b in ranks[0] + ranks[1] for _, _, s in b)
    assert slots == list(range(48))  # the two ranks interleave one global sequence of batches


def _spawn(fn, world_size: int, *args) -> None:
    os.environ.setdefault("WANDB_MODE", "offline")
    distributed.spawn_local(fn, world_size, *args)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def _one_sgd_step(rank: int, x: torch.Tensor, y: torch.Tensor, out: str | None, tmp: str) -> torch.Tensor:
    """One Trainer step with SGD(lr=1) on (x, y): the change of the parameters is minus the gradient."""
    torch.manual_seed(rank)  # different initial weights per rank: the broadcast from rank 0 must fix them
    net = _Net()
    if rank == 0:
        torch.manual_seed(0)
        net = _Net()
    trainer = Trainer(tcfg={"grad_clip": 0, "warmup_frac": 0, "amp": "off", "progress": False}, run_dir=tmp,
                      logger=None, device=torch.device("cpu"), modules={"net": net},
                      optimizer=torch.optim.SGD(net.parameters(), lr=1.0), epochs=1, steps_per_epoch=1,
                      resume=False)
    before = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
    trainer._micro_step({"x": x, "y": y}, lambda b: (nn.functional.cross_entropy(net(b["x"]), b["y"]), {}),
                        last_micro=True)
    grad = before - torch.cat([p.detach().flatten() for p in net.parameters()])
    if out is not None:
        torch.save(grad, f"{out}.{rank}")
    return grad


def _half_step(rank, x, y, out, tmp):
    _one_sgd_step(rank, x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4], out, tmp)


def test_two_process_step_gives_the_gradients_of_the_union_batch(tmp_path):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 2, (8,), generator=g)
    ref = _one_sgd_step(0, x, y, None, str(tmp_path / "one"))
    _spawn(_half_step, 2, x, y, str(tmp_path / "grad"), str(tmp_path / "two"))
    for r in range(2):
        got = torch.load(tmp_path / f"grad.{r}", weights_only=True)
        assert torch.allclose(got, ref, atol=1e-5), (r, (got - ref).abs().max())


# ------------------------------------------------------------------ a stage across world sizes
def _run_initial(rank, cfg, out_dir):
    from dsr.stage import run_initial
    run_initial(cfg, out_dir)


def _stage_cfg(smoke_cfg, tmp_path, epochs):
    cfg = with_artifacts(smoke_cfg("stage=initial", f"stages.initial.epochs={epochs}", "trainer.limit_train_batches=2",
                                   "trainer.batch_size=4"), tmp_path / "art")
    with open_dict(cfg):
        cfg.trainer.ckpt_every = 1
    return cfg


def _run(world_size, cfg, out_dir):
    if world_size == 1:
        from dsr.stage import run_initial
        run_initial(cfg, out_dir)
    else:
        _spawn(_run_initial, world_size, cfg, out_dir)


@pytest.mark.slow
@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_initial_publishes_and_resumes_across_world_sizes(smoke_cfg, tmp_path, first, then):
    cfg1 = _stage_cfg(smoke_cfg, tmp_path, epochs=1)
    publish_edgeface(cfg1, "edgeface_pretrained")
    run_dir = tmp_path / "run"
    _run(first, cfg1, run_dir)
    store = ArtifactStore.for_config(cfg1)
    assert store.manifest("dsr_initial")["world_size"] == first
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert rows[0]["meta"] == {"world_size": first}
    assert [r["step"] for r in rows if "lr" in r] == [1, 2]  # rank 0 alone wrote metrics
    # resumed from last.pt (step 2) in the other world size: the finished run stands in for an interrupted
    # run of a 2-epoch schedule (checkpoints resume only their own lineage: stamp them as that one's)
    (run_dir / "checkpoints" / "initial.done.pt").unlink()
    cfg2 = _stage_cfg(smoke_cfg, tmp_path, epochs=2)
    stamp = run_dir / "checkpoints" / LINEAGE_STAMP
    key = ArtifactStore.for_config(cfg2).key("dsr_initial")
    stamp.write_text(json.dumps({**json.loads(stamp.read_text()), "key": key}))
    _run(then, cfg2, run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if "lr" in r] == [1, 2, 3, 4]
    assert [r["meta"]["world_size"] for r in rows if "meta" in r] == [first, then]
    manifest = ArtifactStore.for_config(cfg2).manifest("dsr_initial")
    assert manifest["world_size"] == then


@pytest.mark.slow
def test_bench_ddp_quick_reports_scaling(tmp_path):
    import sys

    from conftest import ROOT
    if str(ROOT) not in sys.path:  # bench/ is not an installed package
        sys.path.insert(0, str(ROOT))
    from bench import ddp

    res = ddp.main(["--quick", "--batch", "2", "--out", str(tmp_path)])
    assert [r["processes"] for r in res["runs"]] == [1, 2] and all(r["img_s"] > 0 for r in res["runs"])
    assert 0 < res["scaling_efficiency"] and "efficiency" in (tmp_path / "ddp.md").read_text()


# ------------------------------------------------------------------ the GPU-ready step
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_degradation_on_the_device_equals_the_loader_path(smoke_cfg, device):
    from cycle.data import build_splits, make_loader

    cfg = smoke_cfg()
    faces = build_splits(cfg.data, cfg.paths.cache_dir)["train"]
    common = dict(batch_size=8, res=16, train=True, seed=3, augment={"flip": True, "rotate_deg": 10,
                  "color_jitter": 0.2}, degradation={"down": "bicubic", "blur_sigma": 1.0, "noise_std": 0.05})
    cpu = next(iter(make_loader(faces, **common)))
    loader = make_loader(faces, degrade_on="device", **common)
    raw = loader.collate_fn([loader.dataset[k] for k in list(loader.sampler)[:8]])
    assert raw["hr_u8"].dtype == torch.uint8 and "lr" not in raw  # workers only decode and stack uint8
    loader.set_epoch(0)
    loader.device = torch.device(device)
    dev = next(iter(loader))
    assert dev["lr"].device.type == device
    for k in ("hr", "lr"):  # same per-image seeds: the random parts (flip, angle, jitter, noise) match too
        assert torch.allclose(dev[k].cpu(), cpu[k], atol=1e-6), (k, (dev[k].cpu() - cpu[k]).abs().max())
    assert torch.equal(dev["label"].cpu(), cpu["label"])
    with pytest.raises(ValueError, match="degrade_on must be one of"):
        make_loader(faces, degrade_on="gpu", **common)


@pytest.mark.slow
def test_initial_trains_with_device_degradation_bf16_and_compile(smoke_cfg, tmp_path):
    """The GPU-ready step on the CPU: batches finished on the device, bf16 autocast, torch.compile (~30 s)."""
    from dsr.stage import run_initial

    cfg = with_artifacts(smoke_cfg("stage=initial", "trainer.degrade_on=device", "trainer.amp=bf16", "compile=true",
                                   "dsr.arch.16.num_blocks=1", "trainer.limit_train_batches=1"), tmp_path / "art")
    publish_edgeface(cfg, "edgeface_pretrained")
    metrics = run_initial(cfg, tmp_path / "run")
    assert np.isfinite(metrics["train/loss"]) and metrics["val/psnr"] > 10


def _preempted_rank1(rank, cfg, out_dir):
    import signal

    import dsr.losses
    from dsr.stage import run_initial

    real, calls = dsr.losses.DSRLoss.forward, {"n": 0}

    def signal_at_step_two(self, *a, **k):  # Slurm's SIGUSR2, seen by one task only
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 2 and rank == 1:
                os.kill(os.getpid(), signal.SIGUSR2)
        return real(self, *a, **k)

    dsr.losses.DSRLoss.forward = signal_at_step_two
    run_initial(cfg, out_dir)


@pytest.mark.slow
def test_a_signal_to_one_task_stops_every_task_at_the_same_step(smoke_cfg, tmp_path):
    from cycle.checkpoint import load_checkpoint

    cfg = _stage_cfg(smoke_cfg, tmp_path, epochs=2)
    with open_dict(cfg):
        cfg.trainer.ckpt_every = 0
    publish_edgeface(cfg, "edgeface_pretrained")
    with pytest.raises(Exception, match="exit"):  # both processes stop (SystemExit), none hangs
        _spawn(_preempted_rank1, 2, cfg, tmp_path / "run")
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 2  # saved by rank 0
    _run(1, cfg, tmp_path / "run")  # the requeued job resumes (here as one process)
    steps = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "lr" in r]
    assert steps == [1, 2, 3, 4]
