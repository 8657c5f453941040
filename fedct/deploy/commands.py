"""The command lines of the processes fedct deploys, built from the validated env files and nothing else: the
SuperLink, the server's SuperExec, the proxy (nginx), a site's SuperNode and its warm executor. The benchmarks'
local deployment (bench/deployment.py) builds its Flower command lines with these too."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedct.deploy.common import DeployError, flower_env, flower_tool, toml_value
from fedct.deploy.server_env import ServerEnv
from fl_client.site_env import SiteEnv


@dataclass(frozen=True)
class TlsFiles:
    """A SuperLink's TLS material: the CA certificate, its certificate and its private key."""

    ca_cert: Path
    certfile: Path
    keyfile: Path


def flower_superlink(
    *,
    port: int,
    database: str,
    host: str = "127.0.0.1",
    tls: TlsFiles | None = None,
    node_auth: bool = False,
    isolation: str = "subprocess",
    superexec_secret_file: Path | None = None,
) -> list[str]:
    """A ``flower-superlink`` command line: TLS (or ``--insecure`` when ``tls`` is None, local tests only), SuperNode
    authentication, no runtime dependency installation, its database, bound to ``host``; with ``isolation="process"``
    ServerApps are run by a separate SuperExec, which must prove ``superexec_secret_file`` when one is given."""
    command = [flower_tool("flower-superlink")]
    if tls is None:
        command.append("--insecure")
    else:
        command += [
            "--ssl-ca-certfile",
            str(tls.ca_cert),
            "--ssl-certfile",
            str(tls.certfile),
            "--ssl-keyfile",
            str(tls.keyfile),
        ]
    if node_auth:
        command.append("--enable-supernode-auth")
    command += [
        "--disable-runtime-dependency-installation",
        "--database",
        database,
        "--host",
        host,
        "--port",
        str(port),
    ]
    if isolation != "subprocess":
        command += ["--isolation", isolation]
    if superexec_secret_file is not None:
        command += ["--superexec-auth-secret-file", str(superexec_secret_file)]
    return command


def superlink_command(env: ServerEnv) -> list[str]:
    """The server's ``flower-superlink``: TLS, SuperNode auth, no runtime installs, its state database, bound
    to 127.0.0.1 only (hospitals reach its Fleet API through the proxy), ServerApps run by our own SuperExec
    (``--isolation process``) which must prove the shared secret to acquire a task from the Runtime API."""
    return flower_superlink(
        port=env.superlink_port,
        database=env.database,
        host="127.0.0.1",
        tls=TlsFiles(env.ca_cert, env.server_cert, env.server_key),
        node_auth=True,
        isolation="process",
        superexec_secret_file=env.superexec_secret_file,
    )


def superexec_command(env: ServerEnv, *, parent_pid: int) -> list[str]:
    """The server's ``flower-superexec``: acquires ServerApp tasks from the SuperLink's Runtime API on loopback with
    the shared secret (TLS verified against the CA) and runs each ServerApp as a ``flwr-serverapp`` process; ends
    with ``parent_pid`` (the SuperLink). No runtime dependency installation (its flag is never given)."""
    return [
        flower_tool("flower-superexec"),
        "--runtime-api-address",
        env.control_address,
        "--root-certificates",
        str(env.ca_cert),
        "--superexec-auth-secret-file",
        str(env.superexec_secret_file),
        "--parent-pid",
        str(parent_pid),
    ]


def proxy_executable(env: ServerEnv) -> str:
    """The reverse proxy to run: FEDCT_PROXY, else nginx on PATH or in /usr/sbin (Debian's nginx package)."""
    candidate = env.proxy or shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None)
    if not candidate or not (Path(candidate).is_file() or shutil.which(candidate)):
        raise DeployError(
            f"{env.env_path}: no reverse proxy found (FEDCT_PROXY={env.proxy or ''}): the hospital-facing "
            "port is served by nginx, which forwards the Fleet API only; install it (apt-get install "
            "nginx; the server image has it) or set FEDCT_PROXY to its path"
        )
    return str(candidate)


def proxy_command(env: ServerEnv, config: Path) -> list[str]:
    """The proxy's command line: foreground, our config, its prefix and early error log in the state folder."""
    return [proxy_executable(env), "-e", "stderr", "-p", str(env.proxy_dir) + "/", "-c", str(config)]


def node_config_arg(config: Mapping[str, str | int | float | bool]) -> str:
    """``--node-config`` text: ``key="string" key=3``. Flower splits it with a regex that knows no escapes, so a
    string is written in double quotes, or in single quotes (TOML literal) when it holds a double quote."""
    parts = []
    for key, value in config.items():
        if isinstance(value, str):
            if "\n" in value or ('"' in value and "'" in value) or ("\\" in value and "'" in value):
                raise DeployError(
                    f"node config {key}={value!r}: Flower's --node-config cannot carry this value; rename the path"
                )
            text = f"'{value}'" if ('"' in value or "\\" in value) else f'"{value}"'
        else:
            text = toml_value(value)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def flower_supernode(
    *,
    superlink: str,
    runtime_port: int,
    node_config: str,
    ca_cert: Path | None = None,
    auth_key: Path | None = None,
    isolation: str = "subprocess",
    superexec_secret_file: Path | None = None,
) -> list[str]:
    """A ``flower-supernode`` command line: the SuperLink's Fleet API (TLS verified against ``ca_cert``, or
    ``--insecure`` when it is None: local tests only), the node's authentication key, its ``--node-config`` text
    (:func:`node_config_arg`), its Runtime API on 127.0.0.1:``runtime_port``, and how ClientApps are run.

    Runtime dependency installation is off by default on a SuperNode (only ``--allow-...`` exists); the
    environment also sets ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``."""
    command = [flower_tool("flower-supernode"), "--superlink", superlink]
    command += ["--insecure"] if ca_cert is None else ["--root-certificates", str(ca_cert)]
    if auth_key is not None:
        command += ["--auth-supernode-private-key", str(auth_key)]
    command += ["--node-config", node_config, "--host", "127.0.0.1", "--port", str(runtime_port)]
    if isolation != "subprocess":
        command += ["--isolation", isolation]
    if superexec_secret_file is not None:
        command += ["--superexec-auth-secret-file", str(superexec_secret_file)]
    return command


def supernode_command(site: SiteEnv) -> list[str]:
    """The ``flower-supernode`` command line of a site: TLS with the consortium CA, its auth key, its settings. With
    the warm runner the SuperNode starts no SuperExec (``--isolation process``) and accepts task acquisition only
    with the shared secret."""
    warm = site.clientapp_runner == "warm"
    return flower_supernode(
        superlink=site.superlink,
        runtime_port=site.runtime_port,
        node_config=node_config_arg(site.node_config()),
        ca_cert=site.ca_cert,
        auth_key=site.site_key,
        isolation="process" if warm else "subprocess",
        superexec_secret_file=site.superexec_secret_file if warm else None,
    )


def warm_executor(
    *,
    runtime_port: int,
    approved_apps: str,
    superexec_secret_file: Path | None = None,
    parent_pid: int | None = None,
    poll_interval_s: float | None = None,
    preload_app: str | None = None,
) -> list[str]:
    """fedct's warm executor (:mod:`fl_client.executor`) for the SuperNode whose Runtime API is on
    127.0.0.1:``runtime_port`` (loopback, no TLS), checking ``approved_apps`` (an allow-list file or
    ``disabled-i-understand``), proving ``superexec_secret_file`` when given and ending with ``parent_pid``."""
    command = [
        sys.executable,
        "-m",
        "fl_client.executor",
        "--runtime-api-address",
        f"127.0.0.1:{runtime_port}",
        "--insecure",
    ]  # loopback only; the SuperNode's Runtime API has no TLS unless given --ssl-* files
    if poll_interval_s is not None:
        command += ["--poll-interval", str(poll_interval_s)]
    if preload_app is not None:
        command += ["--preload-app", preload_app]
    command += ["--approved-apps", approved_apps]
    if superexec_secret_file is not None:
        command += ["--superexec-auth-secret-file", str(superexec_secret_file)]
    if parent_pid is not None:
        command += ["--parent-pid", str(parent_pid)]
    return command


def executor_command(site: SiteEnv, *, parent_pid: int) -> list[str]:
    """The warm executor of a site: its SuperNode's Runtime API, the site's allow-list (``disabled-i-understand``
    when approval is disabled), the shared secret, and ``parent_pid`` (``fedct site``) whose end ends it."""
    from fl_client.approval import allow_list_value

    return warm_executor(
        runtime_port=site.runtime_port,
        approved_apps=allow_list_value(site.approved_apps),
        superexec_secret_file=site.superexec_secret_file,
        parent_pid=parent_pid,
    )


def supernode_env(site: SiteEnv, gate_dir: Path) -> dict[str, str]:
    """The SuperNode's environment: the approval launcher first on PATH, the site's own Flower home, no telemetry."""
    from fl_client.approval import ALLOW_LIST_ENV, allow_list_value

    env = flower_env(FLWR_HOME=str(site.flwr_home), **{ALLOW_LIST_ENV: allow_list_value(site.approved_apps)})
    env["PATH"] = str(gate_dir) + os.pathsep + env["PATH"]
    return env
