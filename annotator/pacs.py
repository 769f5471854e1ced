"""A PACS, in: find studies with QIDO-RS and retrieve them with WADO-RS (``dicomweb-client``),
then import them exactly like a folder (de-identified at ingest by the same pipeline).

The retrieved instances wait in ``INCOMING_ROOT`` (like a browser upload) only until their
import has run, and are deleted then, whatever happened. Study UIDs live in memory only:
what is stored is the study's pseudonymous key (``Scan.study_key``), which is also how a
second pull recognises a study it already has (idempotent: nothing is downloaded twice
unless the PACS holds more instances of it than we do).

Credentials come from the environment (``PACS_USERNAME`` / ``PACS_PASSWORD``, HTTP Basic), never
from the command line.
"""

from __future__ import annotations

import logging
import tempfile
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings

from annotator.models import ImportJob, Project, Scan

logger = logging.getLogger(__name__)

STUDY_UID = "0020000D"
STUDY_INSTANCES = "00201208"
MODALITIES_IN_STUDY = "00080061"


class PacsError(Exception):
    """The PACS cannot be queried or read; ``str(exc)`` says why in words."""


@dataclass
class PullSummary:
    studies_found: int = 0
    studies_pulled: int = 0
    studies_already_here: int = 0
    instances_retrieved: int = 0
    jobs: list[int] = field(default_factory=list)
    imported: int = 0
    duplicates: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    def words(self) -> str:
        text = (f"{self.studies_found} stud{'y' if self.studies_found == 1 else 'ies'} found, "
                f"{self.studies_pulled} pulled ({self.instances_retrieved} instances), "
                f"{self.studies_already_here} already here; {self.imported} scans imported, "
                f"{self.duplicates} duplicates, {self.failed} failed")
        return text + (f"; errors: {'; '.join(self.errors[:3])}" if self.errors else "")


def parse_query(query: str) -> dict[str, str]:
    """``"Modality=CR&StudyDate=20240101-20241231"`` → QIDO-RS study search filters. Keys are
    DICOM keywords or tags (``Modality`` is asked as ``ModalitiesInStudy``); a value may be a
    range or a wildcard, as QIDO-RS allows."""
    filters = {}
    for key, value in urllib.parse.parse_qsl(query or "", keep_blank_values=False,
                                             strict_parsing=False):
        key = key.strip()
        if not key.replace("_", "").isalnum():
            raise PacsError(f"query key {key[:40]!r} is not a DICOM keyword or tag")
        # a study-level query: "Modality" means the study holds a series of that modality
        filters["ModalitiesInStudy" if key == "Modality" else key] = value.strip()
    return filters


def client_for(url: str):
    """A DICOMweb client for ``url`` with the environment's credentials (if any)."""
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session_from_auth
    from requests.auth import HTTPBasicAuth

    if not url.startswith(("http://", "https://")):
        raise PacsError(f"{url[:80]!r} is not a DICOMweb URL (http:// or https://…/dicom-web)")
    user, password = settings.PACS_USERNAME, settings.PACS_PASSWORD
    session = create_session_from_auth(HTTPBasicAuth(user, password)) if user else None
    return DICOMwebClient(url=url.rstrip("/"), session=session)


def _value(result: dict, tag: str):
    values = (result.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def pacs_pull(*, project: Project, url: str, query: str = "", dataset_name: str = "",
              split: str = "pool", created_by=None, limit: int | None = None,
              log: Callable[[str], None] = lambda line: None, client=None) -> PullSummary:
    """Find the studies matching ``query`` on the DICOMweb server at ``url`` and import
    every study not already here, one import job per study (so each has its report)."""
    from requests.exceptions import RequestException

    from annotator import services
    from ml_backend.data.deid import study_pseudonym

    services.parse_split(split)                      # a bad split is refused first
    filters = parse_query(query)
    client = client or client_for(url)
    summary = PullSummary()
    try:
        studies = client.search_for_studies(search_filters=filters, limit=limit,
                                            fields=[STUDY_INSTANCES, MODALITIES_IN_STUDY])
    except (RequestException, OSError, ValueError) as exc:
        raise PacsError(f"the PACS at {url} did not answer the study query "
                        f"({type(exc).__name__}: {str(exc)[:200]})") from None
    summary.studies_found = len(studies)
    log(f"{len(studies)} studies match {filters or 'everything'}")
    dataset_name = dataset_name or f"PACS {urllib.parse.urlsplit(url).hostname or 'pull'}"
    for number, study in enumerate(studies, start=1):
        uid = _value(study, STUDY_UID)
        if not uid:
            continue
        key = study_pseudonym(str(uid), salt=settings.DEID_SALT)
        have = Scan.objects.filter(project=project, study_key=key).count()
        held = _value(study, STUDY_INSTANCES)
        if have and (held is None or have >= int(held)):
            summary.studies_already_here += 1
            log(f"study {number}/{len(studies)}: already here ({have} scans)")
            continue
        Path(settings.INCOMING_ROOT).mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="pacs-", dir=settings.INCOMING_ROOT))
        try:
            instances = client.retrieve_study(str(uid))
            for index, instance in enumerate(instances):
                instance.save_as(folder / f"{index:06d}.dcm", enforce_file_format=True)
        except (RequestException, OSError, ValueError) as exc:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
            summary.errors.append(f"study {number}: could not be retrieved "
                                  f"({type(exc).__name__})")
            log(summary.errors[-1])
            continue
        summary.instances_retrieved += len(instances)
        job = services.import_job_create(project=project, source=str(folder),
                                         dataset_name=dataset_name, split=split, layout="flat",
                                         created_by=created_by, source_is_upload=True)
        job = services.import_job_run(job_id=job.pk) or ImportJob.objects.get(pk=job.pk)
        summary.studies_pulled += 1
        summary.jobs.append(job.pk)
        summary.imported += job.imported
        summary.duplicates += job.duplicates
        summary.failed += job.failed
        log(f"study {number}/{len(studies)}: {len(instances)} instances → import #{job.pk}: "
            f"{job.imported} imported, {job.duplicates} duplicates, {job.failed} failed")
    return summary
