"""A PACS query says what it filters, or is refused before the PACS is asked (hostile-user
probe): an empty query after parsing (``Modality=`` from an unset shell variable,
``%%%=&&&=``) used to become "every study"; a typo'd key (``Modalty``) was sent unchecked;
``Modality=CR&Modality=MR`` kept only MR. "Every study" is said by giving no query at all
(no ``--query``; PACS_PULL_QUERY unset). No PACS is needed here: a refused query never
reaches one, and an accepted one goes to a stand-in client that records what it was asked."""

from __future__ import annotations

import logging

import pytest
from django.core.checks import run_checks
from django.core.management import CommandError, call_command

from annotator import pacs
from annotator.models import ImportJob

NOWHERE = "http://127.0.0.1:9/dicom-web"        # asked, it would fail "did not answer"


@pytest.mark.parametrize("query, said", [
    ("Modality=", "Modality has no value"),
    ("Modality", "Modality has no value"),
    ("%%%=&&&=", "'%%%' is not a DICOM keyword or tag; a filter has no key"),
    ("Modalty=CR", "'Modalty' is not a DICOM keyword or tag"),
    ("StudyDate=2024&modality=CR", "'modality' is not a DICOM keyword"),
    ("Modality=CR&Modality=MR", "Modality is given twice"),
    ("Modality=CR&ModalitiesInStudy=MR", "Modality and ModalitiesInStudy ask for the same"),
    ("", "the query is empty"),
    ("   ", "the query is empty"),
    ("&&&", "the query is empty"),
    ("Modality=CR&limit=5", "'limit' is a QIDO-RS option, not a study filter \\(use --limit\\)"),
    ("includefield=all&Modality=CR", "'includefield' is a QIDO-RS option"),
])
def test_a_query_that_does_not_say_what_it_filters_is_refused(query, said):
    with pytest.raises(pacs.PacsError, match=said):
        pacs.parse_query(query)


@pytest.mark.parametrize("query, said", [
    # dates as DICOM writes them or not at all (tenth probe: these went to the PACS, which
    # refused them, matched nothing or ignored the filter, depending on the PACS)
    ("StudyDate=2026-02-30", "not a date as YYYYMMDD or a range"),
    ("StudyDate=20260230", "'20260230' is not a date as YYYYMMDD"),
    ("StudyDate=2024-01-01-2024-12-31", "not a date as YYYYMMDD or a range"),
    ("StudyDate=-1", "'1' is not a date"),
    ("StudyDate=2024*", "is not a date"),
    ("StudyDate=20241231-20240101", "the range ends before it starts"),
    ("StudyTime=250000", "'250000' is not a time as HHMMSS"),
    ("StudyTime=1260", "is not a time"),
    ("AcquisitionDateTime=20241301", "is not a date and time"),
])
def test_a_date_filter_is_a_dicom_date_or_range(query, said):
    with pytest.raises(pacs.PacsError, match=said):
        pacs.parse_query(query)


def test_dicom_date_ranges_and_times_pass():
    for value in ("20240101", "20240101-20241231", "20240101-", "-20241231", "20240229"):
        assert pacs.parse_query(f"StudyDate={value}") == {"StudyDate": value}
    for value in ("09", "0930", "093000.123", "0800-1730"):
        assert pacs.parse_query(f"StudyTime={value}") == {"StudyTime": value}
    for value in ("2024", "2024010112-0500", "20240101-20240102"):   # an offset, a range
        assert pacs.parse_query(f"AcquisitionDateTime={value}") == {"AcquisitionDateTime": value}


def test_a_good_query_and_no_query():
    assert pacs.parse_query(None) == {}                          # every study, on purpose
    assert pacs.parse_query("Modality=CR&StudyDate=20240101-20241231&StudyDescription=CT*"
                            ) == {"ModalitiesInStudy": "CR", "StudyDate": "20240101-20241231",
                                  "StudyDescription": "CT*"}
    # a tag number is sent as its keyword (Modality's as the study-level ModalitiesInStudy)
    assert pacs.parse_query("00080020=20240101") == {"StudyDate": "20240101"}
    assert pacs.parse_query("00080060=MR") == {"ModalitiesInStudy": "MR"}


@pytest.mark.django_db
@pytest.mark.parametrize("query, said", [
    ("Modality=", "Modality has no value"),
    ("%%%=&&&=", "is not a DICOM keyword"),
    ("Modalty=CR", "'Modalty' is not a DICOM keyword"),
    ("Modality=CR&Modality=MR", "Modality is given twice"),
    ("", "the query is empty: .*leave the query out .* to pull every study"),
])
def test_pacs_pull_refuses_the_query_before_asking_the_pacs(project, query, said):
    with pytest.raises(CommandError, match=said):
        call_command("pacs_pull", "--project", project.name, "--dicomweb", NOWHERE,
                     "--query", query)
    assert not ImportJob.objects.exists()


class RecordingClient:
    def __init__(self):
        self.asked = []

    def search_for_studies(self, *, search_filters, limit, fields, offset=0):
        self.asked.append(search_filters)
        return []


@pytest.mark.django_db
def test_what_the_pacs_is_asked(project):
    client = RecordingClient()
    pacs.pacs_pull(project=project, url=NOWHERE, query=None, client=client)
    pacs.pacs_pull(project=project, url=NOWHERE, query="Modality=CR", client=client)
    assert client.asked == [{}, {"ModalitiesInStudy": "CR"}]
    with pytest.raises(pacs.PacsError, match="Modality has no value"):
        pacs.pacs_pull(project=project, url=NOWHERE, query="Modality=", client=client)
    assert len(client.asked) == 2


@pytest.mark.django_db
def test_the_scheduled_pull_refuses_a_bad_query_visibly(project, settings, caplog):
    from annotator.tasks import pacs_pull_scheduled

    settings.PACS_DICOMWEB_URL = NOWHERE
    settings.PACS_PULL_PROJECT = project.name
    settings.PACS_PULL_MINUTES = 60
    settings.PACS_PULL_QUERY = "Modalty=CR"
    with caplog.at_level(logging.ERROR, logger="annotator.tasks"):
        result = pacs_pull_scheduled()
    assert "'Modalty' is not a DICOM keyword" in result["error"]
    assert "did not answer" not in result["error"]                  # never asked
    assert "scheduled PACS pull" in caplog.text and "Modalty" in caplog.text
    # and at start-up (manage.py check, runserver)
    found = [m for m in run_checks() if m.id == "medlabel.E004"]
    assert found and "Modalty" in found[0].msg
    settings.PACS_PULL_QUERY = "Modality=CR"
    assert not [m for m in run_checks() if m.id == "medlabel.E004"]
    settings.PACS_PULL_QUERY = None                                 # unset: every study
    assert not [m for m in run_checks() if m.id == "medlabel.E004"]
