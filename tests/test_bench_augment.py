"""bench/augment.py: the cost benchmark runs at test size, writes its JSON, refuses bad sizes."""

from __future__ import annotations

import json

import pytest

from bench.augment import main, measure


def test_tiny_run_writes_the_three_timings(tmp_path):
    assert main(["--out", str(tmp_path), "--tiny"]) == 0
    data = json.loads((tmp_path / "augment.json").read_text())
    for key in ("loader_augment_on", "loader_augment_off", "batch_augment_cpu"):
        assert data[key]["median_ms"] > 0 and data[key]["mean_ms"] > 0
    assert data["augment_config"]["enabled"] is True and data["input_size"] == [16, 16, 16]


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"batches": 0}])
def test_bad_sizes_are_refused_naming_them(kwargs):
    with pytest.raises(ValueError, match="batch_size and batches"):
        measure(input_size=(16, 16, 16), **kwargs)
