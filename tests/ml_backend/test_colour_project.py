"""A colour project end to end on real blood-smear JPEGs (fixtures/blood_smear): the first
import decides colour and says why, previews stay colour, the encoder takes RGB (the
greyscale starter spread over three channels, then pretrained on the smears), embeds, refits
and explains in colour; grey scans entering it and colour scans entering a grey project are
reported; the mode is locked once a model exists."""

from __future__ import annotations

import io

import numpy as np
import pytest
from django.core.management import call_command
from PIL import Image

from annotator import services
from annotator.models import Annotation, ImportJob, LabelClass, Scan
from ml_backend.models import ModelVersion
from tests.base import FIXTURES
from tests.conftest import run_import

BLOOD = FIXTURES / "blood_smear"


def _truth(scan: Scan) -> str:
    return scan.import_job.source.rstrip("/").rsplit("/", 1)[-1]


@pytest.fixture
def colour_project(project):
    run_import(project, BLOOD / "eval", split="eval", layout="class-folders")
    for cls in ("basophil", "eosinophil", "lymphocyte", "neutrophil"):
        run_import(project, BLOOD / "pool" / cls, layout="flat", dataset_name="PBC smears")
    project.refresh_from_db()
    return project


def test_first_import_decides_colour_and_previews_keep_it(colour_project):
    project = colour_project
    assert project.colour_mode == "colour" and project.channels == 3
    first = ImportJob.objects.filter(project=project).order_by("pk").first()
    report = " ".join(first.warnings)
    assert "Colour: 16 colour scan(s), 0 greyscale" in report
    assert "distinct colour channels" in report and "first scan" in report
    assert Scan.objects.filter(project=project, colour=True).count() == 64
    with Image.open(project.scans.first().preview.path) as preview:
        assert preview.mode == "RGB"
    assert {d.colour_mode for d in project.datasets.all()} == {"colour"}


def test_colour_project_pretrains_embeds_refits_and_explains_in_colour(colour_project, users,
                                                                        client):
    project = colour_project
    call_command("pretrain", "--project", project.name, "--epochs", "1", "--image-size", "32",
                 "--batch-size", "32", "--small-input", "no", "--no-progress")
    project.refresh_from_db()
    encoder = project.active_encoder
    assert encoder.config["pretrain"]["channels"] == 3
    assert encoder.config["pretrain"]["colour_augment"] == "stain"
    from ml_backend.services.inference import encoder_network

    network, config = encoder_network(encoder)
    # the encoder embeds each scan at 32 and 64 px (embed_scales 1,2), one network
    assert network.encoder.inner.net.conv1.weight.shape[1] == 3 and config.channels == 3
    assert network.encoder.scales == (1, 2) and config.image_size == 64
    assert encoder.metrics["embeddings"]["total"] == 64
    classes = {c.name: c for c in LabelClass.objects.filter(project=project)}
    for scan in project.scans.filter(split="pool").order_by("pk"):
        if scan.annotations.count() < 1 and Annotation.objects.filter(
                scan__project=project, scan__split="pool").count() < 24:
            Annotation.objects.create(scan=scan, reader=users["bob"],
                                      label_class=classes[_truth(scan)])
    call_command("refit", project=project.name)
    project.refresh_from_db()
    model = project.active_model
    assert model is not None and model.parent == encoder
    # Grad-CAM over the colour preview
    scan = project.scans.filter(split="eval").first()
    client.force_login(users["alice"])
    response = client.get(f"/scans/{scan.pk}/gradcam.png?class={classes['eosinophil'].pk}")
    assert response.status_code == 200
    with Image.open(io.BytesIO(response.content)) as overlay, \
            Image.open(scan.preview.path) as preview:
        assert overlay.mode == "RGBA" and overlay.size == preview.size
    # the mode is locked now: the networks take three channels
    with pytest.raises(services.ImportRequestError, match="already has a model"):
        services.project_colour_mode_set(project, "grey")


def test_grey_scans_in_a_colour_project_and_colour_in_a_grey_one_are_reported(project,
                                                                              other_project):
    run_import(project, BLOOD / "eval", split="eval", layout="class-folders")
    job = run_import(project, FIXTURES / "chest_xray" / "eval", split="eval",
                     layout="class-folders", dataset_name="films")
    assert any("greyscale scan(s) in a colour project" in w for w in job.warnings)
    grey = Scan.objects.filter(project=project, colour=False).first()
    from ml_backend.services.artifacts import images_for

    rgb = images_for([grey], 32, 3)[0]
    assert rgb.shape == (32, 32, 3) and np.array_equal(rgb[..., 0], rgb[..., 1])

    run_import(other_project, FIXTURES / "chest_xray" / "eval", split="eval",
               layout="class-folders")
    other_project.refresh_from_db()
    assert other_project.colour_mode == "grey"
    job = run_import(other_project, BLOOD / "eval", split="eval", layout="class-folders",
                     dataset_name="smears")
    assert any("16 colour scan(s) entered a greyscale project" in w for w in job.warnings)
    smear = Scan.objects.filter(project=other_project, colour=True).first()
    with Image.open(smear.preview.path) as preview:
        assert preview.mode == "RGB"                  # shown in colour ...
    assert images_for([smear], 32, other_project.channels)[0].shape == (32, 32)   # ... seen grey
    # an admin may switch it to colour while it has no model
    services.project_colour_mode_set(other_project, "colour")
    assert other_project.channels == 3


def test_admin_shows_the_mode_and_locks_it_once_a_model_exists(colour_project, users, client):
    project = colour_project
    client.force_login(users["dora"])
    page = client.get(f"/admin/annotator/project/{project.pk}/change/").content.decode()
    assert 'name="colour_mode"' in page
    ModelVersion.objects.create(project=project, kind="encoder", version="enc-x",
                                status="ready", config={})
    page = client.get(f"/admin/annotator/project/{project.pk}/change/").content.decode()
    assert 'name="colour_mode"' not in page and "Colour (models see RGB)" in page


def test_he_tiles_import_as_a_colour_project(project, tmp_path):
    """LC25000 lung H&E tiles (real 224 px JPEGs), three classes: a colour project."""
    import shutil

    from tests.base import SHARED_DATA

    root = SHARED_DATA / "lc25000_lung" / "train"
    for cls in ("lung_aca", "lung_n", "lung_scc"):
        (tmp_path / "he" / cls).mkdir(parents=True)
        for path in sorted((root / cls).iterdir())[:3]:
            shutil.copy(path, tmp_path / "he" / cls / path.name)
    job = run_import(project, tmp_path / "he", layout="class-folders", dataset_name="LC25000")
    project.refresh_from_db()
    assert job.imported == 9 and job.labels_added == 9
    assert project.colour_mode == "colour"
    assert project.scans.filter(colour=True).count() == 9
    assert "Colour: 9 colour scan(s), 0 greyscale" in " ".join(job.warnings)
