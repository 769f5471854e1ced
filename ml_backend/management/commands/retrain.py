from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from ml_backend import services
from ml_backend.management.commands._runs import MAX_EPOCHS, get_project, int_between, run_existing


class Command(BaseCommand):
    help = ("Scheduled retrain (safe under cron): SimCLRv2 fine-tune (finetune's defaults: "
            "LP-FT from the encoder's output) on all labels, then evaluate, gate and refresh "
            "predictions. A second invocation while one runs exits cleanly with a message.")

    def add_arguments(self, parser):
        parser.add_argument("--project", required=True)
        parser.add_argument("--if-new-labels", type=int_between(0, 10 ** 9), default=0,
                            help="only retrain when at least N labels arrived since the last one "
                            "(default 0: retrain now)")
        parser.add_argument("--epochs", type=int_between(1, MAX_EPOCHS), default=30)
        parser.add_argument("--async", dest="run_async", action="store_true")
        parser.add_argument("--no-progress", action="store_true")

    def handle(self, *args, **opts):
        project = get_project(opts["project"])
        try:    # busy or too few new labels: skipped (cron-safe); could only fail: refused
            run = services.retrain_start(project=project, if_new_labels=opts["if_new_labels"],
                                         params={"epochs": opts["epochs"]}, refuse=True)
        except services.RetrainSkipped as exc:
            self.stdout.write(f"Retrain skipped: {exc}.")
            return
        except services.TrainingError as exc:     # the API's 409, beat's skip: no run made
            raise CommandError(f"Retrain refused: {exc}.") from None
        run_existing(self, run, opts)
