"""Hostile requests from the second independent probe, on the API, the Label Studio ML
backend and the pages: JSON nested 100,000 deep, NUL and other control characters in query
parameters and URL parts, bodies over DATA_UPLOAD_MAX_MEMORY_SIZE, a submission id two
readers both use, a suggestion no model could have made, ``?adjudicated=maybe`` on the page
download and an absurd reading time. Each is a clear 4xx in the caller's shape (problem JSON
on /api/, ``{"error"}`` on /ml/ and to a page's script, plain text on a page), never a 500 —
and on PostgreSQL too (CI), where a NUL in a filter was a ``DataError``."""

from __future__ import annotations

import base64
import json
import shutil

import pytest
from django.test import Client
from rest_framework.authtoken.models import Token

from annotator import services
from annotator.models import Annotation, AuditEvent, ImportJob, Membership
from ml_backend.models import ModelVersion
from tests.base import FIXTURES, PASSWORD
from tests.conftest import run_import

pytestmark = pytest.mark.django_db
PROBLEM = "application/problem+json"


def api(user) -> Client:
    token, _ = Token.objects.get_or_create(user=user)
    return Client(HTTP_AUTHORIZATION=f"Token {token.key}")


def page_client(user) -> Client:
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    return client


def _folder(tmp_path, name: str, source, n: int = 3):
    folder = tmp_path / name
    folder.mkdir()
    for path in sorted(source.iterdir())[:n]:
        shutil.copy(path, folder / path.name)
    return folder


def import_two_sets(project, tmp_path) -> dict:
    """Three chest films in 'Chest X-ray' (normal, pneumonia) and three brain MRIs in
    'Brain MRI' (glioma_tumor, no_tumor), all in the pool: a scan of each anatomy and the
    classes that apply to it and those that do not."""
    run_import(project, _folder(tmp_path, f"chest{project.pk}",
                                FIXTURES / "chest_xray" / "pool" / "normal"),
               layout="flat", dataset_name="chest", label_set="Chest X-ray")
    run_import(project, _folder(tmp_path, f"brain{project.pk}",
                                FIXTURES / "brain_mri" / "pool" / "no_tumor"),
               layout="flat", dataset_name="brain", label_set="Brain MRI")
    sets = {s.name: s for s in project.label_sets.all()}
    classes = {}
    for set_name, names in (("Chest X-ray", ("normal", "pneumonia")),
                            ("Brain MRI", ("glioma_tumor", "no_tumor"))):
        for name in names:
            classes[name], _ = services.label_class_get_or_create(
                project=project, name=name, label_set=sets[set_name])
    scans = project.scans.order_by("pk")
    return {"classes": classes,
            "chest": list(scans.filter(label_set=sets["Chest X-ray"])),
            "brain": list(scans.filter(label_set=sets["Brain MRI"]))}


@pytest.fixture
def two_sets(project, tmp_path):
    return import_two_sets(project, tmp_path)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def assert_problem(response, status: int, words: str = ""):
    assert response.status_code == status, response.content[:300]
    assert response["Content-Type"] == PROBLEM, response["Content-Type"]
    body = response.json()
    assert body["status"] == status and body["title"] and body["detail"]
    assert words in body["detail"], body["detail"]
    return body


# --- 1. JSON nested far deeper than any real body ----------------------------------------


def test_deeply_nested_json_is_a_problem_400_on_every_api_body(project, users, two_sets):
    alice = api(users["alice"])
    url = f"/api/v1/projects/{project.pk}/annotations/"
    for body in (nested(100_000), '{"a":' * 50_000 + "1" + "}" * 50_000, nested(33)):
        assert_problem(alice.post(url, body, content_type="application/json"), 400,
                       "nests deeper than 32 levels")
    # the project's limit, not less: 32 levels parse (and the serializer says what is wrong)
    shallow = alice.post(url, json.dumps({"scan": two_sets["chest"][0].pk, "outcome": "label",
                                          "class_id": nested(30)}),
                         content_type="application/json")
    assert_problem(shallow, 400)
    assert "class_id" in shallow.json()["errors"]
    # the same parser's other limits: a 41-digit number, NaN, not UTF-8, a NUL
    for raw, words in ((b'{"scan": 1' + b"0" * 40 + b"}", "a number of 41 characters"),
                       (b'{"scan": NaN}', "NaN is not a JSON value"),
                       (b'{"scan": "\xff"}', "not UTF-8"),
                       (b'{"submission_id": "a\\u0000b"}', "NUL")):
        assert_problem(alice.post(url, raw, content_type="application/json"), 400, words)
    # a JSON body over the parser's 1 MB: 413, as the label page and /ml/ say
    big = json.dumps({"scan": 1, "note": "x" * 1_100_000})
    assert_problem(alice.post(url, big, content_type="application/json"), 413,
                   "at most 1000000")
    assert not Annotation.objects.exists()
    # and a well-formed answer still goes through the same parser
    made = alice.post(url, {"scan": two_sets["chest"][0].pk, "outcome": "label",
                            "class_id": two_sets["classes"]["normal"].pk},
                      content_type="application/json")
    assert made.status_code == 201, made.content


# --- 2. NUL and other control characters in query parameters and URL parts ----------------


def test_a_control_character_in_a_query_or_path_is_a_clear_400_everywhere(project, users,
                                                                           two_sets):
    alice, bob = api(users["alice"]), api(users["bob"])
    base = f"/api/v1/projects/{project.pk}"
    for client, url in ((alice, f"{base}/scans/?dataset=%00"),
                        (alice, f"{base}/scans/?modality=%00"),
                        (alice, f"{base}/scans/?modality=C%00R"),
                        (alice, f"{base}/annotations/?reader=%00"),
                        (alice, f"{base}/annotations/?reader=alice%01"),
                        (alice, f"{base}/predictions/?version=%00"),
                        (alice, f"{base}/labels/?format=%00"),
                        (alice, f"{base}/scans/?page=%1b"),
                        (alice, f"{base}/scans/?dataset=a%0Ab"),
                        (alice, f"{base}/scans/?dataset=%C2%85"),       # C1 (NEL)
                        (alice, f"{base}/scans/?%00=1"),                 # in a name
                        (bob, f"{base}/models/%00/export/"),
                        (bob, f"{base}/models/clf%7F/export/")):
        body = assert_problem(client.get(url), 400, "control character")
        assert body["title"] == "Bad request", url
    # the same request without the control character is answered as before
    assert alice.get(f"{base}/scans/?dataset=chest").json()["count"] == 3
    assert alice.get(f"{base}/scans/?dataset=%E2%9C%93").json()["count"] == 0   # ✓: text
    assert alice.get(f"{base}/annotations/?reader=alice").status_code == 200
    assert_problem(bob.get(f"{base}/models/nope/export/"), 404)
    # the ML backend answers in its own shape
    ml = Client().get(f"/ml/{project.pk}/health?x=%00")
    assert ml.status_code == 400 and "control character" in ml.json()["error"]
    # the pages: a short plain-text 400, not Django's error page (nor a 500)
    clinician = page_client(users["alice"])
    for url in (f"/projects/{project.pk}/reports/?model=%00",
                f"/projects/{project.pk}/?split=%00",
                f"/projects/{project.pk}/?page=%00",
                f"/projects/{project.pk}/reports/?model=a%09b",
                f"/projects/{project.pk}/reports/confusion.png?model=%00",
                f"/projects/{project.pk}/export/labels/?split=%00",
                f"/projects/{project.pk}/clusters/?set=%00",
                f"/projects/{project.pk}/reports/%00.png"):
        page = clinician.get(url)
        assert page.status_code == 400, url
        assert page["Content-Type"].startswith("text/plain") and b"control character" in \
            page.content, url
    # a page's script gets JSON
    scripted = clinician.get(f"/projects/{project.pk}/reports/?model=%00",
                             HTTP_ACCEPT="application/json")
    assert scripted.status_code == 400 and "control character" in scripted.json()["error"]
    assert clinician.get(f"/projects/{project.pk}/reports/?model=nope").status_code == 404


# --- 3. bodies over DATA_UPLOAD_MAX_MEMORY_SIZE -------------------------------------------


def test_a_body_over_the_upload_limit_is_a_413_in_the_callers_shape(project, users, settings):
    from django.urls import reverse

    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    too_big = b'{"scan": 1, "note": "' + b"x" * (limit + 10) + b'"}'
    alice = api(users["alice"])
    response = alice.post(f"/api/v1/projects/{project.pk}/annotations/", too_big,
                          content_type="application/json")
    body = assert_problem(response, 413, f"{limit:,} bytes")
    assert body["title"] == "Content too large"
    webhook = Client().post(f"/ml/{project.pk}/webhook", too_big,
                            content_type="application/json")
    assert webhook.status_code == 413 and f"{limit:,} bytes" in webhook.json()["error"]
    # the Label Studio webhook of the site and the label page's answer (page scripts): JSON
    page = page_client(users["alice"])
    answer = page.post(reverse("annotator:answer", args=[project.pk, 1]), too_big,
                       content_type="application/json")
    assert answer.status_code == 413 and "bytes" in answer.json()["error"]
    # a form post on a page: plain text
    form = page.post(f"/projects/{project.pk}/", "a=" + "x" * (limit + 10),
                     content_type="application/x-www-form-urlencoded")
    assert form.status_code == 413 and form["Content-Type"].startswith("text/plain")
    # a Content-Length that is not a number is a 400, not a 500
    odd = alice.generic("POST", f"/api/v1/projects/{project.pk}/annotations/", b"{}",
                        content_type="application/json", CONTENT_LENGTH="12abc")
    assert_problem(odd, 400, "Content-Length")
    # below the limit nothing changes: the 1 MB JSON limit answers as before
    mid = b'{"scan": 1, "note": "' + b"x" * 1_800_000 + b'"}'
    assert_problem(alice.post(f"/api/v1/projects/{project.pk}/annotations/", mid,
                              content_type="application/json"), 413, "at most 1000000")
    settings.ML_BACKEND_BASIC_AUTH = "labelstudio:ml-backend-test-password"
    signed = "Basic " + base64.b64encode(b"labelstudio:ml-backend-test-password").decode()
    hook = Client().post(f"/ml/{project.pk}/webhook", mid, content_type="application/json",
                         HTTP_AUTHORIZATION=signed)
    assert hook.status_code == 413 and "at most 1000000" in hook.json()["error"]
    assert not Annotation.objects.exists()


def test_a_multipart_form_that_cannot_be_read_is_refused_with_its_reason(project, users,
                                                                        settings):
    """A form field over DATA_UPLOAD_MAX_MEMORY_SIZE, too many files or a broken body: the
    CSRF check of a page would parse it and answer Django's bare 400 page; the guard parses
    it first and says why, in the caller's shape."""
    from django.core.files.uploadedfile import SimpleUploadedFile

    from tests.base import png_bytes

    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    page = Client(enforce_csrf_checks=True)
    assert page.login(username=users["dora"].username, password=PASSWORD)
    page.get(f"/projects/{project.pk}/upload/")
    token = page.cookies["csrftoken"].value
    upload = f"/projects/{project.pk}/upload/"
    field = page.post(upload, {"csrfmiddlewaretoken": token, "dataset": "x" * (limit + 10)})
    assert field.status_code == 413 and field["Content-Type"].startswith("text/plain")
    assert f"{limit:,} bytes" in field.content.decode()
    problem = api(users["alice"]).post(f"/api/v1/projects/{project.pk}/imports/",
                                       {"dataset": "x" * (limit + 10)})
    assert_problem(problem, 413, "form field")
    settings.DATA_UPLOAD_MAX_NUMBER_FILES = 2
    files = [SimpleUploadedFile(f"{n}.png", png_bytes(seed=n), content_type="image/png")
             for n in range(3)]
    many = page.post(upload, {"csrfmiddlewaretoken": token, "files": files})
    assert many.status_code == 400 and "at most 2 files" in many.content.decode()
    broken = page.generic("POST", upload, b"--x\r\nnot a part",
                          content_type="multipart/form-data")        # no boundary
    assert broken.status_code == 400 and "multipart" in broken.content.decode()
    assert not ImportJob.objects.filter(project=project).exists()
    assert list(settings.INCOMING_ROOT.iterdir()) == []


def test_a_multipart_upload_is_not_refused_by_the_body_limit(project, users, settings):
    """Files are bounded by the upload views (UPLOAD_MAX_FILE_BYTES), not by the in-memory
    limit for form fields: an upload larger than DATA_UPLOAD_MAX_MEMORY_SIZE still arrives."""
    from django.core.files.uploadedfile import SimpleUploadedFile

    from tests.base import png_bytes

    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 10_000
    image = png_bytes(size=256)
    assert len(image) > settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    response = api(users["alice"]).post(
        f"/api/v1/projects/{project.pk}/imports/",
        {"files": [SimpleUploadedFile("big.png", image, content_type="image/png")],
         "modality": "CR"})
    assert response.status_code == 202, response.content


# --- 4. submission ids are each reader's own, per project --------------------------------


@pytest.fixture
def second_project(users, tmp_path):
    other = services.project_create(name="Second site", created_by=users["dora"])
    services.membership_set(project=other, user=users["alice"], role=Membership.Role.CLINICIAN)
    services.membership_set(project=other, user=users["bob"], role=Membership.Role.REVIEWER)
    return other, import_two_sets(other, tmp_path)


def test_two_readers_and_two_projects_may_use_the_same_submission_id(project, users, two_sets,
                                                                     second_project):
    other, other_sets = second_project
    alice, bob = api(users["alice"]), api(users["bob"])
    url = f"/api/v1/projects/{project.pk}/annotations/"
    normal, pneumonia = two_sets["classes"]["normal"], two_sets["classes"]["pneumonia"]
    chest = two_sets["chest"]
    first = alice.post(url, {"scan": chest[0].pk, "class_id": normal.pk,
                             "submission_id": "shared-id-1"}, content_type="application/json")
    assert first.status_code == 201, first.content
    # the reviewer, another answer with the same id (on another scan, or the same one):
    # stored, not refused
    second = bob.post(url, {"scan": chest[1].pk, "class_id": pneumonia.pk,
                            "submission_id": "shared-id-1"}, content_type="application/json")
    assert second.status_code == 201, second.content
    third = bob.post(url, {"scan": chest[0].pk, "class_id": pneumonia.pk,
                           "submission_id": "shared-id-2"}, content_type="application/json")
    fourth = alice.post(url, {"scan": chest[1].pk, "class_id": normal.pk,
                              "submission_id": "shared-id-2"}, content_type="application/json")
    assert (third.status_code, fourth.status_code) == (201, 201), (third.content,
                                                                   fourth.content)
    # alice in the second project, with the id she used in the first
    other_url = f"/api/v1/projects/{other.pk}/annotations/"
    elsewhere = alice.post(other_url, {
        "scan": other_sets["chest"][0].pk, "class_id": other_sets["classes"]["normal"].pk,
        "submission_id": "shared-id-1"}, content_type="application/json")
    assert elsewhere.status_code == 201, elsewhere.content
    assert Annotation.objects.filter(external_id="shared-id-1").count() == 3
    # the replay is still a no-op: same reader, same id, same answer → the stored one
    again = alice.post(url, {"scan": chest[0].pk, "class_id": normal.pk,
                             "submission_id": "shared-id-1"}, content_type="application/json")
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert Annotation.objects.filter(reader=users["alice"], project=project).count() == 2
    # a reader reusing their own id for another scan is told so, about their own answer only
    reused = alice.post(url, {"scan": chest[2].pk, "class_id": normal.pk,
                              "submission_id": "shared-id-1"}, content_type="application/json")
    body = assert_problem(reused, 400, f"your answer on scan {chest[0].pk}")
    assert "another answer" not in body["detail"]
    assert Annotation.objects.filter(external_id="shared-id-1").count() == 3


def test_the_database_holds_one_answer_per_reader_project_and_submission_id(project, users,
                                                                            two_sets):
    """The constraint itself (what a concurrent double submit meets), and Label Studio ids
    still unique per source."""
    from django.db import IntegrityError, transaction

    scan, normal = two_sets["chest"][0], two_sets["classes"]["normal"]

    def answer(reader, external_id, source="web"):
        return services.annotation_create(scan=scan, reader=reader, label_class=normal,
                                          source=source, external_id=external_id)

    answer(users["alice"], "k-1")
    answer(users["bob"], "k-1")
    with pytest.raises(IntegrityError), transaction.atomic():
        answer(users["alice"], "k-1")
    answer(None, "ls-9", source="label_studio")
    with pytest.raises(IntegrityError), transaction.atomic():
        answer(None, "ls-9", source="label_studio")
    answer(users["alice"], "", source="web")            # no id: never a conflict
    answer(users["alice"], "", source="web")


# --- 5. a suggestion no model could have made ---------------------------------------------


def test_a_shown_suggestion_must_be_the_scans_class_from_a_projects_classifier(
        project, users, two_sets, other_project):
    alice = api(users["alice"])
    url = f"/api/v1/projects/{project.pk}/annotations/"
    chest, classes = two_sets["chest"][0], two_sets["classes"]
    glioma, normal, pneumonia = classes["glioma_tumor"], classes["normal"], classes["pneumonia"]
    ModelVersion.objects.create(project=project, kind="classifier", version="clf-1",
                                status="ready")
    ModelVersion.objects.create(project=project, kind="encoder", version="enc-1",
                                status="active")
    ModelVersion.objects.create(project=other_project, kind="classifier", version="clf-x",
                                status="ready")
    refusals = (
        # the probe's request: a brain class on a chest film, no model named
        ({"shown_suggestion": glioma.pk}, "not a class of this scan's label set"),
        ({"shown_suggestion": glioma.pk, "shown_model_version": "clf-1"},
         "not a class of this scan's label set"),
        ({"shown_suggestion": pneumonia.pk}, "needs the model version"),
        ({"shown_suggestion": pneumonia.pk, "shown_model_version": ""},
         "needs the model version"),
        ({"shown_suggestion": pneumonia.pk, "shown_model_version": "enc-1"},
         "not one of this project's classifiers"),
        ({"shown_suggestion": pneumonia.pk, "shown_model_version": "clf-x"},
         "not one of this project's classifiers"),
        ({"shown_suggestion": 10 ** 9, "shown_model_version": "clf-1"},
         "not one of this project's"),
    )
    for shown, words in refusals:
        response = alice.post(url, {"scan": chest.pk, "outcome": "label", "class_id": normal.pk,
                                    **shown}, content_type="application/json")
        assert_problem(response, 400, words)
    assert not Annotation.objects.exists()
    assert not AuditEvent.objects.filter(action="annotation.created").exists()
    made = alice.post(url, {"scan": chest.pk, "outcome": "label", "class_id": normal.pk,
                            "shown_suggestion": pneumonia.pk, "shown_model_version": "clf-1",
                            "shown_confidence": 0.7}, content_type="application/json")
    assert made.status_code == 201, made.content
    assert made.json()["shown_suggestion"] == "pneumonia"
    assert made.json()["shown_model_version"] == "clf-1"
    # no suggestion shown at all: as before, no model version needed
    plain = alice.post(url, {"scan": two_sets["chest"][1].pk, "outcome": "skip"},
                       content_type="application/json")
    assert plain.status_code == 201, plain.content


def test_the_label_page_answer_meets_the_same_suggestion_check(project, users, two_sets):
    from django.urls import reverse

    ModelVersion.objects.create(project=project, kind="classifier", version="clf-1",
                                status="ready")
    chest, classes = two_sets["chest"][0], two_sets["classes"]
    page = page_client(users["alice"])
    url = reverse("annotator:answer", args=[project.pk, chest.pk])
    wrong = page.post(url, json.dumps({"outcome": "unsure", "shown_model_version": "clf-1",
                                       "shown_suggestion": classes["glioma_tumor"].pk}),
                      content_type="application/json")
    assert wrong.status_code == 400
    assert "not a class of this scan's label set" in wrong.json()["error"]
    # the page's form-field path too
    form = page.post(url, {"outcome": "unsure", "shown_suggestion": classes["pneumonia"].pk})
    assert form.status_code == 400 and "needs the model version" in form.json()["error"]
    assert not Annotation.objects.exists()
    # as the page sends it (no suggestion: empty strings)
    ok = page.post(url, json.dumps({"outcome": "unsure", "shown_model_version": "",
                                    "shown_suggestion": "", "shown_confidence": ""}),
                   content_type="application/json")
    assert ok.status_code == 201, ok.content


# --- 6. the page download's filter and the reading time's message ------------------------


def test_the_page_download_refuses_an_unknown_adjudicated_value(project, users, two_sets):
    from django.urls import reverse

    bob = page_client(users["bob"])
    url = reverse("annotator:export_labels", args=[project.pk])
    for value in ("maybe", "yes", "2", "True"):
        refused = bob.get(url, {"adjudicated": value})
        assert refused.status_code == 400, value
        assert refused["Content-Type"].startswith("text/plain")
        assert b"adjudicated" in refused.content
    for value in ("1", "0", "true", "false", ""):
        assert bob.get(url, {"adjudicated": value}).status_code == 200, value
    assert bob.get(url).status_code == 200
    # the API, as before
    assert_problem(api(users["bob"]).get(f"/api/v1/projects/{project.pk}/labels/",
                                         {"adjudicated": "maybe"}), 400, "adjudicated")


def test_an_absurd_reading_time_is_refused_as_a_reading_time(project, users, two_sets):
    from django.urls import reverse

    chest = two_sets["chest"]
    normal = two_sets["classes"]["normal"]
    page = page_client(users["alice"])
    url = reverse("annotator:answer", args=[project.pk, chest[0].pk])
    for value in (1e25, -5, 2.5, "soon", True, 1e300):
        response = page.post(url, json.dumps({"class_id": normal.pk, "duration_ms": value}),
                             content_type="application/json")
        assert response.status_code == 400, value
        error = response.json()["error"]
        assert "duration_ms" in error and "milliseconds" in error and "(an id)" not in error
    assert not Annotation.objects.exists()
    # over the 6 hours a reading is capped at, but a clock's value: stored as 6 hours
    from annotator.labeling import MAX_DURATION_MS

    long = page.post(url, json.dumps({"class_id": normal.pk, "duration_ms": 9 * 3600 * 1000}),
                     content_type="application/json")
    assert long.status_code == 201, long.content
    assert Annotation.objects.get().duration_ms == MAX_DURATION_MS
    # 0 ms (a keyboard answer at once) and the form's digits are fine
    zero = page.post(reverse("annotator:answer", args=[project.pk, chest[1].pk]),
                     {"class_id": normal.pk, "duration_ms": "0"})
    assert zero.status_code == 201, zero.content
    # the API says what it wants, by field
    refused = api(users["alice"]).post(
        f"/api/v1/projects/{project.pk}/annotations/",
        {"scan": chest[2].pk, "class_id": normal.pk, "duration_ms": 1e25},
        content_type="application/json")
    body = assert_problem(refused, 400, "milliseconds")
    assert "duration_ms" in body["errors"]
