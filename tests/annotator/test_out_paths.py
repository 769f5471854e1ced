"""Where a command writes its output (``--out``; hostile-user probe): a new file or an
existing regular file (replaced whole) in an existing folder, a new or empty folder for the
folder exports. Anything else is a CommandError with the reason, before any work: a symbolic
link (neither it nor what it points to is touched), a fifo or a device, a folder where a file
goes, a parent folder that does not exist (never made on the way) or cannot be written.

No real device is used here: a fifo stands for one (``os.mkfifo``), with a reader held open
so that a command which wrongly writes into it cannot hang the test."""

from __future__ import annotations

import os
import stat
import tarfile

import pytest
from django.core.management import CommandError, call_command

from annotator.storage import OutPathError, out_path_check, out_text_write
from ml_backend.models import TrainingRun
from tests.base import FIXTURES
from tests.conftest import run_import

pytestmark = pytest.mark.django_db


@pytest.fixture
def chest(project):
    run_import(project, FIXTURES / "chest_xray" / "eval" / "normal", layout="flat",
               split="eval", default_label="normal", dataset_name="chest")
    return project


@pytest.fixture
def targets(tmp_path):
    """Paths of every kind that is not a place to write a file, and what each holds."""
    outside = tmp_path / "outside"
    outside.mkdir()
    precious = outside / "passwd"
    precious.write_text("root:x:0:0\n")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)     # a wrong write cannot block
    link = tmp_path / "link.tar.gz"
    link.symlink_to(precious)
    dangling = tmp_path / "dangling.tar.gz"
    dangling.symlink_to(outside / "made-through-the-link")
    folder = tmp_path / "somefolder"
    folder.mkdir()
    yield {"precious": precious, "outside": outside,
           "cases": [(fifo, "is a named pipe \\(fifo\\), not a regular file"),
                     (link, "is a symbolic link"),
                     (dangling, "is a symbolic link"),
                     (folder, "is a folder: give --out a file name"),
                     (tmp_path / "nonexistent" / "dir" / "x.tar.gz",
                      "nonexistent/dir is not an existing folder"),
                     (precious / "x.tar.gz", "passwd is not an existing folder")]}
    os.close(reader)


def _untouched(tmp_path, targets):
    assert targets["precious"].read_text() == "root:x:0:0\n"
    assert sorted(p.name for p in targets["outside"].iterdir()) == ["passwd"]
    assert stat.S_ISFIFO(os.lstat(tmp_path / "fifo").st_mode)
    assert (tmp_path / "link.tar.gz").is_symlink() and (tmp_path / "dangling.tar.gz").is_symlink()
    assert (tmp_path / "somefolder").is_dir() and not any((tmp_path / "somefolder").iterdir())
    assert not (tmp_path / "nonexistent").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]    # no temp left


@pytest.mark.parametrize("command, extra", [
    ("project_export", []),
    ("audit_export", []),
    ("export_labels", ["--format", "csv"]),
])
def test_a_file_export_refuses_every_path_that_is_not_a_file_to_write(chest, tmp_path, targets,
                                                                     command, extra):
    for path, reason in targets["cases"]:
        with pytest.raises(CommandError, match=reason):
            call_command(command, "--project", chest.name, *extra, "--out", str(path))
    _untouched(tmp_path, targets)


def test_project_export_into_proc_is_refused_before_any_work(chest):
    with pytest.raises(CommandError, match="cannot write in /proc"):
        call_command("project_export", "--project", chest.name, "--out", "/proc/x.tar.gz")


def test_project_export_replaces_a_regular_file_as_its_help_says(chest, tmp_path):
    archive = tmp_path / "backup.tar.gz"
    archive.write_text("an older backup\n")
    call_command("project_export", "--project", chest.name, "--out", str(archive))
    with tarfile.open(archive) as tar:
        assert "manifest.json" in tar.getnames()
    assert stat.S_ISREG(os.lstat(archive).st_mode)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]    # no temp left


def test_export_model_refuses_every_path_that_is_not_a_new_or_empty_folder(chest, tmp_path,
                                                                           targets):
    """Checked before the model is even looked up: this project has no classifier."""
    file = tmp_path / "a-file"
    file.write_text("keep me\n")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    link = tmp_path / "link-to-folder"
    link.symlink_to(tmp_path / "somefolder")
    for path, reason in [(tmp_path / "fifo", "is a named pipe \\(fifo\\), not a folder"),
                         (link, "is a symbolic link"),
                         (file, "is a file, not a folder"),
                         (full, "is not empty"),
                         (tmp_path / "nonexistent" / "dir" / "out",
                          "nonexistent/dir is not an existing folder")]:
        with pytest.raises(CommandError, match=reason):
            call_command("export_model", "--project", chest.name, "--out", str(path))
    assert file.read_text() == "keep me\n" and (full / "x").read_text() == "x"
    _untouched(tmp_path, targets)
    assert not TrainingRun.objects.exists()


def test_export_labels_image_folder_refuses_a_fifo_and_a_link(chest, tmp_path, targets):
    link = tmp_path / "images"
    link.symlink_to(tmp_path / "somefolder")
    for path, reason in [(tmp_path / "fifo", "not a folder"), (link, "is a symbolic link")]:
        with pytest.raises(CommandError, match=reason):
            call_command("export_labels", "--project", chest.name, "--format", "imagefolder",
                         "--out", str(path))
    _untouched(tmp_path, targets)


def test_the_shared_check_and_write(tmp_path):
    assert out_path_check(tmp_path / "new.csv") == tmp_path / "new.csv"
    assert out_path_check(tmp_path / "new-folder", folder=True) == tmp_path / "new-folder"
    with pytest.raises(OutPathError, match="names no file"):
        out_path_check(tmp_path / "..")
    with pytest.raises(OutPathError, match="give --labels a file name"):
        out_path_check(tmp_path, option="--labels")
    # a link put in place after the check is found again before the rename
    target = tmp_path / "target"
    target.write_text("unchanged\n")
    out = tmp_path / "out.csv"
    out.symlink_to(target)
    with pytest.raises(OutPathError, match="is a symbolic link"):
        out_text_write(out, "new\n")
    assert target.read_text() == "unchanged\n" and out.is_symlink()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]    # no half file
    # a regular file is replaced whole, with a plain file's permissions
    out.unlink()
    out.write_text("old\n")
    out_text_write(out, "new\n")
    assert out.read_text() == "new\n" and not out.is_symlink()
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
