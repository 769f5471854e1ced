"""bench.api_load's pure parts: the request mix, the calls it makes, the statistics and the
table (no server: the benchmark itself serves a grown site with gunicorn)."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from bench import api_load
from bench.api_load import MIX, Site


def _site() -> Site:
    return Site(project=7, scan_ids=[11, 12, 13], scan_pages=4, prediction_pages=3,
                annotation_pages=2, truth={11: 1, 12: 2, 13: 1},
                shown={11: ("p7-clf-1", 2, 0.81234567)})


def test_the_mix_is_drawn_in_its_proportions():
    rng = random.Random(3)
    drawn = Counter(api_load.choose(rng) for _ in range(20000))
    assert set(drawn) == set(MIX)
    total = sum(MIX.values())
    for op, weight in MIX.items():
        assert abs(drawn[op] / 20000 - weight / total) < 0.015, op
    assert abs(drawn["answer"] / 20000 - 0.10) < 0.015          # a tenth are POSTs


def test_each_call_asks_for_a_page_that_exists():
    rng = random.Random(0)
    site = _site()
    seen = Counter()
    for _ in range(500):
        for op, limit in (("scans", 4), ("predictions", 3), ("annotations", 2)):
            method, path, body = api_load.request_for(op, site, rng)
            assert method == "GET" and body is None
            assert path.startswith(f"/api/v1/projects/7/{op}/?page=")
            page = int(path.rsplit("=", 1)[1])
            assert 1 <= page <= limit
            seen[(op, page)] += 1
    assert len(seen) == 4 + 3 + 2            # every page is asked for, none beyond the last
    assert api_load.request_for("scan", site, rng)[1] in {f"/api/v1/scans/{i}/"
                                                          for i in (11, 12, 13)}
    assert api_load.request_for("labels", site, rng)[1].endswith("/labels/?format=jsonl&split=all")
    with pytest.raises(ValueError):
        api_load.request_for("nonsense", site, rng)


def test_an_answer_is_the_real_label_of_an_open_worklist_scan_with_what_was_shown():
    rng = random.Random(1)
    site = _site()
    worklist = [{"scan": {"id": 12}, "state": "labeled"}, {"scan": {"id": 11}, "state": "open"},
                {"scan": {"id": 99}, "state": "open"}]     # 99: no known label, never answered
    for _ in range(50):
        method, path, body = api_load.request_for("answer", site, rng, worklist, round_id=5)
        assert (method, path) == ("POST", "/api/v1/projects/7/annotations/")
        assert body["scan"] == 11 and body["class_id"] == 1 and body["outcome"] == "label"
        assert body["shown_model_version"] == "p7-clf-1" and body["shown_suggestion"] == 2
        assert body["shown_confidence"] == 0.8123 and body["query_round"] == 5
        assert body["submission_id"].startswith("load-")
    # nothing open: a second reading of a scan whose label is known, without a suggestion
    # when the model made none for it
    method, path, body = api_load.request_for("answer", site, rng, worklist[:1])
    assert body["scan"] == 12 and body["class_id"] == 2 and "shown_suggestion" not in body
    # no worklist read yet (or nothing in it to answer): the call is the worklist
    assert api_load.request_for("answer", site, rng, [])[:2] == (
        "GET", "/api/v1/projects/7/worklist/")
    ids = {api_load.request_for("answer", site, rng, worklist)[2]["submission_id"]
           for _ in range(20)}
    assert len(ids) == 20


def test_statistics_and_table_from_a_small_result(tmp_path):
    samples = ([("scans", 200, float(ms)) for ms in range(1, 101)]
               + [("answer", 201, 40.0), ("answer", 400, 60.0),
                  ("answer", "ConnectionError", 5.0)])
    level = {"clients": 1, **api_load.summarize(samples, 10.0)}
    scans = level["endpoints"]["scans"]
    assert scans["count"] == 100 and scans["median_ms"] == 50.5
    assert scans["p95_ms"] == 95.0 and scans["p99_ms"] == 99.0
    assert scans["requests_per_s"] == 10.0 and scans["statuses"] == {"200": 100}
    assert level["endpoints"]["answer"]["statuses"] == {"201": 1, "400": 1,
                                                        "ConnectionError": 1}
    assert level["errors"] == 2 and level["requests"] == 103
    assert level["requests_per_s"] == 10.3
    level["server_rss_mb"] = {"after": {"total": 321.5}}
    four = {**level, "clients": 4, "errors": 0}
    path = tmp_path / "api_load.json"
    path.write_text(json.dumps({"levels": [level, four]}))
    lines = api_load.table(str(path)).splitlines()
    assert lines[0] == "| endpoint | 1 client | 4 clients |"
    # rows in the mix's order, only endpoints that were called
    assert [line.split(" |")[0] for line in lines[2:4]] == ["| scans", "| answer"]
    assert "| scans | 50.5 / 95 ms, 10/s | 50.5 / 95 ms, 10/s |" in lines
    assert lines[-2] == "| errors (non-2xx) | 2 | 0 |"
    assert lines[-1] == "| gunicorn RSS after, MB | 321.5 | 321.5 |"
    assert api_load.main(["--table", str(path)]) == 0


def test_pages_of_a_list():
    assert api_load.pages(0, 50) == 1 and api_load.pages(50, 50) == 1
    assert api_load.pages(51, 50) == 2
