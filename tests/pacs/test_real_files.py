"""The radiology team's walk (issue 19's "done means") on real files from pydicom-data, not
ones we wrote: a real-size chest radiograph (CR, 1955 x 1841, MONOCHROME1, 15-bit), an
enhanced multi-frame MR (10 slices) and an enhanced multi-frame CT, in a real Orthanc. The
site pulls the chest films of a date range and then the MR series, in a project that groups
per series; the MR is one scan whose slices the viewer scrolls; results go back as structured
reports next to the original studies; no identifier of these files reaches our side."""

from __future__ import annotations

import io
import json
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest
from django.core.management import call_command
from django.test import Client
from PIL import Image

from annotator import services
from annotator.models import PacsReport, Scan
from tests.base import media_files
from tests.pacs.conftest import orthanc_delete_all, orthanc_store
from tests.pacs.test_push import KEY, _sr_in_orthanc

pytestmark = [pytest.mark.django_db]

FILES = ("RG1_UNCR.dcm", "emri_small.dcm", "eCT_Supplemental.dcm")


def _data(name: str) -> Path:
    from data_store import DataStore       # pydicom-data, pinned in requirements.txt

    return DataStore().data_path / name


@pytest.fixture
def real_pacs(orthanc_server):
    orthanc_delete_all(orthanc_server)
    for name in FILES:
        orthanc_store(orthanc_server, _data(name).read_bytes())
    yield orthanc_server
    orthanc_delete_all(orthanc_server)


def test_chest_films_and_an_mr_series_pulled_read_and_reported(real_pacs, project, users,
                                                               settings, capsys):
    settings.LINKAGE_KEY = KEY
    project.dicom_grouping = "series"
    project.save(update_fields=["dicom_grouping"])
    url = real_pacs["dicomweb"]

    # the chest films of a date range (the CR study is from 2004-08-26)
    call_command("pacs_pull", "--project", project.name, "--dicomweb", url,
                 "--query", "Modality=CR&StudyDate=20040820-20040831")
    assert "1 study found, 1 pulled (1 instances)" in capsys.readouterr().out
    [film] = Scan.objects.filter(project=project)
    assert (film.modality, film.body_part, film.width, film.height) == ("CR", "CHEST", 1841, 1955)
    original = pydicom.dcmread(_data("RG1_UNCR.dcm"))
    assert original.PhotometricInterpretation == "MONOCHROME1"
    with Image.open(film.preview.path) as preview:
        shown = np.asarray(preview.convert("L"), dtype=np.float32)
    # MONOCHROME1 inverted for display: where the raw values are low (dense), the film is light
    raw = original.pixel_array.astype(np.float32)
    small = np.asarray(Image.fromarray(raw).resize(shown.shape[::-1]), dtype=np.float32)
    assert np.corrcoef(small.ravel(), shown.ravel())[0, 1] < -0.5

    # then the MR series: one scan of 10 slices in a per-series project
    call_command("pacs_pull", "--project", project.name, "--dicomweb", url, "--query", "Modality=MR")
    assert "1 pulled (1 instances)" in capsys.readouterr().out
    mr = Scan.objects.get(project=project, modality="MR")
    assert mr.num_frames == 10
    client = Client()
    client.force_login(users["alice"])
    frames = []
    for frame in (0, 4, 9):
        response = client.get(f"/scans/{mr.pk}/window.png", {"frame": frame})
        assert response.status_code == 200 and response["Content-Type"] == "image/png"
        frames.append(response.content)
    assert len(set(frames)) == 3                          # three different slices
    call_command("pacs_pull", "--project", project.name, "--dicomweb", url)   # the rest: CT
    capsys.readouterr()
    ct = Scan.objects.get(project=project, modality="CT")
    assert ct.num_frames == 2

    # read, then the results go back next to the original studies
    normal, _ = services.label_class_get_or_create(project=project, name="no finding")
    lesion, _ = services.label_class_get_or_create(project=project, name="lesion")
    services.annotation_create(scan=film, reader=users["alice"], label_class=normal)
    services.annotation_create(scan=mr, reader=users["alice"], label_class=lesion)
    call_command("pacs_push", "--project", project.name, "--dicomweb", url)
    assert "2 report(s) sent" in capsys.readouterr().out
    reports = {tags["StudyInstanceUID"]: tags for tags in _sr_in_orthanc(real_pacs)}
    mr_original = pydicom.dcmread(_data("emri_small.dcm"), stop_before_pixels=True)
    assert set(reports) == {original.StudyInstanceUID, mr_original.StudyInstanceUID}
    assert reports[original.StudyInstanceUID]["PatientID"] == original.PatientID
    assert PacsReport.objects.filter(scan__project=project).count() == 2

    # nothing that identifies these patients or studies is stored on our side
    identifiers = set()
    for name in FILES:
        ds = pydicom.dcmread(_data(name), stop_before_pixels=True)
        identifiers |= {str(ds.get(k)) for k in ("PatientName", "PatientID", "StudyInstanceUID",
                                                 "SeriesInstanceUID", "SOPInstanceUID",
                                                 "AccessionNumber", "InstitutionName")
                        if ds.get(k) not in (None, "")}
    # a short value ("0010", the CT's patient id) turns up inside any new UID or pixel run by
    # chance: those are checked as attributes of the stored files below instead
    short = {i for i in identifiers if len(i) < 6}
    identifiers -= short
    for row in Scan.objects.filter(project=project).values():
        for value in row.values():
            assert not any(i in str(value) for i in identifiers), (value, identifiers)
    media = Path(settings.MEDIA_ROOT)
    for name in media_files(media):
        data = (media / name).read_bytes()
        assert not [i for i in identifiers if i.encode() in data], name
    for scan in Scan.objects.filter(project=project):
        stored = pydicom.dcmread(scan.file.path, stop_before_pixels=True)
        assert not {str(stored.get(k, "")) for k in ("PatientID", "PatientName",
                                                     "AccessionNumber")} & short
    dump = io.StringIO()
    call_command("dumpdata", "annotator", stdout=dump)
    assert not any(i in dump.getvalue() for i in identifiers)
    assert json.loads(urllib.request.urlopen(f"{real_pacs['url']}/statistics",
                                             timeout=10).read())["CountInstances"] == 5
