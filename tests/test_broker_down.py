"""A task broker that does not answer (tenth probe): with Redis down, an upload answered 500
"nothing you sent was half-saved" while its job stayed "queued" for a day beside an empty
dataset; a retrain asked for through the API stayed "queued" for ever, so every later
retrain was refused as "already queued" and the label page said "Model updating…" with no
end. Now the send is the boundary: what could not be handed to a worker is failed at once,
in words, and nothing waits on it."""

from __future__ import annotations

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse
from kombu.exceptions import OperationalError

from annotator.models import ImportJob
from ml_backend.models import TrainingRun
from ml_backend.services.runs import training_run_create, training_run_start
from tests.base import PASSWORD
from tests.annotator.test_incoming_phi import files_under, png_bytes

pytestmark = pytest.mark.django_db


@pytest.fixture
def broker_down(monkeypatch):
    from annotator.tasks import run_import_job
    from ml_backend.tasks import run_training

    def refused(*args, **kwargs):
        raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(run_training, "apply_async", refused)
    monkeypatch.setattr(run_import_job, "delay", refused)
    app = run_training.app
    app.conf.task_always_eager = False          # as with a broker (tests/conftest.py)
    try:
        yield
    finally:
        app.conf.task_always_eager = True


def test_a_run_the_broker_will_not_take_is_abandoned_and_blocks_nothing(
        project, broker_down, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        run = training_run_create(project=project, kind="pretrain", enqueue=True)
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.ABANDONED
    assert "the task broker did not answer (OperationalError)" in run.last_error
    # the next one is not "already queued"
    with django_capture_on_commit_callbacks(execute=True):
        again = training_run_start(project=project, kind="pretrain")
    assert again.pk != run.pk


def test_an_upload_the_broker_will_not_take_is_failed_in_words_and_removed(
        project, users, broker_down, settings, django_capture_on_commit_callbacks):
    client = Client()
    assert client.login(username="alice", password=PASSWORD)
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(reverse("annotator:upload", args=[project.pk]),
                               {"files": [SimpleUploadedFile("chest.png", png_bytes(seed=1))],
                                "dataset": "films", "split": "pool"})
    assert response.status_code == 302, response.content[:300]
    job = ImportJob.objects.get(project=project)
    assert job.status == ImportJob.Status.FAILED
    assert "could not be handed to a worker" in job.last_error
    assert files_under(settings.INCOMING_ROOT) == []          # the raw upload is gone
    page = client.get(response["Location"])
    assert page.status_code == 200 and b"could not be handed to a worker" in page.content
