"""Deployment on Flower's engine: ``fedct server start|submit|check`` and ``fedct site``.

Server side (the consortium's coordinator, one host):

- ``fedct server start --env server.env`` validates the env file and runs three processes in the foreground
  (SIGTERM stops them all; if one ends, the others are stopped):

  * ``flower-superlink`` bound to **127.0.0.1** only (Flower 1.41 serves its Fleet, Control and Runtime APIs on
    one port), with TLS, SuperNode authentication, runtime dependency installation off, telemetry off, its state
    database on disk and ``--isolation process`` + ``--superexec-auth-secret-file`` (a random secret in the state
    folder): the Runtime API hands ServerApp tasks only to a caller that proves the secret;
  * ``flower-superexec`` with that secret, which runs each ServerApp (``flwr-serverapp``) on this host;
  * **nginx** (the distribution's package) on ``FEDCT_SERVER_HOST:FEDCT_SERVER_PORT``, the only address hospitals
    are given: it terminates TLS with the server certificate and forwards ``POST /v1/fleet/*`` (the Fleet API a
    SuperNode uses) to the loopback SuperLink; run submission, node registration, listing, logs (Control API) and
    the Runtime API answer 403 there. Flower 1.41 has no flag that splits the Control API off the Fleet port and no
    account authentication outside its enterprise edition, hence the proxy.

  Between the SuperLink and the proxy it registers every site public key found in ``FEDCT_SITE_KEYS``
  (``flwr supernode register``, on loopback) and writes ``STATE/site-registry.json`` (``{node id: site name}``,
  matched by public key), exported to the ServerApp as ``FEDCT_SITE_REGISTRY``.
- ``fedct server submit --env server.env --config run.toml`` starts a run: ``flwr run APP consortium`` with an
  isolated Flower home (``config.toml``: address + root certificates) and the run config (rounds, strategy,
  minimum sites, round timeout; ``run-dir`` made absolute under ``FEDCT_RUNS_DIR``).
- ``fedct server check --env server.env`` is the TLS health check (the hospital-facing port and the loopback
  SuperLink).
- Run submission, registration, ``flwr ls``/``log`` go to 127.0.0.1:FEDCT_SUPERLINK_PORT only.

Site side (each hospital): ``fedct site --env site.env`` (see :mod:`fl_client.site_env`) validates the env file,
checks the TLS handshake with the SuperLink against the CA (a clear message instead of Flower's "unavailable"),
ingests the DICOM folder, installs the app-approval launcher (:mod:`fl_client.approval`) and runs
``flower-supernode`` (``--root-certificates``, ``--auth-supernode-private-key``, ``--node-config``, its own port)
in the foreground, retrying for a while when the SuperLink refuses to activate it (a restart right after a crash).
With ``FEDCT_CLIENTAPP_RUNNER=warm`` (the default) the SuperNode runs with ``--isolation process`` and ``fedct site``
runs fedct's warm executor (:mod:`fl_client.executor`) next to it as a second child: it imports torch/MONAI once
and forks a child per message instead of Flower's fresh ``flwr-clientapp`` process (about 7 CPU-s saved per
message), checks the same allow-list, authenticates to the SuperNode with a shared secret, and never outlives
the site (stopped with the SuperNode; ``--parent-pid`` ends it if ``fedct site`` is killed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedct.files import atomic_write_bytes
from fl_client.site_env import SiteEnv, SiteEnvError, check_ca_certificate, parse_superlink_address, read_env_file

#: Environment every Flower process we start gets: no telemetry, no update check, no package installation.
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
#: Seconds a stopped SuperNode / SuperLink gets to exit after SIGTERM before it is killed.
STOP_GRACE_S = 15.0
#: Name of the SuperLink connection in the CLI's config.toml.
CONNECTION = "consortium"
#: Environment variable naming the site registry file ({node id: site name}) for the ServerApp.
SITE_REGISTRY_ENV = "FEDCT_SITE_REGISTRY"
#: The only path prefix the hospital-facing proxy forwards: Flower's Fleet API (SuperNode <-> SuperLink).
FLEET_API_PREFIX = "/v1/fleet/"
#: Largest request the proxy accepts (Flower splits messages into objects of <= 5 MiB chunks; generous margin).
PROXY_MAX_BODY = "64m"
#: What the proxy answers to anything but the Fleet API (Control API: runs, registration, listing, logs; Runtime API).
PROXY_REFUSAL = ("fedct: refused. This address serves the Fleet API (SuperNodes) only. Run submission, SuperNode "
                 "registration, listing and logs are available on the coordinator host only (fedct server submit).")

SERVER_KEYS = {
    "FEDCT_SERVER_HOST": "address the hospital-facing proxy binds to (default 0.0.0.0); it serves the Fleet API only",
    "FEDCT_SERVER_PORT": "port the hospitals' SuperNodes connect to (the proxy; default 9092)",
    "FEDCT_SUPERLINK_PORT": "port of the SuperLink itself (Fleet, Control and Runtime APIs), bound to 127.0.0.1 only "
                            "(default 9093); run submission and site registration use it from this host",
    "FEDCT_SERVER_ADDRESS": "host:port this host uses to reach the hospital-facing port for `fedct server check` "
                            "(default 127.0.0.1:PORT; must be a certificate SAN)",
    "FEDCT_PROXY": "the reverse proxy executable (nginx from the distribution; default: nginx on PATH, /usr/sbin/nginx)",
    "FEDCT_CA_CERT": "the consortium CA certificate (PEM)",
    "FEDCT_SERVER_CERT": "the SuperLink certificate (PEM, signed by the CA, SANs of the server's names plus localhost "
                         "and 127.0.0.1)",
    "FEDCT_SERVER_KEY": "the SuperLink private key (PEM, mode 0600)",
    "FEDCT_STATE_DIR": "writable folder: SuperLink database (state.db), SuperExec secret, proxy config, site registry, "
                       "Flower homes",
    "FEDCT_SITE_KEYS": "folder of the sites' public keys: <name>.pub files or <name>/site.pub",
    "FEDCT_RUNS_DIR": "writable folder of run folders (relative run-dir values are placed here)",
    "FEDCT_APP_DIR": "the Flower app to submit (folder with pyproject.toml; default: this installation)",
    "FEDCT_SUPERLINK_STATE": "disk (default: STATE_DIR/state.db; sites reconnect by themselves after a SuperLink restart) or "
                             "memory (Flower's in-memory state: ~5 s faster per round with TLS, but sites must be restarted "
                             "after a SuperLink restart; fedct's own resume state is on disk either way)",
}
#: Values of FEDCT_SUPERLINK_STATE -> the SuperLink's --database for them (None: the file in the state folder).
SUPERLINK_STATES = {"disk": None, "memory": ":flwr-in-memory:"}
SERVER_REQUIRED = ("FEDCT_CA_CERT", "FEDCT_SERVER_CERT", "FEDCT_SERVER_KEY", "FEDCT_STATE_DIR", "FEDCT_SITE_KEYS", "FEDCT_RUNS_DIR")


class DeployError(RuntimeError):
    """A deployment step failed; the message says what to check."""


# --- TLS preflight ---------------------------------------------------------------------------------------------


def check_tls(host: str, port: int, ca_cert: Path, *, timeout: float = 5.0, setting: str = "FEDCT_CA_CERT") -> str:
    """TLS handshake with ``host:port`` verified against ``ca_cert`` (hostname included); returns the TLS version.

    Raises :class:`ConnectionError` when nothing answers and :class:`DeployError` (with what to check) when the
    certificate does not verify — the cases Flower reports only as "unavailable".
    """
    context = ssl.create_default_context(cafile=str(ca_cert))
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                return str(tls.version())
    except ssl.SSLCertVerificationError as exc:
        if "mismatch" in str(exc.verify_message).lower():  # "Hostname mismatch" or "IP address mismatch"
            raise DeployError(
                f"TLS: the SuperLink at {host}:{port} has a certificate that is not valid for {host!r} "
                f"({exc.verify_message}). Connect with a name or IP listed in the server certificate's SANs, or "
                f"re-issue it with `fedct certs --san {host}`."
            ) from exc
        raise DeployError(
            f"TLS: the SuperLink at {host}:{port} presented a certificate that {setting}={ca_cert} does not verify "
            f"({exc.verify_message}). Check that {setting} is the consortium's ca.crt from `fedct certs` (the CA that "
            "signed the server certificate), not another consortium's or an old one."
        ) from exc
    except ssl.SSLError as exc:
        raise DeployError(f"TLS: handshake with {host}:{port} failed ({exc.reason or exc}); is this a fedct SuperLink "
                          "started with TLS (not --insecure), on this port?") from exc  # fmt: skip
    except (OSError, TimeoutError) as exc:
        raise ConnectionError(f"cannot reach the SuperLink at {host}:{port} ({exc.strerror or exc}); check the address, "
                              "that the server is running and that the firewall lets this host through") from exc  # fmt: skip


def wait_for_tls(host: str, port: int, ca_cert: Path, *, wait_s: float, setting: str = "FEDCT_CA_CERT",
                 alive: Any = None) -> str:  # fmt: skip
    """:func:`check_tls` retried while nothing answers (up to ``wait_s``); certificate errors fail at once."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return check_tls(host, port, ca_cert, setting=setting)
        except ConnectionError:
            if time.monotonic() >= deadline or (alive is not None and not alive()):
                raise
            time.sleep(0.5)


# --- Flower CLI home ---------------------------------------------------------------------------------------------


def write_flwr_home(home: Path, *, address: str, ca_cert: Path) -> Path:
    """An isolated Flower CLI home whose config.toml names one SuperLink connection (TLS, our CA)."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f"address = {json.dumps(address)}\nroot-certificates = {json.dumps(str(Path(ca_cert).resolve()))}\n"
    )
    return home


def flower_env(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """``base`` (default: this process's environment) + :data:`FLOWER_ENV` + ``extra``, with this Python's bin on PATH."""
    env = dict(os.environ if base is None else base)
    env.update(FLOWER_ENV)
    env.update(extra)
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def flower_tool(name: str) -> str:
    """Path of a Flower executable next to this Python (the venv), else the name for a PATH lookup."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


# --- server ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerEnv:
    """The server's validated deployment settings (from its env file)."""

    env_path: Path
    host: str
    port: int
    address: str
    ca_cert: Path
    server_cert: Path
    server_key: Path
    state_dir: Path
    site_keys_dir: Path
    runs_dir: Path
    app_dir: Path
    superlink_state: str = "disk"
    superlink_port: int = 9093
    proxy: str | None = None

    @property
    def control_address(self) -> str:
        """Where this host's tools (registration, ``flwr run``/``ls``/``log``) reach the SuperLink: loopback only."""
        return f"127.0.0.1:{self.superlink_port}"

    @property
    def superexec_secret_file(self) -> Path:
        """The SuperExec shared secret (SuperLink <-> SuperExec; the Runtime API refuses task acquisition without it)."""
        return self.state_dir / "superexec.secret"

    @property
    def proxy_dir(self) -> Path:
        """The proxy's generated config, pid file and temporary files."""
        return self.state_dir / "proxy"

    @property
    def site_registry_file(self) -> Path:
        """``{node id: site name}`` of the registered site keys (read by the ServerApp via FEDCT_SITE_REGISTRY)."""
        return self.state_dir / "site-registry.json"

    @property
    def database(self) -> str:
        """The SuperLink's ``--database``: a file in the state folder (runs and node sessions survive a restart),
        or Flower's in-memory state (``FEDCT_SUPERLINK_STATE=memory``)."""
        return SUPERLINK_STATES[self.superlink_state] or str(self.state_dir / "state.db")

    @property
    def cli_home(self) -> Path:
        """FLWR_HOME of the Flower CLI calls (register, run)."""
        return self.state_dir / "cli-home"

    @property
    def superlink_home(self) -> Path:
        """FLWR_HOME of the SuperLink and its ServerApp processes (installed apps)."""
        return self.state_dir / "superlink-home"

    def site_public_keys(self) -> dict[str, Path]:
        """``{site name: public key file}`` from ``FEDCT_SITE_KEYS``."""
        keys = {p.stem: p for p in sorted(self.site_keys_dir.glob("*.pub"))}
        keys.update({p.parent.name: p for p in sorted(self.site_keys_dir.glob("*/site.pub"))})
        return keys

    @classmethod
    def from_file(cls, path: Path) -> ServerEnv:
        """Read and validate the server env file; errors name the key and what to check."""
        path = Path(path)
        try:
            values = read_env_file(path)
        except SiteEnvError as exc:
            raise DeployError(str(exc)) from exc
        unknown = sorted(k for k in values if k.startswith("FEDCT_") and k not in SERVER_KEYS)
        if unknown:
            raise DeployError(f"{path}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(SERVER_KEYS)}")
        missing = [k for k in SERVER_REQUIRED if not values.get(k)]
        if missing:
            raise DeployError(f"{path}: missing " + "; ".join(f"{k} ({SERVER_KEYS[k]})" for k in missing))

        def a_path(key: str) -> Path:
            p = Path(os.path.expanduser(values[key]))
            return p if p.is_absolute() else (path.parent / p).resolve()

        for key in ("FEDCT_CA_CERT", "FEDCT_SERVER_CERT", "FEDCT_SERVER_KEY"):
            if not a_path(key).is_file() or not os.access(a_path(key), os.R_OK):
                raise DeployError(f"{path}: {key}={a_path(key)}: no such readable file ({SERVER_KEYS[key]})")
        try:
            check_ca_certificate(a_path("FEDCT_CA_CERT"), source=f"{path}: FEDCT_CA_CERT")
            check_ca_certificate(a_path("FEDCT_SERVER_CERT"), source=f"{path}: FEDCT_SERVER_CERT")
        except SiteEnvError as exc:
            raise DeployError(str(exc)) from exc
        key_mode = a_path("FEDCT_SERVER_KEY").stat().st_mode & 0o777
        if key_mode & 0o077:
            raise DeployError(f"{path}: FEDCT_SERVER_KEY={a_path('FEDCT_SERVER_KEY')} is readable by others "
                              f"(mode {key_mode:o}); run chmod 600 on it")  # fmt: skip
        port_text = values.get("FEDCT_SERVER_PORT") or "9092"
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise DeployError(f"{path}: FEDCT_SERVER_PORT={port_text!r} is not a port number")
        superlink_port_text = values.get("FEDCT_SUPERLINK_PORT") or "9093"
        if not superlink_port_text.isdigit() or not 0 < int(superlink_port_text) < 65536:
            raise DeployError(f"{path}: FEDCT_SUPERLINK_PORT={superlink_port_text!r} is not a port number")
        if superlink_port_text == port_text:
            raise DeployError(f"{path}: FEDCT_SUPERLINK_PORT={superlink_port_text} equals FEDCT_SERVER_PORT: the SuperLink "
                              "(loopback, all APIs) and the hospital-facing proxy (Fleet API only) need two ports")  # fmt: skip
        missing_sans = _missing_loopback_sans(a_path("FEDCT_SERVER_CERT"))
        if missing_sans:
            raise DeployError(f"{path}: FEDCT_SERVER_CERT={a_path('FEDCT_SERVER_CERT')} lacks the SAN(s) "
                              f"{', '.join(missing_sans)}: this host's tools and the proxy reach the SuperLink on loopback; "
                              "re-issue the server certificate with `fedct certs` (it adds them)")  # fmt: skip
        address = values.get("FEDCT_SERVER_ADDRESS") or f"127.0.0.1:{port_text}"
        try:
            parse_superlink_address(address, source=f"{path}: FEDCT_SERVER_ADDRESS")
        except SiteEnvError as exc:
            raise DeployError(str(exc)) from exc
        site_keys = a_path("FEDCT_SITE_KEYS")
        if not site_keys.is_dir():
            raise DeployError(f"{path}: FEDCT_SITE_KEYS={site_keys}: no such folder ({SERVER_KEYS['FEDCT_SITE_KEYS']})")
        superlink_state = values.get("FEDCT_SUPERLINK_STATE") or "disk"
        if superlink_state not in SUPERLINK_STATES:
            raise DeployError(f"{path}: FEDCT_SUPERLINK_STATE={superlink_state!r} is not one of {', '.join(SUPERLINK_STATES)} "
                              f"({SERVER_KEYS['FEDCT_SUPERLINK_STATE']})")  # fmt: skip
        source_tree = Path(__file__).resolve().parents[1]
        app_dir = a_path("FEDCT_APP_DIR") if values.get("FEDCT_APP_DIR") else source_tree
        if values.get("FEDCT_APP_DIR") and not (app_dir / "pyproject.toml").is_file():
            raise DeployError(f"{path}: FEDCT_APP_DIR={app_dir}: not a Flower app folder (no pyproject.toml)")
        dirs = {}
        for key in ("FEDCT_STATE_DIR", "FEDCT_RUNS_DIR"):
            folder = a_path(key)
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DeployError(f"{path}: {key}={folder}: cannot be created ({exc.strerror})") from exc
            if not os.access(folder, os.W_OK | os.X_OK):
                raise DeployError(f"{path}: {key}={folder}: not writable by this user")
            dirs[key] = folder
        env = cls(env_path=path, host=values.get("FEDCT_SERVER_HOST") or "0.0.0.0", port=int(port_text), address=address,
                  ca_cert=a_path("FEDCT_CA_CERT"), server_cert=a_path("FEDCT_SERVER_CERT"),
                  server_key=a_path("FEDCT_SERVER_KEY"), state_dir=dirs["FEDCT_STATE_DIR"], site_keys_dir=site_keys,
                  runs_dir=dirs["FEDCT_RUNS_DIR"], app_dir=app_dir, superlink_state=superlink_state,
                  superlink_port=int(superlink_port_text), proxy=values.get("FEDCT_PROXY") or None)  # fmt: skip
        if not env.site_public_keys():
            raise DeployError(f"{path}: FEDCT_SITE_KEYS={site_keys} holds no <name>.pub or <name>/site.pub file")
        return env


def _missing_loopback_sans(server_cert: Path) -> list[str]:
    """The loopback SANs (localhost, 127.0.0.1) the server certificate lacks."""
    import ipaddress

    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(Path(server_cert).read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return ["localhost", "127.0.0.1"]
    missing = [] if "localhost" in sans.get_values_for_type(x509.DNSName) else ["localhost"]
    if ipaddress.ip_address("127.0.0.1") not in sans.get_values_for_type(x509.IPAddress):
        missing.append("127.0.0.1")
    return missing


def superlink_command(env: ServerEnv) -> list[str]:
    """The ``flower-superlink`` command line: TLS, SuperNode auth, no runtime installs, its state database, bound
    to 127.0.0.1 only (hospitals reach its Fleet API through the proxy), ServerApps run by our own SuperExec
    (``--isolation process``) which must prove the shared secret to acquire a task from the Runtime API."""
    return [
        flower_tool("flower-superlink"),
        "--ssl-ca-certfile", str(env.ca_cert),
        "--ssl-certfile", str(env.server_cert),
        "--ssl-keyfile", str(env.server_key),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--database", env.database,
        "--host", "127.0.0.1",
        "--port", str(env.superlink_port),
        "--isolation", "process",
        "--superexec-auth-secret-file", str(env.superexec_secret_file),
    ]  # fmt: skip


def superexec_command(env: ServerEnv, *, parent_pid: int) -> list[str]:
    """The server's ``flower-superexec``: acquires ServerApp tasks from the SuperLink's Runtime API on loopback with
    the shared secret (TLS verified against the CA) and runs each ServerApp as a ``flwr-serverapp`` process; ends
    with ``parent_pid`` (the SuperLink). No runtime dependency installation (its flag is never given)."""
    return [
        flower_tool("flower-superexec"),
        "--runtime-api-address", env.control_address,
        "--root-certificates", str(env.ca_cert),
        "--superexec-auth-secret-file", str(env.superexec_secret_file),
        "--parent-pid", str(parent_pid),
    ]  # fmt: skip


def ensure_server_secret(env: ServerEnv) -> Path:
    """The SuperLink/SuperExec shared secret: created once (random, written to a 0600 temporary file in the state
    folder, then renamed into place), reused after; a group/world-readable one is refused."""
    path = env.superexec_secret_file
    if path.is_file() and path.stat().st_size > 0:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise DeployError(f"{path} (the SuperExec secret) is readable by others (mode {mode:o}); run chmod 600 on it")
        return path
    return atomic_write_bytes(path, secrets.token_hex(32).encode(), mode=0o600)


def proxy_executable(env: ServerEnv) -> str:
    """The reverse proxy to run: FEDCT_PROXY, else nginx on PATH or in /usr/sbin (Debian's nginx package)."""
    import shutil

    candidate = env.proxy or shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None)
    if not candidate or not (Path(candidate).is_file() or shutil.which(candidate)):
        raise DeployError(f"{env.env_path}: no reverse proxy found (FEDCT_PROXY={env.proxy or ''}): the hospital-facing "
                          "port is served by nginx, which forwards the Fleet API only; install it (apt-get install "
                          "nginx; the server image has it) or set FEDCT_PROXY to its path")  # fmt: skip
    return str(candidate)


def proxy_config(env: ServerEnv) -> str:
    """The nginx configuration of the hospital-facing port: TLS with the server certificate, ``/v1/fleet/*`` POSTs
    forwarded to the SuperLink on loopback (TLS, verified against the CA), everything else refused with 403.

    Foreground master process, one worker, pid/temporary files under the state folder, errors and refused or failed
    requests (who tried what) to stderr, i.e. into the server's log."""
    d = env.proxy_dir
    listen = f"[{env.host}]:{env.port}" if ":" in env.host else f"{env.host}:{env.port}"
    refusal = PROXY_REFUSAL.replace('"', "'")
    return f"""# Generated by `fedct server start` from {env.env_path}; rewritten at every start.
daemon off;
worker_processes 1;
pid {d / "nginx.pid"};
error_log stderr warn;
events {{ worker_connections 1024; }}
http {{
    # Refused and failed requests only (a SuperNode polls every few seconds; successful Fleet calls are not logged).
    map $status $fedct_log_it {{ ~^[23] 0; default 1; }}
    log_format fedct 'fedct proxy: $remote_addr "$request" $status';
    access_log /dev/stderr fedct if=$fedct_log_it;
    server_tokens off;
    client_body_temp_path {d / "client_body"};
    proxy_temp_path {d / "proxy"};
    fastcgi_temp_path {d / "fastcgi"};
    uwsgi_temp_path {d / "uwsgi"};
    scgi_temp_path {d / "scgi"};
    upstream superlink {{
        server 127.0.0.1:{env.superlink_port};
        keepalive 16;
    }}
    server {{
        listen {listen} ssl;
        ssl_certificate {env.server_cert};
        ssl_certificate_key {env.server_key};
        ssl_protocols TLSv1.2 TLSv1.3;
        client_max_body_size {PROXY_MAX_BODY};
        default_type text/plain;
        location {FLEET_API_PREFIX} {{
            limit_except POST {{ deny all; }}
            proxy_pass https://superlink;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_ssl_trusted_certificate {env.ca_cert};
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_connect_timeout 10s;
            proxy_send_timeout 300s;
            proxy_read_timeout 300s;
        }}
        location / {{
            return 403 "{refusal}\n";
        }}
    }}
}}
"""


def write_proxy_config(env: ServerEnv) -> Path:
    """Write :func:`proxy_config` to ``STATE/proxy/nginx.conf`` (atomically) and make its temporary folders."""
    env.proxy_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (env.proxy_dir / sub).mkdir(mode=0o700, exist_ok=True)
    path = env.proxy_dir / "nginx.conf"
    return atomic_write_bytes(path, proxy_config(env).encode())


def proxy_command(env: ServerEnv, config: Path) -> list[str]:
    """The proxy's command line: foreground, our config, its prefix and early error log in the state folder."""
    return [proxy_executable(env), "-e", "stderr", "-p", str(env.proxy_dir) + "/", "-c", str(config)]


def register_sites(env: ServerEnv) -> dict[str, str]:
    """``flwr supernode register`` every site public key on the loopback SuperLink; ``{site: "registered" |
    "already registered"}``."""
    home = write_flwr_home(env.cli_home, address=env.control_address, ca_cert=env.ca_cert)
    outcome = {}
    for name, pub in env.site_public_keys().items():
        done = subprocess.run([flower_tool("flwr"), "supernode", "register", str(pub), CONNECTION, "--name", name],
                              env=flower_env(FLWR_HOME=str(home)), capture_output=True, text=True, timeout=120)  # fmt: skip
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

    client = ControlHttpClient.from_server_address(server_address=env.control_address, insecure=False,
                                                   root_certificates=str(env.ca_cert),
                                                   interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI")])  # fmt: skip
    try:
        response = client.ListNodes(ListNodesRequest())
    finally:
        client.close()
    return [NodeRecord(node_id=int(n.node_id), public_key=bytes(n.public_key), status=str(n.status),
                       online_until=float(n.online_until)) for n in response.nodes_info]  # fmt: skip


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


def _kill_later(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` if it is still running :data:`STOP_GRACE_S` seconds from now (daemon timer)."""
    timer = threading.Timer(STOP_GRACE_S, lambda: proc.poll() is None and proc.kill())
    timer.daemon = True
    timer.start()


def _die_with_parent() -> None:
    """In a child before exec: get SIGTERM when ``fedct server start`` dies (even by SIGKILL), so no proxy or
    SuperLink outlives it holding the ports (Linux ``PR_SET_PDEATHSIG``; a no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stop(procs: Sequence[subprocess.Popen], signum: int = signal.SIGTERM) -> None:
    """Signal each running process in order, then wait (SIGKILL after :data:`STOP_GRACE_S`)."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signum)
    for proc in procs:
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


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
        proc = subprocess.Popen(command, env=child_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if piped else out,
                                stderr=subprocess.STDOUT if (out or piped) else None, preexec_fn=_die_with_parent)  # fmt: skip
        if piped:
            threading.Thread(target=_relay_prefixed, args=(proc.stdout, b""), name="fedct-proxy-log", daemon=True).start()
        procs.append(proc)
        return proc

    def forward(signum: int, _frame: Any) -> None:
        stopping.append(signum)
        threading.Thread(target=_stop, args=(list(reversed(procs)),), name="fedct-server-stop", daemon=True).start()

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    check_proxy = subprocess.run([*proxy_command(env, config), "-t", "-q"], capture_output=True, text=True, timeout=60)
    if check_proxy.returncode != 0:
        print(f"fedct server: error: the proxy configuration {config} was refused by {proxy}: "
              f"{(check_proxy.stdout + check_proxy.stderr).strip()[-1500:]}", file=sys.stderr, flush=True)  # fmt: skip
        return 2
    superlink = spawn(superlink_command(env), "the SuperLink (127.0.0.1 only)")
    host, _, port = env.address.rpartition(":")
    try:
        version = wait_for_tls("127.0.0.1", env.superlink_port, env.ca_cert, wait_s=wait_s, setting="FEDCT_CA_CERT",
                               alive=lambda: superlink.poll() is None)  # fmt: skip
        print(f"fedct server: SuperLink up on 127.0.0.1:{env.superlink_port} ({version}, verified against {env.ca_cert})",
              flush=True)  # fmt: skip
        spawn(superexec_command(env, parent_pid=superlink.pid), "the SuperExec (ServerApps)")
        for name, what in register_sites(env).items():
            print(f"fedct server: site {name}: {what}", flush=True)
        registry = write_site_registry(env)
        print(f"fedct server: site registry {env.site_registry_file}: {len(registry)} node(s)", flush=True)
        proxy_proc = spawn(proxy_command(env, config), f"the proxy on {env.host}:{env.port} (Fleet API only)", relay=True)
        wait_for_tls(host.strip("[]"), int(port), env.ca_cert, wait_s=wait_s, setting="FEDCT_CA_CERT",
                     alive=lambda: proxy_proc.poll() is None)  # fmt: skip
    except (ConnectionError, DeployError, OSError, subprocess.TimeoutExpired) as exc:
        if stopping:  # stopped while starting
            return 0
        print(f"fedct server: error: {exc}", file=sys.stderr, flush=True)
        _stop(list(reversed(procs)))
        return 2
    if stopping:
        return 0
    print(f"fedct server: hospital-facing address {env.host}:{env.port} serves the Fleet API only; runs and "
          f"registration on 127.0.0.1:{env.superlink_port}", flush=True)  # fmt: skip
    print("fedct server: ready", flush=True)
    while not stopping and all(p.poll() is None for p in procs):
        time.sleep(0.5)
    if stopping:
        for proc in procs:
            proc.wait()
        return 0
    ended = next(p for p in procs if p.poll() is not None)
    print(f"fedct server: error: {' '.join(map(str, ended.args[:1]))} ended (code {ended.returncode}); stopping the rest",
          file=sys.stderr, flush=True)  # fmt: skip
    _stop(list(reversed(procs)))
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


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


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
    done = subprocess.run([flower_tool("flwr"), "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"],
                          env=flower_env(FLWR_HOME=str(home)), capture_output=True, text=True, timeout=120)  # fmt: skip
    try:
        run = json.loads(done.stdout)["runs"][0]
    except (ValueError, KeyError, IndexError) as exc:
        raise DeployError(f"`flwr ls --run-id {run_id}` gave no status: {(done.stdout + done.stderr)[-500:]}") from exc
    return str(run["status"]), str(run.get("status-details", ""))


def submit_run(env: ServerEnv, config_toml: Path, *, app_dir: Path | None = None, overrides: Mapping[str, Any] | None = None,
               stream: bool = True, timeout: float | None = None) -> Submitted:  # fmt: skip
    """``flwr run APP consortium --run-config FILE [--stream]`` with the isolated CLI home; with ``stream`` it
    returns when the run has ended, with its final status."""
    check_tls("127.0.0.1", env.superlink_port, env.ca_cert)
    config = run_config_for(env, config_toml, overrides=overrides)
    app = Path(app_dir or env.app_dir).resolve()
    if not (app / "pyproject.toml").is_file():
        raise DeployError(f"app folder {app} has no pyproject.toml; set FEDCT_APP_DIR in {env.env_path} (in the server "
                          "image: /opt/fedct) or pass --app")  # fmt: skip
    resolved = env.state_dir / "submitted" / f"{Path(config_toml).stem}-{int(time.time())}.toml"
    resolved.parent.mkdir(parents=True, exist_ok=True)
    resolved.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in config.items()))
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


# --- site --------------------------------------------------------------------------------------------------------


def node_config_arg(config: Mapping[str, str | int | float | bool]) -> str:
    """``--node-config`` text: ``key="string" key=3``. Flower splits it with a regex that knows no escapes, so a
    string is written in double quotes, or in single quotes (TOML literal) when it holds a double quote."""
    parts = []
    for key, value in config.items():
        if isinstance(value, str):
            if "\n" in value or ('"' in value and "'" in value) or ("\\" in value and "'" in value):
                raise DeployError(f"node config {key}={value!r}: Flower's --node-config cannot carry this value; rename the path")
            text = f"'{value}'" if ('"' in value or "\\" in value) else f'"{value}"'
        else:
            text = _toml_value(value)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def supernode_command(site: SiteEnv) -> list[str]:
    """The ``flower-supernode`` command line of a site: TLS with the consortium CA, its auth key, its settings.

    Runtime dependency installation is off by default on a SuperNode (only ``--allow-...`` exists); the
    environment also sets ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``. With the warm runner the SuperNode
    starts no SuperExec (``--isolation process``) and accepts task acquisition only with the shared secret."""
    command = [
        flower_tool("flower-supernode"),
        "--superlink", site.superlink,
        "--root-certificates", str(site.ca_cert),
        "--auth-supernode-private-key", str(site.site_key),
        "--node-config", node_config_arg(site.node_config()),
        "--host", "127.0.0.1",
        "--port", str(site.runtime_port),
    ]  # fmt: skip
    if site.clientapp_runner == "warm":
        command += ["--isolation", "process", "--superexec-auth-secret-file", str(site.superexec_secret_file)]
    return command


def executor_command(site: SiteEnv, *, parent_pid: int) -> list[str]:
    """The warm executor's command line: the SuperNode's Runtime API on loopback, the site's allow-list
    (``disabled-i-understand`` when approval is disabled), the shared secret, and ``parent_pid`` (``fedct site``)
    whose end ends it."""
    from fl_client.approval import allow_list_value

    return [
        sys.executable, "-m", "fl_client.executor",
        "--runtime-api-address", f"127.0.0.1:{site.runtime_port}",
        "--insecure",  # loopback only; the SuperNode's Runtime API has no TLS unless given --ssl-* files
        "--approved-apps", allow_list_value(site.approved_apps),
        "--superexec-auth-secret-file", str(site.superexec_secret_file),
        "--parent-pid", str(parent_pid),
    ]  # fmt: skip


def ensure_superexec_secret(site: SiteEnv) -> Path:
    """Create the SuperNode/executor shared secret once (random, mode 0600 in a 0700 folder); reuse it after."""
    path = site.superexec_secret_file
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    if path.is_file() and path.stat().st_size > 0:
        path.chmod(0o600)
        return path
    return atomic_write_bytes(path, secrets.token_hex(32).encode(), mode=0o600)


def supernode_env(site: SiteEnv, gate_dir: Path) -> dict[str, str]:
    """The SuperNode's environment: the approval launcher first on PATH, the site's own Flower home, no telemetry."""
    from fl_client.approval import ALLOW_LIST_ENV, allow_list_value

    env = flower_env(FLWR_HOME=str(site.flwr_home), **{ALLOW_LIST_ENV: allow_list_value(site.approved_apps)})
    env["PATH"] = str(gate_dir) + os.pathsep + env["PATH"]
    return env


def ingest(site: SiteEnv) -> str:
    """Run ingestion (validation, HU, preprocessing cache) for the site; returns a one-line summary."""
    from preprocessing.ingest import REPORT_NAME, ingest_site
    from preprocessing.transforms import PipelineConfig

    pipeline = PipelineConfig(target_spacing_mm=site.ingest_spacing_mm, input_size=site.ingest_input_size)
    from preprocessing.split import site_split

    split = site_split(site.site_dir, site_choice=site.split)  # the site's own, fixed split (FEDCT_VAL/TEST_FRACTION)
    ingest_site(site.dicom_dir, site.site_dir, labels_csv=site.labels_csv, pipeline=pipeline, workers=site.workers,
                split=split, progress=False)  # fmt: skip
    counts = json.loads((site.site_dir / REPORT_NAME).read_text())["counts"]
    return f"accepted {counts['accepted']} series, rejected {counts['rejected']}, splits {counts['by_split']}"


def _processes() -> Iterator[tuple[int, list[bytes]]]:
    """(pid, argv) of every process whose command line can be read now."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                yield int(entry.name), (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue


def executor_pids(runtime_port: int) -> list[int]:
    """PIDs of warm executors serving the SuperNode whose Runtime API is on ``runtime_port`` (not their children)."""
    address = f"127.0.0.1:{runtime_port}".encode()
    found = [pid for pid, argv in _processes() if b"fl_client.executor" in argv[:3] and address in argv]
    executors = set(found)
    return [pid for pid in found if _ppid(pid) not in executors]  # a forked ClientApp child has the same command line


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def supernode_pids(site_name: str | None = None) -> list[int]:
    """PIDs of running flower-supernode processes (of one site when ``site_name`` is given)."""
    wanted = f'site-name="{site_name}"'.encode()
    return [pid for pid, argv in _processes() if any(a.endswith(b"flower-supernode") for a in argv[:2])
            and (site_name is None or any(wanted in a for a in argv))]  # fmt: skip


def start_site(site: SiteEnv, *, wait_s: float, ingest_first: bool = True, activation_wait_s: float = 120.0) -> int:
    """Preflight TLS, ingest, install the approval launcher, then run ``flower-supernode`` (and, with the warm
    runner, the warm executor); returns the exit code."""
    from fl_client.approval import allow_list_exposure, disabled_warning, install_gate, load_allow_list

    print(f"fedct site {site.site_name}: checking TLS to {site.superlink} against {site.ca_cert}", flush=True)
    version = wait_for_tls(site.superlink_host, site.superlink_port, site.ca_cert, wait_s=wait_s)
    print(f"fedct site {site.site_name}: SuperLink certificate verified ({version})", flush=True)
    if ingest_first and not site.skip_ingest:
        print(f"fedct site {site.site_name}: ingesting {site.dicom_dir} into {site.site_dir}", flush=True)
        print(f"fedct site {site.site_name}: {ingest(site)}", flush=True)
    gate_dir = site.site_dir / "bin"
    install_gate(gate_dir)
    if site.approved_apps is None:
        print(f"fedct site {site.site_name}: {disabled_warning()}", flush=True)
    else:
        if (exposure := allow_list_exposure(site.approved_apps)) is not None:
            print(f"fedct site {site.site_name}: {exposure}", flush=True)
        approved = load_allow_list(site.approved_apps)
        print(f"fedct site {site.site_name}: {len(approved)} approved app(s) in {site.approved_apps}"
              + ("" if approved else "; every run will be refused until an app is approved (--approve APP_DIR)"), flush=True)  # fmt: skip
    site.flwr_home.mkdir(parents=True, exist_ok=True)
    executor = None
    if site.clientapp_runner == "warm":
        ensure_superexec_secret(site)
        executor = executor_command(site, parent_pid=os.getpid())
        print(f"fedct site {site.site_name}: ClientApps run in fedct's warm executor (FEDCT_CLIENTAPP_RUNNER=warm)", flush=True)
    else:
        print(f"fedct site {site.site_name}: ClientApps run in Flower's SuperExec (FEDCT_CLIENTAPP_RUNNER=flower)", flush=True)
    return run_supernode(site, supernode_command(site), supernode_env(site, gate_dir), activation_wait_s=activation_wait_s,
                         executor=executor)  # fmt: skip


#: What flower-supernode prints when the SuperLink refuses to activate it (unknown key, or still counted online).
ACTIVATION_REFUSED = b"[code: 2004]"
#: Seconds between attempts while the SuperLink refuses activation.
ACTIVATION_RETRY_S = 10.0
#: What flower-supernode prints once the SuperLink activated it (the warm executor is started then).
ACTIVATED = b"SuperNode ID:"
#: Exit code of ``fedct site`` when the warm executor keeps dying.
EXECUTOR_FAILED = 4
#: The warm executor is restarted at most this many times within :data:`EXECUTOR_RESTART_WINDOW_S`.
EXECUTOR_MAX_RESTARTS = 5
EXECUTOR_RESTART_WINDOW_S = 600.0
#: Pause before restarting an executor that died (a crash loop must not spin).
EXECUTOR_RESTART_DELAY_S = 2.0
#: Seconds the executor gets after SIGTERM (it gives its running ClientApp up to 15 s) before it is killed.
EXECUTOR_STOP_GRACE_S = 20.0
#: Start the executor this long after the Runtime API listens even if the activation line was not seen.
EXECUTOR_START_FALLBACK_S = 30.0
#: Prefix of the executor's lines in the site's output.
EXECUTOR_PREFIX = b"[executor] "


def _relay(stream: Any, refused: threading.Event, activated: threading.Event | None = None) -> None:
    """Copy the SuperNode's output to ours, noting an activation refusal or success."""
    for line in stream:
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()
        if ACTIVATION_REFUSED in line:
            refused.set()
        if activated is not None and ACTIVATED in line:
            activated.set()


def _relay_prefixed(stream: Any, prefix: bytes) -> None:
    """Copy a child's output to ours, every line prefixed (one log for hospital IT)."""
    for line in stream:
        sys.stdout.buffer.write(prefix + line)
        sys.stdout.buffer.flush()


def port_listening(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


class ExecutorSupervisor:
    """Runs the warm executor next to one SuperNode process.

    Started once the SuperNode's Runtime API listens and the SuperLink activated it (not while activation is
    refused: each start imports torch/MONAI), output relayed with :data:`EXECUTOR_PREFIX`, restarted when it dies
    while the SuperNode runs (at most :data:`EXECUTOR_MAX_RESTARTS` in :data:`EXECUTOR_RESTART_WINDOW_S`; then the
    SuperNode is stopped and :attr:`failed` is set), and stopped with :meth:`stop` (SIGTERM, bounded wait, SIGKILL).
    """

    def __init__(self, site: SiteEnv, command: Sequence[str], env: Mapping[str, str], supernode: subprocess.Popen,
                 activated: threading.Event) -> None:  # fmt: skip
        self.site = site
        self.command = list(command)
        self.env = dict(env)
        self.supernode = supernode
        self.activated = activated
        self.failed = threading.Event()
        self.proc: subprocess.Popen | None = None
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._readers: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._run, name="fedct-executor-supervisor", daemon=True)

    def _say(self, text: str, *, error: bool = False) -> None:
        print(f"fedct site {self.site.site_name}: {text}", file=sys.stderr if error else sys.stdout, flush=True)

    def start(self) -> None:
        """Begin supervising (in a thread): wait for the SuperNode, start the executor, restart it when it dies."""
        self._thread.start()

    def _supernode_alive(self) -> bool:
        return self.supernode.poll() is None and not self._stopped.is_set()

    def _wait_until_ready(self) -> bool:
        while self._supernode_alive() and not port_listening(self.site.runtime_port):
            self._stopped.wait(0.5)
        listening_since = time.monotonic()
        while self._supernode_alive() and not self.activated.is_set():
            if time.monotonic() - listening_since >= EXECUTOR_START_FALLBACK_S:
                break
            self._stopped.wait(0.5)
        return self._supernode_alive()

    def _launch(self) -> subprocess.Popen | None:
        with self._lock:
            if self._stopped.is_set():
                return None
            self._say(f"starting the warm executor: {' '.join(self.command)}")
            proc = subprocess.Popen(self.command, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)  # fmt: skip
            self.proc = proc
        reader = threading.Thread(target=_relay_prefixed, args=(proc.stdout, EXECUTOR_PREFIX), daemon=True)
        reader.start()
        self._readers.append(reader)
        return proc

    def _run(self) -> None:
        if not self._wait_until_ready():
            return
        restarts: list[float] = []
        while True:
            proc = self._launch()
            if proc is None:
                return
            while proc.poll() is None and not self._stopped.is_set():
                self._stopped.wait(0.5)
            if self._stopped.is_set() or self.supernode.poll() is not None:
                return  # stop() ends it; a SuperNode that ended is handled by run_supernode
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < EXECUTOR_RESTART_WINDOW_S] + [now]
            if len(restarts) > EXECUTOR_MAX_RESTARTS:
                self._say(f"error: the warm executor (ClientApp runner) exited unexpectedly (code {proc.returncode}) "
                          f"{len(restarts)} times within {EXECUTOR_RESTART_WINDOW_S / 60:.0f} min; stopping the site. "
                          "Read the [executor] lines above; FEDCT_CLIENTAPP_RUNNER=flower runs ClientApps in Flower's "
                          "SuperExec instead.", error=True)  # fmt: skip
                self.failed.set()
                if self.supernode.poll() is None:
                    self.supernode.terminate()
                    _kill_later(self.supernode)
                return
            self._say(f"WARNING the warm executor exited unexpectedly (code {proc.returncode}) while the SuperNode runs; "
                      f"restarting it ({len(restarts)} of {EXECUTOR_MAX_RESTARTS} restarts allowed per "
                      f"{EXECUTOR_RESTART_WINDOW_S / 60:.0f} min)")  # fmt: skip
            self._stopped.wait(EXECUTOR_RESTART_DELAY_S)
            if not self._supernode_alive():
                return

    def stop(self) -> None:
        """Stop the executor (SIGTERM: its ClientApp children report their tasks as stopped; SIGKILL after
        :data:`EXECUTOR_STOP_GRACE_S`) and the supervision; safe to call more than once, from any thread."""
        with self._lock:
            self._stopped.set()
            proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=EXECUTOR_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        for reader in self._readers:
            reader.join(timeout=5)


def _stop_orphans(parent_pid: int) -> None:
    """SIGTERM the processes started with ``--parent-pid PARENT_PID`` (Flower's SuperExec of a SuperNode that ended)."""
    needle = f"--parent-pid\0{parent_pid}\0".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "cmdline").read_bytes():
                    os.kill(int(entry.name), signal.SIGTERM)
            except (OSError, ProcessLookupError):
                continue


def run_supernode(site: SiteEnv, command: Sequence[str], env: Mapping[str, str], *, activation_wait_s: float,
                  executor: Sequence[str] | None = None) -> int:  # fmt: skip
    """Run the SuperNode in the foreground (output passed through, SIGTERM/SIGINT forwarded); returns its exit code.

    A SuperNode that was killed stays "online" at the SuperLink until its heartbeats expire (2 x 30 s), and a restart
    within that time is refused activation (code 2004), as is a key the server never registered. Such a refusal is
    retried every 10 s for ``activation_wait_s``; then the site stops with a message saying what to check.

    ``executor``: the warm executor's command line (:func:`executor_command`), run next to each SuperNode by an
    :class:`ExecutorSupervisor` with the same environment; it is stopped before the SuperNode on SIGTERM/SIGINT and
    whenever the SuperNode ends (so an activation retry starts a fresh one with the new SuperNode).
    """
    stopping: list[int] = []
    current: list[subprocess.Popen] = []
    supervisors: list[ExecutorSupervisor] = []

    def shutdown(signum: int) -> None:
        if supervisors:  # the executor first: its running ClientApp reports the task as stopped to the SuperNode
            supervisors[0].stop()
        if current and current[0].poll() is None:
            current[0].send_signal(signum)
            # Flower's SuperNode tries to deregister on SIGTERM and retries while the SuperLink is gone: bound it.
            _kill_later(current[0])

    def forward(signum: int, _frame: Any) -> None:
        stopping.append(signum)
        threading.Thread(target=shutdown, args=(signum,), name="fedct-site-shutdown", daemon=True).start()

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    deadline = time.monotonic() + activation_wait_s
    while True:
        if stopping:
            return 0
        print(f"fedct site {site.site_name}: starting {' '.join(command)}", flush=True)
        proc = subprocess.Popen(list(command), env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        current[:] = [proc]
        refused, activated = threading.Event(), threading.Event()
        reader = threading.Thread(target=_relay, args=(proc.stdout, refused, activated), daemon=True)
        reader.start()
        supervisor = None
        if executor is not None:
            supervisor = ExecutorSupervisor(site, executor, env, proc, activated)
            supervisors[:] = [supervisor]
            if stopping:
                shutdown(stopping[0])
            supervisor.start()
        code = proc.wait()
        if supervisor is not None:
            supervisor.stop()  # never outlives its SuperNode
        _stop_orphans(proc.pid)  # its SuperExec would otherwise linger (and keep the output pipe open)
        reader.join(timeout=5)
        if supervisor is not None and supervisor.failed.is_set():
            return EXECUTOR_FAILED
        if stopping:
            return 0
        if not refused.is_set():
            return code
        if time.monotonic() >= deadline:
            print(f"fedct site {site.site_name}: error: the SuperLink at {site.superlink} refused to activate this site "
                  f"(code 2004) for {activation_wait_s:.0f} s. Check that the server registered this site's public key "
                  f"(the .pub of FEDCT_SITE_KEY={site.site_key} in the server's FEDCT_SITE_KEYS; `fedct server start` "
                  "registers it), and that no other SuperNode runs with the same key.", file=sys.stderr, flush=True)  # fmt: skip
            return 3
        print(f"fedct site {site.site_name}: the SuperLink refused activation (code 2004): a previous instance of this "
              "site may still count as online (freed within 60 s of its last heartbeat), or the key is not registered; "
              f"retrying in {ACTIVATION_RETRY_S:.0f} s", flush=True)  # fmt: skip
        time.sleep(ACTIVATION_RETRY_S)


# --- command line ------------------------------------------------------------------------------------------------


def add_server_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fedct server start|submit|check``."""
    p = sub.add_parser("server", help="consortium server: start the SuperLink, submit runs, health check")
    server_sub = p.add_subparsers(dest="server_command", required=True)
    s = server_sub.add_parser("start", help="start the SuperLink (127.0.0.1, TLS, node auth), register the sites' keys, "
                                                "then the hospital-facing proxy (Fleet API only)")
    s.add_argument("--env", required=True, help="server env file (configs/server.env)")
    s.add_argument("--wait-s", type=float, default=60.0, help="how long to wait for the SuperLink to answer")
    s.add_argument("--log-file", help="write the SuperLink's output here instead of the console")
    s.set_defaults(func=_server_start)
    s = server_sub.add_parser("submit", help="start a federated run on the SuperLink")
    s.add_argument("--env", required=True, help="server env file")
    s.add_argument("--config", required=True, help="run config TOML (configs/run.toml)")
    s.add_argument("--app", help="app folder to send (default FEDCT_APP_DIR or this installation)")
    s.add_argument("--no-stream", action="store_true", help="return once the run is submitted")
    s.set_defaults(func=_server_submit)
    s = server_sub.add_parser("check", help="exit 0 when the proxy and the SuperLink answer TLS handshakes verified by the CA")
    s.add_argument("--env", required=True, help="server env file")
    s.set_defaults(func=_server_check)


def add_site_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fedct site``."""
    p = sub.add_parser("site", help="site: validate the env file, ingest, run the SuperNode (or approve an app)")
    p.add_argument("--env", default=os.environ.get("FEDCT_ENV"), help="site env file (configs/site.env; default $FEDCT_ENV)")
    p.add_argument("--check", action="store_true", help="validate the env file and the TLS connection, then exit")
    p.add_argument("--health", action="store_true", help="exit 0 when the env file is valid and a SuperNode is running")
    p.add_argument("--approve", metavar="APP_DIR", help="add this app's FAB hash to the site's allow-list and exit")
    p.add_argument("--no-ingest", action="store_true", help="start without ingesting first")
    p.add_argument("--wait-s", type=float, default=120.0, help="how long to wait for the SuperLink to answer")
    p.add_argument("--activation-wait-s", type=float, default=120.0,
                   help="how long to retry when the SuperLink refuses to activate this site (e.g. right after a crash)")
    p.set_defaults(func=_site)


def _server_start(args: argparse.Namespace) -> int:
    try:
        env = ServerEnv.from_file(Path(args.env))
    except DeployError as exc:
        print(f"fedct server: error: {exc}", file=sys.stderr)
        return 2
    return start_server(env, wait_s=args.wait_s, log_file=Path(args.log_file) if args.log_file else None)


def _server_submit(args: argparse.Namespace) -> int:
    try:
        env = ServerEnv.from_file(Path(args.env))
        done = submit_run(env, Path(args.config), app_dir=Path(args.app) if args.app else None, stream=not args.no_stream)
    except (DeployError, ConnectionError) as exc:
        print(f"fedct server submit: error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(done.output)
    print(f"fedct server submit: run {done.run_id}: {done.status}{' - ' + done.details if done.details and not done.ok else ''}")
    return 0 if done.ok else 1


def _server_check(args: argparse.Namespace) -> int:
    try:
        env = ServerEnv.from_file(Path(args.env))
        host, _, port = env.address.rpartition(":")
        version = check_tls(host.strip("[]"), int(port), env.ca_cert)
        inner = check_tls("127.0.0.1", env.superlink_port, env.ca_cert)
    except (DeployError, ConnectionError) as exc:
        print(f"fedct server check: {exc}", file=sys.stderr)
        return 1
    print(f"hospital-facing proxy {env.address}: TLS {version}, certificate verified; "
          f"SuperLink 127.0.0.1:{env.superlink_port}: TLS {inner}")
    return 0


def _site_health(site: SiteEnv) -> int:
    """0 when the site's SuperNode runs (and, with the warm runner, its executor); one line says what was found."""
    nodes = supernode_pids(site.site_name)
    parts = [f"SuperNode {'running (pid ' + ', '.join(map(str, nodes)) + ')' if nodes else 'NOT running'}"]
    healthy = bool(nodes)
    if site.clientapp_runner == "warm":
        executors = executor_pids(site.runtime_port)
        parts.append(f"warm executor {'running (pid ' + ', '.join(map(str, executors)) + ')' if executors else 'NOT running'}")
        healthy = healthy and bool(executors)
    print(f"fedct site {site.site_name}: {'; '.join(parts)}", file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


def _site(args: argparse.Namespace) -> int:
    if not args.env:
        print("fedct site: error: --env is required (or set FEDCT_ENV)", file=sys.stderr)
        return 2
    try:
        site = SiteEnv.from_file(Path(args.env), check_cuda=not args.health)
    except SiteEnvError as exc:
        print(f"fedct site: error: {exc}", file=sys.stderr)
        return 2
    if args.health:
        return _site_health(site)
    if args.approve:
        from fl_client.approval import approve

        if site.approved_apps is None:
            print("fedct site: error: FEDCT_APPROVAL=disabled-i-understand; set FEDCT_APPROVED_APPS to a file to approve apps",
                  file=sys.stderr)  # fmt: skip
            return 2
        try:
            digest = approve(Path(args.approve), site.approved_apps)
        except (OSError, ValueError) as exc:
            print(f"fedct site: error: {exc}", file=sys.stderr)
            return 2
        print(f"approved {args.approve}: FAB sha256 {digest} (in {site.approved_apps})")
        return 0
    try:
        if args.check:
            version = check_tls(site.superlink_host, site.superlink_port, site.ca_cert)
            print(f"fedct site {site.site_name}: env file valid; SuperLink {site.superlink} TLS {version}, certificate verified")
            return 0
        return start_site(site, wait_s=args.wait_s, ingest_first=not args.no_ingest, activation_wait_s=args.activation_wait_s)
    except (DeployError, ConnectionError) as exc:
        print(f"fedct site {site.site_name}: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"fedct site {site.site_name}: error: {exc}", file=sys.stderr)
        return 2
