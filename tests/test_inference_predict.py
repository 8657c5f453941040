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
from models.bundle import BundleError, bundle_pipeline, load_bundle, write_bundle
from models.factory import ModelConfig, build_model
from preprocessing.cache import make_dataset
from preprocessing.deid import KEY_FILE_NAME, Pseudonymizer
from preprocessing.discover import discover
from preprocessing.transforms import PipelineConfig
from preprocessing.validate import validate_series
from preprocessing.volume import series_to_dict
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
    write_bundle(folder, state if state is not None else build_model(cfg).state_dict(), model=cfg, pipeline=pipeline,
                 provenance={"round_of_weights": 2, "rounds_planned": 3, "sites": ["site-0", "site-1"]})  # fmt: skip
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
        assert stored["model"] == {"name": "smallcnn", "fedct_version": stored["model"]["fedct_version"],
                                   "created_utc": stored["model"]["created_utc"], "round_of_weights": 2,
                                   "temperature": 1.0, "calibrated": False}  # fmt: skip
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", stored["created_utc"])
        assert (folder / "report.html").is_file()
        assert 1 <= len(stored["overlays"]) <= 3 and len(stored["key_slices"]) == len(stored["overlays"])
        n_slices = len(stored["series"]["paths"])
        assert all(0 <= k < n_slices for k in stored["key_slices"])
        assert len(set(stored["key_slices"])) == len(stored["key_slices"])
        for name in stored["overlays"]:
            assert (folder / name).is_file() and (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert stored["explanation"]["method"] == "Grad-CAM++"
        assert stored["explanation"]["target_layer"] == "backbone.features.14"


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
    assert len(first.series["paths"]) == 16


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
    from models.bundle import set_calibration
    from inference.predict import model_info, predict_study

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
    assert [risk_group(x, q) for x in (-2.0, -0.5, 0.0, 0.7, 3.0)] == ["low", "intermediate", "intermediate", "high", "high"]
    assert risk_group(1.0, None) == "unavailable"
    assert risk_quantiles({}) is None
    assert risk_quantiles({"risk_reference": {"quantiles": [0.1, 0.2]}}) == (0.1, 0.2)
    for bad in ({"quantiles": [0.2, 0.1]}, {"quantiles": [0.1]}, {"quantiles": "x"}, {"quantiles": [0.1, None]}, []):
        with pytest.raises(ValueError, match="bundle/model.json: risk_reference.quantiles"):
            risk_quantiles({"risk_reference": bad}, source="bundle/model.json")


def test_no_reference_gives_unavailable_and_keyed_study_folders(tmp_path, series_writer):
    series = series_writer(tmp_path / "in" / "s1", n_slices=12, rows=24, cols=24, pixel_spacing_mm=(8.0, 8.0),
                           slice_spacing_mm=8.0)  # fmt: skip
    bundle = make_bundle(tmp_path / "bundle")
    site = tmp_path / "site"
    site.mkdir()
    with pytest.raises(FileNotFoundError, match=KEY_FILE_NAME):
        run_predict(bundle, tmp_path / "in", tmp_path / "out", device="cpu", progress=False, site_dir=site)
    key = bytes(range(32))
    (site / KEY_FILE_NAME).write_bytes(key)
    summary = run_predict(bundle, tmp_path / "in", tmp_path / "out", device="cpu", progress=False, site_dir=site)
    (result,) = summary.results
    assert result.study_key == Pseudonymizer(key)("study", series.study_uid)  # the id ingestion gives the study
    assert result.risk_group == "unavailable" and result.risk_quantiles is None
    assert json.loads((tmp_path / "out" / result.study_key / PREDICTION_NAME).read_text())["risk_group"] == "unavailable"


def test_covariates_from_dicom_header_or_unknown(tmp_path, series_writer, fake_patient, edit_dicom):
    known = series_writer(tmp_path / "in" / "known", n_slices=10, rows=24, cols=24, pixel_spacing_mm=(8.0, 8.0),
                          slice_spacing_mm=8.0)  # fmt: skip
    unknown = series_writer(tmp_path / "in" / "unknown", n_slices=10, rows=24, cols=24, pixel_spacing_mm=(8.0, 8.0),
                            slice_spacing_mm=8.0, seed=1)  # fmt: skip
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
    series_writer(tmp_path / "in" / "s1", n_slices=10, rows=24, cols=24, pixel_spacing_mm=(8.0, 8.0), slice_spacing_mm=8.0)
    bundle = make_bundle(tmp_path / "bundle")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "inference.dicom_export" else real_find_spec(name, *a))  # fmt: skip
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
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    assert "['model_dir', 'input_dir', 'out_dir', 'device', 'progress'" in out.stdout


def test_unreadable_series_falls_back_to_the_next_series_of_the_study(tmp_path, series_writer):
    big = series_writer(tmp_path / "in" / "thin", n_slices=14, rows=24, cols=24, pixel_spacing_mm=(8.0, 8.0),
                        slice_spacing_mm=8.0)  # fmt: skip
    small = series_writer(tmp_path / "in" / "thick", n_slices=10, rows=24, cols=24, pixel_spacing_mm=(8.0, 8.0),
                          slice_spacing_mm=11.2, study_uid=big.study_uid)  # fmt: skip
    damaged = big.paths[3]
    damaged.write_bytes(damaged.read_bytes()[:-200])  # pixel data cut short: found only when decoding
    summary = run_predict(make_bundle(tmp_path / "bundle"), tmp_path / "in", tmp_path / "out", device="cpu", progress=False)
    (result,) = summary.results
    assert result.SeriesInstanceUID == small.series_uid
    (refusal,) = summary.refused
    assert refusal["reason"] == "truncated_pixel_data" and refusal["path"] == "thin/" + damaged.name
    assert big.series_uid in refusal["message"]


def test_heat_map_failure_keeps_the_prediction(tmp_path, series_writer, monkeypatch, fake_patient):
    series_writer(tmp_path / "in" / "s1", n_slices=10, rows=24, cols=24, pixel_spacing_mm=(8.0, 8.0), slice_spacing_mm=8.0)
    import inference.explain

    def broken(*args, **kwargs):
        raise RuntimeError("no gradients today")

    monkeypatch.setattr(inference.explain, "explain_study", broken)
    summary = run_predict(make_bundle(tmp_path / "bundle"), tmp_path / "in", tmp_path / "out", device="cpu",
                          progress=False, dicom_export=False)  # fmt: skip
    (result,) = summary.results
    assert result.overlays == () and result.key_slices == ()
    assert summary.errors == ({"study_key": result.study_key, "stage": "explain",
                               "message": "heat map failed: RuntimeError: no gradients today"},)  # fmt: skip
    folder = tmp_path / "out" / result.study_key
    assert (folder / "report.html").is_file()
    stored = (folder / PREDICTION_NAME).read_text()
    assert json.loads(stored)["diagnosis"] == result.diagnosis
    assert fake_patient.PatientID not in stored and "PatientID" not in stored
    assert json.loads((tmp_path / "out" / SUMMARY_NAME).read_text())["errors"] == [dict(e) for e in summary.errors]
