from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from ml_backend.management.commands._runs import add_common_arguments, get_project, run
from ml_backend.services.runs import run_refusal


class Command(BaseCommand):
    help = ("Refit the classifier head on frozen SimCLRv2 embeddings (seconds), evaluate, gate, "
            "refresh pool predictions and queue the next query round.")

    def add_arguments(self, parser):
        add_common_arguments(parser)
        parser.add_argument("--no-query", action="store_true",
                            help="do not create a new query round after the refit")

    def handle(self, *args, **opts):
        project = get_project(opts["project"])
        refusal = run_refusal(project, "refit")       # no run that could only fail
        if refusal:
            raise CommandError(f"Refit refused: {refusal}.")
        run(self, project=project, kind="refit",
            params={"query": not opts["no_query"]}, opts=opts)
