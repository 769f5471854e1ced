"""``export_labels --format imagefolder`` when a scan's stored image is missing from
MEDIA_ROOT: it used to say "cannot write the image folder OUT: No such file or directory",
blaming the output. It names the scans whose files are missing and what to do, and leaves
nothing at --out (the folder is built beside it and renamed only when whole)."""

from __future__ import annotations

import shutil

import pytest
from django.core.management import CommandError, call_command

from annotator import services
from annotator.models import LabelClass
from annotator.storage import media_path
from tests.base import FIXTURES
from tests.conftest import run_import


@pytest.fixture
def labeled(project, users):
    for name in ("no_tumor", "pituitary_tumor"):
        run_import(project, FIXTURES / "brain_mri" / "pool" / name, layout="flat",
                   dataset_name="brain")
        services.label_class_get_or_create(project=project, name=name)
    classes = {c.name: c for c in LabelClass.objects.filter(project=project)}
    pool = list(project.scans.filter(split="pool").order_by("pk"))
    for scan, name in zip(pool[:4], ("no_tumor", "no_tumor", "pituitary_tumor",
                                     "pituitary_tumor")):
        services.annotation_create(scan=scan, reader=users["alice"], label_class=classes[name])
    project.labeled = pool[:4]
    return project


def _export(project, out):
    call_command("export_labels", "--project", project.name, "--format", "imagefolder",
                 "--out", str(out))


def test_missing_stored_images_are_named_and_nothing_is_left_at_out(labeled, tmp_path):
    project = labeled
    lost = [project.labeled[1], project.labeled[3]]
    kept = tmp_path / "kept"
    kept.mkdir()
    for scan in lost:                   # the files are gone from storage (a failed disk)
        shutil.move(media_path(scan.preview.name), kept / f"{scan.pk}.png")

    out = tmp_path / "x"
    with pytest.raises(CommandError) as refused:
        _export(project, out)
    said = str(refused.value)
    assert f"the stored image of scans {lost[0].pk}, {lost[1].pk} is missing from " \
           "MEDIA_ROOT" in said, said
    assert "restore those files from your backup of MEDIA_ROOT" in said
    assert f"Nothing was written to {out}" in said and "cannot write" not in said
    assert not out.exists()
    # no half-built folder beside it either
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifacts", "incoming", "kept",
                                                          "media"]

    # an empty folder given as --out stays as it was
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CommandError, match=f"scans {lost[0].pk}, {lost[1].pk}"):
        _export(project, empty)
    assert list(empty.iterdir()) == []

    # restored from the backup: the export is whole
    for scan in lost:
        shutil.move(kept / f"{scan.pk}.png", media_path(scan.preview.name))
    _export(project, out)
    images = sorted(p.name for p in out.glob("pool/*/*.png"))
    assert images == sorted(f"{s.pk}.png" for s in project.labeled)
