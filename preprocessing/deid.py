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
    """Return the site's secret key, creating it (mode 0600) on first use."""
    path = Path(site_dir) / KEY_FILE_NAME
    if path.exists():
        key = path.read_bytes()
        if len(key) < 32:
            raise ValueError(f"site key {path} is shorter than 32 bytes; delete it to make a new one (pseudonyms change)")
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
    return key


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
