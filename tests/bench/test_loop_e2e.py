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


# --- a findings (multi-label) source ---------------------------------------------------

FINDINGS = ["glioma", "meningioma", "pituitary", "tumour"]
BRAIN_CLASSES = ["glioma_tumor", "meningioma_tumor", "pituitary_tumor", "no_tumor"]


def nih_style_findings(tmp_path):
    """The brain-MRI fixtures as a tiny findings CSV laid out as the NIH subset is: a
    ``split`` column (train / val), file names ``<patient>_<film>.jpg`` (two films per
    patient), four findings with two present on every tumour scan (its type and "tumour")."""
    import shutil

    folder = tmp_path / "findings"
    (folder / "images").mkdir(parents=True)
    rows = ["filename,split," + ",".join(FINDINGS)]
    for split, tag, first in (("pool", "train", 10000), ("eval", "val", 50000)):
        for c, name in enumerate(BRAIN_CLASSES):
            for k, path in enumerate(sorted((BRAIN / split / name).iterdir())):
                file = f"{first + c * 1000 + k // 2:08d}_{k % 2:03d}{path.suffix}"
                shutil.copy(path, folder / "images" / file)
                flags = [int(c == j) for j in range(3)] + [int(c < 3)]
                rows.append(f"images/{file},{tag}," + ",".join(map(str, flags)))
    (folder / "findings.csv").write_text("\n".join(rows) + "\n")
    return folder / "findings.csv"


@pytest.mark.slow
def test_loop_on_a_findings_source_answers_scores_and_gates_findings(tmp_path):
    """A findings source end to end: the gate eval imported with its findings (whole
    patients), the pool unlabeled, reader1 answering each served scan's findings with what
    the label page showed, refits gated per finding, the active model scored per step."""
    csv = nih_style_findings(tmp_path)
    out = tmp_path / "findings.json"
    printed = run_bench(
        "--train", f"{csv}#train", "--eval", f"{csv}#val", "--budget", "20", "--step", "10",
        "--seeds", "2", "--vary-gate", "--gate-eval-per-class", "3",
        "--strategies", "worklist,random", "--encoder-checkpoint",
        str(REPO / "ml_backend" / "starter" / "simclr-resnet18-64px.pt"),
        "--cache-dir", str(tmp_path / "cache"), "--out", str(out)).stdout
    assert "macro AUC (>=5 pos.)" in printed and "| 20 |" in printed
    assert "Findings suggestions:" in printed
    assert out.with_suffix(".png").stat().st_size > 0

    result = json.loads(out.read_text())
    assert result["complete"] is True and result["config"]["kind"] == "findings"
    # the bench embeds --eval exactly as the product's embed run embedded the scans
    assert result["config"]["eval_embedding_check"]["max_abs_difference"] < 1e-4
    source = result["config"]["sources"][0]
    assert source["findings"] == FINDINGS and source["eval_scans"] == 40
    assert source["groups_in_gate_and_pool"] == 0 and source["eval_patients_also_in_train"] == 0
    assert source["gate_eval_scans"] + source["pool_scans"] == 160
    # at most half of a finding's positives in the gate: the pool keeps each finding
    for finding in FINDINGS:
        assert 1 <= source["gate_eval"][finding] <= source["pool"][finding]
    imports = {r["split"]: r for r in result["config"]["imports"]}
    assert imports["eval"]["labels_added"] == source["gate_eval_scans"]   # with its findings
    assert imports["pool"]["labels_added"] == 0                           # unlabeled
    assert imports["pool"]["imported"] == source["pool_scans"]

    runs = result["runs"]
    assert sorted((r["strategy"], r["seed"]) for r in runs) == [
        ("random", 0), ("random", 1), ("worklist", 0), ("worklist", 1)]
    for run in runs:
        points = run["points"]
        assert [p["labels"] for p in points] == [10, 20]
        assert [p["annotations"] for p in points] == [10, 20]      # one findings answer each
        assert run["refits"]["promoted"] >= 1 and run["refits"]["failed"] == 0
        for point in points:
            block = point["active"]["overall"]
            for metric in ("macro_auc", "macro_auc_min5", "any_finding_auc", "micro_auc"):
                assert finite_unit(block[metric]), (run["strategy"], metric, block)
            assert block["findings_with_auc"] == 4 and block["findings_min5"] == FINDINGS
            assert block["head_outside_set"] == 0 and block["findings_without_head"] == 0
            assert finite_unit(point["gate_eval_macro_auc"])
        # learned from 20 answers: well above chance on the held-out patients
        assert points[-1]["active"]["overall"]["macro_auc"] > 0.65, run
        checks = run["findings_suggestions"]
        assert checks["answers"] == 20
        # the first 10 answers came before any model; the next 10 were shown its findings
        assert checks["shown"] == 10 and checks["present_shown"] > 0
        assert checks["outside_set"] == checks["stored_outside_set"] == 0
        assert checks["answers_unlike_truth"] == 0          # stored as the reader gave them
        assert run["probe_labels"] == 20
        for probe in ("probe", "probe_true_labels"):
            assert finite_unit(run[probe]["overall"]["macro_auc"])
        # no reader disagreement: the probe on the product's targets is the true-label one
        assert run["probe"]["overall"]["auc"] == run["probe_true_labels"]["overall"]["auc"]
    worklist = [r for r in runs if r["strategy"] == "worklist"]
    # --vary-gate: each seed a project of its own (another gate eval, its imported answers)
    assert worklist[0]["gate_eval_digest"] != worklist[1]["gate_eval_digest"]

    summary = result["summary"]
    for strategy in ("worklist", "random"):
        curve = summary["curves"][strategy]
        assert curve["labels"] == [10, 20] and curve["seeds"] == 2
        assert set(curve["overall"]) == {"macro_auc", "macro_auc_min5", "any_finding_auc",
                                         "micro_auc", "macro_ap"}
        final = summary["final"][strategy]
        assert set(final["refits_by_labels"]) == {"10", "20"}
        assert finite_unit(final["overall"]["by_metric"]["any_finding_auc"]["probe"]["mean"])
    assert summary["findings_suggestions"]["answers"] == 80
    assert "random_final_macro_auc" in summary["labels_saved"]["overall"]


def test_a_findings_source_runs_alone_and_without_a_second_reader(tmp_path, capsys):
    from bench.loop_e2e import main

    csv = nih_style_findings(tmp_path)
    findings = ["--train", f"{csv}#train", "--eval", f"{csv}#val"]
    with pytest.raises(SystemExit, match="runs alone"):
        main([*findings, "--train", str(BRAIN / "pool"), "--eval", str(BRAIN / "eval")])
    with pytest.raises(SystemExit, match="no second reader"):
        main([*findings, "--second-reader-error", "0.1"])
    with pytest.raises(SystemExit, match="not a findings source"):
        main(["--train", f"{csv}#train", "--eval", str(BRAIN / "eval")])


def test_findings_gate_eval_takes_whole_patients_and_leaves_each_finding_in_the_pool():
    import numpy as np

    from bench.loop_e2e_findings import patient_groups, pick_gate_findings

    names = ["images/00000001_000.png", "images/00000001_001.png", "00000002_000.png",
             "x/patient00003/study1/view1.jpg", "x/patient00003/study2/view1.jpg", "loose.png"]
    near = np.array([0, 1, 2, 3, 4, 2])      # loose.png duplicates patient 2's film
    groups = patient_groups(names, near)
    assert groups[0] == groups[1] and groups[3] == groups[4] and groups[2] == groups[5]
    assert len(set(groups.tolist())) == 3

    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(60), 3)                   # 60 patients, 3 films each
    targets = (rng.random((180, 4)) < [0.3, 0.2, 0.1, 0.03]).astype(float)
    targets[5, 0] = np.nan                                    # one unknown answer
    for seed in range(3):
        gate = pick_gate_findings(targets, patients, np.arange(180), 5, seed=seed)
        pool = np.setdiff1d(np.arange(180), gate)
        assert not set(patients[gate]) & set(patients[pool])      # whole patients
        positives = np.nansum(targets == 1, axis=0)
        in_gate = np.nansum(targets[gate] == 1, axis=0)
        assert (in_gate <= positives // 2).all()              # the pool keeps each finding
        assert (in_gate[positives >= 20] >= 5).all()          # common findings reach 5
        empty = (np.nan_to_num(targets[gate], nan=1) == 0).all(axis=1)
        assert empty.sum() >= 5                               # and scans without a finding


def test_findings_scores_are_per_finding_auc_means_as_scikit_learn_computes_them():
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from bench.loop_e2e_findings import findings_scores, states_of

    rng = np.random.default_rng(1)
    y = np.zeros((40, 3))
    y[:6, 0] = 1                     # 6 positives: judged
    y[10:12, 1] = 1                  # 2 positives: in the macro AUC, not in the >= 5 one
    y[20, 2] = np.nan                # no positive: no AUC at all
    proba = rng.random((40, 3))
    scores = findings_scores(y, proba, ["a", "b", "c"])
    auc_a = roc_auc_score(y[:, 0], proba[:, 0])
    auc_b = roc_auc_score(y[:, 1], proba[:, 1])
    assert scores["macro_auc"] == pytest.approx((auc_a + auc_b) / 2)
    assert scores["macro_auc_min5"] == pytest.approx(auc_a)
    assert scores["findings_min5"] == ["a"] and scores["auc"]["c"] is None
    complete = ~np.isnan(y).any(axis=1)
    assert scores["any_finding_auc"] == pytest.approx(roc_auc_score(
        (y[complete] == 1).any(axis=1), proba[complete].max(axis=1)))
    empty = findings_scores(y, None, ["a", "b", "c"])
    assert empty["macro_auc"] is None and empty["no_prediction"] == 40

    # the reader's answer: every finding absent is the page's "no finding"; unknown is left
    assert states_of((0, 0, 0), [7, 8, 9]) == ({7: "absent", 8: "absent", 9: "absent"}, True)
    assert states_of((1, None, -1), [7, 8, 9]) == ({7: "present", 9: "uncertain"}, False)
    assert states_of((0, None, 0), [7, 8, 9]) == ({7: "absent", 9: "absent"}, False)
