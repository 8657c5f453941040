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
    APPROVAL_DISABLED,
    AppNotApprovedError,
    ApprovalConfigError,
    allow_list_exposure,
    allow_list_from_env,
    allow_list_value,
    app_hash,
    app_top_level_names,
    approve,
    check_fab,
    gate_fab_install,
    install_gate,
    load_allow_list,
)
from fl_client.approval import main as approval_main

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
    assert check_fab(fab, None) == hashlib.sha256(fab).hexdigest()  # approval explicitly disabled


def test_malformed_allow_list_line(tmp_path):
    allow = tmp_path / "approved-apps.txt"
    allow.write_text("abc123  # too short\n")
    with pytest.raises(ValueError, match=r"approved-apps.txt:1: expected a 64-hex-digit"):
        load_allow_list(allow)


def test_launcher_fails_closed_without_a_configured_list(monkeypatch, tmp_path):
    monkeypatch.delenv(ALLOW_LIST_ENV, raising=False)
    assert allow_list_from_env() is not None and not allow_list_from_env().exists()
    monkeypatch.setenv(ALLOW_LIST_ENV, APPROVAL_DISABLED)
    assert allow_list_from_env() is None
    monkeypatch.setenv(ALLOW_LIST_ENV, str(tmp_path / "a.txt"))
    assert allow_list_from_env() == tmp_path / "a.txt"
    assert allow_list_value(None) == APPROVAL_DISABLED and allow_list_value(tmp_path / "a.txt") == str(
        tmp_path / "a.txt"
    )


@pytest.mark.parametrize("value", ["off", "none", "NONE", "false", "0", "disabled", "no"])
def test_no_word_but_the_explicit_phrase_switches_approval_off(monkeypatch, value):
    """FEDCT_APPROVED_APPS=none used to turn approval off; now it is an error naming the setting (fail closed)."""
    monkeypatch.setenv(ALLOW_LIST_ENV, value)
    with pytest.raises(
        ApprovalConfigError,
        match=f"FEDCT_APPROVED_APPS='{value}' does not switch app approval off.*FEDCT_APPROVAL=disabled-i-understand",
    ):
        allow_list_from_env()


def test_the_launcher_refuses_to_start_a_task_when_told_off(tmp_path):
    """The flwr-clientapp launcher with FEDCT_APPROVED_APPS=off exits with the error, before any app is fetched."""
    gate = install_gate(tmp_path / "bin")
    done = subprocess.run(
        [str(gate), "--insecure", "--clientappio-api-address", "127.0.0.1:1", "--token", "x"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", ALLOW_LIST_ENV: "off"},
    )
    assert done.returncode != 0
    assert "does not switch app approval off" in done.stderr


@pytest.fixture
def flower_install(monkeypatch, tmp_path):
    """Flower's FAB installer (restored after the test), installing into a throw-away FLWR_HOME."""
    import flwr.supernode.runtime.run_clientapp as runtime

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setattr(runtime, "install_from_fab", runtime.install_from_fab)
    return runtime


def test_disabled_approval_warns_for_every_task(app, flower_install, capsys):
    gate_fab_install(None)
    fab = build_fab_from_disk(app)
    for _ in range(2):
        flower_install.install_from_fab(fab, skip_prompt=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if "DISABLED" in line]
    assert len(lines) == 2
    assert all(
        line.startswith("fedct: WARNING app approval is DISABLED at this site (FEDCT_APPROVAL=disabled-i-understand)")
        for line in lines
    )


def test_the_apps_code_comes_from_the_fab_not_from_a_copy_imported_earlier(app, flower_install, tmp_path, monkeypatch):
    """A site's installed copy of the app's packages (imported to run the launcher or the executor) must not shadow
    the FAB: Flower's loader reuses any module already in sys.modules."""
    import importlib
    import sys

    from flwr.supercore.object_ref import load_app

    (app / "pkg" / "app.py").write_text("client = server = 'from the FAB'\n")
    installed = tmp_path / "installed"
    (installed / "pkg").mkdir(parents=True)
    (installed / "pkg" / "__init__.py").write_text("")
    (installed / "pkg" / "app.py").write_text("client = server = 'the site installed copy'\n")
    monkeypatch.syspath_prepend(str(installed))
    monkeypatch.setattr(sys, "modules", dict(sys.modules))  # restored after the test
    assert importlib.import_module("pkg.app").client == "the site installed copy"

    allow = tmp_path / "approved-apps.txt"
    approve(app, allow)
    gate_fab_install(allow)
    app_dir = flower_install.install_from_fab(build_fab_from_disk(app), skip_prompt=True)
    assert "pkg" not in sys.modules and "pkg.app" not in sys.modules
    assert load_app("pkg.app:client", RuntimeError, app_dir) == "from the FAB"
    assert app_top_level_names(app_dir) == {"pkg"}


def test_a_writable_allow_list_is_reported(tmp_path):
    allow = tmp_path / "approval" / "approved-apps.txt"
    allow.parent.mkdir()
    allow.write_text("")
    warning = allow_list_exposure(allow)
    assert warning is not None and "could approve itself" in warning and "read-only" in warning
    if os.geteuid() != 0:  # root may write anything; the read-only case exists for other users (the container's)
        allow.chmod(0o444)
        allow.parent.chmod(0o555)
        try:
            assert allow_list_exposure(allow) is None
        finally:
            allow.parent.chmod(0o755)


def test_approve_command_line(app, tmp_path, capsys):
    allow = tmp_path / "approval" / "approved-apps.txt"
    assert approval_main(["--allow-list", str(allow), "--approve", str(app)]) == 0
    assert load_allow_list(allow) == {app_hash(app)} and app_hash(app) in capsys.readouterr().out
    assert approval_main(["--allow-list", str(allow), "--approve", str(tmp_path / "nowhere")]) == 2
    assert "not a Flower app folder" in capsys.readouterr().err


def test_gate_is_an_executable_flwr_clientapp(tmp_path):
    gate = install_gate(tmp_path / "bin")
    assert gate.name == "flwr-clientapp" and os.access(gate, os.X_OK)
    done = subprocess.run(
        [str(gate), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
    )
    assert done.returncode == 0, done.stderr
    assert "--runtime-api-address" in done.stdout  # it is Flower's flwr-clientapp underneath
