"""A validated NIfTI CT volume source, for public collections that ship NIfTI (MosMedData) instead of DICOM.

A site folder may hold ``nifti/`` (one ``*.nii.gz`` or ``*.nii`` CT volume per study, the file name without its
suffix being the study key of ``labels.csv``) instead of ``dicom/``. :func:`validate_nifti` checks each file, one
invariant per check, each refusal with its own reason code; :func:`read_resampled_nifti` loads an accepted file
with MONAI's ``LoadImage`` (NibabelReader: the NIfTI affine is RAS) and puts it through the same
``Orientation("RAS")`` + ``Spacing(pixdim, "bilinear", "border")`` that define the DICOM path's model grid; the
rest of the deterministic pipeline (crop, window, size) is shared. :func:`ingest_nifti_site` is ``fedct ingest``
for such a folder: same manifest, report and cache as the DICOM path.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from preprocessing.validate import SeriesInvalid

#: File name endings of a NIfTI volume (checked in this order: ``.nii.gz`` before ``.nii``).
NIFTI_SUFFIXES = (".nii.gz", ".nii")
#: Name of the folder holding a site's NIfTI volumes (next to, or instead of, ``dicom/``).
NIFTI_SOURCE_FOLDER = "nifti"
#: Intensity conventions :func:`validate_nifti` recognises: name -> offset added to stored values to get HU.
CONVENTIONS = {"HU": 0.0, "HU+1024": -1024.0}
#: Values below this (after the offset) are outside the scanner's field of view: set to air, as the DICOM path does.
AIR_HU = -1024.0


@dataclass(frozen=True)
class NiftiConfig:
    """Tolerances of the NIfTI checks."""

    min_voxels_per_axis: int = 8
    min_spacing_mm: float = 0.1
    max_spacing_mm: float = 20.0
    min_hu: float = -3100.0  # outside-field-of-view padding goes down to -3024 (and -2048, -2000)
    max_hu: float = 4095.0  # 12-bit CT scale; extended-scale (metal) exports are refused with a reason
    min_air_fraction: float = 0.01  # share of voxels near air (-1000 HU) that identifies the convention
    min_body_fraction: float = 0.01  # share of voxels above -500 HU (soft tissue, bone): a body is in the volume

    def __post_init__(self) -> None:
        if self.min_voxels_per_axis < 2:
            raise ValueError(f"min_voxels_per_axis must be >= 2, got {self.min_voxels_per_axis}")
        if not 0 < self.min_spacing_mm < self.max_spacing_mm:
            raise ValueError(
                f"need 0 < min_spacing_mm < max_spacing_mm, got {self.min_spacing_mm}, {self.max_spacing_mm}"
            )
        if not self.min_hu < -1000.0 < self.max_hu:
            raise ValueError(f"need min_hu < -1000 < max_hu, got {self.min_hu}, {self.max_hu}")
        if not 0 < self.min_air_fraction < 1:
            raise ValueError(f"min_air_fraction must be in (0, 1), got {self.min_air_fraction}")
        if not 0 < self.min_body_fraction < 1:
            raise ValueError(f"min_body_fraction must be in (0, 1), got {self.min_body_fraction}")


@dataclass(frozen=True)
class ValidatedNifti:
    """A NIfTI CT volume that passed :func:`validate_nifti`: geometry and the offset that turns its values into HU."""

    path: str
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    affine: tuple[tuple[float, ...], ...]
    convention: str
    intensity_offset_hu: float

    def to_dict(self) -> dict[str, Any]:
        """JSON form carried by manifests and datasets (the ``nifti`` key marks it as a NIfTI source)."""
        return {
            "nifti": self.path,
            "shape": list(self.shape),
            "spacing_mm": list(self.spacing_mm),
            "affine": [list(row) for row in self.affine],
            "convention": self.convention,
            "intensity_offset_hu": self.intensity_offset_hu,
        }


def study_key(path: Path | str) -> str | None:
    """The study key of a NIfTI file (its name without ``.nii.gz``/``.nii``); None for any other file."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def _refuse(reason: str, message: str, path: Path) -> SeriesInvalid:
    return SeriesInvalid(reason, f"{path.name}: {message}", str(path))


def _load(path: Path) -> Any:
    import nibabel as nib

    try:
        image = nib.load(str(path))
    except Exception as exc:  # nibabel raises ImageFileError, OSError, EOFError, ValueError on bad files
        raise _refuse("nifti_unreadable", f"not a readable NIfTI file ({type(exc).__name__}: {exc})", path) from exc
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise _refuse("nifti_unreadable", f"is a {type(image).__name__}, not a NIfTI-1/2 image", path)
    return image


def _spatial_shape(shape: tuple[int, ...], path: Path) -> tuple[int, int, int]:
    """The three spatial dimensions; trailing dimensions of size 1 (a 4-D file with one volume) are allowed."""
    spatial, rest = tuple(int(n) for n in shape[:3]), tuple(int(n) for n in shape[3:])
    if len(shape) < 3:
        raise _refuse("nifti_not_3d", f"has {len(shape)} dimension(s) {tuple(shape)}; a CT volume has 3", path)
    if any(n != 1 for n in rest):
        raise _refuse(
            "nifti_not_3d", f"has shape {tuple(shape)}: more than one volume (dimensions beyond 3 must be 1)", path
        )
    return spatial  # type: ignore[return-value]


def _detect_convention(data: np.ndarray, path: Path, config: NiftiConfig) -> str:
    """Which of :data:`CONVENTIONS` the values follow: air near -1000 HU and a body above -500 HU, as stored (HU) or
    after subtracting 1024 (HU+1024, unsigned exports); "" when neither fits."""
    sample = data[::2, ::2, ::2] if min(data.shape) >= 16 else data
    low, high = float(sample.min()), float(data.max())
    for name, offset in CONVENTIONS.items():
        hu_low, hu_high = low + offset, high + offset
        if hu_low < config.min_hu or hu_high > config.max_hu:
            continue
        air = np.count_nonzero(np.abs(sample + offset + 1000.0) <= 100.0) / sample.size
        body = np.count_nonzero(sample + offset >= -500.0) / sample.size
        if air >= config.min_air_fraction and body >= config.min_body_fraction:
            return name
    return ""


def validate_nifti(path: Path | str, *, config: NiftiConfig | None = None, read_data: bool = True) -> ValidatedNifti:
    """Check one NIfTI CT volume; raise :class:`SeriesInvalid` (reason code, message naming the file) on the first
    failed invariant. With ``read_data=False`` only the header is checked (fast; values are not read)."""
    config = config or NiftiConfig()
    path = Path(path)
    if study_key(path) is None:
        raise _refuse("nifti_name", f"name does not end in {' or '.join(NIFTI_SUFFIXES)}", path)
    image = _load(path)
    shape = _spatial_shape(image.shape, path)
    if min(shape) < config.min_voxels_per_axis:
        raise _refuse(
            "nifti_too_small", f"shape {shape}: fewer than {config.min_voxels_per_axis} voxels along an axis", path
        )
    affine = np.asarray(image.affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise _refuse("nifti_bad_affine", "affine (sform/qform) is not a finite 4x4 matrix", path)
    linear = affine[:3, :3]
    spacing = tuple(float(s) for s in np.linalg.norm(linear, axis=0))
    if min(spacing) <= 0 or abs(np.linalg.det(linear)) < 1e-6 * max(spacing) ** 3:
        raise _refuse(
            "nifti_bad_affine",
            f"affine is degenerate (voxel axes collinear or of zero length; spacing {spacing})",
            path,
        )
    if min(spacing) < config.min_spacing_mm or max(spacing) > config.max_spacing_mm:
        shown = tuple(round(s, 4) for s in spacing)
        raise _refuse(
            "nifti_bad_spacing",
            f"voxel spacing {shown} mm outside [{config.min_spacing_mm}, {config.max_spacing_mm}] mm",
            path,
        )
    if image.header.get_xyzt_units()[0] not in ("mm", "unknown"):
        raise _refuse("nifti_bad_spacing", f"spatial unit is {image.header.get_xyzt_units()[0]!r}, not mm", path)
    convention = ""
    if read_data:
        try:
            data = np.asarray(image.get_fdata(dtype=np.float32)).reshape(shape)
        except Exception as exc:  # truncated gzip, short file
            raise _refuse("nifti_unreadable", f"voxel data cannot be read ({type(exc).__name__}: {exc})", path) from exc
        if not np.isfinite(data).all():
            raise _refuse(
                "nifti_not_finite", f"{int(np.size(data) - np.isfinite(data).sum())} voxel(s) are NaN or infinite", path
            )
        convention = _detect_convention(data, path, config)
        if not convention:
            raise _refuse(
                "nifti_intensity_unknown",
                f"values [{float(data.min()):g}, {float(data.max()):g}] follow no known CT convention (HU with air near "
                f"-1000, or HU+1024 with air near 0, a body above -500 HU, within [{config.min_hu:g}, {config.max_hu:g}] HU): not a CT in HU?",
                path,
            )
    return ValidatedNifti(
        path=str(path),
        shape=shape,
        spacing_mm=spacing,  # type: ignore[arg-type]
        affine=tuple(tuple(float(v) for v in row) for row in affine),
        convention=convention,
        intensity_offset_hu=CONVENTIONS.get(convention, 0.0),
    )


def read_nifti_hu(item: Mapping[str, Any]) -> Any:
    """The volume of a validated NIfTI item (:meth:`ValidatedNifti.to_dict`) as a channel-first HU MetaTensor (RAS
    affine), loaded by MONAI's ``LoadImage`` with the NibabelReader; values below air set to air (-1024)."""
    import torch
    from monai.transforms import LoadImage

    path = Path(str(item["nifti"]))
    try:
        image = LoadImage(
            reader="NibabelReader",
            image_only=True,
            ensure_channel_first=True,
            dtype=np.float32,
            squeeze_non_spatial_dims=True,
        )(str(path))
    except Exception as exc:
        raise _refuse("nifti_unreadable", f"cannot be loaded ({type(exc).__name__}: {exc})", path) from exc
    if tuple(image.shape[1:]) != tuple(item["shape"]):
        raise _refuse(
            "nifti_changed", f"shape {tuple(image.shape[1:])} differs from the validated {tuple(item['shape'])}", path
        )
    offset = float(item.get("intensity_offset_hu", 0.0))
    image = image + offset if offset else image
    return torch.clamp(image, min=AIR_HU)


def read_resampled_nifti(item: Mapping[str, Any], pixdim: tuple[float, float, float], *, keep_hu: bool = False) -> Any:
    """A validated NIfTI item on its model grid: ``Orientation("RAS")`` + ``Spacing(pixdim, bilinear, border)``.

    Returns :class:`preprocessing.volume.ResampledVolume` (volume in HU, float32, with the grid's affine; the
    full-resolution HU volume and its affine too when ``keep_hu``), as the DICOM path does.
    """
    from monai.transforms import Orientation, Spacing

    from preprocessing.volume import ResampledVolume

    image = read_nifti_hu(item)
    hu = image.as_tensor()[0].numpy().astype(np.float32) if keep_hu else None
    hu_affine = np.asarray(image.affine, dtype=np.float64) if keep_hu else None
    image = Orientation(axcodes="RAS", labels=None)(image)
    image = Spacing(pixdim=tuple(float(p) for p in pixdim), mode="bilinear", padding_mode="border")(image)
    volume = np.ascontiguousarray(image.as_tensor()[0].numpy(), dtype=np.float32)
    return ResampledVolume(volume, np.asarray(image.affine, dtype=np.float64), hu, hu_affine)


def source_geometry(item: Mapping[str, Any]) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and voxel->RAS affine of a validated NIfTI item (what an inverse resampling goes back to)."""
    return tuple(int(n) for n in item["shape"]), np.asarray(item["affine"], dtype=np.float64)  # type: ignore[return-value]


def _holds_nifti(folder: Path) -> bool:
    """True when ``folder`` directly holds at least one ``.nii.gz``/``.nii`` file (a DICOM folder never does)."""
    try:
        return folder.is_dir() and any(study_key(p) is not None and p.is_file() for p in folder.iterdir())
    except OSError:
        return False


def nifti_folder(path: Path | str) -> Path | None:
    """The NIfTI folder of a site given as ``fedct ingest --input`` (or as the simulation's ``SITE/dicom``), or None.

    Recognised, when the folder holds ``.nii.gz``/``.nii`` files: ``SITE/nifti`` itself; ``SITE`` holding ``nifti/``
    and no ``dicom/``; ``SITE/dicom`` that does not exist while ``SITE/nifti`` does (what ``fedct collection
    prepare`` writes for a NIfTI collection). A DICOM folder that happens to be called ``nifti`` stays DICOM.
    """
    path = Path(path)
    if path.name == NIFTI_SOURCE_FOLDER and _holds_nifti(path):
        return path
    if path.is_dir() and not (path / "dicom").exists() and _holds_nifti(path / NIFTI_SOURCE_FOLDER):
        return path / NIFTI_SOURCE_FOLDER
    if path.name == "dicom" and not path.exists() and _holds_nifti(path.parent / NIFTI_SOURCE_FOLDER):
        return path.parent / NIFTI_SOURCE_FOLDER
    return None


def ingest_nifti_site(
    nifti_dir: Path,
    site_dir: Path,
    *,
    labels_csv: Path | None = None,
    pipeline: Any = None,
    split: Any = None,
    config: NiftiConfig | None = None,
    workers: int = 2,
    progress: bool = False,
) -> Any:
    """``fedct ingest`` for a folder of NIfTI volumes: validate, label (key = file name without suffix), split,
    cache; write ``manifest.json`` and ``ingest_report.json`` as the DICOM path does. Returns the SiteManifest."""
    from preprocessing import ingest as ing
    from preprocessing.cache import file_state_fingerprint
    from preprocessing.deid import Pseudonymizer, load_or_create_site_key
    from preprocessing.discover import Rejection, iter_files
    from preprocessing.labels import DIAGNOSES, Labels, StudyLabel, read_labels
    from preprocessing.split import SplitConfig, assign_splits
    from preprocessing.transforms import PipelineConfig

    t0 = time.perf_counter()
    nifti_dir, site_dir = Path(nifti_dir).resolve(), Path(site_dir).resolve()
    pipeline = pipeline or PipelineConfig()
    split = split or SplitConfig()
    if not nifti_dir.is_dir():
        raise FileNotFoundError(f"NIfTI input folder does not exist: {nifti_dir}")
    if site_dir == nifti_dir or nifti_dir in site_dir.parents:
        raise ValueError(
            f"site folder {site_dir} must not be inside the NIfTI input folder {nifti_dir} (inputs stay untouched)"
        )
    site_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(site_dir, os.W_OK):
        raise PermissionError(f"site folder is not writable: {site_dir}")
    pseudonym = Pseudonymizer(load_or_create_site_key(site_dir))
    labels = read_labels(labels_csv) if labels_csv is not None else Labels()
    fingerprint = ing.input_fingerprint(nifti_dir, labels_csv, pipeline, split)

    rejected: list[Rejection] = []
    accepted: list[tuple[str, ValidatedNifti]] = []
    files = list(iter_files(nifti_dir))
    for path in files:
        rel = str(path.relative_to(nifti_dir))
        key = study_key(path)
        if key is None:
            rejected.append(Rejection(rel, "not_nifti", f"name does not end in {' or '.join(NIFTI_SUFFIXES)}"))
            continue
        try:
            volume = validate_nifti(path, config=config)
        except SeriesInvalid as exc:
            rejected.append(Rejection(rel, exc.reason, exc.message))
            continue
        if labels_csv is not None and key not in labels:
            rejected.append(
                Rejection(rel, "no_label", f"{labels.key} {key!r} (the file name) not found in the labels file")
            )
            continue
        accepted.append((key, volume))

    strata: dict[str, int | None] = {}
    for key, _ in accepted:
        label = labels.get(key)
        strata.setdefault(pseudonym("patient", key), label.diagnosis if label else None)
    split_of = assign_splits(strata, split)
    entries = []
    for key, volume in accepted:
        label = labels.get(key, StudyLabel(None, None, None, None, None))
        patient = pseudonym("patient", key)
        entries.append(
            ing.StudyEntry(
                id=pseudonym("study", key),
                patient=patient,
                split=split_of[patient],
                diagnosis=label.diagnosis,
                severe=label.severe,
                time_days=label.time_days,
                age=label.age,
                sex=label.sex,
                series=volume.to_dict(),
                content=file_state_fingerprint([volume.path]),
            )
        )

    failures: dict[str, Rejection] = {}
    jobs = [(e.item(), pipeline, str(site_dir), None) for e in entries]
    if jobs:
        with ProcessPoolExecutor(
            max_workers=max(1, workers), initializer=ing._worker_init, mp_context=ing.pool_context()
        ) as pool:
            results = pool.map(ing._cache_one, jobs)
            if progress:
                from tqdm import tqdm

                results = tqdm(results, total=len(jobs), desc="preprocess", unit="volume", leave=False)
            for study_id, reason, message, _path in results:
                if reason is not None:
                    failures[study_id] = Rejection("", reason, message or "")
    for entry in entries:
        if entry.id in failures:
            failure = failures[entry.id]
            rel = str(Path(entry.series["nifti"]).relative_to(nifti_dir))
            rejected.append(Rejection(rel, failure.reason, f"study {entry.id} refused: {failure.message}"))
    entries = [e for e in entries if e.id not in failures]

    manifest = ing.SiteManifest(
        site_dir=str(site_dir),
        pipeline_fingerprint=pipeline.fingerprint(),
        input_fingerprint=fingerprint,
        studies=tuple(entries),
        n_rejected=len(rejected),
    )
    ing._write_json(site_dir / ing.MANIFEST_NAME, {"manifest_version": ing.MANIFEST_VERSION, **asdict(manifest)})
    report = {
        "pipeline": pipeline.to_dict(),
        "source": "nifti",
        "files_scanned": len(files),
        "seconds": round(time.perf_counter() - t0, 2),
        "counts": {
            "accepted": len(entries),
            "rejected": len(rejected),
            "by_reason": dict(Counter(r.reason for r in rejected)),
            "by_split": dict(Counter(e.split for e in entries)),
            "by_diagnosis": dict(
                Counter("unlabelled" if e.diagnosis is None else DIAGNOSES[e.diagnosis] for e in entries)
            ),
        },
        "accepted": [
            {
                "id": e.id,
                "split": e.split,
                "diagnosis": None if e.diagnosis is None else DIAGNOSES[e.diagnosis],
                "shape": e.series["shape"],
                "spacing_mm": [round(s, 4) for s in e.series["spacing_mm"]],
                "convention": e.series["convention"],
            }
            for e in entries
        ],
        "rejected": [asdict(r) for r in rejected],
    }
    ing._write_json(site_dir / ing.REPORT_NAME, report)
    return manifest
