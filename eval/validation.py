"""Validation helpers the stages share: embeddings in batches, verification on held-out identities."""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from eval.metrics import verification_metrics
from eval.protocols import balanced_pairs

# What the stages log from a verification run (a subset of eval.metrics.verification_metrics).
VAL_KEYS = ("auc", "eer", "tar@far=1e-2", "genuine_mean", "impostor_mean")


@torch.no_grad()
def embed_loader(loader: Iterable[dict], fn: Callable[[dict], torch.Tensor], limit: int | None = None
                 ) -> tuple[torch.Tensor, np.ndarray]:
    """Apply `fn(batch) -> (B, D)` over a loader; returns L2-normalised float32 embeddings and labels."""
    embs, labels = [], []
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            break
        embs.append(F.normalize(fn(batch).float(), dim=1).cpu())
        labels.append(batch["label"].cpu())
    return torch.cat(embs), torch.cat(labels).numpy()


def verification(emb_a: torch.Tensor, labels: np.ndarray, num_pairs: int, seed: int,
                 emb_b: torch.Tensor | None = None) -> dict[str, float]:
    """Balanced pairs among `labels`; score = cos(emb_a[i], emb_b[j]) (emb_b defaults to emb_a).

    With emb_a = SR and emb_b = HR this is the deployment setting: VLR probe vs HR gallery.
    """
    ia, ib, same = balanced_pairs(labels, num_pairs, seed)
    ea = F.normalize(emb_a.float(), dim=1)
    eb = ea if emb_b is None else F.normalize(emb_b.float(), dim=1)
    scores = (ea[torch.as_tensor(ia)] * eb[torch.as_tensor(ib)]).sum(1).numpy().astype(np.float64)
    same = np.asarray(same, dtype=bool)
    m = verification_metrics(scores[same], scores[~same])
    return {k: float(m[k]) for k in VAL_KEYS if k in m}
