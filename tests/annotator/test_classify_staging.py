"""The classify page keeps an upload for "add it to the pool": only each user's latest per
project, expired after a few hours, and all of them together under a cap. The classifier is
replaced by a stand-in here (its own tests are in test_labeling.py and ml_backend): what is
tested is what stays on disk."""

from __future__ import annotations

import os
import time

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse

from annotator.uploads import (
    StagingRefused,
    classify_decode,
    classify_stage,
    classify_staged,
    classify_staging_dir,
)
from tests.base import PASSWORD, png_bytes


def client_for(user) -> Client:
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    return client


def stage(name: str, seed: int, user, project) -> str:
    """``classify_stage`` as the classify page calls it: the upload's de-identified copy."""
    decoded, not_kept = classify_decode(png_bytes(size=32, seed=seed), name=name)
    assert not_kept is None
    return classify_stage(decoded, name=name, sha256=f"{seed:064d}", user_id=user.pk,
                          project_id=project.pk)


def staged() -> list[str]:
    root = classify_staging_dir()
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


@pytest.fixture
def stand_in_classifier(monkeypatch, project):
    """``classify_image`` answering at once with the shape of its real result."""
    from ml_backend import services as ml

    def classify_image(*, project, preview_png, label_set=None, k=6):
        label_set = label_set or project.label_sets.first()
        return {"model": {"version": "stand-in"}, "label_set": label_set,
                "predicted": {"class_id": 0, "name": "no_tumor", "confidence": 0.9},
                "probabilities": [{"class_id": 0, "name": "no_tumor", "p": 0.9,
                                   "learned": True}],
                "overlay_png": png_bytes(size=8), "similar": [], "novelty": None,
                "calibrated": False}

    monkeypatch.setattr(ml, "classify_image", classify_image)
    return project


def classify(client, project, seed: int):
    response = client.post(reverse("annotator:classify", args=[project.pk]),
                           {"file": SimpleUploadedFile(f"scan-{seed}.png",
                                                       png_bytes(size=32, seed=seed))})
    assert response.status_code == 200, response.content[:500]
    return response


def test_classifying_again_keeps_only_the_users_latest_upload(stand_in_classifier, users,
                                                             django_capture_on_commit_callbacks):
    project = stand_in_classifier
    alice = client_for(users["alice"])
    first = classify(alice, project, 1).context["token"]
    second = classify(alice, project, 2).context["token"]
    assert staged() == [second]                          # the first upload is gone
    # a second browser of alice's: its classify replaces the first session's upload too
    other_tab = client_for(users["alice"])
    third = classify(other_tab, project, 3).context["token"]
    assert staged() == [third]
    bob = client_for(users["bob"])
    bobs = classify(bob, project, 4).context["token"]
    assert staged() == sorted([third, bobs])             # one per user

    add = reverse("annotator:classify_add", args=[project.pk])
    refused = alice.post(add, {"token": first}, follow=True)
    assert b"That upload is no longer available: classify it again." in refused.content
    refused = alice.post(add, {"token": second}, follow=True)
    assert b"no longer kept (it expired, or you classified another scan since)" in \
        refused.content
    assert project.import_jobs.count() == 0
    with django_capture_on_commit_callbacks(execute=True):
        added = other_tab.post(add, {"token": third, "dataset": "clinic-upload"})
    assert added.status_code == 302 and project.import_jobs.count() == 1
    assert staged() == [bobs]


def test_the_kept_uploads_stay_under_a_cap(stand_in_classifier, users, settings):
    project = stand_in_classifier
    size = len(classify_decode(png_bytes(size=32, seed=1), name="a.png")[0].stored_bytes)
    settings.CLASSIFY_STAGING_MAX_BYTES = 2 * size + size // 2      # room for two
    old = stage("a.png", 1, users["alice"], project)
    past = time.time() - 60
    os.utime(classify_staging_dir() / old, (past, past))
    newer = stage("b.png", 2, users["bob"], project)
    newest = stage("c.png", 3, users["dora"], project)
    assert staged() == sorted([newer, newest])           # the oldest made room
    assert classify_staged(old) is None and classify_staged(newest) is not None
    # expired ones go whatever the room
    settings.CLASSIFY_STAGING_MAX_BYTES = 100 * size
    long_ago = time.time() - 7 * 3600
    os.utime(classify_staging_dir() / newer, (long_ago, long_ago))
    latest = stage("d.png", 4, users["alice"], project)
    assert staged() == sorted([newest, latest])

    # a file over the cap on its own is classified, not kept, and the page says why
    settings.CLASSIFY_STAGING_MAX_BYTES = size // 2
    with pytest.raises(StagingRefused, match="keeps at most"):
        stage("e.png", 5, users["alice"], project)
    response = classify(client_for(users["bob"]), project, 6)
    assert response.context["token"] is None
    assert b'id="not-kept"' in response.content and b"import it on the upload page" in \
        response.content
    assert b'id="add-form"' not in response.content
    assert staged() == sorted([newest, latest])
