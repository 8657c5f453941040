"""Synthetic hospitals that write real CT DICOM: chest phantom, DICOM writer, non-IID federation."""

from synthetic.dicom_writer import PatientIdentity, write_ct_series
from synthetic.hospitals import (
    FederationSummary,
    SiteProfile,
    SiteSummary,
    default_profiles,
    write_federation,
)
from synthetic.phantom import DIAGNOSES, chest_phantom

__all__ = [
    "DIAGNOSES",
    "FederationSummary",
    "PatientIdentity",
    "SiteProfile",
    "SiteSummary",
    "chest_phantom",
    "default_profiles",
    "write_ct_series",
    "write_federation",
]
