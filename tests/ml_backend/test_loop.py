"""The active-learning loop on real fixture scans: label → refit (head on embeddings) →
gated model version → predictions → next query round with reasons → report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from django.core.management import CommandError, call_command

from annotator import services as annotator_services
from annotator.models import LabelClass, Scan
from ml_backend import services
from ml_backend.models import Evaluation, ModelVersion, Prediction, QueryRound, TrainingRun
from tests.base import FIXTURES
from tests.conftest import run_import


@pytest.fixture
def embedded_project(project):
    for name in ("no_tumor", "pituitary_tumor"):
        run_import(project, FIXTURES / "brain_mri" / "pool" / name, layout="flat", dataset_name="brain")
        run_import(project, FIXTURES / "brain_mri" / "eval" / name, layout="flat", split="eval",
                   default_label=name, dataset_name="brain")
    call_command("pretrain", "--project", project.name, "--epochs", "2", "--image-size", "32",
                 "--batch-size", "32", "--small-input", "no", "--no-progress")
    project.refresh_from_db()
    project.refit_every = 5
    project.save()
    return project


def truth(scan: Scan) -> str:
    return "no_tumor" if "image" in (scan.source_name or "") else "pituitary_tumor"


def test_labels_trigger_refit_promotion_predictions_and_next_round(
        embedded_project, users, django_capture_on_commit_callbacks, capsys):
    project = embedded_project
    first = services.query_round_create(project=project, n=6)
    assert first.strategy == "hybrid" and first.size == 6 and first.model_version is None
    assert all(item.reason["why"] == "typical of its cluster" for item in first.items.all())
    assert not first.items.filter(scan__split="eval").exists()

    classes = {c.name: c for c in LabelClass.objects.filter(project=project)}
    items = list(first.items.select_related("scan").order_by("rank"))
    with django_capture_on_commit_callbacks(execute=True):
        for item in items[:4]:
            annotator_services.annotation_create(
                scan=item.scan, reader=users["alice"], label_class=classes[truth(item.scan)],
                query_round=first, shown_acquisition_score=item.score, duration_ms=2100)
    assert not TrainingRun.objects.filter(kind="refit").exists()       # 4 < refit_every

    # make sure both classes are present, then the fifth label triggers the refit
    other = Scan.objects.filter(project=project, split="pool").exclude(
        pk__in=[i.scan_id for i in items[:4]])
    needed = {"no_tumor", "pituitary_tumor"} - {truth(i.scan) for i in items[:4]}
    scan = next(s for s in other if truth(s) in (needed or {"no_tumor", "pituitary_tumor"}))
    with django_capture_on_commit_callbacks(execute=True):
        annotator_services.annotation_create(scan=scan, reader=users["bob"],
                                             label_class=classes[truth(scan)])
    refit = TrainingRun.objects.get(kind="refit")
    assert refit.status == "succeeded", refit.last_error
    project.refresh_from_db()
    model = project.active_model
    assert model.config["kind"] == "head" and model.num_labels == 5
    # the head's balance share is recorded; 5 labels are too few for out-of-fold offsets
    (fit,) = model.config["label_sets"]
    assert fit["balance"] == 0.5 and fit["bias"] is None and fit["calibrated_on"] == 0
    assert model.status == ModelVersion.Status.ACTIVE
    evaluation = Evaluation.objects.get(model_version=model)
    assert evaluation.num_eval == 20 and set(evaluation.report["per_class"]) == set(classes)
    assert 0 <= evaluation.report["ece_before_scaling"] <= 1 and evaluation.report["temperature"]
    assert Prediction.objects.filter(model_version=model).count() == Scan.objects.filter(
        project=project, split="pool").count()

    second = QueryRound.objects.exclude(pk=first.pk).get()
    assert second.model_version == model and second.size == project.query_batch_size
    reason = second.items.first().reason
    # 5 labels of 2 classes are below the product's 10 per class: typical picks of the
    # clusters no labeled scan covers, not the head's uncertainty yet
    # (settings.QUERY_TYPICAL_BELOW; uncertain reasons past it: test_label_sets.py)
    assert reason["why"] == "typical of its cluster" and reason["labeled_in_cluster"] is False
    assert {"cluster", "cluster_size", "typicality"} <= set(reason)
    assert reason["neighbours"] and {"scan", "label", "similarity"} <= set(reason["neighbours"][0])
    labeled = set(project.scans.filter(annotations__outcome="label", split="pool")
                  .values_list("pk", flat=True))
    assert not second.items.filter(scan__pk__in=labeled).exists()

    call_command("report", "--project", project.name)
    out = capsys.readouterr().out
    assert "| class | precision | recall | F1 | support | AUC | AP |" in out
    assert "Learning curve" in out and model.version in out
    assert "before temperature scaling" in out
    call_command("report", "--project", project.name, "--format", "json")
    data = json.loads(capsys.readouterr().out)
    assert data["model_version"] == model.version and data["learning_curve"][0]["labels"] == 5

    call_command("query", "--project", project.name, "--n", "3", "--strategy", "entropy")
    assert "highest entropy" in capsys.readouterr().out


def test_annotation_checks_and_query_needs_a_model_for_uncertainty(embedded_project, users,
                                                                   other_project):
    project = embedded_project
    scan = project.scans.filter(split="pool").first()
    foreign = LabelClass.objects.create(project=other_project, name="x")
    with pytest.raises(annotator_services.AnnotationError, match="another project"):
        annotator_services.annotation_create(scan=scan, reader=users["alice"], label_class=foreign)
    with pytest.raises(annotator_services.AnnotationError, match="needs a class"):
        annotator_services.annotation_create(scan=scan, reader=users["alice"])
    skip = annotator_services.annotation_create(scan=scan, reader=users["alice"], outcome="skip")
    assert skip.label_class is None
    with pytest.raises(CommandError, match="needs proba"):
        call_command("query", "--project", project.name, "--strategy", "margin")
    # a round of no scans is refused, not read as "the project's batch size"
    rounds = QueryRound.objects.filter(project=project).count()
    with pytest.raises(ValueError, match="at least one scan"):
        services.query_round_create(project=project, n=0, strategy="random")
    assert QueryRound.objects.filter(project=project).count() == rounds


def test_new_class_candidates_and_label_quality_round(embedded_project, users, capsys):
    project = embedded_project
    pool = list(Scan.objects.filter(project=project, split="pool").order_by("pk"))
    finding = LabelClass.objects.create(project=project, name="new_finding")
    normal = LabelClass.objects.get(project=project, name="no_tumor")
    pituitary = LabelClass.objects.get(project=project, name="pituitary_tumor")
    for scan in pool[:2]:
        annotator_services.annotation_create(scan=scan, reader=users["alice"], label_class=finding)
    for scan in pool[2:14]:
        annotator_services.annotation_create(
            scan=scan, reader=users["alice"],
            label_class=normal if truth(scan) == "no_tumor" else pituitary)
    found = services.class_candidates(label_class=finding, k=5)
    labeled = {s.pk for s in pool[:14]}
    assert len(found["neighbours"]) == 5 and len(found["novel"]) == 5
    for group in found.values():
        assert not {c["scan"] for c in group} & labeled
        assert Scan.objects.filter(pk__in=[c["scan"] for c in group], split="pool").count() == 5
    assert {c["like"] for c in found["neighbours"]} <= {s.pk for s in pool[:2]}
    novelty = [c["nearest_labeled_similarity"] for c in found["novel"]]
    assert novelty == sorted(novelty)
    call_command("candidates", "--project", project.name, "--class", "new_finding", "-k", "3")
    assert "Like the new_finding examples" in capsys.readouterr().out

    call_command("label_quality", "--project", project.name)
    out = capsys.readouterr().out
    review = QueryRound.objects.get(strategy="label_review")
    assert f"Review round {review.pk}" in out
    assert set(review.items.values_list("scan_id", flat=True)) <= labeled


def test_refit_heads_read_each_scans_thumbnail_beside_its_embedding(embedded_project, users,
                                                                    settings, capsys):
    """The refit's heads read the embedding and a 16 px thumbnail stored beside it; stored
    predictions, the version's predictor and classifying an upload agree; an encoder
    embedded before thumbnails gets them once; weight 0 is the embedding alone."""
    from ml_backend.active.features import PIXEL_SIDE
    from ml_backend.services.artifacts import embeddings_paths

    project = embedded_project
    classes = {c.name: c for c in LabelClass.objects.filter(project=project)}
    pool = list(Scan.objects.filter(project=project, split="pool").order_by("pk"))
    picked = [s for s in pool if truth(s) == "no_tumor"][:5] + \
        [s for s in pool if truth(s) == "pituitary_tumor"][:5]
    for scan in picked:                     # no commit callbacks: no refit is queued
        annotator_services.annotation_create(scan=scan, reader=users["alice"],
                                             label_class=classes[truth(scan)])
    call_command("refit", "--project", project.name, "--no-query")
    project.refresh_from_db()
    model, encoder = project.active_model, project.active_encoder
    assert model.config["pixels"] == {"side": PIXEL_SIDE, "weight": 1.0}
    (fit,) = model.config["label_sets"]          # kept where it beats the embedding alone
    assert isinstance(fit["pixels"], bool) and set(fit["out_of_fold_nll"]) == {"alone", "pixels"}
    assert "16 px thumbnails (weight 1)" in capsys.readouterr().out
    dim = services.embedding_table(encoder).vectors.shape[1]
    head = services.version_heads(model).heads[pool[0].label_set_id]
    assert head.coef.shape == (2, dim + PIXEL_SIDE * PIXEL_SIDE)
    paths = embeddings_paths(encoder)
    thumbs, ids = np.load(paths["thumbs"]), np.load(paths["ids"])
    assert thumbs.shape == (len(ids), 256) and thumbs.dtype == np.float32
    assert 0 <= thumbs.min() and thumbs.max() <= 1 and thumbs.std() > 0.01
    stored = {p.scan_id: p.probabilities for p in Prediction.objects.filter(model_version=model)}
    again = services.predictor_for(model)(pool)
    column = {c: i for i, c in enumerate(c["id"] for c in model.config["classes"])}
    for scan, row in zip(pool, again):
        for class_id, p in stored[scan.pk].items():
            assert row[column[int(class_id)]] == pytest.approx(p, abs=1e-5)
    result = services.classify_image(project=project, preview_png=pool[0].preview.read())
    by_name = {p["name"]: p["p"] for p in result["probabilities"]}
    p_stored = stored[pool[0].pk]
    for name, label_class in classes.items():
        assert by_name[name] == pytest.approx(p_stored[str(label_class.pk)], abs=1e-3)

    paths["thumbs"].unlink()               # an encoder embedded before thumbnails existed
    call_command("refit", "--project", project.name, "--no-query")
    assert "thumbnails for the" in capsys.readouterr().out
    np.testing.assert_allclose(np.load(paths["thumbs"]), thumbs, atol=1e-6)

    settings.REFIT_PIXELS = "always"         # no out-of-fold choice: every head reads it
    call_command("refit", "--project", project.name, "--no-query")
    latest = ModelVersion.objects.filter(project=project, kind="classifier").latest("pk")
    assert latest.config["label_sets"][0]["pixels"] is True
    assert "with the thumbnail" in capsys.readouterr().out

    settings.REFIT_PIXEL_WEIGHT = 0.0
    call_command("refit", "--project", project.name, "--no-query")
    latest = ModelVersion.objects.filter(project=project, kind="classifier").latest("pk")
    assert latest.config["pixels"] is None
    assert services.version_heads(latest).heads[pool[0].label_set_id].coef.shape == (2, dim)
