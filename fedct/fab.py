"""What the app bundle (FAB) that sites approve must hold: the project files the ServerApp and ClientApp import.

A site approves the FAB by its SHA-256 (:mod:`fl_client.approval`), so every file in it is something every hospital
re-approves when it changes. The bundle therefore holds exactly the import closure of the two entry points named in
``pyproject.toml`` (``[tool.flwr.app.components]``) over the project's own packages — found by reading the source
(every ``import``, also inside functions), not by running it — plus the packages' ``__init__.py`` files. The review
page, the benchmarks or the deployment tools can change without a new approval.

``python -m fedct.fab`` prints the ``fab-include`` list for ``pyproject.toml``; ``tests/test_fab.py`` fails when the
list and the code disagree.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from collections.abc import Iterable
from pathlib import Path

__all__ = ["app_entry_modules", "app_import_closure", "fab_include_patterns", "project_packages"]


def project_packages(root: Path) -> tuple[str, ...]:
    """The project's top-level packages, as ``pyproject.toml`` lists them for setuptools."""
    config = tomllib.loads((Path(root) / "pyproject.toml").read_text(encoding="utf-8"))
    return tuple(config["tool"]["setuptools"]["packages"])


def app_entry_modules(root: Path) -> tuple[str, ...]:
    """The modules of the ServerApp and ClientApp entry points (``module:attribute`` in pyproject)."""
    config = tomllib.loads((Path(root) / "pyproject.toml").read_text(encoding="utf-8"))
    components = config["tool"]["flwr"]["app"]["components"]
    return tuple(sorted({str(v).split(":", 1)[0] for v in components.values()}))


def _module_file(root: Path, module: str) -> Path | None:
    """The source file of a project module (``a/b.py`` or ``a/b/__init__.py``), None when there is none."""
    base = Path(root).joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_names(path: Path, module: str) -> Iterable[str]:
    """Every module name an ``import`` statement of ``path`` may load (``from a import b``: ``a`` and ``a.b``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            yield name
            for alias in node.names:
                yield f"{name}.{alias.name}"


def app_import_closure(root: Path) -> list[str]:
    """Project files (relative POSIX paths, sorted) that the app entry points import, directly or not, with the
    ``__init__.py`` of every package on the way."""
    root = Path(root)
    packages = set(project_packages(root))
    todo = list(app_entry_modules(root))
    seen: set[str] = set()
    files: set[Path] = set()
    while todo:
        module = todo.pop()
        if module in seen or module.split(".")[0] not in packages:
            continue
        seen.add(module)
        path = _module_file(root, module)
        if path is None:
            continue  # ``from pkg import name``: name is not a module of its own
        files.add(path)
        parts = module.split(".")
        for i in range(1, len(parts)):  # importing a.b.c runs a/__init__.py and a/b/__init__.py
            todo.append(".".join(parts[:i]))
        todo.extend(_imported_names(path, module))
    return sorted(p.relative_to(root).as_posix() for p in files)


def fab_include_patterns(root: Path) -> list[str]:
    """The ``fab-include`` value: ``pyproject.toml`` and the app's import closure."""
    return ["pyproject.toml", *app_import_closure(root)]


def main(argv: list[str] | None = None) -> int:
    """Print the ``fab-include`` list for ``pyproject.toml`` (TOML array, one file a line)."""
    root = Path(argv[0] if argv else ".").resolve()
    print("fab-include = [")
    for pattern in fab_include_patterns(root):
        print(f'    "{pattern}",')
    print("]")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
