"""eval.bins: insightface .bin verification sets built here from the bundled ORL faces, loaded safely, scored."""
from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import _SESSION_CACHE, ROOT, compose_train
from omegaconf import open_dict
from PIL import Image
from sklearn.metrics import roc_auc_score
from test_eval_report import make_edgeface_payloads, publish

import edgeface
from cycle.artifacts import ArtifactStore
from cycle.data import load_image
from eval.bins import bin_protocol, kfold_ids, load_bin
from eval.errors import EvaluationError
from eval.metrics import kfold_accuracy, pair_scores_indexed
from eval.report import evaluate

ORL = ROOT / "data" / "orl_faces"


def orl_pairs(n: int = 20):
    """n pairs alternating genuine / impostor, as (PNG bytes of 2n images, is-same list)."""
    images, same = [], []
    for i in range(n):
        a, genuine = i % 40 + 1, i % 2 == 0
        b = a if genuine else (a % 40) + 1
        for s, j in ((a, i % 10 + 1), (b, (i + 3) % 10 + 1)):
            buf = io.BytesIO()
            Image.fromarray(load_image(ORL / f"s{s}" / f"{j}.pgm", 112, "center_crop")).save(buf, format="PNG")
            images.append(buf.getvalue())
        same.append(genuine)
    return images, same


def write_bin(path, images, same, protocol: int = 2):
    path.write_bytes(pickle.dumps((images, same), protocol=protocol))
    return path


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_load_bin_round_trip_list_and_numpy_issame(tmp_path):
    images, same = orl_pairs(20)
    got, is_same = load_bin(write_bin(tmp_path / "lfw.bin", images, same))  # protocol 2, as the Python 2 files
    assert got == images and is_same.dtype == bool and is_same.tolist() == same
    got, is_same = load_bin(write_bin(tmp_path / "cfp.bin", images, np.array(same), protocol=5))
    assert got == images and is_same.tolist() == same
    arrays = [np.frombuffer(b, np.uint8) for b in images]  # some packers store uint8 arrays
    assert load_bin(write_bin(tmp_path / "arr.bin", arrays, same, protocol=4))[0] == images
    proto = bin_protocol(tmp_path / "lfw.bin", folds=10)
    assert proto.idx_a.tolist() == list(range(0, 40, 2)) and proto.idx_b.tolist() == list(range(1, 40, 2))
    assert proto.fold.tolist() == np.repeat(np.arange(10), 2).tolist()
    assert kfold_ids(13, 10).tolist() == [0, 0, 1, 1, 2, 2, 3, 4, 5, 6, 7, 8, 9]  # sklearn KFold's sizes
    assert np.array_equal(proto.faces.images[3], np.asarray(Image.open(io.BytesIO(images[3])).convert("RGB")))


def test_crafted_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps(([_Evil(marker)], [True]), protocol=2))
    with pytest.raises(EvaluationError, match=r"evil\.bin is not an insightface \.bin set: it references "
                                              r"(posix|os|nt)\.system.*nothing in it was run"):
        load_bin(evil)
    evil.write_bytes(pickle.dumps((eval, [True])))
    with pytest.raises(EvaluationError, match=r"references builtins\.eval"):
        load_bin(evil)
    assert not marker.exists()
    bad = tmp_path / "bad.bin"
    bad.write_bytes(pickle.dumps((["not bytes"] * 2, [True])))
    with pytest.raises(EvaluationError, match="expected encoded image bytes"):
        load_bin(bad)
    bad.write_bytes(pickle.dumps(([b"x"] * 3, [True])))
    with pytest.raises(EvaluationError, match="3 images for 1 pairs"):
        load_bin(bad)
    bad.write_bytes(b"\x80\x02(")
    with pytest.raises(EvaluationError, match="not a readable insightface .bin"):
        load_bin(bad)

    # the command line: a clear message, exit 1, nothing run
    evil.write_bytes(pickle.dumps(([_Evil(marker)], [True]), protocol=2))
    r = subprocess.run([sys.executable, "-m", "eval", f"eval.bins=[{evil}]", "res=16", "device=cpu",
                        f"paths.output_dir={tmp_path}/out", f"paths.cache_dir={_SESSION_CACHE}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "not an insightface .bin set" in r.stderr, r.stderr[-2000:]
    assert not marker.exists()


@pytest.mark.slow  # ~30 s: EdgeFace init, the main protocol and two sets
def test_evaluate_bins_every_method_per_set(tmp_path):
    images, same = orl_pairs(20)
    lfw = write_bin(tmp_path / "lfw.bin", images, same)
    cfp = write_bin(tmp_path / "cfp_fp.bin", images[:20], np.array(same[:10]), protocol=4)
    cfg = compose_train(["experiment=smoke", "device=cpu", f"eval.bins=[{lfw},{cfp}]"], tmp_path)
    with open_dict(cfg):
        cfg.paths.cache_dir = str(_SESSION_CACHE)
        cfg.eval.figures = False
    publish(cfg, make_edgeface_payloads(), names=("edgeface_pretrained",))
    evaluate(cfg, tmp_path / "eval", ["16"])
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert set(res["bins"]) == {"lfw", "cfp_fp"} and set(res["bins"]["lfw"]["16"]) == {"hr", "bicubic"}
    assert res["bins_protocol"]["cfp_fp"]["num_pairs"] == 10 and res["bins_protocol"]["lfw"]["num_folds"] == 10
    bic = res["bins"]["lfw"]["16"]["bicubic"]
    assert 0 <= bic["accuracy"] <= 1 and "psnr" in bic and "rank1" not in bic

    # the hr row by hand: images 2i vs 2i+1, EdgeFace, 10 folds of consecutive pairs
    hr = torch.stack([torch.from_numpy(np.array(Image.open(io.BytesIO(b)).convert("RGB"))) for b in images])
    ef = edgeface.load(ArtifactStore.for_config(cfg).path("edgeface_pretrained"))
    with torch.no_grad():
        emb = ef(hr.permute(0, 3, 1, 2).float() / 255).numpy()
    scores = pair_scores_indexed(emb, np.arange(0, 40, 2), np.arange(1, 40, 2))
    acc, std, _ = kfold_accuracy(scores, np.array(same), fold_ids=kfold_ids(20, 10))
    assert res["bins"]["lfw"]["16"]["hr"]["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert res["bins"]["lfw"]["16"]["hr"]["auc"] == pytest.approx(roc_auc_score(same, scores), abs=1e-6)
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "## insightface verification sets (.bin)" in md and "### lfw, 16x16 px (20 pairs, 10 genuine)" in md
    assert "The first image of each pair is the VLR probe" in md and "| bicubic |" in md
