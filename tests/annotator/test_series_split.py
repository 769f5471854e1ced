"""Studies and series kept as pseudonymous keys, and an automatic eval split that keeps whole
patients on one side (issue 19), on DICOM files made from pydicom's real CT slice."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse

from annotator.models import ImportJob, Scan
from bench.dicom_series import write_series
from tests.conftest import run_import


def test_study_and_series_keys_are_pseudonymous_and_slices_keep_their_order(project, tmp_path):
    written = write_series(tmp_path / "ct", patients=2, slices=4)
    job = run_import(project, tmp_path / "ct", layout="flat")
    assert job.status == ImportJob.Status.SUCCEEDED and job.imported == 8
    scans = list(Scan.objects.filter(project=project))
    uids = {v["study"] for v in written.values()} | {v["series"] for v in written.values()}
    for scan in scans:
        assert len(scan.study_key) == 32 and len(scan.series_key) == 32
        assert scan.study_key not in uids and scan.series_key not in uids
        assert scan.study_key != scan.series_key and scan.patient_key
        assert scan.series_number == 3 and scan.slice_spacing == pytest.approx(5.0)
    # one key per patient's study and series; the slices of a series in position order
    assert len({s.series_key for s in scans}) == 2 == len({s.study_key for s in scans})
    for key in {s.series_key for s in scans}:
        series = sorted((s for s in scans if s.series_key == key), key=lambda s: s.slice_position)
        assert [s.instance_number for s in series] == [1, 2, 3, 4]
        assert np.diff([s.slice_position for s in series]) == pytest.approx([5.0] * 3)
    # no UID is stored anywhere in the row
    for scan in Scan.objects.filter(project=project).values():
        assert not any(str(value) in uids for value in scan.values())


def test_auto_split_keeps_whole_patients_on_one_side_across_imports(project, tmp_path):
    write_series(tmp_path / "first", patients=20, slices=2)
    job = run_import(project, tmp_path / "first", layout="flat", split="auto:0.3")
    assert job.eval_fraction == pytest.approx(0.3) and job.imported == 40
    sides = {}
    for key, split in Scan.objects.values_list("patient_key", "split"):
        sides.setdefault(key, set()).add(split)
    assert all(len(s) == 1 for s in sides.values()), "a patient split across eval and pool"
    in_eval = sum(s == {"eval"} for s in sides.values())
    assert 1 <= in_eval <= 12                      # about 30% of 20 patients
    report = " ".join(job.warnings)
    assert "Automatic split (about 30% to eval, whole patients)" in report
    assert f"({in_eval} patient(s))" in report
    # new slices of the same patients, imported later, follow their patients
    write_series(tmp_path / "second", patients=20, slices=1, seed=1)
    run_import(project, tmp_path / "second", layout="flat", split="auto:0.3")
    after = {}
    for key, split in Scan.objects.values_list("patient_key", "split"):
        after.setdefault(key, set()).add(split)
    assert after == sides
    # files without a patient or study (PNG) are split one by one, deterministically
    from annotator.selectors import patients_in_both_splits

    assert patients_in_both_splits(project)["patients"] == 0


def test_auto_split_is_checked_before_anything_is_made(project, tmp_path):
    with pytest.raises(CommandError, match="between 0 and 1"):
        call_command("import_scans", str(tmp_path), "--project", "new one", "--create-project",
                     "--split", "auto:1.5")
    with pytest.raises(CommandError, match="auto:0.2"):
        call_command("import_scans", str(tmp_path), "--project", project.name,
                     "--split", "sideways")
    from annotator.models import Project

    assert not Project.objects.filter(name="new one").exists()


def test_reports_warn_when_eval_and_pool_share_a_patient(project, tmp_path, client, users):
    write_series(tmp_path / "ct", patients=2, slices=2)
    run_import(project, tmp_path / "ct", layout="flat")          # every slice to the pool
    one = Scan.objects.order_by("pk").first()
    Scan.objects.filter(pk=one.pk).update(split="eval")           # a patient on both sides
    from annotator.selectors import patient_overlap_words

    words = patient_overlap_words(project)
    assert "1 patient has scans in both eval and the pool (1 eval scan(s))" in words
    client.force_login(users["alice"])
    page = client.get(reverse("annotator:reports", args=[project.pk])).content.decode()
    assert "Eval is not patient-disjoint" in page and "--split auto:0.2" in page


def test_a_series_becomes_one_scan_with_its_slices_in_order(project, tmp_path, client, users):
    from annotator.storage import media_path
    from ml_backend.data.decode import decode_scan

    project.dicom_grouping = "series"
    project.save(update_fields=["dicom_grouping"])
    write_series(tmp_path / "ct", patients=2, slices=5)
    # shuffle the file order on disk: the stack follows the positions, not the names
    for path in list((tmp_path / "ct").glob("*.dcm")):
        path.rename(path.with_name(f"x{hash(path.name) % 997:03d}-{path.name}"))
    job = run_import(project, tmp_path / "ct", layout="flat")
    assert job.status == "succeeded" and job.total == 10 and job.imported == 2, job.errors
    assert "10 slices became 2 scan(s)" in " ".join(job.warnings)
    scans = list(Scan.objects.filter(project=project))
    for scan in scans:
        assert scan.num_frames == 5 and scan.slices == sorted(scan.slices)
        assert np.diff(scan.slices) == pytest.approx([5.0] * 4)
        assert scan.slice_position == scan.slices[2] and scan.slice_spacing == pytest.approx(5)
        assert scan.study_key and scan.series_key and scan.patient_key
    # the stored stack is de-identified and holds every slice; each frame decodes on its own
    stored = media_path(scans[0].file.name).read_bytes()
    assert b"Doe^Patient" not in stored and b"PAT-0" not in stored
    frames = [decode_scan(stored, salt="x", frame=k).pixels for k in range(5)]
    assert all(f.shape == frames[0].shape for f in frames)
    assert len({f.tobytes() for f in frames}) == 5
    with pytest.raises(Exception, match="frame 5 asked of an image with 5 frame"):
        decode_scan(stored, salt="x", frame=5)
    # a second import of the same files finds the same series: nothing new
    again = run_import(project, tmp_path / "ct", layout="flat")
    assert again.imported == 0 and Scan.objects.filter(project=project).count() == 2
    # the keys are those of a per-image import of the same files
    keys = {(s.patient_key, s.study_key, s.series_key) for s in scans}
    other = project.__class__.objects.create(name="per image")
    run_import(other, tmp_path / "ct", layout="flat")
    assert {(s.patient_key, s.study_key, s.series_key)
            for s in Scan.objects.filter(project=other)} == keys


def test_slices_that_cannot_share_a_stack_are_imported_one_by_one(project, tmp_path):
    project.dicom_grouping = "series"
    project.save(update_fields=["dicom_grouping"])
    write_series(tmp_path / "ct", patients=1, slices=3)
    odd = sorted((tmp_path / "ct").glob("*.dcm"))[1]
    ds = pydicom.dcmread(odd)
    ds.RescaleIntercept = -1000 if float(ds.get("RescaleIntercept", 0)) != -1000 else 0
    ds.save_as(odd)
    job = run_import(project, tmp_path / "ct", layout="flat")
    report = " ".join(job.warnings)
    assert job.imported == 3, job.errors
    assert "imported slice by slice: its slices differ in RescaleIntercept" in report


def test_slices_that_share_one_position_are_not_stacked_as_a_volume(project, tmp_path):
    """Several acquisitions (echoes, time points) in one series share positions: stacked,
    they would read as a volume with a made-up spacing. They are imported one by one, and
    the report says why."""
    project.dicom_grouping = "series"
    project.save(update_fields=["dicom_grouping"])
    write_series(tmp_path / "ct", patients=1, slices=4)
    for path in sorted((tmp_path / "ct").glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = [0.0, 0.0, 12.5]
        ds.save_as(path)
    job = run_import(project, tmp_path / "ct", layout="flat")
    report = " ".join(job.warnings)
    assert job.imported == 4, job.errors
    assert "imported slice by slice: all 4 of its slices share one position" in report
    assert all(s.num_frames == 1 for s in Scan.objects.filter(project=project))


def test_a_series_above_the_one_file_limit_stacks_under_the_series_limit(
        project, tmp_path, client, users, settings):
    """A CT series of hundreds of full-size slices is above the pixel limit of one file
    (IMPORT_MAX_PIXELS, a decompression-bomb guard) but is still read as one scan: series are
    bounded by IMPORT_MAX_SERIES_PIXELS, each slice by the file limit. The viewer pages
    through its frames; a series above the series limit is imported slice by slice, and the
    report names the setting."""
    from annotator.storage import media_path

    project.dicom_grouping = "series"
    project.save(update_fields=["dicom_grouping"])
    write_series(tmp_path / "ct", patients=1, slices=6)          # 6 slices of 128 x 128
    settings.IMPORT_MAX_PIXELS = 50_000                           # one slice: 16,384
    settings.IMPORT_MAX_SERIES_PIXELS = 100_000                   # the series: 98,304
    job = run_import(project, tmp_path / "ct", layout="flat")
    assert job.status == "succeeded" and job.imported == 1, (job.errors, job.warnings)
    scan = Scan.objects.get(project=project)
    assert scan.num_frames == 6
    stored = media_path(scan.file.name).read_bytes()
    assert pydicom.dcmread(io.BytesIO(stored)).NumberOfFrames == 6
    client.force_login(users["alice"])
    window = reverse("annotator:scan_window", args=[scan.pk])
    frames = [client.get(window, {"frame": k}) for k in range(6)]
    assert [r.status_code for r in frames] == [200] * 6
    assert len({r.content for r in frames}) == 6
    assert client.get(window, {"frame": 6}).status_code == 400

    write_series(tmp_path / "ct2", patients=1, slices=6, first_patient=7)
    settings.IMPORT_MAX_SERIES_PIXELS = 90_000
    job = run_import(project, tmp_path / "ct2", layout="flat")
    assert job.imported == 6, job.errors
    assert ("a series of 6 files was imported slice by slice: 6 slices of 128x128 are above "
            "the limit of 90,000 pixels for a series (IMPORT_MAX_SERIES_PIXELS)"
            in " ".join(job.warnings))
