import math

import numpy as np
import pytest

from fl_client.metrics import classification_metrics

NAMES = ("covid", "other_pneumonia", "normal")


def test_perfect_predictions():
    labels = np.array([0, 1, 2, 0, 1, 2])
    probs = np.eye(3)[labels] * 0.9 + 0.1 / 3
    m = classification_metrics(probs, labels, NAMES)
    assert m["accuracy"] == 1.0
    assert m["balanced-accuracy"] == 1.0
    assert m["auc-macro"] == 1.0
    assert m["n"] == 6
    assert m["loss"] < 0.2


def test_uninformative_predictions_give_chance_auc():
    labels = np.array([0, 1, 2] * 10)
    probs = np.full((30, 3), 1 / 3)
    m = classification_metrics(probs, labels, NAMES)
    assert m["auc-macro"] == pytest.approx(0.5)
    assert m["loss"] == pytest.approx(math.log(3))


def test_absent_class_gives_nan_not_a_number_made_up():
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.3, 0.6, 0.1]])
    m = classification_metrics(probs, labels, NAMES)
    assert math.isnan(m["auc-normal"])
    assert m["auc-covid"] == 1.0
    assert m["auc-macro"] == 1.0


def test_empty_split_has_all_keys():
    full = classification_metrics(np.eye(3)[[0, 1, 2]], np.array([0, 1, 2]), NAMES)
    empty = classification_metrics(np.zeros((0, 3)), np.zeros(0, dtype=int), NAMES)
    assert set(empty) == set(full)
    assert empty["n"] == 0 and math.isnan(empty["auc-macro"])


def test_shape_errors_name_the_shape():
    with pytest.raises(ValueError, match=r"\(n, 3\)"):
        classification_metrics(np.zeros((4, 2)), np.zeros(4, dtype=int), NAMES)
    with pytest.raises(ValueError, match="labels"):
        classification_metrics(np.zeros((4, 3)), np.zeros(3, dtype=int), NAMES)
