"""Face data layer: degradation, splits, folder datasets, caches, loaders, bad input."""
import logging
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import gaussian_filter

from cycle.data import (
    DataError,
    FaceSet,
    build_splits,
    make_loader,
    pairable_identities,
    set_epoch,
    split_identities,
)
from cycle.degrade import degrade, upsample

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is not an installed package
    sys.path.insert(0, str(ROOT))

from bench.common import loader_throughput  # noqa: E402

ORL = ROOT / "data" / "orl_faces"
NOISY = {"down": "area", "noise_std": 0.05}


def _pil_resize(x: torch.Tensor, res: int, method) -> torch.Tensor:
    """Reference: PIL's float ('F' mode) resize, channel by channel."""
    def one(c):
        return np.asarray(Image.fromarray(c.numpy(), mode="F").resize((res, res), method))

    out = [[one(c) for c in img] for img in x]
    return torch.from_numpy(np.array(out)).clamp(0, 1)


# ---------------------------------------------------------------- degradation

@pytest.mark.parametrize("res", [16, 24, 32])
def test_degrade_matches_reference_resizes(res):
    x = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    assert torch.equal(degrade(x, res), F.interpolate(x, size=(res, res), mode="area"))
    assert (degrade(x, res, {"down": "bicubic"}) - _pil_resize(x, res, Image.BICUBIC)).abs().max() < 1e-5
    assert (degrade(x, res, {"down": "lanczos"}) - _pil_resize(x, res, Image.LANCZOS)).abs().max() < 1e-5
    single = degrade(x[0], res, {"down": "lanczos"})
    assert single.shape == (3, res, res) and torch.allclose(single, degrade(x, res, {"down": "lanczos"})[0])


def test_degrade_blur_noise_jpeg():
    x = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    blurred = degrade(x, 16, {"blur_sigma": 1.5})
    ref = gaussian_filter(x.numpy(), sigma=(0, 0, 1.5, 1.5), mode="mirror", truncate=3.0)
    assert torch.allclose(blurred, F.interpolate(torch.from_numpy(ref), size=16, mode="area"), atol=1e-5)

    clean = degrade(x, 16)
    noisy = degrade(x, 16, {"noise_std": 0.05}, generator=torch.Generator().manual_seed(3))
    again = degrade(x, 16, {"noise_std": 0.05}, generator=torch.Generator().manual_seed(3))
    assert torch.equal(noisy, again) and noisy.min() >= 0 and noisy.max() <= 1
    assert 0.04 < (noisy - clean).std().item() < 0.055  # a few values clip at 0/1

    # one generator per image: image 1's noise does not depend on the rest of the batch
    gens = [torch.Generator().manual_seed(s) for s in (10, 11, 12)]
    batch = degrade(x, 16, NOISY, generator=gens)
    alone = degrade(x[1:2], 16, NOISY, generator=[torch.Generator().manual_seed(11)])
    assert torch.equal(batch[1:2], alone)

    jpg = degrade(x, 24, {"jpeg_quality": 30})
    assert jpg.shape == (3, 3, 24, 24) and 0 <= jpg.min() and jpg.max() <= 1
    assert torch.allclose(jpg * 255, (jpg * 255).round(), atol=1e-4)  # 8-bit levels after re-encode
    assert 0.01 < (jpg - degrade(x, 24)).abs().mean() < 0.2


def test_degrade_string_res_and_upsample():
    x = torch.rand(3, 112, 112)
    assert torch.equal(degrade(x, "16"), degrade(x, 16))  # the config's res is a string-valued enum
    up = upsample(degrade(x, 16))
    assert up.shape == (3, 112, 112) and up.min() >= 0 and up.max() <= 1
    assert upsample(torch.rand(2, 3, 24, 24), size=56).shape == (2, 3, 56, 56)


@pytest.mark.parametrize("args, match", [
    ((16, {"down": "nearest"}), "not one of area, bicubic, lanczos"),
    ((16, {"nosie_std": 0.1}), "unknown key"),
    ((16, {"blur_sigma": -1}), "blur_sigma must be a number >= 0"),
    ((16, {"jpeg_quality": 0}), "jpeg_quality must be null or an integer in 1..100"),
    ((16, {"jpeg_quality": 75.5}), "jpeg_quality"),
    ((0, None), "res must be a positive integer"),
    (("abc", None), "res must be a positive integer"),
    ((200, None), "larger than the HR image"),
])
def test_degrade_bad_values(args, match):
    with pytest.raises(ValueError, match=match):
        degrade(torch.rand(3, 112, 112), *args)


def test_degrade_bad_tensor():
    with pytest.raises(ValueError, match="float tensor"):
        degrade(torch.zeros(112, 112, dtype=torch.uint8), 16)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        degrade(torch.rand(3, 3, 112, 112), 16, NOISY, generator=[torch.Generator()] * 2)


# ---------------------------------------------------------------- splits

def test_split_identities_by_fraction_and_count():
    names = [f"n{i}" for i in range(50)]
    a = split_identities(names, {"val": 0.1, "test": 0.2}, seed=0)
    assert [len(a[s]) for s in ("train", "val", "test")] == [35, 5, 10]
    assert set(a["train"]) | set(a["val"]) | set(a["test"]) == set(names)
    assert not set(a["train"]) & set(a["test"]) and not set(a["val"]) & set(a["test"])
    assert a == split_identities(list(reversed(names)), {"val": 0.1, "test": 0.2}, seed=0)
    assert a != split_identities(names, {"val": 0.1, "test": 0.2}, seed=1)
    b = split_identities(names, {"val": 3, "test": 7}, seed=0)
    assert [len(b[s]) for s in ("train", "val", "test")] == [40, 3, 7]
    tiny = split_identities(names, {"val": 0.001, "test": 0}, seed=0)
    assert len(tiny["val"]) == 1 and not tiny["test"]  # asked for -> at least 1
    for bad, match in [({"val": 30, "test": 20}, "leaves no training"), ({"train": 0.5}, "unknown key"),
                       ({"test": -0.1}, "fraction"), ({"test": 2.5}, "whole count")]:
        with pytest.raises(DataError, match=match):
            split_identities(names, bad, seed=0)


def _synth_cfg(**kw):
    cfg = {"name": "synthetic", "seed": 0, "num_identities": 12, "images_per_identity": 4, "num_looks": 4,
           "split": {"val": 2, "test": 3}, "image_size": 112}
    cfg.update(kw)
    return cfg


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return build_splits(_synth_cfg(), tmp_path_factory.mktemp("cache"))


def test_synthetic_splits(synth, tmp_path):
    sizes = {s: (len(f), f.num_classes) for s, f in synth.items()}
    assert sizes == {"train": (28, 7), "val": (8, 2), "test": (12, 3)}
    ids = [set(f.identities) for f in synth.values()]
    assert not ids[0] & ids[1] and not ids[0] & ids[2] and not ids[1] & ids[2]
    for f in synth.values():
        assert isinstance(f.images, np.memmap) and f.images.dtype == np.uint8
        assert f.images.shape == (len(f), 112, 112, 3) and f.labels.dtype == np.int64
        assert sorted(set(f.labels.tolist())) == list(range(f.num_classes))
    again = build_splits(_synth_cfg(), tmp_path)  # a fresh cache: regenerated identically
    assert all(np.array_equal(again[s].images, synth[s].images) for s in synth)
    other = build_splits(_synth_cfg(seed=1), tmp_path)
    assert other["test"].identities != synth["test"].identities or not np.array_equal(
        other["test"].images, synth["test"].images)


def test_faceset_pickles_as_a_path(synth):
    faces = synth["train"]
    blob = pickle.dumps(faces)
    assert len(blob) < 50_000  # the pixels are not copied into spawned workers
    back = pickle.loads(blob)
    assert np.array_equal(back.images, faces.images) and back.identities == faces.identities


# ---------------------------------------------------------------- folders

def _cfg(root, **kw):
    cfg = {"name": "folder", "root": root and str(root), "seed": 0, "split": {"val": 0, "test": 0},
           "strict": False}
    cfg.update(kw)
    return cfg


def _save(path: Path, arr: np.ndarray, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)


def test_orl_loads(tmp_path):
    cfg = _cfg(ORL, name="orl", resize="center_crop", split={"val": 0.1, "test": 0.2})
    splits = build_splits(cfg, tmp_path)
    assert {s: (len(f), f.num_classes) for s, f in splits.items()} == {
        "train": (280, 28), "val": (40, 4), "test": (80, 8)}
    assert all((f.class_counts() == 10).all() for f in splits.values())
    img = splits["train"].images[0]
    assert img.shape == (112, 112, 3)
    assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 0], img[..., 2])  # grey->RGB
    assert 40 < img.mean() < 200


def _compose(*overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(overrides=list(overrides))


def test_data_presets_compose(tmp_path):
    cfg = _compose("+data=orl", f"+paths.root={ROOT}")
    assert cfg.data.root == str(ORL) and cfg.data.resize == "center_crop" and cfg.data.strict is False
    splits = build_splits(cfg.data, tmp_path)
    assert sum(f.num_classes for f in splits.values()) == 40 and sum(map(len, splits.values())) == 400
    folder = _compose("+data=folder").data
    assert set(folder) - {"root"} <= set(cfg.data) and folder.min_images == 1
    with pytest.raises(DataError, match="data.root is required"):
        build_splits(folder, tmp_path)
    synth_cfg = _compose("+data=synthetic").data
    assert (synth_cfg.num_identities, synth_cfg.images_per_identity, synth_cfg.num_looks) == (300, 14, 16)
    assert dict(synth_cfg.augment) == {"flip": True, "rotate_deg": 5.0, "color_jitter": 0.1}


def test_folder_formats_and_resize_modes(tmp_path):
    wide = np.zeros((50, 150, 3), np.uint8)
    wide[:, :50, 0] = 255  # red | green | blue thirds
    wide[:, 50:100, 1] = 255
    wide[:, 100:, 2] = 255
    _save(tmp_path / "r/a/wide.png", wide)
    _save(tmp_path / "r/a/grey.jpg", np.full((40, 30), 128, np.uint8), quality=95)
    _save(tmp_path / "r/b/face.pgm", np.full((112, 92), 200, np.uint8))
    _save(tmp_path / "r/b/alpha.png", np.full((20, 20, 4), 90, np.uint8))
    _save(tmp_path / "r/b/deep.png", np.full((16, 16), 65535 // 2, np.uint16))  # 16-bit greyscale
    (tmp_path / "r/b/notes.txt").write_text("not an image")
    faces = build_splits(_cfg(tmp_path / "r"), tmp_path / "c1")["train"]
    assert len(faces) == 5 and faces.identities == ["a", "b"] and faces.labels.tolist() == [0, 0, 1, 1, 1]
    assert faces.files == ["a/grey.jpg", "a/wide.png", "b/alpha.png", "b/deep.png", "b/face.pgm"]
    assert faces.images.shape == (5, 112, 112, 3)
    assert abs(int(faces.images[0].mean()) - 128) <= 2 and abs(int(faces.images[3].mean()) - 127) <= 1
    resized = faces.images[1]
    assert resized[56, 10, 0] > 250 and resized[56, 56, 1] > 250 and resized[56, 100, 2] > 250
    cropped = build_splits(_cfg(tmp_path / "r", resize="center_crop"), tmp_path / "c2")["train"].images[1]
    assert cropped[56, 5:107, 1].min() > 250 and cropped[56, :, 0].max() < 5  # only the green middle is left


def test_cache_is_reused_and_keyed(tmp_path, monkeypatch):
    _save(tmp_path / "r/a/1.png", np.full((8, 8, 3), 10, np.uint8))
    _save(tmp_path / "r/a/2.png", np.full((8, 8, 3), 20, np.uint8))
    first = build_splits(_cfg(tmp_path / "r"), tmp_path / "c")["train"]
    assert Path(first.cache_path).parent == tmp_path / "c" / "faces"
    import cycle.data.chunked as data_mod

    monkeypatch.setattr(data_mod, "build_rows", lambda *a, **k: pytest.fail("cache not reused"))
    assert np.array_equal(build_splits(_cfg(tmp_path / "r"), tmp_path / "c")["train"].images, first.images)
    monkeypatch.undo()
    _save(tmp_path / "r/a/3.png", np.full((8, 8, 3), 30, np.uint8))  # content changed -> new cache file
    assert len(build_splits(_cfg(tmp_path / "r"), tmp_path / "c")["train"]) == 3


# ---------------------------------------------------------------- bad input

def test_missing_and_empty_roots(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_splits(_cfg(tmp_path / "nope"), tmp_path)
    with pytest.raises(DataError, match="data.root is required"):
        build_splits(_cfg(None), tmp_path)
    from omegaconf import OmegaConf

    with pytest.raises(DataError, match="data.root is required"):
        build_splits(OmegaConf.create({"name": "folder", "root": "???"}), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        build_splits(_cfg(tmp_path / "empty"), tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        build_splits(_cfg(tmp_path / "file"), tmp_path)
    _save(tmp_path / "flat/1.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match="no identity sub-folders"):
        build_splits(_cfg(tmp_path / "flat"), tmp_path)
    (tmp_path / "noimg/a").mkdir(parents=True)
    (tmp_path / "noimg/a/readme.txt").write_text("x")
    with pytest.raises(DataError, match="no image files"):
        build_splits(_cfg(tmp_path / "noimg"), tmp_path)


def _corrupt_tree(root: Path) -> None:
    for ident in ("a", "b"):
        for i in range(3):
            _save(root / ident / f"{i}.png", np.full((20, 20, 3), 40 * i, np.uint8))
    (root / "a" / "garbage.jpg").write_bytes(b"this is not a jpeg")
    good = (root / "b" / "0.png").read_bytes()
    (root / "b" / "cut.png").write_bytes(good[: len(good) // 2])  # truncated
    (root / "b" / "info.csv").write_text("1,2")  # a non-image: ignored, not reported as corrupt
    (root / "c").mkdir()
    (root / "c" / "only.png").write_bytes(b"\x89PNG broken")  # an identity that loses its only image


def test_corrupt_files_skipped_with_one_warning(tmp_path, caplog):
    _corrupt_tree(tmp_path / "r")
    with caplog.at_level(logging.WARNING, logger="cycle.data"):
        faces = build_splits(_cfg(tmp_path / "r"), tmp_path / "c")["train"]
    assert len(faces) == 6 and faces.class_counts().tolist() == [3, 3] and faces.identities == ["a", "b"]
    assert faces.images[:, 5, 5, 0].tolist() == [0, 40, 80, 0, 40, 80]  # good rows kept, in order
    assert faces.files == ["a/0.png", "a/1.png", "a/2.png", "b/0.png", "b/1.png", "b/2.png"]
    warned = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warned) == 1
    assert "skipped 3 unreadable" in warned[0] and "a/garbage.jpg" in warned[0] and "b/cut.png" in warned[0]
    assert "c/only.png" in warned[0] and "info.csv" not in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cycle.data"):  # cached: the warning is not lost
        assert len(build_splits(_cfg(tmp_path / "r"), tmp_path / "c")["train"]) == 6
    assert sum("skipped 3 unreadable" in r.getMessage() for r in caplog.records) == 1


def test_corrupt_files_strict_is_an_error(tmp_path):
    _corrupt_tree(tmp_path / "r")
    with pytest.raises(DataError, match=r"3 unreadable image file\(s\).*data.strict=true.*garbage.jpg"):
        build_splits(_cfg(tmp_path / "r", strict=True), tmp_path / "c")
    assert not list((tmp_path / "c" / "faces").glob("*.npy"))  # nothing half-written left behind


def test_single_image_identity(tmp_path, caplog):
    for ident, n in (("a", 3), ("b", 1), ("c", 2), ("d", 2)):
        for i in range(n):
            _save(tmp_path / "r" / ident / f"{i}.png", np.full((10, 10, 3), 50 * i, np.uint8))
    with caplog.at_level(logging.WARNING, logger="cycle.data"):
        faces = build_splits(_cfg(tmp_path / "r"), tmp_path / "c")["train"]
    assert any("1 of 4 identities have a single image" in r.getMessage() for r in caplog.records)
    assert pairable_identities(faces).tolist() == [0, 2, 3]
    loader = make_loader(faces, batch_size=4, res=16, degradation=None, train=True, pk=(2, 2))
    for batch in loader:
        assert 1 not in batch["label"].tolist()  # no positive pair possible for b
    with pytest.raises(DataError, match="P=4 identities with >= 2 images; this split has 3"):
        make_loader(faces, batch_size=8, res=16, degradation=None, train=True, pk=(4, 2))
    assert len(build_splits(_cfg(tmp_path / "r", min_images=2), tmp_path / "c")["train"].identities) == 3


# ---------------------------------------------------------------- loaders

def test_eval_loader_batches(synth):
    faces = synth["val"]
    loader = make_loader(faces, batch_size=3, res=16, degradation=NOISY, train=False)
    batches = list(loader)
    assert [len(b["index"]) for b in batches] == [3, 3, 2]  # fixed order, last partial batch kept
    b = batches[0]
    assert b["hr"].shape == (3, 3, 112, 112) and b["hr"].dtype == torch.float32
    assert b["lr"].shape == (3, 3, 16, 16) and b["lr"].dtype == torch.float32
    assert b["label"].dtype == torch.int64 and b["index"].tolist() == [0, 1, 2]
    assert 0 <= b["lr"].min() and b["lr"].max() <= 1 and 0 <= b["hr"].min() and b["hr"].max() <= 1
    assert torch.equal(b["hr"][0], torch.from_numpy(np.array(faces.images[0])).permute(2, 0, 1) / 255.0)
    # reproducible eval: same noise on a second pass and with another batch size
    other = make_loader(faces, batch_size=5, res=16, degradation=NOISY, train=False)
    again = torch.cat([x["lr"] for x in other])
    assert torch.equal(torch.cat([x["lr"] for x in batches]), again)
    assert "lr" not in next(iter(make_loader(faces, batch_size=2, res=None, degradation=None, train=False)))


def test_train_loader_reshuffles_deterministically(synth):
    faces = synth["train"]
    aug = {"flip": True, "rotate_deg": 5.0, "color_jitter": 0.1}

    def run(**kw):
        loader = make_loader(faces, batch_size=8, res=24, degradation=NOISY, train=True, augment=aug, seed=5,
                             **kw)
        return [torch.cat([b["index"] for b in loader]) for _ in range(2)], loader

    (e0, e1), loader = run()
    assert len(e0) == 24 and len(set(e0.tolist())) == 24  # drop_last: 28 -> 3 full batches
    assert not torch.equal(e0, e1)
    (f0, f1), _ = run()
    assert torch.equal(e0, f0) and torch.equal(e1, f1)
    set_epoch(loader, 0)
    assert torch.equal(torch.cat([b["index"] for b in loader]), e0)
    loader.set_epoch(0)  # the method the trainer calls
    x = next(iter(loader))
    set_epoch(loader, 0)
    y = next(iter(loader))
    assert torch.equal(x["hr"], y["hr"]) and torch.equal(x["lr"], y["lr"])  # augmentation replays too


def test_workers_give_the_same_batches(synth):
    kw = dict(batch_size=8, res=16, degradation=NOISY, train=True, augment={"flip": True, "rotate_deg": 5.0})
    a = list(make_loader(synth["train"], num_workers=0, **kw))
    b = list(make_loader(synth["train"], num_workers=2, **kw))
    assert len(a) == len(b) == 3
    assert all(torch.equal(x["lr"], y["lr"]) and torch.equal(x["hr"], y["hr"]) for x, y in zip(a, b))


def test_pk_batches(synth):
    faces = synth["train"]  # 7 identities x 4 images
    loader = make_loader(faces, batch_size=6, res=16, degradation=None, train=True, pk=(3, 2), seed=1)
    batches = list(loader)
    assert len(batches) == 28 // 6
    for b in batches:
        labels = b["label"].tolist()
        assert len(labels) == 6 and len(set(labels)) == 3
        assert all(labels.count(c) == 2 for c in set(labels))
        assert len(set(b["index"].tolist())) == 6  # 4 images per identity >= K: no repeats
        assert all(faces.labels[i] == c for i, c in zip(b["index"].tolist(), labels))
    with pytest.raises(DataError, match=r"needs batch_size = P\*K = 6"):
        make_loader(faces, batch_size=8, res=16, degradation=None, train=True, pk=(3, 2))


def test_augmentation_keeps_lr_and_hr_aligned(synth):
    faces = synth["test"]
    loader = make_loader(faces, batch_size=12, res=16, degradation=None, train=True, augment={"flip": True})
    b = next(iter(loader))
    flips = []
    for hr, lr, i in zip(b["hr"], b["lr"], b["index"].tolist()):
        orig = torch.from_numpy(np.array(faces.images[i])).permute(2, 0, 1) / 255.0
        flipped = torch.equal(hr, orig.flip(-1))
        assert flipped or torch.equal(hr, orig)
        assert torch.allclose(lr, degrade(orig, 16).flip(-1) if flipped else degrade(orig, 16), atol=1e-6)
        flips.append(flipped)
    assert 0 < sum(flips) < len(flips)
    # with rotation and colour jitter too, LR is always the degradation of the augmented HR
    aug = {"flip": True, "rotate_deg": 8.0, "color_jitter": 0.2}
    b = next(iter(make_loader(faces, batch_size=12, res=16, degradation=None, train=True, augment=aug)))
    assert torch.allclose(b["lr"], degrade(b["hr"], 16), atol=1e-6)
    assert 0 <= b["hr"].min() and b["hr"].max() <= 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=0), "batch_size must be a positive integer"),
    (dict(res="abc"), "res must be a positive integer"),
    (dict(num_workers=-1), "num_workers"),
    (dict(augment={"flip": True, "blur": 1}), "unknown key"),
    (dict(augment={"color_jitter": 1.5}), "color_jitter must be < 1"),
    (dict(drop_last=True, batch_size=100), "gives no batch"),
    (dict(degradation={"down": "box"}, num_workers=2), "not one of area"),  # raised here, not in a worker
    (dict(pk=(2, 2), batch_size=4, train=False), "for training"),
])
def test_make_loader_bad_arguments(synth, kwargs, match):
    args = dict(batch_size=4, res=16, degradation=None, train=True)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        make_loader(synth["val"], **args)


def test_make_loader_rejects_empty_split(tmp_path):
    empty = FaceSet(np.zeros((0, 112, 112, 3), np.uint8), np.zeros(0, np.int64), [])
    with pytest.raises(DataError, match="split is empty"):
        make_loader(empty, batch_size=4, res=16, degradation=None, train=True)


def test_small_split_keeps_its_only_batch(synth):
    loader = make_loader(synth["val"], batch_size=64, res=16, degradation=None, train=True)
    assert [len(b["index"]) for b in loader] == [8]


def test_loader_throughput(synth):
    loader = make_loader(synth["train"], batch_size=8, res=16, degradation=None, train=True)
    assert loader_throughput(loader, batches=4, warmup=1) > 0
