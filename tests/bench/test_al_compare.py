"""bench.al_compare: paired window means on a hand-made al_sim result."""

from __future__ import annotations

import json

import pytest

from bench import al_compare


def run(strategy, seed, values):
    return {"strategy": strategy, "seed": seed,
            "points": [{"labels": 10 * (i + 1), "macro_f1": v} for i, v in enumerate(values)]}


RESULT = {"runs": [
    run("random", 0, [None, 0.4, 0.5, 0.6]), run("random", 1, [0.3, 0.4, 0.5, 0.6]),
    run("hybrid", 0, [0.5, 0.6, 0.7, 0.8]), run("hybrid", 1, [0.5, 0.6, 0.7, 0.8]),
    run("hybrid+px", 0, [0.6, 0.7, 0.7, 0.7]), run("hybrid+px", 1, [0.5, 0.8, 0.7, 0.9]),
]}


def test_windows_pair_the_seeds():
    rows = al_compare.compare(RESULT, "hybrid", "hybrid+px", [(10, 20), (30, 40)])
    first, second = rows
    # seed 0: (0.6 + 0.7)/2 - (0.5 + 0.6)/2 = 0.1; seed 1: (0.5 + 0.8)/2 - 0.55 = 0.1
    assert first["difference"] == pytest.approx(0.1) and first["standard_error"] == pytest.approx(0)
    assert first["candidate_ahead"] == 2 and first["seeds"] == 2
    assert first["random"] == pytest.approx((0.2 + 0.35) / 2)    # a point with no head is 0
    # seed 0: 0.7 - 0.75 = -0.05; seed 1: 0.8 - 0.75 = +0.05
    assert second["difference"] == pytest.approx(0.0) and second["candidate_ahead"] == 1
    assert second["standard_error"] == pytest.approx(0.05)


def test_cli_prints_a_table_and_refuses_what_it_cannot_compare(tmp_path, capsys):
    path = tmp_path / "al.json"
    path.write_text(json.dumps(RESULT))
    assert al_compare.main([str(path), "--reference", "hybrid", "--candidate", "hybrid+px",
                            "--windows", "10-40"]) == 0
    out = capsys.readouterr().out
    # random (0.375 + 0.45) / 2; hybrid+px seeds 0.675 and 0.725 against 0.65: +0.025, +0.075
    assert "| 10–40 | 0.412 | 0.650 | 0.700 | +0.050 ± 0.025 | 2 / 2 |" in out
    with pytest.raises(SystemExit, match="no runs of 'margin'"):
        al_compare.main([str(path), "--reference", "margin", "--candidate", "hybrid"])
    with pytest.raises(SystemExit, match="no points between 300 and 400"):
        al_compare.main([str(path), "--reference", "hybrid", "--candidate", "hybrid+px",
                         "--windows", "300-400"])
    with pytest.raises(SystemExit):
        al_compare.main([str(path), "--reference", "hybrid", "--candidate", "hybrid+px",
                         "--windows", "40-10"])
