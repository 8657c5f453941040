"""inference.dicom_export: SR + Secondary Capture results, read back with pydicom and highdicom."""

from __future__ import annotations

import io
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import highdicom as hd
import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import numpy as np  # noqa: E402
import pydicom  # noqa: E402
import pytest  # noqa: E402
from highdicom.sr.utils import find_content_items  # noqa: E402
from pydicom.sr.codedict import codes  # noqa: E402
from pydicom.uid import SecondaryCaptureImageStorage  # noqa: E402

from inference.dicom_export import (  # noqa: E402
    CODING_SCHEME,
    DIAGNOSIS_CONCEPT,
    DISCLAIMER_CONCEPT,
    RISK_GROUP_CONCEPT,
    RISK_SCORE_CONCEPT,
    SC_SERIES_DESCRIPTION,
    SR_SERIES_DESCRIPTION,
    probability_concept,
    read_overlay_rgb,
    write_dicom_results,
)
from synthetic.dicom_writer import PatientIdentity, write_ct_series  # noqa: E402

PATIENT = PatientIdentity(
    PatientName="Xevrolt^Quinda",
    PatientID="PIDX5521QZ",
    PatientBirthDate="19480711",
    PatientSex="M",
    PatientAge="076Y",
)
STUDY_UID = "1.2.826.0.1.3680043.8.498.77001"
SERIES_UID = "1.2.826.0.1.3680043.8.498.77001.2"
N_SLICES = 6
KEY_SLICES = [2, 4]
PROBABILITIES = {"covid": 0.71234, "other_pneumonia": 0.2, "normal": 0.08766}
MODEL = {"name": "densenet121", "fedct_version": "0.1.0", "created_utc": "2024-05-01T12:00:00Z", "round_of_weights": 7}
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


@dataclass(frozen=True)
class Source:
    paths: list[Path]
    headers: list[pydicom.Dataset]
    overlays: list[Path]
    rgb: list[np.ndarray]


def _result(source: Source, **changes: Any) -> dict[str, Any]:
    result: dict[str, Any] = {
        "StudyInstanceUID": STUDY_UID,
        "SeriesInstanceUID": SERIES_UID,
        "series": {"paths": list(source.paths), "n_slices": len(source.paths)},
        "probabilities": dict(PROBABILITIES),
        "diagnosis": "covid",
        "risk_score": 1.8375,
        "risk_group": "high",
        "model": dict(MODEL),
        "overlays": list(source.overlays),
        "key_slices": list(KEY_SLICES),
    }
    result.update(changes)
    return result


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    root = tmp_path_factory.mktemp("source")
    hu = np.random.default_rng(0).uniform(-1000.0, 400.0, (N_SLICES, 16, 16))
    paths = write_ct_series(
        root / "ct",
        hu,
        pixel_spacing_mm=(0.8, 0.8),
        slice_spacing_mm=2.5,
        study_instance_uid=STUDY_UID,
        series_instance_uid=SERIES_UID,
        patient=PATIENT,
        study_date="20240314",
        accession_number="ACCQ9912",
        uid_entropy=["dicom-export-test"],
    )
    overlays, rgb = [], []
    for i, (rows, cols) in enumerate([(24, 32), (20, 28)]):
        image = np.random.default_rng(10 + i).integers(0, 256, (rows, cols, 3), dtype=np.uint8)
        path = root / f"overlay_{i}.png"
        mpimg.imsave(path, image)  # matplotlib writes RGBA PNG, alpha 255
        overlays.append(path)
        rgb.append(image)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    return Source(paths, headers, overlays, rgb)


@pytest.fixture(scope="module")
def exported(source: Source, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_dicom_results(_result(source), tmp_path_factory.mktemp("out") / "dicom")


@pytest.fixture(scope="module")
def research(source: Source, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The same result written as a research copy (``identifiers=False``)."""
    return write_dicom_results(_result(source), tmp_path_factory.mktemp("research") / "dicom", identifiers=False)


@pytest.fixture(scope="module", params=["site", "research"])
def written(request: pytest.FixtureRequest) -> list[Path]:
    """Both forms: what goes back to the site's PACS, and the research copy."""
    return request.getfixturevalue("exported" if request.param == "site" else "research")


@pytest.fixture(scope="module")
def sr(exported: list[Path]) -> hd.sr.Comprehensive3DSR:
    return hd.sr.srread(exported[0])


@pytest.fixture(scope="module")
def group(sr: hd.sr.Comprehensive3DSR) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == 1
    return groups[0]


def test_file_names(exported: list[Path]) -> None:
    assert [p.name for p in exported] == ["sr.dcm", "sc_01.dcm", "sc_02.dcm"]
    assert sorted(p.name for p in exported[0].parent.iterdir()) == ["sc_01.dcm", "sc_02.dcm", "sr.dcm"]


def test_all_objects_join_the_source_study_with_its_patient(exported: list[Path], source: Source) -> None:
    src = source.headers[0]
    for path in exported:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.StudyInstanceUID == STUDY_UID
        for keyword in (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "PatientSex",
            "StudyDate",
            "StudyTime",
            "AccessionNumber",
            "ReferringPhysicianName",
            "StudyID",
        ):
            assert ds[keyword].value == src[keyword].value, (path.name, keyword)
        assert ds.PatientName == PATIENT.PatientName and ds.AccessionNumber == "ACCQ9912"
        assert ds.Manufacturer == "fedct"
        assert ds.SeriesInstanceUID not in (SERIES_UID, STUDY_UID)
        assert ds.SOPInstanceUID not in {h.SOPInstanceUID for h in source.headers}


def test_sr_header(exported: list[Path]) -> None:
    ds = pydicom.dcmread(exported[0])
    assert ds.SOPClassUID == COMPREHENSIVE_3D_SR
    assert ds.Modality == "SR"
    assert ds.SeriesDescription == SR_SERIES_DESCRIPTION
    assert (
        ds.CompletionFlag == "COMPLETE" and ds.VerificationFlag == "UNVERIFIED" and ds.PreliminaryFlag == "PRELIMINARY"
    )
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert ds.ManufacturerModelName == MODEL["name"] and ds.SoftwareVersions == MODEL["fedct_version"]
    assert [item.CodingSchemeDesignator for item in ds.CodingSchemeIdentificationSequence] == [CODING_SCHEME]


def test_sr_probabilities(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> None:
    for name, p in PROBABILITIES.items():
        found = group.get_measurements(name=probability_concept(name))
        assert len(found) == 1, name
        assert found[0].value == pytest.approx(100.0 * p, abs=1e-9)
        assert found[0].unit == hd.sr.CodedConcept("%", "UCUM", "Percent")
    names = {m.name for m in group.get_measurements()}
    assert names == {probability_concept(n) for n in PROBABILITIES} | {RISK_SCORE_CONCEPT}


def test_sr_diagnosis_and_risk(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> None:
    (score,) = group.get_measurements(name=RISK_SCORE_CONCEPT)
    assert score.value == pytest.approx(1.8375)
    (dx,) = group.get_qualitative_evaluations(name=DIAGNOSIS_CONCEPT)
    assert dx.value == hd.sr.CodedConcept("840539006", "SCT", "COVID-19")
    (risk,) = group.get_qualitative_evaluations(name=RISK_GROUP_CONCEPT)
    assert risk.value == hd.sr.CodedConcept.from_code(codes.SCT.HighRisk)
    assert group.finding_sites[0].value == codes.SCT.Lung


def test_sr_algorithm_and_observer(
    sr: hd.sr.Comprehensive3DSR, group: hd.sr.MeasurementsAndQualitativeEvaluations
) -> None:
    # TID 4019 items directly under the measurement group (HAS CONCEPT MOD)
    items = find_content_items(
        group[0], relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD, value_type=hd.sr.ValueTypeValues.TEXT
    )
    texts = {item.ConceptNameCodeSequence[0].CodeValue: item.TextValue for item in items}
    assert texts["111001"] == "densenet121"  # Algorithm Name
    assert texts["111003"] == "0.1.0"  # Algorithm Version
    assert texts["122405"] == "fedct"  # Algorithm Manufacturer
    parameters = [item.TextValue for item in items if item.ConceptNameCodeSequence[0].CodeValue == "111002"]
    assert parameters == ["round_of_weights=7", "created_utc=2024-05-01T12:00:00Z"]
    (observer,) = sr.content.get_observer_contexts(observer_type=codes.cid270.Device)
    assert observer.observer_identifying_attributes.name == "densenet121"


def test_sr_references_the_source_series(sr: hd.sr.Comprehensive3DSR, group, source: Source) -> None:
    expected = [(STUDY_UID, SERIES_UID, h.SOPInstanceUID, h.SOPClassUID) for h in source.headers]
    assert sr.get_evidence(current_procedure_only=True) == expected
    assert "PertinentOtherEvidenceSequence" not in sr
    assert [img.referenced_sop_instance_uid for img in group.source_images] == [
        h.SOPInstanceUID for h in source.headers
    ]


def test_sr_disclaimer(sr: hd.sr.Comprehensive3DSR) -> None:
    items = find_content_items(sr, name=DISCLAIMER_CONCEPT, value_type=hd.sr.ValueTypeValues.TEXT, recursive=True)
    assert len(items) == 1
    text = items[0].TextValue.lower()
    assert "research model" in text and "decision support" in text
    assert "not for clinical use without local validation" in text


def test_sr_codes_are_well_formed(exported: list[Path]) -> None:
    """Every coded entry has value/scheme/meaning; short values fit SH; private schemes are declared."""
    ds = pydicom.dcmread(exported[0])
    declared = {item.CodingSchemeDesignator for item in ds.CodingSchemeIdentificationSequence}
    standard = {"DCM", "SCT", "LN", "UCUM", "RFC5646", "UMLS"}
    n = 0

    def walk(dataset: pydicom.Dataset) -> None:
        nonlocal n
        for elem in dataset:
            if elem.VR != "SQ":
                continue
            for item in elem.value:
                if "CodeMeaning" in item:
                    n += 1
                    assert item.get("CodeValue") or item.get("LongCodeValue") or item.get("URNCodeValue")
                    assert len(item.get("CodeValue", "")) <= 16
                    assert item.CodingSchemeDesignator in standard | declared, item.CodingSchemeDesignator
                    assert 0 < len(item.CodeMeaning) <= 64
                walk(item)

    walk(ds)
    assert n > 20


def test_sc_images(exported: list[Path], source: Source) -> None:
    sr_series = pydicom.dcmread(exported[0]).SeriesInstanceUID
    series = set()
    for number, (path, k, rgb) in enumerate(zip(exported[1:], KEY_SLICES, source.rgb, strict=True), start=1):
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == SecondaryCaptureImageStorage
        assert ds.Modality == "OT" and ds.ConversionType == "DI"
        assert ds.SeriesDescription == SC_SERIES_DESCRIPTION
        assert ds.InstanceNumber == number
        assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3 and ds.BitsAllocated == 8
        pixels = ds.pixel_array
        assert pixels.dtype == np.uint8 and pixels.shape == rgb.shape
        np.testing.assert_array_equal(pixels, rgb)
        target = source.headers[k]
        for keyword in ("ReferencedImageSequence", "SourceImageSequence"):
            (ref,) = ds[keyword].value
            assert ref.ReferencedSOPInstanceUID == target.SOPInstanceUID, keyword
            assert ref.ReferencedSOPClassUID == target.SOPClassUID
        (series_ref,) = ds.ReferencedSeriesSequence
        assert series_ref.SeriesInstanceUID == SERIES_UID
        assert series_ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == target.SOPInstanceUID
        assert ds.BurnedInAnnotation == "YES"
        assert "AI output" in ds.ImageComments and "not for clinical use" in ds.ImageComments
        assert ds.ImageType[:2] == ["DERIVED", "SECONDARY"]
        assert "PixelSpacing" not in ds and "PatientOrientation" in ds  # Type 2, empty: figure orientation unknown
        series.add(ds.SeriesInstanceUID)
    assert len(series) == 1
    assert series.pop() not in (sr_series, SERIES_UID)


def _type1(ds: pydicom.Dataset, keywords: list[str]) -> None:
    for keyword in keywords:
        assert keyword in ds and ds[keyword].value not in (None, "", []), keyword


def _type2(ds: pydicom.Dataset, keywords: list[str]) -> None:
    for keyword in keywords:
        assert keyword in ds, keyword


def test_dciodvfy_style(written: list[Path]) -> None:
    """Files are Part 10 with consistent File Meta, re-serialise strictly, and carry the IOD's Type 1/2 attributes."""
    common1 = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "Manufacturer"]
    common2 = [
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
        "StudyID",
        "AccessionNumber",
        "SeriesNumber",
        "InstanceNumber",
    ]
    for path in written:
        ds = pydicom.dcmread(path, force=False)
        assert ds.preamble is not None
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        _type1(ds, common1)
        _type2(ds, common2)
        if ds.Modality == "SR":
            _type1(
                ds,
                [
                    "ValueType",
                    "ConceptNameCodeSequence",
                    "ContinuityOfContent",
                    "CompletionFlag",
                    "VerificationFlag",
                    "ContentDate",
                    "ContentTime",
                    "ContentSequence",
                ],
            )
            _type2(ds, ["PerformedProcedureCodeSequence", "ReferencedPerformedProcedureStepSequence"])
            _type1(ds, ["CurrentRequestedProcedureEvidenceSequence"])  # 1C: SOP instances are referenced
            hd.sr.Comprehensive3DSR.from_dataset(ds)  # highdicom parses its own output
        else:
            _type1(
                ds,
                [
                    "ConversionType",
                    "Rows",
                    "Columns",
                    "SamplesPerPixel",
                    "PhotometricInterpretation",
                    "BitsAllocated",
                    "BitsStored",
                    "HighBit",
                    "PlanarConfiguration",
                    "PixelData",
                ],
            )
            _type2(ds, ["PatientOrientation"])
            assert ds.PixelRepresentation == 0
            assert len(ds.PixelData) == ds.Rows * ds.Columns * 3
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        again = pydicom.dcmread(io.BytesIO(buffer.getvalue()), force=False)
        assert again.SOPInstanceUID == ds.SOPInstanceUID


@pytest.mark.skipif(
    shutil.which("dciodvfy") is None, reason="missing system tool or test dependency: dicom3tools (dciodvfy, dcentvfy)"
)
def test_dicom3tools(exported: list[Path], research: list[Path], source: Source) -> None:
    """David Clunie's validators: no IOD errors in any file (research copies too), study/patient entities consistent
    with the source."""
    import subprocess

    for path in [*exported, *research]:
        run = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
        assert not errors, (path.name, errors)
    files = [str(p) for p in [*source.paths, *exported]]
    run = subprocess.run(["dcentvfy", *files], capture_output=True, text=True, timeout=60)
    errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
    assert not errors, errors


def _uids(paths: list[Path]) -> list[tuple[str, str]]:
    out = []
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        out.append((ds.SeriesInstanceUID, ds.SOPInstanceUID))
    return out


def test_rerun_gives_the_same_uids_new_weights_new_ones(exported: list[Path], source: Source, tmp_path: Path) -> None:
    again = write_dicom_results(_result(source), tmp_path / "again")
    assert _uids(again) == _uids(exported)
    retrained = write_dicom_results(_result(source, model={**MODEL, "round_of_weights": 8}), tmp_path / "retrained")
    assert not set(_uids(retrained)) & set(_uids(exported))
    sop_uids = [uid for _, uid in _uids(exported)]
    assert len(set(sop_uids)) == len(sop_uids)


def test_rerun_removes_stale_sc_files(source: Source, tmp_path: Path) -> None:
    out = tmp_path / "dicom"
    write_dicom_results(_result(source), out)
    (out / "notes.txt").write_text("kept")
    paths = write_dicom_results(_result(source, overlays=source.overlays[:1], key_slices=[3]), out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "sc_01.dcm", "sr.dcm"]
    assert [p.name for p in paths] == ["sr.dcm", "sc_01.dcm"]
    ds = pydicom.dcmread(out / "sc_01.dcm", stop_before_pixels=True)
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == source.headers[3].SOPInstanceUID


@dataclass(frozen=True)
class _StudyResult:  # stands in for inference.predict.StudyResult
    StudyInstanceUID: str
    SeriesInstanceUID: str
    series: dict
    probabilities: dict
    diagnosis: str
    risk_score: float
    risk_group: str
    model: dict
    overlays: list = field(default_factory=list)
    key_slices: list = field(default_factory=list)


def test_dataclass_result_without_overlays(source: Source, tmp_path: Path) -> None:
    fields = _result(
        source,
        overlays=[],
        key_slices=[],
        diagnosis="other_pneumonia",
        risk_group="low",
        probabilities={"covid": np.float32(0.25), "other_pneumonia": 0.5, "normal": 0.25},
    )
    result = replace(_StudyResult(**fields), risk_score=np.float64(-0.5))
    paths = write_dicom_results(result, tmp_path / "x")
    assert [p.name for p in paths] == ["sr.dcm"]
    (group,) = hd.sr.srread(paths[0]).content.get_image_measurement_groups()
    (dx,) = group.get_qualitative_evaluations(name=DIAGNOSIS_CONCEPT)
    assert dx.value.scheme_designator == CODING_SCHEME and dx.value.value == "OTHER-PNEUMONIA"
    (risk,) = group.get_qualitative_evaluations(name=RISK_GROUP_CONCEPT)
    assert risk.value == hd.sr.CodedConcept.from_code(codes.SCT.LowRisk)
    assert group.get_measurements(name=probability_concept("covid"))[0].value == pytest.approx(25.0)
    assert group.get_measurements(name=RISK_SCORE_CONCEPT)[0].value == pytest.approx(-0.5)


def test_missing_source_attributes_stay_empty(source: Source, tmp_path: Path) -> None:
    """Nothing is invented: a source without PatientBirthDate / AccessionNumber gives empty values."""
    copies = []
    for path in source.paths:
        ds = pydicom.dcmread(path)
        del ds.PatientBirthDate, ds.AccessionNumber
        copies.append(tmp_path / "src" / path.name)
        copies[-1].parent.mkdir(exist_ok=True)
        ds.save_as(copies[-1], enforce_file_format=True)
    paths = write_dicom_results(_result(source, series={"paths": copies}), tmp_path / "out")
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert "PatientBirthDate" in ds and not ds.PatientBirthDate
        assert "AccessionNumber" in ds and not ds.AccessionNumber
        assert ds.PatientID == PATIENT.PatientID


def test_research_copy_carries_no_patient_or_study_identification(research: list[Path], source: Source) -> None:
    """identifiers=False: no name, ID, accession number, birth date or study date in any byte; the UIDs, the
    patient's sex and the findings stay."""
    assert [p.name for p in research] == ["sr.dcm", "sc_01.dcm", "sc_02.dcm"]
    family, given = PATIENT.PatientName.split("^")
    for path in research:
        data = path.read_bytes()
        for value in (family, given, PATIENT.PatientID, PATIENT.PatientBirthDate, "ACCQ9912", "20240314"):
            assert value.encode() not in data, (path.name, value)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "AccessionNumber",
            "StudyDate",
            "StudyTime",
            "ReferringPhysicianName",
            "StudyID",
        ):
            assert keyword in ds and not ds[keyword].value, (path.name, keyword)
        assert "PatientAge" not in ds and ds.PatientSex == PATIENT.PatientSex
        assert ds.StudyInstanceUID == STUDY_UID
    sr = hd.sr.srread(research[0])
    (group,) = sr.content.get_image_measurement_groups()
    assert group.get_measurements(name=probability_concept("covid"))[0].value == pytest.approx(71.234)


def test_research_copy_has_its_own_deterministic_uids(
    exported: list[Path], research: list[Path], tmp_path: Path, source: Source
) -> None:
    again = write_dicom_results(_result(source), tmp_path / "again", identifiers=False)
    assert _uids(again) == _uids(research)
    assert not {uid for pair in _uids(research) for uid in pair} & {uid for pair in _uids(exported) for uid in pair}


def test_overlay_modes(tmp_path: Path) -> None:
    from PIL import Image

    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(grey, mode="L").save(tmp_path / "grey.png")
    np.testing.assert_array_equal(read_overlay_rgb(tmp_path / "grey.png"), np.repeat(grey[..., None], 3, axis=2))
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = [[255, 0], [255, 255]]
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    out = read_overlay_rgb(tmp_path / "rgba.png")
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert out[0, 0].tolist() == [200, 0, 0] and out[0, 1].tolist() == [0, 0, 0]  # transparent -> black
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="not a readable image"):
        read_overlay_rgb(tmp_path / "bad.png")


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"probabilities": {}}, ValueError, "probabilities is empty"),
        ({"probabilities": {"covid": 1.5, "normal": 0.0}}, ValueError, "must lie in"),
        ({"probabilities": {"covid": float("nan")}}, ValueError, "must lie in"),
        ({"diagnosis": "flu"}, ValueError, "not one of the classes"),
        ({"risk_score": float("inf")}, ValueError, "risk_score must be finite"),
        ({"risk_group": ""}, ValueError, "risk_group"),
        ({"model": {"name": "densenet121"}}, ValueError, "fedct_version"),
        ({"key_slices": [2]}, ValueError, "one key slice per overlay"),
        ({"key_slices": [2, N_SLICES]}, ValueError, "outside the source series"),
        ({"series": {"paths": []}}, ValueError, "no 'paths'"),
        ({"SeriesInstanceUID": "1.2.3.999"}, ValueError, "belongs to series"),
        ({"StudyInstanceUID": "1.2.3.998"}, ValueError, "belongs to study"),
    ],
)
def test_invalid_input(source: Source, tmp_path: Path, changes: dict, error: type, match: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        write_dicom_results(_result(source, **changes), out)
    assert not out.exists()  # nothing written on refusal


def test_missing_files(source: Source, tmp_path: Path) -> None:
    folder = tmp_path / "ct"
    shutil.copytree(source.paths[0].parent, folder)
    paths = sorted(folder.glob("*.dcm"))
    paths[1].unlink()
    with pytest.raises(FileNotFoundError, match="1 source DICOM file"):
        write_dicom_results(_result(source, series={"paths": paths}), tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="overlay"):
        write_dicom_results(_result(source, overlays=[tmp_path / "none.png", source.overlays[1]]), tmp_path / "out")
    (tmp_path / "junk.dcm").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not readable DICOM"):
        write_dicom_results(
            _result(source, series={"paths": [tmp_path / "junk.dcm"]}, overlays=[], key_slices=[]), tmp_path / "out"
        )
    assert not (tmp_path / "out").exists()
