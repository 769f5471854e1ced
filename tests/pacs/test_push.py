"""A real Orthanc PACS, out: with LINKAGE_KEY set, studies pulled from Orthanc keep an
encrypted honest-broker linkage; labeled scans go back as DICOM structured reports into
their original studies (read back from Orthanc and checked), once per result; without the
key nothing is kept and nothing can be sent; the linkage never shows an identifier in clear."""

from __future__ import annotations

import json
import logging
import urllib.request

import pytest
from django.core.management import CommandError, call_command

from annotator import services
from annotator.models import Annotation, DicomLinkage, PacsReport, Scan
from bench.dicom_series import write_series
from tests.pacs.conftest import orthanc_delete_all, orthanc_store

pytestmark = [pytest.mark.django_db]

KEY = "k" * 12 + "a-long-random-linkage-secret-for-tests"


@pytest.fixture
def pulled(orthanc_server, project, tmp_path, settings, users, caplog):
    """Two CT studies in Orthanc, pulled into the project with the linkage on; every log
    line (DEBUG up) is kept in ``caplog``."""
    caplog.set_level(logging.DEBUG)
    settings.LINKAGE_KEY = KEY
    orthanc_delete_all(orthanc_server)
    written = write_series(tmp_path / "ct", patients=2, slices=2, first_patient=70)
    for path in sorted((tmp_path / "ct").glob("*.dcm")):
        orthanc_store(orthanc_server, path.read_bytes())
    call_command("pacs_pull", "--project", project.name, "--dicomweb",
                 orthanc_server["dicomweb"])
    yield orthanc_server, written
    orthanc_delete_all(orthanc_server)


def _sr_in_orthanc(server) -> list[dict]:
    """Every SR instance Orthanc holds, as its simplified tags."""
    found = []
    with urllib.request.urlopen(f"{server['url']}/instances?expand", timeout=10) as response:
        instances = json.loads(response.read())
    for instance in instances:
        with urllib.request.urlopen(f"{server['url']}/instances/{instance['ID']}/simplified-tags",
                                    timeout=10) as response:
            tags = json.loads(response.read())
        if tags.get("Modality") == "SR":
            found.append(tags)
    return found


def test_results_go_back_as_structured_reports_in_their_studies(pulled, project, users,
                                                                 capsys):
    server, written = pulled
    scans = list(Scan.objects.filter(project=project).order_by("pk"))
    assert len(scans) == 4 and DicomLinkage.objects.filter(scan__project=project).count() == 4
    # the linkage holds no identifier in clear
    identifiers = {v["patient"] for v in written.values()} | {v["study"] for v in written.values()}
    for token in DicomLinkage.objects.values_list("token", flat=True):
        # (whole names only: a random base64 token holds any 3 letters now and then)
        assert not any(i in token for i in identifiers) and "Doe^Patient" not in token

    normal, _ = services.label_class_get_or_create(project=project, name="normal")
    nodule, _ = services.label_class_get_or_create(project=project, name="nodule")
    services.annotation_create(scan=scans[0], reader=users["alice"], label_class=normal)
    services.annotation_create(scan=scans[1], reader=users["alice"], label_class=normal)
    services.annotation_create(scan=scans[1], reader=users["bob"], label_class=nodule,
                               source=Annotation.Source.ADJUDICATION)
    call_command("pacs_push", "--project", project.name, "--dicomweb", server["dicomweb"])
    out = capsys.readouterr().out
    assert "2 report(s) sent" in out and "2 scan(s) without a result yet" in out

    reports = _sr_in_orthanc(server)
    assert len(reports) == 2
    studies = {v["study"] for v in written.values()}
    patients = {v["patient"] for v in written.values()}
    for tags in reports:
        assert tags["StudyInstanceUID"] in studies          # filed in the original study
        assert tags["PatientID"] in patients                # of the original patient
    # the content, read back from Orthanc as DICOM
    import io

    import pydicom

    sop = PacsReport.objects.get(scan=scans[1]).sop_instance_uid
    with urllib.request.urlopen(f"{server['url']}/tools/find", data=json.dumps({
            "Level": "Instance", "Query": {"SOPInstanceUID": sop}}).encode(),
            timeout=10) as response:
        orthanc_id = json.loads(response.read())[0]
    with urllib.request.urlopen(f"{server['url']}/instances/{orthanc_id}/file",
                                timeout=10) as response:
        sr = pydicom.dcmread(io.BytesIO(response.read()))
    said = {item.ConceptNameCodeSequence[0].CodeMeaning: (
        str(item.get("TextValue", "")) or (item.ConceptCodeSequence[0].CodeMeaning
                                           if "ConceptCodeSequence" in item else ""))
        for item in sr.ContentSequence}
    assert said["Finding"] == "nodule" and said["Reader role"] == "reviewer (adjudicated)"
    assert "Source" in said                                 # the image it is about
    assert not any(n in str(v) for v in said.values() for n in ("alice", "bob"))

    # nothing changed: nothing sent again; a changed result is sent once more
    call_command("pacs_push", "--project", project.name, "--dicomweb", server["dicomweb"])
    assert "0 report(s) sent, 2 unchanged" in capsys.readouterr().out
    services.annotation_create(scan=scans[0], reader=users["bob"], label_class=nodule,
                               source=Annotation.Source.ADJUDICATION)
    call_command("pacs_push", "--project", project.name, "--dicomweb", server["dicomweb"])
    assert "1 report(s) sent, 1 unchanged" in capsys.readouterr().out
    assert len(_sr_in_orthanc(server)) == 3

    # the next (scheduled) pull: the reports now in those studies are not images to fetch
    call_command("pacs_pull", "--project", project.name, "--dicomweb", server["dicomweb"])
    assert "2 studies found, 0 pulled (0 instances), 2 already here" in capsys.readouterr().out


def test_no_identifier_reaches_the_logs_of_a_pull_or_a_push(pulled, project, users, caplog):
    """The libraries under the pull and the push (dicomweb-client, highdicom) name the
    original study and instance UIDs at INFO; the site's logging keeps them out at any
    LOG_LEVEL, as it keeps pydicom's element values out."""
    server, written = pulled
    normal, _ = services.label_class_get_or_create(project=project, name="normal")
    for scan in Scan.objects.filter(project=project):
        services.annotation_create(scan=scan, reader=users["alice"], label_class=normal)
    call_command("pacs_push", "--project", project.name, "--dicomweb", server["dicomweb"])
    assert len(_sr_in_orthanc(server)) == 4
    for name, ids in written.items():
        for kind in ("patient", "study", "series", "sop"):
            assert ids[kind] not in caplog.text, f"{kind} identifier of {name} in the logs"
    # what the check above would catch: highdicom at INFO names the source instances
    caplog.clear()
    logging.getLogger("highdicom").setLevel(logging.INFO)
    try:
        scan = Scan.objects.filter(project=project).first()
        nodule, _ = services.label_class_get_or_create(project=project, name="nodule")
        services.annotation_create(scan=scan, reader=users["bob"], label_class=nodule,
                                   source=Annotation.Source.ADJUDICATION)
        call_command("pacs_push", "--project", project.name, "--dicomweb", server["dicomweb"])
    finally:
        logging.getLogger("highdicom").setLevel(logging.ERROR)
    assert any(ids["sop"] in caplog.text for ids in written.values())


def test_without_the_key_nothing_is_kept_or_sent(orthanc_server, project, tmp_path, settings):
    settings.LINKAGE_KEY = None
    orthanc_delete_all(orthanc_server)
    write_series(tmp_path / "ct", patients=1, slices=2, first_patient=80)
    for path in sorted((tmp_path / "ct").glob("*.dcm")):
        orthanc_store(orthanc_server, path.read_bytes())
    call_command("pacs_pull", "--project", project.name, "--dicomweb",
                 orthanc_server["dicomweb"])
    assert Scan.objects.filter(project=project).count() == 2
    assert not DicomLinkage.objects.exists()
    with pytest.raises(CommandError, match="LINKAGE_KEY is not set"):
        call_command("pacs_push", "--project", project.name, "--dicomweb",
                     orthanc_server["dicomweb"])
    # a key set later does not invent a linkage for scans imported without one
    settings.LINKAGE_KEY = KEY
    from annotator import pacs

    summary = pacs.pacs_push(project=project, url=orthanc_server["dicomweb"])
    assert summary.sent == 0
    orthanc_delete_all(orthanc_server)


def test_a_linkage_made_with_another_key_cannot_be_read(project, settings, tmp_path):
    from annotator.linkage import LinkageError, linkage_read, linkage_store
    from tests.conftest import run_import

    settings.LINKAGE_KEY = KEY
    write_series(tmp_path / "ct", patients=1, slices=1, first_patient=90)
    run_import(project, tmp_path / "ct", layout="flat")
    scan = Scan.objects.get(project=project)
    assert linkage_read(scan)["PatientID"] == "PAT-0090"
    settings.LINKAGE_KEY = "another-key-" * 4
    with pytest.raises(LinkageError, match="encrypted with another key"):
        linkage_read(scan)
    assert linkage_store(scan, {}) is None


def test_a_short_linkage_key_is_refused_at_start_up(settings):
    from django.core.checks import run_checks

    settings.LINKAGE_KEY = "short"
    assert "medlabel.E003" in {m.id for m in run_checks()}
    settings.LINKAGE_KEY = KEY
    assert "medlabel.E003" not in {m.id for m in run_checks()}


def _sr_file(server, sop: str):
    """The report ``sop`` as Orthanc stored it, read as DICOM (and its bytes)."""
    import io

    import pydicom

    with urllib.request.urlopen(f"{server['url']}/tools/find", data=json.dumps({
            "Level": "Instance", "Query": {"SOPInstanceUID": sop}}).encode(),
            timeout=10) as response:
        orthanc_id = json.loads(response.read())[0]
    with urllib.request.urlopen(f"{server['url']}/instances/{orthanc_id}/file",
                                timeout=10) as response:
        data = response.read()
    return pydicom.dcmread(io.BytesIO(data)), data


def test_names_in_any_script_reach_the_pacs_as_they_are(orthanc_server, project, users,
                                                         settings, tmp_path):
    """The report is written in UTF-8 (ISO_IR 192): a patient's name in Latin and ideographic
    form and a class name in two scripts arrive intact, not as '??'."""
    import pydicom

    from annotator.models import LabelClass

    settings.LINKAGE_KEY = KEY
    orthanc_delete_all(orthanc_server)
    name = "ZQXPHI_Müller^Jürgen=山田^太郎"
    write_series(tmp_path / "ct", patients=1, slices=1, first_patient=60)
    for path in sorted((tmp_path / "ct").glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = name
        ds.save_as(path, enforce_file_format=True)
        orthanc_store(orthanc_server, path.read_bytes())
    call_command("pacs_pull", "--project", project.name, "--dicomweb",
                 orthanc_server["dicomweb"])
    scan = Scan.objects.get(project=project)
    label = "épanchement 胸水"
    effusion = LabelClass.objects.create(project=project, name=label, created_by=users["dora"])
    Annotation.objects.create(scan=scan, label_class=effusion, reader=users["alice"])
    from annotator import pacs

    summary = pacs.pacs_push(project=project, url=orthanc_server["dicomweb"])
    assert summary.sent == 1
    sr, data = _sr_file(orthanc_server, PacsReport.objects.get(scan=scan).sop_instance_uid)
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    assert str(sr.PatientName) == name and "山田".encode() in data and b"??" not in data
    meanings = [item.ConceptCodeSequence[0].CodeMeaning for item in sr.ContentSequence
                if "ConceptCodeSequence" in item]
    assert label in meanings
    orthanc_delete_all(orthanc_server)


def test_a_changed_result_replaces_the_earlier_report_in_one_series(pulled, project, users):
    """A second report for a scan names the first in its Predecessor Documents Sequence,
    and every report of a study, from any push, is in one MedLabel series."""
    from annotator import pacs

    server, written = pulled
    scans = list(Scan.objects.filter(project=project).order_by("pk"))
    normal, _ = services.label_class_get_or_create(project=project, name="normal")
    nodule, _ = services.label_class_get_or_create(project=project, name="nodule")
    services.annotation_create(scan=scans[0], reader=users["alice"], label_class=normal)
    assert pacs.pacs_push(project=project, url=server["dicomweb"]).sent == 1
    first = PacsReport.objects.get(scan=scans[0])
    services.annotation_create(scan=scans[0], reader=users["bob"], label_class=nodule,
                               source=Annotation.Source.ADJUDICATION)
    same_study = next(s for s in scans[1:] if s.study_key == scans[0].study_key)
    services.annotation_create(scan=same_study, reader=users["alice"], label_class=normal)
    assert pacs.pacs_push(project=project, url=server["dicomweb"]).sent == 2
    second = PacsReport.objects.filter(scan=scans[0]).exclude(pk=first.pk).get()
    old, _ = _sr_file(server, first.sop_instance_uid)
    new, _ = _sr_file(server, second.sop_instance_uid)
    assert "PredecessorDocumentsSequence" not in old
    study = new.PredecessorDocumentsSequence[0]
    assert study.StudyInstanceUID == old.StudyInstanceUID == new.StudyInstanceUID
    series = study.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == old.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == old.SOPInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPClassUID == old.SOPClassUID
    # one MedLabel series per study, whichever push sent its reports
    other, _ = _sr_file(server, PacsReport.objects.get(scan=same_study).sop_instance_uid)
    assert old.SeriesInstanceUID == new.SeriesInstanceUID == other.SeriesInstanceUID
    serieses = {tags["SeriesInstanceUID"] for tags in _sr_in_orthanc(server)}
    assert len(serieses) == 1
