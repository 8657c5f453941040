"""One prediction through every place a clinician reads it: the same finding, percentages and disclaimer.

The HTML report, the review page (served for real over HTTP), the DICOM SR (TEXT items) and the secondary-capture
heat maps (ImageComments) all take their words from :mod:`inference.wording`; this checks that what they show
agrees, and covers the wording rules themselves (rounding edges, uncertain findings, unknown classes).
"""

from __future__ import annotations

import html
import json
import re
import shutil
import threading
import urllib.request
from pathlib import Path

import highdicom as hd
import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import numpy as np  # noqa: E402
import pydicom  # noqa: E402
import pytest  # noqa: E402
from highdicom.sr.utils import find_content_items  # noqa: E402

from inference.dicom_export import (  # noqa: E402
    CONFIDENCE_CONCEPT,
    DISCLAIMER_CONCEPT,
    FINDING_TEXT_CONCEPT,
    UNUSUAL_INPUT_CONCEPT,
    write_dicom_results,
)
from inference.report import render_report  # noqa: E402
from inference.review import make_server  # noqa: E402
from inference.wording import (  # noqa: E402
    DISCLAIMER,
    calibration_sentence,
    class_phrase,
    class_title,
    confidence_note,
    finding_sentence,
    is_low_confidence,
    percent,
    registry_words,
    risk_sentence,
    unusual_input_note,
)
from synthetic.dicom_writer import PatientIdentity, write_ct_series  # noqa: E402

STUDY_UID = "1.2.826.0.1.3680043.8.498.88001"
SERIES_UID = "1.2.826.0.1.3680043.8.498.88001.2"
# 0.9934 is where the report said "99%" and the review page ">99%"; 0.45 where one said "Uncertain" and the other
# "Findings suggest".
CASES = {
    "confident": ({"covid": 0.9934, "other_pneumonia": 0.0041, "normal": 0.0025}, "covid"),
    "uncertain": ({"covid": 0.45, "other_pneumonia": 0.35, "normal": 0.20}, "covid"),
    # above "uncertain" but close to the decision between two findings: flagged as low confidence
    "close": ({"covid": 0.57, "other_pneumonia": 0.40, "normal": 0.03}, "covid"),
    # confident, but the input lies far from the training studies' image features (models.ood): flagged
    "unusual": ({"covid": 0.9934, "other_pneumonia": 0.0041, "normal": 0.0025}, "covid"),
}
#: The out-of-distribution record of the "unusual" case (prediction.json ``out_of_distribution``).
UNUSUAL = {"distance": 41.3, "threshold": 3.2, "quantile": 0.99, "flagged": True}


def _text(markup: str) -> str:
    """Visible text of an HTML page, whitespace collapsed."""
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", markup)))


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    hu = np.random.default_rng(1).uniform(-1000.0, 400.0, (4, 16, 16))
    return write_ct_series(
        tmp_path_factory.mktemp("ct"),
        hu,
        pixel_spacing_mm=(0.8, 0.8),
        slice_spacing_mm=2.5,
        study_instance_uid=STUDY_UID,
        series_instance_uid=SERIES_UID,
        uid_entropy=["wording-test"],
        study_date="20240314",
        accession_number="ACCW1",
        patient=PatientIdentity(
            PatientName="Wordy^Test", PatientID="PIDW1", PatientBirthDate="19500101", PatientSex="F", PatientAge="074Y"
        ),
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_renderer_states_the_same_finding(case: str, series: list[Path], tmp_path: Path) -> None:
    probabilities, diagnosis = CASES[case]
    overlay = tmp_path / "overlay-slice0001.png"
    mpimg.imsave(overlay, np.random.default_rng(2).integers(0, 256, (20, 24, 3), dtype=np.uint8))
    result = {
        "study_key": f"study-{case}",
        "StudyInstanceUID": STUDY_UID,
        "SeriesInstanceUID": SERIES_UID,
        "series": {"paths": [str(p) for p in series], "n_slices": len(series)},
        "probabilities": probabilities,
        "diagnosis": diagnosis,
        "risk_score": 0.4,
        "risk_group": "high",
        "risk_quantiles": [-0.2, 0.3],
        "model": {
            "name": "densenet121",
            "fedct_version": "0.1.0",
            "created_utc": "2026-01-01T00:00:00Z",
            "round_of_weights": 3,
        },
        "overlays": [str(overlay)],
        "key_slices": [1],
        "out_of_distribution": UNUSUAL if case == "unusual" else {**UNUSUAL, "flagged": False},
    }
    finding = finding_sentence(probabilities, diagnosis)
    note = confidence_note(probabilities)
    assert bool(note) == (case in ("uncertain", "close"))
    unusual = unusual_input_note(result["out_of_distribution"])
    assert bool(unusual) == (case == "unusual")
    shown_percents = [percent(p) for p in probabilities.values()]

    # 1. The HTML report.
    report_text = _text(render_report(result))
    assert finding in report_text and note in report_text and unusual in report_text
    assert ("Unusual input" in report_text) == (case == "unusual")
    assert DISCLAIMER in report_text
    assert all(f in report_text for f in shown_percents)

    # 2. The review page, served over HTTP from a results folder as `fedct predict` writes it.
    results = tmp_path / "results"
    study_dir = results / result["study_key"]
    study_dir.mkdir(parents=True)
    shutil.copy(overlay, study_dir / overlay.name)
    (study_dir / "report.html").write_text(render_report(result), encoding="utf-8")
    prediction = {k: v for k, v in result.items() if k not in ("series", "overlays")}
    prediction["overlays"] = [overlay.name]
    (study_dir / "prediction.json").write_text(json.dumps(prediction), encoding="utf-8")
    (results / "summary.json").write_text(json.dumps({"results": [prediction], "refused": []}), encoding="utf-8")
    server = make_server(results, port=0, db_path=tmp_path / "feedback.sqlite")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        for path in ("/", f"/study/{result['study_key']}"):
            with urllib.request.urlopen(base + path, timeout=10) as response:
                page_text = _text(response.read().decode("utf-8"))
            assert finding in page_text, path
            assert ("Unusual input" in page_text) == (case == "unusual"), path
            assert DISCLAIMER in page_text, path
        assert unusual in page_text  # the study page says it in full
        assert all(f in page_text for f in shown_percents)  # the study page lists every class
        assert all(class_title(name) in page_text for name in probabilities)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)

    # 3. The DICOM SR and 4. the secondary captures.
    exported = write_dicom_results(result, tmp_path / "dicom")
    sr = hd.sr.srread(exported[0])
    texts = {
        item.value
        for item in find_content_items(sr, value_type=hd.sr.ValueTypeValues.TEXT, recursive=True)
        if item.name in (FINDING_TEXT_CONCEPT, DISCLAIMER_CONCEPT, CONFIDENCE_CONCEPT, UNUSUAL_INPUT_CONCEPT)
    }
    assert texts == {finding, DISCLAIMER} | ({note} if note else set()) | ({unusual} if unusual else set())
    numbers = find_content_items(sr, value_type=hd.sr.ValueTypeValues.NUM, recursive=True)
    sr_percent = {
        float(item.MeasuredValueSequence[0].NumericValue)
        for item in numbers
        if item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "%"
    }
    assert sorted(sr_percent) == pytest.approx(sorted(100.0 * p for p in probabilities.values()), abs=1e-3)
    scs = [pydicom.dcmread(p) for p in exported[1:]]
    assert scs
    for sc in scs:
        assert finding in sc.ImageComments and DISCLAIMER in sc.ImageComments and note in sc.ImageComments
        assert unusual in sc.ImageComments and ("Unusual input" in sc.ImageComments) == (case == "unusual")


def test_percent_rounding_is_one_rule() -> None:
    assert [percent(p) for p in (0.0, 0.004, 0.005, 0.125, 0.5, 0.9934, 0.9949, 0.995, 1.0)] == [
        "<1%",
        "<1%",
        "1%",
        "13%",
        "50%",
        "99%",
        "99%",
        ">99%",
        ">99%",
    ]
    assert [percent(p) for p in (float("nan"), -0.1, 1.5, None)] == ["n/a"] * 4


def test_finding_sentence_confident_uncertain_and_unknown_class() -> None:
    assert finding_sentence({"covid": 0.82, "normal": 0.18}, "covid") == (
        "Findings suggest a COVID-19-like pattern (probability 82%)."
    )
    assert finding_sentence({"covid": 0.45, "normal": 0.55}, "covid").startswith("Uncertain result:")
    assert finding_sentence({"normal": 0.7, "covid": 0.3}) == (  # no diagnosis given: the most likely class
        "Findings suggest no pneumonia pattern (normal lungs) (probability 70%)."
    )
    assert finding_sentence({}) == "No finding recorded."
    assert class_phrase("fungal_pneumonia") == "fungal pneumonia"
    assert class_title("fungal_pneumonia") == "Fungal pneumonia"
    assert class_phrase("COVID-19") == class_phrase("covid")


def test_risk_sentence_with_and_without_reference() -> None:
    assert "highest third" in risk_sentence("high", 0.4, [-0.2, 0.3])
    assert "score +0.40" in risk_sentence("high", 0.4, [-0.2, 0.3])
    assert "no risk group" in risk_sentence("high", 0.4, None)
    assert "n/a" in risk_sentence("unavailable", float("nan"), None)


def test_disclaimer_encodes_in_latin1_dicom_text() -> None:
    DISCLAIMER.encode("ascii")  # SR/SC text attributes follow the source's character set (often ISO_IR 100)


def test_low_confidence_is_near_the_decision_or_below_sixty_percent() -> None:
    assert not is_low_confidence({"covid": 0.82, "normal": 0.18})
    assert is_low_confidence({"covid": 0.58, "normal": 0.30, "other_pneumonia": 0.12})  # below 60 %
    assert not is_low_confidence({"covid": 0.61, "normal": 0.39})  # 61 %, 22 points ahead
    assert is_low_confidence({"covid": 0.65, "normal": 0.46})  # the margin rule alone (not a distribution)
    assert not is_low_confidence({"covid": 0.70, "normal": 0.30})
    assert is_low_confidence({}) and is_low_confidence({"covid": float("nan")})
    note = confidence_note({"covid": 0.55, "normal": 0.40, "other_pneumonia": 0.05})
    assert note.startswith("Low confidence:") and "55%" in note and "40%" in note and "normal lungs" in note
    note.encode("ascii")  # goes into DICOM text
    assert confidence_note({"covid": 0.9, "normal": 0.1}) == ""


def test_calibration_sentence_says_whether_the_probabilities_are_calibrated() -> None:
    assert "T = 1.80" in calibration_sentence(1.8) and "calibrated on the training sites" in calibration_sentence(1.8)
    assert calibration_sentence(1.0, False).startswith("not calibrated")
    assert calibration_sentence(None).startswith("not calibrated")


def test_registry_words_name_the_version_and_hash_or_nothing() -> None:
    model = {"name": "smallcnn", "fedct_version": "0.1.0", "registry_version": "v0003", "content_sha256": "ab" * 32}
    assert registry_words(model) == "registry version v0003 (SHA-256 abababababab)"
    assert (
        registry_words({"name": "smallcnn"}) == ""
        and registry_words({"registry_version": "v0001"}) == "registry version v0001"
    )
    assert registry_words(model).isascii()


def test_profile_wording_is_decision_support_and_names_missing_values():
    from inference.wording import (
        profile_contribution_phrase,
        profile_contributions_sentence,
        profile_intro,
        profile_missing_sentence,
        profile_value_text,
    )

    profile = {
        "variables": [
            {
                "name": "crp",
                "label": "CRP",
                "unit": "mg/L",
                "value": 120.0,
                "missing": False,
                "risk_contribution": 0.42,
            },
            {"name": "spo2", "label": "SpO2", "unit": "%", "value": 97.0, "missing": False, "risk_contribution": -0.2},
            {"name": "il6", "label": "IL-6", "unit": "pg/mL", "value": None, "missing": True},
        ],
        "top_risk": ["crp", "spo2"],
    }
    sentence = profile_contributions_sentence(profile)
    assert "CRP (120 mg/L: raised the risk score by 0.42)" in sentence and "SpO2 (97 %: lowered" in sentence
    assert "full clinical picture" in sentence
    assert (
        profile_missing_sentence(profile)
        == "Not available for this study (1), treated as missing and not estimated: IL-6."
    )
    assert profile_missing_sentence({"variables": []}) == ""
    assert "does not replace" in profile_intro(
        "the site's profile export"
    ) and "treated every one as missing" in profile_intro("no profile export given")
    assert profile_value_text(None, "mg/L") == "not available" and profile_value_text("yes", None) == "yes"
    assert profile_value_text(1.5, "1") == "1.5" and profile_value_text(25000.0, "ng/mL") == "25000 ng/mL"
    assert profile_contribution_phrase(0.001) == "no visible effect on the risk score"
    assert profile_contribution_phrase(None) == "" and profile_contribution_phrase(float("nan")) == ""
    assert profile_contributions_sentence({"variables": [], "top_risk": []}).startswith(
        "No clinical or laboratory value"
    )


def test_unusual_input_is_said_only_for_a_flagged_study() -> None:
    from inference.wording import is_unusual_input

    flagged = {"distance": 41.3, "threshold": 3.2, "quantile": 0.99, "flagged": True}
    note = unusual_input_note(flagged)
    assert note.startswith("Unusual input: this study looks unlike the studies the model was trained on")
    assert "41.3" in note and "3.2" in note and "about 1%" in note and "may not apply" in note
    note.encode("ascii")  # goes into DICOM text attributes
    assert is_unusual_input(flagged) and not is_unusual_input({**flagged, "flagged": False})
    assert unusual_input_note({**flagged, "flagged": False}) == "" and unusual_input_note(None) == ""
    assert unusual_input_note({"flagged": True}).startswith("Unusual input")  # figures missing: the words remain
