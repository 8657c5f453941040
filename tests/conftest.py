"""Shared fixtures for the preprocessing tests: small synthetic CT series and pydicom's real test files.

Series are written with ``synthetic.dicom_writer.write_ct_series`` (16-32 px, 10-16 slices) into
``tmp_path``; nothing here edits files outside ``tmp_path``.
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from synthetic.dicom_writer import PatientIdentity, write_ct_series

#: Fake protected health information written into every synthetic series. The strings are unusual on
#: purpose so that finding one of them in an output file can only mean it leaked.
FAKE_PATIENT = PatientIdentity(
    PatientName="Qzvorak^Ylvenne",
    PatientID="PIDQ7X93KZ",
    PatientBirthDate="19370415",
    PatientSex="F",
    PatientAge="087Y",
)


@dataclass(frozen=True)
class SeriesFiles:
    """What ``write_series`` wrote: files in slice order (increasing z) and the HU they hold."""

    folder: Path
    paths: list[Path]
    hu: np.ndarray  # (slices, rows, columns)
    study_uid: str
    series_uid: str
    patient: PatientIdentity
    pixel_spacing_mm: tuple[float, float]
    slice_spacing_mm: float
    origin_mm: tuple[float, float, float]


def default_hu(n_slices: int, rows: int, cols: int, seed: int) -> np.ndarray:
    """A volume where every voxel has its own value: air around a body of random soft tissue and bone."""
    rng = np.random.default_rng(seed)
    hu = np.full((n_slices, rows, cols), -1000, dtype=np.int32)
    body = rng.integers(-200, 1200, size=(n_slices, rows - 4, cols - 4))
    hu[:, 2:-2, 2:-2] = body
    return hu


def write_series(
    folder: Path,
    *,
    n_slices: int = 12,
    rows: int = 16,
    cols: int = 16,
    pixel_spacing_mm: tuple[float, float] = (2.0, 2.0),
    slice_spacing_mm: float = 2.5,
    origin_mm: tuple[float, float, float] = (-15.0, -20.0, 100.0),
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient: PatientIdentity = FAKE_PATIENT,
    hu: np.ndarray | None = None,
    seed: int = 0,
    **writer_kwargs,
) -> SeriesFiles:
    """Write one small CT series into ``folder``; UIDs are derived from the folder unless given."""
    folder = Path(folder)
    study_uid = study_uid or generate_uid(entropy_srcs=[str(folder), "study"])
    series_uid = series_uid or generate_uid(entropy_srcs=[str(folder), "series"])
    if hu is None:
        hu = default_hu(n_slices, rows, cols, seed)
    writer_kwargs.setdefault("uid_entropy", [str(folder), series_uid])
    paths = write_ct_series(
        folder,
        hu,
        pixel_spacing_mm=pixel_spacing_mm,
        slice_spacing_mm=slice_spacing_mm,
        origin_mm=origin_mm,
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        patient=patient,
        **writer_kwargs,
    )
    return SeriesFiles(
        folder=folder,
        paths=list(paths),
        hu=np.asarray(hu),
        study_uid=study_uid,
        series_uid=series_uid,
        patient=patient,
        pixel_spacing_mm=tuple(pixel_spacing_mm),
        slice_spacing_mm=float(slice_spacing_mm),
        origin_mm=tuple(origin_mm),
    )


@pytest.fixture(scope="session")
def series_writer() -> Callable[..., SeriesFiles]:
    """``write_series(folder, **options)`` for fixtures of any scope."""
    return write_series


@pytest.fixture
def dicom_root(tmp_path: Path) -> Path:
    """An empty input folder, as a hospital's DICOM export would be."""
    root = tmp_path / "dicom"
    root.mkdir()
    return root


@pytest.fixture
def make_series(dicom_root: Path) -> Callable[..., SeriesFiles]:
    """``make_series(name, **options)`` writes a small series into ``dicom_root / name``."""

    def make(name: str = "series", **options) -> SeriesFiles:
        return write_series(dicom_root / name, **options)

    return make


def _edit(path: Path, change: Callable[[pydicom.Dataset], None]) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)


@pytest.fixture(scope="session")
def edit_dicom() -> Callable[[Path, Callable[[pydicom.Dataset], None]], None]:
    """``edit_dicom(path, change)``: read a file, let ``change`` modify the dataset, write it back."""
    return _edit


@pytest.fixture(scope="session")
def fake_patient() -> PatientIdentity:
    return FAKE_PATIENT


def _copy_testdata(name: str, dst: Path) -> Path:
    src = get_testdata_file(name, download=False)
    if src is None:
        pytest.skip(f"pydicom test file {name!r} is not bundled with this pydicom installation")
    src = Path(src)
    dst = Path(dst)
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        dst.mkdir(parents=True, exist_ok=True)
        dst = Path(shutil.copy2(src, dst / src.name))
    return dst


@pytest.fixture(scope="session")
def copy_testdata() -> Callable[[str, Path], Path]:
    """``copy_testdata(name, dst)`` copies one of pydicom's bundled test files or folders to ``dst``.

    Returns the copied folder (for a folder) or file (copied into ``dst``); skips when not bundled.
    pydicom's own files are never modified.
    """
    return _copy_testdata


def write_labels_csv(path: Path, rows: Sequence[dict[str, object]], columns: Sequence[str] | None = None) -> Path:
    """Write a labels.csv with ``columns`` (default: the keys of the first row)."""
    columns = list(columns or (rows[0].keys() if rows else ["StudyInstanceUID", "diagnosis"]))
    path = Path(path)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    return path


@pytest.fixture(scope="session")
def labels_writer() -> Callable[..., Path]:
    """``labels_writer(path, rows, columns=None)`` writes a labels.csv."""
    return write_labels_csv


def folder_state(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file and folder under ``root`` (hidden ones included) with its size, mtime and content."""
    state = {}
    for p in sorted(Path(root).rglob("*")):
        st = p.stat()
        state[str(p.relative_to(root))] = (st.st_size if p.is_file() else -1, st.st_mtime_ns, p.read_bytes() if p.is_file() else b"")
    return state


@pytest.fixture(scope="session")
def snapshot() -> Callable[[Path], dict[str, tuple[int, int, bytes]]]:
    """``snapshot(root)``: a comparable listing of a folder (paths, sizes, mtimes, contents; folders too)."""
    return folder_state
