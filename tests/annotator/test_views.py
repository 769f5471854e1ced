"""Pages: login required, membership enforced (404 for outsiders), upload checks."""

from __future__ import annotations

import io

import pytest
from django.urls import reverse

from annotator.models import ImportJob, Scan
from tests.base import FIXTURES, PASSWORD, png_bytes, png_header_only, pydicom_test_files
from tests.conftest import run_import


@pytest.fixture
def scan(project):
    run_import(project, FIXTURES / "chest_xray" / "eval" / "normal", layout="flat")
    return Scan.objects.filter(project=project).first()


@pytest.fixture
def job(project, scan):
    return ImportJob.objects.filter(project=project).first()


def urls_for(project, scan, job):
    return [
        reverse("annotator:project_list"),
        reverse("annotator:project_detail", args=[project.pk]),
        reverse("annotator:upload", args=[project.pk]),
        reverse("annotator:scan_detail", args=[scan.pk]),
        reverse("annotator:scan_preview", args=[scan.pk]),
        reverse("annotator:import_job_detail", args=[job.pk]),
    ]


def login(client, user):
    assert client.login(username=user.username, password=PASSWORD)


def test_every_page_requires_login(client, project, scan, job):
    for url in urls_for(project, scan, job):
        response = client.get(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith(reverse("login")), url


def test_outsider_gets_404_for_another_projects_objects(client, users, project, scan, job):
    login(client, users["charlie"])
    for url in urls_for(project, scan, job)[1:]:
        assert client.get(url).status_code == 404, url
    assert project.name not in client.get(reverse("annotator:project_list")).content.decode()


@pytest.mark.parametrize("name, args", [
    ("project_list", ()), ("project_detail", ("project",)), ("project_jobs", ("project",)),
    ("upload", ("project",)), ("scan_detail", ("scan",)), ("scan_preview", ("scan",)),
    ("import_job_detail", ("job",)), ("class_create", ("project",)),
    ("classify", ("project",)), ("clusters", ("project",)), ("reports", ("project",)),
    ("export_labels", ("project",)), ("review", ("project",)), ("readers", ("project",)),
    ("account", ()),
])
def test_pages_answer_get_and_head_and_refuse_other_methods(client, users, project, scan, job,
                                                            name, args):
    """PUT, DELETE, TRACE or PROPFIND on a page used to run it as a GET (200); HEAD is a GET
    without the body wherever GET is allowed."""
    login(client, users["dora"])
    url = reverse(f"annotator:{name}",
                  args=[{"project": project, "scan": scan, "job": job}[a].pk for a in args])
    got = client.get(url)
    assert got.status_code in (200, 404), (url, got.status_code)      # 404: nothing to show
    assert client.head(url).status_code == got.status_code, url
    for method in ("PUT", "DELETE", "TRACE", "PROPFIND", "PATCH"):
        refused = client.generic(method, url)
        assert refused.status_code == 405, (method, url)
        assert "GET" in refused["Allow"] and "HEAD" in refused["Allow"]


def test_member_sees_project_scans_and_previews(client, users, project, scan, job):
    login(client, users["alice"])
    for url in urls_for(project, scan, job):
        assert client.get(url).status_code == 200, url
    page = client.get(reverse("annotator:project_detail", args=[project.pk])).content.decode()
    assert reverse("annotator:scan_preview", args=[scan.pk]) in page
    preview = client.get(reverse("annotator:scan_preview", args=[scan.pk]))
    assert preview["Content-Type"] == "image/png"
    assert b"".join(preview.streaming_content).startswith(b"\x89PNG")


def test_media_is_not_served_from_a_public_path(client, users, scan):
    login(client, users["alice"])
    assert client.get(f"/media/{scan.preview.name}").status_code == 404
    assert client.get(f"/media-not-public/{scan.preview.name}").status_code == 404


def upload(client, project, files, **data):
    payload = {"dataset": "ward 3 portable", "split": "pool", "label": "", **data,
               "files": [io.BytesIO(content) for _, content in files]}
    for handle, (name, _) in zip(payload["files"], files):
        handle.name = name
    return client.post(reverse("annotator:upload", args=[project.pk]), payload)


def test_upload_imports_dicom_and_png(client, users, project, settings,
                                      django_capture_on_commit_callbacks):
    login(client, users["alice"])
    ct = {p.name: p for p in pydicom_test_files()}["CT_small.dcm"].read_bytes()
    with django_capture_on_commit_callbacks(execute=True):
        response = upload(client, project, [("ct.dcm", ct), ("xray.png", png_bytes(seed=5))])
    assert response.status_code == 302
    job = ImportJob.objects.get(project=project)
    assert response["Location"] == job.get_absolute_url()
    job.refresh_from_db()
    assert (job.status, job.imported, job.failed) == ("succeeded", 2, 0)
    assert job.created_by == users["alice"]
    assert Scan.objects.filter(project=project, dataset__name="ward 3 portable").count() == 2
    assert list(settings.INCOMING_ROOT.iterdir()) == []   # raw uploads deleted after import
    page = client.get(job.get_absolute_url()).content.decode()
    assert "2 scans imported" in page and "2</b> imported" in page
    png = Scan.objects.get(project=project, file_format="png")
    assert png.source_name == "xray.png"                 # as the user named it, no prefix
    assert Scan.objects.get(project=project, file_format="dicom").modality == "CT"


def test_upload_says_what_it_is_and_leaves_nothing_behind(client, users, project,
                                                         django_capture_on_commit_callbacks):
    login(client, users["alice"])
    with django_capture_on_commit_callbacks(execute=True):
        upload(client, project, [("film.png", png_bytes(seed=7))], modality="DX",
               body_part="chest")
    scan = Scan.objects.get(project=project)
    assert (scan.modality, scan.body_part) == ("DX", "CHEST")     # PNG: from the form
    # the same file again: nothing new, and the title says so instead of "Succeeded"
    with django_capture_on_commit_callbacks(execute=True):
        response = upload(client, project, [("film.png", png_bytes(seed=7))])
    page = client.get(response["Location"]).content.decode()
    assert "Nothing new: every file was already in the project" in page
    # a file that passes the first checks but cannot be decoded: no empty dataset stays
    with django_capture_on_commit_callbacks(execute=True):
        response = upload(client, project, [("broken.png", png_header_only(64, 64))],
                          dataset="night shift")
    job = ImportJob.objects.order_by("-pk").first()
    job.refresh_from_db()
    assert job.failed == 1 and job.headline == "Nothing imported: no file could be read"
    assert not project.datasets.filter(name="night shift").exists()
    assert any("was removed again" in w for w in job.warnings)
    assert "0001_" not in job.errors[0]["name"]


def test_upload_into_an_existing_dataset_keeps_its_modality_and_body_part(
        client, users, project, settings, django_capture_on_commit_callbacks):
    login(client, users["alice"])
    with django_capture_on_commit_callbacks(execute=True):
        upload(client, project, [("film.png", png_bytes(seed=8))], modality="CR",
               body_part="chest")
    response = upload(client, project, [("head.png", png_bytes(seed=9))], modality="MR",
                      body_part="BRAIN")
    assert response.status_code == 400
    errors = response.context["form"].errors
    assert errors["dataset"] == [
        "The dataset 'ward 3 portable' holds scans of modality CR, body part CHEST, not "
        "modality MR, body part BRAIN: leave modality and body part empty to keep the "
        "dataset's, or name another dataset (an admin can change a dataset's values)."]
    assert "files" not in errors
    dataset = project.datasets.get(name="ward 3 portable")
    assert (dataset.modality, dataset.body_part) == ("CR", "CHEST")
    assert ImportJob.objects.filter(project=project).count() == 1
    assert list(settings.INCOMING_ROOT.iterdir()) == []


def test_upload_with_label_records_it(client, users, project, django_capture_on_commit_callbacks):
    run_import(project, FIXTURES / "chest_xray" / "eval")  # creates normal / pneumonia
    login(client, users["alice"])
    with django_capture_on_commit_callbacks(execute=True):
        upload(client, project, [("a.png", png_bytes(seed=21))], label="pneumonia")
    scan = Scan.objects.get(project=project, dataset__name="ward 3 portable")
    annotation = scan.annotations.get()
    assert annotation.label_class.name == "pneumonia" and annotation.reader == users["alice"]


def test_upload_rejects_bad_files_cleanly(client, users, project, settings):
    login(client, users["alice"])
    settings.UPLOAD_MAX_FILE_BYTES = 10_000
    response = upload(client, project, [
        ("letter.dcm", b"Dear colleague, this is not DICOM at all." * 5),
        ("empty.png", b""),
        ("big.png", png_bytes(size=200, seed=1)),
        ("photo.gif", b"GIF89a" + b"\x00" * 100),
    ])
    assert response.status_code == 400
    text = response.content.decode()
    assert "not a DICOM, PNG, JPEG or TIFF file" in text
    assert "the file is empty" in text
    assert "the limit is" in text
    assert "None of the files can be imported" in text
    assert Scan.objects.count() == 0 and ImportJob.objects.count() == 0


def test_upload_mixed_imports_good_and_lists_bad(client, users, project,
                                                 django_capture_on_commit_callbacks):
    login(client, users["alice"])
    with django_capture_on_commit_callbacks(execute=True):
        response = upload(client, project, [
            ("../../../etc/evil name.png", png_bytes(seed=9)),
            ("notes.txt", b"hello"),
            ("bomb.png", png_header_only(50_000, 50_000)),
        ])
    assert response.status_code == 302
    job = ImportJob.objects.get(project=project)
    job.refresh_from_db()
    assert (job.imported, job.failed) == (1, 1)
    assert "decompression bomb" in job.errors[0]["reason"]
    assert "/" not in job.errors[0]["name"] and ".." not in Scan.objects.get().source_name
    follow = client.get(response["Location"])
    assert "notes.txt" in follow.content.decode()   # the rejection message


def test_upload_without_files_or_for_outsider(client, users, project):
    login(client, users["alice"])
    response = client.post(reverse("annotator:upload", args=[project.pk]),
                           {"dataset": "x", "split": "pool"})
    assert response.status_code == 400 and "Choose at least one file" in response.content.decode()
    client.logout()
    login(client, users["charlie"])
    assert upload(client, project, [("a.png", png_bytes())]).status_code == 404
    assert Scan.objects.count() == 0


def test_login_page_works(client, users):
    response = client.post(reverse("login"), {"username": "alice", "password": PASSWORD})
    assert response.status_code == 302
    assert client.get(reverse("annotator:project_list")).status_code == 200
