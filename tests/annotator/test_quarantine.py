"""A DICOM that flags burned-in annotation (text in the pixels may identify the patient) is
imported with a warning and quarantined: never queried, exported to Label Studio or shown to
non-admins until an admin releases it."""

from __future__ import annotations

import shutil

import pydicom
import pytest
from django.test import Client
from django.urls import reverse

from annotator import label_studio
from annotator.models import AuditEvent, Scan
from ml_backend import services as ml
from tests.base import FIXTURES, PASSWORD, pydicom_test_files
from tests.conftest import run_import

pytestmark = pytest.mark.django_db


def client_for(user) -> Client:
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    return client


def test_burned_in_scans_are_quarantined_until_released(project, users, tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    ct = next(p for p in pydicom_test_files() if p.name == "CT_small.dcm")
    ds = pydicom.dcmread(ct)
    ds.BurnedInAnnotation = "YES"
    ds.save_as(source / "burned.dcm")
    for path in sorted((FIXTURES / "brain_mri" / "pool" / "no_tumor").iterdir())[:3]:
        shutil.copy(path, source / path.name)
    job = run_import(project, source, layout="flat")
    assert job.imported == 4
    assert any("quarantined" in w and "burned-in" in w for w in job.warnings), job.warnings
    burned = Scan.objects.get(project=project, quarantined=True)
    assert burned.burned_in_annotation and burned.file_format == "dicom"

    alice, dora = client_for(users["alice"]), client_for(users["dora"])
    for name in ("scan_detail", "scan_preview"):
        url = reverse(f"annotator:{name}", args=[burned.pk])
        assert alice.get(url).status_code == 404
        assert dora.get(url).status_code == 200
    assert alice.get(reverse("annotator:label", args=[project.pk, burned.pk])).status_code == 404
    page = alice.get(project.get_absolute_url()).content.decode()
    assert f"scan {burned.pk}\"" not in page and f"#{burned.pk} " not in page

    chosen = ml.query_round_create(project=project, n=10, strategy="random")
    assert chosen.size == 3 and not chosen.items.filter(scan=burned).exists()
    assert burned not in label_studio._scans_to_export(project, "pool")
    assert label_studio.scan_for_token(label_studio.image_token(burned)) is None

    response = dora.post(reverse("admin:annotator_scan_changelist"),
                         {"action": "release_from_quarantine", "_selected_action": [burned.pk]})
    assert response.status_code == 302
    burned.refresh_from_db()
    assert not burned.quarantined
    assert AuditEvent.objects.get(action="scan.released").actor == users["dora"]
    assert alice.get(reverse("annotator:scan_preview", args=[burned.pk])).status_code == 200
