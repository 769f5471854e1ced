"""Import as a Celery task: eager in-process by default, a real worker with a broker."""

from __future__ import annotations

import time

import pytest

from annotator import services
from annotator.models import ImportJob, Scan
from annotator.tasks import run_import_job
from tests.base import FIXTURES


def test_task_runs_job_and_duplicate_delivery_is_a_noop(project):
    job = services.import_job_create(project=project, source=str(FIXTURES / "chest_xray" / "eval"))
    assert run_import_job.apply(args=[job.pk]).get() == "succeeded"
    assert run_import_job.apply(args=[job.pk]).get() == "skipped"   # redelivered message
    job.refresh_from_db()
    assert job.imported == 40 and Scan.objects.count() == 40


@pytest.mark.worker
def test_real_worker_runs_import(celery_worker_process, project):
    job = services.import_job_create(project=project, source=str(FIXTURES / "brain_mri" / "eval"),
                                     split="eval")
    queue = celery_worker_process["queue"]
    result = run_import_job.apply_async(args=[job.pk], queue=queue)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job.refresh_from_db()
        if job.is_finished:
            break
        time.sleep(0.5)
    log = celery_worker_process["log"].read_text()
    assert job.status == ImportJob.Status.SUCCEEDED, log[-3000:]
    assert job.imported == 40
    assert Scan.objects.filter(project=project, split="eval").count() == 40
    assert result.id in log   # the worker process, not this one, ran it
    run_import_job.apply_async(args=[job.pk], queue=queue)   # a duplicate message: no-op
    time.sleep(2)
    assert Scan.objects.count() == 40


def test_a_workers_processes_share_the_machines_cores(monkeypatch):
    """`celery worker -c N`: each process gives torch cores // N threads (at least one),
    unless OMP_NUM_THREADS says otherwise."""
    from types import SimpleNamespace

    from medsite import celery as celery_app

    monkeypatch.setattr(celery_app.os, "cpu_count", lambda: 8)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    celery_app._share_the_cores(sender=SimpleNamespace(concurrency=2))
    assert celery_app.os.environ["OMP_NUM_THREADS"] == "4"
    assert celery_app.os.environ["MKL_NUM_THREADS"] == "4"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")          # set by the operator: kept
    celery_app._share_the_cores(sender=SimpleNamespace(concurrency=8))
    assert celery_app.os.environ["OMP_NUM_THREADS"] == "3"
    assert celery_app.threads_per_process(16, cpus=8) == 1
