"""Stage 5: the on-disk cache of the deterministic pipeline (MONAI PersistentDataset)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from preprocessing.cache import (
    CACHE_FOLDER,
    cache_dir_for,
    file_state_fingerprint,
    folder_bytes,
    last_used_marker,
    make_dataset,
    prune_caches,
)
from preprocessing.discover import discover
from preprocessing.transforms import PipelineConfig
from preprocessing.validate import validate_series
from preprocessing.volume import series_to_dict

SMALL = PipelineConfig(input_size=(16, 16, 16), target_spacing_mm=(4.0, 4.0, 4.0))


def _item(root: Path, label: int = 0) -> dict:
    """A dataset item as ``StudyEntry.item()`` builds it, with the file-state fingerprint as content."""
    [headers] = discover(root).series.values()
    series = validate_series(headers)
    return {
        "image": series_to_dict(series),
        "content": file_state_fingerprint(series.paths),
        "label": label,
        "id": "study-test",
    }


def _cached(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.rglob("*") if p.is_file())


def test_cache_folder_is_named_by_the_pipeline_fingerprint(tmp_path):
    assert cache_dir_for(tmp_path, SMALL) == tmp_path / CACHE_FOLDER / SMALL.fingerprint()
    other = dataclasses.replace(SMALL, hu_max=500.0)
    assert cache_dir_for(tmp_path, other) != cache_dir_for(tmp_path, SMALL)


def test_second_access_hits_the_cache(make_series, dicom_root, tmp_path):
    make_series("a", n_slices=12)
    site = tmp_path / "site"
    item = _item(dicom_root)
    cache_dir = cache_dir_for(site, SMALL)

    first = make_dataset([item], SMALL, site, augment=False)[0]
    after_first = _cached(cache_dir)
    second = make_dataset([item], SMALL, site, augment=False)[0]

    assert len(after_first) == 1
    assert _cached(cache_dir) == after_first
    assert tuple(first["image"].shape) == (1, 16, 16, 16)
    assert torch.equal(first["image"], second["image"])
    assert first["label"] == second["label"] == 0


def test_cached_tensor_is_used_instead_of_the_dicom_files(make_series, dicom_root, tmp_path):
    s = make_series("a", n_slices=12)
    site = tmp_path / "site"
    item = _item(dicom_root)
    first = make_dataset([item], SMALL, site, augment=False)[0]

    # With the same item the files are not read again: removing them does not matter.
    for path in s.paths:
        path.unlink()
    again = make_dataset([item], SMALL, site, augment=False)[0]

    assert torch.equal(first["image"], again["image"])


def test_changed_file_gives_a_new_cache_entry(make_series, dicom_root, tmp_path):
    s = make_series("a", n_slices=12)
    site = tmp_path / "site"
    cache_dir = cache_dir_for(site, SMALL)
    before = _item(dicom_root)
    make_dataset([before], SMALL, site, augment=False)[0]
    assert len(_cached(cache_dir)) == 1

    stat = s.paths[3].stat()
    os.utime(s.paths[3], ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    after = _item(dicom_root)
    make_dataset([after], SMALL, site, augment=False)[0]

    assert after["content"] != before["content"]
    assert len(_cached(cache_dir)) == 2


def test_changed_label_reuses_the_image_cache_and_returns_the_new_label(make_series, dicom_root, tmp_path):
    make_series("a", n_slices=12)
    site = tmp_path / "site"
    cache_dir = cache_dir_for(site, SMALL)

    first = make_dataset([_item(dicom_root, label=0)], SMALL, site, augment=False)[0]
    out = make_dataset([_item(dicom_root, label=2)], SMALL, site, augment=False)[0]

    assert len(_cached(cache_dir)) == 1  # images are keyed by their files, not their labels
    assert out["label"] == 2  # ... and labels are joined after the cache, never stale
    assert first["label"] == 0


def test_other_pipeline_uses_another_cache_folder(make_series, dicom_root, tmp_path):
    make_series("a", n_slices=12)
    site = tmp_path / "site"
    item = _item(dicom_root)
    other = dataclasses.replace(SMALL, input_size=(16, 16, 24))

    a = make_dataset([item], SMALL, site, augment=False)[0]
    b = make_dataset([item], other, site, augment=False)[0]

    assert tuple(a["image"].shape) == (1, 16, 16, 16)
    assert tuple(b["image"].shape) == (1, 16, 16, 24)
    assert len(_cached(cache_dir_for(site, SMALL))) == 1
    assert len(_cached(cache_dir_for(site, other))) == 1
    assert sorted(p.name for p in (site / CACHE_FOLDER).iterdir() if p.is_dir()) == sorted(
        [SMALL.fingerprint(), other.fingerprint()]
    )


def test_augmented_dataset_caches_only_the_deterministic_part(make_series, dicom_root, tmp_path):
    make_series("a", n_slices=12)
    site = tmp_path / "site"
    item = _item(dicom_root)
    plain = make_dataset([item], SMALL, site, augment=False)[0]["image"]

    augmented = make_dataset([item], SMALL, site, augment=True)
    augmented.images.transform.set_random_state(seed=1)
    outputs = [augmented[0]["image"] for _ in range(4)]

    assert len(_cached(cache_dir_for(site, SMALL))) == 1  # same cache entry as without augmentation
    assert all(tuple(o.shape) == tuple(plain.shape) for o in outputs)
    assert any(not torch.equal(o, plain) for o in outputs)


def test_file_state_fingerprint_changes_with_size_and_mtime(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    base = file_state_fingerprint([str(path)])

    assert file_state_fingerprint([str(path)]) == base
    os.utime(path, ns=(1_000_000_000, 2_000_000_000))
    touched = file_state_fingerprint([str(path)])
    assert touched != base
    path.write_bytes(b"abcd")
    os.utime(path, ns=(1_000_000_000, 2_000_000_000))
    assert file_state_fingerprint([str(path)]) not in (base, touched)


def test_file_state_fingerprint_of_a_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        file_state_fingerprint([str(tmp_path / "gone.dcm")])


def _three_pipeline_caches(make_series, dicom_root, site: Path) -> list[PipelineConfig]:
    """Real caches of three pipelines, used in order (the first longest ago)."""
    make_series("a", n_slices=12)
    item = _item(dicom_root)
    pipelines = [dataclasses.replace(SMALL, input_size=(16, 16, z)) for z in (16, 24, 32)]
    for age, pipeline in zip((300, 200, 100), pipelines):
        make_dataset([item], pipeline, site, augment=False)[0]
        marker = last_used_marker(cache_dir_for(site, pipeline))
        os.utime(marker, (marker.stat().st_atime, marker.stat().st_mtime - age))
    return pipelines


def test_caches_over_the_cap_lose_the_least_recently_used_never_the_one_in_use(make_series, dicom_root, tmp_path):
    site = tmp_path / "site"
    oldest, middle, newest = _three_pipeline_caches(make_series, dicom_root, site)
    sizes = {p: folder_bytes(cache_dir_for(site, p)) for p in (oldest, middle, newest)}
    assert all(size > 1000 for size in sizes.values())  # real cached tensors
    total = sum(sizes.values())

    assert prune_caches(site, keep=newest, max_bytes=total) == []  # fits: nothing removed
    # one byte too many: the least recently used other pipeline goes first
    assert prune_caches(site, keep=newest, max_bytes=total - 1) == [cache_dir_for(site, oldest)]
    assert not cache_dir_for(site, oldest).exists() and cache_dir_for(site, middle).exists()
    # the pipeline in use is kept even when it alone is over the cap; every other one goes
    assert prune_caches(site, keep=oldest, max_bytes=0) == [cache_dir_for(site, middle), cache_dir_for(site, newest)]
    assert sorted(p.name for p in (site / CACHE_FOLDER).iterdir()) == sorted(
        [oldest.fingerprint(), last_used_marker(cache_dir_for(site, oldest)).name]
    )
    assert not list((site / CACHE_FOLDER).glob(".removing-*"))


def test_using_a_cache_makes_it_recent(make_series, dicom_root, tmp_path):
    site = tmp_path / "site"
    oldest, middle, newest = _three_pipeline_caches(make_series, dicom_root, site)
    make_dataset([_item(dicom_root)], oldest, site, augment=False)  # used again: now the most recent
    total = sum(folder_bytes(cache_dir_for(site, p)) for p in (oldest, middle, newest))
    assert prune_caches(site, keep=newest, max_bytes=total - 1) == [cache_dir_for(site, middle)]
    # a removed pipeline is rebuilt when asked for again
    again = make_dataset([_item(dicom_root)], middle, site, augment=False)[0]
    assert tuple(again["image"].shape) == (1, 16, 16, 24) and len(_cached(cache_dir_for(site, middle))) == 1


def test_the_site_prunes_caches_before_each_round(make_series, dicom_root, tmp_path):
    """SiteConfig.admit applies FEDCT_CACHE_MAX_GB with the round's pipeline kept."""
    from fl_client.config import SiteConfig, SiteLimits
    from fl_server.config import ServerConfig

    site_dir = tmp_path / "site"
    oldest, _middle, newest = _three_pipeline_caches(make_series, dicom_root, site_dir)
    site = SiteConfig(
        site_name="s",
        dicom_dir=dicom_root,
        site_dir=site_dir,
        labels_csv=None,
        device="cpu",
        limits=SiteLimits(cache_max_gb=folder_bytes(cache_dir_for(site_dir, newest)) / 1e9),
    )
    settings = ServerConfig(input_size="16,16,16", target_spacing_mm="4,4,4").round_settings(1)
    assert settings.pipeline == oldest
    site.admit(settings)
    assert sorted(p.name for p in (site_dir / CACHE_FOLDER).iterdir() if p.is_dir()) == [oldest.fingerprint()]


def test_a_negative_cap_is_refused(tmp_path):
    with pytest.raises(ValueError, match="max_bytes must be >= 0, got -1"):
        prune_caches(tmp_path, keep=SMALL, max_bytes=-1)
