"""The deterministic pipeline's output — the model input — in numpy, and its on-disk cache; neither torch nor MONAI.

:func:`model_input` computes what :func:`preprocessing.transforms.deterministic_transforms` gives (the series read
onto the model grid, cropped to the body, windowed to [0, 1], padded or cropped to the input size) with the same
values, so that ingestion's worker processes start without importing torch + MONAI (seconds of CPU per process).

The cache holds one ``<key>.npy`` per series under ``SITE_DIR/cache/<pipeline fingerprint>/``: a float32 array
of shape (1, X, Y, Z). ``<key>`` is MONAI's ``pickle_hashing`` of ``{"image": series dict, "content": file states}``,
the name ``PersistentDataset`` gives its ``<key>.pt`` files: :class:`preprocessing.cache.StudyDataset` reads the
``.npy`` files, and a cache written before (``.pt``, same values) is still read as it is. The pipeline fingerprint
(with ``PIPELINE_VERSION``) names the folder, so a change of meaning never reads stale entries.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from preprocessing.pipeline import PipelineConfig

CACHE_FOLDER = "cache"
#: Prefix of the marker touched whenever a pipeline's cache is used (least-recently-used order for ``prune_caches``).
LAST_USED = ".last-used-"
#: Suffix of a cache entry written by this module (``.pt``: MONAI's ``PersistentDataset``, before).
CACHE_SUFFIX = ".npy"
LEGACY_SUFFIX = ".pt"
#: Voxels kept around the body by the foreground crop (``CropForegroundd(margin=2)``).
CROP_MARGIN = 2


def cache_dir_for(site_dir: Path, pipeline: PipelineConfig) -> Path:
    """Folder holding the cached model inputs of one pipeline configuration."""
    return Path(site_dir) / CACHE_FOLDER / pipeline.fingerprint()


def last_used_marker(cache_dir: Path) -> Path:
    """The marker file whose modification time says when ``cache_dir`` was last used."""
    return cache_dir.parent / f"{LAST_USED}{cache_dir.name}"


def mark_used(cache_dir: Path) -> None:
    """Record that ``cache_dir`` is in use now (its marker's modification time)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    last_used_marker(cache_dir).touch()  # an existing marker gets a new modification time


def _sorted_dict(item: Any) -> Any:
    """``monai.data.utils.sorted_dict``: dictionaries (nested) with their keys in sorted order."""
    if not isinstance(item, dict):
        return item
    return {k: _sorted_dict(v) if isinstance(v, dict) else v for k, v in sorted(item.items())}


def cache_key(item: Mapping[str, Any]) -> str:
    """The cache key of ``{"image": ..., "content": ...}``: MONAI's ``pickle_hashing`` (sha256 of the pickled,
    key-sorted dict), so an entry is found under the name ``PersistentDataset`` gave it."""
    dump = pickle.dumps(_sorted_dict(dict(item)), protocol=pickle.HIGHEST_PROTOCOL)
    return hashlib.sha256(dump, usedforsecurity=False).hexdigest()


def cached_path(cache_dir: Path, item: Mapping[str, Any]) -> Path:
    """Where the model input of ``item`` (``{"image": series dict, "content": fingerprint}``) is cached."""
    return Path(cache_dir) / f"{cache_key(item)}{CACHE_SUFFIX}"


def crop_foreground(volume: np.ndarray, threshold: float, *, margin: int = CROP_MARGIN) -> np.ndarray:
    """The box of voxels above ``threshold`` plus ``margin`` voxels, within the volume (``CropForegroundd`` with
    ``allow_smaller=True``); an empty (0, 0, 0) view when no voxel is above it, as MONAI gives."""
    mask = volume > threshold
    if not mask.any():
        return volume[:0, :0, :0]
    box = []
    for axis in range(volume.ndim):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(volume.ndim) if a != axis)))
        box.append(slice(max(int(present[0]) - margin, 0), min(int(present[-1]) + margin + 1, volume.shape[axis])))
    return volume[tuple(box)]


def window(volume: np.ndarray, hu_min: float, hu_max: float) -> np.ndarray:
    """HU -> [0, 1], float32 (``ScaleIntensityRanged(a_min=hu_min, a_max=hu_max, b_min=0, b_max=1, clip=True)``)."""
    out = (volume.astype(np.float32, copy=False) - np.float32(hu_min)) / np.float32(hu_max - hu_min)
    return np.clip(out, 0.0, 1.0, out=out)


def pad_or_crop(volume: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """Centre crop, then pad with 0 symmetrically, to ``size`` (``ResizeWithPadOrCropd(mode="constant", value=0)``)."""
    crop = []
    for n, target in zip(volume.shape, size):
        start = max(n // 2 - target // 2, 0)
        crop.append(slice(start, start + target))
    cropped = volume[tuple(crop)]
    pad = [(d // 2, d - d // 2) for d in (max(int(t) - n, 0) for n, t in zip(cropped.shape, size))]
    return np.pad(cropped, pad, mode="constant", constant_values=0.0) if any(sum(p) for p in pad) else cropped


def model_input(image: Mapping[str, Any], pipeline: PipelineConfig) -> np.ndarray:
    """The model input of one series (its dict from the manifest), float32 of shape ``(1, *pipeline.input_size)``:
    the values of :func:`preprocessing.transforms.deterministic_transforms` to float32 rounding.

    Raises :class:`preprocessing.validate.SeriesInvalid` naming the file when a slice cannot be used.
    """
    if "nifti" in image:  # a validated NIfTI volume (preprocessing/nifti.py reads it with MONAI)
        from preprocessing.nifti import read_resampled_nifti

        hu = read_resampled_nifti(image, pipeline.target_spacing_mm).volume
    else:
        from preprocessing.validate import as_series
        from preprocessing.volume import read_resampled_volume

        hu = read_resampled_volume(as_series(image), pipeline.target_spacing_mm, antialias=False).volume
    body = crop_foreground(hu, pipeline.body_threshold_hu)
    out = pad_or_crop(window(body, pipeline.hu_min, pipeline.hu_max), pipeline.input_size)
    return np.ascontiguousarray(out[None], dtype=np.float32)


def read_cached(path: Path) -> np.ndarray | None:
    """A cached model input, or None when there is none; an unreadable entry is removed (it is computed again)."""
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, EOFError):  # truncated or corrupt: recompute
        Path(path).unlink(missing_ok=True)
        return None
    if array.dtype != np.float32 or array.ndim != 4:
        Path(path).unlink(missing_ok=True)
        return None
    return array


def write_cached(path: Path, array: np.ndarray) -> None:
    """Write a cache entry atomically (a reader never sees half a file; concurrent writers write the same bytes)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    os.replace(tmp, path)


def is_cached(cache_dir: Path, item: Mapping[str, Any]) -> bool:
    """True when ``item`` has a readable entry (``.npy``, or a ``.pt`` written before) in ``cache_dir``."""
    path = cached_path(cache_dir, item)
    if path.with_suffix(LEGACY_SUFFIX).is_file():
        return True
    try:
        header = np.load(path, mmap_mode="r", allow_pickle=False)  # reads the header only
    except FileNotFoundError:
        return False
    except (OSError, ValueError, EOFError):
        return False
    return header.dtype == np.float32 and header.ndim == 4


def ensure_cached(item: Mapping[str, Any], pipeline: PipelineConfig, site_dir: Path) -> Path:
    """Compute and cache the model input of ``item`` (``{"image": series dict, "content": fingerprint}``) unless
    it is cached already; return the entry's path. What ``fedct ingest``'s workers run."""
    cache_dir = cache_dir_for(site_dir, pipeline)
    mark_used(cache_dir)
    key_item = {"image": item["image"], "content": item["content"]}
    path = cached_path(cache_dir, key_item)
    if not is_cached(cache_dir, key_item):
        write_cached(path, model_input(item["image"], pipeline))
    return path
