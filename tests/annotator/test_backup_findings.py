"""A findings (multi-label) model survives a restore: its config's findings sets, their
findings and its findings heads (``findings-<set>.npz``, its ``finding_ids``; a findings
network's ``findings-net-<set>.pt``) name the restored label set and findings, so the
restored model scores the scans as the original did and its export names its columns with
the right findings (the tenth probe: the config kept the old ids, the restored model scored
nothing and its model card named other findings)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from django.core.management import call_command

from annotator.models import LabelClass, LabelSet, Project, Scan
from ml_backend.active.findings import FindingsHead
from ml_backend.models import ModelVersion
from ml_backend.services.findings import findings_predictions, findings_scorer
from tests.annotator import test_backup_restore
from tests.annotator.test_backup_restore import (
    member,
    repack,
    restore,
)
from tests.conftest import run_import
from tests.ml_backend.test_findings_refit import _findings_csv

backed_up = test_backup_restore.backed_up      # the archive fixture, shared

pytestmark = pytest.mark.django_db


def renamed_versions(archive: Path, out: Path, prefix: str = "copy-", drop=()) -> Path:
    """``archive`` with every model version renamed ``prefix<version>`` (its folder too), so
    that the copy restores beside the original in one database — where every id differs —
    and the members named in ``drop`` (by their original names) left out."""
    def new(version):
        return prefix + version if version else version

    with tarfile.open(archive) as tar, tarfile.open(out, "w:gz") as copy:
        for info in tar.getmembers():
            if info.name in drop:
                continue
            data = tar.extractfile(info).read() if info.isfile() else None
            if info.name == "manifest.json":
                manifest = json.loads(data)
                for row in manifest["models"]:
                    row["version"], row["parent"] = new(row["version"]), new(row["parent"])
                for key in ("active_model", "active_encoder"):
                    manifest["project"][key] = new(manifest["project"][key])
                for row in manifest["annotations"]:
                    row["shown_model_version"] = new(row["shown_model_version"])
                data = json.dumps(manifest).encode()
                info.size = len(data)
            elif info.name.startswith("artifacts/"):
                parts = info.name.split("/")
                parts[1] = new(parts[1])
                info.name = "/".join(parts)
            copy.addfile(info, io.BytesIO(data) if data is not None else None)
    return out


@pytest.fixture
def findings_project(project, tmp_path):
    """Brain MRI read as three findings (12 answered pool scans each, the eval split
    answered), the shipped starter encoder, a refit findings model."""
    run_import(project, _findings_csv(tmp_path, "pool", per_class=12),
               label_set="brain findings")
    run_import(project, _findings_csv(tmp_path, "eval"), split="eval",
               label_set="brain findings")
    call_command("pretrain", "--project", project.name, "--epochs", "0", "--no-progress")
    call_command("refit", project=project.name)
    project.refresh_from_db()
    return project


def by_sha(predictions: dict, scans: list[Scan]) -> dict:
    sha = {s.pk: s.sha256 for s in scans}
    return {sha[pk]: value for pk, value in predictions.items()}


def test_a_restored_findings_model_scores_and_exports_as_the_original(findings_project,
                                                                       tmp_path):
    from ml_backend.services.export import model_export

    original = findings_project
    model = original.active_model
    old_set = LabelSet.objects.get(project=original, name="brain findings")
    assert model.config["findings_sets"][0]["id"] == old_set.pk
    scans = list(Scan.objects.filter(project=original, label_set=old_set)
                 .select_related("label_set").order_by("pk"))
    before = by_sha(findings_predictions(model, scans), scans)
    assert len(before) == len(scans) > 40
    old_card = model_export(model, fmt="torchscript", out=tmp_path / "old-card")

    archive = tmp_path / "findings.tar.gz"
    call_command("project_export", project=original.name, out=str(archive),
                 stdout=io.StringIO(), stderr=io.StringIO())
    out = io.StringIO()
    call_command("project_import", str(renamed_versions(archive, tmp_path / "copy.tar.gz")),
                 name="Findings copy", stdout=out)       # re-embedded with the copy's encoder
    copy = Project.objects.get(name="Findings copy")
    restored = copy.active_model
    assert restored.version == f"copy-{model.version}" and restored.status == "active"
    new_set = LabelSet.objects.get(project=copy, name="brain findings")
    findings = dict(LabelClass.objects.filter(label_set=new_set).values_list("name", "pk"))
    assert new_set.pk != old_set.pk and len(findings) == 3

    # every id of the config and of the head file is the copy's
    entry = restored.config["findings_sets"][0]
    assert entry["id"] == new_set.pk
    assert {f["name"]: f["id"] for f in entry["findings"]} == findings
    assert entry["head"] == f"findings-{new_set.pk}.npz"
    folder = Path(restored.artifact_dir)
    assert not (folder / f"findings-{old_set.pk}.npz").exists()
    head = FindingsHead.load(folder / entry["head"])
    assert sorted(head.finding_ids.tolist()) == sorted(findings.values())

    # ... so the copy scores every scan as the original does, with the same thresholds
    assert findings_scorer(restored, new_set.pk) is not None
    copies = list(Scan.objects.filter(project=copy, label_set=new_set)
                  .select_related("label_set").order_by("pk"))
    after = by_sha(findings_predictions(restored, copies), copies)
    assert set(after) == set(before)
    for sha, (proba, thresholds) in before.items():
        assert after[sha][0] == pytest.approx(proba, abs=1e-5), sha
        assert after[sha][1] == pytest.approx(thresholds)

    # ... and its model card names the columns with the findings they are
    card = model_export(restored, fmt="torchscript", out=tmp_path / "new-card")
    [old_file] = [f for f in old_card["files"] if f["kind"] == "findings"]
    [new_file] = [f for f in card["files"] if f["kind"] == "findings"]
    assert new_file["classes"] == old_file["classes"]
    assert new_file["thresholds"] == old_file["thresholds"]
    names = {pk: name for name, pk in findings.items()}
    assert new_file["classes"] == [names[int(i)] for i in head.finding_ids]


def test_a_findings_network_and_its_config_take_the_restored_ids(backed_up, tmp_path):
    """A fine-tuned findings network (``findings-net-<set>.pt``, its findings by id in the
    config): restored beside the original, its file and every id name the copy's set and
    findings; the file's name follows the set's new id."""
    original, archive = backed_up
    old_set = LabelSet.objects.get(project=original, name="Brain findings")
    old = dict(LabelClass.objects.filter(label_set=old_set).values_list("name", "pk"))
    net = f"findings-net-{old_set.pk}.pt"
    config = {"kind": "finetuned-findings", "classes": [], "label_sets": [],
              "findings_sets": [{"id": old_set.pk, "name": "Brain findings", "net": net,
                                 "findings": [{"id": old["mass"], "name": "mass"},
                                              {"id": old["oedema"], "name": "oedema"}],
                                 "thresholds": {"mass": 0.4, "oedema": 0.6},
                                 "uncertain_policy": "zeros", "num_scans": 1}],
              "findings_networks": ["Brain findings"]}

    def add_model(m):
        m["models"] = [{"version": "clf-net", "kind": "classifier", "status": "ready",
                        "status_reason": "", "parent": None, "config": config,
                        "num_labels": 1, "metrics": {}, "created_at": None,
                        "promoted_at": None, "evaluations": []}]

    crafted = repack(archive, tmp_path / "net.tar.gz", add_model,
                     extra=[member("artifacts/clf-net/config.json", b"{}"),
                            member(f"artifacts/clf-net/{net}", b"a network")])
    copy, out = restore(crafted, "Network copy")
    model = ModelVersion.objects.get(version="clf-net")
    assert model.status == "ready" and "incomplete" not in out
    new_set = LabelSet.objects.get(project=copy, name="Brain findings")
    new = dict(LabelClass.objects.filter(label_set=new_set).values_list("name", "pk"))
    entry = model.config["findings_sets"][0]
    assert (entry["id"], entry["net"]) == (new_set.pk, f"findings-net-{new_set.pk}.pt")
    assert entry["findings"] == [{"id": new["mass"], "name": "mass"},
                                 {"id": new["oedema"], "name": "oedema"}]
    assert model.config["findings_networks"] == ["Brain findings"]
    folder = Path(model.artifact_dir)
    assert (folder / entry["net"]).read_bytes() == b"a network"
    assert new_set.pk != old_set.pk and not (folder / net).exists()
