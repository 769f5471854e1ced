"""One import on many workers (issue 21): a large import splits into chunks that any worker
takes; each chunk is claimed once, a lost worker's chunk is taken again without counting its
scans twice, and the last chunk writes the same report a one-pass import writes."""

from __future__ import annotations

import shutil
from datetime import timedelta

import pytest
from django.utils import timezone

from annotator import services
from annotator.models import Annotation, ImportChunk, ImportJob, Scan
from tests.base import FIXTURES, wait_for
from tests.conftest import start_worker, stop_worker

SOURCE = FIXTURES / "chest_xray" / "eval"        # 40 labeled files in class folders


def _job(project, source=SOURCE, **kwargs):
    return services.import_job_create(project=project, source=str(source), **kwargs)


def _report(job: ImportJob) -> tuple:
    return (job.status, job.total, job.processed, job.imported, job.duplicates, job.failed,
            job.labels_added, sorted(job.classes_created))


def test_a_chunked_import_reports_what_one_pass_reports(project, other_project, settings):
    settings.IMPORT_CHUNK_SIZE = 7
    one_pass = services.import_job_run(job_id=_job(other_project).pk, chunked=False)
    chunked = services.import_job_run(job_id=_job(project).pk, chunked=True)
    assert chunked.chunks_total == 6 and one_pass.chunks_total == 0
    assert _report(chunked) == _report(one_pass) == (
        "succeeded", 40, 40, 40, 0, 0, 40, ["normal", "pneumonia"])
    assert [c.status for c in chunked.chunks.all()] == ["done"] * 6
    assert [(c.start, c.stop) for c in chunked.chunks.all()][-1] == (35, 40)
    colour = [w for w in chunked.warnings if w.startswith("Colour:")]
    assert colour == [w for w in one_pass.warnings if w.startswith("Colour:")] and colour
    assert Scan.objects.filter(project=project).count() == 40
    assert Annotation.objects.filter(scan__project=project).count() == 40

    again = services.import_job_run(job_id=_job(project).pk, chunked=True)
    assert (again.imported, again.duplicates, again.labels_added) == (0, 40, 0)


def test_small_imports_and_in_process_tasks_stay_one_pass(project, settings):
    settings.IMPORT_CHUNK_SIZE = 100
    job = services.import_job_run(job_id=_job(project).pk, chunked=True)
    assert job.chunks_total == 0 and job.imported == 40
    settings.IMPORT_CHUNK_SIZE = 7
    settings.CELERY_TASK_ALWAYS_EAGER = True       # no broker: nothing gained by splitting
    assert services.import_chunking_pays() is False
    settings.CELERY_TASK_ALWAYS_EAGER = False      # a broker, and so workers to share
    assert services.import_chunking_pays() is True
    settings.IMPORT_CHUNK_SIZE = 0                 # turned off
    assert services.import_chunking_pays() is False


def test_a_chunk_is_claimed_once_and_a_lost_workers_chunk_runs_again(project, settings,
                                                                      monkeypatch):
    from annotator import tasks

    settings.IMPORT_CHUNK_SIZE = 15
    queued = []
    monkeypatch.setattr(tasks.run_import_chunk, "apply_async",
                        lambda args, queue=None: queued.append(args[0]))
    job = services.import_job_run(job_id=_job(project).pk, chunked=True)
    assert job.status == "running" and len(queued) == 3 and job.chunks_total == 3

    first = services.import_chunk_run(chunk_id=queued[0])
    assert first is not None
    assert services.import_chunk_run(chunk_id=queued[0]) is None       # redelivered: no-op
    job.refresh_from_db()
    assert (job.status, job.processed, job.imported) == ("running", 15, 15)

    # the second chunk's worker dies after its files were stored: its lease runs out
    services.import_chunk_run(chunk_id=queued[1])
    ImportChunk.objects.filter(pk=queued[1]).update(
        status="running", lease_expires_at=timezone.now() + timedelta(minutes=5),
        imported=0, processed=0, labels_added=0)
    assert services.import_chunk_run(chunk_id=queued[1]) is None       # lease still held
    ImportChunk.objects.filter(pk=queued[1]).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1))
    rerun = services.import_chunk_run(chunk_id=queued[1])
    assert rerun is not None and rerun.attempts == 2
    rerun.refresh_from_db()
    assert (rerun.imported, rerun.duplicates) == (15, 0)               # not counted twice

    services.import_chunk_run(chunk_id=queued[2])
    job.refresh_from_db()
    assert _report(job) == ("succeeded", 40, 40, 40, 0, 0, 40, ["normal", "pneumonia"])
    assert job.finished_at is not None and Scan.objects.filter(project=project).count() == 40


def test_a_chunk_whose_finish_the_database_rolls_back_for_a_deadlock_finishes_anyway(
        project, settings, monkeypatch, caplog):
    """Two chunks finishing at once on PostgreSQL deadlocked once in the scale benchmark
    (100,000 scans): the loser's chunk stayed "running" and its job stalled until the lease
    ran out. The database's transient rollbacks are now tried again; other errors are not."""
    import psycopg
    from django.db import OperationalError

    from annotator import tasks

    settings.IMPORT_CHUNK_SIZE = 20
    queued = []
    monkeypatch.setattr(tasks.run_import_chunk, "apply_async",
                        lambda args, queue=None: queued.append(args[0]))
    job = services.import_job_run(job_id=_job(project).pk, chunked=True)
    real, calls = services._chunk_finish_once, []

    def deadlocks_once(chunk, state, done):
        calls.append(chunk.pk)
        if len(calls) == 1:
            raise OperationalError("deadlock detected") from psycopg.errors.DeadlockDetected()
        return real(chunk, state, done)

    monkeypatch.setattr(services, "_chunk_finish_once", deadlocks_once)
    for chunk_id in queued:
        services.import_chunk_run(chunk_id=chunk_id)
    job.refresh_from_db()
    assert calls == [queued[0], queued[0], queued[1]]
    assert _report(job) == ("succeeded", 40, 40, 40, 0, 0, 40, ["normal", "pneumonia"])
    assert "rolled back (40P01), attempt 1 of 4" in caplog.text

    def fails(chunk, state, done):
        raise OperationalError("the server closed the connection")

    monkeypatch.setattr(services, "_chunk_finish_once", fails)
    with pytest.raises(OperationalError, match="closed"):
        services._chunk_finish(ImportChunk.objects.get(pk=queued[0]), services._JobState(), 20)


def test_a_source_that_changes_under_a_chunk_fails_its_files_with_the_reason(
        project, settings, monkeypatch, tmp_path):
    from annotator import tasks

    source = tmp_path / "site_export"
    shutil.copytree(SOURCE, source)
    settings.IMPORT_CHUNK_SIZE = 20
    queued = []
    monkeypatch.setattr(tasks.run_import_chunk, "apply_async",
                        lambda args, queue=None: queued.append(args[0]))
    job = services.import_job_run(job_id=_job(project, source).pk, chunked=True)
    services.import_chunk_run(chunk_id=queued[0])
    for path in sorted((source / "normal").iterdir())[:3]:
        path.unlink()
    services._LISTINGS.clear()        # the next chunk on another worker lists the source again
    services.import_chunk_run(chunk_id=queued[1])
    job.refresh_from_db()
    assert (job.status, job.imported, job.failed, job.processed) == ("succeeded", 20, 20, 40)
    assert "source changed" in job.errors[0]["reason"] and job.errors[0]["name"] == \
        "files 21 to 40"


@pytest.mark.worker
def test_two_worker_processes_share_one_import(celery_worker_process, project, settings,
                                               tmp_path):
    """Two real Celery workers on Redis and PostgreSQL take the chunks of one import."""
    settings.IMPORT_CHUNK_SIZE = 5
    settings.IMPORT_QUEUE = celery_worker_process["queue"]
    second, second_log = start_worker(settings, tmp_path, settings.IMPORT_QUEUE,
                                      name="second")
    try:
        job = services.import_job_run(job_id=_job(project).pk, chunked=True)
        assert job.chunks_total == 8
        job = services.import_job_wait(job, poll=0.3, timeout=180)
        assert _report(job) == ("succeeded", 40, 40, 40, 0, 0, 40, ["normal", "pneumonia"])
        wait_for(lambda: "run_import_chunk" in second_log.read_text()
                 and "run_import_chunk" in celery_worker_process["log"].read_text(), 10,
                 "both workers to have taken chunks")
    finally:
        stop_worker(second)
