"""eval.summary: one table and one figure comparing the jobs of a sweep; wandb names of sweep points."""
from __future__ import annotations

import json
import os
import time

from eval.summary import SUMMARY_MD, SUMMARY_PNG, main, write_summary


def _job(root, sub, overrides, metrics, mtime=None):
    d = root / sub
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if metrics is not None:
        (d / "final_metrics.json").write_text(json.dumps(metrics))
    if mtime is not None:
        os.utime(d / ".hydra" / "overrides.yaml", (mtime, mtime))
    return d


def test_summary_of_the_latest_sweep_compares_its_jobs(tmp_path):
    old = time.time() - 3600
    _job(tmp_path, "res16/cyclic/stages.cyclic.lr=1e-3", ["stage=cyclic", "stages.cyclic.lr=1e-3"],
         {"val/psnr": 30.0}, mtime=old)  # a run from before this sweep: not in its summary
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")
    os.utime(tmp_path / "multirun.yaml", (old + 60, old + 60))
    for lam, psnr, auc in ((0.5, 24.1, 0.81), (0.65, 24.4, 0.85), (0.8, 23.9, None)):
        _job(tmp_path, f"res16/cyclic/stages.cyclic.lambda_identity={lam}",
             ["stage=cyclic", "res=16", f"stages.cyclic.lambda_identity={lam}"],
             {"val/psnr": psnr, "val/auc": auc, "val/eer": 0.2, "train/loss": 0.1})
    _job(tmp_path, "res16/cyclic/stages.cyclic.lambda_identity=0.9",
         ["stage=cyclic", "res=16", "stages.cyclic.lambda_identity=0.9"], None)  # failed: no final metrics

    assert main([str(tmp_path)]) == 0
    md = (tmp_path / SUMMARY_MD).read_text()
    rows = [r for r in md.splitlines() if r.startswith("| ")]
    assert rows[0] == "| job | stages.cyclic.lambda_identity | val/psnr | val/auc | val/eer |"
    assert len(rows) == 5 and "lr=1e-3" not in md  # 4 jobs of this sweep, the older run left out
    assert "| 1 | 0.65 | **24.4** | **0.85** | **0.2** |" in rows
    assert "| 2 | 0.8 | 23.9 | n/a | **0.2** |" in rows
    assert "No final_metrics.json" in md and "lambda_identity=0.9" in md.split("No final_metrics.json")[1]
    assert (tmp_path / SUMMARY_PNG).stat().st_size > 1000

    assert main([str(tmp_path), "--all", "--metrics", "val/psnr"]) == 0
    md = (tmp_path / SUMMARY_MD).read_text()
    header = [r for r in md.splitlines() if r.startswith("| job")][0]
    assert header == "| job | res | stages.cyclic.lambda_identity | stages.cyclic.lr | val/psnr |"
    assert md.count("| **30** |") == 1  # the older run is in, with every job


def test_summary_without_jobs_says_so(tmp_path, capsys):
    assert write_summary(tmp_path) is None
    assert main([str(tmp_path)]) == 1 and "no job" in capsys.readouterr().err


def test_wandb_names_and_groups_carry_the_sweep_point(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    import cycle.logger as lg

    seen = {}

    class Fake(lg.MetricsLogger):
        def __init__(self, run_dir, cfg=None, **kw):
            seen.update(kw)
            super().__init__(run_dir, cfg, backend="none")

    monkeypatch.setattr(lg, "MetricsLogger", Fake)
    monkeypatch.setattr(lg, "sweep_point", lambda: "stages.cyclic.lr=1e-4")
    cfg = OmegaConf.create({"res": "16", "name": "demo", "logger": {"backend": "wandb"}})
    logger = lg.build_logger(cfg, tmp_path, "cyclic", select="val/psnr")
    logger.close()
    assert seen["name"] == "res16/cyclic/stages.cyclic.lr=1e-4" and seen["group"] == "demo/stages.cyclic.lr=1e-4"
    assert logger.select == "val/psnr"


def test_default_metrics_of_a_cycle_sweep_start_with_the_last_dsr(tmp_path):
    from eval.summary import Job, choose_metrics

    keys = [f"{m}/{k}" for m in ("hr", "bicubic", "initial", "initial_ft", "cyclic")
            for k in ("psnr", "ssim", "auc", "eer", "rank1")]
    jobs = [Job(tmp_path, {"res": "16"}, {k: 0.5 for k in keys if not k.startswith("hr/p")}, 0.0)]
    assert choose_metrics(jobs) == ["cyclic/psnr", "cyclic/ssim", "cyclic/auc", "cyclic/eer", "initial_ft/psnr",
                                    "initial_ft/ssim", "initial_ft/auc", "initial_ft/eer"]
    assert choose_metrics(jobs, optimized="initial/auc")[:2] == ["initial/auc", "cyclic/psnr"]
