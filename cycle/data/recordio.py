"""insightface training sets (`data=rec`): MXNet RecordIO `train.rec` + `train.idx`, read without MXNet.

Format facts relied on (dmlc-core `recordio.h`, `mxnet.recordio`, insightface `arcface_torch/dataset.py`):

- A record is: uint32 magic 0xced7230a, uint32 lrecord, payload, zero padding to a multiple of 4 bytes
  (little-endian). lrecord's lower 29 bits are the payload length, its upper 3 bits `cflag`: 0 = a whole
  record; a payload containing the magic word at a 4-byte-aligned position is written as parts
  1 (first), 2 (middle)..., 3 (last), the magic word dropped at each cut and put back when reading.
- `train.idx` is text, one "key<TAB>byte offset" line per record.
- An image record's payload is the struct `IfQQ` (uint32 flag, float32 label, uint64 id, uint64 id2;
  24 bytes), then `flag` float32 labels when flag > 0 (they replace `label`), then the encoded image
  (JPEG or PNG).
- insightface sets: record 0 is a header-only record with flag > 0 whose label[0] is the end (exclusive)
  of the image keys, which start at 1; label[1] ends the per-identity records that follow them (not
  needed here). An image's label (label[0] when flag > 0) is its identity's class index. Without such a
  record 0, every key of the index is an image.

Identities are named by their label (e.g. "42"); splits, `max_identities` and caches then work as for
folders (`cycle.data.chunked`). Bad input is a `DataError` naming the file and byte offset.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import struct
import time
import warnings
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from cycle.data.cache import CACHE_VERSION
from cycle.data.chunked import source_options, source_split
from cycle.data.faceset import FaceSet
from cycle.data.folder import load_image
from cycle.data.options import DataError, _get
from cycle.data.splits import SPLITS, _select, split_identities

log = logging.getLogger(__name__)

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LEN_MASK = (1 << 29) - 1
_IR = struct.Struct("<IfQQ")  # flag, label, id, id2


# ------------------------------------------------------------------------------------ writing (tests, benches)

def pack_image(label: float | Iterable[float], image: bytes, id_: int = 0, id2: int = 0) -> bytes:
    """An image record payload: the IfQQ header (+ extra labels when `label` is a sequence), then the bytes."""
    if isinstance(label, (int, float, np.integer, np.floating)):
        return _IR.pack(0, float(label), id_, id2) + image
    extra = np.asarray(list(label), "<f4")
    return _IR.pack(len(extra), 0.0, id_, id2) + extra.tobytes() + image


def _frame(payload: bytes) -> bytes:
    """One record, split into parts where the payload holds the magic word at an aligned position."""
    cuts = [i for i in range(0, len(payload) - 3, 4) if payload[i:i + 4] == _MAGIC_BYTES]
    parts, start = [], 0
    for c in cuts:
        parts.append(payload[start:c])
        start = c + 4
    parts.append(payload[start:])
    out = bytearray()
    for k, part in enumerate(parts):
        cflag = 0 if len(parts) == 1 else (1 if k == 0 else 3 if k == len(parts) - 1 else 2)
        out += struct.pack("<II", MAGIC, (cflag << 29) | len(part)) + part + b"\0" * (-len(part) % 4)
    return bytes(out)


def write_rec(prefix: str | os.PathLike, records: Iterable[tuple[int, bytes]]) -> None:
    """Write `prefix.rec` + `prefix.idx` from (key, payload) pairs, as MXNet's indexed writer does."""
    prefix = Path(prefix)
    with open(prefix.with_suffix(".rec"), "wb") as rec, open(prefix.with_suffix(".idx"), "w") as idx:
        for key, payload in records:
            idx.write(f"{key}\t{rec.tell()}\n")
            rec.write(_frame(payload))


def write_insightface_rec(prefix: str | os.PathLike, images: list[bytes], labels: list[int]) -> None:
    """An insightface-style set: record 0 = (image end, identity end), images 1..n, identity records."""
    labels = list(map(int, labels))
    n, ids = len(images), sorted(set(labels))
    starts = {c: 1 + labels.index(c) for c in ids}
    ends = {c: 1 + n - labels[::-1].index(c) for c in ids}
    recs = [(0, pack_image([n + 1, n + 1 + len(ids)], b""))]
    recs += [(1 + i, pack_image(lab, img)) for i, (img, lab) in enumerate(zip(images, labels))]
    recs += [(n + 1 + k, pack_image([starts[c], ends[c]], b"")) for k, c in enumerate(ids)]
    write_rec(prefix, recs)


# ------------------------------------------------------------------------------------ reading

class RecordFile:
    """Random access to the records of a .rec file by byte offset (os.pread: safe in forked workers)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._fd, self._pid = None, None
        try:
            self.size = os.path.getsize(self.path)
        except OSError as exc:
            raise DataError(f"cannot read {self.path}: {exc}") from None

    def __getstate__(self):  # spawn-started workers re-open the file
        return {"path": self.path, "size": self.size, "_fd": None, "_pid": None}

    def _read(self, offset: int, n: int) -> bytes:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return os.pread(self._fd, n, offset)

    def _part(self, offset: int) -> tuple[int, bytes, int]:
        """(cflag, payload, next offset) of the record part at `offset`."""
        head = self._read(offset, 8)
        if len(head) < 8:
            raise DataError(f"{self.path}: truncated record header at byte offset {offset} (file size "
                            f"{self.size}): the file is cut short or train.idx does not belong to it")
        magic, lrec = struct.unpack("<II", head)
        if magic != MAGIC:
            raise DataError(f"{self.path}: no RecordIO record at byte offset {offset} (magic {magic:#010x}, "
                            f"expected {MAGIC:#010x}): train.idx does not match train.rec, or it is not a .rec file")
        length = lrec & _LEN_MASK
        payload = self._read(offset + 8, length)
        if len(payload) < length:
            raise DataError(f"{self.path}: record at byte offset {offset} needs {length} bytes but the file ends "
                            f"at {self.size}: the file is truncated (copy it again)")
        return lrec >> 29, payload, offset + 8 + length + (-length % 4)

    def read(self, offset: int) -> bytes:
        """The payload of the record at `offset`, its parts joined."""
        if not 0 <= offset < self.size:
            raise DataError(f"{self.path}: train.idx points to byte offset {offset}, past the end of the file "
                            f"({self.size} bytes): the .rec is truncated or the .idx belongs to another file")
        cflag, payload, nxt = self._part(offset)
        if cflag == 0:
            return payload
        if cflag != 1:
            raise DataError(f"{self.path}: byte offset {offset} is the middle of a split record (cflag {cflag}): "
                            "train.idx does not match train.rec")
        parts = [payload]
        while cflag != 3:
            cflag, payload, nxt = self._part(nxt)
            if cflag not in (2, 3):
                raise DataError(f"{self.path}: split record starting at byte offset {offset} is broken "
                                f"(part with cflag {cflag})")
            parts.append(payload)
        return _MAGIC_BYTES.join(parts)

    def header(self, offset: int) -> tuple[int, np.ndarray]:
        """(flag, labels) of the image record at `offset`, reading only its first bytes when whole."""
        head = self._read(offset, 8 + _IR.size + 8)
        if len(head) >= 8 + _IR.size and struct.unpack("<I", head[:4])[0] == MAGIC and head[7] >> 5 == 0:
            length = struct.unpack("<I", head[4:8])[0] & _LEN_MASK
            flag = struct.unpack_from("<I", head, 8)[0]
            if flag <= 2 and length >= _IR.size + 8 and offset + 8 + length <= self.size:  # labels all in `head`
                return unpack_header(head[8:], self.path, offset)[:2]
        return unpack_header(self.read(offset), self.path, offset)[:2]


def unpack_header(payload: bytes, path: str = "", offset: int = 0) -> tuple[int, np.ndarray, bytes]:
    """(flag, labels, image bytes) of an image record payload (labels: float32, 1 or `flag` values)."""
    if len(payload) < _IR.size:
        raise DataError(f"{path}: record at byte offset {offset} has {len(payload)} bytes, too short for the "
                        f"{_IR.size}-byte image header: not an insightface/MXNet image record")
    flag, label, _, _ = _IR.unpack_from(payload)
    if flag == 0:
        return 0, np.array([label], np.float32), payload[_IR.size:]
    end = _IR.size + 4 * flag
    if flag > 1 << 20 or len(payload) < end:
        raise DataError(f"{path}: record at byte offset {offset} claims {flag} labels, more than it holds: "
                        "not an insightface/MXNet image record")
    return flag, np.frombuffer(payload[_IR.size:end], "<f4").copy(), payload[end:]


def read_index(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(keys, offsets) of a .idx file, sorted by key."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # an empty file: reported below
            table = np.loadtxt(path, dtype=np.int64, delimiter="\t", ndmin=2)  # C parser: millions of lines
        if table.size and table.shape[1] != 2:
            raise ValueError(table.shape)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    except ValueError:
        raise DataError(f"{path} is not a RecordIO index: expected one 'key<TAB>offset' line per record") from None
    if not len(table):
        raise DataError(f"{path} is empty: no records")
    order = np.argsort(table[:, 0], kind="stable")
    return table[order, 0], table[order, 1]


def rec_paths(cfg: Mapping) -> tuple[Path, Path]:
    value = _get(cfg, "root", None)
    if not value:
        raise DataError("data.root is required: pass data.root=DIR, the folder holding train.rec and train.idx")
    root = Path(str(value)).expanduser()
    rec, idx = root / str(_get(cfg, "rec", "train.rec")), root / str(_get(cfg, "idx", "train.idx"))
    for p in (rec, idx):
        if not p.is_file():
            raise DataError(f"{p} not found: data=rec reads DIR/train.rec and DIR/train.idx "
                            "(an insightface training folder, e.g. faces_emore/)")
    return rec, idx


def scan(rec_path: Path, idx_path: Path, cache_dir) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keys, offsets, int labels) of every image record, in key order; cached beside the face caches."""
    st_r, st_i = os.stat(rec_path), os.stat(idx_path)
    key = [str(rec_path.resolve()), st_r.st_size, st_r.st_mtime_ns, st_i.st_size, st_i.st_mtime_ns]
    digest = hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16]
    npz = Path(cache_dir) / "faces" / f"rec-labels-{digest}.npz"
    if npz.exists():
        try:
            with np.load(npz) as z:
                return z["keys"], z["offsets"], z["labels"]
        except (OSError, ValueError, KeyError):
            log.warning("record label cache %s is unreadable: scanning again", npz)
    keys, offsets = read_index(idx_path)
    rf = RecordFile(rec_path)
    flag, lab = rf.header(int(offsets[0])) if keys[0] == 0 else (0, None)
    if keys[0] == 0 and flag > 0 and len(lab) >= 2:  # insightface: images are keys 1..label[0]-1
        end = int(lab[0])
        sel = (keys >= 1) & (keys < end)
        if sel.sum() != end - 1:
            raise DataError(f"{idx_path}: record 0 says images are keys 1..{end - 1}, but the index holds "
                            f"{int(sel.sum())} of them: the .idx is incomplete")
        keys, offsets = keys[sel], offsets[sel]
    t0, last = time.monotonic(), time.monotonic()
    labels = np.empty(len(offsets), np.int64)
    for i, off in enumerate(offsets):
        labels[i] = int(rf.header(int(off))[1][0])
        if time.monotonic() - last > 30:
            last = time.monotonic()
            log.info("scanning %s: %d/%d record headers", rec_path, i + 1, len(offsets))
    if len(labels) and labels.min() < 0:
        raise DataError(f"{rec_path}: negative identity label {labels.min()}: not an insightface training set")
    npz.parent.mkdir(parents=True, exist_ok=True)
    tmp = npz.with_name(f"{npz.stem}.tmp{os.getpid()}.npz")
    np.savez(tmp, keys=keys, offsets=offsets, labels=labels)
    os.replace(tmp, npz)
    log.info("%s: %d image records of %d identities (header scan %.1f s)", rec_path, len(labels),
             len(np.unique(labels)), time.monotonic() - t0)
    return keys, offsets, labels


# ------------------------------------------------------------------------------------ the data source

class RecordImages:
    """The images of one split of a .rec set, as a source of `cycle.data.chunked`."""

    def __init__(self, rec: RecordFile, offsets: np.ndarray, size: int, resize: str):
        self.rec, self.offsets, self.size, self.resize = rec, offsets, size, resize

    def __len__(self) -> int:
        return len(self.offsets)

    def name(self, i: int) -> str:
        return f"{self.rec.path} (record at byte offset {int(self.offsets[i])})"

    def load(self, i: int) -> np.ndarray:
        offset = int(self.offsets[i])
        _, _, image = unpack_header(self.rec.read(offset), self.rec.path, offset)
        return load_image(io.BytesIO(image), self.size, self.resize)


def _rec_splits(cfg: Mapping, cache_dir) -> dict[str, FaceSet]:
    seed, size, resize = source_options(cfg)
    rec_path, idx_path = rec_paths(cfg)
    keys, offsets, labels = scan(rec_path, idx_path, cache_dir)
    if not len(offsets):
        raise DataError(f"{rec_path} holds no image records")
    order = np.argsort(labels, kind="stable")  # records grouped by identity, in file order within one
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    found = {str(int(labels[g[0]])): [int(i) for i in g] for g in np.split(order, bounds)}
    found = _select(cfg, found, seed)
    parts = split_identities(list(found), _get(cfg, "split"), seed)
    log.info("%s: %d identities, %d images; split train/val/test = %s identities", rec_path, len(found),
             sum(map(len, found.values())), "/".join(str(len(parts[s])) for s in SPLITS))
    st = os.stat(rec_path)
    rf = RecordFile(rec_path)
    out = {}
    for split in SPLITS:
        rows = np.array([i for m in parts[split] for i in found[m]], np.int64)
        files = [f"{m}/{int(keys[i])}" for m in parts[split] for i in found[m]]  # identity/record key
        key = {"v": CACHE_VERSION, "rec": str(rec_path.resolve()), "bytes": st.st_size, "mtime": st.st_mtime_ns,
               "size": size, "resize": resize, "rows": hashlib.sha1(rows.tobytes()).hexdigest()}
        source = RecordImages(rf, offsets[rows], size, resize)
        out[split] = source_split(cfg, cache_dir, split, source, files, key, str(rec_path), size)
    return out
