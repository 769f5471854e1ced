"""Pull Label Studio's export and fill any annotation its webhook missed (idempotent)."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from annotator import label_studio
from annotator.models import Project


class Command(BaseCommand):
    help = ("Import every annotation of the project's Label Studio twin that is not in our "
            "database yet (Label Studio sends each webhook once, without retry). Safe to run "
            "any time; LABEL_STUDIO_RECONCILE_MINUTES schedules it in Celery beat.")

    def add_arguments(self, parser):
        parser.add_argument("--project", required=True)
        parser.add_argument("--url", default=None)
        parser.add_argument("--api-key", default=None)

    def handle(self, *args, **opts):
        project = Project.objects.filter(name=opts["project"]).first()
        if project is None:
            raise CommandError(f"no project named {opts['project']!r}")
        try:
            counts = label_studio.reconcile(project, ls=label_studio.client(opts["url"],
                                                                             opts["api_key"]))
        except label_studio.LabelStudioError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(self.style.SUCCESS(
            "reconciled: " + ", ".join(f"{v} {k}" for k, v in counts.items())))
