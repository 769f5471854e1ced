"""Writes: projects, classes, scan import. Views, commands and tasks call these."""

from __future__ import annotations

import hashlib
import io
import re
import logging
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.db import DataError, DatabaseError, IntegrityError, OperationalError, transaction
from django.db.models import F, Q, Sum
from django.utils import timezone

from annotator.models import (
    Annotation,
    Dataset,
    FindingAnswer,
    ImportChunk,
    ImportJob,
    LabelClass,
    LabelSet,
    Membership,
    Project,
    Scan,
    Split,
    hotkey_error,
)
from annotator.storage import (
    preview_file_name,
    remove_if_unreferenced,
    scan_file_name,
    write_atomic,
)
from annotator.uploads import HIDDEN_NAME, name_may_be_shown, staged_identities
from ml_backend.data.datasets import (
    SourceError,
    SourceItem,
    SourceListing,
    read_source,
    storable_text,
)
from ml_backend.data.findings import is_findings_source, read_findings_source
from ml_backend.data.decode import (
    ScanDecodeError,
    decode_scan,
    render_preview,
    sniff_format,
)
from annotator.names import (UNTYPABLE, dataset_name_refusal, name_refusal,  # noqa: F401
                             untypable_character, without_untypable)
from ml_backend.data.deid import (file_name_identifiers, identifier_reason,
                                  source_patient_pseudonym)
from ml_backend.models import ModelVersion, Prediction
from ml_backend.services import runs

logger = logging.getLogger(__name__)

# Colours given to new classes in turn (Tableau 10).
_PALETTE = ["#4c78a8", "#f58518", "#e45756", "#72b7b2", "#54a24b",
            "#eeca3b", "#b279a2", "#ff9da6", "#9d755d", "#bab0ac"]


class ImportRequestError(Exception):
    """The import as a whole cannot start (bad source, unknown project)."""


def project_create(*, name: str, description: str = "", created_by=None) -> Project:
    """A project, its default label set, and its creator as its admin. Raises ValueError
    for a name no one could type (``name_refusal``)."""
    refusal = name_refusal("project", name)
    if refusal is not None:
        raise ValueError(refusal)
    project = Project.objects.create(name=name, description=description, created_by=created_by)
    label_set_default(project)
    if created_by is not None:
        Membership.objects.create(project=project, user=created_by, role=Membership.Role.ADMIN)
    return project


def membership_set(*, project: Project, user, role: str) -> Membership:
    membership, _ = Membership.objects.update_or_create(
        project=project, user=user, defaults={"role": role}
    )
    return membership


# --- label sets ------------------------------------------------------------------------


def label_set_default(project: Project) -> LabelSet:
    """The project's first label set (a 'default' set is made for a project without one)."""
    first = project.label_sets.order_by("order", "pk").first()
    if first is None:
        first, _ = LabelSet.objects.get_or_create(project=project, name="default")
    return first


def label_set_create(*, project: Project, name: str, datasets=(), modalities: str = "",
                     body_parts: str = "", description: str = "", kind: str | None = None,
                     uncertain_policy: str | None = None) -> LabelSet:
    """Add a label set (or update the rules of the one with this name) and re-assign scans.

    A project made with ``project_create`` starts with an empty catch-all set named
    'default': the first named set replaces it when it holds no classes yet.
    ``kind``: ``single`` (one class per scan, the default) or ``multi`` (findings); it is
    chosen at creation and can change only while the set holds no answers."""
    clean = " ".join(name.split())
    if not clean or len(clean) > 100:
        raise ValueError("a label set needs a name of 1–100 characters")
    refusal = name_refusal("label set", clean)
    if refusal is not None:
        raise ValueError(refusal)
    if kind is not None and kind not in LabelSet.Kind.values:
        raise ValueError(f"a label set's kind is single or multi, not {kind!r}")
    if uncertain_policy is not None and uncertain_policy not in LabelSet.UncertainPolicy.values:
        raise ValueError("the uncertain-label policy is ignore, zeros or ones")
    with transaction.atomic():
        label_set = LabelSet.objects.filter(project=project, name__iexact=clean).first()
        if label_set is None:
            spare = LabelSet.objects.filter(project=project, name="default").first()
            if (spare is not None and not spare.classes.exists()
                    and project.label_sets.count() == 1):
                spare.name = clean
                label_set = spare
            else:
                label_set = LabelSet(project=project, name=clean,
                                     order=project.label_sets.count())
        label_set.modalities = modalities
        label_set.body_parts = body_parts
        label_set.description = description or label_set.description
        if kind is not None and kind != label_set.kind:
            if label_set.pk and Annotation.objects.filter(
                    Q(label_class__label_set=label_set) | Q(findings__finding__label_set=label_set)
            ).exists():
                raise ValueError(f"the label set {label_set.name!r} already holds answers: its "
                                 "kind (single label or findings) can no longer change")
            label_set.kind = kind
        if uncertain_policy is not None:
            label_set.uncertain_policy = uncertain_policy
        label_set.save()
        if datasets:
            label_set.datasets.add(*datasets)
        label_sets_assign(project)
    return label_set


def label_set_resolve(sets: list[LabelSet], *, dataset_id: int | None, modality: str = "",
                      body_part: str = "", set_datasets: dict[int, set[int]] | None = None
                      ) -> LabelSet | None:
    """The set a scan belongs to: the first set (in order) claiming its dataset, then its
    modality, then its body part; else the only set, else a set with no rules; else None."""
    if set_datasets is None:
        set_datasets = {s.pk: set(s.datasets.values_list("pk", flat=True)) for s in sets}
    for label_set in sets:
        if dataset_id in set_datasets.get(label_set.pk, ()):
            return label_set
    modality, body_part = (modality or "").strip().upper(), (body_part or "").strip().upper()
    for label_set in sets:
        if modality and modality in label_set.modality_codes:
            return label_set
    for label_set in sets:
        if body_part and body_part in label_set.body_part_codes:
            return label_set
    if len(sets) == 1:
        return sets[0]
    for label_set in sets:
        if (not set_datasets.get(label_set.pk) and not label_set.modality_codes
                and not label_set.body_part_codes):
            return label_set
    return None


class _SetResolver:
    """Resolves scans to label sets with the project's rules read once."""

    def __init__(self, project: Project):
        self.sets = list(project.label_sets.order_by("order", "pk").prefetch_related("datasets"))
        self.set_datasets = {s.pk: {d.pk for d in s.datasets.all()} for s in self.sets}
        self.datasets = {d.pk: d for d in project.datasets.all()}

    def __call__(self, *, dataset_id: int, modality: str = "", body_part: str = ""):
        dataset = self.datasets.get(dataset_id)
        return label_set_resolve(
            self.sets, dataset_id=dataset_id, set_datasets=self.set_datasets,
            modality=modality or (dataset.modality if dataset else ""),
            body_part=body_part or (dataset.body_part if dataset else ""))


def label_sets_assign(project: Project) -> int:
    """Re-apply the label sets' rules to every scan of the project; returns scans changed."""
    resolve = _SetResolver(project)
    changed = 0
    rows = Scan.objects.filter(project=project).values_list(
        "pk", "dataset_id", "modality", "body_part", "label_set_id")
    moves: dict[int | None, list[int]] = {}
    for pk, dataset_id, modality, body_part, current in rows:
        target = resolve(dataset_id=dataset_id, modality=modality, body_part=body_part)
        target_id = target.pk if target else None
        if target_id != current:
            moves.setdefault(target_id, []).append(pk)
    for target_id, pks in moves.items():
        for start in range(0, len(pks), 1000):
            changed += Scan.objects.filter(pk__in=pks[start:start + 1000]).update(
                label_set_id=target_id)
    return changed


def label_class_get_or_create(
    *, project: Project, name: str, created_by=None, description: str = "",
    label_set: LabelSet | None = None,
) -> tuple[LabelClass, bool]:
    """Find a class by name (case-insensitive) or create it in ``label_set`` (the project's
    first set by default) with the next hotkey free in that set and the next colour.
    Raises ValueError when the name is taken by a class of another set."""
    clean = " ".join(name.split())
    if not clean:
        raise ValueError("a class name cannot be empty")
    if len(clean) > 100:
        raise ValueError("a class name is at most 100 characters")
    refusal = name_refusal("class", clean)
    if refusal is not None:
        raise ValueError(refusal)
    existing = LabelClass.objects.filter(project=project, name__iexact=clean).first()
    if existing is not None:
        if label_set is not None and existing.label_set_id != label_set.pk:
            raise ValueError(f"class {existing.name!r} belongs to the label set "
                             f"{existing.label_set.name!r}, not {label_set.name!r}")
        return existing, False
    label_set = label_set or label_set_default(project)
    count = LabelClass.objects.filter(project=project).count()
    used = set(LabelClass.objects.filter(label_set=label_set).values_list("hotkey", flat=True))
    hotkey = next((k for k in "123456789" if k not in used), "")
    try:
        with transaction.atomic():     # a savepoint: another worker may make it first
            label_class = LabelClass.objects.create(
                project=project,
                label_set=label_set,
                name=clean,
                description=description,
                hotkey=hotkey,
                color=_PALETTE[count % len(_PALETTE)],
                order=count,
                created_by=created_by,
            )
    except IntegrityError:
        existing = LabelClass.objects.filter(project=project, name__iexact=clean).first()
        if existing is None or existing.label_set_id != label_set.pk:
            raise
        return existing, False          # an import chunk on another worker made it just now
    return label_class, True


def label_class_uses(label_class: LabelClass) -> dict[str, int]:
    """What refers to ``label_class`` (only the kinds that do, with their counts): answers
    giving it, findings answers stating it, suggestions shown and predictions made with it,
    and classifier versions that learned it. A class that has any of these belongs to the
    scans of its label set for good."""
    if label_class.pk is None:
        return {}
    pk = label_class.pk
    uses = {
        "answers": Annotation.objects.filter(label_class_id=pk).count(),
        "findings answers": FindingAnswer.objects.filter(finding_id=pk).count(),
        "shown suggestions": Annotation.objects.filter(shown_suggestion_id=pk).count(),
        "predictions": Prediction.objects.filter(predicted_class_id=pk).count(),
        "model versions": sum(
            1 for config in ModelVersion.objects.filter(
                project_id=label_class.project_id, kind=ModelVersion.Kind.CLASSIFIER
            ).values_list("config", flat=True).iterator()
            if pk in _learned_ids(config)),
    }
    return {what: n for what, n in uses.items() if n}


def _learned_ids(config) -> set[int]:
    """The class and finding ids a classifier version's config names."""
    if not isinstance(config, dict):
        return set()
    ids = {c.get("id") for c in config.get("classes") or [] if isinstance(c, dict)}
    for entry in config.get("findings_sets") or []:
        if isinstance(entry, dict):
            ids |= {f.get("id") for f in entry.get("findings") or [] if isinstance(f, dict)}
    return ids


def label_class_set_change_problem(label_class: LabelClass, label_set: LabelSet | None
                                   ) -> str | None:
    """Why ``label_class`` cannot belong to ``label_set`` (None when it may): a set of another
    project, or a move out of its set once anything refers to the class (its answers were
    given on the scans of that set; a model learned it for them)."""
    if label_set is None:
        return None
    if label_class.project_id is not None and label_set.project_id != label_class.project_id:
        return (f"the label set {label_set.name!r} belongs to another project: choose one of "
                "this project's label sets")
    if label_class.pk is None:
        return None
    stored = LabelClass.objects.filter(pk=label_class.pk).select_related("label_set").first()
    if stored is None or stored.label_set_id == label_set.pk:
        return None
    uses = label_class_uses(stored)
    if not uses:
        return None
    said = ", ".join(f"{n} {what}" for what, n in uses.items())
    return (f"{stored.name!r} cannot move from {stored.label_set.name!r} to "
            f"{label_set.name!r}: it already has {said} on {stored.label_set.name!r} scans. "
            f"Add a new class to {label_set.name!r} instead.")


def label_class_hotkey_problem(*, label_set: LabelSet, hotkey: str,
                               label_class: LabelClass | None = None) -> str | None:
    """Why ``hotkey`` cannot be this class's key in ``label_set`` (None when it can): a key
    the label page keeps for itself (``hotkey_error``), or one another class of that set
    already has (the label page would answer both with one key)."""
    key = (hotkey or "").strip().lower()
    if not key:
        return None
    problem = hotkey_error(key, findings=label_set.is_multi)
    if problem:
        return problem
    others = LabelClass.objects.filter(label_set=label_set, hotkey__iexact=key)
    if label_class is not None and label_class.pk is not None:
        others = others.exclude(pk=label_class.pk)
    taken = others.values_list("name", flat=True).first()
    if taken is not None:
        return (f"{key!r} already labels {taken!r} in {label_set.name!r}: choose another "
                "letter or digit.")
    return None


def label_class_update(*, label_class: LabelClass, **fields) -> LabelClass:
    """Change a class (name, description, hotkey, colour, order, label set) after the same
    checks the forms make: a class that has labels keeps its label set, and its hotkey is
    free in its (new) set. Raises ValueError with the reason; nothing is saved then."""
    allowed = {"name", "description", "hotkey", "color", "order", "label_set"}
    unknown = set(fields) - allowed
    if unknown:
        raise ValueError(f"a class has no field(s) {', '.join(sorted(unknown))}")
    with transaction.atomic():
        label_class = LabelClass.objects.select_for_update().get(pk=label_class.pk)
        label_set = fields.get("label_set", label_class.label_set)
        problem = label_class_set_change_problem(label_class, label_set)
        hotkey = (fields.get("hotkey", label_class.hotkey) or "").strip().lower()
        problem = problem or label_class_hotkey_problem(label_set=label_set, hotkey=hotkey,
                                                        label_class=label_class)
        if problem:
            raise ValueError(problem)
        if "name" in fields:
            name = " ".join(str(fields["name"]).split())
            if not name or len(name) > 100:
                raise ValueError("a class name is 1–100 characters")
            if name_refusal("class", name):
                raise ValueError(name_refusal("class", name))
            if LabelClass.objects.filter(project_id=label_class.project_id,
                                         name__iexact=name).exclude(pk=label_class.pk).exists():
                raise ValueError(f"this project already has a class called {name!r}")
            fields["name"] = name
        for name, value in {**fields, "hotkey": hotkey, "label_set": label_set}.items():
            setattr(label_class, name, value)
        label_class.save()
    return label_class


def answer_outcome_conflicts(*, outcome: str, class_id=None, findings=None,
                             no_finding=False) -> dict[str, str]:
    """The fields of a reader's answer that belong to another outcome than ``outcome``, each
    with why (empty when none): a class is only for ``label``, findings and ``no_finding``
    only for ``findings``, neither for ``skip`` / ``unsure``. A contradicting answer
    (``{"outcome": "unsure", "class_id": 2}``) is refused naming the field, never stored
    with the field dropped. None, ``{}`` and false say nothing."""
    said = {"class_id": class_id is not None, "findings": bool(findings),
            "no_finding": no_finding is True}
    belongs = {"class_id": "label", "findings": "findings", "no_finding": "findings"}
    return {field: (f"{field} is only for outcome={belongs[field]}, not {outcome}: leave it "
                    "out (or send the outcome it belongs to)")
            for field, given in said.items() if given and belongs[field] != outcome}


def dataset_get_or_create(*, project: Project, name: str, **fields) -> Dataset:
    dataset, created = Dataset.objects.get_or_create(project=project, name=name, defaults=fields)
    return dataset


MODALITY_CHOICES = [("", "— from the files (DICOM) —"), ("CR", "CR: computed radiography"),
                    ("DX", "DX: digital X-ray"), ("CT", "CT"), ("MR", "MR"),
                    ("US", "US: ultrasound"), ("MG", "MG: mammography"),
                    ("SM", "SM: slide microscopy (histopathology)"),
                    ("XC", "XC: photograph (dermatology, smears)"),
                    ("ES", "ES: endoscopy"), ("OP", "OP: ophthalmic photograph"),
                    ("OT", "OT: other")]


class DatasetMismatch(ImportRequestError):
    """An import names an existing dataset with another modality or body part than the
    dataset's; ``str(exc)`` names the dataset's values, ``fields`` the fields that differ."""

    def __init__(self, message: str, fields: list[str]):
        super().__init__(message)
        self.fields = fields


def dataset_acquisition_set(*, project: Project, name: str, modality: str = "",
                            body_part: str = "") -> Dataset:
    """The modality and body part of a dataset's scans, for files that do not say (PNG,
    JPEG, TIFF): its scans get them at import when their own header has none.

    An empty value keeps the dataset's, and a dataset without one gets the given value; an
    existing dataset's value is never replaced by another (that would give its later imports
    another anatomy's classes): DatasetMismatch says what the dataset holds. An admin changes
    a dataset in the admin."""
    modality = " ".join((modality or "").split()).upper()[:16]
    body_part = " ".join((body_part or "").split()).upper()[:64]
    dataset = dataset_get_or_create(project=project, name=name, modality=modality,
                                    body_part=body_part)
    given = (("modality", modality), ("body_part", body_part))
    differ = [k for k, v in given if v and getattr(dataset, k) and getattr(dataset, k) != v]
    if differ:
        held = ", ".join(f"{k.replace('_', ' ')} {getattr(dataset, k) or '(none)'}"
                         for k, _ in given)
        asked = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in given if v)
        raise DatasetMismatch(
            f"the dataset {dataset.name!r} holds scans of {held}, not {asked}: leave modality "
            "and body part empty to keep the dataset's, or name another dataset (an admin can "
            "change a dataset's values)", differ)
    changed = {k: v for k, v in given if v and getattr(dataset, k) != v}
    if changed:
        Dataset.objects.filter(pk=dataset.pk).update(**changed)
        for key, value in changed.items():
            setattr(dataset, key, value)
    return dataset


_UPLOAD_PREFIX = re.compile(r"^\d{4}_")


def shown_item_name(job: ImportJob, name: str) -> str:
    """An imported file's name as the user gave it (uploads are staged as ``NNNN_name``)."""
    return _UPLOAD_PREFIX.sub("", name) if job.source_is_upload else name


def _hidden_name_reason(job: ImportJob, name: str, data: bytes | None) -> str | None:
    """Why an imported file's name is not stored (None: it is stored as ``source_name``):
    a DICOM's never is; a raster's is not when it or its folders look like they carry
    identifiers (``deid.file_name_identifiers``), or when the upload page already hid it."""
    if not name_may_be_shown(name, data or b""):
        return file_name_identifiers(shown_item_name(job, name)) or "DICOM"
    if job.source_is_upload and Path(shown_item_name(job, name)).stem == HIDDEN_NAME:
        return "hidden when uploaded"
    return None


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
    # colour decisions: {(colour or grey, why): count}; what decided the project's mode
    colour: dict = field(default_factory=dict)
    colour_into_grey: int = 0
    colour_decided: str = ""
    series_stacked: int = 0       # series imported as one scan each, and their slices
    series_slices: int = 0
    scan_ids: list = field(default_factory=list)   # the scans this run stored
    names_hidden: int = 0         # raster names not stored: they look like identifiers
    names_dicom_like: int = 0     # raster names not stored: named as DICOM files are
    labels_hidden: int = 0        # labels not used: they look like identifiers
    # scans no label set applies to: {(modality, body part): count}
    no_label_set: dict = field(default_factory=dict)

    def to_report(self) -> dict:
        """What an import chunk keeps of its state (JSON) for the job's final report."""
        return {"errors": self.errors, "warnings": self.warnings,
                "classes_created": self.classes_created,
                "colour": [[mode, why, n] for (mode, why), n in self.colour.items()],
                "colour_into_grey": self.colour_into_grey, "colour_decided": self.colour_decided,
                "names_hidden": self.names_hidden, "labels_hidden": self.labels_hidden,
                "names_dicom_like": self.names_dicom_like,
                "no_label_set": [[m, b, n] for (m, b), n in self.no_label_set.items()]}

    def merge(self, chunk) -> None:
        """Add an import chunk's counters and report (``ImportChunk``) to this state."""
        self.imported += chunk.imported
        self.duplicates += chunk.duplicates
        self.failed += chunk.failed
        self.labels_added += chunk.labels_added
        report = chunk.report or {}
        self.errors += report.get("errors", [])
        self.warnings += report.get("warnings", [])
        self.classes_created += [c for c in report.get("classes_created", [])
                                 if c not in self.classes_created]
        for mode, why, n in report.get("colour", []):
            self.colour[(mode, why)] = self.colour.get((mode, why), 0) + n
        self.colour_into_grey += report.get("colour_into_grey", 0)
        self.colour_decided = self.colour_decided or report.get("colour_decided", "")
        self.names_hidden += report.get("names_hidden", 0)
        self.names_dicom_like += report.get("names_dicom_like", 0)
        self.labels_hidden += report.get("labels_hidden", 0)
        for modality, body_part, n in report.get("no_label_set", []):
            key = (modality, body_part)
            self.no_label_set[key] = self.no_label_set.get(key, 0) + n


def parse_split(split: str) -> tuple[str, float | None]:
    """``pool``, ``eval`` or ``auto:F`` (F in (0, 1), default 0.2: whole patients to eval)
    → (split, eval fraction or None)."""
    text = (split or "").strip().lower()
    if text in ("pool", "eval"):
        return text, None
    if text == "auto" or text.startswith("auto:"):
        raw = text.partition(":")[2] or "0.2"
        try:
            fraction = float(raw)
        except ValueError:
            fraction = -1.0
        if not 0 < fraction < 1:
            raise ImportRequestError(f"auto:{raw}: the eval share must be a number between 0 "
                                     "and 1, e.g. auto:0.2")
        return "pool", fraction
    raise ImportRequestError(f"unknown split {split!r}: use pool, eval or auto:0.2 (whole "
                             "patients to eval)")


def auto_split(job: ImportJob, *, patient_key: str, study_key: str, sha256: str) -> str:
    """The side of an automatic split (``job.eval_fraction``) for one scan: whole patients
    (studies where the patient is unknown; single files where neither is) go to eval or to
    the pool together. A patient or study already in the project keeps its side, so later
    imports never split one across eval and pool."""
    for field_name, key in (("patient_key", patient_key), ("study_key", study_key)):
        if key:
            sides = set(Scan.objects.filter(project=job.project, **{field_name: key})
                        .values_list("split", flat=True))
            if len(sides) == 1:
                return sides.pop()
            if sides:           # already on both sides (imported by hand): eval wins
                return Split.EVAL
            break
    from ml_backend.data.deid import group_bucket

    group = (f"patient:{patient_key}" if patient_key else f"study:{study_key}" if study_key
             else f"file:{sha256}")
    return (Split.EVAL if group_bucket(settings.DEID_SALT, group) < job.eval_fraction
            else Split.POOL)


# A browser upload's (or a PACS study's) import still queued after this long never reached a
# worker (the broker lost its task, or the site stopped before an in-process task ran); one
# still running after this long lost its worker or process (a PACS study pulled by the
# command runs in that process, without the workers' time limit: hours, never a day). Its
# raw files must not wait for ever (``import_jobs_fail_stale``).
IMPORT_STALE_HOURS = 24


def import_jobs_fail_stale(*, now=None) -> int:
    """Mark failed, with the reason, the imports of uploaded files (the upload page, a PACS
    pull) that can no longer run: queued, or running unchunked (a chunked job's chunks hold
    their own leases), for IMPORT_STALE_HOURS. Their raw files then go as any upload no
    import reads (``uploads.incoming_sweep``). Conditional updates: a worker that claims the
    job at the same moment wins, or finds it failed and does nothing. Returns how many."""
    now = now or timezone.now()
    Status = ImportJob.Status
    cutoff = now - timedelta(hours=IMPORT_STALE_HOURS)
    marked = ImportJob.objects.filter(
        source_is_upload=True, status=Status.QUEUED, created_at__lt=cutoff,
    ).update(status=Status.FAILED, finished_at=now,
             last_error=f"never started within {IMPORT_STALE_HOURS} h (its task did not reach "
                        "a worker); the upload was removed: upload the files again")
    marked += ImportJob.objects.filter(
        source_is_upload=True, status=Status.RUNNING, chunks__isnull=True,
        started_at__lt=cutoff,
    ).update(status=Status.FAILED, finished_at=now,
             last_error=f"still running after {IMPORT_STALE_HOURS} h: its worker or process "
                        "was lost; the upload was removed: upload the files again")
    if marked:
        logger.warning("%s upload import(s) that could no longer run marked failed", marked)
    return marked


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
    label_set: str = "",
) -> ImportJob:
    split, eval_fraction = parse_split(split)
    label_set = " ".join((label_set or "").split())
    if len(label_set) > 100:
        raise ImportRequestError("a label set name is at most 100 characters")
    if name_refusal("label set", label_set):
        raise ImportRequestError(name_refusal("label set", label_set))
    refusal = dataset_name_refusal(dataset_name)
    if refusal is not None:
        raise ImportRequestError(refusal)
    refusal = _path_refusal(source, labels_csv)
    if refusal is not None:
        raise ImportRequestError(refusal)
    return ImportJob.objects.create(
        project=project,
        source=source,
        dataset_name=dataset_name,
        split=split,
        eval_fraction=eval_fraction,
        layout=layout,
        labels_csv=labels_csv,
        default_label=default_label,
        created_by=created_by,
        source_is_upload=source_is_upload,
        label_set=label_set,
    )


def _path_refusal(source: str, labels_csv: str) -> str | None:
    """Why an import's source or labels CSV path cannot be stored (its bytes are not UTF-8
    text: a job row holds the path), or None."""
    for what, path in (("source", source), ("labels CSV", labels_csv)):
        if storable_text(path) != path:
            return (f"the {what} path {storable_text(path)!r} holds bytes that are not UTF-8 "
                    "text (a name written by another system's character set): rename that "
                    "folder or file, or import the folder above it (its files may have such "
                    "names)")
    return None


def import_source_refusal(*, source: str, labels_csv: str = "", layout: str = "auto"
                          ) -> str | None:
    """Why the source (and its labels CSV) cannot be read, or None: the listing the job will
    make, without reading a file's bytes. ``import_scans --create-project`` asks first, so a
    CSV it cannot read leaves no empty project behind."""
    refusal = _path_refusal(source, labels_csv)
    if refusal is not None:
        return refusal
    try:
        if is_findings_source(source):
            read_findings_source(source)
        else:
            read_source(source, labels_csv=labels_csv or None, layout=layout)
    except SourceError as exc:
        return str(exc)
    return None


def import_chunking_pays() -> bool:
    """Whether a large import is split into chunks for workers: only with a broker (and so
    worker processes, on this machine or others) to take them; in-process tasks would run
    the chunks one after another anyway."""
    return bool(settings.IMPORT_CHUNK_SIZE) and not settings.CELERY_TASK_ALWAYS_EAGER


def import_job_run(
    *, job_id: int, progress: Callable[[int, int], None] | None = None,
    chunked: bool | None = None,
) -> ImportJob | None:
    """Run a queued import job. A second delivery of the same job does nothing.

    Every file is imported in its own transaction; a failing file is recorded
    in ``job.errors`` and the batch goes on. An import of more than ``IMPORT_CHUNK_SIZE``
    files (``chunked``; by default when a broker is configured) is split into chunks that
    workers import in parallel (``import_chunk_run``); the job then returns still running
    and the last chunk to finish completes it (``import_job_wait`` follows it).
    """
    claimed = ImportJob.objects.filter(pk=job_id, status=ImportJob.Status.QUEUED).update(
        status=ImportJob.Status.RUNNING, started_at=timezone.now()
    )
    if claimed != 1:
        logger.info("import job %s already claimed or finished; nothing to do", job_id)
        return None
    job = ImportJob.objects.select_related("project", "created_by").get(pk=job_id)
    state = _JobState()
    dataset, dataset_existed = None, True
    handed_off = False          # the chunks finish the job
    try:
        findings = None
        if is_findings_source(job.source):     # several findings per scan (CSV, npz)
            findings = read_findings_source(job.source)
            listing = SourceListing(items=findings.items,
                                    default_dataset_name=findings.default_dataset_name,
                                    conflicting_label_rows=findings.conflicting_rows)
        else:
            listing = read_source(
                job.source, labels_csv=job.labels_csv or None, layout=job.layout
            )
        dataset_name = job.dataset_name or _default_dataset_name(listing, state)
        dataset_existed = Dataset.objects.filter(project=job.project, name=dataset_name).exists()
        dataset = dataset_get_or_create(project=job.project, name=dataset_name)
        if findings is not None:
            findings = _findings_import_setup(job, dataset, findings, state)
        elif job.label_set:
            _dataset_join_label_set(job.project, dataset, job.label_set)
        resolve = _SetResolver(job.project)
        if listing.unmatched_label_rows:
            shown = _names_shown(listing.unmatched_label_rows)
            state.warnings.append(
                f"{len(listing.unmatched_label_rows)} labels CSV rows matched no file"
                + (f" (e.g. {shown})" if shown else "")
            )
        conflicting = listing.conflicting_label_rows
        if conflicting:
            shown = _names_shown(conflicting)
            state.warnings.append(
                f"{len(conflicting)} file(s) listed more than once in the "
                f"{'findings' if findings is not None else 'labels'} CSV with different "
                f"{'findings' if findings is not None else 'labels'} or patients"
                + (f" (e.g. {shown})" if shown else "")
                + ": the disagreeing values were not used (those scans are imported "
                + ("with their findings unknown" if findings is not None else
                   "without a label") + "); correct the CSV and import it again to add them")
        # a classify page's copy: the identity of the upload it was de-identified from
        staged = staged_identities(job.source) if job.source_is_upload else {}
        job.total = len(listing.items)
        job.skipped = len(listing.skipped)
        job.save(update_fields=["total", "skipped"])
        if chunked is None:
            chunked = import_chunking_pays()
        if (chunked and findings is None and job.project.dicom_grouping != "series"
                and job.total > settings.IMPORT_CHUNK_SIZE):
            _import_chunks_plan(job, dataset, created=not dataset_existed, state=state)
            handed_off = True
            job.refresh_from_db()          # in-process tasks have already finished it
            return job
        items = list(enumerate(listing.items, start=1))
        done = 0
        if job.project.dicom_grouping == "series" and findings is None:
            groups, items = _series_groups(items)
            for group in groups:
                _import_series(job=job, dataset=dataset, group=group, state=state,
                               resolve=resolve)
                done += len(group)
                if progress is not None:
                    progress(done, job.total)
                _flush(job, state, processed=done)
        for index, item in items:
            _import_item(job=job, dataset=dataset, item=_with_default_label(job, item),
                         state=state, resolve=resolve, number=index,
                         findings=None if findings is None else (findings, index - 1),
                         overrides=staged.get(item.name))
            done += 1
            if progress is not None:
                progress(done, job.total)
            if done % 25 == 0 or done == job.total:
                _flush(job, state, processed=done)
        _colour_report(job, dataset, state)
        _split_report(job, state)
        _names_report(state)
        _label_sets_report(state)
        if state.series_stacked:
            state.warnings.append(
                f"DICOM per series (project setting): {state.series_slices} slices became "
                f"{state.series_stacked} scan(s), one per series, slices in position order; "
                "the middle slice is the preview and what the model sees.")
        job.status = ImportJob.Status.SUCCEEDED
    except SourceError as exc:
        job.status = ImportJob.Status.FAILED
        job.last_error = str(exc)
    except Exception as exc:  # the job's boundary: record, never lose the row
        logger.exception("import job %s crashed", job_id)
        job.status = ImportJob.Status.FAILED
        job.last_error = f"unexpected error: {type(exc).__name__}: {exc}"
    finally:
        if not handed_off:
            _import_job_close(job, dataset, state, dataset_created=not dataset_existed)
    if job.status == ImportJob.Status.SUCCEEDED and state.imported:
        _novelty_warning(job)
    return job


def _default_dataset_name(listing: SourceListing, state: _JobState) -> str:
    """The dataset an import names none for: the source's folder or file name, unless it
    looks like it carries identifiers (DICOM exports are often named after the patient)."""
    name = listing.default_dataset_name or "import"
    reason = identifier_reason(name, file_name=True)
    if reason is None:
        return name
    state.warnings.append(f"The source's name was not used as the dataset's name: it looks "
                          f"like it carries patient identifiers ({reason}); the dataset is "
                          "'import' (name one with --dataset).")
    return "import"


def _with_default_label(job: ImportJob, item: SourceItem) -> SourceItem:
    if job.default_label and item.label is None:
        return replace(item, label=job.default_label)
    return item


def _import_job_close(job: ImportJob, dataset: Dataset | None, state: _JobState, *,
                      dataset_created: bool) -> None:
    """The end of a job (its status set): forget a DICOM file's name, drop a dataset it
    made and left empty, write its report, remove the staged upload."""
    job.finished_at = timezone.now()
    _forget_source_name(job)
    if dataset is not None and dataset_created and not state.imported:
        _drop_empty_dataset(dataset, job, state)
    _flush(job, state, processed=job.processed, final=True)
    if job.source_is_upload:
        shutil.rmtree(job.source, ignore_errors=True)
    if state.imported >= ANALYZE_AFTER_IMPORTS:
        _refresh_planner_statistics()


# A large import changes the scan table's statistics at once; PostgreSQL's autovacuum
# catches up only later, and until then its planner may think a project has 2 scans
# (issue 21: a query round took 40x longer on fresh statistics than on stale ones).
ANALYZE_AFTER_IMPORTS = 1000


def _refresh_planner_statistics() -> None:
    from django.db import connection

    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE annotator_scan, annotator_annotation, annotator_scanlease")


# --- chunks: one import on many workers --------------------------------------------------


def _import_chunks_plan(job: ImportJob, dataset: Dataset, *, created: bool,
                        state: _JobState) -> None:
    """Split ``job``'s files into chunks of ``IMPORT_CHUNK_SIZE`` and queue one task per
    chunk (after this transaction commits)."""
    from annotator import tasks

    size = settings.IMPORT_CHUNK_SIZE
    with transaction.atomic():
        chunks = ImportChunk.objects.bulk_create(
            ImportChunk(job=job, index=number, start=start, stop=min(start + size, job.total))
            for number, start in enumerate(range(0, job.total, size)))
        job.dataset_name = dataset.name     # the chunks find the dataset by name
        job.dataset_created = created
        job.chunks_total = len(chunks)
        job.warnings = state.warnings       # what reading the source found
        job.save(update_fields=["dataset_name", "dataset_created", "chunks_total", "warnings"])
    ids = list(ImportChunk.objects.filter(job=job).values_list("pk", flat=True))
    logger.info("import job %s: %s files in %s chunks", job.pk, job.total, len(ids))
    for chunk_id in ids:
        tasks.run_import_chunk.apply_async(args=[chunk_id], queue=settings.IMPORT_QUEUE)


def import_chunk_run(*, chunk_id: int) -> ImportChunk | None:
    """Import one chunk of a job's files. A chunk is claimed once; a second delivery does
    nothing unless its lease ran out (its worker was lost), and a re-run counts the scans
    its first attempt already stored as imported. The chunk that finishes last writes the
    job's report and marks it done."""
    now = timezone.now()
    lease = now + timedelta(seconds=settings.CELERY_TASK_TIME_LIMIT)
    claimed = ImportChunk.objects.filter(pk=chunk_id).filter(
        Q(status=ImportChunk.Status.QUEUED)
        | Q(status=ImportChunk.Status.RUNNING, lease_expires_at__lt=now)
    ).update(status=ImportChunk.Status.RUNNING, lease_expires_at=lease,
             attempts=F("attempts") + 1, started_at=now)
    if claimed != 1:
        logger.info("import chunk %s already claimed or done; nothing to do", chunk_id)
        return None
    chunk = ImportChunk.objects.select_related("job__project", "job__created_by").get(pk=chunk_id)
    job = chunk.job
    state = _JobState()
    done = 0
    try:
        listing = _chunk_listing(job)
        if len(listing.items) != job.total:
            raise SourceError(f"the source changed while it was imported ({len(listing.items)} "
                              f"files now, {job.total} when the import began)")
        dataset = Dataset.objects.get(project=job.project, name=job.dataset_name)
        resolve = _SetResolver(job.project)
        for index in range(chunk.start, chunk.stop):
            _import_item(job=job, dataset=dataset,
                         item=_with_default_label(job, listing.items[index]), state=state,
                         resolve=resolve, number=index + 1, rerun=chunk.attempts > 1)
            done += 1
            if done % 25 == 0:
                _chunk_save(chunk, state, done)
        _embed_chunk(job, chunk, state.scan_ids)
    except Exception as exc:   # the chunk's boundary: its files not read say why; never lost
        if not isinstance(exc, (SourceError, Dataset.DoesNotExist)):
            logger.exception("import chunk %s crashed", chunk_id)
        left = (chunk.stop - chunk.start) - done
        state.failed += left
        state.errors.append({"name": f"files {chunk.start + done + 1} to {chunk.stop}",
                             "reason": (str(exc) if isinstance(exc, SourceError) else
                                        f"not imported ({type(exc).__name__}: {exc})")[:500]})
        done += left
    _chunk_finish(chunk, state, done)
    return chunk


_LISTINGS: OrderedDict = OrderedDict()     # job id -> its source listing, in this process


def _chunk_listing(job: ImportJob) -> SourceListing:
    """The job's source listing, read once per worker process and job: listing a folder of
    100,000 files takes seconds, and a job has hundreds of chunks (the count check in
    ``import_chunk_run`` still catches a source that changed)."""
    listing = _LISTINGS.get(job.pk)
    if listing is None:
        listing = read_source(job.source, labels_csv=job.labels_csv or None, layout=job.layout)
        _LISTINGS[job.pk] = listing
        while len(_LISTINGS) > 2:
            _LISTINGS.popitem(last=False)
    return listing


def _embed_chunk(job: ImportJob, chunk: ImportChunk, scan_ids: list[int]) -> None:
    """A project with an encoder: embed the chunk's new scans here, on this worker (the end
    of the import merges them into the index; what fails here is computed there)."""
    project = job.project
    project.refresh_from_db(fields=["active_encoder"])
    if not scan_ids or project.active_encoder is None:
        return
    from ml_backend import services as ml

    try:
        ml.embed_part(project.active_encoder, list(Scan.objects.filter(pk__in=scan_ids)
                                                  .order_by("pk")),
                      name=f"import{job.pk}-{chunk.index}")
    except Exception as exc:   # the import stands; the merge embeds these scans itself
        logger.warning("import %s chunk %s: embedding left to the merge (%s: %s)", job.pk,
                       chunk.index, type(exc).__name__, str(exc)[:200])


def _chunk_save(chunk: ImportChunk, state: _JobState, done: int, *,
                status: str | None = None) -> None:
    fields = {"processed": done, "imported": state.imported, "duplicates": state.duplicates,
              "failed": state.failed, "labels_added": state.labels_added}
    if status:
        fields.update(status=status, report=state.to_report(), finished_at=timezone.now())
    ImportChunk.objects.filter(pk=chunk.pk).update(**fields)
    totals = ImportChunk.objects.filter(job_id=chunk.job_id).aggregate(
        **{name: Sum(name) for name in ("processed", "imported", "duplicates", "failed",
                                        "labels_added")})
    ImportJob.objects.filter(pk=chunk.job_id).update(
        **{name: value or 0 for name, value in totals.items()})


# PostgreSQL's codes for a transaction it rolled back to break a deadlock or a serialisation
# conflict: the work is safe to try again.
_TRANSIENT_SQLSTATES = {"40P01", "40001"}


def _chunk_finish(chunk: ImportChunk, state: _JobState, done: int, *, attempts: int = 4) -> None:
    """Record a finished chunk; the last one of its job closes the job. A transaction the
    database rolled back to break a deadlock between two chunks finishing at once is tried
    again: a chunk left "running" would stall its job until its lease ran out."""
    for attempt in range(1, attempts + 1):
        try:
            return _chunk_finish_once(chunk, state, done)
        except OperationalError as exc:
            code = getattr(exc.__cause__, "sqlstate", None)
            if code not in _TRANSIENT_SQLSTATES or attempt == attempts:
                raise
            logger.warning("import chunk %s: finishing it was rolled back (%s), attempt %d of "
                           "%d", chunk.pk, code, attempt, attempts)
            time.sleep(0.05 * attempt)


def _chunk_finish_once(chunk: ImportChunk, state: _JobState, done: int) -> None:
    """Under a lock on the job's row alone (``of=("self",)``: the project's row is read,
    not locked, so nothing else that locks the project can deadlock with it), so exactly
    one chunk closes the job."""
    with transaction.atomic():
        job = ImportJob.objects.select_for_update(of=("self",)).select_related("project").get(
            pk=chunk.job_id)
        _chunk_save(chunk, state, done, status=ImportChunk.Status.DONE)
        if (job.status != ImportJob.Status.RUNNING
                or job.chunks.exclude(status=ImportChunk.Status.DONE).exists()):
            return
        job.refresh_from_db()
        total = _JobState(warnings=list(job.warnings))
        for part in job.chunks.order_by("index"):
            total.merge(part)
        dataset = Dataset.objects.filter(project=job.project, name=job.dataset_name).first()
        if dataset is not None:
            _colour_report(job, dataset, total)
        _split_report(job, total)
        _names_report(total)
        _label_sets_report(total)
        job.status = ImportJob.Status.SUCCEEDED
        _import_job_close(job, dataset, total, dataset_created=job.dataset_created)
    if total.imported:
        transaction.on_commit(lambda: _novelty_warning(job))


def import_job_wait(job: ImportJob, *, progress: Callable[[int, int], None] | None = None,
                    poll: float = 1.0, timeout: float | None = None) -> ImportJob:
    """Follow a job whose chunks run on workers until it is done (or ``timeout`` s)."""

    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        job.refresh_from_db()
        if progress is not None:
            progress(job.processed, job.total)
        if job.is_finished or (deadline is not None and time.monotonic() > deadline):
            return job
        time.sleep(poll)


def colour_mode_locked(project: Project) -> bool:
    """Whether the project's colour mode can no longer change: it has a model (encoder or
    classifier), whose networks take its number of channels."""
    from ml_backend.models import ModelVersion

    return ModelVersion.objects.filter(project=project).exclude(status="failed").exists()


def project_colour_mode_set(project: Project, mode: str) -> Project:
    """An admin's choice of greyscale or colour, before the project has any model."""
    if mode not in ("grey", "colour"):
        raise ImportRequestError("a project is grey or colour")
    if project.colour_mode != mode and colour_mode_locked(project):
        raise ImportRequestError(
            f"{project.name!r} already has a model built for "
            f"{'colour' if project.channels == 3 else 'greyscale'} input: start a new project "
            "to change it")
    Project.objects.filter(pk=project.pk).update(colour_mode=mode)
    project.colour_mode = mode
    return project


def _drop_empty_dataset(dataset: Dataset, job: ImportJob, state: _JobState) -> None:
    """A job that made a dataset and imported nothing into it leaves no empty dataset."""
    if dataset.scans.exists() or ImportJob.objects.filter(
            project=job.project, dataset_name=dataset.name).exclude(pk=job.pk).exclude(
            status__in=[ImportJob.Status.SUCCEEDED, ImportJob.Status.FAILED]).exists():
        return
    try:
        with transaction.atomic():
            dataset.delete()
    except IntegrityError:
        return
    state.warnings.append(f"Nothing was imported, so the dataset {dataset.name!r} this import "
                          "created was removed again.")


def _count_colour(job: ImportJob, state: _JobState, is_colour: bool, reason: str) -> None:
    """Tally one imported scan's colour; the project's first scan decides its mode."""
    key = ("colour" if is_colour else "grey", reason or "not stated")
    state.colour[key] = state.colour.get(key, 0) + 1
    project = job.project
    if not project.colour_mode:
        mode = "colour" if is_colour else "grey"
        if Project.objects.filter(pk=project.pk, colour_mode="").update(colour_mode=mode):
            state.colour_decided = (f"The project is {mode}: its first scan ({reason}) decided. "
                                    "An admin may change this until the project has a model.")
        project.refresh_from_db(fields=["colour_mode"])
    if is_colour and project.colour_mode == "grey":
        state.colour_into_grey += 1


def _split_report(job: ImportJob, state: _JobState) -> None:
    """An automatic split's line in the import report: how many scans and patients went to
    eval and to the pool, and how the groups were formed."""
    if job.eval_fraction is None:
        return
    scans = Scan.objects.filter(import_job=job)
    parts = []
    for side in (Split.EVAL, Split.POOL):
        mine = scans.filter(split=side)
        patients = mine.exclude(patient_key="").values("patient_key").distinct().count()
        studies = mine.filter(patient_key="").exclude(study_key="").values(
            "study_key").distinct().count()
        files = mine.filter(patient_key="", study_key="").count()
        groups = ", ".join(f"{n} {word}" for n, word in ((patients, "patient(s)"),
                                                           (studies, "study(ies)"),
                                                           (files, "single file(s)")) if n)
        parts.append(f"{mine.count()} scan(s) to {side}" + (f" ({groups})" if groups else ""))
    state.warnings.append(
        f"Automatic split (about {job.eval_fraction:.0%} to eval, whole patients): "
        + "; ".join(parts) + ". A patient already in the project kept its side.")


def _label_sets_report(state: _JobState) -> None:
    """The import report's line on scans no label set of the project applies to: no class
    is offered for them and no model suggests one, until a set's rules take them in."""
    if not state.no_label_set:
        return
    total = sum(state.no_label_set.values())
    kinds = "; ".join(
        f"{n} with modality {modality or '(none)'}, body part {body_part or '(none)'}"
        for (modality, body_part), n in sorted(state.no_label_set.items(),
                                               key=lambda kv: -kv[1])[:5])
    state.warnings.append(
        f"{total} scan(s) match no label set of this project ({kinds}): no class is offered "
        "for them and no model suggests one. Add their modality or body part (or their "
        "dataset) to a label set on the project page; for PNG, JPEG and TIFF files, give "
        "their body part when importing (the upload page's Body part, import_scans "
        "--body-part or --label-set).")


def _names_report(state: _JobState) -> None:
    """The import report's line on names not kept: raster file names (and labels) that look
    like they carry patient identifiers are stored as no name, as DICOM names always are."""
    if state.names_hidden:
        state.warnings.append(
            f"{state.names_hidden} image file name(s) not kept: they (or their folders) look "
            "like they carry patient identifiers (a number of 6 or more digits, a date, a "
            "person's name as Last^First, or a word such as MRN, DOB, PID, SSN, patient or "
            "name), so those scans are stored with no name, as DICOM files are. Their scan "
            "numbers identify them.")
    if state.names_dicom_like:
        state.warnings.append(
            f"{state.names_dicom_like} PNG, JPEG or TIFF file(s) named as DICOM files are "
            "(.dcm, .dicom or no extension) were imported by their content; their names were "
            "not kept, as a DICOM file's never is (it often carries the patient's name). "
            "Their scan numbers identify them.")
    if state.labels_hidden:
        state.warnings.append(
            f"{state.labels_hidden} label(s) not used: a class folder or CSV label looked like "
            "it carries patient identifiers (a long number, a date or a word such as MRN); "
            "those scans were imported without a label.")


def _colour_report(job: ImportJob, dataset: Dataset, state: _JobState) -> None:
    """The import report's colour lines, and the dataset's colour mode and why."""
    if not state.colour:
        return
    counts = {"colour": 0, "grey": 0}
    for (mode, _), n in state.colour.items():
        counts[mode] += n
    reasons = "; ".join(f"{n} {why}" for (mode, why), n in sorted(
        state.colour.items(), key=lambda kv: -kv[1])[:4])
    words = f"Colour: {counts['colour']} colour scan(s), {counts['grey']} greyscale ({reasons})."
    if state.colour_decided:
        words += " " + state.colour_decided
    state.warnings.append(words)
    if state.colour_into_grey:
        state.warnings.append(
            f"{state.colour_into_grey} colour scan(s) entered a greyscale project: they are shown "
            "in colour, but its models see them as grey (luma). If colour matters here, an "
            "admin can switch the project to colour before it has a model.")
    mode = "mixed" if counts["colour"] and counts["grey"] else (
        "colour" if counts["colour"] else "grey")
    previous = dataset.colour_mode
    if previous and previous != mode:
        mode = "mixed"
    Dataset.objects.filter(pk=dataset.pk).update(colour_mode=mode, colour_note=reasons[:300])
    if job.project.colour_mode == "colour" and counts["grey"]:
        state.warnings.append(f"{counts['grey']} greyscale scan(s) in a colour project: their "
                              "grey is repeated on the three channels the models see.")


def _forget_source_name(job: ImportJob) -> None:
    """A source that names one DICOM file (or a path that does not exist, without a raster
    extension) keeps only its folder once the job has read it: a DICOM's file name may be the
    patient's. Folders, CSV listings and MedMNIST archives keep their path, less any folder
    or file name in it that looks like it carries identifiers (``deid.identifier_reason``:
    a PACS export's folders are often named after the patient)."""
    if job.source_is_upload:
        return                  # our own staging folder (numbered names), removed next
    raw, hash_mark, fragment = (job.source or "").partition("#")
    path = Path(raw)
    parts = list(path.parts)
    forgotten = []
    if parts and not (not path.name or path.is_dir() or path.suffix.lower() in (".csv", ".npz")
                      or name_may_be_shown(path.name)):
        forgotten.append(parts[-1])
        parts[-1] = "(file name not kept)"
    for index, part in enumerate(parts):
        if part != path.anchor and not part.startswith("(") and identifier_reason(
                part, file_name=True):
            forgotten.append(part)
            parts[index] = "(name not kept)"
    if not forgotten:
        return
    kept = str(Path(*parts)) + (hash_mark + fragment if hash_mark else "")
    job.source = kept
    if job.last_error:
        job.last_error = job.last_error.replace(raw, kept.partition("#")[0])
        for part in forgotten:
            job.last_error = job.last_error.replace(part, "(name not kept)")


def _novelty_warning(job: ImportJob) -> None:
    """Flag an import whose scans are unlike the project's (another anatomy, site or
    modality than its label set expects) in the import report."""
    from ml_backend import services as ml

    try:
        summary = ml.import_novelty_check(job)
    except Exception as exc:  # the import itself succeeded: say why the check did not run
        logger.warning("novelty check of import %s failed: %s", job.pk, exc)
        summary = {"error": f"the novelty check did not run ({type(exc).__name__})"}
    if not summary:
        return
    if "error" in summary:
        job.warnings = [*job.warnings, summary["error"]]
    elif summary["unlike"]:
        share = summary["unlike"] / max(summary["checked"], 1)
        expected = max(0.0, 1.0 - summary["percentile"] / 100.0)
        words = (f"{summary['unlike']} of {summary['checked']} new scans ({share:.0%}) are "
                 f"unlike the project's scans of their label set (beyond its "
                 f"{summary['percentile']:.0f}th percentile of distance to the nearest scans)")
        if share > max(3 * expected, 0.05):
            words = ("Unusual import: " + words + ". Check that these scans belong to this "
                     "project and label set; the model's suggestions for them are not "
                     "reliable.")
        job.warnings = [*job.warnings, words + f" Scans: {summary['scan_ids']}."]
    job.novelty = summary
    job.save(update_fields=["warnings"])


def _names_shown(names: list[str], most: int = 5) -> str:
    """Up to ``most`` file names a report may quote (``name_may_be_shown``), each on one
    line with no control characters (a CSV's quoted name may hold a newline)."""
    shown = [without_untypable(" ".join(storable_text(n).split()))
             for n in names if name_may_be_shown(n)][:most]
    return ", ".join(n[:120] for n in shown if n)


def _storable(value):
    """A report value (text, or lists / dicts of it) as every database can store it and every
    page show it: no surrogate escapes (a file name whose bytes are not UTF-8), no NUL."""
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, list):
        return [_storable(v) for v in value]
    if isinstance(value, dict):
        return {k: _storable(v) for k, v in value.items()}
    return value


def _flush(job: ImportJob, state: _JobState, *, processed: int, final: bool = False) -> None:
    job.processed = max(processed, job.processed)
    job.imported = state.imported
    job.duplicates = state.duplicates
    job.failed = state.failed
    job.labels_added = state.labels_added
    job.errors = state.errors = _storable(state.errors)
    job.warnings = state.warnings = _storable(state.warnings)
    job.classes_created = state.classes_created = _storable(state.classes_created)
    job.last_error = _storable(job.last_error or "")
    fields = ["processed", "imported", "duplicates", "failed", "labels_added", "errors",
              "warnings", "classes_created"]
    if final:
        fields += ["status", "last_error", "finished_at", "source"]
    job.save(update_fields=fields)


def _dataset_join_label_set(project: Project, dataset: Dataset, name: str) -> None:
    """An import naming a label set: its dataset's scans use that set (made if new)."""
    label_set = LabelSet.objects.filter(project=project, name__iexact=name).first()
    if label_set is None:
        label_set = label_set_create(project=project, name=name, datasets=[dataset])
    elif not label_set.datasets.filter(pk=dataset.pk).exists():
        label_set.datasets.add(dataset)
    else:
        return
    label_sets_assign(project)


def _file_ref(number: int, item: SourceItem, data: bytes | None, sha: str | None) -> str:
    """How a warning or an error names a file: its sequence number in the import and its
    content hash; the name only for a raster image (by its extension and its content)."""
    ref = f"file {number}"
    if sha:
        ref += f" (sha256 {sha[:12]})"
    if data and name_may_be_shown(item.name, data) and sniff_format(
            data[:4096], item.name) in ("png", "jpeg", "tiff"):
        ref += f" {_UPLOAD_PREFIX.sub('', item.name)[-120:]}"
    return ref


def _findings_import_setup(job: ImportJob, dataset: Dataset, listing, state: _JobState):
    """A findings import: its dataset joins a findings label set (``job.label_set`` or
    'findings', made if new), whose findings are the source's columns. Returns
    ``(label set, {column: LabelClass}, targets)``."""
    name = job.label_set or "findings"
    label_set = LabelSet.objects.filter(project=job.project, name__iexact=name).first()
    try:
        label_set = label_set_create(project=job.project, name=name, datasets=[dataset],
                                     kind=LabelSet.Kind.MULTI,
                                     **({} if label_set is None else {
                                         "modalities": label_set.modalities,
                                         "body_parts": label_set.body_parts}))
    except ValueError as exc:
        raise SourceError(f"{exc} (import into another label set with --label-set)") from None
    classes = {}
    for column, finding in enumerate(listing.findings):
        try:
            label_class, created = label_class_get_or_create(
                project=job.project, name=without_untypable(finding),
                created_by=job.created_by, label_set=label_set)
        except ValueError as exc:
            raise SourceError(f"finding {finding!r}: {exc}") from None
        if created:
            state.classes_created.append(label_class.name)
        classes[column] = label_class
    state.warnings.append(
        f"findings source ({listing.layout}): {len(listing.findings)} findings into the "
        f"label set {label_set.name!r}" + "".join(f"; {note}" for note in listing.notes))
    if listing.hidden:          # as a class label that looks like an identifier (_names_report)
        state.warnings.append(
            f"{listing.hidden} label(s) not used: a finding name ('Finding Labels' entry or "
            "finding column) looked like it carries patient identifiers (a long number, a "
            "date, Last^First or a word such as MRN); no finding was made for it and its "
            "answers were not stored.")
    return label_set, classes, listing.targets


def _add_import_findings(*, job: ImportJob, scan: Scan, findings, row: int) -> bool:
    """Give ``scan`` the source's findings once (a re-run adds nothing). True if added."""
    from annotator.findings import findings_answer_create

    label_set, classes, targets = findings
    if scan.label_set_id != label_set.pk:
        return False
    if Annotation.objects.filter(scan=scan, source=Annotation.Source.IMPORT,
                                 outcome=Annotation.Outcome.FINDINGS).exists():
        return False
    states = {}
    for column, value in enumerate(targets[row]):
        if value == value:                       # NaN: unanswered
            states[classes[column].pk] = {1.0: "present", 0.0: "absent", -1.0: "uncertain"}[
                float(value)]
    if not states:
        return False
    findings_answer_create(scan=scan, reader=job.created_by, states=states,
                           source=Annotation.Source.IMPORT, import_job=job)
    return True


def _series_groups(items: list[tuple[int, SourceItem]]):
    """A project that imports DICOM per series: the numbered items grouped by their series
    (read from each file's header; the UID stays in memory), in groups of two or more
    single-frame slices. Returns (groups, the other items)."""
    import pydicom

    from ml_backend.data.decode import sniff_format

    by_series: dict[str, list[tuple[int, SourceItem]]] = {}
    others = []
    for number, item in items:
        uid = None
        try:
            data = item.load()
            if (sniff_format(data, item.name) or "").startswith("dicom"):
                ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
                if int(ds.get("NumberOfFrames", 1) or 1) == 1 and "Rows" in ds:
                    uid = str(ds.get("SeriesInstanceUID", "") or "").strip() or None
        except Exception:  # noqa: BLE001 - the file's own import reports why it fails
            uid = None
        data = None
        if uid is None:
            others.append((number, item))
        else:
            by_series.setdefault(uid, []).append((number, item))
    groups = []
    for group in by_series.values():
        if len(group) > 1:
            groups.append(group)
        else:
            others.extend(group)
    return groups, sorted(others, key=lambda pair: pair[0])


def _import_series(*, job: ImportJob, dataset: Dataset, group: list[tuple[int, SourceItem]],
                   state: _JobState, resolve: _SetResolver) -> None:
    """One series' slices as one scan: each slice decoded (so de-identified) on its own,
    then the de-identified slices stacked in position order (``ml_backend.data.series``).
    Slices that cannot be stacked are imported one by one, with the reason in the report;
    a slice that cannot be read is reported and the rest is stacked."""

    from annotator.linkage import linkage_enabled
    from ml_backend.data.series import SeriesError, slice_order, stack_series

    slices, digests = [], []
    for number, item in group:
        try:
            data = item.load()
            digest = hashlib.sha256(data).hexdigest()
            decoded = decode_scan(data, name=item.name, salt=settings.DEID_SALT,
                                  max_pixels=settings.IMPORT_MAX_PIXELS,
                                  linkage=linkage_enabled())
        except (OSError, ScanDecodeError) as exc:
            state.failed += 1
            state.errors.append({"name": f"file {number}",
                                 "reason": str(exc) if isinstance(exc, ScanDecodeError)
                                 else "cannot read file"})
            continue
        finally:
            data = None
        slices.append(replace(decoded, pixels=None))     # the stored copy is what stacks
        digests.append(digest)
    if not slices:
        return
    first = slices[0]
    rows, cols = first.height, first.width
    try:
        if rows * cols * len(slices) > settings.IMPORT_MAX_SERIES_PIXELS:
            raise SeriesError(f"{len(slices)} slices of {cols}x{rows} are above the limit of "
                              f"{settings.IMPORT_MAX_SERIES_PIXELS:,} pixels for a series "
                              "(IMPORT_MAX_SERIES_PIXELS)")
        stack = stack_series(slices, digests)
    except SeriesError as exc:
        state.warnings.append(f"a series of {len(group)} files was imported slice by slice: "
                              f"{exc}")
        for number, item in group:
            _import_item(job=job, dataset=dataset, item=item, state=state, resolve=resolve,
                         number=number)
        return
    middle = len(stack.positions) // 2
    representative = slices[slice_order(slices)[middle]]
    overrides = {
        # the stack is made of the slices' de-identified copies: it is stored as it is, and
        # read (not decoded frame by frame again) for its row and preview
        "stacked": True,
        # the report sent back to the PACS references the representative slice
        "linkage": representative.linkage,
        "patient_key": first.patient_key,
        "meta": {"study_key": first.meta.get("study_key", ""),
                 "series_key": first.meta.get("series_key", ""),
                 "series_number": first.meta.get("series_number"),
                 "instance_number": None,
                 "slice_position": stack.positions[middle],
                 "slice_spacing": stack.spacing or first.meta.get("slice_spacing"),
                 "slices": stack.positions},
    }
    label = next((item.label for _, item in group if item.label), None) or (
        job.default_label or None)
    item = SourceItem(f"series of {len(slices)} slices", label, lambda: stack.data,
                      stack.digest)
    _import_item(job=job, dataset=dataset, item=item, state=state, resolve=resolve,
                 number=group[0][0], overrides=overrides)
    state.series_stacked += 1
    state.series_slices += len(slices)


def _import_item(*, job: ImportJob, dataset: Dataset, item: SourceItem, state: _JobState,
                 resolve: _SetResolver, number: int = 0, findings=None,
                 overrides: dict | None = None, rerun: bool = False) -> None:
    created_files: list[str] = []
    data: bytes | None = None
    sha: str | None = None
    ref: str | None = None     # named while the raw bytes are at hand (they go after decoding)
    try:
        try:
            data = item.load()
        except OSError as exc:   # the reason only: a message may quote the file's name
            reason = exc.strerror or (exc.args[0] if exc.args and isinstance(exc.args[0], str)
                                      else "unreadable")
            raise ScanDecodeError(f"cannot read file: {reason}") from None
        if len(data) > settings.UPLOAD_MAX_FILE_BYTES and not (overrides or {}).get("stacked"):
            # (a stack is bounded by IMPORT_MAX_SERIES_PIXELS, each of its files by this)
            raise ScanDecodeError(
                f"file is {len(data):,} bytes, above the limit of {settings.UPLOAD_MAX_FILE_BYTES:,}"
            )
        sha = (item.digest_hint or (overrides or {}).get("sha256")
               or hashlib.sha256(data).hexdigest())
        ref = _file_ref(number, item, data, sha)
        hidden = _hidden_name_reason(job, item.name, data)
        if item.label and identifier_reason(item.label) is not None:
            state.labels_hidden += 1      # a class folder named after its patient
            item = replace(item, label=None)
        existing = Scan.objects.filter(project=job.project, sha256=sha).first()
        if existing is not None and rerun and existing.import_job_id == job.pk:
            state.imported += 1      # stored by this chunk's first attempt (its worker was lost)
            stored = existing.annotations.filter(source=Annotation.Source.IMPORT).select_related(
                "label_class").first() if item.label else None
            if stored is not None:
                state.labels_added += 1
                made = stored.label_class
                if (made is not None and job.started_at and made.created_at >= job.started_at
                        and made.name not in state.classes_created):
                    state.classes_created.append(made.name)   # the lost report named it
            return
        if existing is not None:
            state.duplicates += 1
            if item.label:
                with transaction.atomic():
                    outcome = _add_import_label(job=job, scan=existing, label=item.label)
                _count_label(state, outcome)
            if findings is not None:
                added = _add_import_findings(job=job, scan=existing, findings=findings[0],
                                             row=findings[1])
                state.labels_added += int(added)
            return

        from annotator.linkage import linkage_enabled, linkage_store, linkage_store_sealed

        stacked = bool(overrides and overrides.get("stacked"))
        decoded = decode_scan(
            data, name=item.name, salt=settings.DEID_SALT,
            max_pixels=(settings.IMPORT_MAX_SERIES_PIXELS if stacked
                        else settings.IMPORT_MAX_PIXELS),
            linkage=linkage_enabled() and not overrides, keep_copy=not stacked,
        )
        if stacked:      # already the de-identified copy (``_import_series``)
            decoded.stored_bytes = data
        data = None  # the raw bytes may hold PHI; only de-identified bytes go further
        if overrides:   # a stacked series, a classify page's copy: the originals' identity
            decoded.patient_key = overrides["patient_key"]
            decoded.meta.update(overrides["meta"])
            decoded.linkage = overrides.get("linkage")
            decoded.file_format = overrides.get("file_format") or decoded.file_format
        if not decoded.patient_key and item.patient:
            # a file without DICOM identity whose source table names its patient
            decoded.patient_key = source_patient_pseudonym(item.patient, salt=settings.DEID_SALT)
        is_colour = decoded.meta.get("colour") == "colour"
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
                source_name=("" if decoded.file_format == "dicom" or hidden
                             else shown_item_name(job, item.name)[:255]),
                width=decoded.width,
                height=decoded.height,
                colour=is_colour,
                display=({"window": meta["window"], "value_range": meta["value_range"]}
                         if "window" in meta and not is_colour else None),
                num_frames=decoded.num_frames,
                bits_stored=meta.get("bits_stored") or 8,
                modality=(meta.get("modality") or dataset.modality or "")[:16],
                manufacturer=meta.get("manufacturer", ""),
                manufacturer_model=meta.get("manufacturer_model", ""),
                body_part=meta.get("body_part") or dataset.body_part or "",
                photometric=meta.get("photometric", ""),
                pixel_spacing=meta.get("pixel_spacing"),
                transfer_syntax=meta.get("transfer_syntax", ""),
                patient_key=decoded.patient_key,
                study_key=meta.get("study_key", ""),
                series_key=meta.get("series_key", ""),
                series_number=meta.get("series_number"),
                instance_number=meta.get("instance_number"),
                slice_position=meta.get("slice_position"),
                slice_spacing=meta.get("slice_spacing"),
                slices=meta.get("slices"),
                burned_in_annotation=bool(meta.get("burned_in_annotation")),
                quarantined=bool(meta.get("burned_in_annotation")),
                split=(job.split if job.eval_fraction is None else auto_split(
                    job, patient_key=decoded.patient_key,
                    study_key=meta.get("study_key", ""), sha256=sha)),
                label_set=resolve(dataset_id=dataset.pk,
                                  modality=meta.get("modality") or dataset.modality or "",
                                  body_part=meta.get("body_part") or dataset.body_part or ""),
                import_job=job,
            )
            if decoded.linkage:       # encrypted at once, in the scan's own transaction
                linkage_store(scan, decoded.linkage)
            elif overrides and overrides.get("linkage_sealed"):
                linkage_store_sealed(scan, overrides["linkage_sealed"])
            decoded.linkage = None
            outcome = (
                _add_import_label(job=job, scan=scan, label=item.label) if item.label else None
            )
            if findings is not None and _add_import_findings(
                    job=job, scan=scan, findings=findings[0], row=findings[1]):
                outcome = (None, True)
        _count_label(state, outcome)
        created_files.clear()  # committed: the files now belong to the row
        if scan.label_set_id is None and resolve.sets:
            key = (scan.modality, scan.body_part)
            state.no_label_set[key] = state.no_label_set.get(key, 0) + 1
        state.imported += 1
        if hidden == "DICOM" and decoded.file_format != "dicom":
            state.names_dicom_like += 1      # a PNG named .dcm (or with no extension)
        elif hidden and decoded.file_format != "dicom":
            state.names_hidden += 1
        state.scan_ids.append(scan.pk)
        _count_colour(job, state, is_colour, meta.get("colour_reason", ""))
        for note in decoded.warnings:
            state.warnings.append(f"{ref}: {note}")
        if scan.quarantined:
            state.warnings.append(f"{ref}: quarantined as scan {scan.pk} (burned-in "
                                  "annotation): an admin must check and release it")
    except IntegrityError as exc:
        if sha and Scan.objects.filter(project=job.project, sha256=sha).exists():
            # Another import stored the same content between our check and insert.
            state.duplicates += 1
        else:          # not a duplicate: the row broke another rule of the table
            logger.warning("import of one file could not be stored: %s", type(exc).__name__)
            state.failed += 1
            state.errors.append({"name": ref or _file_ref(number, item, data, sha),
                                 "reason": _not_stored_reason(exc)})
    except DataError as exc:   # a value the database cannot hold (PostgreSQL: NaN in JSON)
        logger.warning("import of one file could not be stored: %s", type(exc).__name__)
        state.failed += 1
        state.errors.append({"name": ref or _file_ref(number, item, data, sha),
                             "reason": _not_stored_reason(exc)})
    except (ScanDecodeError, ValueError) as exc:
        state.failed += 1
        state.errors.append({"name": ref or _file_ref(number, item, data, sha),
                             "reason": str(exc)})
    except OSError as exc:   # writing the stored copy: a full or read-only disk, said so
        logger.warning("import of one file could not be written: %s", exc.strerror or
                       type(exc).__name__)
        state.failed += 1
        state.errors.append({"name": ref or _file_ref(number, item, data, sha),
                             "reason": "could not be written to the site's storage: "
                                       f"{exc.strerror or type(exc).__name__} (ask the site's "
                                       "administrator; import it again once that is fixed)"})
    except Exception as exc:  # one bad file never aborts the batch
        logger.warning("import of one file failed: %s", type(exc).__name__)
        state.failed += 1
        state.errors.append({"name": ref or _file_ref(number, item, data, sha),
                             "reason": f"unexpected error ({type(exc).__name__})"})
    finally:
        for name in created_files:
            remove_if_unreferenced(name)


def _not_stored_reason(exc: DatabaseError) -> str:
    """Why a decoded file was not stored, in words. The database's own message is not
    quoted: it can repeat the row's values."""
    kind = type(exc).__name__
    return (f"could not be stored: the database refused the scan's record ({kind}: a value "
            "it cannot hold, such as a non-finite number); it is not a duplicate, and nothing "
            "of it was kept")


def _add_import_label(*, job: ImportJob, scan: Scan, label: str) -> tuple[str | None, bool]:
    """Give ``scan`` an import label once. Returns (new class name or None, label added)."""
    label_class, created = label_class_get_or_create(
        project=job.project, name=without_untypable(label), created_by=job.created_by,
        label_set=scan.label_set if scan.label_set_id else None,
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
    shown_preselected: bool | None = None,
) -> Annotation:
    """Record one reader's answer and what they were shown; queue a refit when due."""
    if outcome not in Annotation.Outcome.values:
        raise AnnotationError(f"unknown outcome {outcome!r}")
    if scan.quarantined:
        raise AnnotationError(f"scan {scan.pk} is quarantined (it may show burned-in patient "
                              "details): an admin must check and release it before it is read")
    if len(external_id or "") > 64:
        raise AnnotationError("an external id is at most 64 characters")
    if duration_ms is not None and not 0 <= duration_ms <= 6 * 3600 * 1000:
        duration_ms = None             # a reading time beyond 6 h is not a reading time
    if shown_confidence is not None and not (
            isinstance(shown_confidence, (int, float)) and 0 <= shown_confidence <= 1):
        shown_confidence = None
    if outcome == Annotation.Outcome.LABEL and label_class is None:
        raise AnnotationError("a label needs a class (or record a skip / unsure)")
    if label_class is not None and label_class.project_id != scan.project_id:
        raise AnnotationError(f"class {label_class.name!r} belongs to another project")
    if label_class is not None and label_class.label_set.is_multi:
        raise AnnotationError(f"{label_class.name!r} is a finding of the findings set "
                              f"{label_class.label_set.name!r}: record it as a findings answer "
                              "(present / absent / uncertain), not as the scan's one class")
    if label_class is not None and label_class.label_set_id != scan.label_set_id:
        if scan.label_set_id is None:
            raise AnnotationError("no label set applies to this scan: an admin must assign its "
                                  "dataset, modality or body part to a label set")
        raise AnnotationError(f"class {label_class.name!r} does not apply to this scan: it "
                              f"belongs to the label set {label_class.label_set.name!r}, the "
                              f"scan to {scan.label_set.name!r}")
    annotation = Annotation.objects.create(
        scan=scan, reader=reader, label_class=label_class, outcome=outcome, source=source,
        duration_ms=duration_ms, shown_model_version=shown_model_version,
        shown_suggestion=shown_suggestion, shown_confidence=shown_confidence,
        shown_acquisition_score=shown_acquisition_score, query_round=query_round,
        external_id=external_id, note=note, shown_preselected=shown_preselected)
    label_saved(annotation)
    return annotation


_refit_asks = threading.local()


@contextmanager
def refit_asks_deferred():
    """Within: each new label asks for no refit of its own; once the block is left, one ask
    per project that got labels, after commit (a Label Studio bulk event: one refit asked
    for, not one ask per answer)."""
    outer = getattr(_refit_asks, "projects", None)
    if outer is not None:              # nested: the outermost block asks
        yield
        return
    _refit_asks.projects = {}
    try:
        yield
    finally:
        projects, _refit_asks.projects = _refit_asks.projects, None
    for project in projects.values():
        transaction.on_commit(lambda project=project: runs.refit_start_if_due(project=project))


def label_saved(annotation: Annotation) -> None:
    """What a new label sets going, wherever it was made (the label page, the admin, an
    import, Label Studio): once committed, a refit if one is due (the ML adapter's one
    trigger, ``refit_start_if_due``); inside ``refit_asks_deferred``, one ask at its end."""
    if annotation.outcome in Annotation.LABELLING and annotation.scan.split == "pool":
        project = annotation.scan.project
        deferred = getattr(_refit_asks, "projects", None)
        if deferred is not None:
            deferred[project.pk] = project
            return
        transaction.on_commit(lambda: runs.refit_start_if_due(project=project))
