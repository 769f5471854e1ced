"""python manage.py export_labels --project NAME --format csv|jsonl|imagefolder --out PATH [--split all|pool|eval] [--adjudicated]"""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from annotator import exports
from annotator.models import Project


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
        try:
            rows = exports.label_rows(project, split=opts["split"],
                                      adjudicated_only=opts["adjudicated"])
            if opts["format"] == "imagefolder":
                counts = exports.write_imagefolder(rows, Path(opts["out"]))
                self.stdout.write(self.style.SUCCESS(
                    f"{sum(counts.values())} images in {len(counts)} class folders under "
                    f"{opts['out']} (+ labels.csv with all {len(rows)} rows)"))
                return
            text = exports.as_csv(rows) if opts["format"] == "csv" else exports.as_jsonl(rows)
        except exports.ExportError as exc:
            raise CommandError(str(exc)) from None
        if opts["out"] == "-":
            self.stdout.write(text, ending="")
            return
        Path(opts["out"]).write_text(text)
        self.stdout.write(self.style.SUCCESS(f"{len(rows)} scans written to {opts['out']}"))
