"""One bounded cache of loaded models and indexes (ml_backend/services/inference.py), and
model errors shown in words instead of empty answers."""

from __future__ import annotations

import json

import pytest
from django.test import Client
from django.urls import reverse

from ml_backend.models import Prediction
from ml_backend.services import inference
from tests.base import PASSWORD
from tests.factories import trained_project
from tests.label_studio.conftest import ML_AUTH, ml_client

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def ml_backend_password(settings):
    settings.ML_BACKEND_BASIC_AUTH = ML_AUTH


@pytest.fixture
def trained(encoded_project, users):
    project = trained_project(encoded_project, users["bob"])
    inference.cache.clear()
    return project


def _client(user) -> Client:
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    return client


def _label_json(client, project, scan) -> dict:
    response = client.get(reverse("annotator:label", args=[project.pk, scan.pk]),
                          {"format": "json"})
    assert response.status_code == 200
    return response.json()


def test_a_second_label_page_loads_nothing_again(trained, users):
    """The first label page loads the version's heads, the encoder's embeddings and index;
    the next scans' pages (one of them a scan with no stored prediction, scored on the fly)
    are answered from the cache."""
    project, alice = trained, _client(users["alice"])
    pool = list(project.scans.filter(split="pool").order_by("pk"))
    # two scans with no stored prediction: the model scores them on the fly
    Prediction.objects.filter(scan__in=[pool[2], pool[4]]).delete()
    first = _label_json(alice, project, pool[2])
    assert first["suggestion"] is not None and first["similar"]
    loads = inference.cache.counts["loads"]
    assert inference.cache.counts["loads:index.faiss"] == 1
    assert inference.cache.counts["loads:scan_ids.npy"] == 1
    for scan in (pool[1], pool[3], pool[4], pool[2]):
        payload = _label_json(alice, project, scan)
        assert payload["suggestion"] is not None and payload["model_error"] is None
    assert inference.cache.counts["loads"] == loads, inference.cache.counts
    assert inference.cache.counts["hits"] > 0


def test_gradcam_and_label_studio_predict_share_the_cache(trained, users):
    project, alice = trained, _client(users["alice"])
    model = project.active_model
    pool = list(project.scans.filter(split="pool").order_by("pk"))
    class_id = model.config["classes"][0]["id"]
    for scan in pool[:2]:
        response = alice.get(reverse("annotator:gradcam", args=[scan.pk]), {"class": class_id})
        assert response.status_code == 200 and response["Content-Type"] == "image/png"
    assert inference.cache.counts["loads:encoder.pt"] == 1     # one network load for both
    Prediction.objects.filter(model_version=model).delete()    # /ml/predict scores them
    loads = inference.cache.counts["loads"]
    tasks = [{"id": i, "data": {"scan_id": s.pk}} for i, s in enumerate(pool[:4])]
    for _ in range(2):
        body = ml_client().post(f"/ml/{project.pk}/predict", data=json.dumps({"tasks": tasks}),
                                content_type="application/json").json()
        assert all(r["result"] for r in body["results"])
    assert inference.cache.counts["loads"] - loads <= 2        # heads (+ embeddings) once


def test_the_cache_is_bounded_and_least_recently_used_goes_first(trained):
    model = trained.active_model
    cache = inference.ModelCache(size=2)
    head = model.config["label_sets"][0]["head"]
    cache.get(model, head, lambda path: "head")
    cache.get(model, "config.json", lambda path: "config")
    cache.get(model, head, lambda path: pytest.fail("a hit must not load"))
    cache.get(model.parent, "scan_ids.npy", lambda path: "ids")     # evicts config.json
    assert len(cache) == 2
    reloaded = []
    cache.get(model, "config.json", lambda path: reloaded.append(path) or "config")
    assert reloaded and cache.counts["loads"] == 4


def test_a_broken_model_is_said_in_words_on_the_label_page_and_to_label_studio(trained, users):
    """Missing artifacts are not an empty suggestion: the label page says why, and Label
    Studio gets an error it shows (not an empty result list)."""
    project, alice = trained, _client(users["alice"])
    model = project.active_model
    pool = list(project.scans.filter(split="pool").order_by("pk"))
    Prediction.objects.filter(model_version=model).delete()
    for config in model.config["label_sets"]:
        (inference.checkpoint_path(model, config["head"])).unlink()
    inference.cache.clear()
    payload = _label_json(alice, project, pool[1])
    assert payload["suggestion"] is None
    assert model.version in payload["model_error"] and "missing" in payload["model_error"]
    page = alice.get(reverse("annotator:label", args=[project.pk, pool[1].pk]))
    assert page.status_code == 200
    response = ml_client().post(f"/ml/{project.pk}/predict", content_type="application/json",
                                data=json.dumps({"tasks": [{"id": 1,
                                                            "data": {"scan_id": pool[1].pk}}]}))
    assert response.status_code == 503
    assert model.version in response.json()["error"]


def test_a_broken_index_is_said_on_the_label_page(trained, users):
    project, alice = trained, _client(users["alice"])
    encoder = project.active_encoder
    inference.embeddings_paths(encoder)["index"].write_bytes(b"not an index")
    inference.cache.clear()
    payload = _label_json(alice, project, project.scans.filter(split="pool").first())
    assert payload["similar"] == []
    assert payload["similar_error"] and "unavailable" in payload["similar_error"]


def test_calibrated_means_this_label_sets_head_was_calibrated():
    from ml_backend.models import ModelVersion

    head = ModelVersion(config={"kind": "head", "label_sets": [
        {"id": 1, "calibrated_on": 40, "temperature": 1.6},
        {"id": 2, "calibrated_on": 0, "temperature": 1.0}]})
    assert inference.is_calibrated(head, 1)
    assert not inference.is_calibrated(head, 2)      # too few labels for a temperature yet
    assert not inference.is_calibrated(head, 3)      # a set the version never learned
    assert inference.is_calibrated(ModelVersion(config={"kind": "finetuned",
                                                        "temperature": 1.3}), 1)
    assert not inference.is_calibrated(ModelVersion(config={"kind": "finetuned"}), 1)
