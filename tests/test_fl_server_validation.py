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
    return {
        k: (v + step * rng.standard_normal(v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v.copy()
        for k, v in reference.items()
    }


def test_structure_accepts_the_same_layout_numpy_or_torch(reference):
    assert structure_problem(moved(reference, 0.1), reference) is None
    assert structure_problem({k: torch.from_numpy(v) for k, v in reference.items()}, reference) is None


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda u: u.pop("b"), "missing 1 tensor"),
        (lambda u: u.update(extra=np.zeros(1, np.float32)), "1 unknown tensor(s)"),
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
    assert robust_zscores([2.0, 2.0, 2.0, 9.0])[3] == pytest.approx(35.0)  # scale floored at 10 % of the median
    assert robust_zscores([0.0, 0.0, 0.0, 9.0])[3] == math.inf


def test_honest_sites_with_close_norms_are_not_outliers():
    """Three honest sites whose norms differ by ~10 % (MAD tiny): none is flagged; a poisoned one still is."""
    assert zscore_outliers({"a": 11.28, "b": 12.45, "c": 11.21}, 5.0) == {}
    assert set(zscore_outliers({"a": 11.28, "b": 12.45, "c": 11.21, "d": 2.8e4}, 5.0)) == {"d"}


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
    updates["huge"] = moved(reference, 0.1)
    updates["huge"]["b"][0] = 1e30
    rejected = check_updates(updates, reference, zscore=5.0)
    assert set(rejected) == {"nan", "scaled", "shape", "huge"}
    assert {k: p.code for k, p in rejected.items()} == {
        "nan": "non_finite",
        "scaled": "norm_outlier",
        "shape": "shape_mismatch",
        "huge": "huge_value",
    }
    assert "non-finite" in rejected["nan"].reason and "shape of 'b'" in rejected["shape"].reason
    assert "robust SDs" in rejected["scaled"].reason
    bounded = check_updates(updates, reference, max_norm=10.0)
    assert "exceeds max-update-norm 10" in bounded["scaled"].reason and bounded["scaled"].code == "norm_exceeded"
    assert "site-0" not in bounded
    assert (
        set(check_updates({k: updates[k] for k in ("site-0", "site-1")}, reference, max_norm=10.0, zscore=5.0)) == set()
    )


# --- the reply gate ---------------------------------------------------------------------------------------------------

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict  # noqa: E402

from fedct.transport import weights_records  # noqa: E402
from fl_server.config import SiteRegistry  # noqa: E402
from fl_server.validation import (  # noqa: E402
    CODES,
    ReplyRejected,
    histogram_length_problems,
    plain_metrics,
    screen_reply,
    site_identity,
)


def train_content(reference, *, name="site-a", transport="float32", **metrics):
    content = weights_records({k: torch.from_numpy(v) for k, v in moved(reference, 0.1).items()}, transport=transport)
    content["metrics"] = MetricRecord({"train-loss": 0.5, "num-examples": 8, **metrics})
    content["site"] = ConfigRecord({"name": name})
    return content


def rejected_code(call) -> str:
    with pytest.raises(ReplyRejected) as info:
        call()
    assert info.value.problem.code in CODES
    return info.value.problem.code


def test_a_well_formed_train_reply_passes_as_plain_python(reference):
    for transport in ("float32", "float16", None):
        screened = screen_reply(
            train_content(reference, transport=transport),
            node_id=3,
            train=True,
            reference=reference,
            registry=None,
            count_bound=1000,
        )
        assert screened.site == "site-a" and screened.metrics == {"train-loss": 0.5, "num-examples": 8.0}
        assert set(screened.arrays) == set(reference) and all(
            screened.arrays[k].dtype == reference[k].dtype for k in reference
        )
        assert screened.evaluation is None and screened.clipped == ()


def test_the_registry_names_the_site_and_refuses_strangers_and_impostors(reference, tmp_path):
    registry = SiteRegistry(path=tmp_path / "r.json", names={3: "site-a", 4: "site-b"})
    assert site_identity(train_content(reference), 3, registry) == "site-a"
    assert rejected_code(lambda: site_identity(train_content(reference), 9, registry)) == "unregistered_node"
    assert (
        rejected_code(lambda: site_identity(train_content(reference, name="site-b"), 3, registry))
        == "site_name_mismatch"
    )
    assert (
        rejected_code(lambda: site_identity(train_content(reference, name="Dr. Who, ward 3"), 3, None))
        == "bad_site_name"
    )
    content = train_content(reference)
    del content["site"]
    assert rejected_code(lambda: site_identity(content, 3, None)) == "bad_site_name"


@pytest.mark.parametrize(
    ("change", "code"),
    [
        (lambda c: c.__delitem__("metrics"), "malformed_reply"),
        (lambda c: c.__setitem__("extra", ConfigRecord({"a": 1})), "malformed_reply"),
        (lambda c: c.__setitem__("metrics", ConfigRecord({"num-examples": 8})), "malformed_reply"),
        (lambda c: c.__setitem__("evaluate", ConfigRecord({"num-examples": 8})), "malformed_reply"),  # not asked for
        (lambda c: c["weights-index"].__setitem__("arrays-key", "site"), "bad_index"),
        (
            lambda c: c["weights-index"].__setitem__(
                "index", c["weights-index"]["index"].replace('"int64"', '"int65"')
            ),
            "unknown_dtype",
        ),
        (
            lambda c: c["weights-index"].__setitem__("index", c["weights-index"]["index"].replace("[3,2]", "[2,3]")),
            "shape_mismatch",
        ),
        (lambda c: c["weights-index"].__setitem__("index", "{not json"), "bad_index"),
        (lambda c: c["arrays"].__setitem__("float32", Array(np.zeros(3, np.float32))), "size_mismatch"),
        (lambda c: c["arrays"].__setitem__("float32", Array(np.zeros(8, np.float64))), "dtype_mismatch"),
        (lambda c: c["metrics"].__setitem__("num-examples", 1.5), "bad_num_examples"),
        (lambda c: c["metrics"].__setitem__("num-examples", -3), "bad_num_examples"),
        (lambda c: c["metrics"].__setitem__("num-examples", float("nan")), "bad_num_examples"),
        (lambda c: c["metrics"].__setitem__("train-loss", [0.5, 0.4]), "bad_metric"),
        (lambda c: c["metrics"].__setitem__("train-loss", float("inf")), "non_finite"),
        (lambda c: c["metrics"].__setitem__("train-loss", 1e300), "bad_metric"),
        (lambda c: c["metrics"].__setitem__("Patient Name", 1.0), "bad_metric"),
        (lambda c: c["metrics"].__setitem__("train-hist-risk", 3.0), "bad_metric"),
        (lambda c: c["metrics"].__setitem__("train-hist-risk", [1.0, float("nan")]), "non_finite"),
    ],
)
def test_a_malformed_train_reply_is_rejected_with_its_code(reference, change, code):
    content = train_content(reference)
    change(content)
    assert (
        rejected_code(
            lambda: screen_reply(content, node_id=3, train=True, reference=reference, registry=None, count_bound=1000)
        )
        == code
    )


def test_evaluate_replies_carry_metrics_and_site_only(reference):
    content = RecordDict(
        {
            "metrics": MetricRecord(
                {
                    "val-loss": float("nan"),
                    "val-n": 4,
                    "num-examples": 4,
                    "val-hist-pos-a": [1.0, 0.0],
                    "val-hist-neg-a": [],
                }
            ),
            "site": ConfigRecord({"name": "site-a"}),
        }
    )
    screened = screen_reply(content, node_id=3, train=False, reference=reference, registry=None, count_bound=1000)
    assert math.isnan(screened.metrics["val-loss"]) and screened.metrics["val-hist-neg-a"] == []  # undefined, floor
    content["arrays"] = ArrayRecord({"w": Array(np.zeros((3, 2), np.float32))})
    assert (
        rejected_code(
            lambda: screen_reply(content, node_id=3, train=False, reference=reference, registry=None, count_bound=1000)
        )
        == "malformed_reply"
    )


def test_counts_above_the_bound_are_clipped_and_reported():
    metrics, clipped = plain_metrics(
        {"num-examples": 10**12, "val-n": 5, "train-loss": 0.1}, count_bound=500, train=True
    )
    assert metrics["num-examples"] == 500.0 and metrics["val-n"] == 5.0
    assert clipped == [{"metric": "num-examples", "claimed": 1e12, "used": 500.0, "bound": "max-site-examples"}]
    assert rejected_code(lambda: plain_metrics({"num-examples": 0}, count_bound=500, train=True)) == "bad_num_examples"
    assert plain_metrics({"num-examples": 0}, count_bound=500, train=False)[0] == {"num-examples": 0.0}
    assert rejected_code(lambda: plain_metrics({"train-loss": 1.0}, count_bound=500, train=True)) == "bad_num_examples"
    assert (
        rejected_code(lambda: plain_metrics({"num-examples": 4, "val-n": 2.5}, count_bound=500, train=True))
        == "bad_metric"
    )


def test_histograms_must_have_the_same_bins_at_every_site():
    pinned: dict[str, int] = {}
    replies = {i: [{"val-hist-risk": [1.0] * 20}] for i in range(3)}
    replies[3] = [{"val-hist-risk": [1.0] * 7}]
    replies[4] = [{"val-hist-risk": []}]  # privacy floor: sent empty
    problems = histogram_length_problems(replies, pinned)
    assert set(problems) == {3} and problems[3].code == "bad_histogram" and pinned == {"val-hist-risk": 20}
    # pinned for the rest of the run: a later round where the odd length is the majority still keeps 20
    later = histogram_length_problems(
        {0: [{"val-hist-risk": [1.0] * 7}], 1: [{"val-hist-risk": [1.0] * 7}], 2: [{"val-hist-risk": [1.0] * 20}]},
        pinned,
    )
    assert set(later) == {0, 1}
    tie = histogram_length_problems({0: [{"test-hist-x": [1.0] * 2}], 1: [{"test-hist-x": [1.0] * 3}]}, {})
    assert set(tie) == {0, 1}  # nothing tells which one is right


def test_calibration_sums_are_lists_of_bounded_non_negative_numbers_of_one_length():
    sums = [1e4 + i for i in range(41)]  # summed NLL may exceed the count bound: they are sums, not counts
    metrics, clipped = plain_metrics(
        {"num-examples": 6, "val-n": 6, "val-calib-nll": sums}, count_bound=500, train=False
    )
    assert metrics["val-calib-nll"] == sums and clipped == []
    assert (
        plain_metrics({"num-examples": 6, "val-calib-nll": []}, count_bound=500, train=False)[0]["val-calib-nll"] == []
    )
    for bad, code in (
        ([-1.0], "bad_metric"),
        ([math.nan], "non_finite"),
        ([1e10], "bad_metric"),
        (["x"], "bad_metric"),
        (3.0, "bad_metric"),
    ):
        assert (
            rejected_code(
                lambda: plain_metrics({"num-examples": 6, "test-calib-after-count": bad}, count_bound=500, train=False)
            )
            == code
        ), bad
    problems = histogram_length_problems(
        {0: [{"val-calib-nll": [1.0] * 41}], 1: [{"val-calib-nll": [1.0] * 41}], 2: [{"val-calib-nll": [1.0] * 40}]}, {}
    )
    assert set(problems) == {2} and problems[2].code == "bad_histogram"
