from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.base import PASSWORD, REPO


@pytest.fixture(autouse=True)
def isolated_storage(settings, tmp_path):
    """Every test gets its own MEDIA_ROOT, INCOMING_ROOT and ARTIFACTS_ROOT."""
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.INCOMING_ROOT = tmp_path / "incoming"
    settings.ARTIFACTS_ROOT = tmp_path / "artifacts"
    for path in (settings.MEDIA_ROOT, settings.INCOMING_ROOT, settings.ARTIFACTS_ROOT):
        path.mkdir(parents=True)
    return tmp_path


@pytest.fixture(autouse=True)
def sign_in_lockout_off(settings):
    """django-axes off: ``client.login()`` authenticates without a request, which axes refuses.
    The lockout's own tests (tests/annotator/test_accounts.py) turn it back on."""
    settings.AXES_ENABLED = False


@pytest.fixture
def users(db, django_user_model):
    make = django_user_model.objects.create_user
    return {
        "alice": make("alice", "alice@example.org", PASSWORD),
        "bob": make("bob", "bob@example.org", PASSWORD),
        "charlie": make("charlie", "charlie@example.org", PASSWORD),
        "dora": django_user_model.objects.create_superuser("dora", "dora@example.org", PASSWORD),
    }


@pytest.fixture
def project(users):
    from annotator import services
    from annotator.models import Membership

    project = services.project_create(name="Chest and brain", created_by=users["dora"])
    services.membership_set(project=project, user=users["alice"], role=Membership.Role.CLINICIAN)
    services.membership_set(project=project, user=users["bob"], role=Membership.Role.REVIEWER)
    return project


@pytest.fixture
def other_project(users):
    from annotator import services

    return services.project_create(name="Someone else's project", created_by=None)


def run_import(project, source, **kwargs):
    """Create and run an import job synchronously; return the finished job."""
    from annotator import services

    job = services.import_job_create(project=project, source=str(source), **kwargs)
    return services.import_job_run(job_id=job.pk)


def start_worker(settings, tmp_path, queue: str, *, name: str = "worker"):
    """Start a real Celery worker process (solo pool) on ``queue``; wait until it is ready."""
    from django.db import connection

    broker = os.environ["CELERY_BROKER_URL"]
    db = connection.settings_dict
    if db["ENGINE"] != "django.db.backends.postgresql":
        pytest.fail("a real worker needs a database both processes can open (PostgreSQL)")
    database_url = (f"postgres://{db['USER'] or 'postgres'}@{db['HOST'] or '127.0.0.1'}:"
                    f"{db['PORT'] or 5432}/{db['NAME']}")
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "CELERY_BROKER_URL": broker,
        "MEDIA_ROOT": str(settings.MEDIA_ROOT),
        "INCOMING_ROOT": str(settings.INCOMING_ROOT),
        "ARTIFACTS_ROOT": str(settings.ARTIFACTS_ROOT),
        "DEID_SALT": settings.DEID_SALT,
    }
    log = tmp_path / f"{name}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "medsite", "worker", "--pool", "solo",
         "--concurrency", "1", "-Q", queue, "--without-gossip", "--without-mingle",
         "--without-heartbeat", "-n", f"{name}-{queue}@%h", "--loglevel", "INFO"],
        cwd=REPO, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"celery worker exited early:\n{log.read_text()[-3000:]}")
        if "ready." in log.read_text():
            return process, log
        time.sleep(0.3)
    os.killpg(process.pid, signal.SIGKILL)
    pytest.fail(f"celery worker did not become ready:\n{log.read_text()[-3000:]}")


def stop_worker(process) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture
def celery_worker_process(transactional_db, settings, tmp_path):
    """A real Celery worker process (solo pool) on the configured broker and test database.

    Only meaningful with CELERY_BROKER_URL set (CI's PostgreSQL + Redis pass); on the
    default SQLite run the test database is in memory and tasks run eagerly instead.
    """
    if not os.environ.get("CELERY_BROKER_URL"):
        pytest.skip("no CELERY_BROKER_URL: tasks run eagerly (the CI PostgreSQL+Redis pass runs this)")
    queue = f"test-{os.getpid()}-{time.monotonic_ns()}"
    process, log = start_worker(settings, tmp_path, queue)
    from medsite.celery import app

    app.conf.task_always_eager = False
    try:
        yield {"process": process, "log": log, "queue": queue}
    finally:
        app.conf.task_always_eager = True
        stop_worker(process)


@pytest.fixture(autouse=True)
def fresh_labeled_scans():
    """The process keeps each project's labeled scans by project id (similar scans); a
    rolled-back test database hands the same ids to the next test's projects."""
    from ml_backend.services.embeddings import labeled_scans

    labeled_scans._kept.clear()
    yield
    labeled_scans._kept.clear()


@pytest.fixture(autouse=True)
def no_gc_freeze(settings):
    """The test process imports and drops far more than a web process: freezing its objects
    would keep every test's cyclic garbage for the rest of the run (tests/test_gcfreeze.py
    turns it on)."""
    settings.GC_FREEZE_NEW_MODULES = 0


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def synchronous_training_runs(settings):
    """Refits and retrains run inline in the tests (ml_backend/dispatch.py); the tests of
    the background worker thread turn ML_TASKS_IN_THREAD on themselves."""
    settings.ML_TASKS_IN_THREAD = False
    # a spawned worker process could not see the test database: the background tests use
    # the thread (the process mode is measured by bench.label_latency on a real database)
    settings.ML_TASKS_IN_PROCESS = False


@pytest.fixture(autouse=True)
def eager_tasks():
    """Tasks run in-process unless a test asks for ``celery_worker_process``."""
    from medsite.celery import app

    app.conf.task_always_eager = True
    yield


def _import_brain(project, classes=("no_tumor", "pituitary_tumor")):
    from tests.base import FIXTURES

    for name in classes:
        run_import(project, FIXTURES / "brain_mri" / "pool" / name, layout="flat",
                   dataset_name="brain")
        run_import(project, FIXTURES / "brain_mri" / "eval" / name, layout="flat", split="eval",
                   default_label=name, dataset_name="brain")


def import_glioma_round(project, *, n: int | None = None):
    """Two labeled eval classes (glioma, no tumour), the glioma pool folder unlabeled, and a
    random first round (no encoder needed): a label page to open in a few seconds."""
    from ml_backend import services as ml
    from tests.base import FIXTURES

    for cls in ("glioma_tumor", "no_tumor"):
        run_import(project, FIXTURES / "brain_mri" / "eval" / cls, split="eval",
                   default_label=cls, layout="flat")
    run_import(project, FIXTURES / "brain_mri" / "pool" / "glioma_tumor", layout="flat")
    return ml.query_round_create(project=project, strategy="random", n=n)


def brain_truth(scan) -> str:
    """Pool fixtures keep their file names: no_tumor files are 'image-*', pituitary 'p*'."""
    return "no_tumor" if "image" in (scan.source_name or "") else "pituitary_tumor"


@pytest.fixture
def encoded_project(project):
    """Brain-MRI fixture scans (2 classes, eval labeled) with a small SimCLRv2 encoder,
    embeddings and a first (cold-start) query round."""
    from django.core.management import call_command

    from ml_backend import services as ml

    _import_brain(project)
    call_command("pretrain", "--project", project.name, "--epochs", "1", "--image-size", "32",
                 "--batch-size", "32", "--small-input", "no", "--no-progress")
    project.refresh_from_db()
    project.refit_every = 3
    project.query_batch_size = 8
    project.save()
    ml.query_round_create(project=project)
    return project


# --- CI's second pass ------------------------------------------------------------------

# (pytest-django's autouse helpers put django_db_blocker in every test's closure: not here)
DATABASE_FIXTURES = {"db", "transactional_db", "django_db_setup", "live_server",
                     "django_db_reset_sequences", "django_db_serialized_rollback"}


def _uses_the_database(item) -> bool:
    return (item.get_closest_marker("django_db") is not None
            or item.get_closest_marker("worker") is not None
            or item.get_closest_marker("engine") is not None
            or bool(DATABASE_FIXTURES & set(getattr(item, "fixturenames", ()))))


# The tests that start real servers of their own (Label Studio, Chromium, Orthanc) are the
# slowest of the suite: CI runs them once, in its PostgreSQL + Redis pass (the deployment
# they stand for), and its SQLite pass leaves them out with ``-m "not real_server"``.
REAL_SERVER_FOLDERS = ("browser", "label_studio", "pacs")


def _starts_real_servers(item) -> bool:
    parts = Path(str(item.fspath)).parts
    return "tests" in parts and any(folder in parts for folder in REAL_SERVER_FOLDERS)


def pytest_collection_modifyitems(config, items):
    """Marks the real-server tests ``real_server``. With ``MEDLABEL_TESTS_DATABASE_ONLY=1``
    (set by ``.ci/run`` for its PostgreSQL + Redis pass only) runs just the tests that touch
    the suite's database or its Celery broker, and the real-server ones. The rest (the
    pure-ML core, the benchmarks' own tests, the production example that starts its own
    PostgreSQL database in either pass) ran in the SQLite pass on the same code and would
    run identically again; so did the ``sqlite_pass`` tests (network training end to end —
    pretrain, fine-tune, distill, a class network's maps — whose minutes go to torch and
    whose database use is plain ORM that the other PostgreSQL tests cover). ``make test``
    alone runs everything."""
    for item in items:
        if _starts_real_servers(item):
            item.add_marker(pytest.mark.real_server)
    if os.environ.get("MEDLABEL_TESTS_DATABASE_ONLY") != "1":
        return
    kept = [item for item in items
            if (_uses_the_database(item) or item.get_closest_marker("real_server"))
            and item.get_closest_marker("sqlite_pass") is None]
    kept_ids = {id(item) for item in kept}
    dropped = [item for item in items if id(item) not in kept_ids]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
