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


def test_privacy_settings_are_declared_once_and_pyproject_repeats_their_defaults():
    """dp-*/secagg-* are PrivacyConfig's fields: ServerConfig holds one PrivacyConfig, its run config flattens it, and
    pyproject's defaults are the dataclass's."""
    from dataclasses import fields

    from fl_server.privacy import PrivacyConfig

    privacy_keys = PrivacyConfig().to_run_config()
    assert {k: _pyproject_config()[k] for k in privacy_keys} == privacy_keys
    assert not {f.name for f in fields(ServerConfig)} & {f.name for f in fields(PrivacyConfig)}
    assert ServerConfig().privacy == PrivacyConfig()


def test_privacy_settings_round_trip_through_the_flat_run_config():
    config = ServerConfig.from_run_config(
        {
            "dp-mode": "server-fixed",
            "dp-noise-multiplier": "1.5",
            "dp-clipping-norm": 2,
            "model-norm": "group",
            "secagg-max-weight": 50,
        }
    )
    assert (config.privacy.dp_mode, config.privacy.dp_noise_multiplier, config.privacy.secagg_max_weight) == (
        "server-fixed",
        1.5,
        50.0,
    )
    assert ServerConfig.from_run_config(config.to_run_config()) == config
    with pytest.raises(ValueError, match="dp-noise-multiplier"):
        ServerConfig.from_run_config({"dp-mode": "server-fixed", "dp-clipping-norm": 1.0, "model-norm": "group"})
    with pytest.raises(ValueError, match="secagg-num-shares"):
        ServerConfig.from_run_config({"secagg-num-shares": "three"})


def test_pyproject_declares_the_apps():
    flwr = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert flwr["components"] == {"serverapp": "fl_server.server_app:app", "clientapp": "fl_client.client_app:app"}


def test_from_run_config_parses_and_converts():
    cfg = ServerConfig.from_run_config(
        {"num-server-rounds": 5, "learning-rate": "0.01", "input-size": "32,32,32", "sim-data-root": "/x"}
    )
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
        ({"local-optimiser": "always"}, "local-optimiser 'always'"),
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
        (
            {"evaluate-mode": "fused", "secure-aggregation": True},
            'evaluate-mode = "fused" cannot be combined with secure-aggregation',
        ),
        ({"init-from": "v0001"}, "init-from = 'v0001' names a registry version, but no model registry is configured"),
        ({"promotion-metric": "val-auc-macro"}, "promotion metric must be a held-out test metric"),
        ({"promotion-margin": -0.1}, "promotion margin must be a finite number >= 0"),
        ({"profile-fusion": "early"}, "profile-fusion 'early' is not one of none, late, film, only"),
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
    step = ServerConfig(
        learning_rate=0.01, lr_schedule="step", lr_step_rounds=2, lr_gamma=0.5, lr_min=0.002, num_server_rounds=9
    )
    assert [step.round_settings(r).learning_rate for r in range(1, 8)] == pytest.approx(
        [0.01, 0.01, 0.005, 0.005, 0.0025, 0.0025, 0.002]
    )


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


def test_max_site_examples_defaults_to_a_bound_and_refuses_negatives():
    from fl_server.config import DEFAULT_MAX_SITE_EXAMPLES

    assert ServerConfig().examples_bound == DEFAULT_MAX_SITE_EXAMPLES
    assert ServerConfig.from_run_config({"max-site-examples": 250}).examples_bound == 250
    with pytest.raises(ValueError, match="max-site-examples must be >= 0"):
        ServerConfig(max_site_examples=-1)


def test_site_registry_is_read_from_the_environment(tmp_path):
    import json
    import os

    from fl_server.config import SITE_REGISTRY_ENV, SiteRegistry

    path = tmp_path / "site-registry.json"
    path.write_text(json.dumps({"1234567890123": "site-a", "42": "hospital_b.2", "43": "klinik-zürich"}))
    registry = SiteRegistry.from_environ({SITE_REGISTRY_ENV: str(path)})
    assert registry.names == {
        1234567890123: "site-a",
        42: "hospital_b.2",
        43: "klinik-zürich",
    }  # as sites may name themselves
    assert SiteRegistry.from_environ({}) is None
    assert registry.refreshed() is registry  # unchanged file: not read again
    path.write_text(json.dumps({"1234567890123": "site-a", "42": "hospital_b.2", "7": "site-c"}))
    os.utime(path, ns=(registry.mtime_ns + 10**9, registry.mtime_ns + 10**9))
    assert registry.refreshed().names[7] == "site-c"  # a site registered while the run goes on


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (None, "cannot read the site registry"),
        ("{oops", "not JSON"),
        ('["site-a"]', "must be a JSON object"),
        ('{"x1": "site-a"}', "node id 'x1' is not a decimal number"),
        ('{"1": "Müller, Anna"}', "the name of node 1 is not a site name"),
        ('{"1": "x"}'.replace("x", "a" * 65), "the name of node 1 is not a site name"),
        ('{"1": 5}', "the name of node 1 is not a site name"),
    ],
)
def test_a_bad_site_registry_stops_the_server_naming_the_file(tmp_path, text, needle):
    from fl_server.config import SITE_REGISTRY_ENV, SiteRegistry, SiteRegistryError

    path = tmp_path / "site-registry.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(SiteRegistryError, match=needle) as info:
        SiteRegistry.from_environ({SITE_REGISTRY_ENV: str(path)})
    assert str(path) in str(info.value) and SITE_REGISTRY_ENV in str(info.value)


def test_profile_fusion_runs_with_secure_aggregation_and_keeps_its_checks():
    # the profile statistics are pooled through SecAgg+ too (fl_server.secagg): no refusal any more
    config = ServerConfig.from_run_config({"profile-fusion": "late", "secure-aggregation": True, "min-sites": 3})
    assert config.privacy.secure_aggregation and config.model.profile_fusion == "late"
    # every other SecAgg+ check still holds with a fused model
    for extra, needle in (
        ({"min-sites": 1}, "secure-aggregation=true needs min-sites >= 2"),
        ({"evaluate-mode": "fused"}, "cannot be combined with secure-aggregation"),
        ({"strategy": "fedmedian"}, "secure-aggregation=true needs strategy fedavg or fedprox"),
    ):
        with pytest.raises(ValueError, match=needle):
            ServerConfig.from_run_config({"profile-fusion": "film", "secure-aggregation": True, **extra})


def test_profile_fusion_sizes_the_model_from_the_shipped_schema():
    from preprocessing.profile import read_schema

    assert ServerConfig().model.profile_variables == 0
    config = ServerConfig.from_run_config({"profile-fusion": "film"})
    assert config.model.profile_fusion == "film" and config.model.profile_variables == len(read_schema().names)
