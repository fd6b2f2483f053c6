"""Face data for every stage: splits, decoded-array caches, (VLR, HR) loaders.

A dataset is the procedural synthetic faces (`data=synthetic`), a folder with one
sub-folder per identity (`data=folder`, `data=orl`) or an insightface RecordIO set
(`data=rec`: train.rec + train.idx). Each split is decoded once into a uint8
(N, 112, 112, 3) .npy file under `cache_dir/faces/`, named by a hash of everything
that determines its content, built in resumable chunks and memory-mapped afterwards;
`data.cache=none` decodes from the source in the loader workers instead.
VLR images are made on the fly from the (augmented) HR image by `cycle.degrade`.

Bad input raises `DataError` with a message that says what to fix; it is checked
in the main process before any worker starts.

What lives where (each module imports only the ones listed before it):

- `options`: `DataError` and reading `data.*` config values.
- `faceset`: `FaceSet`, the images, labels and identities of one split.
- `splits`: identity-disjoint splits (`split_identities`), identity selection, `pairable_identities`.
- `cache`: cache key -> file paths, loading, atomic writes, `CACHE_VERSION`.
- `chunked`: a source split -> FaceSet: the resumable chunked cache build, or streaming (`data.cache=none`).
- `render`: the procedural face renderer behind `data=synthetic`.
- `synthetic`: the synthetic splits, rendered into the cache.
- `folder`: folder datasets: scan, `load_image`, the split's files as a source of `chunked`.
- `recordio`: insightface RecordIO without MXNet: framing, image header, index, label scan, the source.
- `sources`: `build_splits`, a data config -> train/val/test `FaceSet`s.
- `samplers`: `EpochSampler`, `PKBatchSampler`, `set_epoch` and the per-sample key seeds.
- `augment`: training augmentation of HR batches and its `data.augment` check.
- `loaders`: the `FacePairs` dataset, `make_loader`, `stage_loaders`.
"""
from cycle.data.augment import AUGMENT_KEYS, augment_batch
from cycle.data.cache import CACHE_VERSION
from cycle.data.faceset import FaceSet
from cycle.data.folder import IMAGE_EXTENSIONS, load_image
from cycle.data.loaders import FaceLoader, FacePairs, make_loader, stage_loaders
from cycle.data.options import DataError
from cycle.data.samplers import EpochSampler, PKBatchSampler, set_epoch
from cycle.data.sources import build_splits
from cycle.data.splits import SPLITS, pairable_identities, split_identities

__all__ = [
    "AUGMENT_KEYS", "CACHE_VERSION", "IMAGE_EXTENSIONS", "SPLITS", "DataError", "EpochSampler", "FaceLoader",
    "FacePairs", "FaceSet", "PKBatchSampler", "augment_batch", "build_splits", "load_image", "make_loader",
    "pairable_identities", "set_epoch", "split_identities", "stage_loaders",
]
