"""labels.csv: read row by row; every problem is a LabelsError naming the file and the line."""

from __future__ import annotations

import pytest

from preprocessing.labels import DIAGNOSES, LabelsError, StudyLabel, read_labels

COLUMNS = ["StudyInstanceUID", "diagnosis", "severe", "time_days", "age", "sex"]


def _rows(*overrides: dict) -> list[dict]:
    base = [
        {
            "StudyInstanceUID": "1.2.3.1",
            "diagnosis": "covid",
            "severe": "1",
            "time_days": "12.5",
            "age": "63",
            "sex": "F",
        },
        {
            "StudyInstanceUID": "1.2.3.2",
            "diagnosis": "other_pneumonia",
            "severe": "0",
            "time_days": "",
            "age": "41.5",
            "sex": "M",
        },
        {"StudyInstanceUID": "1.2.3.3", "diagnosis": "normal", "severe": "", "time_days": "0", "age": "", "sex": ""},
        {"StudyInstanceUID": "1.2.3.4", "diagnosis": "", "severe": "", "time_days": "", "age": "", "sex": ""},
    ]
    for i, change in enumerate(overrides):
        if change:
            base[i] = {**base[i], **change}
    return base


def test_good_labels_file(tmp_path, labels_writer):
    path = labels_writer(tmp_path / "labels.csv", _rows(), COLUMNS)

    labels = read_labels(path)

    assert labels == {
        "1.2.3.1": StudyLabel(diagnosis=DIAGNOSES.index("covid"), severe=1, time_days=12.5, age=63.0, sex="F"),
        "1.2.3.2": StudyLabel(
            diagnosis=DIAGNOSES.index("other_pneumonia"), severe=0, time_days=None, age=41.5, sex="M"
        ),
        "1.2.3.3": StudyLabel(diagnosis=DIAGNOSES.index("normal"), severe=None, time_days=0.0, age=None, sex=None),
        "1.2.3.4": StudyLabel(diagnosis=None, severe=None, time_days=None, age=None, sex=None),
    }


def test_only_the_required_columns_are_needed(tmp_path, labels_writer):
    path = labels_writer(tmp_path / "labels.csv", _rows(), ["diagnosis", "StudyInstanceUID"])

    labels = read_labels(path)

    assert set(labels) == {"1.2.3.1", "1.2.3.2", "1.2.3.3", "1.2.3.4"}
    assert labels["1.2.3.2"] == StudyLabel(diagnosis=1, severe=None, time_days=None, age=None, sex=None)


def test_whitespace_around_values_is_ignored(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("StudyInstanceUID,diagnosis,age\n 1.2.3.1 , normal ,70\n")

    assert read_labels(path) == {"1.2.3.1": StudyLabel(diagnosis=2, severe=None, time_days=None, age=70.0, sex=None)}


def test_header_only_file_has_no_labels(tmp_path, labels_writer):
    assert read_labels(labels_writer(tmp_path / "labels.csv", [], COLUMNS)) == {}


@pytest.mark.parametrize(
    ("missing", "needle"),
    [
        ("StudyInstanceUID", "needs exactly one of the columns StudyInstanceUID or AccessionNumber"),
        ("diagnosis", "missing column\\(s\\) diagnosis"),
    ],
)
def test_missing_column_is_named(tmp_path, labels_writer, missing, needle):
    path = labels_writer(tmp_path / "labels.csv", _rows(), [c for c in COLUMNS if c != missing])

    with pytest.raises(LabelsError, match=f"line 1: {needle}") as info:
        read_labels(path)
    assert str(path) in str(info.value)


def test_empty_file_is_missing_columns(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("")
    with pytest.raises(LabelsError, match="line 1: needs exactly one"):
        read_labels(path)


def test_unknown_column_fails_on_line_1(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("StudyInstanceUID,diagnosis,outcome\n1.2.3,covid,dead\n")
    with pytest.raises(LabelsError, match="line 1: unknown column\\(s\\) outcome"):
        read_labels(path)


def test_accession_number_can_be_the_key(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("AccessionNumber,diagnosis\nA001,normal\nA002,covid\n")
    labels = read_labels(path)
    assert labels.key == "AccessionNumber"
    assert labels["A002"].diagnosis == DIAGNOSES.index("covid")


def test_both_key_columns_is_ambiguous(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("StudyInstanceUID,AccessionNumber,diagnosis\n1.2,A1,covid\n")
    with pytest.raises(LabelsError, match="exactly one"):
        read_labels(path)


def test_non_utf8_file_is_a_labels_error(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes("StudyInstanceUID,diagnosis,sex\n1.2,covid,\xc4\n".encode("latin-1"))
    with pytest.raises(LabelsError, match="not UTF-8"):
        read_labels(path)


def test_unknown_diagnosis_names_the_row(tmp_path, labels_writer):
    path = labels_writer(tmp_path / "labels.csv", _rows({}, {"diagnosis": "flu"}), COLUMNS)

    with pytest.raises(LabelsError, match=r"line 3: diagnosis 'flu'") as info:
        read_labels(path)
    assert str(path) in str(info.value)


def test_duplicate_study_uid_names_the_second_row(tmp_path, labels_writer):
    path = labels_writer(tmp_path / "labels.csv", _rows({}, {}, {}, {"StudyInstanceUID": "1.2.3.1"}), COLUMNS)

    with pytest.raises(LabelsError, match=r"line 5: StudyInstanceUID listed twice"):
        read_labels(path)


def test_empty_study_uid_names_the_row(tmp_path, labels_writer):
    path = labels_writer(tmp_path / "labels.csv", _rows({}, {"StudyInstanceUID": "  "}), COLUMNS)

    with pytest.raises(LabelsError, match=r"line 3: empty StudyInstanceUID"):
        read_labels(path)


@pytest.mark.parametrize(
    ("row", "change", "needle"),
    [
        (0, {"age": "sixty"}, r"line 2: age='sixty' is not a number"),
        (1, {"time_days": "3d"}, r"line 3: time_days='3d' is not a number"),
        (2, {"severe": "yes"}, r"line 4: severe='yes' is not a number"),
        (3, {"age": "nan"}, r"line 5: age='nan' is not finite"),
        (0, {"time_days": "inf"}, r"line 2: time_days='inf' is not finite"),
        (1, {"severe": "2"}, r"line 3: severe must be 0 or 1"),
        (2, {"time_days": "-1"}, r"line 4: time_days must be >= 0"),
    ],
)
def test_bad_number_names_the_row_and_column(tmp_path, labels_writer, row, change, needle):
    overrides = [{}] * 4
    overrides[row] = change
    path = labels_writer(tmp_path / "labels.csv", _rows(*overrides), COLUMNS)

    with pytest.raises(LabelsError, match=needle):
        read_labels(path)


def test_missing_file_is_a_labels_error(tmp_path):
    with pytest.raises(LabelsError, match="not found"):
        read_labels(tmp_path / "nope.csv")


def test_labels_error_is_a_value_error():
    assert issubclass(LabelsError, ValueError)


def test_utf8_file_with_byte_order_mark_is_read(tmp_path):
    # Spreadsheet programs save "CSV UTF-8" with a byte order mark before the first column name.
    path = tmp_path / "labels.csv"
    path.write_bytes("\ufeffStudyInstanceUID,diagnosis,sex\n1.2.3.1,covid,F\n1.2.3.2,normal,Ä\n".encode("utf-8"))

    labels = read_labels(path)

    assert labels["1.2.3.1"].diagnosis == DIAGNOSES.index("covid")
    assert labels["1.2.3.2"].sex == "Ä"


# --- clinician feedback as labels ---------------------------------------------------------------------------------


def _study(uid: str, split: str, diagnosis: int | None, key: str = ""):
    from preprocessing.ingest import StudyEntry

    series = {"StudyInstanceUID": uid}
    return StudyEntry(key or f"id-{uid}", "p", split, diagnosis, None, None, None, None, series, "c")


def test_feedback_labels_follow_the_latest_review_of_each_study(tmp_path):
    from inference.review_store import FeedbackStore
    from preprocessing.labels import read_feedback_labels

    assert read_feedback_labels(tmp_path / "none.sqlite") == []  # no review page yet: no labels
    store = FeedbackStore(tmp_path / "feedback.sqlite")
    store.add("a", "agree", "", model_finding="covid", study_uid="1.1", reader="r1", model_version="v0002")
    store.add("b", "disagree", "", corrected_diagnosis="normal", model_finding="covid", study_uid="1.2")
    store.add("c", "disagree", "unsure", model_finding="covid", study_uid="1.3")  # no correction: no label
    store.add("d", "agree", "", study_uid="1.4")  # no model finding recorded (an old row): no label
    store.add("b", "agree", "", model_finding="covid", study_uid="1.2")  # b's latest review: agrees with covid
    labels = {f.study_key: f for f in read_feedback_labels(store.path)}
    assert sorted(labels) == ["a", "b"]
    assert labels["a"].diagnosis == DIAGNOSES.index("covid") and labels["a"].reader == "r1"
    assert labels["a"].model_version == "v0002" and labels["b"].diagnosis == DIAGNOSES.index("covid")
    (tmp_path / "broken.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(LabelsError, match="feedback database cannot be read"):
        read_feedback_labels(tmp_path / "broken.sqlite")


def test_feedback_labels_only_training_studies_and_the_conflict_rule_decides():
    from preprocessing.labels import FeedbackLabel, merge_feedback

    def fb(key: str, uid: str, diagnosis: int) -> FeedbackLabel:
        return FeedbackLabel(key, uid, diagnosis, "disagree", "r", "2026-01-01T00:00:00Z", "v0001")

    studies = (
        _study("1", "train", None),  # unlabelled: takes the feedback label
        _study("2", "train", 0),  # labelled covid, feedback says normal: a conflict
        _study("3", "val", None),  # validation keeps labels.csv (none)
        _study("4", "train", None, key="pseudo-4"),  # feedback without a UID, matched by the study's pseudonym
        _study("5", "train", 1),  # feedback gives the same label: nothing happens
    )
    feedback = [fb("k1", "1", 2), fb("k2", "2", 2), fb("k3", "3", 1), fb("pseudo-4", "", 1), fb("k5", "5", 1)]
    kept, counts = merge_feedback(studies, feedback)
    assert [s.diagnosis for s in kept] == [2, 0, None, 1, 1] and (counts.used, counts.conflicts) == (2, 1)
    won, counts = merge_feedback(studies, feedback, conflict="feedback")
    assert [s.diagnosis for s in won] == [2, 2, None, 1, 1] and (counts.used, counts.conflicts) == (3, 1)
    assert merge_feedback(studies, []) == (studies, merge_feedback((), [])[1])
    with pytest.raises(ValueError, match="conflict rule 'csv'"):
        merge_feedback(studies, feedback, conflict="csv")
