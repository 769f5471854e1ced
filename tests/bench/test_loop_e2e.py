"""bench.loop_e2e: the product's loop end to end on the tiny fixtures, in a subprocess.

The bench makes its own Django database (SQLite in a temp dir), so it runs as
``python -m bench.loop_e2e`` in a child process, not inside the test database."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.base import FIXTURES, REPO

CHEST, BRAIN = FIXTURES / "chest_xray", FIXTURES / "brain_mri"
SETS = ["chest X-ray", "brain MRI"]


def run_bench(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "MEDIA_ROOT", "ARTIFACTS_ROOT", "INCOMING_ROOT",
                        "CELERY_BROKER_URL", "DJANGO_SETTINGS_MODULE")}
    result = subprocess.run([sys.executable, "-m", "bench.loop_e2e", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def finite_unit(value) -> bool:
    return value is not None and math.isfinite(value) and 0.0 <= value <= 1.0


@pytest.mark.slow
def test_loop_on_fixtures_mixed_project_then_saved_encoder(tmp_path):
    out, png, encoder = tmp_path / "loop.json", tmp_path / "loop.png", tmp_path / "enc.pt"
    common = ["--budget", "20", "--step", "10", "--seeds", "1", "--gate-eval-per-class", "2",
              "--cache-dir", str(tmp_path / "cache")]
    printed = run_bench(
        "--train", str(CHEST / "pool"), "--train", str(BRAIN / "pool"),
        "--eval", str(CHEST / "eval"), "--eval", str(BRAIN / "eval"), "--label-sets", *SETS,
        "--strategies", "worklist,random", "--pretrain-epochs", "1", "--image-size", "32",
        "--small-input", "no", "--batch-size", "64", "--second-reader-error", "0.2",
        "--save-encoder", str(encoder), "--out", str(out), "--plot", str(png), *common).stdout
    assert "active model vs the offline linear probe" in printed and "| 20 |" in printed
    assert png.stat().st_size > 0 and encoder.stat().st_size > 0

    result = json.loads(out.read_text())
    assert result["complete"] is True
    assert [s["pool"] for s in result["config"]["sources"]] == [
        {"normal": 58, "pneumonia": 88}, {c: 38 for c in ("glioma_tumor", "meningioma_tumor",
                                                           "no_tumor", "pituitary_tumor")}]
    assert {r["split"]: r["labels_added"] for r in result["config"]["imports"]
            if r["source"] == 0} == {"eval": 4, "pool": 0}     # the pool comes in unlabeled
    assert sorted((r["strategy"], r["seed"]) for r in result["runs"]) == [
        ("random", 0), ("worklist", 0)]
    for run in result["runs"]:
        points = run["points"]
        assert [p["labels"] for p in points] == [10, 20]
        assert [sum(p["labels_per_set"].values()) for p in points] == [10, 20]
        assert set(points[-1]["labels_per_set"]) <= set(SETS)
        # two readers: every scan has two pool annotations, and refits count annotations
        assert [p["annotations"] for p in points] == [20, 40]
        assert run["second_reader"]["second_reader_labels"] == 20
        assert points[-1]["active_version"] is not None
        # which of the active model's set heads kept the thumbnail, per step
        assert set(points[-1]["active_pixels"]) <= set(SETS)
        assert all(isinstance(v, bool) for v in points[-1]["active_pixels"].values())
        for point in points:
            if point["active"] is None:
                continue
            for scope in ["overall", *SETS]:
                block = (point["active"]["overall"] if scope == "overall"
                         else point["active"]["per_set"][scope])
                for metric in ("macro_f1", "accuracy", "macro_auc", "ece"):
                    if metric == "ece" and block["no_prediction"] == block["n"]:
                        # no head for the set yet: no confidence to calibrate
                        assert block[metric] is None, block
                        continue
                    assert finite_unit(block[metric]), (run["strategy"], scope, metric, block)
        assert finite_unit(run["probe"]["overall"]["macro_f1"])
        assert run["refits"]["promoted"] >= 1
        assert run["wrong_set"]["checked"] > 0 and run["wrong_set"]["predicted_class"] == 0
        assert run["suggestions"]["wrong_set"] == 0

    summary = result["summary"]
    for strategy in ("worklist", "random"):
        curve = summary["curves"][strategy]
        assert curve["labels"] == [10, 20] and curve["seeds"] == 1
        assert set(curve) >= {"overall", *SETS}
        assert finite_unit(curve["overall"]["macro_f1"]["mean"][-1])
    assert set(summary["labels_saved"]) == {"overall", *SETS}
    assert summary["wrong_set_predictions"] == 0
    assert sorted((c["strategy"], [s["labels"] for s in c["steps"]])
                  for c in summary["pixel_choices"]) == [("random", [10, 20]),
                                                         ("worklist", [10, 20])]
    # a refit the gate held back is scored too (none need be held back on this tiny run)
    assert isinstance(summary["held_back_checks"], list)
    assert all(p["newest"] is None or finite_unit(p["newest"]["overall"]["macro_f1"])
               for run in result["runs"] for p in run["points"])

    # the saved encoder is reused: no pretraining, a full embed run instead; with
    # --vary-gate the second seed is another project: its own gate eval, its own path
    out2 = tmp_path / "reuse.json"
    run_bench("--train", str(BRAIN / "pool"), "--eval", str(BRAIN / "eval"),
              "--strategies", "worklist", "--encoder-checkpoint", str(encoder),
              "--out", str(out2), "--vary-gate", *common[:5], "2", *common[6:])
    reused = json.loads(out2.read_text())
    assert reused["config"]["encoder"]["source"] == "checkpoint"
    assert reused["config"]["encoder"]["metrics"]["embeddings"]["total"] == 160
    assert len(reused["runs"]) == 2
    for run in reused["runs"]:
        assert [p["labels"] for p in run["points"]] == [10, 20]
        assert finite_unit(run["points"][-1]["active"]["overall"]["macro_f1"])
        assert run["wrong_set"]["predicted_class"] == 0
    first, second = reused["runs"]
    assert first["gate_eval_digest"] != second["gate_eval_digest"]
    assert reused["summary"]["worklist_runs_identical"] is False


def test_overall_auc_is_over_each_class_own_label_sets_scans():
    """Another anatomy's scans score 0 on a class: as easy negatives they would lift its AUC.
    The overall score ranks each class among its own set's scans only, as the reports do."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from bench.loop_e2e import score

    # set A (classes a0, a1): a0's probability ranks A's scans no better than chance
    y_a = np.array([0, 0, 1, 1])
    p_a0 = np.array([0.6, 0.4, 0.6, 0.4])
    # set B (classes b0, b1): a perfect head
    y_b = np.array([0, 1, 0, 1])
    proba = np.zeros((8, 4))
    proba[:4, 0], proba[:4, 1] = p_a0, 1 - p_a0
    proba[4:, 2], proba[4:, 3] = 1 - y_b, y_b
    y = np.concatenate([y_a, y_b + 2])
    applies = np.zeros((8, 4), dtype=bool)
    applies[:4, :2] = True
    applies[4:, 2:] = True
    names = ["a0", "a1", "b0", "b1"]

    lifted = score(y, proba, names)
    own = score(y, proba, names, applies=applies)
    assert own["macro_auc"] == pytest.approx(
        np.mean([roc_auc_score(y_a == 0, p_a0), roc_auc_score(y_a == 1, 1 - p_a0), 1.0, 1.0]))
    assert own["macro_auc"] == pytest.approx(0.75)
    assert lifted["macro_auc"] > own["macro_auc"]
