"""With no broker, training runs go to one background worker thread (ml_backend/dispatch.py):
the request that queued a refit returns at once, the label page polls model-status, and a
failing job is logged, never raised into the caller. The rest of the suite keeps
ML_TASKS_IN_THREAD off (tests/conftest.py), so refits there stay synchronous."""

from __future__ import annotations

import json
import logging
import multiprocessing
import threading
import time
from pathlib import Path

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from ml_backend import dispatch, services
from ml_backend.models import ModelVersion, TrainingRun
from tests.base import PASSWORD
from tests.conftest import brain_truth


@pytest.fixture
def in_thread(settings):
    """Eager Celery (no broker) and runs in the worker thread; the queue drained after."""
    from medsite.celery import app

    settings.ML_TASKS_IN_THREAD = True
    assert app.conf.task_always_eager
    yield
    assert dispatch.wait_idle(60), "a background training run did not finish"


def blocking_execute(monkeypatch, *, then=None):
    """Replace training_run_execute with one that waits for ``release`` (then calls ``then``)."""
    started, release, calls = threading.Event(), threading.Event(), []

    def execute(run_id, **kwargs):
        calls.append((run_id, threading.current_thread().name))
        started.set()
        assert release.wait(30), "the test never released the job"
        return then(run_id, **kwargs) if then else None

    monkeypatch.setattr(services, "training_run_execute", execute)
    return started, release, calls


def client_for(user) -> Client:
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    return client


# --- the worker thread ---------------------------------------------------------------------


def test_enqueue_returns_at_once_and_wait_idle_sees_the_job_done(in_thread, monkeypatch):
    started, release, calls = blocking_execute(monkeypatch)
    began = time.perf_counter()
    dispatch.enqueue_training_run(101)
    dispatch.enqueue_training_run(102)
    assert time.perf_counter() - began < 1.0
    assert started.wait(10)
    assert not dispatch.wait_idle(0.2)              # the job waits for us
    time.sleep(0.2)
    assert calls == [(101, calls[0][1])]            # one worker: 102 waits for 101
    assert calls[0][1].startswith("ml-worker")
    release.set()
    assert dispatch.wait_idle(10)
    assert [run_id for run_id, _ in calls] == [101, 102]
    assert {name for _, name in calls} == {calls[0][1]}   # the same, single thread


def test_a_crashing_job_is_logged_not_raised_into_the_caller(in_thread, monkeypatch, caplog):
    def crash(run_id, **kwargs):
        raise RuntimeError(f"boom in run {run_id}")

    monkeypatch.setattr(services, "training_run_execute", crash)
    with caplog.at_level(logging.ERROR, logger="ml_backend.dispatch"):
        dispatch.enqueue_training_run(7)            # does not raise
        assert dispatch.wait_idle(10)
    records = [r for r in caplog.records if r.name == "ml_backend.dispatch"]
    assert len(records) == 1 and "training run 7" in records[0].getMessage()
    assert records[0].exc_info and "boom in run 7" in str(records[0].exc_info[1])
    # the worker survives a crash: the next job runs
    done = threading.Event()
    monkeypatch.setattr(services, "training_run_execute", lambda run_id, **kw: done.set())
    dispatch.enqueue_training_run(8)
    assert dispatch.wait_idle(10) and done.is_set()


def test_with_the_thread_off_the_eager_task_runs_inline(monkeypatch, settings):
    assert settings.ML_TASKS_IN_THREAD is False     # the suite's default (tests/conftest.py)
    calls = []
    monkeypatch.setattr(services, "training_run_execute",
                        lambda run_id, **kw: calls.append((run_id, threading.current_thread())))
    dispatch.enqueue_training_run(5)
    assert calls == [(5, threading.current_thread())]


@pytest.mark.django_db
def test_with_a_broker_each_run_goes_to_its_queue_and_a_refit_never_waits_for_training(
        monkeypatch, settings, project):
    """Refits and embeddings go to the ``refit`` queue, pretraining / fine-tuning /
    distillation to ``train``: a worker busy for hours with a pretraining never holds up a
    refit (deploy/run.sh starts one worker per queue)."""
    from medsite.celery import app
    from ml_backend.models import TrainingRun
    from ml_backend.tasks import run_training

    settings.ML_TASKS_IN_THREAD = True
    sent = []
    monkeypatch.setattr(run_training, "apply_async",
                        lambda args, queue: sent.append((args[0], queue)))
    monkeypatch.setattr(services, "training_run_execute",
                        lambda *a, **kw: pytest.fail("must not run here"))
    runs = {kind: TrainingRun.objects.create(project=project, kind=kind)
            for kind in ("pretrain", "refit", "embed", "retrain", "distill")}
    app.conf.task_always_eager = False          # as with a real worker (conftest's fixture)
    try:
        for run in runs.values():
            dispatch.enqueue_training_run(run.pk)
    finally:
        app.conf.task_always_eager = True
    queues = {run_id: queue for run_id, queue in sent}
    assert queues == {runs["pretrain"].pk: "train", runs["retrain"].pk: "train",
                      runs["distill"].pk: "train", runs["refit"].pk: "refit",
                      runs["embed"].pk: "refit"}
    assert dispatch.wait_idle(1)
    script = (Path(__file__).resolve().parents[2] / "deploy" / "run.sh").read_text()
    assert "-Q refit" in script and "-Q train" in script


@pytest.mark.django_db(transaction=True)
def test_a_real_run_executes_in_the_thread_and_the_status_follows_it(
        in_thread, monkeypatch, project, users):
    """training_run_execute for real in the worker thread (its own DB connection); the
    project has no encoder, so the refit fails and says why."""
    real_execute = services.training_run_execute
    started, release, _ = blocking_execute(monkeypatch, then=real_execute)
    run = TrainingRun.objects.create(project=project, kind=TrainingRun.Kind.REFIT)
    url = reverse("annotator:model_status", args=[project.pk])
    alice = client_for(users["alice"])

    dispatch.enqueue_training_run(run.pk)
    assert started.wait(10)
    status = alice.get(url).json()
    assert status["updating"] is True
    assert status["run"] == {"id": run.pk, "kind": "refit", "status": "queued", "progress": 0.0}
    release.set()
    assert dispatch.wait_idle(30)
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.FAILED and "no active encoder" in run.last_error
    status = alice.get(url).json()
    assert status["updating"] is False and status["run"] is None
    assert status["last_run"]["id"] == run.pk and status["last_run"]["status"] == "failed"
    assert "no active encoder" in status["last_run"]["error"]


def test_shutdown_abandons_runs_that_never_started(in_thread, monkeypatch, db, project):
    """Stopping the server cancels queued runs (marked abandoned: the project can refit
    again) and lets the running one finish."""
    started, release, calls = blocking_execute(monkeypatch)
    first = TrainingRun.objects.create(project=project, kind=TrainingRun.Kind.REFIT)
    second = TrainingRun.objects.create(project=project, kind=TrainingRun.Kind.REFIT)
    dispatch.enqueue_training_run(first.pk)
    dispatch.enqueue_training_run(second.pk)
    assert started.wait(10)
    threading.Timer(0.3, release.set).start()
    dispatch.shutdown(wait=True)
    assert [run_id for run_id, _ in calls] == [first.pk]
    second.refresh_from_db()
    assert second.status == TrainingRun.Status.ABANDONED
    assert "stopped before this run started" in second.last_error
    assert dispatch.wait_idle(1)


@pytest.mark.django_db(transaction=True)
def test_a_follow_up_queued_while_the_server_stops_is_abandoned_not_run_by_a_new_worker(
        in_thread, monkeypatch, project):
    """A refit that finishes during shutdown queues its follow-up from the worker thread:
    the follow-up is abandoned with the reason; no executor is started inside the old
    worker thread to run it."""
    first = TrainingRun.objects.create(project=project, kind=TrainingRun.Kind.REFIT)
    follow = TrainingRun.objects.create(project=project, kind=TrainingRun.Kind.REFIT)

    def queue_follow_up(run_id, **kwargs):
        if run_id == first.pk:
            dispatch.enqueue_training_run(follow.pk)

    started, release, calls = blocking_execute(monkeypatch, then=queue_follow_up)
    dispatch.enqueue_training_run(first.pk)
    assert started.wait(10)
    threading.Timer(0.3, release.set).start()
    dispatch.shutdown(wait=True)
    assert [run_id for run_id, _ in calls] == [first.pk]
    follow.refresh_from_db()
    assert follow.status == TrainingRun.Status.ABANDONED
    assert "stopped before this run started" in follow.last_error
    assert dispatch._executor is None
    assert not [t for t in threading.enumerate() if t.name.startswith("ml-worker")]


# --- the worker process (ML_TASKS_IN_PROCESS, `make demo`) -------------------------------

needs_proc = pytest.mark.skipif(not Path("/proc/self/status").exists(),
                                reason="counts processes through /proc (Linux)")


@pytest.fixture
def in_process(settings, monkeypatch, tmp_path):
    """Runs go to the real spawned worker process, as in `make demo`. Its Django has a
    database of its own (an empty SQLite file: it cannot see the test's), so its run body
    is tests/ml_backend/worker_runs.py's (``install_in_worker``). Stopped after: no process
    is left behind."""
    from medsite.celery import app

    dispatch.shutdown()                 # an earlier test's worker thread
    settings.ML_TASKS_IN_THREAD = True
    settings.ML_TASKS_IN_PROCESS = True
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'worker.sqlite3'}")
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)     # the worker: no broker either
    assert app.conf.task_always_eager
    yield
    assert dispatch.wait_idle(60), "a run in the worker process did not finish"
    dispatch.shutdown()
    assert multiprocessing.active_children() == []


def install_in_worker(log: Path, **kwargs) -> int:
    """The worker process (started now if there is none) runs worker_runs' body; its pid."""
    from tests.ml_backend import worker_runs

    return dispatch._worker_process().submit(worker_runs.install, str(log),
                                             **kwargs).result(timeout=120)


def runs_in(log: Path) -> list[tuple[int, int, float, float]]:
    """(run id, pid, began, ended) per run the worker process executed, in order."""
    if not log.exists():
        return []
    rows = [line.split() for line in log.read_text().splitlines()]
    return [(int(run), int(pid), float(began), float(ended)) for run, pid, began, ended in rows]


def children_of(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc: also those multiprocessing does
    not know of, such as a pool started inside the worker)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:             # it ended meanwhile
            continue
        ppid = next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:"))
        if int(ppid) == pid:
            children.append(int(entry.name))
    return children


@needs_proc
def test_a_follow_up_queued_in_the_worker_process_runs_there_after_it_one_worker_ever(
        in_process, tmp_path):
    """A refit that queues the next one (labels arrived while it ran) from inside the worker
    process: the next one runs in the same process, after it, and the worker never starts a
    worker of its own (the probe saw 13 nested ones of about 1 GB after a bulk import)."""
    log = tmp_path / "runs.log"
    worker = install_in_worker(log, follow_ups={9001: 9002, 9002: 9003})
    dispatch.enqueue_training_run(9001)
    assert dispatch.wait_idle(60)
    runs = runs_in(log)
    assert [run for run, *_ in runs] == [9001, 9002, 9003]
    assert {pid for _, pid, *_ in runs} == {worker}
    for (_, _, _, ended), (_, _, began, _) in zip(runs, runs[1:]):
        assert began >= ended                       # one after the other, never two at once
    assert [child.pid for child in multiprocessing.active_children()] == [worker]
    assert children_of(worker) == []


@needs_proc
@pytest.mark.django_db(transaction=True)
def test_a_worker_process_that_dies_fails_its_run_with_the_reason_and_the_next_gets_a_new_one(
        in_process, tmp_path, project):
    """The worker killed while it ran a refit (as the out-of-memory killer does): the run
    and the version it was making are marked with the reason (the project can refit
    again), nothing raises into a request, and the next run goes to a new worker."""
    log = tmp_path / "runs.log"
    version = ModelVersion.objects.create(project=project, kind=ModelVersion.Kind.CLASSIFIER,
                                          version="clf-2", status=ModelVersion.Status.TRAINING)
    killed = TrainingRun.objects.create(    # as the worker left it: claimed, making clf-2
        project=project, kind=TrainingRun.Kind.REFIT, status=TrainingRun.Status.RUNNING,
        started_at=timezone.now(), model_version=version)
    first = install_in_worker(log, die_on=killed.pk)
    dispatch.enqueue_training_run(killed.pk)
    assert dispatch.wait_idle(60)
    killed.refresh_from_db()
    version.refresh_from_db()
    assert killed.status == TrainingRun.Status.ABANDONED
    assert "worker process stopped" in killed.last_error
    assert "out of memory" in killed.last_error
    assert version.status == ModelVersion.Status.FAILED
    assert version.status_reason == killed.last_error
    assert multiprocessing.active_children() == []

    second = install_in_worker(log)
    assert second != first
    dispatch.enqueue_training_run(9005)
    assert dispatch.wait_idle(60)
    assert [(run, pid) for run, pid, *_ in runs_in(log)] == [(9005, second)]
    assert [child.pid for child in multiprocessing.active_children()] == [second]


# --- the model-status endpoint ---------------------------------------------------------


def _classifier(project, version, status, reason="", promoted=False):
    return ModelVersion.objects.create(
        project=project, kind=ModelVersion.Kind.CLASSIFIER, version=version, status=status,
        status_reason=reason, promoted_at=timezone.now() if promoted else None)


@pytest.mark.django_db
def test_model_status_says_updating_while_a_run_is_queued_or_running(project, users):
    url = reverse("annotator:model_status", args=[project.pk])
    alice = client_for(users["alice"])
    body = alice.get(url).json()
    assert body == {"updating": False, "run": None, "model_version": None, "last": None,
                    "held_back_in_a_row": 0, "last_run": None}
    assert alice.get(url)["Cache-Control"] == "no-store"

    queued = TrainingRun.objects.create(project=project, kind=TrainingRun.Kind.REFIT)
    body = alice.get(url).json()
    assert body["updating"] is True and body["run"]["status"] == "queued"
    TrainingRun.objects.filter(pk=queued.pk).update(status="running", progress=0.4,
                                                    started_at=timezone.now())
    body = alice.get(url).json()
    assert body["updating"] is True
    assert body["run"] == {"id": queued.pk, "kind": "refit", "status": "running", "progress": 0.4}
    # a retrain (or pretrain, embed, distill) counts too
    TrainingRun.objects.filter(pk=queued.pk).update(status="succeeded",
                                                    finished_at=timezone.now())
    retrain = TrainingRun.objects.create(project=project, kind=TrainingRun.Kind.RETRAIN)
    assert alice.get(url).json()["run"]["kind"] == "retrain"
    TrainingRun.objects.filter(pk=retrain.pk).update(status="failed", last_error="no GPU",
                                                     finished_at=timezone.now())
    body = alice.get(url).json()
    assert body["updating"] is False and body["run"] is None
    assert body["last_run"] == {"id": retrain.pk, "kind": "retrain", "status": "failed",
                                "error": "no GPU", "model_version": None}


@pytest.mark.django_db
def test_model_status_names_the_last_version_and_counts_held_back_ones(project, users):
    url = reverse("annotator:model_status", args=[project.pk])
    alice = client_for(users["alice"])
    active = _classifier(project, "clf-5", ModelVersion.Status.ACTIVE, "first classifier: promoted",
                         promoted=True)
    project.active_model = active
    project.save(update_fields=["active_model"])
    body = alice.get(url).json()
    assert body["model_version"] == "clf-5" and body["held_back_in_a_row"] == 0
    assert body["last"] == {"version": "clf-5", "status": "active",
                            "reason": "first classifier: promoted"}

    _classifier(project, "clf-6", ModelVersion.Status.READY, "not promoted: F1 dropped")
    _classifier(project, "clf-7", ModelVersion.Status.FAILED, "crashed")
    _classifier(project, "clf-8", ModelVersion.Status.READY, "not promoted: F1 dropped again")
    _classifier(project, "clf-9", ModelVersion.Status.TRAINING)     # in progress: not "last"
    body = alice.get(url).json()
    assert body["model_version"] == "clf-5"
    assert body["last"] == {"version": "clf-8", "status": "ready",
                            "reason": "not promoted: F1 dropped again"}
    assert body["held_back_in_a_row"] == 2

    # a promotion starts the count again
    ModelVersion.objects.filter(version="clf-5").update(status=ModelVersion.Status.RETIRED)
    promoted = ModelVersion.objects.get(version="clf-9")
    promoted.status, promoted.promoted_at = ModelVersion.Status.ACTIVE, timezone.now()
    promoted.save()
    project.active_model = promoted
    project.save(update_fields=["active_model"])
    body = alice.get(url).json()
    assert body["model_version"] == "clf-9" and body["last"]["version"] == "clf-9"
    assert body["held_back_in_a_row"] == 0


@pytest.mark.django_db
def test_model_status_is_404_outside_the_project_and_login_only(project, other_project, users):
    url = reverse("annotator:model_status", args=[project.pk])
    assert client_for(users["charlie"]).get(url).status_code == 404
    other = reverse("annotator:model_status", args=[other_project.pk])
    assert client_for(users["alice"]).get(other).status_code == 404
    anonymous = Client().get(url)
    assert anonymous.status_code == 302 and anonymous["Location"].startswith(reverse("login"))
    assert client_for(users["alice"]).post(url).status_code == 405


# --- end to end: an answer that queues a refit does not wait for it ------------------------


@pytest.mark.django_db(transaction=True)
def test_an_answer_that_queues_a_refit_returns_before_the_refit_runs(
        in_thread, monkeypatch, encoded_project, users):
    """The refit is held at the door of the worker thread: the answer still comes back with
    the next scan and ``model_status.updating``; released, the refit makes a version."""
    from annotator import labeling
    from ml_backend.tasks import run_training

    project = encoded_project
    # Until training_run_create calls dispatch.enqueue_training_run itself, route its
    # ``run_training.delay`` there (in thread mode dispatch never calls ``delay``).
    monkeypatch.setattr(run_training, "delay", dispatch.enqueue_training_run)
    started, release, calls = blocking_execute(monkeypatch, then=services.training_run_execute)
    alice = client_for(users["alice"])
    status_url = reverse("annotator:model_status", args=[project.pk])
    classes = {c.name: c.pk for c in project.label_classes.all()}
    bodies = []
    for _ in range(project.refit_every):
        scan, _item = labeling.lease_next(project=project, user=users["alice"])
        began = time.perf_counter()
        response = alice.post(reverse("annotator:answer", args=[project.pk, scan.pk]),
                              data=json.dumps({"outcome": "label",
                                               "class_id": classes[brain_truth(scan)]}),
                              content_type="application/json")
        assert response.status_code == 201, response.content
        bodies.append((time.perf_counter() - began, response.json()))
    elapsed, last = bodies[-1]
    assert started.wait(10), "the refit was not handed to the worker thread"
    assert elapsed < 20 and last["next"] is not None           # the refit is still held
    assert last["model_status"]["updating"] is True
    assert last["model_status"]["run"]["kind"] == "refit"
    assert all(not body["model_status"]["updating"] for _, body in bodies[:-1])
    assert alice.get(status_url).json()["updating"] is True
    release.set()
    assert dispatch.wait_idle(120)
    run = TrainingRun.objects.get(pk=calls[0][0])
    assert run.status == TrainingRun.Status.SUCCEEDED, run.last_error
    status = alice.get(status_url).json()
    assert status["updating"] is False
    assert status["last"]["version"] == run.model_version.version
    assert status["last_run"]["model_version"] == run.model_version.version
