"""Writes: projects, classes, scan import. Views, commands and tasks call these."""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from annotator.models import Annotation, Dataset, ImportJob, LabelClass, Membership, Project, Scan
from annotator.storage import preview_file_name, remove_if_unreferenced, scan_file_name, write_atomic
from ml_backend.data.datasets import SourceError, SourceItem, read_source
from ml_backend.data.decode import ScanDecodeError, decode_scan, render_preview

logger = logging.getLogger(__name__)

# Colours given to new classes in turn (Tableau 10).
_PALETTE = ["#4c78a8", "#f58518", "#e45756", "#72b7b2", "#54a24b",
            "#eeca3b", "#b279a2", "#ff9da6", "#9d755d", "#bab0ac"]


class ImportRequestError(Exception):
    """The import as a whole cannot start (bad source, unknown project)."""


def project_create(*, name: str, description: str = "", created_by=None) -> Project:
    project = Project.objects.create(name=name, description=description, created_by=created_by)
    if created_by is not None:
        Membership.objects.create(project=project, user=created_by, role=Membership.Role.ADMIN)
    return project


def membership_set(*, project: Project, user, role: str) -> Membership:
    membership, _ = Membership.objects.update_or_create(
        project=project, user=user, defaults={"role": role}
    )
    return membership


def label_class_get_or_create(
    *, project: Project, name: str, created_by=None, description: str = ""
) -> tuple[LabelClass, bool]:
    """Find a class by name (case-insensitive) or create it with the next hotkey and colour."""
    clean = " ".join(name.split())
    if not clean:
        raise ValueError("a class name cannot be empty")
    if len(clean) > 100:
        raise ValueError("a class name is at most 100 characters")
    existing = LabelClass.objects.filter(project=project, name__iexact=clean).first()
    if existing is not None:
        return existing, False
    count = LabelClass.objects.filter(project=project).count()
    used = set(LabelClass.objects.filter(project=project).values_list("hotkey", flat=True))
    hotkey = next((k for k in "123456789" if k not in used), "")
    label_class = LabelClass.objects.create(
        project=project,
        name=clean,
        description=description,
        hotkey=hotkey,
        color=_PALETTE[count % len(_PALETTE)],
        order=count,
        created_by=created_by,
    )
    return label_class, True


def dataset_get_or_create(*, project: Project, name: str, **fields) -> Dataset:
    dataset, created = Dataset.objects.get_or_create(project=project, name=name, defaults=fields)
    return dataset


@dataclass
class _JobState:
    """Counters kept while a job runs; flushed to its ImportJob row."""

    imported: int = 0
    duplicates: int = 0
    failed: int = 0
    labels_added: int = 0
    errors: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    classes_created: list[str] = field(default_factory=list)


def import_job_create(
    *,
    project: Project,
    source: str,
    dataset_name: str = "",
    split: str = Scan._meta.get_field("split").default,
    layout: str = "auto",
    labels_csv: str = "",
    default_label: str = "",
    created_by=None,
    source_is_upload: bool = False,
) -> ImportJob:
    if split not in ("pool", "eval"):
        raise ImportRequestError(f"unknown split {split!r}: use pool or eval")
    return ImportJob.objects.create(
        project=project,
        source=source,
        dataset_name=dataset_name,
        split=split,
        layout=layout,
        labels_csv=labels_csv,
        default_label=default_label,
        created_by=created_by,
        source_is_upload=source_is_upload,
    )


def import_job_run(
    *, job_id: int, progress: Callable[[int, int], None] | None = None
) -> ImportJob | None:
    """Run a queued import job. A second delivery of the same job does nothing.

    Every file is imported in its own transaction; a failing file is recorded
    in ``job.errors`` and the batch goes on.
    """
    claimed = ImportJob.objects.filter(pk=job_id, status=ImportJob.Status.QUEUED).update(
        status=ImportJob.Status.RUNNING, started_at=timezone.now()
    )
    if claimed != 1:
        logger.info("import job %s already claimed or finished; nothing to do", job_id)
        return None
    job = ImportJob.objects.select_related("project", "created_by").get(pk=job_id)
    state = _JobState()
    try:
        listing = read_source(
            job.source, labels_csv=job.labels_csv or None, layout=job.layout
        )
        dataset = dataset_get_or_create(
            project=job.project,
            name=job.dataset_name or listing.default_dataset_name or "import",
        )
        if listing.unmatched_label_rows:
            sample = ", ".join(listing.unmatched_label_rows[:5])
            state.warnings.append(
                f"{len(listing.unmatched_label_rows)} labels CSV rows matched no file (e.g. {sample})"
            )
        job.total = len(listing.items)
        job.skipped = len(listing.skipped)
        job.save(update_fields=["total", "skipped"])
        for index, item in enumerate(listing.items, start=1):
            if job.default_label and item.label is None:
                item = SourceItem(item.name, job.default_label, item.load, item.digest_hint)
            _import_item(job=job, dataset=dataset, item=item, state=state)
            if progress is not None:
                progress(index, job.total)
            if index % 25 == 0 or index == job.total:
                _flush(job, state, processed=index)
        job.status = ImportJob.Status.SUCCEEDED
    except SourceError as exc:
        job.status = ImportJob.Status.FAILED
        job.last_error = str(exc)
    except Exception as exc:  # the job's boundary: record, never lose the row
        logger.exception("import job %s crashed", job_id)
        job.status = ImportJob.Status.FAILED
        job.last_error = f"unexpected error: {type(exc).__name__}: {exc}"
    finally:
        job.finished_at = timezone.now()
        _flush(job, state, processed=job.processed, final=True)
        if job.source_is_upload:
            shutil.rmtree(job.source, ignore_errors=True)
    return job


def _flush(job: ImportJob, state: _JobState, *, processed: int, final: bool = False) -> None:
    job.processed = max(processed, job.processed)
    job.imported = state.imported
    job.duplicates = state.duplicates
    job.failed = state.failed
    job.labels_added = state.labels_added
    job.errors = state.errors
    job.warnings = state.warnings
    job.classes_created = state.classes_created
    fields = ["processed", "imported", "duplicates", "failed", "labels_added", "errors",
              "warnings", "classes_created"]
    if final:
        fields += ["status", "last_error", "finished_at"]
    job.save(update_fields=fields)


def _import_item(*, job: ImportJob, dataset: Dataset, item: SourceItem, state: _JobState) -> None:
    created_files: list[str] = []
    try:
        try:
            data = item.load()
        except OSError as exc:
            raise ScanDecodeError(f"cannot read file: {exc.strerror or exc}") from None
        if len(data) > settings.UPLOAD_MAX_FILE_BYTES:
            raise ScanDecodeError(
                f"file is {len(data):,} bytes, above the limit of {settings.UPLOAD_MAX_FILE_BYTES:,}"
            )
        sha = item.digest_hint or hashlib.sha256(data).hexdigest()
        existing = Scan.objects.filter(project=job.project, sha256=sha).first()
        if existing is not None:
            state.duplicates += 1
            if item.label:
                with transaction.atomic():
                    outcome = _add_import_label(job=job, scan=existing, label=item.label)
                _count_label(state, outcome)
            return

        decoded = decode_scan(
            data, name=item.name, salt=settings.DEID_SALT, max_pixels=settings.IMPORT_MAX_PIXELS
        )
        del data  # the raw bytes may hold PHI; only de-identified bytes go further
        preview = render_preview(decoded.pixels, max_side=settings.PREVIEW_MAX_SIDE)
        file_name = scan_file_name(sha, decoded.stored_ext)
        preview_name = preview_file_name(sha)
        if write_atomic(file_name, decoded.stored_bytes):
            created_files.append(file_name)
        if write_atomic(preview_name, preview):
            created_files.append(preview_name)

        meta = decoded.meta
        with transaction.atomic():
            scan = Scan.objects.create(
                project=job.project,
                dataset=dataset,
                sha256=sha,
                file=file_name,
                preview=preview_name,
                file_format=decoded.file_format,
                source_name="" if decoded.file_format == "dicom" else item.name[:255],
                width=decoded.width,
                height=decoded.height,
                num_frames=decoded.num_frames,
                bits_stored=meta.get("bits_stored") or 8,
                modality=meta.get("modality", "")[:16],
                manufacturer=meta.get("manufacturer", ""),
                manufacturer_model=meta.get("manufacturer_model", ""),
                body_part=meta.get("body_part", ""),
                photometric=meta.get("photometric", ""),
                pixel_spacing=meta.get("pixel_spacing"),
                transfer_syntax=meta.get("transfer_syntax", ""),
                patient_key=decoded.patient_key,
                burned_in_annotation=bool(meta.get("burned_in_annotation")),
                quarantined=bool(meta.get("burned_in_annotation")),
                split=job.split,
            )
            outcome = (
                _add_import_label(job=job, scan=scan, label=item.label) if item.label else None
            )
        _count_label(state, outcome)
        created_files.clear()  # committed: the files now belong to the row
        state.imported += 1
        for note in decoded.warnings:
            state.warnings.append(f"{item.name}: {note}")
        if scan.quarantined:
            state.warnings.append(f"{item.name}: quarantined as scan {scan.pk} (burned-in "
                                  "annotation): an admin must check and release it")
    except IntegrityError:
        # Another import stored the same content between our check and insert.
        state.duplicates += 1
    except (ScanDecodeError, ValueError) as exc:
        state.failed += 1
        state.errors.append({"name": item.name, "reason": str(exc)})
    except Exception as exc:  # one bad file never aborts the batch
        logger.warning("import of one file failed: %s", type(exc).__name__)
        state.failed += 1
        state.errors.append({"name": item.name, "reason": f"unexpected error ({type(exc).__name__})"})
    finally:
        for name in created_files:
            remove_if_unreferenced(name)


def _add_import_label(*, job: ImportJob, scan: Scan, label: str) -> tuple[str | None, bool]:
    """Give ``scan`` an import label once. Returns (new class name or None, label added)."""
    label_class, created = label_class_get_or_create(
        project=job.project, name=label, created_by=job.created_by
    )
    _, added = Annotation.objects.get_or_create(
        scan=scan,
        label_class=label_class,
        source=Annotation.Source.IMPORT,
        defaults={
            "outcome": Annotation.Outcome.LABEL,
            "reader": job.created_by,
            "import_job": job,
        },
    )
    return (label_class.name if created else None), added


def _count_label(state: _JobState, outcome: tuple[str | None, bool] | None) -> None:
    """Count a label only once its transaction has committed."""
    if outcome is None:
        return
    new_class, added = outcome
    if new_class:
        state.classes_created.append(new_class)
    state.labels_added += int(added)


class AnnotationError(Exception):
    """An annotation cannot be recorded as asked (wrong project, missing class)."""


def annotation_create(
    *,
    scan: Scan,
    reader,
    label_class: LabelClass | None = None,
    outcome: str = Annotation.Outcome.LABEL,
    source: str = Annotation.Source.WEB,
    duration_ms: int | None = None,
    shown_model_version=None,
    shown_suggestion: LabelClass | None = None,
    shown_confidence: float | None = None,
    shown_acquisition_score: float | None = None,
    query_round=None,
    external_id: str = "",
    note: str = "",
) -> Annotation:
    """Record one reader's answer and what they were shown; queue a refit when due."""
    if outcome not in Annotation.Outcome.values:
        raise AnnotationError(f"unknown outcome {outcome!r}")
    if outcome == Annotation.Outcome.LABEL and label_class is None:
        raise AnnotationError("a label needs a class (or record a skip / unsure)")
    if label_class is not None and label_class.project_id != scan.project_id:
        raise AnnotationError(f"class {label_class.name!r} belongs to another project")
    annotation = Annotation.objects.create(
        scan=scan, reader=reader, label_class=label_class, outcome=outcome, source=source,
        duration_ms=duration_ms, shown_model_version=shown_model_version,
        shown_suggestion=shown_suggestion, shown_confidence=shown_confidence,
        shown_acquisition_score=shown_acquisition_score, query_round=query_round,
        external_id=external_id, note=note)
    if outcome == Annotation.Outcome.LABEL and scan.split == "pool":
        project = scan.project
        transaction.on_commit(lambda: refit_if_due(project=project))
    return annotation


def refit_if_due(*, project: Project):
    """Queue a refit (a Celery task, never in the request) after ``refit_every`` new pool
    labels since the last refit, unless one is already queued or running."""
    from ml_backend import services as ml
    from ml_backend.models import TrainingRun

    project = Project.objects.get(pk=project.pk)   # current settings, not a cached instance
    if project.active_encoder_id is None:
        return None
    refits = TrainingRun.objects.filter(project=project, kind=TrainingRun.Kind.REFIT)
    if refits.filter(status__in=[TrainingRun.Status.QUEUED, TrainingRun.Status.RUNNING]).exists():
        return None
    last = refits.order_by("-created_at").first()
    new_labels = Annotation.objects.filter(scan__project=project, scan__split="pool",
                                           outcome=Annotation.Outcome.LABEL)
    if last is not None:
        new_labels = new_labels.filter(created_at__gt=last.created_at)
    if new_labels.count() < max(project.refit_every, 1):
        return None
    return ml.training_run_create(project=project, kind=TrainingRun.Kind.REFIT, enqueue=True)
