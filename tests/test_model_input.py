"""The model input in numpy (what ``fedct ingest`` caches without torch): the values of MONAI's deterministic chain."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor, PersistentDataset
from monai.data.utils import pickle_hashing
from monai.transforms import Compose, CropForegroundd, ResizeWithPadOrCropd, ScaleIntensityRanged

from preprocessing.cache import make_dataset
from preprocessing.discover import discover, file_state_fingerprint
from preprocessing.model_input import (
    CACHE_SUFFIX,
    cache_dir_for,
    cache_key,
    cached_path,
    crop_foreground,
    ensure_cached,
    is_cached,
    model_input,
    pad_or_crop,
    read_cached,
    window,
    write_cached,
)
from preprocessing.pipeline import PipelineConfig
from preprocessing.transforms import AboveThreshold, deterministic_transforms
from preprocessing.validate import SeriesInvalid, validate_series
from preprocessing.volume import series_to_dict

SMALL = PipelineConfig(input_size=(16, 16, 16), target_spacing_mm=(4.0, 4.0, 4.0))


def _item(root: Path) -> dict:
    [headers] = discover(root).series.values()
    series = validate_series(headers)
    return {"image": series_to_dict(series), "content": file_state_fingerprint(series.paths)}


def _monai_tail(cfg: PipelineConfig) -> Compose:
    """The steps of ``deterministic_transforms`` after the grid: crop to the body, window, fix the size."""
    return Compose(deterministic_transforms(cfg)[1:])


@pytest.mark.parametrize(
    ("shape", "body"),
    [
        ((30, 25, 12), (slice(5, 20), slice(3, 24), slice(0, 12))),  # cropped, then padded on every axis
        ((40, 41, 50), (slice(1, 39), slice(0, 41), slice(2, 49))),  # larger than the input: centre crop
        ((17, 16, 15), (slice(0, 17), slice(0, 16), slice(0, 15))),  # body touches every edge
        ((20, 20, 20), (slice(9, 10), slice(9, 10), slice(9, 10))),  # one voxel
        ((20, 20, 20), None),  # no body at all: MONAI crops to nothing and pads with 0
    ],
)
def test_crop_window_and_size_equal_monais_transforms(shape, body):
    rng = np.random.default_rng(sum(shape))
    hu = rng.uniform(-1100.0, -600.0, size=shape).astype(np.float32)
    if body is not None:
        hu[body] = rng.uniform(-1200.0, 900.0, size=hu[body].shape)
        hu[body][(0,) * 3] = 100.0
    reference = _monai_tail(SMALL)({"image": MetaTensor(torch.from_numpy(hu.copy())[None])})["image"].numpy()
    ours = pad_or_crop(window(crop_foreground(hu, SMALL.body_threshold_hu), SMALL.hu_min, SMALL.hu_max), (16, 16, 16))

    assert ours.shape == reference.shape[1:] == (16, 16, 16)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, reference[0])


def test_each_step_matches_its_monai_transform_alone():
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1000.0, -700.0, size=(23, 19, 11)).astype(np.float32)
    hu[4:9, 6:15, 3:5] = 50.0
    crop = CropForegroundd(keys="x", source_key="x", select_fn=AboveThreshold(-500.0), margin=2, allow_smaller=True)(
        {"x": torch.from_numpy(hu)[None]}
    )["x"]
    np.testing.assert_array_equal(crop_foreground(hu, -500.0), crop.numpy()[0])
    assert crop_foreground(hu, -500.0).shape == (9, 13, 6)
    scaled = ScaleIntensityRanged(keys="x", a_min=-1000.0, a_max=400.0, b_min=0.0, b_max=1.0, clip=True)(
        {"x": torch.from_numpy(hu)[None]}
    )["x"]
    np.testing.assert_array_equal(window(hu, -1000.0, 400.0), scaled.numpy()[0])
    sized = ResizeWithPadOrCropd(keys="x", spatial_size=(20, 24, 7), mode="constant", value=0.0)(
        {"x": torch.from_numpy(hu)[None]}
    )["x"]
    np.testing.assert_array_equal(pad_or_crop(hu, (20, 24, 7)), sized.numpy()[0])


def test_model_input_equals_the_deterministic_chain(make_series, dicom_root):
    make_series("s", n_slices=14, rows=40, cols=36, pixel_spacing_mm=(0.9, 1.1), slice_spacing_mm=2.5)
    item = _item(dicom_root)
    for cfg in (SMALL, PipelineConfig(input_size=(8, 12, 10), target_spacing_mm=(3.0, 2.0, 5.0))):
        reference = Compose(deterministic_transforms(cfg))({"image": item["image"]})["image"].numpy()
        ours = model_input(item["image"], cfg)

        assert ours.shape == reference.shape == (1, *cfg.input_size) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-6)


def test_model_input_names_the_file_that_cannot_be_read(make_series, dicom_root):
    series = make_series("s", n_slices=10)
    item = _item(dicom_root)
    series.paths[4].write_bytes(series.paths[4].read_bytes()[:-100])

    with pytest.raises(SeriesInvalid) as raised:
        model_input(item["image"], SMALL)
    assert raised.value.path == str(series.paths[4])


def test_cache_key_is_monais_so_entries_keep_their_names(make_series, dicom_root):
    make_series("s", n_slices=10)
    item = _item(dicom_root)
    assert cache_key(item) == pickle_hashing(item).decode()
    assert cache_key({"content": item["content"], "image": item["image"]}) == cache_key(item)  # key order: none
    assert cache_key({**item, "content": "other"}) != cache_key(item)


def test_training_reads_what_ensure_cached_wrote_without_recomputing(make_series, dicom_root, tmp_path):
    make_series("s", n_slices=12)
    item = _item(dicom_root)
    site = tmp_path / "site"

    path = ensure_cached(item, SMALL, site)
    written = path.stat().st_mtime_ns
    image = make_dataset([{**item, "label": 1, "id": "x"}], SMALL, site, augment=False)[0]["image"]

    assert path.suffix == CACHE_SUFFIX and path.parent == cache_dir_for(site, SMALL)
    assert path.stat().st_mtime_ns == written and sorted(path.parent.iterdir()) == [path]
    assert isinstance(image, torch.Tensor) and image.dtype == torch.float32
    reference = Compose(deterministic_transforms(SMALL))({"image": item["image"]})["image"]
    np.testing.assert_allclose(image.numpy(), reference.numpy(), rtol=0, atol=1e-6)
    ensure_cached(item, SMALL, site)  # cached: not written again
    assert path.stat().st_mtime_ns == written


def test_a_cache_written_before_as_pt_is_read_and_not_rewritten(make_series, dicom_root, tmp_path):
    make_series("s", n_slices=12)
    item = _item(dicom_root)
    site = tmp_path / "site"
    cache_dir = cache_dir_for(site, SMALL)
    old = PersistentDataset([item], transform=Compose(deterministic_transforms(SMALL)), cache_dir=cache_dir)[0]
    [legacy] = list(cache_dir.glob("*.pt"))  # what pipeline version 3 wrote before this change

    assert is_cached(cache_dir, item)
    ensure_cached(item, SMALL, site)
    image = make_dataset([item], SMALL, site, augment=False)[0]["image"]

    assert sorted(p for p in cache_dir.iterdir()) == [legacy]
    np.testing.assert_array_equal(image.numpy(), old["image"].numpy())


def test_a_corrupt_entry_is_recomputed(make_series, dicom_root, tmp_path):
    make_series("s", n_slices=12)
    item = _item(dicom_root)
    site = tmp_path / "site"
    path = ensure_cached(item, SMALL, site)
    good = read_cached(path)
    path.write_bytes(path.read_bytes()[:100])  # truncated by a crash or a full disk

    assert not is_cached(path.parent, item)
    assert read_cached(path) is None and not path.exists()
    again = make_dataset([item], SMALL, site, augment=False)[0]["image"]
    np.testing.assert_array_equal(again.numpy(), good)
    np.testing.assert_array_equal(read_cached(path), good)


def test_write_is_atomic_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / f"k{CACHE_SUFFIX}"
    write_cached(path, np.ones((1, 2, 3, 4), dtype=np.float64))

    assert sorted(tmp_path.iterdir()) == [path]
    out = read_cached(path)
    assert out.dtype == np.float32 and out.shape == (1, 2, 3, 4)
    np.save(path, np.ones((2, 3), dtype=np.float32))  # not a model input: refused, removed
    assert read_cached(path) is None and not path.exists()
    assert cached_path(tmp_path, {"image": {}, "content": ""}).suffix == CACHE_SUFFIX
