"""Create or update a project's Label Studio twin: config, tasks, predictions, tab, backend,
webhook."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from annotator import label_studio
from annotator.models import Project


class Command(BaseCommand):
    help = ("Sync a project to Label Studio: labeling config from its classes, the current "
            "query round's scans (or every unlabeled pool scan) as tasks with signed image URLs and our "
            "predictions, model_version, a Data Manager tab ordered least confident first, our "
            "ML backend and a webhook. Safe to run again (only what is new is sent).")

    def add_arguments(self, parser):
        parser.add_argument("--project", required=True)
        parser.add_argument("--create", action="store_true",
                            help="create the Label Studio project if it is not linked yet")
        parser.add_argument("--scope", choices=["round", "pool"], default="round",
                            help="export the current query round's scans (default) or every "
                            "unlabeled pool scan")
        parser.add_argument("--url", default=None, help="default: LABEL_STUDIO_URL")
        parser.add_argument("--api-key", default=None, help="default: LABEL_STUDIO_API_KEY")

    def handle(self, *args, **opts):
        project = Project.objects.filter(name=opts["project"]).first()
        if project is None:
            raise CommandError(f"no project named {opts['project']!r}")
        try:
            ls = label_studio.client(opts["url"], opts["api_key"])
            summary = label_studio.sync(project, create=opts["create"], scope=opts["scope"],
                                        ls=ls, log=self.stdout.write)
        except label_studio.LabelStudioError as exc:
            raise CommandError(str(exc)) from None
        project.refresh_from_db()
        self.stdout.write(self.style.SUCCESS(
            f"Label Studio project {project.label_studio_project_id} in sync: "
            f"{summary['tasks_created']} new tasks ({summary['predictions_with_new_tasks']} with "
            f"our prediction), {summary['predictions_pushed']} predictions pushed to earlier "
            "tasks"))
