"""De-identify DICOM files for hand-over to a research environment (DICOM PS3.15 Annex E).

Implements the **Basic Application Level Confidentiality Profile** (PS3.15 E.2, Table E.1-1) with two
of its options, for single-frame and multi-frame *image* objects (CT, MR, ...):

* **Retain Longitudinal Temporal Information with Modified Dates** (code 113107): every date is moved
  back by a per-patient offset of 1..365 days derived from the site key and the original PatientID,
  the same offset for every date of that patient, so intervals (study to study, series to series,
  acquisition to acquisition) are kept exactly. Because the shift is a whole number of days, *times*
  (StudyTime, SeriesTime, AcquisitionTime, ContentTime, ...) are kept unchanged; a DateTime (DT) has its
  date part shifted, its time kept and its UTC offset suffix dropped (TimezoneOffsetFromUTC is removed).
  PatientBirthDate is *not* shifted but emptied (the profile's Z; the option does not cover it);
  PatientAge is kept instead, see below.
* **Retain Patient Characteristics** (code 113108), restricted to what a CT model may need:
  PatientSex, PatientAge, PatientSize and PatientWeight are kept. PatientAge above 89 years is written
  as ``090Y`` (the HIPAA Safe Harbor "90 or older" bucket: very old patients are few and findable).
  EthnicGroup, SmokingStatus, PregnancyStatus etc., which the option would allow, are removed.

Action codes (PS3.15 Table E.1-1): ``X`` remove, ``Z`` zero-length value, ``D`` dummy value, ``K`` keep,
``U`` replace a UID by a new one, ``C`` clean (here: dates shifted, age capped). :data:`PROFILE_ACTIONS`
lists, per attribute, the profile's action and the one applied. Where the profile leaves a choice
(``X/Z``, ``X/D``, ``X/Z/D``) the applied action is ``X`` for attributes that are optional (Type 3) in
CT/MR image IODs and ``Z`` for Type 2 ones. Free text (StudyDescription, SeriesDescription,
ProtocolName, ImageComments, ...) is removed, as the profile says (X). ContrastBolusAgent is emptied (Z).
Equipment make and model (Manufacturer, ManufacturerModelName, SoftwareVersions) are not in the
table and are kept; InstitutionName, StationName and DeviceSerialNumber are removed.

Identifiers: PatientName and PatientID both become the site pseudonym of the original PatientID,
``Pseudonymizer(site_key)("patient", PatientID)`` (the same pseudonym ``fedct ingest`` uses, including
its fallback to the StudyInstanceUID when PatientID is empty; the date offset uses the same value). Every
instance UID (Study/Series/SOP Instance, FrameOfReference, ReferencedSOPInstanceUID inside sequences,
MediaStorageSOPInstanceUID, ...) is replaced by ``generate_uid(entropy_srcs=[HMAC-SHA256(site_key, uid)])``:
the same original UID always gives the same new UID (references between files stay valid, re-runs
give identical files), a different site key gives unrelated UIDs, and the original cannot be recovered
without the key.

Beyond the table, these rules apply to every standard attribute not listed (at every nesting level):
person names (PN) are emptied, dates (DA/DT) are shifted, UIDs (UI) that are not UIDs defined by the
DICOM standard (SOP classes, transfer syntaxes, ...) are replaced, free text (LT/ST/UT), application
entity titles (AE) and values of unknown type (UN) are removed. Private attributes are removed (the
profile's default) unless ``keep_private_tags`` is set, which makes the result *not* conformant and says
so in DeidentificationMethod. Overlay (60xx) and curve (50xx) groups and group lengths are removed; the
128-byte preamble is zeroed and the File Meta Information is rebuilt (SourceApplicationEntityTitle and
the original implementation UIDs dropped). Sequences are processed recursively.

The output gets PatientIdentityRemoved = YES, LongitudinalTemporalInformationModified = MODIFIED,
DeidentificationMethod (text) and DeidentificationMethodCodeSequence (113100, 113107, 113108; DCM).

**Pixel data is not touched.** Text burned into the pixels (e.g. dose screens, scanned requests) is out
of scope: files that declare BurnedInAnnotation = YES and Secondary Capture images (where burned-in
text is the norm) are refused, and files without pixel data (structured reports, presentation states,
DICOMDIR) are refused too, since their content items were not reviewed for this profile. Anything else
is the site's responsibility to check before release.

``DeidResult.files_skipped`` names *input* paths, which may themselves contain identifiers: it is a
report for the site, not something to hand over with the data.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import hmac
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels.utils import get_expected_length
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from preprocessing.deid import Pseudonymizer

__all__ = [
    "DEIDENTIFICATION_CODES",
    "PROFILE_ACTIONS",
    "SKIP_REASONS",
    "DeidResult",
    "DeidentificationRefused",
    "date_shift_days",
    "deidentify_dataset",
    "deidentify_folder",
    "new_uid",
]

#: Version of these rules, written into DeidentificationMethod.
RULES_VERSION = "fedct deidentify v1"

#: Largest backwards date shift in days (the shift is 1..MAX_DATE_SHIFT_DAYS days into the past).
MAX_DATE_SHIFT_DAYS = 365

#: Ages above this many years are written as ``090Y``.
MAX_REPORTED_AGE_YEARS = 89

# keyword: (action in the Basic Profile column of Table E.1-1, action applied here).
# Applied actions differ from the profile's only where an option (113107 dates, 113108 patient
# characteristics) or the choice the profile leaves (X/Z/D, see module docstring) allows it.
PROFILE_ACTIONS: dict[str, tuple[str, str]] = {
    # --- Patient -------------------------------------------------------------------------------
    "PatientName": ("Z", "D"),  # site pseudonym of PatientID (a dummy value, allowed by Z)
    "PatientID": ("Z/D", "D"),  # site pseudonym
    "IssuerOfPatientID": ("X", "X"),
    "IssuerOfPatientIDQualifiersSequence": ("X", "X"),
    "OtherPatientIDs": ("X", "X"),
    "OtherPatientIDsSequence": ("X", "X"),
    "OtherPatientNames": ("X", "X"),
    "PatientBirthName": ("X", "X"),
    "PatientMotherBirthName": ("X", "X"),
    "PatientBirthDate": ("Z", "Z"),
    "PatientBirthTime": ("X", "X"),
    "PatientSex": ("Z", "K"),  # 113108 Retain Patient Characteristics
    "PatientAge": ("X", "C"),  # 113108; ages > 89Y written as 090Y
    "PatientSize": ("X", "K"),  # 113108
    "PatientWeight": ("X", "K"),  # 113108
    "PatientAddress": ("X", "X"),
    "PatientTelephoneNumbers": ("X", "X"),
    "PatientTelecomInformation": ("X", "X"),
    "CountryOfResidence": ("X", "X"),
    "RegionOfResidence": ("X", "X"),
    "MilitaryRank": ("X", "X"),
    "BranchOfService": ("X", "X"),
    "MedicalRecordLocator": ("X", "X"),
    "EthnicGroup": ("X", "X"),  # 113108 would allow K; not needed, removed
    "Occupation": ("X", "X"),
    "PatientReligiousPreference": ("X", "X"),
    "AdditionalPatientHistory": ("X", "X"),
    "PatientComments": ("X", "X"),
    "MedicalAlerts": ("X", "X"),
    "Allergies": ("X", "X"),
    "SmokingStatus": ("X", "X"),
    "PregnancyStatus": ("X", "X"),
    "LastMenstrualDate": ("X", "X"),
    "PatientSexNeutered": ("X/Z", "X"),
    "PatientInsurancePlanCodeSequence": ("X", "X"),
    "InsurancePlanIdentification": ("X", "X"),
    "PatientPrimaryLanguageCodeSequence": ("X", "X"),
    "ResponsiblePerson": ("X", "X"),
    "ResponsibleOrganization": ("X", "X"),
    "ReferencedPatientSequence": ("X", "X"),
    "ReferencedPatientPhotoSequence": ("X", "X"),
    "ReferencedPatientAliasSequence": ("X", "X"),
    "PatientState": ("X", "X"),
    "SpecialNeeds": ("X", "X"),
    "PatientTransportArrangements": ("X", "X"),
    # --- Clinical trial (the whole modules go: they name sponsors, sites and subjects) ------------
    "ClinicalTrialSponsorName": ("D", "X"),
    "ClinicalTrialProtocolID": ("D", "X"),
    "ClinicalTrialProtocolName": ("Z", "X"),
    "ClinicalTrialSiteID": ("Z", "X"),
    "ClinicalTrialSiteName": ("Z", "X"),
    "ClinicalTrialSubjectID": ("D", "X"),
    "ClinicalTrialSubjectReadingID": ("D", "X"),
    "ClinicalTrialTimePointID": ("Z", "X"),
    "ClinicalTrialTimePointDescription": ("X", "X"),
    "ClinicalTrialCoordinatingCenterName": ("Z", "X"),
    "ClinicalTrialSeriesID": ("X", "X"),
    "ClinicalTrialSeriesDescription": ("X", "X"),
    # --- Visit / admission ---------------------------------------------------------------------
    "AdmissionID": ("X", "X"),
    "IssuerOfAdmissionID": ("X", "X"),
    "IssuerOfAdmissionIDSequence": ("X", "X"),
    "AdmittingDate": ("X", "X"),
    "AdmittingTime": ("X", "X"),
    "AdmittingDiagnosesDescription": ("X", "X"),
    "AdmittingDiagnosesCodeSequence": ("X", "X"),
    "DischargeDate": ("X", "X"),
    "DischargeTime": ("X", "X"),
    "DischargeDiagnosisDescription": ("X", "X"),
    "CurrentPatientLocation": ("X", "X"),
    "PatientInstitutionResidence": ("X", "X"),
    "ServiceEpisodeID": ("X", "X"),
    "ServiceEpisodeDescription": ("X", "X"),
    "IssuerOfServiceEpisodeID": ("X", "X"),
    "VisitComments": ("X", "X"),
    "ReasonForVisit": ("X", "X"),
    "ReasonForVisitCodeSequence": ("X", "X"),
    # --- Study ---------------------------------------------------------------------------------
    "StudyInstanceUID": ("U", "U"),
    "StudyDate": ("Z", "C"),  # 113107: shifted
    "StudyTime": ("Z", "K"),  # 113107: whole-day shift leaves the time of day unchanged
    "AccessionNumber": ("Z", "Z"),
    "StudyID": ("Z", "Z"),
    "StudyIDIssuer": ("X", "X"),
    "StudyDescription": ("X", "X"),
    "StudyComments": ("X", "X"),
    "ReferringPhysicianName": ("Z", "Z"),
    "ReferringPhysicianAddress": ("X", "X"),
    "ReferringPhysicianTelephoneNumbers": ("X", "X"),
    "ReferringPhysicianIdentificationSequence": ("X", "X"),
    "ConsultingPhysicianName": ("Z", "Z"),
    "ConsultingPhysicianIdentificationSequence": ("X", "X"),
    "PhysiciansOfRecord": ("X", "X"),
    "PhysiciansOfRecordIdentificationSequence": ("X", "X"),
    "NameOfPhysiciansReadingStudy": ("X", "X"),
    "PhysiciansReadingStudyIdentificationSequence": ("X", "X"),
    "RequestingPhysician": ("X", "X"),
    "RequestingService": ("X", "X"),
    "ReasonForStudy": ("X", "X"),
    "RequestedProcedureDescription": ("X/Z", "X"),
    "RequestedContrastAgent": ("X", "X"),
    "ReferencedStudySequence": ("X/Z", "X"),
    "StudyArrivalDate": ("X", "X"),
    "StudyArrivalTime": ("X", "X"),
    "StudyCompletionDate": ("X", "X"),
    "StudyCompletionTime": ("X", "X"),
    "StudyVerifiedDate": ("X", "X"),
    "StudyVerifiedTime": ("X", "X"),
    "StudyReadDate": ("X", "X"),
    "StudyReadTime": ("X", "X"),
    "ScheduledStudyStartDate": ("X", "X"),
    "ScheduledStudyStartTime": ("X", "X"),
    "ScheduledStudyLocation": ("X", "X"),
    "ScheduledStudyLocationAETitle": ("X", "X"),
    # --- Series / procedure steps / requests ---------------------------------------------------
    "SeriesInstanceUID": ("U", "U"),
    "SeriesDate": ("X/D", "C"),  # 113107: shifted
    "SeriesTime": ("X/D", "K"),
    "SeriesDescription": ("X", "X"),
    "ProtocolName": ("X/D", "X"),
    "PerformingPhysicianName": ("X", "X"),
    "PerformingPhysicianIdentificationSequence": ("X", "X"),
    "OperatorsName": ("X/Z/D", "X"),
    "OperatorIdentificationSequence": ("X/D", "X"),
    "ReferencedPerformedProcedureStepSequence": ("X/Z/D", "X"),
    "RequestAttributesSequence": ("X", "X"),
    "RequestedProcedureID": ("X", "X"),
    "RequestedProcedureComments": ("X", "X"),
    "RequestedProcedureLocation": ("X", "X"),
    "ReasonForTheRequestedProcedure": ("X", "X"),
    "ReasonForRequestedProcedureCodeSequence": ("X", "X"),
    "PlacerOrderNumberImagingServiceRequest": ("Z", "Z"),
    "FillerOrderNumberImagingServiceRequest": ("Z", "Z"),
    "ImagingServiceRequestComments": ("X", "X"),
    "ReasonForTheImagingServiceRequest": ("X", "X"),
    "IssueDateOfImagingServiceRequest": ("X", "X"),
    "IssueTimeOfImagingServiceRequest": ("X", "X"),
    "OrderEnteredBy": ("X", "X"),
    "OrderEntererLocation": ("X", "X"),
    "OrderCallbackPhoneNumber": ("X", "X"),
    "OrderCallbackTelecomInformation": ("X", "X"),
    "ScheduledProcedureStepID": ("X", "X"),
    "ScheduledProcedureStepDescription": ("X", "X"),
    "ScheduledProcedureStepStartDate": ("X", "X"),
    "ScheduledProcedureStepStartTime": ("X", "X"),
    "ScheduledProcedureStepEndDate": ("X", "X"),
    "ScheduledProcedureStepEndTime": ("X", "X"),
    "ScheduledProcedureStepLocation": ("X", "X"),
    "ScheduledPerformingPhysicianName": ("X", "X"),
    "ScheduledPerformingPhysicianIdentificationSequence": ("X", "X"),
    "ScheduledStationAETitle": ("X", "X"),
    "ScheduledStationName": ("X", "X"),
    "PerformedProcedureStepID": ("X", "X"),
    "PerformedProcedureStepDescription": ("X", "X"),
    "PerformedProcedureStepStartDate": ("X", "X"),
    "PerformedProcedureStepStartTime": ("X", "X"),
    "PerformedProcedureStepEndDate": ("X", "X"),
    "PerformedProcedureStepEndTime": ("X", "X"),
    "PerformedLocation": ("X", "X"),
    "PerformedStationAETitle": ("X", "X"),
    "PerformedStationName": ("X", "X"),
    "CommentsOnThePerformedProcedureStep": ("X", "X"),
    "ActualHumanPerformersSequence": ("X", "X"),
    "HumanPerformerName": ("X", "X"),
    "HumanPerformerOrganization": ("X", "X"),
    # --- Equipment / institution ---------------------------------------------------------------
    "InstitutionName": ("X/Z/D", "X"),
    "InstitutionAddress": ("X", "X"),
    "InstitutionCodeSequence": ("X/Z/D", "X"),
    "InstitutionalDepartmentName": ("X", "X"),
    "InstitutionalDepartmentTypeCodeSequence": ("X", "X"),
    "StationName": ("X/Z/D", "X"),
    "StationAETitle": ("X", "X"),
    "RetrieveAETitle": ("X", "X"),
    "NetworkID": ("X", "X"),
    "DeviceSerialNumber": ("X/Z/D", "X"),
    "DeviceUID": ("U", "U"),
    "UniqueDeviceIdentifier": ("X", "X"),
    "UDISequence": ("X", "X"),
    "GantryID": ("X", "X"),
    "GeneratorID": ("X", "X"),
    "DetectorID": ("X/D", "X"),
    "PlateID": ("X", "X"),
    "CassetteID": ("X", "X"),
    "DateOfLastCalibration": ("X", "X"),
    "TimeOfLastCalibration": ("X", "X"),
    "DateOfLastDetectorCalibration": ("X/D", "X"),
    "TimeOfLastDetectorCalibration": ("X/D", "X"),
    "DateOfManufacture": ("X", "X"),
    "DateOfInstallation": ("X", "X"),
    "AcquisitionDeviceProcessingDescription": ("X/D", "X"),
    # --- Image / instance ----------------------------------------------------------------------
    "SOPInstanceUID": ("U", "U"),
    "FrameOfReferenceUID": ("U", "U"),
    "SynchronizationFrameOfReferenceUID": ("U", "U"),
    "InstanceCreatorUID": ("U", "U"),
    "InstanceCreationDate": ("X/D", "C"),  # 113107: shifted
    "InstanceCreationTime": ("X/Z/D", "K"),
    "InstanceCoercionDateTime": ("X", "X"),
    "AcquisitionDate": ("X/Z", "C"),  # 113107: shifted
    "AcquisitionTime": ("X/Z", "K"),
    "AcquisitionDateTime": ("X/Z/D", "C"),  # 113107: date part shifted
    "ContentDate": ("Z/D", "C"),  # 113107: shifted
    "ContentTime": ("Z/D", "K"),
    "TimezoneOffsetFromUTC": ("X", "X"),
    "AcquisitionUID": ("U", "U"),
    "IrradiationEventUID": ("U", "U"),
    "ConcatenationUID": ("U", "U"),
    "DimensionOrganizationUID": ("U", "U"),
    "ReferencedSOPInstanceUID": ("U", "U"),
    "ReferencedFrameOfReferenceUID": ("U", "U"),
    "RelatedFrameOfReferenceUID": ("U", "U"),
    "SourceFrameOfReferenceUID": ("U", "U"),
    "StorageMediaFileSetUID": ("U", "U"),
    "ReferencedImageSequence": ("X/Z/U*", "U"),  # kept, the UIDs inside replaced
    "SourceImageSequence": ("X/Z/U*", "U"),  # kept, the UIDs inside replaced
    "ImageComments": ("X", "X"),
    "FrameComments": ("X", "X"),
    "AcquisitionComments": ("X", "X"),
    "AcquisitionProtocolDescription": ("X", "X"),
    "DerivationDescription": ("X", "X"),
    "ImagePresentationComments": ("X", "X"),
    "IdentifyingComments": ("X", "X"),
    "AcquisitionContextSequence": ("X/Z", "X"),
    "ContrastBolusAgent": ("Z/D", "Z"),
    "ContrastBolusStartTime": ("X", "X"),
    "ContrastBolusStopTime": ("X", "X"),
    "CommentsOnRadiationDose": ("X", "X"),
    "IconImageSequence": ("X", "X"),  # a thumbnail may show burned-in text
    "ModifiedImageDate": ("X", "X"),
    "ModifiedImageTime": ("X", "X"),
    "ModifiedImageDescription": ("X", "X"),
    "ModifyingDeviceID": ("X", "X"),
    "DateOfSecondaryCapture": ("X", "X"),
    "TimeOfSecondaryCapture": ("X", "X"),
    "OriginalAttributesSequence": ("X", "X"),  # holds the values before earlier edits
    "ModifiedAttributesSequence": ("X", "X"),
    "DigitalSignaturesSequence": ("X", "X"),
    "DataSetTrailingPadding": ("X", "X"),
    "TextComments": ("X", "X"),
    "TextString": ("X", "X"),
}

#: Codes written into DeidentificationMethodCodeSequence (scheme DCM, PS3.16 CID 7050).
DEIDENTIFICATION_CODES: tuple[tuple[str, str], ...] = (
    ("113100", "Basic Application Confidentiality Profile"),
    ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    ("113108", "Retain Patient Characteristics Option"),
)

#: Reason codes in ``DeidResult.files_skipped``.
SKIP_REASONS = (
    "not_dicom",  # no DICOM file preamble / meta information
    "unreadable",  # DICOM, but the file could not be parsed or ends early (truncated pixel data)
    "dicomdir",  # a media directory: it indexes the original, identifying folder
    "not_an_image",  # no pixel data (SR, presentation state, ...): content not reviewed for this profile
    "burned_in_annotation",  # BurnedInAnnotation = YES: the pixels themselves identify the patient
    "secondary_capture",  # Secondary Capture image: burned-in text (dose screens, scans) is the norm
    "missing_uid",  # no Study/Series/SOP Instance UID to build the output path from
    "duplicate_sop_instance",  # a second file with a SOP Instance UID already written in this run
    "deid_error",  # an attribute could not be decoded or rewritten
)

#: Secondary Capture Image Storage and the four Multi-frame Secondary Capture classes.
_SECONDARY_CAPTURE_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.7", *(f"1.2.840.10008.5.1.4.1.1.7.{i}" for i in range(1, 5))})
_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_KEEP_UI_KEYWORDS = frozenset({"TransferSyntaxUID", "CodingSchemeUID"})  # plus every "*ClassUID"
_FREE_TEXT_VRS = frozenset({"LT", "ST", "UT"})


def _resolve(keyword: str) -> BaseTag:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(f"PROFILE_ACTIONS names an unknown DICOM keyword: {keyword!r}")
    return Tag(tag)


_ACTIONS_BY_TAG: dict[BaseTag, str] = {_resolve(kw): applied for kw, (_, applied) in PROFILE_ACTIONS.items()}
_PATIENT_NAME = _resolve("PatientName")
_PATIENT_ID = _resolve("PatientID")


class DeidentificationRefused(ValueError):
    """The dataset cannot be de-identified by header rules alone; ``reason`` is a SKIP_REASONS code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class DeidResult:
    """What :func:`deidentify_folder` did. ``files_skipped`` holds (input path relative to the input
    folder, reason code); those paths may contain identifiers and stay at the site."""

    files_written: int
    files_skipped: tuple[tuple[str, str], ...]
    studies: int
    seconds: float


# ---------------------------------------------------------------------------------------------------
# Keyed, deterministic replacements
# ---------------------------------------------------------------------------------------------------


def _check_key(site_key: bytes) -> bytes:
    Pseudonymizer(site_key)  # raises ValueError for keys shorter than 32 bytes
    return bytes(site_key)


def _derive_uid(site_key: bytes, uid: str) -> str:
    digest = hmac.new(site_key, f"uid:{uid}".encode(), hashlib.sha256).hexdigest()
    return str(generate_uid(entropy_srcs=[digest]))


def new_uid(site_key: bytes, uid: str) -> str:
    """The replacement for ``uid``: the same for the same key and UID, unrelated for another key."""
    return _derive_uid(_check_key(site_key), str(uid).strip(" \0"))


def date_shift_days(site_key: bytes, patient_id: str) -> int:
    """Days (negative, -1..-365) that every date of the patient with original ``patient_id`` is moved."""
    digest = hmac.new(_check_key(site_key), f"date-shift:{patient_id}".encode(), hashlib.sha256).digest()
    return -(1 + int.from_bytes(digest[:8], "big") % MAX_DATE_SHIFT_DAYS)


def _shift_date(value: str, days: int) -> str:
    """Shift a DA value (``YYYYMMDD``; old ``YYYY.MM.DD`` accepted); '' when it cannot be parsed."""
    text = value.strip().replace(".", "")
    if not re.fullmatch(r"\d{8}", text):
        return ""
    try:
        day = _dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
        return (day + _dt.timedelta(days=days)).strftime("%Y%m%d")
    except (ValueError, OverflowError):
        return ""


def _shift_datetime(value: str, days: int) -> str:
    """Shift the date part of a DT value, keep the time, drop any UTC offset; '' when unparseable."""
    match = re.fullmatch(r"(\d{8})(\d{0,6}(?:\.\d{1,6})?)([+-]\d{4})?", value.strip())
    if not match:
        return ""
    date = _shift_date(match.group(1), days)
    return date + match.group(2) if date else ""


def _cap_age(value: str) -> str:
    match = re.fullmatch(r"(\d{3})Y", value.strip())
    if match and int(match.group(1)) > MAX_REPORTED_AGE_YEARS:
        return f"{MAX_REPORTED_AGE_YEARS + 1:03d}Y"
    return value


def _is_standard_uid(value: str) -> bool:
    """True for UIDs the DICOM standard itself defines (SOP classes, transfer syntaxes, ...)."""
    return UID(value).name != value


# ---------------------------------------------------------------------------------------------------
# Dataset rules
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    key: bytes
    pseudonymizer: Pseudonymizer
    patient_pseudonym: str
    shift_days: int
    keep_private: bool


def _values(value) -> list:
    return list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]


def _map_values(elem, func) -> None:
    value = elem.value
    if value is None or value == "":
        return
    if isinstance(value, (list, tuple, MultiValue)):
        elem.value = [func(str(v)) for v in value]
    else:
        elem.value = func(str(value))


def _apply(ds: Dataset, tag: BaseTag, action: str, ctx: _Context) -> None:
    elem = ds[tag]
    vr = elem.VR
    if action == "X":
        del ds[tag]
    elif action == "Z":
        elem.value = elem.empty_value
    elif action == "K":
        pass
    elif action == "U":
        if vr == "UI":
            _map_values(elem, lambda v: _derive_uid(ctx.key, v.strip(" \0")) if v.strip(" \0") else v)
        # U* on a sequence: kept; the UIDs inside are handled when it is recursed into
    elif action == "C":
        if vr == "DA":
            _map_values(elem, lambda v: _shift_date(v, ctx.shift_days))
        elif vr == "DT":
            _map_values(elem, lambda v: _shift_datetime(v, ctx.shift_days))
        elif vr == "AS":
            _map_values(elem, _cap_age)
        # TM: kept, the shift is a whole number of days
    elif action == "D":
        if tag == _PATIENT_NAME:
            elem.value = ctx.patient_pseudonym
        elif tag == _PATIENT_ID:
            elem.value = ctx.pseudonymizer("patient", str(elem.value or ""))
        elif vr == "UI":
            _apply(ds, tag, "U", ctx)
        elif vr in ("DA", "DT"):
            _apply(ds, tag, "C", ctx)
        elif vr in ("PN", "LO", "SH", "CS", "LT", "ST", "UT", "UC"):
            elem.value = "ANONYMIZED"
        elif vr != "SQ":
            elem.value = elem.empty_value
    else:  # pragma: no cover - guarded by a test over PROFILE_ACTIONS
        raise ValueError(f"unknown action {action!r}")


def _default_action(elem) -> str:
    """Action for a standard attribute that PROFILE_ACTIONS does not list."""
    vr = elem.VR
    if vr == "PN":
        return "Z"
    if vr in ("DA", "DT"):
        return "C"
    if vr == "UI":
        keyword = elem.keyword or ""
        if keyword.endswith("ClassUID") or keyword in _KEEP_UI_KEYWORDS:
            return "K"
        return "K" if all(v in (None, "") or _is_standard_uid(str(v)) for v in _values(elem.value)) else "U"
    if vr in _FREE_TEXT_VRS or vr in ("AE", "UN"):
        return "X"
    return "K"


def _clean(ds: Dataset, ctx: _Context) -> None:
    for tag in list(ds.keys()):
        tag = Tag(tag)
        if tag.is_private:
            if not ctx.keep_private:
                del ds[tag]
            elif ds[tag].VR == "SQ":
                for item in ds[tag].value or ():
                    _clean(item, ctx)
            continue
        if tag.element == 0 or (tag.group & 0xFF00) in (0x5000, 0x6000):
            del ds[tag]  # group lengths (stale after editing), curves and overlays (may hold text)
            continue
        elem = ds[tag]
        action = _ACTIONS_BY_TAG.get(tag) or _default_action(elem)
        _apply(ds, tag, action, ctx)
        if tag in ds and ds[tag].VR == "SQ":
            for item in ds[tag].value or ():
                _clean(item, ctx)


def _check_releasable(ds: Dataset) -> None:
    meta = getattr(ds, "file_meta", None) or Dataset()
    sop_class = str(ds.get("SOPClassUID", "") or meta.get("MediaStorageSOPClassUID", "") or "")
    if sop_class == _MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
        raise DeidentificationRefused("dicomdir", "a DICOMDIR indexes the original folder and is not copied")
    if not any(kw in ds for kw in _PIXEL_KEYWORDS):
        raise DeidentificationRefused("not_an_image", "no pixel data: only image objects are de-identified")
    if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        raise DeidentificationRefused("burned_in_annotation", "BurnedInAnnotation is YES: the pixels identify the patient")
    if sop_class in _SECONDARY_CAPTURE_CLASSES:
        raise DeidentificationRefused("secondary_capture", "Secondary Capture images often carry burned-in text")


def _method_text(keep_private_tags: bool) -> list[str]:
    return [
        "DICOM PS3.15 Basic Application Confidentiality Profile",
        "Retain Longitudinal Temporal Info Modified Dates",
        "Retain Patient Characteristics (sex, age, size, weight)",
        "Private attributes retained (not profile conformant)" if keep_private_tags else "Private attributes removed",
        RULES_VERSION,
    ]


def _mark(ds: Dataset, keep_private_tags: bool) -> None:
    ds.PatientIdentityRemoved = "YES"
    ds.LongitudinalTemporalInformationModified = "MODIFIED"
    ds.DeidentificationMethod = _method_text(keep_private_tags)
    items = []
    for value, meaning in DEIDENTIFICATION_CODES:
        item = Dataset()
        item.CodeValue = value
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = meaning
        items.append(item)
    ds.DeidentificationMethodCodeSequence = Sequence(items)


def _rebuild_file_meta(ds: Dataset, original: FileMetaDataset | None) -> None:
    transfer_syntax = None
    if original is not None and "TransferSyntaxUID" in original:
        transfer_syntax = original.TransferSyntaxUID
    if transfer_syntax is None:
        implicit, little = getattr(ds, "original_encoding", (False, True))
        if implicit is None:
            implicit, little = False, True
        transfer_syntax = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID") or (original or Dataset()).get("MediaStorageSOPClassUID", "")
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "")
    meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta = meta  # pydicom adds its own Implementation Class UID / Version Name when writing


def _deidentify_in_place(ds: Dataset, *, site_key: bytes, keep_private_tags: bool) -> Dataset:
    key = _check_key(site_key)
    _check_releasable(ds)
    pseudonymizer = Pseudonymizer(key)
    # as in ingest: a file without PatientID is its study's own patient, not one shared "unknown" patient
    patient_id = str(ds.get("PatientID", "") or "").strip() or str(ds.get("StudyInstanceUID", "") or "")
    ctx = _Context(
        key=key,
        pseudonymizer=pseudonymizer,
        patient_pseudonym=pseudonymizer("patient", patient_id),
        shift_days=date_shift_days(key, patient_id),
        keep_private=keep_private_tags,
    )
    original_meta = getattr(ds, "file_meta", None)
    _clean(ds, ctx)
    # Type 2 patient attributes always present, carrying the pseudonym
    ds.PatientName = ctx.patient_pseudonym
    ds.PatientID = ctx.patient_pseudonym
    _mark(ds, keep_private_tags)
    _rebuild_file_meta(ds, original_meta)
    if hasattr(ds, "preamble"):
        ds.preamble = b"\x00" * 128
    return ds


def deidentify_dataset(ds: Dataset, *, site_key: bytes, keep_private_tags: bool = False) -> Dataset:
    """Return a de-identified copy of ``ds`` (``ds`` itself is not modified).

    Raises :class:`DeidentificationRefused` (a ValueError, with ``.reason``) for objects that header
    rules cannot make safe: BurnedInAnnotation = YES, Secondary Capture, no pixel data, DICOMDIR.
    Raises ValueError for a site key shorter than 32 bytes.
    """
    return _deidentify_in_place(copy.deepcopy(ds), site_key=site_key, keep_private_tags=keep_private_tags)


# ---------------------------------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------------------------------


def _iter_files(root: Path) -> Iterator[Path]:
    """Every regular file under ``root`` (hidden ones included: they are reported, not silently lost)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_file():
                yield path


def _is_truncated(ds: Dataset) -> bool:
    """True when the file ended early: pydicom then returns what it read without complaint."""
    if len(ds) == 0:
        return True
    meta = getattr(ds, "file_meta", None) or Dataset()
    syntax = meta.get("TransferSyntaxUID")
    if "PixelData" not in ds or syntax is None or UID(syntax).is_compressed:
        return False
    try:
        return len(ds.PixelData) < get_expected_length(ds, unit="bytes")
    except Exception:  # attributes needed for the length missing or malformed
        return True


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def deidentify_folder(
    input_dir: Path,
    out_dir: Path,
    *,
    site_key: bytes,
    keep_private_tags: bool = False,
    progress: bool = False,
) -> DeidResult:
    """De-identify every DICOM image under ``input_dir`` into ``out_dir``; the input is only read.

    Output files are named only by pseudonyms:
    ``out_dir/<patient pseudonym>/<new StudyInstanceUID>/<new SeriesInstanceUID>/<new SOPInstanceUID>.dcm``.
    Files are visited in sorted order, so a re-run with the same key writes identical files to identical
    paths (existing files there are replaced). Files that are not DICOM, cannot be read or are refused
    are listed in ``files_skipped`` with a reason code from :data:`SKIP_REASONS`.

    Raises FileNotFoundError when ``input_dir`` is not a folder, ValueError when ``out_dir`` is
    ``input_dir`` or inside it, or when the key is shorter than 32 bytes.
    """
    started = time.perf_counter()
    input_dir = Path(input_dir)
    out_dir = Path(out_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"DICOM input folder does not exist: {input_dir}")
    if _is_within(out_dir.resolve(), input_dir.resolve()):
        raise ValueError(f"output folder {out_dir} must not be the input folder or inside it ({input_dir})")
    key = _check_key(site_key)

    files = list(_iter_files(input_dir))
    iterator = files
    if progress:
        from tqdm import tqdm

        iterator = tqdm(files, desc="de-identify", unit="file", leave=False)

    written = 0
    skipped: list[tuple[str, str]] = []
    studies: set[str] = set()
    seen_sops: set[str] = set()
    for path in iterator:
        rel = path.relative_to(input_dir).as_posix()
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:
            skipped.append((rel, "not_dicom"))
            continue
        except Exception:  # pydicom raises many types for damaged files
            skipped.append((rel, "unreadable"))
            continue
        try:
            if _is_truncated(ds):
                skipped.append((rel, "unreadable"))
                continue
            if any(not str(ds.get(kw, "") or "").strip() for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")):
                _check_releasable(ds)  # a more telling reason first (e.g. DICOMDIR has no SOP Instance UID)
                skipped.append((rel, "missing_uid"))
                continue
            _deidentify_in_place(ds, site_key=key, keep_private_tags=keep_private_tags)
        except DeidentificationRefused as exc:
            skipped.append((rel, exc.reason))
            continue
        except Exception:
            skipped.append((rel, "deid_error"))
            continue
        sop = str(ds.SOPInstanceUID)
        if sop in seen_sops:
            skipped.append((rel, "duplicate_sop_instance"))
            continue
        target = out_dir / str(ds.PatientID) / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID) / f"{sop}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".partial")
        try:
            ds.save_as(tmp, enforce_file_format=True)
            os.replace(tmp, target)
        except Exception:
            tmp.unlink(missing_ok=True)
            skipped.append((rel, "deid_error"))
            continue
        seen_sops.add(sop)
        studies.add(str(ds.StudyInstanceUID))
        written += 1
    return DeidResult(
        files_written=written,
        files_skipped=tuple(skipped),
        studies=len(studies),
        seconds=time.perf_counter() - started,
    )
