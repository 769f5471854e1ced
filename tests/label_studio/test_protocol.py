"""The ML backend protocol views, the secret-checked webhook, signed image URLs and the
labeling config, without a Label Studio server (the round trip is in test_round_trip.py)."""

from __future__ import annotations

import base64
import json
from unittest import mock

import pytest
from django.test import Client
from django.urls import reverse

from annotator import label_studio
from annotator.models import Annotation, LabelClass
from ml_backend.models import Prediction, TrainingRun
from tests.factories import trained_project
from tests.label_studio.conftest import ml_client

pytestmark = pytest.mark.django_db


@pytest.fixture
def trained(encoded_project, users):
    return trained_project(encoded_project, users["bob"])


def post(client, url, body, **headers):
    return client.post(url, data=json.dumps(body), content_type="application/json", **headers)


def test_health_setup_versions_answer_without_loading_a_model(trained):
    client = ml_client()
    project = trained
    health = client.get(f"/ml/{project.pk}/health")
    assert health.status_code == 200 and health.json()["status"] == "UP"
    assert client.get(f"/ml/{project.pk}/").json()["status"] == "UP"
    setup = post(client, f"/ml/{project.pk}/setup", {"project": "3.1700000000", "schema": "<View/>"})
    assert setup.json() == {"model_version": project.active_model.version}
    assert project.active_model.version in client.get(f"/ml/{project.pk}/versions").json()["versions"]
    assert client.get("/ml/999999/health").status_code == 404
    assert client.get(f"/ml/{project.pk}/setup").status_code == 405
    assert client.post(f"/ml/{project.pk}/setup", data=b"[1",
                       content_type="application/json").status_code == 400


def test_predict_one_result_per_task_in_order_from_stored_or_batch_predictions(trained,
                                                                                other_project):
    project = trained
    model = project.active_model
    pool = list(project.scans.filter(split="pool").order_by("pk")[:3])
    eval_scan = project.scans.filter(split="eval").first()            # nothing stored
    foreign = other_project.scans.create(dataset=other_project.datasets.create(name="x"),
                                         sha256="0" * 64, width=1, height=1, file_format="png")
    tasks = [{"id": 1, "data": {"scan_id": pool[0].pk}}, {"id": 2, "data": {"scan_id": "oops"}},
             {"id": 3, "data": {"scan_id": eval_scan.pk}}, {"id": 4, "data": {}},
             {"id": 5, "data": {"scan_id": foreign.pk}}, {"id": 6, "data": {"scan_id": pool[1].pk}}]
    body = post(ml_client(), f"/ml/{project.pk}/predict", {"tasks": tasks}).json()
    results = body["results"]
    assert len(results) == len(tasks)
    stored = {p.scan_id: p for p in Prediction.objects.filter(model_version=model)}
    for index, scan in ((0, pool[0]), (5, pool[1])):
        r = results[index]
        assert r["model_version"] == model.version
        assert r["score"] == pytest.approx(stored[scan.pk].confidence, abs=1e-5)
        assert r["result"][0]["value"]["choices"] == [stored[scan.pk].predicted_class.name]
        assert r["result"][0]["from_name"] == "diagnosis" and r["result"][0]["to_name"] == "image"
    assert results[2]["result"] and 0 < results[2]["score"] <= 1     # computed in a batch
    for index in (1, 3, 4):                     # bad, missing, another project's scan
        assert results[index]["result"] == []
        assert "score" not in results[index]    # unscored: never sorted first as "0.0"
    assert post(ml_client(), f"/ml/{project.pk}/predict", {"tasks": "x"}).status_code == 400


def test_basic_auth_when_configured(trained, settings):
    settings.ML_BACKEND_BASIC_AUTH = "ls:s3cret"
    client = Client()
    url = f"/ml/{trained.pk}/health"
    assert client.get(url).status_code == 401
    bad = "Basic " + base64.b64encode(b"ls:wrong").decode()
    assert client.get(url, HTTP_AUTHORIZATION=bad).status_code == 401
    good = "Basic " + base64.b64encode(b"ls:s3cret").decode()
    assert client.get(url, HTTP_AUTHORIZATION=good).status_code == 200
    # in production (DEBUG off) the endpoints are closed until a password is configured
    settings.ML_BACKEND_BASIC_AUTH = None
    settings.DEBUG = False
    assert client.get(url).status_code == 401
    assert client.post(f"/ml/{trained.pk}/predict", data="{}",
                       content_type="application/json").status_code == 401


def test_start_training_queues_a_refit_and_other_events_are_ignored(trained,
                                                                    django_capture_on_commit_callbacks):
    client = ml_client()
    url = f"/ml/{trained.pk}/webhook"
    assert post(client, url, {"action": "ANNOTATION_CREATED"}).json()["status"] == "ignored"
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = post(client, url, {"action": "START_TRAINING", "project": {"id": 1}})
    assert response.status_code == 201 and len(callbacks) == 1     # sent after commit
    run = TrainingRun.objects.get(pk=response.json()["run"])
    assert (run.kind, run.status) == ("refit", "queued")
    assert f"refit run {run.pk} queued" in response.json()["message"]
    again = post(client, url, {"action": "START_TRAINING"}).json()
    assert again["status"] == "already queued" and again["run"] == run.pk
    # the protocol has no training-status call: health carries the latest run
    health = client.get(f"/ml/{trained.pk}/health").json()
    assert health["status"] == "UP" and health["training"]["run"] == run.pk
    assert health["training"]["status"] == "queued" and health["training"]["kind"] == "refit"


def webhook_payload(scan, annotation_id: int, choice: str | None, **extra) -> dict:
    result = [] if choice is None else [{"from_name": "diagnosis", "to_name": "image",
                                         "type": "choices", "value": {"choices": [choice]}}]
    return {"action": "ANNOTATION_CREATED", "project": {"id": 7, "token": "never-logged"},
            "task": {"id": 900 + annotation_id, "data": {"scan_id": scan.pk}},
            "annotation": {"id": annotation_id, "result": result, "lead_time": 1.5,
                           "completed_by": {"id": 3, "email": "ALICE@example.org"}, **extra}}


@pytest.mark.django_db(transaction=True)
def test_webhook_is_answered_before_the_ingest_runs_without_a_broker(trained, users, settings,
                                                                     monkeypatch):
    """No broker, background threads on (the demo, `make serve`): the webhook returns while
    the ingest is still held back, and the annotation arrives once it is let go."""
    import threading

    from annotator import background
    from annotator.label_studio import inbound

    settings.LABEL_STUDIO_WEBHOOK_SECRET = "the-secret"
    settings.ML_TASKS_IN_THREAD = True
    settings.ML_TASKS_IN_PROCESS = False
    project = trained
    project.label_studio_project_id = 7
    project.refit_every = 1000
    project.save(update_fields=["label_studio_project_id", "refit_every"])
    started, release, finished = threading.Event(), threading.Event(), threading.Event()
    real_ingest = inbound.ingest

    def held_ingest(*args, **kwargs):
        started.set()
        release.wait(30)                 # an inline ingest would hold the response this long
        try:
            return real_ingest(*args, **kwargs)
        finally:
            finished.set()

    monkeypatch.setattr(inbound, "ingest", held_ingest)
    scan = project.scans.filter(split="pool").last()
    response = post(Client(), reverse("annotator:ls_webhook", args=[project.pk]),
                    webhook_payload(scan, 61, "no_tumor"), HTTP_X_MEDLABEL_SECRET="the-secret")
    answered_while_held = not finished.is_set()
    assert response.status_code == 200 and response.json()["queued"] == 1
    assert started.wait(10), "the ingest never started in the background"
    assert answered_while_held
    assert not Annotation.objects.filter(external_id="61").exists()
    release.set()
    assert background.wait_idle(30)
    got = Annotation.objects.get(source="label_studio", external_id="61")
    assert got.reader == users["alice"] and got.label_class.name == "no_tumor"


def test_webhook_checks_the_secret_and_upserts_idempotently(trained, users, settings):
    settings.LABEL_STUDIO_WEBHOOK_SECRET = "the-secret"
    project = trained
    project.label_studio_project_id = 7              # the Label Studio project it is linked to
    project.save(update_fields=["label_studio_project_id"])
    client = Client()
    url = reverse("annotator:ls_webhook", args=[project.pk])
    scan = project.scans.filter(split="pool").last()
    payload = webhook_payload(scan, 41, "no_tumor")
    assert post(client, url, payload).status_code == 403
    assert post(client, url, payload, HTTP_X_MEDLABEL_SECRET="wrong").status_code == 403
    assert not Annotation.objects.filter(source="label_studio").exists()

    ok = post(client, url, payload, HTTP_X_MEDLABEL_SECRET="the-secret")
    assert ok.status_code == 200 and ok.json()["queued"] == 1
    got = Annotation.objects.get(source="label_studio", external_id="41")
    assert (got.reader, got.label_class.name, got.duration_ms) == (users["alice"], "no_tumor", 1500)
    post(client, url, payload, HTTP_X_MEDLABEL_SECRET="the-secret")      # a replay
    assert Annotation.objects.filter(external_id="41").count() == 1

    updated = dict(payload, action="ANNOTATION_UPDATED")
    updated["annotation"] = dict(payload["annotation"], result=webhook_payload(
        scan, 41, "pituitary_tumor")["annotation"]["result"])
    post(client, url, updated, HTTP_X_MEDLABEL_SECRET="the-secret")
    got.refresh_from_db()
    assert got.label_class.name == "pituitary_tumor" and "updated in Label Studio" in got.note

    cancelled = webhook_payload(scan, 42, None, was_cancelled=True)
    post(client, url, cancelled, HTTP_X_MEDLABEL_SECRET="the-secret")
    assert Annotation.objects.get(external_id="42").outcome == "skip"
    unknown = webhook_payload(scan, 43, "dragon")
    post(client, url, unknown, HTTP_X_MEDLABEL_SECRET="the-secret")
    assert not Annotation.objects.filter(external_id="43").exists()
    assert post(client, url, {"action": "PROJECT_UPDATED"},
                HTTP_X_MEDLABEL_SECRET="the-secret").json()["queued"] == 0


def test_signed_image_urls_expire_and_cannot_be_forged(trained, settings):
    scan = trained.scans.first()
    client = Client()
    url = label_studio.image_url(scan)
    path = url[len(settings.SITE_URL):]
    response = client.get(path)
    assert response.status_code == 200 and response["Content-Type"] == "image/png"
    other = trained.scans.last()
    # the token as issued (signing again could land in the next second: another timestamp)
    issued = path.rsplit("/", 1)[-1].removesuffix(".png")
    forged = path.replace(issued, label_studio.image_token(other)[:-2] + "xx")
    assert forged != path and client.get(forged).status_code == 404
    tampered = path.replace(issued, issued[:-2] + ("AA" if issued[-2:] != "AA" else "BB"))
    assert client.get(tampered).status_code == 404
    settings.LABEL_STUDIO_IMAGE_URL_MAX_AGE = 60
    with mock.patch("django.core.signing.time.time", return_value=__import__("time").time() + 120):
        assert client.get(path).status_code == 404


def test_labeling_config_has_every_class_with_its_hotkey(trained):
    LabelClass.objects.create(project=trained, name='odd "name" <x>', hotkey="q",
                              description="a & b")
    config = label_studio.labeling_config(trained)
    from xml.etree import ElementTree

    root = ElementTree.fromstring(config)
    choices = {c.get("value"): c.get("hotkey") for c in root.iter("Choice")}
    assert choices == {"no_tumor": "1", "pituitary_tumor": "2", 'odd "name" <x>': "q"}
    image = root.find("Image")
    assert image.get("zoom") == "true" and image.get("value") == "$image"
    assert root.find("Choices").get("choice") == "single-radio"


def test_a_missing_reader_is_filled_in_later_and_settings_are_checked(trained, users,
                                                                      settings):
    """An annotation that arrived without its reader (no API key on that server) gets it
    when the webhook or reconciliation sees it again with the reader's e-mail; and the
    start-up check refuses a Label Studio link without the key or the secret."""
    from django.core.checks import run_checks

    from annotator import label_studio

    project = trained
    scan = project.scans.filter(split="pool").last()
    anonymous = webhook_payload(scan, 51, "no_tumor")
    anonymous["annotation"]["completed_by"] = 3          # an id only: no key to look it up
    got, outcome = label_studio.ingest(project, annotation=anonymous["annotation"],
                                       task=anonymous["task"])
    assert outcome == "created" and got.reader is None
    again = webhook_payload(scan, 51, "no_tumor")        # now with the reader's e-mail
    got, outcome = label_studio.ingest(project, annotation=again["annotation"],
                                       task=again["task"])
    got.refresh_from_db()
    assert outcome == "updated" and got.reader == users["alice"]
    assert "reader matched by e-mail" in got.note

    settings.LABEL_STUDIO_URL = "http://labelstudio.internal:8080"
    settings.LABEL_STUDIO_API_KEY = ""
    settings.LABEL_STUDIO_WEBHOOK_SECRET = ""
    ids = {m.id for m in run_checks()}
    assert {"medlabel.E001", "medlabel.E002"} <= ids
    settings.LABEL_STUDIO_API_KEY, settings.LABEL_STUDIO_WEBHOOK_SECRET = "key", "secret"
    assert not {"medlabel.E001", "medlabel.E002"} & {m.id for m in run_checks()}
