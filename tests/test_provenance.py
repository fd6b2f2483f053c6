"""Lineage and leak-proof evaluation: keyed artifacts, refused parents, identity overlap, stale 2nd cycles,
the automatic 2nd-cycle decision, and stages that give the same weights however they are reached."""
from __future__ import annotations

import json
import logging
import math
import os

import numpy as np
import pytest
import torch
from conftest import _SESSION_CACHE, compose_train
from omegaconf import open_dict
from PIL import Image
from test_eval_report import make_edgeface_payloads, publish

from cycle.artifacts import ArtifactStore, ProvenanceError
from cycle.checkpoint import load_checkpoint
from cycle.data import build_splits
from cycle.lineage import artifact_keys, data_fingerprint, forget, run_tag
from cycle.pipeline import _second_cycle_pays, evaluated_methods, run
from eval.report import EvaluationError, evaluate


def _faces(root, people=3, per=2, seed=0):
    rng = np.random.default_rng(seed)
    for p in range(people):
        (root / f"person{p}").mkdir(parents=True, exist_ok=True)
        for i in range(per):
            Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)).save(root / f"person{p}" / f"{i}.png")
    return root


def _cfg(tmp_path, *overrides):
    cfg = compose_train(["experiment=smoke", "device=cpu", *overrides], tmp_path)
    with open_dict(cfg):
        cfg.paths.cache_dir = str(_SESSION_CACHE)
    return cfg


# ---------------------------------------------------------------------------------------------- keys


def test_keys_follow_every_input_and_only_the_inputs(tmp_path):
    a, b = _faces(tmp_path / "A"), _faces(tmp_path / "B", seed=1)
    base = artifact_keys(_cfg(tmp_path, "data=folder", f"data.root={a}"))
    assert base == artifact_keys(_cfg(tmp_path, "data=folder", f"data.root={a}"))  # same command, same places
    other_root = artifact_keys(_cfg(tmp_path, "data=folder", f"data.root={b}"))
    assert all(base[n] != other_root[n] for n in base)  # data root A vs B never share an artifact

    # a rewritten file changes the fingerprint, the run directory tag and every key
    tag = run_tag(_cfg(tmp_path, "data=folder", f"data.root={a}"))
    img = a / "person0" / "0.png"
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))
    forget()  # a new process would walk the folder again
    changed = _cfg(tmp_path, "data=folder", f"data.root={a}")
    assert tag.startswith("data-") and run_tag(changed) != tag
    assert data_fingerprint(changed.data)["files"] == 6
    assert artifact_keys(changed)["dsr_initial"] != base["dsr_initial"]

    # a stage's own settings change its artifact and its descendants, never its ancestors
    k0 = artifact_keys(_cfg(tmp_path))
    k1 = artifact_keys(_cfg(tmp_path, "stages.cyclic.lr=1e-4"))
    assert k1["dsr_initial"] == k0["dsr_initial"] and k1["edgeface_ft"] == k0["edgeface_ft"]
    assert k1["dsr_cyclic"] != k0["dsr_cyclic"] and k1["edgeface_ft2"] != k0["edgeface_ft2"]
    for change in ("data.seed=3", "data.split.test=5", "degradation.down=bicubic", "seed=1", "res=24",
                   "stages.initial.loss.identity=0.3", "trainer.batch_size=4"):
        assert artifact_keys(_cfg(tmp_path, change))["dsr_initial"] != k0["dsr_initial"], change
    assert artifact_keys(_cfg(tmp_path, "trainer.progress=true", "cycle.eval=false")) == k0  # not what it trains


def test_official_weights_enter_by_content(tmp_path):
    w = tmp_path / "edgeface_xxs.pt"
    w.write_bytes(b"one")
    k1 = artifact_keys(_cfg(tmp_path, f"edgeface.weights={w}"))
    assert "edgeface_pretrained" not in k1
    w.write_bytes(b"two")  # same path, other content
    k2 = artifact_keys(_cfg(tmp_path, f"edgeface.weights={w}"))
    assert k1["dsr_initial"] != k2["dsr_initial"]
    assert run_tag(_cfg(tmp_path, f"edgeface.weights={w}")).startswith("weights-")


# ---------------------------------------------------------------------------------------------- parents


def test_manifest_records_lineage_and_a_tampered_parent_is_refused(tmp_path):
    cfg = _cfg(tmp_path)
    payloads = make_edgeface_payloads()
    publish(cfg, payloads, names=("edgeface_pretrained", "dsr_initial"))
    store = ArtifactStore.for_config(cfg)
    man = store.manifest("dsr_initial")
    assert man["key"] == store.key("dsr_initial") and store.path("dsr_initial").name.endswith(f"-{man['key']}.pt")
    assert len(man["sha256"]) == 64 and man["lineage"]["data"]["settings"]["name"] == "synthetic"
    assert store.verify("dsr_initial") == store.path("dsr_initial")

    with open(store.path("dsr_initial"), "ab") as f:  # content changed after publishing
        f.write(b"\0")
    with pytest.raises(ProvenanceError, match="content changed.*python train.py stage=initial res=16"):
        store.verify("dsr_initial")

    # a manifest recording other data (e.g. a file copied in by hand) is refused, naming the difference
    ef = store.path("edgeface_pretrained").with_suffix(".json")
    man = json.loads(ef.read_text())
    man["lineage"]["data"]["settings"]["seed"] = 99
    ef.write_text(json.dumps(man))
    with pytest.raises(ProvenanceError, match=r"other data \(settings.seed: 99 -> 0\)"):
        store.verify("edgeface_pretrained")


# ---------------------------------------------------------------------------------------------- evaluation


def _publish_with_identities(cfg, names=("edgeface_pretrained", "dsr_initial", "edgeface_ft", "dsr_cyclic")):
    publish(cfg, make_edgeface_payloads(), names=names)
    splits = build_splits(cfg.data, cfg.paths.cache_dir)
    store = ArtifactStore.for_config(cfg)
    for name in names:
        store.update_manifest(name, identities={s: list(splits[s].identities) for s in ("train", "val")})
    return splits


def test_overlapping_identities_are_refused_or_marked(tmp_path):
    cfg = _cfg(tmp_path)
    splits = _publish_with_identities(cfg)
    evaluate(cfg, tmp_path / "ok", ["16"])  # the held-out test identities: no overlap

    leaky = _cfg(tmp_path, "eval.split=val")  # model selection happened on these identities
    with pytest.raises(EvaluationError, match=r"overlap: 4 of the 4 evaluated identities") as e:
        evaluate(leaky, tmp_path / "leak", ["16"])
    assert splits["val"].identities[0] in str(e.value)

    with open_dict(leaky):
        leaky.eval.allow_overlap = True
    evaluate(leaky, tmp_path / "marked", ["16"])
    res = json.loads((tmp_path / "marked" / "results.json").read_text())
    assert res["16"]["cyclic"]["overlap_identities"] == 4 and res["16"]["hr"]["overlap_identities"] == 4
    assert "NOT a held-out result" in (tmp_path / "marked" / "report.md").read_text()


def test_official_weights_are_reported_as_unknown_training_set(tmp_path):
    w = tmp_path / "edgeface_xxs.pt"
    torch.save(make_edgeface_payloads()["pretrained"], w)
    cfg = _cfg(tmp_path, f"edgeface.weights={w}")
    evaluate(cfg, tmp_path / "ev", ["16"])
    report = (tmp_path / "ev" / "report.md").read_text()
    assert "official EdgeFace weights (training identities unknown)" in report and "not claimed" in report


def test_a_second_cycle_of_another_plan_is_never_scored(tmp_path):
    names = ("edgeface_pretrained", "dsr_initial", "edgeface_ft", "dsr_cyclic", "edgeface_ft2", "dsr_cyclic2")
    assert "cyclic2" not in evaluated_methods(set(names[:4])) and "cyclic2" in evaluated_methods(set(names))
    cfg = _cfg(tmp_path)
    publish(cfg, make_edgeface_payloads(), names=names)  # a cycles=2 run of this lineage left cyclic2 behind
    evaluate(cfg, tmp_path / "one", ["16"])  # cycle.cycles=1
    assert "cyclic2" not in json.loads((tmp_path / "one" / "results.json").read_text())["16"]
    with open_dict(cfg):
        cfg.cycle.cycles = 2
    evaluate(cfg, tmp_path / "two", ["16"])
    assert "cyclic2" in json.loads((tmp_path / "two" / "results.json").read_text())["16"]


def test_auto_second_cycle_compares_under_one_recogniser_and_says_when_it_cannot(tmp_path, caplog):
    cfg = _cfg(tmp_path, "cycle.cycles=auto")
    publish(cfg, make_edgeface_payloads(), names=("edgeface_pretrained", "dsr_initial", "edgeface_ft", "dsr_cyclic"))
    key = "val/tar@far=1e-2"
    # initial (pretrained EdgeFace) would look like a big gain; initial_ft vs cyclic (same EdgeFace) is not
    results = {"initial": {key: 0.10}, "edgeface_ft": {key: 0.50}, "cyclic": {key: 0.52}}
    assert _second_cycle_pays(cfg, results) is False
    decision = ArtifactStore.for_config(cfg).manifest("dsr_cyclic")["auto_second_cycle"]
    assert decision["initial_ft"] == 0.50 and decision["cyclic"] == 0.52 and decision["second_cycle"] is False
    assert math.isclose(decision["gain"], 0.04)
    results["cyclic"][key] = 0.70
    assert _second_cycle_pays(cfg, results) is True
    results["cyclic"][key] = float("nan")
    with caplog.at_level(logging.WARNING):
        assert _second_cycle_pays(cfg, results) is False
    assert "cannot decide" in caplog.text and "no 2nd cycle" in caplog.text


# ---------------------------------------------------------------------------------------------- reproducible


@pytest.mark.slow
def test_skipped_stages_give_the_same_weights_as_an_uninterrupted_cycle(tmp_path):
    ref = _cfg(tmp_path, "cycle.eval=false")
    with open_dict(ref):
        ref.paths.artifacts_dir = str(tmp_path / "ref_art")
    run(ref, tmp_path / "ref")

    cfg = _cfg(tmp_path, "cycle.eval=false", "cycle.skip=[edgeface_pretrain,initial]")
    with open_dict(cfg):
        cfg.paths.artifacts_dir = str(tmp_path / "art")
    store, ref_store = ArtifactStore.for_config(cfg), ArtifactStore.for_config(ref)
    for name in ("edgeface_pretrained", "dsr_initial"):  # the skipped stages' artifacts, from the reference
        store.dir.mkdir(parents=True, exist_ok=True)
        for suffix in (".pt", ".json"):
            store.path(name).with_suffix(suffix).write_bytes(ref_store.path(name).with_suffix(suffix).read_bytes())
    torch.rand(1000)  # whatever ran before in this process must not matter
    run(cfg, tmp_path / "run")
    for name in ("edgeface_ft", "dsr_cyclic"):
        a, b = load_checkpoint(ref_store.path(name)), load_checkpoint(store.path(name))
        sa = a.get("state_dict") or a["model"]
        sb = b.get("state_dict") or b["model"]
        assert all(torch.allclose(sa[k].float(), sb[k].float(), atol=1e-6) for k in sa), name


def test_checkpoints_of_another_lineage_in_the_same_run_directory_are_never_resumed(tmp_path, caplog):
    """The same command can name another lineage (a default changed in conf/): a finished stage's
    checkpoints in its run directory must then be set aside, not resumed and published under the new key."""
    from dsr.stage import run_initial
    from test_dsr_stage import publish_edgeface

    first = _cfg(tmp_path, "stage=initial")
    publish_edgeface(first, "edgeface_pretrained")
    run_initial(first, tmp_path / "initial")
    second = _cfg(tmp_path, "stage=initial", "stages.initial.loss.identity=0.2")  # same run directory
    with caplog.at_level(logging.WARNING):
        run_initial(second, tmp_path / "initial")
    assert "starting over" in caplog.text and list((tmp_path / "initial" / "history").iterdir())
    a = load_checkpoint(ArtifactStore.for_config(first).path("dsr_initial"))["model"]
    b = load_checkpoint(ArtifactStore.for_config(second).path("dsr_initial"))["model"]
    assert any(not torch.equal(a[k], b[k]) for k in a)  # trained anew, not the first lineage's weights
    stamp = json.loads((tmp_path / "initial" / "checkpoints" / "lineage.json").read_text())
    assert stamp["key"] == ArtifactStore.for_config(second).key("dsr_initial")
