"""What a site tells the server about its clinical/molecular profile: aggregate statistics only (never imports flwr).

The server asks once, before round 1 of a run with ``profile-fusion`` (an evaluate message whose config has
``profile-statistics``, :data:`fedct.protocol.PROFILE_STATISTICS`). The site reads its profile export
(:func:`preprocessing.profile.read_site_profile`), computes per-variable count / sum / sum of squares over the studies
where the variable was measured (:func:`preprocessing.profile.aggregate_statistics`: only variables measured in at
least ``min_count`` studies, the metrics privacy floor; nothing at all when the table has fewer rows), and replies
with three lists in schema order (:func:`preprocessing.profile_features.statistics_to_record`). No study key, no
single value, no histogram and no site column name is sent.

With ``secure-aggregation = true`` the request comes inside SecAgg+'s collect stage instead (``fl_client.secagg``)
and the site answers with :func:`secure_statistics_vector`: the same statistics, scaled by the schema's ranges and
split into whole-number limbs (:mod:`preprocessing.profile_secagg`), masked by SecAgg+ so that the server learns only
the sum over the sites. The floor is then the site's alone to enforce (the server cannot see one site's count).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedct.protocol import PROFILE_SCHEMA, PROFILE_VARIABLES
from fl_client.config import SiteConfig
from fl_client.metrics import MIN_COUNT
from preprocessing.profile import ProfileSchema, ProfileStatistics, aggregate_statistics, read_schema
from preprocessing.profile_features import SiteProfile, statistics_to_record
from preprocessing.profile_secagg import LAYOUT_KEY, SecureLayout


class ProfileSchemaMismatch(ValueError):
    """The server pools over other variables than the site's schema holds (reason code ``bad_round_config``)."""

    code = "bad_round_config"


def check_request(request: Mapping[str, Any], schema: ProfileSchema) -> None:
    """Refuse a statistics request whose variables are not the site's schema's, in order (names only are compared)."""
    wanted = [v for v in str(request.get(PROFILE_VARIABLES, "")).split(",") if v]
    if tuple(wanted) != schema.names:
        raise ProfileSchemaMismatch(
            f"the server asks for profile variables {wanted} ({request.get(PROFILE_SCHEMA, '?')}); "
            f"this site's schema {schema.name} v{schema.version} has {list(schema.names)}"
        )


def site_statistics(
    site: SiteConfig, *, min_count: int = MIN_COUNT, schema: ProfileSchema | None = None
) -> ProfileStatistics:
    """The site's profile statistics above the floor ``min_count``; a site without a profile export reports none."""
    schema = schema if schema is not None else read_schema()
    profile = SiteProfile.read(site.profile_dir, schema) if site.profile_dir is not None else None
    if profile is None:
        from types import MappingProxyType

        return ProfileStatistics(n_rows=0, variables=MappingProxyType({}), withheld=schema.names, min_count=min_count)
    return aggregate_statistics(profile.table, min_count=min_count)


def statistics_metrics(site: SiteConfig, request: Mapping[str, Any], *, min_count: int = MIN_COUNT) -> dict[str, Any]:
    """The reply's MetricRecord content for the server's ``request`` (its ConfigRecord): checked against the site's
    schema, then :func:`site_statistics` as lists (:func:`preprocessing.profile_features.statistics_to_record`)."""
    schema = read_schema()
    check_request(request, schema)
    return statistics_to_record(site_statistics(site, min_count=min_count, schema=schema), schema)


def secure_statistics_vector(site: SiteConfig, request: Mapping[str, Any], *, min_count: int = MIN_COUNT) -> np.ndarray:
    """The site's statistics as the vector it adds to the SecAgg+ sum (``secure-aggregation = true``,
    :mod:`preprocessing.profile_secagg`): the request is checked against the site's schema (variables, then the
    layout: scalings and fixed-point bits) and the floor is applied here, since the server only sees the sum: a
    variable measured in fewer than ``min_count`` studies, and every variable of a table with fewer rows,
    contributes zeros."""
    schema = read_schema()
    check_request(request, schema)
    layout = SecureLayout.from_schema(schema)
    if str(request.get(LAYOUT_KEY, "")) != layout.signature:
        raise ProfileSchemaMismatch(
            "the server's secure profile statistics layout (variable scalings, fixed-point bits) is not this site's"
        )
    return layout.encode(site_statistics(site, min_count=min_count, schema=schema), min_count=min_count)
