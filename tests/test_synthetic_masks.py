"""synthetic.masks: a lesion mask written as NIfTI lands on the grid MONAI reports for the DICOM series."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from monai.transforms import LoadImage

from synthetic.dicom_writer import PatientIdentity, write_ct_series
from synthetic.masks import series_ras_affine, write_lesion_mask

PATIENT = PatientIdentity("SYNTH^MASK", "M1", "19600101", "F", "064Y")


@pytest.mark.parametrize("reverse", [False, True])
def test_mask_and_series_load_onto_the_same_grid(tmp_path: Path, reverse: bool) -> None:
    """Anisotropic pixels, an awkward origin and a spacing with float noise: shape, affine and voxels agree."""
    hu = np.full((6, 5, 7), -1000.0, dtype=np.float32)
    mask = np.zeros(hu.shape, dtype=bool)
    for k, r, c in ((1, 2, 3), (4, 0, 6), (5, 4, 0)):
        hu[k, r, c] = 400.0
        mask[k, r, c] = True
    geometry = dict(origin_mm=(-101.3, -87.65, -213.37), pixel_spacing_mm=(0.7, 1.1), slice_spacing_mm=0.625)
    series = tmp_path / "series"
    write_ct_series(
        series,
        hu,
        study_instance_uid="1.2.826.0.1.3680043.8.498.1",
        series_instance_uid="1.2.826.0.1.3680043.8.498.2",
        patient=PATIENT,
        reverse_instance_order=reverse,
        **geometry,
    )  # type: ignore[arg-type]
    path = write_lesion_mask(tmp_path / "m.nii.gz", mask, reverse_instance_order=reverse, **geometry)  # type: ignore[arg-type]
    load = LoadImage(image_only=True)
    image, loaded = load(str(series)), load(str(path))
    assert tuple(loaded.shape) == tuple(image.shape) == (7, 5, 6)
    np.testing.assert_allclose(np.asarray(loaded.affine), np.asarray(image.affine), atol=1e-4)
    np.testing.assert_allclose(
        series_ras_affine(n_slices=6, reverse_instance_order=reverse, **geometry),  # type: ignore[arg-type]
        np.asarray(image.affine),
        atol=1e-9,
    )
    np.testing.assert_array_equal(np.asarray(loaded) > 0, np.asarray(image) > 0)
    assert np.asarray(loaded).dtype == np.uint8 or set(np.unique(np.asarray(loaded)).tolist()) == {0, 1}


def test_same_input_same_bytes(tmp_path: Path) -> None:
    mask = np.zeros((3, 4, 4), dtype=bool)
    mask[1, 1:3, 1:3] = True
    kwargs = dict(
        origin_mm=(0.0, 0.0, 0.0), pixel_spacing_mm=(1.0, 1.0), slice_spacing_mm=2.0, reverse_instance_order=False
    )
    a = write_lesion_mask(tmp_path / "a.nii.gz", mask, **kwargs).read_bytes()  # type: ignore[arg-type]
    b = write_lesion_mask(tmp_path / "b.nii.gz", mask, **kwargs).read_bytes()  # type: ignore[arg-type]
    assert a == b


@pytest.mark.parametrize(
    ("mask", "overrides", "named"),
    [
        (np.zeros((3, 4), dtype=bool), {}, "(3, 4)"),
        (np.zeros((3, 4, 4), dtype=np.uint8), {}, "uint8"),
        (np.zeros((3, 4, 4), dtype=bool), {"pixel_spacing_mm": (0.0, 1.0)}, "(0.0, 1.0)"),
        (np.zeros((3, 4, 4), dtype=bool), {"slice_spacing_mm": float("nan")}, "nan"),
        (np.zeros((3, 4, 4), dtype=bool), {"origin_mm": (0.0, 1.0)}, "(0.0, 1.0)"),
    ],
)
def test_bad_input_is_named_and_nothing_written(
    tmp_path: Path, mask: np.ndarray, overrides: dict[str, object], named: str
) -> None:
    kwargs: dict[str, object] = dict(
        origin_mm=(0.0, 0.0, 0.0), pixel_spacing_mm=(1.0, 1.0), slice_spacing_mm=2.0, reverse_instance_order=False
    )
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=re.escape(named)):
        write_lesion_mask(tmp_path / "bad.nii.gz", mask, **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "bad.nii.gz").exists()


def test_affine_needs_a_positive_slice_count() -> None:
    with pytest.raises(ValueError, match="n_slices must be a positive integer, got 0"):
        series_ras_affine(
            origin_mm=(0.0, 0.0, 0.0),
            pixel_spacing_mm=(1.0, 1.0),
            slice_spacing_mm=1.0,
            n_slices=0,
            reverse_instance_order=False,
        )
