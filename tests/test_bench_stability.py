"""bench/stability.py: variant parsing (good and bad) and the ratio bookkeeping of a run's JSON."""

from __future__ import annotations

import pytest

from bench.stability import Variant, _typed, parse_variant


def test_a_variant_is_a_strategy_with_run_config_overrides():
    assert parse_variant("fedavg") == Variant(name="fedavg", strategy="fedavg", overrides=())
    v = parse_variant(" fedavg:bn-mode=local:server-learning-rate=2.0 ")
    assert v.strategy == "fedavg" and v.overrides == (("bn-mode", "local"), ("server-learning-rate", "2.0"))
    assert v.name == "fedavg:bn-mode=local:server-learning-rate=2.0"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (":bn-mode=local", "no strategy"),
        ("fedavg:bn-mode", "'bn-mode' is not key=value"),
        ("fedavg:=3", "'=3' is not key=value"),
    ],
)
def test_a_malformed_variant_is_refused_naming_it(text, needle):
    with pytest.raises(ValueError, match=needle):
        parse_variant(text)


def test_override_values_get_the_run_configs_types():
    assert _typed("3") == 3 and isinstance(_typed("3"), int)
    assert _typed("0.5") == 0.5 and _typed("true") is True and _typed("False") is False and _typed("group") == "group"
