"""eval.protocols and eval.pairs_file: balanced pairs, LFW pairs.txt (10-fold, missing images), identification split."""

import logging

import numpy as np
import pytest
from PIL import Image

from eval.metrics import kfold_accuracy, pair_scores_indexed
from eval.pairs_file import LFWPair, MissingImagesError, lfw_image_path, load_lfw_pairs, read_lfw_pairs
from eval.protocols import _unrank_pairs, balanced_fold_pairs, balanced_pairs, identification_split, identity_folds

# 10 identities with a single image, then identities with 2..41 images
LABELS = np.repeat(np.arange(50), np.r_[np.ones(10, int), np.arange(2, 42)])


# ---------------------------------------------------------------------------------------- (a) pairs


def test_unrank_pairs_matches_triu():
    for n in (2, 3, 7, 100):
        i, j = np.triu_indices(n, 1)
        a, b = _unrank_pairs(np.arange(i.size), n)
        np.testing.assert_array_equal(a, i)
        np.testing.assert_array_equal(b, j)
    n = 100_000  # large n: float sqrt is corrected exactly
    a, b = _unrank_pairs(np.array([0, n * (n - 1) // 2 - 1]), n)
    assert a.tolist() == [0, n - 2] and b.tolist() == [1, n - 1]


def test_balanced_pairs_properties(caplog):
    with caplog.at_level(logging.INFO, logger="eval.protocols"):
        a, b, same = balanced_pairs(LABELS, 2000, seed=0)
    assert "10 of 50 identities have < 2 images" in caplog.text
    assert a.size == b.size == same.size == 2000 and same.sum() == 1000
    assert np.all(a != b)  # no self-pairs
    key = np.minimum(a, b) * LABELS.size + np.maximum(a, b)
    assert np.unique(key).size == 2000  # no duplicate unordered pairs
    np.testing.assert_array_equal(LABELS[a] == LABELS[b], same)
    singles = np.flatnonzero(np.isin(LABELS, np.arange(10)))
    assert not np.isin(np.r_[a[same], b[same]], singles).any()  # singletons never in genuine pairs
    assert np.isin(np.r_[a[~same], b[~same]], singles).any()  # ... but used as impostors
    # genuine pairs spread evenly (water-filling): identities with 2..7 images give all their
    # 1+3+6+10+15+21 = 56 pairs, the other 34 share the remaining 944 as 27 or 28 each
    per_id = np.bincount(LABELS[a[same]], minlength=50)[10:]
    assert per_id[:6].tolist() == [1, 3, 6, 10, 15, 21] and set(per_id[6:]) == {27, 28}
    # deterministic from the seed, different across seeds; labels may be strings
    a2, b2, s2 = balanced_pairs([f"id{v:02d}" for v in LABELS], 2000, seed=0)
    assert np.array_equal(a, a2) and np.array_equal(b, b2) and np.array_equal(same, s2)
    assert not np.array_equal(a, balanced_pairs(LABELS, 2000, seed=1)[0])


def test_balanced_pairs_capped_when_too_few(caplog):
    labels = np.array([0, 0, 0, 1, 2])  # 3 genuine pairs possible, 3 + 3 + 1 = 7 impostor pairs
    with caplog.at_level(logging.WARNING, logger="eval.protocols"):
        a, b, same = balanced_pairs(labels, 100, seed=0)
    assert "only 3 genuine / 7 impostor pairs" in caplog.text
    assert same.sum() == 3 and (~same).sum() == 3
    genuine = sorted(zip(np.minimum(a, b)[same].tolist(), np.maximum(a, b)[same].tolist()))
    assert genuine == [(0, 1), (0, 2), (1, 2)]
    assert np.all(labels[a[~same]] != labels[b[~same]])


def test_balanced_pairs_errors():
    with pytest.raises(ValueError, match="at least 2 identities"):
        balanced_pairs([3, 3, 3], 10, seed=0)
    with pytest.raises(ValueError, match="no identity has 2 or more images"):
        balanced_pairs([1, 2, 3], 10, seed=0)


# ---------------------------------------------------------------------------------------- (c) identification


def test_identification_split(caplog):
    with caplog.at_level(logging.INFO, logger="eval.protocols"):
        g, p = identification_split(LABELS, seed=0)
    assert "10 of 50 identities have <= 1 image(s)" in caplog.text
    assert np.intersect1d(g, p).size == 0 and np.union1d(g, p).size == LABELS.size
    assert np.array_equal(np.sort(LABELS[g]), np.arange(50))  # exactly one gallery image per identity
    assert set(LABELS[p]) == set(range(10, 50))  # single-image identities: gallery-only distractors
    g2, p2 = identification_split(LABELS, seed=0)
    assert np.array_equal(g, g2) and np.array_equal(p, p2)
    assert not np.array_equal(g, identification_split(LABELS, seed=1)[0])
    g, p = identification_split(LABELS, seed=0, gallery_per_id=2)
    assert np.bincount(LABELS[g]).tolist() == [1] * 10 + [2] * 40
    with pytest.raises(ValueError, match="no probes"):
        identification_split([1, 2, 3], seed=0)
    with pytest.raises(ValueError, match="at least 2 identities"):
        identification_split([1, 1, 1], seed=0)


# ---------------------------------------------------------------------------------------- (b) LFW

RED, GREEN = (200, 0, 0), (0, 200, 0)


def _write_lfw(root, images):
    for (name, i), colour in images.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (2, 2), colour).save(root / name / f"{name}_{i:04d}.png")


def _embed(path):
    return np.asarray(Image.open(path).convert("RGB"), np.float64).reshape(-1, 3).mean(0)


def test_lfw_10fold_accuracy_by_hand(tmp_path):
    """10 folds x (1 same + 1 different) pairs; embedding = mean colour, so cosines are 0 or 1.

    Every fold has a same pair scoring 1 and a different pair scoring 0, except fold 2, whose same
    pair scores 0 (a red and a green image), and fold 5, whose different pair scores 1 (two reds).
    Held-out fold 2: the other 9 folds (9 same at 1; 8 different at 0, one at 1) give a threshold
    between 0 and 1 (17/18 correct); fold 2 then scores 1/2. Likewise fold 5 scores 1/2, and the
    other eight folds (16/18 correct at the same threshold) score 2/2. Mean 0.9, std 0.2.
    A threshold tuned on each test fold would not change folds 2 and 5 (0 vs 0, 1 vs 1).
    """
    lines, images = ["10\t1"], {}
    for f in range(10):
        same, a, b = f"Same_Person{f}", f"Other_A{f}", f"Other_B{f}"
        images[same, 1], images[same, 2] = RED, (GREEN if f == 2 else RED)
        images[a, 1], images[b, 1] = RED, (RED if f == 5 else GREEN)
        lines += [f"{same}\t1\t2", f"{a}\t1\t{b}\t1"]
    _write_lfw(tmp_path / "lfw", images)
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")

    pairs = read_lfw_pairs(tmp_path / "pairs.txt")
    assert len(pairs) == 20 and pairs[0] == LFWPair("Same_Person0", 1, "Same_Person0", 2, True, 0)
    assert pairs[19] == ("Other_A9", 1, "Other_B9", 1, False, 9)  # plain tuples work too

    lp = load_lfw_pairs(tmp_path / "pairs.txt", tmp_path / "lfw")
    assert lp.num_dropped == 0 and len(lp.paths) == 40
    assert lp.fold.tolist() == np.repeat(np.arange(10), 2).tolist()
    emb = np.stack([_embed(p) for p in lp.paths])
    scores = pair_scores_indexed(emb, lp.idx_a, lp.idx_b)
    np.testing.assert_allclose(scores[[4, 5, 10, 11]], [0, 0, 1, 1], atol=1e-12)  # folds 2 and 5
    mean, std, thr = kfold_accuracy(scores, lp.is_same, fold_ids=lp.fold)
    assert mean == pytest.approx(0.9, abs=1e-12) and std == pytest.approx(0.2, abs=1e-12)
    np.testing.assert_allclose(thr, 0.5, atol=1e-9)


def test_lfw_missing_images(tmp_path):
    (tmp_path / "pairs.txt").write_text("2 1\nAnn 1 2\nAnn 1 Bob 1\nCid 1 3\nBob 2 Dee 1\n")
    _write_lfw(tmp_path, {("Ann", 1): RED, ("Ann", 2): RED, ("Bob", 1): GREEN, ("Cid", 1): RED})
    with pytest.raises(MissingImagesError) as err:
        load_lfw_pairs(tmp_path / "pairs.txt", tmp_path)
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert "3 of 7 images" in msg and "2 of 4 pairs affected" in msg
    assert "Cid/Cid_0003.{jpg,png,jpeg,pgm,bmp} (line 4)" in msg and "Dee/Dee_0001" in msg
    assert "allow_missing" in msg and len(err.value.missing) == 3 and err.value.num_pairs == 2

    lp = load_lfw_pairs(tmp_path / "pairs.txt", tmp_path, allow_missing=True)
    assert lp.num_dropped == 2 and lp.is_same.tolist() == [True, False] and lp.fold.tolist() == [0, 0]
    assert [p.name for p in lp.paths] == ["Ann_0001.png", "Ann_0002.png", "Bob_0001.png"]
    assert lp.idx_a.tolist() == [0, 0] and lp.idx_b.tolist() == [1, 2]

    (tmp_path / "none.txt").write_text("1\nCid 1 3\nBob 2 Dee 1\n")
    with pytest.raises(MissingImagesError, match="no pair is complete"):
        load_lfw_pairs(tmp_path / "none.txt", tmp_path, allow_missing=True)


def test_lfw_image_path(tmp_path):
    _write_lfw(tmp_path, {("Ann", 1): RED})
    Image.new("RGB", (2, 2)).save(tmp_path / "Ann" / "Ann_0002.JPG", format="JPEG")
    assert lfw_image_path(tmp_path, "Ann", 1) == tmp_path / "Ann" / "Ann_0001.png"
    assert lfw_image_path(tmp_path, "Ann", 2) == tmp_path / "Ann" / "Ann_0002.JPG"
    with pytest.raises(FileNotFoundError, match="Ann_0003"):
        lfw_image_path(tmp_path, "Ann", 3)


def _pairs_file(tmp_path, text):
    p = tmp_path / "pairs.txt"
    p.write_text(text)
    return p


def test_lfw_parse_flexible_counts(tmp_path, caplog):
    # header says 2 folds of 3 + 3, fold 1 has only 2 same pairs: folds come from the blocks
    text = ("2 3\n" + "A 1 2\nB 1 2\nC 1 2\nA 1 B 1\nA 1 C 1\nB 1 C 1\n\n"
            + "D 1 2\nE 1 3\nD 1 E 1\nD 2 F 1\nE 1 F 1\n")
    with caplog.at_level(logging.WARNING, logger="eval.pairs_file"):
        pairs = read_lfw_pairs(_pairs_file(tmp_path, text))
    assert [p.fold for p in pairs] == [0] * 6 + [1] * 5
    assert "fold 1 (lines 9-13) has 2 same / 3 different pairs, header says 3 each" in caplog.text
    # one-number header (pairsDevTest.txt style): one fold
    pairs = read_lfw_pairs(_pairs_file(tmp_path, "2\nA 1 2\nB 1 2\nA 1 B 1\nA 2 B 2\n"))
    assert [p.fold for p in pairs] == [0] * 4 and [p.is_same for p in pairs] == [True, True, False, False]


def test_lfw_parse_errors_have_line_numbers(tmp_path):
    with pytest.raises(ValueError, match=r"pairs.txt:3: expected 'name i j' or 'name1 i name2 j'"):
        read_lfw_pairs(_pairs_file(tmp_path, "1 1\nA 1 2\nA 1 B\n"))
    with pytest.raises(ValueError, match=r"pairs.txt:2: image numbers start at 1"):
        read_lfw_pairs(_pairs_file(tmp_path, "1 1\nA 0 2\nA 1 B 1\n"))
    with pytest.raises(ValueError, match=r"pairs.txt:3: a different-person line names the same person"):
        read_lfw_pairs(_pairs_file(tmp_path, "1 1\nA 1 2\nA 1 A 3\n"))
    with pytest.raises(ValueError, match=r"pairs.txt:1: header"):
        read_lfw_pairs(_pairs_file(tmp_path, "10 300 5\nA 1 2\n"))
    blocks = r"announces 3 folds .* in 2 same/different block\(s\) starting at lines \[2, 4\]"
    with pytest.raises(ValueError, match=blocks):
        read_lfw_pairs(_pairs_file(tmp_path, "3 1\nA 1 2\nA 1 B 1\nB 1 2\nA 2 B 2\n"))
    with pytest.raises(ValueError, match="empty"):
        read_lfw_pairs(_pairs_file(tmp_path, "\n\n"))


# ---------------------------------------------------------------------------------------- identity-disjoint folds


def test_balanced_fold_pairs_are_identity_disjoint(caplog):
    labels = np.repeat(np.arange(60), 14)
    a, b, same, fold = balanced_fold_pairs(labels, 6000, seed=0, folds=10)
    assert a.size == 6000 and same.sum() == 3000 and np.bincount(fold).tolist() == [600] * 10
    np.testing.assert_array_equal(labels[a] == labels[b], same)
    for f in range(10):  # no identity (hence no image) of a fold appears in any other fold
        inside = set(labels[np.r_[a[fold == f], b[fold == f]]])
        outside = set(labels[np.r_[a[fold != f], b[fold != f]]])
        assert len(inside) == 6 and not inside & outside
        assert same[fold == f].sum() == 300  # each fold balanced
    key = np.minimum(a, b) * labels.size + np.maximum(a, b)
    assert np.unique(key).size == a.size  # no duplicate pairs
    again = balanced_fold_pairs(labels, 6000, seed=0, folds=10)
    assert all(np.array_equal(x, y) for x, y in zip((a, b, same, fold), again))
    assert not np.array_equal(a, balanced_fold_pairs(labels, 6000, seed=1, folds=10)[0])
    # the old round-robin folds shared identities between test and training folds; these never do
    rr = np.empty(a.size, int)
    for cls in (True, False):
        idx = np.flatnonzero(same == cls)
        rr[idx] = np.arange(idx.size) % 10
    assert set(labels[a[rr == 0]]) & set(labels[a[rr != 0]])
    # too few identities for 10 folds: fewer folds, said so; singletons never make a fold genuine-less
    small = np.r_[np.repeat(np.arange(5), 3), np.arange(5, 8)]  # 5 identities x 3 images + 3 single images
    with caplog.at_level(logging.WARNING, logger="eval.protocols"):
        a, b, same, fold = balanced_fold_pairs(small, 40, seed=0, folds=10)
    assert "allow 4 identity-disjoint folds" in caplog.text and np.unique(fold).size == 4
    for f in range(4):
        assert same[fold == f].any() and (~same[fold == f]).any()
    with pytest.raises(ValueError, match="at least 4 identities"):
        balanced_fold_pairs([0, 0, 1, 1, 2], 10, seed=0)


def test_identity_folds_balance_identities():
    labels = np.repeat(np.arange(23), 3)
    fold = identity_folds(labels, 5, seed=0)
    per_id = {int(f) for f in fold}
    assert per_id == set(range(5))
    ids_per_fold = [np.unique(labels[fold == f]).size for f in range(5)]
    assert sorted(ids_per_fold) == [4, 4, 5, 5, 5]
    for i in range(23):  # all images of an identity in one fold
        assert np.unique(fold[labels == i]).size == 1
