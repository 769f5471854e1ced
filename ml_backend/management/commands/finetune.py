from __future__ import annotations

from django.core.management.base import BaseCommand

from ml_backend.management.commands._runs import add_common_arguments, get_project, run


class Command(BaseCommand):
    help = ("SimCLRv2 step 2: fine-tune the active encoder from projection-head layer 1 on the "
            "labeled pool scans; evaluate on the eval split; promote if no class regresses.")

    def add_arguments(self, parser):
        add_common_arguments(parser)
        parser.add_argument("--epochs", type=int, default=30)
        parser.add_argument("--batch-size", type=int, default=64)
        parser.add_argument("--lr", type=float, default=3e-4)
        parser.add_argument("--schedule", default="cosine", choices=["cosine", "onecycle"])
        parser.add_argument("--loss", default="ce", choices=["ce", "focal"])
        parser.add_argument("--class-balance", default="weighted_loss",
                            choices=["weighted_loss", "sampler", "none"])
        parser.add_argument("--from-head-layer", type=int, default=1)
        parser.add_argument("--seed", type=int, default=0)

    def handle(self, *args, **opts):
        params = {"epochs": opts["epochs"], "batch_size": opts["batch_size"], "lr": opts["lr"],
                  "schedule": opts["schedule"], "loss": opts["loss"],
                  "class_balance": opts["class_balance"],
                  "from_head_layer": opts["from_head_layer"], "seed": opts["seed"]}
        run(self, project=get_project(opts["project"]), kind="retrain", params=params, opts=opts)
