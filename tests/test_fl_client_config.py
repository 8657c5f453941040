import pytest

from fl_client.config import SiteConfig, SiteConfigError
from fl_server.config import ServerConfig


def test_deployment_node_config(tmp_path):
    site = SiteConfig.from_context(
        {
            "site-name": "site-a",
            "dicom-dir": str(tmp_path / "dicom"),
            "site-dir": str(tmp_path / "work"),
            "labels": str(tmp_path / "l.csv"),
            "device": "cpu",
        },
        {},
    )
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


# --- what a site lets the server ask (#16.6) and its fixed split (#17.4) ---------------------------------------------

from dataclasses import replace  # noqa: E402

from fl_client.config import SiteLimitError, SiteLimits  # noqa: E402
from preprocessing.split import SPLIT_FILE, SplitConfig  # noqa: E402


def _site(tmp_path, **fields) -> SiteConfig:
    return SiteConfig(
        site_name="site-a",
        dicom_dir=tmp_path / "dicom",
        site_dir=tmp_path / "work",
        labels_csv=None,
        device="cpu",
        **fields,
    )


@pytest.mark.parametrize(
    ("server", "key"),
    [
        ({"input_size": "300,64,48"}, "FEDCT_MAX_INPUT_SIZE"),
        ({"input_size": "256,256,256"}, "FEDCT_MAX_INPUT_VOXELS"),
        ({"target_spacing_mm": "5.0,0.3,5.0"}, "FEDCT_MIN_SPACING_MM"),
        ({"local_epochs": 500}, "FEDCT_MAX_LOCAL_EPOCHS"),
        ({"batch_size": 1000}, "FEDCT_MAX_BATCH_SIZE"),
        ({"input_size": "256,256,128", "batch_size": 8}, "FEDCT_MAX_BATCH_VOXELS"),
    ],
)
def test_a_request_over_a_site_limit_is_refused_with_a_stable_code_before_anything_is_read(tmp_path, server, key):
    site = _site(tmp_path)
    settings = ServerConfig(**server).round_settings(1)
    with pytest.raises(SiteLimitError, match=f"over this site's limit {key}=") as refused:
        site.admit(settings)
    assert refused.value.code == "site_limit_exceeded" and refused.value.limit == key
    assert not (tmp_path / "work").exists()  # refused before the split is fixed or a cache is touched


def test_requests_within_the_limits_are_admitted_unchanged_and_limits_are_the_sites(tmp_path):
    settings = ServerConfig().round_settings(1)  # the CPU default run: 64x64x48, batch 4
    assert _site(tmp_path).admit(settings) == settings
    gpu = ServerConfig(input_size="128,128,96", target_spacing_mm="2.5,2.5,2.5", batch_size=16).round_settings(1)
    assert _site(tmp_path).admit(gpu) == gpu  # the GPU preset fits the defaults
    small = _site(tmp_path, limits=SiteLimits(max_batch_size=2))  # a site may be stricter
    with pytest.raises(SiteLimitError, match="batch-size 4, over this site's limit FEDCT_MAX_BATCH_SIZE=2"):
        small.admit(settings)
    assert small.admit(replace(settings, batch_size=2)).batch_size == 2


def test_limits_come_from_the_node_config_and_bad_ones_are_named(tmp_path):
    node = {
        "site-name": "a",
        "dicom-dir": "/d",
        "site-dir": str(tmp_path),
        "max-batch-size": 8,
        "cache-max-gb": "0.5",
        "val-fraction": 0.3,
        "test-fraction": 0.1,
    }
    site = SiteConfig.from_context(node, {})
    assert site.limits == SiteLimits(max_batch_size=8, cache_max_gb=0.5)
    assert site.split == SplitConfig(val_fraction=0.3, test_fraction=0.1)
    with pytest.raises(SiteConfigError, match="FEDCT_MAX_BATCH_SIZE"):
        SiteConfig.from_context({**node, "max-batch-size": "lots"}, {})
    with pytest.raises(SiteConfigError, match="val-fraction but not test-fraction"):
        SiteConfig.from_context({k: v for k, v in node.items() if k != "test-fraction"}, {})
    with pytest.raises(SiteConfigError, match="FEDCT_VAL_FRACTION"):
        SiteConfig.from_context({**node, "val-fraction": 0.7, "test-fraction": 0.5}, {})


def test_the_server_cannot_change_a_sites_split(tmp_path, caplog):
    site = _site(tmp_path, split=SplitConfig(val_fraction=0.25, test_fraction=0.25))
    asked = ServerConfig(val_fraction=0.1, test_fraction=0.1).round_settings(1)
    with caplog.at_level("WARNING", logger="fedct.split"):
        admitted = site.admit(asked)
    assert admitted.split == SplitConfig(0.25, 0.25) and admitted.pipeline == asked.pipeline
    assert "the server asked for split val 0.1 / test 0.1; ignored" in caplog.text
    assert (tmp_path / "work" / SPLIT_FILE).is_file()
    # without a split of its own (a SuperNode started by hand, simulation), the first request is fixed
    first = _site(tmp_path / "b")
    assert first.admit(asked).split == SplitConfig(0.1, 0.1)
    later = ServerConfig(val_fraction=0.3, test_fraction=0.3).round_settings(2)
    assert first.admit(later).split == SplitConfig(0.1, 0.1)


def test_a_changed_server_fraction_gives_the_same_patient_split_on_real_dicom(tmp_path):
    """Re-splitting with other fractions moves single patients between splits (the server could isolate them by
    difference); admitted settings keep every patient where it was."""
    from federation import tiny_federation

    from fl_client.train import load_site

    data = tiny_federation(tmp_path / "data", sites=1, patients_per_site=10)
    site = SiteConfig(
        site_name="site-0",
        dicom_dir=data / "site-0" / "dicom",
        site_dir=tmp_path / "work",
        labels_csv=data / "site-0" / "labels.csv",
        device="cpu",
        workers=1,
    )
    base = ServerConfig(input_size="16,16,16", target_spacing_mm="16,16,16")

    def assignment(settings):
        return {s.patient: s.split for s in load_site(site, settings).studies}

    first = assignment(site.admit(base.round_settings(1)))
    shifted = replace(base, val_fraction=0.1, test_fraction=0.3).round_settings(2)
    assert assignment(site.admit(shifted)) == first
    assert len(first) >= 10 and set(first.values()) == {"train", "val", "test"}
    # what the server could do before: its fractions re-split the same patients
    assert assignment(shifted) != first


def test_train_round_refuses_an_over_limit_request(tmp_path):
    from fl_client.train import evaluate_round, train_round

    site = _site(tmp_path, limits=SiteLimits(max_local_epochs=1))
    settings = ServerConfig(local_epochs=2, model_name="smallcnn").round_settings(1)
    for run in (
        lambda: train_round(site, settings, {}),
        lambda: evaluate_round(site, replace(settings, local_epochs=3), {}),
    ):
        with pytest.raises(SiteLimitError, match="FEDCT_MAX_LOCAL_EPOCHS"):
            run()
    assert not (tmp_path / "work").exists()
