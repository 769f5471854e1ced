"""Requests the third independent probe found answered in the wrong shape or with nothing to
act on (DEBUG off): more form or query fields than DATA_UPLOAD_MAX_NUMBER_FIELDS (Django's
HTML 400 page and an ERROR traceback), a POST or PUT to an unknown API path (Django's CSRF
403 page), an address that matches nothing (a 404 page reading "Resolver404"), a dataset
name holding a control character (stored, then never filterable), a 406 titled "Error", and
an answer whose fields contradict its outcome (stored, the contradiction dropped). Each is
now a clear 4xx in the caller's shape — problem JSON on /api/, ``{"error": …}`` on /ml/ and
to Label Studio's webhook, a page elsewhere — with its reason, logged at WARNING."""

from __future__ import annotations

import base64
import logging
from urllib.parse import urlencode

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from rest_framework.authtoken.models import Token

from annotator import services
from annotator.models import Annotation, Dataset, ImportJob
from tests.api.test_api_hostile import PROBLEM, assert_problem, import_two_sets
from tests.base import PASSWORD, png_bytes

pytestmark = pytest.mark.django_db
ML_AUTH = "labelstudio:ml-backend-test-password"


@pytest.fixture(autouse=True)
def production_errors(settings):
    """The answers a deployment gives: DEBUG off (Django's error handlers, not its debug
    pages)."""
    settings.DEBUG = False
    settings.ML_BACKEND_BASIC_AUTH = ML_AUTH
    settings.LABEL_STUDIO_WEBHOOK_SECRET = "the-webhook-secret"


def api(user, **extra) -> Client:
    """A script with the user's token; CSRF enforced as on a real server (the test client
    skips the check unless asked)."""
    token, _ = Token.objects.get_or_create(user=user)
    return Client(enforce_csrf_checks=True, HTTP_AUTHORIZATION=f"Token {token.key}", **extra)


def page_client(user) -> Client:
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    return client


def ml_headers() -> dict:
    return {"HTTP_AUTHORIZATION": "Basic " + base64.b64encode(ML_AUTH.encode()).decode()}


def fields(n: int) -> dict[str, str]:
    return {f"k{i}": "1" for i in range(n)}


def assert_error(response, status: int, words: str) -> dict:
    """``{"error": …}`` (the ML backend's and Label Studio's shape)."""
    assert response.status_code == status, response.content[:300]
    assert response["Content-Type"] == "application/json", response["Content-Type"]
    body = response.json()
    assert words in body["error"], body
    return body


# --- 5. more fields than DATA_UPLOAD_MAX_NUMBER_FIELDS ------------------------------------


def test_too_many_fields_is_a_400_with_its_reason_in_the_callers_shape(project, users,
                                                                      settings, caplog):
    limit = settings.DATA_UPLOAD_MAX_NUMBER_FIELDS
    words = f"more than {limit:,} fields"
    alice = api(users["alice"])
    base = f"/api/v1/projects/{project.pk}"
    caplog.set_level(logging.INFO)
    # the API: an urlencoded body of 2,000 fields, a multipart one of 1,001, a PUT, a query
    assert_problem(alice.post(f"{base}/annotations/", urlencode(fields(2000)),
                              content_type="application/x-www-form-urlencoded"), 400, words)
    assert_problem(alice.post(f"{base}/annotations/", fields(limit + 1)), 400, words)
    assert_problem(alice.post(f"{base}/imports/", fields(limit + 1)), 400, words)
    assert_problem(alice.put(f"{base}/annotations/", urlencode(fields(limit + 1)),
                             content_type="application/x-www-form-urlencoded"), 400, words)
    body = assert_problem(alice.get(f"{base}/scans/?" + urlencode(fields(limit + 1))), 400,
                          f"the query string has {words}")
    assert body["title"] == "Bad request"
    # the ML backend (Basic auth) and Label Studio's webhook on the site: {"error": …}
    assert_error(Client().post(f"/ml/{project.pk}/predict", fields(limit + 1), **ml_headers()),
                 400, words)
    assert_error(Client().post(f"/ml/{project.pk}/predict", urlencode(fields(2000)),
                               content_type="application/x-www-form-urlencoded",
                               **ml_headers()), 400, words)
    assert_error(Client().post(f"/labelstudio/{project.pk}/webhook/", fields(limit + 1),
                               HTTP_X_MEDLABEL_SECRET="the-webhook-secret"),
                 400, words)
    assert_error(Client().get(f"/ml/{project.pk}/health?" + urlencode(fields(limit + 1))),
                 400, words)
    # a page: plain text, before the CSRF check would read the form
    page = Client(enforce_csrf_checks=True)
    assert page.login(username="alice", password=PASSWORD)
    form = page.post(f"/projects/{project.pk}/", urlencode(fields(2000)),
                     content_type="application/x-www-form-urlencoded")
    assert form.status_code == 400 and form["Content-Type"].startswith("text/plain")
    assert words in form.content.decode()
    # refused and logged at WARNING, never as an ERROR with a traceback
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [
        (r.name, r.getMessage()) for r in caplog.records if r.levelno >= logging.ERROR]
    refused = [r for r in caplog.records if r.name == "django.security.TooManyFieldsSent"]
    assert len(refused) == 10 and {r.levelno for r in refused} == {logging.WARNING}
    assert all(r.exc_info is None for r in refused)
    assert not Annotation.objects.exists() and not ImportJob.objects.exists()
    # at the limit nothing changes
    assert alice.get(f"{base}/scans/?" + urlencode(fields(limit))).status_code == 200
    assert Client().get(f"/ml/{project.pk}/health", **ml_headers()).status_code == 200


# --- 6. a POST / PUT to an unknown API path ------------------------------------------------


def test_an_unknown_api_path_is_a_problem_404_for_every_method(project, users, two_sets):
    alice = api(users["alice"])
    base = f"/api/v1/projects/{project.pk}"
    body = assert_problem(alice.post(f"{base}/refit"), 404,
                          f"add the trailing slash ({base}/refit/)")
    assert body["title"] == "Not found"
    scan, normal = two_sets["chest"][0], two_sets["classes"]["normal"]
    answer = {"scan": scan.pk, "outcome": "label", "class_id": normal.pk}
    assert_problem(alice.post(f"{base}/annotations", answer, content_type="application/json"),
                   404, f"add the trailing slash ({base}/annotations/)")
    for method in ("put", "patch", "delete", "post"):
        response = getattr(alice, method)("/api/v1/nosuch", {"a": 1},
                                          content_type="application/json")
        body = assert_problem(response, 404, "no such API path: see /api/schema/")
        assert "trailing slash" not in body["detail"]
    assert "trailing slash" not in alice.get("/api/v1/nosuch/").json()["detail"]
    assert not Annotation.objects.exists()
    # with the slash the same request is answered (CSRF does not apply to a token)
    made = alice.post(f"{base}/annotations/", answer, content_type="application/json")
    assert made.status_code == 201, made.content
    # a page's POST without its CSRF token is still refused (the exemption is the API's 404)
    page = Client(enforce_csrf_checks=True)
    assert page.login(username="alice", password=PASSWORD)
    assert page.post(f"/projects/{project.pk}/query/").status_code == 403


# --- 7. an address that matches nothing -----------------------------------------------------


def test_a_404_says_something_a_person_can_act_on_in_the_callers_shape(project, users):
    alice = page_client(users["alice"])
    for url in ("/nosuchpage", "/projects/abc/", "/static-nothing/x.png"):
        page = alice.get(url)
        assert page.status_code == 404 and page["Content-Type"].startswith("text/html"), url
        text = page.content.decode()
        assert "Resolver404" not in text and "no such page" in text.lower(), url
    # a view's own Http404 still says what it said (a project of someone else's)
    other = services.project_create(name="Elsewhere", created_by=None)
    outsider = alice.get(f"/projects/{other.pk}/")
    assert outsider.status_code == 404 and b"Resolver404" not in outsider.content
    # a page's script gets JSON
    scripted = alice.get("/nosuchpage", HTTP_ACCEPT="application/json")
    assert_error(scripted, 404, "no such page")
    # the ML backend: JSON, naming the addresses it answers
    for method, url in (("post", f"/ml/{project.pk}/predict/"), ("get", "/ml/abc/health"),
                        ("get", f"/ml/{project.pk}/nosuch")):
        response = getattr(Client(), method)(url, **ml_headers())
        body = assert_error(response, 404, "no such ML backend address")
        assert "predict" in body["error"] and "no trailing slash" in body["error"]
    # the API outside /api/v1/: problem JSON
    assert_problem(api(users["alice"]).get("/api/v2/projects/"), 404, "/api/docs/")
    assert Client().get("/api/nosuch")["Content-Type"] == PROBLEM


def test_a_request_django_cannot_serve_is_a_400_in_the_callers_shape(project, users):
    """What no guard refuses first (here a Host header the site does not serve) reaches
    handler400: JSON for the API and Label Studio, the 400 page elsewhere."""
    odd = {"HTTP_HOST": "elsewhere.example"}
    assert_problem(api(users["alice"]).get("/api/v1/projects/", **odd), 400, "malformed")
    assert_error(Client().get(f"/ml/{project.pk}/health", **odd, **ml_headers()), 400,
                 "malformed")
    page = Client().get("/", **odd)
    assert page.status_code == 400 and page["Content-Type"].startswith("text/html")
    assert b"could not be read" in page.content


# --- 10. a control or invisible character in a dataset name --------------------------------


def test_a_dataset_name_with_a_control_character_is_refused_at_upload(project, users,
                                                                       settings):
    alice = api(users["alice"])
    url = f"/api/v1/projects/{project.pk}/imports/"
    for name, char in (("ward\x013", "U+0001"), ("ward\t3", "U+0009"),
                       ("ward\u202e3", "U+202E"), ("ward\u20283", "U+2028"),
                       ("ward\u200b3", "U+200B"), ("ward\x853", "U+0085")):
        png = SimpleUploadedFile("a.png", png_bytes(), content_type="image/png")
        body = assert_problem(alice.post(url, {"files": [png], "dataset": name}), 400,
                              f"control or invisible character ({char})")
        assert "dataset" in body["errors"]
    # the upload page says it beside the field
    page = page_client(users["alice"])
    png = SimpleUploadedFile("a.png", png_bytes(), content_type="image/png")
    form = page.post(f"/projects/{project.pk}/upload/", {"files": [png], "dataset": "ward\x013",
                                                         "split": "pool"})
    assert form.status_code == 400 and form["Content-Type"].startswith("text/html")
    assert "control or invisible character (U+0001)" in form.content.decode()
    # and import_scans --dataset (the same service)
    with pytest.raises(services.ImportRequestError, match=r"U\+0001"):
        services.import_job_create(project=project, source=str(settings.INCOMING_ROOT),
                                   dataset_name="ward\x013")
    assert not Dataset.objects.filter(project=project).exists()
    assert not ImportJob.objects.exists()
    # letters of any script, spaces and punctuation still go through
    png = SimpleUploadedFile("a.png", png_bytes(), content_type="image/png")
    made = alice.post(url, {"files": [png], "dataset": "Station Nord – IRM 3T (Zürich)",
                            "modality": "MR"})
    assert made.status_code == 202, made.content


# --- smaller ones ---------------------------------------------------------------------------


def test_a_406_is_titled_and_says_what_the_api_answers(project, users):
    response = api(users["alice"]).get(f"/api/v1/projects/{project.pk}/",
                                       HTTP_ACCEPT="application/xml")
    body = assert_problem(response, 406, "this API answers JSON only")
    assert body["title"] == "Not acceptable"


@pytest.fixture
def two_sets(project, tmp_path):
    return import_two_sets(project, tmp_path)


def test_an_answer_with_fields_of_another_outcome_is_refused_naming_them(project, users,
                                                                        two_sets):
    alice = api(users["alice"])
    url = f"/api/v1/projects/{project.pk}/annotations/"
    scan, normal = two_sets["chest"][0], two_sets["classes"]["normal"]
    for sent, field in (
            ({"outcome": "skip", "findings": {"Effusion": "present"}, "no_finding": True},
             "findings"),
            ({"outcome": "skip", "findings": {"Effusion": "present"}, "no_finding": True},
             "no_finding"),
            ({"outcome": "unsure", "class_id": normal.pk}, "class_id"),
            ({"outcome": "skip", "class_id": normal.pk}, "class_id"),
            ({"outcome": "label", "class_id": normal.pk, "no_finding": True}, "no_finding"),
            ({"outcome": "label", "class_id": normal.pk, "findings": {"1": "absent"}},
             "findings"),
            ({"outcome": "findings", "class_id": normal.pk, "no_finding": True}, "class_id"),
            ({"class_id": normal.pk, "no_finding": True}, "class_id")):
        response = alice.post(url, {"scan": scan.pk, **sent}, content_type="application/json")
        body = assert_problem(response, 400, f"{field}:")
        assert field in body["errors"], (sent, body)
    assert not Annotation.objects.exists()
    # what each outcome takes still goes through (null and false say nothing)
    for scan, sent in zip(two_sets["chest"], (
            {"outcome": "unsure", "class_id": None, "no_finding": False},
            {"outcome": "skip", "findings": {}},
            {"outcome": "label", "class_id": normal.pk})):
        made = alice.post(url, {"scan": scan.pk, **sent}, content_type="application/json")
        assert made.status_code in (200, 201), (sent, made.content)
    assert list(Annotation.objects.order_by("pk").values_list("outcome", flat=True)) == [
        "unsure", "skip", "label"]


def test_names_no_one_could_type_are_refused_everywhere_they_are_typed(project, users):
    """A control or invisible character in a project, label set or class name (the probe's
    ``ward\\x013`` for a dataset) is refused with the character's code, as a dataset's is."""
    from annotator import services
    from annotator.forms import LabelClassForm
    from annotator.models import LabelClass, LabelSet, Project

    services.label_class_get_or_create(project=project, name="normal")
    for bad in ("ward\x013", "chest\u202e", "zero\u200bwidth"):
        with pytest.raises(ValueError, match="control or invisible character"):
            services.project_create(name=bad)
        with pytest.raises(ValueError, match="control or invisible character"):
            services.label_set_create(project=project, name=bad)
        with pytest.raises(ValueError, match="control or invisible character"):
            services.label_class_get_or_create(project=project, name=bad)
        with pytest.raises(ValueError, match="control or invisible character"):
            services.label_class_update(label_class=LabelClass.objects.filter(
                project=project).first(), name=bad)
        with pytest.raises(services.ImportRequestError, match="control or invisible"):
            services.import_job_create(project=project, source="/nowhere", label_set=bad)
        form = LabelClassForm(data={"name": bad, "hotkey": "",
                                    "label_set": project.label_sets.first().pk},
                              project=project)
        assert not form.is_valid() and "control or invisible" in str(form.errors["name"])
    assert not Project.objects.filter(name__contains="ward").exists()
    assert not LabelSet.objects.filter(name__contains="ward").exists()
    # what people type still goes through
    assert services.label_class_get_or_create(project=project, name="Pleural effusion (L)")[1]


def test_an_answer_whose_fields_belong_to_another_outcome_is_refused_on_the_label_page(
        project, users, tmp_path):
    from annotator import labeling
    from annotator.models import Annotation, Scan
    from annotator.services import AnnotationError
    from tests.conftest import run_import

    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / "a.png").write_bytes(png_bytes(seed=3))
    run_import(project, tmp_path / "scans")
    scan = Scan.objects.get(project=project, split="pool")
    before = Annotation.objects.count()
    for data, field in (({"outcome": "unsure", "class_id": 1}, "class_id"),
                        ({"outcome": "skip", "no_finding": True}, "no_finding"),
                        ({"outcome": "skip", "findings": {"1": "present"}}, "findings")):
        with pytest.raises(AnnotationError, match=f"{field} is only for outcome="):
            labeling.answer_submit(project=project, scan=scan, user=users["dora"], data=data)
    assert Annotation.objects.count() == before
    labeling.answer_submit(project=project, scan=scan, user=users["dora"],
                           data={"outcome": "skip"})
    assert Annotation.objects.count() == before + 1


def test_a_label_read_from_a_file_loses_its_invisible_characters_and_imports(
        project, users, tmp_path):
    """A folder named ``pneu<zero-width space>monia`` (an accident of the file, not typed)
    imports as ``pneumonia`` rather than failing every file in it."""
    from annotator.models import LabelClass
    from tests.conftest import run_import

    folder = tmp_path / "scans" / "pneu\u200bmonia"
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(png_bytes(seed=5))
    job = run_import(project, tmp_path / "scans")
    assert job.imported == 1 and job.failed == 0
    assert list(LabelClass.objects.filter(project=project).values_list("name", flat=True)) == [
        "pneumonia"]
