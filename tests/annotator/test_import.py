"""The import service on real files: fixtures, ../shared/data and pydicom's DICOM files."""

from __future__ import annotations

import shutil

import pytest
from django.core.management import CommandError, call_command

from annotator.models import Annotation, Dataset, ImportJob, LabelClass, Scan
from tests.base import (FIXTURES, SHARED_DATA, media_files, patient_sides, png_bytes,
                        png_header_only, pydicom_test_files)
from tests.conftest import run_import


def referenced_files() -> set[str]:
    names = set()
    for file_name, preview_name in Scan.objects.values_list("file", "preview"):
        names.update([file_name, preview_name])
    return names


def test_class_folder_import_creates_scans_classes_and_labels(project, users, settings):
    job = run_import(project, FIXTURES / "brain_mri" / "eval", split="eval", created_by=users["dora"])
    assert job.status == ImportJob.Status.SUCCEEDED
    assert (job.total, job.imported, job.failed, job.labels_added) == (40, 40, 0, 40)
    assert sorted(job.classes_created) == ["glioma_tumor", "meningioma_tumor", "no_tumor",
                                           "pituitary_tumor"]
    scans = Scan.objects.filter(project=project)
    assert scans.count() == 40 and set(scans.values_list("split", flat=True)) == {"eval"}
    assert Dataset.objects.get(project=project).name == "eval"
    annotation = Annotation.objects.select_related("label_class").first()
    assert annotation.source == Annotation.Source.IMPORT and annotation.reader == users["dora"]
    assert LabelClass.objects.filter(project=project).count() == 4
    # stored file + preview exist for each scan, nothing else under MEDIA_ROOT
    assert media_files(settings.MEDIA_ROOT) == referenced_files()
    scan = scans.first()
    assert scan.file_format == "jpeg" and scan.preview.name.endswith(".png")
    assert scan.source_name.endswith(".jpg")


def test_reimport_is_idempotent(project):
    first = run_import(project, FIXTURES / "chest_xray" / "eval")
    again = run_import(project, FIXTURES / "chest_xray" / "eval")
    assert first.imported == 40
    assert (again.imported, again.duplicates, again.labels_added) == (0, 40, 0)
    assert Scan.objects.count() == 40
    assert Annotation.objects.count() == 40
    assert again.classes_created == []


def test_npz_import_from_shared_data(project):
    path = SHARED_DATA / "pneumoniamnist" / "pneumoniamnist.npz"
    job = run_import(project, f"{path}#val", split="eval")
    assert (job.imported, job.failed) == (524, 0)
    assert Scan.objects.filter(project=project, width=28, height=28).count() == 524
    counts = {c.name: c.annotations.count() for c in LabelClass.objects.filter(project=project)}
    assert counts == {"normal": 135, "pneumonia": 389}
    assert Dataset.objects.get(project=project).name == "pneumoniamnist-val"
    again = run_import(project, f"{path}#val", split="eval")
    assert (again.imported, again.duplicates) == (0, 524)


def test_dicom_folder_any_depth_without_extensions(project, tmp_path, settings):
    source = tmp_path / "PACS_EXPORT"
    decodable = {"CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
                 "JPEG2000.dcm", "examples_palette.dcm", "SC_rgb_rle.dcm",
                 "examples_ybr_color.dcm"}
    files = {p.name: p for p in pydicom_test_files()}
    for index, name in enumerate(sorted(decodable)):
        folder = source / f"study{index % 3}" / f"series{index}"
        folder.mkdir(parents=True)
        target = folder / (name if index % 2 else f"IM{index:04d}")  # some with no extension
        shutil.copy(files[name], target)
    shutil.copy(files["rtplan.dcm"], source / "rtplan.dcm")           # no image
    job = run_import(project, source)
    assert job.status == ImportJob.Status.SUCCEEDED
    assert job.failed == 1 and "no image" in job.errors[0]["reason"]
    # MR_small and its RLE / J2K versions are the same image but different files
    assert job.imported == len(decodable)
    scans = Scan.objects.filter(project=project)
    assert set(scans.values_list("file_format", flat=True)) == {"dicom"}
    assert scans.filter(modality="MR").exists() and scans.filter(modality="CT").exists()
    assert not scans.exclude(source_name="").exists()   # DICOM paths are never stored
    assert all(s.file.name.endswith(".dcm") for s in scans)
    assert media_files(settings.MEDIA_ROOT) == referenced_files()


def test_mixed_good_and_bad_files_give_per_file_errors_and_no_partial_rows(project, tmp_path,
                                                                             settings):
    source = tmp_path / "mixed"
    source.mkdir()
    ct = {p.name: p for p in pydicom_test_files()}["CT_small.dcm"].read_bytes()
    (source / "good_ct.dcm").write_bytes(ct)
    (source / "good.png").write_bytes(png_bytes(seed=3))
    (source / "truncated.dcm").write_bytes(ct[: len(ct) // 2])
    (source / "letter.dcm").write_text("Dear colleague, please find attached ...")
    (source / "empty.png").write_bytes(b"")
    (source / "bomb.png").write_bytes(png_header_only(50_000, 50_000))
    (source / "notes.txt").write_text("sidecar, skipped")
    job = run_import(project, source)
    assert job.status == ImportJob.Status.SUCCEEDED
    assert (job.imported, job.failed, job.skipped) == (2, 4, 1)
    # files are named by number and content hash; a DICOM's name (often the patient's) never
    names = " ".join(e["name"] for e in job.errors)
    assert ".dcm" not in names and "truncated" not in names and "letter" not in names
    assert all(e["name"].startswith("file ") for e in job.errors)
    reasons = [e["reason"] for e in job.errors]
    assert any("damaged or truncated" in r or "readable" in r for r in reasons)
    assert any("not a DICOM file" in r for r in reasons)
    assert any("empty file" in r for r in reasons)
    bomb = next(e for e in job.errors if e["name"].endswith("bomb.png"))   # a raster: named
    assert "decompression bomb" in bomb["reason"] and "sha256" in bomb["name"]
    assert Scan.objects.count() == 2
    assert media_files(settings.MEDIA_ROOT) == referenced_files()   # no orphan files


def test_a_file_refused_after_decoding_is_named_as_before_it(project, tmp_path):
    """A label refused once the file is decoded (its raw bytes dropped) still names a PNG by
    its file name, as every other error does; a DICOM stays a number and a hash."""
    from annotator import services

    chest = services.label_set_create(project=project, name="Chest")
    services.label_class_get_or_create(project=project, name="normal", label_set=chest)
    source = tmp_path / "mismatch"
    source.mkdir()
    (source / "x10.png").write_bytes(png_bytes(seed=10))
    ct = {p.name: p for p in pydicom_test_files()}["CT_small.dcm"].read_bytes()
    (source / "Doe^John.dcm").write_bytes(ct)
    job = run_import(project, source, layout="flat", default_label="normal", label_set="Brain")
    assert job.failed == 2 and Scan.objects.count() == 0
    names = [e["name"] for e in job.errors]
    assert all("belongs to the label set 'Chest'" in e["reason"] for e in job.errors)
    png = next(n for n in names if "x10" in n)
    dicom = next(n for n in names if "x10" not in n)
    assert png.endswith(") x10.png") and "sha256" in png
    assert "Doe" not in dicom and ".dcm" not in dicom and "sha256" in dicom


def test_flat_folder_with_labels_csv_creates_unknown_classes(project, tmp_path):
    source = tmp_path / "flat"
    source.mkdir()
    for i in range(4):
        (source / f"img{i}.png").write_bytes(png_bytes(seed=10 + i))
    labels = tmp_path / "labels.csv"
    labels.write_text("filename,label\nimg0.png,Pneumothorax\nimg1.png,pneumothorax\n"
                      "img2.png,Cardiomegaly\nghost.png,normal\n")
    job = run_import(project, source, labels_csv=str(labels))
    assert job.labels_added == 3
    assert sorted(job.classes_created) == ["Cardiomegaly", "Pneumothorax"]  # case-insensitive
    assert any("1 labels CSV rows matched no file" in w for w in job.warnings)


def test_failure_inside_the_transaction_rolls_back_row_and_files(project, settings, monkeypatch):
    from annotator import services

    def explode(**kwargs):
        raise RuntimeError("database went away")

    monkeypatch.setattr(services, "_add_import_label", explode)
    job = run_import(project, FIXTURES / "chest_xray" / "eval" / "normal", layout="class-folders",
                     default_label="normal")
    assert job.failed == 20 and job.imported == 0
    assert "unexpected error (RuntimeError)" in job.errors[0]["reason"]
    assert Scan.objects.count() == 0 and LabelClass.objects.count() == 0
    assert media_files(settings.MEDIA_ROOT) == set()


def test_missing_source_fails_the_job_clearly(project, tmp_path):
    job = run_import(project, tmp_path / "does-not-exist")
    assert job.status == ImportJob.Status.FAILED
    assert "no such file or folder" in job.last_error


def test_import_command_prints_summary(project, capsys):
    call_command("import_scans", str(FIXTURES / "chest_xray" / "eval"), project=project.name,
                 split="eval", no_progress=True)
    out = capsys.readouterr().out
    assert "imported:    40" in out and "new classes: normal, pneumonia" in out
    call_command("import_scans", str(FIXTURES / "chest_xray" / "eval"), project=project.name,
                 no_progress=True)
    assert "duplicates:  40" in capsys.readouterr().out


def test_import_command_errors(project, tmp_path):
    with pytest.raises(CommandError, match="No project named"):
        call_command("import_scans", str(tmp_path), project="nope")
    with pytest.raises(CommandError, match="no such file or folder"):
        call_command("import_scans", str(tmp_path / "x"), project=project.name, no_progress=True)


def test_a_labels_csv_with_a_patient_column_keeps_each_patient_on_one_side(project, tmp_path):
    """A class import of PNG films with ``filename,label,patient``: the patient column keys
    the films (a keyed hash), so ``--split auto`` never puts one patient on both sides; a
    CSV source and a labels CSV beside a folder alike."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(2)
    folder = tmp_path / "films"
    folder.mkdir()
    rows = ["filename,label,patient_id"]
    for patient in range(10):
        for film in range(3):
            name = f"film_{patient}_{film}.png"
            Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(folder / name)
            rows.append(f"{name},{'pneumonia' if patient % 2 else 'normal'},MRN-{patient:04d}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    job = run_import(project, folder / "labels.csv", split="auto:0.5")
    assert job.status == ImportJob.Status.SUCCEEDED, job.last_error
    scans = list(Scan.objects.filter(project=project))
    assert len(scans) == 30 and all(len(s.patient_key) == 32 for s in scans)
    sides = patient_sides(scans)
    assert len(sides) == 10 and all(len(s) == 1 for s in sides.values())
    assert {split for s in sides.values() for split in s} == {"pool", "eval"}
    assert Annotation.objects.filter(scan__project=project).count() == 30
    assert not Scan.objects.filter(patient_key__icontains="MRN").exists()
