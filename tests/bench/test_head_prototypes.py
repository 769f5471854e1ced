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
