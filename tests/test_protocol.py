"""fedct.protocol: the wire contract (round settings, record names, metric keys) and the import direction it buys."""

import ast
import sys
from pathlib import Path

import pytest

from fedct import protocol
from fedct.protocol import RoundSettings, parse_axes, parse_triple
from fl_server.config import ServerConfig

ROOT = Path(__file__).resolve().parents[1]


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


def test_parse_axes():
    assert parse_axes("0", "x") == (0,) and parse_axes(" 0, 2 ", "x") == (0, 2) and parse_axes("", "x") == ()
    with pytest.raises(ValueError, match="test-time-flips must be comma-separated spatial axes"):
        parse_axes("lr", "test-time-flips")


def test_test_time_flips_travel_with_the_round_and_an_older_server_means_one_view():
    assert ServerConfig().model.test_time_flips == ()  # the run config's default: one view
    settings = ServerConfig(model_name="smallcnn", test_time_flips="0").round_settings(1)
    assert settings.model.test_time_flips == (0,)
    record = settings.to_record()
    assert record["test-time-flips"] == "0" and RoundSettings.from_record(record) == settings
    record.pop("test-time-flips")
    assert RoundSettings.from_record(record).model.test_time_flips == ()
    assert RoundSettings.from_record({**record, "test-time-flips": "0,1"}).model.test_time_flips == (0, 1)
    with pytest.raises(ValueError, match="among 0, 1, 2"):
        RoundSettings.from_record({**record, "test-time-flips": "5"})
    assert ServerConfig(test_time_flips=" 2, 0").model.test_time_flips == (2, 0)
    with pytest.raises(ValueError, match="repeat an axis"):
        ServerConfig(test_time_flips="1,1")


def test_optional_round_keys_default_when_an_older_server_omits_them():
    record = ServerConfig(bn_mode="local", local_optimiser="keep").round_settings(1).to_record()
    assert RoundSettings.from_record(record).bn_mode == "local"
    assert RoundSettings.from_record(record).local_optimiser == "keep"
    for key in ("bn-mode", "transport", "proximal-mu", "local-optimiser"):
        record.pop(key)
    settings = RoundSettings.from_record({**record, "proximal-mu": 0.25})  # FedProx adds proximal-mu to the config
    assert (settings.bn_mode, settings.transport, settings.proximal_mu) == ("aggregate", "float32", 0.25)
    assert settings.local_optimiser == "reset"
    with pytest.raises(ValueError, match="local-optimiser 'always'"):
        RoundSettings.from_record({**record, "local-optimiser": "always"})
    with pytest.raises(ValueError, match="bn-mode"):
        RoundSettings.from_record({**record, "bn-mode": "shared"})


def test_evaluate_first_reaches_the_sites_and_defaults_to_false():
    fused = ServerConfig(evaluate_mode="fused").round_settings(2, evaluate_first=True)
    record = fused.to_record()
    assert record["evaluate-first"] is True and RoundSettings.from_record(record) == fused
    record.pop("evaluate-first")  # an older server: no evaluation asked for
    assert RoundSettings.from_record(record).evaluate_first is False
    assert ServerConfig(evaluate_mode="fused").round_settings(1).evaluate_first is False


def test_the_site_config_re_exports_the_wire_contract_unchanged():
    """Site code (and older callers) that import RoundSettings from fl_client.config get the protocol's class."""
    import fl_client.config

    assert fl_client.config.RoundSettings is RoundSettings and fl_client.config.parse_triple is parse_triple


def test_a_bad_round_setting_is_refused_naming_the_key():
    record = ServerConfig().round_settings(1).to_record()
    for key, value in (
        ("batch-size", 0),
        ("local-epochs", 0),
        ("learning-rate", -1.0),
        ("proximal-mu", -0.1),
        ("prognosis-horizon-days", 0.0),
        ("input-size", "64,64"),
    ):
        with pytest.raises(ValueError, match=key):
            RoundSettings.from_record({**record, key: value})


def test_record_names_and_metric_keys_are_the_ones_on_the_wire():
    """The names are the protocol: changing one breaks every deployed site, so they are pinned here."""
    assert (
        protocol.CONFIG_RECORD,
        protocol.ARRAYS_RECORD,
        protocol.METRICS_RECORD,
        protocol.SITE_RECORD,
        protocol.EVALUATION_RECORD,
        protocol.INDEX_RECORD,
    ) == ("config", "arrays", "metrics", "site", "evaluate", "weights-index")
    assert (protocol.NUM_EXAMPLES, protocol.TRAIN_HIST_RISK, protocol.SITE_NAME_METRIC) == (
        "num-examples",
        "train-hist-risk",
        "site-name",
    )
    assert protocol.VAL_PREFIX + protocol.AUC_MACRO == "val-auc-macro"
    assert set(protocol.OPTIONAL_ROUND_KEYS) & set(RoundSettings.keys()) == set()
    assert set(ServerConfig().round_settings(1).to_record()) == set(RoundSettings.keys()) | set(
        protocol.OPTIONAL_ROUND_KEYS
    )


def test_the_site_metrics_use_the_protocols_risk_histogram():
    from fl_client import metrics

    counts = metrics.risk_histogram([-100.0, 0.0, 100.0])["hist-risk"]
    assert len(counts) == protocol.RISK_BINS and sum(counts) == 3
    assert metrics.RISK_RANGE == protocol.RISK_RANGE


# --- the import direction -------------------------------------------------------------------------------------------


def _imports(path: Path) -> set[str]:
    """Every module a file imports (absolute names; relative imports resolved against its package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1]) if path.is_relative_to(ROOT) else ""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return names


def _graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {name: {m for m in _imports(path) if m in modules} for name, path in modules.items()}


def _modules(*packages: str) -> dict[str, Path]:
    out = {}
    for package in packages:
        for path in sorted((ROOT / package).glob("*.py")):
            out[f"{package}.{path.stem}" if path.stem != "__init__" else package] = path
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (module names), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_server_module_imports_the_site_package():
    offenders = {
        name: sorted(m for m in _imports(path) if m == "fl_client" or m.startswith("fl_client."))
        for name, path in _modules("fl_server").items()
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_protocol_imports_neither_side():
    for name in ("fedct.protocol", "fedct.transport"):
        path = ROOT / (name.replace(".", "/") + ".py")
        assert not {m for m in _imports(path) if m.split(".")[0] in ("fl_server", "fl_client")}, name


def test_server_site_and_protocol_have_no_import_cycle():
    modules = {
        **_modules("fl_server", "fl_client"),
        "fedct.protocol": ROOT / "fedct/protocol.py",
        "fedct.transport": ROOT / "fedct/transport.py",
    }
    assert _cycle(_graph(modules)) is None


def test_the_cycle_finder_finds_a_planted_cycle_and_the_import_walker_sees_function_level_imports(tmp_path):
    """The checks above are only as good as these two helpers: a cycle through a lazy (function-level) import counts."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    planted = ROOT / "fl_server" / "rounds.py"
    assert "fl_server.validation" in _imports(planted)
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from fl_client.train import train_round\n")
    assert "fl_client.train" in _imports(source)


def test_importing_the_server_app_loads_no_site_module():
    """Not only the source: a fresh interpreter that imports the ServerApp has no fl_client module loaded."""
    import subprocess

    code = "import sys, fl_server.server_app; print(sorted(m for m in sys.modules if m.split('.')[0] == 'fl_client'))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300, check=True
    )
    assert done.stdout.strip() == "[]"


def _normalisation(n: int):
    from preprocessing.profile_features import ProfileNormalisation

    return ProfileNormalisation(
        variables=tuple(f"v{i}" for i in range(n)),
        mean=tuple(float(i) for i in range(n)),
        std=(1.5,) * (n - 1) + (0.0,),
        count=(20,) * (n - 1) + (0,),
        sites=2,
        schema="s v1",
    )


def test_a_profile_run_sends_its_normalisation_with_every_round_and_the_site_reads_it_back():
    config = ServerConfig(model_name="smallcnn", profile_fusion="late")
    n = config.model.profile_variables
    settings = config.round_settings(2, profile=_normalisation(n))
    record = settings.to_record()
    assert record["profile-fusion"] == "late" and len(record["profile-mean"]) == n
    assert RoundSettings.from_record(record) == settings
    # nothing of the profile in a run without fusion
    assert not any(k.startswith("profile-") for k in ServerConfig().round_settings(1).to_record())


def test_a_profile_round_without_normalisation_or_with_a_broken_one_is_bad_round_config():
    config = ServerConfig(model_name="smallcnn", profile_fusion="film")
    record = config.round_settings(1).to_record()  # before the server has pooled the statistics
    with pytest.raises(protocol.BadRoundConfig, match="no profile normalisation") as info:
        RoundSettings.from_record(record)
    assert info.value.code == "bad_round_config"
    record = config.round_settings(1, profile=_normalisation(config.model.profile_variables)).to_record()
    record["profile-std"] = record["profile-std"][:-1]
    with pytest.raises(protocol.BadRoundConfig, match="standard deviations"):
        RoundSettings.from_record(record)
    with pytest.raises(ValueError, match="has 3 variables, the model fuses 16"):
        config.round_settings(1, profile=_normalisation(3))


def test_profile_dropout_travels_with_the_round_and_is_checked():
    config = ServerConfig(model_name="smallcnn", profile_fusion="late", profile_dropout=0.25)
    settings = config.round_settings(1, profile=_normalisation(config.model.profile_variables))
    record = settings.to_record()
    assert record["profile-dropout"] == 0.25 and RoundSettings.from_record(record).profile_dropout == 0.25
    with pytest.raises(ValueError, match="profile-dropout must be in"):
        RoundSettings.from_record({**record, "profile-dropout": 1.5})
    with pytest.raises(ValueError, match="needs profile-fusion"):
        ServerConfig(profile_dropout=0.2)
