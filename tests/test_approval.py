"""Only approved code runs at a site: FAB hashes, the allow-list, and the flwr-clientapp launcher that checks them.

The launcher in real SuperNodes (accepting the approved app, refusing a changed one) is exercised in
tests/test_deployment.py; here each piece is checked on its own, with Flower's real FAB builder.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from fl_client.approval import (
    ALLOW_LIST_ENV,
    AppNotApprovedError,
    allow_list_from_env,
    app_hash,
    approve,
    check_fab,
    install_gate,
    load_allow_list,
)

PYPROJECT = """[project]
name = "tinyapp"
version = "1.0.0"

[tool.flwr.app]
publisher = "tester"

[tool.flwr.app.components]
serverapp = "pkg.app:server"
clientapp = "pkg.app:client"

[tool.flwr.app.config]
rounds = 1
"""


@pytest.fixture
def app(tmp_path) -> Path:
    root = tmp_path / "app"
    (root / "pkg").mkdir(parents=True)
    (root / "pyproject.toml").write_text(PYPROJECT)
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "app.py").write_text("client = server = None\n")
    return root


def test_app_hash_is_the_hash_flwr_run_submits_and_is_stable(app):
    digest = app_hash(app)
    assert digest == hashlib.sha256(build_fab_from_disk(app)).hexdigest()
    assert app_hash(app) == digest  # Flower's builder is deterministic (fixed zip dates, sorted files)
    (app / "pkg" / "app.py").write_text("client = server = None  # changed\n")
    assert app_hash(app) != digest


def test_approve_appends_once_and_check_accepts(app, tmp_path):
    allow = tmp_path / "site" / "approved-apps.txt"
    digest = approve(app, allow)
    assert approve(app, allow) == digest
    lines = allow.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith(digest) and "tester/tinyapp 1.0.0" in lines[0]
    assert load_allow_list(allow) == {digest}
    assert check_fab(build_fab_from_disk(app), allow) == digest


def test_check_refuses_an_unapproved_app_with_a_clear_line(app, tmp_path):
    allow = tmp_path / "approved-apps.txt"
    allow.write_text("# reviewed 2026-11\n" + "0" * 64 + "\n")
    fab = build_fab_from_disk(app)
    with pytest.raises(AppNotApprovedError) as refused:
        check_fab(fab, allow)
    message = str(refused.value)
    assert message.startswith("fedct: REFUSED app tester/tinyapp 1.0.0")
    assert hashlib.sha256(fab).hexdigest() in message and str(allow) in message and "--approve" in message
    with pytest.raises(AppNotApprovedError, match="0 approved"):
        check_fab(fab, tmp_path / "missing.txt")  # no list yet: nothing is approved
    assert check_fab(fab, None) == hashlib.sha256(fab).hexdigest()  # approval explicitly off


def test_malformed_allow_list_line(tmp_path):
    allow = tmp_path / "approved-apps.txt"
    allow.write_text("abc123  # too short\n")
    with pytest.raises(ValueError, match=r"approved-apps.txt:1: expected a 64-hex-digit"):
        load_allow_list(allow)


def test_launcher_fails_closed_without_a_configured_list(monkeypatch, tmp_path):
    monkeypatch.delenv(ALLOW_LIST_ENV, raising=False)
    assert allow_list_from_env() is not None and not allow_list_from_env().exists()
    monkeypatch.setenv(ALLOW_LIST_ENV, "off")
    assert allow_list_from_env() is None
    monkeypatch.setenv(ALLOW_LIST_ENV, str(tmp_path / "a.txt"))
    assert allow_list_from_env() == tmp_path / "a.txt"


def test_gate_is_an_executable_flwr_clientapp(tmp_path):
    gate = install_gate(tmp_path / "bin")
    assert gate.name == "flwr-clientapp" and os.access(gate, os.X_OK)
    done = subprocess.run([str(gate), "--help"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "--runtime-api-address" in done.stdout  # it is Flower's flwr-clientapp underneath
