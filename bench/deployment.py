"""A real Flower deployment on 127.0.0.1 for tests and benchmarks: SuperLink, SuperNodes, optional warm executors.

Every process is started here with ``subprocess.Popen`` and stopped by PID through :mod:`fedct.processes` (plus
the task processes the SuperLink and SuperNodes start, found by their port on the command line). The command lines
are :mod:`fedct.deploy.commands`' (the ones ``fedct server`` / ``fedct site`` run), with the benchmark's choices
(insecure or TLS, isolation, poll intervals). Ports are picked free by binding port 0. Each site gets its own
``FLWR_HOME`` (as separate hospitals would) and the ``flwr`` CLI a separate one that names the SuperLink.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedct.deploy.commands import TlsFiles, flower_superlink, flower_supernode, warm_executor
from fedct.deploy.common import CONNECTION, flower_env, flower_tool, write_flwr_home
from fedct.processes import pids_matching, stop_processes

BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, *, timeout_s: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    """Until something accepts connections on 127.0.0.1:port (or the process died / timeout)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s}s")


def tree_cpu_seconds(roots: set[int]) -> float:
    """CPU seconds (user + system, own + reaped children) of ``roots`` and all their descendants (zombies included)."""
    stats: dict[int, tuple[int, list[str]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = entry.joinpath("stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry.name)] = (int(fields[1]), fields)
    chosen = set(roots) & set(stats)
    grew = True
    while grew:
        more = {pid for pid, (ppid, _) in stats.items() if ppid in chosen and pid not in chosen}
        chosen |= more
        grew = bool(more)
    return sum(sum(int(f) for f in stats[pid][1][11:15]) for pid in chosen) / os.sysconf("SC_CLK_TCK")


def stop(pids: Sequence[int], *, timeout_s: float = 15.0) -> None:
    """SIGTERM, wait, SIGKILL what is left (only the given PIDs)."""
    stop_processes(list(pids), grace_s=timeout_s)


@dataclass(frozen=True)
class SiteSpec:
    """One SuperNode: its node config and how its ClientApps are run."""

    node_config: str
    isolation: str = "subprocess"  # "subprocess" (Flower's SuperExec) or "process" (+ fedct's warm executor)
    superexec_poll_s: float | None = None  # FLWR_SUPEREXEC_TASK_POLL_INTERVAL (subprocess isolation)
    executor_poll_s: float = 0.2
    #: the executors' allow-list file, or "disabled-i-understand" (benchmarks and tests submit apps they just built)
    approved_apps: str = "disabled-i-understand"
    preload_app: str = "fl_client.client_app"


@dataclass
class LocalDeployment:
    """SuperLink + SuperNodes (+ warm executors) on 127.0.0.1 under ``root``; use as a context manager."""

    root: Path
    sites: Sequence[SiteSpec]
    #: "file": SQLite file under root; "tmpfs": SQLite file in /dev/shm; ":memory:" (SQLite in memory);
    #: "memory": Flower's Python in-memory state (``:flwr-in-memory:``, its default)
    database: str = "file"
    env: Mapping[str, str] = field(default_factory=dict)
    #: TLS with a fresh consortium PKI (``fedct certs``) and, with ``auth``, SuperNode authentication (keys registered
    #: with ``flwr supernode register``), as ``fedct server`` / ``fedct site`` run them; ``auth`` needs ``tls``
    tls: bool = False
    auth: bool = True
    port: int = 0
    procs: list[subprocess.Popen] = field(default_factory=list)
    runtime_ports: list[int] = field(default_factory=list)
    _names: dict[int, str] = field(default_factory=dict)

    def _env(self, home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        home.mkdir(parents=True, exist_ok=True)
        return flower_env({**os.environ, **self.env}, FLWR_HOME=str(home), **(extra or {}))

    def _start(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / f"{name}.log", "wb") as out:
            proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=self.root)
        self.procs.append(proc)
        self._names[proc.pid] = name
        return proc

    def _security(self) -> TlsFiles | None:
        """The SuperLink's TLS files (a fresh consortium PKI with site keys), or None: insecure."""
        if not self.tls:
            return None
        from fedct.certs import write_consortium

        self._pki = write_consortium(
            self.root / "pki", sites=[f"s{i}" for i in range(len(self.sites))], with_site_keys=True
        )
        return TlsFiles(self._pki.ca_cert, self._pki.server_cert, self._pki.server_key)

    def _register(self) -> None:
        """``flwr supernode register`` each site's public key (TLS mode), as ``fedct server start`` does."""
        for name, pub in self._pki.site_public_keys.items():
            done = subprocess.run(
                [flower_tool("flwr"), "supernode", "register", str(pub), CONNECTION, "--name", name],
                env=self._env(self.cli_home()),
                capture_output=True,
                text=True,
                timeout=120,
            )
            if done.returncode != 0:
                raise RuntimeError(f"registering {name} failed: {(done.stdout + done.stderr)[-600:]}")

    def __enter__(self) -> LocalDeployment:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self.port = free_port()
            db = self._database_path()
            tls = self._security()
            auth = tls is not None and self.auth
            link = self._start(
                "superlink",
                flower_superlink(port=self.port, database=db, tls=tls, node_auth=auth),
                self._env(self.root / "home-superlink"),
            )
            wait_for_port(self.port, proc=link)
            if self.tls and self.auth:
                self._register()
            for i, site in enumerate(self.sites):
                rport = free_port()
                self.runtime_ports.append(rport)
                extra = (
                    {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(site.superexec_poll_s)} if site.superexec_poll_s else {}
                )
                env = self._env(self.root / f"home-site{i}", extra)
                command = flower_supernode(
                    superlink=f"127.0.0.1:{self.port}",
                    runtime_port=rport,
                    node_config=site.node_config,
                    ca_cert=tls.ca_cert if tls else None,
                    auth_key=self._pki.site_keys[f"s{i}"] if auth else None,
                    isolation=site.isolation,
                )
                node = self._start(f"supernode{i}", command, env)
                wait_for_port(rport, proc=node)
                if site.isolation == "process":
                    self._start(
                        f"executor{i}",
                        warm_executor(
                            runtime_port=rport,
                            approved_apps=site.approved_apps,
                            poll_interval_s=site.executor_poll_s,
                            preload_app=site.preload_app,
                        ),
                        env,
                    )
        except BaseException:
            self.close()
            raise
        return self

    def _database_path(self) -> str:
        if self.database == "file":
            return str(self.root / "superlink.db")
        if self.database == "tmpfs":
            return f"/dev/shm/fedct-superlink-{os.getpid()}-{self.port}.db"
        if self.database == ":memory:":
            return self.database
        if self.database == "memory":
            return ":flwr-in-memory:"
        raise ValueError(f"database {self.database!r} is not 'file', 'tmpfs', ':memory:' or 'memory'")

    def cli_home(self) -> Path:
        """FLWR_HOME of the ``flwr`` CLI, with this SuperLink as the default connection."""
        return write_flwr_home(
            self.root / "home-cli", address=f"127.0.0.1:{self.port}", ca_cert=self._pki.ca_cert if self.tls else None
        )

    def flwr_run(self, app: Path, run_config: str, *, timeout_s: float = 1800.0) -> subprocess.CompletedProcess:
        """``flwr run APP --stream --run-config ...`` against this SuperLink; returns when the run ended."""
        env = self._env(self.cli_home())
        return subprocess.run(
            [flower_tool("flwr"), "run", str(app), CONNECTION, "--stream", "--run-config", run_config],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=self.root,
        )

    def site_pids(self, index: int) -> list[int]:
        """The PIDs this deployment started for site ``index``: its SuperNode and, with ``process`` isolation, its executor."""
        wanted = {f"supernode{index}", f"executor{index}"}
        return [p.pid for p in self.procs if self._names.get(p.pid) in wanted]

    def all_pids(self) -> list[int]:
        """Our Popen PIDs plus the task processes started for our ports (flwr-serverapp, superexec, clientapps)."""
        pids = {p.pid for p in self.procs if p.poll() is None}
        for port in [self.port, *self.runtime_ports]:
            if port:
                pids.update(pids_matching(f"127.0.0.1:{port}"))
        return sorted(pids)

    def close(self) -> None:
        """Stop executors and SuperNodes first, then the SuperLink, then anything left on our ports."""
        stop([p.pid for p in reversed(self.procs) if p.poll() is None])
        stop(self.all_pids())
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if self.database == "tmpfs" and self.port:
            for suffix in ("", "-wal", "-shm"):
                Path(self._database_path() + suffix).unlink(missing_ok=True)

    def __exit__(self, *exc: object) -> None:
        self.close()
