"""Reports on a project with two label sets (chest X-ray, brain MRI) scored by a classifier
that learned only the chest set, as the demo's first model does: every place a report shows
(the page, the confusion matrix PNG, the per-class / per-label-set / per-site tables,
``manage.py report``) gives the brain eval scans *no prediction*, counted as missed, and
never a chest class."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from django.core.management import call_command
from django.urls import reverse

from annotator.models import LabelClass, Scan
from ml_backend import charts
from ml_backend.services.versions import evaluate
from tests.base import FIXTURES, PASSWORD
from tests.conftest import run_import
from tests.factories import model_version_with_files

CHEST, BRAIN = "Chest X-ray", "Brain MRI"
CHEST_CLASSES = ("normal", "pneumonia")
BRAIN_CLASSES = ("glioma_tumor", "meningioma_tumor", "no_tumor", "pituitary_tumor")
PER_CLASS = {"chest_xray": 3, "brain_mri": 2}


def _two_label_sets(project, tmp_path) -> None:
    """A few labeled eval scans of each class of both sets (copies of the fixtures)."""
    for folder, label_set, dataset, classes in (
            ("chest_xray", CHEST, "chest", CHEST_CLASSES),
            ("brain_mri", BRAIN, "brain", BRAIN_CLASSES)):
        for name in classes:
            source = tmp_path / "eval" / folder / name
            source.mkdir(parents=True)
            for path in sorted((FIXTURES / folder / "eval" / name).iterdir())[:PER_CLASS[folder]]:
                shutil.copy(path, source / path.name)
            run_import(project, source, layout="flat", split="eval", default_label=name,
                       dataset_name=dataset, label_set=label_set)


def _chest_heads(*, leaky: bool):
    """A predictor over the two chest classes only. ``leaky=False`` is SetHeads: a brain
    scan's row has no probability at all. ``leaky=True`` is a joint softmax that was not
    restricted to each scan's label set: it gives brain scans chest probabilities too."""
    def predict(scans, calibrated=True):
        return np.array([[0.0, 0.0] if scan.dataset.name != "chest" and not leaky
                         else [0.7, 0.3] if i % 3 else [0.2, 0.8]
                         for i, scan in enumerate(scans)])
    return predict


@pytest.fixture
def chest_only(project, tmp_path):
    _two_label_sets(project, tmp_path)
    classes = {c.name: c for c in LabelClass.objects.filter(project=project)}
    chest = [classes[n] for n in CHEST_CLASSES]
    model = model_version_with_files(project, "p-clf-chest", classes=chest, status="active")
    return project, model, [c.pk for c in chest]


def _scored(chest_only, leaky: bool):
    project, model, chest_ids = chest_only
    evaluation = evaluate(model, predict=_chest_heads(leaky=leaky), classes=chest_ids)
    assert evaluation is not None
    return project, model, evaluation


@pytest.mark.parametrize("leaky", [False, True], ids=["set-heads", "unrestricted-softmax"])
def test_unlearned_label_set_is_no_prediction_in_the_stored_report(chest_only, leaky):
    project, model, evaluation = _scored(chest_only, leaky)
    report = evaluation.report
    names = report["class_names"]
    n_brain = PER_CLASS["brain_mri"] * len(BRAIN_CLASSES)
    assert names[:2] == list(CHEST_CLASSES) and set(names[2:]) == set(BRAIN_CLASSES)
    assert evaluation.num_eval == Scan.objects.filter(project=project, split="eval").count()
    matrix = np.array(report["confusion_matrix"])
    brain_rows = [names.index(n) for n in BRAIN_CLASSES]
    # no brain scan in a chest class's predicted column (nor in any class's)
    assert matrix[brain_rows].sum() == 0, matrix
    assert report["num_no_prediction"] == n_brain
    assert [report["no_prediction"][i] for i in brain_rows] == [PER_CLASS["brain_mri"]] * 4
    # counted as missed: recall 0, and in accuracy's denominator
    for name in BRAIN_CLASSES:
        assert report["per_class"][name]["recall"] == 0.0
        assert report["per_class"][name]["support"] == PER_CLASS["brain_mri"]
    assert report["accuracy"] == pytest.approx(
        np.trace(matrix) / evaluation.num_eval)
    # the per-label-set and per-site tables agree on the same (brain) scans
    per_set, per_site = report["per_set"][BRAIN], report["per_group"]["brain"]
    assert per_set["num_eval"] == per_site["n"] == n_brain
    for key in ("accuracy", "macro_f1", "macro_auc"):
        assert per_set[key] == pytest.approx(per_site[key]), key
    assert per_set["accuracy"] == 0.0 and per_set["macro_f1"] == 0.0
    assert per_set["confusion_matrix"] == [[0] * 4] * 4
    assert per_set["num_no_prediction"] == per_site["no_prediction"] == n_brain
    chest_set, chest_site = report["per_set"][CHEST], report["per_group"]["chest"]
    for key in ("accuracy", "macro_f1", "macro_auc"):
        assert chest_set[key] == pytest.approx(chest_site[key]), key
    json.dumps(report, allow_nan=False)


def test_reports_page_chart_and_command_show_no_cross_set_prediction(client, users,
                                                                    chest_only, monkeypatch):
    project, model, evaluation = _scored(chest_only, leaky=False)
    n_brain = PER_CLASS["brain_mri"] * len(BRAIN_CLASSES)
    assert client.login(username=users["alice"].username, password=PASSWORD)
    response = client.get(reverse("annotator:reports", args=[project.pk])
                          + f"?model={model.version}")
    assert response.status_code == 200
    html = response.content.decode()
    context = response.context

    # the confusion table: brain rows have 0 under every class and their count under
    # "no prediction (not learned)", a column of its own
    assert '<th scope="col" class="no-prediction">no prediction (not learned)</th>' in html
    rows = {row["name"]: [cell["count"] for cell in row["cells"]] for row in context["confusion"]}
    for name in BRAIN_CLASSES:
        assert rows[name] == [0] * 6 + [PER_CLASS["brain_mri"]], (name, rows[name])
    for name in CHEST_CLASSES:
        assert rows[name][-1] == 0 and sum(rows[name]) == PER_CLASS["chest_xray"]
    # the text says how they are treated
    assert "counted as missed" in html and f"{n_brain} of them are of a label set" in html
    assert "never as a class of another label set" in html
    # per-label-set and per-site rows for the brain scans: the same numbers
    brain_set = next(r for r in context["per_set"] if r["name"] == BRAIN)
    brain_site = next(s for s in context["sites"] if s["name"] == "brain")
    for key in ("accuracy", "macro_f1", "macro_auc"):
        assert brain_set[key] == brain_site[key], key
    assert brain_set["accuracy"] == "0.000" and brain_set["no_prediction"] == n_brain
    assert brain_site["no_prediction"] == n_brain

    # the PNG is drawn with the no-prediction column
    drawn = {}
    draw = charts.confusion_matrix_png

    def spy(matrix, class_names, **kwargs):
        drawn.update(matrix=matrix, names=class_names, **kwargs)
        return draw(matrix, class_names, **kwargs)

    monkeypatch.setattr(charts, "confusion_matrix_png", spy)
    png = client.get(reverse("annotator:report_chart", args=[project.pk, "confusion"])
                     + f"?model={model.version}")
    assert png.status_code == 200 and png["Content-Type"] == "image/png"
    names = drawn["names"]
    for name in BRAIN_CLASSES:
        i = names.index(name)
        assert sum(drawn["matrix"][i]) == 0 and drawn["no_prediction"][i] == 2

    # manage.py report: the JSON is the stored report; the Markdown has the column too
    out = io.StringIO()
    call_command("report", "--project", project.name, "--model", model.version,
                 "--format", "json", stdout=out)
    data = json.loads(out.getvalue())["report"]
    assert data["num_no_prediction"] == n_brain
    assert data["per_set"][BRAIN]["accuracy"] == data["per_group"]["brain"]["accuracy"] == 0.0
    out = io.StringIO()
    call_command("report", "--project", project.name, "--model", model.version, stdout=out)
    markdown = out.getvalue()
    assert "| no prediction (not learned) |" in markdown and "counted as missed" in markdown
    for name in BRAIN_CLASSES:
        assert f"| {name} | 0 | 0 | 0 | 0 | 0 | 0 | 2 |" in markdown, markdown
    assert f"| {BRAIN} | {n_brain} | 0.000 | 0.000 |" in markdown
    assert f"| brain | {n_brain} | 0.000 | 0.000 |" in markdown


def test_confusion_chart_checks_the_no_prediction_column():
    png = charts.confusion_matrix_png([[2, 1], [0, 0]], ["a", "b"], no_prediction=[0, 3])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no_prediction"):
        charts.confusion_matrix_png([[2, 1], [0, 0]], ["a", "b"], no_prediction=[1, 2, 3])
