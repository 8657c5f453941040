"""Public chest CT collections, read in their published layouts and written as fedct site folders.

Adapters (nothing is downloaded; the user points ``--root`` at what they downloaded):

- ``mosmed``: MosMedData COVID19_1110 (mosmed.ai). ``ROOT/studies/CT-0 ... CT-4/study_NNNN.nii.gz`` (NIfTI, HU),
  optional ``ROOT/dataset_registry.xlsx`` (columns study_id, category, study_file, mask_file) and ``ROOT/masks/``.
  CT-0 -> ``normal``; CT-1 ... CT-4 -> ``covid`` with severity 1-4 (share of lung involved: <25 %, 25-50 %,
  50-75 %, >75 %).
- ``ricord``: MIDRC-RICORD 1A (COVID-19 positive chest CT) and 1B (COVID-19 negative chest CT) from TCIA, as the
  NBIA Data Retriever writes them: ``[manifest-*/]MIDRC-RICORD-1A/<PatientID>/<study folder>/<series folder>/*.dcm``.
  1A -> ``covid``; 1B -> ``normal`` (COVID-19 negative; other findings are possible). The MD.ai annotation export
  of 1A (``MIDRC-RICORD-1a_annotations*.json``), when present, gives each study's RSNA appearance category.
  1C holds chest radiographs, not CT: it is reported and skipped.

:func:`write_sites` writes ``OUT/site-K/`` folders: ``labels.csv`` (keyed by StudyInstanceUID: the DICOM UID, or the
NIfTI file name without suffix), ``collection.csv`` (where each study came from, its category and severity) and
``dicom/`` (symbolic links to the series' files) or ``nifti/`` (links to the volumes), which ``fedct ingest``, the
simulation and ``fedct bench quality`` read. Odd or missing files are reported (file and reason) and skipped.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from preprocessing.labels import DIAGNOSES

SPLIT_BY = ("collection", "site", "none")
MOSMED_CATEGORIES = ("CT-0", "CT-1", "CT-2", "CT-3", "CT-4")
MOSMED_COLLECTION = "MosMedData-COVID19_1110"
RICORD_DIAGNOSIS = {"MIDRC-RICORD-1A": "covid", "MIDRC-RICORD-1B": "normal"}
RICORD_NOT_CT = ("MIDRC-RICORD-1C",)
#: TCIA PatientIDs of RICORD: collection, contributing-institution code, patient number.
RICORD_PATIENT_ID = re.compile(r"^MIDRC-RICORD-1[A-C]-(\d+)-(\d+)$", re.IGNORECASE)
#: RSNA chest CT appearance categories used by the RICORD 1A annotations (study-level labels).
RICORD_APPEARANCES = ("Typical Appearance", "Indeterminate Appearance", "Atypical Appearance", "Negative for Pneumonia")


class CollectionError(ValueError):
    """The collection root cannot be used at all (wrong folder, no studies); the message says what was expected."""


@dataclass(frozen=True)
class CollectionStudy:
    """One study of a collection, with its image source and labels in fedct's classes."""

    key: str  # labels.csv key: StudyInstanceUID (DICOM) or the NIfTI file name without suffix
    collection: str
    group: str  # the acquiring institution where the collection says (for --split-by site), else the collection
    patient: str  # a patient's studies always go to the same site
    kind: str  # "dicom" or "nifti"
    source: tuple[str, ...]  # the NIfTI file, or the series folders of the study
    diagnosis: str
    severity: int | None
    category: str  # the collection's own label (CT-2, Typical Appearance, ...)


@dataclass(frozen=True)
class CollectionIssue:
    """A file or folder that was skipped or needs a look; ``path`` is relative to the collection root."""

    path: str
    reason: str
    message: str


@dataclass(frozen=True)
class CollectionScan:
    """What an adapter found: the usable studies and the issues, in a stable order."""

    name: str
    root: str
    studies: tuple[CollectionStudy, ...]
    issues: tuple[CollectionIssue, ...]


@dataclass(frozen=True)
class PreparedSite:
    """One written site folder."""

    name: str
    groups: tuple[str, ...]
    n_studies: int
    class_counts: dict[str, int]


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


# --- MosMedData COVID19_1110 -----------------------------------------------------------------------------------------


def _mosmed_root(root: Path) -> Path:
    for candidate in (root, root / "COVID19_1110"):
        if (candidate / "studies").is_dir():
            return candidate
    raise CollectionError(
        f"{root}: no studies/ folder. MosMedData COVID19_1110 is laid out as ROOT/studies/CT-0 ... CT-4/study_NNNN.nii.gz "
        "(+ dataset_registry.xlsx, masks/); give --root the folder holding studies/"
    )


def read_mosmed_registry(path: Path) -> dict[str, str]:
    """``dataset_registry.xlsx`` -> {study name (file name without .nii.gz): category}; raise CollectionError."""
    try:
        from openpyxl import load_workbook

        book = load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:  # zipfile.BadZipFile, KeyError, InvalidFileException on a damaged file
        raise CollectionError(f"{path.name}: not a readable .xlsx workbook ({type(exc).__name__}: {exc})") from exc
    try:
        for sheet in book.worksheets:
            rows = sheet.iter_rows(values_only=True)
            header = [str(c).strip().lower() if c is not None else "" for c in next(rows, ())]
            if "category" not in header or not ({"study_file", "study_id"} & set(header)):
                continue
            col_category = header.index("category")
            col_file = header.index("study_file") if "study_file" in header else None
            col_id = header.index("study_id") if "study_id" in header else None
            registry: dict[str, str] = {}
            for row in rows:
                if row is None or all(c is None for c in row):
                    continue
                file_value = row[col_file] if col_file is not None and col_file < len(row) else None
                name = _nifti_stem(str(file_value).replace("\\", "/").rsplit("/", 1)[-1]) if file_value else None
                if name is None and col_id is not None and row[col_id] is not None:
                    name = str(row[col_id]).strip()
                category = row[col_category] if col_category < len(row) else None
                if name and category is not None:
                    registry[name] = str(category).strip().upper()
            return registry
    finally:
        book.close()
    raise CollectionError(f"{path.name}: no sheet with the columns category and study_file/study_id")


def _nifti_stem(name: str) -> str | None:
    from preprocessing.nifti import study_key

    return study_key(name)


def scan_mosmed(root: Path) -> CollectionScan:
    """MosMedData COVID19_1110: one study per NIfTI file under ``studies/CT-k/`` (a header check for each)."""
    from preprocessing.nifti import validate_nifti
    from preprocessing.validate import SeriesInvalid

    root = _mosmed_root(Path(root))
    studies_dir = root / "studies"
    issues: list[CollectionIssue] = []
    found: dict[str, list[tuple[str, Path]]] = defaultdict(list)
    for category in MOSMED_CATEGORIES:
        folder = studies_dir / category
        if not folder.is_dir():
            issues.append(
                CollectionIssue(
                    _rel(folder, root),
                    "missing_category",
                    f"folder missing: MosMedData has CT-0 ... CT-4; no {category} studies are included",
                )
            )
            continue
        files = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
        if not files:
            issues.append(CollectionIssue(_rel(folder, root), "empty_category", f"no studies in {category}"))
        for path in files:
            name = _nifti_stem(path.name) if path.is_file() else None
            if name is None:
                issues.append(CollectionIssue(_rel(path, root), "unexpected_file", "not a .nii.gz/.nii file; skipped"))
                continue
            found[name].append((category, path))
    for extra in sorted(p for p in studies_dir.iterdir() if p.is_dir() and p.name not in MOSMED_CATEGORIES):
        issues.append(
            CollectionIssue(
                _rel(extra, root), "unknown_category", f"not one of {', '.join(MOSMED_CATEGORIES)}; skipped"
            )
        )

    registry: dict[str, str] | None = None
    registry_path = root / "dataset_registry.xlsx"
    if registry_path.is_file():
        try:
            registry = read_mosmed_registry(registry_path)
        except CollectionError as exc:
            issues.append(
                CollectionIssue(registry_path.name, "registry_unreadable", f"{exc}; categories taken from the folders")
            )
    studies: list[CollectionStudy] = []
    for name in sorted(found):
        places = found[name]
        if len(places) > 1:
            where = ", ".join(_rel(p, root) for _, p in places)
            issues.append(
                CollectionIssue(
                    _rel(places[0][1], root),
                    "duplicate_study",
                    f"{name} is in more than one category ({where}); skipped",
                )
            )
            continue
        category, path = places[0]
        if registry is not None:
            listed = registry.get(name)
            if listed is None:
                issues.append(
                    CollectionIssue(
                        _rel(path, root),
                        "not_in_registry",
                        f"{name} is not listed in dataset_registry.xlsx; kept with its folder's category {category}",
                    )
                )
            elif listed != category:
                issues.append(
                    CollectionIssue(
                        _rel(path, root),
                        "category_conflict",
                        f"folder says {category}, dataset_registry.xlsx says {listed}; skipped",
                    )
                )
                continue
        try:
            validate_nifti(path, read_data=False)
        except SeriesInvalid as exc:
            issues.append(CollectionIssue(_rel(path, root), exc.reason, f"{exc.message}; skipped"))
            continue
        severity = MOSMED_CATEGORIES.index(category)
        studies.append(
            CollectionStudy(
                key=name,
                collection=MOSMED_COLLECTION,
                group=MOSMED_COLLECTION,
                patient=name,
                kind="nifti",
                source=(str(path),),
                diagnosis="normal" if severity == 0 else "covid",
                severity=severity,
                category=category,
            )
        )
    if registry is not None:
        for name in sorted(set(registry) - set(found)):
            issues.append(
                CollectionIssue(
                    registry_path.name,
                    "missing_file",
                    f"{name} ({registry[name]}) is listed but its file is not under studies/{registry[name]}/",
                )
            )
    if not studies:
        raise CollectionError(
            f"{root}: no usable MosMedData study found ({len(issues)} issue(s): "
            + "; ".join(f"{i.path}: {i.message}" for i in issues[:5])
            + ")"
        )
    return CollectionScan(name="mosmed", root=str(root), studies=tuple(studies), issues=tuple(issues))


# --- MIDRC-RICORD (TCIA) ---------------------------------------------------------------------------------------------


def _ricord_collections(root: Path) -> list[Path]:
    """Collection folders (MIDRC-RICORD-1A/-1B/-1C) in ROOT or in ROOT/manifest-*/ (NBIA Data Retriever)."""
    places = [root, *sorted(p for p in root.glob("manifest-*") if p.is_dir())]
    out = []
    for place in places:
        for child in sorted(place.iterdir()):
            if child.is_dir() and child.name.upper().startswith("MIDRC-RICORD-1"):
                out.append(child)
    if root.name.upper().startswith("MIDRC-RICORD-1") and root.is_dir():
        out.append(root)
    return out


def _series_folders(collection_dir: Path) -> dict[Path, list[Path]]:
    """{study folder: [series folders]}: the TCIA layout is <PatientID>/<study>/<series>/files."""
    studies: dict[Path, list[Path]] = {}
    for patient in sorted(p for p in collection_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for study in sorted(p for p in patient.iterdir() if p.is_dir() and not p.name.startswith(".")):
            studies[study] = sorted(p for p in study.iterdir() if p.is_dir() and not p.name.startswith("."))
    return studies


def _first_header(folder: Path) -> tuple[object | None, int]:
    """The header of the first readable DICOM file of a folder (pixels not read) and the number of files."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    for path in files:
        try:
            return dcmread(
                path,
                stop_before_pixels=True,
                specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "PatientID", "Modality"],
            ), len(files)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
    return None, len(files)


def read_ricord_annotations(path: Path) -> dict[str, str]:
    """MD.ai annotation export -> {StudyInstanceUID: RSNA appearance category}; raise CollectionError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        names = {
            label["id"]: label["name"] for group in data.get("labelGroups", []) for label in group.get("labels", [])
        }
        out: dict[str, str] = {}
        for dataset in data.get("datasets", []):
            for annotation in dataset.get("annotations", []):
                name = names.get(annotation.get("labelId"), "")
                uid = annotation.get("StudyInstanceUID")
                if uid and name in RICORD_APPEARANCES:
                    out[str(uid)] = name
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError) as exc:
        raise CollectionError(f"{path.name}: not an MD.ai annotation export ({type(exc).__name__}: {exc})") from exc
    return out


def scan_ricord(root: Path) -> CollectionScan:
    """MIDRC-RICORD 1A/1B from TCIA: one study per study folder, its CT series folders as the image source."""
    root = Path(root)
    if not root.is_dir():
        raise CollectionError(f"{root}: not a folder")
    collections = _ricord_collections(root)
    if not collections:
        raise CollectionError(
            f"{root}: no MIDRC-RICORD-1A or -1B folder. TCIA's NBIA Data Retriever writes "
            "[manifest-*/]MIDRC-RICORD-1A/<PatientID>/<study>/<series>/*.dcm; give --root the folder holding them"
        )
    issues: list[CollectionIssue] = []
    appearance: dict[str, str] = {}
    for path in sorted({*root.glob("*.json"), *root.glob("manifest-*/*.json")}):
        if "annotation" in path.name.lower() and "ricord-1a" in path.name.lower():
            try:
                appearance.update(read_ricord_annotations(path))
            except CollectionError as exc:
                issues.append(CollectionIssue(_rel(path, root), "annotations_unreadable", str(exc)))
    annotated = bool(appearance)
    seen: dict[str, str] = {}
    studies: list[CollectionStudy] = []
    for collection_dir in collections:
        collection = collection_dir.name.upper()
        if collection in RICORD_NOT_CT:
            issues.append(
                CollectionIssue(
                    _rel(collection_dir, root), "not_ct", f"{collection} holds chest radiographs, not CT; skipped"
                )
            )
            continue
        if collection not in RICORD_DIAGNOSIS:
            issues.append(
                CollectionIssue(
                    _rel(collection_dir, root),
                    "unknown_collection",
                    f"not one of {', '.join(RICORD_DIAGNOSIS)}; skipped",
                )
            )
            continue
        for study_dir, series_dirs in _series_folders(collection_dir).items():
            rel = _rel(study_dir, root)
            usable: list[str] = []
            uid = patient = None
            for series_dir in series_dirs:
                header, n_files = _first_header(series_dir)
                if header is None:
                    reason = "no_images" if n_files == 0 else "not_dicom"
                    issues.append(
                        CollectionIssue(
                            _rel(series_dir, root),
                            reason,
                            f"{'no files' if n_files == 0 else f'none of {n_files} file(s) is DICOM'}; series skipped",
                        )
                    )
                    continue
                if str(getattr(header, "Modality", "")).upper() != "CT":
                    issues.append(
                        CollectionIssue(
                            _rel(series_dir, root),
                            "not_ct",
                            f"Modality {getattr(header, 'Modality', 'missing')!r}, not CT; series skipped",
                        )
                    )
                    continue
                series_uid = str(getattr(header, "StudyInstanceUID", "") or "")
                if not series_uid:
                    issues.append(
                        CollectionIssue(
                            _rel(series_dir, root), "no_study_uid", "StudyInstanceUID missing; series skipped"
                        )
                    )
                    continue
                if uid is not None and series_uid != uid:
                    issues.append(
                        CollectionIssue(
                            _rel(series_dir, root),
                            "mixed_study",
                            "belongs to another StudyInstanceUID than the rest of its study folder; series skipped",
                        )
                    )
                    continue
                uid, patient = series_uid, str(getattr(header, "PatientID", "") or study_dir.parent.name)
                usable.append(str(series_dir))
            if not usable or uid is None:
                why = "holds no series folder" if not series_dirs else "has no usable CT series (see the series above)"
                issues.append(CollectionIssue(rel, "no_images", f"study folder {why}; study skipped"))
                continue
            if uid in seen:
                issues.append(CollectionIssue(rel, "duplicate_study", f"same StudyInstanceUID as {seen[uid]}; skipped"))
                continue
            seen[uid] = rel
            match = RICORD_PATIENT_ID.match(patient or "")
            if match is None:
                issues.append(
                    CollectionIssue(
                        rel,
                        "unknown_institution",
                        "PatientID is not MIDRC-RICORD-1X-<institution>-<n>; "
                        "grouped as institution 'unknown' for --split-by site",
                    )
                )
            group = f"institution-{match.group(1)}" if match else "institution-unknown"
            category = appearance.get(uid, "")
            if collection == "MIDRC-RICORD-1A" and annotated and not category:
                issues.append(
                    CollectionIssue(
                        rel,
                        "not_in_annotations",
                        "study not in the 1A annotation file; kept as covid (RT-PCR positive collection)",
                    )
                )
            studies.append(
                CollectionStudy(
                    key=uid,
                    collection=collection,
                    group=group,
                    patient=patient or uid,
                    kind="dicom",
                    source=tuple(usable),
                    diagnosis=RICORD_DIAGNOSIS[collection],
                    severity=None,
                    category=category or ("COVID-19 positive" if collection.endswith("1A") else "COVID-19 negative"),
                )
            )
    if not studies:
        raise CollectionError(f"{root}: no usable MIDRC-RICORD CT study found ({len(issues)} issue(s))")
    return CollectionScan(name="ricord", root=str(root), studies=tuple(studies), issues=tuple(issues))


ADAPTERS: dict[str, Callable[[Path], CollectionScan]] = {"mosmed": scan_mosmed, "ricord": scan_ricord}


# --- site assignment and site folders --------------------------------------------------------------------------------


def assign_sites(
    studies: Sequence[CollectionStudy], *, split_by: str, sites: int | None, seed: int
) -> list[list[CollectionStudy]]:
    """Studies per site. A patient's studies always share a site.

    ``collection``/``site``: one site per collection / per acquiring institution; with ``sites`` N smaller than the
    number of groups, groups are merged (largest first onto the smallest site). ``none``: the pooled studies are dealt
    to ``sites`` (default 1) sites at random (``seed``), stratified by diagnosis.
    """
    if split_by not in SPLIT_BY:
        raise ValueError(f"split_by must be one of {', '.join(SPLIT_BY)}, got {split_by!r}")
    if sites is not None and sites < 1:
        raise ValueError(f"--sites must be >= 1, got {sites}")
    if split_by == "site" and any(s.group == s.collection for s in studies):
        raise ValueError(
            "this collection records no acquiring institution per study (MosMedData: 48 Moscow hospitals, "
            "not identified); use --split-by none --sites N"
        )
    by_patient: dict[str, list[CollectionStudy]] = defaultdict(list)
    for study in studies:
        by_patient[study.patient].append(study)
    if split_by == "none":
        n = sites or 1
        if n > len(by_patient):
            raise ValueError(f"--sites {n} but only {len(by_patient)} patient(s)")
        rng = np.random.default_rng(seed)
        patients = sorted(by_patient)
        rng.shuffle(patients)
        patients.sort(key=lambda p: DIAGNOSES.index(by_patient[p][0].diagnosis))  # stable: shuffled within each class
        out: list[list[CollectionStudy]] = [[] for _ in range(n)]
        for i, patient in enumerate(patients):
            out[i % n].extend(by_patient[patient])
        return out
    attribute = "collection" if split_by == "collection" else "group"
    groups: dict[str, list[CollectionStudy]] = defaultdict(list)
    for patient in sorted(by_patient):
        groups[getattr(by_patient[patient][0], attribute)].extend(by_patient[patient])
    n = sites or len(groups)
    if n > len(groups):
        raise ValueError(
            f"--sites {n} but the collection has only {len(groups)} {split_by} group(s) "
            f"({', '.join(sorted(groups))}); use --split-by none to split at random"
        )
    out = [[] for _ in range(n)]
    for name in sorted(groups, key=lambda g: (-len(groups[g]), g)):
        min(out, key=len).extend(groups[name])
    return out


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.abspath(target), link)


def write_sites(
    scan: CollectionScan, out: Path, *, split_by: str, sites: int | None = None, seed: int = 0
) -> list[PreparedSite]:
    """Write ``out/site-K/`` (labels.csv, collection.csv, dicom/ or nifti/ of links) and ``out/collection.json``."""
    out = Path(out)
    if out.is_dir() and any(out.glob("site-*")):
        raise FileExistsError(f"{out} already holds site folders; give an empty or new --out")
    assigned = assign_sites(scan.studies, split_by=split_by, sites=sites, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    written: list[PreparedSite] = []
    for index, studies in enumerate(assigned):
        site = out / f"site-{index}"
        site.mkdir()
        labels_rows, source_rows = [], []
        for n, study in enumerate(sorted(studies, key=lambda s: s.key), start=1):
            if study.kind == "nifti":
                source = Path(study.source[0])
                suffix = ".nii.gz" if source.name.endswith(".nii.gz") else ".nii"
                _link(source, site / "nifti" / f"{study.key}{suffix}")
            else:
                for m, series_dir in enumerate(study.source, start=1):
                    files = sorted(p for p in Path(series_dir).iterdir() if p.is_file() and not p.name.startswith("."))
                    for k, path in enumerate(files, start=1):
                        _link(path, site / "dicom" / f"study-{n:04d}" / f"series-{m:02d}" / f"{k:05d}.dcm")
            labels_rows.append({"StudyInstanceUID": study.key, "diagnosis": study.diagnosis})
            source_rows.append(
                {
                    "StudyInstanceUID": study.key,
                    "collection": study.collection,
                    "group": study.group,
                    "category": study.category,
                    "severity": "" if study.severity is None else study.severity,
                }
            )
        for name, rows in (("labels.csv", labels_rows), ("collection.csv", source_rows)):
            with (site / name).open("w", newline="", encoding="utf-8") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["StudyInstanceUID", "diagnosis"])
                writer.writeheader()
                writer.writerows(rows)
        counts = dict(Counter(s.diagnosis for s in studies))
        groups = (
            tuple(sorted({s.collection if split_by == "collection" else s.group for s in studies}))
            if split_by != "none"
            else ()
        )
        written.append(PreparedSite(name=site.name, groups=groups, n_studies=len(studies), class_counts=counts))
    summary = {
        "collection": scan.name,
        "split_by": split_by,
        "seed": seed,
        "sites": [asdict(s) for s in written],
        "issues": [asdict(i) for i in scan.issues],
    }
    (out / "collection.json").write_text(json.dumps(summary, indent=2))
    return written


# --- the `fedct collection` command ----------------------------------------------------------------------------------


def _prepare(args: argparse.Namespace) -> int:
    try:
        scan = ADAPTERS[args.name](Path(args.root))
        written = write_sites(scan, Path(args.out), split_by=args.split_by, sites=args.sites, seed=args.seed)
    except (CollectionError, OSError, ValueError) as exc:
        print(f"fedct collection prepare: error: {exc}", file=sys.stderr)
        return 2
    for issue in scan.issues:
        print(f"  {issue.path}: {issue.reason}: {issue.message}")
    for site in written:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(site.class_counts.items()))
        groups = f" [{', '.join(site.groups)}]" if site.groups else ""
        print(f"{site.name}: {site.n_studies} studies ({counts}){groups}")
        if len(site.class_counts) < 2:
            print(f"  warning: {site.name} holds one class only; AUC cannot be computed on it alone")
    print(
        f"{len(scan.studies)} studies, {len(scan.issues)} issue(s); wrote {args.out} (details: {Path(args.out) / 'collection.json'})"
    )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fedct collection prepare``."""
    p = sub.add_parser("collection", help="public CT collections (MosMedData, MIDRC-RICORD) as fedct site folders")
    commands = p.add_subparsers(dest="collection_command", required=True)
    q = commands.add_parser(
        "prepare", help="read a downloaded collection; write site-K/ folders for ingest/simulation/bench"
    )
    q.add_argument("--name", required=True, choices=sorted(ADAPTERS), help="which collection --root holds")
    q.add_argument("--root", required=True, help="the downloaded collection (read only)")
    q.add_argument("--out", required=True, help="folder for site-0/, site-1/, ... (links to --root; nothing is copied)")
    q.add_argument(
        "--split-by",
        required=True,
        choices=SPLIT_BY,
        help="collection: one site per collection; site: per acquiring institution; none: pooled, random",
    )
    q.add_argument("--sites", type=int, help="number of sites (none: random split; collection/site: merge groups)")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=_prepare)
