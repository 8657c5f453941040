"""inference.predict: a real bundle on real (synthetic) DICOM, refused series, study keys, covariates, risk groups."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from federation import tiny_federation

from inference import predict as predict_module
from inference.predict import (
    PREDICTION_NAME,
    SUMMARY_NAME,
    StudyResult,
    covariates_from_header,
    prepare_input,
    risk_group,
    risk_quantiles,
    run_predict,
    study_key,
)
from models.bundle import BundleError, bundle_pipeline, load_bundle, write_bundle
from models.factory import ModelConfig, build_model
from preprocessing.cache import make_dataset
from preprocessing.deid import KEY_FILE_NAME, Pseudonymizer
from preprocessing.discover import discover
from preprocessing.transforms import PipelineConfig
from preprocessing.validate import validate_series
from preprocessing.volume import series_to_dict
from synthetic.dicom_writer import PatientIdentity

REPO = Path(__file__).resolve().parents[1]
#: Small and fast: 32^3 voxels of 8 mm.
TEST_PIPELINE = PipelineConfig(input_size=(32, 32, 32), target_spacing_mm=(8.0, 8.0, 8.0))


def make_bundle(
    folder: Path,
    *,
    covariates: bool = False,
    quantiles: Sequence[float] | None = None,
    state: dict[str, torch.Tensor] | None = None,
    pipeline: PipelineConfig = TEST_PIPELINE,
    seed: int = 0,
) -> Path:
    """A real model bundle (smallcnn); ``quantiles`` adds ``risk_reference`` to model.json."""
    torch.manual_seed(seed)
    cfg = ModelConfig(name="smallcnn", covariates=covariates)
    write_bundle(
        folder,
        state if state is not None else build_model(cfg).state_dict(),
        model=cfg,
        pipeline=pipeline,
        provenance={"round_of_weights": 2, "rounds_planned": 3, "sites": ["site-0", "site-1"]},
    )
    if quantiles is not None:
        meta = json.loads((folder / "model.json").read_text())
        meta["risk_reference"] = {"quantiles": list(quantiles)}
        (folder / "model.json").write_text(json.dumps(meta))
    return folder


def write_input(root: Path, series_writer, *, patients: int = 3) -> dict[str, object]:
    """A DICOM folder as a hospital would export it: synthetic studies plus things that must be refused.

    Returns the folder and what is in it: study UIDs of the good studies, and the planted problems.
    """
    tiny_federation(root / "fed", sites=1, patients_per_site=patients)
    dicom = root / "fed" / "site-0" / "dicom"
    with (root / "fed" / "site-0" / "labels.csv").open() as fh:
        good = [row["StudyInstanceUID"] for row in csv.DictReader(fh)]
    broken = series_writer(dicom / "zz-broken", n_slices=12)
    broken.paths[5].unlink()  # a gap in the stack: missing_slices
    series_writer(dicom / "zz-mr", n_slices=10, modality="MR")
    extra = series_writer(dicom / "zz-extra", n_slices=10, study_uid=good[0])  # a second, shorter series of study 1
    (dicom / "notes.txt").write_text("export log, not DICOM\n")
    return {"dicom": dicom, "good": good, "broken": broken, "extra": extra}


@pytest.fixture(scope="module")
def predicted(tmp_path_factory, series_writer):
    root = tmp_path_factory.mktemp("predict")
    data = write_input(root, series_writer)
    bundle = make_bundle(root / "bundle", quantiles=(-1000.0, 1000.0))
    summary = run_predict(bundle, data["dicom"], root / "out", device="cpu", progress=False)
    return summary, data, root


def test_one_folder_per_study_with_prediction_report_and_overlays(predicted):
    summary, data, root = predicted
    assert sorted(r.StudyInstanceUID for r in summary.results) == sorted(data["good"])
    for result in summary.results:
        folder = root / "out" / result.study_key
        assert re.fullmatch(r"study-[0-9a-f]{12}", result.study_key)
        assert result.study_key == study_key(result.StudyInstanceUID)
        stored = json.loads((folder / PREDICTION_NAME).read_text())
        assert stored["StudyInstanceUID"] == result.StudyInstanceUID
        assert stored["SeriesInstanceUID"] == result.SeriesInstanceUID
        assert set(stored["probabilities"]) == {"covid", "other_pneumonia", "normal"}
        assert math.isclose(sum(stored["probabilities"].values()), 1.0, rel_tol=1e-5)
        assert stored["diagnosis"] == max(stored["probabilities"], key=stored["probabilities"].get)
        assert stored["risk_group"] == "intermediate" and stored["risk_quantiles"] == [-1000.0, 1000.0]
        assert stored["model"] == {
            "name": "smallcnn",
            "fedct_version": stored["model"]["fedct_version"],
            "created_utc": stored["model"]["created_utc"],
            "round_of_weights": 2,
            "temperature": 1.0,
            "calibrated": False,
        }
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", stored["created_utc"])
        assert (folder / "report.html").is_file()
        assert 1 <= len(stored["overlays"]) <= 3 and len(stored["key_slices"]) == len(stored["overlays"])
        n_slices = len(stored["series"]["paths"])
        assert all(0 <= k < n_slices for k in stored["key_slices"])
        assert len(set(stored["key_slices"])) == len(stored["key_slices"])
        for name in stored["overlays"]:
            assert (folder / name).is_file() and (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert stored["explanation"]["method"] == "Grad-CAM"  # the default, chosen by fedct bench explain
        assert stored["explanation"]["target_layer"] == "backbone.features.10"  # 8 cells per axis at 32^3 (MIN_CELLS)


def test_refusals_carry_ingestion_reasons_and_are_in_summary(predicted):
    summary, data, root = predicted
    reasons = {r["reason"]: r for r in summary.refused}
    assert set(reasons) == {"not_dicom", "not_ct", "missing_slices", "additional_series"}
    assert reasons["not_dicom"]["path"] == "notes.txt"
    assert reasons["missing_slices"]["path"].startswith("zz-broken/")
    assert "missing" in reasons["missing_slices"]["message"]
    assert reasons["not_ct"]["path"].startswith("zz-mr/")
    assert reasons["additional_series"]["path"] == "zz-extra"
    assert reasons["additional_series"]["StudyInstanceUID"] == data["good"][0]
    stored = json.loads((root / "out" / SUMMARY_NAME).read_text())
    assert stored["refused"] == [dict(r) for r in summary.refused]
    assert {r["study_key"] for r in stored["results"]} == {r.study_key for r in summary.results}
    for entry in stored["results"]:
        assert {PREDICTION_NAME, "report.html"} <= set(entry["files"])
        assert all((root / "out" / entry["folder"] / name).is_file() for name in entry["files"])


def test_study_with_two_series_uses_the_one_with_more_slices(predicted):
    summary, data, _ = predicted
    first = next(r for r in summary.results if r.StudyInstanceUID == data["good"][0])
    assert first.SeriesInstanceUID != data["extra"].series_uid
    written = sorted((data["dicom"] / "study-0001").rglob("*.dcm"))  # the phantom's series (its length is drawn)
    assert len(first.series["paths"]) == len(written) > 10


def test_output_folder_names_carry_no_patient_data(predicted):
    summary, data, root = predicted
    names = [p.name for p in (root / "out").iterdir()]
    uids = set(data["good"]) | {r.SeriesInstanceUID for r in summary.results}
    for name in names:
        assert not any(uid in name for uid in uids)
        assert "SYNTH" not in name and "PATIENT" not in name.upper()


def test_model_input_is_exactly_what_training_saw(predicted, tmp_path):
    summary, data, root = predicted
    result = summary.results[0]
    model, meta = load_bundle(root / "bundle")
    pipeline = bundle_pipeline(meta)
    series = validate_series(discover(data["dicom"]).series[result.SeriesInstanceUID])
    prepared = prepare_input(series, pipeline)
    item = {"image": series_to_dict(series), "content": "test"}
    cached = make_dataset([item], pipeline, tmp_path / "site", augment=False)[0]["image"]
    assert torch.equal(prepared.image[0], torch.as_tensor(cached))
    model.eval()
    with torch.no_grad():
        probs = torch.softmax(model(prepared.image).logits, dim=1)[0]
        risk = float(model(prepared.image).risk[0])
    for name, p in zip(meta["class_names"], probs.tolist()):
        assert result.probabilities[name] == pytest.approx(p, abs=1e-6)
    assert result.risk_score == pytest.approx(risk, abs=1e-6)
    # The recorded HU volume and affine are read_hu_volume's layout.
    assert prepared.hu.shape == series.shape


def test_probabilities_carry_the_bundles_calibration_temperature(predicted, tmp_path):
    from inference.predict import model_info, predict_study
    from models.bundle import set_calibration

    summary, data, root = predicted
    result = summary.results[0]
    assert result.model["temperature"] == 1.0 and result.model["calibrated"] is False  # a bundle without calibration
    assert "not calibrated" in (root / "out" / result.study_key / "report.html").read_text()
    bundle = make_bundle(tmp_path / "calibrated")
    set_calibration(bundle, {"temperature": 2.5})
    model, meta = load_bundle(bundle)
    assert model_info(meta)["temperature"] == 2.5 and model_info(meta)["calibrated"] is True
    series = validate_series(discover(data["dicom"]).series[result.SeriesInstanceUID])
    prepared = prepare_input(series, bundle_pipeline(meta))
    names = meta["class_names"]
    raw, risk = predict_study(model, prepared, class_names=names, device=torch.device("cpu"))
    calibrated, risk_t = predict_study(model, prepared, class_names=names, device=torch.device("cpu"), temperature=2.5)
    with torch.no_grad():
        logits = model.eval()(prepared.image).logits[0]
    for name, p in zip(names, torch.softmax(logits / 2.5, dim=0).tolist()):
        assert calibrated[name] == pytest.approx(p, abs=1e-6)
    assert max(calibrated, key=calibrated.get) == max(raw, key=raw.get) and risk_t == risk  # same call, same risk
    assert max(calibrated.values()) <= max(raw.values())  # T > 1: less confident
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        predict_study(model, prepared, class_names=names, device=torch.device("cpu"), temperature=0.0)
    meta_path = bundle / "model.json"
    bad = json.loads(meta_path.read_text())
    bad["calibration"]["temperature"] = "hot"
    meta_path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="calibration.temperature must be a positive finite number"):
        run_predict(bundle, data["dicom"], tmp_path / "out", device="cpu", progress=False)


def test_risk_groups_from_tertiles_and_bad_reference():
    q = (-0.5, 0.7)
    assert [risk_group(x, q) for x in (-2.0, -0.5, 0.0, 0.7, 3.0)] == [
        "low",
        "intermediate",
        "intermediate",
        "high",
        "high",
    ]
    assert risk_group(1.0, None) == "unavailable"
    assert risk_quantiles({}) is None
    assert risk_quantiles({"risk_reference": {"quantiles": [0.1, 0.2]}}) == (0.1, 0.2)
    for bad in ({"quantiles": [0.2, 0.1]}, {"quantiles": [0.1]}, {"quantiles": "x"}, {"quantiles": [0.1, None]}, []):
        with pytest.raises(ValueError, match="bundle/model.json: risk_reference.quantiles"):
            risk_quantiles({"risk_reference": bad}, source="bundle/model.json")


def test_no_reference_gives_unavailable_and_keyed_study_folders(tmp_path, series_writer):
    series = series_writer(
        tmp_path / "in" / "s1", n_slices=12, rows=24, cols=24, pixel_spacing_mm=(8.0, 8.0), slice_spacing_mm=8.0
    )
    bundle = make_bundle(tmp_path / "bundle")
    site = tmp_path / "site"
    site.mkdir()
    with pytest.raises(FileNotFoundError, match=KEY_FILE_NAME):
        run_predict(bundle, tmp_path / "in", tmp_path / "out", device="cpu", progress=False, site_dir=site)
    key = bytes(range(32))
    (site / KEY_FILE_NAME).write_bytes(key)
    summary = run_predict(bundle, tmp_path / "in", tmp_path / "out", device="cpu", progress=False, site_dir=site)
    assert summary.results
    result = summary.results[0]
    assert result.study_key == Pseudonymizer(key)("study", series.study_uid)  # the id ingestion gives the study
    assert result.risk_group == "unavailable" and result.risk_quantiles is None
    assert (
        json.loads((tmp_path / "out" / result.study_key / PREDICTION_NAME).read_text())["risk_group"] == "unavailable"
    )


def test_covariates_from_dicom_header_or_unknown(tmp_path, series_writer, fake_patient, edit_dicom):
    known = series_writer(
        tmp_path / "in" / "known", n_slices=10, rows=24, cols=24, pixel_spacing_mm=(8.0, 8.0), slice_spacing_mm=8.0
    )
    unknown = series_writer(
        tmp_path / "in" / "unknown",
        n_slices=10,
        rows=24,
        cols=24,
        pixel_spacing_mm=(8.0, 8.0),
        slice_spacing_mm=8.0,
        seed=1,
    )
    for path in unknown.paths:
        edit_dicom(path, lambda ds: (delattr(ds, "PatientAge"), setattr(ds, "PatientSex", "O")))
    assert covariates_from_header(known.paths[0]) == (87.0, 0.0)  # fake patient: "087Y", "F"
    age, sex = covariates_from_header(unknown.paths[0])
    assert math.isnan(age) and math.isnan(sex)
    assert predict_module._parse_age("006M") == 0.5 and math.isnan(predict_module._parse_age("abc"))
    bundle = make_bundle(tmp_path / "bundle", covariates=True)
    summary = run_predict(bundle, tmp_path / "in", tmp_path / "out", device="cpu", progress=False)
    by_study = {r.StudyInstanceUID: r for r in summary.results}
    assert by_study[known.study_uid].covariates["age_years"] == 87.0
    assert by_study[known.study_uid].covariates["sex"] == "F"
    assert by_study[unknown.study_uid].covariates["age_years"] is None
    assert by_study[unknown.study_uid].covariates["sex"] is None


def test_works_without_dicom_export_and_checks_its_folders(tmp_path, series_writer, monkeypatch):
    series_writer(
        tmp_path / "in" / "s1", n_slices=10, rows=24, cols=24, pixel_spacing_mm=(8.0, 8.0), slice_spacing_mm=8.0
    )
    bundle = make_bundle(tmp_path / "bundle")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "inference.dicom_export" else real_find_spec(name, *a),
    )
    summary = run_predict(bundle, tmp_path / "in", tmp_path / "out", device="cpu", progress=False)
    folder = tmp_path / "out" / summary.results[0].study_key
    assert (folder / PREDICTION_NAME).is_file() and not list(folder.glob("*.dcm"))
    with pytest.raises(ValueError, match="must not be inside the DICOM input folder"):
        run_predict(bundle, tmp_path / "in", tmp_path / "in" / "out", device="cpu", progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_predict(bundle, tmp_path / "nowhere", tmp_path / "out2", device="cpu", progress=False)
    with pytest.raises(BundleError, match="model.json"):
        run_predict(tmp_path, tmp_path / "in", tmp_path / "out3", device="cpu", progress=False)


def test_dicom_results_written_when_exporter_is_installed(predicted):
    if importlib.util.find_spec("inference.dicom_export") is None:
        pytest.skip("inference.dicom_export is not installed")
    summary, _, root = predicted
    assert not summary.errors
    for result in summary.results:
        assert (root / "out" / result.study_key / "sr.dcm").is_file()


def test_study_result_is_frozen_and_json_ready(predicted):
    result: StudyResult = predicted[0].results[0]
    with pytest.raises(AttributeError):
        result.diagnosis = "normal"  # type: ignore[misc]
    data = result.to_dict(relative_to=predicted[2] / "out" / result.study_key)
    json.dumps(data, allow_nan=False)
    assert all("/" not in name for name in data["overlays"])


def test_run_predict_importable_with_python_c_from_repo_root():
    code = "from inference.predict import run_predict; import inspect; print(list(inspect.signature(run_predict).parameters))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    assert "['model_dir', 'input_dir', 'out_dir', 'device', 'progress'" in out.stdout


def test_unreadable_series_falls_back_to_the_next_series_of_the_study(tmp_path, series_writer):
    big = series_writer(
        tmp_path / "in" / "thin", n_slices=14, rows=24, cols=24, pixel_spacing_mm=(8.0, 8.0), slice_spacing_mm=8.0
    )
    small = series_writer(
        tmp_path / "in" / "thick",
        n_slices=10,
        rows=24,
        cols=24,
        pixel_spacing_mm=(8.0, 8.0),
        slice_spacing_mm=11.2,
        study_uid=big.study_uid,
    )
    damaged = big.paths[3]
    damaged.write_bytes(damaged.read_bytes()[:-200])  # pixel data cut short: found only when decoding
    summary = run_predict(
        make_bundle(tmp_path / "bundle"), tmp_path / "in", tmp_path / "out", device="cpu", progress=False
    )
    assert summary.results
    result = summary.results[0]
    assert result.SeriesInstanceUID == small.series_uid
    (refusal,) = summary.refused
    assert refusal["reason"] == "truncated_pixel_data" and refusal["path"] == "thin/" + damaged.name
    assert big.series_uid in refusal["message"]


def test_heat_map_failure_keeps_the_prediction(tmp_path, series_writer, monkeypatch, fake_patient):
    series_writer(
        tmp_path / "in" / "s1", n_slices=10, rows=24, cols=24, pixel_spacing_mm=(8.0, 8.0), slice_spacing_mm=8.0
    )
    import inference.explain

    def broken(*args, **kwargs):
        raise RuntimeError("no gradients today")

    monkeypatch.setattr(inference.explain, "explain_study", broken)
    summary = run_predict(
        make_bundle(tmp_path / "bundle"),
        tmp_path / "in",
        tmp_path / "out",
        device="cpu",
        progress=False,
        dicom_export=False,
    )
    assert summary.results
    result = summary.results[0]
    assert result.overlays == () and result.key_slices == ()
    assert summary.errors == (
        {
            "study_key": result.study_key,
            "stage": "explain",
            "message": "heat map failed: RuntimeError: no gradients today",
        },
    )
    folder = tmp_path / "out" / result.study_key
    assert (folder / "report.html").is_file()
    stored = (folder / PREDICTION_NAME).read_text()
    assert json.loads(stored)["diagnosis"] == result.diagnosis
    assert fake_patient.PatientID not in stored and "PatientID" not in stored
    assert json.loads((tmp_path / "out" / SUMMARY_NAME).read_text())["errors"] == [dict(e) for e in summary.errors]


# --- local identifiers ---------------------------------------------------------------------------------------------

#: A patient whose identifiers are found nowhere else: any of these strings in a file means it was written there.
LOCAL_PATIENT = PatientIdentity(
    PatientName="Vrexolund^Imbriga",
    PatientID="LIDK4W8Q2Z",
    PatientBirthDate="19510203",
    PatientSex="M",
    PatientAge="074Y",
)
LOCAL_ACCESSION = "ACCX7R3M9T"
LOCAL_STRINGS = ("Vrexolund", "Imbriga", LOCAL_PATIENT.PatientID, LOCAL_ACCESSION)
#: What predict writes for this site's readers, carrying the identifiers by design (the SR / SCs go back to the
#: same hospital's PACS); everything else it writes must be free of them.
SITE_LOCAL = re.compile(r"^(local_identity\.json|report\.html|sr\.dcm|sc_\d+\.dcm)$")


def _write_local_patient(folder: Path, series_writer) -> None:
    series_writer(
        folder,
        n_slices=12,
        rows=24,
        cols=24,
        pixel_spacing_mm=(8.0, 8.0),
        slice_spacing_mm=8.0,
        patient=LOCAL_PATIENT,
        accession_number=LOCAL_ACCESSION,
    )


def _found(out: Path, strings: Sequence[str], *, skip: re.Pattern | None = None) -> list[tuple[str, str]]:
    """(relative path, string) for every string in a file's bytes or in its path under ``out``."""
    hits = []
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        hits += [(rel, s) for s in strings if s.lower() in rel.lower()]
        if path.is_file() and not (skip is not None and skip.match(path.name)):
            data = path.read_bytes()
            hits += [(rel, s) for s in strings if s.encode() in data]
    return hits


def _review_page(out: Path, key: str) -> str:
    from inference.review_pages import render_list, render_study
    from inference.review_store import FeedbackStore, find_study

    store = FeedbackStore(out.parent / "feedback.sqlite")
    study = find_study(out, key)
    assert study is not None
    return (render_study(study, store, "token", "") + render_list(out, store, "token", "")).decode("utf-8")


def test_local_identifiers_only_in_site_local_files_and_none_in_a_research_copy(tmp_path, series_writer, capfd):
    import pydicom

    from inference.local_identity import LOCAL_IDENTITY_NAME, LocalIdentity, load_local_identity
    from inference.wording import IDENTIFIERS_HIDDEN

    _write_local_patient(tmp_path / "in" / "s1", series_writer)
    bundle = make_bundle(tmp_path / "bundle", quantiles=(-1.0, 1.0))
    out = tmp_path / "out"
    summary = run_predict(bundle, tmp_path / "in", out, device="cpu", progress=True)
    assert summary.results
    result = summary.results[0]
    folder = out / result.study_key
    assert not summary.errors
    # Shown where the reader at the site looks: the report, the review page (from local_identity.json), the SR / SCs.
    assert load_local_identity(folder) == LocalIdentity(
        LOCAL_ACCESSION, LOCAL_PATIENT.PatientName, LOCAL_PATIENT.PatientID
    )
    report = (folder / "report.html").read_text(encoding="utf-8")
    review = _review_page(out, result.study_key)
    for text in (report, review):
        assert LOCAL_ACCESSION in text and "Vrexolund, Imbriga" in text and LOCAL_PATIENT.PatientID in text
        assert IDENTIFIERS_HIDDEN not in text and LOCAL_PATIENT.PatientBirthDate not in text
    dicom = sorted(folder.glob("*.dcm"))
    assert "sr.dcm" in [p.name for p in dicom] and len(dicom) >= 2
    for path in dicom:
        ds = pydicom.dcmread(path)
        assert (ds.AccessionNumber, str(ds.PatientName), ds.PatientID) == (
            LOCAL_ACCESSION,
            LOCAL_PATIENT.PatientName,
            LOCAL_PATIENT.PatientID,
        )
    # ... and nowhere else: prediction.json, summary.json, overlays, folder and file names, what was printed.
    shared = {p.name for p in folder.iterdir() if not SITE_LOCAL.match(p.name)}
    assert {LOCAL_IDENTITY_NAME, "report.html", "sr.dcm"} <= {p.name for p in folder.iterdir()} - shared
    assert PREDICTION_NAME in shared and any(name.endswith(".png") for name in shared)  # the grep below has work to do
    assert _found(out, LOCAL_STRINGS, skip=SITE_LOCAL) == []
    stored = json.loads((folder / PREDICTION_NAME).read_text())
    assert stored["local_identifiers"] == "site-local" and "AccessionNumber" not in stored["series"]
    assert json.loads((out / SUMMARY_NAME).read_text())["local_identifiers"] == "site-local"
    printed = capfd.readouterr()
    assert "studies" in printed.err  # the progress bar ran
    assert not [s for s in LOCAL_STRINGS if s in printed.out + printed.err]
    assert all(s not in repr(load_local_identity(folder)) for s in LOCAL_STRINGS)

    # A research copy, written over the same folder: the identifiers are nowhere at all, the SR included.
    summary = run_predict(bundle, tmp_path / "in", out, device="cpu", progress=True, local_identifiers=False)
    (hidden,) = summary.results
    assert hidden.study_key == result.study_key and hidden.local_identifiers == "hidden" and not summary.errors
    assert not (folder / LOCAL_IDENTITY_NAME).exists() and (folder / "sr.dcm").is_file()
    assert _found(out, (*LOCAL_STRINGS, LOCAL_PATIENT.PatientBirthDate)) == []
    for text in ((folder / "report.html").read_text(encoding="utf-8"), _review_page(out, result.study_key)):
        assert IDENTIFIERS_HIDDEN in text
    sr = pydicom.dcmread(folder / "sr.dcm")
    assert (sr.AccessionNumber, sr.PatientName, sr.PatientID, sr.PatientBirthDate) == ("", "", "", "")
    assert sr.StudyInstanceUID == result.StudyInstanceUID and sr.PatientSex == "M"
    assert json.loads((folder / PREDICTION_NAME).read_text())["local_identifiers"] == "hidden"
    assert json.loads((out / SUMMARY_NAME).read_text())["local_identifiers"] == "hidden"
    printed = capfd.readouterr()
    assert not [s for s in LOCAL_STRINGS if s in printed.out + printed.err]


def test_local_identity_reads_three_attributes_and_the_setting(tmp_path, series_writer):
    from inference.local_identity import LocalIdentity, identifiers_setting, read_local_identity

    _write_local_patient(tmp_path / "s", series_writer)
    identity = read_local_identity(sorted((tmp_path / "s").glob("*.dcm"))[0])
    assert identity == LocalIdentity(LOCAL_ACCESSION, LOCAL_PATIENT.PatientName, LOCAL_PATIENT.PatientID)
    assert identity.display_name == "Vrexolund, Imbriga" and "LIDK" not in repr(identity)
    assert LocalIdentity(PatientName="DOE^JANE^M^DR^JR").display_name == "DOE, DR JANE M JR"
    assert LocalIdentity().rows() == [
        ("Accession number", "not recorded"),
        ("Patient name", "not recorded"),
        ("Patient ID", "not recorded"),
    ]
    message = "bad PN 'Vrexolund^Imbriga' of LIDK4W8Q2Z (ACCX7R3M9T); Vrexolund again"
    assert identity.redact(message) == "bad PN '[identifier]' of [identifier] ([identifier]); [identifier] again"
    assert LocalIdentity(PatientName="A^B").redact("A and B") == "A and B"  # one-letter parts would redact everything
    with pytest.raises(TypeError, match="PatientID must be a string"):
        LocalIdentity(PatientID=123)  # type: ignore[arg-type]
    env = tmp_path / "site.env"
    assert identifiers_setting() is True and identifiers_setting(no_local_identifiers=True) is False
    env.write_text("FEDCT_PACS_URL=http://pacs.local/dicom-web\n")
    assert identifiers_setting(env_file=env) is True
    env.write_text("FEDCT_LOCAL_IDENTIFIERS=no\n")
    assert identifiers_setting(env_file=env) is False
    env.write_text("FEDCT_LOCAL_IDENTIFIERS=yes\n")
    assert (
        identifiers_setting(env_file=env) is True
        and identifiers_setting(no_local_identifiers=True, env_file=env) is False
    )
    env.write_text("# site\nFEDCT_LOCAL_IDENTIFIERS=maybe\n")
    with pytest.raises(ValueError, match=r"line 2: FEDCT_LOCAL_IDENTIFIERS='maybe' must be yes or no"):
        identifiers_setting(env_file=env)


def test_error_messages_in_the_summary_are_redacted(tmp_path, series_writer, monkeypatch):
    import inference.dicom_export

    _write_local_patient(tmp_path / "in" / "s1", series_writer)

    def quoting(result, out_dir, *, identifiers=True):  # as a library's validation error might read
        raise ValueError(f"invalid PatientName {LOCAL_PATIENT.PatientName!r} (ID {LOCAL_PATIENT.PatientID})")

    monkeypatch.setattr(inference.dicom_export, "write_dicom_results", quoting)
    summary = run_predict(
        make_bundle(tmp_path / "bundle"), tmp_path / "in", tmp_path / "out", device="cpu", progress=False
    )
    (error,) = summary.errors
    assert error["message"] == "DICOM export failed: ValueError: invalid PatientName '[identifier]' (ID [identifier])"
    assert _found(tmp_path / "out", LOCAL_STRINGS, skip=SITE_LOCAL) == []


def test_a_registered_champion_shows_its_version_on_every_result(tmp_path):
    """A model registry folder as --model: its champion predicts, and the version reaches prediction.json, the
    report, the review page's words, the SR and the Secondary Captures; a version whose files changed is refused."""
    import pydicom

    from inference.review_pages import model_words
    from models.registry import ModelRegistry, RegistryError

    tiny_federation(tmp_path / "fed", sites=1, patients_per_site=1)
    registry = ModelRegistry(tmp_path / "registry")
    registry.register(make_bundle(tmp_path / "b1"))
    version = registry.register(make_bundle(tmp_path / "b2", seed=1))
    registry.promote("v0001")
    registry.promote(version, override=True, reason="test: the second model")
    digest = registry.stamp(version)["content_sha256"]
    summary = run_predict(
        tmp_path / "registry", tmp_path / "fed" / "site-0" / "dicom", tmp_path / "out", device="cpu", progress=False
    )
    assert summary.results
    result = summary.results[0]
    folder = tmp_path / "out" / result.study_key
    stored = json.loads((folder / PREDICTION_NAME).read_text())
    assert stored["model"]["registry_version"] == "v0002" and stored["model"]["content_sha256"] == digest
    assert json.loads((tmp_path / "out" / SUMMARY_NAME).read_text())["model"]["registry_version"] == "v0002"
    words = f"registry version v0002 (SHA-256 {digest[:12]})"
    assert words in (folder / "report.html").read_text()
    assert words in model_words(stored)
    if importlib.util.find_spec("highdicom") is not None:
        texts: list[str] = []
        pydicom.dcmread(folder / "sr.dcm").walk(
            lambda ds, elem: texts.append(str(elem.value)) if elem.keyword == "TextValue" else None
        )
        assert "registry_version=v0002" in texts and f"content_sha256={digest}" in texts
        sc = pydicom.dcmread(next(folder.glob("sc_*.dcm")))
        assert words in sc.ImageComments
    # the weights of a registered version changed on disk: refused before anything is predicted
    state = torch.load(registry.folder(version) / "model.pt", weights_only=True)
    next(iter(state.values())).mul_(2.0)
    torch.save(state, registry.folder(version) / "model.pt")
    with pytest.raises(RegistryError, match="changed after registration"):
        run_predict(
            registry.folder(version),
            tmp_path / "fed" / "site-0" / "dicom",
            tmp_path / "out2",
            device="cpu",
            progress=False,
        )


def test_the_out_of_distribution_flag_follows_the_bundles_reference(predicted, tmp_path):
    """An older bundle (no reference) records and says nothing; with a reference prediction.json records the study's
    distance (the backbone's pooled features against the bundle's mean/variance) and the flag above the threshold.
    (In-distribution vs. external-generator studies under a federated reference: tests/test_fl_server_ood.py.)"""
    from inference.predict import ood_record
    from models.bundle import set_ood
    from models.ood import OodReference, bundle_ood

    summary, data, root = predicted
    assert all(r.out_of_distribution is None for r in summary.results)
    first = root / "out" / summary.results[0].study_key
    assert json.loads((first / PREDICTION_NAME).read_text())["out_of_distribution"] is None
    assert "Unusual input" not in (first / "report.html").read_text()
    assert all("unusual_input" not in r for r in json.loads((root / "out" / SUMMARY_NAME).read_text())["results"])

    bundle = make_bundle(tmp_path / "referenced")
    model, meta = load_bundle(bundle)
    result = summary.results[0]
    series = validate_series(discover(data["dicom"]).series[result.SeriesInstanceUID])
    prepared = prepare_input(series, bundle_pipeline(meta))
    with torch.no_grad():
        features = model.eval().backbone(prepared.image)[0].numpy()
    spread = OodReference(mean=tuple(features.tolist()), var=(1.0,) * len(features), threshold=0.5)
    assert ood_record(model, prepared, spread, device=torch.device("cpu"))["distance"] == pytest.approx(0, abs=1e-6)
    far = OodReference(mean=tuple((features + 10).tolist()), var=(1.0,) * len(features), threshold=0.5)
    record = ood_record(model, prepared, far, device=torch.device("cpu"))
    assert record["flagged"] is True and record["distance"] == pytest.approx(100 / 1.01, rel=1e-3)
    set_ood(bundle, {**far.to_dict(), "validation_studies": 10})
    assert bundle_ood(load_bundle(bundle)[1]) == far
    flagged = run_predict(bundle, data["dicom"], tmp_path / "out", device="cpu", progress=False, dicom_export=False)
    assert flagged.results and all(r.out_of_distribution["flagged"] for r in flagged.results)
    page = (tmp_path / "out" / flagged.results[0].study_key / "report.html").read_text()
    assert "Unusual input: this study looks unlike the studies the model was trained on" in page
