"""The clinician's labeling loop through the real views: worklist, leases, answers with what
was shown, idempotent double submits, Grad-CAM, new classes, classifying an upload."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from PIL import Image

from annotator import labeling
from annotator.models import Annotation, LabelClass, Membership, Scan, ScanLease
from annotator.services import membership_set
from tests.base import FIXTURES, PASSWORD, png_bytes
from tests.conftest import brain_truth

pytestmark = pytest.mark.django_db


def client_for(user) -> Client:
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    return client


def post_json(client, url, data):
    return client.post(url, data=json.dumps(data), content_type="application/json")


@pytest.fixture
def erin(django_user_model, project):
    user = django_user_model.objects.create_user("erin", "erin@example.org", PASSWORD)
    membership_set(project=project, user=user, role=Membership.Role.CLINICIAN)
    return user


def classes(project) -> dict[str, LabelClass]:
    return {c.name: c for c in LabelClass.objects.filter(project=project)}


def test_two_clinicians_are_served_different_scans_until_a_lease_expires(
        encoded_project, users, erin):
    project = encoded_project
    alice_scan, alice_item = labeling.lease_next(project=project, user=users["alice"])
    erin_scan, _ = labeling.lease_next(project=project, user=erin)
    assert alice_item.rank == 1 and erin_scan != alice_scan
    # alice reloading gets the scan she already holds, not a new one
    assert labeling.lease_next(project=project, user=users["alice"])[0] == alice_scan
    assert not labeling.lease_acquire(scan=alice_scan, user=erin)
    ScanLease.objects.filter(scan=alice_scan).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert labeling.lease_acquire(scan=alice_scan, user=erin)


def test_worklist_next_label_answer_and_the_next_payload(encoded_project, users):
    project = encoded_project
    alice = client_for(users["alice"])
    page = alice.get(reverse("annotator:worklist", args=[project.pk]))
    assert page.status_code == 200
    assert b"A typical scan of a group of" in page.content and b"Start labeling" in page.content
    assert b"typical of its cluster" in page.content     # the strategy's term, on hover

    response = alice.get(reverse("annotator:next_scan", args=[project.pk]))
    assert response.status_code == 302
    label_url = response["Location"]
    page = alice.get(label_url)
    assert page.status_code == 200 and b'id="label-payload"' in page.content
    payload = alice.get(label_url + "?format=json").json()
    scan = Scan.objects.get(pk=payload["scan"]["id"])
    assert payload["item"]["rank"] == 1 and payload["item"]["reason"]["why"]
    assert {c["key"] for c in payload["classes"]} == {"1", "2"}
    assert payload["suggestion"] is None          # no classifier yet

    truth = classes(project)[brain_truth(scan)]
    answer = post_json(alice, payload["scan"]["answer"], {
        "outcome": "label", "class_id": truth.pk, "duration_ms": 2300,
        "shown_acquisition_score": payload["item"]["score"],
        "query_round": payload["item"]["round"], "submission_id": "s-1"})
    assert answer.status_code == 201, answer.content
    body = answer.json()
    saved = Annotation.objects.get(pk=body["saved"]["id"])
    assert (saved.reader, saved.label_class, saved.source) == (users["alice"], truth, "web")
    assert saved.duration_ms == 2300 and saved.query_round_id == payload["item"]["round"]
    assert saved.shown_acquisition_score == pytest.approx(payload["item"]["score"])
    assert body["next"]["scan"]["id"] != scan.pk and body["next"]["item"]["rank"] == 2
    assert not ScanLease.objects.filter(scan=scan).exists()        # released on answer

    # a double submit (same submission id) stores nothing new
    again = post_json(alice, payload["scan"]["answer"], {
        "outcome": "label", "class_id": truth.pk, "submission_id": "s-1"})
    assert again.status_code == 200 and again.json()["saved"]["id"] == saved.pk
    assert Annotation.objects.filter(scan=scan).count() == 1


def test_bad_answers_are_refused_with_a_reason_and_write_nothing(encoded_project, users,
                                                                 other_project):
    project = encoded_project
    alice = client_for(users["alice"])
    scan = project.scans.filter(split="pool").first()
    url = reverse("annotator:answer", args=[project.pk, scan.pk])
    foreign = LabelClass.objects.create(project=other_project, name="elsewhere")
    cases = [
        ({"outcome": "label"}, "choose a class"),
        ({"outcome": "label", "class_id": foreign.pk}, "unknown class"),
        ({"outcome": "label", "class_id": "x"}, "must be a positive whole number"),
        ({"outcome": "maybe"}, "unknown outcome"),
        ({"outcome": "skip", "shown_confidence": 7}, "out of range"),
        ({"outcome": "skip", "shown_model_version": "clf-999"}, "model version"),
    ]
    for data, message in cases:
        response = post_json(alice, url, data)
        assert response.status_code == 400 and message in response.json()["error"], data
    assert alice.post(url, data=b"{not json", content_type="application/json").status_code == 400
    assert not Annotation.objects.filter(scan=scan).exists()
    # someone else's project: 404, not 403
    charlie = client_for(users["charlie"])
    assert post_json(charlie, url, {"outcome": "skip"}).status_code == 404
    # anonymous: login redirect
    assert Client().post(url).status_code == 302


def test_labels_refit_and_the_page_shows_suggestion_gradcam_and_similar(
        encoded_project, users, django_capture_on_commit_callbacks):
    project = encoded_project
    alice = client_for(users["alice"])
    by_name = classes(project)
    pool = list(project.scans.filter(split="pool").order_by("pk"))
    picks = [s for s in pool if brain_truth(s) == "no_tumor"][:2] + \
        [s for s in pool if brain_truth(s) == "pituitary_tumor"][:2]
    with django_capture_on_commit_callbacks(execute=True):
        for scan in picks:
            response = post_json(alice, reverse("annotator:answer", args=[project.pk, scan.pk]),
                                 {"outcome": "label", "class_id": by_name[brain_truth(scan)].pk})
            assert response.status_code == 201
    project.refresh_from_db()
    assert project.active_model is not None, "3 labels (refit_every) should have refit"
    worklist = alice.get(reverse("annotator:worklist", args=[project.pk]))
    assert project.active_model.version.encode() in worklist.content

    scan = project.scans.filter(split="pool").exclude(pk__in=[s.pk for s in picks]).first()
    payload = alice.get(reverse("annotator:label", args=[project.pk, scan.pk]) + "?format=json").json()
    suggestion = payload["suggestion"]
    assert suggestion["model_version"] == project.active_model.version
    assert abs(sum(t["p"] for t in suggestion["top"]) - 1) < 1e-3
    # 4 labels: too few for the out-of-fold temperature, and the page says so
    brain_head = next(e for e in project.active_model.config["label_sets"]
                      if e["id"] == scan.label_set_id)
    assert brain_head["calibrated_on"] == 0 and suggestion["calibrated"] is False
    assert payload["similar"] and all(n["labels"] for n in payload["similar"])

    cam = alice.get(payload["gradcam"])
    assert cam.status_code == 200 and cam["Content-Type"] == "image/png"
    overlay = Image.open(__import__("io").BytesIO(cam.content))
    assert overlay.mode == "RGBA" and overlay.size == (scan.width, scan.height) or \
        overlay.size == Image.open(scan.preview.path).size
    assert overlay.getchannel("A").getextrema()[1] > 0        # some region lights up

    # what was shown is recorded with the answer
    response = post_json(alice, payload["scan"]["answer"], {
        "outcome": "unsure", "shown_model_version": suggestion["model_version"],
        "shown_suggestion": suggestion["class_id"], "shown_confidence": suggestion["confidence"]})
    saved = Annotation.objects.get(pk=response.json()["saved"]["id"])
    assert saved.shown_model_version == project.active_model
    assert saved.shown_suggestion_id == suggestion["class_id"]
    assert saved.shown_confidence == pytest.approx(suggestion["confidence"])
    # outsiders cannot fetch another project's Grad-CAM
    assert client_for(users["charlie"]).get(payload["gradcam"]).status_code == 404


def test_new_class_by_a_clinician_with_candidates_and_confirm(encoded_project, users):
    project = encoded_project
    alice = client_for(users["alice"])
    url = reverse("annotator:class_create", args=[project.pk])
    bad = alice.post(url, {"name": "No_Tumor", "hotkey": "1"})
    assert bad.status_code == 400
    assert b"already has a class" in bad.content and b"already labels another class" in bad.content
    assert alice.post(url, {"name": "cyst", "hotkey": "s"}).status_code == 400   # viewer key
    response = alice.post(url, {"name": "cyst", "description": "fluid-filled", "hotkey": "c"})
    assert response.status_code == 302
    cyst = LabelClass.objects.get(project=project, name="cyst")
    assert (cyst.hotkey, cyst.created_by) == ("c", users["alice"])

    page = alice.get(response["Location"])
    assert page.status_code == 200 and b"Unlike anything labeled" in page.content
    scan = project.scans.filter(split="pool").last()
    confirm = alice.post(reverse("annotator:class_confirm", args=[project.pk, cyst.pk]),
                         {"scan": scan.pk, "submission_id": "c-1"})
    assert confirm.status_code == 201
    assert Annotation.objects.get(scan=scan, label_class=cyst).reader == users["alice"]
    page = alice.get(response["Location"])
    assert b"Examples so far (1)" in page.content
    assert b"Looks like its examples" in page.content
    # the page says where the next labels teach the new class most: the worklist
    hint = page.content.split(b'id="review-hint"', 1)[1].split(b"</p>", 1)[0]
    assert reverse("annotator:worklist", args=[project.pk]).encode() in hint

    # a project can reserve new classes for reviewers and admins
    project.clinicians_can_add_classes = False
    project.save()
    assert alice.get(url).status_code == 404
    assert client_for(users["bob"]).get(url).status_code == 200


def test_classify_an_uploaded_scan_and_add_it_to_the_pool(
        encoded_project, users, django_capture_on_commit_callbacks, settings):
    project = encoded_project
    alice = client_for(users["alice"])
    url = reverse("annotator:classify", args=[project.pk])
    upload = FIXTURES / "brain_mri" / "eval" / "pituitary_tumor"
    path = sorted(upload.iterdir())[0]

    # no classifier yet: a clear message, not a 500
    with open(path, "rb") as handle:
        response = alice.post(url, {"file": handle})
    assert response.status_code == 409 and b"no classifier yet" in response.content

    by_name = classes(project)
    pool = list(project.scans.filter(split="pool").order_by("pk"))
    with django_capture_on_commit_callbacks(execute=True):
        for scan in [s for s in pool if brain_truth(s) == "no_tumor"][:2] + \
                [s for s in pool if brain_truth(s) == "pituitary_tumor"][:2]:
            labeling.answer_submit(project=project, scan=scan, user=users["alice"],
                                   data={"class_id": by_name[brain_truth(scan)].pk})
    with open(path, "rb") as handle:
        response = alice.post(url, {"file": handle})
    assert response.status_code == 200, response.content[:500]
    result = response.context["result"]
    assert {p["name"] for p in result["probabilities"]} == {"no_tumor", "pituitary_tumor"}
    assert abs(sum(p["p"] for p in result["probabilities"]) - 1) < 1e-4
    assert result["similar"] and b'id="classified-cam"' in response.content

    # a text file with a scan's name is refused with the reason
    from django.core.files.uploadedfile import SimpleUploadedFile

    bad = alice.post(url, {"file": SimpleUploadedFile("scan.png", b"hello, not an image")})
    assert bad.status_code == 400 and b"not a DICOM, PNG, JPEG or TIFF" in bad.content
    bomb = alice.post(url, {"file": SimpleUploadedFile("x.png", png_bytes(size=8)[:20])})
    assert bomb.status_code == 400

    before = project.scans.count()
    with django_capture_on_commit_callbacks(execute=True):
        added = alice.post(reverse("annotator:classify_add", args=[project.pk]),
                           {"token": response.context["token"], "dataset": "clinic-upload"})
    assert added.status_code == 302
    # the eval copy of this image is already in the project (same bytes): a duplicate
    assert project.scans.count() == before
    assert project.import_jobs.first().duplicates == 1
    # the token is single-use
    again = alice.post(reverse("annotator:classify_add", args=[project.pk]),
                       {"token": response.context["token"]})
    assert again.status_code == 302 and again["Location"].endswith("/classify/")


def test_job_progress_endpoint(encoded_project, users):
    alice = client_for(users["alice"])
    data = alice.get(reverse("annotator:project_jobs", args=[encoded_project.pk])).json()
    assert data["active_encoder"] and data["runs"][0]["kind"].startswith("Pretrain")
    assert data["runs"][0]["status"] == "succeeded" and data["runs"][0]["progress"] == 1.0
    assert client_for(users["charlie"]).get(
        reverse("annotator:project_jobs", args=[encoded_project.pk])).status_code == 404


def test_a_reader_who_finishes_the_round_gets_the_next_batch_at_once(encoded_project, users):
    """The round (8 scans) runs out before any refit: the last answer comes back with the
    first scan of a new round the model chose, not with an exhausted worklist."""
    from ml_backend.models import QueryRound

    project = encoded_project
    project.refit_every = 1000
    project.save()
    alice = client_for(users["alice"])
    by_name = classes(project)
    first_round = labeling.current_round(project)
    payload = alice.get(reverse("annotator:next_scan", args=[project.pk]), follow=True)
    assert payload.status_code == 200
    scan_id = labeling.lease_next(project=project, user=users["alice"])[0].pk
    answered = []
    for _ in range(first_round.items.count()):
        scan = Scan.objects.get(pk=scan_id)
        answered.append(scan.pk)
        body = post_json(alice, reverse("annotator:answer", args=[project.pk, scan.pk]),
                         {"outcome": "label", "class_id": by_name[brain_truth(scan)].pk}).json()
        assert body["next"] is not None
        scan_id = body["next"]["scan"]["id"]
    assert body["new_round"] is True
    newest = labeling.current_round(project)
    assert newest.pk != first_round.pk and QueryRound.objects.filter(project=project).count() == 2
    assert scan_id not in answered
    assert newest.items.filter(scan_id=scan_id).exists()
    # and /next/ leases from the new round too
    response = alice.get(reverse("annotator:next_scan", args=[project.pk]))
    assert response.status_code == 302 and "/label/" in response["Location"]


def test_label_propagation_offers_candidates_never_labels(encoded_project, users):
    from ml_backend import services as ml

    project = encoded_project
    by_name = classes(project)
    pool = list(project.scans.filter(split="pool").order_by("pk"))
    for name in ("no_tumor", "pituitary_tumor"):
        for scan in [s for s in pool if brain_truth(s) == name][:3]:
            labeling.answer_submit(project=project, scan=scan, user=users["alice"],
                                   data={"outcome": "label", "class_id": by_name[name].pk})
    before = Annotation.objects.count()
    found = ml.class_candidates(label_class=by_name["pituitary_tumor"], k=10)
    propagated = found["propagated"]
    labeled = set(Annotation.objects.filter(outcome="label").values_list("scan_id", flat=True))
    assert len(propagated) == 10 and Annotation.objects.count() == before
    assert all(c["scan"] not in labeled for c in propagated)
    assert all(Scan.objects.get(pk=c["scan"]).split == "pool" for c in propagated)
    probabilities = [c["probability"] for c in propagated]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < probabilities[-1] <= 1
    right = sum(brain_truth(Scan.objects.get(pk=c["scan"])) == "pituitary_tumor"
                for c in propagated)
    print("propagated candidates right:", right, "of 10")
    page = client_for(users["alice"]).get(reverse("annotator:class_detail",
                                                  args=[project.pk, by_name["pituitary_tumor"].pk]))
    assert b'id="propagated"' in page.content and page.content.count(b"p 0.") >= 10


def test_reasons_in_plain_words():
    from annotator.labeling import plain_reason

    assert plain_reason({"why": "smallest margin", "predicted": "glioma_tumor",
                         "confidence": 0.48, "runner_up": "meningioma_tumor",
                         "runner_up_p": 0.41}) == (
        "The model can't decide between glioma_tumor (48%) and meningioma_tumor (41%).")
    assert "Few scans like this one" in plain_reason({"why": "far from labeled scans",
                                                      "distance_to_labeled": 0.8})
    assert "group of 14 similar scans" in plain_reason({"why": "typical of its cluster",
                                                        "cluster": 19, "cluster_size": 14})
    assert "No model for this scan's classes yet" in plain_reason({
        "why": "no model for its label set yet: unlike the other picks", "cluster": 2})
    assert "one of them is labeled already" in plain_reason({
        "why": "typical of its cluster", "cluster_size": 14, "labeled_in_cluster": True})
    words = plain_reason({"why": "uncertain, and unlike the other picks",
                          "predicted": "normal", "confidence": 0.55, "runner_up": "pneumonia",
                          "runner_up_p": 0.45})
    assert "can't decide between normal (55%) and pneumonia (45%)" in words
    assert "unlike the other scans" in words
    assert "whether this scan shows Effusion or Edema" in plain_reason(
        {"unsure": [{"name": "Effusion", "probability": 0.5}, {"name": "Edema",
                                                              "probability": 0.4}]})
    assert "may be wrong" in plain_reason({"why": "likely label error", "given": "normal"})
