"""The REST API as a team's scripts use it end to end (issue 20's "done means"): a token
lists the worklist, posts labels, triggers a refit and downloads the model as ONNX with its
model card; scans are uploaded and followed; labels pulled as CSV / JSON lines; findings
answered by name or id."""

from __future__ import annotations

import csv
import io
import json
import zipfile

import numpy as np
import pytest

from annotator.models import Annotation, FindingAnswer, ImportJob, LabelClass, Scan
from tests.api.test_api import api
from tests.base import png_bytes, pydicom_test_files
from tests.conftest import brain_truth
from tests.ml_backend.test_findings_refit import FINDINGS, findings_project  # noqa: F401

pytestmark = pytest.mark.django_db


def test_a_script_reads_the_worklist_labels_refits_and_downloads_the_model(
        encoded_project, users, django_capture_on_commit_callbacks):
    import onnxruntime

    from ml_backend.services.artifacts import images_for
    from ml_backend.services.inference import predictor_for

    project = encoded_project
    bob = api(users["bob"])                        # a reviewer's token
    base = f"/api/v1/projects/{project.pk}"
    items = bob.get(f"{base}/worklist/").json()["items"]
    classes = {c["name"]: c["id"] for c in bob.get(f"{base}/classes/").json()["results"]}
    for item in items:
        scan = Scan.objects.get(pk=item["scan"]["id"])
        made = bob.post(f"{base}/annotations/", {
            "scan": scan.pk, "class_id": classes[brain_truth(scan)], "duration_ms": 1200,
            "submission_id": f"script-{scan.pk}"}, content_type="application/json")
        assert made.status_code == 201, made.content
    assert {brain_truth(Scan.objects.get(pk=i["scan"]["id"])) for i in items} == {
        "no_tumor", "pituitary_tumor"}
    with django_capture_on_commit_callbacks(execute=True):
        refit = bob.post(f"{base}/refit/")            # queued, then run by the worker
    assert refit.status_code in (200, 201), refit.content
    project.refresh_from_db()
    model = project.active_model
    assert model is not None and model.num_labels >= len(items)
    listed = bob.get(f"{base}/models/").json()["results"]
    assert model.version in {m["version"] for m in listed}

    # the labels, as a training repo pulls them
    labels = bob.get(f"{base}/labels/", {"format": "csv", "split": "pool"})
    assert labels.status_code == 200 and labels["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(labels.content.decode())))
    assert len(rows) == len(items)
    lines = bob.get(f"{base}/labels/", {"format": "jsonl"}, HTTP_ACCEPT="application/x-ndjson")
    assert lines.status_code == 200 and all(json.loads(line) for line in
                                             lines.content.decode().splitlines())
    assert bob.get(f"{base}/labels/", {"format": "xlsx"}).status_code == 400

    # the model, as a deployment pulls it
    refused = api(users["alice"]).get(f"{base}/models/{model.version}/export/")
    assert refused.status_code == 403 and "reviewer" in refused.json()["detail"]
    assert bob.get(f"{base}/models/nope/export/").status_code == 404
    assert bob.get(f"{base}/models/{model.version}/export/",
                   {"format": "pickle"}).status_code == 400
    encoder = bob.get(f"{base}/models/{project.active_encoder.version}/export/")
    assert encoder.status_code == 409 and "encoder" in encoder.json()["detail"]
    download = bob.get(f"{base}/models/{model.version}/export/", {"format": "onnx"},
                       HTTP_ACCEPT="application/zip")
    assert download.status_code == 200 and download["Content-Type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(b"".join(download.streaming_content)))
    names = archive.namelist()
    card = json.loads(archive.read(f"{model.version}/model-card.json"))
    assert f"{model.version}/model-card.md" in names and card["model"] == model.version
    entry = card["files"][0]
    scans = list(project.scans.filter(split="eval").order_by("pk")[:8])
    images = images_for(scans, entry["input"]["shape"][2], 1).astype(np.float32)[:, None] / 255
    session = onnxruntime.InferenceSession(archive.read(f"{model.version}/{entry['file']}"),
                                           providers=["CPUExecutionProvider"])
    got = session.run(["probabilities"], {"image": images})[0]
    expected = predictor_for(model)(scans)
    order = [c["name"] for c in model.config["classes"]]
    np.testing.assert_allclose(got, expected[:, [order.index(n) for n in entry["classes"]]],
                               atol=1e-4)
    again = bob.get(f"{base}/models/{model.version}/export/")        # made once, then kept
    assert b"".join(again.streaming_content) == b"".join(
        bob.get(f"{base}/models/{model.version}/export/").streaming_content)


def test_a_script_uploads_scans_and_follows_the_import(project, users, settings,
                                                       django_capture_on_commit_callbacks):
    alice = api(users["alice"])
    base = f"/api/v1/projects/{project.pk}"
    ct = {p.name: p for p in pydicom_test_files()}["CT_small.dcm"].read_bytes()
    files = []
    for name, content in (("Doe^John.dcm", ct), ("film.png", png_bytes(seed=3)),
                          ("notes.txt", b"not a scan")):
        handle = io.BytesIO(content)
        handle.name = name
        files.append(handle)
    with django_capture_on_commit_callbacks(execute=True):
        made = alice.post(f"{base}/imports/", {"files": files, "dataset": "scripted",
                                              "split": "pool"})
    assert made.status_code == 202, made.content
    body = made.json()
    assert [r["name"] for r in body["rejected"]] == ["notes.txt"]
    assert "not a DICOM, PNG, JPEG or TIFF" in body["rejected"][0]["reason"]
    job = alice.get(f"/api/v1/imports/{body['id']}/").json()
    assert (job["status"], job["imported"], job["failed"]) == ("succeeded", 2, 0)
    assert "Doe" not in json.dumps(job)                  # a DICOM's name is never shown
    assert Scan.objects.filter(project=project, dataset__name="scripted").count() == 2
    assert list(settings.INCOMING_ROOT.iterdir()) == []
    listed = alice.get(f"{base}/imports/").json()["results"]
    assert listed[0]["id"] == body["id"] and "source" not in listed[0]
    # nothing importable: a problem, no job, nothing staged
    bad = io.BytesIO(b"plain text")
    bad.name = "a.png"
    refused = alice.post(f"{base}/imports/", {"files": [bad], "dataset": "scripted"})
    assert refused.status_code == 400 and "none of the files" in refused.json()["detail"]
    assert ImportJob.objects.filter(project=project).count() == 1
    assert list(settings.INCOMING_ROOT.iterdir()) == []
    assert alice.post(f"{base}/imports/", {"dataset": "x"}).status_code == 400
    settings.UPLOAD_MAX_FILES = settings.DATA_UPLOAD_MAX_NUMBER_FILES = 3
    many = []
    for number in range(4):
        handle = io.BytesIO(png_bytes(seed=number))
        handle.name = f"{number}.png"
        many.append(handle)
    too_many = alice.post(f"{base}/imports/", {"files": many})
    assert too_many.status_code == 400 and too_many["Content-Type"] == "application/problem+json"
    assert "at most 3 files" in too_many.json()["detail"]
    outsider = api(users["charlie"])
    assert outsider.get(f"/api/v1/imports/{body['id']}/").status_code == 404
    assert outsider.post(f"{base}/imports/", {"files": files[:1]}).status_code == 404


def test_findings_answers_by_name_or_id(findings_project, users):  # noqa: F811
    project = findings_project
    alice = api(users["alice"])
    base = f"/api/v1/projects/{project.pk}"
    open_scans = list(project.scans.filter(split="pool").exclude(
        annotations__outcome="findings").order_by("pk")[:3])
    ids = {c.name: c.pk for c in LabelClass.objects.filter(project=project)}
    made = alice.post(f"{base}/annotations/", {
        "scan": open_scans[0].pk,
        "findings": {"glioma_tumor": "present", str(ids["pituitary_tumor"]): "uncertain",
                     "meningioma_tumor": "absent"},
        "shown_scores": {"glioma_tumor": 0.81}, "duration_ms": 4100},
        content_type="application/json")
    assert made.status_code == 201, made.content
    answer = made.json()
    assert answer["outcome"] == "findings" and answer["label"] is None
    assert answer["findings"] == {"glioma_tumor": "present", "meningioma_tumor": "absent",
                                  "pituitary_tumor": "uncertain"}
    assert answer["shown_scores"] == {"glioma_tumor": 0.81}
    stored = Annotation.objects.get(pk=answer["id"])
    assert (stored.reader, stored.duration_ms, stored.shown_preselected) == (
        users["alice"], 4100, True)
    assert dict(FindingAnswer.objects.filter(annotation=stored).values_list(
        "finding__name", "state"))["pituitary_tumor"] == "uncertain"
    none = alice.post(f"{base}/annotations/", {"scan": open_scans[1].pk, "outcome": "findings",
                                              "no_finding": True},
                      content_type="application/json")
    assert none.status_code == 201 and set(none.json()["findings"].values()) == {"absent"}
    unknown = alice.post(f"{base}/annotations/", {"scan": open_scans[2].pk,
                                                 "findings": {"cardiomegaly": "present"}},
                         content_type="application/json")
    assert unknown.status_code == 400
    assert "not a finding" in unknown.json()["detail"] and "glioma_tumor" in unknown.json()["detail"]
    contradiction = alice.post(f"{base}/annotations/", {
        "scan": open_scans[2].pk, "outcome": "findings", "no_finding": True,
        "findings": {"glioma_tumor": "present"}}, content_type="application/json")
    assert contradiction.status_code == 400 and "no finding" in contradiction.json()["detail"]
    bad_state = alice.post(f"{base}/annotations/", {"scan": open_scans[2].pk,
                                                   "findings": {"glioma_tumor": "maybe"}},
                           content_type="application/json")
    assert bad_state.status_code == 400
    as_class = alice.post(f"{base}/annotations/", {"scan": open_scans[2].pk, "outcome": "label",
                                                  "class_id": ids["glioma_tumor"]},
                          content_type="application/json")
    assert as_class.status_code == 400
    listed = alice.get(f"{base}/annotations/", {"reader": "alice", "outcome": "findings"}).json()
    assert [a["id"] for a in listed["results"]] == [answer["id"], none.json()["id"]]
    assert listed["results"][0]["findings"]["glioma_tumor"] == "present"
    by_scan = alice.get(f"{base}/annotations/", {"scan": open_scans[0].pk}).json()
    assert [a["id"] for a in by_scan["results"]] == [answer["id"]]
    assert alice.get(f"{base}/annotations/", {"scan": "x"}).status_code == 400


def test_an_upload_cannot_change_an_existing_datasets_modality_or_body_part(
        project, users, settings, django_capture_on_commit_callbacks):
    """Any clinician uploads; a dataset's modality and body part decide its later imports'
    label set, so an upload naming other values is refused (problem JSON), not obeyed."""
    from annotator import services
    from annotator.models import Dataset

    services.dataset_acquisition_set(project=project, name="PneumoniaMNIST (Guangzhou)",
                                     modality="CR", body_part="CHEST")
    alice = api(users["alice"])
    base = f"/api/v1/projects/{project.pk}"

    def post(**fields):
        handle = io.BytesIO(png_bytes(seed=len(fields) + 40))
        handle.name = "film.png"
        with django_capture_on_commit_callbacks(execute=True):
            return alice.post(f"{base}/imports/", {"files": [handle], "split": "pool",
                                                  "dataset": "PneumoniaMNIST (Guangzhou)",
                                                  **fields})

    refused = post(modality="MR", body_part="BRAIN")
    assert refused.status_code == 400 and refused["Content-Type"] == "application/problem+json"
    detail = refused.json()["detail"]
    assert "holds scans of modality CR, body part CHEST, not modality MR, body part BRAIN" \
        in detail and "leave modality and body part empty" in detail
    assert list(refused.json()["errors"]) == ["dataset"]
    assert post(body_part="brain").status_code == 400                  # one field is enough
    dataset = Dataset.objects.get(project=project, name="PneumoniaMNIST (Guangzhou)")
    assert (dataset.modality, dataset.body_part) == ("CR", "CHEST")
    assert not ImportJob.objects.filter(project=project).exists()
    assert list(settings.INCOMING_ROOT.iterdir()) == []                # nothing kept
    # empty fields keep the dataset's; the same values are no change
    assert post().status_code == 202
    assert post(modality="CR", body_part="Chest ").status_code == 202
    assert Scan.objects.filter(dataset=dataset).count() == 2
    assert set(Scan.objects.filter(dataset=dataset).values_list("modality", "body_part")) == {
        ("CR", "CHEST")}
    # a dataset without a body part yet gets one
    services.dataset_acquisition_set(project=project, name="ward 7", modality="DX")
    handle = io.BytesIO(png_bytes(seed=77))
    handle.name = "w7.png"
    with django_capture_on_commit_callbacks(execute=True):
        filled = alice.post(f"{base}/imports/", {"files": [handle], "dataset": "ward 7",
                                                "modality": "DX", "body_part": "CHEST"})
    assert filled.status_code == 202
    assert Dataset.objects.get(project=project, name="ward 7").body_part == "CHEST"
