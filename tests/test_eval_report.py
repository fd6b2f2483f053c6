"""eval.report / python -m eval: methods from artifacts, results.json schema, report.md, figures, LFW pairs."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import _SESSION_CACHE, ROOT, compose_train
from hydra.utils import instantiate
from omegaconf import open_dict
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio as sk_psnr
from skimage.metrics import structural_similarity as sk_ssim
from sklearn.metrics import roc_auc_score

import edgeface
from cycle.artifacts import ArtifactStore
from cycle.config import to_plain
from cycle.data import build_splits, load_image, make_loader
from cycle.degrade import upsample
from eval.bootstrap import identity_resamples, paired_difference
from eval.metrics import kfold_accuracy, pair_scores_indexed, psnr
from eval.pairs_file import MissingImagesError
from eval.protocols import balanced_fold_pairs, balanced_pairs, identification_split
from eval.report import EvaluationError, evaluate, regressions, render_markdown, score_method

FIGURES = ("roc", "cmc", "scores", "quality", "samples")


# ------------------------------------------------------------------------------------ tiny artifacts


def make_edgeface_payloads():
    """Two random EdgeFaces in the project's `edgeface.save` format: 'pretrained' and a perturbed 'ft'."""
    torch.manual_seed(0)
    model = edgeface.build("edgeface_xxs")
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ft = {k: (v + 0.05 * torch.randn_like(v) * v.std() if v.is_floating_point() and v.numel() > 1 else v.clone())
          for k, v in sd.items()}

    def payload(state):
        return {"format": "edgeface", "variant": model.variant, "quantized": False, "state_dict": state}
    return {"pretrained": payload(sd), "ft": payload(ft)}


@pytest.fixture(scope="module")
def edgeface_payloads():
    return make_edgeface_payloads()  # once per module: timm's random init costs seconds on a small CPU


def publish_dsr(cfg, name: str, res: str, seed: int) -> None:
    """A random-init DSR published as dsr/stage.py does (nearly bicubic: its last conv starts small)."""
    with open_dict(cfg):
        cfg.res = res
    torch.manual_seed(seed)
    model = instantiate(cfg.dsr)
    ArtifactStore.for_config(cfg).publish(
        name, {"format": "dsr", "res": int(res), "model": model.state_dict(),
               "arch": to_plain(cfg.dsr)}, cfg=cfg, metrics={"val/psnr": 20.0})


def publish(cfg, payloads, res: str = "16", names=("edgeface_pretrained", "dsr_initial", "edgeface_ft", "dsr_cyclic")):
    c = cfg.copy()
    with open_dict(c):
        c.res = res
    store = ArtifactStore.for_config(c)
    for name in names:
        if name.startswith("edgeface"):
            store.publish(name, payloads["pretrained" if name == "edgeface_pretrained" else "ft"], metrics={})
        else:
            publish_dsr(cfg.copy(), name, res, seed=len(name))


@pytest.fixture
def smoke(tmp_path):
    cfg = compose_train(["experiment=smoke", "device=cpu"], tmp_path)
    with open_dict(cfg):
        cfg.paths.cache_dir = str(_SESSION_CACHE)  # the tiny synthetic faces, rendered once per session
    return cfg


# ------------------------------------------------------------------------------------ evaluate()


def test_evaluate_smoke_schema_report_and_figures(smoke, edgeface_payloads, tmp_path):
    publish(smoke, edgeface_payloads)
    out = tmp_path / "eval"
    flat = evaluate(smoke, out, resolutions=["16"])

    res = json.loads((out / "results.json").read_text())
    assert {"16", "config", "artifacts", "skipped", "notes"} <= set(res)
    assert list(res["16"]) == ["hr", "bicubic", "initial", "initial_ft", "cyclic"]
    for method, m in res["16"].items():
        for k in ("auc", "eer", "tar@far=1e-3", "tar@far=1e-2", "accuracy", "rank1", "rank5", "d_prime",
                  "genuine_mean", "impostor_mean", "num_genuine", "num_impostor"):
            assert k in m, (method, k)
        assert ("psnr" in m) == ("ssim" in m) == (method != "hr")
        assert 0 <= m["auc"] <= 1 and 0 <= m["rank1"] <= m["rank5"] <= 1
    # 60 impostor pairs cannot reach FAR = 1e-3: null in JSON, said once in the notes
    assert res["16"]["cyclic"]["tar@far=1e-3"] is None
    assert any("tar@far=1e-3 is NaN" in n and "cyclic" in n for n in res["notes"])
    # cycle.cycles=1: the 2nd cycle is no method of this configuration; manifests of the artifacts used are recorded
    assert res["skipped"]["16"] == {} and "cyclic2" not in res["16"]
    assert res["artifacts"]["16"]["dsr_cyclic"]["name"] == "dsr_cyclic"
    assert set(res["artifacts"]["16"]) == {"edgeface_pretrained", "dsr_initial", "edgeface_ft", "dsr_cyclic"}
    assert res["config"]["res"] == "16" and res["protocol"]["kind"] == "balanced"
    # flat dict for stage=cycle: "<method>/<metric>", finite values only
    assert flat["cyclic/auc"] == pytest.approx(res["16"]["cyclic"]["auc"])
    assert "cyclic/tar@far=1e-3" not in flat and all(np.isfinite(list(flat.values())))

    # independent recomputation: bicubic PSNR and the hr method's AUC from the same faces and pairs
    test = build_splits(smoke.data, smoke.paths.cache_dir)["test"]
    batch = next(iter(make_loader(test, batch_size=len(test), res=16, degradation=smoke.degradation,
                                  train=False, seed=int(smoke.eval.seed))))
    assert res["16"]["bicubic"]["psnr"] == pytest.approx(psnr(upsample(batch["lr"]), batch["hr"]).mean(), rel=1e-9)
    ef = edgeface.load(ArtifactStore.for_config(smoke).path("edgeface_pretrained"))
    with torch.no_grad():
        emb = ef(batch["hr"]).numpy()
    ia, ib, same, fold = balanced_fold_pairs(test.labels, int(smoke.eval.num_pairs), int(smoke.eval.seed),
                                             int(smoke.eval.folds))
    scores = pair_scores_indexed(emb, ia, ib)
    assert res["16"]["hr"]["auc"] == pytest.approx(roc_auc_score(same, scores), abs=1e-6)
    assert res["16"]["hr"]["num_genuine"] == int(same.sum())
    acc, _, _ = kfold_accuracy(scores, same, fold_ids=fold)
    assert res["16"]["hr"]["accuracy"] == pytest.approx(acc, abs=1e-12)
    # 4 test identities allow 2 identity-disjoint folds, not eval.folds=10: used, and said so
    assert res["protocol"]["num_folds"] == 2 and any("2 identity-disjoint folds" in n for n in res["notes"])

    md = (out / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| method | PSNR (dB) | SSIM | PSNR-Y (dB) | SSIM-Y | AUC | EER")
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["hr", "bicubic", "initial", "initial_ft", "cyclic"]
    assert "**" not in rows[1]  # hr is not ranked
    # every verification / identification metric carries its 95 % interval over identities
    for method, m in res["16"].items():
        for k in ("auc", "eer", "tar@far=1e-1", "accuracy", "d_prime", "rank1", "rank5"):
            lo, hi = m[f"{k}_ci95"]
            assert lo <= hi and (k == "d_prime" or 0 <= lo <= hi <= 1), (method, k)
        assert m["auc_ci95"][0] <= m["auc"] <= m["auc_ci95"][1]
        assert m["tar@far=1e-2_ci95"] is None  # 60 impostor pairs: undefined, so no interval
        if method != "hr":
            assert m["psnr_ci95"][0] <= m["psnr"] <= m["psnr_ci95"][1] and len(m["ssim_y_ci95"]) == 2
    assert res["protocol"]["bootstrap"]["resamples"] == 1000
    comps = res["comparisons"]["16"]
    assert set(comps) == {"initial vs bicubic", "initial_ft vs initial", "cyclic vs initial", "cyclic vs initial_ft"}
    c = comps["cyclic vs initial"]["auc"]
    assert c["diff"] == pytest.approx(res["16"]["cyclic"]["auc"] - res["16"]["initial"]["auc"])
    assert (c["verdict"] == "within noise") == (c["ci95"][0] <= 0 <= c["ci95"][1])
    # initial and initial_ft share the DSR: identical PSNR in every resample, so never a "regression"
    assert comps["initial_ft vs initial"]["psnr"] == {"diff": 0.0, "ci95": [0.0, 0.0], "verdict": "within noise"}
    for metric, b in res["best"]["16"].items():
        assert b["bold"] == (b["verdict"] == "better") and b["method"] != "hr"
        cell = next(r for r in rows if r.split("|")[1].strip() == b["method"])
        assert ("**" in cell) or not b["bold"]
    # the conventions: kernels and the channel convention are named
    assert "Keys a = -0.75, align_corners=False" in md and "down=area (box average" in md
    assert "65.481 R + 128.553 G + 24.966 B" in md and "0 px cropped from each border" in md
    assert "1000 bootstrap resamples of the test identities" in md and "identity-disjoint folds" in md
    assert "Skipped:" not in md and "| cyclic2 |" not in md  # no 2nd cycle configured: no row, no skip line
    for fig in FIGURES:
        png = out / "figures" / f"res16_{fig}.png"
        assert png.is_file() and (out / "figures" / f"res16_{fig}.pdf").is_file()
        with Image.open(png) as im:
            assert min(im.size) > 200
        assert f"figures/res16_{fig}.png" in md


def test_pair_mode_and_gallery_are_configurable(smoke, edgeface_payloads, tmp_path):
    publish(smoke, edgeface_payloads, names=("edgeface_pretrained",))
    with open_dict(smoke):
        smoke.eval.figures = False
    evaluate(smoke, tmp_path / "a", ["16"])
    with open_dict(smoke):
        smoke.eval.pair_mode, smoke.eval.gallery, smoke.eval.crop_border = "sr_sr", "sr", 8
    evaluate(smoke, tmp_path / "b", ["16"])
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in "ab")
    assert set(a["16"]) == {"hr", "bicubic"} and not (tmp_path / "a" / "figures").exists()
    assert a["16"]["hr"] == b["16"]["hr"]  # HR vs HR either way
    assert a["16"]["bicubic"]["genuine_mean"] != b["16"]["bicubic"]["genuine_mean"]

    # PSNR/SSIM on RGB and on Y (hand-computed BT.601, as BasicSR), with eval.crop_border, against skimage
    test = build_splits(smoke.data, smoke.paths.cache_dir)["test"]
    batch = next(iter(make_loader(test, batch_size=len(test), res=16, degradation=smoke.degradation,
                                  train=False, seed=int(smoke.eval.seed))))
    sr, hr = upsample(batch["lr"]).double().numpy(), batch["hr"].double().numpy()

    def luma(x):  # (B, 3, H, W) RGB in [0, 1] -> (B, H, W), studio swing [16, 235] / 255
        return (16.0 + 65.481 * x[:, 0] + 128.553 * x[:, 1] + 24.966 * x[:, 2]) / 255.0

    for run, c in ((a, 0), (b, 8)):
        crop = (slice(None), slice(None), slice(c, -c or None), slice(c, -c or None))
        s, h, ys, yh = sr[crop], hr[crop], luma(sr[crop]), luma(hr[crop])
        ssim_kw = dict(data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        m = run["16"]["bicubic"]
        assert m["psnr"] == pytest.approx(np.mean([sk_psnr(h[i], s[i], data_range=1.0) for i in range(len(s))]))
        assert m["ssim"] == pytest.approx(np.mean([sk_ssim(h[i], s[i], channel_axis=0, **ssim_kw)
                                                   for i in range(len(s))]), abs=1e-9)
        assert m["psnr_y"] == pytest.approx(np.mean([sk_psnr(yh[i], ys[i], data_range=1.0) for i in range(len(s))]))
        assert m["ssim_y"] == pytest.approx(np.mean([sk_ssim(yh[i], ys[i], **ssim_kw) for i in range(len(s))]),
                                            abs=1e-9)
        assert run["protocol"]["quality"]["crop_border"] == c
    assert a["16"]["bicubic"]["psnr_y"] > a["16"]["bicubic"]["psnr"]  # chroma errors weigh less on Y
    for key, value in (("pair_mode", "hr_hr"), ("gallery", "lr"), ("figure_formats", ["png", "gif9"]),
                       ("bootstrap", 200), ("crop_border", -1)):
        bad = smoke.copy()
        with open_dict(bad):
            bad.eval[key] = value
        with pytest.raises(EvaluationError, match=key):
            evaluate(bad, tmp_path / "c", ["16"])
    assert not (tmp_path / "c").exists()  # rejected before any work


def test_nothing_to_evaluate_writes_report_then_errors_and_never_overwrites(smoke, tmp_path):
    out = tmp_path / "eval"
    for _ in range(2):
        with pytest.raises(EvaluationError, match="no method could be evaluated"):
            evaluate(smoke, out, ["16"])
    res = json.loads((out / "results.json").read_text())
    assert res["16"] == {} and len(res["skipped"]["16"]) == 5  # cycle.cycles=1: no cyclic2 method
    assert "stage=edgeface_pretrain" in res["skipped"]["16"]["hr"]
    assert "No method could be evaluated" in (out / "report.md").read_text()
    assert len(list((out / "history").glob("*/results.json"))) == 1  # the first run, moved aside


def test_fewer_than_two_identities_is_a_clear_error(tmp_path):
    cfg = compose_train(["experiment=smoke", "device=cpu", "data.split.test=1"], tmp_path)
    with pytest.raises(EvaluationError, match="test split has 1 identity.*at least 2"):
        evaluate(cfg, tmp_path / "eval", ["16"])


def test_bad_resolution_is_rejected(smoke, tmp_path):
    with pytest.raises(EvaluationError, match="16, 24, 32"):
        evaluate(smoke, tmp_path, ["20"])


# ------------------------------------------------------------------------------------ report rendering


def test_bold_and_regressions_need_the_paired_interval_to_exclude_zero():
    table = {
        "hr": {"auc": 0.99, "eer": 0.01, "rank1": 1.0},
        "initial": {"psnr": 25.0, "auc": 0.93, "auc_ci95": [0.92, 0.94], "eer": 0.10, "rank1": 0.80,
                    "tar@far=1e-3": None},
        "cyclic": {"psnr": 24.5, "auc": 0.91, "auc_ci95": [0.90, 0.92], "eer": 0.08, "rank1": 0.80,
                   "tar@far=1e-3": None},
    }
    comparisons = {"cyclic vs initial": {
        "auc": {"diff": -0.02, "ci95": [-0.03, -0.01], "verdict": "worse"},
        "psnr": {"diff": -0.5, "ci95": [-1.1, 0.1], "verdict": "within noise"},
        "eer": {"diff": -0.02, "ci95": [-0.05, 0.01], "verdict": "within noise"}}}
    best = {"auc": {"method": "initial", "bold": True, "vs": "cyclic", "diff": 0.02, "ci95": [0.01, 0.03],
                    "verdict": "better"},
            "eer": {"method": "cyclic", "bold": False, "vs": "initial", "diff": -0.02, "ci95": [-0.05, 0.01],
                    "verdict": "within noise"}}
    regs = regressions(table, comparisons)
    assert regs == ["cyclic is worse than initial on AUC (0.9100 vs 0.9300; difference -0.02, "
                    "95 % interval [-0.03, -0.01])"]  # PSNR is worse too, but within noise
    # without intervals (eval.bootstrap=0) every difference at the shown precision is stated
    assert "cyclic is worse than initial on PSNR (dB) (24.50 vs 25.00)" in regressions(table)
    md = render_markdown({"16": table, "skipped": {"16": {"bicubic": "x absent"}}, "regressions": {"16": regs},
                          "comparisons": {"16": comparisons}, "best": {"16": best}, "notes": ["a note"],
                          "config": {"eval": {"folds": 10}}, "protocol": {}})
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "**0.9300** [0.9200, 0.9400]" in rows["initial"] and "0.9100 [0.9000, 0.9200]" in rows["cyclic"]
    assert "**0.0800**" not in rows["cyclic"]  # best EER, but within noise: not bold
    assert "EER (cyclic vs initial, difference -0.02, 95 % interval [-0.05, 0.01])" in md
    assert "**" not in rows["hr"] and "| - |" in rows["hr"] and "n/a" in rows["cyclic"]
    assert "- cyclic vs initial on PSNR (dB): 24.50 vs 25.00, within noise" in md
    assert "- `bicubic`: x absent" in md and "- cyclic is worse than initial on AUC" in md and "- a note" in md


def test_best_must_beat_every_other_method_and_ties_share_it():
    from eval.report import _comparisons

    rng = np.random.default_rng(0)
    base = rng.normal(0, 0.3, 1000)  # identity-level noise shared by all methods (paired resamples)
    samples = {"bicubic": {"psnr": 24.0 + base}, "initial": {"psnr": 25.5 + base},
               "initial_ft": {"psnr": 25.5 + base},  # the same DSR images: identical in every resample
               "cyclic": {"psnr": 25.0 + base + rng.normal(0, 0.05, 1000)}}
    table = {m: {"psnr": float(np.median(s["psnr"]))} for m, s in samples.items()}
    table["initial_ft"]["psnr"] = table["initial"]["psnr"]
    comparisons, best = _comparisons(table, samples)
    b = best["psnr"]
    assert b["bold"] and {b["method"], *b["tied"]} == {"initial", "initial_ft"} and b["vs"] == "cyclic"
    assert comparisons["initial_ft vs initial"]["psnr"]["verdict"] == "within noise"
    assert comparisons["initial vs bicubic"]["psnr"]["verdict"] == "better"
    assert comparisons["cyclic vs initial"]["psnr"]["verdict"] == "worse"
    # a 2nd cycle 0.01 dB better, with per-resample noise of 0.05 dB: best, but within noise -> not bold
    samples["cyclic2"] = {"psnr": 25.51 + base + rng.normal(0, 0.05, 1000)}
    table["cyclic2"] = {"psnr": table["initial"]["psnr"] + 0.01}
    _, best = _comparisons(table, samples)
    assert best["psnr"]["method"] == "cyclic2" and not best["psnr"]["bold"]
    assert best["psnr"]["verdict"] == "within noise" and best["psnr"]["vs"] in ("initial", "initial_ft")


def test_score_method_100k_pairs_in_seconds():
    rng = np.random.default_rng(0)
    ids, per, dim = 2000, 10, 512
    labels = np.repeat(np.arange(ids), per)
    centers = rng.standard_normal((ids, dim)).astype(np.float32)
    hr = centers[labels] + 0.8 * rng.standard_normal((labels.size, dim)).astype(np.float32)
    sr = hr + 1.0 * rng.standard_normal(hr.shape).astype(np.float32)
    ia, ib, same = balanced_pairs(labels, 100_000, 0)
    gallery = np.arange(0, labels.size, per)
    probes = np.setdiff1d(np.arange(labels.size), gallery)
    t0 = time.perf_counter()
    m, curves = score_method(sr, hr, labels, ia, ib, same, gallery_idx=gallery, probe_idx=probes)
    dt = time.perf_counter() - t0
    assert dt < 10, f"100k pairs took {dt:.1f} s"
    scores = pair_scores_indexed(sr, ia, ib, emb_b=hr)
    assert m["auc"] == pytest.approx(roc_auc_score(same, scores), abs=1e-9)
    assert m["num_genuine"] == m["num_impostor"] == 50_000 and 0.5 < m["accuracy"] <= 1
    assert np.isfinite(m["tar@far=1e-4"]) and curves["cmc"].size == ids and curves["cmc"][-1] == 1.0


def test_score_method_bootstrap_6000_pairs_fast_and_paired():
    """The demo's size: 6,000 pairs of 60 identities, 1000 resamples of the identities."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(60), 14)
    centers = rng.standard_normal((60, 512)).astype(np.float32)
    hr = centers[labels] + 2.5 * rng.standard_normal((labels.size, 512)).astype(np.float32)
    sr = hr + 2.5 * rng.standard_normal(hr.shape).astype(np.float32)
    worse = sr + 3.0 * rng.standard_normal(hr.shape).astype(np.float32)
    ia, ib, same, fold = balanced_fold_pairs(labels, 6000, 0)
    gallery, probes = identification_split(labels, 0)
    counts = identity_resamples(60, 1000, seed=0)
    kw = dict(fold_ids=fold, gallery_idx=gallery, probe_idx=probes, resamples=counts)
    score_method(sr, hr, labels, ia, ib, same, **kw)  # warm-up
    t0 = time.perf_counter()
    m, curves = score_method(sr, hr, labels, ia, ib, same, **kw)
    dt = time.perf_counter() - t0
    assert dt < 6, f"bootstrap of 6000 pairs took {dt:.1f} s"  # ~0.3 s on an idle 2-core CPU (make bench)
    for k in ("auc", "eer", "tar@far=1e-2", "accuracy", "d_prime", "rank1", "rank20"):
        lo, hi = m[k + "_ci95"]
        assert lo < m[k] < hi or lo == m[k] == hi, k
        assert curves["bootstrap"][k].shape == (1000,)
    assert 0.005 < m["auc_ci95"][1] - m["auc_ci95"][0] < 0.05  # identity-level noise of 60 identities
    # the same resamples for another method: paired differences
    m2, c2 = score_method(worse, hr, labels, ia, ib, same, **kw)
    d = paired_difference(curves["bootstrap"]["auc"], c2["bootstrap"]["auc"], m["auc"], m2["auc"])
    assert d["verdict"] == "better" and d["diff"] == pytest.approx(m["auc"] - m2["auc"]) and d["ci95"][0] > 0
    same_method = paired_difference(curves["bootstrap"]["auc"], curves["bootstrap"]["auc"], m["auc"], m["auc"])
    assert same_method == {"diff": 0.0, "ci95": [0.0, 0.0], "verdict": "within noise"}


def test_single_fold_pairs_skip_accuracy_with_a_note():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((20, 8))
    labels = np.repeat(np.arange(10), 2)
    ia, ib, same = balanced_pairs(labels, 20, 0)
    m, _ = score_method(emb, emb, labels, ia, ib, same, fold_ids=np.zeros(ia.size, int))
    assert np.isnan(m["accuracy"]) and np.isfinite(m["auc"])
    assert any("single fold" in n for n in m["notes"])


# ------------------------------------------------------------------------------------ LFW pairs.txt


def _lfw_case(tmp_path, pairs_per_fold: int = 2, missing: bool = False, corrupt: bool = False):
    """8 identities x 3 tiny non-square images in LFW layout; a '10 N' pairs.txt over them."""
    rng = np.random.default_rng(1)
    root = tmp_path / "lfw"
    names = [f"Person_{k}" for k in range(8)]
    for k, name in enumerate(names):
        (root / name).mkdir(parents=True)
        base = rng.integers(0, 255, (1, 1, 3))
        for i in range(1, 4):
            img = np.clip(base + rng.integers(-40, 40, (48, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{name}_{i:04d}.png")
    lines = [f"10 {pairs_per_fold}"]
    for f in range(10):
        for p in range(pairs_per_fold):
            n = names[(f + p) % 8]
            lines.append(f"{n} {1 + p % 3} {1 + (p + 1) % 3}")
        for p in range(pairs_per_fold):
            a, b = names[(f + p) % 8], names[(f + p + 3) % 8]
            lines.append(f"{a} {1 + f % 3} {b} {1 + p % 3}")
    if missing:
        lines[1] = f"{names[0]} 1 9"  # Person_0_0009 does not exist
    if corrupt:
        (root / names[5] / f"{names[5]}_0004.png").write_bytes(b"not a png")
        lines[-1] = f"{names[1]} 1 {names[5]} 4"
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    return root, tmp_path / "pairs.txt"


def _lfw_cfg(tmp_path, root, pairs, *extra):
    cfg = compose_train(["experiment=smoke", "device=cpu", "data=folder", f"data.root={root}",
                         f"eval.pairs_file={pairs}", *extra], tmp_path)
    with open_dict(cfg):
        cfg.eval.figures = False
    return cfg


def test_lfw_pairs_end_to_end_10_folds(tmp_path, edgeface_payloads):
    root, pairs = _lfw_case(tmp_path)
    cfg = _lfw_cfg(tmp_path, root, pairs)
    publish(cfg, edgeface_payloads, names=("edgeface_pretrained",))
    flat = evaluate(cfg, tmp_path / "eval", ["16"])
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert res["protocol"]["kind"] == "lfw" and res["protocol"]["num_folds"] == 10
    assert res["protocol"]["num_pairs"] == 40 and res["protocol"]["num_genuine"] == 20
    assert set(res["16"]) == {"hr", "bicubic"} and "bicubic/accuracy" in flat

    # the hr row reproduced by hand: images read like the folder data, EdgeFace, 10-fold with LFW folds
    from eval.pairs_file import load_lfw_pairs
    lp = load_lfw_pairs(pairs, root)
    hr = torch.from_numpy(np.stack([load_image(p, 112, "resize") for p in lp.paths])).permute(0, 3, 1, 2) / 255.0
    ef = edgeface.load(ArtifactStore.for_config(cfg).path("edgeface_pretrained"))
    with torch.no_grad():
        scores = pair_scores_indexed(ef(hr).numpy(), lp.idx_a, lp.idx_b)
    acc, std, _ = kfold_accuracy(scores, lp.is_same, fold_ids=lp.fold)
    assert res["16"]["hr"]["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert res["16"]["hr"]["accuracy_std"] == pytest.approx(std, abs=1e-12)
    assert res["16"]["hr"]["auc"] == pytest.approx(roc_auc_score(lp.is_same, scores), abs=1e-6)
    assert "LFW-format" in (tmp_path / "eval" / "report.md").read_text()


def test_one_fold_pairs_file_skips_accuracy_with_a_note(tmp_path, edgeface_payloads):
    root, _ = _lfw_case(tmp_path)
    lines = ["4"] + [f"Person_{k} 1 2" for k in range(4)] + [f"Person_{k} 1 Person_{k + 4} 3" for k in range(4)]
    (tmp_path / "devtest.txt").write_text("\n".join(lines) + "\n")  # pairsDevTest.txt layout: one fold
    cfg = _lfw_cfg(tmp_path, root, tmp_path / "devtest.txt")
    publish(cfg, edgeface_payloads, names=("edgeface_pretrained",))
    evaluate(cfg, tmp_path / "eval", ["16"])
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert res["protocol"]["num_folds"] == 1 and res["16"]["hr"]["accuracy"] is None
    assert res["16"]["hr"]["auc"] is not None and res["16"]["hr"]["auc_ci95"] is not None
    assert any("accuracy not computed: the pairs form a single fold" in n for n in res["notes"])
    assert "one fold, so no k-fold accuracy" in (tmp_path / "eval" / "report.md").read_text()


def test_lfw_missing_and_unreadable_images(tmp_path, edgeface_payloads):
    root, pairs = _lfw_case(tmp_path, missing=True, corrupt=True)
    cfg = _lfw_cfg(tmp_path, root, pairs)
    publish(cfg, edgeface_payloads, names=("edgeface_pretrained",))
    with pytest.raises(MissingImagesError, match="Person_0_0009.*allow_missing"):
        evaluate(cfg, tmp_path / "a", ["16"])
    with open_dict(cfg):
        cfg.eval.allow_missing = True
    evaluate(cfg, tmp_path / "b", ["16"])
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    assert res["protocol"]["num_pairs"] == 38 and res["protocol"]["num_dropped"] == 2
    assert any("missing" in n for n in res["notes"]) and any("unreadable" in n for n in res["notes"])
    assert res["16"]["hr"]["num_genuine"] == 19 and res["16"]["hr"]["num_impostor"] == 19
    assert res["protocol"]["num_images"] == 24  # 26 named, 1 missing, 1 unreadable: in no pair, no gallery

    (root / "Person_0" / "Person_0_0009.png").write_bytes((root / "Person_0" / "Person_0_0001.png").read_bytes())
    with open_dict(cfg):
        cfg.eval.allow_missing = False
    with pytest.raises(EvaluationError, match="could not be read.*Person_5_0004.*allow_missing=true"):
        evaluate(cfg, tmp_path / "c", ["16"])


def test_pairs_file_needs_an_image_folder(tmp_path):
    cfg = compose_train(["experiment=smoke", "device=cpu", "eval.pairs_file=pairs.txt"], tmp_path)
    with pytest.raises(EvaluationError, match="data=folder data.root=DIR"):
        evaluate(cfg, tmp_path, ["16"])


# ------------------------------------------------------------------------------------ python -m eval


def test_argv_translation_and_composition(tmp_path):
    from eval.__main__ import UsageError, translate_argv

    argv = translate_argv(["res=16,24,32", "experiment=smoke"])
    assert argv[-2:] == ["eval.resolutions=[16,24,32]", "experiment=smoke"]
    assert any(a.startswith("hydra.run.dir=${paths.output_dir}/${name}/eval/${now:") for a in argv)
    assert translate_argv(["res=[24, 32]"])[-1] == "eval.resolutions=[24,32]"
    assert translate_argv(["res=32"])[-1] == "res=32"  # a single value stays Hydra's typed key
    assert translate_argv(["-m", "res=16,24"])[-2:] == ["-m", "res=16,24"]  # multirun: one job each
    assert "hydra.run.dir=x" in translate_argv(["hydra.run.dir=x"]) and sum(
        a.startswith("hydra.run.dir") for a in translate_argv(["hydra.run.dir=x"])) == 1
    with pytest.raises(UsageError, match="20.*16, 24, 32"):
        translate_argv(["res=16,20"])

    overrides = [a for a in argv if not a.startswith("hydra.")]
    cfg = compose_train(overrides, tmp_path, return_hydra_config=True)
    assert list(cfg.eval.resolutions) == [16, 24, 32] and cfg.name == "smoke"
    from eval.report import _resolutions
    assert _resolutions(cfg, None) == ["16", "24", "32"]
    assert _resolutions(compose_train(["res=24"], tmp_path), None) == ["24"]


def _run_eval(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "eval", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_cli_rejects_bad_resolution_with_a_message():
    p = _run_eval("res=16,20")
    assert p.returncode == 2 and "16, 24, 32" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_cli_evaluates_several_resolutions(tmp_path, edgeface_payloads):
    cfg = compose_train(["experiment=smoke", "device=cpu"], tmp_path)
    for res in ("16", "24"):
        publish(cfg, edgeface_payloads, res=res, names=("edgeface_pretrained", "dsr_initial"))
    p = _run_eval("res=16,24", "experiment=smoke", "device=cpu", f"paths.output_dir={tmp_path}/outputs",
                  f"paths.artifacts_dir={tmp_path}/artifacts", f"paths.cache_dir={_SESSION_CACHE}",
                  "eval.figure_formats=[png]")
    assert p.returncode == 0, p.stderr[-3000:]
    report = [line for line in p.stdout.splitlines() if line.startswith("report: ")]
    assert len(report) == 1
    path = report[0].split(": ", 1)[1]
    run_dir = (tmp_path / "outputs" / "smoke" / "eval").resolve()
    assert str(run_dir) in path and path.endswith("report.md")
    res = json.loads((run_dir.glob("*/results.json").__next__()).read_text())
    assert set(res["16"]) == set(res["24"]) == {"hr", "bicubic", "initial"}
    assert res["config"]["eval"]["resolutions"] == [16, 24]
    assert res["16"]["hr"]["auc"] == pytest.approx(res["24"]["hr"]["auc"])  # HR does not depend on res
    assert res["16"]["bicubic"]["psnr"] < res["24"]["bicubic"]["psnr"]  # more pixels, better bicubic
    figs = {f.name for f in (run_dir.glob("*/figures")).__next__().iterdir()}
    assert {"res16_roc.png", "res24_samples.png", "resolutions.png"} <= figs
    md = (run_dir.glob("*/report.md")).__next__().read_text()
    across = md.split("## Across resolutions")[1]
    assert "| method | PSNR (dB) @16 | PSNR (dB) @24 |" in across and "| bicubic |" in across
    assert "figures/resolutions.png" in across

    p = _run_eval("res=16,24", "experiment=smoke", "device=cpu", f"paths.output_dir={tmp_path}/o2",
                  f"paths.artifacts_dir={tmp_path}/none", f"paths.cache_dir={_SESSION_CACHE}")
    assert p.returncode == 1 and "no method could be evaluated" in p.stderr and "Traceback" not in p.stderr


# ------------------------------------------------------------------------------------ the independent judge


@pytest.mark.slow
def test_dlib_judge_recognises_orl_faces_at_hr(tmp_path):
    """dlib's descriptor on the bundled ORL faces (central square crop): HR AUC about 0.93, as documented."""
    from eval.judge import build_judge
    from eval.metrics import verification_metrics

    judge = build_judge("dlib")
    root = ROOT / "data" / "orl_faces"
    files = sorted(root.glob("s*/*.pgm"))
    faces = torch.from_numpy(np.stack([load_image(f, 112, "center_crop") for f in files])).permute(0, 3, 1, 2) / 255.0
    labels = np.array([f.parent.name for f in files])
    emb = judge.embed(faces)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    scores = emb @ emb.T
    iu = np.triu_indices(len(files), 1)
    same = (labels[:, None] == labels[None])[iu]
    auc = verification_metrics(scores[iu][same], scores[iu][~same])["auc"]
    assert auc >= 0.90, auc
    # through the report: judge columns beside the EdgeFace ones, the same pairs
    cfg = compose_train(["data=orl", "device=cpu", "logger=none", "eval.judge=dlib", "eval.bootstrap=0",
                         "eval.num_pairs=200"], tmp_path)
    publish(cfg, make_edgeface_payloads(), names=("edgeface_pretrained",))
    evaluate(cfg, tmp_path / "ev", ["16"])
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert 0.5 < res["16"]["hr"]["judge_auc"] <= 1 and "judge_rank1" in res["16"]["bicubic"]
    assert "judge AUC" in (tmp_path / "ev" / "report.md").read_text()


def test_judge_without_the_extra_fails_at_start_with_the_install_command(smoke, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_dlib(name, *a, **k):
        if name == "dlib":
            raise ImportError("No module named 'dlib'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_dlib)
    with open_dict(smoke):
        smoke.eval.judge = "dlib"
    with pytest.raises(EvaluationError, match=r'pip install -e "\.\[judge\]"'):
        evaluate(smoke, tmp_path / "ev", ["16"])
    assert not (tmp_path / "ev" / "results.json").exists()


def test_regressions_within_the_sampling_noise_are_not_warned(caplog):
    from eval.metrics import sampling_noise

    table = {"initial": {"psnr": 25.0, "auc": 0.9302}, "cyclic": {"psnr": 24.5, "auc": 0.9300}}
    assert math.isclose(sampling_noise(6000), 0.0129, abs_tol=1e-4)
    assert regressions(table) == ["cyclic is worse than initial on AUC (0.9300 vs 0.9302)",
                                  "cyclic is worse than initial on PSNR (dB) (24.50 vs 25.00)"]
    # PSNR is a per-image average, not a pair rate: the noise margin does not apply to it
    assert regressions(table, noise=sampling_noise(6000)) == ["cyclic is worse than initial on PSNR (dB) "
                                                              "(24.50 vs 25.00)"]
