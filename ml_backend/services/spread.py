"""Long per-scan work of one training run spread over every worker: embedding a whole
project with an encoder, and scoring the whole pool with a fine-tuned network.

The run that needs the work (the *coordinator*) cuts the scans into chunks and writes the
plan next to the version's artifacts (shared storage, like everything the workers share);
it then queues a few helper tasks on the ``train`` queue and works through the chunks
itself. Each chunk is claimed by creating its claim file exclusively, computed, and written
as ``<chunk>.npz`` (scan ids and rows) under a temporary name and renamed; a claim whose
lease ran out (a lost worker) is taken over. The coordinator gathers the results in plan
order once every chunk's file exists, then removes the plan's folder. So:

- with one worker process the coordinator computes every chunk (nothing waits on a queue
  its own worker would have to serve);
- each chunk is idempotent (computing it twice writes the same rows), so a duplicate
  helper, a redelivered task or a taken-over lease costs time, never correctness;
- without a broker (demo, tests: tasks run in-process) no helper is queued;
- with ``SPREAD_HELPERS`` 0 (the default) nothing is split at all: measured on one 2-core
  machine, a second process made these jobs 1.3x slower (docs/benchmarks.md); set it where
  workers on other machines can help.

Pure bookkeeping here; what a chunk computes is a named function (``WORK``) of the version
and the scans, so helpers need only ids.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from django.conf import settings

from ml_backend.errors import TrainingError
from ml_backend.models import ModelVersion

logger = logging.getLogger(__name__)

POLL_S = 0.5


def _embed_rows(model: ModelVersion, scans: list) -> np.ndarray:
    """Embeddings and thumbnails, side by side (``inference.embedding_rows``)."""
    from ml_backend.services.artifacts import images_for
    from ml_backend.services.inference import embedding_rows, encoder_network

    network, config = encoder_network(model)
    return embedding_rows(network, images_for(scans, config.image_size, config.channels),
                          config)


def _predict_rows(model: ModelVersion, scans: list) -> np.ndarray:
    """Uncalibrated class probabilities of a fine-tuned / distilled network (the caller
    applies its temperature and the scans' label sets)."""
    from ml_backend.services.artifacts import images_for
    from ml_backend.services.inference import classifier_network
    from ml_backend.ssl import train as ssl

    network, config = classifier_network(model)
    return np.asarray(ssl.predict_proba(network, images_for(scans, config.image_size,
                                                            config.channels), config),
                      np.float32)


WORK: dict[str, Callable[[ModelVersion, list], np.ndarray]] = {
    "embed": _embed_rows, "predict": _predict_rows}


def _folder(model: ModelVersion, name: str) -> Path:
    return Path(model.artifact_dir) / "spread" / name


def _chunk_file(folder: Path, index: int) -> Path:
    return folder / f"chunk-{index:05d}.npz"


def _claim(folder: Path, index: int, lease_s: float) -> bool:
    """Claim a chunk: create its claim file exclusively; a claim older than the lease is
    stale (its worker is gone) and taken over."""
    path = folder / f"chunk-{index:05d}.claim"
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            stale = time.time() - path.stat().st_mtime > lease_s
        except FileNotFoundError:
            return _claim(folder, index, lease_s)
        if not stale:
            return False
        path.unlink(missing_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False                      # another worker took it over first
    with os.fdopen(fd, "w") as handle:
        handle.write(f"{socket.gethostname()}:{os.getpid()}")
    return True


def _compute(model: ModelVersion, plan: dict, folder: Path, index: int) -> None:
    from annotator.models import Scan
    from ml_backend.services.inference import scan_refs

    ids = plan["chunks"][index]
    refs = {r.pk: r for r in scan_refs(Scan.objects.filter(pk__in=ids))}
    missing = [i for i in ids if i not in refs]
    if missing:
        raise TrainingError(f"scans {missing[:5]} were deleted while the run worked on them")
    rows = WORK[plan["work"]](model, [refs[i] for i in ids])
    target = _chunk_file(folder, index)
    tmp = folder / f".tmp-{target.name}-{os.getpid()}"
    with open(tmp, "wb") as handle:
        np.savez(handle, ids=np.asarray(ids, np.int64), rows=rows,
                 worker=np.array(f"{socket.gethostname()}:{os.getpid()}"))
    os.replace(tmp, target)


def _read_plan(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "plan.json").read_text())
    except (OSError, ValueError):
        return None


def work_on(model_id: int, name: str) -> int:
    """A helper (a task on any worker): compute the plan's unclaimed chunks until none is
    left. Returns how many it computed; 0 when the plan is done or gone."""
    model = ModelVersion.objects.filter(pk=model_id).first()
    if model is None:
        return 0
    folder = _folder(model, name)
    plan = _read_plan(folder)
    done = 0
    if plan is None:
        return 0
    for index in range(len(plan["chunks"])):
        try:
            if _chunk_file(folder, index).exists() or not _claim(folder, index,
                                                                 plan["lease_s"]):
                continue
        except FileNotFoundError:          # the coordinator finished and cleaned up
            return done
        try:
            _compute(model, plan, folder, index)
        except FileNotFoundError:
            return done
        except Exception:
            # give the chunk back at once (the coordinator retakes it and reports the
            # error if it fails there too) rather than after the lease
            (folder / f"chunk-{index:05d}.claim").unlink(missing_ok=True)
            raise
        done += 1
    return done


def spread(model: ModelVersion, work: str, scans: list, *, report=None,
           chunk_size: int | None = None, helpers: int | None = None) -> np.ndarray:
    """``WORK[work](model, scans)`` for every scan, computed in chunks by this process and
    any worker that takes a helper task; rows in ``scans`` order. Small inputs (one chunk),
    and any input when no helper may be asked (``SPREAD_HELPERS`` 0, the default: on one
    machine a second process only competes for the same cores), are computed here in one
    pass."""
    chunk_size = int(chunk_size or settings.SPREAD_CHUNK_SIZE)
    helpers = int(settings.SPREAD_HELPERS if helpers is None else helpers)
    if not scans:
        return WORK[work](model, [])
    if chunk_size <= 0 or len(scans) <= chunk_size or helpers <= 0:
        return WORK[work](model, scans)
    ids = [int(s.pk) for s in scans]
    chunks = [ids[i:i + chunk_size] for i in range(0, len(ids), chunk_size)]
    name = f"{work}-{os.getpid()}-{time.time_ns()}"
    folder = _folder(model, name)
    folder.mkdir(parents=True)
    lease_s = float(settings.SPREAD_LEASE_S)
    plan = {"work": work, "chunks": chunks, "lease_s": lease_s}
    (folder / "plan.json").write_text(json.dumps(plan))
    try:
        queued = _queue_helpers(model, name, len(chunks), helpers)
        if report is not None:
            report.log(f"{work}: {len(scans)} scans in {len(chunks)} chunks of {chunk_size}"
                       + (f", {queued} helper task(s) queued for other workers" if queued else ""))
        rows = _gather(model, plan, folder, report)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def _queue_helpers(model: ModelVersion, name: str, chunks: int, helpers: int) -> int:
    if settings.CELERY_TASK_ALWAYS_EAGER:
        return 0                           # no broker: nobody else to share with
    count = min(chunks - 1, helpers)
    if count <= 0:
        return 0
    from ml_backend.tasks import spread_help

    for _ in range(count):
        spread_help.apply_async(args=[model.pk, name], queue=settings.SPREAD_QUEUE)
    return count


def _gather(model: ModelVersion, plan: dict, folder: Path, report) -> np.ndarray:
    """Work through the chunks here, then wait for those other workers hold (taking over a
    lease that runs out), then read every chunk in plan order."""
    total = len(plan["chunks"])
    workers: dict[str, int] = {}
    while True:
        for index in range(total):
            if not _chunk_file(folder, index).exists() and _claim(folder, index, plan["lease_s"]):
                _compute(model, plan, folder, index)
        done = sum(_chunk_file(folder, i).exists() for i in range(total))
        if report is not None:
            report({"stage": plan["work"], "done": done, "total": total})
        if done == total:
            break
        time.sleep(POLL_S)
    parts = []
    for index, ids in enumerate(plan["chunks"]):
        with np.load(_chunk_file(folder, index)) as data:
            if data["ids"].tolist() != ids:
                raise TrainingError(f"chunk {index} of {folder.name} holds other scans")
            parts.append(np.asarray(data["rows"]))
            worker = str(data["worker"])
            workers[worker] = workers.get(worker, 0) + 1
    if report is not None and len(workers) > 1:
        report.log(f"{plan['work']}: chunks computed by {len(workers)} workers ("
                   + ", ".join(f"{w}: {n}" for w, n in sorted(workers.items())) + ")")
    return np.concatenate(parts)
