"""Concurrent readers through the real HTTP endpoints of a gunicorn server (a separate
process, as in production) on this run's database engine: every accepted label stored once,
every reader of a scan keeps their own, double submits and replayed Label Studio events do
not duplicate, no server error. The long run is `python -m bench.concurrency` (8 × 500)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.base import FIXTURES, REPO


@pytest.mark.engine          # its server runs on this run's database (PostgreSQL in CI's 2nd pass)
def test_concurrent_readers_lose_and_duplicate_nothing(tmp_path):
    url = os.environ.get("DATABASE_URL", "")
    if url.startswith("postgres"):
        base, _, _ = url.rpartition("/")
        database = f"{base}/medlabel_concurrency_test_{os.getpid()}_{time.monotonic_ns() % 10**6}"
    else:
        database = "sqlite"
    out = tmp_path / "concurrency.json"
    env = {k: v for k, v in os.environ.items() if k not in ("DJANGO_SETTINGS_MODULE",)}
    done = subprocess.run(
        [sys.executable, "-m", "bench.concurrency", "--clients", "4", "--scans", "30",
         "--source", str(FIXTURES / "brain_mri" / "pool"), "--layout", "class-folders",
         "--database-url", database, "--workers", "2", "--threads", "2", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.exists(), done.stdout[-2000:] + done.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert done.returncode == 0, summary
    assert summary["login_errors"] == [] and summary["server_errors"] == 0, summary
    assert summary["accepted"] == 4 * 30 == summary["stored"], summary
    assert summary["duplicates"] == 0 and summary["lost"] == 0, summary
    assert summary["stored_with_another_class"] == 0
    assert summary["scans_with_all_readers"] == 30          # disagreement is data
    assert summary["double_submits"] > 0
    assert summary["webhook_events"] == 30 == summary["webhook_stored"]
    assert summary["webhook_requests"] > 30 and summary["webhook_duplicates"] == 0
