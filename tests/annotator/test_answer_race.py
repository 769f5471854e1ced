"""A class deleted (in the admin) while a reader's answer with it is being saved: the
answer is refused in words (the label page shows it), never a 500, and nothing is kept."""

from __future__ import annotations

import json

import pytest
from django.test import Client
from django.urls import reverse

from annotator import labeling, services
from annotator.models import Annotation, LabelClass
from tests.base import FIXTURES, PASSWORD
from tests.conftest import run_import

# the foreign key is checked when the answer's transaction commits: a real one
pytestmark = pytest.mark.django_db(transaction=True)


def test_a_class_deleted_while_the_answer_is_saved_is_a_409_in_words(project, users,
                                                                     monkeypatch):
    run_import(project, FIXTURES / "brain_mri" / "pool" / "no_tumor", layout="flat",
               dataset_name="brain")
    doomed, _ = services.label_class_get_or_create(project=project, name="doomed")
    scan = project.scans.filter(split="pool").first()
    real_create = labeling.annotation_create

    def deleted_meanwhile(**fields):
        # the admin's delete lands between the answer's checks and its insert
        LabelClass.objects.filter(pk=doomed.pk).delete()
        return real_create(**fields)

    monkeypatch.setattr(labeling, "annotation_create", deleted_meanwhile)
    client = Client()
    assert client.login(username="alice", password=PASSWORD)
    response = client.post(reverse("annotator:answer", args=[project.pk, scan.pk]),
                           data=json.dumps({"outcome": "label", "class_id": doomed.pk}),
                           content_type="application/json")
    assert response.status_code in (400, 409), response.content
    assert "removed meanwhile" in response.json()["error"]
    assert not Annotation.objects.filter(scan=scan).exists()
