"""Restore a project from an archive made by `project_export`."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from annotator.backup import BackupError, import_project


class Command(BaseCommand):
    help = ("Restore a project archive (e.g. on a fresh database). The whole archive is "
            "checked first: a problem refuses it, naming the problem, with nothing written. "
            "Users missing here are created without a password; embeddings are rebuilt with "
            "the active encoder.")

    def add_arguments(self, parser):
        parser.add_argument("archive")
        parser.add_argument("--name", default=None, help="restore under another project name")
        parser.add_argument("--no-embed", action="store_true",
                            help="skip re-embedding (run `embed --full` later)")

    def handle(self, *args, **opts):
        def log(line: str) -> None:
            if line.startswith("warning:"):
                self.stdout.write(self.style.WARNING(line))
            else:
                self.stdout.write(line)

        try:
            project = import_project(opts["archive"], name=opts["name"],
                                     embed=not opts["no_embed"], log=log)
        except BackupError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(self.style.SUCCESS(f"project {project.name!r} restored"))
