"""fedct certs: CA, SuperLink certificate with SANs, per-site SuperNode keys in OpenSSH format (made at the site by
fedct site-key; by the coordinator only with --with-site-keys), private file modes."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key, load_ssh_public_key

from fedct.certs import CertsError, write_consortium, write_site_key
from fedct.cli import main


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_writes_ca_server_certificate_and_site_keys_with_private_modes(tmp_path):
    files = write_consortium(tmp_path / "pki", sites=["site-a", "site-b"], with_site_keys=True)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    key = load_pem_private_key(files.server_key.read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    for private in (files.ca_key, files.server_key, *files.site_keys.values()):
        assert _mode(private) == 0o600, private
        assert _mode(private.parent) == 0o700, private.parent
    for name in ("site-a", "site-b"):
        site_key = load_ssh_private_key(files.site_keys[name].read_bytes(), None)  # what flower-supernode loads
        assert isinstance(site_key, ec.EllipticCurvePrivateKey)
        public = load_ssh_public_key(files.site_public_keys[name].read_bytes())
        assert public.public_numbers() == site_key.public_key().public_numbers()
        assert files.site_public_keys[name].read_text().startswith("ecdsa-sha2-nistp384 ")
        assert (tmp_path / "pki" / "sites" / name / "ca.crt").read_bytes() == files.ca_cert.read_bytes()
    assert files.site_keys["site-a"].read_bytes() != files.site_keys["site-b"].read_bytes()


def test_custom_sans_and_new_sites_reuse_the_ca(tmp_path):
    first = write_consortium(tmp_path, sites=["a"], sans=("fl.example.org", "10.0.0.5"), with_site_keys=True)
    sans = (
        x509.load_pem_x509_certificate(first.server_cert.read_bytes())
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    # the names asked for, plus loopback (the coordinator's CLI and the proxy reach the SuperLink on 127.0.0.1)
    assert sans.get_values_for_type(x509.DNSName) == ["fl.example.org", "localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("127.0.0.1"),
    ]
    ca_before = first.ca_cert.read_bytes()
    second = write_consortium(tmp_path, sites=["b"], with_site_keys=True)
    assert second.ca_cert.read_bytes() == ca_before
    assert set(second.site_keys) == {"b"}


@pytest.mark.parametrize(
    ("sites", "sans", "message"),
    [
        (["../evil"], ("localhost",), "site name"),
        (["a", "a"], ("localhost",), "duplicate"),
        (["a"], ("bad name!",), "SAN"),
        (["a"], (), "at least one SAN"),
    ],
)
def test_bad_requests_are_refused_with_the_reason(tmp_path, sites, sans, message):
    with pytest.raises(CertsError, match=message):
        write_consortium(tmp_path, sites=sites, sans=sans, with_site_keys=True)


def test_existing_site_key_is_never_overwritten(tmp_path):
    files = write_consortium(tmp_path, sites=["a"], with_site_keys=True)
    before = files.site_keys["a"].read_bytes()
    with pytest.raises(CertsError, match="overwrite"):
        write_consortium(tmp_path, sites=["a"], with_site_keys=True)
    assert files.site_keys["a"].read_bytes() == before


def test_coordinator_writes_no_site_private_keys_unless_asked(tmp_path, capsys):
    files = write_consortium(tmp_path / "pki")
    assert files.site_keys == {} and not (tmp_path / "pki" / "sites").exists()
    assert files.server_cert.is_file() and files.ca_key.is_file()
    with pytest.raises(CertsError, match="made at each site"):
        write_consortium(tmp_path / "pki2", sites=["a"])
    assert main(["certs", "--out", str(tmp_path / "cli"), "--san", "fl.example.org"]) == 0
    out = capsys.readouterr().out
    assert "fedct site-key" in out and not (tmp_path / "cli" / "sites").exists()
    assert main(["certs", "--out", str(tmp_path / "cli2"), "--sites", "x"]) == 2
    assert "made at each site" in capsys.readouterr().err
    assert main(["certs", "--out", str(tmp_path / "cli3"), "--with-site-keys"]) == 2
    assert "--with-site-keys needs --sites" in capsys.readouterr().err


def test_site_key_is_made_at_the_site_private_and_never_overwritten(tmp_path, capsys):
    key_path = tmp_path / "site" / "pki" / "site.key"
    assert main(["site-key", "--out", str(key_path)]) == 0
    out = capsys.readouterr().out
    public_line = (tmp_path / "site" / "pki" / "site.pub").read_text().strip()
    assert public_line.startswith("ecdsa-sha2-nistp384 ") and public_line in out.splitlines()  # the line to send
    assert _mode(key_path) == 0o600 and _mode(key_path.parent) == 0o700
    private = load_ssh_private_key(key_path.read_bytes(), None)  # what flower-supernode loads
    assert load_ssh_public_key(public_line.encode()).public_numbers() == private.public_key().public_numbers()
    before = key_path.read_bytes()
    assert main(["site-key", "--out", str(key_path)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert key_path.read_bytes() == before
    # an existing folder keeps its mode (the site may keep the key next to other files); a stray .pub blocks too
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    (shared / "other.pub").write_text("x")
    with pytest.raises(CertsError, match="other.pub"):
        write_site_key(shared / "other.key")
    assert not (shared / "other.key").exists()
    public_path, line = write_site_key(shared / "site.key")
    assert _mode(shared) == 0o755 and _mode(shared / "site.key") == 0o600 and public_path.read_text().strip() == line


def test_cli(tmp_path, capsys):
    assert (
        main(["certs", "--out", str(tmp_path / "pki"), "--sites", "x,y", "--with-site-keys", "--san", "localhost"]) == 0
    )
    assert (tmp_path / "pki" / "sites" / "y" / "site.key").is_file()
    assert "keep offline" in capsys.readouterr().out
    assert main(["certs", "--out", str(tmp_path / "pki"), "--sites", "x", "--with-site-keys"]) == 2
    assert "overwrite" in capsys.readouterr().err
