"""Only approved code runs at a site: an allow-list of app (FAB) hashes, checked before the app is unpacked.

Why not Flower's ``--trusted-entities``: in Flower 1.41 a SuperNode with trusted entities accepts only FABs whose
``verifications`` carry a ``valid_license`` plus an Ed25519 signature; the SuperLink fills those in only for apps
fetched from the online Flower Hub (``control_handlers._get_remote_fab``). A FAB submitted with ``flwr run <dir>``
gets empty verifications, so every run of a consortium's own app would be refused ("App verification is not
supported by the connected SuperLink") — and our machines are offline. So the site keeps its own allow-list.

Why not a client mod inside the app: the mod would be part of the code being checked (the FAB carries the whole
app); a server sending other code would simply leave it out. The check must run in code the site installed.

How it works: ``fedct site`` starts the SuperNode with a directory first on ``PATH`` that holds a
``flwr-clientapp`` launcher (:func:`install_gate`). Flower's SuperExec starts that launcher for every message; it
runs Flower's own ``flwr-clientapp`` with one change: before the FAB is unpacked, the SHA-256 of the FAB bytes
(the hash ``flwr run`` and the SuperLink use) must be in the site's allow-list (:func:`load_allow_list`). If not,
the launcher logs one ``REFUSED`` line and the message is answered with an error; no file of the app is written
and no app code is imported. The allow-list file holds one hash per line (``# comments`` allowed); hospital IT
adds an app after reviewing its source with ``fedct site --env site.env --approve APP_DIR``, which builds the FAB
exactly as ``flwr run APP_DIR`` does and appends its hash.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import stat
import sys
from pathlib import Path

#: Environment variable naming the allow-list file for the launcher (set by ``fedct site``; "off" disables).
ALLOW_LIST_ENV = "FEDCT_APPROVED_APPS"
GATE_NAME = "flwr-clientapp"

log = logging.getLogger("fedct.approval")


class AppNotApprovedError(RuntimeError):
    """The app's FAB hash is not in the site's allow-list."""


def fab_bytes_of(app_dir: Path) -> bytes:
    """The FAB that ``flwr run APP_DIR`` would submit (Flower's own builder; deterministic)."""
    from flwr.cli.build import build_fab_from_disk

    app_dir = Path(app_dir)
    if not (app_dir / "pyproject.toml").is_file():
        raise ValueError(f"{app_dir} is not a Flower app folder (no pyproject.toml)")
    return build_fab_from_disk(app_dir)


def app_hash(app_dir: Path) -> str:
    """SHA-256 (hex) of the app's FAB: the identity the SuperLink records for a run."""
    return hashlib.sha256(fab_bytes_of(app_dir)).hexdigest()


def load_allow_list(path: Path) -> frozenset[str]:
    """Approved hashes in ``path`` (missing file: none approved); a malformed line is an error naming it."""
    path = Path(path)
    if not path.exists():
        return frozenset()
    hashes = set()
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if len(line) != 64 or any(c not in "0123456789abcdef" for c in line.lower()):
            raise ValueError(f"{path}:{number}: expected a 64-hex-digit SHA-256 app hash, got {line!r}")
        hashes.add(line.lower())
    return frozenset(hashes)


def approve(app_dir: Path, allow_list: Path, *, note: str = "") -> str:
    """Append ``app_dir``'s hash to ``allow_list`` (created 0644 if missing); returns the hash."""
    digest = app_hash(app_dir)
    if digest in load_allow_list(allow_list):
        return digest
    from flwr.cli.config_utils import get_fab_metadata

    fab_id, version = get_fab_metadata(fab_bytes_of(app_dir))
    allow_list = Path(allow_list)
    allow_list.parent.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
    with allow_list.open("a", encoding="utf-8") as fh:
        fh.write(f"{digest}  # {fab_id} {version}, approved {stamp}{' ' + note if note else ''}\n")
    return digest


def check_fab(fab_content: bytes, allow_list: Path | None) -> str:
    """Raise :class:`AppNotApprovedError` unless the FAB's hash is approved (``allow_list`` None: check off)."""
    digest = hashlib.sha256(fab_content).hexdigest()
    if allow_list is None:
        return digest
    approved = load_allow_list(allow_list)
    if digest not in approved:
        try:
            from flwr.cli.config_utils import get_fab_metadata

            fab_id, version = get_fab_metadata(fab_content)
            what = f"app {fab_id} {version}"
        except Exception:  # noqa: BLE001 - a malformed FAB is refused all the same
            what = "app"
        raise AppNotApprovedError(
            f"fedct: REFUSED {what} (FAB sha256 {digest}): not in this site's allow-list {allow_list} "
            f"({len(approved)} approved app(s)); review the app and run `fedct site --env <site.env> --approve <app dir>`"
        )
    return digest


def allow_list_from_env() -> Path | None:
    """The allow-list the launcher enforces; refusing everything when the variable is missing (fail closed)."""
    return allow_list_from_value(os.environ.get(ALLOW_LIST_ENV, ""))


def allow_list_from_value(value: str) -> Path | None:
    """An allow-list setting (a file, "off", or "" for none configured: refuse everything) as the path to check."""
    if value.lower() == "off":
        return None
    if not value:
        return Path("/nonexistent/fedct-approved-apps.txt")  # no list configured: nothing is approved
    return Path(value)


def gate_fab_install(allow_list: Path | None) -> None:
    """In this process, make Flower's ClientApp runtime check the FAB against ``allow_list`` before unpacking it.

    Used by the ``flwr-clientapp`` launcher and by the warm executor's children (:mod:`fl_client.executor`),
    so both ways a site runs a task enforce the same allow-list.
    """
    import flwr.supernode.runtime.run_clientapp as runtime

    install = runtime.install_from_fab

    def checked_install(fab_content: bytes, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - Flower's signature
        try:
            digest = check_fab(fab_content, allow_list)
        except AppNotApprovedError as exc:
            print(str(exc), file=sys.stderr, flush=True)
            raise
        print(f"fedct: app FAB sha256 {digest} is approved at this site" if allow_list else
              f"fedct: app approval is OFF at this site (FAB sha256 {digest})", file=sys.stderr, flush=True)  # fmt: skip
        return install(fab_content, *args, **kwargs)

    runtime.install_from_fab = checked_install


def gated_clientapp_main() -> None:
    """``flwr-clientapp`` with the allow-list check placed before the FAB is unpacked."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    gate_fab_install(allow_list_from_env())
    flwr_clientapp()


def install_gate(bin_dir: Path) -> Path:
    """Write the ``flwr-clientapp`` launcher into ``bin_dir`` (put it first on the SuperNode's PATH)."""
    bin_dir = Path(bin_dir)
    bin_dir.mkdir(parents=True, exist_ok=True)
    gate = bin_dir / GATE_NAME
    gate.write_text(
        f"#!{sys.executable}\n"
        "# fedct: Flower's flwr-clientapp, refusing apps whose FAB hash is not in $FEDCT_APPROVED_APPS.\n"
        "from fl_client.approval import gated_clientapp_main\n"
        "gated_clientapp_main()\n"
    )
    gate.chmod(gate.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return gate
