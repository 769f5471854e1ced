"""Restore a project from an archive made by `project_export`."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from annotator.backup import BackupError, import_project


class Command(BaseCommand):
    help = ("Restore a project archive (e.g. on a fresh database). Users missing here are "
            "created without a password; embeddings are rebuilt with the active encoder.")

    def add_arguments(self, parser):
        parser.add_argument("archive")
        parser.add_argument("--name", default=None, help="restore under another project name")
        parser.add_argument("--no-embed", action="store_true",
                            help="skip re-embedding (run `embed --full` later)")

    def handle(self, *args, **opts):
        try:
            project = import_project(opts["archive"], name=opts["name"],
                                     embed=not opts["no_embed"], log=self.stdout.write)
        except BackupError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(self.style.SUCCESS(f"project {project.name!r} restored"))
