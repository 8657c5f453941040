"""fl_server/champion.py: the champion message carries the bundle's files exactly, so the site's hash check passes on
what arrives (the exchange through Flower's simulation is in tests/test_fl_server_server_app.py)."""

import pytest
from flwr.app import RecordDict
from test_fl_client_champion import registered

from fedct.protocol import CHAMPION_FILE_RECORD, CHAMPION_RECORD
from fl_client.champion import ChampionRefused, store_champion
from fl_server.champion import champion_message_content, send_champion
from fl_server.config import ServerConfig
from models.registry import ModelRegistry


def received_files(content: RecordDict) -> dict[str, bytes]:
    """What the site's handler reads from the message (fl_client/client_app.py)."""
    record = content[CHAMPION_RECORD]
    return {
        "model.pt": content[CHAMPION_FILE_RECORD]["model.pt"].numpy().tobytes(),
        "model.json": str(record["model.json"]).encode(),
        "registry.json": str(record["registry.json"]).encode(),
    }


def test_the_message_carries_the_bundle_byte_for_byte(tmp_path):
    version, digest, files = registered(tmp_path)
    content = champion_message_content(version, digest, files)
    assert received_files(content) == files
    assert content[CHAMPION_RECORD]["version"] == "v0001" and content[CHAMPION_RECORD]["content-sha256"] == digest
    folder = store_champion(tmp_path / "site", version=version, content_sha256=digest, files=received_files(content))
    assert folder.name == "v0001"


def test_a_message_changed_on_the_way_is_refused_at_the_site(tmp_path):
    version, digest, files = registered(tmp_path)
    content = champion_message_content(version, digest, {**files, "model.json": files["model.json"] + b" "})
    with pytest.raises(ChampionRefused, match="the files hash to"):
        store_champion(tmp_path / "site", version=version, content_sha256=digest, files=received_files(content))


def test_nothing_is_sent_without_a_registry_or_a_champion(tmp_path):
    assert send_champion(None, ServerConfig()) is None  # no model-registry: no grid is touched
    ModelRegistry(tmp_path / "registry").root.mkdir()
    config = ServerConfig.from_run_config({"model-registry": str(tmp_path / "registry")})
    assert send_champion(None, config) is None  # a registry without a champion
