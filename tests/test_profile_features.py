"""preprocessing/profile_features.py: pooled normalisation, the (z, presence) model input, the wire form of a site's
statistics and its checks, and joining a site's profile rows to dataset items by study key."""

from __future__ import annotations

import csv
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from preprocessing.labels import DIAGNOSES
from preprocessing.profile import aggregate_statistics, read_schema, read_site_profile
from preprocessing.profile_features import (
    STAT_COUNT,
    STAT_ROWS,
    STAT_SUM,
    STAT_SUMSQ,
    Z_CLIP,
    ProfileNormalisation,
    ProfileStatisticsError,
    SiteProfile,
    attach_profile,
    statistics_from_record,
    statistics_to_record,
)
from synthetic.hospitals import LABEL_COLUMNS
from synthetic.profiles import write_site_profile

SCHEMA = read_schema()
V = len(SCHEMA.names)


def _site(root: Path, index: int, n: int = 60) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(index)
    with (root / "labels.csv").open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(LABEL_COLUMNS)
        for j in range(n):
            severe = int(rng.random() < 0.3)
            writer.writerow(
                [f"1.2.3.{index}.{j + 1}", DIAGNOSES[j % 3], severe, 5 if severe else 28, 40 + j % 40, "FM"[j % 2]]
            )
    write_site_profile(root, site_index=index, seed=1)
    return root


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("pf")
    return [_site(root / f"site-{i}", i) for i in range(3)]


def test_pooled_normalisation_equals_the_moments_of_all_sites_rows_together(sites):
    tables = [read_site_profile(s) for s in sites]
    norm = ProfileNormalisation.pooled(SCHEMA, [aggregate_statistics(t) for t in tables])
    assert norm.variables == SCHEMA.names and norm.sites == 3 and norm.min_count == 5
    values = np.concatenate([t.values for t in tables])
    crp = values[:, SCHEMA.names.index("crp")]
    crp = crp[~np.isnan(crp)]
    j = SCHEMA.names.index("crp")
    assert norm.count[j] == crp.size
    assert math.isclose(norm.mean[j], crp.mean(), rel_tol=1e-9) and math.isclose(norm.std[j], crp.std(), rel_tol=1e-9)
    # the US style never measures IL-6, the others do: pooled from two sites only
    assert 0 < norm.count[SCHEMA.names.index("il6")] < sum(len(t.keys) for t in tables)


def test_transform_masks_missing_and_unusable_variables_and_clips():
    norm = ProfileNormalisation(
        variables=("a", "b", "c"), mean=(10.0, 0.0, 0.0), std=(2.0, 1.0, 0.0), count=(50, 50, 0)
    )
    z, present = norm.transform(np.array([[12.0, np.nan, 3.0], [10.0, 100.0, np.nan]]))
    assert z.dtype == np.float32 and present.dtype == np.float32
    np.testing.assert_allclose(z, [[1.0, 0.0, 0.0], [0.0, Z_CLIP, 0.0]])
    np.testing.assert_array_equal(present, [[1, 0, 0], [1, 1, 0]])  # c has no statistics: never present
    assert norm.vector(np.array([12.0, np.nan, 3.0])).tolist() == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="3 variables, the normalisation 3|have 2 variables"):
        norm.transform(np.zeros(2))


def test_normalisation_round_trips_and_refuses_bad_values():
    norm = ProfileNormalisation(
        variables=("a", "b"), mean=(1.0, 2.0), std=(0.5, 0.0), count=(9, 0), sites=2, schema="s v1"
    )
    assert ProfileNormalisation.from_dict(norm.to_dict()) == norm
    with pytest.raises(ValueError, match="std"):
        ProfileNormalisation(variables=("a",), mean=(0.0,), std=(-1.0,), count=(5,))
    with pytest.raises(ValueError, match="1 variables but 2 means"):
        ProfileNormalisation(variables=("a",), mean=(0.0, 1.0), std=(1.0,), count=(5,))
    with pytest.raises(ValueError, match="distinct"):
        ProfileNormalisation(variables=("a", "a"), mean=(0.0, 1.0), std=(1.0, 1.0), count=(5, 5))
    with pytest.raises(ValueError, match="lacks or mistypes"):
        ProfileNormalisation.from_dict({"variables": ["a"], "mean": [0.0]})


def test_statistics_cross_the_wire_as_lists_in_schema_order_and_come_back(sites):
    stats = aggregate_statistics(read_site_profile(sites[1]))
    record = statistics_to_record(stats, SCHEMA)
    assert sorted(record) == sorted([STAT_ROWS, STAT_COUNT, STAT_SUM, STAT_SUMSQ])
    assert all(len(record[k]) == V for k in (STAT_COUNT, STAT_SUM, STAT_SUMSQ))
    assert record[STAT_COUNT][SCHEMA.names.index("il6")] == 0  # the US style has no IL-6 column
    back = statistics_from_record(record, SCHEMA, min_count=5, count_bound=100_000)
    assert set(back.variables) == set(stats.variables) and "il6" in back.withheld
    for name, s in stats.variables.items():
        assert back.variables[name].count == s.count and back.variables[name].sum == s.sum
    # a site with fewer rows than the floor sends nothing but zeros
    table = read_site_profile(sites[0])
    tiny = aggregate_statistics(
        replace(table, keys=table.keys[:4], values=table.values[:4].copy(), missing=table.missing[:4].copy())
    )
    assert (
        statistics_to_record(tiny, SCHEMA)[STAT_COUNT] == [0] * V and statistics_to_record(tiny, SCHEMA)[STAT_ROWS] == 0
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.update({"extra": 1}), "exactly the keys"),
        (lambda r: r[STAT_COUNT].__setitem__(0, 3), "privacy floor is 5"),
        (lambda r: r[STAT_COUNT].__setitem__(0, 2.5), "count must be"),
        (lambda r: r[STAT_COUNT].__setitem__(0, r[STAT_ROWS] + 1), "count must be"),
        (lambda r: r[STAT_SUM].__setitem__(0, float("nan")), "finite"),
        (lambda r: r[STAT_SUMSQ].__setitem__(0, 0.0), "inconsistent"),
        (lambda r: r[STAT_SUM].pop(), "list of 16"),
        (lambda r: r.update({STAT_ROWS: 3}), "profile-n must be 0 or"),
        (
            lambda r: r.update({STAT_SUM: [1.0] + [0.0] * (V - 1), STAT_COUNT: [0] * V, STAT_SUMSQ: [0.0] * V}),
            "count 0 with non-zero",
        ),
    ],
)
def test_malformed_or_below_floor_statistics_are_refused(sites, change, message):
    record = statistics_to_record(aggregate_statistics(read_site_profile(sites[0])), SCHEMA)
    record = {k: list(v) if isinstance(v, list) else v for k, v in record.items()}
    change(record)
    with pytest.raises(ProfileStatisticsError, match=message):
        statistics_from_record(record, SCHEMA, min_count=5, count_bound=100_000)


def test_attach_profile_adds_the_vector_by_study_key_and_leaves_the_cache_key_alone(sites):
    tables = [read_site_profile(s) for s in sites]
    norm = ProfileNormalisation.pooled(SCHEMA, [aggregate_statistics(t) for t in tables])
    profile = SiteProfile.read(sites[0])
    key = profile.table.keys[3]
    items = [
        {"image": {"StudyInstanceUID": key}, "content": "abc", "label": 1},
        {"image": {"StudyInstanceUID": "9.9.9"}, "content": "def", "label": 0},
    ]
    out = attach_profile(items, [i["image"] for i in items], profile, norm)
    assert [(o["image"], o["content"], o["label"]) for o in out] == [
        (i["image"], i["content"], i["label"]) for i in items
    ]
    assert out[0]["profile"].shape == (2 * V,) and out[0]["profile"].dtype == np.float32
    np.testing.assert_array_equal(out[0]["profile"], norm.vector(profile.table.values[3]))
    assert out[1]["profile"].tolist() == [0.0] * (2 * V)  # no row for the study: every variable missing, not imputed
    assert "profile" not in items[0]
    no_site = attach_profile(items[:1], [items[0]["image"]], None, norm)
    assert no_site[0]["profile"].tolist() == [0.0] * (2 * V)


def test_a_site_without_a_mapping_has_no_profile_and_another_schema_is_refused(tmp_path, sites):
    assert SiteProfile.read(tmp_path) is None
    other = ProfileNormalisation(variables=("a",), mean=(0.0,), std=(1.0,), count=(5,))
    with pytest.raises(ValueError, match="not the run's"):
        attach_profile([{"image": {}, "content": ""}], [{}], SiteProfile.read(sites[0]), other)
