"""fl_client/campaign.py: a site that adds studies re-ingests only the new series and counts them against its previous
campaign; opted-in clinician feedback labels its training studies (real DICOM, a real review-page database)."""

from pathlib import Path

import pytest

from fedct.protocol import FEEDBACK_CONFLICTS, FEEDBACK_LABELS, NEW_STUDIES, RoundSettings
from fl_client.campaign import CAMPAIGNS_NAME, campaign_counts, new_studies, site_manifest
from fl_client.config import SiteConfig
from inference.review_store import FeedbackStore
from models.factory import ModelConfig
from preprocessing.cache import cache_dir_for
from preprocessing.labels import DIAGNOSES, FeedbackSetting
from preprocessing.split import SplitConfig
from preprocessing.transforms import PipelineConfig
from synthetic.dicom_writer import PatientIdentity

SMALL = PipelineConfig(input_size=(16, 16, 16), target_spacing_mm=(4.0, 4.0, 4.0))
#: Everything in the training split: every study can take a feedback label.
ALL_TRAIN = SplitConfig(val_fraction=0.0, test_fraction=0.0)


def settings() -> RoundSettings:
    return RoundSettings(
        server_round=1,
        local_epochs=1,
        learning_rate=0.001,
        batch_size=2,
        seed=0,
        model=ModelConfig(name="smallcnn"),
        pipeline=SMALL,
        split=ALL_TRAIN,
    )


def patient(i: int) -> PatientIdentity:
    return PatientIdentity(
        PatientName=f"Qzvorak{i}^Ylvenne",
        PatientID=f"PIDQ7X93K{i}",
        PatientBirthDate="19370410",
        PatientSex="F",
        PatientAge="087Y",
    )


def label_row(uid: str, diagnosis: str) -> dict[str, str]:
    return {"StudyInstanceUID": uid, "diagnosis": diagnosis, "severe": "", "time_days": "", "age": "", "sex": ""}


@pytest.fixture
def site(make_series, labels_writer, dicom_root, tmp_path):
    """Three labelled studies (covid, normal, and one without a diagnosis) of three patients."""
    series = [make_series(f"s{i}", patient=patient(i), seed=i) for i in range(3)]
    rows = [label_row(series[0].study_uid, "covid"), label_row(series[1].study_uid, "normal")]
    rows.append(label_row(series[2].study_uid, ""))
    labels = labels_writer(tmp_path / "labels.csv", rows)
    config = SiteConfig(site_name="site-a", dicom_dir=dicom_root, site_dir=tmp_path / "work", labels_csv=labels)
    return config, series, rows


def cached(site_dir: Path) -> dict[str, int]:
    """The preprocessing cache's files and their modification times."""
    return {p.name: p.stat().st_mtime_ns for p in cache_dir_for(site_dir, SMALL).rglob("*.npy")}


def test_an_added_study_is_the_only_one_read_again_and_counts_as_new(site, make_series, labels_writer, tmp_path):
    config, series, rows = site
    first, _ = site_manifest(config, settings())
    before = cached(config.site_dir)
    assert len(first.studies) == 3 and len(before) == 3
    assert new_studies(config.site_dir, "run-1", [s.id for s in first.studies]) == 3  # the site's first campaign
    added = make_series("s3", patient=patient(3), seed=3)
    labels_writer(config.labels_csv, [*rows, label_row(added.study_uid, "other_pneumonia")])

    again, _ = site_manifest(config, settings())
    after = cached(config.site_dir)
    assert len(again.studies) == 4
    # the three cached series were not preprocessed again (same files, untouched); one new cache entry
    assert {k: v for k, v in after.items() if k in before} == before and len(after) == 4
    counts = campaign_counts(config, settings(), "run-2")
    assert counts == {NEW_STUDIES: 1, FEEDBACK_LABELS: 0, FEEDBACK_CONFLICTS: 0}
    assert campaign_counts(config, settings(), "run-2")[NEW_STUDIES] == 1  # every round of the run: the same count
    assert (config.site_dir / CAMPAIGNS_NAME).is_file()


def test_a_corrupt_campaign_record_starts_over(tmp_path):
    (tmp_path / CAMPAIGNS_NAME).write_text("not json")
    assert new_studies(tmp_path, "r1", ["a", "b"]) == 2
    assert new_studies(tmp_path, "r2", ["a", "b", "c"]) == 1
    assert new_studies(tmp_path, "r3", ["b", "c"]) == 0


@pytest.mark.parametrize(("rule", "used"), [("labels", 1), ("feedback", 2)])
def test_feedback_labels_the_training_studies_of_a_site_that_opted_in(site, tmp_path, rule, used):
    config, series, _ = site
    store = FeedbackStore(tmp_path / "feedback.sqlite")
    # study 0 (covid in labels.csv): the reader disagrees, corrects to normal -> a conflict
    store.add("k0", "disagree", "", corrected_diagnosis="normal", model_finding="covid", study_uid=series[0].study_uid)
    # study 1 (normal): agrees with a model finding of normal -> the same label, nothing to do
    store.add("k1", "agree", "", model_finding="normal", study_uid=series[1].study_uid)
    # study 2 (no diagnosis): first agreed with covid, then disagreed without a correction: the latest gives none...
    store.add("k2", "agree", "", model_finding="covid", study_uid=series[2].study_uid)
    store.add("k2", "disagree", "not sure", model_finding="covid", study_uid=series[2].study_uid)
    off, _ = site_manifest(config, settings())
    opted = SiteConfig(**{**config.__dict__, "feedback": FeedbackSetting(db=store.path, conflict=rule)})
    manifest, counts = site_manifest(opted, settings())
    by_uid = {s.series["StudyInstanceUID"]: s.diagnosis for s in manifest.studies}
    assert by_uid[series[2].study_uid] is None and counts.conflicts == 1 and counts.used == used - 1
    assert by_uid[series[0].study_uid] == DIAGNOSES.index("normal" if rule == "feedback" else "covid")
    # ... until a reader corrects it: then it is labelled from feedback
    store.add(
        "k2",
        "disagree",
        "",
        corrected_diagnosis="other_pneumonia",
        model_finding="covid",
        study_uid=series[2].study_uid,
    )
    manifest, counts = site_manifest(opted, settings())
    assert {s.series["StudyInstanceUID"]: s.diagnosis for s in manifest.studies}[series[2].study_uid] == 1
    assert counts.used == used and counts.conflicts == 1
    # without the opt-in nothing changes
    assert {s.series["StudyInstanceUID"]: s.diagnosis for s in off.studies}[series[0].study_uid] == 0


def test_the_opt_in_is_read_from_the_site_settings(tmp_path):
    node = {"dicom-dir": str(tmp_path), "site-dir": str(tmp_path / "w"), "site-name": "a"}
    assert SiteConfig.from_context(node, {}).feedback is None
    on = SiteConfig.from_context({**node, "feedback-labels": "yes"}, {}).feedback
    assert on == FeedbackSetting(db=tmp_path / "w" / "feedback.sqlite", conflict="labels")
    custom = {**node, "feedback-labels": "true", "feedback-db": "/x/f.sqlite", "feedback-conflict": "feedback"}
    assert SiteConfig.from_context(custom, {}).feedback == FeedbackSetting(db=Path("/x/f.sqlite"), conflict="feedback")
    with pytest.raises(ValueError, match="must be yes or no"):
        SiteConfig.from_context({**node, "feedback-labels": "maybe"}, {})
    with pytest.raises(ValueError, match="conflict rule 'csv'"):
        SiteConfig.from_context({**node, "feedback-labels": "yes", "feedback-conflict": "csv"}, {})
