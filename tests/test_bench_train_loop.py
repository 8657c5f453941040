"""bench.train_loop: fedct's own training loop against the compute-only limit of the same network, size and batch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import BenchOptions
from bench.train_loop import (
    GPU_PRESET,
    TimedLoader,
    bench_settings,
    interval_union,
    options_from_environment,
    profile_run_config,
    run,
)

ROOT = Path(__file__).resolve().parent.parent


def test_tiny_train_loop_benchmark_reports_loop_limit_and_ratio(tmp_path):
    data = json.loads(run(BenchOptions(out=tmp_path, tiny=True)).read_text())
    assert data["benchmark"] == "train_loop" and data["mode"] == "tiny" and data["model"] == "smallcnn"
    assert data["profile"] == "default"
    cpu = data["arms"]["cpu"]
    assert cpu["compute"] == {
        "device": "cpu",
        "precision": "fp32",
        "channels_last": False,
        "loader_workers": 0,
        "pin_memory": False,
        "persistent_workers": False,
        "gpu_augment": False,
    }
    assert cpu["steps_total"] >= 2 and cpu["steps_timed"] >= 1
    assert cpu["data_wait_seconds"]["mean"] > 0 and cpu["compute_seconds"]["mean"] > 0
    assert 0 < cpu["data_wait_fraction"] < 1
    assert abs(cpu["step_seconds_mean"] - (cpu["data_wait_seconds"]["mean"] + cpu["compute_seconds"]["mean"])) < 1e-6
    assert cpu["samples_per_second"] > 0 and data["peak_rss_mib"] > 0
    assert cpu["limit"]["samples_per_second"] > 0 and cpu["limit"]["precision"] == "fp32"
    assert cpu["ratio_loop_to_limit"] == pytest.approx(cpu["samples_per_second"] / cpu["limit"]["samples_per_second"])
    ab = cpu["metatensor_ab"]  # main's MetaTensor step vs the plain step, interleaved
    assert (
        ab["metatensor_step_seconds"]["n"] == ab["plain_step_seconds"]["n"] >= 1
        and ab["speedup_plain_over_metatensor"] > 0
    )
    if "cuda" not in data["arms"]:
        assert data["gpu"].startswith("none")
    else:
        cuda = data["arms"]["cuda"]
        assert 0 <= cuda["gpu_busy_fraction"] <= 1 and cuda["limit"]["samples_per_second"] > 0


def test_tiny_gpu_profile_runs_the_presets_path_and_its_own_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDCT_LOADER_WORKERS", "1")  # the site.env keys are what the benchmark times
    path = run(BenchOptions(out=tmp_path, tiny=True, profile="gpu", devices="cpu"))
    assert path.name == "train_loop-gpu.json"
    data = json.loads(path.read_text())
    assert data["profile"] == "gpu" and data["input_size"] == [16, 16, 16]  # tiny: small volumes whatever the profile
    assert data["arms"]["cpu"]["compute"]["loader_workers"] == 1 and data["arms"]["cpu"]["samples_per_second"] > 0


def test_gpu_preset_is_a_valid_run_config_at_a_gpu_size():
    from fl_server.config import ServerConfig

    preset = profile_run_config("gpu")
    config = ServerConfig.from_run_config(preset)  # every key is a known run-config key with a valid value
    settings = config.round_settings(1)
    assert (
        settings.pipeline.input_size[0] >= 128
        and settings.pipeline.input_size[1] >= 128
        and settings.pipeline.input_size[2] >= 96
    )
    assert max(settings.pipeline.target_spacing_mm) <= 2.5 and 8 <= settings.batch_size <= 32
    assert GPU_PRESET.name == "run-gpu.toml" and profile_run_config("default") == {}
    with pytest.raises(ValueError, match="profile"):
        profile_run_config("tpu")


@pytest.mark.parametrize("profile", ["default", "gpu"])
def test_bench_settings_agree_with_the_servers(profile):
    """The benchmark builds round settings without fl_server.config (flwr); they must be the server's."""
    from fl_server.config import ServerConfig

    run_config = profile_run_config(profile)
    ours = bench_settings(run_config)
    server = ServerConfig.from_run_config(run_config).round_settings(1)
    for field in ("learning_rate", "batch_size", "seed", "model", "pipeline", "split", "loss_weights"):
        assert getattr(ours, field) == getattr(server, field), field


def test_the_benchmark_path_imports_no_flwr():
    """The GPU machines have no flwr: bench train-loop and the training code must not import it."""
    code = (
        "import sys; sys.modules['flwr'] = None; "  # any `import flwr` now raises ImportError
        "import bench.cli, bench.train_loop, bench.gpu_check, fl_client.train, preprocessing.ingest; "
        "from bench.train_loop import bench_settings, profile_run_config; bench_settings(profile_run_config('gpu')); print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_compute_settings_come_from_the_site_env_keys(monkeypatch):
    monkeypatch.setenv("FEDCT_PRECISION", "bf16")
    monkeypatch.setenv("FEDCT_LOADER_WORKERS", "3")
    options = options_from_environment()
    assert options.precision == "bf16" and options.loader_workers == 3 and options.pin_memory is None


def test_interval_union_counts_overlaps_once():
    assert interval_union([(0, 2), (1, 3), (5, 6), (6, 7), (10, 9)]) == 5.0
    assert interval_union([]) == 0.0


def test_timed_loader_records_one_wait_and_one_compute_per_batch():
    class Loader(list):
        dataset = [1, 2, 3]

    timed = TimedLoader(Loader([{"label": [0, 1]}, {"label": [2]}, {"label": [0]}]))
    assert len(list(timed)) == 3 and len(timed.waits) == 3 and len(timed.computes) == 3
    timed.finish()
    assert timed.dataset == [1, 2, 3] and timed.sizes == [2, 1, 1]
    summary = timed.summary(warmup=1)
    assert summary["steps_timed"] == 2 and summary["samples_per_second"] > 0
    assert timed.summary(warmup=5)["steps_timed"] == 3  # too few steps: none are dropped


def test_cli_refuses_train_loop_options_for_other_benchmarks(tmp_path):
    from bench.cli import run_benchmarks  # noqa: F401 - the handler is what the CLI calls
    from fedct.cli import main

    assert main(["bench", "preprocess", "--profile", "gpu", "--out", str(tmp_path)]) == 2
