"""ml_backend.metrics.gate: paired-bootstrap promotion gate on shared eval scans."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from sklearn.metrics import f1_score

from ml_backend.metrics.gate import compare_models, describe

NAMES = ["glioma", "meningioma", "pituitary", "no_tumor", "covid_19", "old_class"]


def make_predictions(y: np.ndarray, accuracy: float, classes: list[int], *, seed: int) -> np.ndarray:
    """Correct with probability ``accuracy``, otherwise another of ``classes``."""
    rng = np.random.default_rng(seed)
    pred = y.copy()
    wrong = rng.random(len(y)) > accuracy
    for i in np.flatnonzero(wrong):
        pred[i] = rng.choice([c for c in classes if c != y[i]])
    return pred


def balanced_labels(counts: dict[int, int], *, seed: int = 0) -> np.ndarray:
    y = np.concatenate([np.full(n, c) for c, n in counts.items()]).astype(np.int64)
    return np.random.default_rng(seed).permutation(y)


def run(y, pc, pa, cand=(0, 1, 2, 3), act=(0, 1, 2, 3), **kwargs):
    return compare_models(y, pc, pa, class_names=NAMES, candidate_classes=set(cand),
                          active_classes=set(act), **kwargs)


def test_identical_models_never_regress():
    y = balanced_labels({0: 40, 1: 30, 2: 20, 3: 15})
    pred = make_predictions(y, 0.8, [0, 1, 2, 3], seed=1)
    result = run(y, pred, pred.copy())
    assert result["regression"] is False
    assert result["regressions"] == []
    assert result["macro_f1"]["delta"] == pytest.approx(0.0)
    assert result["macro_f1"]["upper"] == pytest.approx(0.0)
    assert all(row["delta"] == 0.0 and not row["regression"] for row in result["per_class"])
    assert result["mcnemar_p"] == 1.0
    assert result["num_scans"] == result["num_shared_scans"] == len(y)
    json.dumps(result)  # plain JSON types only
    assert describe(result, candidate="clf-4", active="clf-3").startswith("promoted:")


def test_one_scan_worse_on_small_class_is_noise():
    y = balanced_labels({0: 60, 1: 50, 2: 40, 3: 15})
    active = make_predictions(y, 0.85, [0, 1, 2, 3], seed=2)
    candidate = active.copy()
    right = np.flatnonzero((y == 3) & (active == 3))
    candidate[right[0]] = 0                       # one more mistake on the 15-scan class
    result = run(y, candidate, active)
    row = next(r for r in result["per_class"] if r["name"] == "no_tumor")
    assert row["delta"] < -0.02                   # the raw F1 drop is beyond the old tolerance
    assert row["support"] == 15
    assert not row["regression"]
    assert result["regression"] is False
    assert describe(result, candidate="clf-4", active="clf-3").startswith("promoted:")


def test_large_drop_on_big_class_is_a_regression():
    y = balanced_labels({0: 200, 1: 80, 2: 60, 3: 40})
    active = make_predictions(y, 0.9, [0, 1, 2, 3], seed=3)
    candidate = active.copy()
    rng = np.random.default_rng(4)
    big = np.flatnonzero(y == 0)
    flipped = rng.choice(big, size=80, replace=False)   # 40% of the 200-scan class
    candidate[flipped] = rng.choice([1, 2, 3], size=80)
    result = run(y, candidate, active)
    assert result["regression"] is True
    assert "glioma" in result["regressions"]
    row = next(r for r in result["per_class"] if r["name"] == "glioma")
    assert row["regression"] and row["upper"] < -0.02
    assert result["mcnemar_p"] < 1e-6
    text = describe(result, candidate="clf-4", active="clf-3")
    assert text.startswith("held back:")
    assert "glioma F1 fell from" in text and "200 scans" in text


def test_new_class_reported_with_recall_and_precision_never_regression():
    y = balanced_labels({0: 30, 1: 30, 2: 30, 3: 30, 4: 10})
    active = make_predictions(y, 0.9, [0, 1, 2, 3], seed=5)
    active[y == 4] = 0                            # the active model cannot know covid_19
    candidate = active.copy()
    covid = np.flatnonzero(y == 4)
    candidate[covid[:7]] = 4                      # 7 of 10 covid scans found
    others = np.flatnonzero(y == 1)
    candidate[others[:3]] = 4                     # 3 false alarms -> precision 7/10
    result = run(y, candidate, active, cand=(0, 1, 2, 3, 4))
    assert result["shared_classes"] == NAMES[:4]
    assert result["num_shared_scans"] == 120      # covid scans are not part of the comparison
    (new,) = result["new_classes"]
    assert new["name"] == "covid_19" and new["support"] == 10
    assert new["recall"] == pytest.approx(0.7)
    assert new["precision"] == pytest.approx(0.7)
    assert new["f1"] == pytest.approx(0.7)
    assert "covid_19" not in result["regressions"]
    assert all(r["name"] != "covid_19" for r in result["per_class"])
    text = describe(result, candidate="clf-4", active="clf-3")
    assert "newly learned: covid_19 (recall 0.70, precision 0.70, 10 scans)" in text


def test_dropped_class_with_support_is_a_regression():
    y = balanced_labels({0: 30, 1: 30, 5: 10})
    active = y.copy()
    candidate = np.where(y == 5, 0, y)
    result = run(y, candidate, active, cand=(0, 1), act=(0, 1, 5))
    assert result["dropped_classes"] == ["old_class"]
    assert result["regression"] is True and "old_class" in result["regressions"]
    assert describe(result, candidate="c", active="a").startswith("held back:")


def test_per_class_f1_matches_sklearn():
    y = balanced_labels({0: 50, 1: 35, 2: 20, 3: 12, 4: 8}, seed=6)
    candidate = make_predictions(y, 0.7, [0, 1, 2, 3, 4], seed=7)
    active = make_predictions(y, 0.75, [0, 1, 2, 3], seed=8)
    result = run(y, candidate, active, cand=(0, 1, 2, 3, 4))
    shared = [0, 1, 2, 3]
    mask = np.isin(y, shared)
    expected_c = f1_score(y[mask], candidate[mask], labels=shared, average=None, zero_division=0)
    expected_a = f1_score(y[mask], active[mask], labels=shared, average=None, zero_division=0)
    got_c = [row["candidate_f1"] for row in result["per_class"]]
    got_a = [row["active_f1"] for row in result["per_class"]]
    np.testing.assert_allclose(got_c, expected_c, atol=1e-12)
    np.testing.assert_allclose(got_a, expected_a, atol=1e-12)
    macro = f1_score(y[mask], candidate[mask], labels=shared, average="macro", zero_division=0)
    assert result["macro_f1"]["candidate"] == pytest.approx(macro)
    assert result["accuracy"]["candidate"] == pytest.approx(np.mean(candidate[mask] == y[mask]))
    assert result["macro_f1"]["lower"] <= result["macro_f1"]["upper"]


def test_deterministic_with_seed():
    y = balanced_labels({0: 40, 1: 30, 2: 20, 3: 15})
    candidate = make_predictions(y, 0.8, [0, 1, 2, 3], seed=9)
    active = make_predictions(y, 0.8, [0, 1, 2, 3], seed=10)
    first, second = run(y, candidate, active, seed=3), run(y, candidate, active, seed=3)
    assert first == second
    other = run(y, candidate, active, seed=4)
    assert other["macro_f1"]["upper"] != first["macro_f1"]["upper"]


def test_no_shared_scans():
    y = np.full(10, 4)
    pred = np.full(10, 4)
    result = run(y, pred, np.zeros(10, dtype=int), cand=(0, 4), act=(0,))
    assert result["num_shared_scans"] == 0 and result["regression"] is False
    assert result["macro_f1"]["candidate"] is None and result["mcnemar_p"] is None
    json.dumps(result)
    assert describe(result, candidate="c", active="a").startswith("promoted: no shared eval scans")


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        run(np.array([0, 1]), np.array([0]), np.array([0, 1]))
    with pytest.raises(ValueError):
        run(np.array([0, 9]), np.array([0, 1]), np.array([0, 1]))


def test_timing_sanity_500_scans():
    y = balanced_labels({c: 84 for c in range(6)})[:500]
    classes = list(range(6))
    candidate = make_predictions(y, 0.8, classes, seed=11)
    active = make_predictions(y, 0.8, classes, seed=12)
    start = time.perf_counter()
    result = compare_models(y, candidate, active, class_names=NAMES, candidate_classes=classes,
                            active_classes=classes, n_boot=1000)
    elapsed = time.perf_counter() - start
    print(f"compare_models N=500, 6 classes, 1000 resamples: {elapsed * 1000:.1f} ms")
    assert result["n_boot"] == 1000 and len(result["per_class"]) == 6


def test_a_small_eval_split_says_how_large_a_drop_it_can_see():
    """20 eval scans cannot guard against a 0.05 fall; the reason says so in words, and a
    split ten times larger does not need the note."""
    notes = {}
    for per_class in (10, 100):
        y = balanced_labels({0: per_class, 1: per_class})
        active = make_predictions(y, 0.85, [0, 1], seed=3)
        candidate = make_predictions(y, 0.85, [0, 1], seed=4)
        result = run(y, candidate, active, cand=(0, 1), act=(0, 1))
        notes[per_class] = (result["detectable_drop"],
                            describe(result, candidate="clf-4", active="clf-3"))
    small, large = notes[10], notes[100]
    assert small[0] > 0.10 > large[0] > 0.02
    assert f"only a macro-F1 drop larger than {small[0]:.2f}" in small[1]
    assert "label more eval scans" in small[1] and "told from noise" not in large[1]
