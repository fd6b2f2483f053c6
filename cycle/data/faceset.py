"""`FaceSet`: the decoded images, labels and identities of one split."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class FaceSet:
    images: np.ndarray      # uint8 (N, S, S, 3), memory-mapped from `cache_path`
    labels: np.ndarray      # int64 (N,), contiguous 0..num_classes-1 within this split
    identities: list[str]   # identity name per class index
    files: list[str] | None = None   # per sample "identity/file" (folder) or "identity/index" (synthetic)
    cache_path: str | None = None    # lets worker processes re-open the memory map instead of copying it

    @property
    def num_classes(self) -> int:
        return len(self.identities)

    def __len__(self) -> int:
        return len(self.labels)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)

    def __getstate__(self):  # pickled for spawn-started workers: ship the path, not the pixels
        state = dict(self.__dict__)
        if self.cache_path is not None:
            state["images"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.images is None:
            self.images = np.load(self.cache_path, mmap_mode="r")
