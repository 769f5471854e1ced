"""python manage.py pacs_pull --project NAME [--dicomweb URL] [--query "Modality=CR&StudyDate=20240101-20241231"]"""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from annotator import pacs, services
from ml_backend.management.commands._runs import int_between


class Command(BaseCommand):
    help = ("Pull studies from a PACS over DICOMweb: find them with QIDO-RS (--query), retrieve "
            "them with WADO-RS and import them like a folder, de-identified at ingest. Studies "
            "already here are skipped, so running it again (or on a schedule) fetches only new "
            "ones. Credentials: PACS_USERNAME / PACS_PASSWORD in the environment.")

    def add_arguments(self, parser):
        parser.add_argument("--project", required=True)
        parser.add_argument("--dicomweb", default=None,
                            help="the server's DICOMweb root, e.g. http://pacs:8042/dicom-web "
                            "(default: PACS_DICOMWEB_URL)")
        parser.add_argument("--query", default=None,
                            help="QIDO-RS study filters, e.g. 'Modality=CR&StudyDate="
                            "20240101-20241231' (DICOM keywords: ModalitiesInStudy, StudyDate, "
                            "StudyDescription, ...; each once, each with a value); left out: "
                            "every study (an empty --query is refused)")
        parser.add_argument("--limit", type=int_between(1, 1_000_000), default=None,
                            help="at most this many studies (1 or more)")
        parser.add_argument("--dataset", default="", help="dataset name (default: PACS <host>)")
        parser.add_argument("--split", default="pool", help="pool, eval or auto:0.2 (whole "
                            "patients to eval, as import_scans)")
        parser.add_argument("--reader", default="", help="username recorded as the importer")

    def handle(self, *args, **opts):
        try:
            pacs.parse_query(opts["query"])         # a bad query is refused before anything
            project, url = pacs.command_target(opts["project"], opts["dicomweb"])
        except pacs.PacsError as exc:
            raise CommandError(str(exc)) from None
        reader = None
        if opts["reader"]:
            reader = get_user_model().objects.filter(username=opts["reader"]).first()
            if reader is None:
                raise CommandError(f"no user named {opts['reader']!r}")
        try:
            summary = pacs.pacs_pull(project=project, url=url, query=opts["query"],
                                     dataset_name=opts["dataset"], split=opts["split"],
                                     created_by=reader, limit=opts["limit"],
                                     log=self.stdout.write)
        except (pacs.PacsError, services.ImportRequestError) as exc:
            raise CommandError(str(exc)) from None
        if summary.errors:       # a script (or cron) must see that a study was not pulled
            self.stdout.write(f"PACS pull into {project.name!r}: {summary.words()}")
            raise CommandError(f"{len(summary.errors)} stud{'y' if len(summary.errors) == 1 else 'ies'} "
                               "could not be pulled (above); the others were. Run it again "
                               "to retry them: studies already here are skipped")
        self.stdout.write(self.style.SUCCESS(f"PACS pull into {project.name!r}: "
                                             f"{summary.words()}"))
