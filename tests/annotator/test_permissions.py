"""Every page of the clinician UI, walked from the URLconf: anonymous users are sent to the
login page, outsiders get 404 (never 403, so ids do not leak), and a member of one project
gets 404 for every object of another project."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import URLPattern, reverse

from annotator import services
from annotator.models import LabelClass, Membership
from annotator.urls import urlpatterns
from tests.base import FIXTURES, PASSWORD
from tests.conftest import run_import

pytestmark = pytest.mark.django_db
PUBLIC = {"project_list", "account"}   # login required; only the user's own projects and token
# No login by design: a signed, expiring token (Label Studio's image URLs) or a shared secret
# (Label Studio's webhook). Their refusals are tested below and in tests/label_studio.
NO_LOGIN = {"ls_image", "ls_webhook"}


def objects_of(project) -> dict:
    folder = FIXTURES / "brain_mri" / "eval" / "no_tumor"
    job = run_import(project, folder, layout="flat", default_label="no_tumor",
                     dataset_name="brain")
    scan = project.scans.first()
    from ml_backend.models import ModelVersion

    version = ModelVersion.objects.create(project=project, kind="classifier", status="ready",
                                          version=f"held-back-{project.pk}")
    annotation = scan.annotations.first()
    return {"project_id": project.pk, "scan_id": scan.pk, "job_id": job.pk,
            "version_id": version.pk, "annotation_id": annotation.pk,
            "class_id": LabelClass.objects.get(project=project).pk, "name": "confusion",
            "token": "not-a-valid-token"}


def url_for(pattern: URLPattern, ids: dict) -> str:
    args = {name: ids[name] for name in pattern.pattern.converters}
    return reverse(f"annotator:{pattern.name}", kwargs=args)


def client_for(user) -> Client:
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    return client


@pytest.fixture
def two_projects(project, other_project, users):
    services.membership_set(project=other_project, user=users["bob"],
                            role=Membership.Role.REVIEWER)
    return objects_of(project), objects_of(other_project)


def test_the_walk_covers_every_route():
    names = {p.name for p in urlpatterns}
    assert {"worklist", "label", "answer", "gradcam", "classify", "reports", "review",
            "adjudicate", "class_create", "scan_preview"} <= names
    assert all(isinstance(p, URLPattern) and p.name for p in urlpatterns)


def test_anonymous_users_are_sent_to_login_everywhere(two_projects):
    ids, _ = two_projects
    client = Client()
    for pattern in urlpatterns:
        if pattern.name in NO_LOGIN:
            continue
        url = url_for(pattern, ids)
        for method in ("get", "post"):
            response = getattr(client, method)(url)
            assert response.status_code == 302, (method, url, response.status_code)
            assert response["Location"].startswith(reverse("login")), url


def test_outsiders_get_404_for_every_object(two_projects, users):
    ids, _ = two_projects
    charlie = client_for(users["charlie"])
    for pattern in urlpatterns:
        if pattern.name in PUBLIC | NO_LOGIN:
            continue
        url = url_for(pattern, ids)
        for method in ("get", "post"):
            status = getattr(charlie, method)(url).status_code
            # 405: a GET-only or POST-only view refuses the method before looking anything up
            assert status in (404, 405), (method, url, status)
        assert 404 in (charlie.get(url).status_code, charlie.post(url).status_code), url


def test_members_of_one_project_get_404_for_the_other_projects_objects(two_projects, users):
    mine, theirs = two_projects
    alice = client_for(users["alice"])        # clinician in `project` only
    for pattern in urlpatterns:
        if pattern.name in PUBLIC | NO_LOGIN:
            continue
        for key in pattern.pattern.converters:
            if key == "name":
                continue
            mixed = dict(mine, **{key: theirs[key]})   # one foreign id at a time
            url = url_for(pattern, mixed)
            for method in ("get", "post"):
                status = getattr(alice, method)(url).status_code
                assert status in (404, 405), (method, url, status)
    # and the project list shows only her own project
    page = alice.get(reverse("annotator:project_list")).content.decode()
    assert "Someone else" not in page and "Chest and brain" in page


def test_clinicians_do_not_reach_reviewer_pages(two_projects, users):
    ids, _ = two_projects
    alice = client_for(users["alice"])
    assert alice.get(reverse("annotator:review", args=[ids["project_id"]])).status_code == 404
    bob = client_for(users["bob"])
    assert bob.get(reverse("annotator:review", args=[ids["project_id"]])).status_code == 200


def test_the_no_login_routes_refuse_without_their_token_or_secret(two_projects):
    ids, _ = two_projects
    client = Client()
    assert client.get(reverse("annotator:ls_image", args=["forged"])).status_code == 404
    webhook = reverse("annotator:ls_webhook", args=[ids["project_id"]])
    assert client.post(webhook, data="{}", content_type="application/json").status_code == 403
    assert client.get(webhook).status_code == 405


def test_media_files_are_never_served_from_a_public_path(two_projects, settings):
    from annotator.models import Scan

    scan = Scan.objects.get(pk=two_projects[0]["scan_id"])
    client = Client()
    for name in (scan.preview.name, scan.file.name):
        assert client.get(f"/{settings.MEDIA_URL.strip('/')}/{name}").status_code == 404
        assert client.get(f"/{name}").status_code == 404
    # the only ways in: the permission-checked view and Label Studio's signed URL
    assert client.get(reverse("annotator:scan_preview", args=[scan.pk])).status_code == 302
