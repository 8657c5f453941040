"""Synthetic hospitals that write real CT DICOM: chest phantom, DICOM writer, non-IID federation."""

from synthetic.dicom_writer import PatientIdentity, write_ct_series
from synthetic.hospitals import (
    FederationSummary,
    SiteProfile,
    SiteSummary,
    default_profiles,
    write_federation,
)
from synthetic.masks import LESION_MASK_DIR, series_ras_affine, write_lesion_mask
from synthetic.phantom import DIAGNOSES, PhantomStudy, chest_phantom, render_chest

__all__ = [
    "DIAGNOSES",
    "FederationSummary",
    "LESION_MASK_DIR",
    "PatientIdentity",
    "PhantomStudy",
    "SiteProfile",
    "SiteSummary",
    "chest_phantom",
    "default_profiles",
    "render_chest",
    "series_ras_affine",
    "write_ct_series",
    "write_federation",
    "write_lesion_mask",
]
