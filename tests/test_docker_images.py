"""The images install the package from exactly the files their Dockerfiles copy (no Docker needed).

Each Dockerfile's ``COPY`` sources (minus ``.dockerignore``) are copied into an empty folder, the package is
installed from there as the image's ``pip install --no-deps .`` does, and the installed ``fedct --help`` runs.
A package listed in pyproject.toml but not copied (the bench/ break) fails here.
"""

from __future__ import annotations

import fnmatch
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = ("Dockerfile.site", "Dockerfile.server")


def copy_sources(dockerfile: Path) -> list[tuple[str, str]]:
    """(source, destination) of every ``COPY`` of the build context, in order (``--from`` copies excluded)."""
    pairs = []
    for line in dockerfile.read_text(encoding="utf-8").splitlines():
        if not line.strip().upper().startswith("COPY "):
            continue
        words = shlex.split(line, comments=True)
        if any(w.startswith("--from") for w in words):
            continue
        args = [w for w in words[1:] if not w.startswith("--")]
        *sources, dest = args
        pairs.extend((src, dest) for src in sources)
    return pairs


def _ignored(relative: str, patterns: list[str]) -> bool:
    parts = relative.split("/")
    for pattern in patterns:
        bare = pattern.removeprefix("**/")
        if fnmatch.fnmatch(relative, pattern) or any(fnmatch.fnmatch(p, bare) for p in parts):
            return True
    return False


def build_context_copy(dockerfile: Path, out: Path) -> Path:
    """The files the image's WORKDIR holds after its COPY lines (entrypoints outside WORKDIR are skipped)."""
    patterns = [
        p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    for src, dest in copy_sources(dockerfile):
        if dest.startswith("/"):
            continue  # e.g. the entrypoint script into /usr/local/bin: not part of the package
        source = ROOT / src
        assert source.exists(), f"{dockerfile.name} copies {src!r}, which does not exist"
        target = out / dest if dest not in (".", "./") else out / source.name
        if source.is_dir():
            for path in source.rglob("*"):
                rel = path.relative_to(ROOT).as_posix()
                if path.is_file() and not _ignored(rel, patterns):
                    (target / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, target / path.relative_to(source))
        else:
            dest_path = out / dest if not dest.endswith("/") else out / dest / source.name
            if dest.endswith("./") or dest in (".", "./"):
                dest_path = out / source.name
            dest_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest_path)
    return out


def test_copy_sources_parsed() -> None:
    pairs = copy_sources(ROOT / "docker" / "Dockerfile.site")
    assert ("pyproject.toml", "./") in pairs and ("fl_client", "./fl_client") in pairs


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_installs_from_exactly_its_copied_files(name: str, tmp_path: Path) -> None:
    context = build_context_copy(ROOT / "docker" / name, tmp_path / "context")
    target = tmp_path / "site-packages"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(context),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, f"{name}: pip install from its copied files failed:\n{install.stderr[-3000:]}"
    env = {**os.environ, "PYTHONPATH": str(target), "FLWR_TELEMETRY_ENABLED": "0"}
    # From an empty folder, so nothing of the checkout can be imported instead of the installed copy.
    run = subprocess.run(
        [sys.executable, "-c", "import fedct.cli, sys; sys.argv=['fedct','--help']; fedct.cli.main()"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "usage" in run.stdout.lower()
    probe = subprocess.run(
        [sys.executable, "-c", "import fedct, bench; print(fedct.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.strip().startswith(str(target)), probe.stdout
