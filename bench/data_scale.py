"""`make bench` (data scale): a large JPEG identity folder, its first-use cache build and the loaders on it.

    python -m bench.data_scale                          # 200,000 images (written once under --root)
    python -m bench.data_scale --images 20000 --out /tmp/b

Writes a `--images` JPEG set (the synthetic renderer, `--per-identity` images per identity) once, then
measures, for the folder and for the same images as an insightface train.rec (`--sources`): the cache
build of `data.cache=disk` in a fresh process (images/s, peak RSS of the building
process and of its decoding workers, disk bytes per image), and loader samples/s with 0 and 2 workers,
cached and streaming (`data.cache=none`). Extrapolates build time and disk to `--extrapolate` images
(3.3M: VGGFace2). Results: data_scale.json and data_scale.md in --out.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import compose, fmt, loader_throughput, md_table

ROOT = Path(__file__).resolve().parent.parent
MiB = 2 ** 20
BLOCK = 2048  # images rendered per block while writing the set

BUILD = """
import json, resource, sys, time
from omegaconf import OmegaConf
from cycle.data import build_splits
cfg = OmegaConf.create(json.loads(sys.argv[1]))
status = lambda key: [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key)][0]
rss = status("VmRSS:")
t0 = time.perf_counter()
faces = build_splits(cfg, sys.argv[2])["train"]
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "n": len(faces), "cache": faces.cache_path, "rss_before": rss,
                  "rss_self": status("VmHWM:"),  # not ru_maxrss: Linux carries the parent's peak across exec
                  "rss_children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""


def write_set(root: Path, images: int, per: int, workers: int, say) -> dict:
    """root/id<k>/<j>.jpg, rendered by cycle.data.render; skipped when a complete set is there."""
    from cycle.data import render

    marker = root / ".complete"
    if marker.exists() and json.loads(marker.read_text()).get("images") == images:
        say(f"JPEG set: {root} ({images} images) already written")
        return json.loads(marker.read_text())
    if root.exists():
        shutil.rmtree(root)
    t0, jobs = time.perf_counter(), [(i // per, i % per) for i in range(images)]
    for start in range(0, images, BLOCK):
        block = render.render_many(jobs[start:start + BLOCK], seed=0, num_looks=16, workers=workers)
        for (ident, j), img in zip(jobs[start:start + BLOCK], block):
            d = root / f"id{ident:06d}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{j:03d}.jpg", quality=90)
        say(f"JPEG set: {min(start + BLOCK, images)}/{images} images")
    nbytes = sum(f.stat().st_size for d in root.iterdir() for f in d.iterdir())
    info = {"images": images, "seconds": time.perf_counter() - t0, "bytes_per_image": nbytes / images}
    marker.write_text(json.dumps(info))
    return info


def write_rec_set(root: Path, rec_dir: Path, say) -> None:
    """The same JPEGs as an insightface train.rec/train.idx (record 0, images, identity records); once."""
    from cycle.data.recordio import pack_image, write_rec

    marker = rec_dir / ".complete"
    if marker.exists():
        return
    rec_dir.mkdir(parents=True, exist_ok=True)
    ids = sorted(d for d in root.iterdir() if d.is_dir())
    files = [(k, f) for k, d in enumerate(ids) for f in sorted(d.iterdir())]
    n = len(files)
    counts = np.bincount([k for k, _ in files], minlength=len(ids))
    starts = 1 + np.concatenate([[0], np.cumsum(counts)[:-1]])

    def records():
        yield 0, pack_image([n + 1, n + 1 + len(ids)], b"")
        for i, (k, f) in enumerate(files):
            yield i + 1, pack_image(k, f.read_bytes())
        for k in range(len(ids)):
            yield n + 1 + k, pack_image([starts[k], starts[k] + counts[k]], b"")
    write_rec(rec_dir / "train", records())
    marker.write_text("ok")
    say(f"RecordIO set: {rec_dir / 'train.rec'} ({n} images)")


def data_cfg(root: Path, cache: str, workers: int, source: str = "folder") -> dict:
    cfg = {"name": f"scale_{source}", "root": str(root), "split": {"val": 0, "test": 0}, "cache": cache,
           "prepare_workers": workers, "image_size": 112}
    return {**cfg, "rec": "train.rec", "idx": "train.idx"} if source == "rec" else cfg


def build_cache(root: Path, cache_dir: Path, workers: int, source: str = "folder") -> dict:
    if cache_dir.exists():
        shutil.rmtree(cache_dir)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cfg = json.dumps(data_cfg(root, "disk", workers, source))
    out = subprocess.run([sys.executable, "-c", BUILD, cfg, str(cache_dir)],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["images_per_s"] = r["n"] / r["seconds"]
    r["disk_bytes_per_image"] = os.path.getsize(r["cache"]) / r["n"]
    return r


def loaders(root: Path, cache_dir: Path, workers_list, batches: int, batch: int, source: str = "folder") -> dict:
    from omegaconf import OmegaConf

    from cycle.data import build_splits, make_loader

    cfg = compose()  # the default degradation and augmentation, as training uses them
    out = {}
    for mode in ("disk", "none"):
        faces = build_splits(OmegaConf.create(data_cfg(root, mode, 1, source)), cache_dir)["train"]
        for w in workers_list:
            loader = make_loader(faces, batch_size=batch, res=16, degradation=cfg.degradation, train=True,
                                 augment=cfg.data.augment, num_workers=w, seed=0)
            out[f"{'cached' if mode == 'disk' else 'streaming'}/{w}"] = loader_throughput(loader, batches)
            del loader
    return out


def render_markdown(r: dict) -> str:
    s, x, srcs = r["set"], r["extrapolated"], list(r["build"])
    build = [["images/s"] + [fmt(r["build"][k]["images_per_s"], ".0f") for k in srcs],
             ["disk bytes per image (uint8 112x112x3 + header)"]
             + [fmt(r["build"][k]["disk_bytes_per_image"], ".0f") for k in srcs],
             ["RSS before the build, after imports (MiB)"]
             + [fmt(r["build"][k]["rss_before"] / MiB, ".0f") for k in srcs],
             ["peak RSS, building process (MiB)"] + [fmt(r["build"][k]["rss_self"] / MiB, ".0f") for k in srcs],
             ["peak RSS, largest decoding worker, forked from it (MiB)"]
             + [fmt(r["build"][k]["rss_children"] / MiB, ".0f") for k in srcs],
             ["wall time (s)"] + [fmt(r["build"][k]["seconds"], ".1f") for k in srcs]]
    keys = list(r["loader"][srcs[0]])
    loader = [[k.replace("/", ", ") + " worker(s)"] + [fmt(r["loader"][src][k], ".0f") for src in srcs] for k in keys]
    lines = [f"Measured on {r['images']:,} JPEG images ({r['identities']:,} identities, {s['bytes_per_image']:.0f} "
             f"bytes per JPEG), {r['cpus']} CPU core(s) (load average {r.get('load_average', float('nan')):.1f} "
             f"at the end), {r['prepare_workers']} decoding process(es).", "",
             md_table(["cache build"] + srcs, build), "",
             md_table([f"loader samples/s (batch {r['batch']}, res 16, augmentation + degradation)"] + srcs, loader),
             "", f"Extrapolated to {x['images']:,} images ({srcs[0]}): cache build {x['build_hours']:.1f} h at the "
             f"measured rate ({r['prepare_workers']} process(es); it scales with decoding processes), cache size "
             f"{x['cache_gb']:.0f} GB (JPEG source {x['source_gb']:.0f} GB); peak RSS stays at the measured values "
             "(chunked writes, no whole-split array)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], prog="python -m bench.data_scale")
    ap.add_argument("--images", type=int, default=200_000, help="size of the JPEG set")
    ap.add_argument("--per-identity", type=int, default=20)
    ap.add_argument("--root", default=str(ROOT / ".cache" / "bench_faces"), help="where the JPEG set is written")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent), help="folder for data_scale.json/.md")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding/rendering processes")
    ap.add_argument("--batches", type=int, default=30, help="timed loader batches")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--sources", nargs="+", choices=("folder", "rec"), default=["folder", "rec"],
                    help="the JPEG folder and/or the same images as train.rec")
    ap.add_argument("--extrapolate", type=int, default=3_300_000)
    args = ap.parse_args(argv)

    def say(msg):
        print(f"[data_scale] {msg}", file=sys.stderr, flush=True)

    folder = Path(args.root) / f"n{args.images}"
    s = write_set(folder, args.images, args.per_identity, args.workers, say)
    builds, loads = {}, {}
    for src in args.sources:
        root = folder if src == "folder" else Path(args.root) / f"rec_n{args.images}"
        if src == "rec":
            write_rec_set(folder, root, say)
        cache_dir = Path(args.root) / f"cache_{src}_n{args.images}"
        say(f"{src}: cache build (fresh process)")
        builds[src] = build_cache(root, cache_dir, args.workers, src)
        say(f"{src}: cache build {builds[src]['images_per_s']:.0f} img/s; loaders")
        loads[src] = loaders(root, cache_dir, (0, 2), args.batches, args.batch, src)
    first, n = builds[args.sources[0]], args.extrapolate
    r = {"load_average": os.getloadavg()[0], "images": args.images,
         "identities": -(-args.images // args.per_identity), "cpus": os.cpu_count(),
         "prepare_workers": min(args.workers, max(1, args.images // 200)), "batch": args.batch, "set": s,
         "build": builds, "loader": loads,
         "extrapolated": {"images": n, "build_hours": n / first["images_per_s"] / 3600,
                          "cache_gb": n * first["disk_bytes_per_image"] / 1e9,
                          "source_gb": n * s["bytes_per_image"] / 1e9}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_scale.json").write_text(json.dumps(r, indent=2, default=float))
    (out / "data_scale.md").write_text(render_markdown(r))
    print(render_markdown(r))
    return r


if __name__ == "__main__":
    main()
