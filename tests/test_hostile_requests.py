"""Hostile requests, generated (issue: hardening from an independent probe): odd JSON values,
non-ASCII credentials, a Label Studio webhook replayed across projects, answers on
quarantined scans, a worklist asked of a project with no encoder, and concurrent triggers of
a refit. Each is a clear 4xx (or a refusal in words) with nothing written — never a 500."""

from __future__ import annotations

import base64
import json
import math
import threading

import pytest
from django.db import connection
from django.test import Client
from django.urls import reverse
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from annotator import services
from annotator.models import Annotation, LabelClass, Membership
from bench import hostile
from medsite import jsonbody
from ml_backend.models import TrainingRun
from tests.base import PASSWORD
from tests.conftest import _import_brain, brain_truth

ML_AUTH = "labelstudio:ml-backend-test-password"
SECRET = "the-webhook-secret"
FUZZ = hsettings(max_examples=30, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture,
                                        HealthCheck.too_slow])


# --- generators (plain-Python classes in bench/hostile.py; bench.fuzz --target requests
#     draws from the same ones) ------------------------------------------------------------


_nested = hostile.nested
_is_utf8_object = hostile.is_utf8_object

hostile_numbers = st.one_of(
    st.sampled_from(hostile.FIXED_NUMBERS),
    st.integers(*hostile.LONG_DIGITS).map(hostile.long_digits),
    st.integers(*hostile.BIG_EXPONENTS).map(hostile.big_exponent),
)

# values the parser accepts but no field should: they reach the endpoints' own checks
odd_values = st.sampled_from(hostile.ODD_VALUES)

hostile_bodies = st.one_of(
    *[odd_values.map(template) for template in hostile.ODD_VALUE_TEMPLATES],
    # an odd number where the endpoint expects one (or anywhere in the object)
    *[hostile_numbers.map(template) for template in hostile.NUMBER_TEMPLATES],
    # deep nesting (arrays and objects), far beyond any real payload
    st.integers(*hostile.NESTED_ARRAYS).map(_nested),
    st.integers(*hostile.NESTED_OBJECTS).map(hostile.nested_objects),
    # not an object, not JSON, not UTF-8, empty
    st.sampled_from(hostile.NOT_OBJECTS),
    st.binary(min_size=1, max_size=64).filter(lambda b: not _is_utf8_object(b)),
)


# --- the parser itself ----------------------------------------------------------------------


@FUZZ
@given(body=hostile_bodies)
def test_the_one_parser_refuses_every_hostile_body_with_a_reason(body):
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    try:
        value = jsonbody.parse_json(raw, expect=dict)
    except jsonbody.BodyError as exc:
        assert exc.status in (400, 413) and str(exc)
    else:   # accepted: then it is an ordinary object of bounded numbers
        assert isinstance(value, dict)
        assert all(not isinstance(v, float) or math.isfinite(v) for v in value.values())
        assert all(not isinstance(v, int) or len(str(abs(v))) <= jsonbody.MAX_NUMBER_CHARS
                   for v in value.values())


def test_the_parser_accepts_ordinary_bodies_and_refuses_oversized_ones():
    assert jsonbody.parse_json(b'{"outcome": "label", "class_id": 3, "x": 0.25}') == {
        "outcome": "label", "class_id": 3, "x": 0.25}
    with pytest.raises(jsonbody.BodyError) as exc:
        jsonbody.parse_json(b'{"a": "' + b"x" * (jsonbody.MAX_BYTES + 1) + b'"}')
    assert exc.value.status == 413
    assert jsonbody.parse_json(b"", empty={}) == {}


# --- the endpoints ----------------------------------------------------------------------------


@pytest.fixture
def brain(project, users, settings):
    settings.ML_BACKEND_BASIC_AUTH = ML_AUTH
    settings.LABEL_STUDIO_WEBHOOK_SECRET = SECRET
    _import_brain(project)
    project.label_studio_project_id = 7
    project.save(update_fields=["label_studio_project_id"])
    return project


def _client(user=None) -> Client:
    client = Client()
    if user is not None:
        assert client.login(username=user.username, password=PASSWORD)
    return client


def _ml_headers(credentials: str = ML_AUTH) -> dict:
    return {"HTTP_AUTHORIZATION": "Basic " + base64.b64encode(credentials.encode()).decode()}


@FUZZ
@given(body=hostile_bodies)
def test_every_json_endpoint_answers_a_hostile_body_with_a_4xx_and_writes_nothing(
        brain, users, body):
    project = brain
    scan = project.scans.filter(split="pool").order_by("pk").first()
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    before = Annotation.objects.count(), TrainingRun.objects.count()
    answers = [
        _client(users["alice"]).post(reverse("annotator:answer", args=[project.pk, scan.pk]),
                                     data=raw, content_type="application/json"),
        _client().post(reverse("annotator:ls_webhook", args=[project.pk]), data=raw,
                       content_type="application/json", HTTP_X_MEDLABEL_SECRET=SECRET),
        _client().post(f"/ml/{project.pk}/predict", data=raw, content_type="application/json",
                       **_ml_headers()),
        _client().post(f"/ml/{project.pk}/webhook", data=raw, content_type="application/json",
                       **_ml_headers()),
    ]
    for response in answers:
        assert 400 <= response.status_code < 500 or response.status_code == 200, (
            response.status_code, response.content[:300])
        assert response.status_code != 500
    assert (Annotation.objects.count(), TrainingRun.objects.count()) == before


@FUZZ
@given(user=st.text(min_size=0, max_size=12), password=st.text(min_size=0, max_size=12),
       secret=st.text(min_size=1, max_size=24))
def test_non_ascii_credentials_and_secrets_are_a_plain_no(brain, user, password, secret):
    project = brain
    credentials = f"{user}:{password}"
    token = base64.b64encode(credentials.encode("utf-8", "surrogatepass")).decode()
    response = _client().get(f"/ml/{project.pk}/health", HTTP_AUTHORIZATION=f"Basic {token}")
    assert response.status_code == (200 if credentials == ML_AUTH else 401)
    raw_header = _client().get(f"/ml/{project.pk}/health",
                               HTTP_AUTHORIZATION="Basic " + credentials)   # not base64 at all
    assert raw_header.status_code == 401
    hook = _client().post(reverse("annotator:ls_webhook", args=[project.pk]), data="{}",
                          content_type="application/json", HTTP_X_MEDLABEL_SECRET=secret)
    assert hook.status_code == (200 if secret == SECRET else 403)


# --- the Label Studio webhook is scoped by project ------------------------------------------


def _event(scan, annotation_id, choice, ls_project):
    return {"action": "ANNOTATION_CREATED", "project": {"id": ls_project},
            "task": {"id": 900 + annotation_id, "data": {"scan_id": scan.pk}},
            "annotation": {"id": annotation_id, "lead_time": 2.0,
                           "completed_by": {"email": "alice@example.org"},
                           "result": [{"from_name": "diagnosis", "to_name": "image",
                                       "type": "choices", "value": {"choices": [choice]}}]}}


@pytest.fixture
def two_projects(brain, other_project):
    other = other_project
    _import_brain(other)
    other.label_studio_project_id = 8
    other.save(update_fields=["label_studio_project_id"])
    return brain, other


@pytest.mark.parametrize("annotation_id", [41, 10**6, 2**31 + 5])
def test_an_annotation_of_project_a_replayed_through_project_bs_webhook_changes_nothing(
        two_projects, annotation_id):
    a, b = two_projects
    hook = lambda project: reverse("annotator:ls_webhook", args=[project.pk])  # noqa: E731
    scan_a = a.scans.filter(split="pool").order_by("pk").first()
    scan_b = b.scans.filter(split="pool").order_by("pk").first()
    truth = brain_truth(scan_a)
    other = "pituitary_tumor" if truth == "no_tumor" else "no_tumor"
    ok = _client().post(hook(a), data=json.dumps(_event(scan_a, annotation_id, truth, 7)),
                        content_type="application/json", HTTP_X_MEDLABEL_SECRET=SECRET)
    assert ok.status_code == 200
    stored = Annotation.objects.get(external_id=str(annotation_id))
    # the same Label Studio id through B's webhook: for A's scan, for B's scan, with A's or
    # B's Label Studio project id — A's annotation keeps its class, B gets nothing
    for scan, ls_project in ((scan_a, 8), (scan_b, 8), (scan_a, 7), (scan_b, 7)):
        _client().post(hook(b), data=json.dumps(_event(scan, annotation_id, other, ls_project)),
                       content_type="application/json", HTTP_X_MEDLABEL_SECRET=SECRET)
    stored.refresh_from_db()
    assert stored.label_class.name == truth and stored.scan_id == scan_a.pk
    assert not Annotation.objects.filter(scan__project=b, source="label_studio").exists()
    mismatch = _client().post(hook(a), data=json.dumps(_event(scan_a, 5, truth, 8)),
                              content_type="application/json", HTTP_X_MEDLABEL_SECRET=SECRET)
    assert mismatch.status_code == 409


# --- quarantined scans are not read -----------------------------------------------------------


def test_labels_and_adjudications_on_a_quarantined_scan_are_refused(brain, users):
    from annotator import label_studio

    project = brain
    scan = project.scans.filter(split="pool").order_by("pk").first()
    scan.quarantined = True
    scan.save(update_fields=["quarantined"])
    label = LabelClass.objects.get(project=project, name=brain_truth(scan))
    answer = _client(users["alice"]).post(
        reverse("annotator:answer", args=[project.pk, scan.pk]),
        data=json.dumps({"outcome": "label", "class_id": label.pk}),
        content_type="application/json")
    assert answer.status_code in (400, 404)      # the label page does not serve it at all
    for source in (Annotation.Source.WEB, Annotation.Source.ADJUDICATION):
        with pytest.raises(services.AnnotationError, match="quarantined"):
            services.annotation_create(scan=scan, reader=users["bob"], label_class=label,
                                       source=source)
    _, outcome = label_studio.ingest(project, annotation=_event(scan, 77, label.name, 7)[
        "annotation"], task={"id": 1, "data": {"scan_id": scan.pk}})
    assert outcome.startswith("ignored") and "quarantined" in outcome
    assert not Annotation.objects.filter(scan=scan).exclude(source="import").exists()


def test_asking_for_scans_without_an_encoder_says_what_to_do(brain, users):
    project = brain
    client = _client(users["alice"])
    response = client.post(reverse("annotator:query_new", args=[project.pk]), follow=True)
    assert response.status_code == 200
    text = response.content.decode()
    assert "Could not choose scans" in text or "scans chosen" in text


def test_asking_for_scans_when_every_pool_scan_is_labeled_says_so_and_stores_no_round(
        brain, users):
    from ml_backend.models import QueryRound
    from annotator.models import Scan

    project = brain
    for scan in Scan.objects.filter(project=project, split="pool"):
        label = LabelClass.objects.get(project=project, name=brain_truth(scan))
        services.annotation_create(scan=scan, reader=users["alice"], label_class=label)
    before = QueryRound.objects.filter(project=project).count()
    response = _client(users["alice"]).post(
        reverse("annotator:query_new", args=[project.pk]), follow=True)
    assert response.status_code == 200
    text = response.content.decode()
    assert "Could not choose scans" in text and "is labeled" in text
    assert QueryRound.objects.filter(project=project).count() == before


# --- races: one refit, however many callers ---------------------------------------------------


def _concurrently(n: int, work) -> list:
    barrier, results, errors = threading.Barrier(n), [], []

    def one(i):
        try:
            barrier.wait(10)
            results.append(work(i))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            connection.close()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return results


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("trial", range(3))
def test_concurrent_triggers_queue_exactly_one_refit(encoded_project, users, monkeypatch, trial):
    """Eight Label Studio START_TRAINING calls and eight answers crossing ``refit_every`` at
    once: one refit run each time (a lock on the project row)."""
    if connection.vendor != "postgresql":
        pytest.skip("true concurrency needs PostgreSQL (CI's second pass)")
    from ml_backend import dispatch
    from ml_backend.services import runs

    monkeypatch.setattr(dispatch, "enqueue_training_run", lambda run_id: None)  # stay queued
    project = encoded_project
    Membership.objects.get_or_create(project=project, user=users["bob"],
                                     defaults={"role": Membership.Role.CLINICIAN})
    _concurrently(8, lambda i: runs.refit_start_if_due(project=project, force=True))
    assert TrainingRun.objects.filter(project=project, kind="refit").count() == 1
    TrainingRun.objects.filter(project=project, kind="refit").update(status="succeeded")

    project.refit_every = 4
    project.save(update_fields=["refit_every"])
    labeled = set(Annotation.objects.filter(scan__project=project).values_list("scan_id",
                                                                                flat=True))
    fresh = [s for s in project.scans.filter(split="pool").order_by("pk") if s.pk not in labeled]
    by_class = {}
    for scan in fresh:
        by_class.setdefault(brain_truth(scan), []).append(scan)
    # four of each class: labels of one class alone queue no refit (it would fit nothing)
    scans = [scan for pair in zip(*(found[:4] for found in by_class.values())) for scan in pair]
    assert len(scans) == 8
    classes = {c.name: c for c in LabelClass.objects.filter(project=project)}
    readers = [users["alice"], users["bob"]]
    _concurrently(len(scans), lambda i: services.annotation_create(
        scan=scans[i], reader=readers[i % 2], label_class=classes[brain_truth(scans[i])]))
    queued = TrainingRun.objects.filter(project=project, kind="refit", status="queued").count()
    assert queued == 1
