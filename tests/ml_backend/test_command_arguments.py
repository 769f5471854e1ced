"""Bad arguments to the commands (hostile-user probe) are a clear CommandError before
anything is made: no traceback, no half-made query round, no half-written export."""

from __future__ import annotations

import subprocess
import sys

import pytest
from django.core.management import CommandError, call_command

from annotator.models import Scan
from ml_backend.models import QueryRound
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
    # an image folder whose copy fails half-way: nothing left behind
    scan = Scan.objects.filter(project=chest, split="eval").order_by("-pk").first()
    media_path(scan.preview.name).unlink()
    with pytest.raises(CommandError, match="cannot write the image folder"):
        call_command("export_labels", "--project", chest.name, "--format", "imagefolder",
                     "--out", str(out / "images"))
    assert sorted(p.name for p in out.iterdir()) == ["labels.csv"]
