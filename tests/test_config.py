"""Composition of the real configs: every stage x res, typed res, typos, dispatch."""
import subprocess
import sys

import pytest
from conftest import ROOT, compose_train
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

STAGES = ["cycle", "initial", "edgeface_ft", "cyclic", "edgeface_pretrain"]
CYCLIC = {"16": (55, 9e-5, 0.68, 0.22), "24": (50, 8.5e-5, 0.65, 0.20), "32": (50, 8e-5, 0.65, 0.20)}


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("res", ["16", "24", "32"])
def test_every_stage_and_res_composes_and_resolves(stage, res, tmp_path):
    # with official weights: the method guide's values
    cfg = compose_train([f"stage={stage}", f"res={res}", "edgeface.weights=/w/edgeface_xxs.pt"], tmp_path)
    OmegaConf.resolve(cfg)
    assert cfg.stage == stage and str(cfg.res) == res and int(cfg.res) == int(res)
    epochs, lr, lam_id, lam_fm = CYCLIC[res]
    c = cfg.stages.cyclic
    assert (c.epochs, c.lr, c.loss.identity, c.loss.feature_match) == (epochs, lr, lam_id, lam_fm)
    i = cfg.stages.initial
    assert (i.epochs, i.lr, i.loss.identity, i.loss.feature_match, i.identity_warmup) == (100, 1.5e-4, 0.50, 0.15, 0)
    assert (c.second_cycle.epochs, c.second_cycle.lr, c.second_cycle.loss.identity) == (30, 5e-5, 0.70)
    # without: EdgeFace is pre-trained here, a weak supervisor, and the identity weights are low and ramped in
    cfg = compose_train([f"stage={stage}", f"res={res}"], tmp_path)
    OmegaConf.resolve(cfg)
    c, i = cfg.stages.cyclic, cfg.stages.initial
    assert (c.epochs, c.lr, c.loss.identity, c.loss.feature_match) == (epochs, lr, 0.10, 0.03)
    assert (i.epochs, i.lr, i.loss.identity, i.loss.feature_match, i.identity_warmup) == (100, 1.5e-4, 0.10, 0.03, 0.3)
    assert (c.second_cycle.loss.identity, c.second_cycle.loss.feature_match) == (0.10, 0.03)


@pytest.mark.parametrize("res", ["16", "24", "32"])
def test_dsr_instantiates_for_res(res, tmp_path):
    import torch
    cfg = compose_train([f"res={res}"], tmp_path)
    model = instantiate(cfg.dsr)
    out = model(torch.rand(1, 3, int(res), int(res)))
    assert out.shape == (1, 3, 112, 112)


def test_res_typed_as_int_on_the_command_line_is_accepted(tmp_path):
    # `res=32` arrives from the parser as the int 32
    cfg = compose_train(["res=32"], tmp_path)
    assert cfg.res == "32" and f"{cfg.res}" == "32"


@pytest.mark.parametrize("bad", ["res=20", "res=abc"])
def test_bad_res_fails_at_composition_listing_allowed(bad):
    with pytest.raises(ConfigCompositionException) as e:
        compose_train([bad])
    cause = str(e.value.__cause__ or e.value)
    assert "16" in cause and "24" in cause and "32" in cause


def test_float_res_fails():
    with pytest.raises(ConfigCompositionException):
        compose_train(["res=16.0"])


def test_unknown_stage_lists_the_stages():
    with pytest.raises(Exception) as e:
        compose_train(["stage=finetune"])
    msg = str(e.value.__cause__ or e.value)
    assert all(s in msg for s in STAGES)


@pytest.mark.parametrize("typo", ["trainer.batchsize=4", "sed=1", "stages.initial.epoch=3"])
def test_config_typo_fails(typo):
    with pytest.raises(ConfigCompositionException):
        compose_train([typo])


def test_experiments_compose(tmp_path):
    for exp in ("smoke", "demo"):
        cfg = compose_train([f"experiment={exp}"], tmp_path)
        OmegaConf.resolve(cfg)
        assert cfg.name == exp


def _run_train(*args, timeout=300):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_cli_bad_res_message():
    p = _run_train("res=20", "--cfg", "job")
    assert p.returncode != 0
    assert "16, 24, 32" in p.stderr + p.stdout


def test_cli_compositions_as_typed(tmp_path):
    for args in (["stage=cyclic", "res=32"], ["res=24"]):
        p = _run_train(*args, "--cfg", "job")
        assert p.returncode == 0, p.stderr
        assert f"res: '{args[-1][4:]}'" in p.stdout
    # a real (dry) multirun: one job per resolution, each in its own directory
    p = _run_train("-m", "res=16,24,32", "dry_run=true", "logger=none", f"paths.output_dir={tmp_path}")
    assert p.returncode == 0, p.stderr
    assert sorted(d.name for d in (tmp_path / "default").glob("res*")) == ["res16", "res24", "res32"]
    assert p.stdout.count("plan for res=") == 3


def test_dry_run_prints_plan_and_runs_nothing(tmp_path):
    p = _run_train("stage=cycle", "dry_run=true", f"paths.output_dir={tmp_path}/o",
                   f"paths.artifacts_dir={tmp_path}/a", "logger=none")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    for s in ("edgeface_pretrain", "initial", "edgeface_ft", "cyclic", "eval"):
        assert s in out
    assert "lambda_identity" in out and "dsr_initial" in out
    assert not (tmp_path / "a").exists()


def test_unbuilt_stage_is_a_clear_not_implemented(tmp_path, monkeypatch):
    import dataclasses

    from cycle.pipeline import run_stage
    from cycle.stages import STAGE
    cfg = compose_train(["stage=initial"], tmp_path)
    monkeypatch.setitem(STAGE, "initial", dataclasses.replace(STAGE["initial"], fn="dsr.not_there.run"))
    with pytest.raises(NotImplementedError, match="stage 'initial'"):
        run_stage(cfg, tmp_path)


@pytest.mark.skipif((ROOT / "conf" / "local" / "default.yaml").exists(),
                    reason="this checkout has its own conf/local/default.yaml, which takes precedence")
def test_one_local_file_serves_local_runs_and_slurm_runs(tmp_path):
    """conf/local/default.yaml is picked up without local=<host>; its cluster settings reach the Slurm
    launcher and leave a run with any other launcher composable."""
    (tmp_path / "local").mkdir()
    text = "# @package _global_\ncluster:\n  partition: gpu-a100\n  account: vlr\n"
    (tmp_path / "local" / "default.yaml").write_text(text)
    where = f"hydra.searchpath=[file://{tmp_path}]"
    plain = compose_train([where, "stage=initial"], return_hydra_config=True)
    assert plain.hydra.runtime.choices.local == "default" and plain.cluster.partition == "gpu-a100"
    assert "partition" not in plain.hydra.launcher  # the basic launcher: nothing of Slurm
    local_sweep = compose_train([where, "hydra/launcher=submitit_local"], return_hydra_config=True)
    assert "partition" not in local_sweep.hydra.launcher
    slurm = compose_train([where, "hydra/launcher=submitit_slurm"], return_hydra_config=True)
    assert (slurm.hydra.launcher.partition, slurm.hydra.launcher.account) == ("gpu-a100", "vlr")
    # a local file that also makes Slurm this machine's launcher for -m; the command line still wins
    (tmp_path / "local" / "default.yaml").write_text(text.replace(
        "cluster:", "defaults:\n  - override /hydra/launcher: submitit_slurm\ncluster:"))
    assert compose_train([where], return_hydra_config=True).hydra.launcher.partition == "gpu-a100"
    local_sweep = compose_train([where, "hydra/launcher=submitit_local"], return_hydra_config=True)
    assert local_sweep.hydra.launcher._target_.endswith("LocalLauncher")
    # the shipped example composes too
    ex = compose_train(["local=example", "hydra/launcher=submitit_slurm"], return_hydra_config=True)
    assert ex.hydra.launcher.partition == "gpu" and ex.hydra.launcher.qos is None
