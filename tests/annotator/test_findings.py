"""Findings label sets on a real database: import of multi-label sources (the NIH CSV, a
CheXpert-style CSV with uncertain answers, a ChestMNIST-style npz), per-finding answers with
their audit fields, the targets models train on, and reader agreement per finding."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from annotator import services
from annotator.findings import findings_agreement, findings_answer_create, findings_targets
from annotator.models import Annotation, FindingAnswer, ImportJob, LabelClass, LabelSet, Scan
from annotator.services import AnnotationError
from tests.base import FIXTURES, SHARED_DATA, patient_sides
from tests.conftest import run_import

NIH = SHARED_DATA / "nih_cxr14_subset"


def _chexpert_folder(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "train").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(
            tmp_path / "train" / f"view{i}.png")
    (tmp_path / "chexpert.csv").write_text(
        "Path,Sex,Age,No Finding,Edema,Pleural Effusion\n"
        "train/view0.png,F,70,,1.0,-1.0\n"
        "train/view1.png,M,64,1.0,,\n"
        "train/view2.png,M,51,,-1,\n"
        "train/view3.png,F,33,,,\n")
    return tmp_path / "chexpert.csv"


@pytest.mark.skipif(not NIH.is_dir(), reason="needs ../shared/data/nih_cxr14_subset")
def test_nih_csv_imports_into_a_findings_set_beside_a_single_label_set(project, users):
    brain = run_import(project, FIXTURES / "brain_mri" / "eval", label_set="brain MRI")
    job = run_import(project, f"{NIH}/labels.csv#val", split="eval", label_set="chest findings",
                     created_by=users["dora"])
    assert job.status == ImportJob.Status.SUCCEEDED, job.last_error
    assert (job.imported, job.failed, job.labels_added) == (94, 0, 94)
    chest = LabelSet.objects.get(project=project, name="chest findings")
    assert chest.kind == LabelSet.Kind.MULTI and chest.uncertain_policy == "ignore"
    assert LabelSet.objects.get(project=project, name="brain MRI").kind == "single"
    assert chest.classes.count() == 14 and brain.labels_added == 40
    scans, findings, targets = findings_targets(chest, split="eval")
    assert len(scans) == 94 and targets.shape == (94, 14)
    effusion = [f.name for f in findings].index("Effusion")
    assert int(targets[:, effusion].sum()) == 23                  # the README's val count
    assert int((targets.sum(axis=1) == 0).sum()) == 46            # "No Finding", explicit
    annotation = Annotation.objects.filter(scan=scans[0]).get()
    assert annotation.outcome == "findings" and annotation.reader == users["dora"]
    again = run_import(project, f"{NIH}/labels.csv#val", split="eval", label_set="chest findings")
    assert (again.imported, again.duplicates, again.labels_added) == (0, 94, 0)
    assert Annotation.objects.filter(outcome="findings").count() == 94


def test_chexpert_csv_keeps_uncertain_answers_and_unknowns(project, tmp_path):
    job = run_import(project, _chexpert_folder(tmp_path))
    assert job.status == ImportJob.Status.SUCCEEDED, job.last_error
    assert any("chexpert" in w and "Sex" in w for w in job.warnings)
    findings_set = LabelSet.objects.get(project=project, name="findings")
    scans, findings, targets = findings_targets(findings_set)
    assert [f.name for f in findings] == ["Edema", "Pleural Effusion"]
    assert len(scans) == 3                            # the all-blank row adds no answer
    assert targets[0].tolist() == [1, -1] and targets[1].tolist() == [0, 0]
    assert targets[2][0] == -1 and np.isnan(targets[2][1])
    assert FindingAnswer.objects.filter(state="uncertain").count() == 2


def test_chestmnist_npz_imports_as_findings(project, tmp_path):
    labels = np.zeros((6, 14), np.uint8)
    labels[0, [0, 2]] = 1
    images = np.random.default_rng(1).integers(0, 255, (6, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "chestmnist.npz", test_images=images, test_labels=labels)
    job = run_import(project, f"{tmp_path}/chestmnist.npz#test", split="eval")
    assert (job.imported, job.labels_added) == (6, 6)
    scans, findings, targets = findings_targets(LabelSet.objects.get(name="findings"),
                                                split="eval")
    assert targets[0, [0, 2]].tolist() == [1, 1] and targets[1:].sum() == 0


def test_reader_answers_with_audit_fields_consensus_and_kappa(project, users, tmp_path):
    run_import(project, _chexpert_folder(tmp_path))
    findings_set = LabelSet.objects.get(project=project, name="findings")
    edema, effusion = (LabelClass.objects.get(name=n) for n in ("Edema", "Pleural Effusion"))
    scans = list(Scan.objects.filter(label_set=findings_set).order_by("pk"))
    alice, bob = users["alice"], users["bob"]
    answer = findings_answer_create(scan=scans[3], reader=alice,
                                    states={edema.pk: "present", effusion.pk: "uncertain"},
                                    duration_ms=2400, shown_scores={edema.pk: 0.81,
                                                                    effusion.pk: 0.4})
    assert answer.shown_scores == {str(edema.pk): 0.81, str(effusion.pk): 0.4}
    assert answer.duration_ms == 2400 and answer.findings.count() == 2
    findings_answer_create(scan=scans[3], reader=bob, no_finding=True)
    for scan in scans[:3]:
        findings_answer_create(scan=scan, reader=alice, states={edema.pk: "present"})
        findings_answer_create(scan=scan, reader=bob, states={edema.pk: "present"})
    agreement = findings_agreement(findings_set, alice, bob)
    assert agreement["Edema"]["scans"] == 4 and agreement["Edema"]["agreement"] == 0.75
    assert agreement["Pleural Effusion"]["scans"] == 1
    # scan 3: alice present vs bob absent → a tie, uncertain; an adjudication settles it
    _, findings, targets = findings_targets(findings_set)
    column = [f.pk for f in findings].index(edema.pk)
    assert targets[3, column] == -1
    findings_answer_create(scan=scans[3], reader=users["dora"], states={edema.pk: "absent"},
                           source=Annotation.Source.ADJUDICATION)
    assert findings_targets(findings_set)[2][3, column] == 0


def test_findings_answers_are_checked_and_all_or_nothing(project, users, tmp_path):
    run_import(project, FIXTURES / "brain_mri" / "eval", label_set="brain MRI")
    run_import(project, _chexpert_folder(tmp_path))
    edema = LabelClass.objects.get(name="Edema")
    findings_scan = Scan.objects.filter(label_set__name="findings").first()
    brain_scan = Scan.objects.filter(label_set__name="brain MRI").first()
    before = (Annotation.objects.count(), FindingAnswer.objects.count())
    with pytest.raises(AnnotationError, match="one class per scan"):
        findings_answer_create(scan=brain_scan, reader=users["alice"],
                               states={edema.pk: "present"})
    with pytest.raises(AnnotationError, match="'no finding' together with Edema"):
        findings_answer_create(scan=findings_scan, reader=users["alice"], no_finding=True,
                               states={edema.pk: "present"})
    with pytest.raises(AnnotationError, match="at least one finding"):
        findings_answer_create(scan=findings_scan, reader=users["alice"])
    with pytest.raises(AnnotationError, match="present, absent or uncertain"):
        findings_answer_create(scan=findings_scan, reader=users["alice"],
                               states={edema.pk: "maybe"})
    glioma = LabelClass.objects.get(name="glioma_tumor")
    with pytest.raises(AnnotationError, match="not findings of the label set"):
        findings_answer_create(scan=findings_scan, reader=users["alice"],
                               states={glioma.pk: "present"})
    assert (Annotation.objects.count(), FindingAnswer.objects.count()) == before
    # the kind is fixed once a set holds answers
    with pytest.raises(ValueError, match="can no longer change"):
        services.label_set_create(project=project, name="findings", kind="single")
    with pytest.raises(ValueError, match="can no longer change"):
        services.label_set_create(project=project, name="brain MRI", kind="multi")


def test_project_page_and_admin_show_the_findings_set(client, project, users, tmp_path):
    run_import(project, _chexpert_folder(tmp_path))
    client.force_login(users["alice"])
    page = client.get(f"/projects/{project.pk}/").content.decode()
    assert "findings (present / absent / uncertain per scan" in page
    assert "(1 present)" in page                       # Edema: view0
    client.force_login(users["dora"])
    listing = client.get("/admin/annotator/labelset/").content.decode()
    assert "Findings (any subset per scan" in listing
    annotation = Annotation.objects.filter(outcome="findings").order_by("pk").first()
    change = client.get(f"/admin/annotator/annotation/{annotation.pk}/change/")
    assert change.status_code == 200 and "Pleural Effusion" in change.content.decode()
    assert "Edema, Pleural Effusion?" in client.get("/admin/annotator/annotation/").content.decode()


def test_a_findings_only_project_counts_its_answers_as_labels(client, project, users, tmp_path):
    labels = np.zeros((6, 14), np.uint8)
    labels[0, [0, 2]] = 1
    images = np.random.default_rng(2).integers(0, 255, (6, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "chestmnist.npz", test_images=images, test_labels=labels)
    run_import(project, f"{tmp_path}/chestmnist.npz#test", split="eval")
    client.force_login(users["alice"])
    page = client.get(f"/projects/{project.pk}/").content.decode()
    assert "<b>6</b> labeled" in page                 # findings answers are labels too
    assert "Atelectasis, Effusion</b>" in page and page.count("no finding</b>") == 5
    reports = client.get(f"/projects/{project.pk}/reports/").content.decode()
    assert "6 labeled eval scans will score it" in reports
    assert "--split eval" not in reports                # not "import some eval labels"


def test_a_finding_is_never_recorded_as_a_scans_one_class(project, users, tmp_path):
    from annotator.label_studio.config import labeling_config

    run_import(project, _chexpert_folder(tmp_path))
    scan = Scan.objects.filter(label_set__name="findings").first()
    with pytest.raises(AnnotationError, match="record it as a findings answer"):
        services.annotation_create(scan=scan, reader=users["alice"],
                                   label_class=LabelClass.objects.get(name="Edema"))
    config = labeling_config(project)       # Label Studio asks for findings, not one class
    assert 'name="findings"' in config and 'choice="multiple"' in config
    assert 'name="diagnosis"' not in config


def test_review_page_reports_kappa_per_finding(client, project, users, tmp_path):
    from annotator.findings import findings_agreement_all

    run_import(project, _chexpert_folder(tmp_path))
    findings_set = LabelSet.objects.get(project=project, name="findings")
    edema = LabelClass.objects.get(name="Edema")
    scans = list(Scan.objects.filter(label_set=findings_set).order_by("pk"))
    for number, scan in enumerate(scans):
        for reader, state in ((users["alice"], "present" if number % 2 else "absent"),
                              (users["bob"], "present" if number in (1, 2) else "absent")):
            findings_answer_create(scan=scan, reader=reader, states={edema.pk: state})
    # scans 0–2: alice, bob and the import (3 pairs each); scan 3 had no import answer (1)
    result = findings_agreement_all(findings_set, min_pairs=2)
    edema_row = next(r for r in result["per_finding"] if r["finding"] == edema)
    assert result["scans"] == 4 and edema_row["pairs"] == 3 * 3 + 1
    assert edema_row["kappa"] is not None and 0 <= edema_row["agreement"] <= 1
    client.force_login(users["bob"])
    page = client.get(f"/projects/{project.pk}/review/").content.decode()
    assert "Reader agreement per finding: findings" in page
    assert 'data-kappa-finding="Edema"' in page
    assert 'data-kappa-class="Edema"' not in page           # findings are not classes there


def test_a_findings_import_keys_each_patient_so_an_auto_split_keeps_them_whole(project,
                                                                                 tmp_path):
    """PNG films carry no DICOM identity: the ChestX-ray14 name's patient number is kept as
    a keyed hash (never the number), and ``auto`` puts each patient's films on one side."""
    rng = np.random.default_rng(1)
    (tmp_path / "images").mkdir()
    rows = ["Image Index,Finding Labels"]
    for patient in range(1, 13):
        for film in range(3):
            name = f"{patient:08d}_{film:03d}.png"
            Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(
                tmp_path / "images" / name)
            rows.append(f"{name},{'Mass' if film == 1 else 'No Finding'}")
    (tmp_path / "nih.csv").write_text("\n".join(rows) + "\n")
    job = run_import(project, tmp_path / "nih.csv", split="auto:0.5")
    assert job.status == ImportJob.Status.SUCCEEDED, job.last_error
    scans = list(Scan.objects.filter(project=project))
    assert len(scans) == 36 and all(len(s.patient_key) == 32 for s in scans)
    sides = patient_sides(scans)
    assert len(sides) == 12 and all(len(s) == 1 for s in sides.values())
    assert {split for s in sides.values() for split in s} == {"pool", "eval"}
    assert not any(s.patient_key.startswith("0000") for s in scans)

