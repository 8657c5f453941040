"""bench.federation in its tiny size: rounds in simulation (float32 and fp16 on the wire) and in real local deployments
(SuperLink + SuperNodes on 127.0.0.1, insecure and with TLS + SuperNode authentication), wall time against the slowest
site's training, bytes counted at the server's Grid; no process left."""

import json
from pathlib import Path

import pytest
from federation import pids_matching

from bench.common import BenchOptions
from bench.federation import PENDING_ARMS, CountingGrid, message_bytes, run


def test_tiny_federation_benchmark_measures_both_engines_and_stops_every_process(tmp_path):
    data = json.loads(run(BenchOptions(out=tmp_path, tiny=True)).read_text())
    assert data["errors"] == {}, data["errors"]
    size = data["model_size"]
    assert size["model"] == "smallcnn" and size["array_record_bytes"] >= size["raw_bytes"] > 100_000
    for name in ("simulation", "deployment-insecure", "deployment-tls-auth"):  # float32 on the wire
        arm = data["arms"][name]
        assert [r["round"] for r in arm["rounds"]] == [1]
        r = arm["rounds"][0]
        assert r["wall_seconds"] > r["slowest_site_training_seconds"] > 0
        assert abs(r["overhead_seconds"] - (r["wall_seconds"] - r["slowest_site_training_seconds"])) < 1e-6
        assert 0 < r["overhead_percent"] < 100
        # 2 sites: the model goes out twice (train, evaluate) and comes back once per site, plus small configs/metrics
        assert 4 * size["raw_bytes"] <= r["bytes_sent"] < 4 * size["array_record_bytes"] + 200_000
        assert 2 * size["raw_bytes"] <= r["bytes_received"] < 2 * size["array_record_bytes"] + 200_000
        assert 5.9 < arm["bytes_per_round_over_model_size"] < 6.5
    fp16 = data["arms"]["simulation-fp16-transport"]["rounds"][0]
    full = data["arms"]["simulation"]["rounds"][0]
    assert data["arms"]["simulation-fp16-transport"]["transport"] == "float16"
    assert 0.45 < fp16["bytes_sent"] / full["bytes_sent"] < 0.75  # weights halve; configs and integer buffers do not
    secure = data["arms"]["deployment-tls-auth"]
    assert secure["tls"] and secure["supernode_auth"] and not data["arms"]["deployment-insecure"]["tls"]
    assert (
        secure["runner"] == data["arms"]["deployment-insecure"]["runner"] == "warm"
    )  # as `fedct site` runs ClientApps
    deployment = data["arms"]["deployment-insecure"]
    assert set(deployment["peak_rss_mib"]) == {"site-0", "site-1", "superlink"}
    assert all(v > 50 for v in deployment["peak_rss_mib"].values())
    assert data["arms"]["simulation"]["peak_memory_mib"] > 100
    assert set(data["arms_not_run"]) == set(PENDING_ARMS)
    stopped = deployment["stopped_pids"] + secure["stopped_pids"]
    assert len(stopped) >= 3  # SuperLink and one SuperNode per site at least
    assert not [pid for pid in stopped if _flower_process(pid)], (
        "a Flower process started by the benchmark is still running"
    )
    assert not pids_matching("flower-supernode", str(tmp_path)), "a SuperNode of this test is still running"


def _flower_process(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and (b"flower" in cmdline or b"flwr" in cmdline)


def test_authentication_without_tls_is_refused(tmp_path):
    from bench.federation import deployment_arm, plan_for

    with pytest.raises(ValueError, match="needs TLS"):
        deployment_arm(plan_for(BenchOptions(out=tmp_path, tiny=True)), tmp_path, tmp_path, tmp_path / "run", auth=True)


def test_message_bytes_counts_the_serialised_arrays():
    import numpy as np
    from flwr.app import Array, ArrayRecord, RecordDict
    from flwr.app.message.message import make_message
    from flwr.app.metadata import Metadata

    def message(n: int):
        metadata = Metadata(
            run_id=1,
            message_id="",
            src_node_id=0,
            dst_node_id=1,
            reply_to_message_id="",
            group_id="1",
            created_at=0.0,
            ttl=60.0,
            message_type="train",
        )
        return make_message(
            metadata=metadata, content=RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(n, np.float32))})})
        )

    small, big = message(10), message(10_000)
    assert (
        abs((message_bytes(big) - message_bytes(small)) - 4 * (10_000 - 10)) < 64
    )  # + a few bytes of header and varints
    assert CountingGrid(object()).exchanges == []
