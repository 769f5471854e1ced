"""ml_backend.metrics.reports against sklearn, hand-computed ECE and temperature scaling."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

from ml_backend.metrics.reports import (
    classification_report,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    predicted_classes,
    reliability_bins,
)

NAMES = ["glioma", "meningioma", "none", "pituitary"]


def noisy_predictions(n=300, c=4, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c))
    logits[np.arange(n), y] += 1.5
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, proba, logits


def test_matches_sklearn_multiclass():
    y, proba, _ = noisy_predictions()
    pred = proba.argmax(1)
    report = classification_report(y, proba, NAMES)

    assert report["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert report["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert report["weighted_f1"] == pytest.approx(f1_score(y, pred, average="weighted"))
    assert report["cohen_kappa"] == pytest.approx(cohen_kappa_score(y, pred))
    assert report["macro_auc"] == pytest.approx(
        roc_auc_score(y, proba, multi_class="ovr", average="macro"))
    onehot = np.eye(4)[y]
    assert report["macro_ap"] == pytest.approx(
        average_precision_score(onehot, proba, average="macro"))
    assert report["confusion_matrix"] == confusion_matrix(y, pred).tolist()
    assert report["num_samples"] == 300
    precision, recall, f1, support = precision_recall_fscore_support(y, pred)
    for c, name in enumerate(NAMES):
        row = report["per_class"][name]
        assert row["precision"] == pytest.approx(precision[c])
        assert row["recall"] == pytest.approx(recall[c])
        assert row["f1"] == pytest.approx(f1[c])
        assert row["support"] == support[c]
        assert row["auc"] == pytest.approx(roc_auc_score(y == c, proba[:, c]))
        assert row["ap"] == pytest.approx(average_precision_score(y == c, proba[:, c]))
    assert list(report["per_class"]) == NAMES
    assert len(report["reliability"]) == 15
    assert sum(b["count"] for b in report["reliability"]) == 300
    # JSON-serialisable with no NaN anywhere.
    json.dumps(report, allow_nan=False)


def test_binary_auc_is_class_one():
    y, proba, _ = noisy_predictions(c=2, seed=3)
    report = classification_report(y, proba, ["normal", "pneumonia"])
    assert report["macro_auc"] == pytest.approx(roc_auc_score(y, proba[:, 1]))
    assert report["per_class"]["pneumonia"]["auc"] == pytest.approx(report["macro_auc"])


def test_perfect_predictions():
    y = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    proba = np.eye(4)[y]
    report = classification_report(y, proba, NAMES)
    for key in ("accuracy", "macro_f1", "weighted_f1", "cohen_kappa", "macro_auc", "macro_ap"):
        assert report[key] == pytest.approx(1.0), key
    assert report["ece"] == pytest.approx(0.0)
    assert expected_calibration_error(y, proba) == pytest.approx(0.0)
    assert report["confusion_matrix"] == (np.eye(4, dtype=int) * 2).tolist()


def test_hand_computed_ece():
    # Confidences 0.9 (right), 0.9 (wrong), 0.6 (right), 0.6 (right), 2 bins.
    y = np.array([0, 1, 0, 1])
    proba = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    # Bin (0.5, 1.0] holds all four: conf 0.75, acc 0.75 → ECE 0 with 2 bins.
    assert expected_calibration_error(y, proba, n_bins=2) == pytest.approx(0.0)
    # 10 bins: bin (0.8, 0.9]: conf 0.9 acc 0.5 → 2/4 * 0.4; bin (0.5, 0.6]: conf 0.6, acc 1
    # → 2/4 * 0.4. ECE = 0.4.
    assert expected_calibration_error(y, proba, n_bins=10) == pytest.approx(0.4)
    bins = reliability_bins(y, proba, n_bins=10)
    assert bins[8] == {"lower": pytest.approx(0.8), "upper": pytest.approx(0.9),
                       "confidence": pytest.approx(0.9), "accuracy": 0.5, "count": 2}
    assert bins[5]["count"] == 2 and bins[5]["accuracy"] == 1.0
    assert bins[0]["confidence"] is None and bins[0]["count"] == 0


def test_temperature_scaling_lowers_nll_on_overconfident_logits():
    y, _, logits = noisy_predictions(n=500, seed=1)
    overconfident = logits * 4.0
    before = negative_log_likelihood(overconfident, y)
    t = fit_temperature(overconfident, y)
    after = negative_log_likelihood(overconfident, y, t)
    assert t > 1.5
    assert after < before
    # Log-probabilities give the same temperature (softmax ignores a row shift).
    log_proba = overconfident - np.log(np.exp(overconfident).sum(1, keepdims=True))
    assert fit_temperature(log_proba, y) == pytest.approx(t, rel=1e-2)
    proba_t = np.exp(overconfident / t)
    proba_t /= proba_t.sum(1, keepdims=True)
    proba_1 = np.exp(overconfident) / np.exp(overconfident).sum(1, keepdims=True)
    assert expected_calibration_error(y, proba_t) < expected_calibration_error(y, proba_1)


def test_groups():
    y, proba, _ = noisy_predictions(n=200)
    groups = np.array(["site_a"] * 120 + ["site_b"] * 80)
    report = classification_report(y, proba, NAMES, groups=groups)
    pred = proba.argmax(1)
    assert set(report["per_group"]) == {"site_a", "site_b"}
    for name, part in (("site_a", slice(0, 120)), ("site_b", slice(120, 200))):
        row = report["per_group"][name]
        assert row["n"] == part.stop - part.start
        assert row["accuracy"] == pytest.approx(accuracy_score(y[part], pred[part]))
        assert row["macro_f1"] == pytest.approx(f1_score(y[part], pred[part], average="macro"))
    assert "per_group" not in classification_report(y, proba, NAMES)


def test_absent_class_does_not_crash():
    rng = np.random.default_rng(2)
    y = rng.choice([0, 1, 3], size=60)          # class 2 never occurs
    proba = rng.dirichlet(np.ones(4), size=60)
    report = classification_report(y, proba, NAMES, groups=np.where(y == 0, "a", "b"))
    assert report["per_class"]["none"]["support"] == 0
    assert report["per_class"]["none"]["auc"] is None
    assert report["per_class"]["none"]["ap"] is None
    present = [roc_auc_score(y == c, proba[:, c]) for c in (0, 1, 3)]
    assert report["macro_auc"] == pytest.approx(np.mean(present))
    assert 0 <= report["macro_f1"] <= 1
    # Group "a" has a single class: AUC undefined, kappa-free core still there.
    assert report["per_group"]["a"]["macro_auc"] is None
    assert report["per_group"]["a"]["accuracy"] is not None
    json.dumps(report, allow_nan=False)


def test_single_class_and_empty_inputs_give_none_not_nan():
    y = np.zeros(5, dtype=int)
    proba = np.tile([0.8, 0.2], (5, 1))
    report = classification_report(y, proba, ["a", "b"])
    assert report["accuracy"] == 1.0
    assert report["macro_auc"] is None
    assert report["cohen_kappa"] is None or not math.isnan(report["cohen_kappa"])
    json.dumps(report, allow_nan=False)
    empty = classification_report(np.zeros(0, int), np.zeros((0, 2)), ["a", "b"])
    assert empty["num_samples"] == 0 and empty["accuracy"] is None
    json.dumps(empty, allow_nan=False)


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        classification_report(np.array([0, 1]), np.ones((3, 2)) / 2, ["a", "b"])
    with pytest.raises(ValueError):
        classification_report(np.array([0, 2]), np.ones((2, 2)) / 2, ["a", "b"])
    with pytest.raises(ValueError):
        classification_report(np.array([0, 1]), np.ones((2, 2)) / 2, ["a"])


# --- a label set the model has not learned: no prediction, never another set's class ----

CHEST = ["normal", "pneumonia"]
BRAIN = ["glioma", "meningioma", "no_tumor", "pituitary"]


def chest_only_model(seed=0):
    """The demo's shape: 40 chest and 40 brain eval scans; the model learned the chest set
    only, so (as SetHeads and restrict_to_sets do) a brain scan's row has no probability."""
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.repeat([0, 1], 20), np.repeat([2, 3, 4, 5], 10)])
    proba = np.zeros((80, 6))
    pneumonia = rng.uniform(0.05, 0.95, 40)
    pneumonia[20:] = np.clip(pneumonia[20:] + 0.3, 0, 0.99)      # better than chance
    proba[:40, 0], proba[:40, 1] = 1 - pneumonia, pneumonia
    groups = np.array(["chest"] * 40 + ["brain"] * 40)
    return y, proba, groups


def test_predicted_classes_give_no_prediction_for_a_row_of_zeros():
    proba = np.array([[0.2, 0.8], [0.0, 0.0], [1.0, 0.0]])
    assert predicted_classes(proba).tolist() == [1, -1, 0]
    assert predicted_classes(np.zeros((0, 3))).tolist() == []


def test_an_unlearned_label_set_is_no_prediction_and_counted_as_missed():
    y, proba, groups = chest_only_model()
    report = classification_report(y, proba, CHEST + BRAIN, groups=groups)
    matrix = np.array(report["confusion_matrix"])
    # no brain scan is shown as predicted to be a chest class (or any class)
    assert matrix.shape == (6, 6)
    assert matrix[2:].sum() == 0, matrix
    assert report["no_prediction"] == [0, 0, 10, 10, 10, 10]
    assert report["num_no_prediction"] == 40
    for c, name in enumerate(CHEST + BRAIN):
        row = report["per_class"][name]
        assert matrix[c].sum() + row["no_prediction"] == row["support"]
    # chest figures are those of the chest scans alone: no brain scan lowers their precision
    chest_pred = proba[:40, :2].argmax(1)
    precision, recall, _, _ = precision_recall_fscore_support(y[:40], chest_pred)
    for c, name in enumerate(CHEST):
        assert report["per_class"][name]["precision"] == pytest.approx(precision[c])
        assert report["per_class"][name]["recall"] == pytest.approx(recall[c])
    # brain scans are misses: recall 0 for their class, wrong for accuracy, in the F1 mean
    for name in BRAIN:
        assert report["per_class"][name]["recall"] == 0.0
        assert report["per_class"][name]["no_prediction"] == 10
    assert report["accuracy"] == pytest.approx((chest_pred == y[:40]).sum() / 80)
    assert report["macro_f1"] == pytest.approx(f1_score(y[:40], chest_pred, labels=[0, 1],
                                                        average="macro") * 2 / 6)
    with_none = np.concatenate([chest_pred, np.full(40, 6)])
    assert report["cohen_kappa"] == pytest.approx(
        cohen_kappa_score(y, with_none, labels=list(range(7))))
    # calibration is over the answers given
    assert report["ece"] == pytest.approx(expected_calibration_error(y[:40], proba[:40]))
    assert sum(b["count"] for b in report["reliability"]) == 40
    assert report["nll"] == pytest.approx(negative_log_likelihood(
        np.log(np.clip(proba[:40, :2], 1e-12, 1)), y[:40]), rel=1e-6)
    assert report["per_group"]["brain"]["no_prediction"] == 40
    json.dumps(report, allow_nan=False)


def test_per_set_and_per_site_agree_on_the_same_scans():
    """The per-label-set table scores a set on its own columns; the per-site table slices
    the overall report: for the same scans they are the same numbers."""
    y, proba, groups = chest_only_model(seed=4)
    overall = classification_report(y, proba, CHEST + BRAIN, groups=groups)
    chest = classification_report(y[:40], proba[:40, :2], CHEST)
    brain = classification_report(y[40:] - 2, proba[40:, 2:], BRAIN)
    for name, per_set in (("chest", chest), ("brain", brain)):
        site = overall["per_group"][name]
        for key in ("accuracy", "macro_f1", "macro_auc"):
            assert site[key] == pytest.approx(per_set[key]), (name, key)
        assert site["no_prediction"] == per_set["num_no_prediction"]
    assert brain["accuracy"] == 0.0 and brain["macro_f1"] == 0.0
    assert brain["confusion_matrix"] == [[0] * 4] * 4            # not all in "glioma"
    assert brain["no_prediction"] == [10] * 4
    assert brain["ece"] is None and brain["nll"] is None
    assert all(b["count"] == 0 for b in brain["reliability"])
    json.dumps(brain, allow_nan=False)


def test_a_class_auc_is_over_the_scans_it_applies_to():
    """Brain scans score 0 on the chest classes: counted as negatives they would be easy
    ones and lift the chest classes' AUC. With ``applies`` (the scan's label set) each
    class's AUC and AP are over its own set's scans, as the per-set table has them."""
    y, proba, groups = chest_only_model(seed=2)
    applies = np.zeros_like(proba, dtype=bool)
    applies[:40, :2] = True
    applies[40:, 2:] = True
    lifted = classification_report(y, proba, CHEST + BRAIN, groups=groups)
    honest = classification_report(y, proba, CHEST + BRAIN, groups=groups, applies=applies)
    chest = classification_report(y[:40], proba[:40, :2], CHEST)
    for name in CHEST:
        assert honest["per_class"][name]["auc"] == pytest.approx(chest["per_class"][name]["auc"])
        assert honest["per_class"][name]["ap"] == pytest.approx(chest["per_class"][name]["ap"])
        assert lifted["per_class"][name]["auc"] > chest["per_class"][name]["auc"]
    # the brain classes, with no score at all on their scans, are at chance (0.5)
    assert honest["macro_auc"] == pytest.approx((sum(
        chest["per_class"][name]["auc"] for name in CHEST) + 4 * 0.5) / 6)
    with pytest.raises(ValueError, match="applies"):
        classification_report(y, proba, CHEST + BRAIN, applies=applies[:, :2])
