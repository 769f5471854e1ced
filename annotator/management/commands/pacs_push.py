"""python manage.py pacs_push --project NAME [--dicomweb URL]"""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from annotator import pacs


class Command(BaseCommand):
    help = ("Send results back to the PACS as DICOM structured reports (STOW-RS), each in its "
            "original study: the adjudicated or majority label (or the findings present), the "
            "reader's role (no names), the model's suggestion, confidence and version. Needs "
            "LINKAGE_KEY (set before the scans were imported); a scan is sent again only when "
            "its result or the model changed. Exits non-zero when any report was not sent (it is "
            "sent again by the next push).")

    def add_arguments(self, parser):
        parser.add_argument("--project", required=True)
        parser.add_argument("--dicomweb", default=None,
                            help="the server's DICOMweb root (default: PACS_DICOMWEB_URL)")

    def handle(self, *args, **opts):
        try:
            project, url = pacs.command_target(opts["project"], opts["dicomweb"])
        except pacs.PacsError as exc:
            raise CommandError(str(exc)) from None
        try:
            summary = pacs.pacs_push(project=project, url=url, log=self.stdout.write)
        except pacs.PacsError as exc:
            raise CommandError(str(exc)) from None
        line = f"PACS push from {project.name!r}: {summary.words()}"
        if not summary.incomplete:
            self.stdout.write(self.style.SUCCESS(line))
            return
        # the summary first, then a non-zero exit: a scheduler or a script sees the failure
        self.stdout.write(self.style.WARNING(line))
        why = summary.stopped or (summary.errors[0] if summary.errors else "")
        raise CommandError(f"{summary.not_sent} report(s) not sent"
                           + (f": {why}" if why else ""))
