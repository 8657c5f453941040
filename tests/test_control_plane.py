"""The hospital-facing address serves the Fleet API only (issue #16.1/#16.2), with real processes on 127.0.0.1.

``fedct server start`` (the container's entrypoint script) runs the SuperLink on loopback, its SuperExec and the
nginx proxy. The attack of issue #16 is replayed against the proxy's address from a fresh Flower home that holds
nothing but the consortium's ``ca.crt``: registering a SuperNode key, listing runs/nodes and submitting a run whose
ServerApp would write a marker file are all refused with HTTP 403 and nothing runs on the server. A registered
SuperNode still connects through the proxy (a ~12 MB message each way, chunked like a model, and heartbeats), and
the coordinator's own ``fedct server submit`` runs the same probe app to completion: the marker then exists, which
shows the refused attempt was not refused for some other reason. Every process is stopped by PID.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from federation import pids_matching, stop_pids, wait_until

from fedct.certs import write_consortium, write_site_key
from fedct.deploy import PROXY_REFUSAL, SITE_REGISTRY_ENV, ServerEnv, registered_nodes

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
#: Floats in the probe's array: 3 Mi float32 = 12 MiB, more than two of Flower's 5 MiB object chunks.
PROBE_FLOATS = 3 * 1024 * 1024

PROBE_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "probe"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["probe"]

[tool.flwr.app]
publisher = "attacker"

[tool.flwr.app.components]
serverapp = "probe.apps:server"
clientapp = "probe.apps:client"

[tool.flwr.app.config]
run-dir = "probe"
"""

PROBE_APPS = f"""\
\"\"\"Probe: the ServerApp writes a marker file on the SuperLink host (what an attacker's run would do) after one
query round trip with every connected node (a {PROBE_FLOATS}-float array each way).\"\"\"
import json
import os
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    out = Path(str(context.run_config["run-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    nodes = []
    deadline = time.monotonic() + 60
    while not nodes and time.monotonic() < deadline:
        nodes = sorted(grid.get_node_ids())
        time.sleep(1)
    payload = np.arange({PROBE_FLOATS}, dtype=np.float32)
    messages = [Message(RecordDict({{"x": ArrayRecord([payload])}}), dst_node_id=n, message_type="query") for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=120))
    sums = {{}}
    for reply in replies:
        back = reply.content["y"].to_numpy_ndarrays()[0]
        sums[str(reply.metadata.src_node_id)] = [float(back.sum(dtype=np.float64)), int(back.size)]
    registry = os.environ.get("{SITE_REGISTRY_ENV}")
    (out / "marker.json").write_text(json.dumps({{"pid": os.getpid(), "nodes": nodes, "sums": sums,
                                                 "registry_file": registry}}))


@client.query()
def query(msg: Message, context: Context) -> Message:
    x = msg.content["x"].to_numpy_ndarrays()[0]
    return Message(RecordDict({{"y": ArrayRecord([x * 2])}}), reply_to=msg)
"""


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def process_env(**extra: str) -> dict[str, str]:
    """This venv's tools first on PATH, this checkout first on PYTHONPATH, Flower quiet."""
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        **extra,
    }


class Coordinator:
    """A consortium server started with fedct's own entrypoint, one registered site key, the probe app."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port, self.superlink_port, self.node_port = _free_ports(3)
        self.pki = write_consortium(root / "pki", sites=["site-a"], with_site_keys=True)
        keys = root / "server-keys"
        keys.mkdir()
        shutil.copy(self.pki.site_public_keys["site-a"], keys / "site-a.pub")
        self.app = root / "probe-app"
        (self.app / "probe").mkdir(parents=True)
        (self.app / "pyproject.toml").write_text(PROBE_PYPROJECT)
        (self.app / "probe" / "__init__.py").write_text("")
        (self.app / "probe" / "apps.py").write_text(PROBE_APPS)
        self.server_env = root / "server.env"
        self.server_env.write_text(
            "".join(
                f"{k}={v}\n"
                for k, v in {
                    "FEDCT_SERVER_HOST": "127.0.0.1",
                    "FEDCT_SERVER_PORT": self.port,
                    "FEDCT_SUPERLINK_PORT": self.superlink_port,
                    "FEDCT_CA_CERT": self.pki.ca_cert,
                    "FEDCT_SERVER_CERT": self.pki.server_cert,
                    "FEDCT_SERVER_KEY": self.pki.server_key,
                    "FEDCT_STATE_DIR": root / "state",
                    "FEDCT_SITE_KEYS": keys,
                    "FEDCT_RUNS_DIR": root / "runs",
                    "FEDCT_APP_DIR": self.app,
                }.items()
            )
        )
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    @property
    def env(self) -> ServerEnv:
        return ServerEnv.from_file(self.server_env)

    def start(self, key: str, command: list[str], **env: str) -> subprocess.Popen:
        self.logs[key] = self.root / f"{key}.log"
        proc = subprocess.Popen(
            command,
            env=process_env(**env),
            stdout=self.logs[key].open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[key] = proc
        return proc

    def log(self, key: str) -> str:
        return self.logs[key].read_text(errors="replace") if key in self.logs else ""

    def stop_all(self) -> None:
        pids = {p.pid for p in self.procs.values()} | set(pids_matching(str(self.root)))
        stop_pids(sorted(pids))
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory) -> Coordinator:
    fed = Coordinator(tmp_path_factory.mktemp("control-plane"))
    try:
        server = fed.start("server", [str(ROOT / "docker" / "entrypoint-server.sh")], FEDCT_ENV=str(fed.server_env))
        wait_until(
            lambda: "fedct server: ready" in fed.log("server") or server.poll() is not None,
            timeout=120,
            what="fedct server start to be ready",
        )
        assert server.poll() is None, fed.log("server")[-3000:]
        yield fed
    finally:
        fed.stop_all()
    assert not pids_matching(str(fed.root)), "a process of the test coordinator is still running"


def attacker_home(fed: Coordinator, name: str) -> Path:
    """A fresh Flower home that holds nothing but the consortium CA, pointed at the hospital-facing address."""
    home = fed.root / name
    home.mkdir()
    shutil.copy(fed.pki.ca_cert, home / "ca.crt")
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "consortium"\n\n[superlink.consortium]\n'
        f'address = "127.0.0.1:{fed.port}"\nroot-certificates = "{home / "ca.crt"}"\n'
    )
    return home


def flwr(home: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "flwr"), *args],
        env=process_env(FLWR_HOME=str(home)),
        capture_output=True,
        text=True,
        timeout=180,
        cwd=cwd,
    )


def run_ids(fed: Coordinator) -> set[int]:
    """Run ids the SuperLink holds, asked on loopback as the coordinator."""
    done = flwr(fed.env.cli_home, "ls", "consortium", "--format", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    return {int(r["run-id"]) for r in json.loads(done.stdout)["runs"]}


def _refused(done: subprocess.CompletedProcess, route: str) -> None:
    text = re.sub(r"\s+", " ", done.stdout + done.stderr)
    assert done.returncode != 0, text
    assert "403 Forbidden" in text and route in text.replace("│", "").replace(" ", ""), text


def test_the_attack_of_issue_16_is_refused_at_the_hospital_facing_address(coordinator):
    fed = coordinator
    home = attacker_home(fed, "attacker-home")
    evil_pub, _ = write_site_key(home / "evil.key")
    before = run_ids(fed)

    done = flwr(home, "supernode", "register", str(evil_pub), "consortium", "--name", "evil")
    _refused(done, "/v1/control/register-node")
    assert "registered successfully" not in done.stdout
    evil = evil_pub.read_bytes()
    from cryptography.hazmat.primitives import serialization

    evil_pem = serialization.load_ssh_public_key(evil).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert all(node.public_key != evil_pem for node in registered_nodes(fed.env))  # the SuperLink never saw the key

    _refused(flwr(home, "ls", "consortium"), "/v1/control/list-runs")
    _refused(flwr(home, "supernode", "list", "consortium"), "/v1/control/list-nodes")

    marker_dir = fed.root / "attack-run"
    done = flwr(home, "run", str(fed.app), "consortium", "--run-config", f'run-dir="{marker_dir}"')
    _refused(done, "/v1/control/start-run")
    assert "Successfully started run" not in done.stdout
    time.sleep(5)  # a ServerApp that had been started would have written its marker by now
    assert not (marker_dir / "marker.json").exists() and not marker_dir.exists()
    assert run_ids(fed) == before  # no run was created
    assert not pids_matching("flwr-serverapp", str(fed.root))

    # The Runtime API (ServerApp tasks) and everything else is refused at the proxy, with fedct's reason ...
    with httpx.Client(verify=str(fed.pki.ca_cert), timeout=30) as client:
        for path in ("/v1/runtime/acquire-task", "/v1/control/start-run", "/docs", "/health", "/v1/fleetx"):
            response = client.post(f"https://127.0.0.1:{fed.port}{path}", content=b"")
            assert response.status_code == 403 and PROXY_REFUSAL in response.text, (path, response.text)
        assert client.get(f"https://127.0.0.1:{fed.port}/v1/fleet/get-run").status_code == 403  # Fleet: POST only
        # ... and on loopback the Runtime API hands out no task without the SuperExec secret.
        response = client.post(
            f"https://127.0.0.1:{fed.superlink_port}/v1/runtime/acquire-task",
            content=b"",
            headers={"Content-Type": "application/protobuf"},
        )
        assert response.status_code in (401, 403), (response.status_code, response.text)


def test_a_registered_site_connects_through_the_proxy_and_the_coordinator_submits(coordinator):
    fed = coordinator
    env = fed.env
    registry = json.loads(env.site_registry_file.read_text())
    assert list(registry.values()) == ["site-a"] and all(k.isdigit() for k in registry)
    node_id = int(next(iter(registry)))
    assert (env.superexec_secret_file.stat().st_mode & 0o777) == 0o600
    node_home = fed.root / "site-a-home"
    node_home.mkdir()
    fed.start(
        "site-a",
        [
            str(BIN / "flower-supernode"),
            "--superlink",
            f"127.0.0.1:{fed.port}",
            "--root-certificates",
            str(fed.root / "pki" / "sites" / "site-a" / "ca.crt"),
            "--auth-supernode-private-key",
            str(fed.pki.site_keys["site-a"]),
            "--host",
            "127.0.0.1",
            "--port",
            str(fed.node_port),
        ],
        FLWR_HOME=str(node_home),
    )
    wait_until(
        lambda: f"Activated node_id={node_id}" in fed.log("server"),
        timeout=120,
        what="site-a to activate via the proxy",
    )
    activated = next(n for n in registered_nodes(env) if n.node_id == node_id)
    assert activated.status == "online"

    config = fed.root / "probe.toml"
    config.write_text('run-dir = "probe-run"\n')
    t0 = time.monotonic()
    done = subprocess.run(
        [str(BIN / "fedct"), "server", "submit", "--env", str(fed.server_env), "--config", str(config)],
        env=process_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(f"\n[control-plane] coordinator run through the proxy: {time.monotonic() - t0:.1f}s")
    assert done.returncode == 0 and "finished:completed" in done.stdout, (done.stdout + done.stderr)[-4000:]
    marker = json.loads((env.runs_dir / "probe-run" / "marker.json").read_text())
    assert marker["nodes"] == [node_id]
    # 12 MiB out and back through nginx: every element arrived and came back doubled
    assert marker["sums"] == {str(node_id): [float(PROBE_FLOATS * (PROBE_FLOATS - 1)), PROBE_FLOATS]}
    assert marker["registry_file"] == str(env.site_registry_file)  # the ServerApp is told where the registry is
    # heartbeats pass the proxy too: each one moves the node's online-until time forward
    wait_until(
        lambda: next(n for n in registered_nodes(env) if n.node_id == node_id).online_until > activated.online_until,
        timeout=90,
        what="a SuperNode heartbeat through the proxy",
    )
    assert 'fedct proxy: 127.0.0.1 "POST /v1/control/start-run HTTP/1.1" 403' in fed.log(
        "server"
    )  # the attempt is logged
    assert fed.procs["site-a"].poll() is None, fed.log("site-a")[-3000:]
    fed.procs["site-a"].send_signal(signal.SIGTERM)
    fed.procs["site-a"].wait(timeout=60)


def test_server_check_and_stop_end_every_process(coordinator):
    fed = coordinator
    done = subprocess.run(
        [str(BIN / "fedct"), "server", "check", "--env", str(fed.server_env)],
        env=process_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and f"hospital-facing proxy 127.0.0.1:{fed.port}: TLS" in done.stdout, done.stderr
    server = fed.procs["server"]
    children = [pid for pid in pids_matching(str(fed.root)) if pid != server.pid]
    assert any(pids_matching("nginx", str(fed.root))) and any(pids_matching("flower-superexec", str(fed.root)))
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=60) == 0, fed.log("server")[-3000:]
    wait_until(
        lambda: not any(p in pids_matching(str(fed.root)) for p in children),
        timeout=30,
        what="the SuperLink, SuperExec and proxy to stop with fedct server start",
    )
