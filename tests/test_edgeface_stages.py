"""Stages `edgeface_pretrain` and `edgeface_ft` on the smoke config: what trains when, resume, artifacts."""
import copy
import hashlib
import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict

import edgeface
from cycle.artifacts import ArtifactStore, MissingArtifact
from cycle.checkpoint import load_checkpoint
from cycle.config import to_plain
from cycle.data import build_splits, make_loader
from cycle.logger import read_metrics
from edgeface import finetune, pretrain


def store_of(cfg):
    return ArtifactStore.for_config(cfg)


def publish_edgeface(cfg, name, seed=0):
    """A random-init stand-in for a published EdgeFace, in the format the stages write."""
    torch.manual_seed(seed)
    m = edgeface.build(cfg.edgeface.variant, quantized=False)
    head = edgeface.build_head("arcface", 512, 4)
    store_of(cfg).publish(name, pretrain.edgeface_payload(m, head, 4))
    return m.state_dict()


def publish_dsr(cfg, name, seed=0):
    torch.manual_seed(seed)
    model = instantiate(cfg.dsr)
    store_of(cfg).publish(name, {"format": "dsr", "res": int(cfg.res), "model": model.state_dict(),
                                 "arch": to_plain(cfg.dsr)})


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def spy_heads(monkeypatch):
    """Record every margin head edgeface_ft builds, with its initial weights."""
    made = []
    real = finetune.build_head

    def spy(*a, **k):
        head = real(*a, **k)
        made.append(copy.deepcopy(head.state_dict()))
        return head

    monkeypatch.setattr(finetune, "build_head", spy)
    return made


def count_ft_steps(monkeypatch, crash_after=None):
    """Count edgeface_ft training steps per phase ({False: phase 1, True: phase 2}); optionally crash
    at phase-2 step `crash_after` + 1 as a killed job would."""
    real = finetune.ft_loss
    calls = {False: 0, True: 0}

    def counted(*a, train_backbone, **k):
        calls[train_backbone] += 1
        if train_backbone and crash_after is not None and calls[True] > crash_after:
            raise KeyboardInterrupt("simulated crash")
        return real(*a, train_backbone=train_backbone, **k)

    monkeypatch.setattr(finetune, "ft_loss", counted)
    return calls


# ---------------------------------------------------------------- edgeface_ft

def test_ft_phase1_freezes_backbone_phase2_trains_it(smoke_cfg, tmp_path, monkeypatch):
    cfg = smoke_cfg("stage=edgeface_ft")
    publish_dsr(cfg, "dsr_initial")
    start = publish_edgeface(cfg, "edgeface_pretrained")
    heads = spy_heads(monkeypatch)
    metrics = finetune.run(cfg, tmp_path / "ft")

    ckpt = tmp_path / "ft" / "checkpoints"
    p1 = load_checkpoint(ckpt / "phase1.done.pt")["modules"]
    p2 = load_checkpoint(ckpt / "phase2.done.pt")["modules"]
    assert same(p1["backbone"], start)  # phase 1: bit-identical backbone ...
    (head0,) = heads
    assert not torch.equal(p1["head"]["weight"], head0["weight"])  # ... while the head trained
    floats = [k for k, v in start.items() if v.dtype.is_floating_point]
    changed = [k for k in floats if not torch.equal(p2["backbone"][k], start[k])]
    assert len(changed) > 0.9 * len(floats)  # phase 2 trains the backbone
    # phase 2: two param groups, backbone at lr * backbone_lr_mult (LambdaLR keeps the base lr as initial_lr)
    groups = load_checkpoint(ckpt / "last.pt")["optimizer"]["param_groups"]
    lr, mult = cfg.stages.edgeface_ft.lr, cfg.stages.edgeface_ft.backbone_lr_mult
    assert [g["initial_lr"] for g in groups] == pytest.approx([lr * mult, lr])

    # what was published is the selected phase's best network, loadable without arguments
    store = store_of(cfg)
    path = store.path("edgeface_ft")
    model = edgeface.load(path)
    assert model.variant == cfg.edgeface.variant and not model.quantized
    chosen = "phase1" if metrics["selected_phase"] == 1 else "phase2"
    assert same(model.state_dict(), load_checkpoint(ckpt / f"{chosen}.best.pt")["modules"]["backbone"])
    assert set(store.manifest("edgeface_ft")["parents"]) == {"dsr_initial", "edgeface_pretrained"}
    # smoke validation has < 100 impostor pairs: TAR@FAR=1e-2 is NaN and selection fell back to AUC
    assert math.isnan(metrics["val/tar@far=1e-2"]) and metrics["val/selection"] == metrics["val/auc"]
    assert {"val/sr_hr_cos", "val/genuine_mean", "val/impostor_mean", "val/hr_auc"} <= set(metrics)
    rows = read_metrics(tmp_path / "ft" / "metrics.jsonl")
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert steps == sorted(steps) and steps[-1] == 4  # phase 2 logs after phase 1 on one step axis
    assert all("train/align" in r for r in rows if "train/loss" in r)


def test_ft_missing_inputs_name_the_stage(smoke_cfg, tmp_path):
    cfg = smoke_cfg("stage=edgeface_ft")
    with pytest.raises(MissingArtifact, match="python train.py stage=initial res=16"):
        finetune.run(cfg, tmp_path / "ft")
    publish_dsr(cfg, "dsr_initial")
    with pytest.raises(MissingArtifact, match="python train.py stage=edgeface_pretrain res=16"):
        finetune.run(cfg, tmp_path / "ft")


def test_ft_second_cycle_reads_cyclic_and_ft_writes_ft2(smoke_cfg, tmp_path, monkeypatch):
    second = "stages.edgeface_ft.second_cycle"
    cfg = smoke_cfg("stage=edgeface_ft", "cycle.index=2", f"{second}.phase1_epochs=2",
                    f"{second}.phase2_epochs=0")
    publish_dsr(cfg, "dsr_cyclic")  # no dsr_initial / edgeface_pretrained: cycle 2 must not read them
    start = publish_edgeface(cfg, "edgeface_ft", seed=1)
    store = store_of(cfg)
    before = sha(store.path("edgeface_ft"))
    finetune.run(cfg, tmp_path / "ft2")

    done = load_checkpoint(tmp_path / "ft2" / "checkpoints" / "phase1.done.pt")
    assert len(done["history"]) == 2  # second_cycle epochs, not the cycle-1 ones
    assert same(done["modules"]["backbone"], start)  # started from edgeface_ft
    assert not (tmp_path / "ft2" / "checkpoints" / "phase2.done.pt").exists()
    assert set(store.manifest("edgeface_ft2")["parents"]) == {"dsr_cyclic", "edgeface_ft"}
    assert sha(store.path("edgeface_ft")) == before  # the input is never touched
    assert same(edgeface.load(store.path("edgeface_ft2")).state_dict(), start)  # phase 1 only: same backbone


def test_ft_resume_inside_phase2_matches_uninterrupted(smoke_cfg, tmp_path, monkeypatch):
    overrides = ("stage=edgeface_ft", "stages.edgeface_ft.phase2_epochs=2", "trainer.limit_val_batches=1")

    def setup(name):
        cfg = smoke_cfg(*overrides)
        with open_dict(cfg):
            cfg.paths.artifacts_dir = str(tmp_path / name)
        publish_dsr(cfg, "dsr_initial")
        publish_edgeface(cfg, "edgeface_pretrained")
        return cfg

    ref_cfg = setup("ref_art")
    ref = finetune.run(ref_cfg, tmp_path / "ref")

    cfg = setup("art")
    calls = count_ft_steps(monkeypatch, crash_after=3)  # mid-way through phase 2's second epoch
    with pytest.raises(KeyboardInterrupt):
        finetune.run(cfg, tmp_path / "run")
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert (last["tag"], last["step"]) == ("phase2", 3)

    monkeypatch.undo()
    calls = count_ft_steps(monkeypatch)
    again = finetune.run(cfg, tmp_path / "run")
    assert calls == {False: 0, True: 1}  # phase 1 skipped by its done marker; phase 2 ran its last step only
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "phase2.done.pt")["step"] == 4
    steps = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]
    assert steps == sorted(steps) and steps[-1] == 2 + 4  # phase-1 steps, then phase 2 continued its count
    assert again["val/auc"] == pytest.approx(ref["val/auc"], abs=1e-6)
    w_ref = edgeface.load(ArtifactStore.for_config(ref_cfg).path("edgeface_ft")).state_dict()
    w = edgeface.load(ArtifactStore.for_config(cfg).path("edgeface_ft")).state_dict()
    assert all(torch.allclose(w[k], w_ref[k], atol=1e-5) for k in w)


def test_ft_loss_stops_gradient_at_hr_and_freezes_in_phase1():
    torch.manual_seed(0)
    net = edgeface.build("edgeface_xxs").train()
    head = edgeface.build_head("arcface", 512, 3)
    sr, hr = torch.rand(3, 3, 112, 112, requires_grad=True), torch.rand(3, 3, 112, 112, requires_grad=True)
    labels = torch.tensor([0, 1, 2])

    net.requires_grad_(False)
    loss, terms = finetune.ft_loss(net, head, sr, hr, labels, lambda_align=1.0, train_backbone=False)
    loss.backward()
    assert not net.training  # frozen backbone runs in eval mode
    assert head.weight.grad is not None and sr.grad is None and hr.grad is None
    assert loss.item() == pytest.approx(terms["margin"].item() + terms["align"].item(), rel=1e-5)

    net.requires_grad_(True)
    head.zero_grad()
    loss, _ = finetune.ft_loss(net, head, sr, hr, labels, lambda_align=1.0, train_backbone=True)
    loss.backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    assert sr.grad is not None and hr.grad is None  # E(HR) is a stop-gradient target


def test_ft_selection_metric_and_nan_fallback():
    assert finetune.selection_mode("val/tar@far=1e-2") == "max"
    assert finetune.selection_mode("val/eer") == "min"
    with pytest.raises(ValueError, match="collapse"):
        finetune.selection_mode("val/sr_hr_cos")
    with pytest.raises(ValueError, match="val/auc"):
        finetune.selection_mode("val/psnr")
    m = {"val/tar@far=1e-2": float("nan"), "val/auc": 0.8, "val/eer": 0.3}
    assert finetune.selection_value(m, "val/tar@far=1e-2", "max") == (0.8, "val/auc")
    assert finetune.selection_value({**m, "val/tar@far=1e-2": 0.4}, "val/tar@far=1e-2", "max") == (
        0.4, "val/tar@far=1e-2")


# ---------------------------------------------------------------- edgeface_pretrain

def test_pretrain_refuses_when_official_weights_are_given(smoke_cfg, tmp_path):
    cfg = smoke_cfg("stage=edgeface_pretrain", f"edgeface.weights={tmp_path / 'edgeface_xxs.pt'}")
    with pytest.raises(ValueError, match="official weights"):
        pretrain.run(cfg, tmp_path / "pre")


def test_pretrain_q_variant_publishes_loadable_float_network(smoke_cfg, tmp_path):
    cfg = smoke_cfg("stage=edgeface_pretrain", "edgeface=xxs_q", "trainer.limit_train_batches=1")
    metrics = pretrain.run(cfg, tmp_path / "pre")
    store = store_of(cfg)
    model = edgeface.load(store.path("edgeface_pretrained"))  # no arguments
    assert (model.variant, model.quantized) == ("edgeface_xxs_q", False)
    best = load_checkpoint(tmp_path / "pre" / "checkpoints" / "edgeface_pretrain.best.pt")["modules"]
    assert same(model.state_dict(), best["backbone"])
    payload = load_checkpoint(store.path("edgeface_pretrained"))
    assert payload["num_classes"] == payload["head"]["weight"].shape[0] == 8  # 16 - 4 val - 4 test identities
    assert store.manifest("edgeface_pretrained")["metrics"]["val/auc"] == pytest.approx(metrics["val/auc"])
    assert edgeface.quantize(model)(torch.rand(1, 3, 112, 112)).shape == (1, 512)  # the `_q` deployment form


@pytest.mark.slow
def test_two_epoch_pretrain_beats_random_init_on_heldout_identities(smoke_cfg, tmp_path):
    # 28 training identities x 32 images, batch 16: 56 steps per epoch. CosFace s=16 m=0.1 because a
    # 2-epoch run from scratch needs the fast-converging loss: the default ArcFace s=32 m=0.4 took about
    # 3x the steps to lift AUC this much (measured). Aligned faces without augmentation, for the same reason.
    cfg = smoke_cfg("stage=edgeface_pretrain", "data.num_identities=40", "data.images_per_identity=32",
                    "data.split={val:10,test:2}", "data.pose_jitter=0",
                    "data.augment={flip:false,rotate_deg:0,color_jitter:0}", "trainer.batch_size=16",
                    "trainer.limit_train_batches=null", "trainer.limit_val_batches=null",
                    "trainer.val_pairs=400", "trainer.val_every=2", "stages.edgeface_pretrain.epochs=2",
                    "stages.edgeface_pretrain.head=cosface", "stages.edgeface_pretrain.scale=16",
                    "stages.edgeface_pretrain.margin=0.1")
    val = build_splits(cfg.data, cfg.paths.cache_dir)["val"]
    loader = make_loader(val, batch_size=64, res=None, degradation=None, train=False)

    def auc(model):  # HR vs HR on the 10 held-out identities, pairs independent of the stage's own
        return pretrain.evaluate_hr(model, loader, torch.device("cpu"), num_pairs=400, seed=1)["val/auc"]

    torch.manual_seed(int(cfg.seed))
    random_init = auc(edgeface.build(cfg.edgeface.variant))
    metrics = pretrain.run(cfg, tmp_path / "pre")
    assert metrics["epoch"] == 2
    trained = auc(edgeface.load(store_of(cfg).path("edgeface_pretrained")))
    assert trained >= random_init + 0.1, (random_init, trained)  # measured: 0.64 -> 0.95
