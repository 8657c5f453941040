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
        ({"strategy": "fedsgd"}, "strategy 'fedsgd' is not one of fedavg"),
        ({"lr-schedule": "linear"}, "lr-schedule 'linear'"),
        ({"bn-mode": "frozen"}, "bn-mode 'frozen'"),
        ({"transport": "int8"}, "transport 'int8'"),
        ({"fraction-train": 0.0}, "fraction-train"),
        ({"proximal-mu": -1.0}, "proximal-mu"),
        ({"server-learning-rate": 0.0}, "server-learning-rate"),
        ({"server-beta-2": 1.0}, "server-beta-2"),
        ({"trim-beta": 0.5}, "trim-beta"),
        ({"update-zscore": -2.0}, "update-zscore"),
        ({"max-update-norm": -1.0}, "max-update-norm"),
        ({"lr-gamma": 0.0}, "lr-gamma"),
        ({"lr-min": 0.5}, "lr-min"),
        ({"strategy": "krum", "min-sites": 2}, "needs min-sites >= 2\\*num-malicious-nodes\\+3 = 3"),
        ({"resume": "maybe"}, "resume='maybe'"),
        ({"evaluate-mode": "later"}, "evaluate-mode 'later' is not one of separate, fused"),
        ({"evaluate-mode": "fused", "secure-aggregation": True}, "evaluate-mode = \"fused\" cannot be combined with secure-aggregation"),
    ],
)
def test_bad_settings_fail_before_the_run_with_the_key_named(run_config, needle):
    with pytest.raises(ValueError, match=needle):
        ServerConfig.from_run_config(run_config)


def test_learning_rate_schedules():
    constant = ServerConfig(learning_rate=0.01, num_server_rounds=5)
    assert [constant.round_settings(r).learning_rate for r in (1, 5)] == [0.01, 0.01]
    cosine = ServerConfig(learning_rate=0.01, lr_min=0.001, lr_schedule="cosine", num_server_rounds=5)
    rates = [cosine.round_settings(r).learning_rate for r in range(1, 6)]
    assert rates[0] == pytest.approx(0.01) and rates[-1] == pytest.approx(0.001) and rates[2] == pytest.approx(0.0055)
    assert all(a > b for a, b in zip(rates, rates[1:]))
    step = ServerConfig(learning_rate=0.01, lr_schedule="step", lr_step_rounds=2, lr_gamma=0.5, lr_min=0.002, num_server_rounds=9)
    assert [step.round_settings(r).learning_rate for r in range(1, 8)] == pytest.approx([0.01, 0.01, 0.005, 0.005, 0.0025, 0.0025, 0.002])


def test_new_settings_reach_the_sites():
    record = ServerConfig(bn_mode="local", transport="float16").round_settings(2).to_record()
    assert record["bn-mode"] == "local" and record["transport"] == "float16" and record["proximal-mu"] == 0.0
    assert ServerConfig.from_run_config({"resume": "true", "strategy": "fedyogi"}).resume is True


def test_readme_lists_every_run_config_key():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Configuring a run") :]
    section = section[: section.index("\n## ", 1)]
    missing = [key for key in _pyproject_config() if f"`{key}`" not in section]
    assert not missing, f"README 'Configuring a run' lacks {missing}"
