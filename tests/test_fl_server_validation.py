"""fl_server.validation: each check on its own, then the combination over a round's updates."""

import math

import numpy as np
import pytest
import torch

from fl_server.validation import (
    check_updates,
    finite_problem,
    robust_zscores,
    structure_problem,
    update_norm,
    zscore_outliers,
)


@pytest.fixture
def reference():
    return {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32), "n": np.array(5, np.int64)}


def moved(reference, step, seed=0):
    rng = np.random.default_rng(seed)
    return {k: (v + step * rng.standard_normal(v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v.copy()
            for k, v in reference.items()}  # fmt: skip


def test_structure_accepts_the_same_layout_numpy_or_torch(reference):
    assert structure_problem(moved(reference, 0.1), reference) is None
    assert structure_problem({k: torch.from_numpy(v) for k, v in reference.items()}, reference) is None


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda u: u.pop("b"), "missing 1 tensor"),
        (lambda u: u.update(extra=np.zeros(1, np.float32)), "unknown tensor"),
        (lambda u: u.update(w=np.zeros((2, 3), np.float32)), "shape of 'w' is (2, 3)"),
        (lambda u: u.update(w=np.zeros((3, 2), np.float64)), "dtype of 'w' is float64"),
        (lambda u: u.update(n=np.array(5.0, np.float32)), "dtype of 'n'"),
    ],
)
def test_structure_names_what_differs(reference, change, needle):
    update = moved(reference, 0.1)
    change(update)
    assert needle in structure_problem(update, reference)


def test_finite(reference):
    update = moved(reference, 0.1)
    assert finite_problem(update) is None
    update["w"][0, 0] = np.nan
    update["b"][1] = np.inf
    assert finite_problem(update) == "1 non-finite value(s) in 'w'"


def test_update_norm_is_the_l2_distance_over_floating_tensors(reference):
    update = {"w": np.full((3, 2), 1.0, np.float32), "b": np.full(2, 2.0, np.float32), "n": np.array(900, np.int64)}
    assert update_norm(update, reference) == pytest.approx(math.sqrt(6 * 1 + 2 * 4))


def test_robust_zscores():
    z = robust_zscores([1.0, 2.0, 3.0, 100.0])
    assert z[3] > 50 and abs(z[1]) < 1
    assert robust_zscores([2.0, 2.0, 2.0]) == [0.0, 0.0, 0.0]
    assert robust_zscores([2.0, 2.0, 2.0, 9.0])[3] == math.inf


def test_zscore_flags_only_large_norms_and_needs_three_updates():
    assert set(zscore_outliers({"a": 1.0, "b": 1.1, "c": 0.9, "d": 1e6}, 5.0)) == {"d"}
    assert zscore_outliers({"a": 1.0, "b": 1.1, "c": 0.9, "d": 1e-6}, 5.0) == {}  # a small step harms no one
    assert zscore_outliers({"a": 1.0, "d": 1e6}, 5.0) == {}
    assert zscore_outliers({"a": 1.0, "b": 1.1, "d": 1e6}, 0.0) == {}  # 0 = off
    assert "robust SDs above" in zscore_outliers({"a": 1.0, "b": 1.1, "c": 0.9, "d": 1e6}, 5.0)["d"]


def test_check_updates_combines_every_check(reference):
    updates = {f"site-{i}": moved(reference, 0.1, seed=i) for i in range(4)}
    updates["nan"] = moved(reference, 0.1)
    updates["nan"]["w"][:] = np.nan
    updates["scaled"] = {k: (v * 1e6 if v.dtype.kind == "f" else v) for k, v in moved(reference, 0.1, seed=9).items()}
    updates["shape"] = {**moved(reference, 0.1), "b": np.zeros(3, np.float32)}
    rejected = check_updates(updates, reference, zscore=5.0)
    assert set(rejected) == {"nan", "scaled", "shape"}
    assert "non-finite" in rejected["nan"] and "shape of 'b'" in rejected["shape"] and "robust SDs" in rejected["scaled"]
    bounded = check_updates(updates, reference, max_norm=10.0)
    assert "exceeds max-update-norm 10" in bounded["scaled"] and "site-0" not in bounded
    assert set(check_updates({k: updates[k] for k in ("site-0", "site-1")}, reference, max_norm=10.0, zscore=5.0)) == set()
