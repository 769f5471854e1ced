"""Checks and staging for files uploaded through the browser."""

from __future__ import annotations

import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.core.files.uploadedfile import UploadedFile

from ml_backend.data.decode import DICOM_EXTENSIONS, probe_raw_dicom, sniff_format
from ml_backend.data.deid import file_name_identifiers

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


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


def stage_uploads(uploads: list[UploadedFile]) -> Path:
    """Copy accepted uploads into a fresh folder under INCOMING_ROOT; return the folder."""
    folder = Path(settings.INCOMING_ROOT) / uuid.uuid4().hex
    folder.mkdir(parents=True, exist_ok=False)
    for index, upload in enumerate(uploads):
        upload.seek(0)
        head = upload.read(4096)
        upload.seek(0)
        # staged DICOM files are numbered, never named (the name may be the patient's); an
        # image whose name looks like it carries identifiers keeps only its extension
        name = upload.name or "upload"
        if name_may_be_shown(name, head):
            target = folder / f"{index:04d}_{safe_name(name)}"
        elif _dicom_by_name_or_content(name, head):
            target = folder / f"{index:04d}.dcm"
        else:
            extension = Path(safe_name(name)).suffix.lower()
            target = folder / f"{index:04d}_{HIDDEN_NAME}{extension}"
        with open(target, "wb") as handle:
            for chunk in upload.chunks():
                handle.write(chunk)
    return folder


# --- the classify page's upload, kept for "add it to the pool" ----------------------------

CLASSIFY_STAGING_HOURS = 6


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


def classify_stage(upload: UploadedFile, *, user_id: int, project_id: int) -> str:
    """Keep a classified upload (it may hold PHI until imported) so the classify page can add
    it to the pool; returns its token, the folder's name under ``classify_staging_dir``.

    One folder per user and project: classifying again removes the user's earlier ones (the
    session keeps only the newest token, the one ``classify_add`` accepts). Folders older
    than CLASSIFY_STAGING_HOURS go, and the oldest others while all kept uploads would pass
    CLASSIFY_STAGING_MAX_BYTES. Raises StagingRefused when this upload alone is larger."""
    cap = settings.CLASSIFY_STAGING_MAX_BYTES
    if upload.size > cap:
        raise StagingRefused(
            f"it is {upload.size / 1024 / 1024:.1f} MB and the classify page keeps at most "
            f"{cap / 1024 / 1024:.0f} MB of uploads waiting to be added: import it on the "
            "upload page instead")
    root = classify_staging_dir()
    root.mkdir(parents=True, exist_ok=True)
    mine = f"u{user_id}-p{project_id}-"
    cutoff = time.time() - CLASSIFY_STAGING_HOURS * 3600
    kept = []
    for folder in root.iterdir():
        try:
            modified = folder.stat().st_mtime
        except FileNotFoundError:
            continue
        if not folder.is_dir():
            continue
        if folder.name.startswith(mine) or modified < cutoff:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            kept.append((modified, folder.name, _folder_bytes(folder)))
    total = sum(size for _, _, size in kept)
    for _, name, size in sorted(kept):                    # the oldest first
        if total + upload.size <= cap:
            break
        shutil.rmtree(root / name, ignore_errors=True)
        total -= size
    staged = stage_uploads([upload])
    target = root / f"{mine}{staged.name}"
    staged.rename(target)
    return target.name


def classify_staged(token: str) -> Path | None:
    """The folder of a token ``classify_stage`` returned (the caller checked it is the
    session's), or None when it is gone (expired, or replaced by a newer upload)."""
    folder = classify_staging_dir() / token
    return folder if token and "/" not in token and folder.is_dir() else None


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
            transaction.on_commit(lambda: run_import_job.delay(job.pk))
    except Exception:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return job, rejected
