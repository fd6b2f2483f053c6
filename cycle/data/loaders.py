"""(VLR, HR) loaders: the `FacePairs` dataset, `make_loader` and the loaders every training stage uses.

VLR images are made on the fly from the (augmented) HR image by `cycle.degrade`: in the loader by default,
or with `trainer.degrade_on=device` on the training device (loader workers then only decode and stack uint8,
the way BasicSR's Real-ESRGAN model degrades on the GPU). Both paths draw each image's randomness from the
same per-image seed on the CPU (a few numbers, and noise at VLR size) and run the image operations where the
batch is, so they give the same batch.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cycle import distributed
from cycle.data.augment import _check_augment, augment_batch
from cycle.data.faceset import FaceSet
from cycle.data.options import DataError, _plain
from cycle.data.samplers import EpochSampler, PKBatchSampler, _key_seed, set_epoch
from cycle.data.sources import build_splits
from cycle.data.splits import require_pairs
from cycle.degrade import check_res, degrade

DEGRADE_ON = ("loader", "device")  # trainer.degrade_on: where augmentation and degradation run


class FacePairs(Dataset):
    """Map-style dataset over a FaceSet, keyed by the samplers' (index, epoch, slot).

    Items are cheap (uint8 HR + a seed); `collate` does augmentation and degradation on the
    whole batch, which is ~10x faster than per image on a busy CPU. Each image's randomness
    comes from a generator seeded by its key, so a batch does not depend on the number of
    workers, and evaluation noise depends on the sample index only.
    """

    def __init__(self, faces: FaceSet, res: int | None, degradation: Mapping | None, train: bool,
                 augment: Mapping | None, seed: int, on_device: bool = False):
        self.faces, self.res, self.train, self.seed, self.on_device = faces, res, train, seed, on_device
        self.degradation = _plain(degradation)
        self.aug = _check_augment(augment) if train else None

    def __len__(self) -> int:
        return len(self.faces)

    def __getitem__(self, key) -> tuple[torch.Tensor, int, int, int]:
        index, epoch, slot = key if isinstance(key, tuple) else (int(key), 0, 0)
        seed = _key_seed(self.seed, epoch, slot, index, 1) if self.train else _key_seed(self.seed, index, 2)
        hr = torch.from_numpy(np.array(self.faces.images[index])).permute(2, 0, 1)
        return hr, int(self.faces.labels[index]), index, seed

    def collate(self, items) -> dict[str, torch.Tensor]:
        # One intra-op thread, as in DataLoader workers: these ops are too small to split, and on a
        # busy 2-core machine a 2-thread barrier per op made loading ~10x slower (measured).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._collate(items)
        finally:
            torch.set_num_threads(threads)

    def _collate(self, items) -> dict[str, torch.Tensor]:
        batch = {"hr_u8": torch.stack([it[0] for it in items]),
                 "seed": torch.tensor([it[3] for it in items], dtype=torch.int64),
                 "label": torch.tensor([it[1] for it in items], dtype=torch.int64),
                 "index": torch.tensor([it[2] for it in items], dtype=torch.int64)}
        return batch if self.on_device else self.finish(batch, torch.device("cpu"))

    def finish(self, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        """uint8 HR + seeds -> {"hr", "lr", "label", "index"} on `device`: augmentation, then degradation."""
        batch = dict(batch)
        hr = batch.pop("hr_u8").to(device, non_blocking=True).float().div_(255.0)
        gens = [torch.Generator().manual_seed(int(s)) for s in batch.pop("seed")]
        if self.aug is not None and (self.aug["flip"] or self.aug["rotate_deg"] or self.aug["color_jitter"]):
            hr = augment_batch(hr, self.aug, gens)
        batch["hr"] = hr
        if self.res is not None:
            batch["lr"] = degrade(hr, self.res, self.degradation, generator=gens)
        return batch


class FaceLoader(DataLoader):
    """A DataLoader with `set_epoch(e)`: pins the shuffle/augmentation epoch (e.g. after resume). With
    `degrade_on="device"` it finishes each batch on `loader.device` (set by the stage runner; CPU if unset)."""

    device: torch.device | None = None

    def set_epoch(self, epoch: int) -> None:
        set_epoch(self, epoch)

    def __iter__(self):
        batches = super().__iter__()
        if not self.dataset.on_device:
            return batches
        return (self.dataset.finish(b, self.device or torch.device("cpu")) for b in batches)


def make_loader(faces: FaceSet, *, batch_size: int, res: int | None, degradation: Mapping | None, train: bool,
                pk: tuple[int, int] | None = None, augment: Mapping | None = None, num_workers: int = 0,
                seed: int = 0, drop_last: bool | None = None, rank: int = 0, world_size: int = 1,
                degrade_on: str = "loader") -> FaceLoader:
    """DataLoader of {"hr", "lr", "label", "index"} batches (see module doc). `loader.set_epoch(e)`
    pins the epoch (resume); otherwise every pass over the loader advances it by one. With `world_size` > 1
    the loader yields rank `rank`'s shard; `batch_size` is per process."""
    if not isinstance(faces, FaceSet):
        raise DataError(f"make_loader expects a FaceSet from build_splits, got {type(faces).__name__}")
    if len(faces) == 0:
        raise DataError("this split is empty: raise data.split or add identities")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise DataError(f"num_workers must be an integer >= 0, got {num_workers!r}")
    try:
        res = None if res is None else check_res(res)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    if degrade_on not in DEGRADE_ON:
        raise DataError(f"trainer.degrade_on must be one of {', '.join(DEGRADE_ON)}, got {degrade_on!r}")
    dataset = FacePairs(faces, res, degradation, train, augment, seed, on_device=degrade_on == "device")
    probe = dataset.collate([dataset[(0, 0, 0)]])  # fail here, in the caller's process, on a bad degradation config
    if dataset.on_device:
        dataset.finish(probe, torch.device("cpu"))
    kwargs = dict(num_workers=num_workers, persistent_workers=num_workers > 0, collate_fn=dataset.collate,
                  pin_memory=torch.cuda.is_available())
    if pk is not None:
        if not train:
            raise DataError("the P x K sampler is for training (train=True)")
        p, k = (int(v) for v in pk)
        if p < 1 or k < 1 or p * k != batch_size:
            raise DataError(f"pk=({p}, {k}) needs batch_size = P*K = {p * k}, got batch_size={batch_size}")
        return FaceLoader(dataset, batch_sampler=PKBatchSampler(faces.labels, p, k, seed, rank, world_size),
                          **kwargs)
    sampler = EpochSampler(len(faces), seed, shuffle=train, rank=rank, world_size=world_size)
    if drop_last is None:
        drop_last = train and len(sampler) >= batch_size  # a split smaller than one batch still yields it
    elif drop_last and len(sampler) < batch_size:
        raise DataError(f"drop_last=True with {len(sampler)} samples per rank < batch_size={batch_size} "
                        "gives no batch: lower trainer.batch_size (it is per process) or use fewer processes")
    return FaceLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **kwargs)


def stage_loaders(cfg: Mapping, res: int | None) -> tuple[dict[str, FaceSet], DataLoader, DataLoader]:
    """The splits and the (train, val) loaders every training stage uses, from the composed config.

    res=None gives HR-only batches (EdgeFace pre-training). In a data-parallel job the training loader is
    this rank's shard (`trainer.batch_size` per process); every rank validates on the whole validation split.
    """
    t = cfg.trainer
    splits = build_splits(cfg.data, cfg.paths.cache_dir)
    require_pairs(splits, "val", "validation (verification on held-out identities)")
    if splits["train"].num_classes < 2:
        raise DataError(f"the train split has {splits['train'].num_classes} identity: identity losses and margin "
                        "heads need >= 2; lower data.split.val/test or add identities")
    pk = tuple(t.pk) if t.get("pk") else None
    common = dict(batch_size=int(t.batch_size), res=res, degradation=cfg.degradation,
                  num_workers=int(t.num_workers), seed=int(cfg.seed), degrade_on=str(t.get("degrade_on", "loader")))
    train = make_loader(splits["train"], train=True, pk=pk, augment=cfg.data.augment,
                        rank=distributed.rank(), world_size=distributed.world_size(), **common)
    val = make_loader(splits["val"], train=False, **common)
    return splits, train, val
