import json

import pytest
import torch

from cycle.artifacts import ArtifactStore, MissingArtifact
from cycle.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state


def test_round_trip_is_weights_only(tmp_path):
    m = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(torch.randn(2, 4)).sum().backward()
    opt.step()
    state = {"model": m.state_dict(), "optimizer": opt.state_dict(), "step": 7, "rng": rng_state(),
             "history": [{"val/psnr": 20.5}], "name": "x"}
    p = save_checkpoint(state, tmp_path / "ck" / "last.pt")
    loaded = torch.load(p, weights_only=True)  # the contract: no pickled classes
    assert loaded["step"] == 7 and loaded["history"][0]["val/psnr"] == 20.5
    for k, v in m.state_dict().items():
        assert torch.equal(loaded["model"][k], v)
    m2 = torch.nn.Linear(4, 3)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-3)
    opt2.load_state_dict(load_checkpoint(p)["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_crash_mid_write_keeps_previous_file(tmp_path, monkeypatch):
    p = tmp_path / "last.pt"
    save_checkpoint({"step": 1}, p)

    def broken_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"step": 2}, p)
    monkeypatch.undo()
    assert load_checkpoint(p)["step"] == 1
    assert [x.name for x in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_rng_state_restores_all_generators(tmp_path):
    import random

    import numpy as np
    save_checkpoint({"rng": rng_state()}, tmp_path / "r.pt")
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    p = tmp_path / "bad.pt"
    p.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="could not load checkpoint"):
        load_checkpoint(p)


def test_artifacts_manifest_and_never_overwrite(tmp_path):
    store = ArtifactStore(tmp_path, "16")
    with pytest.raises(MissingArtifact, match="stage=initial res=16"):
        store.require("dsr_initial")
    store.publish("dsr_initial", {"w": torch.ones(2)}, cfg={"a": 1}, metrics={"val/psnr": 25.0})
    man = json.loads((tmp_path / "res16" / "dsr_initial.json").read_text())
    assert man["metrics"]["val/psnr"] == 25.0 and man["config"] == {"a": 1} and man["res"] == 16
    assert {"created", "code_version", "parents"} <= set(man)
    store.publish("dsr_initial", {"w": torch.zeros(2)}, parents=["edgeface_pretrained"])
    assert torch.equal(store.load("dsr_initial")["w"], torch.zeros(2))
    old = sorted((tmp_path / "res16" / "history").glob("dsr_initial.*.pt"))
    assert len(old) == 1 and torch.equal(torch.load(old[0], weights_only=True)["w"], torch.ones(2))
