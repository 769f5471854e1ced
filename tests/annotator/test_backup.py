"""A project exported, its rows and files deleted, and imported again is the same project:
scans, labels with who/when/what was shown, classes, model versions with their reports, and a
working model."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from annotator.models import Annotation, LabelClass, Project
from ml_backend.models import ModelVersion, Prediction
from tests.conftest import brain_truth

pytestmark = pytest.mark.django_db


def snapshot(project):
    return {
        "scans": sorted(project.scans.values_list("sha256", "split", "patient_key", "width")),
        "classes": sorted(project.label_classes.values_list("name", "hotkey", "color")),
        "annotations": sorted(
            (a.scan.sha256, a.label_class.name if a.label_class else None, a.outcome, a.source,
             a.reader.username if a.reader else None, a.created_at.isoformat(),
             a.shown_model_version.version if a.shown_model_version else None,
             a.shown_suggestion.name if a.shown_suggestion else None, a.shown_confidence)
            for a in Annotation.objects.filter(scan__project=project).select_related(
                "scan", "label_class", "reader", "shown_model_version", "shown_suggestion")),
        "models": sorted(project.model_versions.values_list("version", "kind", "status",
                                                            "num_labels")),
        "evaluations": sorted((e.model_version.version, round(e.macro_f1 or 0, 6))
                              for e in ModelVersion.objects.filter(project=project)
                              for e in e.evaluations.all()),
        "members": sorted(project.memberships.values_list("user__username", "role")),
        "active": (project.active_model.version, project.active_encoder.version),
    }


def test_export_then_import_on_an_empty_database_round_trips(encoded_project, users, settings,
                                                             tmp_path):
    from annotator import services

    project = encoded_project
    classes = {c.name: c for c in LabelClass.objects.filter(project=project)}
    pool = list(project.scans.filter(split="pool").order_by("pk"))
    for name in ("no_tumor", "pituitary_tumor"):
        for scan in [s for s in pool if brain_truth(s) == name][:2]:
            services.annotation_create(scan=scan, reader=users["alice"], label_class=classes[name])
    call_command("refit", project=project.name)
    project.refresh_from_db()
    model = project.active_model
    services.annotation_create(scan=pool[-1], reader=users["bob"], outcome="unsure",
                               shown_model_version=model, shown_suggestion=classes["no_tumor"],
                               shown_confidence=0.55)
    before = snapshot(project)
    probabilities = dict(Prediction.objects.filter(model_version=model).values_list(
        "scan__sha256", "probabilities"))

    archive = tmp_path / "backup.tar.gz"
    call_command("project_export", project=project.name, out=str(archive))
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert "manifest.json" in names and any(n.startswith("artifacts/") for n in names)

    # an empty database and empty storage: delete everything, then restore
    from django.contrib.auth import get_user_model

    from annotator.models import Dataset, Scan

    Annotation.objects.all().delete()
    Scan.objects.all().delete()
    LabelClass.objects.all().delete()
    Dataset.objects.all().delete()
    Project.objects.all().delete()
    ModelVersion.objects.all().delete()
    get_user_model().objects.all().delete()
    for root in (settings.MEDIA_ROOT, settings.ARTIFACTS_ROOT):
        shutil.rmtree(root)
        Path(root).mkdir()
    call_command("project_import", str(archive))

    restored = Project.objects.get(name=project.name)
    after = snapshot(restored)
    assert after == before
    # the restored model works: predictions are recomputed and match the original ones
    new_model = restored.active_model
    classes_now = {c.pk: c.name for c in restored.label_classes.all()}
    again = {p.scan.sha256: {classes_now[int(k)]: v for k, v in p.probabilities.items()}
             for p in Prediction.objects.filter(model_version=new_model).select_related("scan")}
    old_names = {c.pk: c.name for c in classes.values()}
    for sha, old in probabilities.items():
        for k, v in old.items():
            assert again[sha][old_names[int(k)]] == pytest.approx(v, abs=1e-4)

    # a second restore of the same archive is refused with a reason, and leaves nothing behind
    with pytest.raises(CommandError, match="exists"):
        call_command("project_import", str(archive))
    with pytest.raises(CommandError, match="exist"):
        call_command("project_import", str(archive), name="copy")
    assert Project.objects.count() == 1


def test_hostile_archives_are_refused(db, tmp_path):
    import io

    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("../outside.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(CommandError, match="refusing archive member"):
        call_command("project_import", str(evil))
    assert not (tmp_path.parent / "outside.txt").exists()
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not an archive")
    with pytest.raises(CommandError, match="not a readable backup"):
        call_command("project_import", str(junk))
