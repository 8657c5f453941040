"""Deterministic train/validation/test split by patient, stratified by diagnosis.

All studies of one patient fall in the same split. The order inside each class comes from the
patients' keyed pseudonyms, so the split is stable at a site and unrelated to file or scan order.

The fractions are the site's: :func:`site_split` fixes them once (the site env file's, or else the first
round's request) in ``SITE_DIR/split.json``; a server that later sends other fractions does not re-split the
site (re-splitting with changed fractions would move single patients between splits and let the server isolate
them by difference of the metrics).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from fedct.files import atomic_write_bytes

SPLITS = ("train", "val", "test")
#: The site's fixed split fractions, in the site's work folder.
SPLIT_FILE = "split.json"

log = logging.getLogger("fedct.split")


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


def _read_split_file(path: Path) -> SplitConfig:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return SplitConfig(val_fraction=float(data["val_fraction"]), test_fraction=float(data["test_fraction"]))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{path}: not a valid split file ({exc}); restore it, or delete it to fix the site's split "
            "again from the site env file"
        ) from exc


def _write_split_file(path: Path, split: SplitConfig) -> None:
    atomic_write_bytes(path, (json.dumps(asdict(split), indent=1) + "\n").encode("utf-8"))


def site_split(site_dir: Path, *, site_choice: SplitConfig | None, requested: SplitConfig | None = None) -> SplitConfig:
    """The split fractions this site uses, fixed once in ``SITE_DIR/split.json``.

    ``site_choice`` is the site's own setting (site env file); it wins and is recorded (a change of the site's own
    setting re-splits, at the site's decision, with a warning). Without one, the first ``requested`` fractions (the
    server's) are recorded and every later request is ignored. A request that differs from the fixed split is logged
    at the site and ignored: the server cannot re-split a site.
    """
    path = Path(site_dir) / SPLIT_FILE
    fixed = _read_split_file(path) if path.exists() else None
    if site_choice is not None and fixed != site_choice:
        if fixed is not None:
            log.warning(
                "the site's own split setting changed from %s to %s: re-splitting this site's patients",
                _text(fixed),
                _text(site_choice),
            )
        _write_split_file(path, site_choice)
        fixed = site_choice
    elif fixed is None:
        fixed = requested or SplitConfig()
        _write_split_file(path, fixed)
    if requested is not None and requested != fixed:
        log.warning(
            "the server asked for split %s; ignored: this site's split is fixed at %s (%s)",
            _text(requested),
            _text(fixed),
            path,
        )
    return fixed


def _text(split: SplitConfig) -> str:
    return f"val {split.val_fraction:g} / test {split.test_fraction:g}"
