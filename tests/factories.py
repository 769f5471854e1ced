"""Factories that build test states the way users do: labels through the annotation
service (who, when, what they were shown), models through the same commands and runs."""

from __future__ import annotations

from django.core.management import call_command

from annotator import services
from annotator.models import LabelClass
from tests.conftest import brain_truth


def label_brain_scans(project, reader, *, per_class: int = 2,
                      names=("no_tumor", "pituitary_tumor")) -> list:
    """Label the first ``per_class`` pool scans of each class (the fixture's truth) as
    ``reader`` through ``annotation_create``. Returns the annotations."""
    classes = {c.name: c for c in LabelClass.objects.filter(project=project)}
    pool = list(project.scans.filter(split="pool").order_by("pk"))
    made = []
    for name in names:
        for scan in [s for s in pool if brain_truth(s) == name][:per_class]:
            made.append(services.annotation_create(scan=scan, reader=reader,
                                                   label_class=classes[name]))
    return made


def trained_project(project, reader, *, per_class: int = 2):
    """An encoded project with a few labels and a refit classifier (linear heads). Reading
    is not blind here (the tests look at what the model shows on scans ``reader`` labeled;
    blind second reading has its own tests in tests/annotator/test_double_reading.py)."""
    label_brain_scans(project, reader, per_class=per_class)
    call_command("refit", project=project.name)
    project.refresh_from_db()
    project.blind_second_readers = False
    project.save(update_fields=["blind_second_readers"])
    return project


def model_version_with_files(project, version: str, *, kind: str = "classifier",
                             status: str = "ready", classes=(), parent=None):
    """A model version row with the files it needs present (empty placeholders: enough for
    the checks that look for them; loading them fails, as a damaged file would): an
    encoder's ``encoder.pt``, a fine-tuned classifier's ``classifier.pt`` over ``classes``
    (LabelClass rows)."""
    from pathlib import Path

    from django.conf import settings

    from ml_backend.models import ModelVersion

    folder = Path(settings.ARTIFACTS_ROOT) / "models" / version
    folder.mkdir(parents=True)
    if kind == "encoder":
        (folder / "encoder.pt").write_bytes(b"")
        config = {}
    else:
        (folder / "classifier.pt").write_bytes(b"")
        config = {"kind": "finetuned", "classes": [
            {"id": c.pk, "name": c.name, "label_set": c.label_set_id} for c in classes]}
    return ModelVersion.objects.create(project=project, kind=kind, version=version,
                                       status=status, parent=parent, artifact_dir=str(folder),
                                       config=config)
