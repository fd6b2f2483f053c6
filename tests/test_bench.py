"""The benchmarks at toy sizes, so `make bench` and `make bench-quality` cannot rot."""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from conftest import ROOT

if str(ROOT) not in sys.path:  # bench/ is not an installed package
    sys.path.insert(0, str(ROOT))

from bench import quality, run  # noqa: E402
from bench.common import PeakMemory, interleaved, time_steps  # noqa: E402


def test_bench_quick_writes_results(tmp_path):
    threads = torch.get_num_threads()
    try:
        res = run.main(["--quick", "--threads", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "results.json").read_text())
    md = (tmp_path / "results.md").read_text()
    assert saved["meta"]["quick"] and saved["matmul_peak"]["gflop_s"] > 0
    labels = {s["label"] for s in res["stages"]}
    assert labels == {"edgeface_pretrain", "initial / cyclic", "edgeface_ft"}
    for s in res["stages"]:
        assert s["img_per_s"] > 0 and s["gflop_per_img"] > 0 and 0 < s["peak_fraction"]
        assert s["peak_mem_mib"] > 0 or math.isnan(s["peak_mem_mib"])
    # The DSR step's FLOPs include the backward pass through the frozen supervisor (identity terms).
    ft = next(s for s in res["stages"] if s["stage"] == "edgeface_ft")
    dsr = next(s for s in res["stages"] if s["stage"] == "initial")
    assert dsr["gflop_per_img"] > 0.2  # a tiny DSR alone is ~0.08; EdgeFace-xxs fwd + input-grad bwd dominate
    assert ft["gflop_per_img"] > 0.25  # EdgeFace-xxs fwd+bwd with weight gradients (~0.28) + HR forward
    p = res["prototype"][0]
    assert p["speed_ratio"] > 0 and p["flop_ratio"] > 0 and p["prototype"]["params"] > 0
    assert set(res["loader"]["samples_per_s"]) == {"0", "2"}
    assert res["eval"]["num_pairs"] == 2000 and res["eval"]["total_s"] > 0
    bs = res["bootstrap"]
    assert bs["resamples"] == 1000 and bs["seconds"]["score_method + bootstrap"] > 0 and len(bs["auc_ci95"]) == 2
    assert "Bootstrap intervals" in md
    for heading in ("Training step per stage", "DSR vs the prototype", "Data loading", "Evaluation"):
        assert heading in md


def test_timing_helpers():
    calls = []
    times = time_steps(lambda: calls.append(1), torch.device("cpu"), steps=10, warmup=2, budget_s=0.0, min_steps=3)
    assert len(times) == 3 and len(calls) == 5  # stopped at min_steps once the budget was spent
    order = []
    out = interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, torch.device("cpu"), 2,
                      warmup=1)
    assert order == ["a", "b", "a", "b", "a", "b"] and len(out["a"]) == len(out["b"]) == 2


def test_peak_memory_sees_an_allocation():
    with PeakMemory(torch.device("cpu")) as mem:
        x = torch.ones(16 * 2 ** 20 // 4)  # 16 MiB, touched
        del x
    if mem.method == "unavailable":
        pytest.skip("no /proc on this system")
    assert mem.peak >= 12 * 2 ** 20


def test_quality_commands_and_tables(tmp_path):
    cmd = quality.command("orl", 24, ["device=cuda"], prefix="q")
    assert cmd == ["train.py", "stage=cycle", "experiment=demo", "res=24", "data=orl", "name=q_orl", "device=cuda"]
    run_dir = tmp_path / "run"
    (run_dir / "eval").mkdir(parents=True)
    metrics = {"hr": {"auc": 0.99, "eer": 0.02, "tar@far=1e-3": None},
               "bicubic": {"psnr": 24.0, "ssim": 0.7, "auc": 0.8},
               "cyclic": {"psnr": 25.5, "ssim": 0.75, "auc": 0.85}}
    (run_dir / "eval" / "results.json").write_text(json.dumps({
        "24": metrics, "protocol": {"num_pairs": 100, "num_genuine": 50, "num_images": 80, "num_identities": 8,
                                    "split": "test"},
        "regressions": {"24": ["cyclic is worse than initial in eer"]}}))
    log = tmp_path / "orl_res24.log"
    log.write_text(f"[2026-01-01 00:00:00,000][train][INFO] - stage=cycle res=24 name=q_orl -> {run_dir}\n")
    found = quality.find_results("orl", 24, "q", log)
    assert found == run_dir / "eval" / "results.json"
    info = {"command": "python -m bench.quality", "date": "2026-01-01", "cpu": "cpu", "cores": 2, "torch": "x"}
    md = quality.render([{"data": "orl", "res": 24, "command": "python " + " ".join(cmd), "rc": 0, "wall_s": 60,
                          "log": None, "results": found},
                         {"data": "orl", "res": 32, "command": "c", "rc": 1, "wall_s": 5, "log": None,
                          "results": None}], info)
    assert "## data=orl" in md and "### 24x24" in md and "### 32x32" in md
    assert "| `bicubic` | 24.00 | 0.7000 | 0.8000 |" in md
    assert "| `hr` | - | - | 0.9900 | 0.0200 | n/a |" in md  # null (NaN) = n/a, absent = -
    assert "cyclic is worse than initial in eer" in md
    assert md.index("`hr`") < md.index("`bicubic`") < md.index("`cyclic`")


@pytest.mark.slow  # 15-100 s (machine load): a small JPEG set and its .rec, two cache builds, eight loaders
def test_data_scale_bench_small(tmp_path):
    from bench import data_scale

    r = data_scale.main(["--images", "120", "--per-identity", "10", "--root", str(tmp_path / "set"),
                         "--out", str(tmp_path / "out"), "--batches", "2", "--batch", "8", "--workers", "1"])
    for src in ("folder", "rec"):
        assert r["build"][src]["n"] == 120 and r["build"][src]["images_per_s"] > 0
        assert r["build"][src]["disk_bytes_per_image"] == pytest.approx(112 * 112 * 3, rel=0.01)
        assert set(r["loader"][src]) == {"cached/0", "cached/2", "streaming/0", "streaming/2"}
        assert all(v > 0 for v in r["loader"][src].values())
    assert r["extrapolated"]["images"] == 3_300_000
    assert "Extrapolated to 3,300,000 images" in (tmp_path / "out" / "data_scale.md").read_text()
    again = data_scale.main(["--images", "120", "--per-identity", "10", "--root", str(tmp_path / "set"),
                             "--out", str(tmp_path / "out"), "--batches", "2", "--batch", "8", "--workers", "1"])
    assert again["set"] == r["set"]  # the JPEG set is written once
