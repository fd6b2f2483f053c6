"""eval.metrics against scikit-image / scikit-learn and against hand-computed cases."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from skimage.metrics import peak_signal_noise_ratio as sk_psnr
from skimage.metrics import structural_similarity as sk_ssim
from sklearn.metrics import roc_auc_score, roc_curve

from eval.metrics import (
    far_key,
    identification,
    kfold_accuracy,
    pair_scores,
    pair_scores_indexed,
    psnr,
    rank_accuracy,
    rgb_to_y,
    roc,
    ssim,
    verification_metrics,
)

SK_SSIM = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)


def _pair(shape=(3, 3, 29, 37), noise=0.08, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random(shape)
    return x, np.clip(x + noise * rng.standard_normal(shape), 0, 1)


# ---------------------------------------------------------------------------------------- PSNR


def test_psnr_matches_skimage_numpy_and_torch():
    x, y = _pair()
    ref = [sk_psnr(x[i], y[i], data_range=1.0) for i in range(len(x))]
    np.testing.assert_allclose(psnr(x, y), ref, rtol=1e-12)
    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y).float()
    ref32 = [sk_psnr(xt[i].double().numpy(), yt[i].double().numpy(), data_range=1.0) for i in range(len(x))]
    np.testing.assert_allclose(psnr(xt, yt), ref32, rtol=1e-12)
    # crop_border and another data range
    ref_c = [sk_psnr(2 * x[i, :, 4:-4, 4:-4], 2 * y[i, :, 4:-4, 4:-4], data_range=2.0) for i in range(len(x))]
    np.testing.assert_allclose(psnr(2 * x, 2 * y, data_range=2.0, crop_border=4), ref_c, rtol=1e-12)


def test_psnr_known_mse_and_identical():
    x = np.zeros((2, 3, 8, 8))
    y = x.copy()
    y[0] += 0.1  # MSE 0.01 -> 20 dB
    y[1, :, :4] = 0.2  # half the pixels off by 0.2: MSE 0.02 -> 10 log10(50) dB
    np.testing.assert_allclose(psnr(x, y), [20.0, 10 * math.log10(50)], rtol=1e-12)
    assert psnr(x, x).tolist() == [math.inf, math.inf]
    assert psnr(x[0], y[0]).shape == (1,)  # a single (C, H, W) image is a batch of one


def test_uint8_is_converted_not_wrapped():
    x = np.full((1, 3, 16, 16), 10, np.uint8)
    y = np.full((1, 3, 16, 16), 250, np.uint8)
    # uint8 arithmetic would give |10 - 250| = 16 (wrapped) -> 23.98 dB; the truth is 240.
    assert psnr(x, y, data_range=255)[0] == pytest.approx(20 * math.log10(255 / 240), rel=1e-12)
    xr, yr = _pair(seed=3)
    xu, yu = (xr * 255).round().astype(np.uint8), (yr * 255).round().astype(np.uint8)
    ref = [sk_psnr(xu[i], yu[i], data_range=255) for i in range(len(xu))]  # skimage casts to float
    np.testing.assert_allclose(psnr(xu, yu, data_range=255), ref, rtol=1e-12)
    np.testing.assert_allclose(ssim(xu, yu, data_range=255), ssim(xu / 255.0, yu / 255.0), atol=1e-12)
    xut, yut = torch.from_numpy(xu), torch.from_numpy(yu)
    np.testing.assert_allclose(psnr(xut, yut, data_range=255), ref, rtol=1e-12)
    with pytest.raises(ValueError, match="data_range=255"):
        psnr(xu, yu)  # uint8 with the default data_range=1.0 is a bug
    with pytest.raises(ValueError, match="data_range=255"):
        ssim(xu, yu)


def test_bad_shapes_rejected():
    x, y = _pair()
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(x, y[:, :, :-1])
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x[..., :10, :10], y[..., :10, :10])
    with pytest.raises(ValueError, match="3 channels"):
        psnr(x[:, :1], y[:, :1], y_channel=True)


# ---------------------------------------------------------------------------------------- SSIM


def test_ssim_matches_skimage():
    x, y = _pair()
    ref = [sk_ssim(x[i], y[i], channel_axis=0, data_range=1.0, **SK_SSIM) for i in range(len(x))]
    np.testing.assert_allclose(ssim(x, y), ref, rtol=0, atol=1e-12)
    ref_c = [sk_ssim(x[i, :, 3:-3, 3:-3], y[i, :, 3:-3, 3:-3], channel_axis=0, data_range=1.0, **SK_SSIM)
             for i in range(len(x))]
    ours = ssim(torch.from_numpy(x), torch.from_numpy(y), crop_border=3)
    np.testing.assert_allclose(ours, ref_c, atol=1e-12)
    # float32 torch input is evaluated in float64 (compare with skimage on the same values in float64)
    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y).float()
    x64, y64 = xt.double().numpy(), yt.double().numpy()
    ref32 = [sk_ssim(x64[i], y64[i], channel_axis=0, data_range=1.0, **SK_SSIM) for i in range(len(x))]
    np.testing.assert_allclose(ssim(xt, yt), ref32, atol=1e-12)


def test_ssim_identical_is_one_and_batch_chunking_consistent():
    x, y = _pair(shape=(40, 3, 24, 24), seed=1)
    np.testing.assert_allclose(ssim(x, x), 1.0, atol=1e-12)
    # 40 images span several internal chunks; results must not depend on batch position
    full = ssim(x, y)
    np.testing.assert_allclose(full[[0, 17, 39]], ssim(x[[0, 17, 39]], y[[0, 17, 39]]), atol=1e-15)


def test_accelerator_path_same_arithmetic_in_torch(monkeypatch):
    # Accelerator tensors stay in torch; CPU data runs in numpy. Force the torch path on CPU.
    import eval.metrics as M

    x, y = _pair()
    ref_s, ref_p = ssim(x, y, y_channel=True), psnr(x, y, crop_border=2)
    as_batch = M._as_image_batch
    monkeypatch.setattr(M, "_as_image_batch", lambda a, *args: torch.as_tensor(as_batch(a, *args)))
    np.testing.assert_allclose(M.ssim(x, y, y_channel=True), ref_s, atol=1e-14)
    np.testing.assert_allclose(M.psnr(x, y, crop_border=2), ref_p, rtol=1e-14)


def test_low_precision_tensors_accepted():
    x, y = _pair()
    xb, yb = torch.from_numpy(x).bfloat16(), torch.from_numpy(y).bfloat16()
    ref = [sk_psnr(xb[i].double().numpy(), yb[i].double().numpy(), data_range=1.0) for i in range(len(x))]
    np.testing.assert_allclose(psnr(xb, yb), ref, rtol=1e-12)


def _basicsr_y(img_chw):
    """Y on 0..255 as BasicSR's to_y_channel: BGR [0,1] . (24.966, 128.553, 65.481) + 16."""
    bgr = np.moveaxis(img_chw, 0, -1)[..., ::-1]
    return bgr @ np.array([24.966, 128.553, 65.481]) + 16.0


def test_y_channel_matches_basicsr_convention():
    white, black = torch.ones(1, 3, 1, 1, dtype=torch.float64), torch.zeros(1, 3, 1, 1, dtype=torch.float64)
    assert rgb_to_y(white).item() == pytest.approx(235 / 255, abs=1e-12)  # studio range top
    assert rgb_to_y(black).item() == pytest.approx(16 / 255, abs=1e-12)
    x, y = _pair()
    ref_psnr, ref_ssim = [], []
    for i in range(len(x)):
        yx, yy = _basicsr_y(x[i]), _basicsr_y(y[i])
        ref_psnr.append(20 * math.log10(255.0 / math.sqrt(np.mean((yx - yy) ** 2))))
        ref_ssim.append(sk_ssim(yx, yy, data_range=255.0, **SK_SSIM))
    np.testing.assert_allclose(psnr(x, y, y_channel=True), ref_psnr, rtol=1e-12)
    np.testing.assert_allclose(ssim(x, y, y_channel=True), ref_ssim, atol=1e-12)
    # data_range only rescales the input: same Y metrics for 0..255 floats
    np.testing.assert_allclose(psnr(255 * x, 255 * y, data_range=255, y_channel=True), ref_psnr, rtol=1e-12)


# ---------------------------------------------------------------------------------------- verification


def _labels_scores(gen, imp):
    return np.r_[np.ones(len(gen)), np.zeros(len(imp))], np.r_[gen, imp]


@pytest.mark.parametrize("rounded", [False, True])
def test_roc_and_auc_match_sklearn(rounded):
    rng = np.random.default_rng(7)
    gen, imp = rng.normal(0.6, 0.2, 700), rng.normal(0.1, 0.2, 2500)
    if rounded:  # many ties
        gen, imp = gen.round(2), imp.round(2)
    far, tar, thr = roc(gen, imp)
    y, s = _labels_scores(gen, imp)
    f2, t2, th2 = roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_array_equal(far, f2)
    np.testing.assert_array_equal(tar, t2)
    np.testing.assert_array_equal(thr, th2)
    m = verification_metrics(gen, imp)
    assert m["auc"] == pytest.approx(roc_auc_score(y, s), rel=1e-12)
    # EER = the usual brentq/interp recipe on the ROC
    eer_ref = brentq(lambda t: 1.0 - t - np.interp(t, f2, t2), 0.0, 1.0, xtol=1e-15)
    assert m["eer"] == pytest.approx(eer_ref, abs=1e-9)
    # TAR@FAR by brute force: best TAR over thresholds whose FAR <= target
    for target in (1e-3, 1e-2, 1e-1):
        cand = np.r_[np.unique(s), np.inf]
        fars = (imp[None, :] >= cand[:, None]).mean(1)
        tars = (gen[None, :] >= cand[:, None]).mean(1)
        assert m[far_key(target)] == pytest.approx(tars[fars <= target].max(), abs=0)
    assert m["num_genuine"] == 700 and m["num_impostor"] == 2500
    assert m["genuine_mean"] == pytest.approx(gen.mean()) and m["impostor_std"] == pytest.approx(imp.std())


def test_perfect_separation():
    gen = np.linspace(0.7, 0.9, 20)
    imp = np.linspace(-0.5, 0.3, 100)
    m = verification_metrics(gen, imp)
    assert m["auc"] == 1.0 and m["eer"] == 0.0
    assert m["eer_threshold"] == pytest.approx(0.7)  # lowest threshold with no error
    assert m["tar@far=1e-2"] == 1.0 and m["tar@far=1e-1"] == 1.0
    assert math.isnan(m["tar@far=1e-3"]) and math.isnan(m["tar@far=1e-4"])  # 100 impostors are too few
    assert len(m["notes"]) == 2 and "needs >= 1000 impostor scores, have 100" in m["notes"][1]


def test_identical_distributions():
    s = np.linspace(0, 1, 101)
    m = verification_metrics(s, s)
    assert m["auc"] == pytest.approx(0.5, abs=1e-12)
    assert m["eer"] == pytest.approx(0.5, abs=1e-12)
    assert m["d_prime"] == 0.0
    rng = np.random.default_rng(0)  # large random samples of one distribution: chance level
    m = verification_metrics(rng.random(20000), rng.random(20000))
    assert abs(m["auc"] - 0.5) < 0.01 and abs(m["eer"] - 0.5) < 0.01


def test_hand_computed_case():
    # Sorted scores: .9G .8G .7G | .6I .5I .45I | .4G | .35I .3I .25I .2I .15I .1I .05I
    gen = [0.9, 0.8, 0.4, 0.7]
    imp = [0.1, 0.5, 0.3, 0.6, 0.2, 0.05, 0.15, 0.25, 0.35, 0.45]
    m = verification_metrics(gen, imp, fars=(1e-2, 1e-1))
    # AUC (Mann-Whitney): .9, .8, .7 beat all 10 impostors, .4 beats 7 -> 37/40
    assert m["auc"] == pytest.approx(37 / 40, abs=1e-12)
    # thr .5: FAR .2, FNR .25; thr .45: FAR .3, FNR .25 -> FNR = FAR = .25 in between
    assert m["eer"] == pytest.approx(0.25, abs=1e-12)
    assert m["eer_threshold"] == 0.45
    # FAR <= 0.1 allows 1 of 10 impostors: threshold .6 accepts .9 .8 .7 (and impostor .6)
    assert m["tar@far=1e-1"] == 0.75 and m["threshold@far=1e-1"] == 0.6
    assert math.isnan(m["tar@far=1e-2"]) and m["notes"] == [
        "tar@far=1e-2 is NaN: needs >= 100 impostor scores, have 10"
    ]
    assert verification_metrics([1.0, 3.0], [-1.0, 1.0])["d_prime"] == pytest.approx(2.0)  # 2 / sqrt(1)


def test_far_reachable_at_exact_impostor_count():
    gen = np.full(5, 0.9)
    imp = np.r_[0.95, np.zeros(9)]  # exactly 10 impostors: FAR 0.1 reachable, accepting the 0.95 one
    m = verification_metrics(gen, imp, fars=(0.1,))
    assert m["tar@far=1e-1"] == 1.0 and m["threshold@far=1e-1"] == 0.9 and m["notes"] == []
    assert far_key(0.05) == "tar@far=5e-2" and far_key(1e-4) == "tar@far=1e-4"
    assert far_key(0.015) == "tar@far=0.015"


def test_verification_rejects_bad_scores():
    with pytest.raises(ValueError, match="no scores"):
        verification_metrics([], [0.1])
    with pytest.raises(ValueError, match="NaN"):
        verification_metrics([0.5, np.nan], [0.1])


# ---------------------------------------------------------------------------------------- k-fold


def test_kfold_threshold_comes_from_other_folds_only():
    # fold 0 separates at ~0.45, fold 1 at ~0.725. Tuned on its own fold each would score 100 %;
    # with the other fold's threshold each scores 50 %.
    s = np.array([0.6, 0.7, 0.2, 0.3, 0.9, 0.95, 0.5, 0.55])
    same = np.array([1, 1, 0, 0, 1, 1, 0, 0], bool)
    fold = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    mean, std, thr = kfold_accuracy(s, same, fold_ids=fold)
    assert (mean, std) == (0.5, 0.0)
    np.testing.assert_allclose(thr, [0.725, 0.45])


def _kfold_bruteforce(s, same, fold):
    accs = []
    for f in np.unique(fold):
        tr, te = fold != f, fold == f
        u = np.unique(s[tr])
        cand = np.r_[-np.inf, (u[:-1] + u[1:]) / 2, np.inf]
        acc_tr = [np.mean((s[tr] >= t) == same[tr]) for t in cand]
        t = cand[np.flatnonzero(acc_tr == np.max(acc_tr))[-1]]  # ties -> largest threshold
        accs.append(np.mean((s[te] >= t) == same[te]))
    return np.mean(accs), np.std(accs)


def test_kfold_matches_bruteforce_and_default_folds_are_balanced():
    rng = np.random.default_rng(3)
    same = rng.random(400) < 0.5
    s = np.where(same, rng.normal(0.5, 0.25, 400), rng.normal(0.2, 0.25, 400)).round(2)
    fold = rng.integers(0, 10, 400)
    mean, std, thr = kfold_accuracy(s, same, fold_ids=fold)
    ref = _kfold_bruteforce(s, same, fold)
    assert mean == pytest.approx(ref[0], abs=1e-12) and std == pytest.approx(ref[1], abs=1e-12)
    assert thr.shape == (10,)
    # default: stratified round-robin folds (genuine/impostor counts per fold differ by <= 1)
    same = np.r_[np.ones(100, bool), np.zeros(100, bool)]  # sorted by class on purpose
    s = np.where(same, 0.8, 0.2)
    mean, std, thr = kfold_accuracy(s, same, folds=10)
    assert (mean, std) == (1.0, 0.0) and np.allclose(thr, 0.5)
    with pytest.raises(ValueError, match="at least 2 folds"):
        kfold_accuracy(s, same, fold_ids=np.zeros(200))


# ---------------------------------------------------------------------------------------- embeddings


def test_pair_scores_cosine_and_indexed():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((50, 16)).astype(np.float32)
    ia, ib = rng.integers(0, 50, 300), rng.integers(0, 50, 300)
    norm = np.linalg.norm
    ref = np.array([emb[a] @ emb[b] / norm(emb[a]) / norm(emb[b]) for a, b in zip(ia, ib)])
    np.testing.assert_allclose(pair_scores(emb[ia], emb[ib]), ref, atol=1e-6)
    np.testing.assert_allclose(pair_scores_indexed(emb, ia, ib, chunk=7), ref, atol=1e-6)
    ours = pair_scores_indexed(torch.from_numpy(emb), torch.from_numpy(ia), ib)
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    # cross-domain: side b from another embedding matrix, same indices; scale does not matter
    np.testing.assert_allclose(pair_scores_indexed(emb, ia, ib, emb_b=3 * emb), ref, atol=1e-6)
    assert pair_scores(np.zeros((1, 4)), np.ones((1, 4)))[0] == 0.0  # zero vector: score 0, not NaN
    with pytest.raises(ValueError, match="out of range"):
        pair_scores_indexed(emb, ia, -ib)


def test_identification_hand_case():
    e = np.eye(3)
    gallery, glab = e, np.array(["a", "b", "c"])
    probes = np.array([[1.0, 0.1, 0.0],  # a: own identity best -> rank 1
                       [0.9, 0.5, 0.0],  # b: a scores higher -> rank 2
                       [0.5, 0.4, -1.0]])  # c: a and b higher -> rank 3
    m = identification(gallery, glab, probes, ["a", "b", "c"], ranks=(1, 2, 5))
    assert m["rank1"] == pytest.approx(1 / 3) and m["rank2"] == pytest.approx(2 / 3) and m["rank5"] == 1.0
    np.testing.assert_allclose(m["cmc"], [1 / 3, 2 / 3, 1.0])
    assert m["num_probes"] == 3 and m["num_gallery_ids"] == 3
    # two gallery images for 'b': its best image counts, so the second probe is now rank 1
    m = identification(np.r_[e, [[0.9, 0.6, 0.0]]], ["a", "b", "c", "b"], probes, ["a", "b", "c"], ranks=(1,))
    assert m["rank1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="absent from the gallery"):
        identification(gallery, glab, probes, ["a", "b", "z"])


def test_identification_cmc_monotone_and_ties_are_pessimistic():
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((30, 8))
    glab = np.arange(30)
    plab = rng.integers(0, 30, 200)
    probes = centers[plab] + 1.5 * rng.standard_normal((200, 8))
    m = identification(centers, glab, probes, plab)
    cmc = m["cmc"]
    assert cmc.shape == (30,) and np.all(np.diff(cmc) >= 0) and cmc[-1] == 1.0
    # brute force rank
    c = centers / np.linalg.norm(centers, axis=1, keepdims=True)
    p = probes / np.linalg.norm(probes, axis=1, keepdims=True)
    sim = p @ c.T
    ranks = (sim >= sim[np.arange(200), plab][:, None]).sum(1)
    assert m["rank1"] == np.mean(ranks <= 1) and m["rank5"] == np.mean(ranks <= 5)
    # collapsed embeddings: every identity ties, so nothing is identified at rank 1
    m = identification(np.ones((30, 8)), glab, np.ones((200, 8)), plab)
    assert m["rank1"] == 0.0 and m["cmc"][-1] == 1.0


def test_identification_ties_in_float64():
    # two gallery identities 1e-9 apart in cosine: float32 rounds them to a tie, which would count
    # against the probe (rank 2); in float64 the probe's own identity is strictly closer (rank 1)
    probe = np.array([[1.0, 0.0]])
    eps = 2e-5  # cos(eps) = 1 - 2e-10: equal in float32, distinct in float64
    gallery = np.array([[1.0, eps], [1.0, 2 * eps]])
    m = identification(gallery, [0, 1], probe, [0], ranks=(1,))
    assert np.float32(gallery[0] @ probe[0] / np.linalg.norm(gallery[0])) == np.float32(
        gallery[1] @ probe[0] / np.linalg.norm(gallery[1]))  # the tie float32 would see
    assert m["rank1"] == 1.0


# ---------------------------------------------------------------------------------------- weighted (bootstrap) rows


def _replicate(values, weights):
    return np.repeat(values, weights.astype(int))


def test_weighted_verification_equals_the_replicated_sample():
    """A weight row of counts gives exactly the metrics of the data with each pair repeated that often."""
    rng = np.random.default_rng(5)
    gen, imp = rng.normal(0.5, 0.2, 300).round(3), rng.normal(0.1, 0.2, 1200).round(3)
    w = rng.integers(0, 4, (6, gen.size + imp.size)).astype(float)
    rows = verification_metrics(gen, imp, weights=w)
    for r in range(w.shape[0]):
        ref = verification_metrics(_replicate(gen, w[r, :300]), _replicate(imp, w[r, 300:]))
        for k in ("auc", "eer", "tar@far=1e-2", "tar@far=1e-1", "d_prime",
                  "genuine_mean", "impostor_std"):
            assert rows[k][r] == pytest.approx(ref[k], rel=1e-12, abs=1e-12), k
        assert np.isnan(rows["tar@far=1e-4"][r])  # fewer than 10,000 impostors in every row
    ones = verification_metrics(gen, imp, weights=np.ones((1, 1500)))
    assert ones["auc"][0] == verification_metrics(gen, imp)["auc"]
    empty = verification_metrics(gen, imp, weights=np.c_[np.zeros((1, 300)), np.ones((1, 1200))])
    assert np.isnan(empty["auc"][0]) and np.isnan(empty["eer"][0])  # a resample without genuine pairs
    with pytest.raises(ValueError, match="expected shape"):
        verification_metrics(gen, imp, weights=np.ones((2, 10)))


def test_weighted_kfold_and_ranks_equal_the_replicated_sample():
    rng = np.random.default_rng(6)
    same = rng.random(400) < 0.5
    s = np.where(same, rng.normal(0.5, 0.25, 400), rng.normal(0.2, 0.25, 400)).round(2)
    fold = rng.integers(0, 5, 400)
    w = rng.integers(1, 4, (5, 400)).astype(float)  # positive counts: the same candidate thresholds
    accs = kfold_accuracy(s, same, fold_ids=fold, weights=w)
    for r in range(5):
        ref = kfold_accuracy(_replicate(s, w[r]), _replicate(same, w[r]), fold_ids=_replicate(fold, w[r]))[0]
        assert accs[r] == pytest.approx(ref, abs=1e-12)
    # a resample that draws nothing of one fold averages the folds it has
    w0 = np.ones((1, 400))
    w0[0, fold == 3] = 0
    keep = fold != 3
    assert kfold_accuracy(s, same, fold_ids=fold, weights=w0)[0] == pytest.approx(
        kfold_accuracy(s[keep], same[keep], fold_ids=fold[keep])[0], abs=1e-12)

    rank = rng.integers(1, 11, 200)
    w = rng.integers(0, 3, (4, 200)).astype(float)
    rows = rank_accuracy(rank, 10, (1, 5, 20), weights=w)
    for r in range(4):
        ref = rank_accuracy(_replicate(rank, w[r]), 10, (1, 5, 20))
        for k in ("rank1", "rank5", "rank20"):
            assert rows[k][r] == pytest.approx(ref[k], abs=1e-12)
