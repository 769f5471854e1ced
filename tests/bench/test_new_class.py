from __future__ import annotations

import json

import numpy as np
import pytest

from bench import new_class
from tests.base import FIXTURES


def fixture_args(tmp_path, out) -> list[str]:
    """The brain MRI fixtures, a 1-epoch encoder at 32 px, no_tumor held out."""
    return ["--train", str(FIXTURES / "brain_mri" / "pool"),
            "--eval", str(FIXTURES / "brain_mri" / "eval"), "--image-size", "32",
            "--small-input", "no", "--epochs", "1", "--batch-size", "32",
            "--holdout", "no_tumor", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]


@pytest.mark.slow
def test_new_class_benchmark_runs_and_reports(tmp_path):
    out = tmp_path / "nc.json"
    assert new_class.main(fixture_args(tmp_path, out) + ["--seeds", "2",
                                                         "--new-labels", "5,10"]) == 0
    data = json.loads(out.read_text())
    assert set(data["summary"]) == {"no_tumor@5", "no_tumor@10"}
    assert len(data["rows"]) == 4
    for row in data["rows"]:
        assert 0 <= row["recall"] <= 1 and 0 <= row["candidates_precision_at_20"] <= 1
        assert 0 <= row["old_macro_f1_after"] <= 1


@pytest.mark.slow
def test_heads_are_compared_on_the_same_picks(tmp_path):
    out = tmp_path / "heads.json"
    assert new_class.main(fixture_args(tmp_path, out) + [
        "--seeds", "1", "--new-labels", "5", "--heads", "linear,blend:50"]) == 0
    data = json.loads(out.read_text())
    assert set(data["summary"]) == {"linear|no_tumor@5", "blend:50|no_tumor@5"}
    linear, blend = (next(r for r in data["rows"] if r["head"] == h) for h in ("linear", "blend:50"))
    # same picks: the candidates (nearest scans to the K examples) are identical
    assert linear["candidates_precision_at_20"] == blend["candidates_precision_at_20"]
    with pytest.raises(SystemExit, match="unknown head"):
        new_class.head_options("forest")


def test_head_entries_parse_strength_and_the_shared_covariance_head():
    assert new_class.head_options("balance:0.5@0.2") == {"balance": 0.5, "folds": 4, "c": 0.2}
    assert new_class.head_options("linear+px@2") == {"prototype_n0": 0.0, "folds": 0,
                                                     "pixels": True, "c": 2.0}
    with pytest.raises(SystemExit, match="not lda"):
        new_class.head_options("lda:0.5+px")
    assert new_class.head_options("lda:auto") == {"lda": "auto"}
    with pytest.raises(SystemExit, match="not lda"):
        new_class.head_options("lda:0.5@0.1")
    # three classes sharing one elongated covariance; the third has 5 labels beside 200 each
    rng = np.random.default_rng(0)
    spread = np.array([[3.0, 0.0], [0.0, 0.4]])
    centres = np.array([[0.0, 0.0], [0.0, 2.5], [0.0, -2.5]])
    x = np.concatenate([c + rng.normal(size=(n, 2)) @ spread for c, n in zip(centres, (200, 200, 5))])
    y = np.repeat([0, 1, 2], (200, 200, 5))
    test = np.concatenate([c + rng.normal(size=(300, 2)) @ spread for c in centres])
    truth = np.repeat([0, 1, 2], 300)
    head = new_class.fit_one(x, y, seed=0, **new_class.head_options("lda:0.0"))
    assert list(head.class_ids) == [0, 1, 2]
    proba = head.predict_proba(test)
    assert np.allclose(proba.sum(1), 1)
    # the 5-label class borrows the shared spread: most of its test points are found
    assert (proba.argmax(1)[truth == 2] == 2).mean() > 0.7


def test_self_training_adds_the_confident_pool_scans_as_pseudo_labels():
    rng = np.random.default_rng(0)
    centres = np.array([[4.0, 0.0], [0.0, 4.0], [-4.0, -4.0]])
    x = np.concatenate([c + rng.normal(size=(30, 2)) for c in centres])
    y = np.repeat([0, 1, 2], 30)
    labeled = np.r_[0:10, 30:40, 60:70]
    pool = np.setdiff1d(np.arange(90), labeled)
    options = new_class.head_options("selftrain:0.85")
    head, pseudo = new_class.fit(x[labeled], y[labeled], x[pool], seed=0, **options)
    # well-separated clusters: most of the pool is confident, and the refit still separates them
    # (30 right answers out of fold leave the posterior temperature a little above 1)
    assert 30 <= pseudo <= len(pool)
    assert (head.class_ids[head.predict_proba(x).argmax(1)] == y).mean() > 0.95
    _, none = new_class.fit(x[labeled], y[labeled], x[pool], seed=0,
                            **new_class.head_options("product"))
    assert none == 0
    # a threshold no probability reaches adds nothing
    _, nothing = new_class.fit(x[labeled], y[labeled], x[pool], seed=0,
                               **{**options, "selftrain": 1.01})
    assert nothing == 0


def test_the_shares_head_reads_the_pool_it_is_given_and_the_labels_without_one():
    """--heads shares: balance 1 with the offsets fit for the project's shares, the pool
    passed by ``fit``; the same head fit without a pool (the bench's "before" and ceiling
    heads) takes the labels' shares."""
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 16)) * 0.6
    x = np.concatenate([c + rng.normal(size=(n, 16)) for c, n in zip(centres, (150, 150, 10))])
    y = np.repeat([0, 1, 2], (150, 150, 10))
    pool = centres[2] + rng.normal(size=(150, 16))
    options = new_class.head_options("shares")
    assert options == {"balance": 1.0, "folds": 4, "shares": True}
    with_pool, _ = new_class.fit(x, y, pool, seed=0, **options)
    without = new_class.fit_one(x, y, seed=0, **options)
    test = centres[2] + rng.normal(size=(200, 16))
    found = [(h.predict_proba(test).argmax(1) == 2).mean() for h in (with_pool, without)]
    assert found[0] > found[1] + 0.2, found


@pytest.mark.slow
def test_a_partly_labeled_project_with_self_training_and_the_ceiling(tmp_path):
    out = tmp_path / "semi.json"
    assert new_class.main(fixture_args(tmp_path, out) + [
        "--seeds", "1", "--new-labels", "5", "--old-labels-fraction", "0.5",
        "--heads", "product,selftrain:0.6"]) == 0
    data = json.loads(out.read_text())
    assert set(data["summary"]) == {"product|no_tumor@5", "selftrain:0.6|no_tumor@5"}
    assert set(data["ceiling"]) == {"product|no_tumor", "selftrain:0.6|no_tumor"}
    product, selftrain = (next(r for r in data["rows"] if r["head"] == h)
                          for h in ("product", "selftrain:0.6"))
    assert product["pseudo_labels"] == 0 and selftrain["pseudo_labels"] >= 0
    assert 0 <= product["ceiling_recall"] <= 1
    assert product["ceiling_recall"] == data["ceiling"]["product|no_tumor"]["recall"]
    with pytest.raises(SystemExit, match="old-labels-fraction"):
        new_class.main(fixture_args(tmp_path, out) + ["--old-labels-fraction", "0"])


def test_reviewing_candidates_labels_the_nearest_scans_with_their_true_class():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(size=(40, 4)) + [5, 0, 0, 0],
                        rng.normal(size=(40, 4)) + [0, 5, 0, 0]])
    y = np.repeat([0, 1], 40)
    labeled = np.array([0, 1, 40, 41])
    rounds = list(new_class.confirm_candidates(x, y, labeled, 1, rounds=5, top=20))
    # 76 unlabeled scans: rounds of 20, 20, 20, 16, then the pool is empty
    assert [len(rows) for rows, _ in rounds] == [24, 44, 64, 80]
    first_rows, found = rounds[0]
    # the 20 nearest to class 1's examples are class 1 (well-separated clusters)
    assert found == 20 and set(y[first_rows[4:]]) == {1}
    assert len(set(rounds[-1][0].tolist())) == 80


@pytest.mark.slow
def test_the_review_rounds_are_reported(tmp_path):
    out = tmp_path / "review.json"
    assert new_class.main(fixture_args(tmp_path, out) + [
        "--seeds", "1", "--new-labels", "3", "--confirm-rounds", "2",
        "--heads", "linear+px", "--review-order", "margin"]) == 0
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    assert [r["round"] for r in row["confirm_rounds"]] == [1, 2]
    first, second = (r["answers"] for r in row["confirm_rounds"])
    # 3 picks + 20 answers; the second round answers what is left of the small fixture pool
    assert first == 23 and 23 < second <= 43
    assert all(3 <= r["new_labels"] <= 43 and 0 <= r["recall"] <= 1
               for r in row["confirm_rounds"])
    assert len(data["summary"]["no_tumor@3"]["after_review"]) == 2


def test_review_orders_spread_or_draw_their_picks():
    rng = np.random.default_rng(2)
    # class 1: a tight clump of near-copies by its example, and a spread-out remainder
    clump = np.array([5.0, 0, 0]) + 0.01 * rng.normal(size=(30, 3))
    spread = np.array([5.0, 0, 0]) + 2.0 * rng.normal(size=(30, 3))
    other = np.array([-5.0, 0, 0]) + rng.normal(size=(40, 3))
    x = np.concatenate([clump, spread, other])
    y = np.repeat([1, 1, 0], [30, 30, 40])
    labeled = np.array([0, 60])
    (nearest, _), = new_class.confirm_candidates(x, y, labeled, 1, rounds=1, top=10)
    (diverse, _), = new_class.confirm_candidates(x, y, labeled, 1, rounds=1, top=10,
                                                 order="diverse")
    (drawn, _), = new_class.confirm_candidates(x, y, labeled, 1, rounds=1, top=10,
                                               order="random", seed=3)
    # nearest spends the round on the clump; diverse leaves it for the spread-out scans
    assert set(nearest[2:]) <= set(range(30))
    assert len(set(diverse[2:]) - set(range(30))) >= 5
    assert len(set(drawn[2:])) == 10 and not set(drawn[2:]) & set(labeled)
    with pytest.raises(ValueError, match="order"):
        next(new_class.confirm_candidates(x, y, labeled, 1, rounds=1, order="best"))


def test_the_margin_order_asks_about_the_scans_between_the_classes():
    from ml_backend.active.refit import fit_head

    rng = np.random.default_rng(4)
    x = np.concatenate([rng.normal(size=(50, 2)) + [3, 0], rng.normal(size=(50, 2)) - [3, 0]])
    y = np.repeat([1, 0], 50)
    labeled = np.array([0, 1, 2, 50, 51, 52])
    fitted = []

    def fit_labeled(rows):
        fitted.append(len(rows))
        return fit_head(x[rows], y[rows], folds=0)[0]

    (rows, _), (rows2, _) = new_class.confirm_candidates(
        x, y, labeled, 1, rounds=2, top=10, order="margin", fit_labeled=fit_labeled)
    assert fitted == [6, 16]            # refit on the labels so far before each round
    picked = x[rows[6:], 0]
    # the ten asked about first lie nearer the boundary (x = 0) than the pool does on average
    pool = np.setdiff1d(np.arange(100), labeled)
    assert np.abs(picked).mean() < 0.8 * np.abs(x[pool, 0]).mean()


@pytest.mark.slow
def test_the_finetuned_network_is_a_head_beside_the_embedding_heads(tmp_path):
    out = tmp_path / "ft.json"
    assert new_class.main(fixture_args(tmp_path, out) + [
        "--seeds", "1", "--new-labels", "5", "--heads", "finetuned,linear",
        "--finetune-epochs", "1"]) == 0
    data = json.loads(out.read_text())
    assert set(data["summary"]) == {"finetuned|no_tumor@5", "linear|no_tumor@5"}
    tuned = next(r for r in data["rows"] if r["head"] == "finetuned")
    assert 0 <= tuned["recall"] <= 1 and 0 <= tuned["old_macro_f1_before"] <= 1
    assert 0 <= data["ceiling"]["finetuned|no_tumor"]["recall"] <= 1
    with pytest.raises(SystemExit, match="not finetuned"):
        new_class.main(fixture_args(tmp_path, out) + ["--heads", "finetuned",
                                                      "--confirm-rounds", "1"])

