"""bench.al_sim on a multi-label (findings) source: the product's findings query replayed
round by round, its metrics, and the command end to end on an NIH-shaped CSV."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from bench import al_sim
from ml_backend.active.findings import FINDINGS_STRATEGY_FOR, fit_findings_head, query_findings
from ml_backend.data.findings import CHESTX_RAY14_FINDINGS
from tests.base import FIXTURES

STARTER = "ml_backend/starter/simclr-resnet18-64px.pt"


def findings_arrays(n: int, seed: int, dims: int = 16):
    """Embeddings and ``(n, 14)`` ChestX-ray14 targets: each finding present where its own
    direction of the embedding is high, at NIH-like prevalences (about 3-25 %)."""
    rng = np.random.default_rng(seed)
    directions = np.random.default_rng(99).normal(size=(dims, 14))
    offsets = np.linspace(-3.5, -1.0, 14)
    x = rng.normal(size=(n, dims))
    logits = x @ directions / np.sqrt(dims) * 2.0 + offsets
    y = (rng.random((n, 14)) < 1 / (1 + np.exp(-logits))).astype(np.float64)
    return x.astype(np.float32), y


def replayed_query(run: dict, strategy: str, x: np.ndarray, y: np.ndarray, query: dict):
    """What ``services.queries._query_set`` would pick for ``query``'s round: the refit's
    findings head on the scans labeled before it, the pool ranked by ``query_findings``
    (cardinality: against the labeled scans' mean number of findings, as the refit records
    it)."""
    labeled = run["labeled_order"][:query["labels_before"]]
    pool = np.setdiff1d(np.arange(len(y)), labeled)        # the pool, in row order
    head, _ = fit_findings_head(x[labeled], y[labeled], np.array(CHESTX_RAY14_FINDINGS),
                                seed=run["seed"])
    picked, _, _ = query_findings(strategy, head.predict_proba(x[pool]),
                                  CHESTX_RAY14_FINDINGS, len(query["indices"]),
                                  mean_cardinality=float((y[labeled] == 1).sum(axis=1).mean()))
    return pool[picked].tolist()


@pytest.mark.parametrize("strategy", ["entropy", "margin", "hybrid"])
def test_each_round_queries_as_the_product_does_on_a_findings_set(strategy):
    x, y = findings_arrays(150, 0)
    x_eval, y_eval = findings_arrays(80, 1)
    run = al_sim.simulate(strategy, 0, x, y, x_eval, y_eval, CHESTX_RAY14_FINDINGS,
                          start=12, step=8, budget=36)
    assert [p["labels"] for p in run["points"]] == [12, 20, 28, 36]
    for point in run["points"]:
        assert set(al_sim.FINDINGS_METRICS) <= set(point) and "auc" not in point
        assert point["findings_learnable"] >= 1
        assert all(0.0 <= point[m] <= 1.0 for m in al_sim.FINDINGS_METRICS), point
    # the product's cold start, then the findings score FINDINGS_STRATEGY_FOR names
    used = [q["strategy_used"] for q in run["queries"]]
    assert used == ["cold_start"] + [FINDINGS_STRATEGY_FOR[strategy]] * 3
    for query in run["queries"][1:]:
        assert query["indices"] == replayed_query(run, strategy, x, y, query)
    assert len(set(run["labeled_order"])) == 36


def test_random_and_the_findings_strategies_run_side_by_side():
    x, y = findings_arrays(150, 0)
    x_eval, y_eval = findings_arrays(80, 1)
    thumbs = np.abs(x[:, :8])                  # hybrid+px1: a thumbnail beside the embedding
    runs = [al_sim.simulate(s, seed, x, y, x_eval, y_eval, CHESTX_RAY14_FINDINGS, start=12,
                            step=12, budget=24, thumbs_train=thumbs)
            for seed in range(2) for s in ("random", "entropy", "hybrid+px1")]
    assert {q["strategy_used"] for r in runs if r["strategy"] == "random"
            for q in r["queries"]} == {"random"}
    curves = al_sim.learning_curves(runs, ["random", "entropy", "hybrid+px1"],
                                    al_sim.FINDINGS_METRICS)
    for curve in curves.values():
        assert curve["labels"] == [12, 24] and curve["seeds"] == 2
        for metric in al_sim.FINDINGS_METRICS:
            assert curve[metric]["n"] == [2, 2]
    summary = al_sim.summarise(curves, 12, 24, al_sim.FINDINGS_METRICS)
    assert set(summary["baseline_at_budget"]) == set(al_sim.FINDINGS_METRICS)
    assert summary["labels_to_reach_baseline"]["random"]["macro_auc"] in (12, 24)
    text = al_sim.format_table(curves, summary, 2, al_sim.FINDINGS_TITLES)
    assert "any-finding AUC (mean ± std over 2 seeds)" in text and "labels any" in text


def test_no_head_until_a_finding_is_seen_present_and_absent():
    """One scan labeled: no finding is known both ways, so the product has no findings head;
    the point is undefined and the next batch is typical picks (random for random)."""
    x, y = findings_arrays(90, 2)
    for strategy in ("random", "entropy"):
        run = al_sim.simulate(strategy, 0, x, y, x, y, CHESTX_RAY14_FINDINGS, start=1,
                              step=8, budget=17)
        first = run["points"][0]
        assert first["findings_learnable"] == 0
        assert all(first[m] is None for m in al_sim.FINDINGS_METRICS)
        assert run["queries"][1]["strategy_used"] == ("random" if strategy == "random"
                                                      else "diversity")
        assert run["points"][-1]["macro_auc"] is not None


def test_the_metrics_are_macro_auc_over_findings_with_positives_and_any_finding():
    x, y = findings_arrays(150, 0)
    x_eval, y_eval = findings_arrays(120, 3)
    y_eval[:, 13] = 0.0                               # Hernia: no eval positive, as on NIH val
    y_eval[:, 12] = 0.0
    y_eval[:3, 12] = 1.0                              # 3 positives: in the macro, not the 5+
    y_eval[5, 0] = np.nan                             # an unknown answer is left out
    head, _ = fit_findings_head(x, y, np.array(CHESTX_RAY14_FINDINGS), seed=0)
    proba = head.predict_proba(x_eval)
    scored = al_sim.evaluate_findings(head, x_eval, y_eval, CHESTX_RAY14_FINDINGS)

    def auc(f):
        known = ~np.isnan(y_eval[:, f])
        return roc_auc_score(y_eval[known, f], proba[known, f])

    positives = np.nansum(y_eval == 1, axis=0)
    with_one = [f for f in range(14) if positives[f] >= 1]
    with_five = [f for f in range(14) if positives[f] >= 5]
    assert 12 in with_one and 12 not in with_five and 13 not in with_one
    assert scored["macro_auc"] == pytest.approx(np.mean([auc(f) for f in with_one]))
    assert scored["macro_auc_min5"] == pytest.approx(np.mean([auc(f) for f in with_five]))
    complete = ~np.isnan(y_eval).any(axis=1)
    assert scored["any_finding_auc"] == pytest.approx(roc_auc_score(
        (y_eval[complete] == 1).any(axis=1), proba[complete].max(axis=1)))


def nih_shaped_csv(tmp_path):
    """The brain fixture's scans as an NIH ChestX-ray14 CSV (``Image Index``, ``split``,
    ``Finding Labels``): each tumour a finding, no tumour "No Finding"; only 3 val scans
    show pituitary_tumor (fewer than 5 eval positives), the other val pituitary scans read
    "No Finding"."""
    folder = tmp_path / "nih"
    rows = ["Image Index,split,Finding Labels"]
    for split, tag in (("pool", "train"), ("eval", "val")):
        for name in ("glioma_tumor", "meningioma_tumor", "pituitary_tumor", "no_tumor"):
            for number, path in enumerate(sorted((FIXTURES / "brain_mri" / split / name)
                                                 .iterdir())):
                target = folder / "images" / f"{tag}-{name}-{path.name}"
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target)
                shown = name != "no_tumor" and not (
                    tag == "val" and name == "pituitary_tumor" and number >= 3)
                rows.append(f"{target.name},{tag},{name if shown else 'No Finding'}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder / "labels.csv"


def test_a_findings_source_end_to_end(tmp_path, capsys):
    csv = nih_shaped_csv(tmp_path)
    out, plot = tmp_path / "al.json", tmp_path / "al.png"
    strategies = ["random", "entropy+px1", "hybrid+px1"]
    assert al_sim.main(["--train", f"{csv}#train", "--eval", f"{csv}#val",
                        "--encoder", STARTER, "--device", "cpu", "--start", "8", "--step", "8",
                        "--budget", "32", "--seeds", "2", "--strategies", ",".join(strategies),
                        "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
                        "--plot", str(plot)]) == 0
    printed = capsys.readouterr().out
    assert "macro AUC (5+ pos) (mean ± std over 2 seeds)" in printed
    assert "labels to reach random@32 (macro AUC" in printed

    result = json.loads(out.read_text())
    assert result["kind"] == "findings"
    assert result["product_scores"] == {"random": None, "entropy+px1": "mean_entropy",
                                        "hybrid+px1": "cardinality"}
    data = result["data"]
    assert data["num_train"] == 160 and data["num_eval"] == 40
    assert data["findings"][:14] == CHESTX_RAY14_FINDINGS       # then the fixture's three
    assert data["findings_with_eval_positive"] == ["glioma_tumor", "meningioma_tumor",
                                                   "pituitary_tumor"]
    assert data["findings_min_positives"] == ["glioma_tumor", "meningioma_tumor"]
    assert sorted((r["strategy"], r["seed"]) for r in result["runs"]) == sorted(
        (s, seed) for s in strategies for seed in range(2))
    for run in result["runs"]:
        assert [p["labels"] for p in run["points"]] == [8, 16, 24, 32]
        assert run["points"][-1]["macro_auc"] is not None
        used = [q["strategy_used"] for q in run["queries"]]
        assert used[0] == ("random" if run["strategy"] == "random" else "cold_start")
    # the cold start (typical picks on the embedding and the thumbnail) is shared
    for seed in range(2):
        starts = [r["queries"][0]["indices"] for r in result["runs"]
                  if r["seed"] == seed and r["strategy"] != "random"]
        assert starts[0] == starts[1]
    for curve in result["curves"].values():
        assert curve["labels"] == [8, 16, 24, 32]
        assert set(al_sim.FINDINGS_METRICS) <= set(curve) and "macro_f1" not in curve
    assert set(result["summary"]["baseline_at_budget"]) == set(al_sim.FINDINGS_METRICS)
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size == (1800, 560)   # three panels


def test_a_findings_source_refuses_a_held_out_fraction(tmp_path):
    csv = nih_shaped_csv(tmp_path)
    with pytest.raises(SystemExit, match="names its eval split"):
        al_sim.main(["--train", f"{csv}#train", "--eval", "split:0.2", "--encoder", STARTER,
                     "--device", "cpu", "--cache-dir", str(tmp_path / "cache"),
                     "--out", str(tmp_path / "al.json")])
