"""bench.train_loop in its tiny size: fedct's own training loop, timed per step (data wait vs compute)."""

import json

from bench.common import BenchOptions
from bench.train_loop import TimedLoader, run


def test_tiny_train_loop_benchmark_splits_each_step(tmp_path):
    data = json.loads(run(BenchOptions(out=tmp_path, tiny=True)).read_text())
    assert data["benchmark"] == "train_loop" and data["mode"] == "tiny" and data["model"] == "smallcnn"
    cpu = data["arms"]["cpu"]
    assert cpu["steps_total"] >= 2 and cpu["steps_timed"] >= 1
    assert cpu["data_wait_seconds"]["mean"] > 0 and cpu["compute_seconds"]["mean"] > 0
    assert 0 < cpu["data_wait_fraction"] < 1
    assert abs(cpu["step_seconds_mean"] - (cpu["data_wait_seconds"]["mean"] + cpu["compute_seconds"]["mean"])) < 1e-6
    assert cpu["samples_per_second"] > 0 and data["peak_rss_mib"] > 0
    if "cuda" not in data["arms"]:
        assert data["gpu"].startswith("none")


def test_timed_loader_records_one_wait_and_one_compute_per_batch():
    class Loader(list):
        dataset = [1, 2, 3]

    timed = TimedLoader(Loader([1, 2, 3]))
    assert list(timed) == [1, 2, 3] and len(timed.waits) == 3 and len(timed.computes) == 3
    assert timed.dataset == [1, 2, 3]
