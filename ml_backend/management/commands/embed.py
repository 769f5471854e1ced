from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from ml_backend.management.commands._runs import add_common_arguments, get_project, run
from ml_backend.services.runs import run_refusal


class Command(BaseCommand):
    help = ("Embed scans with the project's active encoder and add them to its FAISS index "
            "(only scans not embedded yet, unless --full).")

    def add_arguments(self, parser):
        add_common_arguments(parser)
        parser.add_argument("--full", action="store_true", help="re-embed everything, rebuild")
        parser.add_argument("--index", default="auto", choices=["auto", "flat", "ivf", "hnsw"],
                            help="index type for a new index (auto: exact up to 1M vectors)")

    def handle(self, *args, **opts):
        project = get_project(opts["project"])
        refusal = run_refusal(project, "embed")       # no run that could only fail
        if refusal:
            raise CommandError(f"Embed refused: {refusal}.")
        run(self, project=project, kind="embed",
            params={"full": opts["full"], "index_kind": opts["index"]}, opts=opts)
