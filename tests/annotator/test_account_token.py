""""Make a token" on /account/ clicked many times at once (a double click, two tabs): every
request ends in a redirect, never a 500 (the sixth probe: 1 of 20 concurrent POSTs failed on
UNIQUE authtoken_token.user_id), the user ends with one token, and the page shows that one:
the key it shows is the one the API accepts.

The requests run in threads, each on its own database connection. On PostgreSQL they run on
the test database. The SQLite test database is in memory, shared between threads through a
cache that refuses a second writer at once ("database table is locked") where a database file
waits its turn (settings: IMMEDIATE transactions, a 30 s timeout); so on SQLite the same
requests run in a child process on a file, as the site runs (``python -m
tests.annotator.test_account_token <folder>``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from django.db import connection
from django.test import Client
from django.urls import reverse

from tests.base import PASSWORD, REPO

pytestmark = pytest.mark.django_db(transaction=True)

REQUESTS = 20
LONG_AGO = "2020-01-01T00:00:00Z"
# who clicks what, all at once; whether they had a token (made long ago) before
SCENARIOS = {
    "make": ("alice", ["token"] * REQUESTS, False),
    "replace": ("bob", ["token"] * REQUESTS, True),
    "make_and_revoke": ("charlie", ["token", "revoke"] * (REQUESTS // 2), False),
}


def api_status(key: str) -> int:
    return Client(HTTP_AUTHORIZATION=f"Token {key}").get("/api/v1/projects/").status_code


def shown_key(page: str) -> str | None:
    found = re.search(r'<code id="api-token">([0-9a-f]+)</code>', page)
    return found.group(1) if found else None


def post_at_once(session: Client, actions: list[str]) -> list:
    """A POST of each of ``actions`` to /account/ from ``session``'s browser session (one
    signed-in user), released together; each one's status code, or the exception it raised."""
    from django.conf import settings

    url = reverse("annotator:account")
    cookie = session.cookies[settings.SESSION_COOKIE_NAME].value
    barrier = threading.Barrier(len(actions))
    results: list = []

    def post(action: str) -> None:
        client = Client()
        client.cookies[settings.SESSION_COOKIE_NAME] = cookie
        try:
            barrier.wait(timeout=60)
            results.append(client.post(url, {"action": action}).status_code)
        except Exception as exc:   # noqa: BLE001 - reported: the test's failure
            results.append(f"{type(exc).__name__}: {exc}")
        finally:
            connection.close()

    threads = [threading.Thread(target=post, args=(action,)) for action in actions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def scenario(username: str, actions: list[str], had_token: bool) -> dict:
    """Run one of SCENARIOS; what came of it, as JSON."""
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token

    user, _ = get_user_model().objects.get_or_create(username=username)
    old = None
    if had_token:
        old = Token.objects.create(user=user).key
        Token.objects.filter(key=old).update(created=LONG_AGO)     # not a click ago
    session = Client()
    session.force_login(user)
    results = post_at_once(session, actions)
    keys = list(Token.objects.filter(user=user).values_list("key", flat=True))
    shown = shown_key(session.get(reverse("annotator:account")).content.decode())
    asked = {k for k in [*keys, shown, old] if k}
    return {"results": results, "keys": keys, "shown": shown, "old": old,
            "api": {k: api_status(k) for k in asked}}


@pytest.fixture(scope="module")
def on_a_file(tmp_path_factory) -> dict | None:
    """SQLite: every scenario, once, in a child process on a database file (module
    docstring); None on PostgreSQL, where the tests run them on the test database."""
    if connection.vendor != "sqlite":
        return None
    folder = tmp_path_factory.mktemp("token-race")
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "medsite.settings",
           "DATABASE_URL": f"sqlite:///{folder / 'db.sqlite3'}",
           "MEDIA_ROOT": str(folder / "media"), "INCOMING_ROOT": str(folder / "incoming"),
           "ARTIFACTS_ROOT": str(folder / "artifacts")}
    done = subprocess.run([sys.executable, "-m", "tests.annotator.test_account_token",
                           str(folder)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads((folder / "out.json").read_text())


@pytest.fixture
def race(on_a_file, users):
    def run(name: str) -> dict:
        return on_a_file[name] if on_a_file is not None else scenario(*SCENARIOS[name])
    return run


def test_many_make_token_clicks_at_once_end_with_one_working_token(race):
    done = race("make")
    assert done["results"] == [302] * REQUESTS, done["results"]
    assert len(done["keys"]) == 1
    assert done["shown"] == done["keys"][0]
    assert done["api"][done["shown"]] == 200


def test_replacing_a_token_many_times_at_once_keeps_one_new_one_that_works(race):
    """"Replace it" clicked over and over: the old token stops working, exactly one new one
    is left, and it is the one shown."""
    done = race("replace")
    assert done["results"] == [302] * REQUESTS, done["results"]
    assert len(done["keys"]) == 1 and done["keys"][0] != done["old"]
    assert done["shown"] == done["keys"][0]
    assert done["api"][done["old"]] == 401 and done["api"][done["shown"]] == 200


def test_make_and_revoke_at_once_never_fail(race):
    """Both buttons clicked at once: no 500; at most one token is left, and it works."""
    done = race("make_and_revoke")
    assert done["results"] == [302] * REQUESTS, done["results"]
    assert len(done["keys"]) <= 1
    assert all(done["api"][key] == 200 for key in done["keys"])


def test_make_a_token_replace_it_and_revoke_it_one_at_a_time(users):
    """Without concurrency the page does what it says: a new key is shown once; "Replace it"
    a while later makes a new key (the old stops working); at once after, it keeps the key
    and says so; "Revoke it" deletes it."""
    from rest_framework.authtoken.models import Token

    alice = Client()
    assert alice.login(username="alice", password=PASSWORD)
    url = reverse("annotator:account")
    assert alice.post(url, {"action": "token"}).status_code == 302
    first = shown_key(alice.get(url).content.decode())
    assert first and api_status(first) == 200
    assert shown_key(alice.get(url).content.decode()) is None        # shown only once
    Token.objects.filter(key=first).update(created=LONG_AGO)
    assert alice.post(url, {"action": "token"}).status_code == 302
    second = shown_key(alice.get(url).content.decode())
    assert second and second != first
    assert api_status(first) == 401 and api_status(second) == 200
    again = alice.post(url, {"action": "token"}, follow=True).content.decode()
    assert shown_key(again) == second and "made seconds ago" in again
    assert alice.post(url, {"action": "revoke"}).status_code == 302
    assert not Token.objects.filter(user=users["alice"]).exists()
    assert api_status(second) == 401


if __name__ == "__main__":          # the SQLite runs of ``on_a_file``, in their own process
    import django

    django.setup()
    from django.core.management import call_command
    from django.test.utils import setup_test_environment

    setup_test_environment()
    call_command("migrate", verbosity=0)
    out = {name: scenario(*args) for name, args in SCENARIOS.items()}
    Path(sys.argv[1], "out.json").write_text(json.dumps(out))
