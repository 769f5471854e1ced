"""Back up one project (rows + scan files + model artifacts) into a .tar.gz."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from annotator.backup import BackupError, export_project
from annotator.models import Project


class Command(BaseCommand):
    help = ("Export a project to one archive: settings, members, datasets, classes, scans and "
            "their de-identified files, annotations (who, when, what was shown), model versions "
            "with evaluations and artifacts. Restore with `project_import`.")

    def add_arguments(self, parser):
        parser.add_argument("--project", required=True)
        parser.add_argument("--out", required=True, help="archive path (.tar.gz)")

    def handle(self, *args, **opts):
        project = Project.objects.filter(name=opts["project"]).first()
        if project is None:
            raise CommandError(f"no project named {opts['project']!r}")
        try:
            counts = export_project(project, opts["out"])
        except BackupError as exc:
            raise CommandError(str(exc)) from None
        for line in counts["warnings"]:
            self.stdout.write(self.style.WARNING(f"warning: {line}"))
        self.stdout.write(self.style.SUCCESS(
            f"{opts['out']}: {counts['scans']} scans, {counts['annotations']} annotations, "
            f"{counts['classes']} classes, {counts['models']} model versions "
            f"({counts['bytes'] / 1e6:.1f} MB)"))
