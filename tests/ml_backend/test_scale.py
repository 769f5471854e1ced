"""What must not grow with the project (issue 21): the queries an answer or a query round
costs, the explanations a strategy writes, how pool predictions are written, and the
planner statistics after a large import. The figures at 10,000–100,000 scans are in
docs/benchmarks.md (bench.scale); these tests pin the mechanisms on a small project."""

from __future__ import annotations

import json

import numpy as np
import pytest
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from annotator import services
from annotator.models import Annotation, LabelClass, Scan
from ml_backend import services as ml
from ml_backend.models import Prediction
from tests.annotator.test_labeling import client_for, post_json
from tests.base import FIXTURES
from tests.conftest import brain_truth, run_import



def _label(project, users, per_class: int = 4):
    classes = {c.name: c for c in LabelClass.objects.filter(project=project)}
    pool = list(project.scans.filter(split="pool").order_by("pk"))
    for name, label_class in classes.items():
        for scan in [s for s in pool if brain_truth(s) == name][:per_class]:
            Annotation.objects.create(scan=scan, reader=users["alice"], label_class=label_class)


@pytest.fixture
def refit_project(encoded_project, users):
    _label(encoded_project, users)
    encoded_project.gate_tolerance = 1.0
    encoded_project.save(update_fields=["gate_tolerance"])
    call_command("refit", project=encoded_project.name)
    encoded_project.refresh_from_db()
    assert encoded_project.active_model is not None
    return encoded_project


def _queries(call) -> list[str]:
    with CaptureQueriesContext(connection) as captured:
        call()
    return [q["sql"] for q in captured.captured_queries]


def test_a_query_round_costs_the_same_queries_for_any_batch_size(refit_project):
    small = _queries(lambda: ml.query_round_create(project=refit_project, n=2))
    large = _queries(lambda: ml.query_round_create(project=refit_project, n=10))
    assert len(large) == len(small)          # not three more per chosen scan
    # the pool's predictions come from the version's array file, not 100,000 JSON rows
    assert [q for q in large if "ml_backend_prediction" in q] == []
    assert ml.checkpoint_path(refit_project.active_model, "pool_predictions.npz").exists()
    items = refit_project.query_rounds.first().items.all()
    assert len(items) == 10 and all(i.reason.get("neighbours") for i in items)


def test_strategies_explain_only_the_scans_they_choose(monkeypatch):
    from ml_backend.active import strategies

    calls = []
    real = strategies._prediction_reason
    monkeypatch.setattr(strategies, "_prediction_reason",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    rng = np.random.default_rng(0)
    size = 5000
    proba = rng.dirichlet([1, 1, 1], size)
    context = strategies.QueryContext(proba=proba, embeddings=rng.normal(size=(size, 16)),
                                      labeled_embeddings=None, groups=None,
                                      class_names=["a", "b", "c"])
    for name in ("hybrid", "entropy", "margin"):
        calls.clear()
        picked = strategies.query(name, context, 10)
        assert len(set(picked.indices.tolist())) == 10 and len(picked.reasons) == 10
        assert len(calls) == 10, name            # not one explanation per pool scan
    cold = strategies.query("cold_start", strategies.QueryContext(
        proba=None, embeddings=rng.normal(size=(size, 16)), labeled_embeddings=None,
        groups=None, class_names=[]), 12)
    assert len(set(cold.indices.tolist())) == 12
    assert len({r["cluster"] for r in cold.reasons}) == 12      # one typical scan per cluster


def test_pool_predictions_are_complete_and_on_postgresql_one_copy(refit_project):
    model = refit_project.active_model
    pool = Scan.objects.filter(project=refit_project, split="pool").count()
    sql = _queries(lambda: ml.predictions_refresh(model))
    rows = list(Prediction.objects.filter(model_version=model))
    assert len(rows) == pool
    table = np.load(ml.checkpoint_path(model, "pool_predictions.npz"))
    assert sorted(r.scan_id for r in rows) == table["ids"].tolist()
    by_id = {r.scan_id: r for r in rows}
    classes = [str(c["id"]) for c in model.config["classes"]]
    for scan_id, proba in zip(table["ids"].tolist(), table["proba"]):
        assert proba.tolist() == pytest.approx(
            [by_id[scan_id].probabilities[c] for c in classes], abs=1e-6)
    for row in rows:
        assert set(row.probabilities) == {str(c["id"]) for c in model.config["classes"]}
        assert row.confidence == pytest.approx(max(row.probabilities.values()), abs=1e-5)
        assert row.confidence + row.uncertainty == pytest.approx(1.0)
        assert row.predicted_class_id == int(max(row.probabilities, key=row.probabilities.get))
    inserts = [q for q in sql if q.startswith('INSERT INTO "ml_backend_prediction"')]
    if connection.vendor == "postgresql":
        assert inserts == []                     # COPY: not one INSERT per 250 rows
    else:
        assert len(inserts) == -(-pool // 250)   # SQLite: short transactions


def test_only_the_active_and_the_previous_versions_keep_pool_predictions(refit_project, users):
    project = refit_project
    versions = [project.active_model]
    for _ in range(3):
        call_command("refit", project=project.name)
        project.refresh_from_db()
        versions.append(project.active_model)
    assert len({v.pk for v in versions}) == 4
    kept = set(Prediction.objects.filter(model_version__project=project)
               .values_list("model_version_id", flat=True).distinct())
    assert kept == {versions[-1].pk, versions[-2].pk}
    # promoting an old version by hand computes its predictions again
    ml.model_version_promote(versions[0], actor=users["dora"], reason="roll back")
    assert Prediction.objects.filter(model_version=versions[0]).count() == \
        Scan.objects.filter(project=project, split="pool").count()


def test_an_answer_costs_the_same_queries_in_a_bigger_project(refit_project, users):
    project = refit_project
    alice = client_for(users["alice"])
    klass = {c.name: c for c in LabelClass.objects.filter(project=project)}

    def answer_cost() -> int:
        url = alice.get(reverse("annotator:next_scan", args=[project.pk]))["Location"]
        payload = alice.get(url + "?format=json").json()
        scan = Scan.objects.get(pk=payload["scan"]["id"])
        with CaptureQueriesContext(connection) as captured:
            response = post_json(alice, payload["scan"]["answer"], {
                "outcome": "label", "class_id": klass[brain_truth(scan)].pk})
        assert response.status_code == 201 and not response.json()["new_round"]
        return len(captured.captured_queries)

    ml.query_round_create(project=project, n=8)
    before = answer_cost()
    template = Scan.objects.filter(project=project, split="pool").first()
    Scan.objects.bulk_create([
        Scan(project=project, dataset=template.dataset, sha256=f"{n:064x}",
             file=template.file.name, preview=template.preview.name, file_format="png",
             width=template.width, height=template.height, label_set=template.label_set,
             split="pool") for n in range(400)])
    after = answer_cost()
    assert after == before


def test_a_large_import_refreshes_the_planner_statistics(project, monkeypatch):
    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL's planner statistics (the CI PostgreSQL pass runs this)")

    def analyzed() -> int:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_stat_clear_snapshot()")
            cursor.execute("SELECT analyze_count FROM pg_stat_user_tables "
                           "WHERE relname = 'annotator_scan'")
            return cursor.fetchone()[0]

    monkeypatch.setattr(services, "ANALYZE_AFTER_IMPORTS", 30)
    before = analyzed()
    run_import(project, FIXTURES / "chest_xray" / "eval")              # 40 scans
    assert analyzed() == before + 1
    run_import(project, FIXTURES / "chest_xray" / "eval")              # 0 new: no ANALYZE
    assert analyzed() == before + 1


def test_the_import_command_sends_chunks_to_workers_only_when_asked(project, settings):
    from django.core.management import CommandError

    settings.CELERY_TASK_ALWAYS_EAGER = True
    with pytest.raises(CommandError, match="needs a broker"):
        call_command("import_scans", str(FIXTURES / "chest_xray" / "eval"),
                     project=project.name, on_workers=True, no_progress=True)
    settings.IMPORT_CHUNK_SIZE = 5
    settings.CELERY_TASK_ALWAYS_EAGER = False       # a broker: still one pass unless asked
    call_command("import_scans", str(FIXTURES / "chest_xray" / "eval"), project=project.name,
                 no_progress=True)
    job = project.import_jobs.first()
    assert job.chunks_total == 0 and job.imported == 40
    assert json.dumps(job.errors) == "[]"
