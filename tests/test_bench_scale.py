"""bench.scale in its tiny size (simulation part; the deployment part is the code tests/test_bench_federation.py runs)."""

import json

import pytest

from bench.common import BenchOptions
from bench.scale import PARTS, run


def test_tiny_scale_simulation_reports_rounds_and_peak_memory(tmp_path):
    data = json.loads(run(BenchOptions(out=tmp_path, tiny=True), parts=("simulation",)).read_text())
    assert data["errors"] == {} and data["parts"] == ["simulation"] and "deployment" not in data
    sim = data["simulation"]
    assert sim["sites"] == data["plans"]["simulation"]["sites"] == 3
    assert [r["round"] for r in sim["rounds"]] == [1]
    assert sim["wall_seconds_per_round_median"] > 0 and sim["total_seconds"] >= sim["wall_seconds_per_round_median"]
    assert sim["peak_memory_mib"] > 100  # driver + Ray workers


def test_unknown_part_is_refused(tmp_path):
    with pytest.raises(ValueError, match="subset"):
        run(BenchOptions(out=tmp_path, tiny=True), parts=("gpu",))
    assert PARTS == ("simulation", "deployment")
