"""A backup of an upgraded site restores: values an older version saved and the site still
holds (settings out of today's bounds, a class colour that is not #RRGGBB, names the forms
refuse now, a shown confidence above 1) are brought to what the upgrade made of them (the
migrations 0022 and 0023), each kind with a warning, where the tenth probe saw the whole
backup refused (and a dataset's name said "not in the backup" of every scan in it). Hostile
values are still refused. The export warns of each value its restore would change. A
version-1 backup, which records no colour, comes back in colour where its scans are."""

from __future__ import annotations

import io
import shutil

import pytest
from django.core.management import CommandError, call_command

from annotator.models import Annotation, Dataset, LabelClass, LabelSet, Project, Scan
from tests.annotator import test_backup_restore
from tests.annotator.test_backup_restore import (
    repack,
    restore,
    set_in,
)
from tests.base import FIXTURES
from tests.conftest import run_import

backed_up = test_backup_restore.backed_up      # the archive fixture, shared

pytestmark = pytest.mark.django_db

DATASETS = ["batch_20240105", "", "ward\tA", "scanner\u200c2"]


def as_an_older_site_stored_it(m):
    """The backed-up project as a site upgraded from an older version holds it."""
    m["project"].update(gate_tolerance=-1.0, query_batch_size=0, novelty_percentile=10.0,
                        refit_every=0)
    m["datasets"][0]["name"] = DATASETS[0]
    m["datasets"] += [dict(m["datasets"][0], name=name) for name in DATASETS[1:]]
    findings = m["label_sets"][0]
    findings.update(name="\ufeffBrain findings", target_sensitivity=0.0,
                    datasets=[DATASETS[0]])
    for row in m["scans"]:
        row["dataset"] = DATASETS[0]
        if row["label_set"]:
            row["label_set"] = findings["name"]
    m["scans"][1]["dataset"] = "ward\tA"
    for row in m["classes"]:
        row["label_set"] = findings["name"]
        if row["name"] == "oedema":
            row["name"] = "oe\u200cdema"
    m["classes"][0]["color"] = "red"
    answer = m["annotations"][0]
    answer["shown_confidence"] = 1.5
    for f in answer["findings"]:
        if f["finding"] == "oedema":
            f["finding"] = "oe\u200cdema"


def test_values_an_older_version_stored_are_restored_as_the_upgrade_made_them(backed_up,
                                                                              tmp_path):
    _, archive = backed_up
    copy, out = restore(repack(archive, tmp_path / "old.tar.gz", as_an_older_site_stored_it),
                        "Upgraded")
    assert (copy.gate_tolerance, copy.query_batch_size, copy.novelty_percentile,
            copy.refit_every) == (0.0, 1, 50.0, 1)
    names = dict(Dataset.objects.filter(project=copy).values_list("name", "colour_mode"))
    assert sorted(names) == sorted(["dataset 1", "dataset 2", "ward A", "scanner2"])
    assert Scan.objects.filter(project=copy, dataset__name="dataset 1").count() == 4
    assert Scan.objects.filter(project=copy, dataset__name="ward A").count() == 1
    findings = LabelSet.objects.get(project=copy, name="Brain findings")
    assert findings.target_sensitivity == 0.01
    assert list(findings.datasets.values_list("name", flat=True)) == ["dataset 1"]
    assert dict(LabelClass.objects.filter(project=copy).values_list("name", "color")) == {
        "mass": "#4c78a8", "oedema": "#4c78a8"}
    answer = Annotation.objects.get(project=copy)
    assert answer.shown_confidence is None
    assert sorted(f.finding.name for f in answer.findings.all()) == ["mass", "oedema"]

    for said in ("4 dataset name(s) of the backup are refused by this site now",
                 "dataset 1 'batch_20240105' as 'dataset 1' (the dataset name looks like it "
                 "carries patient identifiers",
                 "dataset 2 '' as 'dataset 2' (the dataset has no name)",
                 "dataset 3 'ward\\tA' as 'ward A' (the dataset name holds a control or "
                 "invisible character (U+0009)",
                 "1 label set name(s)", "1 class name(s)",
                 "1 gate_tolerance value(s) outside 0 to 1", "the project: -1.0 as 0.0",
                 "1 query_batch_size value(s) outside 1 to 10000", "the project: 0 as 1",
                 "1 target_sensitivity value(s) outside 0.01 to 1",
                 "1 class colour(s) are not #RRGGBB", "class 1: 'red' as '#4c78a8'",
                 "1 answer(s) recorded a shown confidence that is not a probability",
                 "answer 1: 1.5"):
        assert said in out, said
    assert "not in the backup" not in out


@pytest.mark.parametrize("mutate,said", [
    (set_in("datasets", 0, "hflip_allowed", "yes"),
     "dataset 1: hflip_allowed must be true or false"),
    (set_in("label_sets", 0, "kind", "many"), "label set 1: kind is not allowed"),
])
def test_a_refused_dataset_or_set_is_named_once_not_in_every_scan(backed_up, tmp_path,
                                                                   mutate, said):
    _, archive = backed_up
    with pytest.raises(CommandError) as refused:
        call_command("project_import", str(repack(archive, tmp_path / "x.tar.gz", mutate)),
                     name="Refused", no_embed=True)
    assert said in str(refused.value)
    assert "not in the backup" not in str(refused.value)


def test_hostile_values_are_still_refused(backed_up, tmp_path):
    """Only what an older version could store is cleaned: a setting that is no number, a
    name typed with --name, a config that names a file outside its folder are refused."""
    _, archive = backed_up
    for mutate, name, said in (
            (set_in("project", "gate_tolerance", "-1"), None, "gate_tolerance must be a finite"),
            (set_in("project", "query_batch_size", 0.5), None, "must be a whole number"),
            (None, "tab\there", "--name: the project name holds a control or invisible"),
            (set_in("models", [{"version": "clf-1", "kind": "classifier", "status": "ready",
                                "config": {"findings_sets": [{"id": 1, "net": "../../x.pt"}]}}]),
             None, "model clf-1: its config names the file '../../x.pt'")):
        crafted = repack(archive, tmp_path / "h.tar.gz", mutate)
        with pytest.raises(CommandError) as refused:
            call_command("project_import", str(crafted), name=name or "Hostile",
                         no_embed=True)
        assert said in str(refused.value)
    assert not Project.objects.filter(name="Hostile").exists()


def test_the_export_warns_of_each_value_its_restore_would_change(backed_up, tmp_path):
    original, _ = backed_up
    Project.objects.filter(pk=original.pk).update(gate_tolerance=-1.0, query_batch_size=0)
    Dataset.objects.filter(project=original).update(name="batch_20240105")
    LabelClass.objects.filter(project=original, name="mass").update(color="red")
    Annotation.objects.filter(project=original).update(shown_confidence=1.5)
    out, err = io.StringIO(), io.StringIO()
    call_command("project_export", project=original.name, out=str(tmp_path / "b.tar.gz"),
                 stdout=out, stderr=err)
    err = err.getvalue()
    for said in ("1 dataset name(s) of the backup are refused",
                 "1 gate_tolerance value(s) outside 0 to 1",
                 "1 query_batch_size value(s) outside 1 to 10000",
                 "1 class colour(s) are not #RRGGBB",
                 "1 answer(s) recorded a shown confidence"):
        assert f"warning: a restore of this backup will change this: {said}" in err, said
    assert "warning" not in out.getvalue()
    # and the restore does what the export said
    copy, _ = restore(tmp_path / "b.tar.gz", "As warned")
    assert copy.gate_tolerance == 0.0 and copy.datasets.get().name == "dataset 1"


# --- version 1: no colour recorded ------------------------------------------------------


def as_version_1(m):
    """What a version-1 backup lacks (probe10a/craft.py ``v1``), and the settings of its day
    out of today's bounds (``badvals``)."""
    m["version"] = 1
    for key in ("dicom_grouping", "readers_per_scan", "blind_second_readers",
                "label_studio_push_rounds", "label_studio_prelabel", "disagreement_rule",
                "colour_mode", "label_studio_project_id", "created_by", "created_at"):
        m["project"].pop(key, None)
    for row in m["datasets"]:
        row.pop("colour_mode", None)
        row.pop("colour_note", None)
    for row in m["scans"]:
        for key in ("colour", "display", "slices", "quarantined", "released"):
            row.pop(key, None)
    m["project"].update(gate_tolerance=-1.0, query_batch_size=0)
    m["classes"][0]["color"] = "red"


@pytest.fixture
def smears(project, tmp_path):
    """A colour project (blood smears, the first import decides) with two greyscale brain
    MRI scans in a dataset of their own."""
    run_import(project, FIXTURES / "blood_smear" / "pool" / "basophil", layout="flat",
               dataset_name="PBC smears")
    grey = tmp_path / "grey"
    grey.mkdir()
    for path in sorted((FIXTURES / "brain_mri" / "pool" / "no_tumor").iterdir())[:2]:
        shutil.copy(path, grey / path.name)
    run_import(project, grey, layout="flat", dataset_name="brain")
    LabelClass.objects.create(project=project, label_set=project.label_sets.first(),
                              name="basophil")
    project.refresh_from_db()
    assert project.colour_mode == "colour"
    archive = tmp_path / "smears.tar.gz"
    call_command("project_export", project=project.name, out=str(archive),
                 stdout=io.StringIO(), stderr=io.StringIO())
    return project, archive


def colour_encoder_first_scan_grey(m):
    as_version_1(m)
    m["scans"].sort(key=lambda row: row["dataset"] != "brain")    # a grey scan first
    m["models"] = [{"version": "enc-c", "kind": "encoder", "status": "retired",
                    "status_reason": "", "parent": None, "num_labels": 0, "metrics": {},
                    "config": {"pretrain": {"channels": 3}}, "created_at": None,
                    "promoted_at": None, "evaluations": []}]


@pytest.mark.parametrize("mutate,why", [
    (as_version_1, "its first scan decides, as an import does"),
    (colour_encoder_first_scan_grey, "its encoder enc-c takes 3 channel(s)"),
])
def test_a_version_1_colour_backup_comes_back_in_colour(smears, tmp_path, mutate, why):
    original, archive = smears
    copy, out = restore(repack(archive, tmp_path / "v1.tar.gz", mutate), "Smears v1")
    assert copy.colour_mode == "colour" and copy.channels == 3
    assert dict(copy.scans.values_list("sha256", "colour")) == dict(
        original.scans.values_list("sha256", "colour"))
    assert copy.scans.filter(colour=True).count() == 12
    assert dict(copy.datasets.values_list("name", "colour_mode")) == {
        "PBC smears": "colour", "brain": "grey"}
    assert ("this backup (version 1) does not record colour: by their previews 12 of 14 "
            f"scan(s) are colour, and the project is restored as colour ({why})") in out
    # and the settings of its day, as the upgrade made them
    assert (copy.gate_tolerance, copy.query_batch_size) == (0.0, 1)
    assert copy.label_classes.get().color == "#4c78a8"
