"""Restore a project from an archive made by `project_export`."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from annotator.backup import BackupError, import_project


class Command(BaseCommand):
    help = ("Restore a project archive (e.g. on a fresh database). The whole archive is "
            "checked first: a problem refuses it, naming the problem, with nothing written. "
            "Users missing here are created without a password; a user whose username is "
            "taken here with another e-mail address refuses it (see --same-users); "
            "embeddings are rebuilt with the active encoder.")

    def add_arguments(self, parser):
        parser.add_argument("archive")
        parser.add_argument("--name", default=None, help="restore under another project name")
        parser.add_argument("--no-embed", action="store_true",
                            help="skip re-embedding (run `embed --full` later)")
        parser.add_argument("--same-users", action="store_true",
                            help="the backup's users whose usernames are taken here by "
                            "accounts with another e-mail address are the same people: credit "
                            "their answers, roles and classes to the accounts here (without "
                            "it such a backup is refused)")

    def handle(self, *args, **opts):
        def log(line: str) -> None:
            if line.startswith("warning:"):
                self.stdout.write(self.style.WARNING(line))
            else:
                self.stdout.write(line)

        try:
            project = import_project(opts["archive"], name=opts["name"],
                                     embed=not opts["no_embed"],
                                     same_users=opts["same_users"], log=log)
        except BackupError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(self.style.SUCCESS(f"project {project.name!r} restored"))
