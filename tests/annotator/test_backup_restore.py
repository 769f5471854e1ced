"""A backup keeps what protects patients and how the project reads: quarantine (and who
released a scan from it), every project, label set and dataset setting, findings answers.
A restore trusts nothing in the archive: a hostile or broken backup is refused in seconds
with a message that names the problem, and leaves the database, MEDIA_ROOT and
ARTIFACTS_ROOT exactly as they were (nothing written outside them either)."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from django.apps import apps
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import Client
from django.urls import reverse

from annotator import backup, findings, services, storage
from annotator.models import (
    Annotation,
    AuditEvent,
    Dataset,
    LabelClass,
    LabelSet,
    Project,
    Scan,
)
from ml_backend.models import ModelVersion
from tests.base import FIXTURES, PASSWORD, pydicom_test_files
from tests.conftest import run_import

pytestmark = pytest.mark.django_db

SETTINGS = {"readers_per_scan": 2, "blind_second_readers": False,
            "disagreement_rule": "hold_out", "colour_mode": "grey", "dicom_grouping": "series",
            "label_studio_push_rounds": False, "label_studio_prelabel": True,
            "query_strategy": "margin", "query_batch_size": 7, "refit_every": 4,
            "gate_tolerance": 0.05, "novelty_percentile": 95.0,
            "clinicians_can_add_classes": False, "description": "double-read brain MRI",
            "label_studio_project_id": 41}


def client_for(user) -> Client:
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    return client


@pytest.fixture
def backed_up(project, users, tmp_path):
    """A project that reads twice, blind, holds out disagreements, in greyscale; a findings
    label set; three brain MRI scans (one with a findings answer by alice), a burned-in MR
    that is quarantined and a burned-in CT that dora released; exported to an archive."""
    source = tmp_path / "in"
    source.mkdir()
    for name in ("MR_small.dcm", "CT_small.dcm"):
        ds = pydicom.dcmread(next(p for p in pydicom_test_files() if p.name == name))
        ds.BurnedInAnnotation = "YES"
        ds.save_as(source / name)
    for path in sorted((FIXTURES / "brain_mri" / "pool" / "no_tumor").iterdir())[:3]:
        shutil.copy(path, source / path.name)
    assert run_import(project, source, layout="flat", dataset_name="brain").imported == 5
    label_set = services.label_set_create(project=project, name="Brain findings", kind="multi",
                                          uncertain_policy="zeros",
                                          datasets=[Dataset.objects.get(project=project)])
    LabelSet.objects.filter(pk=label_set.pk).update(threshold_rule="sensitivity",
                                                    target_sensitivity=0.8)
    mass = LabelClass.objects.create(project=project, label_set=label_set, name="mass",
                                     hotkey="1", color="#aa0000", created_by=users["bob"])
    oedema = LabelClass.objects.create(project=project, label_set=label_set, name="oedema",
                                       hotkey="2", order=1)
    Project.objects.filter(pk=project.pk).update(**SETTINGS)
    project.refresh_from_db()

    ct = Scan.objects.get(project=project, modality="CT")
    response = client_for(users["dora"]).post(
        reverse("admin:annotator_scan_changelist"),
        {"action": "release_from_quarantine", "_selected_action": [ct.pk]})
    assert response.status_code == 302
    scan = Scan.objects.filter(project=project, file_format="jpeg").order_by("pk").first()
    findings.findings_answer_create(
        scan=scan, reader=users["alice"], states={mass.pk: "present", oedema.pk: "uncertain"},
        shown_scores={mass.pk: 0.7, oedema.pk: 0.2}, shown_preselected=False, duration_ms=900)
    assert Scan.objects.filter(project=project, quarantined=True).count() == 1

    archive = tmp_path / "backup.tar.gz"
    call_command("project_export", project=project.name, out=str(archive), stdout=io.StringIO())
    return project, archive


def restore(archive, name: str) -> tuple[Project, str]:
    out = io.StringIO()
    call_command("project_import", str(archive), name=name, no_embed=True, stdout=out)
    return Project.objects.get(name=name), out.getvalue()


def rows(model, project, fields, key):
    return {getattr(r, key): {f: getattr(r, f) for f in fields}
            for r in model.objects.filter(project=project)}


def test_quarantine_release_and_every_setting_survive_a_restore(backed_up, users):
    original, archive = backed_up
    copy, out = restore(archive, "Restored copy")

    for field in backup.PROJECT_FIELDS:
        if field != "label_studio_project_id":
            assert getattr(copy, field) == getattr(original, field), field
    # the copy is not linked to the original's Label Studio project (it says so) ...
    assert copy.label_studio_project_id is None and "Label Studio project 41" in out
    assert copy.created_by == users["dora"]
    for model, fields, key in ((LabelSet, backup.LABEL_SET_FIELDS, "name"),
                               (Dataset, backup.DATASET_FIELDS, "name"),
                               (Scan, backup.SCAN_FIELDS + ("file", "preview"), "sha256"),
                               (LabelClass, backup.CLASS_FIELDS + ("created_by",), "name")):
        assert rows(model, copy, fields, key) == rows(model, original, fields, key), model
    assert rows(LabelSet, copy, ("kind", "threshold_rule"), "name") == {
        "Brain findings": {"kind": "multi", "threshold_rule": "sensitivity"}}
    assert sorted(copy.memberships.values_list("user__username", "role")) == sorted(
        original.memberships.values_list("user__username", "role"))

    # quarantine holds: the burned-in MR is hidden from alice; the CT dora released stays
    # released, and the restored audit trail says who released it
    mr = Scan.objects.get(project=copy, modality="MR")
    ct = Scan.objects.get(project=copy, modality="CT")
    assert mr.burned_in_annotation and mr.quarantined
    assert ct.burned_in_annotation and not ct.quarantined
    alice = client_for(users["alice"])
    assert alice.get(reverse("annotator:scan_preview", args=[mr.pk])).status_code == 404
    assert alice.get(reverse("annotator:scan_preview", args=[ct.pk])).status_code == 200
    release = AuditEvent.objects.get(project=copy, action="scan.released")
    assert (release.object_id, release.actor) == (str(ct.pk), users["dora"])
    assert release.created_at == AuditEvent.objects.get(project=original,
                                                        action="scan.released").created_at

    # the findings answer, with its findings and the scores shown (new class ids)
    answer = Annotation.objects.get(project=copy)
    classes = {c.pk: c.name for c in copy.label_classes.all()}
    assert (answer.outcome, answer.reader, answer.shown_preselected, answer.duration_ms) == (
        "findings", users["alice"], False, 900)
    assert sorted((f.finding.name, f.state) for f in answer.findings.all()) == [
        ("mass", "present"), ("oedema", "uncertain")]
    assert {classes[int(k)]: v for k, v in answer.shown_scores.items()} == {
        "mass": 0.7, "oedema": 0.2}

    # ... and a restore where no other project holds it keeps the link
    Project.objects.filter(pk=original.pk).update(label_studio_project_id=None)
    third, out = restore(archive, "Third copy")
    assert third.label_studio_project_id == 41 and "Label Studio" not in out


def test_an_old_backup_restores_with_defaults_and_burned_in_scans_quarantined(backed_up,
                                                                              tmp_path):
    """A version-1 backup (before quarantine and the reading settings were kept)."""
    _, archive = backed_up

    def as_version_1(m):
        m["version"] = 1
        m["project"] = {k: m["project"][k] for k in (
            "name", "description", "query_strategy", "query_batch_size", "refit_every",
            "gate_tolerance", "novelty_percentile", "clinicians_can_add_classes",
            "active_model", "active_encoder")}
        for row in m["scans"]:
            for key in ("quarantined", "released", "colour", "display", "slices"):
                row.pop(key)
        for row in m["label_sets"]:
            for key in ("kind", "uncertain_policy", "threshold_rule", "target_sensitivity"):
                row.pop(key)
        for row in m["classes"]:
            row.pop("created_by")
        m["annotations"] = []

    copy, out = restore(repack(archive, tmp_path / "v1.tar.gz", as_version_1), "From v1")
    defaults = Project()
    for field in ("readers_per_scan", "disagreement_rule", "dicom_grouping",
                  "blind_second_readers", "label_studio_prelabel"):
        assert getattr(copy, field) == getattr(defaults, field), field
    # colour is not in a version-1 backup: read from the scans (greyscale MR, CT, JPEG)
    assert copy.colour_mode == "grey" and not copy.scans.filter(colour=True).exists()
    assert "does not record colour: by their previews 0 of 5 scan(s) are colour" in out
    assert copy.query_batch_size == 7
    # fail safe: without a record of their release, both burned-in scans are quarantined
    assert sorted(copy.scans.filter(quarantined=True).values_list("modality", flat=True)) == [
        "CT", "MR"]
    assert not copy.scans.filter(burned_in_annotation=False, quarantined=True).exists()


def test_a_burned_in_scan_without_a_release_record_comes_back_quarantined(backed_up,
                                                                         tmp_path):
    _, archive = backed_up

    def unquarantine(m):
        for row in m["scans"]:
            if row["burned_in_annotation"]:
                row["quarantined"], row["released"] = False, None

    copy, out = restore(repack(archive, tmp_path / "x.tar.gz", unquarantine), "Crafted")
    assert copy.scans.filter(burned_in_annotation=True, quarantined=True).count() == 2
    assert out.count("flags burned-in annotation") == 2
    assert not AuditEvent.objects.filter(project=copy, action="scan.released").exists()


def test_an_active_model_without_its_files_restores_retired_with_a_warning(backed_up,
                                                                           tmp_path):
    _, archive = backed_up

    def add_model(m):
        m["models"] = [{"version": "clf-7", "kind": "classifier", "status": "active",
                        "status_reason": "promoted", "parent": None, "config": {},
                        "num_labels": 4, "metrics": {}, "created_at": "2025-01-02T03:04:05+00:00",
                        "promoted_at": None, "evaluations": []}]
        m["project"]["active_model"] = "clf-7"

    copy, out = restore(repack(archive, tmp_path / "m.tar.gz", add_model), "No files")
    model = ModelVersion.objects.get(version="clf-7")
    assert model.status == "retired" and "without its files" in model.status_reason
    assert copy.active_model is None
    assert "warning: model clf-7 has no files in the backup" in out


def test_every_field_is_backed_up_or_named_as_left_out():
    """A model that gains a field fails here until the backup carries it (or says why not):
    the settings lost by version 1 were fields added after the backup was written."""
    copied = {Project: backup.PROJECT_FIELDS, Dataset: backup.DATASET_FIELDS,
              LabelSet: backup.LABEL_SET_FIELDS, LabelClass: backup.CLASS_FIELDS,
              Scan: backup.SCAN_FIELDS, Annotation: backup.ANNOTATION_FIELDS,
              ModelVersion: backup.MODEL_FIELDS,
              apps.get_model("ml_backend", "Evaluation"): backup.EVALUATION_FIELDS}
    for model, how in backup.OTHERWISE.items():
        fields = {f.name for f in model._meta.concrete_fields} | {
            f.name for f in model._meta.many_to_many}
        missing = fields - set(copied.get(model, ())) - set(how)
        assert not missing, f"{model.__name__}: {sorted(missing)} neither backed up nor named"
    assert set(copied) <= set(backup.OTHERWISE)


# --- hostile and broken backups ---------------------------------------------------------


BIG = "__1e999__"       # a manifest value written as 1e999 (which json reads as Infinity)


def repack(archive: Path, out: Path, mutate=None, extra=(), drop=()) -> Path:
    """A copy of ``archive`` with its manifest changed by ``mutate``, members named in
    ``drop`` left out and the TarInfo/bytes pairs of ``extra`` added. The manifest is written
    as Python's json does (Infinity, NaN as such; ``BIG`` as 1e999)."""
    with tarfile.open(archive) as tar, tarfile.open(out, "w:gz") as new:
        for member in tar.getmembers():
            if member.name in drop:
                continue
            data = tar.extractfile(member).read()
            if member.name == "manifest.json" and mutate is not None:
                manifest = json.loads(data)
                mutate(manifest)
                data = json.dumps(manifest).replace(f'"{BIG}"', "1e999").encode()
                member.size = len(data)
            new.addfile(member, io.BytesIO(data))
        for info, data in extra:
            new.addfile(info, io.BytesIO(data) if data is not None else None)
    return out


def member(name: str, data: bytes = b"x", **attrs) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.size = len(data) if attrs.get("type", tarfile.REGTYPE) == tarfile.REGTYPE else 0
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data if info.size else None


def world(settings) -> dict:
    """Every row count and every file and folder under MEDIA_ROOT and ARTIFACTS_ROOT (but the
    restore's lock file, empty, which stays once made, as the model export's do)."""
    counts = {m._meta.label: m.objects.count() for app in ("annotator", "ml_backend", "auth")
              for m in apps.get_app_config(app).get_models()}
    tree = {str(root): sorted(str(p.relative_to(root)) for p in Path(root).rglob("*")
                              if p != Path(settings.ARTIFACTS_ROOT) / backup.RESTORE_LOCK)
            for root in (settings.MEDIA_ROOT, settings.ARTIFACTS_ROOT)}
    return {"rows": counts, "files": tree}


def first_scan(key, value):
    def mutate(m):
        m["scans"][0][key] = value
    return mutate


def hostile_model(version):
    def mutate(m):
        m["models"] = [{"version": version, "kind": "encoder", "status": "ready",
                        "status_reason": "", "parent": None, "config": {}, "num_labels": 0,
                        "metrics": {}, "created_at": None, "promoted_at": None,
                        "evaluations": []}]
    return mutate


def a_model(**changes):
    """The manifest's models: one encoder (no files), with ``changes``."""
    def mutate(m):
        hostile_model("enc-9")(m)
        m["models"][0].update(changes)
    return mutate


def findings_answer_as(**changes):
    """The backup's findings answer (alice's, on a Brain findings scan) with ``changes``."""
    def mutate(m):
        m["annotations"][0].update(changes)
    return mutate


def two_single_sets(label, suggestion, *, findings_scan_to=None):
    """As the probe's project: two single-label sets beside the findings set, Chest X-ray
    (normal, pneumonia) and Brain MRI (glioma_tumor, meningioma_tumor); one scan moved to
    Chest X-ray and answered with ``label``, shown ``suggestion``. ``findings_scan_to``: the
    findings answer's scan moved to that set too."""
    def mutate(m):
        m["label_sets"] += [{"id": 901, "name": "Chest X-ray", "kind": "single", "datasets": []},
                            {"id": 902, "name": "Brain MRI", "kind": "single", "datasets": []}]
        for i, (name, label_set) in enumerate((("normal", "Chest X-ray"),
                                               ("pneumonia", "Chest X-ray"),
                                               ("glioma_tumor", "Brain MRI"),
                                               ("meningioma_tumor", "Brain MRI"))):
            m["classes"].append({"id": 911 + i, "label_set": label_set, "name": name,
                                 "hotkey": str(i % 2 + 1), "created_by": None})
        answered = m["annotations"][0]
        scan = next(s for s in m["scans"]
                    if not s["quarantined"] and s["sha256"] != answered["scan"])
        scan["label_set"] = "Chest X-ray"
        m["annotations"].append(dict(
            answered, scan=scan["sha256"], outcome="label", label=label,
            shown_suggestion=suggestion, findings=[], shown_scores=None, shown_confidence=0.8))
        if findings_scan_to:
            next(s for s in m["scans"] if s["sha256"] == answered["scan"])["label_set"] = \
                findings_scan_to
    return mutate


def another_findings_set(m):
    m["label_sets"].append({"id": 903, "name": "Chest findings", "kind": "multi",
                            "datasets": []})
    m["classes"].append({"id": 931, "label_set": "Chest findings", "name": "effusion",
                         "hotkey": "", "created_by": None})
    m["annotations"][0]["findings"].append({"finding": "effusion", "state": "present"})


def set_in(*path_and_value):
    *path, key, value = path_and_value

    def mutate(m):
        target = m
        for step in path:
            target = target[step]
        target[key] = value
    return mutate


HOSTILE_MANIFESTS = {
    "version climbs out": (hostile_model("../../../tmp/x/escaped_dir"), "version name"),
    "version with a slash": (hostile_model("enc/../../x"), "version name"),
    "extra scan field id": (first_scan("id", 1), "unknown fields: 'id'"),
    "extra scan field project": (first_scan("project_id", 99), "unknown fields"),
    "role superuser": (set_in("users", "alice", "role", "superuser"),
                       "role 'superuser' is not one of admin, clinician, reviewer"),
    "no project": (lambda m: m.pop("project"), "no 'project' section"),
    "width not a number": (first_scan("width", "abc"), "width must be a whole number"),
    "negative height": (first_scan("height", -3), "height is not allowed"),
    "quarantined as text": (first_scan("quarantined", "no"), "quarantined must be true or false"),
    "scan file climbs out": (first_scan("file", "../../../etc/passwd"), "file name"),
    "scan file elsewhere in media": (first_scan("file", "exports/evil.html"), "file name"),
    "preview of another scan": (first_scan("preview", "previews/00/" + "0" * 64 + ".png"),
                                "preview name"),
    "duplicated scan": (lambda m: m["scans"].append(dict(m["scans"][0])), "appears twice"),
    "unknown dataset": (first_scan("dataset", "nowhere"), "dataset 'nowhere'"),
    "split not a choice": (first_scan("split", "train"), "split is not allowed"),
    "readers out of range": (set_in("project", "readers_per_scan", 9),
                             "readers_per_scan is not allowed"),
    "rule not a choice": (set_in("project", "disagreement_rule", "coin"),
                          "disagreement_rule is not allowed"),
    "answer on an unknown class": (set_in("annotations", 0, "findings", 0, "finding", "x"),
                                   "findings are not pairs"),
    "answer shown an unknown model": (set_in("annotations", 0, "shown_model_version", "clf-1"),
                                      "'clf-1' it was shown is not in the backup"),
    "reader not among the users": (set_in("annotations", 0, "reader", "mallory"),
                                   "'mallory' is not among the backup's users"),
    "active model not in the backup": (set_in("project", "active_model", "clf-3"),
                                       "active_model 'clf-3' is not a classifier"),
    "scans not a list": (set_in("scans", {"a": 1}), "'scans' section is not a list"),
    "unknown section": (set_in("extra", 1), "unknown sections: 'extra'"),
    "a future format version": (set_in("version", 3), "of version 3"),
    # numbers no JSON answer can hold (the API answered 500 on them)
    "Infinity as an evaluation's accuracy": (
        a_model(evaluations=[{"accuracy": float("inf"), "num_labels": 4}]),
        "model 1: evaluations[0].accuracy is Infinity, not a finite number"),
    "NaN as a shown confidence": (set_in("annotations", 0, "shown_confidence", float("nan")),
                                  "answer 1: shown_confidence is NaN, not a finite number"),
    "-Infinity in a scan's window": (first_scan("display", {"window": [40.0, float("-inf")]}),
                                     "scan 1: display.window[1] is -Infinity"),
    "1e999 in a model's metrics": (a_model(metrics={"macro_f1": BIG}),
                                   "model 1: metrics.macro_f1 is Infinity"),
    "1e999 as the gate tolerance": (set_in("project", "gate_tolerance", BIG),
                                    "the project: gate_tolerance is Infinity"),
    # (a shown confidence above 1 is what an older version stored from Label Studio: it is
    # restored without it, as the answer path records one now — test_backup_legacy.py)
    "a shown score above 1": (set_in("annotations", 0, "shown_scores", {"1": 2.0}),
                              "answer 1: its shown_scores are not a mapping of class id to "
                              "probability"),
    # a model whose config names a file outside its own folder (the site would read it)
    "a config naming a file elsewhere": (
        a_model(config={"findings_sets": [{"id": 1, "net": "../../x.pt"}]}),
        "model enc-9: its config names the file '../../x.pt', not a file of its own folder"),
    # dates no row of ours can have (the first crashed in the conversion to UTC)
    "an answer before year 1 in UTC": (set_in("annotations", 0, "created_at",
                                              "0001-01-01T00:00:00+14:00"),
                                       "answer 1: created_at is not a date and time"),
    "an answer after year 9999 in UTC": (set_in("annotations", 0, "created_at",
                                                "9999-12-31T23:59:59-12:00"),
                                         "answer 1: created_at is not a date and time"),
    "an answer in the year 2999": (set_in("annotations", 0, "created_at",
                                          "2999-01-01T00:00:00+00:00"),
                                   "a date before 1970 or in the future"),
    # answers the answer path refuses
    "a finding as the scan's one class": (
        findings_answer_as(outcome="label", label="mass", findings=[]),
        "answer 1: its class 'mass' is a finding of the findings set 'Brain findings'"),
    "a finding of another findings set": (
        another_findings_set,
        "answer 1: its findings come from 2 findings sets ('Brain findings', 'Chest "
        "findings')"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_MANIFESTS))
def test_a_hostile_manifest_is_refused_in_seconds_with_nothing_left_behind(
        case, backed_up, settings, tmp_path):
    mutate, message = HOSTILE_MANIFESTS[case]
    _, archive = backed_up
    settings.MEDIA_ROOT = tmp_path / "fresh-media"      # as on a fresh machine
    settings.MEDIA_ROOT.mkdir()
    crafted = repack(archive, tmp_path / "crafted.tar.gz", mutate,
                     extra=[member("artifacts/dummy")])
    before = world(settings)
    started = time.monotonic()
    with pytest.raises(CommandError) as refused:
        call_command("project_import", str(crafted), name="Crafted", no_embed=True,
                     stdout=io.StringIO())
    assert time.monotonic() - started < 10
    assert message in str(refused.value), str(refused.value)
    assert "Traceback" not in str(refused.value)
    assert world(settings) == before
    assert not (tmp_path / "x").exists() and not Path("/tmp/x/escaped_dir").exists()
    assert not Project.objects.filter(name="Crafted").exists()


def test_a_missing_scan_file_is_refused(backed_up, settings, tmp_path):
    _, archive = backed_up
    with tarfile.open(archive) as tar:
        preview = next(n for n in tar.getnames() if n.startswith("media/previews/"))
    crafted = repack(archive, tmp_path / "lacking.tar.gz", drop={preview})
    before = world(settings)
    with pytest.raises(CommandError, match=f"the archive lacks its file {preview}"):
        call_command("project_import", str(crafted), name="Lacking", no_embed=True)
    assert world(settings) == before


def test_a_failure_while_writing_rows_removes_the_copied_files(backed_up, settings, tmp_path):
    """Everything checks out until the restore rewrites a model's classifier file (corrupt):
    the scan files and the model folder copied by then are removed again, and no row stays."""
    _, archive = backed_up
    settings.MEDIA_ROOT = tmp_path / "fresh-media"
    settings.MEDIA_ROOT.mkdir()
    crafted = repack(archive, tmp_path / "corrupt.tar.gz", hostile_model("enc-5"),
                     extra=[member("artifacts/enc-5/head.npz", b"not a numpy file")])
    before = world(settings)
    with pytest.raises(CommandError, match="model enc-5: its classifier file head.npz cannot "
                                           "be read"):
        call_command("project_import", str(crafted), name="Corrupt", no_embed=True,
                     stdout=io.StringIO())
    assert world(settings) == before
    assert not any(settings.MEDIA_ROOT.iterdir()) and [
        p.name for p in Path(settings.ARTIFACTS_ROOT).iterdir()] == [backup.RESTORE_LOCK]


HOSTILE_MEMBERS = {
    "symlink": (member("media/scans/ab/link", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
                "a link"),
    "hard link": (member("media/hard", type=tarfile.LNKTYPE, linkname="manifest.json"),
                  "a link"),
    "absolute": (member("/tmp/absolute.txt"), "absolute"),
    "climbs out": (member("media/../../outside.txt"), "'..'"),
    "fifo": (member("media/pipe", type=tarfile.FIFOTYPE), "not a plain file"),
    "device": (member("media/dev", type=tarfile.CHRTYPE, devmajor=1, devminor=3),
               "not a plain file"),
    "second manifest": (member("manifest.json", b"{}"), "appears twice"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_MEMBERS))
def test_hostile_archive_members_are_refused(case, backed_up, settings, tmp_path):
    extra, message = HOSTILE_MEMBERS[case]
    _, archive = backed_up
    crafted = repack(archive, tmp_path / "members.tar.gz", extra=[extra])
    before = world(settings)
    with pytest.raises(CommandError, match="refusing archive member") as refused:
        call_command("project_import", str(crafted), name="Members", no_embed=True)
    assert message in str(refused.value)
    assert world(settings) == before
    assert not Path("/tmp/absolute.txt").exists() and not (tmp_path / "outside.txt").exists()


def test_an_archive_too_big_for_the_disk_or_of_too_many_files_is_refused(
        backed_up, settings, tmp_path, monkeypatch):
    _, archive = backed_up
    before = world(settings)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1000))
    with pytest.raises(CommandError, match="the backup unpacks to .* but only 1.0 kB are free"):
        call_command("project_import", str(archive), name="Huge", no_embed=True)
    monkeypatch.setattr(shutil, "disk_usage", real)
    monkeypatch.setattr(backup, "MAX_MEMBERS", 3)
    with pytest.raises(CommandError, match="holds more than 3 files"):
        call_command("project_import", str(archive), name="Many", no_embed=True)
    assert world(settings) == before


def test_a_head_with_class_ids_is_remapped_on_restore(backed_up, settings, tmp_path):
    """A model with files restores into ARTIFACTS_ROOT/models/<version> (never elsewhere),
    its classifier head rewritten to this database's class ids."""
    from ml_backend.active.refit import LinearHead

    original, archive = backed_up
    old = {c.name: c.pk for c in original.label_classes.all()}
    head = LinearHead(coef=np.zeros((2, 3)), intercept=np.zeros(2), mean=np.zeros(3),
                      scale=np.ones(3), temperature=1.0,
                      class_ids=np.array([old["mass"], old["oedema"]]))
    path = tmp_path / "head.npz"
    head.save(path)
    crafted = repack(archive, tmp_path / "head.tar.gz", hostile_model("enc-6"),
                     extra=[member("artifacts/enc-6/head.npz", path.read_bytes())])
    copy, _ = restore(crafted, "With a head")
    folder = Path(settings.ARTIFACTS_ROOT) / "models" / "enc-6"
    assert ModelVersion.objects.get(version="enc-6").artifact_dir == str(folder.resolve())
    new = {c.name: c.pk for c in copy.label_classes.all()}
    assert list(LinearHead.load(folder / "head.npz").class_ids) == [new["mass"],
                                                                   new["oedema"]]
    assert not (Path(settings.ARTIFACTS_ROOT) / "models" / "dummy").exists()


def test_a_damaged_archive_or_manifest_is_refused(backed_up, settings, tmp_path):
    _, archive = backed_up
    settings.MEDIA_ROOT = tmp_path / "fresh-media"      # nothing to compare the files with
    settings.MEDIA_ROOT.mkdir()
    data = archive.read_bytes()
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(data[: len(data) // 2])
    damaged = []
    for eighth in range(1, 8):       # a few bytes flipped anywhere: the gzip CRC catches it
        at = len(data) * eighth // 8
        damaged.append(tmp_path / f"flipped-{eighth}.tar.gz")
        damaged[-1].write_bytes(data[:at] + bytes(b ^ 0x5A for b in data[at:at + 4])
                                + data[at + 4:])
    not_json = repack(archive, tmp_path / "not-json.tar.gz", drop={"manifest.json"},
                      extra=[member("manifest.json", b"{not json")])
    nested = repack(archive, tmp_path / "nested.tar.gz", drop={"manifest.json"},
                    extra=[member("manifest.json", b"[" * 100_000 + b"]" * 100_000)])
    before = world(settings)
    for path, message in ((truncated, "not a readable backup"),
                          *((path, "not a readable backup") for path in damaged),
                          (not_json, "has no valid manifest.json"),
                          (nested, "has no valid manifest.json")):
        with pytest.raises(CommandError, match=message):
            call_command("project_import", str(path), name="Damaged", no_embed=True)
    assert world(settings) == before


def test_a_copy_beside_the_original_keeps_answers_whose_ids_would_clash(backed_up, users,
                                                                        tmp_path):
    """A Label Studio answer's id is stored once in a database: the copy restored beside the
    original keeps the answer, without the id (and says so). Two answers of the backup with
    one id are refused."""
    original, _ = backed_up
    mass, oedema = original.label_classes.order_by("name")
    scans = list(Scan.objects.filter(project=original, quarantined=False).order_by("pk"))
    findings.findings_answer_create(scan=scans[1], reader=users["bob"], source="label_studio",
                                    external_id="ls-17", states={mass.pk: "absent"})
    findings.findings_answer_create(scan=scans[2], reader=users["alice"],
                                    external_id="submission-1", states={oedema.pk: "present"})
    archive = tmp_path / "ids.tar.gz"
    call_command("project_export", project=original.name, out=str(archive), stdout=io.StringIO())

    copy, out = restore(archive, "Beside the original")
    assert "answer(s) are restored without their Label Studio or submission id" in out
    restored = {a.reader.username: a.external_id
                for a in Annotation.objects.filter(project=copy, source="label_studio")}
    assert restored == {"bob": ""}
    assert Annotation.objects.filter(project=copy).count() == 3

    def twice(m):
        ls = next(a for a in m["annotations"] if a["source"] == "label_studio")
        m["annotations"].append(dict(ls, scan=m["scans"][3]["sha256"]))

    with pytest.raises(CommandError, match="submission id 'ls-17' appears twice"):
        call_command("project_import", str(repack(archive, tmp_path / "twice.tar.gz", twice)),
                     name="Twice", no_embed=True)


@pytest.mark.parametrize("label,suggestion,findings_scan_to", [
    ("pneumonia", "normal", None),                   # each answer of its scan's own set
    # what a live project holds once a label set's rules move answered scans
    # (services.label_sets_assign): a class, a suggestion, findings of the scan's former set
    ("glioma_tumor", "meningioma_tumor", "Chest X-ray"),
])
def test_answers_of_each_label_set_restore(backed_up, tmp_path, label, suggestion,
                                            findings_scan_to):
    """The control of the label-set refusals above: answers with classes of the project's
    single-label sets and findings of one findings set restore, whichever set the scan is in
    now — a backup of a project whose rules moved answered scans restores as it was."""
    _, archive = backed_up
    crafted = repack(archive, tmp_path / "sets.tar.gz",
                     two_single_sets(label, suggestion, findings_scan_to=findings_scan_to))
    copy, _ = restore(crafted, "Two sets")
    answer = Annotation.objects.get(project=copy, outcome="label")
    assert (answer.label_class.name, answer.shown_suggestion.name,
            answer.scan.label_set.name) == (label, suggestion, "Chest X-ray")
    findings = Annotation.objects.get(project=copy, outcome="findings")
    assert findings.findings.count() >= 1


# --- two restores at once -----------------------------------------------------------------


def restore_files(project) -> list[Path]:
    files = [storage.media_path(name) for scan in project.scans.all()
             for name in (scan.file.name, scan.preview.name)]
    for model in project.model_versions.all():
        files += [p for p in Path(model.artifact_dir).rglob("*") if p.is_file()]
    return files


@pytest.mark.django_db(transaction=True)
def test_a_second_restore_while_one_runs_is_refused_and_leaves_the_first_ones_files(
        backed_up, settings, tmp_path):
    """As the probe ran it (one archive, restored twice at once into empty storage): while the
    first restore copies its files, a second one in another thread is refused with the
    reason, and the first restores completely — every scan file, preview and model file
    there."""
    _, archive = backed_up
    settings.MEDIA_ROOT = tmp_path / "fresh-media"
    settings.MEDIA_ROOT.mkdir()
    crafted = repack(archive, tmp_path / "twice.tar.gz", hostile_model("enc-7"),
                     extra=[member("artifacts/enc-7/config.json", b"{}")])
    second = {}

    def run_second():
        try:
            backup.import_project(crafted, name="Restored", embed=False)
            second["outcome"] = "restored"
        except backup.BackupError as exc:
            second["outcome"] = str(exc)
        finally:
            connection.close()

    def start_second_meanwhile(line):
        # the first restore says its first line once its files are planned, before it
        # copies them: the second one runs then, from start to end
        if not second:
            second["started"] = line
            thread = threading.Thread(target=run_second)
            thread.start()
            thread.join(120)

    first = backup.import_project(crafted, name="Restored", embed=False,
                                  log=start_second_meanwhile)
    assert "another restore is under way here" in second["outcome"], second
    assert "nothing was restored" in second["outcome"]
    assert Project.objects.filter(name="Restored").count() == 1
    files = restore_files(first)
    assert len(files) == 2 * first.scans.count() + 1 and first.scans.count() == 5
    assert [str(p) for p in files if not p.is_file()] == []
    assert (Path(settings.ARTIFACTS_ROOT) / "models" / "enc-7" / "config.json").is_file()
    # and the lock is free again: the next restore (under another name) is not refused
    assert "exist" in pytest.raises(backup.BackupError, backup.import_project, crafted,
                                    name="Again", embed=False).value.args[0]


def test_a_failed_restore_removes_only_the_files_it_created(backed_up, settings, tmp_path):
    """A scan file that appears in MEDIA_ROOT while a restore runs (another import storing the
    same scan) is not this restore's: when the restore fails, that file stays, with the
    folders it lies in; everything the restore created is gone."""
    _, archive = backed_up
    settings.MEDIA_ROOT = tmp_path / "fresh-media"
    settings.MEDIA_ROOT.mkdir()
    crafted = repack(archive, tmp_path / "corrupt.tar.gz", hostile_model("enc-5"),
                     extra=[member("artifacts/enc-5/head.npz", b"not a numpy file")])
    with tarfile.open(archive) as tar:
        name = next(n for n in tar.getnames() if n.startswith("media/scans/"))
        data = tar.extractfile(name).read()
    theirs = storage.media_path(name[len("media/"):])

    def store_it_meanwhile(line):
        if not theirs.exists():
            theirs.parent.mkdir(parents=True)
            theirs.write_bytes(data)

    with pytest.raises(backup.BackupError, match="its classifier file head.npz cannot be "
                                                 "read"):
        backup.import_project(crafted, name="Corrupt", embed=False, log=store_it_meanwhile)
    assert theirs.read_bytes() == data
    left = sorted(str(p.relative_to(settings.MEDIA_ROOT))
                  for p in settings.MEDIA_ROOT.rglob("*"))
    assert left == ["scans", str(Path(name[len("media/"):]).parent),
                    name[len("media/"):]]
    assert not (Path(settings.ARTIFACTS_ROOT) / "models").exists()
    assert not Project.objects.filter(name="Corrupt").exists()


@pytest.mark.parametrize("mutate,said", [
    (set_in("classes", 0, "hotkey", "n"), "its hotkey 'n' is the label page's key for 1:1 zoom"),
    (set_in("classes", 0, "hotkey", "G"), "its hotkey 'g' is the label page's key for the Grad-CAM"),
    (set_in("classes", 0, "hotkey", "0"), "its hotkey '0' answers 'no finding'"),
    (set_in("classes", 1, "hotkey", "1"), "class 2 ('oedema'): its hotkey '1' already labels "
                                          "'mass' in 'Brain findings'"),
])
def test_a_hotkey_the_class_form_refuses_is_dropped_with_a_warning(backed_up, tmp_path,
                                                                   mutate, said):
    """A backup made before a hotkey rule existed (the viewer's keys came later) restores:
    the class comes back without that key (no key answers the wrong class), and the restore
    says which and why."""
    _, archive = backed_up
    copy, out = restore(repack(archive, tmp_path / "keys.tar.gz", mutate), "Keys")
    assert said in out and "restored without a hotkey" in out
    keys = list(copy.label_classes.values_list("hotkey", flat=True))
    assert "" in keys and not {"n", "g", "G"} & set(keys)
    assert len([k for k in keys if k]) == len({k for k in keys if k})
