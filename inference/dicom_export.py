"""Results back to PACS: a study's model output as DICOM objects that open with the study in any viewer.

:func:`write_dicom_results` writes, into one folder,

* ``sr.dcm`` - a Comprehensive 3D SR holding a TID 1500 *Measurement Report* (built with highdicom):
  one TID 1501 measurement group with the class probabilities (NUM, unit ``%``), the risk score (NUM),
  the predicted diagnosis and the risk group (CODE), the algorithm (TID 4019: name, version,
  parameters), every evaluated source slice (IMAGE) and the disclaimer (TEXT); the source series'
  instances are also the SR's Current Requested Procedure Evidence. No TID 1600 Image Library is
  written: its per-image descriptors cost ~30 ms a slice in highdicom (10 s for 300 slices);
* ``sc_01.dcm``, ``sc_02.dcm``, ... - one RGB Secondary Capture image per heat-map PNG, each pointing
  at the source slice it shows.

All objects join the *source* study (same StudyInstanceUID; Patient and Study modules copied from the
source, so nothing is added that the hospital's PACS does not already hold) in two new series. UIDs
are derived from the source study and series and the model's identity, so sending the files again
after a re-run replaces the earlier objects in PACS instead of adding duplicates.

On a research copy (``identifiers=False``: ``fedct predict --no-local-identifiers``) the objects carry no patient
or study identification: the source's Patient, Clinical Trial and Visit attributes and the study's accession
number, dates, physicians, ID and description are left out (the Type 2 ones written empty); the UIDs, the
patient's sex and the findings stay.

The SR uses a private coding scheme (:data:`CODING_SCHEME`) for the model's own concepts (per-class
probabilities, risk score, risk group); standard codes are used where one exists (SNOMED CT for
COVID-19, "Normal", risk levels; DCM for "Comment"; LOINC for the procedure).
"""

from __future__ import annotations

import io
import math
import operator
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from fedct.files import atomic_write_bytes
from inference.wording import (
    DISCLAIMER,
    confidence_note,
    finding_sentence,
    heat_map_legend,
    registry_words,
    unusual_input_note,
)

#: Private coding scheme of the model's own concepts (declared in CodingSchemeIdentificationSequence).
CODING_SCHEME = "99FEDCT"
MANUFACTURER = "fedct"
SR_FILE_NAME = "sr.dcm"
SR_SERIES_DESCRIPTION = "fedct AI findings"
SC_SERIES_DESCRIPTION = "fedct AI heat maps"
#: High series numbers so the AI series sort after the acquired ones in viewers.
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902

#: Concept names of the SR content items (see :func:`probability_concept` for the probabilities).
DIAGNOSIS_CONCEPT = hd.sr.CodedConcept("439401001", "SCT", "Diagnosis")
RISK_SCORE_CONCEPT = hd.sr.CodedConcept("RISK-SCORE", CODING_SCHEME, "Prognostic risk score")
RISK_GROUP_CONCEPT = hd.sr.CodedConcept("RISK-GROUP", CODING_SCHEME, "Prognostic risk group")
DISCLAIMER_CONCEPT = hd.sr.CodedConcept.from_code(codes.DCM.Comment)
FINDING_TEXT_CONCEPT = hd.sr.CodedConcept.from_code(codes.DCM.Finding)
#: TEXT item present only for a low-confidence result (:func:`inference.wording.confidence_note`).
CONFIDENCE_CONCEPT = hd.sr.CodedConcept("LOW-CONFIDENCE", CODING_SCHEME, "Low-confidence result")
#: TEXT item present only for a study flagged as unlike the training studies (:func:`inference.wording.unusual_input_note`).
UNUSUAL_INPUT_CONCEPT = hd.sr.CodedConcept("UNUSUAL-INPUT", CODING_SCHEME, "Input unlike the training studies")
PERCENT_UNIT = hd.sr.CodedConcept.from_code(codes.UCUM.Percent)
SCORE_UNIT = hd.sr.CodedConcept("{score}", "UCUM", "score")
PROCEDURE_REPORTED = hd.sr.CodedConcept("24627-2", "LN", "CT Chest")
TRACKING_IDENTIFIER = "fedct study-level findings"

# Class name -> (code value, scheme, meaning) of the diagnosis; classes not listed get a private code.
_CLASS_CODES: Mapping[str, tuple[str, str, str]] = {
    "covid": ("840539006", "SCT", "COVID-19"),
    "other_pneumonia": ("OTHER-PNEUMONIA", CODING_SCHEME, "Pneumonia other than COVID-19"),
    "normal": ("17621005", "SCT", "Normal"),
}
# Short code values of the probability concepts of the known classes (SH: at most 16 characters).
_PROBABILITY_CODE_VALUES: Mapping[str, str] = {
    "covid": "P-COVID",
    "other_pneumonia": "P-OTHERPNEUMONIA",
    "normal": "P-NORMAL",
}
# Risk group name -> SNOMED CT qualifier (CID 3118 "Risk Levels" style); other names get a private code.
_RISK_GROUP_CODES: Mapping[str, tuple[str, str, str]] = {
    "low": ("75976002", "SCT", "Low risk"),
    "intermediate": ("25594002", "SCT", "Moderate risk"),
    "moderate": ("25594002", "SCT", "Moderate risk"),
    "medium": ("25594002", "SCT", "Moderate risk"),
    "high": ("15508007", "SCT", "High risk"),
}
_SC_NAME = re.compile(r"^sc_\d+\.dcm$")
# Patient / study attributes the SR and SC constructors read from the source; missing ones are written empty.
_COPIED_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
)
#: Research copy: groups left out whole (Patient, Clinical Trial, Visit), except the attributes kept below.
_RESEARCH_DROPPED_GROUPS = (0x0010, 0x0012, 0x0038)
_RESEARCH_KEPT = ("PatientSex",)
#: Research copy: study attributes that identify the patient, the visit or the people involved.
_RESEARCH_DROPPED = (
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "StudyDescription",
    "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence",
    "ConsultingPhysicianName",
    "ConsultingPhysicianIdentificationSequence",
    "PhysiciansOfRecord",
    "PhysiciansOfRecordIdentificationSequence",
    "NameOfPhysiciansReadingStudy",
    "PhysiciansReadingStudyIdentificationSequence",
    "AdmittingDiagnosesDescription",
    "AdmittingDiagnosesCodeSequence",
    "ReferencedPatientSequence",
    "ReferencedStudySequence",
    "RequestingService",
    "RequestingPhysician",
    "RequestAttributesSequence",
    "StudyComments",
    "InstitutionName",
    "InstitutionAddress",
    "OperatorsName",
    "PerformingPhysicianName",
    "SeriesDate",
    "SeriesTime",
    "AcquisitionDate",
    "AcquisitionTime",
    "ContentDate",
    "ContentTime",
    "AcquisitionDateTime",
    "InstanceCreationDate",
    "InstanceCreationTime",
)


def _code_value(text: str) -> str:
    value = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").upper()
    if not value:
        raise ValueError(f"cannot derive a code value from {text!r}")
    return value


def diagnosis_concept(class_name: str) -> hd.sr.CodedConcept:
    """Coded concept of a diagnosis class (SNOMED CT where one fits, else the private scheme)."""
    if class_name in _CLASS_CODES:
        return hd.sr.CodedConcept(*_CLASS_CODES[class_name])
    return hd.sr.CodedConcept(_code_value(class_name), CODING_SCHEME, class_name[:64])


def probability_concept(class_name: str) -> hd.sr.CodedConcept:
    """Concept name of the NUM item holding the probability of ``class_name`` (private scheme)."""
    value = _PROBABILITY_CODE_VALUES.get(class_name) or "P-" + _code_value(class_name)
    meaning = f"Probability of {diagnosis_concept(class_name).meaning}"
    return hd.sr.CodedConcept(value, CODING_SCHEME, meaning[:64])


def risk_group_concept(group: str) -> hd.sr.CodedConcept:
    """Coded value of a risk group (SNOMED CT risk level where the name matches, else private)."""
    key = group.strip().lower()
    if key in _RISK_GROUP_CODES:
        return hd.sr.CodedConcept(*_RISK_GROUP_CODES[key])
    return hd.sr.CodedConcept("RISK-" + _code_value(group), CODING_SCHEME, f"{group} risk"[:64])


@dataclass(frozen=True)
class ExportUIDs:
    """UIDs of the objects written for one (source series, model) pair; equal on every re-run."""

    sr_series: str
    sr_instance: str
    sc_series: str
    device_observer: str
    tracking: str

    def sc_instance(self, number: int, source_sop_instance_uid: str) -> str:
        return _uid(self.sc_series, "sc-instance", str(number), source_sop_instance_uid)


def _uid(*parts: str) -> str:
    return str(generate_uid(entropy_srcs=["fedct-dicom-export", *parts]))


def export_uids(
    study_instance_uid: str, series_instance_uid: str, model: Mapping[str, Any], *, research: bool = False
) -> ExportUIDs:
    """Deterministic UIDs from the source study/series and the model identity (name, version, weights); a research
    copy gets its own (its objects differ from those that go back to the PACS)."""
    identity = [str(model.get(k, "")) for k in ("name", "fedct_version", "created_utc", "round_of_weights")]
    if model.get("registry_version"):  # a registered version: its own objects (unregistered bundles keep their UIDs)
        identity += [str(model["registry_version"]), str(model.get("content_sha256", ""))]
    base = [str(study_instance_uid), str(series_instance_uid), *identity, *(["research-copy"] if research else [])]
    return ExportUIDs(
        sr_series=_uid(*base, "sr-series"),
        sr_instance=_uid(*base, "sr-instance"),
        sc_series=_uid(*base, "sc-series"),
        device_observer=_uid(*identity, "device-observer"),
        tracking=_uid(*base, "tracking"),
    )


@dataclass(frozen=True)
class _Inputs:
    study_uid: str
    series_uid: str
    paths: list[Path]
    probabilities: dict[str, float]
    diagnosis: str
    risk_score: float
    risk_group: str
    model: dict[str, Any]
    overlays: list[Path]
    key_slices: list[int]
    heat_map_method: str = "Grad-CAM++"
    #: Words for a study flagged as out of the training distribution, "" otherwise.
    unusual_input: str = ""


_REQUIRED = object()


def _field(result: Any, name: str, default: Any = _REQUIRED) -> Any:
    if isinstance(result, Mapping):
        value = result.get(name, default)
    else:
        value = getattr(result, name, default)
    if value is _REQUIRED:
        raise ValueError(f"result has no {name!r}")
    return value


def _check_inputs(result: Any) -> _Inputs:
    study_uid = str(_field(result, "StudyInstanceUID") or "")
    series_uid = str(_field(result, "SeriesInstanceUID") or "")
    if not study_uid or not series_uid:
        raise ValueError("result needs a StudyInstanceUID and a SeriesInstanceUID")
    series = _field(result, "series")
    raw_paths = series.get("paths") if isinstance(series, Mapping) else getattr(series, "paths", None)
    if not raw_paths:
        raise ValueError("result.series has no 'paths': the source series' DICOM files are needed as evidence")
    paths = [Path(p) for p in raw_paths]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FileNotFoundError(f"{len(missing)} source DICOM file(s) missing: {shown}")

    raw_probs = _field(result, "probabilities")
    if not isinstance(raw_probs, Mapping) or len(raw_probs) == 0:
        raise ValueError("result.probabilities is empty: nothing to report")
    probabilities: dict[str, float] = {}
    for name, p in raw_probs.items():
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"class names must be non-empty strings, got {name!r}")
        try:
            value = float(p)
        except (TypeError, ValueError):
            raise ValueError(f"probability of {name!r} is not a number: {p!r}") from None
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"probability of {name!r} must lie in [0, 1], got {p!r}")
        probabilities[name] = value
    diagnosis = _field(result, "diagnosis")
    if diagnosis not in probabilities:
        raise ValueError(f"diagnosis {diagnosis!r} is not one of the classes {sorted(probabilities)}")
    try:
        risk_score = float(_field(result, "risk_score"))
    except (TypeError, ValueError):
        raise ValueError(f"risk_score is not a number: {_field(result, 'risk_score')!r}") from None
    if not math.isfinite(risk_score):
        raise ValueError(f"risk_score must be finite, got {risk_score!r}")
    risk_group = _field(result, "risk_group")
    if not isinstance(risk_group, str) or not risk_group.strip():
        raise ValueError(f"risk_group must be a non-empty string, got {risk_group!r}")

    model = dict(_field(result, "model") or {})
    for key in ("name", "fedct_version"):
        if not str(model.get(key) or "").strip():
            raise ValueError(f"result.model needs a non-empty {key!r} (algorithm identification)")

    overlays = [Path(p) for p in (_field(result, "overlays", None) or [])]
    key_slices: list[int] = []
    for k in _field(result, "key_slices", None) or []:
        if isinstance(k, bool):
            raise ValueError(f"key slice indices must be integers, got {k!r}")
        try:
            key_slices.append(operator.index(k))
        except TypeError:
            raise ValueError(f"key slice indices must be integers, got {k!r}") from None
    if len(overlays) != len(key_slices):
        raise ValueError(
            f"{len(overlays)} overlay(s) but {len(key_slices)} key slice(s): need one key slice per overlay"
        )
    for k in key_slices:
        if not 0 <= k < len(paths):
            raise ValueError(f"key slice {k} is outside the source series ({len(paths)} slices)")
    missing = [str(p) for p in overlays if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"overlay image(s) missing: {', '.join(missing)}")
    explanation = _field(result, "explanation", None) or {}
    method = str(explanation.get("method") or "Grad-CAM++") if isinstance(explanation, Mapping) else "Grad-CAM++"
    return _Inputs(
        study_uid,
        series_uid,
        paths,
        probabilities,
        str(diagnosis),
        risk_score,
        risk_group.strip(),
        model,
        overlays,
        key_slices,
        method,
        unusual_input_note(_field(result, "out_of_distribution", None)),
    )


def _strip_identification(ds: Dataset) -> None:
    """Research copy: remove what identifies the patient or the study visit from a source header (in memory)."""
    kept = {keyword: ds.get(keyword) for keyword in _RESEARCH_KEPT if keyword in ds}
    for tag in [elem.tag for elem in ds if elem.tag.group in _RESEARCH_DROPPED_GROUPS]:
        del ds[tag]
    for keyword in _RESEARCH_DROPPED:
        if keyword in ds:
            delattr(ds, keyword)
    for keyword, value in kept.items():
        setattr(ds, keyword, value)


def _read_source_headers(inputs: _Inputs, *, identifiers: bool = True) -> list[Dataset]:
    """Headers (no pixel data) of the source slices, checked to be one series of the result's study; without
    ``identifiers`` stripped of the patient's and the study's identification (:func:`_strip_identification`)."""
    headers: list[Dataset] = []
    seen: set[str] = set()
    for path in inputs.paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # pydicom raises several types for unreadable files
            raise ValueError(f"source file {path} is not readable DICOM: {exc}") from exc
        for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            if not ds.get(keyword):
                raise ValueError(f"source file {path} has no {keyword}")
        if ds.StudyInstanceUID != inputs.study_uid:
            raise ValueError(f"source file {path} belongs to study {ds.StudyInstanceUID}, not {inputs.study_uid}")
        if ds.SeriesInstanceUID != inputs.series_uid:
            raise ValueError(f"source file {path} belongs to series {ds.SeriesInstanceUID}, not {inputs.series_uid}")
        if ds.SOPInstanceUID in seen:
            raise ValueError(f"source file {path} repeats SOPInstanceUID {ds.SOPInstanceUID}")
        seen.add(ds.SOPInstanceUID)
        if not identifiers:
            _strip_identification(ds)
        for keyword in _COPIED_ATTRIBUTES:
            if keyword not in ds:  # Type 2 in the new objects: written empty, never invented
                setattr(ds, keyword, None)
        headers.append(ds)
    return headers


def _algorithm(model: Mapping[str, Any]) -> hd.sr.AlgorithmIdentification:
    parameters = [
        f"{key}={model[key]}"
        for key in ("registry_version", "round_of_weights", "created_utc", "content_sha256")
        if model.get(key) not in (None, "")
    ]
    return hd.sr.AlgorithmIdentification(
        name=str(model["name"]),
        version=str(model["fedct_version"]),
        parameters=parameters or None,
        manufacturer=MANUFACTURER,
    )


def _build_sr(inputs: _Inputs, headers: list[Dataset], uids: ExportUIDs) -> hd.sr.Comprehensive3DSR:
    model = inputs.model
    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uids.device_observer,
            name=str(model["name"]),
            manufacturer_name=MANUFACTURER,
            model_name=f"{model['name']} (fedct {model['fedct_version']})"[:64],
        ),
    )
    measurements = [
        hd.sr.Measurement(name=probability_concept(name), value=100.0 * p, unit=PERCENT_UNIT)
        for name, p in inputs.probabilities.items()
    ]
    measurements.append(hd.sr.Measurement(name=RISK_SCORE_CONCEPT, value=inputs.risk_score, unit=SCORE_UNIT))
    evaluations = [
        hd.sr.QualitativeEvaluation(name=DIAGNOSIS_CONCEPT, value=diagnosis_concept(inputs.diagnosis)),
        hd.sr.QualitativeEvaluation(name=RISK_GROUP_CONCEPT, value=risk_group_concept(inputs.risk_group)),
    ]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uids.tracking, identifier=TRACKING_IDENTIFIER),
        algorithm_id=_algorithm(model),
        finding_sites=[hd.sr.FindingSite(codes.SCT.Lung)],
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in headers],
    )
    # TID 1501 allows TEXT qualitative evaluations next to the CODE ones: the disclaimer travels with the findings.
    # The finding in words (the same sentence as the report and the review page) and the disclaimer.
    texts = [
        (FINDING_TEXT_CONCEPT, finding_sentence(inputs.probabilities, inputs.diagnosis)),
        (CONFIDENCE_CONCEPT, confidence_note(inputs.probabilities)),
        (UNUSUAL_INPUT_CONCEPT, inputs.unusual_input),
        (DISCLAIMER_CONCEPT, DISCLAIMER),
    ]
    for concept, text in ((c, t) for c, t in texts if t):
        group[0].ContentSequence.append(
            hd.sr.TextContentItem(name=concept, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=[group],
    )
    source = headers[0]
    return hd.sr.Comprehensive3DSR(
        evidence=headers,
        content=report[0],
        series_instance_uid=uids.sr_series,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uids.sr_instance,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,  # machine output nobody has signed: PRELIMINARY, UNVERIFIED
        is_verified=False,
        series_description=SR_SERIES_DESCRIPTION,
        manufacturer_model_name=str(model["name"])[:64],
        software_versions=str(model["fedct_version"]),
        coding_schemes=[
            CodingSchemeIdentificationItem(
                designator=CODING_SCHEME, name="fedct model output concepts", responsible_organization=MANUFACTURER
            )
        ],
        specific_character_set=source.get("SpecificCharacterSet", "ISO_IR 100"),
    )


def read_overlay_rgb(path: Path) -> np.ndarray:
    """An overlay PNG as (rows, columns, 3) uint8 RGB; transparency is composited over black."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in ("1", "L", "LA", "P", "RGB", "RGBA"):
                raise ValueError(f"overlay {path} has unsupported image mode {image.mode!r} (want 8-bit RGB/RGBA/grey)")
            if image.mode in ("LA", "RGBA") or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
            rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except OSError as exc:
        raise ValueError(f"overlay {path} is not a readable image: {exc}") from exc
    if rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) < 1 or max(rgb.shape[:2]) > 65535:
        raise ValueError(f"overlay {path} has unusable shape {rgb.shape}")
    return np.ascontiguousarray(rgb)


def _reference_item(source: Dataset, purpose: bool) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if purpose:
        item.PurposeOfReferenceCodeSequence = [
            hd.sr.CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)
        ]
    return item


def _build_sc(
    inputs: _Inputs, rgb: np.ndarray, source: Dataset, slice_index: int, number: int, uids: ExportUIDs
) -> hd.sc.SCImage:
    model = inputs.model
    sc = hd.sc.SCImage(
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=source.StudyInstanceUID,
        series_instance_uid=uids.sc_series,
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=uids.sc_instance(number, source.SOPInstanceUID),
        instance_number=number,
        manufacturer=MANUFACTURER,
        patient_id=source.PatientID,
        patient_name=source.PatientName,
        patient_birth_date=source.PatientBirthDate,
        patient_sex=source.PatientSex,
        accession_number=source.AccessionNumber,
        study_id=source.StudyID,
        study_date=source.StudyDate,
        study_time=source.StudyTime,
        referring_physician_name=source.ReferringPhysicianName,
        patient_orientation=("L", "P"),  # required by highdicom for PATIENT; blanked below
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=SC_SERIES_DESCRIPTION,
        manufacturer_model_name=str(model["name"])[:64],
        software_versions=str(model["fedct_version"]),
        specific_character_set=source.get("SpecificCharacterSet", "ISO_IR 100"),
    )
    # The PNG is a rendered figure, not a resampled slice: its orientation and spacing are unknown, so
    # PatientOrientation (Type 2C) is empty rather than possibly wrong, and no PixelSpacing is written.
    sc.PatientOrientation = None
    # General Series Laterality is Type 2C (paired body parts): with the body part known, validators can
    # tell it is not needed for the chest; without, it is written empty ("unknown").
    if source.get("BodyPartExamined"):
        sc.BodyPartExamined = source.BodyPartExamined
    else:
        sc.Laterality = None
    sc.copy_patient_and_study_information(source)
    sc.BurnedInAnnotation = "YES"
    registered = f", {registry_words(model)}" if registry_words(model) else ""
    sc.ImageComments = (
        f"AI output: heat map of model {model['name']} (fedct {model['fedct_version']}, weights of round "
        f"{model.get('round_of_weights', '?')}{registered}) on source slice {slice_index + 1} of {len(inputs.paths)} "
        f"(InstanceNumber {source.get('InstanceNumber', '?')}). "
        f"{finding_sentence(inputs.probabilities, inputs.diagnosis)} "
        + (f"{note} " if (note := confidence_note(inputs.probabilities)) else "")
        + (f"{inputs.unusual_input} " if inputs.unusual_input else "")
        + f"{heat_map_legend(inputs.heat_map_method, inputs.diagnosis)} {DISCLAIMER}"
    )
    sc.DerivationDescription = f"fedct {model['name']} saliency heat map over source CT slice"[:1024]
    sc.ReferencedImageSequence = [_reference_item(source, purpose=False)]
    sc.SourceImageSequence = [_reference_item(source, purpose=True)]
    # Common Instance Reference module: the series of every instance referenced above.
    series_item = Dataset()
    series_item.SeriesInstanceUID = source.SeriesInstanceUID
    series_item.ReferencedInstanceSequence = [_reference_item(source, purpose=False)]
    sc.ReferencedSeriesSequence = [series_item]
    return sc


def _save(ds: Dataset, path: Path) -> None:
    """Write with File Meta, via a temporary name, so an interrupted run leaves no half file behind."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    atomic_write_bytes(path, buffer.getvalue())


def write_dicom_results(result: Any, out_dir: Path, *, identifiers: bool = True) -> list[Path]:
    """Write the SR and one Secondary Capture per overlay for ``result`` into ``out_dir``; return the paths.

    ``result`` is a ``StudyResult`` or a mapping with: StudyInstanceUID, SeriesInstanceUID,
    series (``paths``: the source DICOM files in slice order), probabilities (class -> [0, 1]),
    diagnosis (one of the classes), risk_score, risk_group, model (name, fedct_version, created_utc,
    round_of_weights), overlays (RGB PNG paths) and key_slices (index into ``paths`` per overlay).
    Files: ``sr.dcm``, ``sc_01.dcm``, ...; ``sc_NN.dcm`` files of an earlier run that this run does
    not write are removed. Raises ``ValueError`` / ``FileNotFoundError`` on unusable input, before
    anything is written. ``identifiers=False`` (a research copy): no patient or study identification
    is copied from the source (see the module's docstring).
    """
    inputs = _check_inputs(result)
    headers = _read_source_headers(inputs, identifiers=identifiers)
    uids = export_uids(inputs.study_uid, inputs.series_uid, inputs.model, research=not identifiers)

    datasets: list[tuple[str, Dataset]] = [(SR_FILE_NAME, _build_sr(inputs, headers, uids))]
    for number, (overlay, k) in enumerate(zip(inputs.overlays, inputs.key_slices, strict=True), start=1):
        rgb = read_overlay_rgb(overlay)
        datasets.append((f"sc_{number:02d}.dcm", _build_sc(inputs, rgb, headers[k], k, number, uids)))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, ds in datasets:
        path = out_dir / name
        _save(ds, path)
        written.append(path)
    keep = {p.name for p in written}
    for stale in out_dir.iterdir():
        if _SC_NAME.match(stale.name) and stale.name not in keep:
            stale.unlink()
    return written
