"""The site env file: parsed into a typed frozen SiteEnv, every mistake refused with the key and what to check."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from fedct.certs import write_consortium
from fl_client.config import SiteConfig
from fl_client.site_env import SiteEnv, SiteEnvError, parse_superlink_address, read_env_file


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
    assert env.approved_apps == tmp_path / "work" / "approved-apps.txt"  # approval on by default
    assert env.runtime_port == 9094 and env.workers == 2 and not env.skip_ingest
    node = env.node_config()
    assert SiteConfig.from_context(node, {}) == env.site_config()  # the ClientApp reads exactly these keys
    assert node["labels"] == str(tmp_path / "data" / "labels.csv")


def test_quotes_comments_export_and_approval_off(site):
    path = site(FEDCT_SITE_NAME='"site-a"  # trailing comment', FEDCT_APPROVED_APPS="off", FEDCT_LABELS=None)
    path.write_text(path.read_text().replace("FEDCT_DEVICE", "export FEDCT_DEVICE"))
    env = SiteEnv.from_file(path)
    assert env.site_name == "site-a" and env.approved_apps is None and env.labels_csv is None


@pytest.mark.parametrize(("value", "runner"), [(None, "warm"), ("", "warm"), ("warm", "warm"), ("flower", "flower"), ("Flower", "flower")])
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
    with pytest.raises(SiteEnvError, match=r"site.env:2: expected KEY=VALUE"):
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
