"""Write the audit trail as CSV (all projects, or one; optionally since a date)."""

from __future__ import annotations

from datetime import datetime

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from annotator.audit import to_csv
from annotator.models import AuditEvent, Project


class Command(BaseCommand):
    help = "Export the audit trail (annotations, adjudications, promotions, class changes) as CSV."

    def add_arguments(self, parser):
        parser.add_argument("--project", default=None)
        parser.add_argument("--since", default=None, help="YYYY-MM-DD")
        parser.add_argument("--out", default="-", help="file path, or - for stdout")

    def handle(self, *args, **opts):
        events = AuditEvent.objects.select_related("project").order_by("created_at", "pk")
        if opts["project"]:
            project = Project.objects.filter(name=opts["project"]).first()
            if project is None:
                raise CommandError(f"no project named {opts['project']!r}")
            events = events.filter(project=project)
        if opts["since"]:
            try:
                since = datetime.strptime(opts["since"], "%Y-%m-%d")
            except ValueError:
                raise CommandError("--since takes a date as YYYY-MM-DD") from None
            events = events.filter(created_at__gte=timezone.make_aware(since))
        text = to_csv(events)
        if opts["out"] == "-":
            self.stdout.write(text, ending="")
        else:
            with open(opts["out"], "w", newline="") as handle:
                handle.write(text)
            self.stderr.write(f"{events.count()} events written to {opts['out']}")
