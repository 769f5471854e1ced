"""Label sets per anatomy, a fair promotion gate and out-of-distribution warnings, on a
project that holds chest X-rays and brain MRIs (the demo's shape)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from django.conf import settings
from django.core.management import call_command
from django.urls import reverse

from annotator import label_page, labeling, services
from annotator.models import Annotation, LabelClass, LabelSet, Project, Scan
from tests.base import FIXTURES, PASSWORD
from tests.conftest import run_import

CHEST, BRAIN = "Chest X-ray", "Brain MRI"


def _two_sets(project, *, brain_classes=("no_tumor", "pituitary_tumor"), pools=True,
              pool_limit: int | None = None):
    """Chest (normal, pneumonia) and brain scans in one project, eval labeled; the pool is
    imported one class folder at a time so each pool scan's truth is known by its job
    (``pool_limit``: only the first files of each pool folder, for tests that need a few)."""
    import shutil
    import tempfile

    truth: dict[int, str] = {}
    for folder, label_set, dataset, classes in (
            ("chest_xray", CHEST, "chest", ("normal", "pneumonia")),
            ("brain_mri", BRAIN, "brain", brain_classes)):
        for name in classes:
            run_import(project, FIXTURES / folder / "eval" / name, layout="flat", split="eval",
                       default_label=name, dataset_name=dataset, label_set=label_set)
            if not pools:
                continue
            with tempfile.TemporaryDirectory() as subset:
                source = FIXTURES / folder / "pool" / name
                if pool_limit is not None:
                    for path in sorted(source.iterdir())[:pool_limit]:
                        shutil.copy(path, subset)
                    source = subset
                job = run_import(project, source, layout="flat", dataset_name=dataset,
                                 label_set=label_set)
            truth.update({pk: name for pk in job.scans.values_list("pk", flat=True)})
    return truth


def test_each_scan_gets_its_anatomy_label_set_and_only_its_classes(project, users):
    _two_sets(project, pools=False)
    sets = {s.name: s for s in project.label_sets.all()}
    assert set(sets) == {CHEST, BRAIN}       # the empty 'default' set became the first one
    chest_classes = set(sets[CHEST].classes.values_list("name", flat=True))
    assert chest_classes == {"normal", "pneumonia"}
    assert set(sets[BRAIN].classes.values_list("name", flat=True)) == {"no_tumor",
                                                                      "pituitary_tumor"}
    assert not Scan.objects.filter(project=project, label_set=None).exists()
    chest_scan = Scan.objects.filter(project=project, dataset__name="chest").first()
    assert chest_scan.label_set == sets[CHEST]

    # the label page offers the chest classes only, with hotkeys counted per set
    payload = label_page.label_payload(project=project, scan=chest_scan)
    assert {c["name"] for c in payload["classes"]} == chest_classes
    assert {c["key"] for c in payload["classes"]} == {"1", "2"}
    brain_scan = Scan.objects.filter(project=project, dataset__name="brain").first()
    assert {c["key"] for c in label_page.label_payload(project=project, scan=brain_scan)
            ["classes"]} == {"1", "2"}

    # a brain class cannot be given to a chest film, through any path (a pool film: an
    # eval film is refused to a reader before its classes are looked at)
    Scan.objects.filter(pk=chest_scan.pk).update(split="pool")
    chest_scan.refresh_from_db()
    glioma, _ = services.label_class_get_or_create(project=project, name="glioma_tumor",
                                                   label_set=sets[BRAIN])
    with pytest.raises(services.AnnotationError, match="does not apply"):
        services.annotation_create(scan=chest_scan, reader=users["alice"], label_class=glioma)
    with pytest.raises(services.AnnotationError, match="does not apply"):
        labeling.answer_submit(project=project, scan=chest_scan, user=users["alice"],
                               data={"outcome": "label", "class_id": glioma.pk})
    # a class name belongs to one set
    with pytest.raises(ValueError, match="belongs to the label set"):
        services.label_class_get_or_create(project=project, name="Glioma_Tumor",
                                           label_set=sets[CHEST])

    # moving a dataset to another set re-assigns its scans
    sets[BRAIN].datasets.remove(chest_scan.dataset)
    sets[CHEST].datasets.clear()
    sets[CHEST].body_parts = ""
    sets[CHEST].save()
    LabelSet.objects.filter(pk=sets[BRAIN].pk).update(modalities="", body_parts="")
    sets[BRAIN].datasets.add(chest_scan.dataset)
    assert services.label_sets_assign(project) > 0
    chest_scan.refresh_from_db()
    assert chest_scan.label_set_id == sets[BRAIN].pk


def test_class_form_chooses_a_set_and_checks_hotkeys_within_it(client, project, users):
    _two_sets(project, pools=False)
    brain = project.label_sets.get(name=BRAIN)
    client.login(username="dora", password=PASSWORD)
    url = reverse("annotator:class_create", args=[project.pk])
    page = client.get(url)
    assert BRAIN in page.content.decode() and CHEST in page.content.decode()
    taken = client.post(url, {"name": "meningioma_tumor", "label_set": brain.pk, "hotkey": "1"})
    assert taken.status_code == 400 and "already labels another class" in taken.content.decode()
    created = client.post(url, {"name": "meningioma_tumor", "label_set": brain.pk,
                                "hotkey": "3"})
    assert created.status_code == 302
    assert LabelClass.objects.get(name="meningioma_tumor").label_set == brain


_ENCODER: dict[str, Path] = {}


def _encoder(project) -> None:
    """A small SimCLRv2 encoder for the project: pretrained once per test session (1 epoch,
    32 px), then registered and embedded again for each test's fresh project."""
    from ml_backend import services as ml
    from ml_backend.models import ModelVersion

    if "checkpoint" not in _ENCODER:
        call_command("pretrain", "--project", project.name, "--epochs", "1", "--image-size",
                     "32", "--batch-size", "32", "--small-input", "no", "--no-progress")
        project.refresh_from_db()
        keep = Path(tempfile.mkdtemp(prefix="test-encoder-")) / "encoder.pt"
        shutil.copy(Path(project.active_encoder.artifact_dir) / "encoder.pt", keep)
        _ENCODER["checkpoint"] = keep
        return
    folder = Path(settings.ARTIFACTS_ROOT) / "models" / f"p{project.pk}-enc-cached"
    folder.mkdir(parents=True)
    shutil.copy(_ENCODER["checkpoint"], folder / "encoder.pt")
    encoder = ModelVersion.objects.create(project=project, kind="encoder", status="ready",
                                          version=folder.name, artifact_dir=str(folder))
    ml.model_version_activate(encoder, reason="test encoder")
    run = ml.training_run_create(project=project, kind="embed", params={"full": True})
    assert ml.training_run_execute(run.pk).status == "succeeded"
    project.refresh_from_db()


@pytest.fixture
def mixed_project(project, users):
    """Two label sets with a small encoder and a first refit from 6 labels per class."""
    from ml_backend import services as ml

    truth = _two_sets(project)
    _encoder(project)
    project.refit_every = 1000        # refits are started by the test
    project.save()
    classes = {c.name: c for c in LabelClass.objects.filter(project=project)}
    for name in ("normal", "pneumonia", "no_tumor", "pituitary_tumor"):
        for pk in [pk for pk, t in sorted(truth.items()) if t == name][:6]:
            services.annotation_create(scan=Scan.objects.get(pk=pk), reader=users["alice"],
                                       label_class=classes[name])
    run = ml.training_run_create(project=project, kind="refit")
    ml.training_run_execute(run.pk)
    project.refresh_from_db()
    assert project.active_model is not None, run.refresh_from_db() or run.last_error
    project.truth = truth
    return project


def test_heads_per_set_never_suggest_a_class_of_another_set(mixed_project, users):
    from ml_backend.models import Prediction

    project = mixed_project
    model = project.active_model
    assert {s["name"] for s in model.config["label_sets"]} == {CHEST, BRAIN}
    class_set = dict(LabelClass.objects.filter(project=project)
                     .values_list("pk", "label_set_id"))
    predictions = list(Prediction.objects.filter(model_version=model).select_related("scan"))
    assert len(predictions) == Scan.objects.filter(project=project, split="pool").count()
    wrong = [p for p in predictions if class_set[p.predicted_class_id] != p.scan.label_set_id
             or any(class_set[int(c)] != p.scan.label_set_id for c in p.probabilities)]
    assert wrong == []
    for p in predictions[:20]:
        assert abs(sum(p.probabilities.values()) - 1.0) < 1e-3
    # the label page's suggestion comes from the scan's own set
    chest = Scan.objects.filter(project=project, split="pool", dataset__name="chest").first()
    payload = label_page.label_payload(project=project, scan=chest, user=users["alice"])
    assert payload["suggestion"]["class_name"] in {"normal", "pneumonia"}
    assert {t["name"] for t in payload["suggestion"]["top"]} <= {"normal", "pneumonia"}
    assert payload["novelty"] is not None and 0 <= payload["novelty"]["percentile"] <= 100
    # reports: one per label set, every eval scan counted
    evaluation = model.evaluations.latest("created_at")
    assert set(evaluation.report["per_set"]) == {CHEST, BRAIN}
    assert evaluation.num_eval == Scan.objects.filter(project=project, split="eval").count()
    # the worklist gives each label set a share of the round by its number of classes
    from ml_backend import services as ml

    LabelClass.objects.create(project=project, name="glioma_tumor",
                              label_set=project.label_sets.get(name=BRAIN))
    round_ = ml.query_round_create(project=project, n=10)    # 2 chest : 3 brain classes
    per_set = {}
    for item in round_.items.select_related("scan__label_set"):
        per_set[item.scan.label_set.name] = per_set.get(item.scan.label_set.name, 0) + 1
    assert per_set == {CHEST: 4, BRAIN: 6}, per_set
    ranks = [i.scan.label_set.name for i in round_.items.order_by("rank")][:4]
    assert set(ranks) == {CHEST, BRAIN}            # interleaved, not one set then the other
    from django.test import Client

    client = Client()
    client.force_login(users["alice"])
    page = client.get(reverse("annotator:reports", args=[project.pk])).content.decode()
    assert 'id="per-set"' in page and CHEST in page and BRAIN in page
    assert "promoted: the first classifier" in page


def test_classify_lists_the_set_and_flags_a_scan_from_another_anatomy(mixed_project):
    from ml_backend import services as ml

    project = mixed_project
    brain = project.label_sets.get(name=BRAIN)
    chest = project.label_sets.get(name=CHEST)
    chest_png = next((FIXTURES / "chest_xray" / "eval" / "pneumonia").iterdir()).read_bytes()
    from ml_backend.data.decode import decode_scan, render_preview

    preview = render_preview(decode_scan(chest_png, name="x.png", salt="s",
                                         max_pixels=10**7).pixels)
    as_brain = ml.classify_image(project=project, preview_png=preview, label_set=brain)
    assert {p["name"] for p in as_brain["probabilities"]} == set(
        brain.classes.values_list("name", flat=True))
    assert as_brain["novelty"]["ood"], as_brain["novelty"]
    as_chest = ml.classify_image(project=project, preview_png=preview, label_set=chest)
    assert not as_chest["novelty"]["ood"], as_chest["novelty"]
    assert as_chest["predicted"]["name"] in {"normal", "pneumonia"}


def test_an_import_unlike_its_label_set_is_flagged_in_its_report(mixed_project, tmp_path):
    """Chest films imported as if they were brain MRIs (a mislabeled site): the import
    embeds them and its report says they are unlike the set's scans."""
    from PIL import Image

    folder = tmp_path / "site2"
    folder.mkdir()
    for path in sorted((FIXTURES / "chest_xray" / "pool" / "pneumonia").iterdir())[:12]:
        with Image.open(path) as image:        # new content (mirrored), still a chest film
            image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / path.name)
    job = run_import(mixed_project, folder, layout="flat", dataset_name="brain site 2",
                     label_set=BRAIN)
    assert job.imported == 12
    flagged = [w for w in job.warnings if "unlike the project's scans of their label set" in w]
    assert flagged and flagged[0].startswith("Unusual import"), job.warnings


def test_a_new_class_is_newly_learned_not_a_regression(mixed_project, users):
    from ml_backend import services as ml

    project = mixed_project
    brain = project.label_sets.get(name=BRAIN)
    glioma, _ = services.label_class_get_or_create(project=project, name="glioma_tumor",
                                                   label_set=brain)
    job = run_import(project, FIXTURES / "brain_mri" / "pool" / "glioma_tumor", layout="flat",
                     dataset_name="brain")
    run_import(project, FIXTURES / "brain_mri" / "eval" / "glioma_tumor", layout="flat",
               split="eval", default_label="glioma_tumor", dataset_name="brain")
    for scan in job.scans.order_by("pk")[:8]:
        services.annotation_create(scan=scan, reader=users["alice"], label_class=glioma)
    first = project.active_model
    run = ml.training_run_create(project=project, kind="refit")
    ml.training_run_execute(run.pk)
    run.refresh_from_db()
    candidate = run.model_version
    gate = candidate.metrics["gate"]
    assert [c["name"] for c in gate["new_classes"]] == ["glioma_tumor"]
    assert "glioma_tumor" not in gate["regressions"]
    assert gate["num_shared_scans"] > 0 and gate["active_version"] == first.version
    assert candidate.status_reason.startswith("promoted"), candidate.status_reason
    assert "newly learned: glioma_tumor" in candidate.status_reason
    # the same eval scans for both versions: every labeled eval scan is counted each time
    assert candidate.evaluations.get().num_eval == first.evaluations.get().num_eval + 10


def test_a_real_regression_is_held_back_in_words_and_an_admin_can_promote_it(
        mixed_project, users, client):
    from ml_backend import services as ml
    from ml_backend.models import ModelVersion

    project = mixed_project
    active = project.active_model
    # a candidate that always answers the first class of each set: a large, real drop
    run = ml.training_run_create(project=project, kind="refit", params={"query": False})
    ml.training_run_execute(run.pk)
    run.refresh_from_db()
    candidate = run.model_version
    classes = [c["id"] for c in candidate.config["classes"]]
    allowed = ml.allowed_classes

    def constant(scans, calibrated=True):
        out = np.zeros((len(scans), len(classes)), np.float32)
        for row, ok in enumerate(allowed(scans, classes)):
            out[row, classes.index(min(ok))] = 1.0
        return out

    evaluation = ml.evaluate(candidate, predict=constant, classes=classes)
    promoted, reason, comparison = ml.gate(candidate, evaluation, predict=constant)
    assert not promoted and reason.startswith("held back:"), reason
    assert comparison["regression"] and comparison["regressions"]
    assert "F1 fell from" in reason and "scans" in reason
    # as the gate leaves it: the refit itself gated against the real predictions (and may
    # have promoted its version); held back, the project keeps the active version
    ModelVersion.objects.filter(pk=candidate.pk).update(status="ready", status_reason=reason)
    ModelVersion.objects.filter(pk=active.pk).update(status="active")
    type(project).objects.filter(pk=project.pk).update(active_model=active)

    # the project page says so and offers the admin "promote anyway"; a clinician cannot
    url = reverse("annotator:model_promote", args=[project.pk, candidate.pk])
    client.login(username="alice", password=PASSWORD)
    page = client.get(reverse("annotator:project_detail", args=[project.pk])).content.decode()
    assert "held back" in page and "promote-anyway" not in page
    assert client.post(url).status_code == 404
    client.login(username="dora", password=PASSWORD)
    page = client.get(reverse("annotator:project_detail", args=[project.pk])).content.decode()
    assert "promote-anyway" in page
    assert client.post(url).status_code == 302
    project.refresh_from_db()
    assert project.active_model_id == candidate.pk
    assert ModelVersion.objects.get(pk=active.pk).status == "retired"
    assert "promoted anyway by dora" in ModelVersion.objects.get(pk=candidate.pk).status_reason
    assert candidate.predictions.count() > 0          # predictions followed the promotion


def test_noise_on_a_small_class_is_not_a_regression(mixed_project):
    """A candidate that differs from the active model on one eval scan is promoted: the gate
    asks whether the drop is beyond noise, not whether F1 moved by 0.02."""
    from ml_backend import services as ml

    project = mixed_project
    active = project.active_model
    classes = [c["id"] for c in active.config["classes"]]
    base = ml.predictor_for(active)
    eval_scans = {s.pk for s in Scan.objects.filter(project=project, split="eval")}
    flipped = sorted(eval_scans)[0]

    def one_off(scans, calibrated=True):
        proba = base(scans).copy()
        for row, scan in enumerate(scans):
            if scan.pk == flipped:
                nonzero = np.flatnonzero(proba[row] > 0)
                best = int(proba[row].argmax())
                other = next(int(c) for c in nonzero if c != best)
                proba[row, [best, other]] = proba[row, [other, best]]
        return proba

    run = ml.training_run_create(project=project, kind="refit", params={"query": False})
    ml.training_run_execute(run.pk)
    run.refresh_from_db()
    candidate = run.model_version
    evaluation = ml.evaluate(candidate, predict=one_off, classes=classes)
    promoted, reason, _ = ml.gate(candidate, evaluation, predict=one_off)
    assert promoted, reason


def test_a_queued_refit_blocks_a_second_one(mixed_project, users):
    """One refit at a time: with a refit queued, a due trigger queues nothing more."""
    from ml_backend import services as ml
    from ml_backend.models import TrainingRun

    project = mixed_project
    project.refit_every = 1
    project.save()
    scan = Scan.objects.filter(project=project, split="pool", label_set__name=CHEST).exclude(
        annotations__outcome=Annotation.Outcome.LABEL).first()
    services.annotation_create(scan=scan, reader=users["bob"],
                               label_class=LabelClass.objects.get(name="normal"))
    before = TrainingRun.objects.filter(project=project, kind="refit").count()
    TrainingRun.objects.create(project=project, kind="refit", status="queued")
    assert ml.refit_start_if_due(project=project) is None
    assert TrainingRun.objects.filter(project=project, kind="refit").count() == before + 1


def test_no_refit_is_queued_while_every_set_has_labels_of_one_class(encoded_project, users):
    """A clinician's first answers all of one class: a refit could fit nothing, so none is
    queued (it would only show a failed job); the first label of a second class brings it."""
    from ml_backend import services as ml
    from ml_backend.models import TrainingRun
    from tests.conftest import brain_truth

    project = encoded_project
    project.refit_every = 2
    project.save()
    classes = {c.name: c for c in LabelClass.objects.filter(project=project)}
    pool = list(Scan.objects.filter(project=project, split="pool").order_by("pk"))
    by_class = {n: [s for s in pool if brain_truth(s) == n] for n in classes}
    for scan in by_class["no_tumor"][:3]:
        services.annotation_create(scan=scan, reader=users["alice"],
                                   label_class=classes["no_tumor"])
    assert ml.refit_start_if_due(project=project) is None
    assert not TrainingRun.objects.filter(project=project, kind="refit").exists()
    services.annotation_create(scan=by_class["pituitary_tumor"][0], reader=users["alice"],
                               label_class=classes["pituitary_tumor"])
    ml.refit_start_if_due(project=project)
    assert TrainingRun.objects.filter(project=project, kind="refit").count() == 1
    assert ml.refit_start_if_due(project=project, force=True) is None    # one at a time


def test_labels_that_arrive_during_a_refit_bring_the_next_one_when_it_ends(mixed_project, users,
                                                                          monkeypatch):
    """A Label Studio batch lands while a refit runs (after it read the labels): when it
    ends, the next refit is queued for those labels at once, not at some later answer that
    may never come. Labels it did read bring no second refit."""
    from ml_backend import services as ml
    from ml_backend.models import TrainingRun
    from ml_backend.services import training

    project = mixed_project
    project.refit_every = 3
    project.save()
    fresh = [pk for pk, t in sorted(project.truth.items()) if t in ("normal", "pneumonia")
             and not Annotation.objects.filter(scan_id=pk).exists()]
    classes = {c.name: c for c in LabelClass.objects.filter(project=project)}

    def label(pks):
        for pk in pks:
            Annotation.objects.create(scan_id=pk, reader=users["bob"],
                                      label_class=classes[project.truth[pk]])

    # labels before the run starts are in it: no follow-up
    run = ml.training_run_create(project=project, kind="refit")
    label(fresh[:3])
    ml.training_run_execute(run.pk)
    assert not TrainingRun.objects.filter(project=project, kind="refit", pk__gt=run.pk).exists()

    # labels that land while it runs, after it read the labels: a follow-up is queued
    real_refit = training.HANDLERS["refit"]

    def refit_then_labels_arrive(run, report):
        real_refit(run, report)
        label(fresh[3:6])

    monkeypatch.setitem(training.HANDLERS, "refit", refit_then_labels_arrive)
    second = ml.training_run_create(project=project, kind="refit")
    ml.training_run_execute(second.pk)
    monkeypatch.setitem(training.HANDLERS, "refit", real_refit)
    second.refresh_from_db()
    later = TrainingRun.objects.filter(project=project, kind="refit", pk__gt=second.pk)
    assert later.count() == 1 and later.get().status == "queued"
    follow = ml.training_run_execute(later.get().pk)
    assert follow.status == "succeeded"
    assert follow.model_version.num_labels == second.model_version.num_labels + 3
    assert TrainingRun.objects.filter(project=project, kind="refit").latest("pk") == follow


def test_each_set_counts_its_own_labels_for_typical_picks(mixed_project, users, settings):
    """QUERY_TYPICAL_BELOW: a set with few labels per class gets typical picks (TypiClust),
    one past it the hybrid's uncertain ones; each set counts its own labels, not the other
    anatomy's."""
    from ml_backend import services as ml

    project = mixed_project
    classes = {c.name: c for c in LabelClass.objects.filter(project=project)}
    labeled = set(Annotation.objects.filter(project=project).values_list("scan_id", flat=True))
    more = [pk for pk, t in sorted(project.truth.items())
            if t == "no_tumor" and pk not in labeled][:4]
    for pk in more:                         # brain: 16 labels over 2 classes; chest: 12
        services.annotation_create(scan=Scan.objects.get(pk=pk), reader=users["alice"],
                                   label_class=classes["no_tumor"])
    settings.QUERY_TYPICAL_BELOW = 7        # below 14 labels for a 2-class set: typical
    round_ = ml.query_round_create(project=project, n=10)
    why = {}
    for item in round_.items.select_related("scan__label_set"):
        why.setdefault(item.scan.label_set.name, set()).add(item.reason["why"])
    assert all(w.startswith("typical of its cluster") for w in why[CHEST]), why
    assert why[BRAIN] == {"uncertain, and unlike the other picks"}, why
    settings.QUERY_TYPICAL_BELOW = 0
    round_ = ml.query_round_create(project=project, n=10)
    assert {i.reason["why"] for i in round_.items.all()} == {
        "uncertain, and unlike the other picks"}


def test_typical_picks_read_the_thumbnails_the_cluster_view_clusters(mixed_project, settings):
    """The typical picks cluster what the Clusters view clusters: the embedding and each
    scan's stored thumbnail (CLUSTER_PIXEL_WEIGHT > 0), for the strategies that take them;
    the embedding alone at weight 0 or for an uncertainty strategy. Each set's typical picks
    stay its own scans."""
    from ml_backend import services as ml
    from ml_backend.services import queries
    from ml_backend.services.inference import embedding_table

    project = Project.objects.select_related("active_encoder").get(pk=mixed_project.pk)
    encoder = project.active_encoder
    scans = list(Scan.objects.filter(project=project, split="pool").order_by("pk"))
    table = embedding_table(encoder)
    assert table.thumbs is not None
    thumbs, labeled = queries._typical_thumbs(encoder, "hybrid", scans[:7], scans[7:9])
    assert thumbs.shape == (7, table.thumbs.shape[1]) and labeled.shape[0] == 2
    assert np.array_equal(thumbs, table.thumbs_of([s.pk for s in scans[:7]]))
    assert queries._typical_thumbs(encoder, "hybrid", scans[:7], [])[1] is None
    assert queries._typical_thumbs(encoder, "margin", scans[:7], scans[7:9]) == (None, None)
    settings.CLUSTER_PIXEL_WEIGHT = 0.0
    assert queries._typical_thumbs(encoder, "hybrid", scans[:7], scans[7:9]) == (None, None)

    settings.CLUSTER_PIXEL_WEIGHT = 1.0
    settings.QUERY_TYPICAL_BELOW = 50       # every set still takes typical picks
    round_ = ml.query_round_create(project=project, n=10)
    items = list(round_.items.select_related("scan__label_set"))
    assert len(items) == 10
    assert all(i.reason["why"] == "typical of its cluster" for i in items)
    assert {i.scan.label_set.name for i in items} == {CHEST, BRAIN}


@pytest.mark.parametrize("key, used_for", [
    ("n", "1:1 zoom"), ("c", "compare with similar scans"), ("h", "help"), ("?", "help"),
    ("s", "skip"), ("u", "unsure"), ("i", "invert"), ("g", "Grad-CAM"), ("r", "reset"),
    ("+", "zoom in"), ("=", "zoom in"), ("-", "zoom out"), ("N", "1:1 zoom"),
])
def test_class_hotkeys_leave_the_label_pages_own_keys_free(client, project, users, key,
                                                          used_for):
    """label.js looks a class's key up before its own: a class on n, c or h would save a
    label where the reader meant to zoom, compare or ask for help."""
    client.force_login(users["dora"])
    url = reverse("annotator:class_create", args=[project.pk])
    refused = client.post(url, {"name": "cyst", "hotkey": key})
    assert refused.status_code == 400
    assert used_for in refused.content.decode()
    assert not LabelClass.objects.filter(name="cyst").exists()


def test_class_hotkeys_are_ascii_letters_or_digits_and_0_is_no_finding(client, project, users):
    client.force_login(users["dora"])
    url = reverse("annotator:class_create", args=[project.pk])
    for key in ("\u0663", "\u00e9", "\u2460", "!"):          # Arabic-Indic 3, é, ①, !
        refused = client.post(url, {"name": "cyst", "hotkey": key})
        assert refused.status_code == 400, key
        assert "use one letter a-z or digit 0-9" in refused.content.decode()
    findings = LabelSet.objects.create(project=project, name="Chest findings", kind="multi",
                                       order=5)
    zero = client.post(url, {"name": "effusion", "label_set": findings.pk, "hotkey": "0"})
    assert zero.status_code == 400 and "no finding" in zero.content.decode()
    assert client.post(url, {"name": "effusion", "label_set": findings.pk,
                             "hotkey": "7"}).status_code == 302
    assert client.post(url, {"name": "cyst", "hotkey": "0"}).status_code == 302   # single set
    assert LabelClass.objects.get(name="cyst").hotkey == "0"


def test_admin_checks_class_hotkeys_too_and_old_reserved_keys_are_not_used(client, project,
                                                                            users):
    cyst = LabelClass.objects.create(project=project, name="cyst", hotkey="c")   # saved before
    other = LabelClass.objects.create(project=project, name="edema", hotkey="q")
    keys = label_page.effective_hotkeys([cyst, other])
    assert keys[other.pk] == "q" and keys[cyst.pk] == "1"     # a free digit, not compare
    assert not set("chn") & set(label_page.FINDING_KEYS)
    client.force_login(users["dora"])
    change = reverse("admin:annotator_labelclass_change", args=[cyst.pk])
    form = {"project": project.pk, "label_set": cyst.label_set_id, "name": "cyst",
            "description": "", "color": cyst.color, "order": cyst.order}
    refused = client.post(change, {**form, "hotkey": "h"})
    assert refused.status_code == 200 and "label page&#x27;s key for help" in \
        refused.content.decode()
    refused = client.post(change, {**form, "hotkey": "\u0663"})
    assert refused.status_code == 200 and "use one letter a-z" in refused.content.decode()
    assert client.post(change, {**form, "hotkey": "K"}).status_code == 302
    cyst.refresh_from_db()
    assert cyst.hotkey == "k"


def test_the_thumbnails_join_a_sets_first_batch_only(settings, monkeypatch):
    """QUERY_TYPICAL_PIXELS_FIRST_ONLY: a set with no label yet clusters the embedding and
    the thumbnail for its typical picks; once it has labels, the embedding alone (every
    typical batch on the joined input with the setting off)."""
    from types import SimpleNamespace

    from ml_backend.active.strategies import QueryContext, Selection
    from ml_backend.services import queries

    seen = []

    def spy(strategy, context, n, findings):
        seen.append(context)
        return Selection(indices=np.arange(n), scores=np.zeros(n), reasons=[{}] * n)

    monkeypatch.setattr(queries, "_query_set", spy)
    rng = np.random.default_rng(0)
    candidates = [SimpleNamespace(label_set_id=7) for _ in range(6)]

    def run(labeled: bool):
        context = QueryContext(
            proba=None, embeddings=rng.normal(size=(6, 4)),
            labeled_embeddings=rng.normal(size=(2, 4)) if labeled else None,
            thumbs=rng.normal(size=(6, 3)),
            labeled_thumbs=rng.normal(size=(2, 3)) if labeled else None,
            typical_pixel_weight=1.0)
        queries._query_per_label_set("hybrid", context, 2, candidates,
                                     labeled_sets=np.array([7, 7]) if labeled else None)
        return seen[-1]

    settings.QUERY_TYPICAL_PIXELS_FIRST_ONLY = True
    assert run(labeled=False).thumbs is not None                # the first batch: joined
    later = run(labeled=True)
    assert later.thumbs is None and later.labeled_thumbs is None
    assert later.labeled_embeddings is not None
    settings.QUERY_TYPICAL_PIXELS_FIRST_ONLY = False
    always = run(labeled=True)
    assert always.thumbs is not None and always.labeled_thumbs is not None
