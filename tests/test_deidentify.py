"""De-identification of DICOM files for a research hand-over (PS3.15 Annex E Basic Profile + options)."""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import hmac
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.datadict import DicomDictionary, dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from preprocessing.deid import Pseudonymizer
from preprocessing.deidentify import (
    DATE_TIME_PAIRS,
    KEPT_ATTRIBUTES,
    PROFILE_TABLE_EDITION,
    SKIP_REASONS,
    VERBATIM,
    DeidentificationRefused,
    DeidResult,
    date_shift_days,
    deidentify_dataset,
    deidentify_folder,
    new_uid,
    profile_table,
    profile_table_source,
    time_shift_seconds,
)
from synthetic.dicom_writer import CT_IMAGE_STORAGE, PatientIdentity

KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))

PATIENT_1 = PatientIdentity("Qzvorak^Ylvenne", "PIDQ7X93KZ", "19370415", "F", "087Y")
PATIENT_2 = PatientIdentity("Brixtuvol^Oandre", "PIDW2M81RT", "19520903", "M", "071Y")

#: Fake PHI added to every slice on top of what the writer puts there; unusual strings on purpose.
EXTRA_PHI = {
    "OperatorsName": "Opzyxa^Tekniq",
    "PerformingPhysicianName": "Drqvelt^Hannavi",
    "StationName": "STATQZX9",
    "DeviceSerialNumber": "SNQ88812",
    "InstitutionAddress": "12 Qzvstreet Road",
    "InstitutionalDepartmentName": "Radiology Qzdept",
    "PatientAddress": "7 Ylvennelane Qzton",
    "PatientTelephoneNumbers": "555-0199-7731",
    "OtherPatientIDs": "OPIDQ2K",
    "EthnicGroup": "Qzethnic",
    "ImageComments": "scan of Qzvorak after fall",
    "PatientBirthTime": "071500",
    "StudyID": "SIDQ4471",
    "ProtocolName": "Qzprotocol Ylv",
}
STUDY_1 = dict(study_date="20230517", accession_number="ACCQ5521ZX", institution_name="Hospital Qwertyvale")
STUDY_2 = dict(study_date="20220211", accession_number="ACCW9034PL", institution_name="Clinic Vexhollow")
ACQUISITION_DATE_1 = "20230518"  # one day after the study date
CREATION_DATE_1 = "20230519"
PRIVATE_CREATOR = "QZ PRIVATE CREATOR"
PRIVATE_VALUE = "PrivQzSecret"
NESTED_PRIVATE_VALUE = "NestedPrivQz"
NESTED_PERSON = "Nurqvist^Olavi"  # a PN nested in a kept sequence, not listed in PROFILE_ACTIONS
MANUFACTURER = "AcmeScanner"  # equipment make: kept on purpose


def _add_phi(ds: Dataset, *, referenced_sop: str, acquisition_date: str, creation_date: str) -> None:
    for keyword, value in EXTRA_PHI.items():
        setattr(ds, keyword, value)
    ds.AcquisitionDate = acquisition_date
    ds.AcquisitionDateTime = f"{acquisition_date}093000.123456+0100"
    ds.InstanceCreationDate = creation_date
    ds.TimezoneOffsetFromUTC = "+0100"
    other = Dataset()
    other.PatientID = "OPSQIDX5"
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = [other]
    request = Dataset()
    request.RequestedProcedureID = "RPIDQ77"
    request.ScheduledProcedureStepID = "SPSQ88"
    request.private_block(0x0013, PRIVATE_CREATOR, create=True).add_new(0x01, "LO", NESTED_PRIVATE_VALUE)
    ds.RequestAttributesSequence = [request]
    ref = Dataset()
    ref.ReferencedSOPClassUID = CT_IMAGE_STORAGE
    ref.ReferencedSOPInstanceUID = referenced_sop
    ref.PersonName = NESTED_PERSON
    ds.ReferencedImageSequence = [ref]
    ds.private_block(0x0011, PRIVATE_CREATOR, create=True).add_new(0x01, "LO", PRIVATE_VALUE)


@dataclass(frozen=True)
class SeriesIn:
    patient: PatientIdentity
    study_uid: str
    series_uid: str
    sop_uids: list[str]  # in slice order
    frame_of_reference_uid: str
    paths: list[Path]


@dataclass(frozen=True)
class Site:
    root: Path
    series: dict[str, SeriesIn]
    phi: list[str]
    before: dict
    out_a: Path
    out_a_again: Path
    out_b: Path
    result_a: DeidResult
    result_a_again: DeidResult
    result_b: DeidResult


def _build_site(root: Path, series_writer, edit_dicom) -> tuple[dict[str, SeriesIn], list[str]]:
    """Two patients, two studies, three series in folders named after the patient; plus odd files."""
    layout = {
        "a": (PATIENT_1, STUDY_1, "Qzvorak^Ylvenne_PIDQ7X93KZ/20230517_CT/thorax", 8, None),
        "b": (PATIENT_1, STUDY_1, "Qzvorak^Ylvenne_PIDQ7X93KZ/20230517_CT/abdomen", 6, "a"),
        "c": (PATIENT_2, STUDY_2, "Brixtuvol_PIDW2M81RT/20220211/ct", 6, None),
    }
    series: dict[str, SeriesIn] = {}
    for name, (patient, study, folder, n, same_study_as) in layout.items():
        kwargs = dict(study)
        if same_study_as:
            kwargs["study_uid"] = series[same_study_as].study_uid
        written = series_writer(
            root / folder,
            n_slices=n,
            rows=12,
            cols=12,
            patient=patient,
            seed=len(series),
            manufacturer=MANUFACTURER,
            **kwargs,
        )
        acquisition = ACQUISITION_DATE_1 if patient is PATIENT_1 else "20220212"
        creation = CREATION_DATE_1 if patient is PATIENT_1 else "20220213"
        first_sop = str(pydicom.dcmread(written.paths[0]).SOPInstanceUID)
        for path in written.paths:
            edit_dicom(
                path,
                lambda ds: _add_phi(ds, referenced_sop=first_sop, acquisition_date=acquisition, creation_date=creation),
            )
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in written.paths]
        series[name] = SeriesIn(
            patient=patient,
            study_uid=written.study_uid,
            series_uid=written.series_uid,
            sop_uids=[str(h.SOPInstanceUID) for h in headers],
            frame_of_reference_uid=str(headers[0].FrameOfReferenceUID),
            paths=list(written.paths),
        )

    extras = root / "zz_extras"
    extras.mkdir()
    (extras / "notes.txt").write_text(f"patient {PATIENT_1.PatientName} {PATIENT_1.PatientID}\n")
    (extras / "empty.dcm").write_bytes(b"")
    (extras / "truncated_header.dcm").write_bytes(series["a"].paths[0].read_bytes()[:300])
    (extras / "truncated_pixels.dcm").write_bytes(series["a"].paths[0].read_bytes()[:-50])
    burned = pydicom.dcmread(series["a"].paths[1])
    burned.BurnedInAnnotation = "YES"
    burned.SOPInstanceUID = burned.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    burned.save_as(extras / "burned.dcm")
    no_pixels = pydicom.dcmread(series["a"].paths[2])
    del no_pixels.PixelData
    no_pixels.SOPInstanceUID = no_pixels.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    no_pixels.save_as(extras / "no_pixels.dcm")
    shutil.copy2(series["a"].paths[3], extras / "copy_of_a_slice.dcm")

    phi = [
        PATIENT_1.PatientName,
        *PATIENT_1.PatientName.split("^"),
        PATIENT_1.PatientID,
        PATIENT_1.PatientBirthDate,
        PATIENT_2.PatientName,
        *PATIENT_2.PatientName.split("^"),
        PATIENT_2.PatientID,
        PATIENT_2.PatientBirthDate,
        *(v for s in (STUDY_1, STUDY_2) for v in s.values()),
        ACQUISITION_DATE_1,
        CREATION_DATE_1,
        "20220212",
        "20220213",
        *EXTRA_PHI.values(),
        "OPSQIDX5",
        "RPIDQ77",
        "SPSQ88",
        PRIVATE_CREATOR,
        PRIVATE_VALUE,
        NESTED_PRIVATE_VALUE,
        NESTED_PERSON,
        "SYNTH^REFERRER",
        "Qzvorak",
        "Ylvenne",
    ]
    for s in series.values():
        phi += [s.study_uid, s.series_uid, s.frame_of_reference_uid, *s.sop_uids]
    return series, sorted(set(phi))


@pytest.fixture(scope="module")
def site(tmp_path_factory, series_writer, edit_dicom, snapshot) -> Site:
    base = tmp_path_factory.mktemp("deid")
    root = base / "dicom"
    series, phi = _build_site(root, series_writer, edit_dicom)
    before = snapshot(root)
    out_a, out_a_again, out_b = base / "out_a", base / "out_a_again", base / "out_b"
    result_a = deidentify_folder(root, out_a, site_key=KEY_A)
    result_a_again = deidentify_folder(root, out_a_again, site_key=KEY_A, progress=True)
    result_b = deidentify_folder(root, out_b, site_key=KEY_B)
    return Site(root, series, phi, before, out_a, out_a_again, out_b, result_a, result_a_again, result_b)


def _outputs(out: Path) -> dict[str, pydicom.FileDataset]:
    return {p.relative_to(out).as_posix(): pydicom.dcmread(p) for p in sorted(out.rglob("*")) if p.is_file()}


def _walk(ds: Dataset):
    for elem in ds:
        yield elem
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _walk(item)


def _days(new: str, old: str) -> int:
    parse = lambda s: dt.datetime.strptime(s, "%Y%m%d").date()  # noqa: E731
    return (parse(new) - parse(old)).days


def _offset(key: bytes, patient_id: str) -> dt.timedelta:
    """The patient's whole date/time shift: days plus seconds."""
    return dt.timedelta(days=date_shift_days(key, patient_id), seconds=time_shift_seconds(key, patient_id))


def _moved(key: bytes, patient_id: str, date: str, time: str = "000000") -> tuple[str, str]:
    """(DA, TM) that ``date``/``time`` become for this patient."""
    moment = dt.datetime.strptime(date + time[:6], "%Y%m%d%H%M%S") + _offset(key, patient_id)
    return moment.strftime("%Y%m%d"), moment.strftime("%H%M%S") + time[6:]


# --- the folder run -----------------------------------------------------------------------------


def test_result_counts_written_files_studies_and_skips(site):
    n_images = sum(len(s.sop_uids) for s in site.series.values())
    assert site.result_a.files_written == n_images == 20
    assert site.result_a.studies == 2
    assert site.result_a.seconds > 0
    assert dict(site.result_a.files_skipped) == {
        "zz_extras/burned.dcm": "burned_in_annotation",
        "zz_extras/copy_of_a_slice.dcm": "duplicate_sop_instance",
        "zz_extras/empty.dcm": "not_dicom",
        "zz_extras/no_pixels.dcm": "not_an_image",
        "zz_extras/notes.txt": "not_dicom",
        "zz_extras/truncated_header.dcm": "unreadable",
        "zz_extras/truncated_pixels.dcm": "unreadable",
    }
    assert [p for p, _ in site.result_a.files_skipped] == sorted(p for p, _ in site.result_a.files_skipped)
    assert len(list(site.out_a.rglob("*.dcm"))) == n_images
    assert not list(site.out_a.rglob("*.partial"))


def test_no_original_phi_in_any_output_byte_or_path(site):
    files = [p for p in site.out_a.rglob("*") if p.is_file()]
    assert len(files) == 20
    for path in files:
        data = path.read_bytes()
        rel = path.relative_to(site.out_a).as_posix()
        for phi in site.phi:
            assert phi.encode() not in data, f"{phi!r} leaked into {rel}"
            assert phi not in rel, f"{phi!r} leaked into the output path {rel}"
    for folder in (p for p in site.out_a.rglob("*") if p.is_dir()):
        assert not any(phi in folder.name for phi in site.phi)


def test_output_paths_are_pseudonym_and_new_uids(site):
    for rel, ds in _outputs(site.out_a).items():
        patient, study, series, name = rel.split("/")
        assert patient == ds.PatientID == str(ds.PatientName)
        assert (study, series, name) == (ds.StudyInstanceUID, ds.SeriesInstanceUID, f"{ds.SOPInstanceUID}.dcm")


def test_uids_are_replaced_consistently_across_slices_series_and_references(site):
    outputs = _outputs(site.out_a)
    by_sop = {str(ds.SOPInstanceUID): ds for ds in outputs.values()}
    for s in site.series.values():
        new_sops = [new_uid(KEY_A, u) for u in s.sop_uids]
        assert set(new_sops) <= set(by_sop)
        slices = [by_sop[u] for u in new_sops]
        assert {str(d.SeriesInstanceUID) for d in slices} == {new_uid(KEY_A, s.series_uid)}
        assert {str(d.StudyInstanceUID) for d in slices} == {new_uid(KEY_A, s.study_uid)}
        assert {str(d.FrameOfReferenceUID) for d in slices} == {new_uid(KEY_A, s.frame_of_reference_uid)}
        assert new_uid(KEY_A, s.series_uid) != s.series_uid
        for d in slices:  # the reference to the first slice still resolves, to the new first slice
            assert d.ReferencedImageSequence[0].ReferencedSOPInstanceUID == new_sops[0]
            assert d.ReferencedImageSequence[0].ReferencedSOPClassUID == CT_IMAGE_STORAGE
    # series a and b are one study; c is another
    assert new_uid(KEY_A, site.series["a"].study_uid) == new_uid(KEY_A, site.series["b"].study_uid)
    assert len({str(d.StudyInstanceUID) for d in outputs.values()}) == 2
    assert len({str(d.SeriesInstanceUID) for d in outputs.values()}) == 3
    assert len(by_sop) == 20


def test_rerun_with_the_same_key_gives_identical_files(site):
    assert site.result_a_again.files_written == site.result_a.files_written
    assert site.result_a_again.files_skipped == site.result_a.files_skipped
    first = {p.relative_to(site.out_a): p.read_bytes() for p in site.out_a.rglob("*.dcm")}
    again = {p.relative_to(site.out_a_again): p.read_bytes() for p in site.out_a_again.rglob("*.dcm")}
    assert first == again


def test_uid_and_date_shift_derivations_are_pinned():
    # Pinned values: a re-run in another process, or after an upgrade, must map identically (or the
    # research copy would get a second, unlinkable set of UIDs for the same studies).
    assert new_uid(KEY_A, "1.2.840.99999.1.2.3") == "1.2.826.0.1.3680043.8.498.63365916410905011789055219262138510312"
    digest = hmac.new(KEY_A, b"uid:1.2.840.99999.1.2.3", hashlib.sha256).hexdigest()
    assert new_uid(KEY_A, "1.2.840.99999.1.2.3") == generate_uid(entropy_srcs=[digest])
    assert new_uid(KEY_A, "1.2.840.99999.1.2.3 ") == new_uid(KEY_A, "1.2.840.99999.1.2.3")  # padding ignored
    assert new_uid(KEY_B, "1.2.840.99999.1.2.3") != new_uid(KEY_A, "1.2.840.99999.1.2.3")
    assert date_shift_days(KEY_A, PATIENT_1.PatientID) == -9
    assert time_shift_seconds(KEY_A, PATIENT_1.PatientID) == time_shift_seconds(bytes(KEY_A), PATIENT_1.PatientID)
    shifts = {date_shift_days(KEY_A, f"P{i}") for i in range(2000)}
    assert min(shifts) == -365 and max(shifts) == -1
    seconds = {time_shift_seconds(KEY_A, f"P{i}") for i in range(2000)}
    assert -86400 < min(seconds) < -80000 and max(seconds) <= 0 and len(seconds) > 1900


def test_another_key_gives_other_pseudonyms_and_uids(site):
    a, b = _outputs(site.out_a), _outputs(site.out_b)
    assert len(a) == len(b) == 20
    assert not set(a) & set(b)
    for keyword in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
        assert not {str(d.get(keyword)) for d in a.values()} & {str(d.get(keyword)) for d in b.values()}, keyword


def test_dates_and_times_of_a_patient_are_shifted_by_one_offset(site):
    outputs = _outputs(site.out_a)
    for patient, study_date, acquisition, creation in (
        (PATIENT_1, STUDY_1["study_date"], ACQUISITION_DATE_1, CREATION_DATE_1),
        (PATIENT_2, STUDY_2["study_date"], "20220212", "20220213"),
    ):
        offset = _offset(KEY_A, patient.PatientID)
        assert dt.timedelta(days=-366) < offset <= dt.timedelta(days=-1)
        pseudonym = Pseudonymizer(KEY_A)("patient", patient.PatientID)
        mine = [d for d in outputs.values() if d.PatientID == pseudonym]
        assert len(mine) == (14 if patient is PATIENT_1 else 6)
        study = _moved(KEY_A, patient.PatientID, study_date, "120000")
        for d in mine:
            assert (d.StudyDate, d.StudyTime) == (d.SeriesDate, d.SeriesTime) == (d.ContentDate, d.ContentTime) == study
            # dates without their time move as if at midnight; the DT keeps its fraction, loses its UTC offset
            assert d.AcquisitionDate == _moved(KEY_A, patient.PatientID, acquisition)[0]
            assert d.InstanceCreationDate == _moved(KEY_A, patient.PatientID, creation)[0]
            assert d.AcquisitionDateTime == "".join(_moved(KEY_A, patient.PatientID, acquisition, "093000.123456"))
            moment = lambda da, tm: dt.datetime.strptime(da + tm[:6], "%Y%m%d%H%M%S")  # noqa: E731
            assert moment(d.AcquisitionDateTime[:8], d.AcquisitionDateTime[8:]) - moment(d.StudyDate, d.StudyTime) == (
                moment(acquisition, "093000") - moment(study_date, "120000")
            )  # intervals kept exactly
            assert d.PatientBirthDate == ""
            assert "PatientBirthTime" not in d and "TimezoneOffsetFromUTC" not in d
    assert _offset(KEY_A, PATIENT_1.PatientID) != _offset(KEY_A, PATIENT_2.PatientID)


def test_private_tags_are_removed_everywhere(site):
    for rel, ds in _outputs(site.out_a).items():
        assert not [e.tag for e in _walk(ds) if e.tag.is_private], rel
        assert "RequestAttributesSequence" not in ds and "OtherPatientIDsSequence" not in ds


def test_deidentification_is_recorded_in_the_header(site):
    outputs = _outputs(site.out_a)
    pseudonyms = {Pseudonymizer(KEY_A)("patient", p.PatientID) for p in (PATIENT_1, PATIENT_2)}
    for ds in outputs.values():
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
        codes = {(i.CodeValue, i.CodingSchemeDesignator) for i in ds.DeidentificationMethodCodeSequence}
        assert {("113100", "DCM"), ("113107", "DCM"), ("113108", "DCM")} == codes
        assert any("Basic Application Confidentiality Profile" in m for m in ds.DeidentificationMethod)
        assert "Private attributes removed" in ds.DeidentificationMethod
        assert ds.PatientName == ds.PatientID and ds.PatientID in pseudonyms
    assert {ds.PatientID for ds in outputs.values()} == pseudonyms


def test_profile_actions_on_the_written_files(site):
    ds = next(iter(_outputs(site.out_a).values()))
    for keyword in (
        "OperatorsName",
        "PerformingPhysicianName",
        "StationName",
        "DeviceSerialNumber",
        "InstitutionName",
        "InstitutionAddress",
        "InstitutionalDepartmentName",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "OtherPatientIDs",
        "EthnicGroup",
        "ImageComments",
        "StudyDescription",
        "SeriesDescription",
        "ProtocolName",
    ):
        assert keyword not in ds, keyword
    for keyword in ("AccessionNumber", "StudyID", "ReferringPhysicianName", "PatientBirthDate"):
        assert keyword in ds and ds[keyword].is_empty, keyword
    assert "PersonName" not in ds.ReferencedImageSequence[0]  # an attribute the allow-list does not name is removed
    # kept: patient characteristics (option 113108), equipment make, geometry, acquisition parameters
    assert (ds.PatientSex, ds.PatientAge) in {("F", "087Y"), ("M", "071Y")}
    assert ds.Manufacturer == MANUFACTURER and ds.Modality == "CT" and ds.ConvolutionKernel == "STANDARD"
    assert ds.RescaleIntercept == -1024 and ds.PixelSpacing == [2.0, 2.0] and ds.KVP == 120


def test_pixel_data_is_identical_to_the_input(site):
    by_sop = {str(ds.SOPInstanceUID): ds for ds in _outputs(site.out_a).values()}
    for s in site.series.values():
        for sop, path in zip(s.sop_uids, s.paths):
            original = pydicom.dcmread(path)
            out = by_sop[new_uid(KEY_A, sop)]
            assert out.PixelData == original.PixelData
            np.testing.assert_array_equal(out.pixel_array, original.pixel_array)


def test_outputs_are_valid_dicom_files_with_consistent_file_meta(site):
    for rel, _ in _outputs(site.out_a).items():
        path = site.out_a / rel
        assert path.read_bytes()[:128] == b"\x00" * 128 and path.read_bytes()[128:132] == b"DICM"
        ds = pydicom.dcmread(path)  # no force: a proper Part 10 file
        meta = ds.file_meta
        assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert meta.MediaStorageSOPClassUID == ds.SOPClassUID == CT_IMAGE_STORAGE
        assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert "SourceApplicationEntityTitle" not in meta
        assert meta.ImplementationClassUID == pydicom.uid.PYDICOM_IMPLEMENTATION_UID


def test_input_folder_is_left_unchanged(site, snapshot):
    assert snapshot(site.root) == site.before


# --- argument checks ----------------------------------------------------------------------------


def test_missing_input_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        deidentify_folder(tmp_path / "absent", tmp_path / "out", site_key=KEY_A)


@pytest.mark.parametrize("inside", [".", "out", "sub/out"])
def test_output_inside_the_input_is_refused(make_series, dicom_root, snapshot, inside):
    make_series("s", n_slices=2, rows=8, cols=8)
    before = snapshot(dicom_root)
    with pytest.raises(ValueError, match="inside"):
        deidentify_folder(dicom_root, dicom_root / inside, site_key=KEY_A)
    assert snapshot(dicom_root) == before


def test_short_site_key_is_refused(make_series, dicom_root, tmp_path):
    make_series("s", n_slices=2, rows=8, cols=8)
    with pytest.raises(ValueError, match="32 bytes"):
        deidentify_folder(dicom_root, tmp_path / "out", site_key=b"short")
    assert not (tmp_path / "out").exists()


# --- single datasets ----------------------------------------------------------------------------


@pytest.fixture
def slice_ds(make_series) -> pydicom.FileDataset:
    s = make_series("one", n_slices=1, rows=8, cols=8)
    return pydicom.dcmread(s.paths[0])


def test_profile_table_is_read_from_the_package_not_typed():
    table = profile_table()
    assert PROFILE_TABLE_EDITION in profile_table_source() and profile_table_source().startswith("dicom-anonymizer ")
    assert len(table) > 600
    by_keyword = {e.keyword: e.action for e in table if e.keyword}
    # spot checks against the standard's table (PS3.15 2026c)
    assert by_keyword["PatientName"] == "Z" and by_keyword["SOPInstanceUID"] == "U"
    assert by_keyword["InstitutionName"] == "X/Z/D" and by_keyword["ReferencedImageSequence"] == "X/Z/U*"
    for keyword in (
        "PersonTelephoneNumbers",
        "DeviceDescription",
        "ClinicalTrialProtocolEthicsCommitteeName",
        "ClinicalTrialProtocolEthicsCommitteeApprovalNumber",
        "PreMedication",
        "TopicAuthor",
    ):
        assert keyword in by_keyword, keyword
    assert any(e.matches(0x60023000) and e.action == "X" for e in table)  # overlay data of any 60xx group
    assert {e.action for e in table} <= {"D", "Z", "X", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"}


def test_allow_list_names_valid_keywords_and_keeps_no_table_attribute_verbatim():
    table = {e.keyword: e.action for e in profile_table() if e.keyword}
    for keyword, rule in KEPT_ATTRIBUTES.items():
        assert tag_for_keyword(keyword) is not None, keyword
        if rule == VERBATIM:
            assert keyword not in table, keyword
    # every table attribute that survives at all does so by an option, as a replaced UID or as a filtered sequence
    kept_from_table = {kw for kw in KEPT_ATTRIBUTES if kw in table}
    assert kept_from_table == {
        *(kw for pair in DATE_TIME_PAIRS for kw in pair),
        "AcquisitionDateTime",
        "FrameAcquisitionDateTime",
        "FrameReferenceDateTime",  # 113107: shifted
        "PatientSex",
        "PatientAge",
        "PatientSize",
        "PatientWeight",  # 113108: checked and coarsened
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "FrameOfReferenceUID",
        "ReferencedSOPInstanceUID",
        "ConcatenationUID",
        "DimensionOrganizationUID",
        "SynchronizationFrameOfReferenceUID",
        "IrradiationEventUID",
        "ReferencedImageSequence",
        "SourceImageSequence",  # U*: kept, their UIDs replaced
    }
    assert {table[kw] for kw in kept_from_table if kw.endswith("UID")} == {"U"}
    assert set(SKIP_REASONS) >= {"secondary_image", "pixel_high_bits", "recognizable_features"}


def test_deidentify_dataset_returns_a_copy_and_leaves_the_input_alone(slice_ds):
    slice_ds.private_block(0x0011, PRIVATE_CREATOR, create=True).add_new(0x01, "LO", PRIVATE_VALUE)
    before = copy.deepcopy(slice_ds)

    out = deidentify_dataset(slice_ds, site_key=KEY_A)

    assert out is not slice_ds
    assert slice_ds == before and slice_ds.file_meta == before.file_meta
    assert out.PatientID == Pseudonymizer(KEY_A)("patient", before.PatientID)
    assert out.SOPInstanceUID == new_uid(KEY_A, before.SOPInstanceUID) == out.file_meta.MediaStorageSOPInstanceUID
    assert (out.StudyDate, out.StudyTime) == _moved(KEY_A, before.PatientID, before.StudyDate, before.StudyTime)
    assert not any(e.tag.is_private for e in out)
    assert out.PixelData == before.PixelData


def test_attributes_not_on_the_allow_list_are_removed(slice_ds):
    slice_ds.PersonName = "Hiddenqz^Person"
    slice_ds.SOPInstanceUIDOfConcatenationSource = "1.2.3.4.5.6.7"
    slice_ds.TextValue = "free text naming Qzvorak"
    slice_ds.ReceivingAE = "QZ_SITE_PACS"
    slice_ds.ScheduledProcedureStepModificationDateTime = "20240101101500"
    slice_ds.ReferencedTransferSyntaxUIDInFile = ExplicitVRLittleEndian
    slice_ds.RetrieveURL = f"https://pacs.qzhospital.example/studies/{slice_ds.StudyInstanceUID}"
    slice_ds.add_new(0x00091001, "LO", "odd-group private")  # private without a creator
    slice_ds.add_new(0x00190010, "LO", "GEMS_ACQU_01")
    slice_ds.add_new(0x60000010, "US", 8)  # overlay rows
    slice_ds.add_new(0x60003000, "OW", b"\x01" * 8)  # overlay data
    slice_ds.add_new(0x00080000, "UL", 1234)  # a (stale) group length
    slice_ds.add_new(0x00211234, "LO", "retired or unknown public tag")  # odd group: private; next one public
    slice_ds.add_new(0x00400555, "SQ", [])  # AcquisitionContextSequence, empty
    slice_ds.PatientAge = "095Y"
    slice_ds.PatientWeight = "81.37"
    slice_ds.PatientSize = "1.7649"

    out = deidentify_dataset(slice_ds, site_key=KEY_A)

    assert out.SOPInstanceUIDOfConcatenationSource == new_uid(KEY_A, "1.2.3.4.5.6.7")
    for keyword in (
        "PersonName",
        "TextValue",
        "ReceivingAE",
        "ScheduledProcedureStepModificationDateTime",
        "ReferencedTransferSyntaxUIDInFile",
        "RetrieveURL",
        "AcquisitionContextSequence",
    ):
        assert keyword not in out, keyword
    assert not [t for t in out.keys() if t.group in (0x6000, 0x0009, 0x0019, 0x0021) or t.element == 0]
    assert out.PatientAge == "090Y"  # ages over 89 are reported as 90
    assert (out.PatientWeight, out.PatientSize) == (81, 1.76)  # coarsened: kg, cm


@pytest.mark.parametrize(
    ("keyword", "value"),
    [("PatientSex", "Qzvorak"), ("PatientAge", "eighty"), ("PatientWeight", "12345"), ("PatientSize", "-1")],
)
def test_implausible_patient_characteristics_do_not_survive(slice_ds, keyword, value):
    setattr(slice_ds, keyword, value)
    out = deidentify_dataset(slice_ds, site_key=KEY_A)
    assert out.get(keyword, "") in ("", None)


def test_kept_text_that_names_an_identifier_or_a_uid_is_removed(slice_ds):
    slice_ds.Manufacturer = f"Acme for {slice_ds.PatientID}"
    slice_ds.ManufacturerModelName = f"Model {slice_ds.StudyInstanceUID}"
    slice_ds.ConvolutionKernel = "see www.qz.example"
    slice_ds.RescaleType = "HU"

    out = deidentify_dataset(slice_ds, site_key=KEY_A)

    assert out.Manufacturer == ""  # Type 2: written empty
    assert "ManufacturerModelName" not in out and "ConvolutionKernel" not in out
    assert out.RescaleType == "HU"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda ds: setattr(ds, "BurnedInAnnotation", "YES"), "burned_in_annotation"),
        (lambda ds: setattr(ds, "SOPClassUID", SecondaryCaptureImageStorage), "secondary_capture"),
        (lambda ds: ds.__delattr__("PixelData"), "not_an_image"),
    ],
)
def test_objects_header_rules_cannot_clean_are_refused(slice_ds, change, reason):
    change(slice_ds)
    with pytest.raises(DeidentificationRefused) as info:
        deidentify_dataset(slice_ds, site_key=KEY_A)
    assert info.value.reason == reason


def test_without_patient_id_the_study_is_the_patient_as_in_ingest(slice_ds):
    slice_ds.PatientID = ""
    other = copy.deepcopy(slice_ds)
    other.StudyInstanceUID = "1.2.840.99999.77"

    first, second = deidentify_dataset(slice_ds, site_key=KEY_A), deidentify_dataset(other, site_key=KEY_A)

    assert first.PatientID == Pseudonymizer(KEY_A)("patient", slice_ds.StudyInstanceUID)
    assert second.PatientID == Pseudonymizer(KEY_A)("patient", "1.2.840.99999.77")
    assert (first.StudyDate, first.StudyTime) == _moved(
        KEY_A, slice_ds.StudyInstanceUID, "20240101", slice_ds.StudyTime
    )


def test_keep_private_tags_keeps_them_and_says_so(slice_ds):
    slice_ds.private_block(0x0011, PRIVATE_CREATOR, create=True).add_new(0x01, "LO", PRIVATE_VALUE)
    out = deidentify_dataset(slice_ds, site_key=KEY_A, keep_private_tags=True)
    assert out[0x00111001].value == PRIVATE_VALUE
    assert "Private attributes retained (not profile conformant)" in out.DeidentificationMethod
    assert out.PatientName == Pseudonymizer(KEY_A)("patient", slice_ds.PatientID)


# --- pydicom's real test files --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_real_files_from_pydicom(name, copy_testdata, tmp_path, snapshot):
    src = copy_testdata(name, tmp_path / "in")
    original = pydicom.dcmread(src)
    before = snapshot(tmp_path / "in")

    result = deidentify_folder(tmp_path / "in", tmp_path / "out", site_key=KEY_A)

    assert (result.files_written, result.files_skipped, result.studies) == (1, (), 1)
    assert snapshot(tmp_path / "in") == before
    (path,) = (tmp_path / "out").rglob("*.dcm")
    data = path.read_bytes()
    leaks = [
        str(original.PatientName),
        original.PatientID,
        original.StudyInstanceUID,
        original.SeriesInstanceUID,
        original.SOPInstanceUID,
        original.FrameOfReferenceUID,
        original.file_meta.SourceApplicationEntityTitle,
        original.StudyDate,
    ]
    if name == "CT_small.dcm":
        leaks += [original.InstitutionName, original.StationName, "ABCD1234", "1234ABCD", "GEMS_IDEN_01"]
    for phi in leaks:
        assert phi.strip().encode() not in data, phi
        assert phi.strip() not in path.relative_to(tmp_path / "out").as_posix()
    out = pydicom.dcmread(path)
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID == new_uid(KEY_A, original.SOPInstanceUID)
    assert out.SOPClassUID == original.SOPClassUID
    assert out.PixelData == original.PixelData
    assert not any(e.tag.is_private for e in _walk(out))
    assert "InstitutionName" not in out and "OtherPatientIDsSequence" not in out and "ImageComments" not in out
    assert (out.StudyDate, out.StudyTime) == _moved(KEY_A, original.PatientID, original.StudyDate, original.StudyTime)
    if name == "CT_small.dcm":  # study and content dates differ by years there: the interval is kept

        def moment(d):
            content = dt.datetime.strptime(d.ContentDate + d.ContentTime[:6], "%Y%m%d%H%M%S")
            return content - dt.datetime.strptime(d.StudyDate + d.StudyTime[:6], "%Y%m%d%H%M%S")

        assert moment(out) == moment(original)
    assert out.PatientIdentityRemoved == "YES"


def test_a_dicomdir_export_from_pydicom(copy_testdata, tmp_path):
    """pydicom's DICOMDIR test tree: the media directories are refused, the CT/MR images de-identified."""
    root = copy_testdata("dicomdirtests", tmp_path / "in")
    originals = {}
    for path in (p for p in root.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError:
            continue
        if "PixelData" in ds:
            originals[str(ds.SOPInstanceUID)] = ds

    result = deidentify_folder(root, tmp_path / "out", site_key=KEY_A)

    reasons = dict(result.files_skipped)
    assert {p for p, r in reasons.items() if r == "dicomdir"} == {
        p.relative_to(root).as_posix() for p in root.rglob("DICOMDIR*")
    }
    assert result.files_written == len(originals) > 0
    names = {str(ds.PatientName) for ds in originals.values()} | {str(ds.PatientID) for ds in originals.values()}
    assert len(names) >= 4
    for path in (tmp_path / "out").rglob("*.dcm"):
        out = pydicom.dcmread(path)
        original = next(o for sop, o in originals.items() if new_uid(KEY_A, sop) == out.SOPInstanceUID)
        data = path.read_bytes()
        for phi in (*names, original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID):
            assert str(phi).encode() not in data and str(phi) not in path.relative_to(tmp_path / "out").as_posix(), phi
        assert out.PixelData == original.PixelData
        assert out.PatientID == Pseudonymizer(KEY_A)("patient", original.PatientID)


# --- planted identifiers: every attribute of Table E.1-1, every VR, three nesting levels, private blocks --------------

PLANT_CREATOR = "QZHOSPITAL PHI 1"
_BINARY_VRS = {"US", "SS", "UL", "SL", "FL", "FD", "SV", "UV", "AT", "OF", "OD", "OL", "OV"}


@dataclass
class Planter:
    """Writes a unique, VR-valid value into an attribute and remembers what to look for in the output."""

    needles: set[str]
    binary_tags: set[int]
    counter: int = 0

    def token(self) -> str:
        self.counter += 1
        return f"QZ{self.counter:05d}X"  # fits CS/AE/SH; unique; never a substring of another token

    def value(self, vr: str, uids: dict[str, str]):
        n, token = self.counter + 1, self.token()
        if vr in ("AE", "CS", "SH", "LO", "LT", "ST", "UT", "UC"):
            self.needles.add(token)
            return token
        if vr == "PN":
            given = f"QG{n:05d}Y"
            self.needles.update({token, given})
            return f"{token}^{given}"
        if vr == "UR":  # the hospital's WADO link with the original UIDs in it
            self.needles.add(token)
            return f"https://pacs.qzhospital.example/wado?requestType=WADO&studyUID={uids['study']}&objectUID={uids['sop']}&k={token}"
        if vr == "UI":
            uid = f"1.2.826.0.1.3680043.9.7777.{n + 10000}"  # fixed width: no UID is a prefix of another
            self.needles.add(uid)
            return uid
        date = (dt.date(1700, 1, 1) + dt.timedelta(days=400 * n)).strftime("%Y%m%d")  # 400 days apart: > any shift
        clock = f"{n % 24:02d}{n * 7 % 60:02d}{n * 13 % 60:02d}.{n:06d}"
        if vr == "DA":
            self.needles.add(date)
            return date
        if vr == "TM":
            self.needles.add(clock)
            return clock
        if vr == "DT":
            self.needles.add(date + clock)
            return f"{date}{clock}+0100"
        if vr == "AS":
            age = f"{n % 90 + 10:03d}W"
            self.needles.add(age)
            return age
        if vr == "DS":
            number = f"{n}.{n:05d}"
            self.needles.add(number)
            return number
        if vr == "IS":
            number = f"9{n:05d}7"
            self.needles.add(number)
            return number
        if vr in ("OB", "OW", "UN"):
            self.needles.add(token)
            return token.encode() + b"\0"
        if vr in ("FL", "FD"):
            return float(n) + 0.5
        if vr == "AT":
            return 0x00100010
        return n  # US SS UL SL SV UV: binary, checked by tag


def _plant_vr(tag: int) -> str:
    try:
        vr = dictionary_VR(tag)
    except KeyError:  # in the 2026c table, not yet in pydicom's dictionary
        return "LO"
    vr = vr.split(" or ")[0]
    return "OB" if vr in ("OB", "NONE") else vr


def _plant_table(ds: Dataset, planter: Planter, uids: dict[str, str], *, skip: frozenset[int] = frozenset()) -> None:
    """A unique value in every exact-tag row of Table E.1-1, plus overlay/curve rows and private blocks."""
    for entry in profile_table():
        if entry.mask != 0xFFFFFFFF or entry.tag in skip or entry.tag >> 16 in (0x0000, 0x0002):
            continue  # command (0000) and File Meta (0002) rows cannot stand in a data set: planted in file_meta below
        vr = _plant_vr(entry.tag)
        if vr == "SQ":
            item = Dataset()
            item.PatientComments = planter.value("LT", uids)
            item.PersonName = planter.value("PN", uids)
            value = [item]
        else:
            value = planter.value(vr, uids)
        if vr in _BINARY_VRS:
            planter.binary_tags.add(entry.tag)
        ds.add_new(entry.tag, vr, value)
    ds.add_new(0x60023000, "OB", planter.value("OB", uids))  # overlay data (60xx rows of the table)
    ds.add_new(0x60024000, "LT", planter.value("LT", uids))  # overlay comments
    ds.add_new(0x50003000, "OB", planter.value("OB", uids))  # curve data
    block = ds.private_block(0x0029, PLANT_CREATOR, create=True)
    block.add_new(0x01, "LO", planter.value("LO", uids))
    block.add_new(0x02, "UT", f"report for study {uids['study']} sop {uids['sop']} {planter.value('UT', uids)}")
    inner = Dataset()
    inner.private_block(0x0029, PLANT_CREATOR, create=True).add_new(0x10, "PN", planter.value("PN", uids))
    block.add_new(0x03, "SQ", [inner])
    planter.needles.add(PLANT_CREATOR)


def _planted_file(src: Path, dst: Path) -> tuple[Planter, Dataset]:
    """CT_small.dcm with a planted value in every table attribute at the top level, one and two sequences deep."""
    ds = pydicom.dcmread(src)
    original = copy.deepcopy(ds)
    uids = {"study": str(ds.StudyInstanceUID), "sop": str(ds.SOPInstanceUID)}
    planter = Planter(needles=set(), binary_tags=set())
    keep_core = frozenset(
        tag_for_keyword(k)
        for k in (
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "SOPInstanceUID",
            "FrameOfReferenceUID",
            "PatientName",
            "PatientID",
        )
    )
    _plant_table(ds, planter, uids, skip=keep_core)
    ds.file_meta.SourceApplicationEntityTitle = planter.value("AE", uids)
    ds.file_meta.PrivateInformationCreatorUID = planter.value("UI", uids)
    ds.file_meta.PrivateInformation = planter.value("OB", uids)
    # the finds outside the table
    ds.RetrieveURL = planter.value("UR", uids)
    ds.PatientBirthDateInAlternativeCalendar = planter.value("LO", uids)
    ds.RouteOfAdmissions = planter.value("LO", uids)
    ds.ImageComments = f"prior study {uids['study']}, image {uids['sop']}"
    ds.Manufacturer = f"GE for {uids['study']}"  # a kept attribute carrying a UID is dropped
    level1, level2 = Dataset(), Dataset()
    for item in (level1, level2):
        _plant_table(item, planter, uids)
        item.ReferencedSOPClassUID = original.SOPClassUID
        item.ReferencedSOPInstanceUID = uids["sop"]  # the original UID, referenced two levels deep
    level1.SourceImageSequence = [level2]
    ds.ReferencedImageSequence = [level1]  # a sequence the allow-list keeps (its items are filtered)
    ds.PatientAge = "047Y"  # kept by Retain Patient Characteristics (checked separately)
    planter.needles.update(
        str(original[k].value)
        for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID", "PatientID")
    )
    planter.needles.update(str(original.PatientName).split("^"))
    planter.needles.add(str(original.file_meta.MediaStorageSOPInstanceUID))
    planter.needles.discard("")
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return planter, original


@dataclass(frozen=True)
class PlantedRun:
    planter: Planter
    original: Dataset
    source: Path
    out_path: Path
    stdout: str


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory) -> PlantedRun:
    base = tmp_path_factory.mktemp("planted")
    src = Path(pydicom.data.get_testdata_file("CT_small.dcm", download=False))
    planter, original = _planted_file(src, base / "in" / "qzvorak" / "ct.dcm")
    (base / "site").mkdir()
    (base / "site" / "site.key").write_bytes(KEY_A)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedct",
            "deid",
            "--input",
            str(base / "in"),
            "--out",
            str(base / "out"),
            "--site-dir",
            str(base / "site"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
    )
    assert done.returncode == 0, done.stderr
    (out_path,) = (base / "out").rglob("*.dcm")
    return PlantedRun(planter, original, base / "in" / "qzvorak" / "ct.dcm", out_path, done.stdout)


def test_planted_file_really_carries_the_whole_table(planted_run):
    planted = pydicom.dcmread(planted_run.source)
    exact = [e.tag for e in profile_table() if e.mask == 0xFFFFFFFF and e.tag >> 16 not in (0x0000, 0x0002)]
    top = {int(t) for t in planted.keys()}
    level1 = {int(t) for t in planted.ReferencedImageSequence[0].keys()}
    level2 = {int(t) for t in planted.ReferencedImageSequence[0].SourceImageSequence[0].keys()}
    assert set(exact) <= level1 and set(exact) <= level2
    assert set(exact) <= top  # (the original UIDs and names are left in place, not overwritten)
    assert "SourceApplicationEntityTitle" in planted.file_meta
    assert len(planted_run.planter.needles) > 1900
    assert "de-identified 1 file(s) of 1 study(ies)" in planted_run.stdout


def test_no_planted_value_and_no_original_uid_survives_in_any_output_byte(planted_run):
    data = planted_run.out_path.read_bytes()
    leaked = sorted(n for n in planted_run.planter.needles if n.encode() in data or n.encode("utf-16-le") in data)
    assert leaked == []
    assert str(planted_run.out_path.relative_to(planted_run.out_path.parents[3])).count("QZ") == 0


def test_only_allow_listed_attributes_remain_at_every_level(planted_run):
    out = pydicom.dcmread(planted_run.out_path)
    allowed = {tag_for_keyword(k) for k in KEPT_ATTRIBUTES} | {
        tag_for_keyword(k)
        for k in (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "ReferringPhysicianName",
            "StudyID",
            "AccessionNumber",
            "PositionReferenceIndicator",
            "PatientIdentityRemoved",
            "LongitudinalTemporalInformationModified",
            "DeidentificationMethod",
            "DeidentificationMethodCodeSequence",
            "CodeValue",
            "CodingSchemeDesignator",
            "CodeMeaning",
        )
    }
    present = {int(e.tag) for e in _walk(out)}
    assert present <= allowed, sorted(hex(t) for t in present - allowed)
    assert not present & planted_run.planter.binary_tags
    assert out.PatientAge == "047Y"  # Retain Patient Characteristics: the one planted value kept on purpose
    assert (
        out.PatientSex == "" and "PatientWeight" in out and float(out.PatientWeight) == round(float(out.PatientWeight))
    )
    level2 = out.ReferencedImageSequence[0].SourceImageSequence[0]
    assert level2.ReferencedSOPInstanceUID == new_uid(KEY_A, planted_run.original.SOPInstanceUID)
    assert out.StudyInstanceUID == new_uid(KEY_A, planted_run.original.StudyInstanceUID)


def test_pixels_and_geometry_read_back_identically_after_planting(planted_run):
    out, original = pydicom.dcmread(planted_run.out_path), planted_run.original
    np.testing.assert_array_equal(out.pixel_array, original.pixel_array)
    for keyword in (
        "Rows",
        "Columns",
        "PixelSpacing",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "SliceThickness",
        "RescaleSlope",
        "RescaleIntercept",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "PhotometricInterpretation",
        "PixelPaddingValue",
        "SOPClassUID",
        "Modality",
        "ImageType",
    ):
        assert out[keyword].value == original[keyword].value, keyword


def test_every_public_attribute_not_on_the_allow_list_is_removed(slice_ds):
    """Beyond the table: a planted value in every attribute of pydicom's dictionary (retired ones too) that the
    allow-list does not name, in every VR, disappears."""
    kept = {tag_for_keyword(k) for k in KEPT_ATTRIBUTES} | {tag_for_keyword(k) for k in ("PatientName", "PatientID")}
    planter = Planter(needles=set(), binary_tags=set())
    uids = {"study": str(slice_ds.StudyInstanceUID), "sop": str(slice_ds.SOPInstanceUID)}
    planted = 0
    for tag, (vr, *_rest) in DicomDictionary.items():
        if tag in kept or tag >> 16 in (0x0000, 0x0002, 0xFFFE) or vr == "NONE" or tag == 0x00041220:
            # 0x00041220 DirectoryRecordSequence: would make the file a DICOMDIR, refused as a whole
            continue
        vr = vr.split(" or ")[0]
        value = [Dataset()] if vr == "SQ" else planter.value(vr, uids)
        if vr == "SQ":
            value[0].PatientComments = planter.value("LT", uids)
        if vr in _BINARY_VRS:
            planter.binary_tags.add(tag)
        slice_ds.add_new(tag, vr, value)
        planted += 1
    assert planted > 4500

    out = deidentify_dataset(slice_ds, site_key=KEY_A)

    buffer = io.BytesIO()
    out.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    assert sorted(n for n in planter.needles if n.encode() in _without_new_uids(data, out, planter.needles)) == []
    assert not {int(e.tag) for e in _walk(out)} & planter.binary_tags


def _without_new_uids(data: bytes, out: pydicom.Dataset, needles: set[str]) -> bytes:
    """The output bytes with the (keyed, replaced) UID values blanked. Those are HMAC digits that differ with the
    test folder's path, so a digit-only needle (an IS value such as 9045527) can occur in one by chance; they copy
    no input digits. A UID that is itself a planted value is never blanked, so a surviving planted UID still fails."""
    uids = [e.value for e in _walk(out) if e.VR == "UI" and e.value]
    uids += [
        out.file_meta.get(k)
        for k in (
            "MediaStorageSOPInstanceUID",
            "TransferSyntaxUID",
            "MediaStorageSOPClassUID",
            "ImplementationClassUID",
        )
    ]
    for value in uids:
        for uid in value if isinstance(value, list) else [value]:
            if uid and str(uid) not in needles:
                data = data.replace(str(uid).encode(), b"#")
    return data


# --- burned-in text and the pixel bits ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image_type", "modality", "reason"),
    [
        (["DERIVED", "SECONDARY", "SCREEN SAVE"], "CT", "secondary_image"),
        (["DERIVED", "SECONDARY", "OTHER", "DOSE INFO"], "CT", "secondary_image"),
        (["ORIGINAL", "PRIMARY", "SCREEN SAVE"], "MR", "secondary_image"),
    ],
)
def test_screen_save_and_derived_secondary_ct_are_refused(slice_ds, image_type, modality, reason):
    slice_ds.ImageType, slice_ds.Modality = image_type, modality
    with pytest.raises(DeidentificationRefused) as info:
        deidentify_dataset(slice_ds, site_key=KEY_A)
    assert info.value.reason == reason and "ImageType" in str(info.value)


def test_derived_secondary_mr_and_original_ct_are_accepted(slice_ds):
    for image_type, modality in ((["DERIVED", "SECONDARY", "OTHER"], "MR"), (["ORIGINAL", "PRIMARY", "AXIAL"], "CT")):
        slice_ds.ImageType, slice_ds.Modality = image_type, modality
        assert deidentify_dataset(slice_ds, site_key=KEY_A).ImageType == image_type


def test_a_face_rendering_is_refused(slice_ds):
    slice_ds.RecognizableVisualFeatures = "YES"
    with pytest.raises(DeidentificationRefused) as info:
        deidentify_dataset(slice_ds, site_key=KEY_A)
    assert info.value.reason == "recognizable_features"


def test_a_screen_save_in_a_folder_is_skipped_with_its_reason(make_series, dicom_root, edit_dicom, tmp_path):
    s = make_series("s", n_slices=3, rows=8, cols=8)
    edit_dicom(s.paths[1], lambda ds: setattr(ds, "ImageType", ["DERIVED", "SECONDARY", "SCREEN SAVE"]))
    result = deidentify_folder(dicom_root, tmp_path / "out", site_key=KEY_A)
    assert result.files_written == 2
    assert [reason for _, reason in result.files_skipped] == ["secondary_image"]


def _with_bits(slice_ds: Dataset, stored: np.ndarray, *, bits_stored: int, signed: bool, raw: np.ndarray) -> Dataset:
    slice_ds.BitsAllocated, slice_ds.BitsStored, slice_ds.HighBit = 16, bits_stored, bits_stored - 1
    slice_ds.PixelRepresentation = int(signed)
    slice_ds.Rows, slice_ds.Columns = stored.shape
    slice_ds.PixelData = raw.astype("<u2").tobytes()
    return slice_ds


def test_bits_above_bits_stored_are_cleared_without_changing_pixel_values(slice_ds):
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 4096, size=(8, 8), dtype=np.uint16)
    raw = stored | np.where(rng.random((8, 8)) < 0.5, 0x8000, 0).astype(np.uint16)  # an overlay in bit 15
    ds = _with_bits(slice_ds, stored, bits_stored=12, signed=False, raw=raw)
    before = ds.pixel_array.copy()

    out = deidentify_dataset(ds, site_key=KEY_A)

    words = np.frombuffer(out.PixelData, dtype="<u2").reshape(8, 8)
    assert (raw >> 12).any() and not (words >> 12).any()
    np.testing.assert_array_equal(words, stored)
    np.testing.assert_array_equal(out.pixel_array, before)


def test_signed_pixels_keep_their_sign_extension_and_lose_overlay_bits(slice_ds):
    values = np.array([[-1000, -1], [0, 2047]], dtype=np.int16)  # 12-bit signed values, sign-extended in the words
    raw = values.view(np.uint16) ^ np.array([[0x2000, 0], [0x4000, 0x8000]], dtype=np.uint16)  # overlay bits flipped
    ds = _with_bits(slice_ds, values, bits_stored=12, signed=True, raw=raw)
    before = ds.pixel_array.copy()

    out = deidentify_dataset(ds, site_key=KEY_A)

    words = np.frombuffer(out.PixelData, dtype="<i2").reshape(2, 2)
    np.testing.assert_array_equal(words, values)  # readers that ignore BitsStored see the right values too
    np.testing.assert_array_equal(out.pixel_array, before)


def test_padding_written_in_the_full_words_is_kept(slice_ds):
    stored = np.array([[100, 200], [300, 400]], dtype=np.uint16)
    raw = stored.copy()
    raw[0, 0] = 0xF830  # padding outside the 12-bit range, as some scanners write it
    raw[1, 1] |= 0x4000  # an overlay bit
    ds = _with_bits(slice_ds, stored, bits_stored=12, signed=False, raw=raw)
    ds.PixelPaddingValue = 0xF830
    ds["PixelPaddingValue"].VR = "US"

    out = deidentify_dataset(ds, site_key=KEY_A)

    words = np.frombuffer(out.PixelData, dtype="<u2").reshape(2, 2)
    assert words[0, 0] == 0xF830 and words[1, 1] == 400 and words[0, 1] == 200


def test_compressed_pixels_with_bits_above_bits_stored_are_refused(slice_ds):
    stored = np.arange(64, dtype=np.uint16).reshape(8, 8) * 50
    raw = stored | 0x8000
    ds = _with_bits(slice_ds, stored, bits_stored=12, signed=False, raw=raw)
    ds.BitsStored, ds.HighBit = 16, 15  # the encoder checks values against BitsStored: encode the full words ...
    ds.compress(pydicom.uid.RLELossless, raw, encoding_plugin="pydicom")
    ds.BitsStored, ds.HighBit = 12, 11  # ... then declare 12 bits, as a scanner with an overlay in bit 15 would
    with pytest.raises(DeidentificationRefused) as info:
        deidentify_dataset(ds, site_key=KEY_A)
    assert info.value.reason == "pixel_high_bits"

    clean = _with_bits(copy.deepcopy(slice_ds), stored, bits_stored=12, signed=False, raw=stored)
    clean.compress(pydicom.uid.RLELossless, stored, encoding_plugin="pydicom")
    clean.BitsStored, clean.HighBit = 12, 11
    np.testing.assert_array_equal(deidentify_dataset(clean, site_key=KEY_A).pixel_array, stored)


# --- the de-identified copy is still a usable CT series -------------------------------------------------------------


def test_the_deidentified_copy_still_ingests(site, tmp_path):
    from preprocessing.ingest import ingest_site
    from preprocessing.transforms import PipelineConfig

    manifest = ingest_site(
        site.out_a,
        tmp_path / "site",
        pipeline=PipelineConfig(input_size=(16, 16, 16), target_spacing_mm=(4.0, 4.0, 4.0)),
        workers=1,
    )

    # the 8-slice series is accepted; the two 6-slice ones fail ingest's own minimum (as the originals do), nothing else
    assert len(manifest.studies) == 1
    report = json.loads((tmp_path / "site" / "ingest_report.json").read_text())
    assert [r["reason"] for r in report["rejected"]] == ["too_few_slices", "too_few_slices"]


def test_enhanced_ct_keeps_its_functional_groups_and_loses_planted_values(enhanced_ct_writer, tmp_path):
    hu = np.arange(4 * 6 * 6, dtype=np.int16).reshape(4, 6, 6) - 500
    path = enhanced_ct_writer(tmp_path / "in" / "enhanced.dcm", hu)
    ds = pydicom.dcmread(path)
    frame = ds.PerFrameFunctionalGroupsSequence[1]
    frame.FrameContentSequence[0].FrameAcquisitionDateTime = "20240101101010.5"
    frame.FrameContentSequence[0].FrameComments = "QZENHANCED1"  # table attribute two levels deep
    frame.FrameContentSequence[0].PersonName = "Qzvorak^Deep"  # not on the allow-list
    frame.PlanePositionSequence[0].add_new(0x00431001, "LO", "QZENHANCED2")  # private, two levels deep
    ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].OperatorsName = "QZENHANCED3"

    out = deidentify_dataset(ds, site_key=KEY_A)

    buffer = io.BytesIO()
    out.save_as(buffer, enforce_file_format=True)
    for needle in (
        "QZENHANCED1",
        "QZENHANCED2",
        "QZENHANCED3",
        "Qzvorak",
        str(ds.SOPInstanceUID),
        str(ds.StudyInstanceUID),
    ):
        assert needle.encode() not in buffer.getvalue(), needle
    np.testing.assert_array_equal(out.pixel_array, ds.pixel_array)
    for before, after in zip(ds.PerFrameFunctionalGroupsSequence, out.PerFrameFunctionalGroupsSequence):
        assert (
            after.PlanePositionSequence[0].ImagePositionPatient == before.PlanePositionSequence[0].ImagePositionPatient
        )
        assert (
            after.FrameContentSequence[0].InStackPositionNumber == before.FrameContentSequence[0].InStackPositionNumber
        )
    shared_before, shared_after = ds.SharedFunctionalGroupsSequence[0], out.SharedFunctionalGroupsSequence[0]
    for sequence, keyword in (
        ("PixelMeasuresSequence", "PixelSpacing"),
        ("PixelMeasuresSequence", "SliceThickness"),
        ("PlaneOrientationSequence", "ImageOrientationPatient"),
        ("PixelValueTransformationSequence", "RescaleIntercept"),
        ("CTImageFrameTypeSequence", "FrameType"),
    ):
        assert shared_after[sequence][0][keyword].value == shared_before[sequence][0][keyword].value, keyword
    shifted = out.PerFrameFunctionalGroupsSequence[1].FrameContentSequence[0].FrameAcquisitionDateTime
    assert shifted == "".join(_moved(KEY_A, ds.PatientID, "20240101", "101010.5"))
