"""How every cost grows with the project: 10,000 → 100,000 scans on PostgreSQL (issue 21).

    python -m bench.scale --sizes 10000,30000,100000 \\
        --source '../shared/data/pneumoniamnist/pneumoniamnist.npz#train' \\
        --eval-source '../shared/data/pneumoniamnist/pneumoniamnist.npz#val' \\
        [--probe 1000] [--labels 200] [--answers 40] [--out bench/results/scale.json]

One project grows on a throwaway PostgreSQL database (``--database``, dropped and made
again) to each size in turn. Its scans are real ones made distinct: every scan is a random
crop (80–100 % of the side) of a source image, resized to ``--side`` px, with its own
contrast and brightness, written as a PNG, so hashing, deduplication, decoding and previews
do the work they do on real data. The eval split is ``--eval-source`` as it is (labeled).

At each size it measures, with real Celery worker processes on Redis (prefork, ``-c 1`` and
``-c 2``) and the product's own services:

- import: the growth itself (one import job, chunked over 2 worker processes), then two
  probes of ``--probe`` new scans into the grown project, with 1 and with 2 worker processes
  (scans/s);
- embedding of the new scans with the project's encoder (the shipped starter; images/s),
  as one embed run and as chunks on 1 and on 2 worker processes;
- one refit end to end (embed any new scans, heads, calibration, evaluation, gate,
  predictions for the whole pool, next round), with its parts; every refit is promoted
  (gate tolerance 1.0) so the predictions are written each time;
- one query round over the pool;
- the label page's answer → next scan (server time as the view reports it, and the
  queries it ran), the worklist, the project page and the reports page (median, p95);
- database size (``pg_database_size``) and stored files (media, artifacts).

It prints the growth of each cost between sizes as a log-log slope (1.0 = linear) and
writes everything as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench._server import add_site_options, write_result

ROOT = Path(__file__).resolve().parents[1]


# --- scans ----------------------------------------------------------------------------------


def load_source(spec: str) -> tuple[np.ndarray, list[str]]:
    """Images (N, H, W) uint8 and their labels from an import source."""
    from ml_backend.data.datasets import read_source
    from PIL import Image
    import io

    items = read_source(spec).items
    images = [np.asarray(Image.open(io.BytesIO(item.load())).convert("L")) for item in items]
    return np.stack(images), [item.label or "" for item in items]


def write_scans(images: np.ndarray, labels: list[str], start: int, count: int, folder: Path,
                side: int, truth: dict) -> Path:
    """``count`` distinct PNG scans numbered from ``start`` into ``folder`` (flat)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(12345).permutation(len(images))  # sources list by class
    for number in range(start, start + count):
        rng = np.random.default_rng(number)
        base = int(order[number % len(images)])
        image = images[base]
        h, w = image.shape
        crop = rng.uniform(0.8, 1.0)
        ch, cw = max(int(h * crop), 8), max(int(w * crop), 8)
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        patch = Image.fromarray(image[top:top + ch, left:left + cw]).resize(
            (side, side), Image.BILINEAR)
        pixels = np.asarray(patch, np.float32) * rng.uniform(0.85, 1.15) + rng.uniform(-12, 12)
        name = f"s{number:07d}.png"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / name)
        truth[name] = labels[base]
    return folder


# --- processes ------------------------------------------------------------------------------


class Worker:
    """A Celery worker (prefork, ``concurrency`` processes) on every queue the product uses."""

    def __init__(self, env: dict, concurrency: int, log: Path):
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "medsite", "worker", "--pool", "prefork",
             "--concurrency", str(concurrency), "-Q", "default,refit,train",
             "--without-gossip", "--without-mingle", "--without-heartbeat",
             "-n", f"bench{concurrency}@%h", "--loglevel", "INFO"],
            cwd=ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + 120
        while "ready." not in log.read_text(errors="replace"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"celery worker did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.3)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)


def bench_env(database_url: str, broker: str, workdir: Path, name: str, **extra: str) -> dict:
    """The environment of a benchmark's throwaway site and its worker processes: its own
    database, broker, storage folders and secrets; tasks on real workers, plain HTTP."""
    return {**os.environ,
            "DATABASE_URL": database_url, "CELERY_BROKER_URL": broker,
            "MEDIA_ROOT": str(workdir / "media"), "ARTIFACTS_ROOT": str(workdir / "artifacts"),
            "INCOMING_ROOT": str(workdir / "incoming"),
            "DJANGO_SETTINGS_MODULE": "medsite.settings", "LOG_LEVEL": "WARNING",
            "DEBUG": "0", "SECRET_KEY": f"bench-{name}-secret-key-0123456789abcdef",
            "DEID_SALT": f"bench-{name}-salt-0123456789", "ML_TASKS_IN_THREAD": "0",
            "ML_TASKS_IN_PROCESS": "0",
            # plain HTTP on localhost (TLS ends at the reverse proxy in a deployment)
            "SESSION_COOKIE_SECURE": "0", "CSRF_COOKIE_SECURE": "0", "SECURE_SSL_REDIRECT": "0",
            **extra}


def _database(url_base: str, name: str) -> str:
    import psycopg

    with psycopg.connect(f"{url_base}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{url_base}/{name}"


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def slope(small: tuple[int, float], large: tuple[int, float]) -> float | None:
    """Growth of a cost between two sizes on log-log axes (1.0: linear)."""
    (n1, c1), (n2, c2) = small, large
    if not c1 or not c2 or c1 <= 0 or c2 <= 0 or n1 == n2:
        return None
    return round(math.log(c2 / c1) / math.log(n2 / n1), 2)


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


# --- the measurements -----------------------------------------------------------------------


def import_folder(project, folder: Path, *, chunked: bool = True) -> tuple[float, object]:
    from annotator import services

    job = services.import_job_create(project=project, source=str(folder), layout="flat",
                                     dataset_name="scale")
    started = time.perf_counter()
    job = services.import_job_run(job_id=job.pk, chunked=chunked)
    job = services.import_job_wait(job, poll=0.5, timeout=6 * 3600)
    seconds = time.perf_counter() - started
    if job.status != "succeeded" or job.failed:
        raise SystemExit(f"import {job.pk} {job.status}: {job.last_error} {job.errors[:3]}")
    return seconds, job


def import_with_workers(env: dict, project, images, labels, truth: dict, start: int,
                        count: int, folder: Path, *, workers: int, side: int) -> dict:
    """``count`` new scans written to ``folder`` and imported by a Celery worker with
    ``workers`` processes (started for this import and stopped after it)."""
    write_scans(images, labels, start, count, folder, side, truth)
    worker = Worker(env, workers, folder.parent / f"worker-{workers}.log")
    try:
        seconds, job = import_folder(project, folder)
        embedding = import_embedding(job)
    finally:
        worker.stop()
    shutil.rmtree(folder)
    return {"scans": job.imported, "seconds": round(seconds, 2),
            "scans_per_s": round(job.imported / seconds, 1), "chunks": job.chunks_total,
            "embedding": embedding}


def import_embedding(job) -> dict:
    """The embedding of an import's new scans: a project with an encoder embeds them when the
    import ends (its novelty check), on the worker that finished the import."""
    from ml_backend.models import TrainingRun

    deadline = time.monotonic() + 6 * 3600
    while time.monotonic() < deadline:
        run = TrainingRun.objects.filter(kind="embed", params__import_job=job.pk).first()
        if run is not None and run.status in ("succeeded", "failed"):
            seconds = (run.finished_at - run.started_at).total_seconds()
            return {"scans": job.imported, "seconds": round(seconds, 1), "status": run.status,
                    "images_per_s": round(job.imported / seconds, 1) if seconds else None}
        time.sleep(0.5)
    raise SystemExit(f"the embedding of import {job.pk} did not finish")


def embed_throughput(project, count: int) -> dict:
    """The encoder on ``count`` pool scans in this process (previews read from storage,
    the network on the CPU): what each import chunk pays for its scans."""
    from annotator.models import Scan
    from ml_backend.services.artifacts import images_for
    from ml_backend.services.inference import encoder_network
    from ml_backend.ssl import train as ssl

    encoder = project.active_encoder
    model, config = encoder_network(encoder)
    scans = list(Scan.objects.filter(project=project, split="pool").order_by("-pk")[:count])
    started = time.perf_counter()
    ssl.embed(model.encoder, images_for(scans, config.image_size, config.channels), config)
    seconds = time.perf_counter() - started
    return {"scans": len(scans), "seconds": round(seconds, 2),
            "images_per_s": round(len(scans) / seconds, 1)}


def embed_new(project) -> tuple[float, int]:
    from ml_backend.models import TrainingRun
    from ml_backend.services.runs import training_run_create, training_run_execute

    encoder = project.active_encoder
    before = (encoder.metrics.get("embeddings") or {}).get("total", 0)
    run = training_run_create(project=project, kind=TrainingRun.Kind.EMBED)
    started = time.perf_counter()
    run = training_run_execute(run.pk)
    seconds = time.perf_counter() - started
    if run.status != "succeeded":
        raise SystemExit(f"embed failed: {run.last_error}")
    encoder.refresh_from_db()
    return seconds, encoder.metrics["embeddings"]["total"] - before


def refit(project) -> dict:
    from ml_backend.models import TrainingRun
    from ml_backend.services.runs import training_run_create, training_run_execute

    run = training_run_create(project=project, kind=TrainingRun.Kind.REFIT)
    started = time.perf_counter()
    run = training_run_execute(run.pk)
    seconds = time.perf_counter() - started
    if run.status != "succeeded" or run.model_version is None:
        raise SystemExit(f"refit failed: {run.last_error}")
    project.refresh_from_db()
    model = run.model_version
    model.refresh_from_db()
    return {"seconds": round(seconds, 3), "promoted": project.active_model_id == model.pk,
            "parts": model.metrics.get("timings", {}), "version": model.version}


def pages(client, project, *, repeats: int) -> dict:
    from django.urls import reverse

    out = {}
    for name, url in (("worklist", reverse("annotator:worklist", args=[project.pk])),
                      ("project", reverse("annotator:project_detail", args=[project.pk])),
                      ("reports", reverse("annotator:reports", args=[project.pk]))):
        times, queries = [], []
        for _ in range(repeats):
            seconds, count, response, _ = _timed(client.get, url)
            if response.status_code != 200:
                raise SystemExit(f"{name} page: HTTP {response.status_code}")
            times.append(seconds * 1000)
            queries.append(count)
        out[name] = {"median_ms": round(statistics.median(times), 1),
                     "p95_ms": round(_p(times, 0.95), 1), "queries": max(queries)}
    return out


def _timed(call, *args, **kwargs):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as captured:
        started = time.perf_counter()
        response = call(*args, **kwargs)
        seconds = time.perf_counter() - started
    db_ms = sum(float(q["time"]) for q in captured.captured_queries) * 1000
    return seconds, len(captured.captured_queries), response, db_ms


def answers(client, project, truth: dict, classes: dict, count: int) -> dict:
    """``count`` answers on the label page, each returning the next scan's payload."""
    from django.urls import reverse

    from annotator.models import Scan

    response = client.get(reverse("annotator:next_scan", args=[project.pk]))
    scan_id = int(response["Location"].rstrip("/").split("/")[-1])
    wall, server, queries, round_answers, each = [], [], [], [], []
    for number in range(count + 1):              # the first one warms this process's caches
        scan = Scan.objects.get(pk=scan_id)
        label = classes[truth[scan.source_name]]
        url = reverse("annotator:answer", args=[project.pk, scan_id])
        # what else was going on, read outside the timing: the database's autovacuum
        # workers, and this process's full garbage collections during the answer
        vacuums = _autovacuums()
        full_gcs = gc.get_stats()[2]["collections"]
        seconds, n, response, db_ms = _timed(client.post, url, data=json.dumps(
            {"outcome": "label", "class_id": label}), content_type="application/json")
        full_gcs = gc.get_stats()[2]["collections"] - full_gcs
        if response.status_code not in (200, 201):
            raise SystemExit(f"answer: HTTP {response.status_code} {response.content[:300]}")
        body = response.json()
        if body["new_round"]:       # the reader outran the refits: this answer chose a round
            round_answers.append(round(seconds * 1000, 1))
        elif number:
            wall.append(seconds * 1000)
            server.append(body["server_ms"])
            queries.append(n)
            each.append({"ms": round(seconds * 1000, 1), "server_ms": body["server_ms"],
                         "queries": n, "db_ms": round(db_ms, 1), "full_gc": full_gcs,
                         "autovacuum": vacuums})
        if not body["next"]:
            break
        scan_id = body["next"]["scan"]["id"]
    return {"answers": len(wall), "median_ms": round(statistics.median(wall), 1),
            "p95_ms": round(_p(wall, 0.95), 1), "server_p95_ms": round(_p(server, 0.95), 1),
            "queries_max": max(queries), "queries_median": statistics.median(queries),
            "new_round_ms": round_answers, "each": each,
            # the process's garbage collector at the end: objects it walks in a full
            # collection, and those frozen out of it (medsite/gcfreeze.py)
            "gc_tracked": len(gc.get_objects()), "gc_frozen": gc.get_freeze_count()}


def _autovacuums() -> list[str]:
    """The tables PostgreSQL's autovacuum workers are on right now (empty elsewhere)."""
    from django.db import connection

    if connection.vendor != "postgresql":
        return []
    with connection.cursor() as cursor:
        cursor.execute("SELECT query FROM pg_stat_activity WHERE backend_type = "
                       "'autovacuum worker'")
        return [row[0] for row in cursor.fetchall()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,30000,100000")
    parser.add_argument("--source", help="images the pool scans are made from")
    parser.add_argument("--eval-source", help="labeled eval scans (as they are)")
    parser.add_argument("--side", type=int, default=64, help="side of the made scans in px")
    parser.add_argument("--probe", type=int, default=1000,
                        help="scans imported with 1 and with 2 workers at each size")
    parser.add_argument("--labels", type=int, default=200, help="pool labels before the refits")
    parser.add_argument("--answers", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=7, help="page loads per page and size")
    add_site_options(parser, database_name="medlabel_scale", broker="redis://127.0.0.1:6379/14")
    args = parser.parse_args(argv)
    if args.table:
        print(table(args.table))
        return 0
    if not args.source or not args.eval_source:
        parser.error("--source and --eval-source are required")
    sizes = sorted(int(s) for s in args.sizes.split(","))

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = bench_env(_database(args.database, "medlabel_scale"), args.broker, workdir, "scale",
                    # chunks of 250 files, so a 1,000-scan probe gives two workers work to share
                    IMPORT_CHUNK_SIZE=os.environ.get("IMPORT_CHUNK_SIZE", "250"))
    os.environ.update(env)
    import redis

    redis.Redis.from_url(args.broker).flushdb()
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import connection
    from django.test import Client

    from annotator import services
    from annotator.models import LabelClass, Membership, Project, Scan

    call_command("migrate", verbosity=0)
    images, labels = load_source(args.source)
    truth: dict[str, str] = {}
    project = services.project_create(name="scale")
    # no refit from the answers themselves: the bench times refits on their own
    Project.objects.filter(pk=project.pk).update(refit_every=10 ** 6, gate_tolerance=1.0)
    reader = get_user_model().objects.create_user("reader", password="bench-pass-1")
    services.membership_set(project=project, user=reader, role=Membership.Role.CLINICIAN)
    client = Client()
    client.force_login(reader)
    call_command("import_scans", args.eval_source, project=project.name, split="eval",
                 dataset="eval", no_progress=True, stdout=open(os.devnull, "w"))
    # the first model, as the demo makes it: the shipped starter encoder as it is (the pool
    # scans are embedded below, as they arrive)
    call_command("pretrain", project=project.name, epochs=0, image_size=64,
                 stdout=open(os.devnull, "w"))
    project.refresh_from_db()

    rows, made = [], 0
    log = lambda text: print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)  # noqa: E731
    for size in sizes:
        row: dict = {"size": size}
        project.refresh_from_db()
        grow = size - made - 2 * args.probe
        if grow > 0:
            row["grow"] = import_with_workers(env, project, images, labels, truth, made, grow,
                                              workdir / f"grow-{size}", workers=2,
                                              side=args.side)
            made += grow
            log(f"{size}: grew by {row['grow']['scans']} scans in {row['grow']['seconds']:.0f}s, "
                f"embedded in {row['grow']['embedding']['seconds']:.0f}s")
        row["import"] = {}
        for workers in (1, 2):
            part = import_with_workers(env, project, images, labels, truth, made, args.probe,
                                       workdir / f"probe-{size}-{workers}", workers=workers,
                                       side=args.side)
            made += args.probe
            row["import"][f"{workers}_workers"] = part
            embedding = part["embedding"]
            job_rate = part["scans_per_s"]
            log(f"{size}: import probe with {workers} worker(s): "
                f"{job_rate:.0f} scans/s, embedding {embedding['images_per_s']}/s")
        seconds, embedded = embed_new(project)        # anything the imports left: none
        row["embed_left"] = {"scans": embedded, "seconds": round(seconds, 1)}
        row["embed"] = embed_throughput(project, args.probe)
        log(f"{size}: embedding alone {row['embed']['images_per_s']} images/s")

        pool = Scan.objects.filter(project=project, split="pool")
        classes = {c.name: c.pk for c in LabelClass.objects.filter(project=project)}
        if not project.active_model_id:
            labeled = 0
            for name in sorted(classes):
                for scan in pool.filter(source_name__in=[
                        n for n, t in truth.items() if t == name][:args.labels // len(classes)]):
                    services.annotation_create(scan=scan, reader=reader,
                                               label_class=LabelClass.objects.get(pk=classes[name]))
                    labeled += 1
            log(f"{size}: {labeled} pool labels")
        row["refit"] = refit(project)                  # first refit in this process: warm-up
        row["refit"] = refit(project)
        log(f"{size}: refit {row['refit']['seconds']:.1f}s {row['refit']['parts']}")
        from ml_backend.services.queries import query_round_create

        times = []
        for _ in range(3):
            started = time.perf_counter()
            query_round_create(project=project)
            times.append(time.perf_counter() - started)
        row["query"] = {"median_s": round(statistics.median(times), 3), "max_s": round(max(times), 3)}
        row["answer"] = answers(client, project, truth, classes, args.answers)
        row["pages"] = pages(client, project, repeats=args.repeats)
        log(f"{size}: query {row['query']['median_s']}s, answer p95 {row['answer']['p95_ms']} ms "
            f"({row['answer']['queries_max']} queries), pages "
            + ", ".join(f"{k} {v['median_ms']} ms" for k, v in row["pages"].items()))
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_database_size(current_database())")
            row["database_mb"] = round(cursor.fetchone()[0] / 2 ** 20, 1)
        row["media_mb"] = round(_du(workdir / "media") / 2 ** 20, 1)
        row["artifacts_mb"] = round(_du(workdir / "artifacts") / 2 ** 20, 1)
        row["scans"] = Scan.objects.filter(project=project).count()
        rows.append(row)
        _write(args, rows)
    growth = _growth(rows)
    _write(args, rows, growth)
    print(json.dumps({"rows": rows, "growth": growth}, indent=2))
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


METRICS = {
    # per-scan costs: a slope of 0 means each scan costs the same in a bigger project
    "import s per scan (1 worker)": lambda r: (r["import"]["1_workers"]["seconds"]
                                               / r["import"]["1_workers"]["scans"]),
    "import s per scan (2 workers)": lambda r: (r["import"]["2_workers"]["seconds"]
                                                / r["import"]["2_workers"]["scans"]),
    "embedding s per scan (1 process)": lambda r: r["embed"]["seconds"] / r["embed"]["scans"],
    # whole-project costs: 1.0 is linear
    "refit s": lambda r: r["refit"]["seconds"],
    "refit: predictions + activation s": lambda r: r["refit"]["parts"].get("publish_s"),
    "query s": lambda r: r["query"]["median_s"],
    "answer p95 ms": lambda r: r["answer"]["p95_ms"],
    "worklist ms": lambda r: r["pages"]["worklist"]["median_ms"],
    "project page ms": lambda r: r["pages"]["project"]["median_ms"],
    "reports page ms": lambda r: r["pages"]["reports"]["median_ms"],
    "database MB": lambda r: r["database_mb"],
    "artifacts MB": lambda r: r["artifacts_mb"],
}


def table(path: str) -> str:
    """The docs' table of a result file (``--table FILE``)."""
    rows = json.loads(Path(path).read_text())["rows"]
    growth = _growth(rows)
    lines = ["| cost | " + " | ".join(f"{r['size']:,} scans" for r in rows) + " | slopes |",
             "|---|" + "---:|" * len(rows) + "---|"]
    for name, read in METRICS.items():
        values = []
        for r in rows:
            try:
                value = read(r)
            except (KeyError, TypeError, ZeroDivisionError):
                value = None
            values.append("–" if value is None else f"{value * 1000:.2f} ms" if "per scan" in name
                          else f"{value:g}")
        whole = _whole_range(rows, read) if len(rows) > 2 else None
        lines.append(f"| {name} | " + " | ".join(values) + " | "
                     + ", ".join("–" if g is None else f"{g:.2f}" for g in growth[name])
                     + ("" if whole is None else
                        f" ({rows[0]['size'] // 1000}k→{rows[-1]['size'] // 1000}k: {whole:.2f})")
                     + " |")
    return "\n".join(lines)


def _whole_range(rows: list[dict], read) -> float | None:
    """The slope from the smallest to the largest size: one noisy middle size (a page cache
    warm at one size and cold at the next) moves a single step's slope a lot."""
    try:
        return slope((rows[0]["size"], read(rows[0])), (rows[-1]["size"], read(rows[-1])))
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def _growth(rows: list[dict]) -> dict:
    """Log-log slopes between successive sizes (per-scan costs such as import time per scan
    are slopes of the per-scan cost: 0 means it does not grow)."""
    out = {}
    for name, read in METRICS.items():
        pairs = []
        for small, large in zip(rows, rows[1:]):
            try:
                pairs.append(slope((small["size"], read(small)), (large["size"], read(large))))
            except (KeyError, TypeError, ZeroDivisionError):
                pairs.append(None)
        out[name] = pairs
    return out


def _write(args, rows, growth=None) -> None:
    write_result(args.out, {"args": vars(args), "cpu_count": os.cpu_count(), "rows": rows,
                            "growth": growth})


if __name__ == "__main__":
    sys.exit(main())
