"""`make bench` (data scale): a large JPEG identity folder, its first-use cache build and the loaders on it.

    python -m bench.data_scale                          # 200,000 images (written once under --root)
    python -m bench.data_scale --images 20000 --out /tmp/b

Writes a `--images` JPEG set (the synthetic renderer, `--per-identity` images per identity) once, then
measures: the cache build of `data.cache=disk` in a fresh process (images/s, peak RSS of the building
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

from PIL import Image

from bench.common import compose, fmt, loader_throughput, md_table

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 2048  # images rendered per block while writing the set

BUILD = """
import json, resource, sys, time
from omegaconf import OmegaConf
from cycle.data import build_splits
cfg = OmegaConf.create(json.loads(sys.argv[1]))
rss = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:")][0]
t0 = time.perf_counter()
faces = build_splits(cfg, sys.argv[2])["train"]
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "n": len(faces), "cache": faces.cache_path, "rss_before": rss,
                  "rss_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
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


def data_cfg(root: Path, cache: str, workers: int) -> dict:
    return {"name": "scale", "root": str(root), "split": {"val": 0, "test": 0}, "cache": cache,
            "prepare_workers": workers, "image_size": 112}


def build_cache(root: Path, cache_dir: Path, workers: int) -> dict:
    if cache_dir.exists():
        shutil.rmtree(cache_dir)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", BUILD, json.dumps(data_cfg(root, "disk", workers)), str(cache_dir)],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["images_per_s"] = r["n"] / r["seconds"]
    r["disk_bytes_per_image"] = os.path.getsize(r["cache"]) / r["n"]
    return r


def loaders(root: Path, cache_dir: Path, workers_list, batches: int, batch: int) -> dict:
    from omegaconf import OmegaConf

    from cycle.data import build_splits, make_loader

    cfg = compose()  # the default degradation and augmentation, as training uses them
    out = {}
    for mode in ("disk", "none"):
        faces = build_splits(OmegaConf.create(data_cfg(root, mode, 1)), cache_dir)["train"]
        for w in workers_list:
            loader = make_loader(faces, batch_size=batch, res=16, degradation=cfg.degradation, train=True,
                                 augment=cfg.data.augment, num_workers=w, seed=0)
            out[f"{'cached' if mode == 'disk' else 'streaming'}/{w}"] = loader_throughput(loader, batches)
            del loader
    return out


def render_markdown(r: dict) -> str:
    b, s, x = r["build"], r["set"], r["extrapolated"]
    lines = [f"Measured on {r['images']:,} JPEG images ({r['identities']:,} identities, {s['bytes_per_image']:.0f} "
             f"bytes per JPEG), {r['cpus']} CPU core(s) (load average {r.get('load_average', float('nan')):.1f} "
             "at the end), "
             f"{r['prepare_workers']} decoding process(es).", "",
             md_table(["cache build", "value"], [
                 ["images/s", fmt(b["images_per_s"], ".0f")],
                 ["disk bytes per image (uint8 112x112x3 + header)", fmt(b["disk_bytes_per_image"], ".0f")],
                 ["RSS of the process before the build, after imports (MiB)", fmt(b["rss_before"] / 2 ** 20, ".0f")],
                 ["peak RSS, building process (MiB)", fmt(b["rss_self"] / 2 ** 20, ".0f")],
                 ["peak RSS, largest decoding worker, forked from it (MiB)", fmt(b["rss_children"] / 2 ** 20, ".0f")],
                 ["wall time (s)", fmt(b["seconds"], ".1f")]]), "",
             md_table(["loader (batch %d, res 16, augmentation + degradation)" % r["batch"], "samples/s"],
                      [[k.replace("/", ", ") + " worker(s)", fmt(v, ".0f")] for k, v in r["loader"].items()]), "",
             f"Extrapolated to {x['images']:,} images: cache build {x['build_hours']:.1f} h at the measured rate "
             f"({r['prepare_workers']} process(es); it scales with decoding processes), cache size "
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
    ap.add_argument("--extrapolate", type=int, default=3_300_000)
    args = ap.parse_args(argv)

    def say(msg):
        print(f"[data_scale] {msg}", file=sys.stderr, flush=True)

    root = Path(args.root) / f"n{args.images}"
    cache_dir = Path(args.root) / f"cache_n{args.images}"
    s = write_set(root, args.images, args.per_identity, args.workers, say)
    say("cache build (fresh process)")
    b = build_cache(root, cache_dir, args.workers)
    say(f"cache build: {b['images_per_s']:.0f} img/s; loaders")
    lo = loaders(root, cache_dir, (0, 2), args.batches, args.batch)
    n = args.extrapolate
    r = {"load_average": os.getloadavg()[0], "images": args.images,
         "identities": -(-args.images // args.per_identity), "cpus": os.cpu_count(),
         "prepare_workers": min(args.workers, max(1, args.images // 200)), "batch": args.batch, "set": s, "build": b,
         "loader": lo, "extrapolated": {"images": n, "build_hours": n / b["images_per_s"] / 3600,
                                        "cache_gb": n * b["disk_bytes_per_image"] / 1e9,
                                        "source_gb": n * s["bytes_per_image"] / 1e9}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_scale.json").write_text(json.dumps(r, indent=2, default=float))
    (out / "data_scale.md").write_text(render_markdown(r))
    print(render_markdown(r))
    return r


if __name__ == "__main__":
    main()
