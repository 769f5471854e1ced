"""Times say their zone (tenth probe): with ``TIME_ZONE=Pacific/Kiritimati`` the same answer
read "2026-12-08 10:16" on the readers page (no zone), "2026-12-07T20:16+00:00" in the CSV;
the run log, the model card and the notes disagreed too, and in the hour the clocks go back
two moments printed the same. Every time a person reads now names its zone; machine-readable
outputs keep ISO 8601 with the offset. ``audit_export --since`` reads its date in the site's
zone and says so. A refused CSRF check answers a JSON request in JSON words (nothing saved;
reload), not an HTML page the label page could only call "may or may not have been saved"."""

from __future__ import annotations

import datetime as dt
import io
import json
import zoneinfo

import pytest
from django.core.management import CommandError, call_command
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from annotator import services
from annotator.models import Annotation, AuditEvent, Scan
from medsite.when import in_words
from tests.base import FIXTURES, PASSWORD
from tests.conftest import run_import

pytestmark = pytest.mark.django_db

UTC = dt.UTC
MOMENT = dt.datetime(2026, 12, 7, 20, 16, 5, tzinfo=UTC)


@pytest.mark.parametrize("zone, words", [
    ("UTC", "2026-12-07 20:16 UTC"),
    ("Pacific/Kiritimati", "2026-12-08 10:16 +14"),
    ("America/St_Johns", "2026-12-07 16:46 NST"),
])
def test_a_time_in_words_names_its_zone(zone, words):
    with timezone.override(zoneinfo.ZoneInfo(zone)):
        assert in_words(MOMENT) == words
        assert in_words(MOMENT, seconds=True, date=False) == words.split(" ", 1)[1][:5] \
            + ":05 " + words.rsplit(" ", 1)[1]


def test_the_repeated_hour_reads_twice_apart():
    """London, 25 October 2026: 01:30 happens at 00:30 and at 01:30 UTC."""
    with timezone.override(zoneinfo.ZoneInfo("Europe/London")):
        first = in_words(dt.datetime(2026, 10, 25, 0, 30, tzinfo=UTC))
        second = in_words(dt.datetime(2026, 10, 25, 1, 30, tzinfo=UTC))
    assert (first, second) == ("2026-10-25 01:30 BST", "2026-10-25 01:30 GMT")


@pytest.fixture
def answered(project, users):
    run_import(project, FIXTURES / "brain_mri" / "eval" / "glioma_tumor", layout="flat",
               dataset_name="brain")
    glioma, _ = services.label_class_get_or_create(project=project, name="glioma",
                                                   created_by=users["dora"])
    scan = Scan.objects.filter(project=project).order_by("pk").first()
    answer = services.annotation_create(scan=scan, reader=users["alice"], label_class=glioma,
                                        duration_ms=4000)
    Annotation.objects.filter(pk=answer.pk).update(created_at=MOMENT)
    AuditEvent.objects.filter(project=project).update(created_at=MOMENT)
    return project, scan, glioma


def test_the_readers_page_shows_the_zone(answered, users, settings):
    project, _, _ = answered
    settings.TIME_ZONE = "Pacific/Kiritimati"
    services.membership_set(project=project, user=users["bob"], role="admin")
    client = Client()
    assert client.login(username="bob", password=PASSWORD)
    page = client.get(reverse("annotator:readers", args=[project.pk])).content.decode()
    assert "2026-12-08 10:16 +14" in page


def test_audit_since_reads_the_date_in_the_site_zone(answered, settings):
    settings.TIME_ZONE = "Pacific/Kiritimati"       # 20:16 UTC on the 7th is the 8th there
    out, said = io.StringIO(), io.StringIO()
    call_command("audit_export", since="2026-12-08", stdout=out, stderr=said)
    rows = out.getvalue().splitlines()[1:]
    assert rows and all("2026-12-07T20:16:05+00:00" in row for row in rows)
    assert "events since 2026-12-08 00:00 +14 (2026-12-07 10:00 UTC" in said.getvalue()
    settings.TIME_ZONE = "UTC"
    out = io.StringIO()
    call_command("audit_export", since="2026-12-08", stdout=out, stderr=io.StringIO())
    assert out.getvalue().splitlines()[1:] == []
    for loose in ("2026-1-7", "２０２６-12-08", "2026-12-08T00:00"):
        with pytest.raises(CommandError, match="YYYY-MM-DD"):
            call_command("audit_export", since=loose, stdout=io.StringIO(),
                         stderr=io.StringIO())


def test_an_idle_answer_does_not_wreck_the_readers_rate(answered, users):
    """Ten answers at 4 s and one left open for 5 h: the long one counts as ten medians
    (40 s), so 11 answers in 80 s, 495 an hour, not 8."""
    from annotator.review import reader_stats

    project, scan, glioma = answered
    Annotation.objects.all().delete()
    for _ in range(10):
        services.annotation_create(scan=scan, reader=users["alice"], label_class=glioma,
                                   duration_ms=4000)
    services.annotation_create(scan=scan, reader=users["alice"], label_class=glioma,
                               duration_ms=5 * 3_600_000)
    [alice] = reader_stats(project)
    assert alice.median_seconds == 4.0
    assert alice.per_hour == pytest.approx(11 / (80 / 3600))


def test_a_refused_csrf_check_is_said_in_json_and_saves_nothing(answered, users):
    project, scan, glioma = answered
    client = Client(enforce_csrf_checks=True)
    assert client.login(username="alice", password=PASSWORD)
    before = Annotation.objects.count()
    response = client.post(reverse("annotator:answer", args=[project.pk, scan.pk]),
                           data=json.dumps({"class_id": glioma.pk}),
                           content_type="application/json", HTTP_ACCEPT="application/json")
    assert response.status_code == 403
    body = response.json()
    assert body["csrf"] is True and "Nothing was saved" in body["error"]
    assert "Reload the page" in body["error"]
    assert Annotation.objects.count() == before
    # a form post keeps Django's page
    page = client.post(reverse("annotator:class_create", args=[project.pk]), {"name": "x"})
    assert page.status_code == 403 and page["Content-Type"].startswith("text/html")
