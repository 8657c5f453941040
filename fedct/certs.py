"""Security material of a consortium: ``fedct certs`` (coordinator) and ``fedct site-key`` (each hospital).

``fedct certs --out DIR [--san fl.consortium.example]`` (run by whoever holds the consortium CA) writes::

    ca/ca.crt            the consortium CA certificate (public: every site and the server get it)
    ca/ca.key            the CA private key (0600; stays with whoever runs the CA, offline)
    server/server.crt    the SuperLink's TLS certificate, signed by the CA, with the SANs asked for plus
                         localhost and 127.0.0.1 (the coordinator's own tools reach the SuperLink on loopback)
    server/server.key    its private key (0600; stays on the SuperLink host)
    server/ca.crt        copy of the CA certificate (the SuperLink needs it too)

Site private keys are made at the site: ``fedct site-key --out /site/pki/site.key`` writes the SuperNode
authentication key pair (EC P-384, OpenSSH format; private key 0600, ``site.pub`` next to it) and prints the
public key line the hospital sends to the coordinator, who puts it in ``FEDCT_SITE_KEYS/<name>.pub``. The
coordinator never holds a site's private key.

Only tests and the demo, which play every hospital on one machine, ask ``fedct certs`` for the sites' keys
too (``--sites a,b --with-site-keys``)::

    sites/<name>/site.key  the site's SuperNode authentication key (0600)
    sites/<name>/site.pub  its public key (OpenSSH line; goes to the server, which registers it)
    sites/<name>/ca.crt    copy of the CA certificate for the site

Folders holding private keys are 0700. Nothing is overwritten: an existing file is an error, so re-running
cannot silently replace a key that sites already use (``--sites`` may name new sites only).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_SANS = ("localhost", "127.0.0.1")
#: SANs every server certificate gets: the coordinator's CLI and the proxy reach the SuperLink on loopback.
LOOPBACK_SANS = ("localhost", "127.0.0.1")
CA_DAYS = 3650
SERVER_DAYS = 825


class CertsError(ValueError):
    """Bad certificate request (name, SAN, existing file); the message says which."""


@dataclass(frozen=True)
class ConsortiumFiles:
    """Paths written by :func:`write_consortium`."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    site_keys: dict[str, Path]
    site_public_keys: dict[str, Path]


def _check_site_name(name: str) -> str:
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise CertsError(f"site name {name!r} must be letters, digits, '-', '_' or '.' (it becomes a folder name)")
    return name


def _san(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    labels = value.split(".")
    if not value or any(not label or not all(c.isalnum() or c == "-" for c in label) for label in labels):
        raise CertsError(f"SAN {value!r} is neither an IP address nor a DNS name")
    return x509.DNSName(value)


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 (never world- or group-readable, not even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("xb") as fh:
        fh.write(data)
    os.chmod(path, 0o644)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedct consortium"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _make_ca(now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = _name("fedct consortium CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _make_server(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, sans: Sequence[str], now: dt.datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(sans[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName([_san(s) for s in sans]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def site_key_pair() -> tuple[bytes, bytes]:
    """A new SuperNode authentication key: (OpenSSH private key, OpenSSH public key line)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def write_site_key(path: Path) -> tuple[Path, str]:
    """Make a site's SuperNode key pair at the site: ``path`` (private, created with O_EXCL and mode 0600; a missing
    folder is made 0700) and ``path`` with suffix ``.pub``; returns (public key file, public key line). Never
    overwrites either file."""
    path = Path(path)
    public_path = path.with_suffix(".pub")
    for existing in (path, public_path):
        if existing.exists():
            raise CertsError(
                f"refusing to overwrite existing {existing}; this site already has a key (its public key "
                f"is {public_path}); move it away first only if the coordinator will register a new one"
            )
    private, public = site_key_pair()
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # 0600 from the start, never an existing file
    with os.fdopen(fd, "wb") as fh:
        fh.write(private)
    try:
        _write_public(public_path, public)
    except OSError:
        path.unlink()
        raise
    return public_path, public.decode("ascii").strip()


def write_consortium(
    out: Path, *, sites: Sequence[str] = (), sans: Sequence[str] = DEFAULT_SANS, with_site_keys: bool = False
) -> ConsortiumFiles:
    """Write the CA (created once, reused when ``out/ca`` exists) and the server certificate; with
    ``with_site_keys`` (tests, the demo) also a key pair per site in ``sites``, else ``sites`` must be empty."""
    if sites and not with_site_keys:
        raise CertsError(
            "site private keys are made at each site (`fedct site-key --out site.key`), not by the "
            "coordinator; pass --with-site-keys only to play every site on this machine (tests, demo)"
        )
    sites = [_check_site_name(s) for s in sites]
    if len(set(sites)) != len(sites):
        raise CertsError(f"duplicate site name in {', '.join(sites)}")
    if not sans:
        raise CertsError("at least one SAN is needed for the server certificate")
    for s in sans:
        _san(s)
    sans = list(dict.fromkeys([*sans, *LOOPBACK_SANS]))
    out = Path(out)
    ca_cert_path, ca_key_path = out / "ca" / "ca.crt", out / "ca" / "ca.key"
    server_cert_path, server_key_path = out / "server" / "server.crt", out / "server" / "server.key"
    site_dirs = {s: out / "sites" / s for s in sites}
    clashes = [str(p / "site.key") for p in site_dirs.values() if (p / "site.key").exists()]
    if clashes:
        raise CertsError(f"refusing to overwrite existing site key(s): {', '.join(clashes)}")
    now = dt.datetime.now(dt.UTC)
    if ca_cert_path.exists() != ca_key_path.exists():
        raise CertsError(f"{out / 'ca'} holds only one of ca.crt and ca.key; restore both or remove the folder")
    if ca_cert_path.exists():
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
            raise CertsError(f"{ca_key_path} is not an EC private key")
    else:
        ca_key, ca_cert = _make_ca(now)
        _write_private(
            ca_key_path,
            ca_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
        _write_public(ca_cert_path, ca_cert.public_bytes(serialization.Encoding.PEM))
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    if not server_cert_path.exists():
        server_key, server_cert = _make_server(ca_key, ca_cert, list(sans), now)
        _write_private(
            server_key_path,
            server_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
        _write_public(server_cert_path, server_cert.public_bytes(serialization.Encoding.PEM))
        _write_public(out / "server" / "ca.crt", ca_pem)
    keys, pubs = {}, {}
    for name, folder in site_dirs.items():
        private, public = site_key_pair()
        _write_private(folder / "site.key", private)
        _write_public(folder / "site.pub", public)
        if not (folder / "ca.crt").exists():
            _write_public(folder / "ca.crt", ca_pem)
        keys[name], pubs[name] = folder / "site.key", folder / "site.pub"
    return ConsortiumFiles(
        ca_cert=ca_cert_path,
        ca_key=ca_key_path,
        server_cert=server_cert_path,
        server_key=server_key_path,
        site_keys=keys,
        site_public_keys=pubs,
    )


def site_key_command(args: argparse.Namespace) -> int:
    """``fedct site-key``: make this site's key pair, print the public key line to send."""
    try:
        public_path, line = write_site_key(Path(args.out))
    except (CertsError, OSError) as exc:
        print(f"fedct site-key: error: {exc}", file=sys.stderr)
        return 2
    print(f"private key: {Path(args.out)}  (0600; stays at this site: FEDCT_SITE_KEY in site.env)")
    print(f"public key:  {public_path}  (send this line to the coordinator, who registers it as <site name>.pub):")
    print(line)
    return 0


def certs_command(args: argparse.Namespace) -> int:
    """``fedct certs``: the consortium's CA and server certificate (site keys only with ``--with-site-keys``)."""
    sites = [s.strip() for s in (args.sites or "").split(",") if s.strip()]
    if args.with_site_keys and not sites:
        print("fedct certs: error: --with-site-keys needs --sites NAME[,NAME...]", file=sys.stderr)
        return 2
    try:
        files = write_consortium(
            Path(args.out), sites=sites, sans=tuple(args.san or DEFAULT_SANS), with_site_keys=args.with_site_keys
        )
    except (CertsError, OSError) as exc:
        print(f"fedct certs: error: {exc}", file=sys.stderr)
        return 2
    print(f"CA certificate:     {files.ca_cert}  (give to the server and every site)")
    print(f"CA private key:     {files.ca_key}  (keep offline)")
    print(f"server certificate: {files.server_cert} + {files.server_key}  (SuperLink host only)")
    if not files.site_keys:
        print(
            "site keys:          each site runs `fedct site-key --out site.key` and sends you site.pub "
            "(put it in FEDCT_SITE_KEYS as <site name>.pub)"
        )
    for name in files.site_keys:
        print(
            f"{name}: private key {files.site_keys[name]} (site only), public key {files.site_public_keys[name]} (to the server)"
        )
    return 0
