"""A submission id replayed with another answer (the sixth probe, fault 2): the answer reached
the server, the browser got a 502, the reader pressed another class. A true replay (the same
answer under the same id) stays a no-op; the same id with a different answer is refused 409,
naming the stored answer (label page JSON and API problem JSON), never returned as if the
new answer were saved. A correction under a new id is stored and the page is told which
answer it replaces; an answer sooner than anyone reads is kept but said (``too_quick``).
Real imports, the named users, the label page's answer view and the REST API."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from django.test import Client
from django.urls import reverse
from PIL import Image
from rest_framework.authtoken.models import Token

from annotator import services
from annotator.labeling import MIN_READING_MS
from annotator.models import Annotation, FindingAnswer, ImportJob, LabelClass, Scan
from tests.base import FIXTURES, PASSWORD
from tests.conftest import run_import

pytestmark = pytest.mark.django_db
PROBLEM = "application/problem+json"


def _page(user) -> Client:
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    return client


def _api(user) -> Client:
    token, _ = Token.objects.get_or_create(user=user)
    return Client(HTTP_AUTHORIZATION=f"Token {token.key}")


def _post(client, url, body):
    return client.post(url, json.dumps(body), content_type="application/json")


@pytest.fixture
def chest(project, tmp_path):
    folder = tmp_path / "chest"
    folder.mkdir()
    for path in sorted((FIXTURES / "chest_xray" / "pool" / "normal").iterdir())[:3]:
        shutil.copy(path, folder / path.name)
    job = run_import(project, folder, layout="flat", dataset_name="chest",
                     label_set="Chest X-ray")
    assert job.status == ImportJob.Status.SUCCEEDED, job.last_error
    scans = list(Scan.objects.filter(project=project).order_by("pk"))
    label_set = scans[0].label_set
    normal, _ = services.label_class_get_or_create(project=project, name="normal",
                                                   label_set=label_set)
    pneumonia, _ = services.label_class_get_or_create(project=project, name="pneumonia",
                                                      label_set=label_set)
    return scans, normal, pneumonia


def test_the_page_replay_with_another_answer_is_409_naming_the_stored_one(project, users,
                                                                          chest):
    scans, normal, pneumonia = chest
    alice = _page(users["alice"])
    url = reverse("annotator:answer", args=[project.pk, scans[0].pk])
    first = _post(alice, url, {"outcome": "label", "class_id": normal.pk, "duration_ms": 2100,
                               "submission_id": "page-1"})
    assert first.status_code == 201, first.content
    saved = first.json()["saved"]
    assert (saved["label"], saved["words"], saved["created"]) == ("normal", "normal", True)
    assert first.json()["replaced"] is None and first.json()["too_quick"] is None

    # the true replay (a retry measures its reading time again): the stored answer, no-op
    again = _post(alice, url, {"outcome": "label", "class_id": normal.pk, "duration_ms": 3900,
                               "submission_id": "page-1"})
    assert again.status_code == 200, again.content
    assert again.json()["saved"]["id"] == saved["id"] and not again.json()["saved"]["created"]

    # the same id, another class: refused, the stored answer named, nothing changed
    changed = _post(alice, url, {"outcome": "label", "class_id": pneumonia.pk,
                                 "duration_ms": 4200, "submission_id": "page-1"})
    assert changed.status_code == 409, changed.content
    body = changed.json()
    assert body["code"] == "submission_conflict"
    assert "already saved as normal" in body["error"] and "pneumonia" in body["error"]
    assert "new submission id" in body["error"]
    assert (body["stored"]["id"], body["stored"]["words"]) == (saved["id"], "normal")
    for outcome in ("skip", "unsure"):
        other = _post(alice, url, {"outcome": outcome, "submission_id": "page-1"})
        assert other.status_code == 409 and f"this request says {outcome}" in \
            other.json()["error"], other.content
    stored = Annotation.objects.filter(scan=scans[0], reader=users["alice"])
    assert list(stored.values_list("label_class__name", flat=True)) == ["normal"]

    # the correction under a new id is stored, and the page is told what it replaces
    corrected = _post(alice, url, {"outcome": "label", "class_id": pneumonia.pk,
                                   "duration_ms": 4200, "submission_id": "page-2"})
    assert corrected.status_code == 201, corrected.content
    assert corrected.json()["saved"]["words"] == "pneumonia"
    assert corrected.json()["replaced"]["words"] == "normal"
    latest = stored.order_by("-created_at", "-pk").first()
    assert latest.label_class == pneumonia


def test_the_api_replay_with_another_answer_is_problem_json_409(project, users, chest):
    scans, normal, pneumonia = chest
    api = _api(users["alice"])
    url = f"/api/v1/projects/{project.pk}/annotations/"
    first = api.post(url, {"scan": scans[1].pk, "class_id": normal.pk,
                           "submission_id": "script-7"}, content_type="application/json")
    assert first.status_code == 201, first.content
    replay = api.post(url, {"scan": scans[1].pk, "class_id": normal.pk,
                            "submission_id": "script-7"}, content_type="application/json")
    assert replay.status_code == 200 and replay.json()["id"] == first.json()["id"]
    changed = api.post(url, {"scan": scans[1].pk, "class_id": pneumonia.pk,
                             "submission_id": "script-7"}, content_type="application/json")
    assert changed.status_code == 409, changed.content
    assert changed["Content-Type"] == PROBLEM
    problem = changed.json()
    assert problem["status"] == 409 and problem["title"] == "Conflict"
    assert f"already saved as normal (answer {first.json()['id']}" in problem["detail"]
    assert "this request says pneumonia" in problem["detail"]
    assert Annotation.objects.filter(scan=scans[1]).count() == 1
    # another reader's answer under the same id is theirs, not a conflict
    bob = _api(users["bob"]).post(url, {"scan": scans[1].pk, "class_id": pneumonia.pk,
                                        "submission_id": "script-7"},
                                  content_type="application/json")
    assert bob.status_code == 201, bob.content


def test_a_findings_replay_is_compared_finding_by_finding(project, users, tmp_path):
    rng = np.random.default_rng(3)
    (tmp_path / "train").mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(
            tmp_path / "train" / f"view{i}.png")
    (tmp_path / "labels.csv").write_text("filename,Edema,Nodule\n"
                                         "train/view0.png,,\ntrain/view1.png,,\n")
    job = run_import(project, tmp_path / "labels.csv")
    assert job.status == ImportJob.Status.SUCCEEDED, job.last_error
    scan = Scan.objects.order_by("pk").first()
    edema, nodule = (LabelClass.objects.get(name=n) for n in ("Edema", "Nodule"))
    alice = _page(users["alice"])
    url = reverse("annotator:answer", args=[project.pk, scan.pk])
    marked = {str(edema.pk): "present", str(nodule.pk): "absent"}
    first = _post(alice, url, {"outcome": "findings", "findings": marked,
                               "submission_id": "f-1"})
    assert first.status_code == 201, first.content
    assert first.json()["saved"]["words"] == "findings: Edema present"
    same = _post(alice, url, {"outcome": "findings", "findings": dict(marked),
                              "submission_id": "f-1"})
    assert same.status_code == 200 and same.json()["saved"]["id"] == first.json()["saved"]["id"]
    other = _post(alice, url, {"outcome": "findings",
                               "findings": {str(edema.pk): "uncertain",
                                            str(nodule.pk): "absent"},
                               "submission_id": "f-1"})
    assert other.status_code == 409, other.content
    assert "already saved as findings: Edema present" in other.json()["error"]
    assert "this request says findings: Edema uncertain" in other.json()["error"]
    none = _post(alice, url, {"outcome": "findings", "no_finding": True, "submission_id": "f-1"})
    assert none.status_code == 409 and "says no finding" in none.json()["error"]
    assert dict(FindingAnswer.objects.values_list("finding__name", "state")) == {
        "Edema": "present", "Nodule": "absent"}
    assert Annotation.objects.count() == 1


def test_an_answer_sooner_than_a_reading_is_kept_and_said(project, users, chest, caplog):
    scans, normal, _ = chest
    alice = _page(users["alice"])
    quick = _post(alice, reverse("annotator:answer", args=[project.pk, scans[2].pk]),
                  {"outcome": "label", "class_id": normal.pk,
                   "duration_ms": MIN_READING_MS - 90, "submission_id": "q-1"})
    assert quick.status_code == 201, quick.content
    words = quick.json()["too_quick"]
    assert f"normal on scan #{scans[2].pk} came {MIN_READING_MS - 90} ms" in words
    assert "undo it (Backspace)" in words
    assert "came 60 ms after the scan was shown" in caplog.text
    assert Annotation.objects.get(scan=scans[2]).duration_ms == MIN_READING_MS - 90
    read = _post(alice, reverse("annotator:answer", args=[project.pk, scans[1].pk]),
                 {"outcome": "label", "class_id": normal.pk, "duration_ms": MIN_READING_MS,
                  "submission_id": "q-2"})
    assert read.status_code == 201 and read.json()["too_quick"] is None
