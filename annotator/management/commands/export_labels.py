"""python manage.py export_labels --project NAME --format csv|jsonl|imagefolder --out PATH [--split all|pool|eval] [--adjudicated]"""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from annotator import exports
from annotator.models import Project
from annotator.storage import OutPathError, out_folder_built, out_path_check, out_text_write


class Command(BaseCommand):
    help = ("Export a project's labels: one row per scan with its final label (or findings), "
            "every reader's answer, agreement, and the model version and score each reader "
            "was shown. csv / jsonl to a file (or - for stdout); imagefolder: one folder per "
            "split and class of de-identified PNGs (torchvision ImageFolder, timm) plus "
            "labels.csv.")

    def add_arguments(self, parser):
        parser.add_argument("--project", required=True)
        parser.add_argument("--format", choices=exports.FORMATS, default="csv")
        parser.add_argument("--out", required=True, help="a file (csv, jsonl; - for stdout) or "
                            "a new folder (imagefolder)")
        parser.add_argument("--split", choices=["all", "pool", "eval"], default="all")
        parser.add_argument("--adjudicated", action="store_true",
                            help="only scans a reviewer adjudicated")

    def handle(self, *args, **opts):
        project = Project.objects.filter(name=opts["project"]).first()
        if project is None:
            raise CommandError(f"no project named {opts['project']!r}")
        folder = opts["format"] == "imagefolder"
        if opts["out"] == "-" and folder:
            raise CommandError("an image folder cannot go to stdout: give --out a new folder")
        out = None if opts["out"] == "-" else _checked_out(Path(opts["out"]), folder=folder)
        try:
            rows = exports.label_rows(project, split=opts["split"],
                                      adjudicated_only=opts["adjudicated"])
            if folder:
                counts = _write_folder(rows, out)
                self.stdout.write(self.style.SUCCESS(
                    f"{sum(counts.values())} images in {len(counts)} class folders under "
                    f"{opts['out']} (+ labels.csv with all {len(rows)} rows)"))
                return
            text = exports.as_csv(rows) if opts["format"] == "csv" else exports.as_jsonl(rows)
        except exports.ExportError as exc:
            raise CommandError(str(exc)) from None
        if out is None:
            self.stdout.write(text, ending="")
            return
        _write_file(out, text)
        self.stdout.write(self.style.SUCCESS(f"{len(rows)} scans written to {opts['out']}"))


def _checked_out(out: Path, *, folder: bool) -> Path:
    """``--out`` checked before anything is read or written (``storage.out_path_check``): its
    folder exists; a file is a new or regular file, never a link, device or fifo; an image
    folder is new or empty."""
    try:
        return out_path_check(out, folder=folder)
    except OutPathError as exc:
        raise CommandError(str(exc)) from None


def _write_file(out: Path, text: str) -> None:
    """Written under a temporary name beside ``out`` and renamed: a failed write leaves no
    half file (and an earlier file at ``out`` as it was)."""
    try:
        out_text_write(out, text)
    except OutPathError as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(f"cannot write {out}: {exc.strerror or exc}") from None


def _write_folder(rows: list[dict], out: Path) -> dict[str, int]:
    """The image folder made in a temporary folder beside ``out`` and renamed into place
    (``storage.out_folder_built``): a failure leaves nothing behind (a scan whose stored
    image is missing is named before anything is copied)."""
    try:
        with out_folder_built(out) as work:
            counts = exports.write_imagefolder(rows, work)
        return counts
    except exports.ExportError as exc:
        raise CommandError(f"{exc}. Nothing was written to {out}.") from None
    except OutPathError as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(f"cannot write the image folder {out}: {exc.strerror or exc}"
                           ) from None
