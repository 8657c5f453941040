"""Public collections in their published layouts (MosMedData COVID19_1110, MIDRC-RICORD 1A/1B from TCIA) -> site folders."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from openpyxl import Workbook

from fedct.cli import main
from preprocessing.collections import (
    CollectionError,
    CollectionStudy,
    assign_sites,
    read_mosmed_registry,
    scan_mosmed,
    scan_ricord,
    write_sites,
)
from preprocessing.ingest import REPORT_NAME, ingest_site
from preprocessing.labels import DIAGNOSES, read_labels
from preprocessing.split import SplitConfig
from preprocessing.transforms import PipelineConfig
from synthetic.dicom_writer import PatientIdentity, write_ct_series

SMALL = PipelineConfig(input_size=(16, 16, 16), target_spacing_mm=(4.0, 4.0, 4.0))
NO_SPLIT = SplitConfig(val_fraction=0.0, test_fraction=0.0)


def _chest(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """(slices, rows, columns) HU: air around a body with two lungs."""
    rng = np.random.default_rng(seed)
    s, r, c = shape
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[:, r // 5 : 4 * r // 5, c // 6 : 5 * c // 6] = 40.0
    hu[:, 3 * r // 10 : 7 * r // 10, c // 4 : c // 2 - 1] = -850.0
    hu[:, 3 * r // 10 : 7 * r // 10, c // 2 + 1 : 3 * c // 4] = -850.0
    return hu + rng.normal(0, 5, shape).astype(np.float32)


# --- MosMedData COVID19_1110 layout --------------------------------------------------------------------------------------


def _mosmed(root: Path, per_category: dict[str, int] | None = None, *, registry: bool = True) -> dict[str, str]:
    """``root/studies/CT-k/study_NNNN.nii.gz`` (HU, int16 as published), ``masks/``, ``dataset_registry.xlsx``."""
    per_category = per_category or {"CT-0": 3, "CT-1": 3, "CT-2": 2, "CT-3": 1, "CT-4": 1}
    categories: dict[str, str] = {}
    n = 1
    for category, count in per_category.items():
        for _ in range(count):
            name = f"study_{n:04d}"
            path = root / "studies" / category / f"{name}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            volume = np.rint(_chest((12, 32, 32), n).transpose(2, 1, 0)).astype(np.int16)
            nib.save(nib.Nifti1Image(volume, np.diag([-0.8, -0.8, 8.0, 1.0])), str(path))
            categories[name] = category
            n += 1
    (root / "masks").mkdir(parents=True, exist_ok=True)
    mask = np.zeros((32, 32, 12), dtype=np.uint8)
    nib.save(nib.Nifti1Image(mask, np.diag([-0.8, -0.8, 8.0, 1.0])), str(root / "masks" / "study_0004_mask.nii.gz"))
    if registry:
        _registry(root / "dataset_registry.xlsx", categories)
    return categories


def _registry(path: Path, categories: dict[str, str]) -> None:
    book = Workbook()
    sheet = book.active
    sheet.title = "MosMedData COVID19_1110"
    sheet.append(["study_id", "category", "study_file", "mask_file"])
    for name, category in categories.items():
        sheet.append([name, category, f"/COVID19_1110/studies/{category}/{name}.nii.gz", None])
    book.save(path)


def _issues(scan: object) -> dict[str, str]:
    return {i.path: i.reason for i in scan.issues}  # type: ignore[attr-defined]


def test_mosmed_categories_become_diagnosis_and_severity(tmp_path: Path) -> None:
    categories = _mosmed(tmp_path / "COVID19_1110")
    scan = scan_mosmed(tmp_path)  # the folder above COVID19_1110 works too
    assert scan.issues == ()
    assert len(scan.studies) == len(categories) == 10
    for study in scan.studies:
        severity = int(categories[study.key][-1])
        assert study.severity == severity and study.category == categories[study.key]
        assert study.diagnosis == ("normal" if severity == 0 else "covid")
        assert study.kind == "nifti" and study.source[0].endswith(f"{study.key}.nii.gz")


def test_mosmed_missing_category_folder_is_reported_and_the_rest_kept(tmp_path: Path) -> None:
    _mosmed(tmp_path, {"CT-0": 2, "CT-1": 2, "CT-2": 1, "CT-3": 1}, registry=False)
    (tmp_path / "studies" / "CT-9").mkdir()
    scan = scan_mosmed(tmp_path)
    assert _issues(scan) == {"studies/CT-4": "missing_category", "studies/CT-9": "unknown_category"}
    assert len(scan.studies) == 6


def test_mosmed_registry_gaps_and_conflicts_are_reported(tmp_path: Path) -> None:
    categories = _mosmed(tmp_path, registry=False)
    listed = dict(categories)
    del listed["study_0002"]  # label file missing a study: kept with its folder's category
    listed["study_0005"] = "CT-3"  # the registry disagrees with the folder: skipped
    listed["study_0999"] = "CT-1"  # listed, but no file
    _registry(tmp_path / "dataset_registry.xlsx", listed)
    assert read_mosmed_registry(tmp_path / "dataset_registry.xlsx")["study_0999"] == "CT-1"
    scan = scan_mosmed(tmp_path)
    assert _issues(scan) == {
        "studies/CT-0/study_0002.nii.gz": "not_in_registry",
        "studies/CT-1/study_0005.nii.gz": "category_conflict",
        "dataset_registry.xlsx": "missing_file",
    }
    keys = {s.key for s in scan.studies}
    assert "study_0002" in keys and "study_0005" not in keys and len(keys) == 9


def test_mosmed_corrupt_and_2d_volumes_and_stray_files_are_skipped_with_reasons(tmp_path: Path) -> None:
    _mosmed(tmp_path, {"CT-0": 2, "CT-1": 2}, registry=False)
    (tmp_path / "studies" / "CT-1" / "study_0100.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    nib.save(
        nib.Nifti1Image(np.zeros((32, 32), np.int16), np.eye(4)),
        str(tmp_path / "studies" / "CT-0" / "study_0101.nii.gz"),
    )
    (tmp_path / "studies" / "CT-0" / "readme.txt").write_text("x")
    (tmp_path / "dataset_registry.xlsx").write_bytes(b"not a workbook")
    scan = scan_mosmed(tmp_path)
    issues = _issues(scan)
    assert issues["studies/CT-1/study_0100.nii.gz"] == "nifti_unreadable"
    assert issues["studies/CT-0/study_0101.nii.gz"] == "nifti_not_3d"
    assert issues["studies/CT-0/readme.txt"] == "unexpected_file"
    assert issues["dataset_registry.xlsx"] == "registry_unreadable"
    assert len(scan.studies) == 4
    assert all("study_0101" in i.message or i.path != "studies/CT-0/study_0101.nii.gz" for i in scan.issues)


def test_mosmed_wrong_root_and_site_split_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CollectionError, match="studies/CT-0"):
        scan_mosmed(tmp_path)
    _mosmed(tmp_path, {"CT-0": 1, "CT-1": 1}, registry=False)
    scan = scan_mosmed(tmp_path)
    with pytest.raises(ValueError, match="--split-by none"):
        write_sites(scan, tmp_path / "sites", split_by="site")


def test_mosmed_sites_ingest_as_nifti_sites(tmp_path: Path) -> None:
    _mosmed(tmp_path / "mosmed")
    out = tmp_path / "sites"
    assert (
        main(
            [
                "collection",
                "prepare",
                "--name",
                "mosmed",
                "--root",
                str(tmp_path / "mosmed"),
                "--out",
                str(out),
                "--split-by",
                "none",
                "--sites",
                "2",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    sites = sorted(p.name for p in out.glob("site-*"))
    assert sites == ["site-0", "site-1"]
    total = 0
    for name in sites:
        site = out / name
        labels = read_labels(site / "labels.csv")
        links = sorted(site.glob("nifti/*.nii.gz"))
        assert all(p.is_symlink() for p in links) and {p.name[: -len(".nii.gz")] for p in links} == set(labels)
        assert {DIAGNOSES[v.diagnosis] for v in labels.values()} == {"covid", "normal"}  # stratified: both classes
        with (site / "collection.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        assert all(r["severity"] in "01234" and r["category"] == f"CT-{r['severity']}" for r in rows)
        # What the simulation and bench quality pass: SITE/dicom (absent) -> the NIfTI folder next to it.
        manifest = ingest_site(
            site / "dicom",
            tmp_path / "work" / name,
            labels_csv=site / "labels.csv",
            pipeline=SMALL,
            split=NO_SPLIT,
            workers=1,
        )
        assert len(manifest.studies) == len(labels)
        total += len(labels)
    assert total == 10
    assert json.loads((out / "collection.json").read_text())["split_by"] == "none"
    assert (
        main(
            [
                "collection",
                "prepare",
                "--name",
                "mosmed",
                "--root",
                str(tmp_path / "mosmed"),
                "--out",
                str(out),
                "--split-by",
                "none",
            ]
        )
        == 2
    )  # an existing output is not overwritten


# --- MIDRC-RICORD (TCIA, NBIA Data Retriever layout) ------------------------------------------------------------------


def _ricord_study(collection_dir: Path, patient_id: str, n: int, *, seed: int) -> str:
    """``<collection>/<PatientID>/<date-desc-id>/<seriesnum-desc-id>/1-NN.dcm``; returns the StudyInstanceUID."""
    study_uid = f"1.2.826.0.1.3680043.10.474.{seed}.{n}"
    series_dir = (
        collection_dir
        / patient_id
        / f"08-02-2002-NA-CT CHEST WITHOUT CONTRAST-0{n}614"
        / f"3.000000-1.25mm lung-2{n}970"
    )
    patient = PatientIdentity("", patient_id, "", "", "")
    write_ct_series(
        series_dir,
        _chest((10, 24, 24), seed),
        pixel_spacing_mm=(1.2, 1.2),
        slice_spacing_mm=5.0,
        study_instance_uid=study_uid,
        series_instance_uid=f"{study_uid}.1",
        patient=patient,
        file_prefix="1-",
    )
    return study_uid


def _ricord(root: Path) -> dict[str, str]:
    """1A (institutions 419639, 660042) and 1B (419639) under manifest-*/, MD.ai annotations for 1A, and a 1C folder."""
    manifest = root / "manifest-1608266677008"
    a, b = manifest / "MIDRC-RICORD-1A", manifest / "MIDRC-RICORD-1B"
    uids = {
        _ricord_study(a, "MIDRC-RICORD-1A-419639-000082", 1, seed=1): "covid",
        _ricord_study(a, "MIDRC-RICORD-1A-419639-000083", 2, seed=2): "covid",
        _ricord_study(a, "MIDRC-RICORD-1A-660042-000001", 3, seed=3): "covid",
        _ricord_study(b, "MIDRC-RICORD-1B-419639-000010", 4, seed=4): "normal",
        _ricord_study(b, "MIDRC-RICORD-1B-419639-000011", 5, seed=5): "normal",
    }
    covid = [uid for uid, d in uids.items() if d == "covid"]
    annotations = {
        "labelGroups": [
            {
                "labels": [
                    {"id": "L_typ", "name": "Typical Appearance", "scope": "STUDY"},
                    {"id": "L_ind", "name": "Indeterminate Appearance", "scope": "STUDY"},
                    {"id": "L_inf", "name": "Infectious opacity", "scope": "INSTANCE"},
                ]
            }
        ],
        "datasets": [
            {
                "annotations": [
                    {"StudyInstanceUID": covid[0], "labelId": "L_typ"},
                    {"StudyInstanceUID": covid[0], "labelId": "L_inf", "SOPInstanceUID": "1.2.3"},
                    {"StudyInstanceUID": covid[1], "labelId": "L_ind"},
                ]
            }
        ],
    }
    (root / "MIDRC-RICORD-1a_annotations_labelgroup_all_2020-Dec-8.json").write_text(json.dumps(annotations))
    (manifest / "MIDRC-RICORD-1C" / "MIDRC-RICORD-1C-419639-000001").mkdir(parents=True)
    return uids


def test_ricord_collections_give_covid_and_covid_negative_with_institutions(tmp_path: Path) -> None:
    uids = _ricord(tmp_path)
    scan = scan_ricord(tmp_path)
    assert {s.key: s.diagnosis for s in scan.studies} == uids
    by_key = {s.key: s for s in scan.studies}
    covid = [uid for uid, d in uids.items() if d == "covid"]
    assert by_key[covid[0]].category == "Typical Appearance" and by_key[covid[1]].category == "Indeterminate Appearance"
    assert {s.group for s in scan.studies} == {"institution-419639", "institution-660042"}
    assert all(s.kind == "dicom" and s.severity is None for s in scan.studies)
    assert _issues(scan) == {
        "manifest-1608266677008/MIDRC-RICORD-1A/MIDRC-RICORD-1A-660042-000001/08-02-2002-NA-CT CHEST WITHOUT CONTRAST-03614": "not_in_annotations",
        "manifest-1608266677008/MIDRC-RICORD-1C": "not_ct",
    }


def test_ricord_study_without_images_and_non_dicom_series_are_skipped(tmp_path: Path) -> None:
    _ricord(tmp_path)
    a = tmp_path / "manifest-1608266677008" / "MIDRC-RICORD-1A"
    empty = a / "MIDRC-RICORD-1A-419639-000090" / "01-01-2002-NA-CT CHEST-0900" / "2.000000-empty-100"
    empty.mkdir(parents=True)
    odd = a / "MIDRC-RICORD-1A-419639-000091" / "01-01-2002-NA-CT CHEST-0901" / "2.000000-odd-101"
    odd.mkdir(parents=True)
    (odd / "1-01.dcm").write_bytes(b"not dicom")
    (a / "MIDRC-RICORD-1A-419639-000092" / "01-01-2002-NA-CT CHEST-0902").mkdir(parents=True)
    (tmp_path / "MIDRC-RICORD-1a_annotations_broken.json").write_text("{not json")
    scan = scan_ricord(tmp_path)
    issues = _issues(scan)
    rel = "manifest-1608266677008/MIDRC-RICORD-1A/"
    assert issues[rel + "MIDRC-RICORD-1A-419639-000090/01-01-2002-NA-CT CHEST-0900/2.000000-empty-100"] == "no_images"
    assert issues[rel + "MIDRC-RICORD-1A-419639-000090/01-01-2002-NA-CT CHEST-0900"] == "no_images"
    assert issues[rel + "MIDRC-RICORD-1A-419639-000091/01-01-2002-NA-CT CHEST-0901/2.000000-odd-101"] == "not_dicom"
    assert issues[rel + "MIDRC-RICORD-1A-419639-000092/01-01-2002-NA-CT CHEST-0902"] == "no_images"
    assert issues["MIDRC-RICORD-1a_annotations_broken.json"] == "annotations_unreadable"
    assert len(scan.studies) == 5  # the good ones are all kept


def test_ricord_wrong_root_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CollectionError, match="MIDRC-RICORD-1A/<PatientID>"):
        scan_ricord(tmp_path)
    assert (
        main(
            [
                "collection",
                "prepare",
                "--name",
                "ricord",
                "--root",
                str(tmp_path),
                "--out",
                str(tmp_path / "o"),
                "--split-by",
                "collection",
            ]
        )
        == 2
    )


def test_ricord_split_by_collection_and_by_site_then_ingest(tmp_path: Path) -> None:
    uids = _ricord(tmp_path / "tcia")
    scan = scan_ricord(tmp_path / "tcia")
    by_collection = write_sites(scan, tmp_path / "by-collection", split_by="collection")
    assert [(s.groups, s.class_counts) for s in by_collection] == [
        (("MIDRC-RICORD-1A",), {"covid": 3}),
        (("MIDRC-RICORD-1B",), {"normal": 2}),
    ]
    by_site = write_sites(scan, tmp_path / "by-site", split_by="site")
    assert [(s.groups, s.n_studies) for s in by_site] == [(("institution-419639",), 4), (("institution-660042",), 1)]
    site = tmp_path / "by-site" / "site-0"
    links = list(site.glob("dicom/*/*/*.dcm"))
    assert len(links) == 40 and all(p.is_symlink() for p in links)
    manifest = ingest_site(
        site / "dicom", tmp_path / "work", labels_csv=site / "labels.csv", pipeline=SMALL, split=NO_SPLIT, workers=1
    )
    assert sorted(DIAGNOSES[s.diagnosis] for s in manifest.studies) == sorted(
        uids[u] for u in read_labels(site / "labels.csv")
    )
    assert json.loads((tmp_path / "work" / REPORT_NAME).read_text())["counts"]["rejected"] == 0


# --- site assignment -------------------------------------------------------------------------------------------------


def _study(key: str, patient: str, diagnosis: str, group: str = "g1", collection: str = "c1") -> CollectionStudy:
    return CollectionStudy(
        key=key,
        collection=collection,
        group=group,
        patient=patient,
        kind="dicom",
        source=(),
        diagnosis=diagnosis,
        severity=None,
        category="",
    )


def test_assign_sites_keeps_patients_together_is_seeded_and_checks_options() -> None:
    studies = [_study(f"s{i}", f"p{i // 2}", "covid" if i % 4 < 2 else "normal", group=f"g{i % 3}") for i in range(24)]
    sites = assign_sites(studies, split_by="none", sites=3, seed=1)
    assert sum(len(s) for s in sites) == 24
    for site in sites:
        assert {s.diagnosis for s in site} == {"covid", "normal"}
    where = {s.patient: i for i, site in enumerate(sites) for s in site}
    assert all(where[s.patient] == i for i, site in enumerate(sites) for s in site)  # one site per patient
    assert [[s.key for s in site] for site in sites] == [
        [s.key for s in site] for site in assign_sites(studies, split_by="none", sites=3, seed=1)
    ]
    merged = assign_sites(studies, split_by="site", sites=2, seed=0)
    assert len(merged) == 2 and sum(len(s) for s in merged) == 24
    with pytest.raises(ValueError, match="--sites 5 but the collection has only 3 site group"):
        assign_sites(studies, split_by="site", sites=5, seed=0)
    with pytest.raises(ValueError, match="--sites must be >= 1"):
        assign_sites(studies, split_by="none", sites=0, seed=0)
    with pytest.raises(ValueError, match="split_by must be one of"):
        assign_sites(studies, split_by="hospital", sites=None, seed=0)


def test_a_prepared_nifti_site_trains_through_the_simulation_client_path(tmp_path: Path) -> None:
    """The simulation's SiteConfig (sim-data-root/site-K/dicom) finds the NIfTI site and trains a round on it."""
    import math

    import torch

    from fl_client.config import SiteConfig
    from fl_client.train import train_round
    from fl_server.config import ServerConfig
    from models.factory import build_model

    _mosmed(tmp_path / "mosmed", {"CT-0": 5, "CT-1": 3, "CT-2": 2})
    write_sites(scan_mosmed(tmp_path / "mosmed"), tmp_path / "sites", split_by="none", sites=1)
    site = SiteConfig.from_context(
        {"partition-id": 0, "num-partitions": 1, "device": "cpu", "workers": 1},
        {"sim-data-root": str(tmp_path / "sites"), "sim-work-root": str(tmp_path / "work")},
    )
    assert site.dicom_dir == tmp_path / "sites" / "site-0" / "dicom" and not site.dicom_dir.exists()
    config = ServerConfig(model_name="smallcnn", input_size="16,16,16", target_spacing_mm="8,8,8", local_epochs=1)
    settings = config.round_settings(1)
    initial = build_model(settings.model).state_dict()
    state, result = train_round(site, settings, initial)
    assert result.num_examples >= 4 and math.isfinite(result.loss)
    assert any(not torch.equal(state[k], initial[k]) for k in initial if initial[k].is_floating_point())
