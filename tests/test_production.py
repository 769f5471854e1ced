"""The production example in README runs as plain processes on one machine: deploy/run.sh
starts gunicorn, a Celery worker per queue (default, refit, train) and beat on PostgreSQL + Redis
with DEBUG off; the site answers with secure headers, and work reaches both queues."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from tests.base import FIXTURES, REPO


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


@pytest.fixture
def production(tmp_path):
    if not (_reachable("127.0.0.1", 5432) and _reachable("127.0.0.1", 6379)):
        pytest.fail("the production example needs PostgreSQL on 127.0.0.1:5432 and Redis on "
                    "127.0.0.1:6379 (.ci/run starts them)")
    import psycopg

    name = f"medlabel_production_test_{os.getpid()}"
    admin = "postgres://postgres@127.0.0.1:5432/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    port = _free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DJANGO", "DATABASE", "CELERY", "DEBUG", "SECRET", "DEID",
                                "LABEL_STUDIO"))}
    env.update({
        "DEBUG": "0", "SECRET_KEY": "production-test-" + "s" * 40,
        "DEID_SALT": "production-test-deid-salt", "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "LABEL_STUDIO_WEBHOOK_SECRET": "w" * 40,
        "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/{name}",
        "CELERY_BROKER_URL": f"redis://127.0.0.1:6379/{3 + os.getpid() % 10}",
        "MEDIA_ROOT": str(tmp_path / "shared" / "media"),
        "ARTIFACTS_ROOT": str(tmp_path / "shared" / "artifacts"),
        "INCOMING_ROOT": str(tmp_path / "shared" / "incoming"),
        "STATIC_ROOT": str(tmp_path / "static"), "RUN_DIR": str(tmp_path / "run"),
        "PORT": str(port), "WEB_WORKERS": "2", "PYTHON": sys.executable,
        "RETRAIN_EVERY_HOURS": "24"})
    start = subprocess.run(["bash", "deploy/run.sh", "start"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        deadline = time.monotonic() + 60
        while not _reachable("127.0.0.1", port):
            assert time.monotonic() < deadline, "gunicorn did not start"
            time.sleep(0.3)
        yield {"env": env, "port": port, "run": tmp_path / "run"}
    finally:
        subprocess.run(["bash", "deploy/run.sh", "stop"], cwd=REPO, env=env,
                       capture_output=True, timeout=60)
        time.sleep(1)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def manage(env, code: str) -> str:
    done = subprocess.run([sys.executable, "manage.py", "shell", "--no-imports", "-c", code],
                          cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def wait_for(env, code: str, expected: str, timeout: float, logs) -> None:
    deadline = time.monotonic() + timeout
    while True:
        value = manage(env, code)
        if value == expected:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{code!r} gave {value!r}, not {expected!r}\n"
                                 + "\n".join(p.read_text()[-2000:] for p in logs))
        time.sleep(1)


def test_plain_process_production_example(production):
    import requests

    env, port, run = production["env"], production["port"], production["run"]
    base = f"http://127.0.0.1:{port}"
    # a gunicorn worker loads the app (Django, torch) on its first request: allow for a
    # busy machine before asserting anything
    deadline = time.monotonic() + 180
    while True:
        try:
            requests.get(f"{base}/accounts/login/", headers={"X-Forwarded-Proto": "https"},
                         timeout=60)
            break
        except requests.RequestException:
            assert time.monotonic() < deadline, "gunicorn never answered"
            time.sleep(1)
    plain = requests.get(f"{base}/accounts/login/", allow_redirects=False, timeout=60)
    assert plain.status_code == 301 and plain.headers["Location"].startswith("https://")
    page = requests.get(f"{base}/accounts/login/", headers={"X-Forwarded-Proto": "https"},
                        timeout=60)
    assert page.status_code == 200 and "csrfmiddlewaretoken" in page.text
    assert "max-age=31536000" in page.headers["Strict-Transport-Security"]
    assert page.headers["X-Frame-Options"] == "DENY"
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert "Secure" in page.headers["Set-Cookie"] and "csrftoken" in page.headers["Set-Cookie"]
    assert requests.get(f"{base}/projects/1/", headers={"X-Forwarded-Proto": "https"},
                        allow_redirects=False, timeout=60).status_code == 302   # login first

    # an import goes to the `default` worker, a training run to the `train` worker
    logs = [run / "worker-default.log", run / "worker-refit.log", run / "worker-train.log",
            run / "beat.log"]
    job_id = manage(env, (
        "from annotator import services; from annotator.tasks import run_import_job; "
        "p = services.project_create(name='prod'); "
        f"j = services.import_job_create(project=p, source='{FIXTURES / 'chest_xray' / 'eval'}', "
        "split='eval'); run_import_job.delay(j.pk); print(j.pk)"))
    wait_for(env, f"from annotator.models import ImportJob; print(ImportJob.objects.get(pk={job_id}).status)",
             "succeeded", 120, logs)
    run_id = manage(env, (
        "from annotator.models import Project; from ml_backend import services as ml; "
        "r = ml.training_run_create(project=Project.objects.get(name='prod'), kind='pretrain', "
        "params={'epochs': 1, 'image_size': 32, 'batch_size': 32, 'small_input': False}, "
        "enqueue=True); print(r.pk)"))
    wait_for(env, f"from ml_backend.models import TrainingRun; print(TrainingRun.objects.get(pk={run_id}).status)",
             "succeeded", 240, logs)
    # an embedding run (like a refit) goes to the `refit` worker, never behind training
    embed_id = manage(env, (
        "from annotator.models import Project; from ml_backend import services as ml; "
        "r = ml.training_run_create(project=Project.objects.get(name='prod'), kind='embed', "
        "enqueue=True); print(r.pk)"))
    wait_for(env, f"from ml_backend.models import TrainingRun; print(TrainingRun.objects.get(pk={embed_id}).status)",
             "succeeded", 120, logs)
    default_log = (run / "worker-default.log").read_text()
    refit_log = (run / "worker-refit.log").read_text()
    train_log = (run / "worker-train.log").read_text()
    assert "Task annotator.tasks.run_import_job[" in default_log
    assert "Task ml_backend.tasks.run_training[" in train_log
    assert "Task ml_backend.tasks.run_training[" in refit_log
    assert "Task ml_backend.tasks.run_training[" not in default_log
    status = subprocess.run(["bash", "deploy/run.sh", "status"], cwd=REPO, env=env,
                            capture_output=True, text=True).stdout
    assert status.count("running (pid") == 5, status
    assert "beat: Starting" in (run / "beat.log").read_text()
