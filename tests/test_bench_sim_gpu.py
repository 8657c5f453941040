"""bench.sim_gpu: simulated sites sharing one GPU; per-site GPU memory and round time vs the sites' training."""

import json

from bench.common import BenchOptions
from bench.sim_gpu import read_train_stats, run


def test_tiny_shared_gpu_simulation_reports_every_site_and_round(tmp_path):
    data = json.loads(run(BenchOptions(out=tmp_path, tiny=True)).read_text())
    assert data["benchmark"] == "sim_gpu" and data["sites"] == 2 and len(data["rounds"]) == 1
    [round_1] = data["rounds"]
    assert set(round_1["sites"]) == {"site-0", "site-1"}
    for site in round_1["sites"].values():
        assert site["seconds"] > 0 and site["device"] in ("cpu", "cuda")
        assert (site["peak_gpu_memory_mib"] is None) == (site["device"] == "cpu")
    assert round_1["sum_site_training_seconds"] >= round_1["slowest_site_training_seconds"] > 0
    assert round_1["wall_over_sum_of_training"] > 0
    assert data["gpus_per_site"] == (0.5 if data["gpu"] else 0.0)


def test_train_stats_are_read_per_site(tmp_path):
    (tmp_path / "site-0").mkdir()
    (tmp_path / "site-0" / "train-stats.jsonl").write_text(
        '{"round": 1, "seconds": 2.0}\n\n{"round": 2, "seconds": 3.0}\n'
    )
    (tmp_path / "site-1").mkdir()  # no rounds yet
    assert read_train_stats(tmp_path) == {"site-0": [{"round": 1, "seconds": 2.0}, {"round": 2, "seconds": 3.0}]}
