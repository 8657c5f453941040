"""fedct/envfile.py: the one env-file reader used by the site env, the PACS settings and the server env."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedct.envfile import EnvFileError, EnvValue, read_env_file, read_env_lines


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.env"
    path.write_text(text, encoding="utf-8")
    return path


def test_reads_comments_export_and_quoting(tmp_path: Path) -> None:
    path = _write(tmp_path, "# a comment\n\nexport A=1\nB='two words'\nC=\"x\"  # trailing\nD=\n")
    assert read_env_file(path) == {"A": "1", "B": "two words", "C": "x", "D": ""}
    assert read_env_lines(path)["B"] == EnvValue("two words", 4)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("A 1\n", r"line 1: expected KEY=VALUE"),
        ("1A=x\n", r"line 1: expected KEY=VALUE"),
        ("A=two words\n", r"line 1: A has spaces; quote the value"),
        ("A='open\n", r"line 1: A: No closing quotation"),
        ("A=1\n\nA=2\n", r"line 3: A is set twice \(first on line 1\)"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(EnvFileError, match=message):
        read_env_file(path)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(EnvFileError, match="does not exist"):
        read_env_file(tmp_path / "nope.env")
    path = tmp_path / "latin1.env"
    path.write_bytes(b"A=\xe9\n")
    with pytest.raises(EnvFileError, match="cannot be read"):
        read_env_file(path)
