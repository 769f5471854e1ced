"""bench.al_sim: one simulated active-learning run on the tiny brain MRI fixture, plus helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from bench import al_sim
from tests.base import FIXTURES

POOL = FIXTURES / "brain_mri" / "pool"
EVAL = FIXTURES / "brain_mri" / "eval"
STRATEGIES = ["random", "entropy", "hybrid"]
SEEDS = 2
COUNTS = [8, 16, 24, 32, 40]


def in_unit_interval_or_none(value) -> bool:
    return value is None or 0.0 <= value <= 1.0


@pytest.mark.slow
def test_simulation_on_fixture(tmp_path, capsys):
    out, plot = tmp_path / "al.json", tmp_path / "al.png"
    argv = ["--train", str(POOL), "--eval", str(EVAL), "--image-size", "32",
            "--small-input", "no", "--epochs", "1", "--batch-size", "32", "--device", "cpu",
            "--start", "8", "--step", "8", "--budget", "40", "--seeds", str(SEEDS),
            "--strategies", ",".join(STRATEGIES), "--cache-dir", str(tmp_path / "cache"),
            "--out", str(out), "--plot", str(plot)]
    assert al_sim.main(argv) == 0
    printed = capsys.readouterr().out
    assert "labels to reach random@40" in printed and "AUC (mean ± std over 2 seeds)" in printed

    result = json.loads(out.read_text())
    assert {"args", "machine", "data", "encoder", "strategies", "curves", "summary", "runs",
            "plot", "timings"} <= set(result)
    assert result["data"]["num_train"] == 160 and result["data"]["num_eval"] == 40

    # every strategy and seed ran, with a point after every refit from 8 to 40 labels
    assert sorted((r["strategy"], r["seed"]) for r in result["runs"]) == sorted(
        (s, seed) for s in STRATEGIES for seed in range(SEEDS))
    for run in result["runs"]:
        assert [p["labels"] for p in run["points"]] == COUNTS
        for point in run["points"]:
            for metric in ("auc", "macro_f1", "accuracy"):
                assert in_unit_interval_or_none(point[metric]), (run["strategy"], point)
        # no scan is ever queried twice within a run
        picked = [i for q in run["queries"] for i in q["indices"]]
        assert len(picked) == 40 and len(set(picked)) == 40
        assert picked == run["labeled_order"]
        assert all(0 <= i < 160 for i in picked)
        first = run["queries"][0]["strategy_used"]
        assert first == ("random" if run["strategy"] == "random" else "cold_start")
        # with 4 classes in 40 labels, the head exists at the budget
        assert run["points"][-1]["auc"] is not None

    # cold start is shared by every non-random strategy of one seed
    for seed in range(SEEDS):
        starts = {r["strategy"]: r["queries"][0]["indices"] for r in result["runs"]
                  if r["seed"] == seed}
        assert starts["entropy"] == starts["hybrid"]

    assert set(result["curves"]) == set(STRATEGIES)
    for curve in result["curves"].values():
        assert curve["labels"] == COUNTS and curve["seeds"] == SEEDS
        for metric in ("auc", "macro_f1", "accuracy"):
            assert len(curve[metric]["mean"]) == len(COUNTS)
            assert all(in_unit_interval_or_none(v) for v in curve[metric]["mean"])

    summary = result["summary"]
    assert summary["budget_labels"] == 40
    assert set(summary["labels_to_reach_baseline"]) == set(STRATEGIES)
    for row in summary["labels_to_reach_baseline"].values():
        for metric in ("auc", "macro_f1"):
            assert row[metric] in COUNTS or row[metric] == ">40"
    # random reaches its own score at the budget by the budget at the latest
    assert summary["labels_to_reach_baseline"]["random"]["auc"] in COUNTS
    assert summary["cold_start_gain"]["random"]["auc"] in (0.0, None)

    with Image.open(plot) as image:
        image.verify()
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size[0] >= 600


@pytest.mark.parametrize("strategy", ["random", "margin", "hybrid", "coreset"])
def test_one_class_start_records_none_and_keeps_querying(strategy):
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 30)
    x = (rng.normal(size=(60, 16)) + 3.0 * y[:, None]).astype(np.float32)
    run = al_sim.simulate(strategy, 0, x, y, x, y, ["a", "b"], start=1, step=3, budget=11)
    assert [p["labels"] for p in run["points"]] == [1, 4, 7, 10, 11]
    first = run["points"][0]
    assert first["classes_labeled"] == 1
    assert first["auc"] is None and first["macro_f1"] is None and first["accuracy"] is None
    assert run["queries"][1]["strategy_used"] == ("random" if strategy == "random"
                                                  else "diversity")
    assert len(set(run["labeled_order"])) == 11
    defined = [p for p in run["points"] if p["auc"] is not None]
    assert defined and all(0.0 <= p["auc"] <= 1.0 for p in defined)


def test_typical_picks_on_the_joined_input():
    """``hybrid+px``: the typical picks cluster the embedding and the thumbnail side by side.
    Here only the thumbnails hold the classes (the embedding is noise), so its first batch
    covers both classes in every seed, and the strategy parses with and without ``@T``."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 40)
    x = rng.normal(size=(80, 8)).astype(np.float32)
    thumbs = (rng.normal(0, 0.05, (80, 16)) + 0.8 * y[:, None]).astype(np.float32)
    assert al_sim.strategy_spec("hybrid@5+px") == ("hybrid", 5, True)
    assert al_sim.strategy_spec("hybrid+px1") == ("hybrid", al_sim.PRODUCT_TYPICAL_BELOW,
                                                   "first")
    assert al_sim.strategy_spec("hybrid") == ("hybrid", al_sim.PRODUCT_TYPICAL_BELOW, False)
    assert al_sim.parse_strategies("random,hybrid+px") == ["random", "hybrid+px"]
    for seed in range(3):
        run = al_sim.simulate("hybrid+px", seed, x, y, x, y, ["a", "b"], start=2, step=2,
                              budget=6, thumbs_train=thumbs)
        assert sorted(y[run["queries"][0]["indices"]]) == [0, 1]
        # ``+px1``: the same first batch, then the embedding alone
        first_only = al_sim.simulate("hybrid+px1", seed, x, y, x, y, ["a", "b"], start=2,
                                     step=2, budget=6, thumbs_train=thumbs)
        assert first_only["queries"][0]["indices"] == run["queries"][0]["indices"]
    with pytest.raises(ValueError, match="thumbnails"):
        al_sim.simulate("hybrid+px", 0, x, y, x, y, ["a", "b"], start=2, step=2, budget=6)


def test_labels_to_reach_on_a_hand_made_curve():
    labels = [20, 30, 40, 50, 60]
    values = [None, 0.70, 0.82, 0.79, 0.90]
    assert al_sim.labels_to_reach(labels, values, 0.80) == 40
    assert al_sim.labels_to_reach(labels, values, 0.70) == 30      # None is skipped; >= counts
    assert al_sim.labels_to_reach(labels, values, 0.60) == 30
    assert al_sim.labels_to_reach(labels, values, 0.90) == 60
    assert al_sim.labels_to_reach(labels, values, 0.95) is None    # never reached
    assert al_sim.labels_to_reach(labels, values, None) is None


def test_summary_reports_never_reached_as_over_budget():
    def curve(auc, f1):
        return {"labels": [10, 20, 30], "seeds": 1,
                "auc": {"mean": auc, "std": [0.0] * 3, "n": [1] * 3},
                "macro_f1": {"mean": f1, "std": [0.0] * 3, "n": [1] * 3},
                "accuracy": {"mean": f1, "std": [0.0] * 3, "n": [1] * 3}}

    curves = {"random": curve([0.6, 0.7, 0.8], [0.5, 0.6, 0.7]),
              "entropy": curve([0.7, 0.85, 0.9], [0.4, 0.5, 0.6])}
    summary = al_sim.summarise(curves, start=10, budget=30)
    assert summary["baseline_at_budget"] == {"auc": 0.8, "macro_f1": 0.7}
    assert summary["labels_to_reach_baseline"]["entropy"]["auc"] == 20
    assert summary["labels_to_reach_baseline"]["entropy"]["macro_f1"] == ">30"
    assert summary["labels_to_reach_baseline"]["random"]["auc"] == 30
    assert summary["cold_start_gain"]["entropy"]["auc"] == pytest.approx(0.1)
    assert summary["cold_start_gain"]["entropy"]["macro_f1"] == pytest.approx(-0.1)
    text = al_sim.format_table(curves, summary, seeds=1)
    assert ">30" in text and "+0.100" in text


def test_unknown_strategy_is_rejected():
    with pytest.raises(SystemExit):
        al_sim.build_parser().parse_args(["--train", "x", "--eval", "y",
                                          "--strategies", "random,oracle"])


def test_nice_ticks_are_round_and_cover_the_range():
    ticks = al_sim.nice_ticks(0.62, 0.91)
    assert ticks[0] >= 0.62 - 1e-9 and ticks[-1] <= 0.91 + 1e-9 and len(ticks) >= 3
    assert al_sim.nice_ticks(20, 200, 6) == [50, 100, 150, 200]
