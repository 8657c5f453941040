"""The app bundle (FAB) sites approve holds exactly the code the ServerApp and ClientApp import (fedct/fab.py)."""

from __future__ import annotations

import hashlib
import io
import shutil
import tomllib
import zipfile
from pathlib import Path

import pytest

from fedct.fab import app_entry_modules, app_import_closure, fab_include_patterns
from fl_client.approval import fab_bytes_of

ROOT = Path(__file__).resolve().parents[1]


def _listed() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["fab-include"]


def test_fab_include_is_the_apps_import_closure() -> None:
    """When this fails, paste the output of `python -m fedct.fab` into pyproject.toml's fab-include."""
    assert _listed() == fab_include_patterns(ROOT)


def test_closure_follows_lazy_imports_and_leaves_out_what_the_apps_do_not_import() -> None:
    closure = set(app_import_closure(ROOT))
    assert {"fl_server/server_app.py", "fl_client/client_app.py"} <= closure
    assert app_entry_modules(ROOT) == ("fl_client.client_app", "fl_server.server_app")
    assert "fl_server/observe.py" in closure  # imported inside a function of the server's round loop
    for outside in (
        "inference/review.py",
        "inference/report.py",
        "fedct/deploy/server.py",
        "fedct/cli.py",
        "fl_client/approval.py",
        "fl_client/executor.py",
        "synthetic/phantom.py",
    ):
        assert outside not in closure, outside
    assert not any(path.startswith("bench/") for path in closure)
    for path in closure:  # every package on the way has its __init__.py
        parts = Path(path).parts[:-1]
        for i in range(1, len(parts) + 1):
            assert "/".join(parts[:i]) + "/__init__.py" in closure, path


@pytest.fixture(scope="module")
def app_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the app folder (the packages and pyproject.toml), to edit without touching the checkout."""
    copy = tmp_path_factory.mktemp("app")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, copy / name)
    for package in ("fedct", "fl_client", "fl_server", "preprocessing", "models", "synthetic", "inference", "bench"):
        shutil.copytree(ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def _hash(app: Path) -> str:
    return hashlib.sha256(fab_bytes_of(app)).hexdigest()


def test_the_bundle_holds_exactly_the_closure(app_copy: Path) -> None:
    names = set(zipfile.ZipFile(io.BytesIO(fab_bytes_of(app_copy))).namelist())
    assert names - {".info/CONTENT"} == set(fab_include_patterns(ROOT))


def test_editing_the_review_page_or_a_benchmark_keeps_the_hash_editing_training_changes_it(app_copy: Path) -> None:
    before = _hash(app_copy)
    for name in ("inference/review.py", "inference/review_pages.py", "bench/cli.py", "fedct/deploy/server.py"):
        with open(app_copy / name, "a", encoding="utf-8") as fh:
            fh.write("\n# an edit outside the apps' import closure\n")
    assert _hash(app_copy) == before
    path = app_copy / "fl_client" / "train.py"
    original = path.read_text(encoding="utf-8")
    try:
        path.write_text(original + "\n# an edit the sites must approve\n", encoding="utf-8")
        assert _hash(app_copy) != before
    finally:
        path.write_text(original, encoding="utf-8")
