import json

from cycle.logger import MetricsLogger, plot_metrics, read_metrics


def test_jsonl_and_plot_always_written(tmp_path):
    with MetricsLogger(tmp_path, backend="none") as lg:
        for s in range(1, 6):
            lg.log({"train/loss": 1.0 / s, "val/psnr": 20 + s}, step=s)
        lg.warn("psnr_drop", "PSNR fell", step=5)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows[:5]] == [1, 2, 3, 4, 5] and rows[-1]["warning"] == "psnr_drop"
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_non_finite_values_stay_visible(tmp_path):
    with MetricsLogger(tmp_path) as lg:
        lg.log({"loss": float("nan")}, step=1)
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == "nan"
    assert plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "x.png") is None  # nothing to plot


def test_wandb_offline_writes_a_run_and_keeps_its_id_on_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = {"res": "16", "stage": {"name": "initial"}}
    from omegaconf import OmegaConf
    lg = MetricsLogger(tmp_path, OmegaConf.create(cfg), backend="wandb", name="res16/initial", group="t")
    lg.log({"train/loss": 0.5}, step=1)
    lg.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    first_id = lg.run_id
    lg2 = MetricsLogger(tmp_path, OmegaConf.create(cfg), backend="wandb", name="res16/initial", group="t")
    lg2.log({"train/loss": 0.4}, step=2)
    lg2.close()
    assert lg2.run_id == first_id
    assert all(first_id in p.name for p in (tmp_path / "wandb").glob("offline-run-*"))


def test_curves_always_show_the_selection_metric_and_the_losses(tmp_path):
    from cycle.logger import panel_keys

    keys = (["epoch", "time/epoch_s", "lr", "train/loss", "train/pixel", "train/identity", "train/feature_match",
             "val/loss", "val/psnr", "val/ssim", "val/auc", "val/eer", "val/tar@far=1e-2", "val/genuine_mean",
             "val/impostor_mean", "val/bicubic_psnr", "val/identity_cos"])
    shown = panel_keys(keys, select="val/psnr", max_panels=8)
    assert shown[0] == "val/psnr" and len(shown) == 8
    assert {"train/loss", "train/pixel", "train/identity", "train/feature_match", "val/loss"} <= set(shown)
    assert "lr" not in shown
    with MetricsLogger(tmp_path) as lg:
        lg.select = "val/psnr"
        for s in range(1, 4):
            lg.log({k: float(s) for k in keys}, step=s)
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_log_once_says_a_repeated_protocol_line_once(caplog):
    import numpy as np

    from eval.protocols import balanced_pairs

    labels = np.repeat(np.arange(7), 3)  # a label set no other test uses: its line is new to this process
    with caplog.at_level("INFO", logger="eval.protocols"):
        for _ in range(3):
            balanced_pairs(labels, 20, seed=123)
    said = [r for r in caplog.records if r.levelname == "INFO" and "balanced_pairs" in r.getMessage()]
    assert len(said) == 1
