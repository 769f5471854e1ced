"""Back up one project (rows + scan files + model artifacts) into a .tar.gz."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from annotator.backup import BackupError, export_project
from annotator.models import Project
from annotator.storage import OutPathError, out_path_check


class Command(BaseCommand):
    help = ("Export a project to one archive: settings, members, datasets, classes, scans and "
            "their de-identified files, annotations (who, when, what was shown), model versions "
            "with evaluations and artifacts. Restore with `project_import`.")

    def add_arguments(self, parser):
        parser.add_argument("--project", required=True)
        parser.add_argument("--out", required=True,
                            help="archive path (.tar.gz): a new file, or an existing regular "
                            "file, which is replaced; in an existing folder")

    def handle(self, *args, **opts):
        try:        # before any work: a path the archive may go to
            out_path_check(opts["out"])
        except OutPathError as exc:
            raise CommandError(str(exc)) from None
        project = Project.objects.filter(name=opts["project"]).first()
        if project is None:
            raise CommandError(f"no project named {opts['project']!r}")
        try:
            counts = export_project(project, opts["out"])
        except BackupError as exc:
            raise CommandError(str(exc)) from None
        for line in counts["warnings"]:         # on stderr: a script's log keeps them apart
            self.stderr.write(self.style.WARNING(f"warning: {line}"))
        self.stdout.write(self.style.SUCCESS(
            f"{opts['out']}: {counts['scans']} scans, {counts['annotations']} annotations, "
            f"{counts['classes']} classes, {counts['models']} model versions "
            f"({counts['bytes'] / 1e6:.1f} MB)"))
