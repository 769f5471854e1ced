"""bench.head_prototypes: the refit head with and without prototypes on the same subsets."""

from __future__ import annotations

import json

from bench import head_prototypes
from tests.base import FIXTURES


def test_heads_compared_on_the_same_subsets(tmp_path):
    out = tmp_path / "heads.json"
    assert head_prototypes.main([
        "--train", str(FIXTURES / "brain_mri" / "pool"),
        "--eval", str(FIXTURES / "brain_mri" / "eval"), "--fractions", "0.5",
        "--n0", "0,50", "--seeds", "1", "--cache-dir", str(tmp_path / "cache"),
        "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["n0"] for r in rows] == [0.0, 50.0]
    assert rows[0]["labels"] == rows[1]["labels"] == 80
    assert all(0 <= r["macro_f1"] <= 1 and 0 <= r["auc"] <= 1 for r in rows)


def test_the_project_shares_head_at_two_sizes(tmp_path):
    """--balance shares fits the offsets for the project's class shares (the rest of --train
    as its pool); --embed-scales reads each scan at 64 and 128 px (the product's default).
    A balance that is neither a number nor shares is refused."""
    import pytest

    out = tmp_path / "heads.json"
    common = ["--train", str(FIXTURES / "brain_mri" / "pool"),
              "--eval", str(FIXTURES / "brain_mri" / "eval"), "--fractions", "0.5",
              "--n0", "0", "--seeds", "1", "--cache-dir", str(tmp_path / "cache")]
    assert head_prototypes.main([*common, "--balance", "0.5,shares", "--embed-scales", "1,2",
                                 "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["balance"] for r in rows] == [0.5, "shares"]
    assert all(0 <= r["macro_f1"] <= 1 and 0 <= r["auc"] <= 1 for r in rows)
    with pytest.raises(SystemExit, match="neither a number nor shares"):
        head_prototypes.main([*common, "--balance", "half"])


def test_keep_makes_one_class_rare_and_refuses_what_it_cannot_do():
    import numpy as np
    import pytest

    labels = np.array(["normal"] * 50 + ["pneumonia"] * 40)
    rows = head_prototypes.kept_rows(labels, "pneumonia:0.25", seed=0)
    kept = labels[rows]
    assert (kept == "normal").sum() == 50 and (kept == "pneumonia").sum() == 10
    assert (np.diff(rows) > 0).all()
    for bad in ("pneumonia", "pneumonia:0", "pneumonia:1.5", ":0.5", "pneumonia:x"):
        with pytest.raises(SystemExit, match="CLASS:SHARE"):
            head_prototypes.kept_rows(labels, bad, seed=0)
    with pytest.raises(SystemExit, match="no scan of class 'effusion'"):
        head_prototypes.kept_rows(labels, "effusion:0.5", seed=0)


def test_the_eval_weighed_to_the_train_shares(tmp_path):
    """--weigh-eval: the eval set kept whole, its classes weighed to the kept train shares;
    without --keep it is refused."""
    import numpy as np
    import pytest

    weights = head_prototypes.share_weights(np.array([0, 0, 1, 1, 1, 1]), np.array([90, 10]))
    np.testing.assert_allclose(weights, [2.7, 2.7, 0.15, 0.15, 0.15, 0.15])
    assert abs(weights.sum() - 6) < 1e-9
    assert weights[:2].sum() / weights.sum() == pytest.approx(0.9)
    with pytest.raises(SystemExit, match="no eval scan"):
        head_prototypes.share_weights(np.array([0, 0]), np.array([5, 5]))
    out = tmp_path / "weighed.json"
    common = ["--train", str(FIXTURES / "brain_mri" / "pool"),
              "--eval", str(FIXTURES / "brain_mri" / "eval"), "--fractions", "0.5",
              "--n0", "0", "--seeds", "1", "--cache-dir", str(tmp_path / "cache")]
    assert head_prototypes.main([*common, "--keep", "no_tumor:0.3", "--weigh-eval",
                                 "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1 and 0 <= rows[0]["macro_f1"] <= 1
    per = rows[0]["per_class"]
    assert set(per) == {"glioma_tumor", "meningioma_tumor", "no_tumor", "pituitary_tumor"}
    assert np.mean([c["f1"] for c in per.values()]) == pytest.approx(rows[0]["macro_f1"])
    with pytest.raises(SystemExit, match="give --keep"):
        head_prototypes.main([*common, "--weigh-eval"])


def test_per_class_figures_weigh_as_the_macro_f1_does():
    import numpy as np
    import pytest

    y_true, y_pred = np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0])
    per = head_prototypes.per_class(y_true, y_pred, ["a", "b", "c"])
    assert per["a"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert per["b"]["precision"] == pytest.approx(2 / 3) and per["b"]["recall"] == 1.0
    assert per["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1.0}
    weighed = head_prototypes.per_class(y_true, y_pred, ["a", "b", "c"],
                                        np.array([1, 1, 1, 1, 3.0]))
    assert weighed["c"]["support"] == 3.0 and weighed["a"]["precision"] == pytest.approx(0.25)


def test_a_colour_encoder_reads_its_scans_in_colour(tmp_path):
    """The colour starter gets RGB arrays (it would refuse greyscale ones), and --keep's
    rare class has its own recall / precision in every row."""
    out = tmp_path / "blood.json"
    assert head_prototypes.main([
        "--train", str(FIXTURES / "blood_smear" / "pool"),
        "--eval", str(FIXTURES / "blood_smear" / "eval"),
        "--encoder", "ml_backend/starter/simclr-resnet18-rgb-64px.pt", "--fractions", "1.0",
        "--n0", "0", "--balance", "0,shares", "--seeds", "1", "--keep", "basophil:0.5",
        "--weigh-eval", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["balance"] for r in rows] == [0.0, "shares"]
    assert all(0 <= r["per_class"]["basophil"]["recall"] <= 1 for r in rows)
    assert all(r["per_class"]["basophil"]["support"] > 0 for r in rows)
