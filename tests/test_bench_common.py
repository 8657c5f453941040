"""bench.common: summaries, JSON output without NaN, peak memory of a process tree, and when cached synthetic sites
are reused."""

import json
import math
import subprocess
import sys
import time

from bench.common import BenchOptions, TreeMemorySampler, clean_json, process_tree, ratio, summarise, write_result


def test_summarise_skips_undefined_values():
    s = summarise([1.0, 3.0, math.nan, None])
    assert s["n"] == 2 and s["mean"] == 2.0 and s["min"] == 1.0 and s["max"] == 3.0 and s["std"] > 0
    assert summarise([])["mean"] is None and summarise([5.0])["std"] == 0.0


def test_ratio_and_json_cleaning():
    assert ratio(1.0, 4.0) == 0.25 and ratio(1.0, 0.0) is None and ratio(None, 2.0) is None
    assert clean_json({"a": math.nan, "b": (1, math.inf)}) == {"a": None, "b": [1, None]}


def test_result_file_states_mode_machine_and_payload(tmp_path):
    path = write_result(
        tmp_path,
        "x",
        {"value": math.nan, "k": 1},
        options=BenchOptions(out=tmp_path, quick=True),
        started=time.perf_counter(),
    )
    data = json.loads(path.read_text())
    assert data["benchmark"] == "x" and data["mode"] == "quick" and data["value"] is None and data["k"] == 1
    assert (
        data["machine"]["cpu_count"] >= 1
        and data["machine"]["versions"]["torch"]
        and len(data["load_average_1_5_15_min_at_end"]) == 3
    )


def test_sampler_sees_the_memory_of_a_child_process_tree():
    code = "import sys, time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); print('ready', flush=True); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"  # the memory is touched (resident) from here on
        assert child.pid in process_tree(child.pid)
        with TreeMemorySampler({"child": child.pid}, interval=0.05) as sampler:
            time.sleep(0.5)
        assert sampler.peak_mib["child"] > 190
    finally:
        child.kill()
        child.wait()


def test_synthetic_sites_are_reused_only_when_the_same_generator_wrote_them(tmp_path):
    """The marker names the settings and the phantom's version: the same call reuses the data, data an older
    generator wrote under the same settings is rewritten (not silently benchmarked)."""
    from bench.common import synthetic_sites
    from synthetic.phantom import PHANTOM_VERSION

    root = synthetic_sites(tmp_path / "data", sites=2, patients_per_site=2, small=True)
    marker = root / "bench-federation.json"
    assert json.loads(marker.read_text())["phantom_version"] == PHANTOM_VERSION
    labels = root / "site-0" / "labels.csv"
    labels.write_text(labels.read_text() + "# kept while the generator is the same\n")
    synthetic_sites(tmp_path / "data", sites=2, patients_per_site=2, small=True)
    assert labels.read_text().endswith("# kept while the generator is the same\n")
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "phantom_version": PHANTOM_VERSION - 1}))
    synthetic_sites(tmp_path / "data", sites=2, patients_per_site=2, small=True)
    assert "# kept" not in labels.read_text() and json.loads(marker.read_text())["phantom_version"] == PHANTOM_VERSION
