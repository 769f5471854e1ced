"""Helpers for benchmarks that start a server process on localhost."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time


def throwaway_site_env(workdir, **extra: str) -> dict:
    """The settings of a throw-away site in ``workdir``: its own SQLite database, media,
    artifact and incoming folders, quiet logs. Also put into this process's environment
    (the caller sets Django up on the same site), with no broker: tasks run in-process."""
    env = {"DATABASE_URL": f"sqlite:///{workdir / 'db.sqlite3'}",
           "MEDIA_ROOT": str(workdir / "media"), "ARTIFACTS_ROOT": str(workdir / "artifacts"),
           "INCOMING_ROOT": str(workdir / "incoming"), "DJANGO_SETTINGS_MODULE": "medsite.settings",
           "LOG_LEVEL": "WARNING", "DEBUG": "1", **extra}
    os.environ.update(env)
    os.environ.pop("CELERY_BROKER_URL", None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60.0) -> None:
    """Return once something listens on 127.0.0.1:``port``; raise after ``timeout``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def start_runserver(repo, env: dict, log_path) -> tuple[subprocess.Popen, str]:
    """``manage.py runserver`` on a free loopback port with ``env``, its output to
    ``log_path``; returns the process and its base URL once it listens."""
    port = free_port()
    log = open(log_path, "wb")
    server = subprocess.Popen([sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}",
                               "--noreload"], cwd=repo, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port)
    except RuntimeError:
        server.terminate()
        raise
    return server, f"http://127.0.0.1:{port}"


def open_label_page(playwright, *, chromium: str, base: str, username: str, password: str,
                    project_id: int):
    """Debian's Chromium (headless, never a downloaded browser), logged in as ``username``,
    on the project's next scan to label. Returns ``(browser, page)``."""
    browser = playwright.chromium.launch(
        executable_path=chromium,
        args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(f"{base}/accounts/login/")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: "/accounts/login/" not in url)
    page.goto(f"{base}/projects/{project_id}/next/")
    page.wait_for_function("window.medlabel && document.body.dataset.scan")
    return browser, page


def add_site_options(parser, *, database_name: str, broker: str) -> None:
    """The options of a benchmark that builds a throwaway site: its PostgreSQL server (a
    database ``database_name`` is made on it), its Redis broker, its work folder, the JSON
    it writes and ``--table`` (print the docs' table of a written JSON and exit)."""
    parser.add_argument("--database", default="postgres://postgres@127.0.0.1:5432",
                        help=f"PostgreSQL server (a database {database_name} is made on it "
                        "and dropped after)")
    parser.add_argument("--broker", default=broker)
    parser.add_argument("--workdir", default=None, help="default: a temp folder, removed after")
    parser.add_argument("--out", default=None)
    parser.add_argument("--table", default=None, metavar="FILE",
                        help="print the docs' table of a result file and exit")


def write_result(out: str | None, result: dict) -> None:
    """Write a benchmark's ``result`` as JSON to ``out`` (its folder made), if given."""
    if out:
        import json
        from pathlib import Path

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))
