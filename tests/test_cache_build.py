"""The first-use cache build: chunked, resumable after `kill -9`, with progress and ETA."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT
from omegaconf import OmegaConf
from PIL import Image

from cycle.data import DataError, build_splits, chunked
from cycle.data.folder import FolderImages

N = 480

CHILD = """
import sys, time
from omegaconf import OmegaConf
from cycle.data import build_splits, chunked
from cycle.data.folder import FolderImages
chunked.CHUNK, chunked.SAVE_EVERY_S = 16, 0.0
load = FolderImages.load
FolderImages.load = lambda self, i: (time.sleep(0.01), load(self, i))[1]  # slow enough to be killed mid-build
build_splits(OmegaConf.create(eval(sys.argv[1])), sys.argv[2])
"""


def _tree(root):
    rng = np.random.default_rng(0)
    for i in range(N):
        d = root / f"id{i // 8:03d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(d / f"{i}.png")


def test_kill_9_during_the_build_resumes_where_it_stopped(tmp_path, monkeypatch, caplog):
    _tree(tmp_path / "r")
    cfg = {"name": "folder", "root": str(tmp_path / "r"), "split": {"val": 0, "test": 0}, "prepare_workers": 1,
           "image_size": 32}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, repr(cfg), str(tmp_path / "c")], cwd=ROOT, env=env)
    faces = tmp_path / "c" / "faces"
    done, deadline = 0, time.time() + 120
    while time.time() < deadline and done < 96:
        progress = list(faces.glob("*.progress.json")) if faces.exists() else []
        if progress:
            try:
                done = json.loads(progress[0].read_text())["done"]
            except (OSError, ValueError):
                pass
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert 96 <= done < N, "the child finished before it could be killed"
    partial = list(faces.glob("*.partial"))
    assert len(partial) == 1 and not list(faces.glob("*.npy"))
    recorded = json.loads(next(faces.glob("*.progress.json")).read_text())["done"]

    calls = []
    load = FolderImages.load
    monkeypatch.setattr(FolderImages, "load", lambda self, i: (calls.append(i), load(self, i))[1])
    monkeypatch.setattr(chunked, "LOG_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="cycle.data.chunked"):
        resumed = build_splits(OmegaConf.create(cfg), tmp_path / "c")["train"]
    assert len(calls) == N - recorded and min(calls) == recorded  # only the rest was decoded
    assert f"resuming an interrupted build at image {recorded} of {N}" in caplog.text
    assert "ETA" in caplog.text and "img/s" in caplog.text
    assert not list(faces.glob("*.partial")) and not list(faces.glob("*.progress.json"))

    monkeypatch.setattr(FolderImages, "load", load)
    fresh = build_splits(OmegaConf.create(cfg), tmp_path / "fresh")["train"]
    assert np.array_equal(np.asarray(resumed.images), np.asarray(fresh.images))
    assert resumed.files == fresh.files and resumed.labels.tolist() == fresh.labels.tolist()


def test_build_writes_in_chunks_without_a_whole_split_array(tmp_path, monkeypatch):
    _tree(tmp_path / "r")
    writes = []
    real = os.pwrite
    monkeypatch.setattr(chunked.os, "pwrite", lambda fd, data, off: (writes.append(len(data)), real(fd, data, off))[1])
    monkeypatch.setattr(chunked, "CHUNK", 64)
    cfg = {"name": "folder", "root": str(tmp_path / "r"), "split": {"val": 0, "test": 0}, "prepare_workers": 2,
           "image_size": 32}
    faces = build_splits(OmegaConf.create(cfg), tmp_path / "c")["train"]
    assert len(faces) == N and max(writes) == 64 * 32 * 32 * 3 and sum(writes) == N * 32 * 32 * 3


def test_streaming_reads_the_source_and_reports_unreadable_files(tmp_path, caplog):
    _tree(tmp_path / "r")
    (tmp_path / "r" / "id000" / "broken.jpg").write_bytes(b"not a jpeg")
    cfg = {"name": "folder", "root": str(tmp_path / "r"), "split": {"val": 0, "test": 0}, "image_size": 32,
           "cache": "none"}
    faces = build_splits(OmegaConf.create(cfg), tmp_path / "c")["train"]
    assert not (tmp_path / "c" / "faces").exists() or not list((tmp_path / "c" / "faces").iterdir())
    cached = build_splits(OmegaConf.create({**cfg, "cache": "disk"}), tmp_path / "c2")["train"]
    row = faces.files.index("id000/broken.jpg")
    assert len(faces) == N + 1 and len(cached) == N  # the cache build drops it; streaming finds it when drawn
    assert np.array_equal(faces.images[row + 1], cached.images[row])
    with caplog.at_level(logging.WARNING):
        assert not faces.images[row].any()
    assert "broken.jpg" in caplog.text and "black image" in caplog.text
    strict = build_splits(OmegaConf.create({**cfg, "strict": True}), tmp_path / "c")["train"]
    with pytest.raises(DataError, match=r"broken\.jpg.*data\.strict=true"):
        strict.images[row]
    with pytest.raises(DataError, match="data.cache='ram' must be disk"):
        build_splits(OmegaConf.create({**cfg, "cache": "ram"}), tmp_path / "c")
