"""Shared fixtures for the preprocessing tests: small synthetic CT series and pydicom's real test files.

Series are written with ``synthetic.dicom_writer.write_ct_series`` (16-32 px, 10-16 slices) into
``tmp_path``; Enhanced CT (multi-frame) files with :func:`write_enhanced_ct`. Nothing here edits files
outside ``tmp_path``.
"""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from synthetic.dicom_writer import PatientIdentity, hu_to_stored, write_ct_series

#: Every skip for a missing system tool or test dependency starts with this; with ``CI=true`` such a skip is a
#: failure, so a CI run whose tool install broke cannot pass with those tests silently left out.
MISSING_TOOL = "missing system tool or test dependency:"


def missing_tool_reason(what: str) -> str:
    """The skip reason for a missing tool or dependency (a failure under ``CI=true``)."""
    return f"{MISSING_TOOL} {what}"


def strict_tools() -> bool:
    """True in CI (``CI=true``, as ``.ci/run`` is started): missing tools fail instead of skipping."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    report = outcome.get_result()
    if (
        report.skipped
        and strict_tools()
        and isinstance(report.longrepr, tuple)
        and MISSING_TOOL in str(report.longrepr[2])
    ):
        report.outcome = "failed"
        report.longrepr = f"CI=true and a required tool is missing: {report.longrepr[2]}"
    return None


#: SOP Class UID of Enhanced CT Image Storage.
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"

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
        pytest.skip(
            missing_tool_reason(f"pydicom test file {name!r} (bundled with pydicom, or in the pydicom-data package)")
        )
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
        state[str(p.relative_to(root))] = (
            st.st_size if p.is_file() else -1,
            st.st_mtime_ns,
            p.read_bytes() if p.is_file() else b"",
        )
    return state


@pytest.fixture(scope="session")
def snapshot() -> Callable[[Path], dict[str, tuple[int, int, bytes]]]:
    """``snapshot(root)``: a comparable listing of a folder (paths, sizes, mtimes, contents; folders too)."""
    return folder_state


# --- Enhanced CT (multi-frame) -----------------------------------------------------------------------------------


def _item(**attributes) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def _fg(**sequences: Dataset | None) -> Dataset:
    """A functional-groups item holding one-item sequences (None entries left out)."""
    return _item(**{name: DicomSequence([value]) for name, value in sequences.items() if value is not None})


def write_enhanced_ct(
    path: Path,
    hu: np.ndarray,
    *,
    pixel_spacing_mm: tuple[float, float] = (2.0, 2.0),
    slice_spacing_mm: float = 2.5,
    origin_mm: tuple[float, float, float] = (-15.0, -20.0, 100.0),
    positions: Sequence[Sequence[float]] | None = None,
    frame_order: Sequence[int] | None = None,
    rescale_intercept: float | Sequence[float] = -1024.0,
    rescale_slope: float = 1.0,
    frame_types: Sequence[Sequence[str]] | None = None,
    temporal_positions: Sequence[int] | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient: PatientIdentity = FAKE_PATIENT,
    rescale_type: str = "HU",
) -> Path:
    """Write ``hu`` (slices, rows, columns) as one Enhanced CT Image Storage file; return its path.

    Slice k lies at ``origin + k * slice_spacing`` along z (axial, orientation [1,0,0,0,1,0]) unless ``positions``
    gives each slice's ImagePositionPatient. ``frame_order[j]`` is the slice stored as frame j (default: in order),
    so the frames need not be sorted. A sequence of ``rescale_intercept`` puts one per frame (slice order) into the
    per-frame groups; a single value goes into the shared groups. ``frame_types[k]`` overrides slice k's FrameType,
    ``temporal_positions[k]`` sets its TemporalPositionIndex.
    """
    path = Path(path)
    hu = np.asarray(hu)
    n, rows, cols = hu.shape
    order = list(range(n)) if frame_order is None else list(frame_order)
    assert sorted(order) == list(range(n)), "frame_order must be a permutation of the slices"
    if positions is None:
        x, y, z = origin_mm
        positions = [(x, y, z + k * slice_spacing_mm) for k in range(n)]
    per_frame_rescale = not isinstance(rescale_intercept, (int, float))
    intercepts = list(rescale_intercept) if per_frame_rescale else [float(rescale_intercept)] * n  # type: ignore[arg-type]
    stored = np.stack(
        [
            hu_to_stored(hu[k], rescale_intercept=intercepts[k], rescale_slope=rescale_slope, pixel_representation=1)
            for k in order
        ]
    )
    study_uid = study_uid or generate_uid(entropy_srcs=[str(path), "study"])
    series_uid = series_uid or generate_uid(entropy_srcs=[str(path), "series"])
    sop_uid = generate_uid(entropy_srcs=[str(path), "instance"])
    axial = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]

    def transformation(intercept: float) -> Dataset:
        return _item(RescaleIntercept=f"{intercept:g}", RescaleSlope=f"{rescale_slope:g}", RescaleType=rescale_type)

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_CT_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ENHANCED_CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[series_uid, "frame-of-reference"])
    ds.Modality = "CT"
    ds.PatientName = patient.PatientName
    ds.PatientID = patient.PatientID
    ds.ImageType = axial
    ds.InstanceNumber = 1
    ds.ContentDate = "20240101"
    ds.ContentTime = "120000"
    ds.NumberOfFrames = n
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SharedFunctionalGroupsSequence = DicomSequence(
        [
            _fg(
                PixelMeasuresSequence=_item(
                    PixelSpacing=[f"{v:g}" for v in pixel_spacing_mm], SliceThickness=f"{slice_spacing_mm:g}"
                ),
                PlaneOrientationSequence=_item(ImageOrientationPatient=["1", "0", "0", "0", "1", "0"]),
                PixelValueTransformationSequence=None if per_frame_rescale else transformation(intercepts[0]),
                CTImageFrameTypeSequence=None if frame_types else _item(FrameType=axial),
            )
        ]
    )
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(
        [
            _fg(
                FrameContentSequence=_item(
                    InStackPositionNumber=k + 1,
                    StackID="1",
                    **({} if temporal_positions is None else {"TemporalPositionIndex": temporal_positions[k]}),
                ),
                PlanePositionSequence=_item(ImagePositionPatient=[f"{v:.4f}" for v in positions[k]]),
                PixelValueTransformationSequence=transformation(intercepts[k]) if per_frame_rescale else None,
                CTImageFrameTypeSequence=_item(FrameType=list(frame_types[k])) if frame_types else None,
            )
            for k in order
        ]
    )
    ds.PixelData = stored.astype("<i2").tobytes()
    ds["PixelData"].VR = "OW"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="session")
def enhanced_ct_writer() -> Callable[..., Path]:
    """``enhanced_ct_writer(path, hu, **options)`` writes one Enhanced CT file (see :func:`write_enhanced_ct`)."""
    return write_enhanced_ct


# --- real single files as small series, files without File Meta ------------------------------------------------


def stack_copies(src: Path, folder: Path, n: int, *, step_mm: float = 2.5) -> list[Path]:
    """Write ``n`` copies of one real slice into ``folder`` as a series: new SOPInstanceUIDs, positions
    ``step_mm`` apart along the slice normal. Pixel data (compressed or not) is copied unchanged."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        ds = pydicom.dcmread(src)
        orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        normal = np.cross(orientation[:3], orientation[3:])
        position = np.asarray([float(v) for v in ds.ImagePositionPatient]) + k * step_mm * normal
        uid = generate_uid(entropy_srcs=[str(folder), str(src), str(k)])
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
        path = folder / f"{k:03d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def stack_real() -> Callable[..., list[Path]]:
    """``stack_real(src, folder, n, step_mm=2.5)``: a series of copies of one real slice (see :func:`stack_copies`)."""
    return stack_copies


def strip_file_meta(path: Path, *, implicit_vr: bool = True, little_endian: bool = True) -> None:
    """Rewrite a file without preamble and File Meta (as old archives hold them), in the given encoding.

    Native 16-bit pixel data is byte-swapped for big endian (pydicom writes PixelData bytes as they are).
    """
    ds = pydicom.dcmread(path)
    if not little_endian and not ds["PixelData"].is_undefined_length:
        assert ds.BitsAllocated == 16 and ds.original_encoding[1], "only little endian 16-bit sources are converted"
        ds.PixelData = np.frombuffer(ds.PixelData, dtype="<u2").byteswap().tobytes()
    ds.file_meta = FileMetaDataset()
    ds.preamble = None
    pydicom.dcmwrite(path, ds, implicit_vr=implicit_vr, little_endian=little_endian)


@pytest.fixture(scope="session")
def without_file_meta() -> Callable[..., None]:
    """``without_file_meta(path, implicit_vr=True, little_endian=True)`` strips preamble and File Meta in place."""
    return strip_file_meta


def _as_task(node_id: int):
    """Set Flower's task identity (it stamps messages with it) as a running task of ``node_id`` has it; restore after."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, node_id, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.fixture
def task_identity():
    """The task identity of a ClientApp process (node 7)."""
    yield from _as_task(7)


@pytest.fixture
def server_task_identity():
    """The task identity of the ServerApp process (node 0)."""
    yield from _as_task(0)
