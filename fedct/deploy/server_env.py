"""The server's env file (``fedct server --env server.env``), read with :mod:`fedct.envfile` and validated into a
:class:`ServerEnv`; every error names the key and what to check."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fedct.deploy.common import DeployError
from fedct.envfile import EnvFileError, read_env_file
from fl_client.site_env import SiteEnvError, check_ca_certificate, parse_superlink_address

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
SERVER_REQUIRED = (
    "FEDCT_CA_CERT",
    "FEDCT_SERVER_CERT",
    "FEDCT_SERVER_KEY",
    "FEDCT_STATE_DIR",
    "FEDCT_SITE_KEYS",
    "FEDCT_RUNS_DIR",
)


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
        except EnvFileError as exc:
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
            raise DeployError(
                f"{path}: FEDCT_SERVER_KEY={a_path('FEDCT_SERVER_KEY')} is readable by others "
                f"(mode {key_mode:o}); run chmod 600 on it"
            )
        port_text = values.get("FEDCT_SERVER_PORT") or "9092"
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise DeployError(f"{path}: FEDCT_SERVER_PORT={port_text!r} is not a port number")
        superlink_port_text = values.get("FEDCT_SUPERLINK_PORT") or "9093"
        if not superlink_port_text.isdigit() or not 0 < int(superlink_port_text) < 65536:
            raise DeployError(f"{path}: FEDCT_SUPERLINK_PORT={superlink_port_text!r} is not a port number")
        if superlink_port_text == port_text:
            raise DeployError(
                f"{path}: FEDCT_SUPERLINK_PORT={superlink_port_text} equals FEDCT_SERVER_PORT: the SuperLink "
                "(loopback, all APIs) and the hospital-facing proxy (Fleet API only) need two ports"
            )
        missing_sans = _missing_loopback_sans(a_path("FEDCT_SERVER_CERT"))
        if missing_sans:
            raise DeployError(
                f"{path}: FEDCT_SERVER_CERT={a_path('FEDCT_SERVER_CERT')} lacks the SAN(s) "
                f"{', '.join(missing_sans)}: this host's tools and the proxy reach the SuperLink on loopback; "
                "re-issue the server certificate with `fedct certs` (it adds them)"
            )
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
            raise DeployError(
                f"{path}: FEDCT_SUPERLINK_STATE={superlink_state!r} is not one of {', '.join(SUPERLINK_STATES)} "
                f"({SERVER_KEYS['FEDCT_SUPERLINK_STATE']})"
            )
        source_tree = Path(__file__).resolve().parents[2]  # the checkout or installation holding fedct/
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
        env = cls(
            env_path=path,
            host=values.get("FEDCT_SERVER_HOST") or "0.0.0.0",
            port=int(port_text),
            address=address,
            ca_cert=a_path("FEDCT_CA_CERT"),
            server_cert=a_path("FEDCT_SERVER_CERT"),
            server_key=a_path("FEDCT_SERVER_KEY"),
            state_dir=dirs["FEDCT_STATE_DIR"],
            site_keys_dir=site_keys,
            runs_dir=dirs["FEDCT_RUNS_DIR"],
            app_dir=app_dir,
            superlink_state=superlink_state,
            superlink_port=int(superlink_port_text),
            proxy=values.get("FEDCT_PROXY") or None,
        )
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
