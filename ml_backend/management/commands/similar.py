from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from annotator.models import Scan
from ml_backend import services
from ml_backend.errors import TrainingError
from ml_backend.management.commands._runs import int_between

MAX_K = 1000


class Command(BaseCommand):
    help = "List the scans most similar to one scan (SimCLRv2 embeddings, FAISS)."

    def add_arguments(self, parser):
        parser.add_argument("scan_id", type=int_between(1, 2 ** 63 - 1))
        parser.add_argument("-k", type=int_between(1, MAX_K), default=8,
                            help=f"how many similar scans (1 to {MAX_K}; default 8)")
        parser.add_argument("--labeled-only", action="store_true")

    def handle(self, *args, **opts):
        scan = Scan.objects.filter(pk=opts["scan_id"]).first()
        if scan is None:
            raise CommandError(f"No scan {opts['scan_id']}.")
        try:
            hits = services.similar_scans(scan=scan, k=opts["k"], labeled_only=opts["labeled_only"])
        except TrainingError as exc:
            raise CommandError(str(exc)) from None
        for other, score in hits:
            labels = ", ".join(sorted({a.label_class.name for a in other.annotations.all()
                                       if a.label_class_id})) or "unlabeled"
            self.stdout.write(f"{other.pk:8d}  {score:.3f}  {other.dataset.name}  {labels}")
