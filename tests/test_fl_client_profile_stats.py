"""fl_client/profile_stats.py: what a site answers to the profile statistics request."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from fedct.protocol import PROFILE_VARIABLES
from fl_client.config import SiteConfig
from fl_client.profile_stats import (
    ProfileSchemaMismatch,
    secure_statistics_vector,
    site_statistics,
    statistics_metrics,
)
from fl_server.profile_norm import request_config
from preprocessing.labels import DIAGNOSES
from preprocessing.profile import read_schema, read_site_profile
from synthetic.hospitals import LABEL_COLUMNS
from synthetic.profiles import write_site_profile

SCHEMA = read_schema()


def _site(tmp_path, n: int) -> SiteConfig:
    data = tmp_path / "data"
    data.mkdir()
    with (data / "labels.csv").open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(LABEL_COLUMNS)
        for j in range(n):
            writer.writerow([f"1.2.7.{j + 1}", DIAGNOSES[j % 3], j % 2, 9 if j % 2 else 28, 50 + j, "FM"[j % 2]])
    write_site_profile(data, site_index=2, seed=4)
    return SiteConfig.from_context(
        {
            "site-name": "site-a",
            "dicom-dir": str(tmp_path / "dicom"),
            "site-dir": str(tmp_path / "w"),
            "labels": str(data / "labels.csv"),
        },
        {},
    )


def test_the_site_answers_with_its_aggregates_above_the_floor(tmp_path):
    site = _site(tmp_path, 30)
    assert site.profile_dir == tmp_path / "data"  # found next to labels.csv
    metrics = statistics_metrics(site, dict(request_config(SCHEMA)), min_count=5)
    table = read_site_profile(site.profile_dir)
    assert metrics["profile-n"] == 30
    j = SCHEMA.names.index("ldh")
    assert metrics["profile-count"][j] == int((~table.missing[:, j]).sum())
    # a raised floor withholds what is measured in fewer studies
    strict = statistics_metrics(site, dict(request_config(SCHEMA)), min_count=25)
    assert all(c == 0 or c >= 25 for c in strict["profile-count"]) and 0 in strict["profile-count"]


def test_a_site_below_the_floor_or_without_a_profile_sends_zeros(tmp_path):
    small = _site(tmp_path, 4)
    assert statistics_metrics(small, dict(request_config(SCHEMA)))["profile-count"] == [0] * len(SCHEMA.names)
    bare = SiteConfig(site_name="site-b", dicom_dir=tmp_path, site_dir=tmp_path / "w2", labels_csv=None)
    stats = site_statistics(bare)
    assert stats.n_rows == 0 and stats.withheld == SCHEMA.names


def test_a_request_for_other_variables_is_refused_with_a_reason_code(tmp_path):
    site = _site(tmp_path, 10)
    request = dict(request_config(SCHEMA))
    request[PROFILE_VARIABLES] = "age,sex"
    with pytest.raises(ProfileSchemaMismatch, match="age") as info:
        statistics_metrics(site, request)
    assert info.value.code == "bad_round_config"


def test_a_configured_profile_dir_must_hold_a_mapping(tmp_path):
    from fl_client.config import SiteConfigError

    with pytest.raises(SiteConfigError, match="profile-mapping.toml"):
        SiteConfig.from_context(
            {"site-name": "s", "dicom-dir": str(tmp_path), "site-dir": str(tmp_path), "profile-dir": str(tmp_path)}, {}
        )


def test_with_secure_aggregation_the_site_sends_its_statistics_as_a_limb_vector(tmp_path):
    from fl_server.profile_norm import secure_request_config
    from preprocessing.profile import aggregate_statistics
    from preprocessing.profile_secagg import LAYOUT_KEY, SecureLayout

    site = _site(tmp_path, 30)
    request = dict(secure_request_config(SCHEMA))
    vector = secure_statistics_vector(site, request, min_count=5)
    layout = SecureLayout.from_schema(SCHEMA)
    expected = layout.encode(aggregate_statistics(read_site_profile(site.profile_dir), min_count=5), min_count=5)
    assert np.array_equal(vector, expected) and vector[0] == 30  # the rows' first limb
    # the site's own floor applies: with k above its rows it sends only zeros
    assert not secure_statistics_vector(site, request, min_count=31).any()
    # another layout (scalings or fixed-point bits) is refused like other variables
    with pytest.raises(ProfileSchemaMismatch, match="layout") as info:
        secure_statistics_vector(site, {**request, LAYOUT_KEY: "F32;" + request[LAYOUT_KEY][4:]})
    assert info.value.code == "bad_round_config"
    with pytest.raises(ProfileSchemaMismatch, match="age"):
        secure_statistics_vector(site, {**request, PROFILE_VARIABLES: "age"})
