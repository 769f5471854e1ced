"""bench.answer_gc: answers timed through the real view in a process that loaded the ML
modules, each with the full collections inside it, summed up per setting."""

from __future__ import annotations

import argparse

import pytest
from django.contrib.auth import get_user_model

from annotator.models import Annotation, Membership
from annotator.services import membership_set
from bench import answer_gc

pytestmark = pytest.mark.django_db


def test_a_run_answers_through_the_view_and_records_the_collector(encoded_project):
    project = encoded_project
    project.refit_every = 10 ** 6                 # as bench.scale leaves its project
    project.save()
    reader = get_user_model().objects.create_user("reader", password="bench-pass-1")
    membership_set(project=project, user=reader, role=Membership.Role.CLINICIAN)
    run = answer_gc.child(argparse.Namespace(project=project.name, answers=4))
    assert Annotation.objects.filter(reader=reader).count() == 5    # a warm-up answer + 4
    assert run["answers"] + len(run["new_round_ms"]) == 4
    assert all(set(a) >= {"ms", "db_ms", "full_gc", "queries"} for a in run["each"])
    assert run["gc_tracked"] > 0 and run["gc_frozen"] >= 0 and run["modules"] > 0

    slow = dict(run, each=[*run["each"], {**run["each"][0], "ms": 500.0, "full_gc": 1}])
    summary = answer_gc.summary([run, slow])
    assert summary["answers"] == 2 * len(run["each"]) + 1
    assert summary["with_full_gc"] == 1 + 2 * sum(bool(a["full_gc"]) for a in run["each"])
    assert summary["max_ms"] == 500.0


def test_it_refuses_a_folder_bench_scale_did_not_keep(tmp_path, capsys):
    empty = tmp_path / "not-a-workdir"          # (tmp_path itself holds the tests' artifacts)
    empty.mkdir()
    with pytest.raises(SystemExit):
        answer_gc.main(["--workdir", str(empty)])
    assert "not a workdir bench.scale kept" in capsys.readouterr().err
