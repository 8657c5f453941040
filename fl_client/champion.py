"""The consortium's champion at a site: the promoted bundle the coordinator sends through the federation, checked and
stored under the site's work folder, and the pointer ``fedct predict`` follows by default.

Layout (``SITE_DIR/models``)::

    models/v0003/     model.pt, model.json, registry.json (version, content SHA-256, lineage) as the registry holds it
    models/champion   the current champion's version (one line), replaced atomically

A bundle is stored only when its files hash to the SHA-256 the message names *and* to the one its ``registry.json``
records, and when it loads with this site's fedct (``models.bundle.load_bundle``: format, pipeline version,
architecture). Plain Python and torch, no flwr: ``fl_client.client_app`` converts the message.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

from fedct.files import atomic_write_bytes
from models.registry import HASHED_FILES, STAMP_NAME, VERSION_PATTERN, RegistryError, bundle_content_hash, read_stamp

__all__ = [
    "CHAMPION_FILES",
    "CHAMPION_POINTER",
    "MODELS_DIR",
    "ChampionRefused",
    "champion_summary",
    "site_champion",
    "store_champion",
]

MODELS_DIR = "models"
CHAMPION_POINTER = "champion"
#: The files a champion message carries (the content hash covers the first two).
CHAMPION_FILES = (*HASHED_FILES, STAMP_NAME)


class ChampionRefused(ValueError):
    """A champion bundle that does not verify (hash, registry record, or it does not load here); nothing is stored.
    Reason code ``bad_weights`` when it leaves the site."""

    code = "bad_weights"


def store_champion(site_dir: Path, *, version: str, content_sha256: str, files: Mapping[str, bytes]) -> Path:
    """Verify a champion bundle and store it as ``SITE_DIR/models/<version>``, then point ``models/champion`` at it;
    return its folder. :class:`ChampionRefused` naming the reason (the earlier champion stays in use)."""
    if not VERSION_PATTERN.fullmatch(version):
        raise ChampionRefused(f"champion version {version!r} is not a registry version (v0001, v0002, ...)")
    if sorted(files) != sorted(CHAMPION_FILES):
        raise ChampionRefused(f"a champion message carries {', '.join(CHAMPION_FILES)}, got {', '.join(sorted(files))}")
    root = Path(site_dir) / MODELS_DIR
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{version}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name in CHAMPION_FILES:
            (tmp / name).write_bytes(bytes(files[name]))
        actual = bundle_content_hash(tmp)
        if actual != content_sha256:
            raise ChampionRefused(f"champion {version}: the files hash to {actual}, the message says {content_sha256}")
        try:
            stamp = read_stamp(tmp, verify=True)
        except RegistryError as exc:
            raise ChampionRefused(f"champion {version}: {exc}") from None
        if stamp is None or stamp.get("version") != version:
            raise ChampionRefused(f"champion {version}: its registry record names {(stamp or {}).get('version')!r}")
        from models.bundle import BundleError, load_bundle  # torch only when a champion arrives

        try:
            load_bundle(tmp)
        except BundleError as exc:
            raise ChampionRefused(f"champion {version} cannot be used by this site's fedct: {exc}") from None
        folder = root / version
        if folder.is_dir():  # the same version again (every run sends the champion): keep the verified copy
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_bytes(root / CHAMPION_POINTER, (version + "\n").encode())
    return folder


def site_champion(site_dir: Path) -> Path:
    """The bundle folder of the site's current champion (its content hash checked); FileNotFoundError when the site
    has received none, RegistryError when its files no longer match."""
    root = Path(site_dir) / MODELS_DIR
    pointer = root / CHAMPION_POINTER
    if not pointer.is_file():
        raise FileNotFoundError(
            f"{site_dir}: no champion received yet ({pointer} is missing); the coordinator sends the promoted model "
            "at the start of the next run, or give --model"
        )
    version = pointer.read_text().strip()
    if not VERSION_PATTERN.fullmatch(version) or not (root / version).is_dir():
        raise FileNotFoundError(f"{pointer} names {version!r}, which is not a stored version under {root}")
    read_stamp(root / version, verify=True)
    return root / version


def champion_summary(folder: Path) -> dict[str, str]:
    """``{"version", "content-sha256"}`` of a stored champion (for the reply: numbers and names only)."""
    stamp = json.loads((Path(folder) / STAMP_NAME).read_text())
    return {"version": str(stamp["version"]), "content-sha256": str(stamp["content_sha256"])}
