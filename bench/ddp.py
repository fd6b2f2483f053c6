"""`make bench` (data-parallel part): the `initial` training step in 2 gloo processes against 1 process.

    python -m bench.ddp                   # CPU: 1 vs 2 processes of 1 thread, batch 16 per process
    python -m bench.ddp --quick --out /tmp/b

Each process runs the Trainer's real micro-step (DSR + DSRLoss through the frozen EdgeFace, AdamW, clipping,
EMA, and with 2 processes the gradient all-reduce of cycle.distributed) on a fixed batch of its own; the batch
is per process (weak scaling). img/s = processes x batch / median step time of rank 0 (the all-reduce keeps
the ranks in step); scaling efficiency = img/s(2) / (2 x img/s(1)). Writes ddp.json and ddp.md into --out.
No GPU was available when this was written: NCCL figures are still to be taken.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from bench.common import compose, machine, md_table, median, time_steps
from bench.run import _batch, build_dsr, train_classes
from cycle import distributed


def _worker(rank: int, batch: int, steps: int, tiny: bool, out: str) -> None:
    import edgeface
    from cycle.config import to_plain
    from cycle.training import EMA, Trainer
    from dsr.losses import DSRLoss

    cpu = torch.device("cpu")
    cfg = compose(["res=16"])
    s = cfg.stages.initial
    torch.manual_seed(0)
    dsr = build_dsr(cfg, cpu, tiny).train()
    loss_fn = DSRLoss(edgeface.build(str(cfg.edgeface.variant)), **to_plain(s.loss))
    opt = torch.optim.AdamW(dsr.parameters(), lr=float(s.lr), weight_decay=float(s.weight_decay))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(tcfg={"grad_clip": float(cfg.trainer.grad_clip), "warmup_frac": 0, "amp": "off",
                                "progress": False}, run_dir=tmp, logger=None, device=cpu, modules={"dsr": dsr},
                          optimizer=opt, epochs=1, steps_per_epoch=steps + 2, ema=EMA(dsr, float(s.ema_decay)),
                          resume=False)
        lr_img, hr, y = _batch(16, batch, cpu, train_classes(cfg), seed=rank)
        step = lambda: trainer._micro_step({}, lambda _: loss_fn(dsr(lr_img), hr, y), last_micro=True)  # noqa: E731
        times = time_steps(step, cpu, steps, warmup=1)
    if rank == 0:
        Path(out).write_text(json.dumps({"step_s": median(times), "steps": len(times)}))


def measure(processes: int, batch: int, steps: int, tiny: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        distributed.spawn_local(_worker, processes, batch, steps, tiny, out)
        r = json.loads(Path(out).read_text())
    return {"processes": processes, "batch_per_process": batch, "step_s": r["step_s"],
            "img_s": processes * batch / r["step_s"]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16, help="per process")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="toy DSR, 2 steps (the test)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent), help="folder for ddp.json/.md")
    a = ap.parse_args(argv)
    steps = 2 if a.quick else a.steps
    rows = [measure(n, a.batch, steps, a.quick) for n in (1, 2)]
    eff = rows[1]["img_s"] / (2 * rows[0]["img_s"])
    res = {"meta": {**machine(), "device": "cpu", "backend": "gloo", "threads_per_process": 1, "quick": a.quick,
                    "gpu": "none available: NCCL scaling not measured"},
           "runs": rows, "scaling_efficiency": eff}
    table = md_table(["processes", "batch / process", "step (s)", "img/s"],
                     [[r["processes"], r["batch_per_process"], f"{r['step_s']:.3f}", f"{r['img_s']:.1f}"]
                      for r in rows])
    md = (f"### Data-parallel `initial` step, CPU gloo (no GPU available)\n\n{table}\n\n"
          f"Scaling efficiency of 2 processes: **{100 * eff:.0f} %** (img/s(2) / (2 x img/s(1))).\n")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ddp.json").write_text(json.dumps(res, indent=1))
    (out / "ddp.md").write_text(md)
    print(md)
    return res


if __name__ == "__main__":
    main()
