"""Does identity supervision help? The pixel-only ablation (`cycle.ablations=[pixel]`), the supervisor check
before a DSR stage trains, and the identity warm-up."""
from __future__ import annotations

import json
import math

import pytest
import torch
from test_dsr_stage import publish_edgeface

from cycle.artifacts import ArtifactStore
from cycle.errors import ConfigError
from cycle.lineage import artifact_keys
from cycle.logger import read_metrics
from cycle.pipeline import plan, run
from cycle.settings import check_stage
from cycle.stages import stage_settings
from dsr.losses import DSRLoss
from dsr.stage import run_initial, run_pixel
from eval.methods import default_methods
from eval.render import identity_supervision
from eval.supervision import judge_supervisor

# ---------------------------------------------------------------------------------------------- the ablation


def test_pixel_runs_only_when_asked_and_unknown_ablations_are_refused(smoke_cfg):
    assert "pixel" not in [s.stage for s in plan(smoke_cfg())]
    steps = plan(smoke_cfg("cycle.ablations=[pixel]"))
    names = [s.dirname for s in steps]
    assert names == ["edgeface_pretrain", "pixel", "initial", "edgeface_ft", "cyclic", "eval"]
    pixel = steps[1]
    assert pixel.inputs == [] and pixel.output == "dsr_pixel"  # no EdgeFace takes part
    with pytest.raises(ConfigError, match="choose from: pixel"):
        plan(smoke_cfg("cycle.ablations=[perceptual]"))


def test_pixel_follows_initial_with_the_identity_terms_off_and_has_its_own_lineage(smoke_cfg):
    cfg = smoke_cfg("stages.initial.epochs=7", "stages.initial.lr=3e-4", "stages.initial.loss.pixel_type=l1")
    s = stage_settings(cfg, "pixel")
    assert (s.epochs, s.lr, s.loss.pixel_type) == (7, 3e-4, "l1")
    assert s.loss.identity == s.loss.feature_match == s.loss.cross_identity == 0
    keys = artifact_keys(cfg)
    assert keys["dsr_pixel"] not in (keys["dsr_initial"], keys["dsr_cyclic"])
    # no EdgeFace in its lineage: the identity weights and EdgeFace's training do not change it
    same = artifact_keys(smoke_cfg("stages.initial.epochs=7", "stages.initial.lr=3e-4",
                                   "stages.initial.loss.pixel_type=l1", "stages.initial.loss.identity=0.9",
                                   "stages.edgeface_pretrain.epochs=3"))
    assert same["dsr_pixel"] == keys["dsr_pixel"] and same["dsr_initial"] != keys["dsr_initial"]
    assert artifact_keys(smoke_cfg("stages.initial.epochs=8"))["dsr_pixel"] != keys["dsr_pixel"]


def test_pixel_stage_refuses_identity_weights(smoke_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"no supervisor EdgeFace.*'identity': 0.5"):
        run_pixel(smoke_cfg("stage=pixel", "stages.pixel.loss.identity=0.5"), tmp_path / "pixel")


def test_eval_lists_the_pixel_method_only_with_the_ablation(smoke_cfg):
    cfg = smoke_cfg()
    assert "pixel" not in [m.name for m in default_methods(cfg, ArtifactStore.for_config(cfg))]
    cfg = smoke_cfg("cycle.ablations=[pixel]")
    assert "pixel" in [m.name for m in default_methods(cfg, ArtifactStore.for_config(cfg))]


@pytest.mark.slow
def test_smoke_cycle_with_the_pixel_ablation(smoke_cfg, tmp_path):
    cfg = smoke_cfg("cycle.ablations=[pixel]", "supervisor.min_auc=0.999")
    run(cfg, tmp_path / "run")
    store = ArtifactStore.for_config(cfg)
    pixel = store.manifest("dsr_pixel")
    assert pixel["parents"] == {} and "supervisor" not in pixel
    assert store.path("dsr_pixel").name == f"dsr_pixel-{artifact_keys(cfg)['dsr_pixel']}.pt"
    for name in ("dsr_initial", "dsr_cyclic"):  # each DSR stage checked its supervisor; a floor of 0.999 fails
        check = store.manifest(name)["supervisor"]
        assert check["weak"] and check["auc"] < 0.999 and check["min_auc"] == 0.999, name
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    table = results["16"]
    assert {"bicubic", "pixel", "initial", "cyclic"} <= set(table)
    assert table["pixel"]["psnr"] != table["initial"]["psnr"]  # two different DSRs
    diff = results["comparisons"]["16"]["initial vs pixel"]["psnr"]
    assert diff["diff"] == pytest.approx(table["initial"]["psnr"] - table["pixel"]["psnr"])
    report = (tmp_path / "run" / "eval" / "report.md").read_text()
    assert "Does identity supervision help?" in report and "Identity supervision (initial)" in report
    assert "`dsr_initial`: WEAK weak supervisor" in report and "cycle.ablations=[pixel]" in report


# ---------------------------------------------------------------------------------------------- the supervisor check


def test_a_random_supervisor_triggers_the_guard(smoke_cfg, tmp_path):
    cfg = smoke_cfg("stage=initial")
    store = publish_edgeface(cfg, "edgeface_pretrained")  # random weights: no notion of identity
    run_initial(cfg, tmp_path / "weak")
    check = store.manifest("dsr_initial")["supervisor"]
    assert check["weak"] and check["auc"] < 0.95 and check["identities"] >= 2 and check["images"] == 16
    assert "edgeface.weights" in check["verdict"] and "stages.initial.identity_warmup" in check["verdict"]
    rows = read_metrics(tmp_path / "weak" / "metrics.jsonl")
    assert [r["warning"] for r in rows if "warning" in r].count("weak_supervisor") == 1
    assert any(r.get("supervisor/auc") == pytest.approx(check["auc"]) for r in rows)

    # the same supervisor under floors it meets: no warning, recorded as not weak
    cfg = smoke_cfg("stage=initial", "supervisor.min_auc=0", "supervisor.min_tar=0")
    run_initial(cfg, tmp_path / "ok")
    assert not ArtifactStore.for_config(cfg).manifest("dsr_initial")["supervisor"]["weak"]
    assert not [r for r in read_metrics(tmp_path / "ok" / "metrics.jsonl") if r.get("warning") == "weak_supervisor"]


def test_judge_supervisor_floors_and_a_nan_tar():
    q = {"auc": 0.97, "tar@far=1e-2": 0.4, "identities": 10, "images": 100}
    assert judge_supervisor(q, min_auc=0.95, min_tar=0.5)["weak"]  # TAR below its floor
    assert not judge_supervisor(q, min_auc=0.95, min_tar=0.3)["weak"]
    nan = {**q, "tar@far=1e-2": math.nan}  # too few impostor pairs: judged on the AUC alone
    assert not judge_supervisor(nan, min_auc=0.95, min_tar=0.5)["weak"]
    assert judge_supervisor({**nan, "auc": 0.9}, min_auc=0.95, min_tar=0.5, stage="cyclic")["verdict"].count(
        "stages.cyclic.") == 2


def test_floors_and_warmup_are_range_checked(smoke_cfg):
    with pytest.raises(ConfigError, match="supervisor.min_auc=1.5"):
        check_stage(smoke_cfg("supervisor.min_auc=1.5"), "initial")
    with pytest.raises(ConfigError, match="stages.initial.identity_warmup=2"):
        check_stage(smoke_cfg("stages.initial.identity_warmup=2"), "initial")


# ---------------------------------------------------------------------------------------------- the warm-up


def test_identity_scale_multiplies_only_the_identity_terms():
    torch.manual_seed(0)
    sup = torch.nn.Linear(1, 1)
    sup.forward = lambda x, return_features=False: (
        (x.mean((2, 3)), [x[:, :, ::4, ::4]]) if return_features else x.mean((2, 3)))
    loss = DSRLoss(sup, pixel=1.0, identity=0.5, feature_match=0.2)
    sr, hr = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    full, terms = loss(sr, hr)
    loss.identity_scale = 0.0
    off, terms0 = loss(sr, hr)
    assert off == pytest.approx(float(terms["pixel"]))
    assert float(terms0["identity"]) == pytest.approx(float(terms["identity"]))  # still reported, unweighted
    loss.identity_scale = 0.5
    half, _ = loss(sr, hr)
    assert float(half) == pytest.approx(float(terms["pixel"]) + 0.5 * (float(full) - float(terms["pixel"])))


def test_identity_warmup_ramps_over_its_share_of_the_stage(smoke_cfg, tmp_path):
    cfg = smoke_cfg("stage=initial", "stages.initial.epochs=2", "stages.initial.identity_warmup=0.5")
    publish_edgeface(cfg, "edgeface_pretrained")
    run_initial(cfg, tmp_path / "run")
    scales = {r["step"]: r["train/identity_scale"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
              if "train/identity_scale" in r}
    # 2 epochs x 2 steps, ramped over the first 2: 0.5, 1, 1, 1 (logged as the running mean of the epoch)
    assert scales == {1: 0.5, 2: 0.75, 3: 1.0, 4: 1.0}


# ---------------------------------------------------------------------------------------------- the report


def _diff(d, lo, hi):
    verdict = "better" if lo > 0 else "worse" if hi < 0 else "within noise"
    return {"diff": d, "ci95": [lo, hi], "verdict": verdict}


def test_the_report_says_whether_identity_supervision_beat_pixel_only():
    table = {"pixel": {"psnr": 24.9, "auc": 0.80, "judge_auc": 0.79, "judge_rank1": 0.52},
             "initial": {"psnr": 24.3, "auc": 0.82, "judge_auc": 0.74, "judge_rank1": 0.40},
             "cyclic": {"psnr": 24.3, "auc": 0.83, "judge_auc": 0.78, "judge_rank1": 0.50}}
    comparisons = {"initial vs pixel": {"psnr": _diff(-0.6, -0.7, -0.5), "auc": _diff(0.02, 0.01, 0.03),
                                        "judge_auc": _diff(-0.05, -0.08, -0.02),
                                        "judge_rank1": _diff(-0.12, -0.2, -0.05)},
                   "cyclic vs pixel": {"psnr": _diff(-0.6, -0.7, -0.5), "judge_auc": _diff(-0.01, -0.03, 0.01)}}
    initial, cyclic = identity_supervision(table, comparisons)
    # the judge decides, not the EdgeFace that supervised the DSR
    assert initial.startswith("Identity supervision (initial) LOST to pixel-only on judge AUC, outside the interval")
    assert "AUC 0.8200 vs 0.8000 (better, outside the interval" in initial
    assert cyclic.startswith("Identity supervision (cyclic) did not beat pixel-only on judge AUC: the difference is "
                             "inside the interval")
    assert "judge rank-1 0.5000 vs 0.5200 (no interval)" in cyclic
    # without the judge the EdgeFace AUC decides, with a caveat; without the ablation, nothing is said
    no_judge = {m: {k: v for k, v in row.items() if not k.startswith("judge")} for m, row in table.items()}
    lines = identity_supervision(no_judge, comparisons)
    assert lines[0].startswith("Identity supervision (initial) beat pixel-only on AUC, outside the interval")
    assert "favours the identity-supervised DSRs" in lines[-1]
    assert identity_supervision({k: v for k, v in table.items() if k != "pixel"}, comparisons) == []
