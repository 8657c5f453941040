"""The site env file: parsed into a typed frozen SiteEnv, every mistake refused with the key and what to check."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from fedct.certs import write_consortium
from fl_client.config import SiteConfig
from fl_client.site_env import SITE_KEYS, SiteEnv, SiteEnvError, parse_superlink_address, read_env_file


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pki")
    write_consortium(root, sites=["site-a"], with_site_keys=True)
    return root


@pytest.fixture
def site(tmp_path, pki):
    """A valid site folder and a function writing its env file (overrides; None removes a key)."""
    dicom = tmp_path / "data" / "dicom"
    (dicom / "study").mkdir(parents=True)
    (dicom / "study" / "1.dcm").write_bytes(b"\0" * 200)
    (tmp_path / "data" / "labels.csv").write_text("StudyInstanceUID,diagnosis\n")
    values = {
        "FEDCT_SITE_NAME": "site-a",
        "FEDCT_SUPERLINK": "fl.example.org:9092",
        "FEDCT_CA_CERT": str(pki / "sites" / "site-a" / "ca.crt"),
        "FEDCT_SITE_KEY": str(pki / "sites" / "site-a" / "site.key"),
        "FEDCT_DICOM_DIR": "data/dicom",  # relative: resolved against the env file's folder
        "FEDCT_LABELS": "data/labels.csv",
        "FEDCT_SITE_DIR": "work",
        "FEDCT_DEVICE": "cpu",
    }

    def write(**changes: str | None) -> Path:
        merged = {**values, **changes}
        text = "# site-a\n\n" + "".join(f"{k}={v}\n" for k, v in merged.items() if v is not None)
        path = tmp_path / "site.env"
        path.write_text(text)
        return path

    return write


def test_valid_env_gives_typed_settings_and_node_config(site, tmp_path):
    env = SiteEnv.from_file(site())
    assert dataclasses.is_dataclass(env) and env.__dataclass_params__.frozen
    assert (env.superlink_host, env.superlink_port, env.superlink) == ("fl.example.org", 9092, "fl.example.org:9092")
    assert env.dicom_dir == tmp_path / "data" / "dicom"
    assert env.site_dir == tmp_path / "work" and env.site_dir.is_dir()
    assert env.approved_apps == tmp_path / "approved-apps.txt"  # approval on by default, next to the env file
    assert env.runtime_port == 9094 and env.workers == 2 and not env.skip_ingest
    node = env.node_config()
    assert SiteConfig.from_context(node, {}) == env.site_config()  # the ClientApp reads exactly these keys
    assert node["labels"] == str(tmp_path / "data" / "labels.csv")


def test_quotes_comments_export_and_approval_disabled_only_explicitly(site):
    path = site(
        FEDCT_SITE_NAME='"site-a"  # trailing comment', FEDCT_APPROVAL="disabled-i-understand", FEDCT_LABELS=None
    )
    path.write_text(path.read_text().replace("FEDCT_DEVICE", "export FEDCT_DEVICE"))
    env = SiteEnv.from_file(path)
    assert env.site_name == "site-a" and env.approved_apps is None and env.labels_csv is None


@pytest.mark.parametrize("value", ["none", "off", "None", "false", "0", "disabled", '""', "''"])
def test_allow_list_key_can_never_switch_approval_off(site, value):
    """FEDCT_APPROVED_APPS=none (or empty) used to turn approval off; now it is an error naming the key."""
    with pytest.raises(
        SiteEnvError,
        match=r"FEDCT_APPROVED_APPS.*(does not switch app approval off|is empty).*"
        r"FEDCT_APPROVAL=disabled-i-understand",
    ):
        SiteEnv.from_file(site(FEDCT_APPROVED_APPS=value))


@pytest.mark.parametrize("value", ["off", "disabled", "yes", "DISABLED-I-UNDERSTAND"])
def test_approval_setting_accepts_only_required_or_the_explicit_phrase(site, value):
    with pytest.raises(SiteEnvError, match=f"FEDCT_APPROVAL='{value}' is not one of required, disabled-i-understand"):
        SiteEnv.from_file(site(FEDCT_APPROVAL=value))
    assert SiteEnv.from_file(site(FEDCT_APPROVAL="required")).approved_apps is not None


def test_allow_list_inside_the_site_work_folder_is_refused(site, tmp_path):
    """The ClientApp can write SITE_DIR: an allow-list there would let an app approve itself."""
    for inside in ("work/approved-apps.txt", str(tmp_path / "work" / "sub" / "list.txt")):
        with pytest.raises(SiteEnvError, match="is inside FEDCT_SITE_DIR=.*an app could approve itself"):
            SiteEnv.from_file(site(FEDCT_APPROVED_APPS=inside))
    (tmp_path / "alias").symlink_to(tmp_path / "work")  # a symlink into the work folder is the work folder
    with pytest.raises(SiteEnvError, match="is inside FEDCT_SITE_DIR"):
        SiteEnv.from_file(site(FEDCT_APPROVED_APPS=str(tmp_path / "alias" / "list.txt")))
    (tmp_path / "approval").mkdir()
    with pytest.raises(SiteEnvError, match="is a folder"):
        SiteEnv.from_file(site(FEDCT_APPROVED_APPS=str(tmp_path / "approval")))
    env = SiteEnv.from_file(site(FEDCT_APPROVED_APPS="approval/approved-apps.txt"))
    assert env.approved_apps == tmp_path / "approval" / "approved-apps.txt"


def test_an_env_file_inside_the_work_folder_needs_an_allow_list_elsewhere(site, tmp_path):
    path = site()
    (tmp_path / "work").mkdir(exist_ok=True)
    inside = tmp_path / "work" / "site.env"
    inside.write_text(
        path.read_text()
        .replace("FEDCT_SITE_DIR=work", f"FEDCT_SITE_DIR={tmp_path / 'work'}")
        .replace("=data/", f"={tmp_path}/data/")
    )
    with pytest.raises(SiteEnvError, match="approved-apps.txt is inside FEDCT_SITE_DIR"):
        SiteEnv.from_file(inside)


def test_feedback_labels_are_opt_in_and_reach_the_clientapp(site, tmp_path):
    from preprocessing.labels import FeedbackSetting

    env = SiteEnv.from_file(site())
    assert env.site_config().feedback is None and "feedback-labels" not in env.node_config()
    env = SiteEnv.from_file(site(FEDCT_FEEDBACK_LABELS="yes", FEDCT_FEEDBACK_DB="results/feedback.sqlite"))
    expected = FeedbackSetting(db=tmp_path / "results" / "feedback.sqlite", conflict="labels")
    assert env.site_config().feedback == expected
    node = env.node_config()
    assert node["feedback-labels"] == "yes" and node["feedback-db"] == str(expected.db)
    assert SiteConfig.from_context(node, {}).feedback == expected
    env = SiteEnv.from_file(site(FEDCT_FEEDBACK_LABELS="YES", FEDCT_FEEDBACK_CONFLICT="feedback"))
    assert env.site_config().feedback == FeedbackSetting(db=tmp_path / "work" / "feedback.sqlite", conflict="feedback")
    with pytest.raises(SiteEnvError, match="feedback-labels='sometimes' must be yes or no"):
        SiteEnv.from_file(site(FEDCT_FEEDBACK_LABELS="sometimes"))
    with pytest.raises(SiteEnvError, match="conflict rule 'csv'"):
        SiteEnv.from_file(site(FEDCT_FEEDBACK_LABELS="yes", FEDCT_FEEDBACK_CONFLICT="csv"))


def test_site_limits_and_split_reach_the_clientapp(site):
    from fl_client.limits import SiteLimits
    from preprocessing.split import SplitConfig

    env = SiteEnv.from_file(site())
    assert env.limits == SiteLimits() and env.split == SplitConfig(0.2, 0.2)  # sane defaults
    env = SiteEnv.from_file(
        site(
            FEDCT_MAX_INPUT_SIZE="128",
            FEDCT_MAX_INPUT_VOXELS="1000000",
            FEDCT_MIN_SPACING_MM="2.5",
            FEDCT_MAX_LOCAL_EPOCHS="3",
            FEDCT_MAX_BATCH_SIZE="8",
            FEDCT_MAX_BATCH_VOXELS="4000000",
            FEDCT_CACHE_MAX_GB="0.5",
            FEDCT_VAL_FRACTION="0.25",
            FEDCT_TEST_FRACTION="0.15",
        )
    )
    assert env.limits == SiteLimits(
        max_input_size=128,
        max_input_voxels=1_000_000,
        min_spacing_mm=2.5,
        max_local_epochs=3,
        max_batch_size=8,
        max_batch_voxels=4_000_000,
        cache_max_gb=0.5,
    )
    assert env.split == SplitConfig(val_fraction=0.25, test_fraction=0.15)
    site_config = SiteConfig.from_context(env.node_config(), {})
    assert site_config == env.site_config()
    assert site_config.limits == env.limits and site_config.split == env.split


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"FEDCT_MAX_BATCH_SIZE": "many"}, "FEDCT_MAX_BATCH_SIZE .*must be a whole number, got 'many'"),
        ({"FEDCT_MAX_LOCAL_EPOCHS": "2.5"}, "FEDCT_MAX_LOCAL_EPOCHS .*must be a whole number"),
        ({"FEDCT_MAX_INPUT_SIZE": "0"}, "FEDCT_MAX_INPUT_SIZE must be a number > 0, got 0"),
        ({"FEDCT_MIN_SPACING_MM": "-1"}, "FEDCT_MIN_SPACING_MM must be a number > 0"),
        ({"FEDCT_CACHE_MAX_GB": "nan"}, "FEDCT_CACHE_MAX_GB must be a number > 0"),
        ({"FEDCT_VAL_FRACTION": "1.5"}, "FEDCT_VAL_FRACTION='1.5' must be a number in"),
        ({"FEDCT_TEST_FRACTION": "a"}, "FEDCT_TEST_FRACTION='a' must be a number in"),
        ({"FEDCT_VAL_FRACTION": "0.6", "FEDCT_TEST_FRACTION": "0.5"}, "val_fraction \\+ test_fraction must be < 1"),
        ({"FEDCT_MAX_BATCH": "8"}, "unknown key"),
    ],
)
def test_bad_limits_and_split_name_the_key(site, changes, message):
    with pytest.raises(SiteEnvError, match=message):
        SiteEnv.from_file(site(**changes))


@pytest.mark.parametrize(
    ("value", "runner"), [(None, "warm"), ("", "warm"), ("warm", "warm"), ("flower", "flower"), ("Flower", "flower")]
)
def test_clientapp_runner_defaults_to_the_warm_executor(site, tmp_path, value, runner):
    env = SiteEnv.from_file(site(FEDCT_CLIENTAPP_RUNNER=value))
    assert env.clientapp_runner == runner
    assert env.superexec_secret_file == tmp_path / "work" / "state" / "superexec.secret"  # inside the work folder


def test_ipv6_superlink_address():
    assert parse_superlink_address("[::1]:9092", source="x") == ("::1", 9092)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"FEDCT_CA_CERT": None}, r"missing FEDCT_CA_CERT \(the consortium CA certificate"),
        ({"FEDCT_SUPERLINK": "fl.example.org"}, "FEDCT_SUPERLINK: 'fl.example.org' is not host:port"),
        ({"FEDCT_SUPERLINK": "https://fl.example.org:9092"}, "without a scheme"),
        ({"FEDCT_SUPERLINK": "fl.example.org:99999"}, "is not host:port"),
        ({"FEDCT_CA_CERT": "/nonexistent/ca.crt"}, "FEDCT_CA_CERT=/nonexistent/ca.crt: no such file"),
        ({"FEDCT_SITE_KEY": "/nonexistent/site.key"}, "FEDCT_SITE_KEY=/nonexistent/site.key: no such file"),
        ({"FEDCT_DICOM_DIR": "nowhere"}, "FEDCT_DICOM_DIR=.*nowhere: no such folder"),
        ({"FEDCT_DEVICE": "tpu"}, "FEDCT_DEVICE='tpu' is not one of auto, cpu, cuda"),
        ({"FEDCT_SITE_NAME": "site/b"}, "site-name"),
        ({"FEDCT_SITE_NAME": "site a"}, "FEDCT_SITE_NAME has spaces; quote the value"),
        ({"FEDCT_RUNTIME_PORT": "http"}, "FEDCT_RUNTIME_PORT='http' must be an integer"),
        ({"FEDCT_INGEST_SPACING": "1,2"}, "FEDCT_INGEST_SPACING must be three"),
        ({"FEDCT_DATA": "/data"}, "unknown key"),
        ({"FEDCT_CLIENTAPP_RUNNER": "superexec"}, "FEDCT_CLIENTAPP_RUNNER='superexec' is not one of warm, flower"),
    ],
)
def test_bad_settings_name_the_key(site, changes, message):
    with pytest.raises(SiteEnvError, match=message):
        SiteEnv.from_file(site(**changes))


def test_missing_env_file(tmp_path):
    with pytest.raises(SiteEnvError, match="does not exist"):
        SiteEnv.from_file(tmp_path / "nope.env")


def test_malformed_line_is_reported_with_its_number(tmp_path):
    path = tmp_path / "site.env"
    path.write_text("FEDCT_SITE_NAME=a\nthis is not an assignment\n")
    with pytest.raises(SiteEnvError, match=r"site.env: line 2: expected KEY=VALUE"):
        read_env_file(path)


def test_empty_data_folder(site, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SiteEnvError, match="holds no file; is the DICOM export mounted"):
        SiteEnv.from_file(site(FEDCT_DICOM_DIR=str(tmp_path / "empty")))


def test_unreadable_or_wrong_keys(site, tmp_path, pki):
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key")
    garbage.chmod(0o600)
    with pytest.raises(SiteEnvError, match="not an unencrypted OpenSSH private key"):
        SiteEnv.from_file(site(FEDCT_SITE_KEY=str(garbage)))
    with pytest.raises(SiteEnvError, match="FEDCT_CA_CERT=.*not a PEM certificate|no certificate"):
        SiteEnv.from_file(site(FEDCT_CA_CERT=str(garbage)))
    shared = tmp_path / "shared.key"
    shared.write_bytes((pki / "sites" / "site-a" / "site.key").read_bytes())
    shared.chmod(0o644)
    with pytest.raises(SiteEnvError, match="readable by others .*chmod 600"):
        SiteEnv.from_file(site(FEDCT_SITE_KEY=str(shared)))
    if os.geteuid() != 0:  # root reads any file, so the unreadable case exists only for other users
        locked = tmp_path / "locked.key"
        locked.write_bytes(shared.read_bytes())
        locked.chmod(0)
        with pytest.raises(SiteEnvError, match="cannot be read"):
            SiteEnv.from_file(site(FEDCT_SITE_KEY=str(locked)))


def test_cuda_asked_for_but_absent(site):
    import torch

    if torch.cuda.is_available():
        assert SiteEnv.from_file(site(FEDCT_DEVICE="cuda")).device == "cuda"
    else:
        with pytest.raises(SiteEnvError, match="FEDCT_DEVICE=cuda but no CUDA device"):
            SiteEnv.from_file(site(FEDCT_DEVICE="cuda"))


def test_pacs_settings_share_the_site_env_file(site, tmp_path):
    """One env file per site: FEDCT_PACS_* keys are the PACS reader's (checked there), not unknown site keys."""
    from preprocessing.pacs import read_pacs_settings

    path = site(FEDCT_PACS_URL="http://127.0.0.1:8042/dicom-web", FEDCT_PACS_MODALITY="CT")
    assert SiteEnv.from_file(path).site_name == "site-a"
    assert read_pacs_settings(path).url == "http://127.0.0.1:8042/dicom-web"


def test_the_example_site_env_explains_every_key_with_the_real_defaults():
    """configs/site.env is what hospital IT copies: its keys are known and its limits are the code's defaults."""
    from fl_client.limits import LIMIT_KEYS, SiteLimits

    example = read_env_file(Path(__file__).resolve().parents[1] / "configs" / "site.env")
    assert not [k for k in example if k.startswith("FEDCT_") and k not in SITE_KEYS]
    limits = SiteLimits.from_env_values(example)
    assert limits == SiteLimits()
    assert all(env_key in example for _node, env_key, _meaning in LIMIT_KEYS.values())
    assert (example["FEDCT_VAL_FRACTION"], example["FEDCT_TEST_FRACTION"]) == ("0.2", "0.2")
    assert example["FEDCT_APPROVED_APPS"] == "/config/approval/approved-apps.txt"  # outside FEDCT_SITE_DIR=/site
    assert example["FEDCT_SITE_DIR"] == "/site"


def test_profile_dir_is_passed_to_the_site_and_must_hold_a_mapping(site, tmp_path):
    profile = tmp_path / "profile"
    profile.mkdir()
    with pytest.raises(SiteEnvError, match="FEDCT_PROFILE_DIR=.*no profile-mapping.toml"):
        SiteEnv.from_file(site(FEDCT_PROFILE_DIR="profile"))
    (profile / "profile-mapping.toml").write_text("")
    env = SiteEnv.from_file(site(FEDCT_PROFILE_DIR="profile"))
    assert env.profile_dir == profile and env.node_config()["profile-dir"] == str(profile)
    assert SiteConfig.from_context(env.node_config(), {}) == env.site_config()
    assert env.site_config().profile_dir == profile
    # without the key: the labels file's folder when it holds a mapping, else no profile
    assert SiteEnv.from_file(site()).site_config().profile_dir is None
    (tmp_path / "data" / "profile-mapping.toml").write_text("")
    plain = SiteEnv.from_file(site())
    assert plain.site_config().profile_dir == tmp_path / "data" and "profile-dir" not in plain.node_config()
    assert SiteConfig.from_context(plain.node_config(), {}).profile_dir == tmp_path / "data"
