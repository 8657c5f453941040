"""Patient-level, stratified, deterministic train/val/test split."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from preprocessing.split import SPLIT_FILE, SPLITS, SplitConfig, assign_splits, site_split


def _patients(n: int, stratum: int | None, prefix: str = "patient") -> dict[str, int | None]:
    return {f"{prefix}-{stratum}-{i:03d}": stratum for i in range(n)}


def test_split_is_deterministic_and_independent_of_input_order():
    strata = {**_patients(17, 0), **_patients(9, 1), **_patients(5, 2), **_patients(4, None)}
    items = list(strata.items())
    random.Random(3).shuffle(items)

    first = assign_splits(strata)
    again = assign_splits(dict(strata))
    shuffled = assign_splits(dict(items))

    assert first == again == shuffled


def test_every_patient_gets_exactly_one_known_split():
    strata = {**_patients(10, 0), **_patients(3, 1), **_patients(1, 2)}

    result = assign_splits(strata)

    assert set(result) == set(strata)
    assert set(result.values()) <= set(SPLITS)


@pytest.mark.parametrize("n", range(3, 16))
def test_every_split_is_non_empty_for_a_stratum_of_three_or_more(n):
    strata = {**_patients(n, 0), **_patients(n + 1, 1), **_patients(3, None)}

    result = assign_splits(strata)

    for stratum in (0, 1, None):
        splits = Counter(result[p] for p, s in strata.items() if s == stratum)
        assert set(splits) == set(SPLITS), (stratum, splits)


@pytest.mark.parametrize("n", [1, 2])
def test_small_strata_keep_patients_in_train(n):
    result = assign_splits(_patients(n, 0))
    assert "train" in result.values()
    assert len(result) == n


def test_fractions_are_respected_for_a_large_stratum():
    result = assign_splits(_patients(100, 0), SplitConfig(val_fraction=0.1, test_fraction=0.3))

    assert Counter(result.values()) == {"train": 60, "val": 10, "test": 30}


def test_zero_fractions_put_everyone_in_train():
    result = assign_splits(_patients(10, 0), SplitConfig(val_fraction=0.0, test_fraction=0.0))
    assert set(result.values()) == {"train"}


def test_zero_val_fraction_gives_no_val_but_test():
    result = assign_splits(_patients(10, 0), SplitConfig(val_fraction=0.0, test_fraction=0.2))
    assert Counter(result.values()) == {"train": 8, "test": 2}


def test_adding_a_patient_to_one_stratum_does_not_move_the_others():
    base = {**_patients(10, 0), **_patients(10, 1)}
    more = {**base, "patient-1-999": 1}

    a = assign_splits(base)
    b = assign_splits(more)

    assert {p: a[p] for p in base if base[p] == 0} == {p: b[p] for p in base if base[p] == 0}


def test_empty_input_gives_empty_split():
    assert assign_splits({}) == {}


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"val_fraction": -0.1}, r"val_fraction must be in \[0, 1\), got -0\.1"),
        ({"val_fraction": 1.0}, r"val_fraction must be in \[0, 1\), got 1\.0"),
        ({"test_fraction": -0.5}, r"test_fraction must be in \[0, 1\), got -0\.5"),
        ({"test_fraction": 1.5}, r"test_fraction must be in \[0, 1\), got 1\.5"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, r"val_fraction \+ test_fraction must be < 1, got 1\.0"),
    ],
)
def test_bad_fractions_are_refused_naming_the_value(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        SplitConfig(**kwargs)


def test_site_split_is_fixed_by_the_site_and_ignores_the_servers_fractions(tmp_path, caplog):
    own = SplitConfig(val_fraction=0.25, test_fraction=0.15)
    with caplog.at_level("WARNING", logger="fedct.split"):
        assert site_split(tmp_path, site_choice=own, requested=SplitConfig(0.1, 0.1)) == own
        assert site_split(tmp_path, site_choice=own, requested=SplitConfig(0.4, 0.4)) == own
        assert site_split(tmp_path, site_choice=own, requested=own) == own
    assert caplog.text.count("ignored: this site's split is fixed at val 0.25 / test 0.15") == 2
    assert (tmp_path / SPLIT_FILE).is_file()


def test_without_a_site_setting_the_first_request_is_fixed(tmp_path):
    first = SplitConfig(0.1, 0.3)
    assert site_split(tmp_path, site_choice=None, requested=first) == first
    assert site_split(tmp_path, site_choice=None, requested=SplitConfig(0.45, 0.45)) == first
    assert site_split(tmp_path / "fresh", site_choice=None) == SplitConfig()  # nothing asked: the default


def test_fixed_split_gives_the_same_patients_whatever_the_server_sends(tmp_path):
    strata = {**_patients(40, 0), **_patients(25, 1)}
    fixed = assign_splits(strata, site_split(tmp_path, site_choice=None, requested=SplitConfig(0.2, 0.2)))
    for asked in (SplitConfig(0.2, 0.25), SplitConfig(0.05, 0.05), SplitConfig(0.5, 0.4)):
        assert assign_splits(strata, site_split(tmp_path, site_choice=None, requested=asked)) == fixed
        assert assign_splits(strata, asked) != fixed  # what a re-split would have done


def test_the_sites_own_change_re_splits_with_a_warning(tmp_path, caplog):
    site_split(tmp_path, site_choice=SplitConfig(0.2, 0.2))
    with caplog.at_level("WARNING", logger="fedct.split"):
        assert site_split(tmp_path, site_choice=SplitConfig(0.3, 0.2)) == SplitConfig(0.3, 0.2)
    assert "the site's own split setting changed from val 0.2 / test 0.2 to val 0.3 / test 0.2" in caplog.text
    assert site_split(tmp_path, site_choice=None, requested=SplitConfig(0.1, 0.1)) == SplitConfig(0.3, 0.2)


@pytest.mark.parametrize("text", ["not json", '{"val_fraction": 0.2}', '{"val_fraction": 0.7, "test_fraction": 0.7}'])
def test_a_damaged_split_file_is_named(tmp_path, text):
    (tmp_path / SPLIT_FILE).write_text(text)
    with pytest.raises(ValueError, match=f"{SPLIT_FILE}: not a valid split file .*delete it"):
        site_split(tmp_path, site_choice=None, requested=SplitConfig())
