"""Procedural identities: determinism, rendering quality and speed, shared looks, the VLR gap, caching."""
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cycle.data import build_splits, render
from cycle.data.render import identity_params, render_face, render_many
from cycle.degrade import degrade, upsample


def test_render_is_deterministic_and_varies():
    a = render_face(0, 3, 1)
    assert a.shape == (112, 112, 3) and a.dtype == np.uint8
    assert np.array_equal(a, render_face(0, 3, 1))
    assert np.abs(a.astype(int) - render_face(0, 3, 2)).mean() > 5  # another photo of the same identity
    assert np.abs(a.astype(int) - render_face(1, 3, 1)).mean() > 5  # another seed
    assert render_face(0, 3, 1, size=64).shape == (64, 64, 3)
    assert 0 < a.min() < 60 and 200 < a.max()  # uses the range, no flat image


def test_parallel_render_equals_serial():
    jobs = [(i, j) for i in range(100) for j in range(4)]  # 400 jobs: render_many uses 2 processes
    serial = render_many(jobs, seed=2, num_looks=4, size=40, workers=1)
    parallel = render_many(jobs, seed=2, num_looks=4, size=40, workers=2)
    assert np.array_equal(serial, parallel)
    assert np.array_equal(serial[4 * 7 + 2], render_face(2, 7, 2, num_looks=4, size=40))


def test_shapes_are_anti_aliased():
    cv = render._Canvas(112, (0.3, 1.0, 0.0, 0.0))
    cov, box = cv.ellipse(3.0, -2.0, 20.0, 11.0, tilt=0.4)
    assert abs(cov.sum() - np.pi * 20 * 11) / (np.pi * 20 * 11) < 0.01  # coverage integrates to the area
    edge = (cov > 0) & (cov < 1)
    assert 0.3 < edge.sum() / (2 * np.pi * 16) < 2.0  # about one partial pixel per unit of perimeter
    full = cv.ellipse(0.0, 0.0, 200.0, 200.0)[0]
    assert full.min() == 1.0  # interior fully covered


def test_render_speed_per_core():
    render_face(0, 0, 0)
    t0 = time.process_time()  # CPU time: the figure is per core, whatever else the machine runs
    for i in range(150):
        render_face(0, i % 30, i)
    rate = 150 / (time.process_time() - t0)
    assert rate >= 150, f"{rate:.0f} images/s per core"


def test_coarse_looks_are_shared():
    ids = [identity_params(0, i, num_looks=16) for i in range(300)]
    looks = {(tuple(p["skin"]), tuple(p["hair"]), p["style"], p["face_a"], p["face_b"]) for p in ids}
    assert 10 <= len(looks) <= 16  # ~19 identities per look
    same = [p for p in ids if (tuple(p["skin"]), p["face_a"]) == (tuple(ids[0]["skin"]), ids[0]["face_a"])]
    assert len(same) >= 5
    assert len({(p["eye_dx"], p["nose_len"], p["mouth_w"]) for p in same}) == len(same)  # fine detail differs
    own = {tuple(identity_params(0, i, num_looks=10**6)["skin"]) for i in range(300)}
    assert len(own) > 280


def _nn_identification(x: torch.Tensor, labels: np.ndarray) -> float:
    """Leave-one-out nearest neighbour on per-image standardised pixels of the central face crop."""
    g = x[:, :, 24:88, 24:88].double()
    g = (g - g.mean((2, 3), keepdim=True)) / g.std((2, 3), keepdim=True)
    g = g.reshape(len(g), -1)
    g = g - g.mean(0)
    g = g / g.norm(dim=1, keepdim=True)
    sim = g @ g.T
    sim.fill_diagonal_(-2)
    return float((labels[sim.argmax(1).numpy()] == labels).mean())


def test_identity_is_in_fine_detail():
    """40 identities x 6 aligned photos (pose held fixed, expression/light/background/noise vary):
    identification works on 112x112 and drops clearly with the resolution."""
    x = render_many([(i, j) for i in range(40) for j in range(6)], seed=0, num_looks=16, pose_jitter=0.0,
                    workers=1)
    labels = np.repeat(np.arange(40), 6)
    hr = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    acc = {"hr": _nn_identification(hr, labels)}
    for r in (32, 16):
        acc[r] = _nn_identification(upsample(degrade(hr, r)), labels)
    assert acc["hr"] >= 0.9, acc
    assert acc[32] <= acc["hr"] - 0.05 and acc[16] <= acc[32] - 0.05, acc
    assert acc[16] <= acc["hr"] - 0.15, acc


def _cfg(**kw):
    cfg = {"name": "synthetic", "seed": 0, "num_identities": 6, "images_per_identity": 2, "num_looks": 3,
           "split": {"val": 1, "test": 1}}
    cfg.update(kw)
    return cfg


def test_cache_keyed_by_generator_params(tmp_path, monkeypatch):
    first = build_splits(_cfg(), tmp_path)
    files = sorted(p.name for p in (tmp_path / "faces").glob("*.npy"))
    assert len(files) == 3 and all(p.startswith("synthetic-") for p in files)
    assert np.array_equal(first["test"].images[1], render_face(0, int(first["test"].identities[0][2:]), 1, 3))

    monkeypatch.setattr(render, "render_many", lambda *a, **k: pytest.fail("cache not reused"))
    again = build_splits(_cfg(), tmp_path)
    assert all(np.array_equal(again[s].images, first[s].images) for s in first)
    monkeypatch.undo()

    changed = build_splits(_cfg(num_looks=2), tmp_path)  # a generator parameter changed: regenerated
    assert len(list((tmp_path / "faces").glob("*.npy"))) == 6
    assert changed["train"].identities == first["train"].identities
    assert not np.array_equal(changed["train"].images, first["train"].images)
    assert not list(Path(tmp_path / "faces").glob("*.tmp*"))  # no temporary files left


@pytest.mark.parametrize("key, value, match", [
    ("num_identities", 2, "num_identities must be an integer >= 3"),
    ("images_per_identity", 0, "images_per_identity"),
    ("num_looks", "many", "num_looks"),
])
def test_bad_synthetic_config(tmp_path, key, value, match):
    with pytest.raises(ValueError, match=match):
        build_splits(_cfg(**{key: value}), tmp_path)
