"""Federated normalisation of the clinical/molecular profile (issue #24), server side.

Before round 1 of a run with ``profile-fusion`` other than "none", the server sends every connected site one evaluate
message without weights whose config asks for its profile statistics (:data:`fedct.protocol.PROFILE_STATISTICS`,
with the schema's variables). Each reply passes :func:`screen_profile_reply` (the site is who it says, exactly the
``metrics`` and ``site`` records, the statistics of :func:`preprocessing.profile_features.statistics_from_record`:
every count 0 or at least the privacy floor, sums consistent); the server pools them
(:meth:`preprocessing.profile_features.ProfileNormalisation.pooled`) into a mean and standard deviation per variable.
That normalisation rides on every later training/evaluation message (round settings), is written to the run folder
(``profile-normalisation.json``, reused on resume) and into every bundle (``model.json`` ``profile_normalisation``),
so prediction scales a study's profile exactly as training did.

Only aggregates travel: per variable a count (>= the floor, or 0), a sum and a sum of squares. Without secure
aggregation the server sees each site's aggregates. With ``secure-aggregation = true`` the exchange runs through
SecAgg+ instead (``fl_server.secagg.SecAggRoundLoop.pool_profile``, request :func:`secure_request_config`): each site
adds its statistics, scaled by the schema's ranges into whole-number limbs (:mod:`preprocessing.profile_secagg`), to
a masked sum; the server learns only the pooled rows, counts and scaled sums, exact up to each site's fixed-point
rounding of 2**-53 of a variable's range (the bounds on the mean and SD are recorded, :func:`secure_summary`). The
privacy floor is then enforced by the sites alone; the server checks the pooled counts (0 or >= the floor, at most
the pooled rows) and the sums' consistency, and refuses the whole sum when a check fails (it cannot tell whose
contribution is wrong).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedct.files import atomic_write_bytes
from fedct.protocol import METRICS_RECORD, PROFILE_SCHEMA, PROFILE_STATISTICS, PROFILE_VARIABLES, SITE_RECORD
from fl_server.config import SiteRegistry
from fl_server.recorder import RoundReport
from fl_server.validation import ReplyRejected, ScreenedReply, site_identity
from preprocessing.profile import ProfileSchema, ProfileStatistics
from preprocessing.profile_features import ProfileNormalisation, ProfileStatisticsError, statistics_from_record
from preprocessing.profile_secagg import FRACTION_BITS, LAYOUT_KEY, LIMB_BITS, SecureLayout, SecurePooled

#: File of the run folder holding the pooled normalisation (reused when the run resumes).
NORMALISATION_NAME = "profile-normalisation.json"


class ProfileNormalisationFailed(RuntimeError):
    """Too few sites sent usable profile statistics for a fused model (the message says how many and why)."""


def request_config(schema: ProfileSchema) -> ConfigRecord:
    """The ConfigRecord of the statistics request: the flag and the schema's name and variables (in order)."""
    return ConfigRecord(
        {
            PROFILE_STATISTICS: True,
            PROFILE_SCHEMA: f"{schema.name} v{schema.version}",
            PROFILE_VARIABLES: ",".join(schema.names),
        }
    )


def secure_request_config(schema: ProfileSchema) -> ConfigRecord:
    """The request of the SecAgg+ statistics exchange: :func:`request_config` plus the vector layout's signature
    (the site refuses a layout that is not its own schema's)."""
    record = request_config(schema)
    record[LAYOUT_KEY] = SecureLayout.from_schema(schema).signature
    return record


def screen_profile_reply(
    content: RecordDict,
    *,
    node_id: int,
    registry: SiteRegistry | None,
    schema: ProfileSchema,
    min_count: int,
    count_bound: int,
) -> tuple[ScreenedReply, ProfileStatistics]:
    """Check a statistics reply; :class:`fl_server.validation.ReplyRejected` (code ``malformed_reply`` or
    ``bad_profile_statistics``) naming what is wrong, never a value."""
    site = site_identity(content, node_id, registry)
    names = set(content.keys())
    if names != {METRICS_RECORD, SITE_RECORD}:
        raise ReplyRejected(
            "malformed_reply",
            f"a profile statistics reply carries exactly the records {METRICS_RECORD} and {SITE_RECORD}",
        )
    record = content[METRICS_RECORD]
    if not isinstance(record, MetricRecord):
        raise ReplyRejected("malformed_reply", f"record {METRICS_RECORD!r} is not a MetricRecord")
    try:
        stats = statistics_from_record(dict(record.items()), schema, min_count=min_count, count_bound=count_bound)
    except ProfileStatisticsError as exc:
        raise ReplyRejected("bad_profile_statistics", str(exc)) from None
    metrics = {"profile-n": float(stats.n_rows), "profile-variables": float(len(stats.variables))}
    return ScreenedReply(node_id=node_id, site=site, arrays=None, metrics=metrics, evaluation=None), stats


def summary(normalisation: ProfileNormalisation, per_site: Mapping[str, ProfileStatistics]) -> dict[str, Any]:
    """What metrics.json and the run folder record: the pooled moments and, per site, only which variables it reported."""
    return {
        **normalisation.to_dict(),
        "site_variables": {site: sorted(s.variables) for site, s in sorted(per_site.items())},
    }


def secure_summary(normalisation: ProfileNormalisation, pooled: SecurePooled, sites: list[str]) -> dict[str, Any]:
    """What metrics.json and the run folder record of a SecAgg+ pooling: the pooled moments, which sites are in the
    sum, the pooled rows and, per variable, the bound on the mean's and SD's deviation from plain pooling."""
    return {
        **normalisation.to_dict(),
        "secure_aggregation": {
            "limb_bits": LIMB_BITS,
            "fraction_bits": FRACTION_BITS,
            "sites": sorted(sites),
            "rows": pooled.rows,
            "mean_error_bound": list(pooled.mean_error),
            "std_error_bound": list(pooled.std_error),
        },
    }


def exchange_record(report: RoundReport) -> dict[str, Any]:
    """The exchange's rejected and missing replies and bytes, for the run folder's record."""
    return {
        "rejected_replies": report.rejected,
        "missing_replies": report.missing,
        "bytes_sent": report.bytes_sent,
        "bytes_received": report.bytes_received,
    }


def save_normalisation(run_dir: Path, data: Mapping[str, Any]) -> Path:
    """Write ``run_dir/profile-normalisation.json`` atomically."""
    return atomic_write_bytes(Path(run_dir) / NORMALISATION_NAME, json.dumps(dict(data), indent=2).encode())


def load_normalisation(run_dir: Path) -> ProfileNormalisation | None:
    """The saved normalisation of a run folder, or None when there is none (a ValueError if it is unreadable)."""
    path = Path(run_dir) / NORMALISATION_NAME
    if not path.is_file():
        return None
    try:
        return ProfileNormalisation.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except ValueError as exc:
        raise ValueError(
            f"{path}: not a profile normalisation ({exc}); remove it to pool the statistics again"
        ) from None
