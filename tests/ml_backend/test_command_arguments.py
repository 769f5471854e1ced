"""Bad arguments to the commands (hostile-user probe) are a clear CommandError before
anything is made: no traceback, no half-made query round, no half-written export."""

from __future__ import annotations

import subprocess
import sys

import pytest
from django.core.management import CommandError, call_command

from annotator.models import Scan
from ml_backend.models import QueryRound, TrainingRun
from tests.base import FIXTURES, REPO
from tests.conftest import run_import
from tests.factories import model_version_with_files


@pytest.fixture
def chest(project):
    run_import(project, FIXTURES / "chest_xray" / "eval" / "normal", layout="flat",
               split="eval", default_label="normal", dataset_name="chest")
    run_import(project, FIXTURES / "chest_xray" / "pool" / "normal", layout="flat",
               dataset_name="chest")
    return project


@pytest.mark.parametrize("k, said", [("-3", "-3 is out of range: use 1 to 1000"),
                                     ("0", "0 is out of range"),
                                     ("1001", "1001 is out of range"),
                                     ("lots", "'lots' is not a whole number")])
def test_similar_refuses_a_bad_k(chest, k, said):
    scan = Scan.objects.filter(project=chest).first()
    with pytest.raises(CommandError, match=said):
        call_command("similar", str(scan.pk), "-k", k)


def test_similar_refuses_a_scan_id_no_database_holds(chest):
    with pytest.raises(CommandError, match="out of range"):
        call_command("similar", "99999999999999999999")
    with pytest.raises(CommandError, match="out of range"):
        call_command("similar", "-4")


def test_a_bad_argument_on_the_command_line_is_a_usage_line_not_a_traceback():
    done = subprocess.run([sys.executable, "manage.py", "similar", "41", "-k", "-3"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "argument -k: -3 is out of range: use 1 to 1000" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("n", ["-5", "0", "99999999999999999999", "1.5", "10001"])
def test_query_refuses_a_bad_batch_size_and_makes_no_round(chest, n):
    before = QueryRound.objects.filter(project=chest).count()
    with pytest.raises(CommandError, match="argument --n: .*(out of range|not a whole number)"):
        call_command("query", "--project", chest.name, "--n", n, "--strategy", "random")
    assert QueryRound.objects.filter(project=chest).count() == before


def test_query_with_a_good_batch_size_makes_that_round(chest):
    call_command("query", "--project", chest.name, "--n", "3", "--strategy", "random")
    assert QueryRound.objects.filter(project=chest).latest("pk").size == 3


def test_report_on_a_version_the_project_does_not_have_lists_those_it_has(chest):
    encoder = model_version_with_files(chest, "p1-enc-1", kind="encoder", status="active")
    active = model_version_with_files(chest, "p1-clf-2", status="active")
    model_version_with_files(chest, "p1-clf-3", status="retired")
    type(chest).objects.filter(pk=chest.pk).update(active_model=active, active_encoder=encoder)
    with pytest.raises(CommandError) as info:
        call_command("report", "--project", chest.name, "--model", "nosuch")
    said = str(info.value)
    assert said.startswith(f"no model version 'nosuch' in {chest.name!r}")
    assert "p1-clf-3, p1-clf-2" in said and "no classifier to report on yet" not in said
    with pytest.raises(CommandError, match="p1-enc-1 is an encoder"):
        call_command("report", "--project", chest.name, "--model", "p1-enc-1")


def test_export_labels_checks_out_before_writing_anything(chest, tmp_path):
    name = chest.name
    with pytest.raises(CommandError, match="nonexistent/dir is not an existing folder"):
        call_command("export_labels", "--project", name, "--format", "csv",
                     "--out", str(tmp_path / "nonexistent" / "dir" / "x.csv"))
    passwd = tmp_path / "passwd"
    passwd.write_text("root:x:0:0\n")
    with pytest.raises(CommandError, match="is a file, not a folder"):
        call_command("export_labels", "--project", name, "--format", "imagefolder",
                     "--out", str(passwd))
    assert passwd.read_text() == "root:x:0:0\n"
    with pytest.raises(CommandError, match="is a folder: give --out a file name"):
        call_command("export_labels", "--project", name, "--format", "csv",
                     "--out", str(tmp_path))
    with pytest.raises(CommandError, match="cannot go to stdout"):
        call_command("export_labels", "--project", name, "--format", "imagefolder",
                     "--out", "-")
    assert not (tmp_path / "nonexistent").exists()


def test_a_failed_export_leaves_no_half_file_or_folder(chest, tmp_path):
    from annotator.storage import media_path

    out = tmp_path / "exported"
    out.mkdir()
    # a csv over an earlier file: replaced whole
    (out / "labels.csv").write_text("old\n")
    call_command("export_labels", "--project", chest.name, "--format", "csv",
                 "--out", str(out / "labels.csv"))
    assert (out / "labels.csv").read_text().startswith("scan,")
    # an image folder with a scan's stored image missing: refused naming the scan, nothing
    # left behind
    scan = Scan.objects.filter(project=chest, split="eval").order_by("-pk").first()
    media_path(scan.preview.name).unlink()
    with pytest.raises(CommandError, match=f"the stored image of scan {scan.pk} is missing"):
        call_command("export_labels", "--project", chest.name, "--format", "imagefolder",
                     "--out", str(out / "images"))
    assert sorted(p.name for p in out.iterdir()) == ["labels.csv"]


# --- numbers the training commands take: checked up front, no run row made ---------------------

BAD_NUMBERS = [
    ("finetune", ["--backbone-lr-scale", "nan"], "--backbone-lr-scale: 'nan' is not a finite"),
    ("finetune", ["--backbone-lr-scale", "1.5"],
     "--backbone-lr-scale: 1.5 is out of range: use 0 to 1"),
    ("finetune", ["--epochs", "0"], "--epochs: 0 is out of range: use 1 to 10000"),
    ("finetune", ["--epochs", "-1"], "--epochs: -1 is out of range"),
    ("finetune", ["--lr", "inf"], "--lr: 'inf' is not a finite number"),
    ("finetune", ["--lr", "0"], "--lr: 0 is out of range: use more than 0"),
    ("finetune", ["--batch-size", "0"], "--batch-size: 0 is out of range"),
    ("finetune", ["--from-head-layer", "9"], "--from-head-layer: 9 is out of range: use 0 to 3"),
    ("finetune", ["--seed", "-1"], "--seed: -1 is out of range"),
    ("distill", ["--temperature", "nan"], "--temperature: 'nan' is not a finite number"),
    ("distill", ["--teacher-temperature=-inf"], "--teacher-temperature: '-inf' is not a finite"),
    ("distill", ["--labeled-weight", "NaN"], "--labeled-weight: 'NaN' is not a finite number"),
    ("distill", ["--labeled-weight", "2"], "--labeled-weight: 2 is out of range: use 0 to 1"),
    ("distill", ["--epochs", "0"], "--epochs: 0 is out of range"),
    ("distill", ["--lr=-3e-4"], "--lr: -3e-4 is out of range"),
    ("distill", ["--teacher", "0"], "--teacher: 0 is out of range"),
    ("pretrain", ["--epochs", "-1"], "--epochs: -1 is out of range: use 0 to 10000"),
    ("pretrain", ["--lr", "nan"], "--lr: 'nan' is not a finite number"),
    ("pretrain", ["--temperature", "0"], "--temperature: 0 is out of range"),
    ("pretrain", ["--batch-size", "1"], "--batch-size: 1 is out of range: use 2 to"),
    ("pretrain", ["--image-size", "0"], "--image-size: 0 is out of range"),
    ("pretrain", ["--queue-size", "-1"], "--queue-size: -1 is out of range"),
    ("pretrain", ["--seed", "99999999999999999999"], "--seed: .* is out of range"),
    ("retrain", ["--if-new-labels", "-5"], "--if-new-labels: -5 is out of range: use 0 to"),
    ("retrain", ["--epochs", "0"], "--epochs: 0 is out of range"),
    ("retrain", ["--epochs", "lots"], "--epochs: 'lots' is not a whole number"),
]


@pytest.mark.parametrize("command, args, said", BAD_NUMBERS,
                         ids=[f"{c}{'_'.join(a)}" for c, a, _ in BAD_NUMBERS])
def test_a_bad_number_for_a_training_command_makes_no_run(chest, command, args, said):
    with pytest.raises(CommandError, match=f"argument {said}"):
        call_command(command, "--project", chest.name, *args, "--no-progress")
    assert not TrainingRun.objects.exists()


@pytest.mark.parametrize("k", ["0", "-1", "1001", "nan"])
def test_candidates_refuses_a_bad_k(chest, k):
    with pytest.raises(CommandError, match="argument -k: .*(out of range|not a whole number)"):
        call_command("candidates", "--project", chest.name, "--class", "normal", "-k", k)
    assert not QueryRound.objects.filter(project=chest).exists()


def test_a_nan_on_the_command_line_is_a_usage_line_not_a_traceback():
    done = subprocess.run([sys.executable, "manage.py", "finetune", "--project", "x",
                           "--backbone-lr-scale", "nan"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "argument --backbone-lr-scale: 'nan' is not a finite number" in done.stderr
    assert "Traceback" not in done.stderr and "IntegrityError" not in done.stderr


def test_finetune_names_its_run_a_finetune(chest):
    """The run is a "retrain" row (the kind the scheduled retrain makes too); what the
    command says names it as asked for. No encoder here: it fails at once, without training."""
    with pytest.raises(CommandError, match=r"^finetune run #\d+ failed: .*no active encoder"):
        call_command("finetune", "--project", chest.name, "--no-progress")
    assert TrainingRun.objects.get().kind == "retrain"


@pytest.mark.parametrize("command, args, said", [
    ("pacs_pull", ["--project", "x", "--limit", "0"], "--limit: 0 is out of range"),
    ("pacs_pull", ["--project", "x", "--limit", "-3"], "--limit: -3 is out of range"),
    ("demo_setup", ["--pretrain-epochs", "-2"], "--pretrain-epochs: -2 is out of range"),
    ("demo_setup", ["--image-size", "0"], "--image-size: 0 is out of range"),
    ("demo_setup", ["--image-size", "huge"], "--image-size: 'huge' is not a whole number"),
])
def test_the_pull_and_the_demo_check_their_numbers_before_anything(db, command, args, said):
    from annotator.models import Project

    with pytest.raises(CommandError, match=f"argument {said}"):
        call_command(command, *args)
    assert not Project.objects.exists()
