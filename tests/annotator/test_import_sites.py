"""Imports as other sites bring them (the eighth probe): file names in another character set,
labels CSVs whose header names a patient, separators other than the comma, rows that
disagree, files named as DICOM that are not, scans no label set applies to."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
from django.core.management import CommandError, call_command

from annotator import services
from annotator.models import Annotation, ImportJob, LabelClass, Project, Scan
from ml_backend.data.datasets import SourceError, read_source, storable_text
from ml_backend.data.findings import read_findings_source
from tests.base import png_bytes  # noqa: I001
from tests.base import PASSWORD
from tests.conftest import run_import


def _pngs(folder, names, *, start: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (folder / name).write_bytes(png_bytes(seed=start + i))


def test_a_file_name_in_latin1_is_imported_and_every_page_of_its_import_answers(
        project, users, tmp_path, client):
    """``M\\xfcller.png`` written by an old system: its name reached the job's report with a
    surrogate escape, and every page showing the job answered 500 (PostgreSQL: the job
    crashed and stayed 'running')."""
    folder = tmp_path / "site"
    folder.mkdir()
    raw = os.fsencode(folder) + b"/M\xfcller.png"
    with open(raw, "wb") as handle:
        handle.write(png_bytes(seed=3))
    (folder / "ok.png").write_bytes(png_bytes(seed=4))
    with open(os.fsencode(folder) + b"/bad\xff.txt", "wb") as handle:   # a sidecar, skipped
        handle.write(b"notes")
    job = run_import(project, folder, created_by=users["dora"])
    assert job.status == ImportJob.Status.SUCCEEDED, job.last_error
    assert (job.imported, job.failed, job.skipped) == (2, 0, 1)
    names = set(Scan.objects.filter(project=project).values_list("source_name", flat=True))
    assert names == {"M\ufffdller.png", "ok.png"}
    client.login(username="dora", password=PASSWORD)
    for url in (f"/imports/{job.pk}/", f"/api/v1/imports/{job.pk}/",
                f"/api/v1/projects/{project.pk}/imports/",
                f"/admin/annotator/importjob/{job.pk}/change/"):
        assert client.get(url).status_code == 200, url


def test_a_source_path_that_is_not_utf8_is_refused_in_words(project, tmp_path):
    folder = os.fsdecode(os.fsencode(tmp_path) + b"/Z\xfcrich")
    os.mkdir(folder)
    with pytest.raises(services.ImportRequestError, match="not UTF-8"):
        services.import_job_create(project=project, source=folder)
    assert not ImportJob.objects.exists()


def test_report_values_are_made_storable():
    assert storable_text("M\udcfcller") == "M\ufffdller"
    assert storable_text("a\x00b") == "a\ufffdb"
    assert storable_text("plain.png") == "plain.png"
    assert services._storable({"name": ["x\udcff"], "n": 3}) == {"name": ["x\ufffd"], "n": 3}


@pytest.mark.parametrize("header, expected", [
    ("File Name,Patient Name,Label", "label"),       # a first column not called 'filename'
    ("filename,patient,diagnosis", "diagnosis"),     # the label column not called 'label'
    ("Patient ID;Image;Class", "class"),             # ';' separated, the file not first
])
def test_the_patient_column_is_never_read_as_a_label(project, tmp_path, header, expected):
    """A header the reader did not recognise was read as a data row and its second column,
    the patients, became the label: classes named after patients."""
    separator = ";" if ";" in header else ","
    names = [f"img_{i:03d}.png" for i in range(6)]
    _pngs(tmp_path / "films", names)
    columns = [c.strip().lower() for c in header.split(separator)]
    rows = [header]
    for i, name in enumerate(names):
        cells = {"file name": name, "filename": name, "image": name,
                 "patient name": f"ZQXPHI Anna{i} Berg", "patient": f"ZQXPHI Anna{i} Berg",
                 "patient id": f"ZQXPHI Anna{i} Berg",
                 expected: "glioma" if i % 2 else "no_tumor"}
        rows.append(separator.join(cells[c] for c in columns))
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    job = run_import(project, tmp_path / "films", labels_csv=str(tmp_path / "labels.csv"),
                     layout="flat", split="auto:0.5")
    assert job.status == ImportJob.Status.SUCCEEDED, job.last_error
    assert sorted(job.classes_created) == ["glioma", "no_tumor"]
    assert job.labels_added == 6
    assert not LabelClass.objects.filter(name__icontains="ZQXPHI").exists()
    # the patients grouped the split (a keyed hash), and are stored nowhere
    assert Scan.objects.filter(project=project).values("patient_key").distinct().count() == 6
    assert "ZQXPHI" not in repr(list(ImportJob.objects.values()))


def test_a_header_with_no_label_column_or_a_headerless_third_column_is_refused(tmp_path):
    _pngs(tmp_path / "films", ["a.png", "b.png"])
    (tmp_path / "no_label.csv").write_text("filename,patient,notes\na.png,P1,x\n")
    with pytest.raises(SourceError, match="names no label column.*patient column is never"):
        read_source(tmp_path / "films", labels_csv=tmp_path / "no_label.csv")
    (tmp_path / "three.csv").write_text("a.png,Anna Berg,glioma\n")
    with pytest.raises(SourceError, match="3 columns and no header"):
        read_source(tmp_path / "films", labels_csv=tmp_path / "three.csv")
    # two columns, any header name: the second is the label
    (tmp_path / "two.csv").write_text("filename,tumour\na.png,glioma\n")
    listing = read_source(tmp_path / "films", labels_csv=tmp_path / "two.csv")
    assert {i.name: i.label for i in listing.items} == {"a.png": "glioma", "b.png": None}
    # a spreadsheet's ';' and trailing empty columns
    (tmp_path / "semi.csv").write_text("a.png;glioma;;\r\nb.png;no_tumor;;\r\n")
    listing = read_source(tmp_path / "films", labels_csv=tmp_path / "semi.csv")
    assert {i.name: i.label for i in listing.items} == {"a.png": "glioma", "b.png": "no_tumor"}


def test_rows_that_disagree_on_a_file_are_not_used_and_the_report_says_so(project, tmp_path):
    """The last row won in silence (a labels CSV), the first in a findings CSV, whose
    second row was counted as a duplicate scan."""
    _pngs(tmp_path / "films", ["img_000.png", "img_001.png", "img_002.png"])
    (tmp_path / "labels.csv").write_text(
        "filename,label,patient\n"
        "img_000.png,glioma,P1\nimg_000.png,no_tumor,P1\n"        # labels disagree
        "img_001.png,glioma,P2\nimg_001.png,Glioma,P2\n"          # the same, repeated
        "img_002.png,glioma,P3\nimg_002.png,glioma,P4\n")         # patients disagree
    job = run_import(project, tmp_path / "films", labels_csv=str(tmp_path / "labels.csv"))
    assert job.status == ImportJob.Status.SUCCEEDED, job.last_error
    labels = dict(Annotation.objects.values_list("scan__source_name", "label_class__name"))
    assert labels == {"img_001.png": "glioma", "img_002.png": "glioma"}
    warning = next(w for w in job.warnings if "more than once" in w)
    assert "2 file(s)" in warning and "img_000.png" in warning and "img_002.png" in warning
    assert "without a label" in warning


def test_findings_rows_that_disagree_leave_the_scan_unknown(project, tmp_path):
    images = tmp_path / "images"
    _pngs(images, ["00000042_007.png", "00000043_000.png"])
    (tmp_path / "labels.csv").write_text(
        "Image Index,Finding Labels,Patient ID\n"
        "00000042_007.png,Effusion,42\n00000042_007.png,No Finding,42\n"
        "00000043_000.png,Nodule|Mass,43\n00000043_000.png,Mass|Nodule,43\n")
    listing = read_findings_source(tmp_path / "labels.csv")
    assert [i.name for i in listing.items] == ["00000042_007.png", "00000043_000.png"]
    assert np.isnan(listing.targets[0]).all() and listing.conflicting_rows == ["00000042_007.png"]
    assert any("1 repeated row" in note for note in listing.notes)
    job = run_import(project, tmp_path / "labels.csv")
    assert job.status == ImportJob.Status.SUCCEEDED, job.last_error
    assert (job.imported, job.duplicates) == (2, 0)
    assert any("more than once in the findings CSV" in w and "findings unknown" in w
               for w in job.warnings)


def test_a_png_named_as_a_dicom_file_is_reported_for_its_name_not_as_identifiers(
        project, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "film.dcm").write_bytes(png_bytes(seed=1))
    (folder / "IM0002").write_bytes(png_bytes(seed=2))
    job = run_import(project, folder)
    assert job.imported == 2
    assert any("named as DICOM files are" in w for w in job.warnings)
    assert not any("look like they carry patient identifiers" in w for w in job.warnings)


def test_a_csv_name_with_a_newline_is_quoted_on_one_line(project, tmp_path):
    _pngs(tmp_path / "films", ["a.png"])
    (tmp_path / "labels.csv").write_text('filename,label\na.png,glioma\n"mis\nsing.png",x\n')
    job = run_import(project, tmp_path / "films", labels_csv=str(tmp_path / "labels.csv"))
    warning = next(w for w in job.warnings if "matched no file" in w)
    assert "\n" not in warning and "mis sing.png" in warning


def test_scans_no_label_set_applies_to_are_named_in_the_report(project, tmp_path):
    services.label_set_create(project=project, name="Chest X-ray", body_parts="CHEST")
    services.label_set_create(project=project, name="Brain MRI", body_parts="BRAIN")
    _pngs(tmp_path / "slides", ["s1.png", "s2.png"])
    job = run_import(project, tmp_path / "slides")
    assert Scan.objects.filter(project=project, label_set__isnull=True).count() == 2
    warning = next(w for w in job.warnings if "match no label set" in w)
    assert warning.startswith("2 scan(s)") and "body part (none)" in warning
    services.dataset_acquisition_set(project=project, name="chest", body_part="CHEST")
    _pngs(tmp_path / "chest", ["c1.png"], start=10)
    job = run_import(project, tmp_path / "chest", dataset_name="chest")
    assert not any("match no label set" in w for w in job.warnings)


def test_create_project_with_a_source_it_cannot_read_leaves_no_project(db, tmp_path):
    _pngs(tmp_path / "films", ["a.png"])
    (tmp_path / "labels.csv").write_text("filename,patient,notes\na.png,P1,x\n")
    with pytest.raises(CommandError, match="no label column.*no project was created"):
        call_command("import_scans", str(tmp_path / "films"), "--project", "New site",
                     "--create-project", "--labels", str(tmp_path / "labels.csv"),
                     "--no-progress")
    assert not Project.objects.filter(name="New site").exists()


def test_the_classify_page_reads_a_file_with_the_set_its_anatomy_picks(project):
    from annotator.forms import ClassifyForm
    from annotator.views_label import _classify_label_set

    chest = services.label_set_create(project=project, name="Chest X-ray", body_parts="CHEST")
    brain = services.label_set_create(project=project, name="Brain MRI", modalities="MR")
    form = ClassifyForm({}, project=project)
    form.is_valid()
    assert form.cleaned_data.get("label_set") is None        # "by the file" is the default
    mr = SimpleNamespace(meta={"modality": "MR", "body_part": "BRAIN"})
    assert _classify_label_set(project, None, mr) == (brain, "")
    assert _classify_label_set(project, chest, mr) == (chest, "")   # a choice stands
    slide = SimpleNamespace(meta={"modality": "SM"})
    chosen, note = _classify_label_set(project, None, slide)
    assert chosen == chest and "No label set of this project applies" in note


@pytest.mark.parametrize("size", [32, 512])     # Django: "no file" / "header size exceeded"
def test_a_multipart_file_name_in_latin1_gets_the_real_reason(project, users, client, size):
    client.login(username="dora", password=PASSWORD)
    boundary = b"----site8"
    image = png_bytes(np.random.default_rng(0).integers(0, 255, (size, size), dtype=np.uint8))

    def body(name: bytes) -> bytes:
        return (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="dataset"'
                + b"\r\n\r\nx\r\n--" + boundary
                + b'\r\nContent-Disposition: form-data; name="files"; filename="' + name
                + b'"\r\nContent-Type: image/png\r\n\r\n' + image + b"\r\n--" + boundary
                + b"--\r\n")

    kind = "multipart/form-data; boundary=" + boundary.decode()
    response = client.post(f"/api/v1/projects/{project.pk}/imports/",
                           data=body(b"M\xfcller.png"), content_type=kind)
    assert response.status_code == 400
    assert "not UTF-8" in response.json()["detail"]
    response = client.post(f"/projects/{project.pk}/upload/", data=body(b"M\xfcller.png"),
                           content_type=kind)
    assert response.status_code == 400 and b"not UTF-8" in response.content
    response = client.post(f"/api/v1/projects/{project.pk}/imports/",
                           data=body("Müller.png".encode()), content_type=kind)
    assert response.status_code in (201, 202), response.content
