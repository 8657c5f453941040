import tomllib
from pathlib import Path

import pytest

from fl_server.config import SITE_KEYS, ServerConfig

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_config():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_defaults_equal_the_dataclass_defaults():
    file_config = _pyproject_config()
    defaults = ServerConfig().to_run_config()
    server_keys = {k: v for k, v in file_config.items() if k not in SITE_KEYS}
    assert server_keys == defaults


def test_pyproject_declares_the_apps():
    flwr = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert flwr["components"] == {"serverapp": "fl_server.server_app:app", "clientapp": "fl_client.client_app:app"}


def test_from_run_config_parses_and_converts():
    cfg = ServerConfig.from_run_config({"num-server-rounds": 5, "learning-rate": "0.01", "input-size": "32,32,32", "sim-data-root": "/x"})
    assert cfg.num_server_rounds == 5 and cfg.learning_rate == 0.01
    assert cfg.pipeline.input_size == (32, 32, 32)
    settings = cfg.round_settings(3)
    assert settings.server_round == 3 and settings.model.name == "densenet121"


@pytest.mark.parametrize(
    ("run_config", "needle"),
    [
        ({"num-server-rounds": 0}, "num-server-rounds"),
        ({"num-rounds": 3}, "unknown run config key 'num-rounds'"),
        ({"learning-rate": "fast"}, "learning-rate='fast'"),
        ({"input-size": "64,64"}, "input-size"),
        ({"model-name": "vgg"}, "'vgg'"),
        ({"hu-min": 500.0}, "hu_min"),
        ({"min-sites": 0}, "min-sites"),
        ({"batch-size": 0}, "batch-size"),
    ],
)
def test_bad_settings_fail_before_the_run_with_the_key_named(run_config, needle):
    with pytest.raises(ValueError, match=needle):
        ServerConfig.from_run_config(run_config)
