"""De-identification: stable pseudonyms from a per-site secret key.

Patient and study identifiers never leave the site; everything the federation sees (metrics keys, logs,
file names in exported artefacts) uses these pseudonyms. A keyed HMAC makes them stable across re-runs
at the same site but impossible to link back without the site's key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEY_FILE_NAME = "site.key"


def load_or_create_site_key(site_dir: Path) -> bytes:
    """Return the site's secret key, creating it (mode 0600) on first use.

    Creation is atomic: the key is written and fsynced under a temporary name in the same folder, then published
    with ``os.link`` (fails if ``site.key`` exists), so a crash leaves no empty or partial ``site.key`` and two
    processes creating it at once end up with the same key (the loser reads the winner's). An existing key shorter
    than 32 bytes (e.g. left empty by an older version that crashed) is an error naming the file, never reused.
    """
    path = Path(site_dir) / KEY_FILE_NAME
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{KEY_FILE_NAME}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(32))
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)  # atomic, and never replaces a key another process published first
            except FileExistsError:
                pass
            else:
                _fsync_dir(path.parent)
        finally:
            tmp.unlink(missing_ok=True)
    key = path.read_bytes()
    if len(key) < 32:
        raise ValueError(
            f"site key {path} is {len(key)} bytes long, shorter than 32 bytes (a crash while it was written?); "
            "delete it to make a new one (pseudonyms change)"
        )
    return key


def _fsync_dir(folder: Path) -> None:
    """Make a new directory entry durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Pseudonymizer:
    """Maps identifiers (PatientID, StudyInstanceUID, ...) to short keyed pseudonyms."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError(f"pseudonymisation key must be at least 32 bytes, got {len(key)}")
        self._key = key

    def __call__(self, kind: str, value: str) -> str:
        """Pseudonym such as ``study-3f9a0c1b2d4e`` for ``kind='study'``."""
        if not kind.isidentifier():
            raise ValueError(f"pseudonym kind must be a short identifier, got {kind!r}")
        digest = hmac.new(self._key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()
        return f"{kind}-{digest[:12]}"
