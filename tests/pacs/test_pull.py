"""A real Orthanc PACS, in: `pacs_pull` finds studies with QIDO-RS, retrieves them with
WADO-RS and imports them de-identified; a second pull fetches nothing; a query filters; no
identifier reaches our database, files or the incoming folder."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from django.core.management import CommandError, call_command

from annotator.models import ImportJob, Scan
from ml_backend.data.deid import study_pseudonym
from bench.dicom_series import write_series
from tests.base import media_files, pydicom_test_files
from tests.pacs.conftest import orthanc_delete_all, orthanc_store

pytestmark = [pytest.mark.django_db]


@pytest.fixture
def pacs(orthanc_server, tmp_path):
    """Orthanc holding two CT studies (two patients, three slices each) and one MR study."""
    orthanc_delete_all(orthanc_server)
    written = write_series(tmp_path / "ct", patients=2, slices=3, first_patient=40)
    for path in sorted((tmp_path / "ct").glob("*.dcm")):
        orthanc_store(orthanc_server, path.read_bytes())
    mr = {p.name: p for p in pydicom_test_files()}["MR_small.dcm"]
    orthanc_store(orthanc_server, mr.read_bytes())
    orthanc_server["written"] = written
    orthanc_server["mr"] = pydicom.dcmread(mr, stop_before_pixels=True)
    yield orthanc_server
    orthanc_delete_all(orthanc_server)


def test_pull_by_query_is_idempotent_and_deidentified(pacs, project, settings, capsys):
    call_command("pacs_pull", "--project", project.name, "--dicomweb", pacs["dicomweb"],
                 "--query", "Modality=CT", "--split", "auto:0.5")
    out = capsys.readouterr().out
    assert "2 studies found, 2 pulled (6 instances), 0 already here; 6 scans imported" in out
    scans = list(Scan.objects.filter(project=project))
    assert len(scans) == 6 and {s.modality for s in scans} == {"CT"}
    written = pacs["written"]
    studies = {v["study"] for v in written.values()}
    assert {s.study_key for s in scans} == {study_pseudonym(u, salt=settings.DEID_SALT)
                                            for u in studies}
    # whole patients on one side of the automatic split
    for key in {s.patient_key for s in scans}:
        assert len({s.split for s in scans if s.patient_key == key}) == 1
    jobs = ImportJob.objects.filter(project=project)
    assert jobs.count() == 2 and all(j.status == "succeeded" for j in jobs)

    # a second pull finds the same studies and fetches nothing
    call_command("pacs_pull", "--project", project.name, "--dicomweb", pacs["dicomweb"],
                 "--query", "Modality=CT")
    out = capsys.readouterr().out
    assert "2 studies found, 0 pulled (0 instances), 2 already here" in out
    assert Scan.objects.filter(project=project).count() == 6

    # everything else: the MR study too
    call_command("pacs_pull", "--project", project.name, "--dicomweb", pacs["dicomweb"])
    assert "3 studies found, 1 pulled (1 instances), 2 already here" in capsys.readouterr().out
    assert Scan.objects.filter(project=project, modality="MR").count() == 1

    # no identifier on our side: not in the rows, not in the stored files; nothing left in
    # the incoming folder
    identifiers = {v["patient"] for v in written.values()} | studies | {
        v["series"] for v in written.values()} | {"Doe^Patient40", "Doe^Patient41",
                                                   str(pacs["mr"].PatientID),
                                                   str(pacs["mr"].StudyInstanceUID)}
    for row in Scan.objects.filter(project=project).values():
        assert not any(i in str(value) for value in row.values() for i in identifiers)
    media = Path(settings.MEDIA_ROOT)
    for name in media_files(media):
        data = (media / name).read_bytes()
        assert not any(i.encode() in data for i in identifiers), name
    assert not list(Path(settings.INCOMING_ROOT).glob("pacs-*"))


def test_pull_says_why_when_the_pacs_cannot_be_reached_or_asked(project):
    with pytest.raises(CommandError, match="did not answer the study query"):
        call_command("pacs_pull", "--project", project.name, "--dicomweb",
                     "http://127.0.0.1:9/dicom-web")
    with pytest.raises(CommandError, match="not a DICOMweb URL"):
        call_command("pacs_pull", "--project", project.name, "--dicomweb", "ftp://pacs")
    with pytest.raises(CommandError, match="not a DICOM keyword"):
        call_command("pacs_pull", "--project", project.name, "--dicomweb",
                     "http://127.0.0.1:9/dicom-web", "--query", "Modality;DROP=CT")
    with pytest.raises(CommandError, match="no DICOMweb server"):
        call_command("pacs_pull", "--project", project.name)


def test_the_scheduled_pull_takes_its_project_and_query_from_settings(pacs, project, settings):
    from annotator.tasks import pacs_pull_scheduled

    settings.PACS_DICOMWEB_URL = pacs["dicomweb"]
    settings.PACS_PULL_PROJECT = project.name
    settings.PACS_PULL_QUERY = "Modality=MR"
    result = pacs_pull_scheduled()
    assert result["pulled"] == 1 and result["imported"] == 1, result
    assert pacs_pull_scheduled()["pulled"] == 0            # the next beat: nothing new
    settings.PACS_PULL_PROJECT = "no such project"
    assert "error" in pacs_pull_scheduled()


def test_studies_are_asked_for_a_page_at_a_time(pacs, project, monkeypatch, capsys):
    """A PACS answers at most so many studies per QIDO-RS request: the pull asks again from
    where the answer stopped (``offset``) until nothing new comes, so no study is left out."""
    from annotator import pacs as pacs_module

    monkeypatch.setattr(pacs_module, "QIDO_PAGE", 2)
    calls = []
    real = pacs_module.client_for

    def counting_client(url):
        client = real(url)
        search = client.search_for_studies

        def counted(**kwargs):
            calls.append((kwargs["limit"], kwargs["offset"]))
            return search(**kwargs)
        client.search_for_studies = counted
        return client

    monkeypatch.setattr(pacs_module, "client_for", counting_client)
    call_command("pacs_pull", "--project", project.name, "--dicomweb", pacs["dicomweb"])
    assert "3 studies found, 3 pulled" in capsys.readouterr().out
    assert calls == [(2, 0), (2, 2), (2, 3)]
    calls.clear()
    call_command("pacs_pull", "--project", project.name, "--dicomweb", pacs["dicomweb"],
                 "--limit", "2")
    assert "2 studies found, 0 pulled (0 instances), 2 already here" in capsys.readouterr().out
    assert calls == [(2, 0)]


def test_a_series_read_as_one_scan_is_already_here_on_the_next_pull(pacs, project, capsys):
    """Per-series projects hold a study's slices as one scan: the next pull counts the
    slices, not the scans, and fetches nothing again."""
    project.dicom_grouping = "series"
    project.save(update_fields=["dicom_grouping"])
    call_command("pacs_pull", "--project", project.name, "--dicomweb", pacs["dicomweb"],
                 "--query", "Modality=CT")
    assert "2 studies found, 2 pulled (6 instances)" in capsys.readouterr().out
    assert Scan.objects.filter(project=project).count() == 2
    call_command("pacs_pull", "--project", project.name, "--dicomweb", pacs["dicomweb"],
                 "--query", "Modality=CT")
    assert "2 studies found, 0 pulled (0 instances), 2 already here" in capsys.readouterr().out


def test_a_study_is_written_out_as_it_streams_and_a_broken_stream_leaves_nothing(
        pacs, project, monkeypatch, capsys):
    """Each instance is on disk before the next is read (a CT study of a thousand slices is
    never held in memory whole); a stream that breaks part way through reports the study,
    imports none of it and leaves no file behind, and the other studies still come."""
    from django.conf import settings
    from requests.exceptions import ChunkedEncodingError

    from annotator import pacs as pacs_module

    real = pacs_module.client_for
    seen = []       # (index in its study, instance files on disk as it arrives)

    def streaming_client(url):
        client = real(url)
        stream = client.iter_study

        def watched(uid):
            for index, instance in enumerate(stream(uid)):
                seen.append((index, len(list(Path(settings.INCOMING_ROOT).glob("pacs-*/*.dcm")))))
                if instance.Modality == "CT" and index == 1 and instance.PatientID.endswith("40"):
                    raise ChunkedEncodingError("connection broken: the PACS went away")
                yield instance
        client.iter_study = watched
        return client

    monkeypatch.setattr(pacs_module, "client_for", streaming_client)
    with pytest.raises(CommandError, match="1 study could not be pulled"):   # exit status 1
        call_command("pacs_pull", "--project", project.name, "--dicomweb", pacs["dicomweb"])
    out = capsys.readouterr().out
    assert "3 studies found, 2 pulled (4 instances)" in out
    assert "could not be retrieved (ChunkedEncodingError)" in out
    # the broken patient's study: nothing imported; the other CT study and the MR came
    assert Scan.objects.filter(project=project, modality="CT").count() == 3
    assert Scan.objects.filter(project=project, modality="MR").count() == 1
    assert not list(Path(settings.INCOMING_ROOT).glob("pacs-*"))
    # within a study each instance was written before the next one was read
    assert len(seen) == 6 and all(on_disk == index for index, on_disk in seen)
    # the pull again takes the study whose stream broke, and only it
    monkeypatch.setattr(pacs_module, "client_for", real)
    call_command("pacs_pull", "--project", project.name, "--dicomweb", pacs["dicomweb"])
    assert "3 studies found, 1 pulled (3 instances), 2 already here" in capsys.readouterr().out
