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
