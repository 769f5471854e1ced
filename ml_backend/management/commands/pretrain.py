from __future__ import annotations

from django.core.management.base import BaseCommand

from ml_backend.management.commands._runs import add_common_arguments, get_project, run


class Command(BaseCommand):
    help = ("SimCLRv2 contrastive pretraining on every scan of a project (labels unused); "
            "registers an encoder ModelVersion, activates it, and embeds + indexes all scans.")

    def add_arguments(self, parser):
        add_common_arguments(parser)
        parser.add_argument("--epochs", type=int, default=10)
        parser.add_argument("--image-size", type=int, default=64)
        parser.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet34", "resnet50"])
        parser.add_argument("--batch-size", type=int, default=128)
        parser.add_argument("--lr", type=float, default=1e-3)
        parser.add_argument("--temperature", type=float, default=0.2)
        parser.add_argument("--init-checkpoint", default=None,
                            help="start from a saved encoder: a path (ours, or a torchvision "
                            "ResNet state dict), or 'active' for the project's active encoder")
        parser.add_argument("--no-activate", action="store_true",
                            help="keep the new encoder 'ready' instead of making it active")
        parser.add_argument("--small-input", default="auto", choices=["auto", "yes", "no"],
                            help="3x3 stride-1 stem without max-pool (auto: at 32 px and below; "
                            "about 6x the compute of the standard stem)")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--resume", default=None, metavar="VERSION",
                            help="continue an unfinished or failed encoder version from its last "
                            "epoch checkpoint, with its own frozen config")

    def handle(self, *args, **opts):
        params = {"epochs": opts["epochs"], "image_size": opts["image_size"], "arch": opts["arch"],
                  "batch_size": opts["batch_size"], "lr": opts["lr"],
                  "temperature": opts["temperature"], "seed": opts["seed"],
                  "small_input": {"auto": None, "yes": True, "no": False}[opts["small_input"]],
                  "init_checkpoint": opts["init_checkpoint"], "activate": not opts["no_activate"],
                  "resume": opts["resume"]}
        run(self, project=get_project(opts["project"]), kind="pretrain", params=params, opts=opts)
