"""A model version the backup holds incompletely (a head, a checkpoint or its encoder
missing) is restored retired with a warning that names what is missing, and the project's
active pointers never point at it: the restore finishes (the tenth probe: "restored", then a
traceback, exit 1, and a project left with a broken active model). Files keyed by the old
site's scan ids (pool predictions, Grad-CAM maps, embedding parts) neither go into a backup
nor come back from an older one."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from django.core.management import call_command

from annotator import backup
from annotator.models import LabelClass, LabelSet, Scan
from ml_backend.active.refit import LinearHead
from ml_backend.models import ModelVersion
from tests.annotator import test_backup_restore
from tests.annotator.test_backup_restore import (
    member,
    repack,
    restore,
    two_single_sets,
)

pytestmark = pytest.mark.django_db

backed_up = test_backup_restore.backed_up      # the archive fixture, shared

HEAD = "artifacts/clf-3/head-901.npz"
ENCODER = "artifacts/enc-3/encoder.pt"


def with_models(m):
    """The probe's project: a single-label set Chest X-ray (set 901: normal 911, pneumonia
    912) beside the findings set, an encoder enc-3 and a classifier clf-3 (a linear head on
    it), both active."""
    two_single_sets("pneumonia", "normal")(m)
    m["models"] = [
        {"version": "enc-3", "kind": "encoder", "status": "active", "status_reason": "",
         "parent": None, "config": {"pretrain": {"channels": 1}}, "num_labels": 0,
         "metrics": {}, "created_at": None, "promoted_at": None, "evaluations": []},
        {"version": "clf-3", "kind": "classifier", "status": "active",
         "status_reason": "promoted", "parent": "enc-3", "num_labels": 2, "metrics": {},
         "config": {"kind": "head", "classes": [
             {"id": 911, "name": "normal", "label_set": 901},
             {"id": 912, "name": "pneumonia", "label_set": 901}],
             "label_sets": [{"id": 901, "name": "Chest X-ray", "classes": [911, 912],
                             "head": "head-901.npz"}], "findings_sets": []},
         "created_at": None, "promoted_at": None, "evaluations": []}]
    m["project"]["active_model"], m["project"]["active_encoder"] = "clf-3", "enc-3"


def head_bytes(tmp_path) -> bytes:
    head = LinearHead(coef=np.zeros((2, 3)), intercept=np.zeros(2), mean=np.zeros(3),
                      scale=np.ones(3), temperature=1.0, class_ids=np.array([911, 912]))
    head.save(tmp_path / "head.npz")
    return (tmp_path / "head.npz").read_bytes()


def crafted(archive, tmp_path, drop=()) -> Path:
    files = {"artifacts/enc-3/config.json": b"{}", ENCODER: b"an encoder",
             "artifacts/clf-3/config.json": b"{}", HEAD: head_bytes(tmp_path)}
    return repack(archive, tmp_path / "models.tar.gz", with_models,
                  extra=[member(name, data) for name, data in files.items()
                         if name not in drop])


def test_a_complete_backup_keeps_both_models_active_with_the_head_remapped(backed_up,
                                                                           tmp_path):
    _, archive = backed_up
    copy, out = restore(crafted(archive, tmp_path), "Complete")
    assert (copy.active_model.version, copy.active_encoder.version) == ("clf-3", "enc-3")
    assert "incomplete" not in out and "no files" not in out
    chest = LabelSet.objects.get(project=copy, name="Chest X-ray")
    ids = dict(LabelClass.objects.filter(label_set=chest).values_list("name", "pk"))
    config = copy.active_model.config
    assert config["label_sets"][0]["id"] == chest.pk
    assert config["label_sets"][0]["head"] == f"head-{chest.pk}.npz"
    head = LinearHead.load(Path(copy.active_model.artifact_dir) / f"head-{chest.pk}.npz")
    assert head.class_ids.tolist() == [ids["normal"], ids["pneumonia"]]


def test_a_classifier_without_its_head_comes_back_retired_and_the_restore_finishes(
        backed_up, tmp_path):
    _, archive = backed_up
    out = io.StringIO()
    # as the probe ran it: with the re-embedding (the encoder's file here is no network:
    # that failure is said, not raised, as the rows and files are in place)
    call_command("project_import", str(crafted(archive, tmp_path, drop={HEAD})),
                 name="No head", stdout=out)
    out = out.getvalue()
    copy = backup.Project.objects.get(name="No head")
    clf = ModelVersion.objects.get(version="clf-3")
    assert clf.status == "retired" and "head-901.npz" in clf.status_reason
    assert copy.active_model is None and copy.active_encoder.version == "enc-3"
    assert ("warning: model clf-3 is incomplete in the backup (clf-3 is missing "
            "head-901.npz") in out
    assert "no active classifier" in out
    assert "re-embedding its scans or storing its model's predictions failed" in out
    assert copy.scans.count() == 5 and "Traceback" not in out


@pytest.mark.parametrize("drop,said", [
    ({ENCODER}, "enc-3 is missing encoder.pt"),
    ({ENCODER, "artifacts/enc-3/config.json"}, "has no files in the backup"),
])
def test_an_incomplete_or_missing_encoder_retires_the_classifier_built_on_it(
        backed_up, tmp_path, drop, said):
    _, archive = backed_up
    copy, out = restore(crafted(archive, tmp_path, drop=drop), "No encoder")
    enc, clf = (ModelVersion.objects.get(version=v) for v in ("enc-3", "clf-3"))
    assert enc.status == clf.status == "retired"
    assert copy.active_model is None and copy.active_encoder is None
    assert said in out
    assert "warning: model clf-3 is incomplete in the backup (its encoder enc-3 is " \
           "incomplete" in out


def test_files_keyed_by_scan_ids_are_neither_backed_up_nor_restored(backed_up, settings,
                                                                     tmp_path):
    """The pool predictions (scan ids -> probabilities), Grad-CAM maps per scan id, an
    import chunk's embeddings: in a restored project those ids are other scans'."""
    from ml_backend.services.queries import _candidate_proba

    original, archive = backed_up
    folder = Path(settings.ARTIFACTS_ROOT) / "models" / "p-enc-4"
    for name in ("config.json", "encoder.pt", "pool_predictions.npz", "cam/3-7.png",
                 "parts/chunk-1.npz", "spread/embed/chunk-00000.npz"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")
    ModelVersion.objects.create(project=original, version="p-enc-4", kind="encoder",
                                status="ready", artifact_dir=str(folder), config={})
    out = tmp_path / "new.tar.gz"
    call_command("project_export", project=original.name, out=str(out),
                 stdout=io.StringIO(), stderr=io.StringIO())
    with tarfile.open(out) as tar:
        names = {n for n in tar.getnames() if n.startswith("artifacts/")}
    assert names == {"artifacts/p-enc-4/config.json", "artifacts/p-enc-4/encoder.pt"}

    # an older backup holds them: they are not restored
    stale = [member(f"artifacts/clf-3/{name}", b"stale") for name in (
        "pool_predictions.npz", "cam/1-911.png", "parts/chunk-1.npz")]
    older = repack(crafted(archive, tmp_path), tmp_path / "older.tar.gz",
                   extra=stale)
    copy, _ = restore(older, "Older")
    model = copy.active_model
    left = sorted(p.name for p in Path(model.artifact_dir).rglob("*"))
    assert left == ["config.json", f"head-{model.config['label_sets'][0]['id']}.npz"]
    # what reads the pool predictions finds none (until the next refit or promotion
    # stores them), never another scan's
    scans = list(Scan.objects.filter(project=copy, label_set__name="Chest X-ray"))
    assert _candidate_proba(model, [c["id"] for c in model.config["classes"]], scans) is None


def test_a_file_two_versions_share_is_backed_up_as_two_plain_files(backed_up, settings,
                                                                    tmp_path):
    """A refit that keeps the active version's findings network links the file into the new
    version's folder (one file, two names): tarfile would store the second name as a hard
    link, which every restore refuses (a backup holds plain files only)."""
    import os
    import shutil

    original, _ = backed_up
    root = Path(settings.ARTIFACTS_ROOT) / "models"
    for version in ("p-clf-1", "p-clf-2"):
        (root / version).mkdir(parents=True)
        (root / version / "config.json").write_bytes(b"{}")
    (root / "p-clf-1" / "findings-net-5.pt").write_bytes(b"a network")
    os.link(root / "p-clf-1" / "findings-net-5.pt", root / "p-clf-2" / "findings-net-5.pt")
    for version in ("p-clf-1", "p-clf-2"):
        ModelVersion.objects.create(project=original, version=version, kind="classifier",
                                    status="retired", artifact_dir=str(root / version),
                                    config={})
    archive = tmp_path / "linked.tar.gz"
    call_command("project_export", project=original.name, out=str(archive),
                 stdout=io.StringIO(), stderr=io.StringIO())
    with tarfile.open(archive) as tar:
        shared = [m for m in tar.getmembers() if m.name.endswith("findings-net-5.pt")]
    assert len(shared) == 2 and all(m.isreg() and m.size == 9 for m in shared)

    ModelVersion.objects.filter(project=original).delete()     # restored as on a fresh site
    shutil.rmtree(root)
    copy, _ = restore(archive, "Linked")
    for version in ("p-clf-1", "p-clf-2"):
        assert (root / version / "findings-net-5.pt").read_bytes() == b"a network"
