"""fl_client/champion.py: a champion bundle sent by the coordinator is stored only when it verifies, and the site's
pointer names the champion `fedct predict` uses by default (the simulation is in tests/test_fl_server_server_app.py)."""

import json

import pytest
import torch

import models.bundle
from fl_client.champion import ChampionRefused, champion_summary, site_champion, store_champion
from inference.predict import resolve_model_dir
from models.bundle import write_bundle
from models.factory import ModelConfig, build_model
from models.registry import ModelRegistry, RegistryError
from preprocessing.transforms import PipelineConfig


def registered(tmp_path, *, seed=0, pipeline_version=None, monkeypatch=None):
    """A registry with one promoted version; returns (version, sha256, files) as the server sends them.
    ``pipeline_version``: the bundle says it was made by a fedct preprocessing with that version."""
    torch.manual_seed(seed)
    model = ModelConfig(name="smallcnn")
    bundle = write_bundle(
        tmp_path / f"bundle-{seed}",
        build_model(model).state_dict(),
        model=model,
        pipeline=PipelineConfig(input_size=(16, 16, 16)),
        provenance={"sites": ["site-0"]},
    )
    registry = ModelRegistry(tmp_path / "registry")
    if pipeline_version is None:
        version = registry.register(bundle)
    else:
        meta = json.loads((bundle / "model.json").read_text())
        meta["pipeline"]["pipeline_version"] = pipeline_version
        (bundle / "model.json").write_text(json.dumps(meta))
        with monkeypatch.context() as m:  # registered by a coordinator whose fedct has that pipeline version
            m.setattr(models.bundle, "PIPELINE_VERSION", pipeline_version)
            version = registry.register(bundle)
    registry.promote(version)
    return registry.package("champion")


def test_a_verified_champion_is_stored_and_becomes_the_sites_default_model(tmp_path):
    version, digest, files = registered(tmp_path)
    site = tmp_path / "site"
    folder = store_champion(site, version=version, content_sha256=digest, files=files)
    assert folder == site / "models" / "v0001" and (site / "models" / "champion").read_text() == "v0001\n"
    assert champion_summary(folder) == {"version": "v0001", "content-sha256": digest}
    assert site_champion(site) == folder and resolve_model_dir(site) == folder
    # the same version again (every run sends the champion) replaces the copy; nothing else is left behind
    store_champion(site, version=version, content_sha256=digest, files=files)
    assert sorted(p.name for p in (site / "models").iterdir()) == ["champion", "v0001"]


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda v, d, f: (v, "0" * 64, f), "the message says 0000"),
        (lambda v, d, f: (v, d, {**f, "model.pt": f["model.pt"][:-1] + b"x"}), "the files hash to"),
        (lambda v, d, f: ("v0002", d, f), "its registry record names 'v0001'"),
        (lambda v, d, f: ("latest", d, f), "not a registry version"),
        (lambda v, d, f: (v, d, {k: f[k] for k in ("model.pt", "model.json")}), "carries model.pt"),
    ],
)
def test_a_champion_that_does_not_verify_is_refused_and_the_earlier_one_stays(tmp_path, change, needle):
    version, digest, files = registered(tmp_path)
    site = tmp_path / "site"
    store_champion(site, version=version, content_sha256=digest, files=files)
    bad_version, bad_digest, bad_files = change(version, digest, files)
    with pytest.raises(ChampionRefused, match=needle) as refused:
        store_champion(site, version=bad_version, content_sha256=bad_digest, files=bad_files)
    assert refused.value.code == "bad_weights"
    assert site_champion(site) == site / "models" / "v0001"
    assert not [p for p in (site / "models").iterdir() if p.name.startswith(".")]


def test_a_champion_of_another_pipeline_version_is_refused(tmp_path, monkeypatch):
    version, digest, files = registered(tmp_path, pipeline_version="99", monkeypatch=monkeypatch)
    with pytest.raises(ChampionRefused, match="cannot be used by this site's fedct: .*'99'"):
        store_champion(tmp_path / "site", version=version, content_sha256=digest, files=files)
    with pytest.raises(FileNotFoundError, match="no champion received yet"):
        site_champion(tmp_path / "site")


def test_a_stored_champion_changed_afterwards_is_not_used(tmp_path):
    version, digest, files = registered(tmp_path)
    folder = store_champion(tmp_path / "site", version=version, content_sha256=digest, files=files)
    meta = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**meta, "created_utc": "changed"}))
    with pytest.raises(RegistryError, match="changed after registration"):
        site_champion(tmp_path / "site")
    (tmp_path / "site" / "models" / "champion").write_text("v0009\n")
    with pytest.raises(FileNotFoundError, match="not a stored version"):
        site_champion(tmp_path / "site")
