"""Two exports of one version at once (hostile-user probe): tracing is one at a time per
process (torch keeps the traced module in a process-wide table), one export of a version
and format at a time across threads and processes (a lock file), the second request serves
the first one's file or, past the wait, a clear 503; a network that does not trace is a
clear 409, never a 500 with the tracer's graph dump; nothing half-written is left."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
from django.db import connection
from django.test import Client
from rest_framework.authtoken.models import Token

from ml_backend.models import ModelVersion
from tests.factories import trained_project


def _small_network(seed: int):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3), nn.Softmax(dim=-1)).eval()


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_tracing_in_several_threads_at_once_never_fails(tmp_path, fmt):
    """Before the lock, four threads tracing four networks failed with TracingCheckError
    ("Graphs differed across invocations") on every try."""
    from ml_backend.ssl import export as core

    errors, rounds = [], 6 if fmt == "torchscript" else 3
    out = tmp_path / "out"

    def trace(i: int):
        network = _small_network(i)
        try:
            for r in range(rounds):
                core.write(network, out / f"{i}-{r}.{fmt}", fmt=fmt, size=16, channels=1)
        except Exception as exc:          # noqa: BLE001 — collected and asserted below
            errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")

    threads = [threading.Thread(target=trace, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(list(out.iterdir())) == 4 * rounds


def test_a_network_that_traces_differently_each_time_is_a_clear_export_error(tmp_path):
    import torch
    from torch import nn

    from ml_backend.ssl import export as core

    class Fickle(nn.Module):          # a data-independent branch that flips every call
        calls = 0

        def forward(self, x):
            Fickle.calls += 1
            return torch.softmax(x.flatten(1)[:, :3] * (2 if Fickle.calls % 2 else 3), dim=-1)

    with pytest.raises(core.ExportError, match="could not be traced for torchscript") as info:
        core.write(Fickle(), tmp_path / "f.pt", fmt="torchscript", size=8, channels=1)
    assert "graph(" not in str(info.value) and len(str(info.value)) < 300
    assert not (tmp_path / "f.pt").exists()


def _bare_classifier(project, tmp_path, version="p-clf-bare") -> ModelVersion:
    folder = tmp_path / "artifacts" / "models" / version
    folder.mkdir(parents=True)
    return ModelVersion.objects.create(project=project, kind="classifier", version=version,
                                       status="ready", artifact_dir=str(folder),
                                       config={"kind": "head", "classes": []})


def test_second_request_waits_for_the_first_and_serves_its_file(project, tmp_path,
                                                                monkeypatch):
    """While another request holds the version's export lock, a second one waits; when the
    first has written the zip, the second serves that file and exports nothing itself."""
    import fcntl

    from ml_backend.services import export

    model = _bare_classifier(project, tmp_path)
    monkeypatch.setattr(export, "model_export", lambda *a, **k: pytest.fail("exported twice"))
    folder = Path(model.artifact_dir) / "exports"
    folder.mkdir()
    target = folder / f"{model.version}-onnx-ready.zip"
    held = open(folder / f".{model.version}-onnx.lock", "a+b")
    fcntl.flock(held, fcntl.LOCK_EX)

    def first_request_finishes():
        time.sleep(0.6)
        target.write_bytes(b"PK\x05\x06" + b"\0" * 18)     # an empty zip, made "by the first"
        fcntl.flock(held, fcntl.LOCK_UN)
        held.close()

    threading.Thread(target=first_request_finishes).start()
    started = time.monotonic()
    assert export.model_export_archive(model, fmt="onnx", wait=10) == target
    assert 0.4 < time.monotonic() - started < 5


def test_a_lock_held_by_another_process_past_the_wait_is_a_clear_503(project, users, tmp_path,
                                                                      monkeypatch):
    from ml_backend.services import export

    model = _bare_classifier(project, tmp_path)
    folder = Path(model.artifact_dir) / "exports"
    folder.mkdir()
    lock = folder / f".{model.version}-torchscript.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+b'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(30)", str(lock)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(export.ExportBusy, match="being exported by another request"):
            export.model_export_archive(model, fmt="torchscript", wait=0.3)
        monkeypatch.setattr(export, "EXPORT_WAIT_SECONDS", 0.3)
        token, _ = Token.objects.get_or_create(user=users["bob"])
        started = time.monotonic()
        response = Client(HTTP_AUTHORIZATION=f"Token {token.key}").get(
            f"/api/v1/projects/{project.pk}/models/{model.version}/export/",
            {"format": "torchscript"})
        assert time.monotonic() - started < 3
        assert response.status_code == 503, response.content
        assert response["Retry-After"] == "10"
        assert "try again in a moment" in response.json()["detail"]
    finally:
        holder.kill()
        holder.wait()
    assert not list(folder.glob("*.zip")) and not list(folder.glob(".export-*"))


def test_an_export_that_fails_to_trace_is_a_clear_409_and_leaves_nothing(
        encoded_project, users, monkeypatch):
    import torch

    project = trained_project(encoded_project, users["bob"])
    model = project.active_model

    def fails(*args, **kwargs):
        raise torch.jit.TracingCheckError("Graphs differed across invocations!", "")

    monkeypatch.setattr("ml_backend.ssl.export.torch.jit.trace", fails)
    token, _ = Token.objects.get_or_create(user=users["bob"])
    response = Client(HTTP_AUTHORIZATION=f"Token {token.key}").get(
        f"/api/v1/projects/{project.pk}/models/{model.version}/export/",
        {"format": "torchscript"})
    assert response.status_code == 409, response.content
    detail = response.json()["detail"]
    assert detail.startswith(f"{model.version}: the network could not be traced for "
                             "torchscript"), detail
    exports = Path(model.artifact_dir) / "exports"
    assert not list(exports.glob("*.zip")) and not list(exports.glob(".export-*"))


def test_two_exports_of_a_new_version_at_once_both_get_the_one_file(
        encoded_project, users, transactional_db, monkeypatch):
    """The probe's case: a reviewer and an admin export a version never exported before,
    at the same moment (two threads of one web process): both get the same complete zip,
    made once."""
    from ml_backend.services import export

    project = trained_project(encoded_project, users["bob"])
    model = project.active_model
    made = []
    real = export.model_export
    monkeypatch.setattr(export, "model_export",
                        lambda *a, **k: made.append(1) or real(*a, **k))
    results = []

    def request():
        try:
            results.append(export.model_export_archive(model, fmt="torchscript"))
        except Exception as exc:          # noqa: BLE001 — collected and asserted below
            results.append(f"{type(exc).__name__}: {exc}")
        finally:
            connection.close()

    threads = [threading.Thread(target=request) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1], results
    assert made == [1]
    with zipfile.ZipFile(results[0]) as archive:
        names = archive.namelist()
    assert f"{model.version}/model-card.json" in names
    assert any(n.endswith(".pt") for n in names)
    leftovers = [p.name for p in results[0].parent.iterdir()
                 if p.name.startswith(".export-")]
    assert leftovers == []
