"""The evaluation split is labeled once and never queried: a reader (clinician) can neither
answer an eval scan (label page, answer endpoint, API) nor upload into eval, and is told why;
the project's reviewers and admins can. The worklist never serves an eval scan."""

from __future__ import annotations

import io

import pytest
from django.urls import reverse

from annotator import labeling
from annotator.models import Annotation, ImportJob, LabelClass, Scan
from tests.api.test_api import api
from tests.annotator.test_labeling import client_for, post_json
from tests.base import png_bytes
from tests.conftest import import_glioma_round

pytestmark = pytest.mark.django_db


@pytest.fixture
def eval_project(project):
    """Labeled eval scans (glioma, no tumour) and a round of 4 glioma pool scans."""
    project.refit_every = 1000
    project.save()
    import_glioma_round(project, n=4)
    return project


def test_a_reader_cannot_answer_an_eval_scan_a_reviewer_can(eval_project, users):
    project = eval_project
    glioma = LabelClass.objects.get(project=project, name="glioma_tumor")
    normal = LabelClass.objects.get(project=project, name="no_tumor")
    scan = project.scans.filter(split="eval", annotations__label_class=glioma).first()
    before = list(Annotation.objects.filter(scan=scan).values_list("pk", flat=True))
    alice = client_for(users["alice"])
    label_url = reverse("annotator:label", args=[project.pk, scan.pk])
    answer_url = reverse("annotator:answer", args=[project.pk, scan.pk])

    # the label page does not serve it to a reader, and says why
    page = alice.get(label_url)
    assert page.status_code == 403 and "evaluation split" in page.content.decode()
    refused = alice.get(label_url, {"format": "json"})
    assert refused.status_code == 403 and "reviewers and admins" in refused.json()["error"]
    # the answer endpoint and the API refuse the answer, with the reason
    refused = post_json(alice, answer_url, {"outcome": "label", "class_id": normal.pk})
    assert refused.status_code == 403 and "evaluation split" in refused.json()["error"]
    refused = api(users["alice"]).post(f"/api/v1/projects/{project.pk}/annotations/",
                                       {"scan": scan.pk, "class_id": normal.pk},
                                       content_type="application/json")
    assert refused.status_code == 403
    assert refused["Content-Type"] == "application/problem+json"
    assert "evaluation split" in refused.json()["detail"]
    assert list(Annotation.objects.filter(scan=scan).values_list("pk", flat=True)) == before

    # the project's reviewer reads it (and an admin may answer through the API)
    bob = client_for(users["bob"])
    assert bob.get(label_url).status_code == 200
    made = post_json(bob, answer_url, {"outcome": "label", "class_id": normal.pk})
    assert made.status_code == 201, made.content
    made = api(users["dora"]).post(f"/api/v1/projects/{project.pk}/annotations/",
                                   {"scan": scan.pk, "class_id": normal.pk},
                                   content_type="application/json")
    assert made.status_code == 201, made.content
    assert Annotation.objects.filter(scan=scan).count() == len(before) + 2


def _files(*seeds):
    files = []
    for seed in seeds:
        handle = io.BytesIO(png_bytes(seed=seed))
        handle.name = f"upload-{seed}.png"
        files.append(handle)
    return files


def test_only_reviewers_and_admins_upload_into_eval(eval_project, users):
    project = eval_project
    url = reverse("annotator:upload", args=[project.pk])
    alice = client_for(users["alice"])
    jobs = ImportJob.objects.filter(project=project).count()
    for split in ("eval", "auto:0.2"):
        refused = alice.post(url, {"files": _files(1), "dataset": "ward", "split": split,
                                   "label": "glioma_tumor"})
        assert refused.status_code == 403, split
        assert "reviewers and admins add scans to the evaluation split" in refused.content.decode()
    refused = api(users["alice"]).post(f"/api/v1/projects/{project.pk}/imports/",
                                       {"files": _files(2), "dataset": "ward", "split": "eval"})
    assert refused.status_code == 403 and "reviewers and admins" in refused.json()["detail"]
    assert ImportJob.objects.filter(project=project).count() == jobs
    # into the pool, with a label, a reader still may; a reviewer may upload into eval
    assert alice.post(url, {"files": _files(3), "dataset": "ward", "split": "pool",
                            "label": "glioma_tumor"}).status_code == 302
    assert client_for(users["bob"]).post(url, {"files": _files(4), "dataset": "ward",
                                               "split": "eval"}).status_code == 302
    made = api(users["dora"]).post(f"/api/v1/projects/{project.pk}/imports/",
                                   {"files": _files(5), "dataset": "ward", "split": "eval"})
    assert made.status_code == 202, made.content
    assert set(ImportJob.objects.filter(project=project).order_by("-pk")
               .values_list("split", flat=True)[:3]) == {"pool", "eval"}


def test_the_worklist_never_serves_an_eval_scan(eval_project, users):
    """A round's scan moved to eval afterwards (an admin fixing a split) is neither served
    nor listed."""
    project = eval_project
    items = list(labeling.current_round(project).items.order_by("rank"))
    moved = items[0].scan_id
    Scan.objects.filter(pk=moved).update(split="eval")
    served = []
    while (found := labeling.lease_next(project=project, user=users["alice"])) is not None:
        served.append(found[0].pk)
        labeling.answer_submit(project=project, scan=found[0], user=users["alice"],
                               data={"outcome": "skip"})
    assert moved not in served and len(served) == len(items) - 1
    rows = labeling.worklist(project, users["alice"])["rows"]
    assert moved not in {r["scan"].pk for r in rows}
    response = client_for(users["alice"]).get(reverse("annotator:next_scan", args=[project.pk]))
    assert f"/label/{moved}/" not in response["Location"]
