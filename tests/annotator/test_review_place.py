"""The review page keeps the reviewer's place (tenth probe): after an adjudication the page
came back at the top, the message above everything; the note came after the class buttons,
so a keyboard reader who wrote one had to Shift+Tab back to decide. Now the note comes first
and the answer lands in the section the reviewer was in, with its message there."""

from __future__ import annotations

import re

import pytest
from django.test import Client
from django.urls import reverse

from annotator import services
from annotator.models import Scan
from tests.base import FIXTURES, PASSWORD
from tests.conftest import run_import

pytestmark = pytest.mark.django_db


@pytest.fixture
def disagreement(project, users, django_user_model):
    from annotator.models import Membership

    carol = django_user_model.objects.create_user("carol", "carol@example.org", PASSWORD)
    services.membership_set(project=project, user=carol, role=Membership.Role.CLINICIAN)
    run_import(project, FIXTURES / "brain_mri" / "pool" / "no_tumor", layout="flat",
               dataset_name="brain")
    made = {name: services.label_class_get_or_create(project=project, name=name,
                                                     created_by=users["dora"])[0]
            for name in ("normal", "glioma")}
    scan = Scan.objects.filter(project=project).order_by("pk").first()
    services.annotation_create(scan=scan, reader=users["alice"], label_class=made["normal"])
    services.annotation_create(scan=scan, reader=carol, label_class=made["glioma"])
    return project, scan, made


def test_the_note_comes_before_the_classes_and_the_answer_returns_to_its_section(
        disagreement, users):
    project, scan, classes = disagreement
    client = Client()
    assert client.login(username="bob", password=PASSWORD)
    page = client.get(reverse("annotator:review", args=[project.pk])).content.decode()
    form = re.search(r'<form[^>]*class="adjudicate".*?</form>', page, re.S).group(0)
    assert form.index('name="note"') < form.index('name="label_class"')
    assert 'name="section" value="disagreements"' in form

    response = client.post(reverse("annotator:adjudicate", args=[project.pk, scan.pk]),
                           {"label_class": classes["glioma"].pk, "note": "second look",
                            "section": "disagreements"})
    assert response.status_code == 302
    assert response["Location"].endswith(reverse("annotator:review", args=[project.pk])
                                         + "#disagreements")
    page = client.get(response["Location"].split("#")[0]).content.decode()
    section = page[page.index('id="disagreements"'):]
    assert f"Scan {scan.pk} adjudicated as glioma" in section
    top = page[:page.index('id="disagreements"')]
    assert "adjudicated as glioma" not in top

    # a section name that is not one of the page's is ignored: back to the top
    response = client.post(reverse("annotator:adjudicate", args=[project.pk, scan.pk]),
                           {"label_class": classes["normal"].pk, "section": "x\"><script>"})
    assert response["Location"].endswith(reverse("annotator:review", args=[project.pk]))
