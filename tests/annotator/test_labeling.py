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
    response = alice.post(url, {"name": "cyst", "description": "fluid-filled", "hotkey": "y"})
    assert response.status_code == 302
    cyst = LabelClass.objects.get(project=project, name="cyst")
    assert (cyst.hotkey, cyst.created_by) == ("y", users["alice"])

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

    # a blind reader sees the similar scans whose labels they may see, and no other reader's
    read_by_alice = set(Annotation.objects.filter(scan__project=project, reader=users["alice"])
                        .values_list("scan_id", flat=True))
    type(project).objects.filter(pk=project.pk).update(blind_second_readers=True)
    membership_set(project=project, user=users["charlie"], role=Membership.Role.CLINICIAN)
    with open(path, "rb") as handle:
        blind = client_for(users["charlie"]).post(url, {"file": handle})
    assert blind.status_code == 200, blind.content[:500]
    shown = {s["scan"].pk: s["label"] for s in blind.context["result"]["similar"]}
    assert shown and not set(shown) & read_by_alice
    assert all(s.split == "eval" for s in project.scans.filter(pk__in=list(shown)))
    type(project).objects.filter(pk=project.pk).update(blind_second_readers=False)

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


@pytest.fixture
def glioma_round(project):
    """Labeled eval scans and a round of 6 unlabeled glioma pool scans (no encoder)."""
    from tests.conftest import import_glioma_round

    project.refit_every = 1000
    project.save()
    import_glioma_round(project, n=6)
    return project


def test_the_lease_banner_names_the_reader_who_holds_the_scan(glioma_round, users):
    project = glioma_round
    scan = labeling.current_round(project).items.order_by("rank").first().scan
    url = reverse("annotator:label", args=[project.pk, scan.pk]) + "?format=json"
    assert client_for(users["alice"]).get(url).json()["held_by"] is None
    # the admin opens the same scan: alice holds it, and the banner says so (not "dora")
    assert client_for(users["dora"]).get(url).json()["held_by"] == "alice"
    assert ScanLease.objects.get(scan=scan).user == users["alice"]


def test_one_reader_cannot_hold_every_scan(glioma_round, users, erin, settings):
    """Opening every label page (a script, link prefetch) holds at most
    LABEL_LEASES_PER_READER scans: the newest; the others stay free for other readers."""
    project = glioma_round
    settings.LABEL_LEASES_PER_READER = 2
    alice = client_for(users["alice"])
    scans = [i.scan for i in labeling.current_round(project).items.order_by("rank")]
    for scan in scans:
        assert alice.get(reverse("annotator:label", args=[project.pk, scan.pk])).status_code == 200
    held = set(ScanLease.objects.filter(user=users["alice"]).values_list("scan_id", flat=True))
    assert held == {scans[-1].pk, scans[-2].pk}
    # erin is served the first free scan, not told that everything is held
    response = client_for(erin).get(reverse("annotator:next_scan", args=[project.pk]))
    assert response["Location"] == reverse("annotator:label", args=[project.pk, scans[0].pk])
    # a renewed lease counts as the newest: alice back on her first scan keeps it
    assert labeling.lease_acquire(scan=scans[-2], user=users["alice"])
    assert labeling.lease_acquire(scan=scans[1], user=users["alice"])
    assert set(ScanLease.objects.filter(user=users["alice"]).values_list(
        "scan_id", flat=True)) == {scans[-2].pk, scans[1].pk}


def test_no_scan_left_says_whether_others_hold_them_or_all_are_read(glioma_round, users,
                                                                     erin, settings):
    from django.contrib.messages import get_messages

    from annotator.services import annotation_create

    project = glioma_round
    settings.LABEL_LEASES_PER_READER = 3
    glioma = classes(project)["glioma_tumor"]
    scans = [i.scan for i in labeling.current_round(project).items.order_by("rank")]
    # the pool's other scans are read: the round's six are all that is left
    for scan in project.scans.filter(split="pool").exclude(pk__in=[s.pk for s in scans]):
        annotation_create(scan=scan, reader=users["dora"], label_class=glioma)
    for scan in scans[:3]:
        assert labeling.lease_acquire(scan=scan, user=users["alice"])
    for scan in scans[3:]:
        assert labeling.lease_acquire(scan=scan, user=users["bob"])
    web = client_for(erin)
    response = web.get(reverse("annotator:next_scan", args=[project.pk]), follow=True)
    words = " ".join(str(m) for m in get_messages(response.wsgi_request))
    assert "held by other readers (6 scans leased)" in words, words
    # every scan read: nothing left, and it does not blame the other readers
    for scan in scans:
        annotation_create(scan=scan, reader=users["alice"], label_class=glioma)
    ScanLease.objects.all().delete()
    response = web.get(reverse("annotator:next_scan", args=[project.pk]), follow=True)
    words = " ".join(str(m) for m in get_messages(response.wsgi_request))
    assert "No unlabeled scans left for you" in words and "held by" not in words, words


def test_the_same_answer_twice_is_stored_once_and_counted_once(glioma_round, users):
    """A double submit without a submission id (a double click, a script retrying) returns
    the first answer; the project page counts each reader's latest label once, as training
    does."""
    from annotator import selectors
    from annotator.services import annotation_create

    project = glioma_round
    by_name = classes(project)
    glioma, normal = by_name["glioma_tumor"], by_name["no_tumor"]
    scan = labeling.current_round(project).items.order_by("rank").first().scan
    url = reverse("annotator:answer", args=[project.pk, scan.pk])
    alice = client_for(users["alice"])

    def counts() -> dict[str, int]:
        return {c.name: c.labels for c in selectors.label_class_counts(project)}

    before = counts()
    first = post_json(alice, url, {"outcome": "label", "class_id": glioma.pk})
    again = post_json(alice, url, {"outcome": "label", "class_id": glioma.pk})
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["saved"]["id"] == first.json()["saved"]["id"]
    assert Annotation.objects.filter(scan=scan).count() == 1
    assert counts()["glioma_tumor"] == before["glioma_tumor"] + 1
    # a different answer is a new one; the same one much later is too (a second look)
    assert post_json(alice, url, {"outcome": "unsure"}).status_code == 201
    Annotation.objects.filter(scan=scan).update(created_at=timezone.now() - timedelta(hours=1))
    assert post_json(alice, url, {"outcome": "unsure"}).status_code == 201
    assert Annotation.objects.filter(scan=scan).count() == 3

    # rows stored twice before (or by another path) count once: each reader's latest label
    other = labeling.current_round(project).items.order_by("rank")[1].scan
    for label in (glioma, glioma, normal):          # alice changes her mind to no_tumor
        annotation_create(scan=other, reader=users["alice"], label_class=label)
    annotation_create(scan=other, reader=users["bob"], label_class=glioma)
    assert counts() == {"glioma_tumor": before["glioma_tumor"] + 2,
                        "no_tumor": before["no_tumor"] + 1}
    page = alice.get(reverse("annotator:project_detail", args=[project.pk])).content.decode()
    assert f"glioma_tumor</a> <span class=\"muted\">({before['glioma_tumor'] + 2} labels)" in page


def test_a_signed_out_label_page_gets_401_json_not_the_login_page(glioma_round, users):
    """The label page's script asks for JSON: once the session has ended it is told so, with
    the sign-in page, instead of following a redirect to the login form."""
    project = glioma_round
    scan = labeling.current_round(project).items.order_by("rank").first().scan
    alice = client_for(users["alice"])
    page = alice.get(reverse("annotator:label", args=[project.pk, scan.pk]))
    assert b'data-login="/accounts/login/"' in page.content
    alice.logout()
    glioma = classes(project)["glioma_tumor"]
    calls = [
        post_json(alice, reverse("annotator:answer", args=[project.pk, scan.pk]),
                  {"outcome": "label", "class_id": glioma.pk}),
        alice.post(reverse("annotator:answer_undo", args=[project.pk, 1]),
                   HTTP_ACCEPT="application/json"),
        alice.get(reverse("annotator:model_status", args=[project.pk]),
                  HTTP_ACCEPT="application/json"),
        alice.get(reverse("annotator:label", args=[project.pk, scan.pk]), {"format": "json"}),
        alice.post(reverse("annotator:class_confirm", args=[project.pk, glioma.pk]),
                   {"scan": scan.pk}, HTTP_ACCEPT="application/json"),    # the class page
    ]
    for response in calls:
        assert response.status_code == 401, response.request["PATH_INFO"]
        body = response.json()
        assert "session has ended" in body["error"] and body["login"] == "/accounts/login/"
    assert not Annotation.objects.filter(scan=scan).exists()
    # a page a person opens still goes to the sign-in form
    response = alice.get(reverse("annotator:label", args=[project.pk, scan.pk]))
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")
