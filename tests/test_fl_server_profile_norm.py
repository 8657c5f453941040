"""fl_server/profile_norm.py: the statistics request, the gate of a statistics reply, and the run folder's copy of the
pooled normalisation (the exchange itself runs in tests/test_fl_server_server_app.py's simulation)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedct.protocol import PROFILE_SCHEMA, PROFILE_STATISTICS, PROFILE_VARIABLES
from fl_server.config import SiteRegistry
from fl_server.profile_norm import (
    NORMALISATION_NAME,
    load_normalisation,
    request_config,
    save_normalisation,
    screen_profile_reply,
    summary,
)
from fl_server.validation import ReplyRejected
from preprocessing.labels import DIAGNOSES
from preprocessing.profile import aggregate_statistics, read_schema, read_site_profile
from preprocessing.profile_features import ProfileNormalisation, statistics_to_record
from synthetic.hospitals import LABEL_COLUMNS
from synthetic.profiles import write_site_profile

SCHEMA = read_schema()


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    with (site / "labels.csv").open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(LABEL_COLUMNS)
        for j in range(40):
            writer.writerow([f"1.2.9.{j + 1}", DIAGNOSES[j % 3], j % 2, 10 if j % 2 else 28, 30 + j, "FM"[j % 2]])
    write_site_profile(site, site_index=0, seed=2)
    return statistics_to_record(aggregate_statistics(read_site_profile(site)), SCHEMA)


def _reply(record, name="site-a") -> RecordDict:
    return RecordDict(
        {
            "metrics": MetricRecord({k: list(v) if isinstance(v, list) else v for k, v in record.items()}),
            "site": ConfigRecord({"name": name}),
        }
    )


def test_the_request_names_the_schema_and_its_variables_in_order():
    config = request_config(SCHEMA)
    assert config[PROFILE_STATISTICS] is True
    assert config[PROFILE_VARIABLES].split(",") == list(SCHEMA.names)
    assert config[PROFILE_SCHEMA] == f"{SCHEMA.name} v{SCHEMA.version}"


def test_a_well_formed_reply_passes_with_its_statistics(record):
    screened, stats = screen_profile_reply(
        _reply(record), node_id=7, registry=None, schema=SCHEMA, min_count=5, count_bound=100_000
    )
    assert screened.site == "site-a" and screened.arrays is None and screened.metrics["profile-n"] == 40
    assert stats.n_rows == 40 and "crp" in stats.variables


def test_a_reply_with_another_record_an_impostor_or_bad_statistics_is_rejected(record, tmp_path):
    def code(content, **kwargs):
        with pytest.raises(ReplyRejected) as info:
            screen_profile_reply(
                content,
                node_id=kwargs.get("node_id", 7),
                registry=kwargs.get("registry"),
                schema=SCHEMA,
                min_count=kwargs.get("min_count", 5),
                count_bound=100_000,
            )
        return info.value.problem.code

    extra = _reply(record)
    extra["arrays"] = ConfigRecord({"a": 1})
    assert code(extra) == "malformed_reply"
    registry = SiteRegistry(path=tmp_path / "r.json", names={7: "site-b"})
    assert code(_reply(record), registry=registry) == "site_name_mismatch"
    low = dict(record, **{"profile-count": [4 if c else 0 for c in record["profile-count"]]})
    assert code(_reply(low)) == "bad_profile_statistics"
    assert code(_reply(record), min_count=41) == "bad_profile_statistics"  # the server's floor is above the site's rows


def test_the_normalisation_is_saved_in_the_run_folder_and_read_back(record, tmp_path):
    _, stats = screen_profile_reply(
        _reply(record), node_id=1, registry=None, schema=SCHEMA, min_count=5, count_bound=1000
    )
    norm = ProfileNormalisation.pooled(SCHEMA, [stats])
    data = summary(norm, {"site-a": stats})
    assert data["site_variables"]["site-a"] == sorted(stats.variables)
    save_normalisation(tmp_path, data)
    assert load_normalisation(tmp_path) == norm
    assert load_normalisation(tmp_path / "elsewhere") is None
    (tmp_path / NORMALISATION_NAME).write_text('{"variables": ["a"]}')
    with pytest.raises(ValueError, match="remove it"):
        load_normalisation(tmp_path)
    assert np.isclose(norm.mean[SCHEMA.names.index("age")], 49.5)


def test_the_secure_request_adds_the_layout_and_the_secure_record_names_no_sites_statistics(record):
    from fl_server.profile_norm import secure_request_config, secure_summary
    from preprocessing.profile_secagg import LAYOUT_KEY, SecureLayout

    config = secure_request_config(SCHEMA)
    assert config[LAYOUT_KEY] == SecureLayout.from_schema(SCHEMA).signature
    assert {k: config[k] for k in request_config(SCHEMA)} == dict(request_config(SCHEMA))
    layout = SecureLayout.from_schema(SCHEMA)
    _, stats = screen_profile_reply(
        _reply(record), node_id=1, registry=None, schema=SCHEMA, min_count=5, count_bound=1000
    )
    pooled = layout.decode(layout.encode(stats, min_count=5) * 2, sites=2, min_count=5, count_bound=1000)
    norm = pooled.normalisation(SCHEMA, min_count=5)
    data = secure_summary(norm, pooled, ["site-b", "site-a"])
    assert "site_variables" not in data  # not even which variables a site measured
    assert data["secure_aggregation"]["sites"] == ["site-a", "site-b"] and data["secure_aggregation"]["rows"] == 80
    assert len(data["secure_aggregation"]["mean_error_bound"]) == len(SCHEMA.names)
    assert ProfileNormalisation.from_dict(data) == norm and norm.sites == 2
