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
from ml_backend.services.runs import run_refusal
from ml_backend.ssl.config import SSL_METHODS, PretrainConfig


class Command(BaseCommand):
    help = ("SimCLRv2 contrastive pretraining on every scan of a project (labels unused), "
            "continuing from the shipped starter encoder by default; "
            "registers an encoder ModelVersion, activates it, and embeds + indexes all scans.")

    def add_arguments(self, parser):
        add_common_arguments(parser)
        parser.add_argument("--epochs", type=int_between(0, MAX_EPOCHS), default=None,
                            help="default: 3 when starting from the shipped starter encoder, "
                            "10 from scratch; 0: use the starter encoder as shipped (no "
                            "training, only embedding)")
        parser.add_argument("--from", dest="start_from", default="auto",
                            choices=["auto", "starter", "scratch"],
                            help="auto (default): continue from the shipped starter encoder "
                            "(ml_backend/starter/) when it fits --arch and the stem, else from "
                            "scratch; starter: insist; scratch: random initial weights")
        parser.add_argument("--image-size", type=int_between(8, 1024), default=64,
                            help="pixels per side, 8 to 1024 (default 64)")
        parser.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet34", "resnet50"])
        parser.add_argument("--method", default=None, choices=list(SSL_METHODS),
                            help="self-supervised method (ml_backend/ssl/methods.py): SimCLRv2, "
                            "MoCo v2/v3, BYOL, SwAV or DINO; one training loop, heads and "
                            "losses from lightly. Default: the starter encoder's own method "
                            "when continuing from it (its head then continues too), else simclr")
        parser.add_argument("--queue-size", type=int_between(0, 1_000_000),
                            default=PretrainConfig.queue_size,
                            help="moco: 0 (default) = MoCo v3's symmetric loss with the "
                            "batch's keys as negatives; N = MoCo v2's queue of N negatives "
                            "(does not train in short CPU runs: docs/benchmarks.md)")
        parser.add_argument("--batch-size", type=int_between(2, MAX_BATCH), default=128)
        parser.add_argument("--lr", type=float_between(0, 10, above=True), default=1e-3)
        parser.add_argument("--temperature", type=float_between(0, 100, above=True),
                            default=0.2)
        parser.add_argument("--init-checkpoint", default=None,
                            help="start from a saved encoder: a path (ours, or a torchvision "
                            "ResNet state dict), or 'active' for the project's active encoder")
        parser.add_argument("--no-activate", action="store_true",
                            help="keep the new encoder 'ready' instead of making it active")
        parser.add_argument("--small-input", default="auto", choices=["auto", "yes", "no"],
                            help="3x3 stride-1 stem without max-pool (auto: at 32 px and below; "
                            "about 6x the compute of the standard stem)")
        parser.add_argument("--colour-augment", default="stain",
                            choices=["stain", "jitter", "none"],
                            help="colour projects only: H&E stain jitter in HED space plus "
                            "bounded hue/saturation (stain: tissue, smears), the bounded "
                            "hue/saturation jitter alone (jitter: photographs), or none")
        parser.add_argument("--seed", type=int_between(0, MAX_SEED), default=0)
        parser.add_argument("--resume", default=None, metavar="VERSION",
                            help="continue an unfinished or failed encoder version from its last "
                            "epoch checkpoint, with its own frozen config")

    def handle(self, *args, **opts):
        epochs = opts["epochs"]
        if epochs is None:          # a few epochs on top of the starter, more from scratch
            from ml_backend.services.training import starter_encoder

            from_starter = not opts["init_checkpoint"] and (
                opts["start_from"] == "starter"
                or (opts["start_from"] == "auto" and starter_encoder() is not None))
            epochs = 3 if from_starter else 10
        if epochs < 0:
            raise CommandError("--epochs must be 0 or more")
        params = {"epochs": epochs, "start_from": opts["start_from"], "image_size": opts["image_size"], "arch": opts["arch"],
                  "method": opts["method"], "queue_size": opts["queue_size"],
                  "batch_size": opts["batch_size"], "lr": opts["lr"],
                  "temperature": opts["temperature"], "seed": opts["seed"],
                  "small_input": {"auto": None, "yes": True, "no": False}[opts["small_input"]],
                  "colour_augment": opts["colour_augment"],
                  "init_checkpoint": opts["init_checkpoint"], "activate": not opts["no_activate"],
                  "resume": opts["resume"]}
        project = get_project(opts["project"])
        refusal = run_refusal(project, "pretrain")      # no run that could only fail
        if refusal:
            raise CommandError(f"Pretrain refused: {refusal}.")
        run(self, project=project, kind="pretrain", params=params, opts=opts)
