"""An adjudication is a decision on what the reviewer's page showed.

Seen in a probe: (a) two reviewers adjudicated one scan at the same moment with different
classes; both were stored and both told "training now uses this label", so one was told
something false. (b) a reviewer's page was open while a reader changed their answer so that
both readers agreed; the adjudication from the old page overrode both readers, and the scan
left the review list. Now each row's form carries ``seen`` (the ids of the answers and the
adjudication it showed) and the server compares it under a lock on the scan row: a change
since is a 409 in words, and nothing is stored.

Named users: alice and carol read (clinicians), bob and rita review.
"""

from __future__ import annotations

import json
import re
import threading
import time

import pytest
from django.contrib.messages import get_messages
from django.db import connection
from django.test import Client
from django.urls import reverse

from annotator import review, services
from annotator.models import Annotation, Membership, Scan
from annotator.selectors import training_labels
from tests.base import FIXTURES, PASSWORD
from tests.conftest import run_import

ADJUDICATION = Annotation.Source.ADJUDICATION


@pytest.fixture
def people(project, users, django_user_model):
    make = django_user_model.objects.create_user
    carol = make("carol", "carol@example.org", PASSWORD)
    rita = make("rita", "rita@example.org", PASSWORD)
    services.membership_set(project=project, user=carol, role=Membership.Role.CLINICIAN)
    services.membership_set(project=project, user=rita, role=Membership.Role.REVIEWER)
    return {**users, "carol": carol, "rita": rita}


@pytest.fixture
def disputed(project, people):
    """A pool scan alice reads as glioma and carol as meningioma; the project's classes."""
    run_import(project, FIXTURES / "brain_mri" / "pool" / "no_tumor", layout="flat",
               dataset_name="brain")
    classes = {}
    for name in ("normal", "glioma", "meningioma"):
        classes[name], _ = services.label_class_get_or_create(project=project, name=name)
    scan = Scan.objects.filter(project=project, split="pool").order_by("pk").first()
    services.annotation_create(scan=scan, reader=people["alice"], label_class=classes["glioma"])
    services.annotation_create(scan=scan, reader=people["carol"],
                               label_class=classes["meningioma"])
    return scan, classes


def signed_in(user) -> Client:
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    return client


def seen_on_page(client: Client, project, scan) -> str:
    """The ``seen`` the review page's form for this scan sends (its disagreements row)."""
    page = client.get(reverse("annotator:review", args=[project.pk]))
    assert page.status_code == 200
    html = page.content.decode()
    row = html[html.index(f'id="disagreements-{scan.pk}"'):]
    return re.search(r'name="seen" value="([^"]*)"', row).group(1)


def adjudicate(client: Client, project, scan, label_class, seen: str | None):
    data = {"label_class": label_class.pk, "note": ""}
    if seen is not None:
        data["seen"] = seen
    return client.post(reverse("annotator:adjudicate", args=[project.pk, scan.pk]), data)


def said(response) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


def trained_on(project, scan):
    scans, class_ids = training_labels(project, split=scan.split)
    return dict(zip([s.pk for s in scans], class_ids)).get(scan.pk)


def test_a_page_opened_before_a_reader_changed_their_answer_is_refused(project, people,
                                                                       disputed):
    scan, classes = disputed
    bob = signed_in(people["bob"])
    seen = seen_on_page(bob, project, scan)

    # meanwhile carol changes her answer on the label page: both readers now say glioma
    carol = signed_in(people["carol"])
    answered = carol.post(reverse("annotator:answer", args=[project.pk, scan.pk]),
                          data=json.dumps({"outcome": "label",
                                           "class_id": classes["glioma"].pk}),
                          content_type="application/json")
    assert answered.status_code in (200, 201), answered.content
    assert trained_on(project, scan) == classes["glioma"].pk

    response = adjudicate(bob, project, scan, classes["meningioma"], seen)
    assert response.status_code == 409
    message = " ".join(said(response))
    assert f"Scan {scan.pk} was not adjudicated" in message
    assert "the answers on this scan changed since you opened this page" in message
    assert "carol now answers glioma (was meningioma" in message
    assert "reload to see them" in message
    assert message in response.content.decode().replace("&#x27;", "'")   # shown on the page
    assert not Annotation.objects.filter(scan=scan, source=ADJUDICATION).exists()
    assert trained_on(project, scan) == classes["glioma"].pk      # the readers' agreement


def test_two_reviewers_on_one_page_one_is_stored_the_other_is_told_who_decided(
        project, people, disputed):
    scan, classes = disputed
    bob, rita = signed_in(people["bob"]), signed_in(people["rita"])
    seen_by_bob, seen_by_rita = (seen_on_page(bob, project, scan),
                                 seen_on_page(rita, project, scan))
    assert seen_by_bob == seen_by_rita

    first = adjudicate(bob, project, scan, classes["glioma"], seen_by_bob)
    assert first.status_code == 302
    assert said(first) == [f"Scan {scan.pk} adjudicated as glioma: training now uses this "
                           "label."]
    second = adjudicate(rita, project, scan, classes["meningioma"], seen_by_rita)
    assert second.status_code == 409
    message = " ".join(said(second))
    assert "bob adjudicated it as glioma" in message and "reload to see them" in message

    stored = list(Annotation.objects.filter(scan=scan, source=ADJUDICATION))
    assert [(a.reader.username, a.label_class.name) for a in stored] == [("bob", "glioma")]
    assert trained_on(project, scan) == classes["glioma"].pk


def test_an_undone_answer_since_the_page_opened_is_a_conflict(project, people, disputed):
    scan, classes = disputed
    seen = review.disagreements(project)[0].seen
    carols = Annotation.objects.get(scan=scan, reader=people["carol"])
    carols.delete()                               # taken back (the label page's undo)
    with pytest.raises(review.AdjudicationConflict, match="1 answer you saw was taken back"):
        review.adjudicate(scan=scan, reviewer=people["bob"], label_class=classes["normal"],
                          seen=seen)
    assert not Annotation.objects.filter(scan=scan, source=ADJUDICATION).exists()


def test_a_seen_from_another_scan_or_malformed_stores_nothing(project, people, disputed):
    scan, classes = disputed
    other = Scan.objects.filter(project=project).exclude(pk=scan.pk).first()
    mine = Annotation.objects.filter(scan=scan).values_list("pk", flat=True)
    foreign = services.annotation_create(scan=other, reader=people["alice"],
                                         label_class=classes["normal"])
    bob = signed_in(people["bob"])
    # ids of another scan's answers do not describe this scan: refused as a change
    response = adjudicate(bob, project, scan, classes["normal"], f"{foreign.pk};")
    assert response.status_code == 409
    assert "alice's latest answer is now glioma" in " ".join(said(response))
    for bad in ("glioma", "1,2", "1;x", ";" + "9" * 30, ",".join(map(str, mine)) + ";" + "1" * 19,
                "1;" + "2" * 5000):
        response = adjudicate(bob, project, scan, classes["normal"], bad)
        assert response.status_code == 302, bad
        assert any("its 'seen' field is not one the review page writes" in m
                   for m in said(response)), bad
    assert not Annotation.objects.filter(source=ADJUDICATION).exists()


def test_a_post_without_seen_is_stored_and_says_what_it_replaces(project, people, disputed):
    """A page from before ``seen`` (or a script) still adjudicates, under the same lock;
    what it overrides is named, so "training now uses this label" is never false."""
    scan, classes = disputed
    bob, rita = signed_in(people["bob"]), signed_in(people["rita"])
    assert adjudicate(bob, project, scan, classes["glioma"], None).status_code == 302
    second = adjudicate(rita, project, scan, classes["meningioma"], None)
    assert second.status_code == 302
    (message,) = said(second)
    assert message.startswith(f"Scan {scan.pk} adjudicated as meningioma: training now uses "
                              "this label (it replaces bob's adjudication as glioma of ")
    assert trained_on(project, scan) == classes["meningioma"].pk
    assert Annotation.objects.filter(scan=scan, source=ADJUDICATION).count() == 2


def test_re_adjudicating_what_the_page_showed_is_accepted(project, people, disputed):
    """A flagged scan already adjudicated: the page showed that adjudication, and deciding
    again on it replaces it (and says so)."""
    scan, classes = disputed
    first = review.adjudicate(scan=scan, reviewer=people["bob"], label_class=classes["glioma"])
    answers, adjudications = review._latest_answers(project, [scan.pk])
    seen = review.Seen.of(answers[scan.pk].values(), adjudications[scan.pk]).token
    again = review.adjudicate(scan=scan, reviewer=people["rita"],
                              label_class=classes["meningioma"], seen=seen)
    assert again.replaced == first.annotation
    assert again.replaced_in_words.startswith("bob's adjudication as glioma of ")


@pytest.mark.django_db(transaction=True)
def test_two_simultaneous_adjudications_store_exactly_one(project, people, disputed,
                                                          monkeypatch):
    """Two reviewers' posts at the same moment, in two threads (two connections), each
    held between its check and its insert: the lock on the scan row makes the second wait
    and then see the first. Without the lock both are stored."""
    if connection.vendor != "postgresql":
        pytest.skip("true concurrency needs PostgreSQL (CI's second pass); SQLite's "
                    "in-memory test database cannot hold two writers")
    scan, classes = disputed
    real_create = review.annotation_create

    def slow_create(**fields):
        time.sleep(0.5)          # both requests are past their checks by now, without a lock
        return real_create(**fields)

    monkeypatch.setattr(review, "annotation_create", slow_create)
    clients = {"bob": signed_in(people["bob"]), "rita": signed_in(people["rita"])}
    seen = seen_on_page(clients["bob"], project, scan)
    choice = {"bob": classes["glioma"], "rita": classes["meningioma"]}
    barrier, responses, errors = threading.Barrier(2), {}, []

    def post(name):
        try:
            barrier.wait(10)
            responses[name] = adjudicate(clients[name], project, scan, choice[name], seen)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=post, args=(name,)) for name in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    stored = list(Annotation.objects.filter(scan=scan, source=ADJUDICATION))
    assert len(stored) == 1, [(a.reader.username, a.label_class.name) for a in stored]
    winner = stored[0].reader.username
    loser = "rita" if winner == "bob" else "bob"
    assert responses[winner].status_code == 302
    assert responses[loser].status_code == 409
    assert (f"{winner} adjudicated it as {choice[winner].name}"
            in " ".join(said(responses[loser])))
    assert trained_on(project, scan) == choice[winner].pk
