"""Site ingestion: DICOM folder -> validated, labelled, split and cached studies, plus a report for hospital IT.

Writes two files into the site's work folder (both stay at the site):

- ``manifest.json``: what training reads (pseudonymous ids, labels, split, file lists for the loader);
- ``ingest_report.json``: what was accepted and what was refused, file by file, with reason codes.

The input folder is only read, never modified. Re-running with unchanged inputs reuses the cache.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import multiprocessing
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from preprocessing.deid import Pseudonymizer, load_or_create_site_key
from preprocessing.discover import Rejection, discover, file_state_fingerprint, iter_files
from preprocessing.labels import DIAGNOSES, Labels, StudyLabel, read_labels
from preprocessing.pipeline import PipelineConfig
from preprocessing.split import SplitConfig, assign_splits
from preprocessing.validate import (
    SeriesInvalid,
    ValidatedSeries,
    ValidationConfig,
    as_series,
    series_by_study,
    series_to_dict,
    validate_series,
)

# Neither this module nor the pool's workers import torch or MONAI (seconds of CPU per process): the workers compute
# the model input in numpy (preprocessing.model_input) and are forked from this process; see pool_context.
#: Modules the pool's workers need; imported before the pool forks them, so that each worker inherits them.
WORKER_MODULES = ("preprocessing.model_input", "preprocessing.volume")

MANIFEST_NAME = "manifest.json"
REPORT_NAME = "ingest_report.json"
NIFTI_FOLDER = "nifti"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class StudyEntry:
    """One accepted study as training sees it.

    ``id`` and ``patient`` are pseudonyms; ``series`` holds the site-local file list and geometry (with the
    original UIDs) for the loader. The manifest never leaves the site.
    """

    id: str
    patient: str
    split: str
    diagnosis: int | None
    severe: int | None
    time_days: float | None
    age: float | None
    sex: str | None
    series: dict[str, Any]
    content: str

    def item(self) -> dict[str, Any]:
        """Dataset item for :func:`preprocessing.cache.make_dataset`.

        Unknown targets are masked, never guessed: ``label`` -1, ``event``/``time``/``age``/``sex`` NaN.
        ``sex`` is 1.0 for M and 0.0 for F.
        """
        nan = float("nan")
        return {
            "image": self.series,
            "content": self.content,
            "label": -1 if self.diagnosis is None else self.diagnosis,
            "event": nan if self.severe is None else float(self.severe),
            "time": nan if self.time_days is None else float(self.time_days),
            "age": nan if self.age is None else float(self.age),
            "sex": {"M": 1.0, "F": 0.0}.get((self.sex or "").upper(), nan),
            "id": self.id,
        }


@dataclass(frozen=True)
class SiteManifest:
    """The accepted studies of a site for one pipeline configuration."""

    site_dir: str
    pipeline_fingerprint: str
    input_fingerprint: str
    studies: tuple[StudyEntry, ...]
    n_rejected: int = 0
    class_names: tuple[str, ...] = field(default=DIAGNOSES)

    def split(self, name: str, *, labelled_only: bool = True) -> list[StudyEntry]:
        """Studies of one split ('train', 'val', 'test'); by default only those with a diagnosis."""
        return [s for s in self.studies if s.split == name and (s.diagnosis is not None or not labelled_only)]


class SiteNotPrepared(RuntimeError):
    """The site folder has no manifest for this pipeline, or its inputs changed since."""


def input_fingerprint(dicom_dir: Path, labels_csv: Path | None, pipeline: PipelineConfig, split: SplitConfig) -> str:
    """Hash of every input file's state, the labels file, the pipeline and the split settings."""
    digest = hashlib.sha256()
    from preprocessing.nifti import nifti_folder  # a NIfTI site: fingerprint its volumes (preprocessing/nifti.py)

    for path in iter_files(nifti_folder(dicom_dir) or Path(dicom_dir)):
        stat = path.stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    if labels_csv is not None:
        digest.update(Path(labels_csv).read_bytes())
    digest.update(pipeline.fingerprint().encode())
    digest.update(json.dumps(asdict(split), sort_keys=True).encode())
    return digest.hexdigest()[:24]


def _series_folder(series_paths: tuple[str, ...] | list[str], root: Path) -> str:
    common = os.path.commonpath(list(series_paths))
    folder = Path(common) if Path(common).is_dir() else Path(common).parent
    return str(folder.relative_to(root))


def _rel(path: str, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return path


def export_nifti(item: dict[str, Any], folder: Path) -> Path:
    """Write the HU volume of a dataset item as ``<pseudonymous id>.nii.gz`` (RAS affine, as dcm2niix would).

    The file's NIfTI description holds the series' file-state fingerprint; an up-to-date file is not rewritten.
    """
    import nibabel as nib

    from preprocessing.volume import read_hu_volume

    path = Path(folder) / f"{item['id']}.nii.gz"
    stamp = f"fedct {item['content']}"
    if path.is_file():
        try:
            if nib.load(path).header["descrip"].item().decode() == stamp:
                return path
        except Exception:  # unreadable old export: write it again
            pass
    volume, affine = read_hu_volume(as_series(item["image"]))
    image = nib.Nifti1Image(volume, affine)
    image.header["descrip"] = stamp
    image.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.nii.gz")
    nib.save(image, tmp)
    os.replace(tmp, path)
    return path


def _cache_one(
    args: tuple[dict[str, Any], PipelineConfig, str, str | None],
) -> tuple[str, str | None, str | None, str | None]:
    """Worker: compute and cache the deterministic pipeline for one item (and export its HU volume when asked);
    return (id, reason, message, path). Imports neither torch nor MONAI (for a DICOM series)."""
    item, pipeline, site_dir, export_dir = args
    from preprocessing.model_input import ensure_cached

    try:
        ensure_cached(item, pipeline, Path(site_dir))
        if export_dir is not None:
            export_nifti(item, Path(export_dir))
    except SeriesInvalid as exc:
        return item["id"], exc.reason, exc.message, exc.path
    except Exception as exc:  # a transform failure is reported, never fatal for the other series
        cause = exc.__cause__ if isinstance(exc.__cause__, SeriesInvalid) else None
        for inner in (exc, exc.__cause__, exc.__context__):
            if isinstance(inner, SeriesInvalid):
                cause = inner
        if cause is not None:
            return item["id"], cause.reason, cause.message, cause.path
        return item["id"], "preprocessing_failed", f"{type(exc).__name__}: {exc}", None
    return item["id"], None, None, None


def _worker_init() -> None:
    """Pool worker start: one BLAS/torch thread per worker (the pool is the parallelism)."""
    if "torch" in sys.modules:  # forked from a process that uses torch (training, inference, tests)
        sys.modules["torch"].set_num_threads(1)


def pool_context() -> multiprocessing.context.BaseContext | None:
    """How the worker pool starts its processes: forked from this one, so that they inherit its imported modules
    (:data:`WORKER_MODULES`, imported first by :func:`ingest_site`) and start in milliseconds; a spawned worker
    would import them afresh. None (the platform's default) where fork does not exist.
    """
    return multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None


def ingest_site(
    dicom_dir: Path,
    site_dir: Path,
    *,
    labels_csv: Path | None = None,
    pipeline: PipelineConfig | None = None,
    split: SplitConfig | None = None,
    validation: ValidationConfig | None = None,
    workers: int = 2,
    progress: bool = False,
    export_hu: bool = False,
) -> SiteManifest:
    """Scan, validate, label, split and cache one site's DICOM folder; write manifest and report.

    With ``export_hu`` each accepted series' HU volume is also written to ``SITE_DIR/nifti/<id>.nii.gz``.
    """
    t0 = time.perf_counter()
    dicom_dir = Path(dicom_dir).resolve()
    site_dir = Path(site_dir).resolve()
    pipeline = pipeline or PipelineConfig()
    split = split or SplitConfig()
    from preprocessing.nifti import ingest_nifti_site, nifti_folder  # collections shipping NIfTI (MosMedData)

    if (nifti_dir := nifti_folder(dicom_dir)) is not None:
        return ingest_nifti_site(
            nifti_dir,
            site_dir,
            labels_csv=labels_csv,
            pipeline=pipeline,
            split=split,
            workers=workers,
            progress=progress,
        )
    if not dicom_dir.is_dir():
        raise FileNotFoundError(f"DICOM input folder does not exist: {dicom_dir}")
    if site_dir == dicom_dir or dicom_dir in site_dir.parents:  # checked before mkdir: inputs stay untouched
        raise ValueError(
            f"site folder {site_dir} must not be inside the DICOM input folder {dicom_dir} (inputs stay untouched)"
        )
    site_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(site_dir, os.W_OK):
        raise PermissionError(f"site folder is not writable: {site_dir}")

    for module in WORKER_MODULES:  # once here, inherited by every forked worker
        importlib.import_module(module)
    pseudonym = Pseudonymizer(load_or_create_site_key(site_dir))
    labels = read_labels(labels_csv) if labels_csv is not None else Labels()
    fingerprint = input_fingerprint(dicom_dir, labels_csv, pipeline, split)

    found = discover(dicom_dir, progress=progress)
    rejected: list[Rejection] = [Rejection(r.path, r.reason, r.message) for r in found.rejected]

    validated: list[ValidatedSeries] = []
    for uid, headers in found.series.items():
        try:
            validated.append(validate_series(headers, config=validation))
        except SeriesInvalid as exc:
            rejected.append(
                Rejection(
                    _rel(exc.path, dicom_dir) if exc.path else _series_folder([h.path for h in headers], dicom_dir),
                    exc.reason,
                    f"series {pseudonym('series', uid)} ({len(headers)} files) refused: {exc.message}",
                )
            )

    # One series per study (validate.series_by_study): the preferred one, or the next when its pixels fail.
    candidates_of = series_by_study(validated)

    def label_key(series: ValidatedSeries) -> str:
        return series.AccessionNumber if labels.key == "AccessionNumber" else series.StudyInstanceUID

    chosen = [candidates[0] for candidates in candidates_of.values()]
    if labels_csv is not None:
        labelled = []
        for series in chosen:
            if label_key(series) in labels:
                labelled.append(series)
            else:
                rejected.append(
                    Rejection(
                        _series_folder(series.paths, dicom_dir),
                        "no_label",
                        f"{labels.key} not found in the labels file",
                    )
                )
                rejected.extend(_additional(candidates_of[series.StudyInstanceUID], series, pseudonym, dicom_dir))
        chosen = labelled

    # Split by patient, stratified by the diagnosis of the patient's first study.
    strata: dict[str, int | None] = {}
    for series in chosen:
        patient = pseudonym("patient", series.PatientID or series.StudyInstanceUID)
        label = labels.get(label_key(series))
        strata.setdefault(patient, label.diagnosis if label else None)
    split_of = assign_splits(strata, split)

    entries: list[StudyEntry] = []
    for series in chosen:
        label = labels.get(label_key(series), StudyLabel(None, None, None, None, None))
        patient = pseudonym("patient", series.PatientID or series.StudyInstanceUID)
        entries.append(
            StudyEntry(
                id=pseudonym("study", series.StudyInstanceUID),
                patient=patient,
                split=split_of[patient],
                diagnosis=label.diagnosis,
                severe=label.severe,
                time_days=label.time_days,
                age=label.age,
                sex=label.sex,
                series=series_to_dict(series),
                content=file_state_fingerprint(list(dict.fromkeys(series.paths))),
            )
        )

    # Decode and cache, both cores. A series whose pixels fail is refused with the file that failed, and the
    # study goes on with its next series, if it has one; the study is refused only when every series failed.
    export_dir = str(site_dir / NIFTI_FOLDER) if export_hu else None
    entry_of = {e.id: e for e in entries}
    used = {e.id: 0 for e in entries}  # index into the study's candidates
    failed: set[str] = set()
    pending = list(entries)
    if pending:
        with ProcessPoolExecutor(
            max_workers=max(1, workers), initializer=_worker_init, mp_context=pool_context()
        ) as pool:
            while pending:
                results = pool.map(_cache_one, [(e.item(), pipeline, str(site_dir), export_dir) for e in pending])
                if progress:
                    from tqdm import tqdm

                    results = tqdm(results, total=len(pending), desc="preprocess", unit="series", leave=False)
                pending = []
                for study_id, reason, message, path in results:
                    if reason is None:
                        continue
                    entry = entry_of[study_id]
                    candidates = candidates_of[entry.series["StudyInstanceUID"]]
                    where = _rel(path, dicom_dir) if path else _series_folder(entry.series["paths"], dicom_dir)
                    used[study_id] += 1
                    if used[study_id] < len(candidates):
                        nxt = candidates[used[study_id]]
                        rejected.append(
                            Rejection(
                                where,
                                reason,
                                f"study {study_id}: its series of {len(entry.series['paths'])} "
                                f"slices refused: {message or ''}; trying the study's next series "
                                f"({len(nxt.paths)} slices)",
                            )
                        )
                        entry = replace(
                            entry,
                            series=series_to_dict(nxt),
                            content=file_state_fingerprint(list(dict.fromkeys(nxt.paths))),
                        )
                        entry_of[study_id] = entry
                        pending.append(entry)
                    else:
                        rejected.append(Rejection(where, reason, f"study {study_id} refused: {message or ''}"))
                        failed.add(study_id)
    entries = [entry_of[e.id] for e in entries if e.id not in failed]
    chosen = [candidates_of[e.series["StudyInstanceUID"]][used[e.id]] for e in entries]
    for series in chosen:  # the study's other series, listed against the one actually used
        rejected.extend(_additional(candidates_of[series.StudyInstanceUID], series, pseudonym, dicom_dir))

    manifest = SiteManifest(
        site_dir=str(site_dir),
        pipeline_fingerprint=pipeline.fingerprint(),
        input_fingerprint=fingerprint,
        studies=tuple(entries),
        n_rejected=len(rejected),
    )
    _write_json(site_dir / MANIFEST_NAME, {"manifest_version": MANIFEST_VERSION, **asdict(manifest)})
    _write_json(
        site_dir / REPORT_NAME,
        _report(found.n_files, entries, chosen, rejected, pipeline, time.perf_counter() - t0, dicom_dir),
    )
    return manifest


def _additional(
    candidates: list[ValidatedSeries], used: ValidatedSeries, pseudonym: Pseudonymizer, root: Path
) -> list[Rejection]:
    """``additional_series`` records for a study's series other than ``used`` (one series per study)."""
    study = pseudonym("study", used.StudyInstanceUID)
    return [
        Rejection(
            _series_folder(extra.paths, root),
            "additional_series",
            f"study {study} already uses series {pseudonym('series', used.SeriesInstanceUID)} ({len(used.paths)} slices); "
            f"this one ({len(extra.paths)} slices) is not used",
        )
        for extra in candidates
        if extra.SeriesInstanceUID != used.SeriesInstanceUID
    ]


def _report(
    n_files: int,
    entries: list[StudyEntry],
    chosen: list[ValidatedSeries],
    rejected: list[Rejection],
    pipeline: PipelineConfig,
    seconds: float,
    root: Path,
) -> dict[str, Any]:
    dropped_of = {series.SeriesInstanceUID: series.dropped for series in chosen}
    accepted = []
    for e in entries:
        s = e.series
        accepted.append(
            {
                "id": e.id,
                "split": e.split,
                "diagnosis": None if e.diagnosis is None else DIAGNOSES[e.diagnosis],
                "slices": len(s["paths"]),
                "shape": [s["Columns"], s["Rows"], len(s["paths"])],
                "spacing_mm": [s["PixelSpacing"][1], s["PixelSpacing"][0], round(s["slice_step_mm"], 4)],
                "transfer_syntaxes": list(s["transfer_syntaxes"]),
                "multi_frame": bool(s.get("frames")),
                "dropped": [
                    {**asdict(d), "path": _rel(d.path, root)} for d in dropped_of.get(s["SeriesInstanceUID"], ())
                ],
            }
        )
    return {
        "pipeline": pipeline.to_dict(),
        "files_scanned": n_files,
        "seconds": round(seconds, 2),
        "counts": {
            "accepted": len(accepted),
            "rejected": len(rejected),
            "by_reason": dict(Counter(r.reason for r in rejected)),
            "by_split": dict(Counter(e.split for e in entries)),
            "by_diagnosis": dict(
                Counter("unlabelled" if e.diagnosis is None else DIAGNOSES[e.diagnosis] for e in entries)
            ),
        },
        "accepted": accepted,
        "rejected": [asdict(r) for r in rejected],
    }


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False))
    tmp.replace(path)


def load_manifest(site_dir: Path, pipeline: PipelineConfig) -> SiteManifest:
    """Read ``manifest.json``; raise :class:`SiteNotPrepared` when absent or made with another pipeline."""
    path = Path(site_dir) / MANIFEST_NAME
    if not path.is_file():
        raise SiteNotPrepared(f"no {MANIFEST_NAME} in {site_dir}: run `fedct ingest` for this site first")
    raw = json.loads(path.read_text())
    if raw.get("manifest_version") != MANIFEST_VERSION:
        raise SiteNotPrepared(f"{path} has manifest version {raw.get('manifest_version')}, expected {MANIFEST_VERSION}")
    if raw["pipeline_fingerprint"] != pipeline.fingerprint():
        raise SiteNotPrepared(
            f"{path} was prepared with pipeline {raw['pipeline_fingerprint']}, this run uses {pipeline.fingerprint()}"
        )
    studies = tuple(StudyEntry(**s) for s in raw["studies"])
    return SiteManifest(
        site_dir=raw["site_dir"],
        pipeline_fingerprint=raw["pipeline_fingerprint"],
        input_fingerprint=raw["input_fingerprint"],
        studies=studies,
        n_rejected=raw.get("n_rejected", 0),
        class_names=tuple(raw.get("class_names", DIAGNOSES)),
    )


def prepare_site(
    dicom_dir: Path,
    site_dir: Path,
    *,
    labels_csv: Path | None,
    pipeline: PipelineConfig,
    split: SplitConfig | None = None,
    workers: int = 2,
) -> SiteManifest:
    """The site's manifest for this pipeline: reused when inputs are unchanged, otherwise (re)ingested."""
    split = split or SplitConfig()
    try:
        manifest = load_manifest(site_dir, pipeline)
        if manifest.input_fingerprint == input_fingerprint(Path(dicom_dir).resolve(), labels_csv, pipeline, split):
            return manifest
    except SiteNotPrepared:
        pass
    return ingest_site(dicom_dir, site_dir, labels_csv=labels_csv, pipeline=pipeline, split=split, workers=workers)
