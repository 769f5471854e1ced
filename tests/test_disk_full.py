"""A full or read-only disk is said in words (tenth probe): every imported file failed with
"unexpected error (OSError)" and no reason; an embedding written to a full disk left its
partial temp file behind, keeping the disk full, and the run said "1089024 requested and
597984 written"."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from annotator import services
from ml_backend.errors import TrainingError
from ml_backend.services import artifacts
from tests.base import FIXTURES
from tests.conftest import run_import

pytestmark = pytest.mark.django_db


def test_an_import_onto_a_full_disk_says_why_each_file_failed(project, monkeypatch):
    def full(name, data):
        raise OSError(errno.ENOSPC, "No space left on device", "/var/media/scans/x.jpg")

    monkeypatch.setattr(services, "write_atomic", full)
    job = run_import(project, FIXTURES / "brain_mri" / "eval" / "glioma_tumor", layout="flat")
    job.refresh_from_db()
    assert job.failed > 0 and project.scans.count() == 0
    reasons = {e["reason"] for e in job.errors}
    assert reasons == {"could not be written to the site's storage: No space left on device "
                       "(ask the site's administrator; import it again once that is fixed)"}
    assert not any("/var/media" in r for r in reasons)        # no path in the report


def test_an_array_written_to_a_full_disk_leaves_no_partial_file(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    target = folder / "embeddings.npy"

    def half(path, array):
        with open(path, "wb") as handle:
            handle.write(b"\x93NUMPY partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", half)
    with pytest.raises(TrainingError, match="could not write embeddings.npy to the model "
                                            "storage: No space left on device"):
        artifacts.save_npy_atomic(target, np.zeros(4))
    assert list(folder.iterdir()) == []
