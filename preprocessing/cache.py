"""Stage 5: cached MONAI datasets of a site's studies.

The deterministic part of the pipeline (load, orient, resample, crop, window, size) is computed once per
series and stored under ``SITE_DIR/cache/<pipeline fingerprint>/`` as ``<key>.npy`` by
:mod:`preprocessing.model_input` (numpy: what ``fedct ingest``'s workers write without importing torch), read
here by a MONAI ``PersistentDataset`` (which also still reads the ``<key>.pt`` files it wrote itself before); the
cache key covers the series' files (paths, sizes, modification times), so a changed file is recomputed and a
changed pipeline uses a different folder. Targets (diagnosis, outcome, covariates) are joined after the cache,
so relabelling never recomputes images and never returns stale labels. Random augmentation runs after the cache.

Caches are capped in disk use: every use of a pipeline's cache touches its marker ``cache/.last-used-<fingerprint>``
(next to the folder, so the folder holds only cached tensors), and
:func:`prune_caches` (called by the site before each round with ``FEDCT_CACHE_MAX_GB``) removes the least recently
used caches of *other* pipelines until all caches together fit; the cache in use is never removed.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import PersistentDataset
from monai.transforms import Compose
from torch.utils.data import Dataset

from preprocessing.discover import file_state_fingerprint
from preprocessing.model_input import (  # noqa: F401 - the cache's layout lives there (torch-free), re-exported
    CACHE_FOLDER,
    LAST_USED,
    LEGACY_SUFFIX,
    cache_dir_for,
    cached_path,
    last_used_marker,
    mark_used,
    model_input,
    read_cached,
    write_cached,
)
from preprocessing.transforms import PipelineConfig, deterministic_transforms, random_transforms

__all__ = [
    "cache_dir_for",
    "file_state_fingerprint",
    "make_dataset",
    "prune_caches",
    "StudyDataset",
]  # file_state_fingerprint: from discover

log = logging.getLogger("fedct.cache")


def folder_bytes(folder: Path) -> int:
    """Bytes on disk of the files under ``folder`` (files vanishing meanwhile are skipped)."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


def _last_used(cache_dir: Path) -> float:
    try:
        return last_used_marker(cache_dir).stat().st_mtime
    except OSError:
        try:
            return cache_dir.stat().st_mtime
        except OSError:
            return 0.0


def prune_caches(site_dir: Path, *, keep: PipelineConfig, max_bytes: int) -> list[Path]:
    """Remove least-recently-used caches of other pipelines until all of ``SITE_DIR/cache`` fits in ``max_bytes``.

    The cache of ``keep`` (the pipeline in use) is marked used and never removed, even when it alone is over the
    cap (then a warning is logged). A removed cache is first renamed out of the way, so no reader ever sees a
    half-deleted folder. Returns the removed folders.
    """
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    root = Path(site_dir) / CACHE_FOLDER
    current = cache_dir_for(site_dir, keep)
    mark_used(current)
    sizes = {p: folder_bytes(p) for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    total = sum(sizes.values())
    removed: list[Path] = []
    for old in sorted((p for p in sizes if p != current), key=_last_used):
        if total <= max_bytes:
            break
        doomed = root / f".removing-{old.name}-{os.getpid()}-{time.monotonic_ns()}"
        try:
            old.rename(doomed)
        except OSError as exc:  # gone already, or not ours to remove: leave it
            log.warning("cache %s could not be removed (%s)", old, exc)
            continue
        shutil.rmtree(doomed, ignore_errors=True)
        last_used_marker(old).unlink(missing_ok=True)
        total -= sizes[old]
        removed.append(old)
    for leftover in root.glob(".removing-*"):  # an earlier removal interrupted half-way
        shutil.rmtree(leftover, ignore_errors=True)
    if total > max_bytes:
        log.warning(
            "the preprocessing cache in use (%s) holds %.2f GB, over the cap of %.2f GB (FEDCT_CACHE_MAX_GB); "
            "it is kept while in use",
            current,
            sizes.get(current, 0) / 1e9,
            max_bytes / 1e9,
        )
    return removed


class ModelInputCache(PersistentDataset):
    """MONAI's ``PersistentDataset`` over the ``.npy`` entries of :mod:`preprocessing.model_input`.

    An entry ingestion wrote is read as it is; a missing one is computed (numpy, the values of
    ``deterministic_transforms``) and written; an entry of the former format (``<key>.pt``, same key, same values)
    is read by ``PersistentDataset`` itself. The random transforms after the cache run as ``PersistentDataset``
    runs them.
    """

    def __init__(self, data: Sequence[dict[str, Any]], transform: Compose, cache_dir: Path, pipeline: PipelineConfig):
        super().__init__(data, transform=transform, cache_dir=cache_dir)
        self.pipeline = pipeline

    def _cachecheck(self, item_transformed: dict[str, Any]) -> dict[str, Any]:
        path = cached_path(self.cache_dir, item_transformed)
        image = read_cached(path)
        if image is None and path.with_suffix(LEGACY_SUFFIX).is_file():
            return super()._cachecheck(item_transformed)
        if image is None:
            image = model_input(item_transformed["image"], self.pipeline)
            write_cached(path, image)
        return {"image": torch.from_numpy(image), "content": item_transformed["content"]}


class StudyDataset(Dataset):
    """Cached (and, for training, augmented) images of a site's studies, each joined with its targets."""

    def __init__(
        self, items: Sequence[dict[str, Any]], pipeline: PipelineConfig, site_dir: Path, *, augment: bool
    ) -> None:
        transforms = deterministic_transforms(pipeline)
        if augment:
            transforms += random_transforms(pipeline)
        cache_dir = cache_dir_for(site_dir, pipeline)
        mark_used(cache_dir)
        self.images = ModelInputCache(
            [{"image": item["image"], "content": item["content"]} for item in items],
            Compose(transforms),
            cache_dir,
            pipeline,
        )
        self.targets = [{k: v for k, v in item.items() if k not in ("image", "content")} for item in items]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index]["image"], **self.targets[index]}


def make_dataset(
    items: Sequence[dict[str, Any]], pipeline: PipelineConfig, site_dir: Path, *, augment: bool
) -> StudyDataset:
    """Dataset over manifest items (``{"image": series dict, "content": fingerprint, <targets>...}``)."""
    return StudyDataset(items, pipeline, site_dir, augment=augment)
