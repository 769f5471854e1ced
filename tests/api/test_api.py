"""The REST API as a script uses it: a token, the projects it may see, scans with filters,
the worklist, an answer recorded exactly as on the label page, models, runs, a refit; another
project's ids are 404; errors are problem JSON; the OpenAPI schema and its docs are served."""

from __future__ import annotations

import pytest
from django.test import Client
from rest_framework.authtoken.models import Token

from annotator.models import Annotation, LabelClass
from ml_backend.models import TrainingRun
from tests.conftest import brain_truth

pytestmark = pytest.mark.django_db


def api(user) -> Client:
    token, _ = Token.objects.get_or_create(user=user)
    return Client(HTTP_AUTHORIZATION=f"Token {token.key}")


def test_a_token_sees_its_projects_and_nothing_else(project, other_project, users):
    alice = api(users["alice"])
    listed = alice.get("/api/v1/projects/").json()
    assert [p["name"] for p in listed["results"]] == [project.name]
    assert listed["results"][0]["role"] == "clinician"
    for url in (f"/api/v1/projects/{other_project.pk}/", f"/api/v1/projects/{other_project.pk}/scans/",
                f"/api/v1/projects/{other_project.pk}/annotations/"):
        response = alice.get(url)
        assert response.status_code == 404, url
        assert response["Content-Type"] == "application/problem+json"
        assert response.json()["status"] == 404 and response.json()["detail"]
    anonymous = Client().get("/api/v1/projects/")
    assert anonymous.status_code == 401 and anonymous.json()["title"] == "Not signed in"
    bad = Client(HTTP_AUTHORIZATION="Token nope").get("/api/v1/projects/")
    assert bad.status_code == 401
    assert api(users["charlie"]).get(f"/api/v1/projects/{project.pk}/").status_code == 404


def test_scans_worklist_and_an_answer_recorded_as_on_the_label_page(encoded_project, users):
    project = encoded_project
    alice = api(users["alice"])
    scans = alice.get(f"/api/v1/projects/{project.pk}/scans/", {"split": "pool"}).json()
    assert scans["count"] == project.scans.filter(split="pool").count()
    assert {s["split"] for s in scans["results"]} == {"pool"}
    assert alice.get(f"/api/v1/projects/{project.pk}/scans/", {"split": "x"}).status_code == 400
    worklist = alice.get(f"/api/v1/projects/{project.pk}/worklist/").json()
    assert worklist["round"] and len(worklist["items"]) == project.query_batch_size
    first = worklist["items"][0]
    assert first["state"] == "open" and first["why"] and first["rank"] == 1

    scan_id = first["scan"]["id"]
    scan = project.scans.get(pk=scan_id)
    truth = LabelClass.objects.get(project=project, name=brain_truth(scan))
    body = {"scan": scan_id, "outcome": "label", "class_id": truth.pk, "duration_ms": 2300,
            "submission_id": "script-1"}
    made = alice.post(f"/api/v1/projects/{project.pk}/annotations/", body,
                      content_type="application/json")
    assert made.status_code == 201, made.content
    annotation = Annotation.objects.get(pk=made.json()["id"])
    assert (annotation.reader, annotation.label_class, annotation.duration_ms) == (
        users["alice"], truth, 2300)
    again = alice.post(f"/api/v1/projects/{project.pk}/annotations/", body,
                       content_type="application/json")          # a retried request
    assert again.status_code == 200 and again.json()["id"] == annotation.pk
    labeled = alice.get(f"/api/v1/projects/{project.pk}/scans/", {"labeled": "true",
                                                                   "split": "pool"}).json()
    assert scan_id in {s["id"] for s in labeled["results"]}
    wrong = alice.post(f"/api/v1/projects/{project.pk}/annotations/",
                       {"scan": scan_id, "outcome": "label", "class_id": 999999},
                       content_type="application/json")
    assert wrong.status_code == 400 and "unknown class" in wrong.json()["detail"]
    missing = alice.post(f"/api/v1/projects/{project.pk}/annotations/",
                         {"scan": 10 ** 9, "outcome": "skip"}, content_type="application/json")
    assert missing.status_code == 404
    listed = alice.get(f"/api/v1/projects/{project.pk}/annotations/").json()
    assert annotation.pk in {a["id"] for a in listed["results"]}


def test_unknown_filter_values_are_refused_not_ignored(project, users):
    """?labeled=maybe used to list every scan as if no filter were asked for."""
    from annotator import services
    from tests.base import FIXTURES
    from tests.conftest import run_import

    run_import(project, FIXTURES / "brain_mri" / "pool" / "no_tumor", layout="flat")
    scan = project.scans.order_by("pk").first()
    label_class, _ = services.label_class_get_or_create(project=project, name="no_tumor")
    services.annotation_create(scan=scan, reader=users["alice"], label_class=label_class)
    alice = api(users["alice"])
    url = f"/api/v1/projects/{project.pk}/scans/"
    total = project.scans.count()
    for name, value in (("labeled", "maybe"), ("labeled", "1"), ("labeled", "True"),
                        ("disagreement", "yes"), ("split", "x")):
        refused = alice.get(url, {name: value})
        assert refused.status_code == 400, (name, value)
        assert refused["Content-Type"] == "application/problem+json"
        assert name in refused.json()["errors"], (name, value)
    assert "use true or false, not 'maybe'" in alice.get(url, {"labeled": "maybe"}).json()[
        "detail"]
    assert [s["id"] for s in alice.get(url, {"labeled": "true"}).json()["results"]] == [scan.pk]
    assert alice.get(url, {"labeled": "false"}).json()["count"] == total - 1
    assert alice.get(url, {"labeled": ""}).json()["count"] == total        # empty: no filter
    assert alice.get(url, {"disagreement": "false"}).json()["count"] == total
    client = api(users["bob"])                                              # the reviewer
    export = f"/api/v1/projects/{project.pk}/labels/"
    refused = client.get(export, {"adjudicated": "maybe"})
    assert refused.status_code == 400 and "adjudicated" in refused.json()["detail"]
    assert client.get(export, {"adjudicated": "false"}).status_code == 200


def test_models_runs_and_a_refit_queued(encoded_project, users):
    from tests.factories import label_brain_scans

    project = encoded_project
    label_brain_scans(project, users["alice"])     # two classes: a refit has something to fit
    bob = api(users["bob"])
    models = bob.get(f"/api/v1/projects/{project.pk}/models/").json()["results"]
    assert models[0]["kind"] == "encoder" and models[0]["status"] == "active"
    started = bob.post(f"/api/v1/projects/{project.pk}/refit/")
    assert started.status_code == 201, started.content
    run = TrainingRun.objects.get(pk=started.json()["run"])
    assert run.kind == "refit" and run.params["requested_from"] == "api"
    again = bob.post(f"/api/v1/projects/{project.pk}/refit/")
    assert again.status_code == 200 and again.json()["run"] == run.pk
    runs = bob.get(f"/api/v1/projects/{project.pk}/runs/").json()["results"]
    assert runs[0]["id"] == run.pk and runs[0]["status"] == "queued"
    assert bob.get(f"/api/v1/projects/{project.pk}/predictions/").json()["count"] == 0
    # a retrain: reviewers and admins only; the next round: anyone in the project
    refused = api(users["alice"]).post(f"/api/v1/projects/{project.pk}/retrain/")
    assert refused.status_code == 403 and "reviewer" in refused.json()["detail"]
    retrain = bob.post(f"/api/v1/projects/{project.pk}/retrain/")
    assert retrain.status_code == 201 and TrainingRun.objects.get(
        pk=retrain.json()["run"]).kind == "retrain"
    assert bob.post(f"/api/v1/projects/{project.pk}/retrain/").status_code == 409  # one at a time
    new_round = api(users["alice"]).post(f"/api/v1/projects/{project.pk}/query/")
    assert new_round.status_code == 201 and new_round.json()["size"] > 0
    assert bob.get(f"/api/v1/projects/{project.pk}/predictions/",
                   {"version": "nope"}).status_code == 404


def test_the_schema_and_its_docs_are_served_without_a_cdn(users):
    client = Client()
    client.force_login(users["alice"])
    schema = client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    for path in ("/api/v1/projects/", "/api/v1/projects/{project_id}/annotations/",
                 "/api/v1/projects/{project_id}/worklist/", "/api/v1/projects/{project_id}/refit/"):
        assert path in paths, path
    docs = client.get("/api/docs/").content.decode()
    assert "swagger-ui" in docs and "cdn." not in docs and "jsdelivr" not in docs


def test_the_schema_is_valid_openapi_without_a_warning(tmp_path):
    from django.core.management import call_command

    call_command("spectacular", "--validate", "--fail-on-warn", "--file",
                 str(tmp_path / "schema.yaml"))
    text = (tmp_path / "schema.yaml").read_text()
    for path in ("/api/v1/projects/{project_id}/imports/", "/api/v1/imports/{job_id}/",
                 "/api/v1/projects/{project_id}/labels/",
                 "/api/v1/projects/{project_id}/models/{version}/export/"):
        assert path in text, path


def test_the_account_page_makes_and_revokes_a_token(client, users):
    client.force_login(users["alice"])
    assert "You have no token" in client.get("/account/").content.decode()
    client.post("/account/", {"action": "token"})
    page = client.get("/account/").content.decode()
    key = Token.objects.get(user=users["alice"]).key
    assert key in page                                   # shown once …
    assert key not in client.get("/account/").content.decode()   # … and not again
    client.post("/account/", {"action": "revoke"})
    assert not Token.objects.filter(user=users["alice"]).exists()


def _redis_or_skip(url: str):
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.exceptions.ConnectionError:
        pytest.skip(f"no Redis at {url} (CI runs one)")
    return client


def test_the_per_user_limit_is_counted_where_every_web_process_sees_it(
        users, settings, monkeypatch):
    """With CACHE_URL (production: deploy/run.sh) the API's throttle counts in Redis, so a
    user's API_THROTTLE_USER holds across web processes instead of once per process."""
    import uuid

    from rest_framework.throttling import UserRateThrottle

    url = "redis://127.0.0.1:6379/15"
    redis_client = _redis_or_skip(url)
    prefix = f"medlabel-test-{uuid.uuid4().hex[:8]}"
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                                   "LOCATION": url, "KEY_PREFIX": prefix}}
    monkeypatch.setattr(UserRateThrottle, "THROTTLE_RATES", {"user": "3/minute"})
    key = Token.objects.create(user=users["alice"]).key
    try:
        statuses = [Client(HTTP_AUTHORIZATION=f"Token {key}").get("/api/v1/projects/").status_code
                    for _ in range(4)]          # a new client (connection) each time
        assert statuses == [200, 200, 200, 429]
        stored = redis_client.keys(f"{prefix}:*throttle_user_{users['alice'].pk}")
        assert len(stored) == 1                 # the count lives in Redis, not in this process
    finally:
        for name in redis_client.keys(f"{prefix}:*"):
            redis_client.delete(name)


def test_a_cache_that_does_not_answer_lets_api_calls_through(users, settings, caplog):
    """Redis down (CACHE_URL pointing at nothing): the API's calls are let through within
    the cache's half-second timeouts and the fault is logged, never a 500 on every call."""
    import time

    settings.CACHES = {"default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": "redis://127.0.0.1:1/0",
        "OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 0.5}}}
    key = Token.objects.create(user=users["alice"]).key
    started = time.monotonic()
    statuses = [Client(HTTP_AUTHORIZATION=f"Token {key}").get("/api/v1/projects/").status_code
                for _ in range(2)]
    assert statuses == [200, 200] and time.monotonic() - started < 10
    assert "could not be counted" in caplog.text
