"""A reader removed from a project while they hold scans (the sixth probe: clin2 removed
while scan 382 was open in their viewer). Their leases go at once, whatever path removed
them: other readers get the scan now and are not told "alice has this scan open" for up to
LABEL_LEASE_SECONDS. Their next answer from the label page still open is refused as JSON in
words the page shows ("not (or no longer) a member of this project"), DEBUG on or off (with
DEBUG on it was Django's HTML 404 page, which the page shows as "server answered 404"); the
same words for a project that does not exist, so no project id leaks."""

from __future__ import annotations

import json
import uuid

import pytest
from django.test import Client
from django.urls import reverse

from annotator import labeling, services
from annotator.auth import NOT_A_MEMBER
from annotator.models import Annotation, Membership, ScanLease
from tests.base import PASSWORD
from tests.conftest import import_glioma_round

pytestmark = pytest.mark.django_db


def signed_in(username: str) -> Client:
    client = Client()
    assert client.login(username=username, password=PASSWORD)
    return client


@pytest.fixture
def reading(project, users):
    """alice has the label page of the round's first scan open (her lease on it); charlie
    is a second clinician of the project."""
    import_glioma_round(project, n=3)
    services.membership_set(project=project, user=users["charlie"],
                            role=Membership.Role.CLINICIAN)
    alice = signed_in("alice")
    opened = alice.get(reverse("annotator:next_scan", args=[project.pk]))
    assert opened.status_code == 302, opened
    page = alice.get(opened["Location"])
    assert page.status_code == 200
    scan = ScanLease.objects.get(project=project, user=users["alice"]).scan
    return alice, scan


def others_see(project, scan) -> tuple[str | None, bool]:
    """What charlie sees: who holds ``scan`` by its label page, and whether his worklist
    says alice has a scan open."""
    charlie = signed_in("charlie")
    page = charlie.get(reverse("annotator:label", args=[project.pk, scan.pk]),
                       {"format": "json"})
    assert page.status_code == 200, page.content[:300]
    worklist = charlie.get(reverse("annotator:worklist", args=[project.pk])).content.decode()
    return page.json()["held_by"], "open in alice" in worklist


def answer(client: Client, project_id: int, scan_id: int):
    """An answer as the label page sends it (JSON, ``Accept: application/json``)."""
    return client.post(reverse("annotator:answer", args=[project_id, scan_id]),
                       data=json.dumps({"outcome": "skip", "submission_id": str(uuid.uuid4())}),
                       content_type="application/json", HTTP_ACCEPT="application/json")


def test_the_setup_shows_a_held_scan_as_held(project, reading):
    """The check below can fail: while alice is a member, charlie is told she has it open."""
    _, scan = reading
    assert others_see(project, scan) == ("alice", True)


def test_a_member_removed_by_a_script_gives_up_their_scans_at_once(project, users,
                                                                    other_project, reading):
    _, scan = reading
    # alice's lease in another project and charlie's here are not hers to lose
    services.membership_set(project=other_project, user=users["alice"],
                            role=Membership.Role.CLINICIAN)
    import_glioma_round(other_project, n=1)
    elsewhere = other_project.scans.filter(split="pool").first()
    assert labeling.lease_acquire(scan=elsewhere, user=users["alice"])
    charlies = project.scans.filter(split="pool").exclude(pk=scan.pk).first()
    assert labeling.lease_acquire(scan=charlies, user=users["charlie"])

    # the probe's path: a queryset delete in ``manage.py shell``
    Membership.objects.filter(project=project, user=users["alice"]).delete()

    assert not ScanLease.objects.filter(project=project, user=users["alice"]).exists()
    assert others_see(project, scan) == (None, False)
    assert ScanLease.objects.filter(scan=elsewhere, user=users["alice"]).exists()
    assert ScanLease.objects.filter(scan=charlies, user=users["charlie"]).exists()


def test_a_member_removed_in_the_admin_gives_up_their_scans_at_once(project, users, reading):
    _, scan = reading
    membership = Membership.objects.get(project=project, user=users["alice"])
    dora = signed_in("dora")
    url = reverse("admin:annotator_membership_delete", args=[membership.pk])
    assert dora.post(url, {"post": "yes"}).status_code == 302
    assert not Membership.objects.filter(pk=membership.pk).exists()
    assert not ScanLease.objects.filter(user=users["alice"]).exists()
    assert others_see(project, scan) == (None, False)


def test_a_member_removed_with_the_admins_delete_action_gives_up_their_scans(project, users,
                                                                             reading):
    """The changelist's "delete selected" (a queryset delete, as a script's)."""
    _, scan = reading
    membership = Membership.objects.get(project=project, user=users["alice"])
    dora = signed_in("dora")
    done = dora.post(reverse("admin:annotator_membership_changelist"),
                     {"action": "delete_selected", "_selected_action": [membership.pk],
                      "post": "yes"})
    assert done.status_code == 302
    assert not Membership.objects.filter(pk=membership.pk).exists()
    assert others_see(project, scan) == (None, False)


@pytest.mark.parametrize("debug", [True, False], ids=["DEBUG", "production"])
def test_the_removed_readers_next_answer_says_they_are_no_longer_a_member(
        project, users, reading, settings, debug):
    alice, scan = reading
    settings.DEBUG = debug
    Membership.objects.filter(project=project, user=users["alice"]).delete()
    refused = answer(alice, project.pk, scan.pk)
    assert refused.status_code == 404
    assert refused["Content-Type"] == "application/json"
    assert refused.json() == {"error": NOT_A_MEMBER}
    assert "no longer) a member of this project" in NOT_A_MEMBER
    assert not Annotation.objects.filter(scan=scan).exists()
    # the page's other calls say the same (its poll of the model status, opening a scan)
    status = alice.get(reverse("annotator:model_status", args=[project.pk]),
                       HTTP_ACCEPT="application/json")
    opened = alice.get(reverse("annotator:label", args=[project.pk, scan.pk]),
                       {"format": "json"})
    assert status.json() == opened.json() == {"error": NOT_A_MEMBER}
    assert ScanLease.objects.filter(user=users["alice"]).count() == 0    # none taken again


@pytest.mark.parametrize("debug", [True, False], ids=["DEBUG", "production"])
def test_an_outsider_learns_nothing_of_which_projects_exist(project, other_project, users,
                                                            settings, debug):
    """charlie (never a member) gets the same answer for a project that exists and one that
    does not."""
    settings.DEBUG = debug
    charlie = signed_in("charlie")
    missing = max(project.pk, other_project.pk) + 100
    answers = [answer(charlie, pk, 1) for pk in (project.pk, other_project.pk, missing)]
    assert [(a.status_code, a.json()) for a in answers] == [(404, {"error": NOT_A_MEMBER})] * 3


def test_a_members_own_not_found_keeps_the_views_words_as_json_with_debug_on(project, users,
                                                                          reading, settings):
    """A member's 404 for another reason (a scan not in the project) says that reason, as
    JSON the page can show, also with DEBUG on."""
    alice, scan = reading
    settings.DEBUG = True
    missing = scan.pk + 10_000
    refused = answer(alice, project.pk, missing)
    assert refused.status_code == 404
    assert refused.json() == {"error": "No such scan in this project."}
    # a page (not a script) still gets the 404 page
    page = alice.get(reverse("annotator:label", args=[project.pk, missing]))
    assert page.status_code == 404 and "text/html" in page["Content-Type"]


def test_a_request_that_passed_its_check_before_the_removal_takes_no_lease(project, users,
                                                                             reading):
    """The sixth probe's leftover: a label page request checked alice's membership, then she
    was removed, then it took its lease. Now the lease is taken under a lock on her
    membership row: after the removal it is refused as for any non-member, and nothing is
    held; a superuser (no membership row) still takes one."""
    from django.http import Http404

    _, scan = reading
    others = [item.scan for item in labeling.current_round(project).items.all()
              if item.scan_id != scan.pk]
    Membership.objects.filter(project=project, user=users["alice"]).delete()
    with pytest.raises(Http404):
        labeling.lease_acquire(scan=others[0], user=users["alice"])   # the in-flight request
    assert not ScanLease.objects.filter(user=users["alice"]).exists()
    assert users["dora"].is_superuser
    assert labeling.lease_acquire(scan=others[0], user=users["dora"])
