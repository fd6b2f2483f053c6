"""The public prototype's DSR, rebuilt from its published description (DESIGN.md section 6).

Reference baseline for benchmarks only: the package never imports it. It keeps the
prototype's shape, cost and quirks (BatchNorm in the trunk, global attention over all
low-resolution pixels, features up-sampled to 64/96/128 px by pixel shuffle and then
bilinearly resized to 112, a full 3x3 conv at 112x112, hard clamp at the end).

    python bench/prototype_dsr.py             # params, GFLOPs, CPU train img/s vs the project's DSR
    python bench/prototype_dsr.py --steps 0   # sizes and FLOPs only
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# (C, N, M, T, shuffle channels after stage 1, after stage 2) per resolution.
PROTOTYPE_ARCH = {
    16: dict(channels=96, num_blocks=8, num_transformer=4, transformer_dim=256, up=(48, 48)),
    24: dict(channels=112, num_blocks=6, num_transformer=4, transformer_dim=256, up=(56, 32)),
    32: dict(channels=120, num_blocks=5, num_transformer=3, transformer_dim=320, up=(60, 32)),
}
# Figures the design quotes for the prototype (params, GFLOP/image fwd+bwd, CPU images/s).
PROTOTYPE_QUOTED = {16: (5.18e6, 11.3, 7.9), 24: (5.31e6, 24.5, 2.9), 32: (5.62e6, 49.2, 1.2)}


class MFM(nn.Module):
    """Max-feature-map: split the channels in half, keep the element-wise max."""

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return torch.maximum(a, b)


class MFMResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        layers = []
        for _ in range(2):
            layers += [nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), MFM()]
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.body(x)


class TransformerBlock(nn.Module):
    """Pre-norm block: 8-head global self-attention, then an MLP of ratio 2 with GELU."""

    def __init__(self, dim: int, heads: int = 8, mlp_ratio: int = 2):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class PrototypeDSR(nn.Module):
    def __init__(self, res: int, channels: int, num_blocks: int, num_transformer: int,
                 transformer_dim: int, up: tuple[int, int], out_size: int = 112):
        super().__init__()
        c, t = channels, transformer_dim
        self.res, self.out_size = res, out_size
        self.head = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(*[MFMResBlock(c) for _ in range(num_blocks)])
        self.fusion = nn.Conv2d(c, c, 3, padding=1)
        self.to_tokens = nn.Conv2d(c, t, 1)
        self.transformer = nn.Sequential(*[TransformerBlock(t) for _ in range(num_transformer)])
        self.from_tokens = nn.Conv2d(t, c, 1)
        c1, c2 = up
        self.up = nn.Sequential(
            nn.Conv2d(c, 4 * c1, 3, padding=1), nn.PixelShuffle(2), nn.PReLU(),
            nn.Conv2d(c1, 4 * c2, 3, padding=1), nn.PixelShuffle(2), nn.PReLU(),
        )
        self.tail = nn.Sequential(nn.Conv2d(c2, 64, 3, padding=1), nn.PReLU(), nn.Conv2d(64, 3, 3, padding=1))

    def forward(self, x):
        feat = self.head(x)
        feat = feat + self.fusion(self.blocks(feat))
        b, _, h, w = feat.shape
        tok = self.to_tokens(feat).flatten(2).transpose(1, 2)          # (B, HW, T)
        tok = self.transformer(tok).transpose(1, 2).reshape(b, -1, h, w)
        feat = feat + self.from_tokens(tok)
        up = F.interpolate(self.up(feat), size=(self.out_size, self.out_size), mode="bilinear",
                           align_corners=False)
        return self.tail(up).clamp(0.0, 1.0)


def build_prototype(res: int) -> PrototypeDSR:
    res = int(res)
    if res not in PROTOTYPE_ARCH:
        raise ValueError(f"res must be one of {sorted(PROTOTYPE_ARCH)}, got {res}")
    return PrototypeDSR(res, **PROTOTYPE_ARCH[res])


def _train_throughput(model: nn.Module, res: int, batch: int, steps: int, warmup: int = 1) -> float:
    """Images/s of full training steps (forward, L1 loss, backward, AdamW step); median step time."""
    import statistics
    import time

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    lr = torch.rand(batch, 3, res, res)
    hr = torch.rand(batch, 3, 112, 112)
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        loss = F.l1_loss(model(lr), hr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def main(argv=None) -> None:
    import argparse
    import os

    from omegaconf import OmegaConf

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    from cycle.flops import gflops_per_image
    from dsr.model import build_dsr

    ap = argparse.ArgumentParser(description="Prototype DSR vs the project's DSR: size, FLOPs, CPU speed.")
    ap.add_argument("--res", type=int, nargs="+", default=[16, 24, 32])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per model (0: skip timing)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    arch = OmegaConf.load(root / "conf" / "dsr" / "default.yaml").arch
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    print("| res | model | params | GFLOP/img fwd+bwd | train img/s | quoted (params, GFLOP, img/s) |")
    print("|---|---|---|---|---|---|")
    for r in args.res:
        for name, model in (("prototype", build_prototype(r)), ("DSR", build_dsr(r, arch))):
            n = sum(p.numel() for p in model.parameters())
            g = gflops_per_image(model.train(), (2, 3, r, r))
            speed = _train_throughput(model, r, args.batch, args.steps) if args.steps else float("nan")
            quoted = "%.2fM, %.1f, %.1f" % (PROTOTYPE_QUOTED[r][0] / 1e6, *PROTOTYPE_QUOTED[r][1:]) \
                if name == "prototype" else ""
            print(f"| {r} | {name} | {n / 1e6:.3f}M | {g:.2f} | {speed:.1f} | {quoted} |", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
