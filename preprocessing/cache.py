"""Stage 5: cached MONAI datasets of a site's studies.

The deterministic part of the pipeline (load, orient, resample, crop, window, size) is computed once per
series and stored under ``SITE_DIR/cache/<pipeline fingerprint>/`` by MONAI's ``PersistentDataset``; the
cache key covers the series' files (paths, sizes, modification times) and its labels, so a changed file
or label is recomputed and a changed pipeline uses a different folder. Random augmentation runs after
the cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai.data import PersistentDataset
from monai.transforms import Compose

from preprocessing.transforms import PipelineConfig, deterministic_transforms, random_transforms

CACHE_FOLDER = "cache"


def cache_dir_for(site_dir: Path, pipeline: PipelineConfig) -> Path:
    """Folder holding the cached tensors of one pipeline configuration."""
    return Path(site_dir) / CACHE_FOLDER / pipeline.fingerprint()


def file_state_fingerprint(paths: Sequence[str]) -> str:
    """Hash of (path, size, mtime) of each file: changes when any file is replaced or edited."""
    digest = hashlib.sha256()
    for path in paths:
        stat = Path(path).stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def make_dataset(
    items: Sequence[dict[str, Any]], pipeline: PipelineConfig, site_dir: Path, *, augment: bool
) -> PersistentDataset:
    """PersistentDataset over manifest items (``{"image": series dict, "label": int, "id": str, ...}``)."""
    transforms = deterministic_transforms(pipeline)
    if augment:
        transforms += random_transforms(pipeline)
    cache_dir = cache_dir_for(site_dir, pipeline)
    cache_dir.mkdir(parents=True, exist_ok=True)
    return PersistentDataset(list(items), transform=Compose(transforms), cache_dir=cache_dir)
