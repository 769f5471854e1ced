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
