"""Settings come from the environment through typed helpers."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from django.core.exceptions import ImproperlyConfigured

from medsite.env import env_bool, env_float, env_int, env_list, env_str
from tests.base import REPO


def test_typed_helpers(monkeypatch):
    monkeypatch.setenv("X_BOOL", "yes")
    monkeypatch.setenv("X_INT", "42")
    monkeypatch.setenv("X_LIST", "a, b,,c")
    assert env_bool("X_BOOL") is True
    assert env_int("X_INT", 1) == 42
    assert env_list("X_LIST", []) == ["a", "b", "c"]
    assert env_str("X_MISSING", "d") == "d"
    monkeypatch.setenv("X_BOOL", "maybe")
    with pytest.raises(ImproperlyConfigured, match="X_BOOL='maybe' is not a boolean"):
        env_bool("X_BOOL")
    monkeypatch.setenv("X_INT", "ten")
    with pytest.raises(ImproperlyConfigured, match="not an integer"):
        env_int("X_INT", 1)
    monkeypatch.setenv("X_INT", "-1")
    with pytest.raises(ImproperlyConfigured, match="at least 0"):
        env_int("X_INT", 1, minimum=0)
    with pytest.raises(ImproperlyConfigured, match="X_REQ is required"):
        env_str("X_REQ", required=True)
    monkeypatch.setenv("X_FLOAT", "0.25")
    assert env_float("X_FLOAT", 0.5, minimum=0.0, maximum=1.0) == 0.25
    assert env_float("X_FLOAT_MISSING", 0.5) == 0.5
    for bad, message in (("half", "not a number"), ("1.5", r"within \[0.0, 1.0\]"),
                         ("nan", "within")):
        monkeypatch.setenv("X_FLOAT", bad)
        with pytest.raises(ImproperlyConfigured, match=message):
            env_float("X_FLOAT", 0.5, minimum=0.0, maximum=1.0)


def _settings_in_subprocess(**env):
    clean = {k: v for k, v in os.environ.items()
             if k not in ("DEBUG", "SECRET_KEY", "DEID_SALT", "DATABASE_URL", "CELERY_BROKER_URL")}
    code = ("import django, os; os.environ['DJANGO_SETTINGS_MODULE']='medsite.settings'; "
            "from django.conf import settings; "
            "print(settings.DATABASES['default']['ENGINE'], settings.CELERY_TASK_ALWAYS_EAGER)")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**clean, **env},
                          capture_output=True, text=True)


def test_defaults_run_with_no_environment():
    result = _settings_in_subprocess()
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["django.db.backends.sqlite3", "True"]


def test_with_no_broker_tasks_run_here_and_nothing_dials_a_broker():
    """The demo has no broker: a task queued runs in this process, and Celery's eager path
    gets kombu's in-memory transport, not an AMQP connection to localhost (whose "No
    hostname was supplied" warning used to greet every first refit)."""
    clean = {k: v for k, v in os.environ.items() if k != "CELERY_BROKER_URL"}
    code = ("import django, logging, os\n"
            "os.environ['DJANGO_SETTINGS_MODULE'] = 'medsite.settings'\n"
            "django.setup()\nlogging.basicConfig(level=logging.WARNING)\n"
            "from celery import shared_task\nfrom medsite.celery import app\n"
            "@shared_task(name='probe')\ndef probe():\n    return 42\n"
            "print(probe.delay().get(), app.connection_for_write().as_uri())\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=clean,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    answer, broker = result.stdout.split()
    assert answer == "42" and broker.startswith("memory://"), result.stdout
    assert "No hostname" not in result.stderr, result.stderr


def test_broker_and_database_from_env():
    result = _settings_in_subprocess(DATABASE_URL="postgres://u@127.0.0.1:5432/x",
                                     CELERY_BROKER_URL="redis://127.0.0.1:6379/0")
    assert result.stdout.split() == ["django.db.backends.postgresql", "False"], result.stderr


def test_a_postgresql_that_does_not_answer_is_given_up_in_seconds():
    """psycopg waits 130 s for a connection by default, and an open connection whose peer
    vanished waited for ever (tenth probe): a connect timeout and TCP keepalives."""
    clean = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL",)}
    code = ("import os; os.environ['DJANGO_SETTINGS_MODULE']='medsite.settings'; "
            "from django.conf import settings; o = settings.DATABASES['default']['OPTIONS']; "
            "print(o['connect_timeout'], o['keepalives'], o['keepalives_idle'])")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, env={**clean, "DATABASE_URL": "postgres://u@h:5432/x"})
    assert result.stdout.split() == ["10", "1", "30"], result.stderr
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, env={**clean, "DATABASE_URL": "postgres://u@h:5432/x",
                                            "DB_CONNECT_TIMEOUT": "3"})
    assert result.stdout.split()[0] == "3", result.stderr


@pytest.mark.parametrize("env,message", [
    ({"DEBUG": "0"}, "SECRET_KEY is required"),
    ({"DEBUG": "0", "SECRET_KEY": "x" * 50}, "DEID_SALT is required"),
    ({"DEBUG": "0", "SECRET_KEY": "x" * 50, "DEID_SALT": "short"}, "at least 16"),
    ({"DEBUG": "perhaps"}, "not a boolean"),
    ({"DATABASE_URL": "nonsense://"}, "DATABASE_URL"),
    ({"MEDLABEL_EMBED_SCALES": "1,3,2"}, "each dividing the largest"),
    ({"MEDLABEL_EMBED_SCALES": "one"}, "MEDLABEL_EMBED_SCALES"),
    ({"MEDLABEL_EMBED_LAYERS": "2,3"}, "include 4"),
    ({"MEDLABEL_EMBED_LAYERS": "4,5"}, "MEDLABEL_EMBED_LAYERS"),
    ({"PACS_PULL_MINUTES": "60", "PACS_PULL_QUERY": ""}, "PACS_PULL_QUERY is set but empty"),
    ({"CACHE_URL": "memcached://127.0.0.1:11211"}, "CACHE_URL='memcached"),
    ({"TIME_ZONE": "Mars/Olympus"}, "TIME_ZONE='Mars/Olympus' is not a time zone name"),
    ({"TIME_ZONE": "UTC+3"}, "TIME_ZONE='UTC+3'"),
    ({"TIME_ZONE": "../../etc/passwd"}, "is not a time zone name"),
])
def test_bad_production_config_fails_at_start(env, message):
    result = _settings_in_subprocess(**env)
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr and message in result.stderr


def test_check_deploy_with_production_settings_gives_no_warnings():
    """Issue 7: `manage.py check --deploy` is clean once DEBUG is off (secure cookies, HSTS,
    SSL redirect behind the proxy header, CSRF on every form)."""
    clean = {k: v for k, v in os.environ.items()
             if k not in ("DEBUG", "SECRET_KEY", "DEID_SALT", "DATABASE_URL", "CELERY_BROKER_URL",
                          "LABEL_STUDIO_WEBHOOK_SECRET") and not k.startswith("DJANGO_ALLOW")}
    env = {**clean, "DEBUG": "0", "SECRET_KEY": "k" * 20 + "-Production-Secret-Key-0123456789",
           "DEID_SALT": "a-long-deid-salt-for-production", "ALLOWED_HOSTS": "labels.example.org",
           "LABEL_STUDIO_WEBHOOK_SECRET": "w" * 40, "CACHE_URL": "redis://127.0.0.1:6379/15"}
    check = [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"]
    result = subprocess.run(check, cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout
    # each web process counting API calls on its own is flagged (the per-user limit would be
    # multiplied by the number of processes)
    env.pop("CACHE_URL")
    result = subprocess.run(check, cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "medlabel.W002" in result.stdout + result.stderr
