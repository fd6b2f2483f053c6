"""`stage=cycle` end to end on the smoke config: order, artifacts, skip, 2nd cycle, resume."""
import json
import subprocess
import sys

import pytest
from conftest import ROOT

from cycle.artifacts import ArtifactStore, MissingArtifact
from cycle.pipeline import plan, run

ALL = ["edgeface_pretrained", "dsr_initial", "edgeface_ft", "dsr_cyclic"]


def test_plan_order_and_io(smoke_cfg):
    cfg = smoke_cfg("cycle.cycles=2")
    steps = plan(cfg, 2)
    assert [s.dirname for s in steps] == ["edgeface_pretrain", "initial", "edgeface_ft", "cyclic",
                                          "edgeface_ft2", "cyclic2", "eval"]
    assert steps[4].inputs == ["dsr_cyclic", "edgeface_ft"] and steps[4].output == "edgeface_ft2"
    assert steps[5].inputs == ["dsr_cyclic", "edgeface_ft2"] and steps[5].output == "dsr_cyclic2"
    # 2nd-cycle values; no official weights, so the identity weight for a supervisor pre-trained here
    assert steps[5].settings["lr"] == 5e-5 and steps[5].settings["lambda_identity"] == 0.10
    with_weights = smoke_cfg("edgeface.weights=/some/edgeface_xxs.pt")
    assert plan(with_weights, 1)[0].stage == "initial"  # official weights: no pretraining


def test_third_cycle_needs_force(smoke_cfg, tmp_path):
    with pytest.raises(ValueError, match="force_third"):
        run(smoke_cfg("cycle.cycles=3"), tmp_path)


def test_skip_with_missing_artifact_names_the_stage(smoke_cfg, tmp_path):
    cfg = smoke_cfg("cycle.skip=[edgeface_pretrain,initial]")
    with pytest.raises(MissingArtifact, match="stage=edgeface_pretrain"):
        run(cfg, tmp_path / "run")


@pytest.mark.slow
def test_full_cycle_then_skip_and_second_cycle(smoke_cfg, tmp_path):
    cfg = smoke_cfg()
    out = tmp_path / "run"
    final = run(cfg, out)
    store = ArtifactStore.for_config(cfg)
    assert all(store.exists(n) for n in ALL)
    for sub in ("edgeface_pretrain", "initial", "edgeface_ft", "cyclic", "eval"):
        assert (out / sub).is_dir(), sub
    results = json.loads((out / "eval" / "results.json").read_text())
    assert {"hr", "bicubic", "initial", "initial_ft", "cyclic"} <= set(results["16"])
    assert final

    # re-running resumes: every stage of this lineage is reused, nothing is re-trained; so does the same
    # configuration in another run directory (artifacts are keyed by lineage, like a build cache)
    mtimes = {n: store.path(n).stat().st_mtime for n in ALL}
    run(cfg, out)
    run(smoke_cfg("cycle.eval=false"), tmp_path / "run1b")
    assert {n: store.path(n).stat().st_mtime for n in ALL} == mtimes

    # skip initial/edgeface_ft and change a cyclic setting: their artifacts are reused, cyclic trains a
    # new lineage beside the old one, which stays untouched
    cfg2 = smoke_cfg("cycle.skip=[edgeface_pretrain,initial,edgeface_ft]", "cycle.eval=false",
                     "stages.cyclic.lr=1e-4")
    run(cfg2, tmp_path / "run2")
    store2 = ArtifactStore.for_config(cfg2)
    assert store2.path("dsr_initial") == store.path("dsr_initial")
    assert store2.path("dsr_cyclic") != store.path("dsr_cyclic") and store2.exists("dsr_cyclic")
    assert store.path("dsr_cyclic").stat().st_mtime == mtimes["dsr_cyclic"]
    assert store2.manifest("dsr_cyclic")["parents"]["dsr_initial"]["key"] == store.key("dsr_initial")

    # a 2nd cycle adds its own artifacts, never touching cycle 1's
    cfg3 = smoke_cfg("cycle.cycles=2", "cycle.eval=false",
                     "cycle.skip=[edgeface_pretrain,initial,edgeface_ft,cyclic]")
    run(cfg3, tmp_path / "run3")
    assert store.exists("edgeface_ft2") and store.exists("dsr_cyclic2")
    assert store.path("dsr_initial").stat().st_mtime == mtimes["dsr_initial"]


@pytest.mark.slow
def test_train_py_smoke_cli(tmp_path):
    """The command CI users type: every stage of the cycle through train.py in a subprocess."""
    p = subprocess.run([sys.executable, "train.py", "experiment=smoke", "device=cpu",
                        f"paths.output_dir={tmp_path}/outputs", f"paths.artifacts_dir={tmp_path}/artifacts",
                        f"paths.cache_dir={tmp_path}/cache"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "smoke" / "res16" / "cycle"
    assert (run_dir / "eval" / "report.md").is_file()
    assert all(len(list((tmp_path / "artifacts" / "res16").glob(f"{n}-*.pt"))) == 1 for n in ALL)
