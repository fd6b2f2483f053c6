"""Samplers that yield (index, epoch, slot) keys, shuffled per (seed, epoch), and the per-key seeds."""
from __future__ import annotations

from typing import Iterator

import numpy as np
from torch.utils.data import DataLoader, Sampler

from cycle.data.options import DataError


def _key_seed(*parts: int) -> int:
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1, np.uint64)
    return int(state[0] >> 1)  # torch.Generator.manual_seed takes < 2**63


class _EpochMixin:
    """Epoch counter: set_epoch(e) pins the next epoch; otherwise each pass advances by one."""

    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _take_epoch(self) -> int:
        epoch, self.epoch = self.epoch, self.epoch + 1
        return epoch


class EpochSampler(_EpochMixin, Sampler):
    """Yields (index, epoch, slot) keys; shuffled per (seed, epoch) when `shuffle`.

    With `world_size` > 1 every rank draws the same permutation and takes every world_size-th key from
    position `rank` (torch's `DistributedSampler` layout): the ranks together see each sample once per epoch,
    and the order is padded with its own start to a multiple of world_size so every rank has the same number
    of keys (hence batches: collectives never wait on a rank that ran out). The slot is the position in the
    global order, so a sample's augmentation and degradation do not depend on the number of ranks."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.n, self.seed, self.shuffle, self.rank, self.world_size = n, seed, shuffle, rank, world_size

    def __len__(self) -> int:
        return -(-self.n // self.world_size)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        epoch = self._take_epoch()
        order = np.arange(self.n)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        total = len(self) * self.world_size
        order = np.resize(order, total)  # pad by repeating the start of the order
        for slot in range(self.rank, total, self.world_size):
            yield int(order[slot]), epoch, slot


class PKBatchSampler(_EpochMixin, Sampler):
    """Batches of P distinct identities x K images each (drawn with replacement only for
    identities with fewer than K images). Identities with one image are skipped when K > 1.

    With `world_size` > 1 every rank draws the same sequence of world_size * len(self) batches and keeps
    batch i when i % world_size == rank: each rank gets whole P x K batches, all ranks the same number."""

    def __init__(self, labels: np.ndarray, p: int, k: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.p, self.k, self.seed, self.rank, self.world_size = p, k, seed, rank, world_size
        labels = np.asarray(labels)
        num_classes = int(labels.max()) + 1 if len(labels) else 0
        self.by_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
        self.classes = [c for c, idx in enumerate(self.by_class) if len(idx) >= min(2, k)]
        if len(self.classes) < p:
            raise DataError(f"P x K sampler needs P={p} identities with >= {min(2, k)} images; "
                            f"this split has {len(self.classes)}: lower P or use more identities")
        images = sum(len(self.by_class[c]) for c in self.classes)
        self.num_batches = max(1, images // (p * k * world_size))  # per rank

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        epoch = self._take_epoch()
        rng = np.random.default_rng([self.seed, epoch, 7])
        queue: list[int] = []
        slot = 0
        for b in range(self.num_batches * self.world_size):
            chosen: list[int] = []
            while len(chosen) < self.p:
                if not queue:
                    queue = list(rng.permutation(self.classes))
                c = queue.pop()
                if c not in chosen:
                    chosen.append(c)
            batch = []
            for c in chosen:
                idx = self.by_class[c]
                pick = rng.choice(idx, self.k, replace=len(idx) < self.k)
                for i in pick:
                    batch.append((int(i), epoch, slot))
                    slot += 1
            if b % self.world_size == self.rank:
                yield batch


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Pin the shuffle/augmentation epoch of a loader from make_loader (e.g. after resume)."""
    for s in (loader.batch_sampler, loader.sampler):
        if hasattr(s, "set_epoch"):
            s.set_epoch(epoch)
            return
