
import pytest

from fl_client.config import RoundSettings, SiteConfig, SiteConfigError, parse_triple
from fl_server.config import ServerConfig


def test_deployment_node_config(tmp_path):
    site = SiteConfig.from_context(
        {"site-name": "site-a", "dicom-dir": str(tmp_path / "dicom"), "site-dir": str(tmp_path / "work"), "labels": str(tmp_path / "l.csv"), "device": "cpu"},
        {},
    )  # fmt: skip
    assert site.site_name == "site-a" and site.dicom_dir == tmp_path / "dicom" and site.device == "cpu"
    assert site.labels_csv == tmp_path / "l.csv"


def test_simulation_partition_maps_to_sorted_site_folders(tmp_path):
    for name in ("site-1", "site-0", "site-2"):
        (tmp_path / "data" / name / "dicom").mkdir(parents=True)
    (tmp_path / "data" / "site-1" / "labels.csv").write_text("StudyInstanceUID,diagnosis\n")
    run_config = {"sim-data-root": str(tmp_path / "data"), "sim-work-root": str(tmp_path / "work")}
    site = SiteConfig.from_context({"partition-id": 1, "num-partitions": 3}, run_config)
    assert site.site_name == "site-1"
    assert site.dicom_dir == tmp_path / "data" / "site-1" / "dicom"
    assert site.site_dir == tmp_path / "work" / "site-1"
    assert site.labels_csv == tmp_path / "data" / "site-1" / "labels.csv"
    assert SiteConfig.from_context({"partition-id": 0}, run_config).labels_csv is None


@pytest.mark.parametrize(
    ("node_config", "run_config", "needle"),
    [
        ({}, {}, "dicom-dir"),
        ({"dicom-dir": "/d"}, {}, "site-name"),
        ({"partition-id": 0}, {}, "sim-data-root"),
        ({"partition-id": 5}, {"sim-data-root": "/nonexistent", "sim-work-root": "/w"}, "partition-id 5"),
        ({"dicom-dir": "/d", "site-dir": "/w", "site-name": "a b"}, {}, "site-name"),
        ({"dicom-dir": "/d", "site-dir": "/w", "site-name": "a", "device": "tpu"}, {}, "'tpu'"),
    ],
)
def test_bad_site_settings_are_named(node_config, run_config, needle):
    with pytest.raises(SiteConfigError, match=needle):
        SiteConfig.from_context(node_config, run_config)


def test_round_settings_round_trip_through_a_flat_record():
    settings = ServerConfig(model_name="smallcnn", input_size="32,32,16").round_settings(4)
    record = settings.to_record()
    assert all(isinstance(v, int | float | str) for v in record.values())
    assert RoundSettings.from_record(record) == settings


def test_round_settings_missing_key_is_named():
    record = ServerConfig().round_settings(1).to_record()
    del record["batch-size"]
    with pytest.raises(ValueError, match="batch-size"):
        RoundSettings.from_record(record)


def test_parse_triple():
    assert parse_triple("1, 2,3", int, "x") == (1, 2, 3)
    with pytest.raises(ValueError, match="input-size"):
        parse_triple("1,2", int, "input-size")
    with pytest.raises(ValueError, match="spacing"):
        parse_triple("a,b,c", float, "spacing")


def test_optional_round_keys_default_when_an_older_server_omits_them():
    from fl_server.config import ServerConfig

    record = ServerConfig(bn_mode="local").round_settings(1).to_record()
    assert RoundSettings.from_record(record).bn_mode == "local"
    for key in ("bn-mode", "transport", "proximal-mu"):
        record.pop(key)
    settings = RoundSettings.from_record({**record, "proximal-mu": 0.25})  # FedProx adds proximal-mu to the config
    assert (settings.bn_mode, settings.transport, settings.proximal_mu) == ("aggregate", "float32", 0.25)
    with pytest.raises(ValueError, match="bn-mode"):
        RoundSettings.from_record({**record, "bn-mode": "shared"})


def test_evaluate_first_reaches_the_sites_and_defaults_to_false():
    from fl_server.config import ServerConfig

    fused = ServerConfig(evaluate_mode="fused").round_settings(2, evaluate_first=True)
    record = fused.to_record()
    assert record["evaluate-first"] is True and RoundSettings.from_record(record) == fused
    record.pop("evaluate-first")  # an older server: no evaluation asked for
    assert RoundSettings.from_record(record).evaluate_first is False
    assert ServerConfig(evaluate_mode="fused").round_settings(1).evaluate_first is False
