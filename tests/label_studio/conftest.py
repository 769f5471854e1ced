"""A real Label Studio 1.23.2 server for the sync tests, from its own virtualenv.

The virtualenv is cached at LABEL_STUDIO_VENV (default ~/.cache/medlabel/label-studio-1.23.2)
and created with pip on first use; the server gets a throw-away data dir and the environment
from ../shared/docs/LABEL_STUDIO.md, and is stopped by its pid at the end of the session.
If it cannot be installed or started, the tests fail loudly (never skip).
"""

from __future__ import annotations

import fcntl
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

VERSION = "1.23.2"
VENV = Path(os.environ.get("LABEL_STUDIO_VENV",
                           Path.home() / ".cache" / "medlabel" / f"label-studio-{VERSION}"))
ADMIN_EMAIL = "admin@example.com"


# What label-studio's own requirements leave open and a newer release broke: sentry-sdk 3.0
# dropped an option Label Studio 1.23.2 passes at start-up ("Unknown option
# 'send_default_pii'"). Pinned here; a cached virtualenv made by another recipe is remade.
PINNED = ["sentry-sdk==2.76.0"]
RECIPE = " ".join([f"label-studio=={VERSION}", *PINNED])


def _installed() -> bool:
    marker = VENV / ".medlabel-installed"
    return ((VENV / "bin" / "label-studio").exists() and marker.exists()
            and marker.read_text().strip() == RECIPE)


def _install() -> None:
    VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(VENV.parent / f".label-studio-{VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)          # one installer at a time
        if _installed():
            return
        python = getattr(sys, "_base_executable", sys.executable)
        steps = [[python, "-m", "venv", "--clear", str(VENV)],
                 [str(VENV / "bin" / "pip"), "install", "--quiet", f"label-studio=={VERSION}",
                  *PINNED]]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, timeout=1200)
            if done.returncode != 0:
                pytest.fail(f"could not install label-studio=={VERSION} into {VENV} "
                            f"({' '.join(step[:3])} …):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        (VENV / ".medlabel-installed").write_text(RECIPE)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def label_studio_server(tmp_path_factory):
    if not _installed():
        _install()
    data = tmp_path_factory.mktemp("label-studio-data")
    port = _free_port()
    token = secrets.token_hex(20)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("DJANGO", "DATABASE"))},
           "LABEL_STUDIO_BASE_DATA_DIR": str(data),
           "LABEL_STUDIO_USERNAME": ADMIN_EMAIL,
           "LABEL_STUDIO_PASSWORD": secrets.token_urlsafe(12),
           "LABEL_STUDIO_USER_TOKEN": token,
           "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
           "LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "false",
           "LABEL_STUDIO_SSRF_PROTECTION_ENABLED": "false",
           "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true"}
    log = data / "server.log"
    process = subprocess.Popen(
        [str(VENV / "bin" / "label-studio"), "start", "--no-browser", "--port", str(port),
         "--internal-host", "127.0.0.1", "--data-dir", str(data)],
        env=env, cwd=data, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"Label Studio exited ({process.returncode}):\n"
                            f"{log.read_text(errors='replace')[-4000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"Label Studio did not answer /health within 300 s:\n"
                            f"{log.read_text(errors='replace')[-4000:]}")
            time.sleep(1)
        yield {"url": url, "token": token, "pid": process.pid, "log": log}
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture
def linked_settings(settings, live_server, label_studio_server):
    """This site linked to the real Label Studio server, as an operator configures it."""
    settings.SITE_URL = live_server.url
    settings.LABEL_STUDIO_URL = label_studio_server["url"]
    settings.LABEL_STUDIO_API_KEY = label_studio_server["token"]
    settings.LABEL_STUDIO_WEBHOOK_SECRET = "test-webhook-secret"
    return settings


ML_AUTH = "labelstudio:ml-backend-test-password"


@pytest.fixture(autouse=True)
def ml_backend_password(settings):
    """As in production: the /ml/ endpoints need HTTP Basic auth (the sync registers it)."""
    settings.ML_BACKEND_BASIC_AUTH = ML_AUTH
    return ML_AUTH


def ml_client():
    import base64

    from django.test import Client

    token = base64.b64encode(ML_AUTH.encode()).decode()
    return Client(headers={"Authorization": f"Basic {token}"})
