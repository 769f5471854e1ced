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
