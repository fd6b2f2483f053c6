"""Reliability: bad settings, divergence, full disks, concurrent runs, broken data and pairs files.

One test (or parametrised group) per row of the README's "Reliability" table.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict
from PIL import Image
from torch import nn

import cycle.checkpoint
import cycle.files
from cycle.artifacts import ArtifactStore
from cycle.checkpoint import load_checkpoint, nonfinite_entries, save_checkpoint
from cycle.data import DataError, FaceSet, build_splits, stage_loaders
from cycle.data.folder import _scan_folder
from cycle.data.splits import require_pairs
from cycle.errors import CheckpointError, ConfigError, Diverged, OutputError, RunLocked, UserError
from cycle.lock import LOCK_NAME, STALE_S, RunLock
from cycle.pipeline import run as run_cycle
from cycle.device import resolve_device
from cycle.training import EMA, NonFiniteLoss, Trainer
from eval.pairs_file import PairsFileError, read_lfw_pairs

ROOT = Path(__file__).resolve().parent.parent


class NullLogger:
    run_id = None

    def log(self, row, step):
        pass

    def warn(self, code, msg, step):
        pass


TCFG = {"grad_accum": 1, "grad_clip": 1.0, "amp": "off", "log_every": 1, "ckpt_every": 1, "progress": False}


def tiny_trainer(run_dir, *, epochs=2, lr=0.05, opt="adamw", grad_clip=1.0):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optim = (torch.optim.SGD(model.parameters(), lr=lr) if opt == "sgd"
             else torch.optim.AdamW(model.parameters(), lr=lr))
    tr = Trainer(tcfg={**TCFG, "grad_clip": grad_clip}, run_dir=run_dir, logger=NullLogger(),
                 device=torch.device("cpu"), modules={"model": model}, optimizer=optim, epochs=epochs,
                 steps_per_epoch=4, ema=EMA(model, 0.9), hint="Lower stages.test.lr.")
    return tr, model


def tiny_data(n=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return [{"x": x[i:i + 2], "y": x[i:i + 2].sum(1)} for i in range(0, n, 2)]


def mse(model):
    def step(batch):
        loss = (model(batch["x"]).squeeze(1) - batch["y"]).pow(2).mean()
        return loss, {"mse": loss.detach()}
    return step


class InfGrad(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss whose gradient overflows."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def assert_finite_file(path):
    assert nonfinite_entries(load_checkpoint(path)) == [], path


# ------------------------------------------------------------------ 1. settings checked before any work
@pytest.mark.parametrize("override, key", [
    ("stages.initial.epochs=-1", "stages.initial.epochs=-1"),
    ("stages.initial.lr=1e9", "stages.initial.lr="),
    ("stages.initial.lr=0", "stages.initial.lr=0"),
    ("stages.initial.loss.pixel=1e39", "stages.initial.loss.pixel="),
    ("stages.initial.loss.identity=-0.5", "stages.initial.loss.identity=-0.5"),
    ("trainer.batch_size=abc", "trainer.batch_size='abc'"),
    ("trainer.grad_accum=0", "trainer.grad_accum=0"),
])
def test_stage_refuses_out_of_range_settings_before_any_work(smoke_cfg, tmp_path, override, key):
    from dsr.stage import run_initial

    cfg = smoke_cfg("stage=initial", override)
    with pytest.raises(ConfigError, match=re.escape(key) + ".*must be"):
        run_initial(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists() and not Path(cfg.paths.artifacts_dir).exists()


def test_zero_epochs_never_publish_an_untrained_network(smoke_cfg, tmp_path):
    from edgeface.pretrain import run as pretrain

    cfg = smoke_cfg("stage=edgeface_pretrain", "stages.edgeface_pretrain.epochs=0")
    with pytest.raises(ConfigError, match=r"stages.edgeface_pretrain.epochs=0 is not allowed: it must be an integer"):
        pretrain(cfg, tmp_path / "run")
    assert not ArtifactStore(cfg.paths.artifacts_dir, 16).exists("edgeface_pretrained")


def test_cycle_checks_every_stage_before_the_first_runs(smoke_cfg, tmp_path):
    cfg = smoke_cfg("stages.cyclic.second_cycle.epochs=0", "cycle.cycles=2")
    with pytest.raises(ConfigError, match=r"stages.cyclic.second_cycle.epochs=0"):
        run_cycle(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists() and not Path(cfg.paths.artifacts_dir).exists()


def test_unknown_device_is_a_config_error():
    with pytest.raises(ConfigError, match=r"device='tpu' is not a device"):
        resolve_device("tpu")


@pytest.mark.slow
def test_train_py_prints_one_line_and_exits_1(tmp_path):
    p = subprocess.run([sys.executable, "train.py", "stage=edgeface_pretrain", "experiment=smoke", "device=cpu",
                        "stages.edgeface_pretrain.epochs=0", f"paths.output_dir={tmp_path / 'out'}",
                        f"paths.artifacts_dir={tmp_path / 'art'}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 1 and "Traceback" not in p.stderr + p.stdout
    assert lines == ["error: stages.edgeface_pretrain.epochs=0 is not allowed: it must be an integer >= 1"]
    assert not (tmp_path / "art").exists()


# ------------------------------------------------------------------ 2. divergence never reaches a checkpoint
def test_infinite_gradient_with_finite_loss_stops_before_the_update(tmp_path):
    tr, model = tiny_trainer(tmp_path)
    calls = {"n": 0}

    def step(batch):
        calls["n"] += 1
        if calls["n"] <= 3:
            return mse(model)(batch)
        loss = (InfGrad.apply(model(batch["x"])).squeeze(1) - batch["y"]).pow(2).mean()
        return loss, {"mse": loss.detach()}

    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteLoss) as err:
        tr.fit(tiny_data(), step, None)
    msg = str(err.value)
    assert "non-finite gradient norm" in msg and "at step 4" in msg
    assert f"{tmp_path / 'checkpoints' / 'last.pt'} (step 3)" in msg and "Lower stages.test.lr." in msg
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["step"] == 3 and nonfinite_entries(state) == []
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())  # the update was not applied
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # steps 1-3 were


def test_overflowing_update_is_not_applied_and_nothing_is_saved(tmp_path):
    tr, model = tiny_trainer(tmp_path, lr=1e38, opt="sgd", grad_clip=0)  # lr * grad overflows float32
    with pytest.raises(NonFiniteLoss, match=r"non-finite weights after the update.*No checkpoint was written"):
        tr.fit(tiny_data(), mse(model), None)
    assert not (tmp_path / "checkpoints" / "last.pt").exists()


def test_nonfinite_loss_at_the_first_step_names_no_missing_checkpoint(tmp_path):
    tr, model = tiny_trainer(tmp_path)

    def step(batch):
        loss = mse(model)(batch)[0] * float("inf")
        return loss, {"pixel": loss.detach()}

    with pytest.raises(NonFiniteLoss) as err:
        tr.fit(tiny_data(), step, None)
    assert "non-finite loss (terms: pixel)" in str(err.value) and "No checkpoint was written" in str(err.value)
    assert "last.pt" not in str(err.value)


def test_no_checkpoint_or_artifact_holds_a_nonfinite_tensor(tmp_path):
    path = save_checkpoint({"w": torch.ones(2)}, tmp_path / "last.pt")
    with pytest.raises(Diverged, match=r"non-finite values in modules.dsr.w; the previous file is kept"):
        save_checkpoint({"modules": {"dsr": {"w": torch.tensor([1.0, float("nan")])}}}, path)
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(2))
    store = ArtifactStore(tmp_path / "art", 16)
    with pytest.raises(Diverged):
        store.publish("dsr_initial", {"model": {"w": torch.tensor([float("inf")])}})
    assert not store.exists("dsr_initial")


# ------------------------------------------------------------------ 3. I/O errors
def _raise(code):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return fail


def test_disk_full_keeps_the_previous_checkpoint_and_says_what_to_do(tmp_path, monkeypatch):
    path = save_checkpoint({"step": 1, "w": torch.ones(3)}, tmp_path / "checkpoints" / "last.pt")
    monkeypatch.setattr(cycle.checkpoint.os, "fsync", _raise(errno.ENOSPC))
    with pytest.raises(OutputError) as err:
        save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    msg = str(err.value)
    assert "No space left on device" in msg and str(path) in msg and "previous last.pt is intact" in msg
    assert "free space" in msg and "paths.output_dir" in msg and "\n" not in msg
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp file left behind


def test_disk_full_during_training_stops_with_the_last_checkpoint_intact(tmp_path, monkeypatch):
    tr, model = tiny_trainer(tmp_path)
    real_fdopen, writes = os.fdopen, {"n": 0}

    class FullDisk:  # the file system accepts 3 checkpoints, then is full
        def __init__(self, f):
            self.f = f

        def write(self, data):
            writes["n"] += 1
            if writes["n"] > 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    monkeypatch.setattr(cycle.checkpoint.os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    with pytest.raises(OutputError, match=r"last.pt: No space left on device. The previous last.pt is intact"):
        tr.fit(tiny_data(), mse(model), None)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 3
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.pt"]


def test_read_only_and_impossible_output_paths_are_one_clear_error(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("in the way")
    with pytest.raises(OutputError, match=r"could not write the checkpoint .*afile/ckpt/last.pt.*in the way"):
        save_checkpoint({"a": 1}, tmp_path / "afile" / "ckpt" / "last.pt")
    monkeypatch.setattr(cycle.checkpoint.tempfile, "mkstemp", _raise(errno.EROFS))
    with pytest.raises(OutputError, match=r"Read-only file system.*make it writable, or write elsewhere"):
        save_checkpoint({"a": 1}, tmp_path / "ro" / "last.pt")
    with pytest.raises(OutputError, match=r"could not write the artifact .*dsr_initial.pt.*checkpoints are intact"):
        ArtifactStore(tmp_path / "art", 16).publish("dsr_initial", {"w": torch.ones(1)})


def test_an_unwritable_artifact_folder_is_refused_before_training(smoke_cfg, tmp_path, monkeypatch):
    from edgeface.pretrain import run as pretrain

    monkeypatch.setattr(cycle.files.tempfile, "TemporaryFile", _raise(errno.EROFS))
    cfg = smoke_cfg("stage=edgeface_pretrain")
    with pytest.raises(OutputError, match=r"could not write the artifact folder .*res16: Read-only file system"):
        pretrain(cfg, tmp_path / "run")
    assert list((tmp_path / "run").iterdir()) == []  # no checkpoint, no metrics: refused before any work


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_get_the_permissions_of_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        ckpt = save_checkpoint({"a": 1}, tmp_path / "last.pt")
        art = ArtifactStore(tmp_path / "art", 16).publish("dsr_initial", {"w": torch.ones(1)})
    finally:
        os.umask(old)
    assert ckpt.stat().st_mode & 0o777 == mode
    assert art.stat().st_mode & 0o777 == mode and art.with_suffix(".json").stat().st_mode & 0o777 == mode


@pytest.mark.slow
def test_a_stage_start_removes_orphaned_temp_files_and_releases_its_lock(smoke_cfg, tmp_path):
    from edgeface.pretrain import run as pretrain

    run_dir = tmp_path / "run"
    orphan = run_dir / "checkpoints" / ".last.pt.k3j2h1.tmp"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"half a checkpoint")
    art_path = ArtifactStore.for_config(smoke_cfg()).path("edgeface_pretrained")  # <name>-<lineage key>.pt
    art_dir = art_path.parent
    old, fresh = art_dir / f".{art_path.name}.a1b2c3.tmp", art_dir / f".{art_path.name}.d4e5f6.tmp"
    art_dir.mkdir(parents=True)
    for p in (old, fresh):
        p.write_bytes(b"half an artifact")
    os.utime(old, (time.time() - 7200,) * 2)  # an interrupted publish two hours ago; `fresh` may be live
    pretrain(smoke_cfg("stage=edgeface_pretrain"), run_dir)
    assert not orphan.exists() and (run_dir / "checkpoints" / "last.pt").is_file()
    assert not old.exists() and fresh.exists()
    assert not (run_dir / LOCK_NAME).exists()
    assert_finite_file(art_path)


# ------------------------------------------------------------------ 4. one writer per run directory
def _write_lock(run_dir: Path, **holder) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    path.write_text(json.dumps({"host": socket.gethostname(), "started": "earlier", "token": "theirs", **holder}))
    return path


def test_second_process_on_the_same_run_directory_refuses_naming_pid_and_host(tmp_path):
    code = ("import sys, time; from cycle.lock import RunLock\n"
            "with RunLock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run")], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked, match=rf"in use by PID {child.pid} on {re.escape(socket.gethostname())}"):
            with RunLock(tmp_path / "run"):
                pass
    finally:
        child.kill()
        child.wait()
    with RunLock(tmp_path / "run"):  # its holder was killed: the stale lock is taken over
        assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_a_locked_run_directory_refuses_a_stage_before_any_work(smoke_cfg, tmp_path):
    from edgeface.pretrain import run as pretrain

    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        _write_lock(tmp_path / "run", pid=sleeper.pid)
        with pytest.raises(RunLocked, match=rf"PID {sleeper.pid} on "):
            pretrain(smoke_cfg("stage=edgeface_pretrain"), tmp_path / "run")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_NAME]  # no metrics, no checkpoints


@pytest.mark.slow
def test_train_py_refuses_a_run_directory_in_use(tmp_path):
    run_dir = tmp_path / "out" / "smoke" / "res16" / "edgeface_pretrain"  # where this command's run goes
    sleeper = subprocess.Popen(["sleep", "120"])
    try:
        _write_lock(run_dir, pid=sleeper.pid)
        p = subprocess.run([sys.executable, "train.py", "stage=edgeface_pretrain", "experiment=smoke", "device=cpu",
                            f"paths.output_dir={tmp_path / 'out'}", f"paths.artifacts_dir={tmp_path / 'art'}"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        sleeper.kill()
        sleeper.wait()
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 1 and "Traceback" not in p.stderr and len(lines) == 1, p.stderr[-2000:]
    assert lines[0].startswith(f"error: {run_dir} is in use by PID {sleeper.pid} on {socket.gethostname()}")
    assert not (run_dir / "metrics.jsonl").exists() and not (tmp_path / "art").exists()


def test_stale_locks_are_taken_over(tmp_path, monkeypatch):
    dead = subprocess.Popen(["true"])
    dead.wait()
    _write_lock(tmp_path / "a", pid=dead.pid)  # same host, process gone
    with RunLock(tmp_path / "a"):
        pass
    lock = _write_lock(tmp_path / "b", host="node-elsewhere", pid=4242)  # other host, heartbeat too old
    os.utime(lock, (time.time() - STALE_S - 10,) * 2)
    with RunLock(tmp_path / "b"):
        pass
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / LOCK_NAME).write_text("")  # its writer died before writing it
    os.utime(tmp_path / "d" / LOCK_NAME, (time.time() - 60,) * 2)
    with RunLock(tmp_path / "d"):
        pass
    _write_lock(tmp_path / "c", host="node-elsewhere", pid=4242)  # other host, alive: refused
    with pytest.raises(RunLocked, match="PID 4242 on node-elsewhere"):
        with RunLock(tmp_path / "c"):
            pass


def test_slurm_requeue_of_the_same_job_resumes(tmp_path, monkeypatch):
    _write_lock(tmp_path / "run", host="node-7", pid=4242, slurm_job="991_2")  # fresh heartbeat, other node
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "991")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    with RunLock(tmp_path / "run"):
        with RunLock(tmp_path / "run"):  # re-entrant: train.py and the stage runner hold the same directory
            pass
        assert (tmp_path / "run" / LOCK_NAME).exists()
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")  # another task of the array is another job
    _write_lock(tmp_path / "run", host="node-7", pid=4242, slurm_job="991_2")
    with pytest.raises(RunLocked):
        with RunLock(tmp_path / "run"):
            pass
    monkeypatch.setenv("SLURM_PROCID", "1")  # rank 1 of a data-parallel job: rank 0 holds the lock
    with RunLock(tmp_path / "run"):
        pass
    assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["pid"] == 4242  # left to its holder


# ------------------------------------------------------------------ 5. data and evaluation inputs
def _face(path: Path, value: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 12, 3), value, np.uint8)).save(path)


def test_symlink_loops_and_dangling_links_are_skipped_with_a_warning(tmp_path, caplog):
    for i, name in enumerate(["ann", "bob", "cid"]):
        for j in range(2):
            _face(tmp_path / name / f"{j}.png", 40 * i + j)
    os.symlink("loop.png", tmp_path / "ann" / "loop.png")            # ELOOP
    os.symlink("/nonexistent/x.png", tmp_path / "bob" / "gone.png")   # dangling
    os.symlink("selfdir", tmp_path / "selfdir")                       # a looping identity folder
    with caplog.at_level(logging.WARNING):
        root, found = _scan_folder({"root": str(tmp_path)})
    assert found == {"ann": ["0.png", "1.png"], "bob": ["0.png", "1.png"], "cid": ["0.png", "1.png"]}
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "skipped 3 broken entries" in warning and "ann/loop.png" in warning and "dangling link" in warning


def _folder_cfg(smoke_cfg, root, *extra):
    cfg = smoke_cfg("data=folder", f"data.root={root}", "data.num_workers=0", *extra)
    with open_dict(cfg):
        cfg.data.split = {"val": 3, "test": 3}
    return cfg


def test_single_image_identities_are_refused_before_training_with_the_fix(smoke_cfg, tmp_path):
    for i in range(10):
        _face(tmp_path / "faces" / f"id{i:02d}" / "0.png", 20 * i)
    cfg = _folder_cfg(smoke_cfg, tmp_path / "faces")
    with pytest.raises(DataError, match=r"every identity of this data set has a single image.*validation"):
        stage_loaders(cfg, 16)
    # some identities with several images, but none drawn into val: the fix is data.min_images=2
    splits = {"train": FaceSet(np.zeros((3, 8, 8, 3), np.uint8), np.array([0, 0, 1]), ["a", "b"], []),
              "val": FaceSet(np.zeros((2, 8, 8, 3), np.uint8), np.array([0, 1]), ["c", "d"], [])}
    with pytest.raises(DataError, match=r"val split has a single image.*data.min_images=2"):
        require_pairs(splits, "val", "validation")


def test_all_corrupt_images_say_so_not_raise_the_split(smoke_cfg, tmp_path):
    for i in range(10):
        for j in range(2):
            p = tmp_path / "faces" / f"id{i:02d}" / f"{j}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"not a png at all")
    cfg = _folder_cfg(smoke_cfg, tmp_path / "faces")
    with pytest.raises(DataError) as err:
        build_splits(cfg.data, tmp_path / "cache")
    assert "could be decoded" in str(err.value) and "corrupt" in str(err.value)
    assert "data.split" not in str(err.value)


@pytest.mark.parametrize("content, where", [
    (b"10 1\nAnn 1 2\nAnn 1\n", r":3: expected 'name i j'"),
    (b"", r":1: no pairs"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", r":3: binary data"),
    (b"1\nAnn 1 2\nBob\xff 1 Cid 1\n", r":3: not UTF-8 text"),
    (None, r": pairs file not found"),
])
def test_every_pairs_file_problem_is_one_message_with_file_and_line(tmp_path, content, where):
    path = tmp_path / "pairs.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(PairsFileError, match=re.escape(str(path)) + where) as err:
        read_lfw_pairs(path)
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)


@pytest.mark.slow
def test_python_m_eval_turns_a_bad_pairs_file_into_one_line(tmp_path):
    for name in ("Ann", "Bob"):
        for i in (1, 2):
            _face(tmp_path / "lfw" / name / f"{name}_{i:04d}.png", 30 * i)
    (tmp_path / "pairs.txt").write_text("1 1\nAnn 1 2\nAnn 1 Bob\n")
    p = subprocess.run([sys.executable, "-m", "eval", "res=16", "data=folder", f"data.root={tmp_path / 'lfw'}",
                        f"eval.pairs_file={tmp_path / 'pairs.txt'}", f"paths.output_dir={tmp_path / 'out'}",
                        f"paths.artifacts_dir={tmp_path / 'art'}", "logger=none", "device=cpu"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert lines == [f"error: {tmp_path / 'pairs.txt'}:3: expected 'name i j' or 'name1 i name2 j', got 'Ann 1 Bob'"]


def test_truncated_last_pt_names_resume_false(tmp_path):
    tr, model = tiny_trainer(tmp_path, epochs=1)
    tr.fit(tiny_data(), mse(model), None)
    last = tmp_path / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:100])
    tiny_trainer(tmp_path, epochs=1)  # a finished phase restores from its done marker: not blocked
    (tmp_path / "checkpoints" / "main.done.pt").unlink()
    with pytest.raises(CheckpointError, match=r"could not load checkpoint .*last.pt \(truncated.*resume=false"):
        tiny_trainer(tmp_path, epochs=1)
