"""Export a project to one archive and restore it on another (or a fresh) database.

The archive (``.tar.gz``) holds ``manifest.json`` — the project's settings, members (by
username and e-mail), datasets, classes, scans (metadata, by content hash), annotations with
who gave them and what they were shown, model versions' metadata and evaluations — plus the
de-identified scan files and previews and every model version's artifact folder. Ids are not
kept: scans are matched by content hash, classes by name, users by username, model versions
by version name. Embedding files hold scan ids, so the restore re-embeds with the active
encoder (``embed=False`` skips it; ``manage.py embed --full`` later does the same).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from annotator.models import (
    Annotation,
    Dataset,
    LabelClass,
    LabelSet,
    Membership,
    Project,
    Scan,
)
from annotator.storage import media_path

FORMAT = "medlabel-project-backup"
VERSION = 1
SKIP_ARTIFACTS = {"embeddings.npy", "thumbs.npy", "scan_ids.npy", "index.faiss",
                  "index.faiss.ids.npy"}


class BackupError(Exception):
    """The archive cannot be written or restored; the message says why."""


def _scan_row(scan: Scan) -> dict:
    fields = ("sha256", "file_format", "source_name", "width", "height", "num_frames",
              "bits_stored", "modality", "manufacturer", "manufacturer_model", "body_part",
              "photometric", "pixel_spacing", "transfer_syntax", "patient_key",
              "study_key", "series_key", "series_number", "instance_number", "slice_position",
              "slice_spacing", "burned_in_annotation", "split", "last_error")
    row = {f: getattr(scan, f) for f in fields}
    row.update(dataset=scan.dataset.name, file=scan.file.name, preview=scan.preview.name,
               created_at=scan.created_at.isoformat(),
               label_set=scan.label_set.name if scan.label_set_id else None)
    return row


def _model_rows(project: Project) -> list[dict]:
    from ml_backend.models import ModelVersion

    rows = []
    for m in ModelVersion.objects.filter(project=project).order_by("created_at", "pk"):
        rows.append({
            "version": m.version, "kind": m.kind, "status": m.status,
            "status_reason": m.status_reason, "parent": m.parent.version if m.parent_id else None,
            "config": m.config, "num_labels": m.num_labels, "metrics": m.metrics,
            "created_at": m.created_at.isoformat(),
            "promoted_at": m.promoted_at.isoformat() if m.promoted_at else None,
            "evaluations": [{k: getattr(e, k) for k in (
                "num_labels", "num_eval", "accuracy", "macro_f1", "macro_auc", "cohen_kappa",
                "ece", "report")} | {"created_at": e.created_at.isoformat()}
                for e in m.evaluations.order_by("created_at")]})
    return rows


def export_project(project: Project, out: str | Path) -> dict:
    """Write ``out`` (.tar.gz); returns counts. Written to a temp file, then moved."""
    out = Path(out)
    scans = list(project.scans.select_related("dataset", "label_set").order_by("pk"))
    by_id = {s.pk: s.sha256 for s in scans}
    classes = list(project.label_classes.select_related("label_set").order_by("order", "pk"))
    annotations = []
    for a in (Annotation.objects.filter(scan__project=project)
              .select_related("label_class", "reader", "shown_model_version", "shown_suggestion")
              .order_by("created_at", "pk")):
        annotations.append({
            "scan": by_id[a.scan_id], "label": a.label_class.name if a.label_class_id else None,
            "outcome": a.outcome, "source": a.source,
            "reader": a.reader.get_username() if a.reader_id else None,
            "created_at": a.created_at.isoformat(), "duration_ms": a.duration_ms,
            "shown_model_version": a.shown_model_version.version
            if a.shown_model_version_id else None,
            "shown_suggestion": a.shown_suggestion.name if a.shown_suggestion_id else None,
            "shown_confidence": a.shown_confidence,
            "shown_acquisition_score": a.shown_acquisition_score,
            "external_id": a.external_id, "note": a.note})
    users = {m.user.get_username(): {"email": m.user.email, "role": m.role}
             for m in project.memberships.select_related("user")}
    for a in annotations:
        if a["reader"] and a["reader"] not in users:
            user = get_user_model().objects.get(username=a["reader"])
            users[a["reader"]] = {"email": user.email, "role": None}
    models = _model_rows(project)
    manifest = {
        "format": FORMAT, "version": VERSION, "exported_at": timezone.now().isoformat(),
        "project": {k: getattr(project, k) for k in (
            "name", "description", "query_strategy", "query_batch_size", "refit_every",
            "gate_tolerance", "novelty_percentile", "clinicians_can_add_classes")}
        | {"active_model": project.active_model.version if project.active_model_id else None,
           "active_encoder": project.active_encoder.version if project.active_encoder_id else None},
        "users": users,
        "datasets": [{k: getattr(d, k) for k in ("name", "site", "scanner", "modality",
                                                  "body_part", "hflip_allowed", "description")}
                     for d in project.datasets.all()],
        "label_sets": [{"id": ls.pk, **{k: getattr(ls, k) for k in (
            "name", "description", "modalities", "body_parts", "order")},
            "datasets": [d.name for d in ls.datasets.all()]}
            for ls in project.label_sets.order_by("order", "pk")],
        "classes": [{"id": c.pk, "label_set": c.label_set.name, **{k: getattr(c, k) for k in (
            "name", "description", "hotkey", "color", "order")}} for c in classes],
        "scans": [_scan_row(s) for s in scans],
        "annotations": annotations,
        "models": models,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".tmp-", suffix=".tar.gz")
    os.close(fd)
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            data = json.dumps(manifest, indent=1, default=str).encode()
            info = tarfile.TarInfo("manifest.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            for s in scans:
                for name in {s.file.name, s.preview.name}:
                    path = media_path(name)
                    if not path.exists():
                        raise BackupError(f"scan {s.pk}: file {name} is missing from MEDIA_ROOT")
                    tar.add(path, arcname=f"media/{name}")
            for m in project.model_versions.all():
                folder = Path(m.artifact_dir) if m.artifact_dir else None
                if folder is None or not folder.is_dir():
                    continue
                for path in sorted(folder.rglob("*")):
                    if path.is_file() and path.name not in SKIP_ARTIFACTS:
                        tar.add(path, arcname=f"artifacts/{m.version}/{path.relative_to(folder)}")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"scans": len(scans), "annotations": len(annotations), "classes": len(classes),
            "models": len(models), "bytes": out.stat().st_size}


def _safe_members(tar: tarfile.TarFile):
    for member in tar.getmembers():
        name = member.name
        if member.issym() or member.islnk() or name.startswith("/") or ".." in Path(name).parts:
            raise BackupError(f"refusing archive member {name!r} (absolute, link or '..')")
        yield member


def import_project(archive: str | Path, *, name: str | None = None, embed: bool = True,
                   log=lambda line: None) -> Project:
    """Restore an archive made by ``export_project``. All rows in one transaction; files are
    copied first and removed again if the rows cannot be written."""
    from ml_backend.models import ModelVersion

    archive = Path(archive)
    if not archive.is_file():
        raise BackupError(f"{archive} does not exist")
    workdir = Path(tempfile.mkdtemp(prefix="medlabel-restore-"))
    copied: list[Path] = []
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(workdir, members=list(_safe_members(tar)), filter="data")
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise BackupError(f"{archive} is not a readable backup: {exc}") from None
        try:
            manifest = json.loads((workdir / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            raise BackupError(f"{archive} has no valid manifest.json: {exc}") from None
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise BackupError(f"{archive} is not a {FORMAT} v{VERSION} archive")
        spec = manifest["project"]
        name = name or spec["name"]
        if Project.objects.filter(name=name).exists():
            raise BackupError(f"a project named {name!r} exists: restore with --name NEW")
        clashes = ModelVersion.objects.filter(
            version__in=[m["version"] for m in manifest["models"]]).values_list("version", flat=True)
        if clashes:
            raise BackupError(f"model versions {sorted(clashes)[:5]} exist in this database "
                              "already (restore into a fresh database)")

        # files first: media (content-addressed, so existing identical files are fine)
        for row in manifest["scans"]:
            for key in ("file", "preview"):
                source, target = workdir / "media" / row[key], media_path(row[key])
                if not source.is_file():
                    raise BackupError(f"the archive lacks {row[key]}")
                if not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(source, target)
                    copied.append(target)
        artifact_dirs = {}
        for m in manifest["models"]:
            source = workdir / "artifacts" / m["version"]
            target = Path(settings.ARTIFACTS_ROOT) / "models" / m["version"]
            if source.is_dir():
                if target.exists():
                    raise BackupError(f"{target} exists already")
                shutil.copytree(source, target)
                copied.append(target)
            artifact_dirs[m["version"]] = target

        with transaction.atomic():
            project = _restore_rows(manifest, name, artifact_dirs, log)
        log(f"restored {project.name!r}: {project.scans.count()} scans, "
            f"{Annotation.objects.filter(scan__project=project).count()} annotations, "
            f"{project.model_versions.count()} model versions")
    except BaseException:
        for path in copied:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if embed and project.active_encoder_id:
        from django.core.management import call_command

        log(f"re-embedding with {project.active_encoder.version} ...")
        call_command("embed", project=project.name, full=True, no_progress=True,
                     stdout=open(os.devnull, "w"))
        if project.active_model_id:
            from ml_backend import services as ml

            ml.predictions_refresh(project.active_model)
    return project


def _restore_rows(manifest: dict, name: str, artifact_dirs: dict, log) -> Project:
    from datetime import datetime

    from ml_backend.models import Evaluation, ModelVersion

    spec = manifest["project"]
    User = get_user_model()
    users = {}
    for username, info in manifest["users"].items():
        user, created = User.objects.get_or_create(username=username,
                                                   defaults={"email": info.get("email") or ""})
        if created:
            user.set_unusable_password()      # they reset it (or an admin sets one)
            user.save()
            log(f"user {username} created (no password yet)")
        users[username] = user
    project = Project.objects.create(name=name, **{k: spec[k] for k in (
        "description", "query_strategy", "query_batch_size", "refit_every", "gate_tolerance",
        "clinicians_can_add_classes") if k in spec}, novelty_percentile=spec.get(
        "novelty_percentile", 99.0))
    for username, info in manifest["users"].items():
        if info.get("role"):
            Membership.objects.create(project=project, user=users[username], role=info["role"])
    datasets = {d["name"]: Dataset.objects.create(project=project, **d)
                for d in manifest["datasets"]}
    label_sets, set_ids = {}, {}
    for ls in manifest.get("label_sets") or [{"id": None, "name": "default", "datasets": []}]:
        ls = dict(ls)
        old, names = ls.pop("id"), ls.pop("datasets")
        label_sets[ls["name"]] = LabelSet.objects.create(project=project, **ls)
        label_sets[ls["name"]].datasets.add(*[datasets[n] for n in names])
        set_ids[old] = label_sets[ls["name"]].pk
    first_set = next(iter(label_sets.values()))
    classes, class_ids = {}, {}
    for c in manifest["classes"]:
        c = dict(c)
        old = c.pop("id")
        c["label_set"] = label_sets.get(c.pop("label_set", None), first_set)
        classes[c["name"]] = LabelClass.objects.create(project=project, **c)
        class_ids[old] = classes[c["name"]].pk
    scans = {}
    for row in manifest["scans"]:
        row = dict(row)
        created_at = row.pop("created_at")
        row["dataset"] = datasets[row.pop("dataset")]
        set_name = row.pop("label_set", "") or ""
        row["label_set"] = label_sets.get(set_name) if set_name else (
            first_set if len(label_sets) == 1 else None)
        scan = Scan.objects.create(project=project, **row)
        Scan.objects.filter(pk=scan.pk).update(created_at=datetime.fromisoformat(created_at))
        scans[scan.sha256] = scan
    models = {}
    for m in manifest["models"]:
        config = _remap_classes(m["config"], class_ids, set_ids)
        model = ModelVersion.objects.create(
            project=project, kind=m["kind"], version=m["version"], status=m["status"],
            status_reason=m["status_reason"], parent=models.get(m["parent"]),
            artifact_dir=str(artifact_dirs[m["version"]]), config=config,
            num_labels=m["num_labels"], metrics=m["metrics"],
            promoted_at=datetime.fromisoformat(m["promoted_at"]) if m["promoted_at"] else None)
        ModelVersion.objects.filter(pk=model.pk).update(
            created_at=datetime.fromisoformat(m["created_at"]))
        _remap_head(artifact_dirs[m["version"]], class_ids)
        for e in m["evaluations"]:
            created_at = e.pop("created_at")
            evaluation = Evaluation.objects.create(model_version=model, **e)
            Evaluation.objects.filter(pk=evaluation.pk).update(
                created_at=datetime.fromisoformat(created_at))
        models[m["version"]] = model
    # bulk: the audit trail records the original events, not their restore
    rows, times = [], []
    for a in manifest["annotations"]:
        a = dict(a)
        times.append(datetime.fromisoformat(a.pop("created_at")))
        scan = scans[a.pop("scan")]
        rows.append(Annotation(
            scan=scan, project_id=scan.project_id, label_class=classes.get(a.pop("label")),
            reader=users.get(a.pop("reader")),
            shown_model_version=models.get(a.pop("shown_model_version")),
            shown_suggestion=classes.get(a.pop("shown_suggestion")), **a))
    created = Annotation.objects.bulk_create(rows, batch_size=500)
    for annotation, when in zip(created, times):
        annotation.created_at = when
    Annotation.objects.bulk_update(created, ["created_at"], batch_size=500)
    project.active_model = models.get(spec["active_model"])
    project.active_encoder = models.get(spec["active_encoder"])
    project.save(update_fields=["active_model", "active_encoder"])
    return project


def _remap_classes(config: dict, class_ids: dict, set_ids: dict | None = None) -> dict:
    config = json.loads(json.dumps(config))
    set_ids = {str(k): v for k, v in (set_ids or {}).items()}
    for c in config.get("classes", []) or []:
        if isinstance(c, dict) and c.get("id") in class_ids:
            c["id"] = class_ids[c["id"]]
        if isinstance(c, dict) and str(c.get("label_set")) in set_ids:
            c["label_set"] = set_ids[str(c["label_set"])]
    for ls in config.get("label_sets", []) or []:
        if isinstance(ls, dict):
            ls["classes"] = [class_ids.get(c, c) for c in ls.get("classes", [])]
            if str(ls.get("id")) in set_ids:
                ls["id"] = set_ids[str(ls["id"])]
    return config


def _remap_head(folder: Path, class_ids: dict) -> None:
    """A linear head stores its LabelClass ids: rewrite them for this database (one head per
    label set, ``head-<set>.npz``; ``head.npz`` before label sets)."""
    from ml_backend.active.refit import LinearHead

    for path in sorted(folder.glob("head*.npz")):
        head = LinearHead.load(path)
        head.class_ids = np.array([class_ids.get(int(c), int(c)) for c in head.class_ids])
        head.save(path)
