from __future__ import annotations

import json

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
