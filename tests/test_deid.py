"""De-identification: the per-site secret key and the keyed pseudonyms made from it."""

from __future__ import annotations

import re
import stat

import pytest

from preprocessing.deid import KEY_FILE_NAME, Pseudonymizer, load_or_create_site_key

KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))


def test_site_key_is_created_with_mode_0600(tmp_path):
    site = tmp_path / "site" / "nested"

    key = load_or_create_site_key(site)

    path = site / KEY_FILE_NAME
    assert path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(key) == 32
    assert path.read_bytes() == key


def test_site_key_is_reused_not_recreated(tmp_path):
    first = load_or_create_site_key(tmp_path)
    mtime = (tmp_path / KEY_FILE_NAME).stat().st_mtime_ns

    second = load_or_create_site_key(tmp_path)

    assert second == first
    assert (tmp_path / KEY_FILE_NAME).stat().st_mtime_ns == mtime


def test_each_site_gets_its_own_key(tmp_path):
    assert load_or_create_site_key(tmp_path / "a") != load_or_create_site_key(tmp_path / "b")


def test_short_site_key_is_refused(tmp_path):
    (tmp_path / KEY_FILE_NAME).write_bytes(b"short")
    with pytest.raises(ValueError, match="shorter than 32 bytes"):
        load_or_create_site_key(tmp_path)


def test_pseudonym_is_stable_for_the_same_key():
    assert Pseudonymizer(KEY_A)("patient", "PIDQ7X93KZ") == Pseudonymizer(bytes(KEY_A))("patient", "PIDQ7X93KZ")


def test_pseudonym_differs_for_another_key():
    assert Pseudonymizer(KEY_A)("patient", "PIDQ7X93KZ") != Pseudonymizer(KEY_B)("patient", "PIDQ7X93KZ")


def test_pseudonym_differs_by_value_and_by_kind():
    p = Pseudonymizer(KEY_A)
    names = {p("patient", "PIDQ7X93KZ"), p("patient", "PIDQ7X93KY"), p("study", "PIDQ7X93KZ")}
    assert len(names) == 3


@pytest.mark.parametrize(
    "value",
    ["PIDQ7X93KZ", "Qzvorak^Ylvenne", "19370415", "1.2.826.0.1.3680043.8.498.12345", "123456789012"],
)
def test_pseudonym_contains_no_part_of_the_input(value):
    pseudonym = Pseudonymizer(KEY_A)("patient", value)

    assert re.fullmatch(r"patient-[0-9a-f]{12}", pseudonym)
    pieces = {value[i : i + 4].lower() for i in range(len(value) - 3)}
    assert not any(piece in pseudonym for piece in pieces)


def test_pseudonymizer_refuses_a_short_key():
    with pytest.raises(ValueError, match="at least 32 bytes"):
        Pseudonymizer(b"x" * 31)


@pytest.mark.parametrize("kind", ["", "patient id", "../x", "study-1"])
def test_pseudonym_kind_must_be_an_identifier(kind):
    with pytest.raises(ValueError, match="kind"):
        Pseudonymizer(KEY_A)(kind, "x")


def test_a_crash_left_empty_site_key_is_refused_naming_the_file(tmp_path):
    (tmp_path / KEY_FILE_NAME).write_bytes(b"")  # what a crash between create and write used to leave
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / KEY_FILE_NAME)) + ".*0 bytes"):
        load_or_create_site_key(tmp_path)
    assert (tmp_path / KEY_FILE_NAME).read_bytes() == b""  # not silently replaced either (pseudonyms would change)


def test_site_key_creation_leaves_no_temporary_file(tmp_path):
    load_or_create_site_key(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [KEY_FILE_NAME]


def test_concurrent_creation_gives_every_process_the_same_key(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    folders = [tmp_path / "site"] * 6
    with ctx.Pool(6) as pool:
        keys = pool.map(load_or_create_site_key, folders)
    assert len(set(keys)) == 1 and len(keys[0]) == 32
    assert (tmp_path / "site" / KEY_FILE_NAME).read_bytes() == keys[0]
    assert [p.name for p in (tmp_path / "site").iterdir()] == [KEY_FILE_NAME]
