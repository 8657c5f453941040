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

Approval cannot be switched off by accident: ``FEDCT_APPROVED_APPS`` names the allow-list *file*; a value such as
``off``, ``none`` or an empty one is an error naming the key. The only way to run without the check (benchmarks,
tests) is the explicit ``FEDCT_APPROVAL=disabled-i-understand`` (:data:`APPROVAL_DISABLED`), which is logged as a
WARNING when the site starts and again for every task. The allow-list must live outside the site's work folder
(the folder the ClientApp can write): in the container it is mounted read-only.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import stat
import sys
from pathlib import Path

#: Environment variable naming the allow-list file for the launcher (set by ``fedct site``).
ALLOW_LIST_ENV = "FEDCT_APPROVED_APPS"
#: Site env key that alone can disable approval, and the one value that does.
APPROVAL_SETTING = "FEDCT_APPROVAL"
APPROVAL_DISABLED = "disabled-i-understand"
#: Values of FEDCT_APPROVAL (the first is the default).
APPROVAL_MODES = ("required", APPROVAL_DISABLED)
#: Values that look like "switch it off"; as an allow-list setting they are an error, never a way to disable.
DISABLING_WORDS = frozenset({"off", "none", "no", "false", "0", "disable", "disabled", "null", "-"})
GATE_NAME = "flwr-clientapp"

log = logging.getLogger("fedct.approval")


class AppNotApprovedError(RuntimeError):
    """The app's FAB hash is not in the site's allow-list."""


class ApprovalConfigError(ValueError):
    """An approval setting is wrong (e.g. an attempt to switch approval off through the allow-list key)."""


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
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%MZ")
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


def allow_list_from_value(value: str, *, source: str = ALLOW_LIST_ENV) -> Path | None:
    """An allow-list setting as the path to check: a file; :data:`APPROVAL_DISABLED` (None: no check); "" when
    nothing is configured (a list that does not exist: every app is refused). A word like "off" or "none" is an
    :class:`ApprovalConfigError` naming ``source``: approval is never switched off by accident."""
    if value == APPROVAL_DISABLED:
        return None
    if value.strip().lower() in DISABLING_WORDS:
        raise ApprovalConfigError(
            f"{source}={value!r} does not switch app approval off; it must name the allow-list file. "
            f"Only {APPROVAL_SETTING}={APPROVAL_DISABLED} disables approval (benchmarks and tests)"
        )
    if not value:
        return Path("/nonexistent/fedct-approved-apps.txt")  # no list configured: nothing is approved
    return Path(value)


def allow_list_value(allow_list: Path | None) -> str:
    """Inverse of :func:`allow_list_from_value`: what ``fedct site`` passes to the launcher and the executor."""
    return APPROVAL_DISABLED if allow_list is None else str(allow_list)


def disabled_warning() -> str:
    """The line logged when the site starts and for every task while approval is disabled."""
    return (
        f"WARNING app approval is DISABLED at this site ({APPROVAL_SETTING}={APPROVAL_DISABLED}): "
        "any app the server sends runs here unchecked"
    )


def allow_list_exposure(allow_list: Path) -> str | None:
    """A warning when this process could change the allow-list (then a ClientApp could approve itself): the file
    or its folder is writable by the user running the site. None when it is read-only to us (as mounted :ro)."""
    allow_list = Path(allow_list)
    writable = [p for p in (allow_list, allow_list.parent) if p.exists() and os.access(p, os.W_OK)]
    if not writable:
        return None
    return (
        f"WARNING the allow-list {allow_list} can be changed by this user ({writable[0]} is writable): a ClientApp "
        "could approve itself. Mount it read-only (container) or make it owned by another user"
    )


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
        print(
            f"fedct: app FAB sha256 {digest} is approved at this site"
            if allow_list
            else f"fedct: {disabled_warning()} (FAB sha256 {digest})",
            file=sys.stderr,
            flush=True,
        )
        installed = install(fab_content, *args, **kwargs)
        forget_app_modules(Path(installed))  # the app's code comes from the FAB, never from a copy imported earlier
        return installed

    runtime.install_from_fab = checked_install


def forget_modules(top_level: frozenset[str] | set[str]) -> list[str]:
    """Drop every module under the top-level names ``top_level`` from ``sys.modules``; returns the dropped names."""
    import importlib

    dropped = [n for n in list(sys.modules) if n.split(".")[0] in top_level]
    for name in dropped:
        sys.modules.pop(name, None)
    importlib.invalidate_caches()
    return dropped


def app_top_level_names(app_dir: Path) -> frozenset[str]:
    """Top-level import names an unpacked app provides: its packages (folders of Python files) and modules."""
    names = set()
    for entry in Path(app_dir).iterdir():
        if entry.is_dir() and entry.name.isidentifier() and any(entry.glob("*.py")):
            names.add(entry.name)
        elif entry.suffix == ".py" and entry.stem.isidentifier():
            names.add(entry.stem)
    return frozenset(names)


def forget_app_modules(app_dir: Path) -> list[str]:
    """Forget the modules an unpacked app provides (e.g. a site's installed ``fl_client`` imported to run this
    launcher): Flower's loader reuses a module already in ``sys.modules``, which would run the site's installed
    copy instead of the app's code."""
    return forget_modules(app_top_level_names(app_dir))


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


def main(argv: list[str] | None = None) -> int:
    """``python -m fl_client.approval --allow-list FILE --approve APP_DIR``: approve an app into an allow-list file
    without a site env file (e.g. in a throw-away container writing the list the site container mounts read-only)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fl_client.approval", description=main.__doc__.split("\n")[0])
    parser.add_argument(
        "--allow-list", type=Path, required=True, help="the site's allow-list file (created if missing)"
    )
    parser.add_argument("--approve", type=Path, required=True, metavar="APP_DIR", help="the reviewed app folder")
    args = parser.parse_args(argv)
    try:
        digest = approve(args.approve, args.allow_list)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"approved {args.approve}: FAB sha256 {digest} (in {args.allow_list})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
