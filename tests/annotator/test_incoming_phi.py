"""PHI at rest in INCOMING_ROOT and in typed dataset names (a probe's findings).

The classify page keeps only the de-identified copy of an upload for "add it to the pool"
(never the file as sent), and what waits in INCOMING_ROOT past its time is removed by the
beat task even when nobody classifies or uploads again. A dataset name someone types (the
upload page, the API, ``import_scans --dataset``, the classify page) is refused when it
looks like it carries identifiers, by the rule the import applies to folder and file names.
Real files, the real test database, named users (alice the clinician)."""

from __future__ import annotations

import hashlib
import io
import os
import time

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import CommandError, call_command
from django.urls import reverse
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from annotator import services
from annotator.models import Dataset as ScanDataset
from annotator.models import ImportJob, Scan
from annotator.tasks import incoming_sweep
from annotator.uploads import classify_staging_dir, stage_uploads
from ml_backend.data.decode import decode_scan
from tests.annotator.test_classify_staging import (  # noqa: F401 (a fixture)
    client_for,
    stand_in_classifier,
    staged,
)
from tests.base import png_bytes

PHI_FILE_NAME = "Doe^John_MRN987654.dcm"
# what the header carries (none of it may rest in INCOMING_ROOT, in a file or a file name)
MARKERS = (b"Doe^John", b"MRN987654", b"19650312", b"Elsewhere General",
           b"Brain MRI with contrast", b"Dr^Who")


def phi_dicom() -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"              # MR Image Storage
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.3"
    ds.Modality = "MR"
    ds.PatientName = "Doe^John"
    ds.PatientID = "MRN987654"
    ds.PatientBirthDate = "19650312"
    ds.InstitutionName = "Elsewhere General"
    ds.StudyDescription = "Brain MRI with contrast"
    ds.ReferringPhysicianName = "Dr^Who"
    ds.set_pixel_data((np.arange(256, dtype=np.uint16).reshape(16, 16) * 90),
                      "MONOCHROME2", 16)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    assert all(marker in data for marker in MARKERS)       # planted, or the test proves nothing
    return data


def incoming_hits(root) -> list[str]:
    """Every file under ``root`` whose name or bytes hold a marker."""
    hits = []
    for path in root.rglob("*"):
        text = path.relative_to(root).as_posix().encode()
        data = path.read_bytes() if path.is_file() else b""
        hits += [f"{path.name}: {m.decode()}" for m in MARKERS if m in text or m in data]
    return hits


def files_under(root) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def age(path, hours: float) -> None:
    past = time.time() - hours * 3600
    os.utime(path, (past, past))


# --- 1. the classify page keeps a de-identified copy only, and not for ever --------------


def test_a_classified_dicom_rests_only_de_identified_and_is_added_as_itself(
        stand_in_classifier, users, settings, django_capture_on_commit_callbacks):  # noqa: F811
    project = stand_in_classifier
    settings.LINKAGE_KEY = "a-linkage-key-for-the-incoming-test-" * 2
    data = phi_dicom()
    alice = client_for(users["alice"])
    response = alice.post(reverse("annotator:classify", args=[project.pk]),
                          {"file": SimpleUploadedFile(PHI_FILE_NAME, data)})
    assert response.status_code == 200, response.content[:500]
    token = response.context["token"]
    assert token and staged() == [token]
    incoming = settings.INCOMING_ROOT
    assert files_under(incoming), "the copy for 'add it to the pool' is kept"
    assert incoming_hits(incoming) == []

    # added to the pool: the scan a direct import of the upload makes (same content hash, so
    # a duplicate is known; same patient and study keys; the linkage kept, encrypted)
    with django_capture_on_commit_callbacks(execute=True):
        added = alice.post(reverse("annotator:classify_add", args=[project.pk]),
                           {"token": token, "dataset": "clinic"})
    assert added.status_code == 302
    job = project.import_jobs.get()
    assert (job.status, job.imported, job.failed) == ("succeeded", 1, 0), job.errors
    scan = Scan.objects.get(project=project)
    direct = decode_scan(data, salt=settings.DEID_SALT)
    assert scan.sha256 == hashlib.sha256(data).hexdigest()
    assert (scan.patient_key, scan.study_key, scan.series_key) == (
        direct.patient_key, direct.meta["study_key"], direct.meta["series_key"])
    assert (scan.file_format, scan.source_name, scan.modality) == ("dicom", "", "MR")
    from annotator.linkage import linkage_read

    assert linkage_read(scan)["PatientName"] == "Doe^John"
    assert files_under(incoming) == []


def test_an_expired_copy_is_removed_by_the_beat_task_without_another_classify(
        stand_in_classifier, users, settings):  # noqa: F811
    from medsite.celery import app

    schedule = settings.CELERY_BEAT_SCHEDULE["incoming-sweep"]
    assert schedule["task"] == incoming_sweep.name and schedule["task"] in app.tasks
    project = stand_in_classifier
    alice = client_for(users["alice"])
    response = alice.post(reverse("annotator:classify", args=[project.pk]),
                          {"file": SimpleUploadedFile(PHI_FILE_NAME, phi_dicom())})
    token = response.context["token"]
    assert incoming_sweep.delay().get() == {"classify": 0, "orphaned": 0}   # not yet due
    assert staged() == [token]
    age(classify_staging_dir() / token, 6.1)
    assert incoming_sweep.delay().get() == {"classify": 1, "orphaned": 0}
    assert staged() == [] and files_under(settings.INCOMING_ROOT) == []
    assert incoming_sweep.delay().get() == {"classify": 0, "orphaned": 0}   # twice: no harm
    refused = alice.post(reverse("annotator:classify_add", args=[project.pk]),
                         {"token": token}, follow=True)
    assert b"no longer kept (it expired" in refused.content
    assert not project.import_jobs.exists()


def test_raw_uploads_that_no_import_reads_do_not_stay(project, users, settings):
    incoming = settings.INCOMING_ROOT
    data = phi_dicom()
    # a request that died between staging its files and queuing their import
    orphan = incoming / ("0f" * 16)
    orphan.mkdir()
    (orphan / "0000.dcm").write_bytes(data)
    age(orphan, 2)
    # a fresh one (its request may still be queuing the import), and one a queued import reads
    fresh = incoming / "fresh"
    fresh.mkdir()
    (fresh / "0000.dcm").write_bytes(data)
    queued = incoming / "queued"
    queued.mkdir()
    (queued / "0000.dcm").write_bytes(data)
    age(queued, 5)
    services.import_job_create(project=project, source=str(queued), source_is_upload=True,
                               dataset_name="uploads", layout="flat")
    assert incoming_sweep.delay().get() == {"classify": 0, "orphaned": 1}
    assert files_under(incoming) == ["fresh/0000.dcm", "queued/0000.dcm"]

    # a copy that fails half-way (a full disk) leaves nothing behind
    class Failing(SimpleUploadedFile):
        def chunks(self, chunk_size=None):
            yield data[:100]
            raise OSError(28, "No space left on device")

    before = set(os.listdir(incoming))
    with pytest.raises(OSError):
        stage_uploads([Failing(PHI_FILE_NAME, data)])
    assert set(os.listdir(incoming)) == before

    # an upload the page refuses after staging (the dataset holds another modality) keeps
    # nothing; every upload first sweeps what is past its time
    services.dataset_acquisition_set(project=project, name="films", modality="CR")
    age(fresh, 2)
    alice = client_for(users["alice"])
    refused = alice.post(reverse("annotator:upload", args=[project.pk]),
                         {"files": [SimpleUploadedFile("chest.png", png_bytes(seed=1))],
                          "dataset": "films", "split": "pool", "modality": "MR"})
    assert refused.status_code == 400 and b"holds scans of" in refused.content
    assert files_under(incoming) == ["queued/0000.dcm"]


def test_an_upload_whose_import_can_no_longer_run_is_failed_and_removed(project, settings):
    """A queued import whose task never reached a worker, or a running one whose worker was
    lost, would keep its raw upload for ever: after a day the sweep marks it failed, with the
    reason, and its files go. An import running for hours keeps its files."""
    from datetime import timedelta

    from django.utils import timezone

    incoming = settings.INCOMING_ROOT
    jobs = {}
    for name in ("lost-task", "lost-worker", "waiting"):
        folder = incoming / name
        folder.mkdir()
        (folder / "0000.dcm").write_bytes(phi_dicom())
        age(folder, 30)
        jobs[name] = services.import_job_create(project=project, source=str(folder),
                                                source_is_upload=True,
                                                dataset_name="uploads", layout="flat")
    now = timezone.now()
    ImportJob.objects.filter(pk=jobs["lost-task"].pk).update(created_at=now - timedelta(hours=25))
    ImportJob.objects.filter(pk=jobs["lost-worker"].pk).update(
        status=ImportJob.Status.RUNNING, started_at=now - timedelta(hours=25))
    # a long import still at work (a large PACS study in the pull command's own process)
    ImportJob.objects.filter(pk=jobs["waiting"].pk).update(
        status=ImportJob.Status.RUNNING, started_at=now - timedelta(hours=3))

    assert incoming_sweep.delay().get() == {"classify": 0, "orphaned": 2}
    assert files_under(incoming) == ["waiting/0000.dcm"]
    states = {name: ImportJob.objects.get(pk=job.pk) for name, job in jobs.items()}
    assert states["lost-task"].status == ImportJob.Status.FAILED
    assert "never started within 24 h" in states["lost-task"].last_error
    assert states["lost-worker"].status == ImportJob.Status.FAILED
    assert "still running after 24 h" in states["lost-worker"].last_error
    assert states["waiting"].status == ImportJob.Status.RUNNING
    # a worker that gets the lost task's message after all finds nothing to do
    assert services.import_job_run(job_id=jobs["lost-task"].pk) is None


# --- 2. a typed dataset name that looks like it carries identifiers ------------------------


WARD = "ward MRN987654"


def test_a_typed_dataset_name_that_carries_identifiers_is_refused(
        stand_in_classifier, users, settings, tmp_path):  # noqa: F811
    from tests.api.test_api import api

    project = stand_in_classifier
    alice = client_for(users["alice"])
    page = alice.post(reverse("annotator:upload", args=[project.pk]),
                      {"files": [SimpleUploadedFile("chest.png", png_bytes(seed=1))],
                       "dataset": WARD, "split": "pool"})
    assert page.status_code == 400
    assert "looks like it carries patient identifiers" in page.context["form"].errors["dataset"][0]

    problem = api(users["alice"]).post(
        f"/api/v1/projects/{project.pk}/imports/",
        {"files": [SimpleUploadedFile("chest.png", png_bytes(seed=1), content_type="image/png")],
         "dataset": WARD})
    assert problem.status_code == 400, problem.content
    assert "looks like it carries patient identifiers" in problem.content.decode()

    source = tmp_path / "films"
    source.mkdir()
    (source / "chest.png").write_bytes(png_bytes(seed=1))
    for extra in ([], ["--modality", "CR"]):
        with pytest.raises(CommandError, match="--dataset refused: .*patient identifiers"):
            call_command("import_scans", str(source), "--project", project.name,
                         "--dataset", WARD, "--no-progress", *extra)
    with pytest.raises(services.ImportRequestError, match="patient identifiers"):
        services.import_job_create(project=project, source=str(source), dataset_name=WARD)
    from annotator import pacs

    class NothingRetrieved:                  # a PACS pull is refused before it retrieves
        def search_for_studies(self, **query):
            return [{"0020000D": {"vr": "UI", "Value": ["1.2.826.0.1.3680043.8.498.9"]}}]

        def iter_study(self, uid):
            raise AssertionError("retrieved a study for a refused dataset name")

    with pytest.raises(pacs.PacsError, match="patient identifiers"):
        pacs.pacs_pull(project=project, url="http://pacs.example", dataset_name=WARD,
                       client=NothingRetrieved())

    # the classify page's "add it to the pool": refused, the copy still kept for another name
    response = alice.post(reverse("annotator:classify", args=[project.pk]),
                          {"file": SimpleUploadedFile("chest.png", png_bytes(seed=2))})
    token = response.context["token"]
    refused = alice.post(reverse("annotator:classify_add", args=[project.pk]),
                         {"token": token, "dataset": WARD}, follow=True)
    assert b"looks like it carries patient identifiers" in refused.content
    assert staged() == [token]

    assert not ImportJob.objects.filter(project=project).exists()
    assert not ScanDataset.objects.filter(project=project, name__contains="987654").exists()
    assert files_under(settings.INCOMING_ROOT) == [f"classify/{token}/.identity.json",
                                                   f"classify/{token}/0000_chest.png"]
    # a plain name is still taken
    ok = alice.post(reverse("annotator:upload", args=[project.pk]),
                    {"files": [SimpleUploadedFile("chest.png", png_bytes(seed=1))],
                     "dataset": "ward 7", "split": "pool"})
    assert ok.status_code == 302, ok.content[:500]


def test_a_copy_claimed_twice_is_refused_in_words_not_a_server_error(settings):
    """Two "add it to the pool" clicks both passed the check before the first moved the
    copy: the second is told the copy is no longer kept."""
    from annotator.uploads import StagingRefused, classify_claim

    folder = classify_staging_dir() / "u1-p1-token"
    folder.mkdir(parents=True)
    (folder / "0000.dcm").write_bytes(b"x")
    claimed = classify_claim(folder, "u1-p1-token")
    assert (claimed / "0000.dcm").exists()
    with pytest.raises(StagingRefused, match="no longer kept"):
        classify_claim(folder, "u1-p1-token")
