"""Stages `initial` and `cyclic` on the smoke config: publish, resume, never overwrite."""
import hashlib

import pytest
import torch
from omegaconf import open_dict

import edgeface
from cycle.artifacts import ArtifactStore, MissingArtifact
from cycle.checkpoint import load_checkpoint
from cycle.logger import read_metrics
from cycle.models import load_dsr
from dsr.stage import run_cyclic, run_initial


def publish_edgeface(cfg, name, seed=0):
    torch.manual_seed(seed)
    m = edgeface.build(cfg.edgeface.variant)
    store = ArtifactStore.for_config(cfg)
    store.publish(name, {"format": "edgeface", "variant": m.variant, "quantized": False, "state_dict": m.state_dict()})
    return store


def with_artifacts(cfg, path):
    with open_dict(cfg):
        cfg.paths.artifacts_dir = str(path)
    return cfg


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cyclic_without_initial_names_the_command(smoke_cfg, tmp_path):
    cfg = smoke_cfg("stage=cyclic")
    with pytest.raises(MissingArtifact, match="python train.py stage=initial res=16"):
        run_cyclic(cfg, tmp_path / "cyclic")


def test_initial_then_cyclic_loads_exactly_and_keeps_initial(smoke_cfg, tmp_path, monkeypatch):
    cfg = smoke_cfg("stage=initial")
    store = publish_edgeface(cfg, "edgeface_pretrained")
    m = run_initial(cfg, tmp_path / "initial")
    assert {"val/psnr", "val/ssim", "val/auc", "val/identity_cos"} <= set(m)
    init_path = store.path("dsr_initial")
    manifest = store.manifest("dsr_initial")
    parent = store.path("edgeface_pretrained")
    assert manifest["parents"] == {"edgeface_pretrained": {"path": str(parent), "key": store.key("edgeface_pretrained"),
                                                           "sha256": sha(parent)}}
    assert (tmp_path / "initial" / "metrics.jsonl").is_file() and (tmp_path / "initial" / "curves.png").is_file()
    before = sha(init_path)

    publish_edgeface(cfg, "edgeface_ft", seed=1)
    cyc = smoke_cfg("stage=cyclic")
    # no update (lr=0 is refused as a setting): the published DSR must equal initial
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, closure=None: None)
    run_cyclic(cyc, tmp_path / "cyclic")
    monkeypatch.undo()
    assert sha(init_path) == before  # the initial artifact is never touched
    a = load_checkpoint(init_path)["model"]
    b = load_checkpoint(ArtifactStore.for_config(cyc).path("dsr_cyclic"))["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(load_dsr(cyc, init_path).state_dict()[next(iter(a))], a[next(iter(a))])
    assert set(ArtifactStore.for_config(cyc).manifest("dsr_cyclic")["parents"]) == {"dsr_initial", "edgeface_ft"}


def test_cyclic_uses_per_resolution_and_second_cycle_values(smoke_cfg):
    from cycle.stages import stage_settings
    cfg = smoke_cfg("res=24", "edgeface.weights=/w/edgeface_xxs.pt")  # the guide's values: official weights
    with open_dict(cfg):
        cfg.stages.cyclic.epochs = 50
    hp1 = stage_settings(cfg, "cyclic", 1)
    hp2 = stage_settings(cfg, "cyclic", 2)
    assert (hp1.lr, hp1.loss.identity, hp1.loss.feature_match) == (8.5e-5, 0.65, 0.20)
    assert (hp2.epochs, hp2.lr, hp2.loss.identity, hp2.loss.feature_match) == (1, 5e-5, 0.70, 0.20)


def test_initial_resume_after_interruption_matches_uninterrupted(smoke_cfg, tmp_path, monkeypatch):
    overrides = ("stage=initial", "stages.initial.epochs=2", "trainer.limit_train_batches=3", "trainer.ckpt_every=1")
    ref_cfg = with_artifacts(smoke_cfg(*overrides), tmp_path / "ref_art")
    publish_edgeface(ref_cfg, "edgeface_pretrained")
    ref = run_initial(ref_cfg, tmp_path / "ref")

    cfg = with_artifacts(smoke_cfg(*overrides), tmp_path / "art")
    publish_edgeface(cfg, "edgeface_pretrained")
    import dsr.losses
    real = dsr.losses.DSRLoss.forward
    calls = {"n": 0}

    def crash_after_four(self, *a, **k):
        if torch.is_grad_enabled():  # training steps only, not validation
            calls["n"] += 1
            if calls["n"] > 4:
                raise KeyboardInterrupt("simulated crash")
        return real(self, *a, **k)

    monkeypatch.setattr(dsr.losses.DSRLoss, "forward", crash_after_four)
    with pytest.raises(KeyboardInterrupt):
        run_initial(cfg, tmp_path / "run")
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 4
    monkeypatch.setattr(dsr.losses.DSRLoss, "forward", real)
    again = run_initial(cfg, tmp_path / "run")
    steps = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]
    assert steps == sorted(steps) and steps[-1] == 6  # the counter continued, not restarted
    assert again["val/psnr"] == pytest.approx(ref["val/psnr"], abs=1e-3)
    w_ref = load_checkpoint(ArtifactStore.for_config(ref_cfg).path("dsr_initial"))["model"]
    w = load_checkpoint(ArtifactStore.for_config(cfg).path("dsr_initial"))["model"]
    assert all(torch.allclose(w[k].float(), w_ref[k].float(), atol=1e-5) for k in w)


@pytest.mark.slow
def test_short_initial_run_beats_bicubic(smoke_cfg, tmp_path):
    cfg = smoke_cfg("stage=initial", "data.num_identities=60", "data.images_per_identity=10",
                    "data.split={val:6,test:4}", "trainer.batch_size=16", "trainer.limit_train_batches=null",
                    "trainer.limit_val_batches=null", "stages.initial.epochs=6", "stages.initial.lr=2e-3",
                    "stages.initial.loss.identity=0.05", "stages.initial.loss.feature_match=0.0")
    publish_edgeface(cfg, "edgeface_pretrained")
    m = run_initial(cfg, tmp_path / "initial")
    assert m["val/psnr"] > m["val/psnr_bicubic"] + 0.5, m
