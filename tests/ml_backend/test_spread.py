"""Long per-scan work spread over the workers (issue 21): a whole-project embedding and a
fine-tuned network's pool scores computed in chunks give the same numbers as one pass; a
lost worker's chunk is taken over; two real Celery workers share one embedding."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from django.core.management import call_command

from ml_backend.models import TrainingRun
from ml_backend.services import spread as spread_module
from ml_backend.services.artifacts import embeddings_paths
from ml_backend.services.inference import scan_refs
from tests.conftest import start_worker, stop_worker
from tests.factories import trained_project


def _embed_full(project) -> tuple[np.ndarray, np.ndarray]:
    call_command("embed", "--project", project.name, "--full")
    paths = embeddings_paths(project.active_encoder)
    ids = np.load(paths["ids"])
    order = np.argsort(ids)
    return ids[order], np.load(paths["vectors"])[order]


def test_a_chunked_embedding_equals_one_pass(encoded_project, settings):
    project = encoded_project
    settings.SPREAD_CHUNK_SIZE = 0
    ids, once = _embed_full(project)
    settings.SPREAD_CHUNK_SIZE = 16                  # 100 scans: 7 chunks …
    _embed_full(project)
    run = TrainingRun.objects.filter(project=project, kind="embed").order_by("-pk").first()
    assert "chunks" not in run.log                   # … but no helpers allowed: one pass
    settings.SPREAD_HELPERS = 4
    ids_chunked, chunked = _embed_full(project)
    assert ids.tolist() == ids_chunked.tolist() and len(ids) == 100
    np.testing.assert_allclose(chunked, once, atol=1e-5)
    run = TrainingRun.objects.filter(project=project, kind="embed").order_by("-pk").first()
    assert "in 7 chunks of 16" in run.log
    assert not list((Path(project.active_encoder.artifact_dir) / "spread").iterdir())


def test_a_lost_workers_chunk_is_taken_over(encoded_project, settings, monkeypatch):
    """A helper claimed chunk 1 and died: once its lease runs out the run computes it."""
    from annotator.models import Scan

    project = encoded_project
    encoder = project.active_encoder
    settings.SPREAD_LEASE_S = 1
    claimed = {}

    def helper_claims_and_dies(model, name, chunks, helpers):
        folder = spread_module._folder(model, name)
        claimed["ok"] = spread_module._claim(folder, 1, 1.0)
        return 1
    monkeypatch.setattr(spread_module, "_queue_helpers", helper_claims_and_dies)
    scans = scan_refs(Scan.objects.filter(project=project).order_by("pk")[:40])
    started = time.monotonic()
    rows = spread_module.spread(encoder, "embed", scans, chunk_size=10, helpers=1)
    assert claimed["ok"] and time.monotonic() - started >= 1.0   # it waited for the lease
    np.testing.assert_allclose(rows, spread_module.spread(encoder, "embed", scans,
                                                          chunk_size=0), atol=1e-5)


def test_a_helper_that_fails_gives_its_chunk_back_at_once(encoded_project, monkeypatch):
    import json

    encoder = encoded_project.active_encoder
    folder = spread_module._folder(encoder, "embed-test")
    folder.mkdir(parents=True)
    (folder / "plan.json").write_text(json.dumps({"work": "embed", "chunks": [[1], [2]],
                                                  "lease_s": 900}))

    def broken(model, plan, folder, index):
        raise RuntimeError("out of memory")
    monkeypatch.setattr(spread_module, "_compute", broken)
    with pytest.raises(RuntimeError):
        spread_module.work_on(encoder.pk, "embed-test")
    assert not list(folder.glob("*.claim"))        # not held until the lease runs out
    assert spread_module.work_on(encoder.pk, "gone") == 0    # a finished plan: nothing


def test_a_fine_tuned_networks_pool_scores_in_chunks_equal_one_pass(encoded_project, users,
                                                                  settings):
    from annotator.models import Scan
    from ml_backend.services.inference import predictor_for

    project = trained_project(encoded_project, users["bob"], per_class=4)
    call_command("finetune", "--project", project.name, "--epochs", "1", "--batch-size", "16",
                 "--no-progress")
    project.refresh_from_db()
    model = project.active_model
    if model.config.get("kind") != "finetuned":      # held back by the gate: use it anyway
        from ml_backend.models import ModelVersion

        model = ModelVersion.objects.filter(project=project).order_by("-pk").first()
    assert model.config["kind"] == "finetuned" and model.config["temperature"]
    pool = list(Scan.objects.filter(project=project, split="pool").order_by("pk"))
    settings.SPREAD_CHUNK_SIZE = 0
    once = predictor_for(model)(pool)
    settings.SPREAD_CHUNK_SIZE, settings.SPREAD_HELPERS = 12, 2
    chunked = predictor_for(model)(pool)
    np.testing.assert_allclose(chunked, once, atol=1e-5)
    raw = predictor_for(model)(pool, calibrated=False)
    settings.SPREAD_CHUNK_SIZE = 0
    np.testing.assert_allclose(raw, predictor_for(model)(pool, calibrated=False), atol=1e-5)


@pytest.mark.worker
def test_two_worker_processes_share_one_embedding(celery_worker_process, encoded_project,
                                                  settings, tmp_path):
    """A full embedding in chunks of 10 with two real Celery workers helping: chunks come
    from more than one process and the vectors equal one pass's."""
    project = encoded_project
    settings.SPREAD_CHUNK_SIZE = 0
    ids, once = _embed_full(project)
    settings.SPREAD_QUEUE = celery_worker_process["queue"]
    settings.CELERY_TASK_ALWAYS_EAGER = False
    settings.SPREAD_CHUNK_SIZE, settings.SPREAD_HELPERS = 10, 8
    second, _ = start_worker(settings, tmp_path, settings.SPREAD_QUEUE, name="second")
    try:
        ids_chunked, chunked = _embed_full(project)
    finally:
        stop_worker(second)
    assert ids.tolist() == ids_chunked.tolist()
    np.testing.assert_allclose(chunked, once, atol=1e-5)
    run = TrainingRun.objects.filter(project=project, kind="embed").order_by("-pk").first()
    assert "helper task(s) queued" in run.log
    assert "chunks computed by" in run.log, run.log      # not all by this process
    assert f":{os.getpid()}" in run.log
