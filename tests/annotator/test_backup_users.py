"""Users are matched by username, but not silently across people: a backup's user whose
username is taken here by an account with another e-mail address refuses the restore
(before anything is written), naming both addresses, unless --same-users says they are the
same people (the tenth probe: another hospital's "clinician" restored as the local
clinician, made admin of the project and credited with its answers, without a word)."""

from __future__ import annotations

import io

import pytest
from django.core.management import CommandError, call_command

from annotator.models import Annotation, Project
from tests.annotator import test_backup_restore
from tests.annotator.test_backup_restore import (
    repack,
    restore,
    world,
)

pytestmark = pytest.mark.django_db

backed_up = test_backup_restore.backed_up      # the archive fixture, shared

ELSEWHERE = "someone.else@other-hospital.org"


def alice_is(email, role="admin"):
    def mutate(m):
        m["users"]["alice"] = {"email": email, "role": role}
    return mutate


def test_a_user_with_another_e_mail_refuses_the_restore_unless_they_are_the_same(
        backed_up, users, settings, tmp_path):
    _, archive = backed_up
    crafted = repack(archive, tmp_path / "users.tar.gz", alice_is(ELSEWHERE))
    before = world(settings)
    with pytest.raises(CommandError) as refused:
        call_command("project_import", str(crafted), name="Other hospital", no_embed=True)
    said = str(refused.value)
    assert f"alice ({ELSEWHERE} in the backup, alice@example.org here)" in said
    assert "nothing was restored" in said and "--same-users" in said
    assert world(settings) == before

    # the same people: credited to the local account, with the backup's role, and said
    out = io.StringIO()
    call_command("project_import", str(crafted), "--same-users", name="Other hospital",
                 no_embed=True, stdout=out)
    out = out.getvalue()
    assert f"warning: --same-users: the backup's user(s) alice ({ELSEWHERE}" in out
    assert "their roles in the restored project (alice: admin)" in out
    copy = Project.objects.get(name="Other hospital")
    assert copy.role_of(users["alice"]) == "admin"
    assert Annotation.objects.filter(project=copy, reader=users["alice"]).exists()
    users["alice"].refresh_from_db()
    assert users["alice"].email == "alice@example.org"          # the account is not changed


@pytest.mark.parametrize("email", ["ALICE@Example.org", ""])
def test_the_same_e_mail_in_any_case_or_none_restores_as_before(backed_up, users, tmp_path,
                                                                email):
    _, archive = backed_up
    copy, out = restore(repack(archive, tmp_path / "same.tar.gz", alice_is(email, "clinician")),
                        "Same people")
    assert "--same-users" not in out
    assert Annotation.objects.get(project=copy).reader == users["alice"]
