"""data=rec: insightface train.rec/train.idx built here from the bundled ORL faces, read without MXNet."""
from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, compose_train
from omegaconf import open_dict
from PIL import Image

from cycle.data import DataError, build_splits, load_image, make_loader
from cycle.data.recordio import (
    MAGIC,
    RecordFile,
    pack_image,
    read_index,
    unpack_header,
    write_insightface_rec,
    write_rec,
)

ORL = ROOT / "data" / "orl_faces"


def orl_files(n_ids: int, per: int) -> list[tuple[int, Path]]:
    return [(k, ORL / f"s{k + 1}" / f"{j + 1}.pgm") for k in range(n_ids) for j in range(per)]


def encode(path: Path, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, format=fmt, quality=95)
    return buf.getvalue()


def make_rec(root: Path, n_ids: int = 16, per: int = 5, fmt: str = "PNG") -> list[tuple[int, Path]]:
    """An insightface-style training folder: record 0 header, image records 1..n, identity records."""
    files = orl_files(n_ids, per)
    root.mkdir(parents=True, exist_ok=True)
    write_insightface_rec(root / "train", [encode(p, fmt) for _, p in files], [k for k, _ in files])
    (root / "property").write_text(f"{n_ids},112,112\n")
    return files


def rec_cfg(tmp_path, root: Path, *extra: str):
    cfg = compose_train(["experiment=smoke", "device=cpu", "data=rec", f"data.root={root}", "data.resize=center_crop",
                         *extra], tmp_path)
    return cfg


def test_framing_header_and_split_records_round_trip(tmp_path):
    magic = struct.pack("<I", MAGIC)
    payloads = [b"", b"abc", b"x" * 4 + magic + b"tail!", magic + b"1234" + magic, b"no magic here" * 50]
    write_rec(tmp_path / "t", enumerate(payloads))
    keys, offsets = read_index(tmp_path / "t.idx")
    rf = RecordFile(tmp_path / "t.rec")
    assert keys.tolist() == list(range(len(payloads)))
    assert [rf.read(int(o)) for o in offsets] == payloads  # magic words inside a payload survive the split
    raw = (tmp_path / "t.rec").read_bytes()
    assert len(raw) % 4 == 0 and struct.unpack_from("<I", raw, int(offsets[2]) + 4)[0] >> 29 == 1  # first part
    flag, labels, img = unpack_header(pack_image([7.0, 3.0], b"JPEG"))
    assert flag == 2 and labels.tolist() == [7.0, 3.0] and img == b"JPEG"
    flag, labels, img = unpack_header(pack_image(5, b"PNG"))
    assert flag == 0 and labels.tolist() == [5.0] and img == b"PNG"


def test_rec_splits_match_the_source_images(tmp_path):
    files = make_rec(tmp_path / "ms1m")
    cfg = rec_cfg(tmp_path, tmp_path / "ms1m")
    splits = build_splits(cfg.data, cfg.paths.cache_dir)
    assert [len(splits[s].identities) for s in ("train", "val", "test")] == [8, 4, 4]
    names = [set(splits[s].identities) for s in ("train", "val", "test")]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    assert sum(len(splits[s]) for s in splits) == len(files)
    test = splits["test"]
    for i in (0, len(test) - 1):  # "identity/key": identity = the record's label, key = its record index
        ident, key = test.files[i].split("/")
        label, path = files[int(key) - 1]
        assert ident == str(label) and test.identities[test.labels[i]] == ident
        assert np.array_equal(test.images[i], load_image(path, 112, "center_crop"))  # PNG: lossless
    assert test.cache_path is not None and Path(test.cache_path).exists()

    # max_identities, and streaming (no cache) gives the same faces
    with open_dict(cfg):
        cfg.data.max_identities = 12
        cfg.data.cache = "none"
    small = build_splits(cfg.data, tmp_path / "nocache")
    assert sum(s.num_classes for s in small.values()) == 12
    assert not list((tmp_path / "nocache" / "faces").glob("*.npy"))  # only the label scan is cached
    t = small["train"]
    first = files[int(t.files[0].split("/")[1]) - 1][1]
    assert t.cache_path is None and np.array_equal(t.images[0], load_image(first, 112, "center_crop"))
    batch = next(iter(make_loader(t, batch_size=4, res=16, degradation=cfg.degradation, train=True,
                                  num_workers=2, seed=0)))
    assert batch["hr"].shape == (4, 3, 112, 112) and batch["lr"].shape == (4, 3, 16, 16)


@pytest.mark.slow  # ~20 s: two stages
def test_training_stages_run_on_rec(tmp_path, smoke_cfg):
    from dsr import stage as dsr_stage
    from edgeface import pretrain

    make_rec(tmp_path / "rec", n_ids=16, per=6, fmt="JPEG")
    cfg = smoke_cfg("data=rec", f"data.root={tmp_path / 'rec'}")
    with open_dict(cfg):
        cfg.paths.cache_dir = str(tmp_path / "cache")
    pre = pretrain.run(cfg, tmp_path / "pre")
    init = dsr_stage.run_initial(cfg, tmp_path / "init")
    assert np.isfinite(pre["val/auc"]) and np.isfinite(init["val/psnr"])


def test_bad_rec_files_name_the_file_and_offset(tmp_path):
    root = tmp_path / "bad"
    make_rec(root, n_ids=6, per=2)
    cfg = rec_cfg(tmp_path, root, "data.split={val:1,test:1}")
    rec, idx = root / "train.rec", root / "train.idx"
    good, lines = rec.read_bytes(), idx.read_text().splitlines()

    rec.write_bytes(good[:len(good) // 2])  # truncated: the index points past the end
    with pytest.raises(DataError, match=r"train\.rec.*byte offset \d+.*(past the end|truncated)"):
        build_splits(cfg.data, tmp_path / "c1")
    last_img = int(lines[12].split("\t")[1])
    rec.write_bytes(good[:last_img + 20])  # cut inside a record
    with pytest.raises(DataError, match=rf"train\.rec.*byte offset {last_img}.*truncated"):
        build_splits(cfg.data, tmp_path / "c2")
    rec.write_bytes(good)
    idx.write_text("\n".join(lines[:3] + [f"3\t{int(lines[3].split(chr(9))[1]) + 4}"] + lines[4:]) + "\n")
    with pytest.raises(DataError, match=r"train\.rec: no RecordIO record at byte offset \d+ \(magic"):
        build_splits(cfg.data, tmp_path / "c3")
    idx.write_text("0\tnot-a-number\n")
    with pytest.raises(DataError, match=r"train\.idx is not a RecordIO index"):
        build_splits(cfg.data, tmp_path / "c4")
    idx.unlink()
    with pytest.raises(DataError, match=r"train\.idx not found"):
        build_splits(cfg.data, tmp_path / "c5")
