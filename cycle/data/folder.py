"""Folder datasets (`data=folder`, `data=orl`): root/<identity>/<image>, scanned, split and decoded into the cache."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image

from cycle.data.cache import CACHE_VERSION
from cycle.data.chunked import source_options, source_split
from cycle.data.faceset import FaceSet
from cycle.data.options import DataError, _get, _plain
from cycle.data.splits import SPLITS, _select, split_identities

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".pgm", ".ppm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")


def _kind(entry: os.DirEntry, rel: str, broken: list[str]) -> str | None:
    """"dir", "file" or None. A symlink loop, dangling link or unreadable entry is noted in `broken`
    (and skipped by the caller) instead of ending the scan with an OSError."""
    try:
        if entry.is_dir():
            return "dir"
        if entry.is_file():
            return "file"
        if entry.is_symlink():  # is_dir/is_file follow links and say False for a dangling one
            broken.append(f"{rel} (dangling link to {os.readlink(entry.path)})")
    except OSError as e:  # ELOOP: a link that points (through others) back at itself
        broken.append(f"{rel} ({e.strerror or e})")
    return None


def _scan_folder(cfg: Mapping) -> tuple[Path, dict[str, list[str]]]:
    """root/<identity>/<image> -> {identity: sorted image file names}; clear errors for bad layouts."""
    value = _get(cfg, "root", None)
    if not value:
        raise DataError("data.root is required: pass data.root=/path/to/faces (one sub-folder per identity)")
    root = Path(str(value)).expanduser()
    if not root.exists():
        raise DataError(f"data.root={root} does not exist")
    if not root.is_dir():
        raise DataError(f"data.root={root} is not a directory (expected one sub-folder per identity)")
    exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}"
                 for e in (_plain(_get(cfg, "extensions", None)) or IMAGE_EXTENSIONS))
    broken: list[str] = []
    entries = sorted((e for e in os.scandir(root) if not e.name.startswith(".")), key=lambda e: e.name)
    kinds = {e.name: _kind(e, e.name, broken) for e in entries}
    dirs = [e for e in entries if kinds[e.name] == "dir"]
    if not dirs:
        loose = sum(1 for e in entries if kinds[e.name] == "file" and e.name.lower().endswith(exts))
        if loose:
            raise DataError(f"data.root={root} holds {loose} images but no identity sub-folders: "
                            f"expected root/<identity>/<image>")
        raise DataError(f"data.root={root} is empty: expected one sub-folder per identity")
    found, ignored, empty = {}, [], []
    for d in dirs:
        try:
            listing = list(os.scandir(d.path))
        except OSError as e:
            broken.append(f"{d.name}/ ({e.strerror or e})")
            continue
        files = sorted(f.name for f in listing
                       if not f.name.startswith(".") and _kind(f, f"{d.name}/{f.name}", broken) == "file")
        images = [f for f in files if f.lower().endswith(exts)]
        ignored += [f"{d.name}/{f}" for f in files if not f.lower().endswith(exts)]
        if images:
            found[d.name] = images
        else:
            empty.append(d.name)
    if broken:
        log.warning("data.root=%s: skipped %d broken entr%s (symlink loops, dangling links, unreadable): %s",
                    root, len(broken), "y" if len(broken) == 1 else "ies",
                    "; ".join(broken[:5]) + (" ..." if len(broken) > 5 else ""))
    if ignored:
        log.info("data.root=%s: ignored %d non-image file(s), e.g. %s",
                 root, len(ignored), ", ".join(ignored[:3]))
    if not found:
        raise DataError(f"data.root={root}: no image files ({', '.join(exts)}) in any of its {len(dirs)} "
                        f"sub-folder(s); {len(ignored)} other file(s) ignored")
    if empty:
        log.warning("data.root=%s: %d identity folder(s) without images skipped: %s",
                    root, len(empty), ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else ""))
    return root, found


def load_image(path, size: int = 112, resize: str = "resize") -> np.ndarray:
    """Any Pillow-readable image -> uint8 (size, size, 3). `resize`: 'resize' (whole image,
    aspect not kept) or 'center_crop' (central square, then resize). Raises OSError/ValueError."""
    with Image.open(path) as im:
        im.load()  # decodes fully: truncated files fail here, not later
        if im.mode.startswith("I;16") or im.mode in ("I", "F"):  # 16-bit/float greyscale: rescale, don't clip
            arr = np.asarray(im, np.float32)
            top = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1e-6)
            im = Image.fromarray((np.clip(arr / top, 0, 1) * 255 + 0.5).astype(np.uint8))
        im = im.convert("RGB")
        if resize == "center_crop":
            w, h = im.size
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        return np.asarray(im, np.uint8)


class FolderImages:
    """The images of one split of a folder dataset, as a source of `cycle.data.chunked`."""

    def __init__(self, root: Path, files: list[str], size: int, resize: str):
        self.root, self.files, self.size, self.resize = root, files, size, resize

    def __len__(self) -> int:
        return len(self.files)

    def name(self, i: int) -> str:
        return str(self.root / self.files[i])

    def load(self, i: int) -> np.ndarray:
        return load_image(self.root / self.files[i], self.size, self.resize)


def _folder_split(cfg, cache_dir, root: Path, split: str, members: list[str], found, size, resize) -> FaceSet:
    files = [f"{m}/{f}" for m in members for f in found[m]]
    stats = []
    for f in files:
        st = os.stat(root / f)
        stats.append([f, st.st_size, st.st_mtime_ns])
    key = {"v": CACHE_VERSION, "root": str(root.resolve()), "size": size, "resize": resize, "files": stats}
    return source_split(cfg, cache_dir, split, FolderImages(root, files, size, resize), files, key, str(root), size)


def _folder_splits(cfg: Mapping, cache_dir) -> dict[str, FaceSet]:
    seed, size, resize = source_options(cfg)  # a bad value fails before the scan
    root, found = _scan_folder(cfg)
    found = _select(cfg, found, seed)
    parts = split_identities(list(found), _get(cfg, "split"), seed)
    log.info("data.root=%s: %d identities, %d images; split train/val/test = %s identities", root, len(found),
             sum(map(len, found.values())), "/".join(str(len(parts[s])) for s in SPLITS))
    out = {s: _folder_split(cfg, cache_dir, root, s, parts[s], found, size, resize) for s in SPLITS}
    for s in SPLITS:
        if parts[s] and not len(out[s]):  # not "split empty": its images exist but none decodes
            n = sum(len(found[m]) for m in parts[s])
            raise DataError(f"none of the {n} image file(s) of the {s} split under {root} could be decoded (the "
                            "warning above lists them with the reasons): they are corrupt or not images; "
                            "replace or remove them")
    return out
