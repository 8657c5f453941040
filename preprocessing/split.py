"""Deterministic train/validation/test split by patient, stratified by diagnosis.

All studies of one patient fall in the same split. The order inside each class comes from the
patients' keyed pseudonyms, so the split is stable at a site and unrelated to file or scan order.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitConfig:
    """Fractions of patients for validation and test; the rest train."""

    val_fraction: float = 0.2
    test_fraction: float = 0.2

    def __post_init__(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0 <= self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in [0, 1), got {self.test_fraction}")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"val_fraction + test_fraction must be < 1, got {self.val_fraction + self.test_fraction}")


def assign_splits(patient_strata: Mapping[str, int | None], config: SplitConfig | None = None) -> dict[str, str]:
    """Map each patient pseudonym to 'train', 'val' or 'test'.

    ``patient_strata`` maps patient pseudonym -> stratum (diagnosis index, or None when unlabelled).
    In each stratum with at least 3 patients, val and test get at least one patient each when their
    fraction is non-zero.
    """
    cfg = config or SplitConfig()
    by_stratum: dict[int | None, list[str]] = defaultdict(list)
    for patient, stratum in patient_strata.items():
        by_stratum[stratum].append(patient)
    result: dict[str, str] = {}
    for stratum in sorted(by_stratum, key=lambda s: -1 if s is None else s):
        patients = sorted(by_stratum[stratum])
        n = len(patients)
        n_test = round(n * cfg.test_fraction)
        n_val = round(n * cfg.val_fraction)
        if n >= 3:
            n_test = max(n_test, 1 if cfg.test_fraction > 0 else 0)
            n_val = max(n_val, 1 if cfg.val_fraction > 0 else 0)
        n_test = min(n_test, n - 1) if n > 1 else 0
        n_val = min(n_val, n - 1 - n_test) if n > 1 else 0
        for i, patient in enumerate(patients):
            result[patient] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return result
