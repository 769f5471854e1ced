"""The label-free view: the project's scans in clusters, with typical scans and labels so far."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from annotator import services
from annotator.models import Annotation, LabelClass
from ml_backend import services as ml
from tests.base import PASSWORD
from tests.conftest import brain_truth

pytestmark = pytest.mark.django_db


def client_for(user) -> Client:
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    return client


def test_clusters_page_map_and_what_each_cluster_holds(encoded_project, users):
    project = encoded_project
    classes = {c.name: c for c in LabelClass.objects.filter(project=project)}
    labeled = []
    for scan in project.scans.filter(split="pool").order_by("pk")[:6]:
        services.annotation_create(scan=scan, reader=users["alice"],
                                   label_class=classes[brain_truth(scan)])
        labeled.append(scan.pk)
    result = ml.scan_clusters(project=project, k=4)
    # the embedding and each scan's thumbnail, side by side (features.cluster_inputs)
    assert result["inputs"] == "embeddings and thumbnails"
    embedded = project.scans.count()
    assert result["scans"] == embedded and len(result["assignment"]) == embedded
    assert sum(c["size"] for c in result["clusters"]) == embedded
    with_labels = (Annotation.objects.filter(scan__project=project, outcome="label")
                   .values("scan_id").distinct().count())      # the eval split's and the 6
    assert sum(c["labeled"] for c in result["clusters"]) == with_labels >= len(labeled)
    for cluster in result["clusters"]:
        assert 1 <= len(cluster["typical"]) <= 6
        assert all(result["assignment"][s] == cluster["cluster"] for s in cluster["typical"])
        assert sum(cluster["datasets"].values()) == cluster["size"]
        if cluster["labeled"]:
            assert 0 < cluster["purity"] <= 1 and cluster["majority"] in cluster["labels"]
    alice = client_for(users["alice"])
    page = alice.get(reverse("annotator:clusters", args=[project.pk]) + "?k=4")
    assert page.status_code == 200
    html = page.content.decode()
    assert 'id="clusters"' in html and html.count("data-cluster=") == len(result["clusters"])
    chart = alice.get(reverse("annotator:clusters_map", args=[project.pk]) + "?k=4")
    assert chart.status_code == 200 and chart["Content-Type"] == "image/png"
    assert chart.content.startswith(b"\x89PNG")
    # the project page links to it
    assert b'id="clusters-link"' in alice.get(reverse("annotator:project_detail",
                                                      args=[project.pk])).content
    # bad options are refused, outsiders see nothing
    assert alice.get(reverse("annotator:clusters", args=[project.pk]) + "?k=7").status_code == 404
    assert alice.get(reverse("annotator:clusters", args=[project.pk]) + "?k=x").status_code == 404
    assert alice.get(reverse("annotator:clusters", args=[project.pk]) + "?set=999999"
                     ).status_code == 404
    outsider = client_for(users["charlie"])
    assert outsider.get(reverse("annotator:clusters", args=[project.pk])).status_code == 404


def test_without_an_encoder_the_page_says_what_to_do(project, users):
    page = client_for(users["alice"]).get(reverse("annotator:clusters", args=[project.pk]))
    assert page.status_code == 200
    assert b'id="clusters-error"' in page.content and b"pretrain" in page.content


def test_the_pixel_weight_zero_clusters_the_embedding_alone(encoded_project, users, settings):
    settings.CLUSTER_PIXEL_WEIGHT = 0.0
    result = ml.scan_clusters(project=encoded_project, k=4)
    assert result["inputs"] == "embeddings"
    assert sum(c["size"] for c in result["clusters"]) == encoded_project.scans.count()
    page = client_for(users["alice"]).get(
        reverse("annotator:clusters", args=[encoded_project.pk]) + "?k=4")
    assert b"embeddings of" in page.content and b"thumbnails of" not in page.content
