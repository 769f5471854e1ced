"""Double reading, blind second readers and the rule for disagreeing readers: with
readers_per_scan=2 the worklist serves a read scan to a second reader (never the same one
twice), that reader sees neither the model nor the first reading, the review page states the
rule, and training follows it (majority: a tie waits for adjudication; hold_out: any
disagreement does)."""

from __future__ import annotations

import pytest

from annotator import labeling, selectors, services
from annotator.label_page import label_payload
from annotator.models import LabelClass, Membership
from tests.annotator.test_labeling import client_for
from tests.base import PASSWORD
from tests.conftest import import_glioma_round

pytestmark = pytest.mark.django_db


@pytest.fixture
def erin(django_user_model, project):
    user = django_user_model.objects.create_user("erin", "erin@example.org", PASSWORD)
    services.membership_set(project=project, user=user, role=Membership.Role.CLINICIAN)
    return user


@pytest.fixture
def read_twice(project):
    project.readers_per_scan = 2
    project.refit_every = 1000
    project.save()
    import_glioma_round(project, n=4)
    return project


def test_a_read_scan_goes_to_a_second_reader_who_reads_blind(read_twice, users, erin):
    project = read_twice
    glioma = LabelClass.objects.get(project=project, name="glioma_tumor")
    scan, _ = labeling.lease_next(project=project, user=users["alice"])
    services.annotation_create(scan=scan, reader=users["alice"], label_class=glioma)
    labeling.lease_release(scan=scan, user=users["alice"])
    # alice is never served it again; the round is not done with it: erin gets it
    served = set()
    while (found := labeling.lease_next(project=project, user=users["alice"])) is not None:
        served.add(found[0].pk)
        services.annotation_create(scan=found[0], reader=users["alice"], outcome="skip")
    assert scan.pk not in served
    erin_scan, _ = labeling.lease_next(project=project, user=erin)
    rows = {r["scan"].pk: r for r in labeling.worklist(project, erin)["rows"]}
    assert rows[scan.pk]["state"] in ("second", "held") and rows[scan.pk]["readings"] == 1
    # the second reader is blind: no model, no first reading, and says why
    payload = label_payload(project=project, scan=scan, user=erin)
    assert payload["blinded"] and "hidden" in payload["blinded"]
    assert payload["suggestion"] is None and payload["gradcam"] is None
    assert all(not n["labels"] for n in payload["similar"])
    # the first reader is not blinded on a scan only they read
    fresh = project.scans.filter(split="pool").exclude(annotations__isnull=False).first()
    assert label_payload(project=project, scan=fresh, user=users["alice"])["blinded"] is None
    # after the second reading the scan counts as read
    services.annotation_create(scan=scan, reader=erin, label_class=glioma)
    rows = {r["scan"].pk: r for r in labeling.worklist(project, erin)["rows"]}
    assert rows[scan.pk]["state"] == "labeled"
    # a project that does not blind shows the model again
    project.blind_second_readers = False
    project.save()
    assert label_payload(project=project, scan=scan, user=erin)["blinded"] is None


def test_disagreeing_readers_follow_the_projects_rule(read_twice, users, erin, client):
    project = read_twice
    glioma = LabelClass.objects.get(project=project, name="glioma_tumor")
    normal = LabelClass.objects.get(project=project, name="no_tumor")
    scans = list(project.scans.filter(split="pool").order_by("pk")[:2])
    tie, majority = scans
    services.annotation_create(scan=tie, reader=users["alice"], label_class=glioma)
    services.annotation_create(scan=tie, reader=erin, label_class=normal)
    for reader, label in ((users["alice"], glioma), (erin, glioma), (users["bob"], normal)):
        services.annotation_create(scan=majority, reader=reader, label_class=label)
    # alice changes her mind: her latest answer is her one vote
    services.annotation_create(scan=majority, reader=users["alice"], label_class=normal)
    trained = dict(zip(*[[s.pk for s in selectors.training_labels(project, split="pool")[0]],
                         selectors.training_labels(project, split="pool")[1]]))
    assert tie.pk not in trained                        # a tie waits for adjudication
    assert trained[majority.pk] == normal.pk            # alice (now normal) + bob vs erin
    project.disagreement_rule = "hold_out"
    project.save()
    scans_now, _ = selectors.training_labels(project, split="pool")
    assert tie not in scans_now and majority not in scans_now
    assert selectors.held_out_disagreements(project) == 2
    # an adjudication settles it under any rule
    from annotator.review import adjudicate

    adjudicate(scan=tie, reviewer=users["bob"], label_class=glioma)
    assert tie in selectors.training_labels(project, split="pool")[0]
    page = client_for(users["bob"]).get(f"/projects/{project.pk}/review/").content.decode()
    assert "Hold out: any disagreement is left out of training" in page
    assert "<b>1</b> labeled pool scan is held out of training now" in page
    assert "read by 2 readers" in page and "Model's view (hidden: blind review" in page


def test_readers_dashboard_for_the_project_admin(read_twice, users, erin):
    project = read_twice
    glioma = LabelClass.objects.get(project=project, name="glioma_tumor")
    normal = LabelClass.objects.get(project=project, name="no_tumor")
    scans = list(project.scans.filter(split="pool").order_by("pk")[:3])
    for scan in scans:
        services.annotation_create(scan=scan, reader=users["alice"], label_class=glioma,
                                   duration_ms=4000, shown_suggestion=glioma,
                                   shown_confidence=0.8)
        services.annotation_create(scan=scan, reader=erin, label_class=normal,
                                   duration_ms=12000)
    from annotator.review import adjudicate, reader_stats

    for scan in scans[:2]:
        adjudicate(scan=scan, reviewer=users["bob"], label_class=normal)
    stats = {r.reader: r for r in reader_stats(project)}
    assert stats["alice"].labels == 3 and stats["alice"].median_seconds == 4.0
    assert stats["alice"].per_hour == pytest.approx(900)          # 3 answers in 12 s
    assert stats["alice"].agree_adjudication == 0 and stats["erin"].agree_adjudication == 1
    assert stats["alice"].took_suggestion == 1 and stats["erin"].took_suggestion is None
    # only the project admin sees it
    assert client_for(users["alice"]).get(f"/projects/{project.pk}/readers/").status_code == 404
    page = client_for(users["dora"]).get(f"/projects/{project.pk}/readers/")
    assert page.status_code == 200 and 'data-reader="erin"' in page.content.decode()
    assert "100% <span class=\"muted\">of 2</span>" in page.content.decode()


def _answers(client, scan) -> str:
    """The scan page's answers section."""
    from django.urls import reverse

    page = client.get(reverse("annotator:scan_detail", args=[scan.pk])).content.decode()
    start = page.index("<h2>Annotations</h2>")
    return page[start:page.index("</section>", start)]


def _rows(response) -> list[dict]:
    data = response.json()
    return data["results"] if isinstance(data, dict) else data


def _readings(response) -> list[dict]:
    """The answers readers gave (imported labels stay visible to everyone)."""
    return [a for a in _rows(response) if a["source"] != "import"]


def test_a_blind_reader_sees_no_other_answer_or_model_anywhere_until_they_answer(
        read_twice, users, erin):
    """Blind reading holds beyond the label page: the scan page, the project page, the
    worklist, the API's answers and predictions, the labels download. Reviewers and admins
    see everything; once erin has answered, she sees the other reading."""
    from django.urls import reverse

    from ml_backend.models import ModelVersion, Prediction

    project = read_twice
    glioma = LabelClass.objects.get(project=project, name="glioma_tumor")
    items = labeling.current_round(project).items.select_related("scan").order_by("rank")
    read, fresh = [item.scan for item in items[:2]]
    services.annotation_create(scan=read, reader=users["alice"], label_class=glioma)
    model = ModelVersion.objects.create(project=project, kind="classifier",
                                        version="clf-blind", status="active")
    for scan in (read, fresh):
        Prediction.objects.create(scan=scan, model_version=model, confidence=0.9,
                                  uncertainty=0.1, predicted_class=glioma,
                                  probabilities={str(glioma.pk): 0.9})
    project.active_model = model
    project.save()
    erin_web = client_for(erin)
    answers_url = f"/api/v1/projects/{project.pk}/annotations/"
    predictions_url = f"/api/v1/projects/{project.pk}/predictions/"

    # the scan page: alice's reading is hidden, and the page says so
    page = _answers(erin_web, read)
    assert "glioma_tumor" not in page and "alice" not in page
    assert "1 answer by other readers hidden: blind reading" in page
    # the project page's thumbnail of the scan shows no label
    page = erin_web.get(reverse("annotator:project_detail", args=[project.pk])).content.decode()
    thumb = page[page.index(f'title="Scan {read.pk}"'):]
    assert "class-chip" not in thumb[:thumb.index("</a>")]
    # the API: neither alice's answer nor the model's view of the scan erin reads second
    assert _readings(erin_web.get(answers_url)) == []
    assert _readings(erin_web.get(answers_url, {"scan": read.pk})) == []
    assert [p["scan"] for p in _rows(erin_web.get(predictions_url))] == [fresh.pk]
    # the worklist: no model and no answers on it
    rows = {r["scan"].pk: r for r in labeling.worklist(project, erin)["rows"]}
    assert rows[read.pk]["prediction"] is None and rows[read.pk]["answers"] == []
    assert rows[fresh.pk]["prediction"] is not None        # first reading: the model shows
    page = erin_web.get(reverse("annotator:worklist", args=[project.pk])).content.decode()
    row = page[page.index(f'data-scan="{read.pk}"'):]
    row = row[:row.index("</tr>")]
    assert "hidden (blind reading)" in row and "glioma_tumor" not in row
    # nor the model's heat map of it
    refused = erin_web.get(reverse("annotator:gradcam", args=[read.pk]), {"class": glioma.pk})
    assert refused.status_code == 403 and b"Blind reading" in refused.content
    # the labels download holds every reader's answer: refused, with the reason
    refused = erin_web.get(reverse("annotator:export_labels", args=[project.pk]))
    assert refused.status_code == 403 and b"Blind reading" in refused.content
    refused = erin_web.get(f"/api/v1/projects/{project.pk}/labels/")
    assert refused.status_code == 403 and "Blind reading" in refused.json()["detail"]
    # the reviewer (bob) and the admin (dora) see alice's answer and may download
    for who in ("bob", "dora"):
        web = client_for(users[who])
        assert [a["reader"] for a in _readings(web.get(answers_url))] == ["alice"]
        assert len(_rows(web.get(predictions_url))) == 2
        assert web.get(reverse("annotator:export_labels", args=[project.pk])).status_code == 200

    # erin answers: now she sees the other reading, and the model's view of the scan
    services.annotation_create(scan=read, reader=erin, label_class=glioma)
    assert sorted(a["reader"] for a in _readings(erin_web.get(answers_url))) == ["alice", "erin"]
    assert {p["scan"] for p in _rows(erin_web.get(predictions_url))} == {read.pk, fresh.pk}
    page = _answers(erin_web, read)
    assert "alice" in page and "glioma_tumor" in page and "hidden: blind reading" not in page

    # a project that does not read blind hides nothing
    services.annotation_create(scan=fresh, reader=users["alice"], label_class=glioma)
    assert _readings(erin_web.get(answers_url, {"scan": fresh.pk})) == []
    project.blind_second_readers = False
    project.save()
    visible = _readings(erin_web.get(answers_url, {"scan": fresh.pk}))
    assert [a["reader"] for a in visible] == ["alice"]


def test_a_blind_reader_sees_no_other_readers_label_on_the_class_page_or_beside_a_scan(
        read_twice, users, erin, monkeypatch):
    """Beyond the scan page and the API: the class page's examples, the label page's similar
    scans and the nearest labeled scans of a worklist reason name other readers' labels only
    once the blind reader has answered those scans; imported labels, reviewers and admins
    see them as before."""
    from django.urls import reverse

    from ml_backend.services import embeddings

    project = read_twice
    glioma = LabelClass.objects.get(project=project, name="glioma_tumor")
    items = list(labeling.current_round(project).items.select_related("scan").order_by("rank"))
    read, fresh = items[0].scan, items[1].scan
    imported = project.scans.filter(split="eval", annotations__label_class=glioma).first()
    services.annotation_create(scan=read, reader=users["alice"], label_class=glioma)
    # the FAISS search is not what is tested: its hits are the read scan and an imported one
    monkeypatch.setattr(embeddings, "similar_scans",
                        lambda **kwargs: [(read, 0.93), (imported, 0.91)])
    # the round says why: the nearest labeled scan, with the label it had then
    items[1].reason = {"why": "far from labeled scans", "neighbours": [
        {"scan": read.pk, "label": "glioma_tumor", "similarity": 0.93}]}
    items[1].save(update_fields=["reason"])
    class_url = reverse("annotator:class_detail", args=[project.pk, glioma.pk])
    label_url = reverse("annotator:label", args=[project.pk, fresh.pk]) + "?format=json"

    def seen_by(user) -> dict:
        web = client_for(user)
        examples = {s.pk for s in web.get(class_url).context["examples"]}
        payload = web.get(label_url).json()
        worklist = {r["scan"].pk: r for r in labeling.worklist(project, user)["rows"]}
        return {"example": read.pk in examples, "imported": imported.pk in examples,
                "similar": {n["scan"]: n["labels"] for n in payload["similar"]},
                "why": [n["label"] for n in payload["item"]["reason"]["neighbours"]],
                "worklist": [n["label"] for n in worklist[fresh.pk]["reason"]["neighbours"]]}

    erin_sees = seen_by(erin)
    assert not erin_sees["example"] and erin_sees["imported"]
    assert erin_sees["similar"] == {read.pk: [], imported.pk: ["glioma_tumor"]}
    assert erin_sees["why"] == [None] and erin_sees["worklist"] == [None]
    for who in ("alice", "bob", "dora"):          # the reader herself, the reviewer, the admin
        sees = seen_by(users[who])
        assert sees["example"] and sees["imported"] and sees["worklist"] == ["glioma_tumor"]
        if who == "bob":        # a reviewer reads blind on the label page (as before)
            assert sees["similar"] == {read.pk: [], imported.pk: []} and sees["why"] == [None]
        else:
            assert sees["similar"] == {read.pk: ["glioma_tumor"], imported.pk: ["glioma_tumor"]}
            assert sees["why"] == ["glioma_tumor"], who
    # once erin has read the scan herself, alice's label shows beside it too
    normal = LabelClass.objects.get(project=project, name="no_tumor")
    services.annotation_create(scan=read, reader=erin, label_class=normal)
    erin_sees = seen_by(erin)
    assert erin_sees["example"] and erin_sees["why"] == ["no_tumor"]
    assert erin_sees["similar"][read.pk] == ["no_tumor", "glioma_tumor"]
