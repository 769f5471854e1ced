from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from ml_backend import services
from ml_backend.errors import TrainingError
from ml_backend.management.commands._runs import get_project


class Command(BaseCommand):
    help = ("Flag likely label errors (confident learning on out-of-fold probabilities) and "
            "queue them for re-review as a query round.")

    def add_arguments(self, parser):
        parser.add_argument("--project", required=True)

    def handle(self, *args, **opts):
        try:
            review = services.label_quality_check(project=get_project(opts["project"]))
        except TrainingError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"Review round {review.pk}: {review.size} likely label errors")
        for item in review.items.all():
            r = item.reason
            self.stdout.write(f"{item.rank:3d}. scan {item.scan_id}: labeled {r['given']} "
                              f"(p={r['self_confidence']:.2f}), looks like {r['suggested']} "
                              f"(p={r['suggested_confidence']:.2f})")
