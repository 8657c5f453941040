"""Stage 5: cached MONAI datasets of a site's studies.

The deterministic part of the pipeline (load, orient, resample, crop, window, size) is computed once per
series and stored under ``SITE_DIR/cache/<pipeline fingerprint>/`` by MONAI's ``PersistentDataset``; the
cache key covers the series' files (paths, sizes, modification times), so a changed file is recomputed and a
changed pipeline uses a different folder. Targets (diagnosis, outcome, covariates) are joined after the cache,
so relabelling never recomputes images and never returns stale labels. Random augmentation runs after the cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai.data import PersistentDataset
from monai.transforms import Compose
from torch.utils.data import Dataset

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


class StudyDataset(Dataset):
    """Cached (and, for training, augmented) images of a site's studies, each joined with its targets."""

    def __init__(self, items: Sequence[dict[str, Any]], pipeline: PipelineConfig, site_dir: Path, *, augment: bool) -> None:
        transforms = deterministic_transforms(pipeline)
        if augment:
            transforms += random_transforms(pipeline)
        cache_dir = cache_dir_for(site_dir, pipeline)
        cache_dir.mkdir(parents=True, exist_ok=True)
        self.images = PersistentDataset(
            [{"image": item["image"], "content": item["content"]} for item in items], transform=Compose(transforms), cache_dir=cache_dir
        )
        self.targets = [{k: v for k, v in item.items() if k not in ("image", "content")} for item in items]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index]["image"], **self.targets[index]}


def make_dataset(items: Sequence[dict[str, Any]], pipeline: PipelineConfig, site_dir: Path, *, augment: bool) -> StudyDataset:
    """Dataset over manifest items (``{"image": series dict, "content": fingerprint, <targets>...}``)."""
    return StudyDataset(items, pipeline, site_dir, augment=augment)
