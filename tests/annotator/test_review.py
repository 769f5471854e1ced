"""The reviewer's page: disagreements, likely label errors, per-class reader agreement and
adjudication, on real fixture scans with the named users (bob reviews, alice labels)."""

from __future__ import annotations

import pytest
from django.contrib.messages import get_messages
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from sklearn.metrics import cohen_kappa_score

from annotator import review, services
from annotator.models import Annotation, LabelClass, Membership, Scan
from ml_backend.models import QueryItem, QueryRound
from annotator.selectors import training_labels
from ml_backend.services import label_quality_check
from ml_backend.errors import TrainingError
from tests.base import FIXTURES, PASSWORD
from tests.conftest import run_import

LABEL = Annotation.Outcome.LABEL


@pytest.fixture
def carol(project, django_user_model):
    """A second clinician, so that two people can disagree."""
    user = django_user_model.objects.create_user("carol", "carol@example.org", PASSWORD)
    services.membership_set(project=project, user=user, role=Membership.Role.CLINICIAN)
    return user


@pytest.fixture
def scans(project):
    run_import(project, FIXTURES / "brain_mri" / "pool" / "no_tumor", layout="flat",
               dataset_name="brain")
    run_import(project, FIXTURES / "brain_mri" / "eval" / "glioma_tumor", layout="flat",
               split="eval", dataset_name="brain")
    return list(Scan.objects.filter(project=project).order_by("-split", "pk"))  # pool first


@pytest.fixture
def classes(project, users):
    made = {}
    for name in ("normal", "glioma", "pituitary", "meningioma"):
        made[name], _ = services.label_class_get_or_create(project=project, name=name,
                                                          created_by=users["dora"])
    return made


def label(scan, reader, label_class, **kwargs):
    return services.annotation_create(scan=scan, reader=reader, label_class=label_class, **kwargs)


def login(client, user):
    assert client.login(username=user.username, password=PASSWORD)


def chosen(project, scan):
    scan_list, class_ids = training_labels(project, split=scan.split)
    return dict(zip([s.pk for s in scan_list], class_ids)).get(scan.pk)


def messages_of(response) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


# --- disagreements and adjudication ------------------------------------------------------


def test_disagreements_list_only_open_conflicts_between_readers(project, users, carol, scans,
                                                                classes):
    alice, bob = users["alice"], users["bob"]
    s = scans
    label(s[0], alice, classes["normal"]); label(s[0], carol, classes["glioma"])      # conflict
    label(s[1], alice, classes["normal"]); label(s[1], carol, classes["normal"])      # agree
    label(s[2], alice, classes["glioma"]); label(s[2], alice, classes["normal"])      # one reader
    label(s[3], None, classes["glioma"], source=Annotation.Source.IMPORT)             # import
    label(s[3], alice, classes["normal"])                                             # vs alice
    label(s[4], alice, classes["normal"]); label(s[4], carol, classes["glioma"])
    review.adjudicate(scan=s[4], reviewer=bob, label_class=classes["glioma"])         # settled
    label(s[5], alice, classes["normal"]); label(s[5], carol, classes["glioma"])
    review.adjudicate(scan=s[5], reviewer=bob, label_class=classes["glioma"])
    label(s[5], alice, classes["pituitary"])                                          # reopened
    label(s[6], alice, classes["normal"])
    services.annotation_create(scan=s[6], reader=carol, outcome=Annotation.Outcome.UNSURE)
    eval_scan = next(x for x in scans if x.split == "eval")
    label(eval_scan, alice, classes["glioma"]); label(eval_scan, carol, classes["meningioma"])

    rows = {row.scan.pk: row for row in review.disagreements(project)}
    assert set(rows) == {s[0].pk, s[3].pk, s[5].pk, eval_scan.pk}

    first = rows[s[0].pk]
    assert [(a.reader, a.label_class.name) for a in first.answers] == [("alice", "normal"),
                                                                       ("carol", "glioma")]
    assert first.training_label is None       # a tie: held out until adjudicated (majority)
    assert first.prediction is None and first.last_adjudication is None
    assert [(a.reader, a.label_class.name) for a in rows[s[3].pk].answers] == [
        ("import", "glioma"), ("alice", "normal")]
    reopened = rows[s[5].pk]
    assert reopened.last_adjudication.label_class == classes["glioma"]
    assert reopened.training_label == classes["glioma"]       # still the adjudication
    assert {a.label_class.name for a in reopened.answers} == {"pituitary", "glioma"}
    assert rows[eval_scan.pk].training_label is None          # a tie again


def test_bob_adjudicates_through_the_page_and_training_uses_his_label(
        client, project, users, carol, scans, classes):
    alice, bob = users["alice"], users["bob"]
    scan = scans[0]
    label(scan, alice, classes["normal"], shown_suggestion=classes["glioma"],
          shown_confidence=0.71)
    label(scan, carol, classes["glioma"])
    assert chosen(project, scan) is None         # a tie trains nothing until adjudicated

    login(client, bob)
    page = client.get(reverse("annotator:review", args=[project.pk]))
    assert page.status_code == 200
    html = page.content.decode()
    assert f'data-scan="{scan.pk}"' in html and 'id="disagreements"' in html
    assert reverse("annotator:scan_preview", args=[scan.pk]) in html
    assert reverse("annotator:adjudicate", args=[project.pk, scan.pk]) in html
    assert "was shown glioma" not in html        # blind review by default: no anchoring
    project.blind_second_readers = False
    project.save()
    html = client.get(reverse("annotator:review", args=[project.pk])).content.decode()
    assert 'data-class="normal"' in html and "was shown glioma (0.71)" in html
    assert 'data-reader="alice"' in html and 'data-reader="carol"' in html

    response = client.post(reverse("annotator:adjudicate", args=[project.pk, scan.pk]),
                           {"label_class": classes["normal"].pk, "note": "  no lesion  "})
    assert response.status_code == 302
    assert response["Location"] == reverse("annotator:review", args=[project.pk])
    assert any("adjudicated as normal" in m for m in messages_of(response))

    adjudication = Annotation.objects.get(scan=scan, source=Annotation.Source.ADJUDICATION)
    assert adjudication.reader == bob and adjudication.label_class == classes["normal"]
    assert adjudication.outcome == LABEL and adjudication.note == "no lesion"
    assert review.disagreements(project) == []
    assert chosen(project, scan) == classes["normal"].pk      # training uses bob's decision
    html = client.get(reverse("annotator:review", args=[project.pk])).content.decode()
    assert f'data-scan="{scan.pk}"' not in html


def test_superuser_and_project_admin_may_review(client, project, users, scans, classes,
                                                django_user_model):
    erin = django_user_model.objects.create_user("erin", "erin@example.org", PASSWORD)
    services.membership_set(project=project, user=erin, role=Membership.Role.ADMIN)
    url = reverse("annotator:review", args=[project.pk])
    for user in (users["dora"], erin):
        client.logout()
        login(client, user)
        assert client.get(url).status_code == 200, user
        response = client.post(reverse("annotator:adjudicate", args=[project.pk, scans[0].pk]),
                               {"label_class": classes["normal"].pk})
        assert response.status_code == 302
    assert Annotation.objects.filter(source=Annotation.Source.ADJUDICATION).count() == 2


# --- permissions -------------------------------------------------------------------------


def review_urls(project, scan):
    return {
        "page": reverse("annotator:review", args=[project.pk]),
        "adjudicate": reverse("annotator:adjudicate", args=[project.pk, scan.pk]),
        "check": reverse("annotator:review_quality_check", args=[project.pk]),
    }


@pytest.mark.parametrize("name", ["alice", "charlie"])
def test_clinicians_and_outsiders_get_404(client, project, users, scans, classes, name):
    login(client, users[name])
    urls = review_urls(project, scans[0])
    assert client.get(urls["page"]).status_code == 404
    assert client.post(urls["adjudicate"], {"label_class": classes["normal"].pk}
                       ).status_code == 404
    assert client.post(urls["check"]).status_code == 404
    assert not Annotation.objects.filter(source=Annotation.Source.ADJUDICATION).exists()
    assert not QueryRound.objects.exists()
    with pytest.raises(review.ReviewError, match="only reviewers"):
        review.adjudicate(scan=scans[0], reviewer=users[name], label_class=classes["normal"])


def test_anonymous_is_sent_to_login(client, project, scans, classes):
    for name, url in review_urls(project, scans[0]).items():
        response = (client.get(url) if name == "page"
                    else client.post(url, {"label_class": classes["normal"].pk}))
        assert response.status_code == 302, name
        assert response["Location"].startswith(reverse("login")), name
    assert not Annotation.objects.filter(source=Annotation.Source.ADJUDICATION).exists()


def test_adjudicate_and_quality_check_are_post_only_and_csrf_protected(project, users, scans,
                                                                       classes):
    client = Client(enforce_csrf_checks=True)
    login(client, users["bob"])
    urls = review_urls(project, scans[0])
    assert client.get(urls["adjudicate"]).status_code == 405
    assert client.get(urls["check"]).status_code == 405
    assert client.post(urls["adjudicate"], {"label_class": classes["normal"].pk}
                       ).status_code == 403
    assert client.post(urls["check"]).status_code == 403
    assert not Annotation.objects.filter(source=Annotation.Source.ADJUDICATION).exists()


def test_bad_classes_and_scans_are_refused_without_writing(client, project, other_project,
                                                           users, scans, classes):
    foreign, _ = services.label_class_get_or_create(project=other_project, name="normal")
    run_import(other_project, FIXTURES / "brain_mri" / "eval" / "no_tumor", layout="flat")
    foreign_scan = Scan.objects.filter(project=other_project).first()
    login(client, users["bob"])
    url = reverse("annotator:adjudicate", args=[project.pk, scans[0].pk])
    for value in (foreign.pk, 987654, "abc", ""):
        response = client.post(url, {"label_class": value})
        assert response.status_code == 302, value
        assert any("was not adjudicated" in m for m in messages_of(response)), value
    page = client.post(url, {"label_class": foreign.pk}, follow=True).content.decode()
    assert "is not a class of this project" in page
    # a scan of another project under this project's URL
    response = client.post(reverse("annotator:adjudicate", args=[project.pk, foreign_scan.pk]),
                           {"label_class": classes["normal"].pk})
    assert response.status_code == 404
    assert not Annotation.objects.filter(source=Annotation.Source.ADJUDICATION).exists()
    with pytest.raises(review.ReviewError, match="not a class of this project"):
        review.adjudicate(scan=scans[0], reviewer=users["bob"], label_class=foreign)


def test_a_note_over_the_limit_is_named_as_the_problem(client, project, users, scans, classes):
    login(client, users["bob"])
    url = reverse("annotator:adjudicate", args=[project.pk, scans[0].pk])
    response = client.post(url, {"label_class": classes["normal"].pk, "note": "x" * 2001})
    assert response.status_code == 302
    assert messages_of(response) == [
        f"Scan {scans[0].pk} was not adjudicated: the note is too long: 2001 characters, "
        "the limit is 2,000."]
    assert not Annotation.objects.filter(source=Annotation.Source.ADJUDICATION).exists()
    # a bad class with a fine note is still named as such; at the limit it is saved
    response = client.post(url, {"label_class": 987654, "note": "x"})
    assert any("choose one of the project's classes" in m for m in messages_of(response))
    client.post(url, {"label_class": classes["normal"].pk, "note": "x" * 2000})
    assert Annotation.objects.get(source=Annotation.Source.ADJUDICATION).note == "x" * 2000


# --- agreement ---------------------------------------------------------------------------


def test_agreement_by_class_matches_sklearn_on_reader_pairs(project, users, carol, scans,
                                                            classes):
    alice, bob = users["alice"], users["bob"]
    A, B, C = classes["normal"], classes["glioma"], classes["pituitary"]
    s = scans
    for scan, (a, c) in zip(s[:7], [(A, A), (A, B), (B, B), (C, C), (C, A), (B, B), (A, A)]):
        label(scan, alice, a)
        label(scan, carol, c)
    # three readers: alice, carol and the import → three pairs
    label(s[7], alice, A); label(s[7], carol, C)
    label(s[7], None, B, source=Annotation.Source.IMPORT)
    label(s[8], alice, A)                                    # one reader: not paired
    label(s[9], alice, B); label(s[9], alice, A)             # only alice's latest (A) counts
    label(s[9], carol, A)
    review.adjudicate(scan=s[9], reviewer=bob, label_class=C)    # adjudications never count
    services.annotation_create(scan=s[10], reader=alice, outcome=Annotation.Outcome.SKIP)
    label(s[10], carol, C)                                   # a skip is not an answer

    # rater order within a pair: users by id (alice before carol), the import last
    first = [A, A, B, C, C, B, A, A, A, C, A]
    second = [A, B, B, C, A, B, A, C, B, B, A]
    first, second = [c.pk for c in first], [c.pk for c in second]

    result = review.agreement_by_class(project)
    assert (result.scans, result.pairs) == (9, 11)
    assert result.kappa == pytest.approx(cohen_kappa_score(first, second))
    assert result.reason == ""
    by_name = {row.label_class.name: row for row in result.per_class}
    for cls in (A, B, C):
        expected = cohen_kappa_score([c == cls.pk for c in first], [c == cls.pk for c in second])
        assert by_name[cls.name].kappa == pytest.approx(expected), cls.name
        assert by_name[cls.name].answers == first.count(cls.pk) + second.count(cls.pk)
    assert by_name["normal"].kappa > by_name["pituitary"].kappa    # a sanity check on the case
    unused = by_name["meningioma"]
    assert unused.kappa is None and "no reader chose this class" in unused.reason

    client = Client()
    login(client, users["bob"])
    html = client.get(reverse("annotator:review", args=[project.pk])).content.decode()
    assert f"{result.kappa:.3f}" in html and 'id="kappa-table"' in html
    assert f"{by_name['glioma'].kappa:.3f}" in html


def test_agreement_needs_enough_pairs(project, users, carol, scans, classes):
    label(scans[0], users["alice"], classes["normal"])
    label(scans[0], carol, classes["glioma"])
    result = review.agreement_by_class(project)
    assert (result.scans, result.pairs, result.kappa) == (1, 1, None)
    assert f"at least {review.MIN_PAIRS}" in result.reason
    assert all(row.kappa is None for row in result.per_class)

    # every pair names the same class: kappa is undefined, never NaN
    for scan in scans[1:6]:
        label(scan, users["alice"], classes["normal"])
        label(scan, carol, classes["normal"])
    scans[0].annotations.all().delete()
    result = review.agreement_by_class(project)
    assert result.pairs == 5 and result.kappa is None and result.reason
    by_name = {row.label_class.name: row for row in result.per_class}
    assert by_name["normal"].kappa is None and "undefined" in by_name["normal"].reason


# --- likely label errors -----------------------------------------------------------------


def test_flagged_lists_the_latest_label_review_round_until_adjudicated(project, users, scans,
                                                                      classes):
    bob = users["bob"]
    for scan in scans[:4]:
        label(scan, users["alice"], classes["normal"])
    old = QueryRound.objects.create(project=project, strategy="label_review", size=1)
    QueryItem.objects.create(query_round=old, scan=scans[3], rank=1, score=0.9,
                             reason={"why": "likely label error"})
    review.adjudicate(scan=scans[0], reviewer=bob, label_class=classes["normal"])  # before
    latest = QueryRound.objects.create(project=project, strategy="label_review", size=3)
    for rank, scan in enumerate(scans[:3], start=1):
        QueryItem.objects.create(query_round=latest, scan=scan, rank=rank, score=0.5,
                                 reason={"why": "likely label error", "given": "normal",
                                         "suggested": "glioma", "self_confidence": 0.12,
                                         "suggested_confidence": 0.8})
    QueryRound.objects.create(project=project, strategy="hybrid", size=0)   # not a review
    review.adjudicate(scan=scans[1], reviewer=bob, label_class=classes["glioma"])  # after

    rows = review.flagged(project)
    assert [row.scan.pk for row in rows] == [scans[0].pk, scans[2].pk]
    assert rows[0].reason["suggested"] == "glioma" and rows[0].query_item.rank == 1
    assert rows[0].training_label == classes["normal"]
    assert [a.reader for a in rows[1].answers] == ["alice"]


@pytest.fixture
def embedded_project(project):
    """Import-labeled brain MRI pool scans with a tiny pretrained encoder (as in
    tests/ml_backend/test_loop.py)."""
    for name in ("no_tumor", "pituitary_tumor"):
        run_import(project, FIXTURES / "brain_mri" / "pool" / name, layout="flat",
                   dataset_name="brain", default_label=name)
    call_command("pretrain", "--project", project.name, "--epochs", "2", "--image-size", "32",
                 "--batch-size", "32", "--small-input", "no", "--no-progress")
    project.refresh_from_db()
    project.refit_every = 10_000          # no refit during the test
    project.save()
    return project


def test_quality_check_from_the_page_flags_label_errors_for_review(client, embedded_project,
                                                                   users):
    project = embedded_project
    normal = LabelClass.objects.get(project=project, name="no_tumor")
    pituitary = LabelClass.objects.get(project=project, name="pituitary_tumor")
    # alice and charlie mislabel a few pituitary scans as normal: a majority of two readers
    # against the import trains the wrong label
    wrong = list(Scan.objects.filter(project=project, annotations__label_class=pituitary)
                 .order_by("pk"))[:6]
    for scan in wrong:
        label(scan, users["alice"], normal)
        label(scan, users["charlie"], normal)

    login(client, users["bob"])
    url = reverse("annotator:review", args=[project.pk])
    assert 'id="run-quality-check"' in client.get(url).content.decode()
    response = client.post(reverse("annotator:review_quality_check", args=[project.pk]))
    assert response.status_code == 302 and response["Location"] == url
    check = QueryRound.objects.get(project=project, strategy="label_review")
    assert check.created_by == users["bob"]
    assert any(f"round {check.pk}" in m for m in messages_of(response))
    assert check.size > 0, "the tiny encoder flagged nothing: the test case needs more errors"

    html = client.get(url).content.decode()
    flagged_html = html.split('id="flagged"', 1)[1]
    items = list(check.items.order_by("rank"))
    for item in items:
        assert f'data-scan="{item.scan_id}"' in flagged_html
    assert f"but looks like <b>{items[0].reason['suggested']}</b>" in flagged_html

    target = items[0]
    suggested = LabelClass.objects.get(project=project, name=target.reason["suggested"])
    client.post(reverse("annotator:adjudicate", args=[project.pk, target.scan_id]),
                {"label_class": suggested.pk})
    assert target.scan_id not in {row.scan.pk for row in review.flagged(project)}
    assert chosen(project, target.scan) == suggested.pk


def test_quality_check_errors_are_shown_not_raised(client, project, users, scans):
    login(client, users["bob"])
    response = client.post(reverse("annotator:review_quality_check", args=[project.pk]),
                           follow=True)
    assert response.status_code == 200
    assert "The label-quality check did not run: no active encoder" in response.content.decode()
    assert not QueryRound.objects.exists()
    with pytest.raises(TrainingError, match="no active encoder"):
        label_quality_check(project=project)
