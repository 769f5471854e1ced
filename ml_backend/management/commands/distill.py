from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from ml_backend.management.commands._runs import (
    MAX_BATCH,
    MAX_EPOCHS,
    MAX_ID,
    add_common_arguments,
    finite_float,
    float_between,
    get_project,
    int_between,
    run,
)
from ml_backend.ssl.config import DistillConfig


class Command(BaseCommand):
    help = ("SimCLRv2 step 3: self-distillation of the active classifier (or --teacher) into a "
            "student on the unlabeled pool; evaluated and gated like a fine-tune.")

    def add_arguments(self, parser):
        add_common_arguments(parser)
        parser.add_argument("--teacher", type=int_between(1, MAX_ID), default=None,
                            help="ModelVersion id")
        parser.add_argument("--epochs", type=int_between(1, MAX_EPOCHS), default=10)
        parser.add_argument("--batch-size", type=int_between(1, MAX_BATCH), default=128)
        parser.add_argument("--lr", type=float_between(0, 10, above=True), default=3e-4)
        parser.add_argument("--temperature", type=finite_float, default=1.0)
        parser.add_argument("--teacher-temperature", type=finite_float, default=None,
                            help="the teacher's temperature for its soft labels (default: "
                                 "--temperature); below it sharpens them. Measured in "
                                 "docs/benchmarks.md: no reliable gain on one site")
        parser.add_argument("--labeled-weight", type=float_between(0, 1), default=0.5)
        parser.add_argument("--student-init", default="teacher", choices=["teacher", "pretrained"],
                            help="the student starts as its teacher (default) or from the "
                                 "pretrained encoder with a random last layer")

    def handle(self, *args, **opts):
        params = {"teacher": opts["teacher"], "epochs": opts["epochs"],
                  "batch_size": opts["batch_size"], "lr": opts["lr"],
                  "temperature": opts["temperature"], "labeled_weight": opts["labeled_weight"],
                  "student_init": opts["student_init"]}
        if opts["teacher_temperature"] is not None:
            params["teacher_temperature"] = opts["teacher_temperature"]
        try:    # refused here, before a run is queued, by the checks the run itself applies
            DistillConfig(**{k: v for k, v in params.items()
                             if k in DistillConfig.__dataclass_fields__})
        except ValueError as exc:
            raise CommandError(f"invalid distillation settings: {exc}") from None
        run(self, project=get_project(opts["project"]), kind="distill", params=params, opts=opts)
