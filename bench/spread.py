"""Embedding a whole project and scoring its pool with a fine-tuned network, with 1 and
with 2 worker processes (issue 21, point 3).

    python -m bench.spread --scans 6000 \\
        --source '../shared/data/pneumoniamnist/pneumoniamnist.npz#train' \\
        [--chunk 500] [--repeats 2] [--out bench/results/spread.json]

A project of ``--scans`` distinct scans (bench.scale's crops of the source, 64 px) on a
throwaway PostgreSQL database with the shipped starter encoder, and a network fine-tuned on
200 of its labels. Each job then runs as the product runs it, through a real Celery worker
(prefork) on Redis: a full ``embed`` run (the whole project again, as after a new encoder),
and the fine-tuned network's predictions for the whole pool (what promoting it writes).
With ``-c 1`` the run's own process computes every chunk; with ``-c 2`` the second process
takes the helper task and the chunks split between them (ml_backend/services/spread.py).
Also ``SPREAD_CHUNK_SIZE=0`` (one pass, no chunks) for the cost of the bookkeeping. The
pool scores are timed in this process as coordinator: alone, and with one worker process
helping. Wall time per job, median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench.scale import Worker, _database, bench_env, load_source, write_scans


def _configure(args, workdir: Path) -> dict:
    env = bench_env(_database(args.database, "medlabel_spread"), args.broker, workdir, "spread",
                    IMPORT_CHUNK_SIZE="0", SPREAD_CHUNK_SIZE=str(args.chunk),
                    SPREAD_HELPERS="8")
    os.environ.update(env)
    return env


def _run_on_worker(project, kind: str, params: dict) -> float:
    """Queue a training run as the product does and wait for a worker to finish it."""
    from ml_backend.models import TrainingRun
    from ml_backend.services.runs import training_run_create

    run = training_run_create(project=project, kind=kind, params=params)
    started = time.perf_counter()
    from ml_backend.dispatch import enqueue_training_run

    enqueue_training_run(run.pk)
    while True:
        run.refresh_from_db()
        if run.status in (TrainingRun.Status.SUCCEEDED, TrainingRun.Status.FAILED):
            break
        time.sleep(0.2)
    seconds = time.perf_counter() - started
    if run.status != TrainingRun.Status.SUCCEEDED:
        raise SystemExit(f"{kind} run failed: {run.last_error}")
    return seconds, run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=6000)
    parser.add_argument("--source", required=True)
    parser.add_argument("--chunk", type=int, default=500, help="SPREAD_CHUNK_SIZE")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--database", default="postgres://postgres@127.0.0.1:5432")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="spread-"))
    env = _configure(args, workdir)
    import redis

    redis.Redis.from_url(args.broker).flushdb()
    import django

    django.setup()
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from annotator import services
    from annotator.models import Project, Scan
    from ml_backend.services.inference import predictor_for

    log = lambda text: print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)  # noqa: E731
    call_command("migrate", verbosity=0)
    images, labels = load_source(args.source)
    truth: dict[str, str] = {}
    folder = write_scans(images, labels, 0, args.scans, workdir / "scans", 64, truth)
    project = services.project_create(name="spread")
    Project.objects.filter(pk=project.pk).update(refit_every=10 ** 6)
    call_command("import_scans", str(folder), project=project.name, dataset="spread",
                 layout="flat", no_progress=True, stdout=open(os.devnull, "w"))
    call_command("pretrain", project=project.name, epochs=0, image_size=64,
                 stdout=open(os.devnull, "w"))
    project.refresh_from_db()
    reader = get_user_model().objects.create_user("reader", password="bench-pass-1")
    pool = list(Scan.objects.filter(project=project).order_by("pk"))
    names = sorted(set(truth.values()))
    classes = {n: services.label_class_get_or_create(project=project, name=n)[0] for n in names}
    for scan in pool[:200]:
        services.annotation_create(scan=scan, reader=reader,
                                   label_class=classes[truth[scan.source_name]])
    call_command("finetune", "--project", project.name, "--epochs", "1", "--batch-size", "64",
                 "--no-progress", stdout=open(os.devnull, "w"))
    from ml_backend.models import ModelVersion

    network = ModelVersion.objects.filter(project=project, config__kind="finetuned").latest("pk")
    log(f"{len(pool)} scans, encoder {project.active_encoder.version}, network {network.version}")

    results: dict = {"scans": len(pool), "chunk": args.chunk, "cpus": os.cpu_count(),
                     "embed": {}, "predict": {}}
    # the embed run on a worker: one pass, chunks on one process, chunks on two
    for label, workers, chunk in (("1_process_one_pass", 1, 0), ("1_process", 1, args.chunk),
                                  ("2_processes", 2, args.chunk)):
        worker = Worker({**env, "SPREAD_CHUNK_SIZE": str(chunk)}, workers,
                        workdir / f"worker-{label}.log")
        try:
            times = []
            for _ in range(args.repeats):
                seconds, run = _run_on_worker(project, "embed", {"full": True})
                times.append(seconds)
        finally:
            worker.stop()
        results["embed"][label] = {"seconds": round(statistics.median(times), 2),
                                   "runs": [round(t, 2) for t in times],
                                   "log": [line for line in run.log.splitlines()
                                           if "chunks" in line]}
        log(f"embed {len(pool)} scans, {label}: {statistics.median(times):.1f}s")
    # the pool scores of the fine-tuned network (what promoting it writes): this process,
    # alone (one pass; chunks) and with one worker process helping
    for label, chunk, helper in (("1_process_one_pass", 0, False), ("1_process", args.chunk, False),
                                 ("2_processes", args.chunk, True)):
        settings.SPREAD_CHUNK_SIZE = chunk
        settings.CELERY_TASK_ALWAYS_EAGER = not helper      # eager: no helper is queued
        worker = Worker(env, 1, workdir / f"worker-predict-{label}.log") if helper else None
        try:
            predictor_for(network)(pool[:50])                # the network loaded once
            times = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                predictor_for(network)(pool)
                times.append(time.perf_counter() - started)
        finally:
            if worker is not None:
                worker.stop()
        results["predict"][label] = {"seconds": round(statistics.median(times), 2),
                                     "runs": [round(t, 2) for t in times]}
        log(f"predict {len(pool)} scans, {label}: {statistics.median(times):.1f}s")
    results["classes"] = names
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k in ("embed", "predict")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
