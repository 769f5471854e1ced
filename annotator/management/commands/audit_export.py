"""Write the audit trail as CSV (all projects, or one; optionally since a date)."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from annotator.audit import to_csv
from annotator.models import AuditEvent, Project
from annotator.storage import OutPathError, out_path_check, out_text_write


class Command(BaseCommand):
    help = "Export the audit trail (annotations, adjudications, promotions, class changes) as CSV."

    def add_arguments(self, parser):
        parser.add_argument("--project", default=None)
        parser.add_argument("--since", default=None,
                            help="YYYY-MM-DD: events from that day's midnight in the site's "
                                 "TIME_ZONE on (the CSV's times are UTC with their offset)")
        parser.add_argument("--out", default="-", help="file path (a new file, or an existing "
                            "regular file, which is replaced; in an existing folder), or - for "
                            "stdout")

    def handle(self, *args, **opts):
        out = None
        if opts["out"] != "-":
            try:    # before any work: a path the CSV may go to
                out = out_path_check(opts["out"])
            except OutPathError as exc:
                raise CommandError(str(exc)) from None
        events = AuditEvent.objects.select_related("project").order_by("created_at", "pk")
        if opts["project"]:
            project = Project.objects.filter(name=opts["project"]).first()
            if project is None:
                raise CommandError(f"no project named {opts['project']!r}")
            events = events.filter(project=project)
        if opts["since"]:
            try:    # exactly YYYY-MM-DD in ASCII digits (strptime also takes 2026-1-7)
                if not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", opts["since"]):
                    raise ValueError(opts["since"])
                since = datetime.strptime(opts["since"], "%Y-%m-%d")
            except ValueError:
                raise CommandError("--since takes a date as YYYY-MM-DD") from None
            start = timezone.make_aware(since, timezone.get_current_timezone())
            events = events.filter(created_at__gte=start)
            self.stderr.write(f"events since {start:%Y-%m-%d %H:%M %Z} "
                              f"({start.astimezone(UTC):%Y-%m-%d %H:%M} UTC, the CSV's zone)")
        text = to_csv(events)
        if out is None:
            self.stdout.write(text, ending="")
        else:
            try:    # whole or not at all: an earlier file there stays until this one is done
                out_text_write(out, text)
            except OutPathError as exc:
                raise CommandError(str(exc)) from None
            except OSError as exc:
                raise CommandError(f"cannot write {out}: {exc.strerror or exc}") from None
            self.stderr.write(f"{events.count()} events written to {opts['out']}")
