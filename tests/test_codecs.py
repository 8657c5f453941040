"""Compressed and deflated transfer syntaxes decode to the same HU as the uncompressed original.

Synthetic series are re-encoded with ``Dataset.compress`` (RLE: pydicom; JPEG-LS: pyjpegls; JPEG 2000:
pylibjpeg-openjpeg) or saved deflated; real compressed CT comes from pydicom's test data (``pydicom-data``
for the 512 x 512 files: skipped when that package is not installed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import get_encoder
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from preprocessing.discover import discover
from preprocessing.validate import ValidationConfig, validate_series
from preprocessing.volume import read_hu_volume

#: Which package provides each encoder (for skip reasons).
ENCODER_PACKAGE = {
    RLELossless: "pydicom",
    JPEGLSLossless: "pyjpegls",
    JPEG2000Lossless: "pylibjpeg-openjpeg",
    JPEG2000: "pylibjpeg-openjpeg",
}


def _require_encoder(transfer_syntax: UID) -> None:
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        return  # written by pydicom's file writer (zlib)
    if not get_encoder(transfer_syntax).is_available:
        pytest.skip(
            f"missing system tool or test dependency: encoder for {transfer_syntax.name} ({ENCODER_PACKAGE[transfer_syntax]})"
        )


def recode(paths: list[Path], transfer_syntax: UID, **encoder_options) -> None:
    """Re-encode files in place with ``transfer_syntax`` (deflated: the whole data set; else the pixel data)."""
    for path in paths:
        ds = pydicom.dcmread(path)
        if transfer_syntax == DeflatedExplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = transfer_syntax
        else:
            ds.compress(transfer_syntax, **encoder_options)
        ds.save_as(path)


def _load(root: Path, config: ValidationConfig | None = None):
    [headers] = discover(root).series.values()
    series = validate_series(headers, config=config)
    return series, *read_hu_volume(series)


LOSSLESS = [RLELossless, JPEGLSLossless, JPEG2000Lossless, DeflatedExplicitVRLittleEndian]


@pytest.mark.parametrize("transfer_syntax", LOSSLESS, ids=lambda uid: uid.keyword)
@pytest.mark.parametrize(
    ("pixel_representation", "intercept", "lo", "hi"),
    [(0, -1024.0, -1024, 3071), (1, 0.0, -2048, 3071)],
    ids=["unsigned", "signed"],
)
def test_lossless_transfer_syntax_gives_exactly_the_uncompressed_hu(
    make_series, dicom_root, transfer_syntax, pixel_representation, intercept, lo, hi
):
    _require_encoder(transfer_syntax)
    hu = np.random.default_rng(8).integers(lo, hi + 1, size=(8, 32, 40))  # OpenJPEG needs >= 32 px for its 6 levels
    hu[0, 0, 0], hu[-1, -1, -1] = lo, hi
    s = make_series("a", hu=hu, pixel_representation=pixel_representation, rescale_intercept=intercept)
    _, reference, reference_affine = _load(dicom_root)
    recode(s.paths, transfer_syntax)
    assert pydicom.dcmread(s.paths[0]).file_meta.TransferSyntaxUID == transfer_syntax

    series, volume, affine = _load(dicom_root)

    assert series.transfer_syntaxes == (transfer_syntax,)
    np.testing.assert_array_equal(volume, reference)
    np.testing.assert_array_equal(volume, hu.transpose(2, 1, 0))
    np.testing.assert_allclose(affine, reference_affine)


def test_series_mixing_transfer_syntaxes_reports_them_all(make_series, dicom_root):
    for transfer_syntax in (JPEG2000Lossless, JPEGLSLossless):
        _require_encoder(transfer_syntax)
    s = make_series("a", n_slices=9, rows=32, cols=32)
    _, reference, _ = _load(dicom_root)
    recode(s.paths[0:3], RLELossless)
    recode(s.paths[3:6], JPEGLSLossless)
    recode(s.paths[6:8], JPEG2000Lossless)
    recode(s.paths[8:], DeflatedExplicitVRLittleEndian)

    series, volume, _ = _load(dicom_root)

    used = [RLELossless, JPEGLSLossless, JPEG2000Lossless, DeflatedExplicitVRLittleEndian]
    assert series.transfer_syntaxes == tuple(sorted(used))
    np.testing.assert_array_equal(volume, reference)


def _smooth_phantom(n_slices: int = 8, size: int = 32) -> np.ndarray:
    """A body-like volume: air around an ellipse of soft tissue with a bone ring and a slow gradient."""
    z, y, x = np.mgrid[:n_slices, :size, :size].astype(float)
    r = np.hypot((x - size / 2) / (size * 0.42), (y - size / 2) / (size * 0.35))
    hu = np.full(x.shape, -1000.0)
    hu[r < 1.0] = 40 + 3 * z[r < 1.0] + 2 * x[r < 1.0]
    hu[(r > 0.85) & (r < 1.0)] = 900
    return np.rint(hu).astype(np.int32)


def test_lossy_jpeg_2000_is_close_to_but_not_the_original(make_series, dicom_root):
    _require_encoder(JPEG2000)
    hu = _smooth_phantom()
    s = make_series("a", hu=hu, rows=32, cols=32)
    _, reference, _ = _load(dicom_root)
    recode(s.paths, JPEG2000, j2k_psnr=[60])  # 60 dB peak signal-to-noise ratio of the stored values

    series, volume, _ = _load(dicom_root)

    assert series.transfer_syntaxes == (JPEG2000,)
    error = np.abs(volume - reference)
    assert error.max() > 0  # really lossy
    assert error.mean() < 5.0  # HU
    assert error.max() < 60.0
    assert abs(volume.mean() - reference.mean()) < 1.0


# --- real compressed CT ------------------------------------------------------------------------------------------


def test_real_jpeg_2000_lossless_ct_equals_its_uncompressed_version(tmp_path, copy_testdata, stack_real):
    uncompressed = copy_testdata("693_UNCR.dcm", tmp_path / "src")
    compressed = copy_testdata("693_J2KR.dcm", tmp_path / "src")
    stack_real(uncompressed, tmp_path / "unc", 2)
    stack_real(compressed, tmp_path / "j2k", 2)
    config = ValidationConfig(min_slices=2)

    series_unc, volume_unc, affine_unc = _load(tmp_path / "unc", config)
    series_j2k, volume_j2k, affine_j2k = _load(tmp_path / "j2k", config)

    assert series_unc.transfer_syntaxes == (ExplicitVRLittleEndian,)
    assert series_j2k.transfer_syntaxes == (JPEG2000Lossless,)
    assert volume_j2k.shape == (512, 512, 2)
    np.testing.assert_array_equal(volume_j2k, volume_unc)
    np.testing.assert_allclose(affine_j2k, affine_unc)
    assert (volume_j2k == -1000).sum() > 100_000  # the padding (-2000 stored) became air in both


def test_real_lossy_jpeg_2000_ct_equals_its_decompressed_export(tmp_path, copy_testdata, stack_real):
    lossy = copy_testdata("693_J2KI.dcm", tmp_path / "src")  # bundled with pydicom
    decompressed = copy_testdata("693_UNCI.dcm", tmp_path / "src")  # pydicom-data: the same image, decompressed
    stack_real(lossy, tmp_path / "j2k", 2)
    stack_real(decompressed, tmp_path / "unc", 2)
    config = ValidationConfig(min_slices=2)

    series_j2k, volume_j2k, _ = _load(tmp_path / "j2k", config)
    _, volume_unc, _ = _load(tmp_path / "unc", config)

    assert series_j2k.transfer_syntaxes == (JPEG2000,)
    np.testing.assert_array_equal(volume_j2k, volume_unc)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the file's UIDs are hashes, not UIDs
def test_real_jpeg_lossless_sv1_ct_decodes_to_its_modality_lut(tmp_path, copy_testdata, stack_real):
    # No installed encoder writes JPEG Lossless SV1 (that needs python-gdcm): a real file from pydicom-data.
    src = copy_testdata("bad_sequence.dcm", tmp_path / "src")
    ds = pydicom.dcmread(src)
    assert ds.file_meta.TransferSyntaxUID == JPEGLosslessSV1 and ds.Modality == "CT"
    stack_real(src, tmp_path / "in", 2)

    series, volume, _ = _load(tmp_path / "in", ValidationConfig(min_slices=2))

    assert series.transfer_syntaxes == (JPEGLosslessSV1,)
    expected = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds).astype(np.float32).T
    for k in range(2):
        np.testing.assert_array_equal(volume[:, :, k], expected)
    # 12-bit unsigned with intercept -1024: HU within -1024..3071; a neck slice: air, soft tissue and bone.
    assert -1024 <= volume.min() and volume.max() <= 3071
    assert (volume < -900).mean() > 0.01 and -100 < np.median(volume) < 200 and volume.max() > 500
