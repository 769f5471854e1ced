"""Window/level from the stored values and undo, through the views (the browser side is in
tests/browser/test_viewer_ui.py): a CT's presets in HU, a window rendered from the stored
DICOM, refusals with reasons, and the reader's last answer taken back."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from PIL import Image

from annotator import services
from annotator.models import Annotation, AuditEvent, LabelClass, Scan
from tests.base import FIXTURES, pydicom_test_files
from tests.conftest import run_import


@pytest.fixture
def ct_scan(project, tmp_path):
    source = {p.name: p for p in pydicom_test_files()}["CT_small.dcm"]
    (tmp_path / "ct").mkdir()
    shutil.copy(source, tmp_path / "ct" / "ct.dcm")
    run_import(project, tmp_path / "ct", dataset_name="CT")
    return Scan.objects.get(project=project, modality="CT")


def test_ct_scan_has_hu_presets_and_renders_any_window(ct_scan, client, users):
    from annotator.label_page import window_info

    info = window_info(ct_scan)
    assert info["units"] == "HU" and info["range"][0] < -500 < info["range"][1]
    names = [p["name"] for p in info["presets"]]
    assert names[:2] == ["Default", "Full range"] and "Lung" in names and "Bone" in names
    client.force_login(users["alice"])
    url = info["url"]
    narrow = client.get(url, {"center": 40, "width": 80})         # brain window
    wide = client.get(url, {"center": -600, "width": 1500})       # lung window
    assert narrow.status_code == wide.status_code == 200
    a = np.asarray(Image.open(io.BytesIO(narrow.content)), dtype=float)
    b = np.asarray(Image.open(io.BytesIO(wide.content)), dtype=float)
    assert a.shape == b.shape == (128, 128) and np.abs(a - b).mean() > 20
    # soft tissue (~40 HU) is mid-grey in the brain window, near white in the lung one
    for bad in ({"center": "x", "width": 1}, {"center": 0, "width": 0},
                {"center": 1e9, "width": 10}, {}):
        response = client.get(url, bad)
        assert response.status_code == 400 and response.content
    client.force_login(users["charlie"])                          # not a member
    assert client.get(url, {"center": 40, "width": 80}).status_code == 404


def test_colour_scans_have_no_window(project, client, users):
    run_import(project, FIXTURES / "blood_smear" / "eval" / "basophil", layout="flat")
    scan = Scan.objects.filter(project=project).first()
    from annotator.label_page import window_info

    assert scan.colour and window_info(scan) is None
    client.force_login(users["alice"])
    response = client.get(f"/scans/{scan.pk}/window.png", {"center": 1, "width": 2})
    assert response.status_code == 400 and b"colour" in response.content


def test_undo_takes_back_only_the_readers_last_answer(project, client, users):
    run_import(project, FIXTURES / "brain_mri" / "eval", split="pool", layout="class-folders")
    scans = list(Scan.objects.filter(project=project).order_by("pk")[:2])
    label = LabelClass.objects.filter(project=project).first()
    first = services.annotation_create(scan=scans[0], reader=users["alice"], label_class=label)
    second = services.annotation_create(scan=scans[1], reader=users["alice"], label_class=label)
    theirs = services.annotation_create(scan=scans[0], reader=users["bob"], label_class=label)
    client.force_login(users["alice"])
    url = f"/projects/{project.pk}/answers/{{}}/undo/"
    refused = client.post(url.format(first.pk))
    assert refused.status_code == 409 and "last answer" in refused.json()["error"]
    assert client.post(url.format(theirs.pk)).status_code == 409
    done = client.post(url.format(second.pk))
    assert done.status_code == 200
    assert done.json()["scan_url"] == f"/projects/{project.pk}/label/{scans[1].pk}/"
    assert not Annotation.objects.filter(pk=second.pk).exists()
    assert AuditEvent.objects.filter(action="annotation.deleted",
                                     object_id=str(second.pk)).exists()
    # the one before is now the last: it may be undone in turn
    assert client.post(url.format(first.pk)).status_code == 200
    assert client.get(url.format(theirs.pk)).status_code == 405
