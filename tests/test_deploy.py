"""fedct.deploy: command lines, the server env file, run configs, Flower CLI home, and the TLS preflight against a
real TLS endpoint (Python's ssl server with certificates from fedct certs)."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from fedct import deploy
from fedct.certs import write_consortium
from fedct.cli import main
from fedct.deploy import (
    DeployError,
    ExecutorSupervisor,
    ServerEnv,
    TlsFiles,
    check_tls,
    ensure_server_secret,
    ensure_superexec_secret,
    executor_command,
    flower_superlink,
    flower_supernode,
    node_config_arg,
    proxy_config,
    run_config_for,
    superexec_command,
    superlink_command,
    supernode_command,
    supernode_env,
    warm_executor,
    write_flwr_home,
)
from fedct.deploy import supervisor as deploy_supervisor
from fl_client.approval import allow_list_value
from fl_client.config import SiteConfig
from fl_client.executor import ExecutorConfig
from fl_client.executor import parse_args as executor_args
from fl_client.site_env import SiteEnv


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pki")
    write_consortium(root, sites=["site-a", "site-b"], with_site_keys=True)
    return root


@pytest.fixture
def server_env(tmp_path, pki) -> Path:
    path = tmp_path / "server.env"
    path.write_text(
        f"FEDCT_SERVER_PORT=9555\nFEDCT_CA_CERT={pki}/server/ca.crt\nFEDCT_SERVER_CERT={pki}/server/server.crt\n"
        f"FEDCT_SERVER_KEY={pki}/server/server.key\nFEDCT_STATE_DIR=state\nFEDCT_SITE_KEYS={pki}/sites\nFEDCT_RUNS_DIR=runs\n"
    )
    return path


def _tls_server(cert: Path, key: Path, host: str = "127.0.0.1") -> tuple[int, threading.Event]:
    """A TLS endpoint on ``host`` (loopback) that completes handshakes until told to stop."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    listener = socket.socket()
    listener.bind((host, 0))
    listener.listen()
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        with listener:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                try:
                    with context.wrap_socket(conn, server_side=True) as tls:
                        tls.recv(1)
                except (ssl.SSLError, OSError):
                    pass

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1], stop


def test_server_env_and_superlink_command(server_env, pki, tmp_path):
    env = ServerEnv.from_file(server_env)
    assert env.address == "127.0.0.1:9555" and env.host == "0.0.0.0"
    assert env.superlink_port == 9093 and env.control_address == "127.0.0.1:9093"
    assert env.database == str(tmp_path / "state" / "state.db")  # default FEDCT_SUPERLINK_STATE=disk
    assert set(env.site_public_keys()) == {"site-a", "site-b"}
    command = superlink_command(env)
    assert Path(command[0]).name == "flower-superlink"
    flags = " ".join(command)
    for expected in (
        f"--ssl-ca-certfile {pki}/server/ca.crt",
        f"--ssl-certfile {pki}/server/server.crt",
        f"--ssl-keyfile {pki}/server/server.key",
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        f"--database {env.database}",
        "--host 127.0.0.1 --port 9093",
        "--isolation process",
        f"--superexec-auth-secret-file {env.superexec_secret_file}",
    ):
        assert expected in flags
    assert "--insecure" not in command and "0.0.0.0" not in flags and "9555" not in flags  # never the public port
    superexec = superexec_command(env, parent_pid=123)
    assert Path(superexec[0]).name == "flower-superexec"
    assert " ".join(superexec[1:]) == (
        f"--runtime-api-address 127.0.0.1:9093 --root-certificates {pki}/server/ca.crt "
        f"--superexec-auth-secret-file {env.superexec_secret_file} --parent-pid 123"
    )
    assert "--allow-runtime-dependency-installation" not in superexec


def test_proxy_forwards_the_fleet_api_only(server_env, pki):
    env = ServerEnv.from_file(server_env)
    text = proxy_config(env)
    assert "daemon off;" in text and f"pid {env.proxy_dir / 'nginx.pid'};" in text
    assert "listen 0.0.0.0:9555 ssl;" in text and "server 127.0.0.1:9093;" in text
    assert (
        f"ssl_certificate {pki}/server/server.crt;" in text and f"ssl_certificate_key {pki}/server/server.key;" in text
    )
    assert "proxy_ssl_verify on;" in text and f"proxy_ssl_trusted_certificate {pki}/server/ca.crt;" in text
    locations = [line.strip() for line in text.splitlines() if line.strip().startswith("location")]
    assert locations == ["location /v1/fleet/ {", "location / {"]  # one forwarded prefix, everything else refused
    forwarded = text[text.index("location /v1/fleet/") : text.index("location / {")]
    assert "limit_except POST { deny all; }" in forwarded and "proxy_pass https://superlink;" in forwarded
    assert text.count("proxy_pass") == 1 and 'return 403 "fedct: refused.' in text


def test_generated_proxy_config_is_accepted_by_nginx(server_env):
    import shutil

    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None)
    if nginx is None:
        pytest.skip("nginx is not installed (make system-tools installs it)")
    env = ServerEnv.from_file(server_env)
    config = deploy.write_proxy_config(env)
    assert config == env.proxy_dir / "nginx.conf" and config.read_text() == proxy_config(env)
    assert (env.proxy_dir.stat().st_mode & 0o777) == 0o700
    done = subprocess.run([*deploy.proxy_command(env, config), "-t"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_server_start_without_the_proxy_says_what_to_install(server_env, capsys):
    server_env.write_text(server_env.read_text() + "FEDCT_PROXY=/nonexistent/nginx\n")
    assert main(["server", "start", "--env", str(server_env)]) == 2
    err = capsys.readouterr().err
    assert "no reverse proxy found (FEDCT_PROXY=/nonexistent/nginx)" in err and "apt-get install nginx" in err


def test_server_secret_is_private_random_reused_and_refused_when_shared(server_env):
    env = ServerEnv.from_file(server_env)
    path = ensure_server_secret(env)
    assert path == env.superexec_secret_file and (path.stat().st_mode & 0o777) == 0o600
    first = path.read_text()
    assert len(first) == 64 and ensure_server_secret(env).read_text() == first
    other = ServerEnv.from_file(server_env)
    other.superexec_secret_file.unlink()
    assert ensure_server_secret(other).read_text() != first
    path.chmod(0o644)
    with pytest.raises(DeployError, match="SuperExec secret.*readable by others"):
        ensure_server_secret(env)


def test_server_certificate_without_loopback_sans_is_refused(server_env, tmp_path):
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "fl.example.org")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("fl.example.org")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem = tmp_path / "public-only.crt"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kept = [ln for ln in server_env.read_text().splitlines() if not ln.startswith("FEDCT_SERVER_CERT=")]
    server_env.write_text("\n".join([*kept, f"FEDCT_SERVER_CERT={pem}"]) + "\n")
    with pytest.raises(DeployError, match=r"lacks the SAN\(s\) localhost, 127.0.0.1"):
        ServerEnv.from_file(server_env)


def test_superlink_state_in_memory(server_env):
    """FEDCT_SUPERLINK_STATE=memory gives the SuperLink Flower's in-memory state (faster rounds, no database file)."""
    server_env.write_text(server_env.read_text() + "FEDCT_SUPERLINK_STATE=memory\n")
    env = ServerEnv.from_file(server_env)
    command = superlink_command(env)
    assert command[command.index("--database") + 1] == ":flwr-in-memory:"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("FEDCT_SERVER_KEY=/nonexistent.key", "FEDCT_SERVER_KEY=/nonexistent.key: no such readable file"),
        ("FEDCT_SERVER_PORT=http", "FEDCT_SERVER_PORT='http' is not a port number"),
        ("FEDCT_SITE_KEYS=/nonexistent", "FEDCT_SITE_KEYS=/nonexistent: no such folder"),
        ("FEDCT_SERVR_PORT=1", "unknown key"),
        ("FEDCT_SUPERLINK_STATE=ram", "FEDCT_SUPERLINK_STATE='ram' is not one of disk, memory"),
        ("FEDCT_SUPERLINK_PORT=9555", "FEDCT_SUPERLINK_PORT=9555 equals FEDCT_SERVER_PORT"),
        ("FEDCT_SUPERLINK_PORT=70000", "FEDCT_SUPERLINK_PORT='70000' is not a port number"),
    ],
)
def test_bad_server_env(server_env, line, message):
    key = line.split("=")[0]
    kept = [ln for ln in server_env.read_text().splitlines() if not ln.startswith(key + "=")]
    server_env.write_text("\n".join([*kept, line]) + "\n")
    with pytest.raises(DeployError, match=message):
        ServerEnv.from_file(server_env)


def test_server_key_readable_by_others_is_refused(server_env, pki, tmp_path):
    shared = tmp_path / "server.key"
    shared.write_bytes((pki / "server" / "server.key").read_bytes())
    shared.chmod(0o644)
    server_env.write_text(server_env.read_text().replace(f"{pki}/server/server.key", str(shared)))
    with pytest.raises(DeployError, match="readable by others"):
        ServerEnv.from_file(server_env)


def test_run_config_is_checked_and_run_dir_made_absolute(server_env, tmp_path):
    env = ServerEnv.from_file(server_env)
    run = tmp_path / "run.toml"
    run.write_text('num-server-rounds = 4\nmin-sites = 2\nround-timeout-s = 600.0\nrun-dir = "study-1"\n')
    config = run_config_for(env, run)
    assert config["run-dir"] == str(tmp_path / "runs" / "study-1") and config["num-server-rounds"] == 4
    run.write_text("num-server-round = 4\n")
    with pytest.raises(DeployError, match="unknown run config key 'num-server-round'"):
        run_config_for(env, run)
    run.write_text("min-sites = 0\n")
    with pytest.raises(DeployError, match="min-sites must be >= 1"):
        run_config_for(env, run)


def test_flwr_home_names_one_tls_connection(tmp_path, pki):
    home = write_flwr_home(tmp_path / "home", address="127.0.0.1:9555", ca_cert=pki / "ca" / "ca.crt")
    config = tomllib.loads((home / "config.toml").read_text())
    assert config["superlink"]["default"] == "consortium"
    assert config["superlink"]["consortium"] == {
        "address": "127.0.0.1:9555",
        "root-certificates": str(pki / "ca" / "ca.crt"),
    }


def test_flwr_home_without_a_ca_is_insecure(tmp_path):
    """The local benchmarks' deployment (bench/deployment.py) runs without TLS; fedct itself always passes the CA."""
    home = write_flwr_home(tmp_path / "home", address="127.0.0.1:9555", ca_cert=None)
    assert tomllib.loads((home / "config.toml").read_text())["superlink"]["consortium"] == {
        "address": "127.0.0.1:9555",
        "insecure": True,
    }


def test_malformed_server_env_names_the_file_and_line(server_env):
    """The server env file goes through fedct.envfile, the reader of every env file: same syntax, same errors."""
    server_env.write_text(server_env.read_text() + "FEDCT_RUNS_DIR=again\n")
    with pytest.raises(DeployError, match=f"{server_env}.*line 8"):
        ServerEnv.from_file(server_env)
    server_env.write_text("export FEDCT_SERVER_PORT=9555\nnot a setting\n")
    with pytest.raises(DeployError, match=f"{server_env}.*line 2"):
        ServerEnv.from_file(server_env)
    with pytest.raises(DeployError, match="does not exist"):
        ServerEnv.from_file(server_env.parent / "missing.env")


def test_parameter_builders_match_the_env_file_builders(server_env, tmp_path, pki):
    """bench/deployment.py starts its processes with the same builders fedct's own command lines are made of."""
    env = ServerEnv.from_file(server_env)
    tls = TlsFiles(env.ca_cert, env.server_cert, env.server_key)
    assert superlink_command(env) == flower_superlink(
        port=env.superlink_port,
        database=env.database,
        tls=tls,
        node_auth=True,
        isolation="process",
        superexec_secret_file=env.superexec_secret_file,
    )
    insecure = flower_superlink(port=9000, database=":flwr-in-memory:")
    assert "--insecure" in insecure and not any(a.startswith("--ssl") for a in insecure)
    assert "--enable-supernode-auth" not in insecure and "--isolation" not in insecure
    assert "--disable-runtime-dependency-installation" in insecure and insecure[-4:] == [
        "--host",
        "127.0.0.1",
        "--port",
        "9000",
    ]
    site = _site(tmp_path, pki)
    assert supernode_command(site) == flower_supernode(
        superlink=site.superlink,
        runtime_port=site.runtime_port,
        node_config=node_config_arg(site.node_config()),
        ca_cert=site.ca_cert,
        auth_key=site.site_key,
        isolation="process",
        superexec_secret_file=site.superexec_secret_file,
    )
    node = flower_supernode(superlink="127.0.0.1:9000", runtime_port=9100, node_config='site-name="s0"')
    assert "--insecure" in node and "--auth-supernode-private-key" not in node and "--isolation" not in node
    assert executor_command(site, parent_pid=42) == warm_executor(
        runtime_port=site.runtime_port,
        approved_apps=allow_list_value(site.approved_apps),
        superexec_secret_file=site.superexec_secret_file,
        parent_pid=42,
    )
    bench = executor_args(
        warm_executor(
            runtime_port=9100,
            approved_apps="disabled-i-understand",
            poll_interval_s=0.2,
            preload_app="fl_client.client_app",
        )[3:]
    )
    assert bench.runtime_api_address == "127.0.0.1:9100" and bench.poll_interval_s == 0.2


def test_supernode_command_carries_tls_auth_and_the_site_settings(tmp_path, pki):
    dicom = tmp_path / 'data "quoted"' / "dicom"
    dicom.mkdir(parents=True)
    (dicom / "1.dcm").write_bytes(b"x")
    env_file = tmp_path / "site.env"
    env_file.write_text(
        f"FEDCT_SITE_NAME=site-a\nFEDCT_SUPERLINK=127.0.0.1:9555\nFEDCT_CA_CERT={pki}/sites/site-a/ca.crt\n"
        f"FEDCT_SITE_KEY={pki}/sites/site-a/site.key\nFEDCT_DICOM_DIR='{dicom}'\nFEDCT_SITE_DIR={tmp_path}/work\n"
        "FEDCT_DEVICE=cpu\nFEDCT_RUNTIME_PORT=9601\n"
    )
    site = SiteEnv.from_file(env_file)
    command = supernode_command(site)
    assert Path(command[0]).name == "flower-supernode" and "--insecure" not in command
    args = dict(zip(command[1::2], command[2::2]))
    assert args["--superlink"] == "127.0.0.1:9555"
    assert args["--root-certificates"] == f"{pki}/sites/site-a/ca.crt"
    assert args["--auth-supernode-private-key"] == f"{pki}/sites/site-a/site.key"
    assert args["--port"] == "9601" and args["--host"] == "127.0.0.1"
    parsed = parse_config_args([args["--node-config"]])  # Flower's own parser
    assert SiteConfig.from_context(parsed, {}) == site.site_config()
    env = supernode_env(site, tmp_path / "bin")
    assert env["PATH"].split(":")[0] == str(tmp_path / "bin")  # the approval launcher comes first
    assert env["FEDCT_APPROVED_APPS"] == str(tmp_path / "approved-apps.txt")  # next to the env file, outside SITE_DIR
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["FLWR_HOME"] == str(tmp_path / "work" / "flwr-home")


def test_node_config_arg_survives_flowers_parser():
    text = node_config_arg({"a": 'x "y"', "p": "/data/site a/it's", "n": 3, "f": 0.5, "b": True})
    assert parse_config_args([text]) == {"a": 'x "y"', "p": "/data/site a/it's", "n": 3, "f": 0.5, "b": True}
    with pytest.raises(DeployError, match="cannot carry"):
        node_config_arg({"a": 'it\'s "x"'})


def test_tls_preflight_verifies_ca_and_hostname(pki, tmp_path):
    port, stop = _tls_server(pki / "server" / "server.crt", pki / "server" / "server.key")
    try:
        assert check_tls("127.0.0.1", port, pki / "ca" / "ca.crt").startswith("TLS")
        assert check_tls("localhost", port, pki / "ca" / "ca.crt").startswith("TLS")
        other = write_consortium(tmp_path / "other")
        with pytest.raises(DeployError, match=r"does not verify .*consortium's ca.crt"):
            check_tls("127.0.0.1", port, other.ca_cert)
    finally:
        stop.set()
    # an address the certificate does not name (SANs: fl.example.org + loopback names; 127.0.0.2 is loopback too)
    narrow = write_consortium(tmp_path / "narrow", sans=("fl.example.org",))
    port, stop = _tls_server(narrow.server_cert, narrow.server_key, host="127.0.0.2")
    try:
        with pytest.raises(DeployError, match=r"not valid for '127.0.0.2'.*--san 127.0.0.2"):
            check_tls("127.0.0.2", port, narrow.ca_cert)
    finally:
        stop.set()


def test_nothing_listening_is_a_connection_error(pki):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionError, match=f"cannot reach the SuperLink at 127.0.0.1:{port}"):
        check_tls("127.0.0.1", port, pki / "ca" / "ca.crt")


def test_cli_reports_bad_env_files(tmp_path, capsys):
    assert main(["site", "--env", str(tmp_path / "missing.env")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["server", "start", "--env", str(tmp_path / "missing.env")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["server", "check", "--env", str(tmp_path / "missing.env")]) == 1


def _site(tmp_path: Path, pki: Path, name: str = "site-a", **lines: object) -> SiteEnv:
    dicom = tmp_path / name / "dicom"
    dicom.mkdir(parents=True, exist_ok=True)
    (dicom / "1.dcm").write_bytes(b"x")
    values = {
        "FEDCT_SITE_NAME": name,
        "FEDCT_SUPERLINK": "127.0.0.1:9555",
        "FEDCT_CA_CERT": f"{pki}/sites/{name}/ca.crt",
        "FEDCT_SITE_KEY": f"{pki}/sites/{name}/site.key",
        "FEDCT_DICOM_DIR": dicom,
        "FEDCT_SITE_DIR": tmp_path / name / "work",
        "FEDCT_DEVICE": "cpu",
        "FEDCT_RUNTIME_PORT": 9601,
        **lines,
    }
    env_file = tmp_path / f"{name}.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return SiteEnv.from_file(env_file)


def test_warm_runner_starts_the_supernode_without_superexec_and_the_executor_with_the_site_settings(tmp_path, pki):
    site = _site(tmp_path, pki)
    assert site.clientapp_runner == "warm"
    command = supernode_command(site)
    args = dict(zip(command[1::2], command[2::2]))
    assert args["--isolation"] == "process"  # Flower starts no SuperExec
    assert args["--superexec-auth-secret-file"] == str(site.superexec_secret_file)
    ensure_superexec_secret(site)
    executor = executor_command(site, parent_pid=4321)
    assert executor[:3] == [sys.executable, "-m", "fl_client.executor"]
    config = executor_args(executor[3:] + ["--preload-app", ""])  # the executor's own parser accepts it
    assert config == ExecutorConfig(
        runtime_api_address="127.0.0.1:9601",
        insecure=True,
        preload_app=None,
        superexec_auth_secret_file=site.superexec_secret_file,
        approved_apps=tmp_path / "approved-apps.txt",
        parent_pid=4321,
    )
    off = _site(tmp_path, pki, FEDCT_APPROVAL="disabled-i-understand")
    assert executor_args([*executor_command(off, parent_pid=1)[3:], "--preload-app", ""]).approved_apps is None


def test_flower_runner_keeps_flowers_subprocess_isolation(tmp_path, pki):
    site = _site(tmp_path, pki, FEDCT_CLIENTAPP_RUNNER="flower")
    command = supernode_command(site)
    assert "--isolation" not in command and "--superexec-auth-secret-file" not in command
    assert supernode_env(site, tmp_path / "bin")["PATH"].split(":")[0] == str(tmp_path / "bin")  # the approval launcher


def test_superexec_secret_is_private_random_and_reused(tmp_path, pki):
    site = _site(tmp_path, pki)
    path = ensure_superexec_secret(site)
    assert path == site.superexec_secret_file
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    secret = path.read_text()
    assert len(secret) == 64 and int(secret, 16) >= 0
    assert ensure_superexec_secret(site).read_text() == secret  # a restart keeps it
    other = _site(tmp_path, pki, name="site-b")
    assert ensure_superexec_secret(other).read_text() != secret
    path.write_text("")
    assert len(ensure_superexec_secret(site).read_text()) == 64  # an empty secret is replaced (Flower refuses it)


@pytest.fixture
def runtime_api(tmp_path, pki):
    """A site whose Runtime API port is a real listening socket, and a real process standing in for its SuperNode."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    site = _site(tmp_path, pki, FEDCT_RUNTIME_PORT=listener.getsockname()[1])
    node = subprocess.Popen(["sleep", "300"])
    yield site, node, listener
    node.kill()
    node.wait()
    listener.close()


def _wait(condition, *, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "liveness bound exceeded"
        time.sleep(0.05)


def test_supervisor_restarts_a_dying_executor_a_bounded_number_of_times_then_stops_the_site(
    runtime_api, capfd, monkeypatch
):
    monkeypatch.setattr(deploy_supervisor, "EXECUTOR_RESTART_DELAY_S", 0.05)
    site, node, _ = runtime_api
    activated = threading.Event()
    activated.set()
    dying = [sys.executable, "-c", "print('boom', flush=True); raise SystemExit(3)"]
    supervisor = ExecutorSupervisor(site, dying, dict(os.environ), node, activated)
    supervisor.start()
    _wait(supervisor.failed.is_set)
    assert node.wait(timeout=60) == -signal.SIGTERM  # the SuperNode is stopped: fedct site then exits with code 4
    supervisor.stop()
    out, err = capfd.readouterr()
    runs = deploy.EXECUTOR_MAX_RESTARTS + 1
    assert out.count("[executor] boom") == runs  # every run's output reached the site's log, prefixed
    assert out.count("WARNING the warm executor exited unexpectedly (code 3)") == deploy.EXECUTOR_MAX_RESTARTS
    assert f"exited unexpectedly (code 3) {runs} times within 10 min; stopping the site" in err


def test_supervisor_stop_kills_an_executor_that_ignores_sigterm(runtime_api, capfd, monkeypatch):
    monkeypatch.setattr(deploy_supervisor, "EXECUTOR_STOP_GRACE_S", 0.5)
    site, node, _ = runtime_api
    activated = threading.Event()
    activated.set()
    stubborn = [
        sys.executable,
        "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(300)",
    ]
    supervisor = ExecutorSupervisor(site, stubborn, dict(os.environ), node, activated)
    supervisor.start()
    _wait(lambda: "[executor] ready" in capfd.readouterr().out)
    supervisor.stop()
    assert supervisor.proc.returncode == -signal.SIGKILL
    assert node.poll() is None  # stopping the executor leaves the SuperNode to its owner
    assert not supervisor.failed.is_set()


def test_supervisor_starts_the_executor_only_once_the_supernode_is_activated(runtime_api):
    site, node, listener = runtime_api
    waiting = [sys.executable, "-c", "import time; time.sleep(300)"]
    supervisor = ExecutorSupervisor(site, waiting, dict(os.environ), node, activated := threading.Event())
    supervisor.start()
    listener.settimeout(60)
    listener.accept()[0].close()  # the supervisor found the Runtime API listening...
    assert supervisor.proc is None  # ...but the SuperLink has not activated the SuperNode (e.g. code 2004): no executor
    activated.set()
    _wait(lambda: supervisor.proc is not None)
    supervisor.stop()
    assert supervisor.proc.returncode == -signal.SIGTERM


def test_supervisor_starts_nothing_for_a_supernode_that_ends_before_activation(runtime_api):
    site, node, _ = runtime_api
    supervisor = ExecutorSupervisor(
        site, [sys.executable, "-c", "raise SystemExit(1)"], dict(os.environ), node, threading.Event()
    )
    supervisor.start()
    node.kill()
    node.wait()
    supervisor._thread.join(timeout=60)
    assert not supervisor._thread.is_alive() and supervisor.proc is None
    supervisor.stop()


#: Stand-in for flower-supernode in the run_supernode test: listens on the Runtime API port; its first run is refused
#: activation (code 2004) and exits, the next one is activated and runs until SIGTERM. Every step is logged in order.
FAKE_SUPERNODE = """
import signal, socket, sys, time
from pathlib import Path
port, state = int(sys.argv[1]), Path(sys.argv[2])
def event(text):
    with (state / "events").open("a") as fh:
        fh.write(text + "\\n")
runs = state / "node-runs"
n = len(runs.read_text()) if runs.exists() else 0
runs.write_text("x" * (n + 1))
def term(*_):
    event(f"node{n} SIGTERM")
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", port))
listener.listen()
event(f"node{n} up")
if n == 0:
    print("ERROR : [code: 2004] Failed to activate SuperNode.", flush=True)
    sys.exit(1)
print("INFO : SuperNode ID: 42", flush=True)
while True:
    time.sleep(1)
"""
#: Stand-in for the warm executor: says it is up, logs SIGTERM.
FAKE_EXECUTOR = """
import os, signal, sys, time
from pathlib import Path
state = Path(sys.argv[1])
def event(text):
    with (state / "events").open("a") as fh:
        fh.write(text + "\\n")
def term(*_):
    event("executor SIGTERM")
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
event("executor up")
print("serving", flush=True)
while True:
    time.sleep(1)
"""
DRIVER = """
import os, sys
from pathlib import Path
from fedct import deploy
from fedct.deploy import supervisor
from fl_client.site_env import SiteEnv
supervisor.ACTIVATION_RETRY_S = 0.2
site = SiteEnv.from_file(Path(sys.argv[1]), check_cuda=False)
node, executor = sys.argv[2:4]
sys.exit(deploy.run_supernode(site, [sys.executable, node, str(site.runtime_port), sys.argv[4]], dict(os.environ),
                              activation_wait_s=120, executor=[sys.executable, executor, sys.argv[4]]))
"""


def test_run_supernode_starts_the_executor_for_the_activated_supernode_and_stops_it_first(tmp_path, pki):
    """The lifetime rules of run_supernode with the warm runner, with stand-in processes for Flower's SuperNode and
    the executor (their real counterparts run in tests/test_deployment.py): a SuperNode refused activation gets no
    executor, the activated one gets exactly one, and SIGTERM stops the executor before the SuperNode."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    site = _site(tmp_path, pki, FEDCT_RUNTIME_PORT=port)
    state = tmp_path / "state"
    state.mkdir()
    scripts = {}
    for name, text in (("node.py", FAKE_SUPERNODE), ("executor.py", FAKE_EXECUTOR), ("driver.py", DRIVER)):
        scripts[name] = tmp_path / name
        scripts[name].write_text(text)
    events = state / "events"
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    driver = subprocess.Popen(
        [
            sys.executable,
            str(scripts["driver.py"]),
            str(site.env_path),
            str(scripts["node.py"]),
            str(scripts["executor.py"]),
            str(state),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait(lambda: events.exists() and "executor up" in events.read_text())
        driver.send_signal(signal.SIGTERM)
        out = driver.communicate(timeout=60)[0]
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, out
    assert events.read_text().split("\n")[:-1] == [
        "node0 up",
        "node1 up",
        "executor up",
        "executor SIGTERM",
        "node1 SIGTERM",
    ], out
    assert "refused activation (code 2004)" in out and "[executor] serving" in out
