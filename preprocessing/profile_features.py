"""The profile as the network sees it: federated normalisation and the (value, mask) vector of a study.

- :class:`ProfileNormalisation`: each schema variable's mean and standard deviation pooled across sites from their
  aggregate statistics only (:func:`preprocessing.profile.aggregate_statistics` at each site,
  :func:`preprocessing.profile.pooled_moments` at the server). The server sends it with every round's settings and
  stores it in the model bundle (``model.json`` ``profile_normalisation``); training and prediction both call
  :meth:`ProfileNormalisation.transform`, so a value is scaled the same way in both.
- :func:`statistics_to_record` / :func:`statistics_from_record`: a site's :class:`~preprocessing.profile.ProfileStatistics`
  as the lists of numbers that cross the wire (schema order; a withheld variable is sent as count 0, sum 0) and back,
  with the checks the server applies to a reply.
- :class:`SiteProfile`: a site's profile table looked up by the key of a manifest entry (StudyInstanceUID or
  AccessionNumber of the chosen series), in schema units with NaN for missing.

The model input of a study is ``2 * V`` numbers: ``V`` z-scores (``(x - mean) / std``, clipped to
+-:data:`Z_CLIP`, 0 where missing) then ``V`` presence flags (1 measured, 0 missing). A variable that no site
reported above the privacy floor has ``std = 0``: it is treated as missing everywhere (never imputed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from preprocessing.profile import (
    MAPPING_NAME,
    ProfileSchema,
    ProfileStatistics,
    ProfileTable,
    VariableStatistics,
    pooled_moments,
    read_site_profile,
)

#: Z-scores are clipped to this magnitude (laboratory values are heavy-tailed; one extreme CRP must not dominate).
Z_CLIP = 5.0
#: Relative tolerance of the server's consistency check sum**2 <= count * sum_squares.
_SLACK = 1e-6


class ProfileStatisticsError(ValueError):
    """A site's profile statistics are malformed (the message names the variable and the reason, never a value)."""


@dataclass(frozen=True)
class ProfileNormalisation:
    """Pooled per-variable mean / standard deviation (schema order) and what they were computed from."""

    variables: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]  # 0: no statistics (the variable is always masked)
    count: tuple[int, ...]
    #: Provenance only (not sent to the sites, not compared): how many sites were pooled, at which floor.
    sites: int = field(default=0, compare=False)
    min_count: int = field(default=5, compare=False)
    schema: str = ""

    def __post_init__(self) -> None:
        n = len(self.variables)
        if n < 1 or len(set(self.variables)) != n:
            raise ValueError(f"profile normalisation needs distinct variable names, got {self.variables!r}")
        if not (len(self.mean) == len(self.std) == len(self.count) == n):
            raise ValueError(
                f"profile normalisation: {n} variables but {len(self.mean)} means, {len(self.std)} "
                f"standard deviations and {len(self.count)} counts"
            )
        for name, m, s, c in zip(self.variables, self.mean, self.std, self.count, strict=True):
            if not (math.isfinite(m) and math.isfinite(s) and s >= 0):
                raise ValueError(f"profile normalisation of {name!r}: mean {m!r} / std {s!r} must be finite, std >= 0")
            if isinstance(c, bool) or not isinstance(c, int) or c < 0:
                raise ValueError(f"profile normalisation of {name!r}: count must be an integer >= 0, got {c!r}")

    @property
    def usable(self) -> np.ndarray:
        """(V,) bool: the variables that have statistics (std > 0)."""
        return np.asarray(self.std) > 0

    def transform(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(z, present)`` of ``values`` ((N, V) or (V,), schema units, NaN = missing), both float32 of that shape.

        ``z = clip((x - mean) / std, -Z_CLIP, Z_CLIP)`` where the value is present and the variable usable, else 0;
        ``present`` is 1 there, else 0.
        """
        x = np.asarray(values, dtype=np.float64)
        if x.shape[-1] != len(self.variables):
            raise ValueError(f"profile values have {x.shape[-1]} variables, the normalisation {len(self.variables)}")
        std = np.asarray(self.std)
        present = ~np.isnan(x) & (std > 0)
        z = np.where(present, (np.nan_to_num(x) - np.asarray(self.mean)) / np.where(std > 0, std, 1.0), 0.0)
        return np.clip(z, -Z_CLIP, Z_CLIP).astype(np.float32), present.astype(np.float32)

    def vector(self, values: np.ndarray) -> np.ndarray:
        """The model input: ``concat(z, present)`` along the last axis ((N, 2V) or (2V,), float32)."""
        z, present = self.transform(values)
        return np.concatenate([z, present], axis=-1)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``model.json``, the run folder, round settings)."""
        return {
            "schema": self.schema,
            "variables": list(self.variables),
            "mean": list(self.mean),
            "std": list(self.std),
            "count": list(self.count),
            "sites": self.sites,
            "min_count": self.min_count,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProfileNormalisation:
        """Inverse of :meth:`to_dict`; ValueError naming what is missing or wrong."""
        try:
            return cls(
                variables=tuple(str(v) for v in data["variables"]),
                mean=tuple(float(v) for v in data["mean"]),
                std=tuple(float(v) for v in data["std"]),
                count=tuple(int(v) for v in data["count"]),
                sites=int(data.get("sites", 0)),
                min_count=int(data.get("min_count", 5)),
                schema=str(data.get("schema", "")),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"profile normalisation lacks or mistypes {exc}") from None

    @classmethod
    def pooled(cls, schema: ProfileSchema, sites: Sequence[ProfileStatistics]) -> ProfileNormalisation:
        """Pool the sites' statistics (:func:`preprocessing.profile.pooled_moments`) over ``schema``'s variables."""
        moments = pooled_moments(sites)
        mean, std, count = [], [], []
        for name in schema.names:
            m, s, c = moments.get(name, (0.0, 0.0, 0))
            mean.append(float(m))
            std.append(float(s))
            count.append(int(c))
        k = max((s.min_count for s in sites), default=5)
        return cls(
            variables=schema.names,
            mean=tuple(mean),
            std=tuple(std),
            count=tuple(count),
            sites=len(sites),
            min_count=k,
            schema=f"{schema.name} v{schema.version}",
        )


# --- the wire form of a site's statistics ---------------------------------------------------------------------------

#: Metric keys of a profile statistics reply (lists in schema order, and the number of usable rows).
STAT_ROWS, STAT_COUNT, STAT_SUM, STAT_SUMSQ = "profile-n", "profile-count", "profile-sum", "profile-sumsq"
STAT_KEYS = (STAT_ROWS, STAT_COUNT, STAT_SUM, STAT_SUMSQ)


def statistics_to_record(stats: ProfileStatistics, schema: ProfileSchema) -> dict[str, Any]:
    """A site's statistics as a MetricRecord's content: ``profile-n`` and three lists in schema order (a withheld
    variable: count 0, sum 0, sum of squares 0). No histogram, no study key, no single value."""
    counts, sums, squares = [], [], []
    for name in schema.names:
        s = stats.variables.get(name)
        counts.append(0 if s is None else int(s.count))
        sums.append(0.0 if s is None else float(s.sum))
        squares.append(0.0 if s is None else float(s.sum_squares))
    return {STAT_ROWS: int(stats.n_rows), STAT_COUNT: counts, STAT_SUM: sums, STAT_SUMSQ: squares}


def statistics_from_record(
    record: Mapping[str, Any], schema: ProfileSchema, *, min_count: int, count_bound: int
) -> ProfileStatistics:
    """The server's check of a statistics reply; :class:`ProfileStatisticsError` naming the key or variable.

    Exactly the keys :data:`STAT_KEYS`; lists of the schema's length; every count 0 or between ``min_count`` and
    ``count_bound`` (and at most ``profile-n``); sums finite; sums of squares >= 0 and consistent with the sum
    (``sum**2 <= count * sum_squares``); a count of 0 with sums of 0.
    """
    keys = set(record)
    if keys != set(STAT_KEYS):
        raise ProfileStatisticsError(
            f"profile statistics must have exactly the keys {', '.join(STAT_KEYS)}; "
            f"{len(keys - set(STAT_KEYS))} unexpected, {len(set(STAT_KEYS) - keys)} missing"
        )
    n_rows = _finite(record[STAT_ROWS], STAT_ROWS)
    if n_rows != math.floor(n_rows) or not 0 <= n_rows <= count_bound or 0 < n_rows < min_count:
        raise ProfileStatisticsError(f"{STAT_ROWS} must be 0 or an integer in [{min_count}, {count_bound}]")
    lists = {}
    for key in (STAT_COUNT, STAT_SUM, STAT_SUMSQ):
        value = record[key]
        if not isinstance(value, list) or len(value) != len(schema.variables):
            raise ProfileStatisticsError(
                f"{key} must be a list of {len(schema.variables)} numbers (one per schema variable)"
            )
        lists[key] = [_finite(v, key) for v in value]
    out: dict[str, VariableStatistics] = {}
    withheld = []
    for name, c, s, q in zip(schema.names, lists[STAT_COUNT], lists[STAT_SUM], lists[STAT_SUMSQ], strict=True):
        if c == 0:
            if s != 0 or q != 0:
                raise ProfileStatisticsError(f"{name}: count 0 with non-zero sums")
            withheld.append(name)
            continue
        if c != math.floor(c) or c < min_count or c > min(count_bound, n_rows):
            raise ProfileStatisticsError(
                f"{name}: count must be 0 or an integer in [{min_count}, profile-n] (the privacy floor is {min_count})"
            )
        if q < 0 or s * s > c * q * (1 + _SLACK) + 1e-9:
            raise ProfileStatisticsError(f"{name}: sum of squares inconsistent with the sum and count")
        out[name] = VariableStatistics(count=int(c), sum=s, sum_squares=q)
    return ProfileStatistics(
        n_rows=int(n_rows), variables=MappingProxyType(out), withheld=tuple(withheld), min_count=min_count
    )


def _finite(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ProfileStatisticsError(f"{key} holds something other than finite numbers")
    return float(value)


# --- a site's table, looked up by study ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteProfile:
    """A site's checked profile table, for joining rows to studies by the table's key kind."""

    table: ProfileTable

    @classmethod
    def read(cls, folder: Path, schema: ProfileSchema | None = None) -> SiteProfile | None:
        """The profile of the site whose ``profile-mapping.toml`` is in ``folder``; None when there is none.
        A mapping or table that cannot be used raises :class:`preprocessing.profile.ProfileError`."""
        if folder is None or not (Path(folder) / MAPPING_NAME).is_file():
            return None
        return cls(read_site_profile(Path(folder), schema))

    @property
    def schema(self) -> ProfileSchema:
        return self.table.schema

    def values_for(self, series: Mapping[str, Any]) -> np.ndarray:
        """(V,) schema-unit values of the study of ``series`` (a manifest entry's series dict, or anything with
        ``StudyInstanceUID``/``AccessionNumber``); all NaN when the table has no row for it."""
        index = self._index
        key = str(series.get(self.table.key_kind) or "").strip()
        row = index.get(key)
        if row is None:
            return np.full(len(self.schema.variables), np.nan)
        return np.array(self.table.values[row], dtype=np.float64)

    @property
    def _index(self) -> Mapping[str, int]:
        cached = self.__dict__.get("_index_cache")
        if cached is None:
            cached = {k: i for i, k in enumerate(self.table.keys)}
            object.__setattr__(self, "_index_cache", cached)
        return cached


def attach_profile(
    items: Sequence[dict[str, Any]],
    series: Sequence[Mapping[str, Any]],
    profile: SiteProfile | None,
    normalisation: ProfileNormalisation,
) -> list[dict[str, Any]]:
    """Dataset items with ``profile`` (the (2V,) model input of :meth:`ProfileNormalisation.vector`) added; the
    ``image``/``content`` of each item (its cache key) are untouched. Without a site profile every variable is missing.
    The site's schema must list the normalisation's variables in the same order (ValueError otherwise)."""
    if profile is not None and profile.schema.names != normalisation.variables:
        raise ValueError(
            f"the site's profile schema ({len(profile.schema.names)} variables) is not the run's "
            f"({len(normalisation.variables)}: {', '.join(normalisation.variables)})"
        )
    out = []
    for item, s in zip(items, series, strict=True):
        values = profile.values_for(s) if profile is not None else np.full(len(normalisation.variables), np.nan)
        out.append({**item, "profile": normalisation.vector(values)})
    return out
