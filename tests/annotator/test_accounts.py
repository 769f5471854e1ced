"""Accounts: failed sign-ins are throttled per username (django-axes,
a 429 with the reason, cleared by an admin or by time), readers change their own password on
a site page, and a changed password revokes the API token."""

from __future__ import annotations

from datetime import timedelta

import pytest
from axes.models import AccessAttempt
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from rest_framework.authtoken.models import Token

from tests.base import PASSWORD

NEW_PASSWORD = "another-long-passphrase-42"


@pytest.fixture
def lockout_on(settings):
    settings.AXES_ENABLED = True
    settings.AXES_FAILURE_LIMIT = 5
    settings.AXES_COOLOFF_TIME = timedelta(minutes=15)
    settings.LOGIN_PROXY_COUNT = 0
    return settings


def sign_in(client, username, password, **extra):
    return client.post(reverse("login"), {"username": username, "password": password}, **extra)


def signed_in(client) -> bool:
    return client.get(reverse("annotator:project_list")).status_code == 200


def test_five_failed_sign_ins_lock_the_username_until_cleared(lockout_on, users):
    client = Client()
    for _ in range(4):
        response = sign_in(client, "alice", "wrong")
        assert response.status_code == 200 and "did not match" in response.content.decode()
    fifth = sign_in(client, "alice", "wrong")
    assert fifth.status_code == 429
    # the right password is refused too, with the reason and when to try again
    right = sign_in(client, "alice", PASSWORD)
    body = right.content.decode()
    assert right.status_code == 429, body
    assert "Too many failed sign-ins; try again in 15 minutes" in body
    assert right["Retry-After"] == "900"
    assert not signed_in(client)
    # the username is locked from every address, on the admin's sign-in page too, and a
    # script gets the reason as JSON; a colleague at the same address (one hospital behind
    # one NAT address) still signs in
    assert sign_in(Client(REMOTE_ADDR="10.1.2.3"), "alice", PASSWORD).status_code == 429
    assert sign_in(Client(), "bob", PASSWORD).status_code == 302
    admin = Client().post("/admin/login/", {"username": "alice", "password": PASSWORD})
    assert admin.status_code == 429
    script = sign_in(Client(), "alice", PASSWORD, headers={"Accept": "application/json"})
    assert script.status_code == 429 and "try again in 15 minutes" in script.json()["error"]
    # tries while locked do not extend it; an admin clears it
    assert AccessAttempt.objects.get(username="alice").failures_since_start == 5
    call_command("axes_reset_username", "alice")
    assert sign_in(client, "alice", PASSWORD).status_code == 302 and signed_in(client)


def test_the_lock_ends_after_the_cool_off_and_says_how_long_is_left(lockout_on, users):
    client = Client()
    for _ in range(5):
        sign_in(client, "bob", "wrong")
    AccessAttempt.objects.update(attempt_time=timezone.now() - timedelta(minutes=13, seconds=30))
    assert "try again in 2 minutes" in sign_in(client, "bob", PASSWORD).content.decode()
    AccessAttempt.objects.update(attempt_time=timezone.now() - timedelta(minutes=16))
    assert sign_in(client, "bob", PASSWORD).status_code == 302 and signed_in(client)


def test_behind_the_proxy_each_attempt_records_the_clients_address(lockout_on, users):
    """With LOGIN_PROXY_COUNT=1 every request comes from the proxy (127.0.0.1): the attempt
    records the address the proxy appended, never one the client put in front of it, and
    one client's failures on other usernames lock no one else out."""
    lockout_on.LOGIN_PROXY_COUNT = 1
    attacker = Client(HTTP_X_FORWARDED_FOR="203.0.113.9")
    for name in ("x1", "x2", "x3", "x4", "x5"):
        sign_in(attacker, name, "wrong")
    assert set(AccessAttempt.objects.values_list("ip_address", flat=True)) == {"203.0.113.9"}
    colleague = Client(HTTP_X_FORWARDED_FOR="198.51.100.7")
    assert sign_in(colleague, "alice", PASSWORD).status_code == 302
    # a value the client put in front of the proxy's is not believed
    spoofed = Client(HTTP_X_FORWARDED_FOR="198.51.100.7, 203.0.113.9")
    sign_in(spoofed, "charlie", "wrong")
    assert AccessAttempt.objects.get(username="charlie").ip_address == "203.0.113.9"
    # what is not an address counts as the proxy's (not a 500 from the database's inet column)
    junk = Client(HTTP_X_FORWARDED_FOR="not-an-address")
    assert sign_in(junk, "bob", "wrong").status_code == 200
    assert AccessAttempt.objects.get(username="bob").ip_address == "127.0.0.1"


def test_a_reader_changes_their_own_password(users, client):
    url = reverse("password_change")
    assert client.get(url)["Location"].startswith(reverse("login"))
    assert client.login(username="alice", password=PASSWORD)
    page = client.get(url)
    assert page.status_code == 200 and 'name="old_password"' in page.content.decode()
    assert url in client.get(reverse("annotator:account")).content.decode()   # linked
    wrong_old = client.post(url, {"old_password": "nope", "new_password1": NEW_PASSWORD,
                                  "new_password2": NEW_PASSWORD})
    assert wrong_old.status_code == 200
    assert "Your old password was entered incorrectly" in wrong_old.content.decode()
    weak = client.post(url, {"old_password": PASSWORD, "new_password1": "password",
                             "new_password2": "password"})
    assert weak.status_code == 200 and "This password is too common" in weak.content.decode()
    users["alice"].refresh_from_db()
    assert users["alice"].check_password(PASSWORD)
    done = client.post(url, {"old_password": PASSWORD, "new_password1": NEW_PASSWORD,
                             "new_password2": NEW_PASSWORD})
    assert done.status_code == 302 and done["Location"] == reverse("password_change_done")
    assert "Password changed" in client.get(done["Location"]).content.decode()
    assert signed_in(client)      # this session stays signed in
    client.logout()
    assert sign_in(client, "alice", PASSWORD).status_code == 200 and not signed_in(client)
    assert sign_in(client, "alice", NEW_PASSWORD).status_code == 302 and signed_in(client)


def api_status(key: str) -> int:
    return Client(HTTP_AUTHORIZATION=f"Token {key}").get("/api/v1/projects/").status_code


def test_a_password_change_revokes_the_api_token(users, client):
    key = Token.objects.create(user=users["bob"]).key
    assert client.login(username="bob", password=PASSWORD)   # signing in keeps it
    assert api_status(key) == 200
    client.post(reverse("password_change"), {"old_password": PASSWORD,
                                             "new_password1": NEW_PASSWORD,
                                             "new_password2": NEW_PASSWORD})
    assert api_status(key) == 401 and not Token.objects.filter(user=users["bob"]).exists()


def test_an_admin_or_a_script_changing_the_password_revokes_the_token_too(users):
    alice = users["alice"]
    key = Token.objects.create(user=alice).key
    admin = Client()
    admin.force_login(users["dora"])
    response = admin.post(f"/admin/auth/user/{alice.pk}/password/",
                          {"password1": NEW_PASSWORD, "password2": NEW_PASSWORD})
    assert response.status_code == 302
    assert api_status(key) == 401
    key = Token.objects.create(user=alice).key
    alice.refresh_from_db()
    alice.first_name = "Alice"
    alice.save()                                   # another change keeps it
    assert api_status(key) == 200
    alice.set_password(PASSWORD)                   # what `manage.py changepassword` does
    alice.save()
    assert api_status(key) == 401


def test_disabling_password_sign_in_revokes_the_token(users):
    """The admin's "disable password-based authentication" (``set_unusable_password``) ends
    the API token as a new password does; a later save of the disabled user keeps a new one."""
    charlie = users["charlie"]
    key = Token.objects.create(user=charlie).key
    admin = Client()
    admin.force_login(users["dora"])
    response = admin.post(f"/admin/auth/user/{charlie.pk}/password/",
                          {"usable_password": "false", "unset-password": "1"})
    assert response.status_code == 302, response.content.decode()[:2000]
    charlie.refresh_from_db()
    assert not charlie.has_usable_password()
    assert api_status(key) == 401
    key = Token.objects.create(user=charlie).key
    charlie.set_unusable_password()               # already disabled: nothing changes
    charlie.save()
    charlie.last_name = "Ch"
    charlie.save(update_fields=["last_name"])
    assert api_status(key) == 200


def test_guessing_the_old_password_on_the_password_page_is_throttled(lockout_on, users):
    """A session left open cannot be used to guess its user's password: a wrong old password
    counts as a failed sign-in (the attempt records no password), the fifth locks the username
    on the password page and the sign-in page alike, and the right one is then not checked."""
    client = Client()
    assert sign_in(client, "alice", PASSWORD).status_code == 302
    url = reverse("password_change")
    form = {"new_password1": NEW_PASSWORD, "new_password2": NEW_PASSWORD}
    for _ in range(4):
        response = client.post(url, {"old_password": "guess", **form})
        assert response.status_code == 200
        assert "Your old password was entered incorrectly" in response.content.decode()
    fifth = client.post(url, {"old_password": "guess", **form})
    body = fifth.content.decode()
    assert fifth.status_code == 429 and "Too many failed sign-ins" in body
    assert 'name="old_password"' in body             # the password page, not the sign-in one
    right = client.post(url, {"old_password": PASSWORD, **form})
    assert right.status_code == 429 and "try again in 15 minutes" in right.content.decode()
    users["alice"].refresh_from_db()
    assert users["alice"].check_password(PASSWORD)
    assert sign_in(Client(), "alice", PASSWORD).status_code == 429
    attempt = AccessAttempt.objects.get(username="alice")
    assert attempt.failures_since_start == 5
    assert "guess" not in attempt.post_data and NEW_PASSWORD not in attempt.post_data
    call_command("axes_reset_username", "alice")
    done = client.post(url, {"old_password": PASSWORD, **form})
    assert done.status_code == 302


def test_the_admins_password_page_counts_wrong_old_passwords_too(lockout_on, users):
    client = Client()
    assert client.post("/admin/login/", {"username": "dora", "password": PASSWORD}
                       ).status_code == 302
    form = {"new_password1": NEW_PASSWORD, "new_password2": NEW_PASSWORD}
    for _ in range(4):
        assert client.post("/admin/password_change/", {"old_password": "guess", **form}
                           ).status_code == 200
    assert client.post("/admin/password_change/", {"old_password": "guess", **form}
                       ).status_code == 429
    assert client.post("/admin/password_change/", {"old_password": PASSWORD, **form}
                       ).status_code == 429
    users["dora"].refresh_from_db()
    assert users["dora"].check_password(PASSWORD)
    call_command("axes_reset_username", "dora")
    done = client.post("/admin/password_change/", {"old_password": PASSWORD, **form})
    assert done.status_code == 302 and done["Location"] == "/admin/password_change/done/"
