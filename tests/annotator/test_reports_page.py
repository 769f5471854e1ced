"""The Reports page: metrics tables and PNG charts for a model version, empty states,
permissions; and the pure chart functions behind it."""

from __future__ import annotations

import ast
import io
import os
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from django.core.management import call_command
from django.urls import reverse
from PIL import Image

from annotator import services as annotator_services
from annotator.models import LabelClass, Scan
from annotator.views_reports import CHARTS
from ml_backend import charts
from ml_backend.metrics.reports import classification_report
from ml_backend.models import ModelVersion
from tests.base import FIXTURES, PASSWORD, REPO
from tests.conftest import run_import

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLASS_NAMES = ["glioma_tumor", "meningioma_tumor", "no_tumor", "pituitary_tumor"]
# Set REPORT_CHARTS_DIR=/tmp/report_charts to keep the PNGs of the end-to-end test for a look.
CHARTS_DIR = os.environ.get("REPORT_CHARTS_DIR")


def assert_png(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC
    with Image.open(io.BytesIO(data)) as image:
        image.verify()
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG" and image.width > 0 and image.height > 0
        return image.size


class ChartImages(HTMLParser):
    """``{data-chart: (src, alt)}`` of the page's chart images."""

    def __init__(self):
        super().__init__()
        self.found: dict[str, tuple[str, str]] = {}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img" and "data-chart" in attrs:
            self.found[attrs["data-chart"]] = (attrs["src"], attrs.get("alt") or "")


def chart_images(html: str) -> dict[str, tuple[str, str]]:
    parser = ChartImages()
    parser.feed(html)
    return parser.found


def login(client, user):
    assert client.login(username=user.username, password=PASSWORD)


def page_url(project, model: str | None = None) -> str:
    url = reverse("annotator:reports", args=[project.pk])
    return f"{url}?model={model}" if model else url


def chart_url(project, name: str, model: str | None = None) -> str:
    url = reverse("annotator:report_chart", args=[project.pk, name])
    return f"{url}?model={model}" if model else url


def fetch_charts(client, html: str, *, save_as: str = "") -> dict[str, tuple[int, int]]:
    sizes = {}
    for name, (src, alt) in chart_images(html).items():
        assert alt.strip(), f"{name} has no alt text"
        response = client.get(src)
        assert response.status_code == 200, (name, src)
        assert response["Content-Type"] == "image/png"
        assert "private" in response["Cache-Control"]
        sizes[name] = assert_png(response.content)
        if CHARTS_DIR:
            Path(CHARTS_DIR).mkdir(parents=True, exist_ok=True)
            (Path(CHARTS_DIR) / f"{save_as}{name}.png").write_bytes(response.content)
    if CHARTS_DIR:
        (Path(CHARTS_DIR) / f"{save_as}page.html").write_text(html)
    return sizes


def truth(scan: Scan) -> str:
    return "no_tumor" if "image" in (scan.source_name or "") else "pituitary_tumor"


def label(scans, users, classes):
    for scan in scans:
        annotator_services.annotation_create(scan=scan, reader=users["alice"],
                                             label_class=classes[truth(scan)])


# --- the page on a real project: encoder → refit → second refit ------------------------


def test_reports_page_and_charts_through_the_loop(client, users, project):
    for name in ("no_tumor", "pituitary_tumor"):
        run_import(project, FIXTURES / "brain_mri" / "pool" / name, layout="flat",
                   dataset_name="brain")
        run_import(project, FIXTURES / "brain_mri" / "eval" / name, layout="flat", split="eval",
                   default_label=name, dataset_name="brain")
    call_command("pretrain", "--project", project.name, "--epochs", "2", "--image-size", "32",
                 "--batch-size", "32", "--small-input", "no", "--no-progress")
    login(client, users["alice"])

    # An encoder but no classifier: say how to get one, and map the pool already.
    response = client.get(page_url(project))
    assert response.status_code == 200
    html = response.content.decode()
    assert "No classifier yet" in html and "manage.py refit" in html
    eval_labeled = Scan.objects.filter(project=project, split="eval").count()
    assert f"{eval_labeled} labeled eval scans will score it" in html   # not "import some"
    assert "--split eval" not in html
    assert set(chart_images(html)) == {"embedding_labels"}
    fetch_charts(client, html)

    classes = {c.name: c for c in LabelClass.objects.filter(project=project)}
    pool = list(Scan.objects.filter(project=project, split="pool").order_by("pk"))
    by_class = {n: [s for s in pool if truth(s) == n] for n in ("no_tumor", "pituitary_tumor")}
    label(by_class["no_tumor"][:3] + by_class["pituitary_tumor"][:3], users, classes)
    call_command("refit", "--project", project.name, "--no-query", "--no-progress")
    first = ModelVersion.objects.get(project=project, kind="classifier")
    assert first.status == ModelVersion.Status.ACTIVE
    label(by_class["no_tumor"][3:12] + by_class["pituitary_tumor"][3:12], users, classes)
    call_command("refit", "--project", project.name, "--no-query", "--no-progress")
    second = ModelVersion.objects.filter(project=project, kind="classifier").exclude(
        pk=first.pk).get()
    project.refresh_from_db()
    active = project.active_model

    # Default: the active classifier, with every chart and the tables.
    response = client.get(page_url(project))
    assert response.status_code == 200
    html = response.content.decode()
    assert response.context["model"] == active
    assert 'id="per-class"' in html
    for name in ("no_tumor", "pituitary_tumor"):
        assert f'<th scope="row">{name}</th>' in html
    for heading in ("precision", "recall", "F1", "support", "AUC", "AP"):
        assert f'<th scope="col">{heading}</th>' in html
    assert "ECE before temperature scaling" in html and "Cohen&#x27;s kappa" in html
    assert 'id="confusion-table"' in html and 'id="per-site"' in html and ">brain<" in html
    assert first.version in html and second.version in html           # picker + curve
    assert second.status_reason and second.status_reason[:40] in html
    assert set(chart_images(html)) == set(CHARTS)
    sizes = fetch_charts(client, html, save_as="active-")
    assert all(w >= 300 and h >= 200 for w, h in sizes.values())
    assert response.context["curve"][0]["version"] == first.version
    assert [p["labels"] for p in response.context["curve"]] == [6, 24]

    # An older version by ?model=: its own numbers and charts (it predicted the pool when
    # it was promoted, so both maps are there).
    response = client.get(page_url(project, first.version))
    assert response.status_code == 200 and response.context["model"] == first
    html = response.content.decode()
    assert set(chart_images(html)) == set(CHARTS)
    assert all(f"?model={first.version}" in src for src, _ in chart_images(html).values())
    fetch_charts(client, html, save_as="older-")
    assert response.context["evaluation"].num_labels == 6

    # Everyone in the project may look; the outsider sees nothing of it.
    login(client, users["bob"])
    assert client.get(page_url(project)).status_code == 200
    login(client, users["charlie"])
    assert client.get(page_url(project)).status_code == 404
    for name in CHARTS:
        assert client.get(chart_url(project, name)).status_code == 404
        assert client.get(chart_url(project, name, first.version)).status_code == 404


# --- empty states and permissions on a bare project -------------------------------------


def test_empty_project_explains_what_to_do(client, users, project):
    login(client, users["alice"])
    response = client.get(page_url(project))
    assert response.status_code == 200
    html = response.content.decode()
    assert "No classifier yet" in html and "manage.py pretrain" in html
    assert "--split eval" in html              # no labeled eval scans: say how to get them
    assert "No evaluated model versions yet" in html and "No encoder yet" in html
    assert chart_images(html) == {}
    for name in CHARTS:                       # nothing to draw: 404, not a broken image or 500
        assert client.get(chart_url(project, name)).status_code == 404


def test_model_without_evaluation_and_encoder_without_embeddings(client, users, project,
                                                                 tmp_path):
    (tmp_path / "enc").mkdir()                      # its files are there, its embeddings not
    (tmp_path / "enc" / "encoder.pt").write_bytes(b"")
    encoder = ModelVersion.objects.create(project=project, kind="encoder", version="t-enc-1",
                                          status="active", artifact_dir=str(tmp_path / "enc"))
    project.active_encoder = encoder
    project.save()
    failed = ModelVersion.objects.create(project=project, kind="classifier", version="t-clf-2",
                                         parent=encoder, status="failed",
                                         status_reason="the refit ran out of memory")
    login(client, users["bob"])
    response = client.get(page_url(project))
    assert response.status_code == 200 and response.context["model"] == failed
    html = response.content.decode()
    assert "No evaluation for t-clf-2" in html and "the refit ran out of memory" in html
    assert "has no embeddings yet" in html and "manage.py embed" in html
    assert chart_images(html) == {}
    for name in CHARTS:
        assert client.get(chart_url(project, name, failed.version)).status_code == 404


def test_permissions_unknown_chart_and_unknown_version(client, users, project, other_project):
    anonymous = [page_url(project), chart_url(project, "confusion")]
    for url in anonymous:
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith(reverse("login"))
    login(client, users["charlie"])
    assert client.get(page_url(project)).status_code == 404
    assert client.get(chart_url(project, "learning_curve")).status_code == 404
    login(client, users["dora"])                                        # superuser
    assert client.get(page_url(project)).status_code == 200
    login(client, users["alice"])
    assert client.get(chart_url(project, "not_a_chart")).status_code == 404
    assert client.get(page_url(project, "no-such-version")).status_code == 404
    foreign = ModelVersion.objects.create(project=other_project, kind="classifier",
                                          version="elsewhere-clf-1")
    assert client.get(page_url(project, foreign.version)).status_code == 404
    assert client.get(chart_url(project, "confusion", foreign.version)).status_code == 404


# --- the pure chart functions -----------------------------------------------------------


def sample_report(seed: int = 0, n: int = 60) -> dict:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    logits = rng.normal(size=(n, 4))
    logits[np.arange(n), y] += 1.5
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    groups = np.where(np.arange(n) % 3 == 0, "site-b", "site-a")
    return classification_report(y, proba, CLASS_NAMES, groups=groups)


def test_chart_functions_return_pngs():
    report = sample_report()
    assert_png(charts.confusion_matrix_png(report["confusion_matrix"], report["class_names"]))
    assert_png(charts.reliability_png(report["reliability"], report["ece"], 0.2,
                                      temperature=1.4))
    assert_png(charts.per_site_png(report["per_group"]))
    points = [{"version": "a", "labels": 5, "accuracy": 0.5, "macro_f1": 0.4,
               "macro_auc": None, "promoted": True},
              {"version": "b", "labels": 12, "accuracy": 0.6, "macro_f1": 0.55,
               "macro_auc": 0.7, "promoted": False}]
    assert_png(charts.learning_curve_png(points, highlight="b"))
    assert_png(charts.learning_curve_png(points[:1]))
    xy, _ = charts.pca_2d(np.random.default_rng(1).normal(size=(50, 8)))
    labels = [charts.UNLABELED] * 20 + [0, 1, 2, 3, 0] * 6
    assert_png(charts.embedding_map_png(xy, labels, CLASS_NAMES, "pool by label"))
    assert_png(charts.embedding_map_png(xy, [charts.UNLABELED] * 50, CLASS_NAMES, "none yet",
                                        colors=["#111111", "#222222", "#333333", "#444444"]))


def test_each_group_on_a_map_has_its_own_shape(monkeypatch):
    """Not colour alone (tenth probe: eight clusters were eight identical circles)."""
    from matplotlib.axes import Axes

    shapes = []
    scatter = Axes.scatter
    monkeypatch.setattr(Axes, "scatter", lambda self, *a, **k: (
        shapes.append(k.get("marker")), scatter(self, *a, **k))[1])
    xy, _ = charts.pca_2d(np.random.default_rng(1).normal(size=(40, 8)))
    charts.embedding_map_png(xy, [0, 1, 2, 3] * 10, CLASS_NAMES, "four groups")
    assert len(shapes) == 4 and len(set(shapes)) == 4, shapes


def test_chart_functions_handle_empty_and_reject_inconsistent_input():
    empty = classification_report(np.zeros(0, int), np.zeros((0, 4)), CLASS_NAMES)
    assert_png(charts.reliability_png(empty["reliability"], empty["ece"]))
    assert_png(charts.confusion_matrix_png(empty["confusion_matrix"], CLASS_NAMES))
    with pytest.raises(ValueError, match="confusion matrix"):
        charts.confusion_matrix_png([[1, 2], [3, 4]], CLASS_NAMES)
    with pytest.raises(ValueError, match="labels for"):
        charts.embedding_map_png(np.zeros((3, 2)), [0, 1], CLASS_NAMES, "x")
    with pytest.raises(ValueError, match="past the class names"):
        charts.embedding_map_png(np.zeros((2, 2)), [0, 7], CLASS_NAMES, "x")
    with pytest.raises(ValueError, match="no groups"):
        charts.per_site_png({})


def test_pca_2d_shape_subsample_and_determinism():
    rng = np.random.default_rng(0)
    # Two strong directions and noise: PCA must find them.
    vectors = rng.normal(size=(300, 16)) * 0.05
    vectors[:, 3] += rng.normal(size=300) * 5
    vectors[:, 7] += rng.normal(size=300) * 2
    xy, rows = charts.pca_2d(vectors)
    assert xy.shape == (300, 2) and xy.dtype == np.float32 and list(rows) == list(range(300))
    assert xy[:, 0].var() > xy[:, 1].var() > 0
    centred = vectors - vectors.mean(axis=0)
    reference = centred @ np.linalg.svd(centred, full_matrices=False)[2][:2].T
    np.testing.assert_allclose(np.abs(xy), np.abs(reference), atol=1e-4)
    again, _ = charts.pca_2d(vectors.copy())
    assert np.array_equal(xy, again)
    # The sign of each component is fixed by its loadings, not by the SVD's whim.
    permuted, _ = charts.pca_2d(vectors[::-1])
    np.testing.assert_allclose(permuted[::-1], xy, atol=1e-4)

    scaled = vectors * rng.uniform(0.5, 3.0, size=(300, 1))             # cosine geometry
    np.testing.assert_allclose(charts.pca_2d(scaled, normalize=True)[0],
                               charts.pca_2d(vectors, normalize=True)[0], atol=1e-5)

    sub, picked = charts.pca_2d(vectors, max_points=50, seed=3)
    assert sub.shape == (50, 2) and len(set(picked.tolist())) == 50
    assert list(picked) == sorted(picked)
    same, picked_again = charts.pca_2d(vectors, max_points=50, seed=3)
    assert np.array_equal(sub, same) and np.array_equal(picked, picked_again)
    wide, _ = charts.pca_2d(rng.normal(size=(5, 40)))                    # D > N: SVD path
    assert wide.shape == (5, 2)
    one, _ = charts.pca_2d(np.ones((1, 4)))
    assert one.shape == (1, 2) and not one.any()
    with pytest.raises(ValueError):
        charts.pca_2d(np.ones(4))


def test_charts_module_is_pure_and_avoids_pyplot():
    tree = ast.parse((REPO / "ml_backend" / "charts.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    assert not {name for name in imported
                if name.split(".")[0] in ("django", "annotator", "medsite")
                or name.startswith("ml_backend.")}
    assert "matplotlib.pyplot" not in imported


HOSTILE_NAMES = ["T$_{1$ weighted", "ward $x^{$", "a $b$ c", "_hidden_{x}^2", "back\\slash \\$5"]


def drawn_texts(monkeypatch) -> list:
    """Patch the charts' PNG writer to keep each figure; returns the list they go into."""
    from collections import OrderedDict

    kept = []
    real = charts._png
    monkeypatch.setattr(charts, "_DRAWN", OrderedDict())     # every chart drawn anew

    def keep(figure):
        kept.append(figure)
        return real(figure)

    monkeypatch.setattr(charts, "_png", keep)
    return kept


def shown(figure) -> list[tuple[str, object]]:
    """What each text of ``figure`` draws: ``(string after mathtext preprocessing, is_math)``."""
    from matplotlib.text import Text

    return [t._preprocess_math(t.get_text()) for t in figure.findobj(Text) if t.get_text()]


def assert_drawn_literally(figure, names) -> None:
    texts = shown(figure)
    assert not [s for s, math in texts if math], "no user text may be set as mathtext"
    for name in names:
        assert any(name in s for s, _ in texts), f"{name!r} is not drawn as typed"


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_charts_draw_user_names_literally(monkeypatch, name):
    """Class, data set and finding names with $, _, ^, {, \\ are drawn as typed, never as
    mathtext (an odd number of $ used to fail: 'the chart could not be drawn')."""
    figures = drawn_texts(monkeypatch)
    names = [name, "plain", f"{name} again"]
    report = classification_report(np.array([0, 1, 2, 0, 1, 2]), np.eye(3)[[0, 1, 2, 1, 1, 2]],
                                   names, groups=np.array([name, "site-b"] * 3))
    assert_png(charts.confusion_matrix_png(report["confusion_matrix"], names))
    assert_png(charts.per_site_png(report["per_group"]))
    assert_png(charts.reliability_png(report["reliability"], report["ece"], title=name,
                                      y_label=f"share {name}", x_label=f"p({name})"))
    xy = np.random.default_rng(1).normal(size=(9, 2))
    assert_png(charts.embedding_map_png(xy, [charts.UNLABELED, 0, 1, 2, 0, 1, 2, 0, 0], names,
                                        f"Pool by label {name}", unlabeled_name=name))
    points = [{"version": name, "labels": 5, "accuracy": 0.5, "macro_f1": 0.4,
               "macro_auc": None, "promoted": True}]
    assert_png(charts.learning_curve_png(points, highlight=name))
    confusion, per_site, reliability, embedding, curve = figures
    assert_drawn_literally(confusion, names)
    assert_drawn_literally(per_site, [name])
    assert_drawn_literally(reliability, [name, f"share {name}", f"p({name})"])
    assert_drawn_literally(embedding, [f"Pool by label {name}", f"{name} (1)", f"{name} (4)",
                                       f"{name} again (2)"])
    assert_drawn_literally(curve, [f"selected ({name})"])


def test_a_chart_is_drawn_once_per_input_and_long_names_are_cut(monkeypatch):
    """A reload (or a second reader) gets the chart drawn before, the same bytes; a new
    input is a new chart; the memo is bounded; a 200-character class name is cut on the
    axes (the tables carry it whole)."""
    from collections import OrderedDict

    monkeypatch.setattr(charts, "_DRAWN", OrderedDict())
    monkeypatch.setattr(charts, "DRAWN_MAX_ENTRIES", 3)
    figures = drawn_texts(monkeypatch)
    monkeypatch.setattr(charts, "_DRAWN", OrderedDict())
    long_name = "pneumonia " + "x" * 190
    names = [long_name, "normal"]
    first = charts.confusion_matrix_png([[3, 1], [0, 4]], names)
    again = charts.confusion_matrix_png([[3, 1], [0, 4]], names)
    assert again is first and len(figures) == 1
    other = charts.confusion_matrix_png([[3, 1], [1, 3]], names)
    assert other != first and len(figures) == 2
    texts = [text for text, _ in shown(figures[0])]
    assert long_name not in " ".join(texts)
    assert any(t.startswith("pneumonia xxx") and t.endswith("…") and len(t) <= 28
               for t in texts)
    for n in range(4):                                      # bounded: the oldest goes
        charts.confusion_matrix_png([[n, 1], [1, 1]], names)
    assert len(charts._DRAWN) == 3
    xy, rows = charts.pca_2d(np.random.default_rng(0).normal(size=(40, 6)))
    assert not xy.flags.writeable and not rows.flags.writeable   # shared: read-only
