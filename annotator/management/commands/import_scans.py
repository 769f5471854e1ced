"""python manage.py import_scans SOURCE --project NAME [--dataset NAME] [--split pool|eval|auto:0.2] [--labels CSV]"""

from __future__ import annotations

from pathlib import Path

from django.contrib.auth import get_user_model
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from annotator import services
from annotator.models import ImportJob, Project


def _folder_dataset(source: str) -> str:
    """The dataset an import with no --dataset fills: the source's name, unless it looks like
    it carries identifiers (then ``import``, as ``services._default_dataset_name`` decides)."""
    name = Path(source.split("#")[0]).name
    return "import" if services.dataset_name_refusal(name) else name


class Command(BaseCommand):
    help = (
        "Import scans from a folder (DICOM, PNG/JPEG/TIFF, class sub-folders), a CSV "
        "(filename,label), or a MedMNIST archive (file.npz#split). Re-running is safe: "
        "files already imported (same content) are counted as duplicates."
    )

    def add_arguments(self, parser):
        parser.add_argument("source", help="folder, file, CSV, or file.npz#split")
        parser.add_argument("--project", required=True, help="project name")
        parser.add_argument("--create-project", action="store_true",
                            help="create the project if it does not exist")
        parser.add_argument("--dataset", default="", help="dataset (site/collection) name; "
                            "default: the source folder's name")
        parser.add_argument("--split", default="pool",
                            help="pool (default), eval, or auto:F — about a share F of the "
                            "patients to eval, each patient (study, where no patient is known; "
                            "file, where neither is) wholly on one side, e.g. auto:0.2")
        parser.add_argument("--modality", default="",
                            help="DICOM modality code of the dataset's scans (CR, DX, CT, MR, "
                            "US, SM, XC, ...), for files that do not carry one (PNG, JPEG, TIFF)")
        parser.add_argument("--body-part", default="",
                            help="body part of the dataset's scans (CHEST, BRAIN, ...), likewise")
        parser.add_argument("--labels", default="", help="CSV of filename,label; with a "
                            "header, an optional patient (or patient_id) column groups each "
                            "patient's PNG/JPEG/TIFF files in --split auto (stored as a keyed "
                            "hash, never the identifier)")
        parser.add_argument("--layout", default="auto", choices=["auto", "class-folders", "flat"],
                            help="auto: sub-folder names are labels when images sit one level "
                            "down; flat: ignore folder names")
        parser.add_argument("--reader", default="", help="username recorded on imported labels")
        parser.add_argument("--label-set", default="",
                            help="label set (e.g. 'chest X-ray') the dataset's scans use; made "
                            "if new. Its classes are the only ones offered for these scans. A "
                            "findings source (NIH 'Finding Labels' CSV, CheXpert-style or 0/1 "
                            "CSV, ChestMNIST-style npz; SOURCE#split picks a CSV's split rows) "
                            "goes into a findings set of this name (default 'findings')")
        parser.add_argument("--on-workers", action="store_true",
                            help="split a large import (more than IMPORT_CHUNK_SIZE files) into "
                            "chunks for the Celery workers, on as many machines as run them, "
                            "and follow their progress here (needs CELERY_BROKER_URL and "
                            "running workers); by default this process imports every file")
        parser.add_argument("--no-progress", action="store_true")

    def handle(self, *args, **opts):
        try:
            services.parse_split(opts["split"])       # refused before anything is made
        except services.ImportRequestError as exc:
            raise CommandError(str(exc)) from None
        refusal = services.dataset_name_refusal(opts["dataset"])
        if refusal is not None:
            raise CommandError(f"--dataset refused: {refusal}")
        project = Project.objects.filter(name=opts["project"]).first()
        if project is None:
            if not opts["create_project"]:
                raise CommandError(
                    f"No project named {opts['project']!r}. Create it in the admin, or pass "
                    "--create-project."
                )
            # a source that cannot be read leaves no empty project behind
            refusal = services.import_source_refusal(
                source=opts["source"], labels_csv=opts["labels"], layout=opts["layout"])
            if refusal is not None:
                raise CommandError(f"{refusal} (no project was created)")
            try:
                project = services.project_create(name=opts["project"])
            except ValueError as exc:
                raise CommandError(f"--project refused: {exc}") from None
            self.stdout.write(f"Created project {project.name!r}.")
        reader = None
        if opts["reader"]:
            reader = get_user_model().objects.filter(username=opts["reader"]).first()
            if reader is None:
                raise CommandError(f"No user named {opts['reader']!r}.")
        if opts["modality"] or opts["body_part"]:
            try:
                services.dataset_acquisition_set(
                    project=project,
                    name=opts["dataset"] or _folder_dataset(opts["source"]),
                    modality=opts["modality"], body_part=opts["body_part"])
            except services.DatasetMismatch as exc:
                raise CommandError(str(exc)) from None
        try:
            job = services.import_job_create(
                project=project,
                source=opts["source"],
                dataset_name=opts["dataset"],
                split=opts["split"],
                layout=opts["layout"],
                labels_csv=opts["labels"],
                created_by=reader,
                label_set=opts["label_set"],
            )
        except services.ImportRequestError as exc:
            raise CommandError(str(exc)) from None

        bar = None

        def progress(done: int, total: int) -> None:
            nonlocal bar
            if opts["no_progress"]:
                return
            if bar is None:
                bar = tqdm(total=total, initial=done, unit="scan", desc="Importing",
                           file=self.stderr._out)
            bar.update(done - bar.n)

        if opts["on_workers"] and settings.CELERY_TASK_ALWAYS_EAGER:
            raise CommandError("--on-workers needs a broker (CELERY_BROKER_URL) and running "
                               "Celery workers")
        job = services.import_job_run(job_id=job.pk, progress=progress,
                                      chunked=bool(opts["on_workers"]))
        if job is not None and not job.is_finished:    # chunks on the workers: follow them
            if not opts["no_progress"]:
                self.stderr.write(f"{job.chunks_total} chunks queued for the Celery workers")
            job = services.import_job_wait(job, progress=progress)
        if bar is not None:
            bar.close()
        self._print_summary(job)
        if job.status == ImportJob.Status.FAILED:
            raise CommandError(job.last_error or "import failed")

    def _print_summary(self, job: ImportJob) -> None:
        w = self.stdout.write
        w(f"Import #{job.pk} into {job.project.name!r}: {job.status}")
        w(f"  files:       {job.total}")
        w(f"  imported:    {job.imported}")
        w(f"  duplicates:  {job.duplicates} (already in the project, same content)")
        w(f"  failed:      {job.failed}")
        if job.skipped:
            w(f"  skipped:     {job.skipped} (not scan files: CSV, text, links)")
        w(f"  labels:      {job.labels_added} added")
        if job.classes_created:
            w(self.style.WARNING(
                f"  new classes: {', '.join(job.classes_created)} (created from the labels given)"
            ))
        for warning in job.warnings[:20]:
            w(self.style.WARNING(f"  warning: {warning}"))
        if job.errors:
            w("  failures:")
            for error in job.errors[:50]:
                w(self.style.ERROR(f"    {error['name']}: {error['reason']}"))
            if len(job.errors) > 50:
                w(f"    ... and {len(job.errors) - 50} more (see the import in the admin)")
