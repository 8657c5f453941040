"""The one reader of ``KEY=VALUE`` env files (site env, server env, PACS settings).

Syntax, the same everywhere: ``#`` comments and blank lines are skipped, an optional ``export`` prefix is allowed,
values follow shell quoting; a line that is not ``KEY=VALUE``, a key set twice or a value with unquoted spaces is
an error naming the file and line. Callers wrap :class:`EnvFileError` in their own error type when they need one.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class EnvFileError(ValueError):
    """The env file is missing, unreadable or malformed; the message names the file and line."""


@dataclass(frozen=True)
class EnvValue:
    """One setting of an env file and the line it came from (for error messages)."""

    value: str
    line: int


def read_env_lines(path: Path) -> dict[str, EnvValue]:
    """Settings of an env file with their line numbers, in file order."""
    path = Path(path)
    if not path.is_file():
        raise EnvFileError(f"env file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EnvFileError(f"env file {path} cannot be read: {exc}") from exc
    values: dict[str, EnvValue] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not _KEY.fullmatch(key):
            raise EnvFileError(f"{path}: line {number}: expected KEY=VALUE, got {raw!r}")
        try:
            parts = shlex.split(value, comments=True)
        except ValueError as exc:
            raise EnvFileError(f"{path}: line {number}: {key}: {exc}") from exc
        if len(parts) > 1:
            raise EnvFileError(f"{path}: line {number}: {key} has spaces; quote the value")
        if key in values:
            raise EnvFileError(f"{path}: line {number}: {key} is set twice (first on line {values[key].line})")
        values[key] = EnvValue(parts[0] if parts else "", number)
    return values


def read_env_file(path: Path) -> dict[str, str]:
    """Settings of an env file: key -> value."""
    return {key: setting.value for key, setting in read_env_lines(path).items()}
