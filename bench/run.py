"""`make bench`: training-step speed, FLOPs and memory of every stage; the DSR against the prototype's;
data loading; evaluation (pair scoring, bootstrap intervals). Writes results.json and results.md (a markdown
table) into --out.

    python -m bench.run                      # CPU, 2 threads, everything (< 10 min on a 2-core CPU)
    python -m bench.run --device cuda        # GPU: bf16 autocast where supported
    python -m bench.run --device cuda --compile
    python -m bench.run --quick --out /tmp/b # tiny sizes (the test)

The machine may be shared, so absolute figures drift: every figure is a median of repeated
steps, compute is reported against a matmul peak measured in the same run, and the DSR is
compared with the prototype's DSR by timing both interleaved in this process.
"""
from __future__ import annotations

import os

# Before torch loads OpenMP: on a shared, oversubscribed CPU, spinning OpenMP threads made 2-thread
# training steps ~10x slower than 1 thread (measured); passive waiting costs little on an idle one.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.common import (PeakMemory, compose, fmt, interleaved, loader_throughput, machine, matmul_peak, md_table,
                          median, time_steps)

STAGES = ("initial", "cyclic", "edgeface_ft", "edgeface_pretrain")
TINY_DSR = {"channels": 8, "num_blocks": 1, "up_channels": [8, 8]}  # --quick: same code, toy sizes
TINY_PROTOTYPE = {"channels": 8, "num_blocks": 1, "num_transformer": 1, "transformer_dim": 16, "up": (8, 8)}
MiB = 2 ** 20


# ---------------------------------------------------------------- train steps

class _Graph(nn.Module):
    """A loss computation as a module, so cycle.flops counts one whole training step."""

    def __init__(self, fn: Callable, **modules: nn.Module):
        super().__init__()
        self.fn = fn
        for name, m in modules.items():
            self.add_module(name, m)

    def forward(self, *inputs):
        return self.fn(*inputs)


@dataclass
class TrainStep:
    step: Callable[[], None]       # one optimizer step on a fixed batch
    graph: nn.Module               # the same loss, uncompiled, for FLOP counting
    flop_inputs: tuple             # one-image inputs of `graph`
    params: int                    # trained parameters


def _optimizer_step(loss_fn: Callable[[], torch.Tensor], opt, params, device, dtype, clip: float,
                    ema=None) -> Callable[[], None]:
    """What cycle.training.Trainer does per step: autocast forward, (scaled) backward, clip, step, EMA."""
    from cycle.device import autocast

    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step():
        with autocast(device, dtype):
            loss = loss_fn()
        scaler.scale(loss).backward()
        if clip > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update()
    return step


def _batch(res: int | None, batch: int, device, num_classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lr = torch.rand(batch, 3, res, res, generator=g).to(device) if res else None
    hr = torch.rand(batch, 3, 112, 112, generator=g).to(device)
    y = torch.randint(0, num_classes, (batch,), generator=g).to(device)
    return lr, hr, y


def build_dsr(cfg, device, tiny: bool = False) -> nn.Module:
    from hydra.utils import instantiate

    return instantiate(cfg.dsr, **(TINY_DSR if tiny else {})).to(device)


def build_stage_step(stage: str, cfg, *, batch: int, device: torch.device, num_classes: int,
                     dtype: torch.dtype | None = None, compile: bool = False, tiny: bool = False) -> TrainStep:
    """The train step of `stage` for cfg.res, on a fixed random batch (no data loading).

    initial / cyclic: DSR fwd+bwd with the real DSRLoss (pixel + identity + feature match) through a
    frozen, differentiable EdgeFace; AdamW, grad clipping, EMA. edgeface_ft: phase 2 of
    edgeface.finetune: DSR forward under no_grad, `ft_loss` (EdgeFace fwd+bwd on SR, forward on HR as
    a stop-gradient target, margin + align loss). edgeface_pretrain: EdgeFace + margin head on HR.
    """
    import edgeface
    from cycle.config import to_plain
    from cycle.training import EMA
    from cycle.models import freeze
    from dsr.losses import DSRLoss

    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}")
    s = cfg.stages[stage]
    variant = str(cfg.edgeface.variant)
    clip = float(cfg.trainer.get("grad_clip") or 0)
    res = None if stage == "edgeface_pretrain" else int(cfg.res)
    lr_img, hr, y = _batch(res, batch, device, num_classes)
    one = _batch(res, 1, device, num_classes, seed=1)

    if stage in ("initial", "cyclic"):
        dsr = build_dsr(cfg, device, tiny).train()
        loss_fn = DSRLoss(edgeface.build(variant), **to_plain(s.loss)).to(device)
        net = torch.compile(dsr) if compile else dsr
        opt = torch.optim.AdamW(dsr.parameters(), lr=float(s.lr), betas=tuple(s.betas),
                                weight_decay=float(s.weight_decay))
        step = _optimizer_step(lambda: loss_fn(net(lr_img), hr, y)[0], opt, list(dsr.parameters()), device,
                               dtype, clip, EMA(dsr, float(s.ema_decay)))
        graph = _Graph(lambda a, b: loss_fn(dsr(a), b)[0], dsr=dsr, loss=loss_fn)
        return TrainStep(step, graph, one[:2], sum(p.numel() for p in dsr.parameters()))

    from edgeface.finetune import ft_loss
    from edgeface.pretrain import margin_loss, train_accuracy

    model = edgeface.build(variant).to(device).train()
    head = edgeface.build_head(str(s.head), edgeface.EMBEDDING_SIZE, num_classes, scale=float(s.scale),
                               margin=float(s.margin)).to(device)
    net = torch.compile(model) if compile else model
    params = list(model.parameters()) + list(head.parameters())
    n_params = sum(p.numel() for p in params)
    if stage == "edgeface_pretrain":  # edgeface.pretrain's step_fn
        opt = torch.optim.AdamW(params, lr=float(s.lr), weight_decay=float(s.weight_decay))

        def pretrain_loss(m, b, t):
            emb = m(b)
            train_accuracy(head, emb, t)  # logged every step by the stage
            return margin_loss(head, emb, t)
        step = _optimizer_step(lambda: pretrain_loss(net, hr, y), opt, params, device, dtype, clip)
        graph = _Graph(lambda b, t: pretrain_loss(model, b, t), model=model, head=head)
        return TrainStep(step, graph, one[1:], n_params)

    # edgeface.finetune's phase 2 (the backbone trains; phase 1 trains only the head and costs less)
    dsr = freeze(build_dsr(cfg, device, tiny))
    lr = float(s.lr)
    opt = torch.optim.AdamW([{"params": list(model.parameters()), "lr": lr * float(s.backbone_lr_mult)},
                             {"params": list(head.parameters()), "lr": lr}], lr=lr, weight_decay=float(s.weight_decay))

    def phase2_loss(m, a, b, t):
        with torch.no_grad():
            sr = dsr(a)
        return ft_loss(m, head, sr, b, t, lambda_align=float(s.lambda_align), train_backbone=True)[0]
    step = _optimizer_step(lambda: phase2_loss(net, lr_img, hr, y), opt, params, device, dtype, clip)
    graph = _Graph(lambda a, b, t: phase2_loss(model, a, b, t), model=model, head=head, dsr=dsr)
    return TrainStep(step, graph, one, n_params)


def count_gflops(graph: nn.Module, inputs: tuple) -> float:
    """GFLOPs of one image's forward+backward (cycle.flops; trainable parameters only)."""
    from cycle.flops import count_flops

    batch = next(x for x in inputs if x is not None).shape[0]
    return count_flops(graph, *inputs, backward=True) / batch / 1e9


def grouped_conv_overcounted() -> bool:
    """True while cycle.flops counts a grouped conv's weight gradient as if it were dense (torch's formula
    ignores `groups`), which inflates every figure with EdgeFace weight gradients (its depthwise convs)."""
    from cycle.flops import count_flops

    conv, x = nn.Conv2d(8, 8, 3, groups=8), torch.rand(1, 8, 8, 8)
    return count_flops(conv, x, backward=True) > 2.5 * count_flops(conv, x, backward=False)


def train_classes(cfg) -> int:
    """Identities in the training split of the configured synthetic data (sizes the margin heads)."""
    from cycle.data import split_identities

    n = int(cfg.data.get("num_identities") or 300)
    return len(split_identities([f"id{i:05d}" for i in range(n)], cfg.data.split, int(cfg.data.seed))["train"])


def bench_stage(stage: str, res: int | str, *, batch: int = 32, device: torch.device | str = "cpu",
                dtype: torch.dtype | None = None, compile: bool = False, steps: int = 8, warmup: int = 1,
                budget_s: float | None = 20.0, tiny: bool = False, cfg=None, num_classes: int | None = None) -> dict:
    """Images/s (median step), GFLOPs per image fwd+bwd and peak memory of one stage's train step."""
    device = torch.device(device)
    cfg = cfg if cfg is not None else compose([f"res={res}"])
    num_classes = num_classes or train_classes(cfg)
    with PeakMemory(device) as mem:
        ts = build_stage_step(stage, cfg, batch=batch, device=device, num_classes=num_classes, dtype=dtype,
                              compile=compile, tiny=tiny)
        times = time_steps(ts.step, device, steps, warmup + (2 if compile else 0), budget_s)
    gflop = count_gflops(ts.graph, ts.flop_inputs)
    t = median(times)
    return {"stage": stage, "res": None if stage == "edgeface_pretrain" else int(cfg.res), "batch": batch,
            "img_per_s": batch / t, "step_s": times, "gflop_per_img": gflop, "gflop_per_s": gflop * batch / t,
            "params": ts.params, "peak_mem_mib": mem.peak / MiB, "mem_method": mem.method}


# ---------------------------------------------------------------- DSR vs the prototype's DSR

def _pixel_step(model: nn.Module, res: int, batch: int, device, dtype, compile: bool) -> Callable[[], None]:
    """Forward, L1 to HR, backward, AdamW: the loss both networks share in the comparison."""
    model.train()
    net = torch.compile(model) if compile else model
    lr_img, hr, _ = _batch(res, batch, device, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return _optimizer_step(lambda: F.l1_loss(net(lr_img).float(), hr), opt, list(model.parameters()), device,
                           dtype, clip=0.0)


def bench_prototype(res: int | str, *, batch: int = 32, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None, compile: bool = False, reps: int = 3, warmup: int = 1,
                    budget_s: float | None = 45.0, tiny: bool = False, cfg=None) -> dict:
    """The project's DSR and the prototype's DSR (bench/prototype_dsr.py) at one resolution: same batch,
    pixel L1 loss only, train steps timed interleaved in this process; speed ratio of the medians."""
    from bench.prototype_dsr import PROTOTYPE_ARCH, PROTOTYPE_QUOTED, PrototypeDSR

    device = torch.device(device)
    r = int(res)
    cfg = cfg if cfg is not None else compose([f"res={r}"])
    models = {"prototype": PrototypeDSR(r, **(TINY_PROTOTYPE if tiny else PROTOTYPE_ARCH[r])).to(device),
              "dsr": build_dsr(cfg, device, tiny)}
    steps = {k: _pixel_step(m, r, batch, device, dtype, compile) for k, m in models.items()}
    times = interleaved(steps, device, reps, warmup + (2 if compile else 0), budget_s)
    out = {"res": r, "batch": batch, "reps": len(times["dsr"])}
    for k, m in models.items():
        x = torch.rand(1, 3, r, r, device=device)
        out[k] = {"params": sum(p.numel() for p in m.parameters()),
                  "gflop_per_img": count_gflops(_Graph(lambda a, m=m: F.l1_loss(m(a), a.new_zeros(1, 3, 112, 112)),
                                                       model=m), (x,)),
                  "step_s": times[k], "img_per_s": batch / median(times[k])}
    out["speed_ratio"] = median(times["prototype"]) / median(times["dsr"])  # > 1: the DSR is faster
    out["paired_speed_ratio"] = median([p / d for p, d in zip(times["prototype"], times["dsr"])])
    out["flop_ratio"] = out["prototype"]["gflop_per_img"] / out["dsr"]["gflop_per_img"]
    params, gflop, img_s = PROTOTYPE_QUOTED[r]
    out["prototype_quoted"] = {"params": params, "gflop_per_img": gflop, "img_per_s": img_s}
    return out


# ---------------------------------------------------------------- data loading and evaluation

def bench_loader(workers: tuple[int, ...] = (0, 2), *, batch: int = 64, res: int = 16, batches: int = 30,
                 warmup: int = 2, reps: int = 3, data_overrides: tuple[str, ...] = (),
                 cache_dir: str | None = None) -> dict:
    """Samples/s of the synthetic training split's loader (augmentation + degradation) per worker count."""
    from cycle.data import build_splits, make_loader

    cfg = compose(["data=synthetic", *data_overrides])
    t0 = time.perf_counter()
    train = build_splits(cfg.data, cache_dir or cfg.paths.cache_dir)["train"]
    prepare_s = time.perf_counter() - t0
    speeds: dict[int, list[float]] = {w: [] for w in workers}
    for _ in range(reps):  # alternate worker counts, as the other interleaved timings
        for w in workers:
            loader = make_loader(train, batch_size=batch, res=res, degradation=cfg.degradation, train=True,
                                 augment=cfg.data.augment, num_workers=w, seed=0)
            speeds[w].append(loader_throughput(loader, batches=batches, warmup=warmup))
            del loader
    return {"batch": batch, "res": res, "batches": batches, "train_images": len(train),
            "prepare_s": prepare_s, "samples_per_s": {str(w): median(v) for w, v in speeds.items()},
            "runs": {str(w): v for w, v in speeds.items()}}


def bench_eval(num_images: int = 10_000, num_ids: int = 500, dim: int = 512, num_pairs: int = 100_000,
               reps: int = 5, seed: int = 0) -> dict:
    """Seconds to score `num_pairs` balanced pairs over a (num_images, dim) embedding matrix."""
    from eval.metrics import pair_scores_indexed, verification_metrics
    from eval.protocols import balanced_pairs

    rng = np.random.default_rng(seed)
    labels = np.arange(num_images) % num_ids
    centres = rng.standard_normal((num_ids, dim)).astype(np.float32)
    emb = centres[labels] + 1.5 * rng.standard_normal((num_images, dim)).astype(np.float32)
    parts: dict[str, list[float]] = {"balanced_pairs": [], "pair_scores_indexed": [], "verification_metrics": []}
    for _ in range(reps):
        t = time.perf_counter()
        a, b, same = balanced_pairs(labels, num_pairs, seed)
        t1 = time.perf_counter()
        scores = pair_scores_indexed(emb, a, b)
        t2 = time.perf_counter()
        m = verification_metrics(scores[same], scores[~same])
        t3 = time.perf_counter()
        for k, v in zip(parts, (t1 - t, t2 - t1, t3 - t2)):
            parts[k].append(v)
    sec = {k: median(v) for k, v in parts.items()}
    return {"num_images": num_images, "num_ids": num_ids, "dim": dim, "num_pairs": int(a.size),
            "seconds": sec, "total_s": sum(sec.values()), "runs": parts, "auc": m["auc"]}


def bench_bootstrap(num_ids: int = 60, per_id: int = 14, dim: int = 512, num_pairs: int = 6000,
                    resamples: int = 1000, reps: int = 5, seed: int = 0) -> dict:
    """Seconds to score one method with and without 95 % bootstrap intervals (`eval.scoring.score_method`).

    The demo's test set by default: 60 identities x 14 images, 6,000 pairs in 10 identity-disjoint folds,
    one HR gallery image per identity, 1000 resamples of the identities (eval.bootstrap).
    """
    from eval.bootstrap import identity_resamples
    from eval.protocols import balanced_fold_pairs, identification_split
    from eval.scoring import score_method

    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_ids), per_id)
    centres = rng.standard_normal((num_ids, dim)).astype(np.float32)
    hr = centres[labels] + 2.5 * rng.standard_normal((labels.size, dim)).astype(np.float32)
    sr = hr + 2.5 * rng.standard_normal(hr.shape).astype(np.float32)
    a, b, same, fold = balanced_fold_pairs(labels, num_pairs, seed)
    gallery, probes = identification_split(labels, seed)
    kw = dict(fold_ids=fold, gallery_idx=gallery, probe_idx=probes)
    parts: dict[str, list[float]] = {"identity_resamples": [], "score_method": [], "score_method + bootstrap": []}
    score_method(sr, hr, labels, a, b, same, **kw)  # warm-up
    for _ in range(reps):
        t = time.perf_counter()
        counts = identity_resamples(num_ids, resamples, seed)
        t1 = time.perf_counter()
        score_method(sr, hr, labels, a, b, same, **kw)
        t2 = time.perf_counter()
        m, _ = score_method(sr, hr, labels, a, b, same, resamples=counts, **kw)
        t3 = time.perf_counter()
        for k, v in zip(parts, (t1 - t, t2 - t1, t3 - t2)):
            parts[k].append(v)
    sec = {k: median(v) for k, v in parts.items()}
    sec["bootstrap (difference)"] = sec["score_method + bootstrap"] - sec["score_method"]
    return {"num_ids": num_ids, "num_images": int(labels.size), "num_pairs": int(a.size), "resamples": resamples,
            "folds": int(np.unique(fold).size), "seconds": sec, "runs": parts, "auc_ci95": m["auc_ci95"]}


# ---------------------------------------------------------------- report

def render_markdown(r: dict) -> str:
    meta, peak = r["meta"], r["matmul_peak"]
    dev = meta["device"] + (f" ({meta['gpu']})" if meta.get("gpu") and meta["device"].startswith("cuda") else "")
    lines = ["# Benchmarks (`make bench`)", "",
             f"`{meta['command']}` on {meta['date']}: {meta['cpu']}, {meta['cores']} cores, "
             f"{meta['torch_threads']} torch threads, device {dev}, AMP {meta['amp'] or 'off'}"
             f"{', torch.compile' if meta['compile'] else ''}; torch {meta['torch']}. Wall time "
             f"{meta['wall_s']:.0f} s. Load average {meta['load_avg_1min']} at start, {meta['load_avg_end']} at "
             "end: on a shared machine compare ratios measured in one run, not absolute figures.", "",
             f"Matmul peak ({peak['what']}, best of {len(peak['probes']['matmul'])} probes spread over the run): "
             f"**{peak['gflop_s']:.0f} GFLOP/s**, the better of torch.matmul ({peak['best']['matmul']:.0f}) and the "
             f"same product as a 1x1 convolution ({peak['best']['conv1x1']:.0f}; oneDNN, which runs the networks' "
             "convolutions). FLOPs: matmuls, convolutions and attention of forward + backward, per image "
             "(cycle/flops.py).", ""]
    if r.get("stages"):
        lines += ["## Training step per stage", "",
                  "Fixed random batch (no data loading); median step time. `initial / cyclic`: DSR + DSRLoss "
                  "(pixel, identity, feature match through the frozen EdgeFace), AdamW, clip, EMA; the two stages "
                  "run the same step. `edgeface_ft`: its phase 2 (DSR under no_grad, EdgeFace fwd+bwd on SR, HR "
                  "embedding as a no_grad target, margin + align loss). Peak memory: above the process before the "
                  "stage's models were built.", ""]
        rows = [[s["label"], s["res"] or "any", s["batch"], f"{s['params'] / 1e6:.2f}M", fmt(s["img_per_s"]),
                 fmt(s["gflop_per_img"], ".2f"), fmt(s["gflop_per_s"]), fmt(100 * s["peak_fraction"], ".0f") + " %",
                 fmt(s["peak_mem_mib"], ".0f")] for s in r["stages"]]
        lines += [md_table(["stage", "res", "batch", "trained params", "img/s", "GFLOP/img", "GFLOP/s",
                            "of matmul peak", "peak memory (MiB)"], rows), ""]
        if r.get("flops_grouped_conv_overcounted"):
            lines += ["Caution: cycle/flops.py counts the weight gradient of a grouped (depthwise) convolution as "
                      "if it were dense (torch's formula ignores `groups`), so the `edgeface_pretrain` and "
                      "`edgeface_ft` FLOPs (EdgeFace weight gradients) are over-stated, roughly 2x for EdgeFace.", ""]
    if r.get("prototype"):
        b = r["prototype"][0]
        n = sorted({p["reps"] for p in r["prototype"]})
        lines += ["## DSR vs the prototype's DSR", "",
                  f"Same batch ({b['batch']}), same loss (pixel L1 only), AdamW; "
                  f"{'-'.join(map(str, n[::len(n) - 1 or 1]))} train steps of each, "
                  "timed interleaved in one process (medians). Speed: images/s relative to the prototype measured "
                  "here. Quoted: the prototype's published 2-core CPU figures (DESIGN.md section 6).", ""]
        rows = []
        for p in r["prototype"]:
            q = p["prototype_quoted"]
            rows.append([p["res"], "prototype", f"{p['prototype']['params'] / 1e6:.2f}M",
                         fmt(p["prototype"]["gflop_per_img"], ".2f"), fmt(p["prototype"]["img_per_s"], ".2f"), "1",
                         f"{q['params'] / 1e6:.2f}M, {q['gflop_per_img']} GFLOP, {q['img_per_s']} img/s"])
            rows.append([p["res"], "DSR (ours)", f"{p['dsr']['params'] / 1e6:.2f}M",
                         fmt(p["dsr"]["gflop_per_img"], ".2f"), fmt(p["dsr"]["img_per_s"], ".2f"),
                         f"**x{p['speed_ratio']:.2f}** (1/{p['flop_ratio']:.1f} of the FLOPs)", ""])
        lines += [md_table(["res", "model", "params", "GFLOP/img", "train img/s", "speed vs prototype",
                            "prototype quoted"], rows), ""]
    if r.get("loader"):
        ld = r["loader"]
        lines += ["## Data loading", "",
                  f"Synthetic training split ({ld['train_images']} faces), batch {ld['batch']}, res {ld['res']}, "
                  f"augmentation + degradation; {ld['batches']} batches after warm-up, median of the runs "
                  f"(split ready in {ld['prepare_s']:.1f} s).", ""]
        lines += [md_table(["workers", "samples/s"], [[w, fmt(v, ".0f")] for w, v in ld["samples_per_s"].items()]),
                  ""]
    if r.get("eval"):
        ev = r["eval"]
        lines += ["## Evaluation", "",
                  f"{ev['num_pairs']:,} balanced pairs over a {ev['num_images']:,} x {ev['dim']} embedding matrix "
                  f"({ev['num_ids']:,} identities); median of {len(ev['runs']['balanced_pairs'])} runs.", ""]
        rows = [[k, fmt(v, ".3f")] for k, v in ev["seconds"].items()] + [["total", fmt(ev["total_s"], ".3f")]]
        lines += [md_table(["step", "seconds"], rows), ""]
    if r.get("bootstrap"):
        bs = r["bootstrap"]
        lines += [f"Bootstrap intervals (`eval.scoring.score_method`, all verification and identification metrics "
                  f"with 95 % intervals): {bs['num_pairs']:,} pairs of {bs['num_ids']} identities ({bs['num_images']} "
                  f"images, {bs['folds']} identity-disjoint folds), {bs['resamples']} resamples of the identities; "
                  f"median of {len(bs['runs']['score_method'])} runs.", ""]
        lines += [md_table(["step", "seconds"], [[k, fmt(v, ".3f")] for k, v in bs["seconds"].items()]), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def warm_up(device: torch.device) -> None:
    """Imports and first-call library set-up (timm, oneDNN/cuDNN), so no stage's memory or time pays for them."""
    import edgeface

    model = edgeface.build("edgeface_xxs").to(device).train()
    conv = nn.Conv2d(3, 8, 3, padding=1).to(device)
    x = torch.rand(2, 3, 112, 112, device=device)
    (model(conv(x)[:, :3]).sum()).backward()


def _jsonable(x):
    """Strict JSON: NaN/inf as null, anything unknown as its string."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    return x if x is None or isinstance(x, (bool, int, str)) else str(x)


def _same_step(cfg) -> bool:
    """initial and cyclic differ only in weights and loss weights when they enable the same loss terms."""
    on = [{k for k, v in cfg.stages[s].loss.items() if isinstance(v, (int, float)) and v > 0}
          for s in ("initial", "cyclic")]
    return on[0] == on[1]


def main(argv: list[str] | None = None) -> dict:
    from cycle.device import amp_dtype, resolve_device

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], prog="python -m bench.run")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks that everything runs (tests)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent), help="folder for results.json/.md")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--res", type=int, nargs="+", default=[16, 24, 32])
    ap.add_argument("--batch", type=int, default=32, help="batch of the stage train steps")
    ap.add_argument("--proto-batch", type=int, default=None, help="batch of the DSR vs prototype comparison "
                    "(default: --batch; the DSR's speed per image drops at small batches, the prototype's hardly)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per stage (median)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved steps per model in the prototype comparison")
    ap.add_argument("--amp", default="auto", help="auto (bf16/fp16 on CUDA, off on CPU) | bf16 | fp16 | off")
    ap.add_argument("--compile", action="store_true", help="torch.compile the trained networks")
    ap.add_argument("--only", nargs="+", choices=("stages", "prototype", "loader", "eval"),
                    default=["stages", "prototype", "loader", "eval"])
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "offline")
    device = resolve_device(args.device)
    dtype = amp_dtype(device, args.amp)
    quick = args.quick
    res_list = [16] if quick else args.res
    batch, proto_batch = (2, 2) if quick else (args.batch, args.proto_batch or args.batch)
    steps, reps = (1, 1) if quick else (args.steps, args.reps)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    meta = machine(device)
    meta.update(command=" ".join(["python -m bench.run", *(argv if argv is not None else sys.argv[1:])]),
                device=str(device), amp=str(dtype).replace("torch.", "") if dtype else None,
                compile=args.compile, quick=quick)
    results: dict = {"meta": meta}
    peak_dtype = dtype if device.type == "cuda" and dtype is not None else torch.float32
    n_mm = 256 if quick else (8192 if device.type == "cuda" else 2048)
    probes: dict[str, list[float]] = {"matmul": [], "conv1x1": []}

    def probe():  # spread over the run: the best one is the least disturbed by other jobs
        for via, got in probes.items():
            got.append(matmul_peak(device, n_mm, reps=2 if quick else 5, dtype=peak_dtype, via=via))

    def say(msg):
        print(f"[bench {time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    probe()
    warm_up(device)
    cfgs = {r: compose([f"res={r}"]) for r in res_list}
    kw = dict(device=device, dtype=dtype, compile=args.compile, tiny=quick)
    if "stages" in args.only:
        results["stages"] = []
        jobs = [("edgeface_pretrain", res_list[0])]
        for r in res_list:
            dsr_stages = ["initial"] if _same_step(cfgs[r]) else ["initial", "cyclic"]
            jobs += [(s, r) for s in dsr_stages] + [("edgeface_ft", r)]
        for stage, r in jobs:
            probe()
            row = bench_stage(stage, r, batch=batch, steps=steps, cfg=cfgs[r],
                              num_classes=8 if quick else None, **kw)
            row["label"] = "initial / cyclic" if stage == "initial" and _same_step(cfgs[r]) else stage
            results["stages"].append(row)
            say(f"{row['label']} res={row['res'] or 'any'}: {row['img_per_s']:.1f} img/s, "
                f"{row['gflop_per_img']:.2f} GFLOP/img, peak {row['peak_mem_mib']:.0f} MiB")
    if "prototype" in args.only:
        results["prototype"] = []
        for r in res_list:
            probe()
            p = bench_prototype(r, batch=proto_batch, reps=reps, warmup=1, cfg=cfgs[r], **kw)
            results["prototype"].append(p)
            say(f"res={r}: DSR {p['dsr']['img_per_s']:.1f} img/s, prototype {p['prototype']['img_per_s']:.2f} img/s "
                f"-> x{p['speed_ratio']:.2f}")
    if "loader" in args.only:
        if quick:  # a toy split in a throw-away cache
            with tempfile.TemporaryDirectory() as tmp:
                results["loader"] = bench_loader(batch=8, batches=2, warmup=1, reps=1, cache_dir=tmp, data_overrides=(
                    "data.num_identities=12", "data.images_per_identity=3"))
        else:  # the default synthetic split, in the cache `make demo` uses too
            results["loader"] = bench_loader()
        say(f"loader: {results['loader']['samples_per_s']} samples/s")
    if "eval" in args.only:
        results["eval"] = (bench_eval(num_images=600, num_ids=30, dim=64, num_pairs=2000, reps=1) if quick
                           else bench_eval())
        say(f"eval: {results['eval']['total_s']:.2f} s for {results['eval']['num_pairs']} pairs")
        results["bootstrap"] = (bench_bootstrap(num_ids=12, per_id=4, dim=32, num_pairs=200, reps=1) if quick
                                else bench_bootstrap())
        bs = results["bootstrap"]
        say(f"bootstrap: {bs['seconds']['score_method + bootstrap']:.2f} s for {bs['num_pairs']} pairs "
            f"x {bs['resamples']} resamples")
    probe()

    best = {via: max(got) for via, got in probes.items()}
    peak = max(best.values())
    what = f"{str(peak_dtype).replace('torch.', '')} {n_mm}x{n_mm}x{n_mm}"
    results["matmul_peak"] = {"gflop_s": peak, "best": best, "probes": probes, "what": what}
    for s in results.get("stages", []):
        s["peak_fraction"] = s["gflop_per_s"] / peak
    results["flops_grouped_conv_overcounted"] = grouped_conv_overcounted()
    meta["load_avg_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    meta["wall_s"] = time.perf_counter() - t_start
    (out_dir / "results.json").write_text(json.dumps(_jsonable(results), indent=2))
    md = render_markdown(results)
    (out_dir / "results.md").write_text(md + "\n")
    print(md)
    return results


if __name__ == "__main__":
    main()
