"""How this site reaches its PACS: the ``FEDCT_PACS_*`` settings of the site env file, checked before anything connects.

Settings, credentials included, come only from the site env file (``KEY=VALUE`` lines, read by :mod:`fedct.envfile`;
see :data:`ENV_KEYS`); the URL may also be given on the command line, but never with credentials in it. Basic auth
over plain ``http://`` is refused unless ``FEDCT_PACS_ALLOW_PLAIN_HTTP=yes``; a password file that group or others
may access is refused; the password never appears in ``repr``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fedct import envfile

#: The settings a site env file may hold for its PACS (other keys in the file belong to other parts of the site).
ENV_KEYS = {
    "FEDCT_PACS_URL": "http(s)://host[:port]/dicom-web (DICOMweb) or dicom://CALLED_AET@host:port (DIMSE)",
    "FEDCT_PACS_USER": "HTTP basic-auth user (DICOMweb only)",
    "FEDCT_PACS_PASSWORD_FILE": "file holding the password, one line (relative paths: to the env file's folder)",
    "FEDCT_PACS_AET": "this site's calling AE title for DIMSE (default FEDCT); the PACS must know it",
    "FEDCT_PACS_MODALITY": "modality of the series to pull (default CT)",
    "FEDCT_PACS_STUDY_DATE": "optional study date or range, DICOM style: 20240101-20241231, 20240101-, -20241231",
    "FEDCT_PACS_CA_FILE": "CA bundle (PEM) to verify an https PACS",
    "FEDCT_PACS_MOVE_PORT": "DIMSE: retrieve with C-MOVE to a storage SCP of this site on this port (default: C-GET)",
    "FEDCT_PACS_LISTEN_ADDRESS": "DIMSE C-MOVE: the interface the storage SCP listens on (default 127.0.0.1; the address "
    "the PACS reaches this host at, never all interfaces unless set to 0.0.0.0)",
    "FEDCT_PACS_ALLOW_PLAIN_HTTP": "yes to allow basic auth over plain http:// (the password travels readable; default: refused)",
    "FEDCT_PACS_TLS_CA": "DIMSE over TLS: CA bundle (PEM) that signed the PACS's certificate (setting it turns TLS on)",
    "FEDCT_PACS_TLS_CERT": "DIMSE over TLS: this site's certificate (PEM), if the PACS asks for one; also the C-MOVE SCP's",
    "FEDCT_PACS_TLS_KEY": "DIMSE over TLS: the private key (PEM) of FEDCT_PACS_TLS_CERT (keep it mode 0600)",
    "FEDCT_PACS_TIMEOUT_S": "network timeout per request in seconds (default 60)",
    "FEDCT_PACS_RETRIES": "retries of a failed request on transient errors (default 4)",
    "FEDCT_PACS_BACKOFF_S": "first retry delay in seconds, doubled each retry (default 1)",
}
#: HTTP statuses worth retrying: too many requests and server-side failures.
_DATE_RANGE = re.compile(r"^(\d{8})?(-(\d{8})?)?$")


class PacsError(RuntimeError):
    """The PACS could not be used; the message names the PACS and what to check."""


@dataclass(frozen=True)
class PacsSettings:
    """How this site reaches its PACS (read from the site env file by :func:`read_pacs_settings`)."""

    url: str
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    calling_aet: str = "FEDCT"
    modality: str = "CT"
    study_date: str | None = None
    ca_file: Path | None = None
    timeout_s: float = 60.0
    retries: int = 4
    backoff_s: float = 1.0
    move_port: int | None = None
    env_file: Path | None = None
    listen_address: str = "127.0.0.1"
    allow_plain_http: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def __post_init__(self) -> None:
        point = endpoint(self.url)  # validates the URL (scheme, no credentials in it)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(
                f"{self._where()}: FEDCT_PACS_TLS_CERT and FEDCT_PACS_TLS_KEY go together (set both or neither)"
            )
        if self.tls_cert is not None and self.tls_ca is None:
            raise ValueError(
                f"{self._where()}: FEDCT_PACS_TLS_CERT needs FEDCT_PACS_TLS_CA (the CA that signed the PACS)"
            )
        if self.tls_ca is not None and point.kind != "dimse":
            raise ValueError(
                f"{self._where()}: FEDCT_PACS_TLS_CA is for DIMSE (dicom://); an https PACS uses FEDCT_PACS_CA_FILE"
            )
        if self.tls_ca is not None and self.move_port is not None and self.tls_cert is None:
            raise ValueError(
                f"{self._where()}: C-MOVE over TLS (FEDCT_PACS_MOVE_PORT with FEDCT_PACS_TLS_CA) needs this site's "
                f"FEDCT_PACS_TLS_CERT and FEDCT_PACS_TLS_KEY for its storage SCP"
            )
        try:
            ipaddress.ip_address(self.listen_address)
        except ValueError as exc:
            raise ValueError(
                f"{self._where()}: FEDCT_PACS_LISTEN_ADDRESS={self.listen_address!r} is not an IP address "
                f"(the interface the PACS reaches this host at)"
            ) from exc
        if (self.user is None) != (self.password is None):
            raise ValueError(
                f"{self._where()}: FEDCT_PACS_USER and FEDCT_PACS_PASSWORD_FILE go together (set both or neither)"
            )
        if self.user is not None and self.url.lower().startswith("http://") and not self.allow_plain_http:
            raise ValueError(
                f"{self._where()}: basic auth (FEDCT_PACS_USER) over plain http:// would send the password "
                f"readable to anyone on the network: use https:// (FEDCT_PACS_CA_FILE), or set "
                f"FEDCT_PACS_ALLOW_PLAIN_HTTP=yes if this link is protected otherwise"
            )
        if not re.fullmatch(r"[\x20-\x5b\x5d-\x7e]{1,16}", self.calling_aet) or not self.calling_aet.strip():
            raise ValueError(
                f"{self._where()}: FEDCT_PACS_AET={self.calling_aet!r} is not an AE title (1-16 characters, no backslash)"
            )
        if not re.fullmatch(r"[A-Z]{2}", self.modality):
            raise ValueError(
                f"{self._where()}: FEDCT_PACS_MODALITY={self.modality!r} is not a DICOM modality code (e.g. CT)"
            )
        if self.study_date is not None and not (_DATE_RANGE.fullmatch(self.study_date) and self.study_date.strip("-")):
            raise ValueError(
                f"{self._where()}: FEDCT_PACS_STUDY_DATE={self.study_date!r} is not a date or range (YYYYMMDD-YYYYMMDD)"
            )
        if self.move_port is not None and not 0 < self.move_port < 65536:
            raise ValueError(f"{self._where()}: FEDCT_PACS_MOVE_PORT={self.move_port} is not a TCP port")
        if self.timeout_s <= 0 or self.retries < 0 or self.backoff_s < 0:
            raise ValueError(
                f"{self._where()}: FEDCT_PACS_TIMEOUT_S must be > 0, FEDCT_PACS_RETRIES and FEDCT_PACS_BACKOFF_S >= 0"
            )

    def _where(self) -> str:
        return f"PACS settings ({self.env_file})" if self.env_file else "PACS settings"

    @property
    def credentials_hint(self) -> str:
        """Where the credentials of this PACS are set, for error messages."""
        where = f" in {self.env_file}" if self.env_file else " (no site env file was given: --pacs-env FILE)"
        return f"FEDCT_PACS_USER and FEDCT_PACS_PASSWORD_FILE{where}"


@dataclass(frozen=True)
class Endpoint:
    """A parsed PACS URL: ``dicomweb`` (``url``) or ``dimse`` (``called_aet``, ``host``, ``port``)."""

    kind: str
    url: str
    host: str
    port: int
    called_aet: str = ""


def endpoint(url: str) -> Endpoint:
    """Parse a PACS URL; refuse credentials in it (they belong in the site env file) and unknown schemes."""
    parts = urlsplit(url)
    try:
        _ = parts.port  # urllib checks the port only when it is read
    except ValueError as exc:
        raise ValueError(f"PACS URL {url!r}: the port is not a number from 1 to 65535") from exc
    if parts.password is not None or (parts.scheme in ("http", "https") and parts.username is not None):
        raise ValueError(
            "PACS URL must not contain credentials (command lines and logs are readable by others): "
            "put them in the site env file (FEDCT_PACS_USER, FEDCT_PACS_PASSWORD_FILE)"
        )
    if parts.scheme in ("http", "https"):
        if not parts.hostname:
            raise ValueError(f"PACS URL {url!r} has no host")
        return Endpoint(
            "dicomweb", url.rstrip("/"), parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
        )
    if parts.scheme == "dicom":
        if not parts.username or not parts.hostname or parts.port is None:
            raise ValueError(f"PACS URL {url!r}: a DIMSE PACS is dicom://CALLED_AET@host:port")
        return Endpoint("dimse", url, parts.hostname, parts.port, called_aet=parts.username)
    raise ValueError(
        f"PACS URL {url!r}: use http(s)://host/dicom-web (DICOMweb) or dicom://CALLED_AET@host:port (DIMSE)"
    )


def read_pacs_settings(env_file: Path | None, *, url: str | None = None) -> PacsSettings:
    """PACS settings from the site env file; ``url`` (from ``--pacs``/``--push``) overrides FEDCT_PACS_URL.

    Unknown ``FEDCT_PACS_*`` keys are refused (a typo would silently drop a setting); other keys are ignored.
    """
    lines = envfile.read_env_lines(env_file) if env_file is not None else {}
    values = {key: (setting.value, setting.line) for key, setting in lines.items()}
    for key, (_, number) in values.items():
        if key.startswith("FEDCT_PACS_") and key not in ENV_KEYS:
            raise ValueError(f"{env_file}: line {number}: unknown setting {key} (known: {', '.join(ENV_KEYS)})")

    def get(key: str) -> str | None:
        value = values.get(key, ("", 0))[0].strip()
        return value or None

    def number(key: str, kind: type, default: float | None) -> Any:
        text = get(key)
        if text is None:
            return default
        try:
            return kind(text)
        except ValueError as exc:
            raise ValueError(f"{env_file}: line {values[key][1]}: {key}={text!r} is not a {kind.__name__}") from exc

    url = url or get("FEDCT_PACS_URL")
    if not url:
        raise ValueError(
            f"no PACS URL: give it after --pacs/--push or as FEDCT_PACS_URL in the site env file ({env_file})"
        )
    base = Path(env_file).parent if env_file is not None else Path.cwd()
    password = None
    password_file = get("FEDCT_PACS_PASSWORD_FILE")
    if password_file is not None:
        secret = base / password_file
        try:
            mode = secret.stat().st_mode
            password = next(iter(secret.read_text(encoding="utf-8").splitlines()), "")
        except OSError as exc:
            raise ValueError(f"{env_file}: FEDCT_PACS_PASSWORD_FILE: cannot read {secret}: {exc.strerror}") from exc
        if mode & 0o077:
            raise ValueError(
                f"{env_file}: FEDCT_PACS_PASSWORD_FILE: {secret} may be read by group or others "
                f"(mode {mode & 0o777:04o}); make it private: chmod 600 {secret}"
            )
    allow = (get("FEDCT_PACS_ALLOW_PLAIN_HTTP") or "no").lower()
    if allow not in ("yes", "no"):
        raise ValueError(
            f"{env_file}: line {values['FEDCT_PACS_ALLOW_PLAIN_HTTP'][1]}: FEDCT_PACS_ALLOW_PLAIN_HTTP={allow!r} "
            f"must be yes or no"
        )
    tls: dict[str, Path | None] = {}
    for key in ("FEDCT_PACS_TLS_CA", "FEDCT_PACS_TLS_CERT", "FEDCT_PACS_TLS_KEY"):
        text = get(key)
        tls[key] = base / text if text else None
        if tls[key] is not None and not tls[key].is_file():
            raise ValueError(f"{env_file}: {key}: {tls[key]} does not exist")
    ca_file = get("FEDCT_PACS_CA_FILE")
    if ca_file is not None and not (base / ca_file).is_file():
        raise ValueError(f"{env_file}: FEDCT_PACS_CA_FILE: {base / ca_file} does not exist")
    return PacsSettings(
        url=url,
        user=get("FEDCT_PACS_USER"),
        password=password,
        calling_aet=get("FEDCT_PACS_AET") or "FEDCT",
        modality=(get("FEDCT_PACS_MODALITY") or "CT").upper(),
        study_date=get("FEDCT_PACS_STUDY_DATE"),
        ca_file=base / ca_file if ca_file else None,
        timeout_s=number("FEDCT_PACS_TIMEOUT_S", float, 60.0),
        retries=number("FEDCT_PACS_RETRIES", int, 4),
        backoff_s=number("FEDCT_PACS_BACKOFF_S", float, 1.0),
        move_port=number("FEDCT_PACS_MOVE_PORT", int, None),
        env_file=Path(env_file) if env_file is not None else None,
        listen_address=get("FEDCT_PACS_LISTEN_ADDRESS") or "127.0.0.1",
        allow_plain_http=allow == "yes",
        tls_ca=tls["FEDCT_PACS_TLS_CA"],
        tls_cert=tls["FEDCT_PACS_TLS_CERT"],
        tls_key=tls["FEDCT_PACS_TLS_KEY"],
    )
