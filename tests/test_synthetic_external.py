"""synthetic.external: an independent generator for external validation — valid DICOM, true masks, varied geometry."""

from __future__ import annotations

import ast
import csv
import inspect

import nibabel as nib
import numpy as np
import pytest

import synthetic.external as external
from preprocessing.discover import discover
from preprocessing.ingest import ingest_site
from preprocessing.pipeline import PipelineConfig
from preprocessing.validate import validate_series
from synthetic.external import EXTERNAL_DIAGNOSES, render_external, write_external_family
from synthetic.masks import LESION_MASK_DIR


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    out = tmp_path_factory.mktemp("external")
    return out, write_external_family(out, studies=6, seed=3, small=True)


def test_every_study_is_a_valid_ct_series_with_its_label(family):
    out, summary = family
    found = discover(out / "dicom")
    assert found.rejected == ()
    series = [validate_series(headers) for headers in found.series.values()]
    with (out / "labels.csv").open() as fh:
        labels = {row["StudyInstanceUID"]: row for row in csv.DictReader(fh)}
    assert {s.StudyInstanceUID for s in series} == set(labels)
    assert summary.counts == {"covid": 2, "other_pneumonia": 2, "normal": 2}
    assert sorted(row["diagnosis"] for row in labels.values()) == sorted(EXTERNAL_DIAGNOSES * 2)
    assert summary.files == sum(len(s.paths) for s in series)


def test_geometry_varies_between_studies(family):
    out, _ = family
    series = [validate_series(h) for h in discover(out / "dicom").series.values()]
    assert len({round(s.slice_step_mm, 3) for s in series}) >= 2
    assert len({s.PixelSpacing for s in series}) >= 2
    assert len({len(s.paths) for s in series}) >= 2


def test_lesion_masks_lie_on_the_series_grid_and_mark_findings_only(family):
    out, _ = family
    series = {s.StudyInstanceUID: s for s in (validate_series(h) for h in discover(out / "dicom").series.values())}
    with (out / "labels.csv").open() as fh:
        diagnosis = {row["StudyInstanceUID"]: row["diagnosis"] for row in csv.DictReader(fh)}
    for uid, s in series.items():
        mask = nib.load(out / LESION_MASK_DIR / f"{uid}.nii.gz")
        assert mask.shape == (s.Columns, s.Rows, len(s.paths))
        assert (np.asarray(mask.dataobj).any()) == (diagnosis[uid] != "normal")


@pytest.mark.parametrize("diagnosis", ["covid", "other_pneumonia"])
def test_findings_are_denser_than_the_lung_around_them(diagnosis):
    study = render_external(
        rows=64,
        n_slices=40,
        pixel_mm=6.0,
        slice_mm=7.0,
        diagnosis=diagnosis,
        severity=0.5,
        sex="M",
        rng=np.random.default_rng(1),
        noise_hu=10.0,
    )
    assert study.hu.dtype == np.float32 and study.lesion_mask.shape == study.hu.shape
    assert study.lesion_mask.sum() > 20
    lung = (study.hu < -750) & ~study.lesion_mask
    assert study.hu[study.lesion_mask].mean() > study.hu[lung].mean() + 250


def test_normal_studies_have_no_lesion():
    study = render_external(
        rows=48,
        n_slices=30,
        pixel_mm=8.0,
        slice_mm=9.0,
        diagnosis="normal",
        severity=0.0,
        sex="F",
        rng=np.random.default_rng(2),
    )
    assert not study.lesion_mask.any()
    assert ((study.hu < -700).mean()) > 0.2  # air outside the body and the lungs


def test_the_generator_shares_no_code_with_the_training_phantom():
    tree = ast.parse(inspect.getsource(external))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    assert not imported & {"synthetic.phantom", "synthetic.hospitals"}
    assert imported & {"synthetic.dicom_writer", "synthetic.masks"}  # only the file writers are shared


@pytest.mark.parametrize(
    ("options", "match"),
    [({"diagnosis": "flu"}, "flu"), ({"severity": 1.5}, "1.5"), ({"rows": 8}, "rows=8"), ({"pixel_mm": 0.0}, "0.0")],
)
def test_bad_arguments_are_named(options, match):
    kwargs = {
        "rows": 32,
        "n_slices": 10,
        "pixel_mm": 10.0,
        "slice_mm": 10.0,
        "diagnosis": "covid",
        "severity": 0.5,
        "sex": "F",
        "rng": np.random.default_rng(0),
        **options,
    }
    with pytest.raises(ValueError, match=match):
        render_external(**kwargs)


def test_too_few_studies_is_refused(tmp_path):
    with pytest.raises(ValueError, match="studies"):
        write_external_family(tmp_path, studies=1)


def test_fedct_ingests_the_family_like_a_site(family, tmp_path):
    out, _ = family
    manifest = ingest_site(
        out / "dicom",
        tmp_path / "site",
        labels_csv=out / "labels.csv",
        pipeline=PipelineConfig(input_size=(16, 16, 16), target_spacing_mm=(12.0, 12.0, 12.0)),
        workers=1,
    )
    assert len(manifest.studies) == 6 and manifest.n_rejected == 0


def test_ensure_external_family_reuses_its_settings_and_rewrites_other_ones_cleanly(tmp_path):
    from synthetic.external import FAMILY_MARKER, ensure_external_family

    out, ingested = tmp_path / "family", tmp_path / "ingested"
    out.mkdir()
    (out / "README.txt").write_text("the user's own file")
    assert ensure_external_family(out, studies=3, seed=1, small=True) is True
    ingested.mkdir()
    assert ensure_external_family(out, studies=3, seed=1, small=True, derived=(ingested,)) is False
    assert ingested.is_dir()  # same settings: the family and its ingestion are kept

    def series_uids() -> set[str]:
        return set(discover(out / "dicom").series)

    first = series_uids()
    assert ensure_external_family(out, studies=3, seed=2, small=True, derived=(ingested,)) is True
    second = series_uids()
    assert len(second) == 3 and not first & second  # one series per case folder: the other seed's slices are gone
    assert not ingested.exists()
    with (out / "labels.csv").open() as fh:
        assert {r["StudyInstanceUID"] for r in csv.DictReader(fh)} == {u.rsplit(".", 1)[0] for u in second}
    assert (out / FAMILY_MARKER).is_file()
    assert (out / "README.txt").read_text() == "the user's own file"  # only the family's own files are replaced
