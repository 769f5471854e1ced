"""The demo set-up command: users, the two projects (chest + brain, greyscale; blood smears,
colour), fixture scans; safe to run twice."""

from __future__ import annotations

from django.core.management import call_command

from PIL import Image

from annotator.management.commands.demo_setup import COLOUR_PROJECT, DEMO_PROJECT
from annotator.models import Annotation, LabelClass, Membership, Project, Scan


def test_demo_setup_is_complete_and_idempotent(db, capsys):
    call_command("demo_setup", "--pretrain-epochs", "1", "--image-size", "48")
    out = capsys.readouterr().out
    assert "admin" in out and "clinician" in out and "password:" in out
    project = Project.objects.get(name=DEMO_PROJECT)
    assert Scan.objects.filter(project=project).count() == 390
    assert Scan.objects.filter(project=project, split="eval").count() == 80
    assert Annotation.objects.filter(source="import", scan__project=project).count() == 80
    assert project.colour_mode == "grey" and not project.scans.filter(colour=True).exists()
    assert set(LabelClass.objects.filter(project=project).values_list("name", flat=True)) == {
        "normal", "pneumonia", "glioma_tumor", "meningioma_tumor", "no_tumor", "pituitary_tumor"}
    assert Membership.objects.get(project=project, user__username="clinician").role == "clinician"
    assert Membership.objects.get(project=project, user__username="reviewer").role == "reviewer"
    from ml_backend.models import QueryRound

    _colour_project_is_complete()
    first = QueryRound.objects.get(project=project)
    assert first.size == project.query_batch_size and first.strategy == "hybrid"
    assert not first.items.filter(scan__split="eval").exists()
    assert project.datasets.count() == 2
    # one label set per anatomy: chest films are offered chest classes only
    sets = {s.name: set(s.classes.values_list("name", flat=True))
            for s in project.label_sets.all()}
    assert sets == {"Chest X-ray": {"normal", "pneumonia"},
                    "Brain MRI": {"glioma_tumor", "meningioma_tumor", "no_tumor",
                                  "pituitary_tumor"}}
    assert not Scan.objects.filter(project=project, label_set=None).exists()
    assert not Scan.objects.filter(dataset__body_part="CHEST",
                                   label_set__name="Brain MRI").exists()
    project.refresh_from_db()
    encoder = project.active_encoder
    assert encoder is not None and encoder.metrics["embeddings"]["total"] == 390
    capsys.readouterr()
    # second run: nothing duplicated, no second pretraining; the URL make demo serves at
    call_command("demo_setup", "--url", "http://127.0.0.1:8011/")
    assert "Demo ready at http://127.0.0.1:8011/" in capsys.readouterr().out
    assert Scan.objects.count() == 390 + 64 and Annotation.objects.count() == 80 + 16
    assert QueryRound.objects.count() == 2        # the first worklists are kept
    project.refresh_from_db()
    assert project.active_encoder == encoder


def _colour_project_is_complete():
    """The blood-smear project: colour everywhere, an RGB encoder that was trained on it."""
    colour = Project.objects.get(name=COLOUR_PROJECT)
    assert colour.colour_mode == "colour" and colour.channels == 3
    assert colour.scans.count() == 64 and colour.scans.filter(colour=True).count() == 64
    assert Annotation.objects.filter(scan__project=colour).count() == 16
    assert set(LabelClass.objects.filter(project=colour).values_list("name", flat=True)) == {
        "basophil", "eosinophil", "lymphocyte", "neutrophil"}
    with Image.open(colour.scans.first().preview.path) as preview:
        assert preview.mode == "RGB"
    encoder = colour.active_encoder
    assert encoder.config["pretrain"]["channels"] == 3
    assert encoder.config["start_from"] in ("starter", "scratch")
    assert encoder.metrics["embeddings"]["total"] == 64
    assert colour.datasets.get().colour_mode == "colour"
