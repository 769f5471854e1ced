"""python manage.py export_model --project NAME [--model-version V] --format onnx|torchscript --out DIR"""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from annotator.models import Project
from annotator.storage import OutPathError, out_folder_built, out_path_check
from ml_backend.errors import TrainingError
from ml_backend.models import ModelVersion


class Command(BaseCommand):
    help = ("Export a classifier (the active one by default) for use elsewhere: one network per "
            "label set, image in, calibrated probabilities out, as ONNX (checked with "
            "onnxruntime against PyTorch on the project's own scans) or TorchScript, with a "
            "model card (Markdown and JSON): data, classes, per-class metrics and calibration "
            "on the eval split, lineage, preprocessing, intended use and limitations.")

    def add_arguments(self, parser):
        parser.add_argument("--project", required=True)
        parser.add_argument("--model-version", "--model", dest="model_version", default=None,
                            help="the version to export (default: the active classifier)")
        parser.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
        parser.add_argument("--out", required=True, help="a new (or empty) folder, in an "
                            "existing folder")

    def handle(self, *args, **opts):
        try:        # before any work: a folder the export may go to
            out = out_path_check(opts["out"], folder=True)
        except OutPathError as exc:
            raise CommandError(str(exc)) from None
        project = Project.objects.filter(name=opts["project"]).first()
        if project is None:
            raise CommandError(f"no project named {opts['project']!r}")
        if opts["model_version"]:
            model = ModelVersion.objects.filter(project=project,
                                                version=opts["model_version"]).first()
            if model is None:
                raise CommandError(f"no version {opts['model_version']!r} in {project.name!r}")
        else:
            model = project.active_model
            if model is None:
                raise CommandError(f"{project.name!r} has no active classifier yet: label and "
                                   "refit first")
        card = _export_into(model, fmt=opts["format"], out=out)
        for f in card["files"]:
            diff = "not checked" if f["max_difference"] is None else \
                f"max difference {f['max_difference']:.1e} on {f['checked_on_scans']} scans"
            self.stdout.write(f"{f['file']}: {f['label_set'] or 'all classes'} "
                              f"({', '.join(f['classes'])}); {diff}")
        self.stdout.write(self.style.SUCCESS(f"{model.version} exported to {opts['out']} with "
                                             "model-card.md and model-card.json"))


def _export_into(model: ModelVersion, *, fmt: str, out: Path) -> dict:
    """The export made in a temporary folder beside ``out`` and renamed into place once it
    is whole (``storage.out_folder_built``): a failure leaves nothing behind."""
    from ml_backend.services.export import model_export

    try:
        with out_folder_built(out) as work:
            card = model_export(model, fmt=fmt, out=work)
        return card
    except (TrainingError, OutPathError) as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(f"cannot write {out}: {exc.strerror or exc}") from None
