"""The coordinator: ``fedct server start`` (SuperLink + SuperExec + proxy, site keys registered, site registry
written) and ``fedct server submit`` (a run through ``flwr run`` on loopback)."""

from __future__ import annotations

import json
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedct.deploy.commands import proxy_command, proxy_executable, superexec_command, superlink_command
from fedct.deploy.common import CONNECTION, DeployError, flower_env, flower_tool, toml_value, write_flwr_home
from fedct.deploy.proxy import write_proxy_config
from fedct.deploy.server_env import ServerEnv
from fedct.deploy.supervisor import STOP_GRACE_S, relay_prefixed
from fedct.deploy.tls import check_tls, wait_for_tls
from fedct.files import atomic_write_bytes
from fedct.processes import stop_processes

#: Environment variable naming the site registry file ({node id: site name}) for the ServerApp.
SITE_REGISTRY_ENV = "FEDCT_SITE_REGISTRY"


def ensure_server_secret(env: ServerEnv) -> Path:
    """The SuperLink/SuperExec shared secret: created once (random, written to a 0600 temporary file in the state
    folder, then renamed into place), reused after; a group/world-readable one is refused."""
    path = env.superexec_secret_file
    if path.is_file() and path.stat().st_size > 0:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise DeployError(
                f"{path} (the SuperExec secret) is readable by others (mode {mode:o}); run chmod 600 on it"
            )
        return path
    return atomic_write_bytes(path, secrets.token_hex(32).encode(), mode=0o600)


def register_sites(env: ServerEnv) -> dict[str, str]:
    """``flwr supernode register`` every site public key on the loopback SuperLink; ``{site: "registered" |
    "already registered"}``."""
    home = write_flwr_home(env.cli_home, address=env.control_address, ca_cert=env.ca_cert)
    outcome = {}
    for name, pub in env.site_public_keys().items():
        done = subprocess.run(
            [flower_tool("flwr"), "supernode", "register", str(pub), CONNECTION, "--name", name],
            env=flower_env(FLWR_HOME=str(home)),
            capture_output=True,
            text=True,
            timeout=120,
        )
        text = (done.stdout + done.stderr).strip()
        if done.returncode == 0:
            outcome[name] = "registered"
        elif "already" in text.lower():
            outcome[name] = "already registered"
        else:
            raise DeployError(f"registering {name} ({pub}) failed: {text[-800:]}")
    return outcome


def _public_key_bytes(pub: Path) -> bytes:
    """A site's OpenSSH public key as the SuperLink stores it (PEM SubjectPublicKeyInfo, as Flower's CLI sends it)."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_ssh_public_key(Path(pub).read_bytes())
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class NodeRecord:
    """A SuperNode as the SuperLink knows it (Flower's NodeInfo, the fields fedct uses)."""

    node_id: int
    public_key: bytes
    status: str
    online_until: float


def registered_nodes(env: ServerEnv) -> list[NodeRecord]:
    """Every SuperNode the SuperLink knows, from the Control API on loopback (Flower's own client; ``flwr supernode
    list`` does not print public keys)."""
    from flwr.proto.control_pb2 import ListNodesRequest  # pylint: disable=E0611
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

    client = ControlHttpClient.from_server_address(
        server_address=env.control_address,
        insecure=False,
        root_certificates=str(env.ca_cert),
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
    )
    try:
        response = client.ListNodes(ListNodesRequest())
    finally:
        client.close()
    return [
        NodeRecord(
            node_id=int(n.node_id),
            public_key=bytes(n.public_key),
            status=str(n.status),
            online_until=float(n.online_until),
        )
        for n in response.nodes_info
    ]


def write_site_registry(env: ServerEnv) -> dict[str, str]:
    """Write ``STATE/site-registry.json`` = ``{"<node id>": "<site name>"}`` for the keys in FEDCT_SITE_KEYS that
    the SuperLink holds (matched by public key, not by any name a node claims), atomically; returns it."""
    by_key = {_public_key_bytes(pub): name for name, pub in env.site_public_keys().items()}
    registry: dict[str, str] = {}
    for node in registered_nodes(env):
        name = by_key.get(node.public_key)
        if name is not None and node.status != "unregistered":
            registry[str(node.node_id)] = name
    missing = sorted(set(by_key.values()) - set(registry.values()))
    if missing:
        raise DeployError(f"the SuperLink holds no registered node for site(s) {', '.join(missing)} after registration")
    path = env.site_registry_file
    atomic_write_bytes(path, (json.dumps(registry, indent=1, sort_keys=True) + "\n").encode())
    return registry


def _die_with_parent() -> None:
    """In a child before exec: get SIGTERM when ``fedct server start`` dies (even by SIGKILL), so no proxy or
    SuperLink outlives it holding the ports (Linux ``PR_SET_PDEATHSIG``; a no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stop(procs: list[subprocess.Popen]) -> None:
    """Stop the server's children, last started first (proxy, SuperExec, SuperLink): SIGTERM, SIGKILL after
    :data:`STOP_GRACE_S`."""
    stop_processes(list(reversed(procs)), grace_s=STOP_GRACE_S)


def start_server(env: ServerEnv, *, wait_s: float = 60.0, log_file: Path | None = None) -> int:
    """Run the coordinator in the foreground; returns an exit code.

    1. the SuperLink on 127.0.0.1:FEDCT_SUPERLINK_PORT (TLS, SuperNode auth, SuperExec secret) and our SuperExec;
    2. once the SuperLink answers TLS on loopback: register the sites' keys, write the site registry;
    3. the proxy (nginx) on FEDCT_SERVER_HOST:FEDCT_SERVER_PORT, forwarding the Fleet API only; wait for its TLS.
    Then "ready"; SIGTERM/SIGINT stop all three (proxy first); if one of them ends, the others are stopped too.
    """
    try:
        proxy = proxy_executable(env)
        ensure_server_secret(env)
        config = write_proxy_config(env)
    except (DeployError, OSError) as exc:
        print(f"fedct server: error: {exc}", file=sys.stderr, flush=True)
        return 2
    env.superlink_home.mkdir(parents=True, exist_ok=True)
    out = open(log_file, "ab") if log_file else None  # noqa: SIM115 - lives as long as the SuperLink
    child_env = flower_env(FLWR_HOME=str(env.superlink_home), **{SITE_REGISTRY_ENV: str(env.site_registry_file)})
    procs: list[subprocess.Popen] = []  # start order: SuperLink, SuperExec, proxy
    stopping: list[int] = []

    def spawn(command: list[str], what: str, *, relay: bool = False) -> subprocess.Popen:
        """Start a child; ``relay``: through a pipe copied to our stdout (nginx reopens /dev/stderr for its access
        log, which on a regular file not opened for appending would overwrite the other processes' lines)."""
        print(f"fedct server: starting {what}: {' '.join(command)}", flush=True)
        piped = relay and out is None
        proc = subprocess.Popen(
            command,
            env=child_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if piped else out,
            stderr=subprocess.STDOUT if (out or piped) else None,
            preexec_fn=_die_with_parent,
        )
        if piped:
            threading.Thread(
                target=relay_prefixed, args=(proc.stdout, b""), name="fedct-proxy-log", daemon=True
            ).start()
        procs.append(proc)
        return proc

    def forward(signum: int, _frame: Any) -> None:
        stopping.append(signum)
        threading.Thread(target=_stop, args=(procs,), name="fedct-server-stop", daemon=True).start()

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    check_proxy = subprocess.run([*proxy_command(env, config), "-t", "-q"], capture_output=True, text=True, timeout=60)
    if check_proxy.returncode != 0:
        print(
            f"fedct server: error: the proxy configuration {config} was refused by {proxy}: "
            f"{(check_proxy.stdout + check_proxy.stderr).strip()[-1500:]}",
            file=sys.stderr,
            flush=True,
        )
        return 2
    superlink = spawn(superlink_command(env), "the SuperLink (127.0.0.1 only)")
    host, _, port = env.address.rpartition(":")
    try:
        version = wait_for_tls(
            "127.0.0.1",
            env.superlink_port,
            env.ca_cert,
            wait_s=wait_s,
            setting="FEDCT_CA_CERT",
            alive=lambda: superlink.poll() is None,
        )
        print(
            f"fedct server: SuperLink up on 127.0.0.1:{env.superlink_port} ({version}, verified against {env.ca_cert})",
            flush=True,
        )
        spawn(superexec_command(env, parent_pid=superlink.pid), "the SuperExec (ServerApps)")
        for name, what in register_sites(env).items():
            print(f"fedct server: site {name}: {what}", flush=True)
        registry = write_site_registry(env)
        print(f"fedct server: site registry {env.site_registry_file}: {len(registry)} node(s)", flush=True)
        proxy_proc = spawn(
            proxy_command(env, config), f"the proxy on {env.host}:{env.port} (Fleet API only)", relay=True
        )
        wait_for_tls(
            host.strip("[]"),
            int(port),
            env.ca_cert,
            wait_s=wait_s,
            setting="FEDCT_CA_CERT",
            alive=lambda: proxy_proc.poll() is None,
        )
    except (ConnectionError, DeployError, OSError, subprocess.TimeoutExpired) as exc:
        if stopping:  # stopped while starting
            return 0
        print(f"fedct server: error: {exc}", file=sys.stderr, flush=True)
        _stop(procs)
        return 2
    if stopping:
        return 0
    print(
        f"fedct server: hospital-facing address {env.host}:{env.port} serves the Fleet API only; runs and "
        f"registration on 127.0.0.1:{env.superlink_port}",
        flush=True,
    )
    print("fedct server: ready", flush=True)
    while not stopping and all(p.poll() is None for p in procs):
        time.sleep(0.5)
    if stopping:
        for proc in procs:
            proc.wait()
        return 0
    ended = next(p for p in procs if p.poll() is not None)
    print(
        f"fedct server: error: {' '.join(map(str, ended.args[:1]))} ended (code {ended.returncode}); stopping the rest",
        file=sys.stderr,
        flush=True,
    )
    _stop(procs)
    return ended.returncode or 1


def run_config_for(env: ServerEnv, config_toml: Path, *, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The run config of ``config_toml`` (+ overrides), checked by ServerConfig, ``run-dir`` absolute under the runs dir."""
    from fl_server.config import ServerConfig

    config_toml = Path(config_toml)
    try:
        config = dict(tomllib.loads(config_toml.read_text(encoding="utf-8")))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise DeployError(f"run config {config_toml}: {exc}") from exc
    config.update(overrides or {})
    run_dir = Path(str(config.get("run-dir", "run")))
    config["run-dir"] = str(run_dir if run_dir.is_absolute() else (env.runs_dir / run_dir))
    try:
        ServerConfig.from_run_config(config)
    except ValueError as exc:
        raise DeployError(f"run config {config_toml}: {exc}") from exc
    return config


@dataclass(frozen=True)
class Submitted:
    """What ``flwr run`` did: the run id, its final status (``finished:completed`` when it succeeded) and the output."""

    run_id: int | None
    status: str
    details: str
    output: str

    @property
    def ok(self) -> bool:
        """True when the run was accepted and, if followed to its end, completed."""
        return self.run_id is not None and self.status in ("finished:completed", "submitted")


def run_status(env: ServerEnv, run_id: int) -> tuple[str, str]:
    """(status, details) of a run from ``flwr ls --run-id``."""
    home = write_flwr_home(env.cli_home, address=env.control_address, ca_cert=env.ca_cert)
    done = subprocess.run(
        [flower_tool("flwr"), "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"],
        env=flower_env(FLWR_HOME=str(home)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        run = json.loads(done.stdout)["runs"][0]
    except (ValueError, KeyError, IndexError) as exc:
        raise DeployError(f"`flwr ls --run-id {run_id}` gave no status: {(done.stdout + done.stderr)[-500:]}") from exc
    return str(run["status"]), str(run.get("status-details", ""))


def submit_run(
    env: ServerEnv,
    config_toml: Path,
    *,
    app_dir: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    stream: bool = True,
    timeout: float | None = None,
) -> Submitted:
    """``flwr run APP consortium --run-config FILE [--stream]`` with the isolated CLI home; with ``stream`` it
    returns when the run has ended, with its final status."""
    check_tls("127.0.0.1", env.superlink_port, env.ca_cert)
    config = run_config_for(env, config_toml, overrides=overrides)
    app = Path(app_dir or env.app_dir).resolve()
    if not (app / "pyproject.toml").is_file():
        raise DeployError(
            f"app folder {app} has no pyproject.toml; set FEDCT_APP_DIR in {env.env_path} (in the server "
            "image: /opt/fedct) or pass --app"
        )
    resolved = env.state_dir / "submitted" / f"{Path(config_toml).stem}-{int(time.time())}.toml"
    resolved.parent.mkdir(parents=True, exist_ok=True)
    resolved.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in config.items()))
    home = write_flwr_home(env.cli_home, address=env.control_address, ca_cert=env.ca_cert)
    command = [flower_tool("flwr"), "run", str(app), CONNECTION, "--run-config", str(resolved)]
    if stream:
        command.append("--stream")
    done = subprocess.run(command, env=flower_env(FLWR_HOME=str(home)), capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    match = re.search(r"Successfully started run (\d+)", output)
    if done.returncode != 0 or match is None:
        return Submitted(run_id=None, status="not started", details=output[-2000:], output=output)
    run_id = int(match.group(1))
    if not stream:
        return Submitted(run_id=run_id, status="submitted", details="", output=output)
    status, details = run_status(env, run_id)
    return Submitted(run_id=run_id, status=status, details=details, output=output)
