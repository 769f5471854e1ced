"""The fast refit on a findings label set, on real scans: the brain-MRI fixtures read as
three findings (glioma, meningioma, pituitary; no tumour = "no finding"), imported from a 0/1
CSV, embedded by the shipped starter encoder. The refit learns every finding from a few
labels, reports per-finding AUC that scikit-learn confirms, saves its thresholds, and the
findings gate holds back a version whose finding regressed."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from django.core.management import call_command
from sklearn.metrics import roc_auc_score

from annotator.findings import findings_answer_create, findings_targets
from annotator.models import Annotation, LabelClass, LabelSet
from ml_backend.models import ModelVersion
from ml_backend.services.findings import findings_head
from ml_backend.services.inference import vectors_for
from tests.base import FIXTURES
from tests.conftest import run_import

FINDINGS = ["glioma_tumor", "meningioma_tumor", "pituitary_tumor"]


def _findings_csv(tmp_path, split: str, per_class: int | None = None):
    """Every fixture scan of ``split``; the first ``per_class`` of each class answered, the
    rest listed with blank answers (imported unlabeled, for the worklist)."""
    folder = tmp_path / split
    rows = ["filename," + ",".join(FINDINGS)]
    for name in FINDINGS + ["no_tumor"]:
        files = sorted((FIXTURES / "brain_mri" / split / name).iterdir())
        for number, path in enumerate(files):
            target = folder / f"{name}-{path.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
            answered = per_class is None or number < per_class
            rows.append(f"{target.name}," + ",".join(
                ("1" if f == name else "0") if answered else "" for f in FINDINGS))
    (folder / "findings.csv").write_text("\n".join(rows) + "\n")
    return folder / "findings.csv"


@pytest.fixture
def findings_project(project, tmp_path, settings):
    pool = run_import(project, _findings_csv(tmp_path, "pool", per_class=12),
                      label_set="brain findings")
    evaluation = run_import(project, _findings_csv(tmp_path, "eval"), split="eval",
                            label_set="brain findings")
    assert pool.labels_added == 48 and evaluation.labels_added == 40
    call_command("pretrain", "--project", project.name, "--epochs", "0", "--no-progress")
    project.refresh_from_db()
    return project


def test_refit_learns_findings_and_reports_per_finding_auc(findings_project):
    project = findings_project
    call_command("refit", project=project.name)
    project.refresh_from_db()
    model = project.active_model
    assert model is not None and model.status == ModelVersion.Status.ACTIVE
    assert "first classifier" in model.status_reason
    label_set = LabelSet.objects.get(project=project, name="brain findings")
    entry = model.config["findings_sets"][0]
    assert entry["uncertain_policy"] == "ignore" and entry["num_scans"] == 48
    assert sorted(entry["learnable"]) == FINDINGS
    head = findings_head(model, label_set.pk)
    scans, findings, targets = findings_targets(label_set, split="eval")
    proba = head.predict_proba(vectors_for(project.active_encoder, scans))
    report = model.metrics["training"]["findings"]["brain findings"]
    for f, finding in enumerate(findings):
        expected = roc_auc_score(targets[:, f], proba[:, f])
        assert report["per_finding"][finding.name]["auc"] == pytest.approx(expected)
        # learned from 12 positives, scored on the few eval scans: well above chance (0.5);
        # meningioma was 0.69 on the starter shipped in the fourteenth session
        assert expected > 0.65, (finding.name, expected)
        assert report["per_finding"][finding.name]["threshold"] == pytest.approx(
            entry["thresholds"][finding.name])
    assert report["macro_auc"] > 0.8 and report["any_finding_auc"] is not None


def test_findings_gate_holds_back_a_regressed_finding(findings_project, users):
    project = findings_project
    call_command("refit", project=project.name)
    project.refresh_from_db()
    first = project.active_model
    # a reviewer's adjudications turn every pool pituitary into "absent" and every glioma
    # into "pituitary present": the next head can no longer find pituitary tumours
    label_set = LabelSet.objects.get(project=project, name="brain findings")
    pituitary = LabelClass.objects.get(name="pituitary_tumor")
    glioma = LabelClass.objects.get(name="glioma_tumor")
    scans, findings, targets = findings_targets(label_set, split="pool")
    column = {f.pk: i for i, f in enumerate(findings)}
    for scan, row in zip(scans, targets):
        if row[column[pituitary.pk]] == 1 or row[column[glioma.pk]] == 1:
            findings_answer_create(
                scan=scan, reader=users["bob"], source=Annotation.Source.ADJUDICATION,
                states={pituitary.pk: "absent" if row[column[pituitary.pk]] == 1 else "present"})
    call_command("refit", project=project.name)
    project.refresh_from_db()
    candidate = ModelVersion.objects.filter(project=project).order_by("-pk").first()
    assert project.active_model == first                        # not promoted
    assert candidate.status == ModelVersion.Status.READY
    assert "pituitary_tumor" in candidate.status_reason and "held back" in candidate.status_reason
    gate = candidate.metrics["findings_gate"]["brain findings"]
    assert gate["per_finding"]["pituitary_tumor"]["status"] == "regressed"
    assert gate["per_finding"]["meningioma_tumor"]["status"] in ("kept", "not judged")
    assert np.isfinite(gate["per_finding"]["pituitary_tumor"]["delta"])


def test_worklist_asks_about_the_findings_the_model_is_unsure_of(findings_project, users):
    from annotator.labeling import describe_reason
    from ml_backend.models import QueryRound
    from ml_backend.services import query_round_create

    project = findings_project
    project.query_strategy = "entropy"
    project.save()
    call_command("refit", project=project.name)
    round_ = query_round_create(project=project, n=6)
    assert QueryRound.objects.filter(pk=round_.pk).exists() and round_.size == 6
    items = list(round_.items.order_by("rank"))
    answered = set(Annotation.objects.filter(outcome="findings").values_list("scan_id",
                                                                             flat=True))
    assert not {item.scan_id for item in items} & answered      # never an answered scan
    scores = [item.score for item in items]
    assert scores == sorted(scores, reverse=True)
    reason = items[0].reason
    assert reason["why"].startswith("most unsure over its findings")
    assert {u["name"] for u in reason["unsure"]} <= set(FINDINGS)
    assert "unsure about" in " ".join(describe_reason(reason, items[0].score)["details"])


def test_report_command_prints_the_per_finding_table(findings_project, capsys):
    import json

    call_command("refit", project=findings_project.name)
    capsys.readouterr()
    call_command("report", "--project", findings_project.name)
    out = capsys.readouterr().out
    assert "## Findings: brain findings" in out and "| pituitary_tumor |" in out
    assert "sensitivity | specificity" in out and "Findings learning curve" in out
    call_command("report", "--project", findings_project.name, "--format", "json")
    data = json.loads(capsys.readouterr().out)
    per = data["findings"]["brain findings"]["per_finding"]
    assert set(per) == set(FINDINGS) and data["findings_curve"][0]["macro_auc"] > 0.8


def test_reports_page_shows_findings(findings_project, client, users):
    call_command("refit", project=findings_project.name)
    client.force_login(users["alice"])
    page = client.get(f"/projects/{findings_project.pk}/reports/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "Findings: brain findings" in html and "Any-finding AUC" in html
    assert "<td>pituitary_tumor</td>" in html and "No evaluation for" not in html
    import re

    # the learning curve per finding: this version's AUC of each finding in its row
    findings_project.refresh_from_db()
    per = findings_project.active_model.metrics["training"]["findings"]["brain findings"]["per_finding"]
    curve = html.split('class="grid report-table findings-curve"')[1].split("</table>")[0]
    assert "<th>glioma_tumor AUC</th>" in curve
    for finding in FINDINGS:
        assert f"<td>{per[finding]['auc']:.3f}</td>" in curve

    links = re.findall(r'href="([^"]*finding_reliability[^"]*)"', html)
    assert len(links) == 3
    chart = client.get(links[0].replace("&amp;", "&"))
    assert chart.status_code == 200 and chart.content[:4] == b"\x89PNG"
    missing = client.get(f"/projects/{findings_project.pk}/reports/finding_reliability.png"
                         "?set=brain+findings&finding=nope")
    assert missing.status_code == 404


def test_thresholds_by_a_target_sensitivity_set_on_the_label_set(findings_project):
    project = findings_project
    label_set = LabelSet.objects.get(project=project, name="brain findings")
    label_set.threshold_rule, label_set.target_sensitivity = "sensitivity", 0.95
    label_set.save()
    call_command("refit", project=project.name)
    project.refresh_from_db()
    entry = project.active_model.config["findings_sets"][0]
    assert "sensitivity >= 0.95" in entry["threshold_rule"]
    report = project.active_model.metrics["training"]["findings"]["brain findings"]
    for finding in FINDINGS:            # 10 eval positives each: the target holds on eval
        assert report["per_finding"][finding]["sensitivity"] >= 0.95


@pytest.mark.sqlite_pass
def test_finetune_a_findings_network_and_serve_it(findings_project, users):
    """`finetune --label-set` trains per-finding sigmoid outputs on the findings set; the
    version carries its thresholds and per-finding report, and the label page and the
    worklist score scans with it."""
    from annotator.label_page import label_payload
    from ml_backend.services import query_round_create

    project = findings_project
    call_command("finetune", "--project", project.name, "--label-set", "brain findings",
                 "--epochs", "2", "--batch-size", "16", "--no-progress")
    project.refresh_from_db()
    model = project.active_model
    assert model.config["kind"] == "finetuned-findings" and model.status == "active"
    entry = model.config["findings_sets"][0]
    assert entry["net"].endswith(".pt") and set(entry["thresholds"]) == set(FINDINGS)
    report = model.metrics["training"]["findings"]["brain findings"]
    assert report["macro_auc"] > 0.7
    scan = project.scans.filter(split="pool").exclude(annotations__outcome="findings").first()
    payload = label_payload(project=project, scan=scan)
    assert payload["findings_model"] == model.version
    assert all(row["p"] is not None for row in payload["findings"])
    assert query_round_create(project=project, n=3).size == 3
    from ml_backend.services.inference import scan_gradcam

    pituitary = LabelClass.objects.get(name="pituitary_tumor")
    assert scan_gradcam(scan=scan, class_id=pituitary.pk)[:4] == b"\x89PNG"
    with pytest.raises(Exception, match="not a findings label set"):
        call_command("finetune", "--project", project.name, "--label-set", "nope")
    # step 3: the distilled student of the findings network, gated and served the same way
    call_command("distill", "--project", project.name, "--epochs", "1", "--batch-size", "32",
                 "--no-progress")
    student = ModelVersion.objects.filter(project=project).order_by("-pk").first()
    assert student.config["kind"] == "distilled-findings"
    assert student.config["teacher"] == model.version
    assert student.metrics["training"]["findings"]["brain findings"]["macro_auc"] > 0.7
    assert student.status in ("active", "ready")


def test_grad_cam_of_a_refit_finding(findings_project):
    from ml_backend.services.inference import scan_gradcam

    call_command("refit", project=findings_project.name)
    findings_project.refresh_from_db()
    scan = findings_project.scans.filter(split="eval").first()
    glioma = LabelClass.objects.get(name="glioma_tumor")
    assert scan_gradcam(scan=scan, class_id=glioma.pk)[:4] == b"\x89PNG"


def test_a_finding_added_mid_project_gets_candidates_and_is_learned(findings_project, client,
                                                                    users):
    """The new-anomaly flow for findings: a reviewer adds a finding to the set, confirms two
    candidates as present, the class page lists the nearest unread scans, and the next refit
    has a head for the new finding."""
    from annotator import services

    project = findings_project
    label_set = LabelSet.objects.get(project=project, name="brain findings")
    new, _ = services.label_class_get_or_create(project=project, name="mass_effect",
                                                label_set=label_set, created_by=users["bob"])
    unread = list(project.scans.filter(split="pool").exclude(annotations__outcome="findings")
                  .order_by("pk"))
    client.force_login(users["bob"])
    for scan in unread[:3]:
        response = client.post(f"/projects/{project.pk}/classes/{new.pk}/confirm/",
                               {"scan": scan.pk})
        assert response.status_code == 201, response.content
    answer = Annotation.objects.filter(scan=unread[0], reader=users["bob"]).get()
    assert answer.outcome == "findings"
    assert list(answer.findings.values_list("finding__name", "state")) == [("mass_effect",
                                                                            "present")]
    page = client.get(f"/projects/{project.pk}/classes/{new.pk}/").content.decode()
    assert page.count(f"/scans/{unread[0].pk}/") >= 1          # an example of the finding
    from ml_backend.services import class_candidates

    candidates = class_candidates(label_class=new, k=5)
    assert len(candidates["neighbours"]) == 5 and candidates["propagated"] == []
    assert not {c["scan"] for c in candidates["neighbours"]} & {s.pk for s in unread[:3]}
    # scans read for other findings say nothing about mass_effect (unknown, not absent); it is
    # learnable once it has absent answers too
    for scan in unread[3:6]:
        client.post(f"/projects/{project.pk}/classes/{new.pk}/confirm/", {"scan": scan.pk})
    from annotator.findings import findings_answer_create

    for scan in unread[6:12]:
        findings_answer_create(scan=scan, reader=users["alice"], no_finding=True)
    # with scans read present and absent, label propagation ranks the unread ones too
    spread = class_candidates(label_class=new, k=5)["propagated"]
    assert len(spread) == 5 and not {c["scan"] for c in spread} & {s.pk for s in unread[:12]}
    assert all(0 <= c["probability"] <= 1 for c in spread)
    assert spread == sorted(spread, key=lambda c: -c["probability"])
    call_command("refit", project=project.name)
    project.refresh_from_db()
    entry = project.active_model.config["findings_sets"][0]
    assert "mass_effect" in entry["learnable"]


def _onnx_findings(path, scans, size: int) -> np.ndarray:
    import onnxruntime

    from ml_backend.services.artifacts import images_for

    images = images_for(scans, size, 1).astype(np.float32)[:, None] / 255.0
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"image": images})[0]


def test_findings_heads_export_as_onnx_with_their_thresholds(findings_project, tmp_path):
    """A refit version's findings heads leave the building: the ONNX file gives the same
    per-finding probabilities as the product (within 1e-4) on real scans, and the model card
    carries each finding's threshold and eval report."""
    import json

    from ml_backend.services.findings import findings_scorer

    project = findings_project
    call_command("refit", project=project.name)
    project.refresh_from_db()
    model = project.active_model
    call_command("export_model", "--project", project.name, "--format", "onnx",
                 "--out", str(tmp_path / "onnx"))
    card = json.loads((tmp_path / "onnx" / "model-card.json").read_text())
    [entry] = card["files"]
    assert entry["kind"] == "findings" and entry["label_set"] == "brain findings"
    assert entry["classes"] == FINDINGS and entry["max_difference"] <= 1e-4
    assert entry["thresholds"] == pytest.approx(model.config["findings_sets"][0]["thresholds"])
    evaluation = card["findings_evaluation"]["brain findings"]
    assert evaluation["eval_scans"] == 40 and evaluation["macro_auc"] > 0.8
    assert "reliability" not in evaluation["per_finding"]["glioma_tumor"]
    markdown = (tmp_path / "onnx" / "model-card.md").read_text()
    assert "### Findings: brain findings" in markdown and "glioma_tumor ≥" in markdown
    label_set = LabelSet.objects.get(project=project, name="brain findings")
    scans = list(project.scans.filter(split="eval").order_by("pk")[:12])
    scorer = findings_scorer(model, label_set.pk)
    got = _onnx_findings(tmp_path / "onnx" / entry["file"], scans, entry["input"]["shape"][2])
    np.testing.assert_allclose(got, scorer.predict(scans), atol=1e-4)


@pytest.mark.sqlite_pass
def test_a_fine_tuned_findings_network_exports_as_onnx_and_torchscript(findings_project,
                                                                       tmp_path):
    import json

    import torch

    from ml_backend.services.findings import findings_scorer

    project = findings_project
    call_command("finetune", "--project", project.name, "--label-set", "brain findings",
                 "--epochs", "1", "--batch-size", "16", "--no-progress")
    project.refresh_from_db()
    model = project.active_model
    assert model.config["kind"] == "finetuned-findings"
    call_command("export_model", "--project", project.name, "--out", str(tmp_path / "onnx"))
    card = json.loads((tmp_path / "onnx" / "model-card.json").read_text())
    [entry] = card["files"]
    assert entry["kind"] == "findings" and set(entry["thresholds"]) == set(FINDINGS)
    label_set = LabelSet.objects.get(project=project, name="brain findings")
    scans = list(project.scans.filter(split="pool").order_by("pk")[:10])
    got = _onnx_findings(tmp_path / "onnx" / entry["file"], scans, entry["input"]["shape"][2])
    np.testing.assert_allclose(got, findings_scorer(model, label_set.pk).predict(scans),
                               atol=1e-4)
    call_command("export_model", "--project", project.name, "--format", "torchscript",
                 "--out", str(tmp_path / "ts"))
    card = json.loads((tmp_path / "ts" / "model-card.json").read_text())
    network = torch.jit.load(str(tmp_path / "ts" / card["files"][0]["file"]))
    size = card["files"][0]["input"]["shape"][2]
    out = network(torch.rand(2, 1, size, size))
    assert out.shape == (2, 3) and bool(((out >= 0) & (out <= 1)).all())


@pytest.mark.sqlite_pass
def test_findings_networks_beside_class_heads_in_a_mixed_project(findings_project, users,
                                                                tmp_path):
    """A chest single-label set beside the brain findings set: fine-tuning (and distilling)
    the findings network gives a version with the chest class heads beside the network; a
    later refit keeps the network where it still beats the new heads, so the loop neither
    drops it nor stalls on it."""
    import json

    from ml_backend import services as ml
    from ml_backend.services.findings import findings_scorer
    from ml_backend.services.inference import predictor_for, scan_gradcam

    project = findings_project
    for name in ("normal", "pneumonia"):
        for split in ("eval", "pool"):
            run_import(project, FIXTURES / "chest_xray" / split / name, layout="flat",
                       split=split, default_label=name, dataset_name="chest",
                       label_set="chest x-ray")
    call_command("refit", project=project.name)
    project.refresh_from_db()
    assert project.active_model.config["kind"] == "head"
    call_command("finetune", "--project", project.name, "--label-set", "brain findings",
                 "--epochs", "2", "--batch-size", "16", "--no-progress")
    model = ModelVersion.objects.filter(project=project).order_by("-pk").first()
    assert model.config["kind"] == "head" and model.config["findings_networks"] == [
        "brain findings"]
    assert "finetune" in model.config and model.metrics["finetuned-findings"]
    assert [s["name"] for s in model.config["label_sets"]] == ["chest x-ray"]
    [entry] = model.config["findings_sets"]
    assert entry["net"] and set(entry["thresholds"]) == set(FINDINGS)
    chest = list(project.scans.filter(label_set__name="chest x-ray", split="eval")[:4])
    brain = list(project.scans.filter(label_set__name="brain findings", split="eval")[:4])
    proba = predictor_for(model)(chest)
    assert proba.shape[0] == 4 and np.allclose(proba.sum(axis=1), 1, atol=1e-5)
    findings_set = LabelSet.objects.get(project=project, name="brain findings")
    assert findings_scorer(model, findings_set.pk).predict(brain).shape == (4, 3)
    glioma = LabelClass.objects.get(project=project, name="glioma_tumor")
    assert scan_gradcam(scan=brain[0], class_id=glioma.pk, model=model)[:4] == b"\x89PNG"
    assert model.metrics["training"]["findings"]["brain findings"]["macro_auc"] > 0.6
    call_command("export_model", "--project", project.name, "--model-version", model.version,
                 "--out", str(tmp_path / "mixed"))
    card = json.loads((tmp_path / "mixed" / "model-card.json").read_text())
    assert sorted((f["label_set"], f["kind"]) for f in card["files"]) == [
        ("brain findings", "findings"), ("chest x-ray", "classes")]

    # the network made active by hand; the next refit keeps whichever scores the set better
    project.refresh_from_db()
    if project.active_model_id != model.pk:
        ml.model_version_promote(model, actor=users["dora"], reason="test: promoted by hand")
    project.refresh_from_db()
    assert project.active_model == model
    net_auc = model.metrics["training"]["findings"]["brain findings"]["macro_auc"]
    call_command("refit", project=project.name)
    refit = ModelVersion.objects.filter(project=project).order_by("-pk").first()
    [carried] = refit.config["findings_sets"]
    refit_auc = refit.metrics["training"]["findings"]["brain findings"]["macro_auc"]
    assert refit_auc >= net_auc - 1e-9           # never worse than the network it replaces
    if "net" in carried:
        assert (Path(refit.artifact_dir) / carried["net"]).exists()
        assert refit.status == "active"
    # distilling the network in a mixed project: the student sits beside the class heads too
    project.refresh_from_db()
    call_command("distill", "--project", project.name, "--teacher", model.pk,
                 "--epochs", "1", "--batch-size", "32", "--no-progress")
    student = ModelVersion.objects.filter(project=project).order_by("-pk").first()
    assert student.config["kind"] == "head" and student.config["teacher"] == model.version
    assert student.config["findings_networks"] == ["brain findings"]
    assert [s["name"] for s in student.config["label_sets"]] == ["chest x-ray"]
