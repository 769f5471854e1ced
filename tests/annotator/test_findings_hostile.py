"""Findings answers and imports a hostile probe broke (its findings group): identifier-looking
finding names, "no_finding" given as a string, one finding named twice, non-finite shown
scores, names repeated or in another case, and the API's error text. Real files imported by
the import service, answers posted through the label page and the REST API, on the test
database with the named users."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from PIL import Image
from rest_framework.authtoken.models import Token

from annotator.models import Annotation, FindingAnswer, ImportJob, LabelClass, Scan
from tests.base import PASSWORD
from tests.conftest import run_import


def _images(folder, count: int) -> None:
    rng = np.random.default_rng(count)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(
            folder / f"view{i}.png")


def _database_text() -> str:
    out = io.StringIO()
    call_command("dumpdata", "annotator", stdout=out)
    return out.getvalue()


def _answers(scan) -> dict[str, str]:
    return dict(FindingAnswer.objects.filter(annotation__scan=scan).values_list(
        "finding__name", "state"))


# --- 1. finding names that look like patient identifiers --------------------------------


def test_nih_finding_labels_that_look_like_identifiers_make_no_finding(project, tmp_path):
    _images(tmp_path, 3)
    (tmp_path / "labels.csv").write_text(
        "Image Index,Finding Labels\n"
        "view0.png,Doe^John\n"
        "view1.png,Effusion|MRN987654\n"
        "view2.png,No Finding\n")
    job = run_import(project, tmp_path / "labels.csv")
    assert job.status == ImportJob.Status.SUCCEEDED, job.last_error
    assert job.imported == 3 and job.labels_added == 2     # the Doe^John scan: no answer
    names = set(LabelClass.objects.values_list("name", flat=True))
    assert len(names) == 14 and "Doe^John" not in names and "MRN987654" not in names
    assert any(w.startswith("2 label(s) not used") for w in job.warnings), job.warnings
    assert not any("Doe" in w or "987654" in w for w in job.warnings), job.warnings
    scans = list(Scan.objects.order_by("source_name"))
    assert _answers(scans[0]) == {}
    assert _answers(scans[1])["Effusion"] == "present"
    assert set(_answers(scans[2]).values()) == {"absent"}
    text = _database_text()
    assert "Doe^John" not in text and "MRN987654" not in text


def test_finding_columns_that_look_like_identifiers_make_no_finding(project, tmp_path):
    _images(tmp_path, 2)
    (tmp_path / "labels.csv").write_text(
        "filename,Edema,Nodule,MRN987654,Doe^John\n"
        "view0.png,1,0,1,0\n"
        "view1.png,0,0,0,1\n")
    job = run_import(project, tmp_path / "labels.csv")
    assert job.status == ImportJob.Status.SUCCEEDED, job.last_error
    assert sorted(LabelClass.objects.values_list("name", flat=True)) == ["Edema", "Nodule"]
    assert any(w.startswith("2 label(s) not used") for w in job.warnings), job.warnings
    assert not any("Doe" in w or "987654" in w for w in job.warnings), job.warnings
    first = Scan.objects.get(source_name="view0.png")
    assert _answers(first) == {"Edema": "present", "Nodule": "absent"}
    text = _database_text()
    assert "Doe^John" not in text and "MRN987654" not in text


# --- 4. a repeated name counts once; another case is the same finding -------------------


def test_nih_names_are_compared_after_normalising(project, tmp_path):
    _images(tmp_path, 3)
    (tmp_path / "labels.csv").write_text(
        "Image Index,Finding Labels\n"
        "view0.png,No Finding|No Finding\n"
        "view1.png,effusion\n"
        "view2.png,Effusion|Nodule\n")
    job = run_import(project, tmp_path / "labels.csv")
    assert job.status == ImportJob.Status.SUCCEEDED, job.last_error
    assert job.labels_added == 3
    assert LabelClass.objects.count() == 14
    assert not any("beyond ChestX-ray14" in w for w in job.warnings), job.warnings
    scans = list(Scan.objects.order_by("source_name"))
    assert set(_answers(scans[0]).values()) == {"absent"}
    assert _answers(scans[1])["Effusion"] == "present"
    answers = _answers(scans[2])       # the lower-case column never overwrites it as absent
    assert (answers["Effusion"], answers["Nodule"]) == ("present", "present")


# --- 2, 3, 5. answers through the label page and the REST API ---------------------------


@pytest.fixture
def findings_scans(project, tmp_path):
    _images(tmp_path / "train", 4)
    (tmp_path / "labels.csv").write_text(
        "filename,Edema,Nodule\n"
        + "".join(f"train/view{i}.png,,\n" for i in range(4)))   # blank: no answers yet
    job = run_import(project, tmp_path / "labels.csv")
    assert job.status == ImportJob.Status.SUCCEEDED, job.last_error
    assert not Annotation.objects.exists()
    edema, nodule = (LabelClass.objects.get(name=n) for n in ("Edema", "Nodule"))
    return list(Scan.objects.order_by("pk")), edema, nodule


def _page(user) -> Client:
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    return client


def _api(user) -> Client:
    token, _ = Token.objects.get_or_create(user=user)
    return Client(HTTP_AUTHORIZATION=f"Token {token.key}")


def test_label_page_reads_no_finding_only_as_json_true_or_false(project, users,
                                                                findings_scans):
    scans, edema, _ = findings_scans
    alice = _page(users["alice"])
    url = reverse("annotator:answer", args=[project.pk, scans[0].pk])
    for value in ("false", "0", "true", 0, 1, []):
        response = alice.post(url, json.dumps({"outcome": "findings", "findings": {},
                                               "no_finding": value}),
                              content_type="application/json")
        assert response.status_code == 400, value
        assert "no_finding must be true or false" in response.json()["error"]
    assert not Annotation.objects.exists()
    saved = alice.post(url, json.dumps({"outcome": "findings", "no_finding": False,
                                        "findings": {str(edema.pk): "present"}}),
                       content_type="application/json")
    assert saved.status_code in (200, 201), saved.content
    assert _answers(scans[0]) == {"Edema": "present"}


def test_one_finding_named_twice_is_refused_on_the_page_and_the_api(project, users,
                                                                    findings_scans):
    scans, edema, _ = findings_scans
    alice = _page(users["alice"])
    url = reverse("annotator:answer", args=[project.pk, scans[0].pk])
    twice = {str(edema.pk): "present", f"0{edema.pk}": "absent"}
    response = alice.post(url, json.dumps({"outcome": "findings", "findings": twice}),
                          content_type="application/json")
    assert response.status_code == 400 and "twice" in response.json()["error"]
    response = alice.post(url, json.dumps({"outcome": "findings",
                                           "findings": {str(edema.pk): "present"},
                                           "shown_scores": {str(edema.pk): 0.4,
                                                            f"0{edema.pk}": 0.9}}),
                          content_type="application/json")
    assert response.status_code == 400 and "twice" in response.json()["error"]
    api = _api(users["alice"])
    base = f"/api/v1/projects/{project.pk}/annotations/"
    for findings in (twice, {"Edema": "present", str(edema.pk): "absent"}):
        response = api.post(base, {"scan": scans[1].pk, "outcome": "findings",
                                   "findings": findings}, content_type="application/json")
        assert response.status_code == 400, response.content
        assert "name the same finding" in response.json()["detail"]
    assert not Annotation.objects.exists()


def test_a_non_finite_shown_score_is_refused_as_a_shown_confidence_is(project, users,
                                                                     findings_scans):
    scans, edema, nodule = findings_scans
    alice = _page(users["alice"])
    url = reverse("annotator:answer", args=[project.pk, scans[0].pk])
    for score in ("NaN", "Infinity", 1.5, -0.1):
        response = alice.post(url, json.dumps({"outcome": "findings",
                                               "findings": {str(edema.pk): "present"},
                                               "shown_scores": {str(edema.pk): score}}),
                              content_type="application/json")
        assert response.status_code == 400, score
        assert "out of range" in response.json()["error"]
    assert not Annotation.objects.exists()
    saved = alice.post(url, json.dumps({"outcome": "findings",
                                        "findings": {str(edema.pk): "present"},
                                        "shown_scores": {str(edema.pk): 0.7,
                                                         str(nodule.pk): 0.1}}),
                       content_type="application/json")
    assert saved.status_code in (200, 201), saved.content
    stored = Annotation.objects.get()
    assert stored.shown_preselected is True
    assert stored.shown_scores == {str(edema.pk): 0.7, str(nodule.pk): 0.1}
    # scores of findings the set does not have: dropped, and so nothing was preselected
    other = alice.post(reverse("annotator:answer", args=[project.pk, scans[1].pk]),
                       json.dumps({"outcome": "findings", "findings": {str(edema.pk): "absent"},
                                   "shown_scores": {"999999": 0.7}}),
                       content_type="application/json")
    assert other.status_code in (200, 201), other.content
    stored = Annotation.objects.get(scan=scans[1])
    assert (stored.shown_scores, stored.shown_preselected) == ({}, False)


def test_api_errors_on_findings_answers_read_as_plain_text(project, users, findings_scans):
    scans, edema, _ = findings_scans
    api = _api(users["alice"])
    response = api.post(f"/api/v1/projects/{project.pk}/annotations/",
                        {"scan": scans[0].pk, "outcome": "findings",
                         "findings": {str(edema.pk): "present"},
                         "shown_scores": {str(edema.pk): "high"}},
                        content_type="application/json")
    assert response.status_code == 400
    body = response.json()
    assert "ErrorDetail" not in body["detail"] and "{" not in body["detail"]
    assert body["detail"] == f"shown_scores: {edema.pk}: A valid number is required."
    assert body["errors"] == {"shown_scores": {str(edema.pk): ["A valid number is required."]}}
