"""Export a project to one archive and restore it on another (or a fresh) database.

The archive (``.tar.gz``) holds ``manifest.json`` — the project's settings (active learning,
double reading and blinding, colour mode, DICOM grouping), members (by username and e-mail),
datasets, label sets, classes, scans (metadata with their quarantine and its release, by
content hash), annotations with who gave them, what they were shown and their findings, model
versions' metadata and evaluations — plus the de-identified scan files and previews and every
model version's artifact folder. Ids are not kept: scans are matched by content hash,
classes by name, users by username, model versions by version name; the ids a model's files
and config hold (classes, label sets, findings: ``head-<set>.npz``, ``findings-<set>.npz``,
``config["findings_sets"]``) are rewritten to the new ones. Files keyed by the old site's scan
ids are left out (embeddings, the pool predictions, Grad-CAM maps, embedding parts), so the
restore re-embeds with the active encoder (``embed=False`` skips it; ``manage.py embed
--full`` later does the same) and the next refit or promotion stores predictions anew.

A user of the backup whose username is taken here by an account with another e-mail address
refuses the restore, unless the caller says they are the same people (``same_users``).

Values a site saved before this version checked them, and still holds (migration 0022 brought
its settings into range, 0023 refuses new names with invisible characters but kept the old
ones), are restored the way the upgrade treated them, each kind with a warning: settings out
of range brought to the nearest allowed value, a class colour that is not #RRGGBB replaced, a
name with invisible characters (or, for a dataset, one that looks like it carries patient
identifiers, or none) renamed, a shown confidence that is no probability left out, a hotkey
the class form refuses dropped. The export warns of each such value. A version-1 backup
records no colour: each scan's colour is read from its preview, and the project's from its
encoder (or its first scan), with a warning.

A model version whose files are incomplete (``model_version_files_problem``: a head, a
checkpoint, its encoder's checkpoint missing) is restored retired, with a warning naming what
is missing, and never left as the project's active model or encoder.

A restore trusts nothing in the archive: the whole manifest is checked first (known fields
with the right types and choices, references that resolve, unique rows, safe file and
version names, files present in the archive), and any problem refuses the restore with a
``BackupError`` naming it, before a row or a file is written. Rows are written in one
transaction; files copied before it are removed again when it fails (only those this
restore created). One restore runs at a time: a second one started meanwhile is refused.
"""

from __future__ import annotations

import filecmp
import io
import json
import math
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone as dt_timezone
from pathlib import Path, PurePosixPath

import numpy as np
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import DatabaseError, models, transaction
from django.utils import timezone

from annotator.models import (
    Annotation,
    AuditEvent,
    Dataset,
    FindingAnswer,
    LabelClass,
    LabelSet,
    Membership,
    Project,
    Scan,
    hotkey_error,
)
from annotator.names import dataset_name_refusal, name_refusal, without_untypable
from annotator.storage import (
    OutPathError,
    media_path,
    out_path_check,
    preview_file_name,
    scan_file_name,
)
from medsite.locks import LockBusy, file_lock
from ml_backend.models import Evaluation, ModelVersion

FORMAT = "medlabel-project-backup"
VERSION = 2
READABLE_VERSIONS = (1, 2)      # version 1 lacks the settings below: they restore as defaults
# a version's files keyed by the scan ids of the site that wrote them: in a restored project
# those ids are other scans' (or none), so they are never carried (nor restored from an older
# backup): the re-embedding and the next refit or promotion write them anew
SKIP_ARTIFACTS = {"embeddings.npy", "thumbs.npy", "scan_ids.npy", "index.faiss",
                  "index.faiss.ids.npy", "pool_predictions.npz"}
# ... and folders of such files: Grad-CAM maps per scan (``cam/<scan id>-<class id>.png``),
# an import chunk's embeddings (``parts``), the chunks of work spread over the workers
SKIP_ARTIFACT_DIRS = {"cam", "parts", "spread"}
EARLIEST = datetime(1970, 1, 1, tzinfo=dt_timezone.utc)   # no row of ours is older
MAX_MEMBERS = 2_000_000         # two files a scan: a 100,000-scan project has 200,000
MAX_MANIFEST_BYTES = 1 << 30
MAX_PROBLEMS = 10               # a refusal lists at most this many problems
VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
ARTIFACT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")   # a file a config names
SHA256 = re.compile(r"[0-9a-f]{64}")
FILE_SUFFIX = re.compile(r"(\.[A-Za-z0-9]{1,10}){0,2}")
RELEASED = AuditEvent.Action.SCAN_RELEASED
IN_USE = ("active", "ready")    # model statuses that need their files to be usable
RESTORE_LOCK = ".restore.lock"  # in ARTIFACTS_ROOT: one restore at a time (kept, empty)
SECTIONS = {"format", "version", "exported_at", "project", "users", "datasets", "label_sets",
            "classes", "scans", "annotations", "models"}

# The fields a backup copies as they are, per row ...
PROJECT_FIELDS = ("description", "query_strategy", "query_batch_size", "refit_every",
                  "gate_tolerance", "novelty_percentile", "clinicians_can_add_classes",
                  "dicom_grouping", "readers_per_scan", "blind_second_readers",
                  "label_studio_push_rounds", "label_studio_prelabel", "disagreement_rule",
                  "colour_mode", "label_studio_project_id")
DATASET_FIELDS = ("name", "site", "scanner", "modality", "body_part", "hflip_allowed",
                  "colour_mode", "colour_note", "description")
LABEL_SET_FIELDS = ("name", "description", "kind", "uncertain_policy", "threshold_rule",
                    "target_sensitivity", "modalities", "body_parts", "order")
CLASS_FIELDS = ("name", "description", "hotkey", "color", "order")
SCAN_FIELDS = ("sha256", "file_format", "source_name", "width", "height", "colour", "display",
               "num_frames", "bits_stored", "modality", "manufacturer", "manufacturer_model",
               "body_part", "photometric", "pixel_spacing", "transfer_syntax", "patient_key",
               "study_key", "series_key", "series_number", "instance_number", "slice_position",
               "slice_spacing", "slices", "burned_in_annotation", "quarantined", "split",
               "last_error")
ANNOTATION_FIELDS = ("outcome", "source", "duration_ms", "shown_confidence",
                     "shown_acquisition_score", "shown_preselected", "shown_scores",
                     "external_id", "note")
MODEL_FIELDS = ("kind", "status", "status_reason", "config", "num_labels", "metrics")
EVALUATION_FIELDS = ("num_labels", "num_eval", "accuracy", "macro_f1", "macro_auc",
                     "cohen_kappa", "ece", "report")
# Settings this site bounds since migration 0022, which brought its own values out of range to
# the nearest allowed one; a site may hold such values still in a backup written before, and
# the restore does as the upgrade did (the bounds are the fields' own validators)
CLAMPED = {Project: ("gate_tolerance", "novelty_percentile", "query_batch_size", "refit_every"),
           LabelSet: ("target_sensitivity",)}
# ... and every other field: how it is carried, or why not (tests/annotator/test_backup.py
# fails when a model gains a field that is in neither list).
OTHERWISE = {
    Project: {"id": "new", "name": "the manifest's, or --name", "members": "users + roles",
              "active_model": "by version", "active_encoder": "by version",
              "created_by": "by username", "created_at": "kept"},
    Dataset: {"id": "new", "project": "the restored one", "created_at": "new"},
    LabelSet: {"id": "new (old ids remapped in model configs)", "project": "the restored one",
               "datasets": "by name", "created_at": "new"},
    LabelClass: {"id": "new (old ids remapped in configs, heads and shown scores)",
                 "project": "the restored one", "label_set": "by name",
                 "created_by": "by username", "created_at": "new"},
    Scan: {"id": "new", "project": "the restored one", "dataset": "by name",
           "file": "content-addressed name, file in the archive",
           "preview": "content-addressed name, file in the archive",
           "label_set": "by name", "import_job": "import jobs are not backed up",
           "created_at": "kept"},
    Annotation: {"id": "new", "scan": "by sha256", "project": "the restored one",
                 "label_class": "by name", "reader": "by username",
                 "shown_model_version": "by version", "shown_suggestion": "by name",
                 "query_round": "query rounds are not backed up (the worklist picks anew)",
                 "import_job": "import jobs are not backed up", "created_at": "kept"},
    Membership: {"id": "new", "project": "the restored one", "user": "by username",
                 "role": "users", "created_at": "new"},
    FindingAnswer: {"id": "new", "annotation": "with its answer", "finding": "by name",
                    "state": "with its answer"},
    ModelVersion: {"id": "new", "project": "the restored one", "version": "checked name",
                   "parent": "by version", "artifact_dir": "ARTIFACTS_ROOT/models/<version>",
                   "created_at": "kept", "promoted_at": "kept"},
    Evaluation: {"id": "new", "model_version": "with its model", "created_at": "kept"},
}


class BackupError(Exception):
    """The archive cannot be written or restored; the message says why."""


# --- export ------------------------------------------------------------------------------


def _scan_row(scan: Scan, released: dict | None = None) -> dict:
    row = {f: getattr(scan, f) for f in SCAN_FIELDS}
    row.update(dataset=scan.dataset.name, file=scan.file.name, preview=scan.preview.name,
               created_at=scan.created_at.isoformat(),
               label_set=scan.label_set.name if scan.label_set_id else None,
               released=released)
    return row


def _releases(project: Project, scans: list[Scan]) -> dict[int, dict]:
    """{scan id: the admin's release from quarantine (by whom, when)}, for the burned-in
    scans that are no longer quarantined: the restore keeps them released only with this."""
    ids = {str(s.pk): s.pk for s in scans if s.burned_in_annotation and not s.quarantined}
    releases = {}
    for event in (AuditEvent.objects.filter(action=RELEASED, object_type="scan",
                                            object_id__in=list(ids))
                  .order_by("created_at", "pk")):
        releases[ids[event.object_id]] = {"by": event.actor_name,
                                          "at": event.created_at.isoformat()}
    return releases


def _model_rows(project: Project) -> list[dict]:
    rows = []
    for m in ModelVersion.objects.filter(project=project).order_by("created_at", "pk"):
        rows.append({
            "version": m.version, **{k: getattr(m, k) for k in MODEL_FIELDS},
            "parent": m.parent.version if m.parent_id else None,
            "created_at": m.created_at.isoformat(),
            "promoted_at": m.promoted_at.isoformat() if m.promoted_at else None,
            "evaluations": [{k: getattr(e, k) for k in EVALUATION_FIELDS}
                            | {"created_at": e.created_at.isoformat()}
                            for e in m.evaluations.order_by("created_at")]})
    return rows


def export_project(project: Project, out: str | Path) -> dict:
    """Write ``out`` (.tar.gz); returns counts (and ``warnings``). Written to a temp file,
    then moved. ``out`` may be new or an existing regular file (replaced whole), in an
    existing folder: anything else (a folder, a link, a device, a fifo) is refused first,
    with the reason, as BackupError (``storage.out_path_check``)."""
    try:
        out = out_path_check(out)
    except OutPathError as exc:
        raise BackupError(str(exc)) from None
    warnings: list[str] = []
    scans = list(project.scans.select_related("dataset", "label_set").order_by("pk"))
    by_id = {s.pk: s.sha256 for s in scans}
    releases = _releases(project, scans)
    classes = list(project.label_classes.select_related("label_set", "created_by")
                   .order_by("order", "pk"))
    annotations = []
    for a in (Annotation.objects.filter(scan__project=project)
              .select_related("label_class", "reader", "shown_model_version", "shown_suggestion")
              .prefetch_related("findings__finding")
              .order_by("created_at", "pk")):
        annotations.append({
            "scan": by_id[a.scan_id], "label": a.label_class.name if a.label_class_id else None,
            "reader": a.reader.get_username() if a.reader_id else None,
            "created_at": a.created_at.isoformat(),
            "shown_model_version": a.shown_model_version.version
            if a.shown_model_version_id else None,
            "shown_suggestion": a.shown_suggestion.name if a.shown_suggestion_id else None,
            **{k: getattr(a, k) for k in ANNOTATION_FIELDS},
            "findings": [{"finding": f.finding.name, "state": f.state}
                         for f in a.findings.all()]})
    User = get_user_model()
    users = {m.user.get_username(): {"email": m.user.email, "role": m.role}
             for m in project.memberships.select_related("user")}
    others = {a["reader"] for a in annotations if a["reader"]}
    others |= {c.created_by.get_username() for c in classes if c.created_by_id}
    if project.created_by_id:
        others.add(project.created_by.get_username())
    for user in User.objects.filter(**{f"{User.USERNAME_FIELD}__in": others - set(users)}):
        users[user.get_username()] = {"email": user.email, "role": None}
    models_ = _model_rows(project)
    manifest = {
        "format": FORMAT, "version": VERSION, "exported_at": timezone.now().isoformat(),
        "project": {"name": project.name, **{k: getattr(project, k) for k in PROJECT_FIELDS},
                    "created_by": project.created_by.get_username()
                    if project.created_by_id else None,
                    "created_at": project.created_at.isoformat(),
                    "active_model": project.active_model.version
                    if project.active_model_id else None,
                    "active_encoder": project.active_encoder.version
                    if project.active_encoder_id else None},
        "users": users,
        "datasets": [{k: getattr(d, k) for k in DATASET_FIELDS}
                     for d in project.datasets.order_by("pk")],
        "label_sets": [{"id": ls.pk, **{k: getattr(ls, k) for k in LABEL_SET_FIELDS},
                        "datasets": [d.name for d in ls.datasets.order_by("pk")]}
                       for ls in project.label_sets.order_by("order", "pk")],
        "classes": [{"id": c.pk, "label_set": c.label_set.name,
                     **{k: getattr(c, k) for k in CLASS_FIELDS},
                     "created_by": c.created_by.get_username() if c.created_by_id else None}
                    for c in classes],
        "scans": [_scan_row(s, releases.get(s.pk)) for s in scans],
        "annotations": annotations,
        "models": models_,
    }
    members = []                        # (file, its name in the archive)
    for s in scans:
        for name in (s.file.name, s.preview.name):
            path = media_path(name)
            if not path.is_file():
                raise BackupError(f"scan {s.pk}: file {name} is missing from MEDIA_ROOT")
            members.append((path, f"media/{name}"))
    from ml_backend.services.artifacts import model_version_files_problem

    for m in project.model_versions.select_related("parent").order_by("pk"):
        folder = Path(m.artifact_dir) if m.artifact_dir else None
        in_use = m.status in IN_USE or m.pk in (project.active_model_id,
                                                 project.active_encoder_id)
        if folder is None or not folder.is_dir():
            if in_use:
                warnings.append(f"model {m.version} has no files in {folder or '(none)'}:"
                                " a restore brings it back retired, not in use")
            continue
        problem = model_version_files_problem(m) if in_use else None
        if problem:
            warnings.append(f"model {m.version} is incomplete ({problem}): a restore brings "
                            "it back retired, not in use")
        for path in sorted(folder.rglob("*")):
            relative = PurePosixPath(path.relative_to(folder).as_posix())
            if path.is_file() and not path.is_symlink() and _carried(relative):
                members.append((path, f"artifacts/{m.version}/{relative}"))
    data = json.dumps(manifest, indent=1, default=str).encode()
    # what this site's own restore would change or refuse, said now, while the project that
    # holds those values is here to be corrected
    warnings += _restore_would_clean(data, {arcname for _, arcname in members})
    try:
        fd, tmp = tempfile.mkstemp(dir=out.absolute().parent, prefix=".tmp-", suffix=".tar.gz")
    except OSError as exc:
        raise BackupError(f"cannot write {out}: {exc.strerror or exc}") from None
    os.close(fd)
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            info = tarfile.TarInfo("manifest.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            for path, arcname in members:
                _add_plain(tar, path, arcname)
        out_path_check(out)             # again: nothing put a link or a folder there since
        os.replace(tmp, out)
    except OutPathError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise BackupError(str(exc)) from None
    except OSError as exc:              # a full disk: said, and no half archive left
        Path(tmp).unlink(missing_ok=True)
        where = f" ({exc.filename})" if exc.filename else ""
        raise BackupError(f"the archive {out} was not written: {exc.strerror or exc}{where}"
                          ) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"scans": len(scans), "annotations": len(annotations), "classes": len(classes),
            "models": len(models_), "bytes": out.stat().st_size, "warnings": warnings}


def _carried(relative: PurePosixPath) -> bool:
    """Whether a file of a version's folder (its path in the folder) goes into a backup and
    comes back from one: not the files keyed by the scan ids of the site that wrote them."""
    return relative.name not in SKIP_ARTIFACTS and (
        len(relative.parts) < 2 or relative.parts[0] not in SKIP_ARTIFACT_DIRS)


def _add_plain(tar: tarfile.TarFile, path: Path, arcname: str) -> None:
    """Add ``path`` as a plain file, even when it is a second name of a file added before (a
    refit links a findings network it keeps from the previous version): tarfile would store
    it as a hard link, which a restore refuses as it refuses every link."""
    info = tar.gettarinfo(path, arcname=arcname)
    if not info.isreg():
        info.type, info.linkname = tarfile.REGTYPE, ""
        info.size = path.stat().st_size
    with open(path, "rb") as handle:
        tar.addfile(info, handle)


def _restore_would_clean(data: bytes, names: set[str]) -> list[str]:
    """What a restore of the manifest ``data`` (with the archive members ``names``) would
    change, in the words the restore says it, or that it would refuse it."""
    try:
        plan = _check(json.loads(data), dict.fromkeys(names | {"manifest.json"}), None)
    except BackupError as exc:
        return [f"a restore of this backup would be refused as the project stands: {exc}"]
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        # a check that fails on a value of this database: said, and the backup is written
        return [f"the backup could not be checked as a restore would check it "
                f"({type(exc).__name__}: {str(exc)[:200]}): restore it on a test site first"]
    return [f"a restore of this backup will change this: {line}" for line in plan.cleaned]


# --- reading an archive -------------------------------------------------------------------


def _read_archive(tar: tarfile.TarFile, archive: Path) -> tuple[dict[str, tarfile.TarInfo],
                                                                 dict]:
    """Every member checked (a plain file or folder, a relative name without '..', named
    once), and the parsed manifest. Returns ({name: member} of the files, manifest)."""
    files: dict[str, tarfile.TarInfo] = {}
    count = 0
    for member in tar:
        count += 1
        if count > MAX_MEMBERS:
            raise BackupError(f"{archive} holds more than {MAX_MEMBERS:,} files: not a backup "
                              "this system wrote")
        name = member.name
        path = PurePosixPath(name)
        if (not name or path.is_absolute() or name.startswith(("/", "\\")) or ".." in path.parts
                or "\\" in name or "\x00" in name):
            raise BackupError(f"refusing archive member {name!r}: absolute, or climbs out "
                              "with '..'")
        if member.issym() or member.islnk():
            raise BackupError(f"refusing archive member {name!r}: a link (a backup holds "
                              "plain files only)")
        if member.isdir():
            continue
        if not member.isfile():
            raise BackupError(f"refusing archive member {name!r}: not a plain file")
        key = path.as_posix()
        if key in files:
            raise BackupError(f"refusing archive member {name!r}: it appears twice")
        files[key] = member
    # read on to the end of the compressed stream, so that its checksum (a CRC-32 of all of
    # it) is checked: damage stops the listing early or changes a file without an error of
    # its own, and a damaged archive must not restore damaged scans
    while tar.fileobj.read(1 << 20):
        pass
    info = files.get("manifest.json")
    if info is None:
        raise BackupError(f"{archive} has no manifest.json: not a {FORMAT} archive")
    if info.size > MAX_MANIFEST_BYTES:
        raise BackupError(f"{archive}: manifest.json is {_size(info.size)}, more than a "
                          "backup's manifest can be")
    try:
        manifest = json.loads(tar.extractfile(info).read())
    except (ValueError, RecursionError) as exc:
        raise BackupError(f"{archive} has no valid manifest.json: {exc}") from None
    # Infinity, NaN (which Python's json reads) or 1e999: no such number may be stored, as
    # no JSON answer of the API could hold it
    bad = _non_finite_numbers(manifest)
    if bad:
        more = " (and perhaps more)" if len(bad) >= MAX_PROBLEMS else ""
        raise BackupError(f"the backup cannot be restored, nothing was changed. Problems{more}"
                          ":\n" + "\n".join(f"  - {where} is {value}, not a finite number"
                                      for where, value in bad))
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError(f"{archive} is not a {FORMAT} archive")
    if manifest.get("version") not in READABLE_VERSIONS:
        raise BackupError(f"{archive} is a {FORMAT} of version {manifest.get('version')!r}; "
                          f"this system reads versions {', '.join(map(str, READABLE_VERSIONS))}")
    return files, manifest


SECTION_ROWS = {"scans": "scan", "annotations": "answer", "models": "model",
                "classes": "class", "label_sets": "label set", "datasets": "dataset",
                "users": "user"}


def _non_finite_numbers(manifest) -> list[tuple[str, str]]:
    """(where, 'Infinity' / '-Infinity' / 'NaN') of up to MAX_PROBLEMS numbers in the
    manifest that are not finite; ``where`` as the checks name it: ``model 1:
    evaluations[0].accuracy``."""
    found = []
    stack = [(manifest, ())]
    while stack and len(found) < MAX_PROBLEMS:
        item, path = stack.pop()
        if isinstance(item, dict):
            stack.extend((v, (*path, str(k)[:40])) for k, v in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend((v, (*path, i)) for i, v in reversed(list(enumerate(item))))
        elif isinstance(item, float) and not math.isfinite(item):
            found.append((_where(path), "NaN" if math.isnan(item) else
                          "Infinity" if item > 0 else "-Infinity"))
    return found


def _where(path: tuple) -> str:
    """``("models", 0, "evaluations", 0, "accuracy")`` -> ``model 1: evaluations[0].accuracy``."""
    head, rest = "the manifest", list(path)
    if len(rest) >= 2 and rest[0] in SECTION_ROWS:
        row = rest[1] + 1 if isinstance(rest[1], int) else repr(rest[1])
        head, rest = f"{SECTION_ROWS[rest[0]]} {row}", rest[2:]
    elif rest and rest[0] == "project":
        head, rest = "the project", rest[1:]
    tail = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in rest).lstrip(".")
    return f"{head}: {tail}" if tail else head


# --- checking a manifest ------------------------------------------------------------------


class _Problems(Exception):
    pass


@dataclass
class _Plan:
    """A manifest after checking: typed values only, every reference resolved."""

    name: str
    project: dict
    users: dict = field(default_factory=dict)          # username -> {"email", "role"}
    datasets: list = field(default_factory=list)
    label_sets: list = field(default_factory=list)     # {"values", "id", "datasets"}
    classes: list = field(default_factory=list)        # {"values", "id", "label_set", ...}
    scans: list = field(default_factory=list)
    annotations: list = field(default_factory=list)
    models: list = field(default_factory=list)
    media: set = field(default_factory=set)            # archive names of the scan files
    warnings: list = field(default_factory=list)
    cleaned: list = field(default_factory=list)        # (of the warnings) values changed
    version: int = VERSION                             # the archive's format version
    # the backup's names -> the names restored (when this site's rules renamed one)
    class_names: dict = field(default_factory=dict)
    set_names: dict = field(default_factory=dict)

    def clean(self, text: str) -> None:
        """A value of the backup restored otherwise, and why (a warning, which the export
        says too)."""
        self.cleaned.append(text)
        self.warnings.append(text)


class _Checker:
    def __init__(self):
        self.problems: list[str] = []
        # values restored otherwise than the backup holds them: {kind: [(where, old, new)]}
        self.changed: dict[tuple, list] = {}

    def add(self, text: str) -> None:
        self.problems.append(text)
        if len(self.problems) >= MAX_PROBLEMS:
            raise _Problems

    def section(self, manifest: dict, key: str, kind: type, *, default=None):
        if key not in manifest:
            if default is not None:
                return default
            self.add(f"the manifest has no {key!r} section")
            raise _Problems
        value = manifest[key]
        if not isinstance(value, kind):
            self.add(f"the manifest's {key!r} section is not a "
                     f"{'list' if kind is list else 'mapping'}")
            raise _Problems
        return value

    def row(self, where: str, row, model: type[models.Model], fields: tuple[str, ...],
            extra: tuple[str, ...] = (), required: tuple[str, ...] = ()) -> dict | None:
        """The row's values of ``fields``, typed and checked against the model's field
        (choices, lengths, ranges); None (with the problems noted) when any is wrong. A field
        missing from the row takes the model's default; ``required`` ones must be there."""
        if not isinstance(row, dict):
            self.add(f"{where} is not a mapping")
            return None
        unknown = sorted(set(row) - set(fields) - set(extra))
        if unknown:
            self.add(f"{where} has unknown fields: {', '.join(map(repr, unknown[:5]))}")
            return None
        values, ok = {}, True
        for name in fields:
            if name not in row:
                if name in required:
                    self.add(f"{where} has no {name}")
                    ok = False
                continue
            f = model._meta.get_field(name)
            problem, value = _field_value(f, self.legacy(where, model, f, row[name]))
            if problem:
                self.add(f"{where}: {name} {problem}")
                ok = False
            else:
                values[name] = value
        return values if ok else None

    def legacy(self, where: str, model: type[models.Model], f: models.Field, value):
        """``value``, or what this site's upgrade made of such a value in its own rows (a
        setting brought into its bounds, a class colour that is not #RRGGBB replaced), noted
        in ``changed``. Values of the wrong type, or not finite, are left to be refused."""
        number = (isinstance(value, int) and not isinstance(value, bool)
                  if isinstance(f, models.IntegerField) else _finite(value))
        if f.name in CLAMPED.get(model, ()) and number:
            low, high = _bounds(f)
            new = min(max(value, low), high)
            if new != value:
                self.changed.setdefault(("bounds", model.__name__, f.name, low, high),
                                        []).append((where, value, new))
                return new
        elif model is LabelClass and f.name == "color" and isinstance(value, str) and (
                not re.fullmatch(r"#[0-9A-Fa-f]{6}", value)):
            self.changed.setdefault(("colour", f.default), []).append((where, value,
                                                                      f.default))
            return f.default
        return value

    def when(self, where: str, value, *, optional: bool = False) -> datetime | None:
        if value is None and optional:
            return None
        if not isinstance(value, str):
            self.add(f"{where} is not a date and time")
            return None
        try:
            moment = datetime.fromisoformat(value)
            moment = (moment if timezone.is_aware(moment)
                      else moment.replace(tzinfo=dt_timezone.utc)).astimezone(dt_timezone.utc)
        except (ValueError, OverflowError):      # 0001-01-01T00:00+14:00 is before year 1
            self.add(f"{where} is not a date and time: {value[:40]!r}")
            return None
        # rows this site made: not before the Unix epoch, not after tomorrow (a clock that was
        # wrong, or a hand edit, would otherwise be restored as a fact of the record)
        if not EARLIEST <= moment <= timezone.now() + timedelta(days=1):
            self.add(f"{where} is {value[:40]!r}: a date before 1970 or in the future")
            return None
        return moment


def _field_value(f: models.Field, value) -> tuple[str | None, object]:
    """(problem, typed value) for a manifest value of model field ``f``."""
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    if value is None:
        return (None, None) if f.null else ("must have a value", None)
    if isinstance(f, models.BooleanField):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(f, models.IntegerField):
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "a whole number"
    elif isinstance(f, models.FloatField):     # not Infinity / NaN: JSON (the API) has none
        ok, kind = _finite(value), "a finite number"
    elif isinstance(f, (models.CharField, models.TextField)):
        ok, kind = isinstance(value, str), "text"
    elif isinstance(f, models.JSONField):
        where = _non_finite_in(value)
        if where is not None:
            return (f"holds a number that is not finite at {where}" if where else
                    "is not a finite number") + " (Infinity and NaN cannot be stored)", None
        ok, kind = True, ""
    else:                                   # a field kind this module does not copy
        return "cannot be restored", None
    if not ok:
        return f"must be {kind}, not {shown}", None
    try:
        return None, f.clean(value, None)
    except ValidationError as exc:
        return f"is not allowed ({shown}): {' '.join(exc.messages)}", None


def _bounds(f: models.Field) -> tuple:
    """The (lowest, highest) value a number field's validators allow."""
    low = max((v.limit_value for v in f.validators if isinstance(v, MinValueValidator)),
              default=None)
    high = min((v.limit_value for v in f.validators if isinstance(v, MaxValueValidator)),
               default=None)
    return low, high


def _typed_name_problem(what: str, name: str) -> str | None:
    """Why this site's forms refuse ``name`` as a name of ``what`` now, or None."""
    if not name.strip():
        return f"the {what} has no name"
    return dataset_name_refusal(name) if what == "dataset" else name_refusal(what, name)


def _restored_name(what: str, name, number: int, taken: set) -> tuple[str, str] | None:
    """(the name to restore, why) for a name a site saved before its forms checked names
    (migration 0023 refuses new ones and keeps the old): a name with control or invisible
    characters loses them (a tab or a line break becomes a space); one left empty, or a
    dataset's that looks like it carries patient identifiers, becomes ``<what> <number>``;
    made unique among ``taken``. None when the name stays as it is (or is not text: the
    checks refuse it)."""
    if not isinstance(name, str):
        return None
    problem = _typed_name_problem(what, name)
    if problem is None:
        return None
    text = without_untypable("".join(" " if ch.isspace() else ch for ch in name))
    text = " ".join(text.split())[:90]
    if not text or _typed_name_problem(what, text):
        text = f"{what} {number}"
    new, n = text, 1
    while new in taken:
        n += 1
        new = f"{text} ({n})"
    return new, problem


def _finite(value) -> bool:
    """``value`` is a finite number (not a bool, not Infinity or NaN, not too big a whole
    number for a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _non_finite_in(value) -> str | None:
    """Where (``['per_class'][0]``; '' for the value itself) a JSON value holds a number
    that is not finite; None when none does."""
    stack = [(value, "")]
    while stack:
        item, where = stack.pop()
        if isinstance(item, dict):
            stack.extend((v, f"{where}[{str(k)[:40]!r}]") for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(item))
        elif isinstance(item, float) and not math.isfinite(item):
            return where
    return None


def _is(value, names) -> bool:
    """``value`` is one of ``names`` (a manifest value may be any JSON: a list, a mapping)."""
    return isinstance(value, str) and value in names


def _safe_media_name(name, prefix: str) -> bool:
    if not isinstance(name, str) or not name.startswith(prefix) or len(name) > 255:
        return False
    path = PurePosixPath(name)
    if path.is_absolute() or any(p in ("", ".", "..") for p in name.split("/")) \
            or "\\" in name or "\x00" in name:
        return False
    try:
        media_path(name)
    except ValueError:
        return False
    return True


def _check(manifest: dict, files: dict, name: str | None) -> _Plan:
    """The manifest as a plan, or BackupError listing (up to MAX_PROBLEMS of) its problems."""
    c = _Checker()
    try:
        return _check_all(c, manifest, files, name)
    except _Problems:
        pass
    more = " (and perhaps more)" if len(c.problems) >= MAX_PROBLEMS else ""
    raise BackupError("the backup cannot be restored, nothing was changed. Problems"
                      f"{more}:\n" + "\n".join(f"  - {p}" for p in c.problems))


def _check_all(c: _Checker, manifest: dict, files: dict, name: str | None) -> _Plan:
    unknown = sorted(set(manifest) - SECTIONS)
    if unknown:
        c.add(f"the manifest has unknown sections: {', '.join(map(repr, unknown[:5]))}")
    spec = c.section(manifest, "project", dict)
    renamed = None
    if name is not None:                # typed by whoever restores: refused as the forms do
        refusal = name_refusal("project", name) if isinstance(name, str) else None
        if refusal:
            c.add(f"--name: {refusal}")
            raise _Problems
    else:
        name = spec.get("name")
        renamed = _restored_name("project", name, 1, set())
        if renamed is not None and isinstance(name, str) and name.strip():
            name = renamed[0]
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        c.add("the project needs a name of 1 to 200 characters (give one with --name)")
        raise _Problems
    project = c.row("the project", spec, Project, PROJECT_FIELDS,
                    extra=("name", "active_model", "active_encoder", "created_by",
                           "created_at"))
    if project is None:
        raise _Problems
    plan = _Plan(name=name, project=project, version=manifest["version"])
    if renamed is not None:
        plan.clean(f"the project's name {spec['name'][:60]!r} could not be kept ({renamed[1]}): "
                   f"it is restored as {name!r} (or give one with --name)")
    plan.project["created_at"] = c.when("the project's created_at", spec.get("created_at"),
                                        optional=True)

    # users: username -> e-mail and role in the project (None: reader only)
    User = get_user_model()
    username_field = User._meta.get_field(User.USERNAME_FIELD)
    roles = set(Membership.Role.values)
    listed = c.section(manifest, "users", dict)
    for username, info in listed.items():
        where = f"user {username[:40]!r}"
        problem, _ = _field_value(username_field, username)
        if problem:
            c.add(f"{where}: the username {problem}")
            continue
        if not isinstance(info, dict) or set(info) - {"email", "role"}:
            c.add(f"{where} is not a mapping of email and role")
            continue
        email, role = info.get("email") or "", info.get("role")
        if not isinstance(email, str) or len(email) > 254:
            c.add(f"{where}: the e-mail address is not text of at most 254 characters")
        if role is not None and not _is(role, roles):
            c.add(f"{where}: the role {str(role)[:40]!r} is not one of "
                  f"{', '.join(sorted(roles))}")
            continue
        plan.users[username] = {"email": email, "role": role}

    def user(where: str, username):
        if username is None:
            return None
        if not _is(username, listed):      # (a user listed but refused is named once)
            c.add(f"{where}: the user {str(username)[:40]!r} is not among the backup's users")
        return username

    plan.project["created_by"] = user("the project's created_by", spec.get("created_by"))

    # datasets, label sets and classes are referred to by name: the backup's name -> the
    # name restored (``_restored_name``); names of rows refused are not said again where
    # another row refers to them
    renames: dict[str, list] = {}
    datasets, refused_datasets = {}, set()
    taken = _kept_names("dataset", manifest.get("datasets"))
    for i, row in enumerate(c.section(manifest, "datasets", list), 1):
        old_name, row = _renamed(renames, "dataset", i, row, taken)
        values = c.row(f"dataset {i}", row, Dataset, DATASET_FIELDS, required=("name",))
        if values is None:
            if isinstance(old_name, str):
                refused_datasets.add(old_name)
            continue
        if old_name in datasets:
            c.add(f"dataset {i}: the name {old_name!r} appears twice")
            continue
        datasets[old_name] = values["name"]
        plan.datasets.append(values)

    set_names, set_ids, refused_sets = {}, set(), set()
    label_sets = c.section(manifest, "label_sets", list, default=[]) or [
        {"id": None, "name": "default", "datasets": []}]
    taken = _kept_names("label set", label_sets)
    for i, row in enumerate(label_sets, 1):
        old_name, row = _renamed(renames, "label set", i, row, taken)
        values = c.row(f"label set {i}", row, LabelSet, LABEL_SET_FIELDS,
                       extra=("id", "datasets"), required=("name",))
        if values is None:
            if isinstance(old_name, str):
                refused_sets.add(old_name)
            continue
        old, names = row.get("id"), row.get("datasets") or []
        if old_name in set_names:
            c.add(f"label set {i}: the name {old_name!r} appears twice")
        if old is not None and (not isinstance(old, int) or isinstance(old, bool)
                                or old in set_ids):
            c.add(f"label set {i}: its id {str(old)[:20]!r} is not a unique whole number")
            continue
        set_ids.add(old)
        if not isinstance(names, list) or any(
                not _is(n, datasets) and not _is(n, refused_datasets) for n in names):
            c.add(f"label set {i}: its datasets {str(names)[:60]} are not the backup's datasets")
            continue
        set_names[old_name] = values["name"]
        plan.label_sets.append({"values": values, "id": old, "datasets": sorted(
            {datasets[n] for n in names if n in datasets})})
    plan.set_names = set_names

    # the set a class or scan without one is restored into (as ``_restore_rows`` does)
    multi = {ls["values"]["name"] for ls in plan.label_sets
             if ls["values"].get("kind") == LabelSet.Kind.MULTI}
    first_set = plan.label_sets[0]["values"]["name"] if plan.label_sets else None
    class_names, class_ids, keys, refused_classes = {}, set(), {}, set()
    classes = c.section(manifest, "classes", list)
    taken = _kept_names("class", classes)
    for i, row in enumerate(classes, 1):
        old_name, row = _renamed(renames, "class", i, row, taken)
        values = c.row(f"class {i}", row, LabelClass, CLASS_FIELDS,
                       extra=("id", "label_set", "created_by"), required=("name",))
        if values is None:
            if isinstance(old_name, str):
                refused_classes.add(old_name)
            continue
        old, set_name = row.get("id"), row.get("label_set")
        if old_name in plan.class_names:
            c.add(f"class {i}: the name {old_name!r} appears twice")
        if not isinstance(old, int) or isinstance(old, bool) or old in class_ids:
            c.add(f"class {i}: its id {str(old)[:20]!r} is not a unique whole number")
            continue
        class_ids.add(old)
        plan.class_names[old_name] = values["name"]
        if _is(set_name, set_names):
            set_name = set_names[set_name]
        elif set_name is not None:
            if not _is(set_name, refused_sets):
                c.add(f"class {i}: its label set {str(set_name)[:40]!r} is not in the backup")
            set_name = None
        # the class form's rules: a key the label page keeps for itself, or one another
        # class of the set has, would answer the wrong class (LabelClass.clean lowercases)
        values["hotkey"] = key = (values.get("hotkey") or "").lower()
        in_set = set_name if set_name is not None else first_set
        problem = hotkey_error(key, findings=in_set in multi)
        if problem is None and key and (in_set, key) in keys:
            problem = (f"{key!r} already labels {keys[in_set, key]!r} in {in_set!r}: choose "
                       "another letter or digit.")
        if problem:
            # a backup made before a rule (the viewer's keys came later) still restores: the
            # class comes back without that key, and the restore says so
            plan.clean(f"class {i} ({values['name'][:40]!r}): its hotkey {problem} "
                       "It is restored without a hotkey: give it one on its page.")
            values["hotkey"] = key = ""
        if key:
            keys.setdefault((in_set, key), values["name"])
        class_names[values["name"]] = in_set
        plan.classes.append({"values": values, "id": old, "label_set": set_name,
                             "created_by": user(f"class {i}", row.get("created_by"))})

    shas = set()
    for i, row in enumerate(c.section(manifest, "scans", list), 1):
        where = f"scan {i}"
        values = c.row(where, row, Scan, SCAN_FIELDS,
                       extra=("dataset", "file", "preview", "created_at", "label_set",
                              "released"),
                       required=("sha256", "file_format", "width", "height"))
        if values is None:
            continue
        sha = values["sha256"]
        where = f"scan {i} (sha256 {sha[:12]})"
        if not SHA256.fullmatch(sha):
            c.add(f"scan {i}: its sha256 is not 64 hexadecimal digits")
            continue
        if sha in shas:
            c.add(f"{where} appears twice")
            continue
        shas.add(sha)
        dataset = row.get("dataset")
        if not _is(dataset, datasets) and not _is(dataset, refused_datasets):
            c.add(f"{where}: its dataset {str(dataset)[:40]!r} is not in the backup")
        set_name = row.get("label_set") or None
        if _is(set_name, set_names):
            set_name = set_names[set_name]
        elif set_name is not None and not _is(set_name, refused_sets):
            c.add(f"{where}: its label set {str(set_name)[:40]!r} is not in the backup")
        stem = scan_file_name(sha, "")
        file_, preview = row.get("file"), row.get("preview")
        if not (_safe_media_name(file_, stem) and FILE_SUFFIX.fullmatch(file_[len(stem):])):
            c.add(f"{where}: its file name {str(file_)[:80]!r} is not {stem}<suffix>")
            continue
        if preview != preview_file_name(sha) or not _safe_media_name(preview, "previews/"):
            c.add(f"{where}: its preview name {str(preview)[:80]!r} is not "
                  f"{preview_file_name(sha)}")
            continue
        for name_ in (file_, preview):
            if f"media/{name_}" not in files:
                c.add(f"{where}: the archive lacks its file media/{name_}")
        created_at = c.when(f"{where}: created_at", row.get("created_at"), optional=True)
        # quarantine fails safe: a scan that flags burned-in annotation stays quarantined
        # unless the backup records an admin's release of it
        released = row.get("released")
        if released is not None and not (
                isinstance(released, dict) and set(released) == {"by", "at"}
                and isinstance(released["by"], str) and len(released["by"]) <= 150):
            c.add(f"{where}: its release from quarantine is not a record of by and at")
            continue
        if released is not None:
            released = {"by": released["by"],
                        "at": c.when(f"{where}: released at", released["at"])}
        if "quarantined" not in values:
            values["quarantined"] = bool(values.get("burned_in_annotation"))
        elif values.get("burned_in_annotation") and not values["quarantined"] and not released:
            values["quarantined"] = True
            plan.warnings.append(f"{where} flags burned-in annotation and the backup has no "
                                 "record of an admin releasing it: it stays quarantined until "
                                 "an admin checks and releases it")
        if values["quarantined"] or not values.get("burned_in_annotation"):
            released = None
        plan.media.update({f"media/{file_}", f"media/{preview}"})
        plan.scans.append({"values": values | {"file": file_, "preview": preview},
                           "dataset": datasets.get(dataset), "label_set": set_name,
                           "created_at": created_at, "released": released})

    plan_models, versions = {}, []
    with_files = {n.split("/")[1] for n in files if n.startswith("artifacts/")
                  and n.count("/") >= 2 and _carried(PurePosixPath(*n.split("/")[2:]))}
    for i, row in enumerate(c.section(manifest, "models", list), 1):
        values = c.row(f"model {i}", row, ModelVersion, MODEL_FIELDS,
                       extra=("version", "parent", "created_at", "promoted_at", "evaluations"),
                       required=("kind", "status"))
        if values is None:
            continue
        version = row.get("version")
        if not isinstance(version, str) or not VERSION_NAME.fullmatch(version) \
                or ".." in version:
            c.add(f"model {i}: its version name {str(version)[:80]!r} is not letters, digits, "
                  "'.', '-' and '_' (at most 64, no '..')")
            continue
        where = f"model {version}"
        if version in plan_models:
            c.add(f"{where} appears twice")
            continue
        for key in ("config", "metrics"):
            if not isinstance(values.get(key, {}), dict):
                c.add(f"{where}: its {key} is not a mapping")
        for problem in _config_problems(values.get("config")):
            c.add(f"{where}: {problem}")
        parent = row.get("parent")
        if parent is not None and not _is(parent, plan_models):
            c.add(f"{where}: its parent {str(parent)[:40]!r} is not an earlier model of the "
                  "backup")
        evaluations = []
        rows = row.get("evaluations") or []
        if not isinstance(rows, list):
            c.add(f"{where}: its evaluations are not a list")
            rows = []
        for j, e in enumerate(rows, 1):
            e_values = c.row(f"{where}, evaluation {j}", e, Evaluation, EVALUATION_FIELDS,
                             extra=("created_at",))
            if e_values is not None:
                evaluations.append({"values": e_values, "created_at": c.when(
                    f"{where}, evaluation {j}: created_at", e.get("created_at"),
                    optional=True)})
        has_files = version in with_files
        plan_models[version] = {
            "version": version, "values": values, "parent": parent,
            "created_at": c.when(f"{where}: created_at", row.get("created_at"), optional=True),
            "promoted_at": c.when(f"{where}: promoted_at", row.get("promoted_at"),
                                  optional=True),
            "evaluations": evaluations, "has_files": has_files}
        versions.append(version)
    plan.models = [plan_models[v] for v in versions]
    for key, kind in (("active_model", "classifier"), ("active_encoder", "encoder")):
        version = spec.get(key)
        if version is not None and (not _is(version, plan_models)
                                    or plan_models[version]["values"]["kind"] != kind):
            c.add(f"the project's {key} {str(version)[:40]!r} is not a {kind} of the backup")
        plan.project[key] = version

    seen_external, seen_import = set(), set()
    finding_states = set(FindingAnswer.State.values)
    for i, row in enumerate(c.section(manifest, "annotations", list), 1):
        where = f"answer {i}"
        values = c.row(where, row, Annotation, ANNOTATION_FIELDS,
                       extra=("scan", "label", "reader", "created_at", "shown_model_version",
                              "shown_suggestion", "findings"))
        if values is None:
            continue
        if not _is(row.get("scan"), shas):
            c.add(f"{where}: its scan {str(row.get('scan'))[:16]!r} is not in the backup")
        label = _mapped(row.get("label"), plan.class_names)
        suggestion = _mapped(row.get("shown_suggestion"), plan.class_names)
        for what, value in (("class", label), ("shown suggestion", suggestion)):
            if value is not None and not _is(value, class_names) \
                    and not _is(value, refused_classes):
                c.add(f"{where}: its {what} {str(value)[:40]!r} is not a class of the backup")
        outcome = values.get("outcome", Annotation.Outcome.LABEL)
        if outcome == Annotation.Outcome.LABEL and label is None:
            c.add(f"{where}: a label answer without a class")
        # what the answer path allows (annotation_create, findings_answer_create): a class of
        # a single-label set, never a finding as the scan's class. The class's set may differ
        # from the scan's: a live project holds such answers once a label set's rules move
        # answered scans (label_sets_assign), and they count for their class's set there as
        # they do after the restore (docs/reliability.md, fifth probe)
        for what, value in (("class", label), ("shown suggestion", suggestion)):
            if _is(value, class_names) and class_names[value] in multi:
                c.add(f"{where}: its {what} {value!r} is a finding of the findings set "
                      f"{class_names[value]!r}, not a class to answer a scan with")
        confidence = values.get("shown_confidence")
        if confidence is not None and not 0 <= confidence <= 1:
            # (a finite number: the others are refused) as the answer path records one now
            # (annotation_create); an older version stored a Label Studio score as it came
            values["shown_confidence"] = None
            c.changed.setdefault(("confidence",), []).append((where, confidence, None))
        shown = row.get("shown_model_version")
        if shown is not None and not _is(shown, plan_models):
            c.add(f"{where}: the model {str(shown)[:40]!r} it was shown is not in the backup")
        scores = values.get("shown_scores")
        if scores is not None and not (isinstance(scores, dict) and all(
                _finite(v) and 0 <= v <= 1 for v in scores.values())):
            c.add(f"{where}: its shown_scores are not a mapping of class id to probability "
                  "(a number from 0 to 1)")
        external = values.get("external_id", "")
        key = _external_key(values.get("source", Annotation.Source.WEB), str(row.get("reader")),
                            external)
        if external and key in seen_external:
            c.add(f"{where}: its submission id {external!r} appears twice")
        seen_external.add(key)
        if key[0] == Annotation.Source.IMPORT and _is(label, class_names):
            if (row.get("scan"), label) in seen_import:
                c.add(f"{where}: the import gave this scan the class {label!r} twice")
            seen_import.add((row.get("scan"), label))
        findings = row.get("findings") or []
        if isinstance(findings, list):
            findings = [dict(f, finding=_mapped(f["finding"], plan.class_names))
                        if isinstance(f, dict) and "finding" in f else f for f in findings]
        ok = isinstance(findings, list) and all(
            isinstance(f, dict) and set(f) == {"finding", "state"}
            and _is(f["finding"], class_names) and _is(f["state"], finding_states)
            for f in findings)
        if not ok:
            c.add(f"{where}: its findings are not pairs of a backup class and one of "
                  f"{', '.join(sorted(finding_states))}")
            continue
        if len({f["finding"] for f in findings}) != len(findings):
            c.add(f"{where}: a finding is answered twice")
        if findings and outcome != Annotation.Outcome.FINDINGS:
            c.add(f"{where}: findings on an answer that is not a findings answer")
        if findings:
            single = sorted({f["finding"] for f in findings
                             if _is(f["finding"], class_names)
                             and class_names[f["finding"]] not in multi})
            sets = sorted({class_names[f["finding"]] for f in findings
                           if _is(f["finding"], class_names)} - {None}, key=str)
            if single:
                c.add(f"{where}: its findings {', '.join(map(repr, single[:5]))} are classes "
                      "of a single-label set, not findings")
            elif len(sets) > 1:
                c.add(f"{where}: its findings come from {len(sets)} findings sets "
                      f"({', '.join(map(repr, sets[:5]))}); one answer holds one set's findings")
        plan.annotations.append({
            "values": values, "scan": row.get("scan"), "label": label,
            "reader": user(where, row.get("reader")), "shown_model_version": shown,
            "shown_suggestion": suggestion, "findings": findings,
            "created_at": c.when(f"{where}: created_at", row.get("created_at"))})
    if c.problems:
        raise _Problems
    _say_changed(plan, c.changed, renames)
    return plan


def _mapped(value, names: dict):
    """``value`` as restored, when it is one of the backup's ``names`` (a dict: the backup's
    name -> the name restored); as it is otherwise (the checks refuse it if need be)."""
    return names[value] if _is(value, names) else value


def _renamed(renames: dict, what: str, number: int, row, taken: set) -> tuple[object, object]:
    """(the row's name in the backup, the row to check: with the name to restore when this
    site's rules refuse the backup's, noted in ``renames``). ``taken``: the section's names
    so far and those that stay as they are."""
    if not isinstance(row, dict):
        return None, row
    name = row.get("name")
    restored = _restored_name(what, name, number, taken)
    if restored is None:
        return name, row
    renames.setdefault(what, []).append((number, name, restored[0], restored[1]))
    taken.add(restored[0])
    return name, {**row, "name": restored[0]}


def _kept_names(what: str, rows) -> set[str]:
    """The names of a manifest section that stay as they are (none a renamed one may take)."""
    if not isinstance(rows, list):
        return set()
    return {r["name"] for r in rows if isinstance(r, dict) and isinstance(r.get("name"), str)
            and _typed_name_problem(what, r["name"]) is None}


def _examples(items: list[str], limit: int = 5) -> str:
    more = f"; and {len(items) - limit} more" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


def _say_changed(plan: _Plan, changed: dict, renames: dict) -> None:
    """One warning per kind of value restored otherwise than the backup holds it."""
    for what, items in renames.items():
        plan.clean(
            f"{len(items)} {what} name(s) of the backup are refused by this site now (names "
            "saved before it checked them): restored under another name: " + _examples([
                f"{what} {number} {old[:60]!r} as {new!r} ({why})"
                for number, old, new, why in items]) + ". An admin may rename them.")
    for key, items in changed.items():
        shown = [f"{where}: {old!r} as {new!r}" for where, old, new in items]
        if key[0] == "bounds":
            _, _, name, low, high = key
            plan.clean(f"{len(items)} {name} value(s) outside {low:g} to {high:g} (saved "
                       "before this site bounded the setting): restored as the nearest "
                       "allowed value, as upgrading this site did to its own: "
                       + _examples(shown))
        elif key[0] == "colour":
            plan.clean(f"{len(items)} class colour(s) are not #RRGGBB (saved before this site "
                       f"checked colours): restored as {key[1]}, as upgrading this site did "
                       "to its own; choose another on the class's page: " + _examples(shown))
        elif key[0] == "confidence":
            plan.clean(f"{len(items)} answer(s) recorded a shown confidence that is not a "
                       "probability from 0 to 1 (an older version stored a Label Studio score "
                       "as it came): restored without it, as this site records such answers "
                       "now: " + _examples([f"{where}: {old!r}" for where, old, _ in items]))


def _config_problems(config) -> list[str]:
    """What makes a model config unusable as this site reads it, or hostile: the lists of
    classes and sets that are no lists, a file it names that is not a plain file name of
    the version's own folder (``../`` would read a file elsewhere)."""
    if not isinstance(config, dict):
        return []
    problems = []
    for key in ("classes", "label_sets", "findings_sets"):
        if config.get(key) is not None and not isinstance(config[key], list):
            problems.append(f"its config's {key} is not a list")
    for key, names in (("label_sets", ("head",)), ("findings_sets", ("head", "net"))):
        for entry in config.get(key) or [] if isinstance(config.get(key), list) else []:
            for name in names:
                value = entry.get(name) if isinstance(entry, dict) else None
                if value is not None and not (isinstance(value, str) and ".." not in value
                                              and ARTIFACT_NAME.fullmatch(value)):
                    problems.append(f"its config names the file {str(value)[:60]!r}, not a file "
                                    "of its own folder")
    return problems


# --- restoring ----------------------------------------------------------------------------


def import_project(archive: str | Path, *, name: str | None = None, embed: bool = True,
                   same_users: bool = False, log=lambda line: None) -> Project:
    """Restore an archive made by ``export_project``. The archive is checked first (its
    members, then the whole manifest, then clashes with this database and its files, then
    each model version's files); then files are copied, then every row is written in one
    transaction, and the copied files (and folders made for them) are removed again if the
    rows cannot be written. Any refusal is a BackupError that names the problem and leaves
    nothing behind.

    ``same_users``: the backup's users whose usernames are taken here by accounts with other
    e-mail addresses are the same people (their answers, roles and classes are credited to
    the local accounts); without it such a backup is refused.

    One restore at a time (``_restore_lock``, taken once the manifest checks out and held
    until its rows are written): a second one started meanwhile is refused. Files are
    created new (``O_EXCL``) and only what this restore created is removed on failure,
    never a file or folder something else wrote."""
    archive = Path(archive)
    if not archive.is_file():
        raise BackupError(f"{archive} is a folder, not an archive: give the .tar.gz file "
                          "`project_export` wrote" if archive.is_dir()
                          else f"{archive} does not exist" if not archive.exists()
                          else f"{archive} is not a regular file: give the .tar.gz file "
                          "`project_export` wrote")
    workdir = Path(tempfile.mkdtemp(prefix="medlabel-restore-"))
    copied: list[Path] = []         # files and artifact folders this restore created
    made: list[Path] = []           # folders it made for them
    held = ExitStack()              # the restore lock, from the database checks to the end
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                files, manifest = _read_archive(tar, archive)
                plan = _check(manifest, files, name)
                _restore_lock(held)
                _check_database(plan, same_users=same_users)
                versions = {m["version"] for m in plan.models if m["has_files"]}
                wanted = [files["manifest.json"]] + [files[n] for n in sorted(plan.media)] + [
                    member for n, member in files.items()
                    if n.startswith("artifacts/") and n.count("/") >= 2
                    and n.split("/")[1] in versions
                    and _carried(PurePosixPath(*n.split("/")[2:]))]
                size = sum(m.size for m in wanted)
                free = shutil.disk_usage(workdir).free
                if size > free:
                    raise BackupError(f"the backup unpacks to {_size(size)} but only "
                                      f"{_size(free)} are free in {workdir.parent}")
                tar.extractall(workdir, members=wanted, filter="data")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise BackupError(f"{archive} is not a readable backup (damaged or not a "
                              f".tar.gz): {exc}") from None
        _check_model_files(plan, workdir)
        if plan.version == 1:
            _infer_colour(plan, workdir)
        media = _media_plan(plan, workdir)
        artifact_dirs = _artifact_plan(plan, workdir)
        for line in plan.warnings:
            log(f"warning: {line}")

        try:
            for source, target in media:
                _make_parents(target.parent, made)
                if not _copy_new(source, target, copied) and not filecmp.cmp(
                        source, target, shallow=False):
                    raise BackupError(f"{target} was written by something else during the "
                                      "restore, with other content: nothing was restored")
            for version, (source, target) in artifact_dirs.items():
                if source is not None:
                    _make_parents(target.parent, made)
                    try:
                        target.mkdir()
                    except FileExistsError:
                        raise BackupError(f"{target} was made by something else during the "
                                          f"restore (model {version}): nothing was restored"
                                          ) from None
                    copied.append(target)
                    shutil.copytree(source, target, dirs_exist_ok=True)
        except OSError as exc:
            raise BackupError(f"the backup's files could not be copied ({exc}): nothing "
                              "was restored") from None
        try:
            with transaction.atomic():
                project = _restore_rows(plan, {v: t for v, (_, t) in artifact_dirs.items()},
                                        log)
        except (DatabaseError, ValueError, KeyError, TypeError, ValidationError,
                OSError) as exc:
            raise BackupError(f"the backup could not be restored ({type(exc).__name__}: "
                              f"{str(exc)[:300]}): nothing was restored") from None
        log(f"restored {project.name!r}: {project.scans.count()} scans "
            f"({project.scans.filter(quarantined=True).count()} quarantined), "
            f"{Annotation.objects.filter(scan__project=project).count()} annotations, "
            f"{project.model_versions.count()} model versions")
    except BaseException:
        for path in reversed(copied):       # (under the lock still: no other restore's)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        for folder in reversed(made):
            try:
                folder.rmdir()              # only when empty: never another's files
            except OSError:
                pass
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        held.close()                        # the lock: the re-embedding needs none
    if embed and project.active_encoder_id:
        from django.core.management import CommandError, call_command

        from ml_backend.errors import TrainingError

        log(f"re-embedding with {project.active_encoder.version} ...")
        try:
            with open(os.devnull, "w") as quiet:
                call_command("embed", project=project.name, full=True, no_progress=True,
                             stdout=quiet)
            if project.active_model_id:
                from ml_backend import services as ml

                ml.predictions_refresh(project.active_model)
        except (CommandError, TrainingError, OSError, ValueError) as exc:
            # the rows and files are restored (checked complete): what failed can be run again
            log(f"warning: the project is restored, but re-embedding its scans or storing its "
                f"model's predictions failed ({str(exc)[:300]}): run `manage.py embed "
                f"--project \"{project.name}\" --full`, then refit, once that is fixed")
    return project


def _restore_lock(held: ExitStack) -> None:
    """Take the restore lock onto ``held``: the model export's ``flock`` (one per call, so
    threads exclude each other as processes do; gone with a process that dies) on
    ``ARTIFACTS_ROOT/.restore.lock``, not waited for. Two restores at once would each find
    the other's files half copied, and the one that fails would remove them."""
    root = Path(settings.ARTIFACTS_ROOT)
    path = root / RESTORE_LOCK
    try:
        root.mkdir(parents=True, exist_ok=True)
        held.enter_context(file_lock(path, wait=0))
    except LockBusy:
        raise BackupError(f"another restore is under way here (it holds {path}): nothing was "
                          "restored; restore again once it has finished") from None
    except OSError as exc:
        raise BackupError(f"cannot take the restore lock {path}: {exc.strerror or exc}: "
                          "nothing was restored") from None


def _copy_new(source: Path, target: Path, copied: list[Path]) -> bool:
    """Copy ``source`` to ``target`` as a new file (noted in ``copied`` once this call has
    created it); False, with nothing written, when ``target`` exists already."""
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return False
    copied.append(target)
    with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
        shutil.copyfileobj(src, out, 1 << 20)
    shutil.copystat(source, target)
    return True


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _make_parents(folder: Path, made: list[Path]) -> None:
    """``folder`` and its missing parents, each one this call made noted in ``made`` (one
    something else made meanwhile is used, and not noted: never removed on failure)."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            if not path.is_dir():
                raise
            continue
        made.append(path)


def _check_database(plan: _Plan, *, same_users: bool = False) -> None:
    """What the manifest cannot know: clashes with this database."""
    if Project.objects.filter(name=plan.name).exists():
        raise BackupError(f"a project named {plan.name!r} exists: restore with --name NEW")
    _check_users(plan, same_users)
    clashes = list(ModelVersion.objects.filter(
        version__in=[m["version"] for m in plan.models]).values_list("version", flat=True))
    if clashes:
        raise BackupError(f"model versions {sorted(clashes)[:5]} exist in this database "
                          "already (restore into a fresh database)")
    linked = plan.project.get("label_studio_project_id")
    if linked is not None and Project.objects.filter(label_studio_project_id=linked).exists():
        plan.project["label_studio_project_id"] = None
        plan.warnings.append(f"Label Studio project {linked} stays linked to the project that "
                             "holds it in this database: the restored copy is not linked")
    keyed = {}
    for a in plan.annotations:
        source = a["values"].get("source", Annotation.Source.WEB)
        if a["values"].get("external_id") and not (source == Annotation.Source.WEB
                                                   and _submission_ids_per_reader()):
            keyed.setdefault(source, {})[a["values"]["external_id"]] = a
    dropped = 0
    for source, by_id in keyed.items():
        ids = list(by_id)
        for start in range(0, len(ids), 500):
            for taken in Annotation.objects.filter(
                    source=source, external_id__in=ids[start:start + 500]).values_list(
                    "external_id", flat=True):
                by_id[taken]["values"]["external_id"] = ""
                dropped += 1
    if dropped:
        plan.warnings.append(f"{dropped} answer(s) are restored without their Label Studio "
                             "or submission id: this database holds those ids already (for "
                             "the original project)")


def _check_users(plan: _Plan, same_users: bool) -> None:
    """Users are matched by username: one whose account here has another e-mail address is
    perhaps another person (another hospital's "clinician"), who would be credited with the
    backup's answers and given its role. Refused, unless the caller says they are the same
    people; an address left empty on either side says nothing, and is matched as before."""
    User = get_user_model()
    names, here = list(plan.users), {}
    for start in range(0, len(names), 500):
        here.update((u.get_username(), u.email or "") for u in User.objects.filter(
            **{f"{User.USERNAME_FIELD}__in": names[start:start + 500]}))
    other = sorted(u for u, email in here.items()
                   if email.strip() and plan.users[u]["email"].strip()
                   and email.strip().lower() != plan.users[u]["email"].strip().lower())
    if not other:
        return
    listed = "; ".join(f"{u} ({plan.users[u]['email']} in the backup, {here[u]} here)"
                       for u in other[:10]) + (f"; and {len(other) - 10} more"
                                               if len(other) > 10 else "")
    if not same_users:
        raise BackupError(
            f"the backup's user(s) {listed} have the username of an account here with another "
            "e-mail address, so they may be other people: nothing was restored. If they are "
            "the same people, restore with --same-users (their answers, roles and classes are "
            "credited to the accounts here). If they are not, rename those accounts here "
            "first: the restore then makes new accounts for the backup's users.")
    roles = [f"{u}: {plan.users[u]['role']}" for u in other if plan.users[u]["role"]]
    plan.warnings.append(
        f"--same-users: the backup's user(s) {listed} are taken as the accounts here, with "
        "their answers and classes" + (f", and their roles in the restored project "
                                       f"({', '.join(roles[:10])})" if roles else ""))


def _submission_ids_per_reader() -> bool:
    """Whether a web answer's submission id is unique per reader and project (a restored
    project's ids then never clash with another project's) rather than across the site."""
    return any(getattr(c, "name", "") == "annotation_unique_submission"
               for c in Annotation._meta.constraints)


def _external_key(source: str, reader: str, external_id: str) -> tuple:
    """What must be unique about an answer's external id within one project."""
    if source == Annotation.Source.WEB and _submission_ids_per_reader():
        return source, reader, external_id
    return source, external_id


def _check_model_files(plan: _Plan, workdir: Path) -> None:
    """Each model version's files, unpacked in ``workdir``, checked as this site checks a
    version before it is put in use (``model_version_files_problem``: an encoder's
    checkpoint; a classifier's heads, network or findings heads, and a head's encoder's
    checkpoint). A version in use that is incomplete — or whose encoder is — comes back
    retired, with a warning saying what is missing, and is no longer the project's active
    model or encoder: a restore never leaves a model in use that cannot run."""
    from ml_backend.services.artifacts import model_version_files_problem

    records, broken = {}, {}
    for m in plan.models:
        values = m["values"]
        record = ModelVersion(version=m["version"], kind=values["kind"],
                              config=values.get("config") or {},
                              artifact_dir=str(workdir / "artifacts" / m["version"])
                              if m["has_files"] else "")
        parent = records.get(m["parent"])
        if parent is not None:
            record.parent = parent
        records[m["version"]] = record
        if not m["has_files"]:
            broken[m["version"]] = None                 # (said as before: no files)
        elif m["parent"] in broken and parent.kind == ModelVersion.Kind.ENCODER:
            why = broken[m["parent"]] or "it has no files in the backup"
            broken[m["version"]] = f"its encoder {m['parent']} is incomplete ({why})"
        else:
            problem = model_version_files_problem(record)
            if problem is not None:
                # the check names the files as this site would; the folder is ours, not theirs
                broken[m["version"]] = problem.replace(str(workdir), "the backup")
    active = (plan.project["active_model"], plan.project["active_encoder"])
    for m in plan.models:
        values = m["values"]
        if m["version"] not in broken or not (values["status"] in IN_USE
                                              or m["version"] in active):
            continue
        problem = broken[m["version"]]
        reason = ("restored without its files (the backup has none for it): not usable"
                  if problem is None else f"restored incomplete ({problem}): not usable")
        values.update(status="retired", status_reason=(
            f"{values.get('status_reason', '')} [{reason}]".strip()))
        cleared = [key for key in ("active_model", "active_encoder")
                   if plan.project[key] == m["version"]]
        for key in cleared:
            plan.project[key] = None
        what = "classifier" if cleared == ["active_model"] else "encoder"
        then = (f"; the project has no active {what} until one is promoted, trained or "
                "pretrained" if cleared else "")
        if problem is None:
            plan.warnings.append(f"model {m['version']} has no files in the backup: it is "
                                 f"restored retired, not in use (train or pretrain anew){then}")
        else:
            plan.warnings.append(f"model {m['version']} is incomplete in the backup "
                                 f"({problem}): it is restored retired, not in use{then}")


def _infer_colour(plan: _Plan, workdir: Path) -> None:
    """A version-1 backup records no colour: each scan's is read from its preview (the
    import renders a colour scan's preview in RGB and a greyscale one's in one channel), a
    dataset's from its scans, and the project's from its encoder (the channels its networks
    take) or else its first scan (as an import decides it), with a warning saying so."""
    from PIL import Image

    counts, unreadable = {}, 0
    for row in plan.scans:
        values = row["values"]
        if "colour" in values:
            continue
        try:
            with Image.open(workdir / "media" / values["preview"]) as image:
                values["colour"] = image.mode in ("RGB", "RGBA")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            values["colour"] = False
            unreadable += 1
        seen = counts.setdefault(row["dataset"], set())
        seen.add("colour" if values["colour"] else "grey")
    for values in plan.datasets:
        seen = counts.get(values["name"])
        if "colour_mode" not in values and seen:
            values["colour_mode"] = "mixed" if len(seen) > 1 else next(iter(seen))
            values.setdefault("colour_note", "inferred by the restore of a version-1 backup "
                                             "from the scans' previews")
    if "colour_mode" in plan.project or not plan.scans:
        return
    colour = sum(1 for row in plan.scans if row["values"].get("colour"))
    mode, why = None, ""
    encoders = [m for m in plan.models if m["values"]["kind"] == ModelVersion.Kind.ENCODER]
    encoders.sort(key=lambda m: m["version"] != plan.project["active_encoder"])
    for m in encoders:
        pretrain = (m["values"].get("config") or {}).get("pretrain")
        channels = pretrain.get("channels") if isinstance(pretrain, dict) else None
        if channels in (1, 3):
            mode = "colour" if channels == 3 else "grey"
            why = f"its encoder {m['version']} takes {channels} channel(s)"
            break
    if mode is None:
        mode = "colour" if plan.scans[0]["values"]["colour"] else "grey"
        why = "its first scan decides, as an import does"
    plan.project["colour_mode"] = mode
    plan.warnings.append(
        f"this backup (version 1) does not record colour: by their previews {colour} of "
        f"{len(plan.scans)} scan(s) are colour, and the project is restored as {mode} ({why})"
        + (f"; {unreadable} preview(s) could not be read and count as greyscale"
           if unreadable else "") + (". An admin may change it while the project has no model"
                                      if not plan.models else ""))


def _media_plan(plan: _Plan, workdir: Path) -> list[tuple[Path, Path]]:
    """(source, target) of the scan files to copy. A file already stored under its
    content-addressed name is kept when identical; a different one refuses the restore."""
    copies = []
    for archive_name in sorted(plan.media):
        name = archive_name[len("media/"):]
        source, target = workdir / archive_name, media_path(name)
        if not source.is_file() or source.is_symlink():
            raise BackupError(f"the archive lacks {name}")
        if target.exists():
            if not target.is_file() or not filecmp.cmp(source, target, shallow=False):
                raise BackupError(f"{name} is stored here already with other content: "
                                  "restore into an empty MEDIA_ROOT")
            continue
        copies.append((source, target))
    return copies


def _artifact_plan(plan: _Plan, workdir: Path) -> dict[str, tuple[Path | None, Path]]:
    """{version: (the archive's folder or None, its folder under ARTIFACTS_ROOT/models)}."""
    root = (Path(settings.ARTIFACTS_ROOT) / "models").resolve()
    unpacked = (workdir / "artifacts").resolve()
    dirs = {}
    for m in plan.models:
        source = (workdir / "artifacts" / m["version"]).resolve()
        target = (root / m["version"]).resolve()
        if source.parent != unpacked or target.parent != root:     # the names are checked
            raise BackupError(f"model {m['version']}: its name leaves the artifact folders")
        if not m["has_files"]:
            dirs[m["version"]] = (None, target)
            continue
        if target.exists() or target.is_symlink():
            raise BackupError(f"{target} exists already: restore into an empty "
                              "ARTIFACTS_ROOT")
        dirs[m["version"]] = (source, target)
    return dirs


def _restore_rows(plan: _Plan, artifact_dirs: dict[str, Path], log) -> Project:
    User = get_user_model()
    users = {}
    for username, info in plan.users.items():
        user, created = User.objects.get_or_create(**{User.USERNAME_FIELD: username},
                                                   defaults={"email": info["email"]})
        if created:
            user.set_unusable_password()      # they reset it (or an admin sets one)
            user.save()
            log(f"user {username} created (no password yet)")
        users[username] = user
    spec = plan.project
    linked = spec.get("label_studio_project_id")
    project = Project.objects.create(
        name=plan.name, created_by=users.get(spec["created_by"]),
        **{k: spec[k] for k in PROJECT_FIELDS if k in spec and k != "label_studio_project_id"})
    if spec["created_at"]:
        Project.objects.filter(pk=project.pk).update(created_at=spec["created_at"])
    Membership.objects.bulk_create([
        Membership(project=project, user=users[u], role=info["role"])
        for u, info in plan.users.items() if info["role"]])
    datasets = {d["name"]: Dataset.objects.create(project=project, **d) for d in plan.datasets}
    label_sets, set_ids = {}, {}
    for ls in plan.label_sets:
        label_set = LabelSet.objects.create(project=project, **ls["values"])
        label_set.datasets.add(*[datasets[n] for n in ls["datasets"]])
        label_sets[label_set.name] = label_set
        set_ids[ls["id"]] = label_set.pk
    first_set = next(iter(label_sets.values()))
    classes, class_ids = {}, {}
    for c in plan.classes:
        label_class = LabelClass.objects.create(
            project=project, label_set=label_sets.get(c["label_set"], first_set),
            created_by=users.get(c["created_by"]), **c["values"])
        classes[label_class.name] = label_class
        class_ids[c["id"]] = label_class.pk
    scans, releases, times = {}, [], []
    for row in plan.scans:
        set_name = row["label_set"]
        scan = Scan(project=project, dataset=datasets[row["dataset"]],
                    label_set=label_sets[set_name] if set_name else (
                        first_set if len(label_sets) == 1 else None), **row["values"])
        scans[scan.sha256] = scan
        times.append(row["created_at"])
        if row["released"]:
            releases.append((scan, row["released"]))
    created_scans = Scan.objects.bulk_create(list(scans.values()), batch_size=500)
    for scan, when in zip(created_scans, times):
        if when:
            scan.created_at = when
    Scan.objects.bulk_update(created_scans, ["created_at"], batch_size=500)
    # a burned-in scan an admin had released stays released, with who released it and when
    for scan, release in releases:
        event = AuditEvent.objects.create(
            actor=users.get(release["by"]), actor_name=release["by"], project=project,
            action=RELEASED, object_type="scan", object_id=str(scan.pk),
            details={"burned_in_annotation": scan.burned_in_annotation,
                     "restored_from_backup": True})
        AuditEvent.objects.filter(pk=event.pk).update(created_at=release["at"])
    models_ = {}
    for m in plan.models:
        values = dict(m["values"])
        values["config"], files = _remap_config(values.get("config") or {}, class_ids,
                                                set_ids, plan.class_names, plan.set_names)
        model = ModelVersion.objects.create(
            project=project, version=m["version"], parent=models_.get(m["parent"]),
            artifact_dir=str(artifact_dirs[m["version"]]), promoted_at=m["promoted_at"],
            **values)
        if m["created_at"]:
            ModelVersion.objects.filter(pk=model.pk).update(created_at=m["created_at"])
        if m["has_files"]:
            _remap_head(artifact_dirs[m["version"]], class_ids, m["version"], files)
        for e in m["evaluations"]:
            evaluation = Evaluation.objects.create(model_version=model, **e["values"])
            if e["created_at"]:
                Evaluation.objects.filter(pk=evaluation.pk).update(created_at=e["created_at"])
        models_[m["version"]] = model
    # bulk: the audit trail records the original events, not their restore
    rows, times = [], []
    for a in plan.annotations:
        values = dict(a["values"])
        if values.get("shown_scores") is not None:
            values["shown_scores"] = {str(class_ids[int(k)]): v
                                      for k, v in values["shown_scores"].items()
                                      if str(k).lstrip("-").isdigit() and int(k) in class_ids}
        scan = scans[a["scan"]]
        times.append(a["created_at"])
        rows.append(Annotation(
            scan=scan, project_id=project.pk, label_class=classes.get(a["label"]),
            reader=users.get(a["reader"]),
            shown_model_version=models_.get(a["shown_model_version"]),
            shown_suggestion=classes.get(a["shown_suggestion"]), **values))
    created = Annotation.objects.bulk_create(rows, batch_size=500)
    for annotation, when in zip(created, times):
        annotation.created_at = when
    Annotation.objects.bulk_update(created, ["created_at"], batch_size=500)
    FindingAnswer.objects.bulk_create([
        FindingAnswer(annotation=annotation, finding=classes[f["finding"]], state=f["state"])
        for annotation, a in zip(created, plan.annotations) for f in a["findings"]],
        batch_size=500)
    project.active_model = models_.get(spec["active_model"])
    project.active_encoder = models_.get(spec["active_encoder"])
    project.label_studio_project_id = linked      # last: no Label Studio push mid-restore
    project.save(update_fields=["active_model", "active_encoder", "label_studio_project_id"])
    return project


def _remap_config(config: dict, class_ids: dict, set_ids: dict | None = None,
                  class_names: dict | None = None, set_names: dict | None = None
                  ) -> tuple[dict, dict[str, str]]:
    """A model config as this database knows its classes, label sets and findings: every id
    it holds rewritten (its classes, its single-label sets' heads, its findings sets
    ``config["findings_sets"]`` with their findings — what ``findings_scorer``, the model
    export and the refit read), and the names the restore changed. The files named by a
    set's id (``head-<set>.npz``, ``findings-<set>.npz``, ``findings-net-<set>.pt``) take
    the new id; returns (config, {old file name: new file name}) for ``_remap_head``."""
    config = json.loads(json.dumps(config))
    set_ids = {str(k): v for k, v in (set_ids or {}).items() if k is not None}
    class_names, set_names, files = class_names or {}, set_names or {}, {}

    def class_id(value):
        return class_ids.get(value, value) if _whole(value) else value

    def set_id(value):
        return set_ids.get(str(value), value) if _whole(value) or isinstance(value, str) \
            else value

    def renamed(value, names: dict):
        return names.get(value, value) if isinstance(value, str) else value

    def set_entry(entry: dict, patterns: tuple[str, ...]) -> None:
        old = entry.get("id")
        for key, pattern in zip(("head", "net"), patterns):
            name = entry.get(key)
            if _whole(old) and name == pattern.format(old) and set_id(old) != old:
                entry[key] = files[name] = pattern.format(set_id(old))
        if "id" in entry:
            entry["id"] = set_id(old)
        if "name" in entry:
            entry["name"] = renamed(entry["name"], set_names)

    for c in _dicts(config.get("classes")):
        if "id" in c:
            c["id"] = class_id(c["id"])
        if "label_set" in c:
            c["label_set"] = set_id(c["label_set"])
        if "name" in c:
            c["name"] = renamed(c["name"], class_names)
    for entry in _dicts(config.get("label_sets")):
        set_entry(entry, ("head-{}.npz",))
        if isinstance(entry.get("classes"), list):
            entry["classes"] = [class_id(c) for c in entry["classes"]]
    for entry in _dicts(config.get("findings_sets")):
        set_entry(entry, ("findings-{}.npz", "findings-net-{}.pt"))
        for f in _dicts(entry.get("findings")):
            if "id" in f:
                f["id"] = class_id(f["id"])
            if "name" in f:
                f["name"] = renamed(f["name"], class_names)
        if isinstance(entry.get("thresholds"), dict):
            entry["thresholds"] = {renamed(k, class_names): v
                                   for k, v in entry["thresholds"].items()}
        if isinstance(entry.get("learnable"), list):
            entry["learnable"] = [renamed(n, class_names) for n in entry["learnable"]]
    if isinstance(config.get("findings_networks"), list):
        config["findings_networks"] = [renamed(n, set_names)
                                       for n in config["findings_networks"]]
    return config, files


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _dicts(items) -> list[dict]:
    """The mappings of a config's list (a config is the backup's: anything may be there)."""
    return [item for item in items if isinstance(item, dict)] if isinstance(items, list) else []


def _remap_head(folder: Path, class_ids: dict, version: str = "",
                files: dict[str, str] | None = None) -> None:
    """A version's heads store LabelClass ids: rewrite them for this database (a linear head
    per label set, ``head-<set>.npz``, or ``head.npz`` before label sets; a findings head
    per findings set, ``findings-<set>.npz``), after renaming the files named by a set's
    id as ``_remap_config`` did in its config (``files``)."""
    import zipfile

    from ml_backend.active.findings import FindingsHead
    from ml_backend.active.refit import LinearHead

    # in two steps: a set's new id may be another set's old one
    moved = []
    for i, (old, new) in enumerate(sorted((files or {}).items())):
        if (folder / old).is_file():
            step = folder / f".restore-{i}-{old}"
            os.replace(folder / old, step)
            moved.append((step, folder / new))
    for step, target in moved:
        os.replace(step, target)
    for path in sorted(folder.glob("head*.npz")) + sorted(folder.glob("findings-*.npz")):
        try:
            if path.name.startswith("head"):
                head = LinearHead.load(path)
                head.class_ids = np.array([class_ids.get(int(c), int(c))
                                           for c in head.class_ids])
            else:
                head = FindingsHead.load(path)
                if head.finding_ids.dtype.kind not in "iu":    # (names, in an old head)
                    continue
                head.finding_ids = np.array([class_ids.get(int(c), int(c))
                                             for c in head.finding_ids])
            head.save(path)
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
            raise BackupError(f"model {version}: its classifier file {path.name} cannot be "
                              f"read ({exc})") from None
