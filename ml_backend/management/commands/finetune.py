from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from ml_backend.management.commands._runs import (
    MAX_BATCH,
    MAX_EPOCHS,
    MAX_SEED,
    add_common_arguments,
    float_between,
    get_project,
    int_between,
    run,
)
from ml_backend.ssl.config import FinetuneConfig, PretrainConfig


class Command(BaseCommand):
    help = ("SimCLRv2 step 2: fine-tune the active encoder on the labeled pool scans (LP-FT "
            "from the encoder's output by default); evaluate on the eval split; promote if no "
            "class regresses.")

    def add_arguments(self, parser):
        add_common_arguments(parser)
        parser.add_argument("--epochs", type=int_between(1, MAX_EPOCHS), default=30)
        parser.add_argument("--batch-size", type=int_between(1, MAX_BATCH), default=64)
        parser.add_argument("--lr", type=float_between(0, 10, above=True), default=3e-4)
        parser.add_argument("--schedule", default="cosine", choices=["cosine", "onecycle"])
        parser.add_argument("--loss", default="ce", choices=["ce", "focal"])
        parser.add_argument("--class-balance", default="weighted_loss",
                            choices=["weighted_loss", "sampler", "none"])
        parser.add_argument("--from-head-layer", type=int_between(0, PretrainConfig.proj_layers),
                            default=0,
                            help="0 (default): from the encoder's output; 1: from SimCLRv2's "
                                 "first projection layer")
        parser.add_argument("--label-set", default="",
                            help="a findings label set: fine-tune a network with one sigmoid "
                                 "output per finding (masked BCE); in a project that also has "
                                 "class sets, the version keeps fresh class heads beside it")
        parser.add_argument("--augment", action="store_true",
                            help="light crops/affine/intensity while training (off by default: "
                                 "it cost macro-F1 on a new-site hold-out)")
        parser.add_argument("--seed", type=int_between(0, MAX_SEED), default=0)
        parser.add_argument("--head-init", default="probe", choices=["probe", "random"],
                            help="probe (default): LP-FT, the last layer fitted on the frozen "
                                 "features first; random: plain SimCLRv2 step 2")
        parser.add_argument("--backbone-lr-scale", type=float_between(0, 1), default=0.1,
                            help="encoder learning rate = --lr * this (0 freezes it)")
        parser.add_argument("--input-scale", type=int, default=None, choices=[1, 2, 3, 4],
                            help="read each scan at this multiple of the encoder's training "
                                 "size: 2 for class sets by default (the 64 px starter "
                                 "fine-tunes and predicts at 128 px, about 4x the compute of "
                                 "1), 1 for a findings set; see docs/benchmarks.md, "
                                 "\"Fine-tuning at twice the size\"")
        parser.add_argument("--batchnorm", default="pretrained",
                            choices=["pretrained", "recalibrated", "train"],
                            help="BatchNorm statistics: the encoder's, kept (default); set on "
                                 "the labeled scans, then kept; or updated by every batch")

    def handle(self, *args, **opts):
        params = {"epochs": opts["epochs"], "batch_size": opts["batch_size"], "lr": opts["lr"],
                  "schedule": opts["schedule"], "loss": opts["loss"],
                  "class_balance": opts["class_balance"],
                  "from_head_layer": opts["from_head_layer"], "seed": opts["seed"],
                  "head_init": opts["head_init"], "backbone_lr_scale": opts["backbone_lr_scale"],
                  "batchnorm": opts["batchnorm"], "augment": opts["augment"]}
        if opts["input_scale"] is not None:
            params["input_scale"] = opts["input_scale"]
        try:    # refused here, before a run is made, by the checks the run itself applies
            FinetuneConfig(**{k: v for k, v in params.items()
                              if k in FinetuneConfig.__dataclass_fields__})
        except ValueError as exc:
            raise CommandError(f"invalid fine-tuning settings: {exc}") from None
        project = get_project(opts["project"])
        if opts["label_set"]:
            label_set = project.label_sets.filter(name__iexact=opts["label_set"]).first()
            if label_set is None or not label_set.is_multi:
                raise CommandError(f"{opts['label_set']!r} is not a findings label set of "
                                   f"{project.name!r} (class sets fine-tune without --label-set)")
            params["findings_set"] = label_set.pk
        # a "retrain" run (the kind the scheduled retrain makes too), named as asked for
        run(self, project=project, kind="retrain", params=params, opts=opts, label="finetune")
