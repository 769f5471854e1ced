"""Checks and staging for files uploaded through the browser."""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.core.files.uploadedfile import UploadedFile
from django.utils import timezone

from ml_backend.data.decode import (
    DICOM_EXTENSIONS,
    DecodedScan,
    ScanDecodeError,
    decode_scan,
    probe_raw_dicom,
    sniff_format,
)
from ml_backend.data.deid import file_name_identifiers

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

logger = logging.getLogger(__name__)


@dataclass
class Rejection:
    name: str
    reason: str


def safe_name(name: str) -> str:
    """A file name with no directories, no traversal and only safe characters."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = _UNSAFE.sub("_", base).lstrip(".")[:120]
    return base or "upload"


# How a staged upload whose name is hidden is named (``NNNN_`` + this + its extension): the
# import stores it with no name and counts it among the hidden ones.
HIDDEN_NAME = "name-not-kept"


def name_may_be_shown(name: str, data: bytes = b"") -> bool:
    """Whether a file's name may be stored and shown. A DICOM's file name often carries the
    patient's name: never (by its extension, ``.dcm``, ``.dicom``, ``.dic`` or none, or its
    content). Nor a raster's whose name or folders look like they carry identifiers
    (``deid.file_name_identifiers``: a number of 6+ digits, a date, MRN, DOB, ...)."""
    return not _dicom_by_name_or_content(name, data) and file_name_identifiers(name) is None


def _dicom_by_name_or_content(name: str, data: bytes = b"") -> bool:
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    if Path(base).suffix.lower() in DICOM_EXTENSIONS:
        return True
    return bool(data) and sniff_format(data[:4096], base) in ("dicom", "dicom?")


def shown_file_name(name: str, data: bytes = b"") -> str:
    """How a page or a message names an uploaded file (see ``name_may_be_shown``)."""
    if name_may_be_shown(name, data):
        return safe_name(name)
    if _dicom_by_name_or_content(name, data):
        return "the DICOM file (name not shown)"
    return "an image file (name not shown: it looks like it carries patient identifiers)"


def check_upload(upload: UploadedFile) -> str | None:
    """Reason to refuse ``upload`` before import, or None when it may be a scan."""
    if upload.size == 0:
        return "the file is empty (0 bytes)"
    if upload.size > settings.UPLOAD_MAX_FILE_BYTES:
        limit_mb = settings.UPLOAD_MAX_FILE_BYTES / 1024 / 1024
        return f"the file is {upload.size / 1024 / 1024:.1f} MB; the limit is {limit_mb:.0f} MB"
    upload.seek(0)
    head = upload.read(4096)
    upload.seek(0)
    kind = sniff_format(head, safe_name(upload.name or ""))
    if kind == "dicom?":  # no 'DICM' header: accept only if it parses as an image dataset
        data = upload.read()
        upload.seek(0)
        kind = "dicom" if probe_raw_dicom(data) else None
    if kind is None:
        return "not a DICOM, PNG, JPEG or TIFF file (checked its content, not its name)"
    return None


def _staged_file_name(index: int, name: str, *, dicom: bool) -> str:
    """A staged file's name: a DICOM is numbered, never named (the name may be the
    patient's); an image whose name looks like it carries identifiers keeps only its
    extension."""
    if dicom:
        return f"{index:04d}.dcm"
    if name_may_be_shown(name):
        return f"{index:04d}_{safe_name(name)}"
    return f"{index:04d}_{HIDDEN_NAME}{Path(safe_name(name)).suffix.lower()}"


def stage_uploads(uploads: list[UploadedFile]) -> Path:
    """Copy accepted uploads into a fresh folder under INCOMING_ROOT; return the folder.
    A copy that fails half-way (a full disk) leaves nothing behind."""
    folder = Path(settings.INCOMING_ROOT) / uuid.uuid4().hex
    folder.mkdir(parents=True, exist_ok=False)
    try:
        for index, upload in enumerate(uploads):
            upload.seek(0)
            head = upload.read(4096)
            upload.seek(0)
            name = upload.name or "upload"
            target = folder / _staged_file_name(
                index, name, dicom=_dicom_by_name_or_content(name, head))
            with open(target, "wb") as handle:
                for chunk in upload.chunks():
                    handle.write(chunk)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


# --- the classify page's upload, kept for "add it to the pool" ----------------------------

CLASSIFY_STAGING_HOURS = 6
# A folder or file under INCOMING_ROOT that no queued or running import reads (a request
# that died between staging its files and queuing their import) goes after this long.
INCOMING_ORPHAN_HOURS = 1
# Beside a classify page's de-identified copy: what the copy no longer says and a direct
# import of the upload would store (its sha256, the patient, study and series keys, the
# sealed linkage). Only pseudonyms and technical values: no identifier.
STAGED_IDENTITY = ".identity.json"
_IDENTITY_META = ("study_key", "series_key", "series_number", "instance_number",
                  "slice_position", "slice_spacing", "transfer_syntax")


class StagingRefused(Exception):
    """The classified upload cannot be kept for adding; ``str(exc)`` says why."""


def classify_staging_dir() -> Path:
    return Path(settings.INCOMING_ROOT) / "classify"


def _folder_bytes(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*"):
        try:
            total += path.stat().st_size if path.is_file() else 0
        except FileNotFoundError:        # another request removed it just now
            pass
    return total


def _modified(path: Path) -> float | None:
    try:
        return path.lstat().st_mtime
    except FileNotFoundError:            # another request removed it just now
        return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def incoming_sweep(*, now: float | None = None) -> dict[str, int]:
    """Remove what waits in INCOMING_ROOT past its time; safe to run any number of times
    (Celery beat runs it, and every upload and classify first). Goes: a classify page's
    copy older than CLASSIFY_STAGING_HOURS, and anything else no queued or running import
    reads that is older than INCOMING_ORPHAN_HOURS (an upload whose request died before its
    import was queued, a folder an import could not remove, the upload of an import that
    can no longer run: ``services.import_jobs_fail_stale``). Returns what it removed."""
    from annotator.models import ImportJob
    from annotator.services import import_jobs_fail_stale

    root = Path(settings.INCOMING_ROOT)
    removed = {"classify": 0, "orphaned": 0}
    if not root.is_dir():
        return removed
    import_jobs_fail_stale()       # an import that can no longer run reads nothing
    now = time.time() if now is None else now
    staging = classify_staging_dir()
    if staging.is_dir():
        for entry in staging.iterdir():
            modified = _modified(entry)
            if modified is not None and modified < now - CLASSIFY_STAGING_HOURS * 3600:
                _remove(entry)
                removed["classify"] += 1
    active = []
    for source in ImportJob.objects.filter(
        status__in=[ImportJob.Status.QUEUED, ImportJob.Status.RUNNING],
    ).values_list("source", flat=True):
        active.append(os.path.abspath(source))
        # "file.npz#split": the file (a "#" inside a folder's name is kept as it is)
        base, mark, tail = source.rpartition("#")
        if mark and base and os.sep not in tail:
            active.append(os.path.abspath(base))
    for entry in root.iterdir():
        path = os.path.abspath(entry)
        if entry == staging or any(a == path or a.startswith(path + os.sep) for a in active):
            continue
        modified = _modified(entry)
        if modified is not None and modified < now - INCOMING_ORPHAN_HOURS * 3600:
            _remove(entry)
            removed["orphaned"] += 1
    return removed


def classify_decode(data: bytes, *, name: str) -> tuple[DecodedScan, str | None]:
    """Decode a classify page's upload once, with the de-identified copy an import would
    store (``stored_bytes``, all that ``classify_stage`` keeps) and, with LINKAGE_KEY, its
    original identifiers for the encrypted linkage. Returns ``(decoded, not_kept)``:
    ``not_kept`` says why no copy could be made (the scan is still classified, not kept).
    Raises ScanDecodeError when the file cannot be read at all."""
    from annotator.linkage import linkage_enabled

    options = {"name": safe_name(name), "salt": settings.DEID_SALT,
               "max_pixels": settings.IMPORT_MAX_PIXELS,
               "request_max_pixels": settings.CLASSIFY_MAX_PIXELS}
    try:
        return decode_scan(data, keep_copy=True, linkage=linkage_enabled(), **options), None
    except ScanDecodeError as exc:
        not_kept = str(exc)
    # looked at, not kept (raises when the file cannot be read at all)
    return decode_scan(data, keep_copy=False, **options), not_kept


def classify_stage(decoded: DecodedScan, *, name: str, sha256: str, user_id: int,
                   project_id: int) -> str:
    """Keep the de-identified copy of a classified upload (``decoded.stored_bytes``, from
    ``classify_decode``; never the upload itself) so the classify page can add it to the
    pool; returns its token, the folder's name under ``classify_staging_dir``. Beside it,
    STAGED_IDENTITY: what the import then stores as a direct import of the upload would
    (the upload's sha256, so a duplicate is known; its pseudonyms; its linkage, encrypted).

    One folder per user and project: classifying again removes the user's earlier ones (the
    session keeps only the newest token, the one ``classify_add`` accepts). Folders older
    than CLASSIFY_STAGING_HOURS go (``incoming_sweep``, which also runs on a schedule), and
    the oldest others while all kept copies would pass CLASSIFY_STAGING_MAX_BYTES. Raises
    StagingRefused when this copy alone is larger."""
    import json

    from annotator.linkage import linkage_seal

    data = decoded.stored_bytes
    if not data:
        raise StagingRefused("no de-identified copy of it was made")
    cap = settings.CLASSIFY_STAGING_MAX_BYTES
    if len(data) > cap:
        raise StagingRefused(
            f"it is {len(data) / 1024 / 1024:.1f} MB and the classify page keeps at most "
            f"{cap / 1024 / 1024:.0f} MB of uploads waiting to be added: import it on the "
            "upload page instead")
    incoming_sweep()
    root = classify_staging_dir()
    root.mkdir(parents=True, exist_ok=True)
    mine = f"u{user_id}-p{project_id}-"
    kept = []
    for folder in root.iterdir():
        modified = _modified(folder)
        if modified is None or not folder.is_dir():
            continue
        if folder.name.startswith(mine):
            shutil.rmtree(folder, ignore_errors=True)
        else:
            kept.append((modified, folder.name, _folder_bytes(folder)))
    total = sum(size for _, _, size in kept)
    for _, old, size in sorted(kept):                     # the oldest first
        if total + len(data) <= cap:
            break
        shutil.rmtree(root / old, ignore_errors=True)
        total -= size
    file_name = _staged_file_name(0, name or "upload", dicom=decoded.file_format == "dicom"
                                  or _dicom_by_name_or_content(name or "upload"))
    identity = {file_name: {
        "sha256": sha256, "patient_key": decoded.patient_key,
        "file_format": decoded.file_format,
        "meta": {key: decoded.meta[key] for key in _IDENTITY_META if key in decoded.meta},
        "linkage_sealed": linkage_seal(decoded.linkage)}}
    staged = Path(settings.INCOMING_ROOT) / uuid.uuid4().hex
    staged.mkdir(parents=True, exist_ok=False)
    try:
        (staged / file_name).write_bytes(data)
        (staged / STAGED_IDENTITY).write_text(json.dumps(identity, default=float))
        target = root / f"{mine}{staged.name}"
        staged.rename(target)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return target.name


def classify_staged(token: str) -> Path | None:
    """The folder of a token ``classify_stage`` returned (the caller checked it is the
    session's), or None when it is gone (expired, or replaced by a newer upload)."""
    folder = classify_staging_dir() / token
    return folder if token and "/" not in token and folder.is_dir() else None


def classify_claim(folder: Path, token: str) -> Path:
    """Move a kept copy out of ``classify_staging_dir`` for its import, marked as new (its
    import, not yet committed, reads it: ``incoming_sweep`` leaves a new folder alone)."""
    claimed = Path(settings.INCOMING_ROOT) / f"add-{token}"
    try:
        folder.rename(claimed)
    except FileNotFoundError:    # a second click, or the sweep took it meanwhile
        raise StagingRefused("this upload is no longer kept (it was added already, or "
                             "expired): classify the file again") from None
    os.utime(claimed)
    return claimed


def staged_identities(source: str) -> dict[str, dict]:
    """What ``classify_stage`` wrote beside its copy (STAGED_IDENTITY), by file name: the
    import's ``overrides`` for it. Empty for any other staged upload."""
    import json

    try:
        identities = json.loads((Path(source) / STAGED_IDENTITY).read_text())
    except (OSError, ValueError):
        return {}
    return identities if isinstance(identities, dict) else {}


def upload_import_start(*, project, user, cleaned: dict) -> tuple[object | None, list[Rejection]]:
    """Import files a person uploaded (the upload page and the API, after ``UploadForm``
    validated ``cleaned``): each file checked by content, the accepted ones staged and one
    import job queued for them (run after the commit). Returns ``(job, rejected)``; the job
    is None when no file can be imported. The staged folder is removed if the job cannot be
    created, so nothing is left half-made."""
    import shutil

    from django.db import transaction

    from annotator import services
    from annotator.tasks import run_import_job

    incoming_sweep()
    accepted, rejected = [], []
    for upload in cleaned["files"]:
        reason = check_upload(upload)
        if reason:
            upload.seek(0)
            head = upload.read(4096)
            upload.seek(0)
            rejected.append(Rejection(shown_file_name(upload.name or "", head), reason))
        else:
            accepted.append(upload)
    if not accepted:
        return None, rejected
    folder = stage_uploads(accepted)
    try:
        with transaction.atomic():
            if cleaned.get("modality") or cleaned.get("body_part"):
                services.dataset_acquisition_set(
                    project=project, name=cleaned["dataset"],
                    modality=cleaned.get("modality") or "",
                    body_part=cleaned.get("body_part") or "")
            job = services.import_job_create(
                project=project, source=str(folder), source_is_upload=True,
                dataset_name=cleaned["dataset"], split=cleaned["split"], layout="flat",
                default_label=cleaned.get("label") or "", created_by=user)
            transaction.on_commit(lambda: _send_import(run_import_job, job, folder))
    except Exception:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    job.refresh_from_db(fields=["status", "last_error", "finished_at"])
    return job, rejected


def _send_import(task, job, folder) -> None:
    """Hand the committed import to a worker. A broker that does not answer (down, or
    refusing) fails the job at once, in words, and removes the raw upload: the page says
    so, rather than a 500 that claims nothing was half-saved beside a job "queued" for a day
    (tenth probe)."""
    if task.app.conf.task_always_eager:     # no broker: the import runs here, as it is
        task.delay(job.pk)
        return
    try:
        task.delay(job.pk)
    except Exception as exc:       # noqa: BLE001 - kombu/redis errors: the send boundary
        logger.warning("import %s could not be sent to a worker: %s", job.pk, type(exc).__name__)
        type(job).objects.filter(pk=job.pk, status=type(job).Status.QUEUED).update(
            status=type(job).Status.FAILED, finished_at=timezone.now(),
            last_error="the import could not be handed to a worker (the task broker did "
                       "not answer); nothing was imported and the upload was removed: "
                       "upload the files again once the site's workers are back")
        shutil.rmtree(folder, ignore_errors=True)
