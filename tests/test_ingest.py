"""Site ingestion end to end: report, manifest, privacy, untouched inputs, re-use of earlier work."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from preprocessing.cache import cache_dir_for, make_dataset
from preprocessing.deid import KEY_FILE_NAME
from preprocessing.ingest import (
    MANIFEST_NAME,
    REPORT_NAME,
    SiteNotPrepared,
    StudyEntry,
    ingest_site,
    load_manifest,
    pool_context,
    prepare_site,
)
from preprocessing.labels import DIAGNOSES
from preprocessing.transforms import PipelineConfig
from synthetic.dicom_writer import PatientIdentity

SMALL = PipelineConfig(input_size=(16, 16, 16), target_spacing_mm=(4.0, 4.0, 4.0))
OLD_NS = 946_684_800_000_000_000  # 2000-01-01: an mtime no fresh write can have


def _patient(i: int) -> PatientIdentity:
    return PatientIdentity(
        PatientName=f"Qzvorak{i}^Ylvenne",
        PatientID=f"PIDQ7X93K{i}",
        PatientBirthDate=f"193704{10 + i}",
        PatientSex="F" if i % 2 else "M",
        PatientAge="087Y",
    )


def _phi(patients: list[PatientIdentity]) -> set[str]:
    strings = {"Qzvorak", "Ylvenne", "PIDQ7X93K"}
    for p in patients:
        strings |= {p.PatientName, p.PatientID, p.PatientBirthDate}
    return strings


def _label_row(study_uid: str, diagnosis: str) -> dict[str, str]:
    return {
        "StudyInstanceUID": study_uid,
        "diagnosis": diagnosis,
        "severe": "0",
        "time_days": "",
        "age": "70",
        "sex": "F",
    }


# --- one site with good and bad series, ingested once with two workers -----------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory, series_writer, labels_writer, snapshot):
    base = tmp_path_factory.mktemp("ingest")
    root = base / "dicom"
    site_dir = base / "site"
    patients = [_patient(i) for i in range(10)]
    w = {}

    def write(name, patient, **options):
        w[name] = series_writer(root / name, patient=patients[patient], seed=len(w), **options)
        return w[name]

    write("good/p0s0", 0)
    write("good/p0s1", 0)  # same patient, second study
    write("good/p1", 1)
    write("good/p2", 2)
    write("good/p3", 3)
    write("good/p4", 4)
    duplicate = Path(shutil.copy(w["good/p4"].paths[2], w["good/p4"].folder / "copy_of_IM0003.dcm"))
    write("extra/p1_thick", 1, n_slices=10, slice_spacing_mm=3.0, study_uid=w["good/p1"].study_uid)
    write("nolabel/p5", 5)
    write("broken/missing", 6)
    w["broken/missing"].paths[6].unlink()
    write("broken/truncated", 7)
    truncated = w["broken/truncated"].paths[4]
    truncated.write_bytes(truncated.read_bytes()[:-100])
    write("broken/mr", 8, modality="MR")
    write("broken/short", 9, n_slices=5)
    (root / "README.txt").write_text("Export from PACS\n")

    diagnoses = {
        "good/p0s0": "covid",
        "good/p0s1": "covid",
        "good/p1": "normal",
        "good/p2": "other_pneumonia",
        "good/p3": "normal",
        "good/p4": "covid",
        "broken/missing": "normal",
        "broken/truncated": "covid",
        "broken/mr": "normal",
        "broken/short": "covid",
    }
    labels = labels_writer(base / "labels.csv", [_label_row(w[name].study_uid, dx) for name, dx in diagnoses.items()])

    before = snapshot(root)
    manifest = ingest_site(root, site_dir, labels_csv=labels, pipeline=SMALL, workers=2)
    return {
        "root": root,
        "site_dir": site_dir,
        "labels": labels,
        "series": w,
        "patients": patients,
        "diagnoses": diagnoses,
        "duplicate": duplicate,
        "truncated": truncated,
        "before": before,
        "manifest": manifest,
        "report": json.loads((site_dir / REPORT_NAME).read_text()),
        "report_text": (site_dir / REPORT_NAME).read_text(),
        "manifest_json": json.loads((site_dir / MANIFEST_NAME).read_text()),
    }


EXPECTED_REASONS = {
    "not_dicom": "README.txt",
    "additional_series": "extra/p1_thick",
    "no_label": "nolabel/p5",
    "missing_slices": "broken/missing/IM0008.dcm",  # the file after the gap (IM0007 was deleted)
    "truncated_pixel_data": "broken/truncated/IM0005.dcm",
    "not_ct": "broken/mr/IM0001.dcm",
    "too_few_slices": "broken/short",  # a series-level refusal without one file to name: its folder
}


def test_report_lists_every_refusal_with_path_reason_and_message(site):
    report = site["report"]

    rejected = report["rejected"]
    assert all(set(r) == {"path", "reason", "message"} for r in rejected)
    assert all(isinstance(r["message"], str) and r["message"] for r in rejected)
    assert {r["reason"]: r["path"] for r in rejected} == EXPECTED_REASONS
    assert len(rejected) == len(EXPECTED_REASONS)
    assert report["counts"]["rejected"] == len(rejected) == site["manifest"].n_rejected
    assert report["counts"]["by_reason"] == dict(Counter(r["reason"] for r in rejected))


def test_rejected_paths_are_relative_to_the_input_folder(site):
    for r in site["report"]["rejected"]:
        assert not Path(r["path"]).is_absolute(), r
        assert (site["root"] / r["path"]).exists(), r


def test_truncated_file_is_named_and_its_series_not_used(site):
    [refusal] = [r for r in site["report"]["rejected"] if r["reason"] == "truncated_pixel_data"]
    assert Path(site["root"] / refusal["path"]) == site["truncated"]
    study_ids = {s.id for s in site["manifest"].studies}
    truncated_paths = {str(p) for p in site["series"]["broken/truncated"].paths}
    assert all(not set(s.series["paths"]) & truncated_paths for s in site["manifest"].studies)
    assert len(study_ids) == 6


def test_accepted_studies_match_the_good_series(site):
    manifest, report, w = site["manifest"], site["report"], site["series"]
    good = [name for name in w if name.startswith("good/")]

    assert report["counts"]["accepted"] == len(good) == len(manifest.studies)
    accepted_paths = {tuple(s.series["paths"]) for s in manifest.studies}
    assert accepted_paths == {tuple(str(p) for p in w[name].paths) for name in good}
    by_uid = {s.series["StudyInstanceUID"]: s for s in manifest.studies}
    for name in good:
        assert by_uid[w[name].study_uid].diagnosis == DIAGNOSES.index(site["diagnoses"][name])
    assert [a["id"] for a in report["accepted"]] == [s.id for s in manifest.studies]
    assert all(a["shape"] == [16, 16, 12] and a["slices"] == 12 for a in report["accepted"])


def test_additional_series_keeps_the_one_with_more_slices(site):
    w = site["series"]
    [study] = [s for s in site["manifest"].studies if s.series["StudyInstanceUID"] == w["good/p1"].study_uid]
    assert study.series["SeriesInstanceUID"] == w["good/p1"].series_uid
    assert len(study.series["paths"]) == 12


def test_exact_duplicate_file_is_dropped_and_reported(site):
    w = site["series"]
    [study] = [s for s in site["manifest"].studies if s.series["StudyInstanceUID"] == w["good/p4"].study_uid]
    assert str(site["duplicate"]) not in study.series["paths"]
    [entry] = [a for a in site["report"]["accepted"] if a["id"] == study.id]
    [dropped] = entry["dropped"]
    assert dropped["reason"] == "duplicate_instance"
    assert dropped["path"] == str(site["duplicate"].relative_to(site["root"]))
    assert dropped["message"]


def test_studies_of_one_patient_share_a_split(site):
    w = site["series"]
    by_uid = {s.series["StudyInstanceUID"]: s for s in site["manifest"].studies}
    first, second = by_uid[w["good/p0s0"].study_uid], by_uid[w["good/p0s1"].study_uid]

    assert first.patient == second.patient
    assert first.split == second.split
    assert first.id != second.id
    splits_of_patient = {}
    for s in site["manifest"].studies:
        splits_of_patient.setdefault(s.patient, set()).add(s.split)
    assert all(len(v) == 1 for v in splits_of_patient.values())
    assert len(splits_of_patient) == 5


def test_no_identifiers_in_the_report_or_the_study_ids(site):
    phi = _phi(site["patients"])
    text = site["report_text"]
    for value in phi:
        assert value not in text, value
    for study in site["manifest_json"]["studies"]:
        for field in ("id", "patient"):
            assert all(value not in study[field] for value in phi), (field, study[field])
        assert study["id"].startswith("study-") and study["patient"].startswith("patient-")
    uids = {s.study_uid for s in site["series"].values()} | {s.series_uid for s in site["series"].values()}
    assert not any(uid in text for uid in uids)


def test_every_input_file_is_used_or_accounted_for(site):
    root = site["root"]
    report, manifest = site["report"], site["manifest"]
    used = {p for s in manifest.studies for p in s.series["paths"]}
    dropped = {str(root / d["path"]) for a in report["accepted"] for d in a["dropped"]}
    refused = [root / r["path"] for r in report["rejected"]]
    files = [p for p in root.rglob("*") if p.is_file()]

    assert report["files_scanned"] == len(files)
    for path in files:
        named = str(path) in used or str(path) in dropped
        covered = any(path == r or r in path.parents or (r.is_file() and r.parent == path.parent) for r in refused)
        assert named or covered, path


def test_input_folder_is_unchanged(site, snapshot):
    assert snapshot(site["root"]) == site["before"]


def test_site_folder_holds_key_manifest_report_and_cache(site):
    site_dir = site["site_dir"]
    assert (site_dir / KEY_FILE_NAME).is_file()
    assert (site_dir / MANIFEST_NAME).is_file() and (site_dir / REPORT_NAME).is_file()
    cached = [p for p in cache_dir_for(site_dir, SMALL).rglob("*") if p.is_file()]
    assert len(cached) == len(site["manifest"].studies)
    assert not list(site_dir.glob("*.tmp"))


def test_training_input_from_ingests_cache_equals_the_monai_chain(site):
    # The cache is written in numpy by workers without torch; training reads what MONAI's chain would have given.
    from monai.transforms import Compose

    from preprocessing.transforms import deterministic_transforms

    loaded = load_manifest(site["site_dir"], SMALL)
    dataset = make_dataset([s.item() for s in loaded.studies], SMALL, site["site_dir"], augment=False)
    chain = Compose(deterministic_transforms(SMALL))
    for i, study in enumerate(loaded.studies):
        reference = chain({"image": study.series})["image"].numpy()
        np.testing.assert_allclose(dataset[i]["image"].numpy(), reference, rtol=0, atol=1e-6)


def test_manifest_round_trips_through_load_manifest(site):
    loaded = load_manifest(site["site_dir"], SMALL)

    assert loaded == site["manifest"]
    assert all(isinstance(s, StudyEntry) for s in loaded.studies)
    assert site["manifest_json"]["pipeline_fingerprint"] == SMALL.fingerprint()
    train = loaded.split("train")
    assert train and all(s.diagnosis is not None for s in train)


def test_training_reads_the_cache_that_ingest_wrote(site):
    site_dir = site["site_dir"]
    cache_dir = cache_dir_for(site_dir, SMALL)
    before = sorted(p for p in cache_dir.rglob("*") if p.is_file())
    loaded = load_manifest(site_dir, SMALL)  # what a training process starts from

    dataset = make_dataset([s.item() for s in loaded.studies], SMALL, site_dir, augment=False)
    images = [dataset[i]["image"] for i in range(len(dataset))]

    assert sorted(p for p in cache_dir.rglob("*") if p.is_file()) == before
    assert all(tuple(image.shape) == (1, *SMALL.input_size) for image in images)


def test_load_manifest_refuses_another_pipeline(site):
    with pytest.raises(SiteNotPrepared, match="pipeline"):
        load_manifest(site["site_dir"], PipelineConfig(input_size=(16, 16, 24), target_spacing_mm=(4.0, 4.0, 4.0)))


def test_load_manifest_without_manifest(tmp_path):
    with pytest.raises(SiteNotPrepared, match="fedct ingest"):
        load_manifest(tmp_path, SMALL)


# --- smaller sites, one worker ---------------------------------------------------------------------------------


def _small_site(make_series, labels_writer, tmp_path, n: int = 2):
    series = [make_series(f"s{i}", patient=_patient(i), seed=i) for i in range(n)]
    labels = labels_writer(tmp_path / "labels.csv", [_label_row(s.study_uid, "covid") for s in series])
    return series, labels


def test_study_without_label_is_refused_with_no_label(make_series, labels_writer, dicom_root, tmp_path):
    series, labels = _small_site(make_series, labels_writer, tmp_path)
    unlabelled = make_series("unlabelled", patient=_patient(5), seed=5)

    manifest = ingest_site(dicom_root, tmp_path / "site", labels_csv=labels, pipeline=SMALL, workers=1)

    report = json.loads((tmp_path / "site" / REPORT_NAME).read_text())
    assert report["rejected"] == [
        {"path": "unlabelled", "reason": "no_label", "message": "StudyInstanceUID not found in the labels file"}
    ]
    assert {s.series["StudyInstanceUID"] for s in manifest.studies} == {s.study_uid for s in series}
    assert unlabelled.study_uid not in {s.series["StudyInstanceUID"] for s in manifest.studies}


def test_without_labels_file_every_valid_study_is_kept_unlabelled(make_series, dicom_root, tmp_path):
    make_series("a", patient=_patient(0), seed=0)
    make_series("b", patient=_patient(1), seed=1)

    manifest = ingest_site(dicom_root, tmp_path / "site", labels_csv=None, pipeline=SMALL, workers=1)

    assert len(manifest.studies) == 2
    assert all(s.diagnosis is None and s.item()["label"] == -1 for s in manifest.studies)
    assert manifest.split("train") == [] and len(manifest.split("train", labelled_only=False)) >= 1


def test_empty_input_folder_gives_an_empty_manifest(dicom_root, tmp_path):
    manifest = ingest_site(dicom_root, tmp_path / "site", pipeline=SMALL, workers=1)

    report = json.loads((tmp_path / "site" / REPORT_NAME).read_text())
    assert manifest.studies == ()
    assert report["counts"]["accepted"] == 0 and report["files_scanned"] == 0


def test_pseudonyms_are_stable_across_runs_of_one_site(make_series, labels_writer, dicom_root, tmp_path):
    _small_site(make_series, labels_writer, tmp_path)
    labels = tmp_path / "labels.csv"

    first = ingest_site(dicom_root, tmp_path / "site", labels_csv=labels, pipeline=SMALL, workers=1)
    second = ingest_site(dicom_root, tmp_path / "site", labels_csv=labels, pipeline=SMALL, workers=1)
    other = ingest_site(dicom_root, tmp_path / "other-site", labels_csv=labels, pipeline=SMALL, workers=1)

    assert [(s.id, s.patient, s.split) for s in first.studies] == [(s.id, s.patient, s.split) for s in second.studies]
    assert {s.id for s in first.studies}.isdisjoint({s.id for s in other.studies})


def test_prepare_site_reuses_the_manifest_when_nothing_changed(make_series, labels_writer, dicom_root, tmp_path):
    _, labels = _small_site(make_series, labels_writer, tmp_path)
    site_dir = tmp_path / "site"
    first = prepare_site(dicom_root, site_dir, labels_csv=labels, pipeline=SMALL, workers=1)
    for name in (MANIFEST_NAME, REPORT_NAME):
        os.utime(site_dir / name, ns=(OLD_NS, OLD_NS))

    again = prepare_site(dicom_root, site_dir, labels_csv=labels, pipeline=SMALL, workers=1)

    assert again == first
    assert (site_dir / MANIFEST_NAME).stat().st_mtime_ns == OLD_NS
    assert (site_dir / REPORT_NAME).stat().st_mtime_ns == OLD_NS


def test_prepare_site_reingests_when_the_labels_change(make_series, labels_writer, dicom_root, tmp_path):
    series, labels = _small_site(make_series, labels_writer, tmp_path)
    site_dir = tmp_path / "site"
    first = prepare_site(dicom_root, site_dir, labels_csv=labels, pipeline=SMALL, workers=1)
    os.utime(site_dir / MANIFEST_NAME, ns=(OLD_NS, OLD_NS))
    labels_writer(labels, [_label_row(series[0].study_uid, "normal"), _label_row(series[1].study_uid, "covid")])

    again = prepare_site(dicom_root, site_dir, labels_csv=labels, pipeline=SMALL, workers=1)

    assert (site_dir / MANIFEST_NAME).stat().st_mtime_ns != OLD_NS
    assert again.input_fingerprint != first.input_fingerprint
    by_uid = {s.series["StudyInstanceUID"]: s.diagnosis for s in again.studies}
    assert by_uid == {series[0].study_uid: DIAGNOSES.index("normal"), series[1].study_uid: DIAGNOSES.index("covid")}
    assert load_manifest(site_dir, SMALL) == again


def test_prepare_site_reingests_when_a_dicom_file_changes(make_series, labels_writer, dicom_root, tmp_path):
    series, labels = _small_site(make_series, labels_writer, tmp_path)
    site_dir = tmp_path / "site"
    first = prepare_site(dicom_root, site_dir, labels_csv=labels, pipeline=SMALL, workers=1)
    os.utime(site_dir / MANIFEST_NAME, ns=(OLD_NS, OLD_NS))
    series[1].paths[5].unlink()  # the second study now misses a slice

    again = prepare_site(dicom_root, site_dir, labels_csv=labels, pipeline=SMALL, workers=1)

    assert (site_dir / MANIFEST_NAME).stat().st_mtime_ns != OLD_NS
    assert len(first.studies) == 2 and len(again.studies) == 1
    report = json.loads((site_dir / REPORT_NAME).read_text())
    assert [r["reason"] for r in report["rejected"]] == ["missing_slices"]


def test_prepare_site_with_another_pipeline_ingests_for_it(make_series, labels_writer, dicom_root, tmp_path):
    _, labels = _small_site(make_series, labels_writer, tmp_path)
    site_dir = tmp_path / "site"
    prepare_site(dicom_root, site_dir, labels_csv=labels, pipeline=SMALL, workers=1)
    other = PipelineConfig(input_size=(16, 16, 24), target_spacing_mm=(4.0, 4.0, 4.0))

    manifest = prepare_site(dicom_root, site_dir, labels_csv=labels, pipeline=other, workers=1)

    assert manifest.pipeline_fingerprint == other.fingerprint()
    assert load_manifest(site_dir, other) == manifest


def test_missing_input_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        ingest_site(tmp_path / "does-not-exist", tmp_path / "site", pipeline=SMALL, workers=1)
    assert not (tmp_path / "site").exists()


@pytest.mark.parametrize("inside", ["site", "nested/site", "."])
def test_site_folder_inside_the_input_folder_is_refused(make_series, dicom_root, snapshot, inside):
    make_series("a", n_slices=10)
    before = snapshot(dicom_root)

    with pytest.raises(ValueError, match="must not be inside"):
        ingest_site(dicom_root, dicom_root / inside, pipeline=SMALL, workers=1)

    assert snapshot(dicom_root) == before
    assert sorted(p.name for p in dicom_root.iterdir()) == ["a"]


def test_bad_labels_file_stops_before_anything_is_written(make_series, dicom_root, tmp_path):
    make_series("a", n_slices=10)
    labels = tmp_path / "labels.csv"
    labels.write_text("StudyInstanceUID,diagnosis\n1.2.3,flu\n")

    with pytest.raises(ValueError, match="line 2"):
        ingest_site(dicom_root, tmp_path / "site", labels_csv=labels, pipeline=SMALL, workers=1)
    assert not (tmp_path / "site" / MANIFEST_NAME).exists()


def test_export_hu_writes_nifti_with_the_dicom_affine_and_values(make_series, tmp_path):
    import nibabel as nib

    from preprocessing.ingest import NIFTI_FOLDER, ingest_site
    from preprocessing.transforms import PipelineConfig
    from preprocessing.volume import read_hu_volume

    series = make_series("nifti")
    site = tmp_path / "site-nifti"
    manifest = ingest_site(
        series.folder.parent,
        site,
        pipeline=PipelineConfig(input_size=(16, 16, 16), target_spacing_mm=(4, 4, 4)),
        workers=1,
        export_hu=True,
    )
    (entry,) = manifest.studies
    path = site / NIFTI_FOLDER / f"{entry.id}.nii.gz"
    image = nib.load(path)
    from preprocessing.volume import as_series

    assert path.name.startswith("study-")  # named by pseudonym only
    volume, affine = read_hu_volume(as_series(entry.series))
    assert np.allclose(image.affine, affine, atol=1e-4)
    assert np.allclose(np.asarray(image.dataobj), volume)
    mtime = path.stat().st_mtime_ns
    ingest_site(
        series.folder.parent,
        site,
        pipeline=PipelineConfig(input_size=(16, 16, 16), target_spacing_mm=(4, 4, 4)),
        workers=1,
        export_hu=True,
    )
    assert path.stat().st_mtime_ns == mtime  # unchanged input: not rewritten


def test_labels_keyed_by_accession_number(make_series, tmp_path):
    from preprocessing.ingest import ingest_site
    from preprocessing.transforms import PipelineConfig

    first = make_series("a", accession_number="ACC-1")
    make_series("b", accession_number="ACC-2")
    labels = tmp_path / "labels.csv"
    labels.write_text("AccessionNumber,diagnosis\nACC-1,covid\n")
    manifest = ingest_site(
        first.folder.parent,
        tmp_path / "site",
        labels_csv=labels,
        pipeline=PipelineConfig(input_size=(16, 16, 16), target_spacing_mm=(4, 4, 4)),
        workers=1,
    )
    assert [s.diagnosis for s in manifest.studies] == [0]
    report = json.loads((tmp_path / "site" / "ingest_report.json").read_text())
    assert [(r["reason"], r["message"]) for r in report["rejected"]] == [
        ("no_label", "AccessionNumber not found in the labels file")
    ]
    assert "ACC-1" not in json.dumps(report)


# --- neither torch nor MONAI: the main process plans, forked workers compute the model input in numpy ---------------


def test_a_fresh_process_ingests_without_torch_or_monai_in_any_process(tmp_path, series_writer):
    # `fedct ingest` starts in a fraction of a second: an import hook refuses torch and MONAI in the main process
    # and, inherited through fork, in every worker; a worker that needed them would refuse its series.
    import subprocess
    import sys

    root = tmp_path / "dicom"
    series_writer(root / "a", seed=1)
    series_writer(root / "b", seed=2)
    script = (
        "import sys, json\n"
        "from pathlib import Path\n"
        "class Refuse:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'monai'):\n"
        "            raise ImportError(f'{name} imported during ingest')\n"
        "sys.meta_path.insert(0, Refuse())\n"
        "from preprocessing.ingest import ingest_site, pool_context\n"
        "from preprocessing.pipeline import PipelineConfig\n"
        "method = pool_context().get_start_method()\n"
        f"m = ingest_site(Path({str(root)!r}), Path({str(tmp_path / 'site')!r}), "
        "pipeline=PipelineConfig(input_size=(16, 16, 16), target_spacing_mm=(4.0, 4.0, 4.0)), workers=2)\n"
        "loaded = sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'monai'))\n"
        "print(json.dumps({'studies': len(m.studies), 'loaded': loaded, 'method': method}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env, check=False
    )

    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"studies": 2, "loaded": [], "method": "fork"}
    report = json.loads((tmp_path / "site" / REPORT_NAME).read_text())
    assert report["counts"]["rejected"] == 0
    assert len(list(cache_dir_for(tmp_path / "site", SMALL).glob("*.npy"))) == 2


def test_a_process_with_torch_forks_its_workers():
    import torch  # noqa: F401 - this process has it, as training and inference do

    assert pool_context().get_start_method() == "fork"


def test_a_study_whose_preferred_series_fails_to_read_uses_its_next_series(
    make_series, labels_writer, dicom_root, tmp_path
):
    thin = make_series("thin", patient=_patient(0), seed=0, n_slices=14)
    thick = make_series(
        "thick", patient=_patient(0), seed=1, n_slices=10, slice_spacing_mm=3.0, study_uid=thin.study_uid
    )
    make_series("third", patient=_patient(0), seed=2, n_slices=9, slice_spacing_mm=3.0, study_uid=thin.study_uid)
    thin.paths[3].write_bytes(thin.paths[3].read_bytes()[:-100])  # headers validate; the pixels cannot be read
    labels = labels_writer(tmp_path / "labels.csv", [_label_row(thin.study_uid, "covid")])

    manifest = ingest_site(dicom_root, tmp_path / "site", labels_csv=labels, pipeline=SMALL, workers=1)

    [study] = manifest.studies
    assert study.series["SeriesInstanceUID"] == thick.series_uid and len(study.series["paths"]) == 10
    report = json.loads((tmp_path / "site" / REPORT_NAME).read_text())
    by_reason = {r["reason"]: r for r in report["rejected"]}
    assert set(by_reason) == {"truncated_pixel_data", "additional_series"}
    assert by_reason["truncated_pixel_data"]["path"] == "thin/IM0004.dcm"
    assert "trying the study's next series (10 slices)" in by_reason["truncated_pixel_data"]["message"]
    # the study's remaining series is listed against the series actually used, not the one that failed
    assert by_reason["additional_series"]["path"] == "third"
    assert "(10 slices)" in by_reason["additional_series"]["message"]
    assert [a["slices"] for a in report["accepted"]] == [10]
    # training reads what ingest cached for the fallback series
    cached = sorted(p for p in cache_dir_for(tmp_path / "site", SMALL).rglob("*") if p.is_file())
    dataset = make_dataset(
        [s.item() for s in load_manifest(tmp_path / "site", SMALL).studies], SMALL, tmp_path / "site", augment=False
    )
    assert tuple(dataset[0]["image"].shape) == (1, *SMALL.input_size)
    assert cached and sorted(p for p in cache_dir_for(tmp_path / "site", SMALL).rglob("*") if p.is_file()) == cached


def test_a_study_whose_every_series_fails_is_refused_once_per_series(make_series, labels_writer, dicom_root, tmp_path):
    a = make_series("a", patient=_patient(0), seed=0, n_slices=12)
    b = make_series("b", patient=_patient(0), seed=1, n_slices=10, study_uid=a.study_uid)
    for series in (a, b):
        series.paths[2].write_bytes(series.paths[2].read_bytes()[:-100])
    labels = labels_writer(tmp_path / "labels.csv", [_label_row(a.study_uid, "covid")])

    manifest = ingest_site(dicom_root, tmp_path / "site", labels_csv=labels, pipeline=SMALL, workers=1)

    assert manifest.studies == ()
    report = json.loads((tmp_path / "site" / REPORT_NAME).read_text())
    assert sorted(r["path"] for r in report["rejected"]) == ["a/IM0003.dcm", "b/IM0003.dcm"]
    assert {r["reason"] for r in report["rejected"]} == {"truncated_pixel_data"}
    assert report["counts"]["accepted"] == 0
