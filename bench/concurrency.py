"""Concurrent readers through the real HTTP endpoints: no lost and no duplicated label.

    python -m bench.concurrency --clients 8 --scans 500 \
        [--database-url postgres://postgres@127.0.0.1:5432/medlabel_bench] \
        [--source '../shared/data/pneumoniamnist/pneumoniamnist.npz#val'] [--out results.json]

Builds a throwaway project on PostgreSQL (the database is created if missing and dropped
after), imports ``--scans`` scans, serves the site with gunicorn (4 workers × 4 threads, as in
production), and starts ``--clients`` readers at once. Each logs in and labels every scan
through ``POST /projects/<id>/label/<scan>/answer/`` (the label page's JSON call) with its
own submission id; 5% of answers are sent twice at the same moment (a double click). One more
client replays Label Studio webhook events (each event id once, 10% of them twice) through
``/labelstudio/<id>/webhook/``. Afterwards: every accepted answer is stored exactly once,
every reader of a scan keeps their own annotation (disagreement is data), double submits and
replayed events did not duplicate, and no request failed with a server error.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

from bench._server import free_port, wait_for_port

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "concurrency-bench-password"


def login(base: str, username: str, password: str):
    import requests

    session = requests.Session()
    session.get(f"{base}/accounts/login/", timeout=180)   # a worker loads the app first
    token = session.cookies.get("csrftoken")
    response = session.post(f"{base}/accounts/login/", timeout=30, allow_redirects=False,
                            data={"username": username, "password": password,
                                  "csrfmiddlewaretoken": token},
                            headers={"Referer": f"{base}/accounts/login/"})
    if response.status_code != 302:
        raise RuntimeError(f"login of {username} failed: {response.status_code}")
    session.headers.update({"X-CSRFToken": session.cookies.get("csrftoken"),
                            "Referer": f"{base}/"})
    return session


def reader(base: str, project_id: int, username: str, scans: list[int], classes: list[int],
           double_rate: float, seed: int, results: list, errors: list) -> None:
    """Label every scan once (some twice at the same moment, same submission id)."""
    rng = random.Random(seed)
    try:
        session = login(base, username, PASSWORD)
    except Exception as exc:   # noqa: BLE001 - reported, not raised, from a thread
        errors.append(f"{username}: {exc}")
        return
    for scan_id in scans:
        body = {"outcome": "label", "class_id": rng.choice(classes),
                "submission_id": f"{username}-{scan_id}-{uuid.uuid4().hex[:8]}",
                "duration_ms": rng.randrange(500, 9000)}
        url = f"{base}/projects/{project_id}/label/{scan_id}/answer/"
        copies = 2 if rng.random() < double_rate else 1
        statuses = []

        def send():
            try:
                statuses.append(session.post(url, json=body, timeout=60).status_code)
            except Exception as exc:  # noqa: BLE001
                statuses.append(f"error {type(exc).__name__}")

        threads = [threading.Thread(target=send) for _ in range(copies)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results.append({"reader": username, "scan": scan_id, "class_id": body["class_id"],
                        "statuses": statuses, "copies": copies})


def webhook_replayer(base: str, project_id: int, secret: str, scans: list[int],
                     class_names: list[str], replay_rate: float, seed: int, results: list) -> None:
    import requests

    rng = random.Random(seed)
    for i, scan_id in enumerate(scans):
        event = {"action": "ANNOTATION_CREATED",
                 "task": {"id": 10_000 + i, "data": {"scan_id": scan_id}},
                 "annotation": {"id": 50_000 + i, "lead_time": 2.0, "completed_by": {"id": 1},
                                "result": [{"from_name": "diagnosis", "to_name": "image",
                                            "type": "choices",
                                            "value": {"choices": [rng.choice(class_names)]}}]}}
        for _ in range(2 if rng.random() < replay_rate else 1):
            response = requests.post(f"{base}/labelstudio/{project_id}/webhook/", json=event,
                                     headers={"X-MedLabel-Secret": secret}, timeout=60)
            results.append({"event": 50_000 + i, "status": response.status_code})


def hammer(base: str, project, *, clients: int, scans: list[int], double_rate: float = 0.05,
           replay_rate: float = 0.1, webhook_secret: str | None = None, seed: int = 0) -> dict:
    """Run the readers (and the webhook replayer) at once; return the raw outcomes."""
    from annotator.models import LabelClass

    classes = list(LabelClass.objects.filter(project=project).values_list("pk", "name"))
    results, errors, hooks = [], [], []
    threads = [threading.Thread(target=reader, args=(
        base, project.pk, f"reader{i}", scans, [c for c, _ in classes], double_rate, seed + i,
        results, errors)) for i in range(clients)]
    if webhook_secret:
        threads.append(threading.Thread(target=webhook_replayer, args=(
            base, project.pk, webhook_secret, scans, [n for _, n in classes], replay_rate,
            seed + 99, hooks)))
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"results": results, "errors": errors, "hooks": hooks,
            "seconds": time.perf_counter() - started}


def verify(project, outcome: dict, *, clients: int, scans: list[int]) -> dict:
    """What the database holds against what the clients were told."""
    from annotator.models import Annotation

    web = Annotation.objects.filter(scan__project=project, source="web")
    per_pair = Counter(web.values_list("reader__username", "scan_id"))
    accepted = [r for r in outcome["results"] if any(s in (200, 201) for s in r["statuses"])]
    statuses = Counter(str(s) for r in outcome["results"] for s in r["statuses"])
    server_errors = sum(n for s, n in statuses.items() if not s.isdigit() or int(s) >= 500)
    stored_classes = dict(((u, s), c) for u, s, c in web.values_list(
        "reader__username", "scan_id", "label_class_id"))
    wrong = [r for r in accepted if stored_classes.get((r["reader"], r["scan"])) != r["class_id"]]
    ls = Annotation.objects.filter(scan__project=project, source="label_studio")
    events = {h["event"] for h in outcome["hooks"] if h["status"] == 200}
    return {
        "answers_sent": sum(len(r["statuses"]) for r in outcome["results"]),
        "double_submits": sum(1 for r in outcome["results"] if r["copies"] == 2),
        "accepted": len(accepted), "stored": web.count(),
        "duplicates": sum(n - 1 for n in per_pair.values() if n > 1),
        "lost": len(accepted) - sum(1 for r in accepted if (r["reader"], r["scan"]) in per_pair),
        "stored_with_another_class": len(wrong),
        "scans_with_all_readers": sum(
            1 for s in scans if sum(per_pair.get((f"reader{i}", s), 0) for i in range(clients))
            == clients),
        "statuses": dict(statuses), "server_errors": server_errors,
        "login_errors": outcome["errors"],
        "webhook_requests": len(outcome["hooks"]), "webhook_events": len(events),
        "webhook_stored": ls.count(),
        "webhook_duplicates": ls.count() - len(set(ls.values_list("external_id", flat=True))),
        "seconds": round(outcome["seconds"], 1),
    }


def make_readers(project, clients: int) -> None:
    from django.contrib.auth import get_user_model

    from annotator import services

    User = get_user_model()
    for i in range(clients):
        user, _ = User.objects.get_or_create(username=f"reader{i}",
                                             defaults={"email": f"reader{i}@example.org"})
        user.set_password(PASSWORD)
        user.save()
        services.membership_set(project=project, user=user, role="clinician")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--scans", type=int, default=500)
    parser.add_argument("--source", default=str(REPO.parent / "shared" / "data" / "pneumoniamnist"
                                                / "pneumoniamnist.npz") + "#val")
    parser.add_argument("--database-url",
                        default="postgres://postgres@127.0.0.1:5432/medlabel_concurrency",
                        help="a PostgreSQL URL (the database is created and dropped) or 'sqlite' "
                        "(a temp file)")
    parser.add_argument("--layout", default="auto", help="import layout of --source")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="concurrency-"))
    postgres = args.database_url.startswith("postgres")
    if postgres:
        import psycopg

        admin_url, _, dbname = args.database_url.rpartition("/")
        with psycopg.connect(f"{admin_url}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}"')
            conn.execute(f'CREATE DATABASE "{dbname}"')
    elif args.database_url == "sqlite":
        args.database_url = f"sqlite:///{workdir / 'db.sqlite3'}"
    env = {"DATABASE_URL": args.database_url, "MEDIA_ROOT": str(workdir / "media"),
           "ARTIFACTS_ROOT": str(workdir / "artifacts"), "INCOMING_ROOT": str(workdir / "incoming"),
           "DJANGO_SETTINGS_MODULE": "medsite.settings", "LOG_LEVEL": "WARNING",
           "LABEL_STUDIO_WEBHOOK_SECRET": "concurrency-secret"}
    os.environ.update(env)
    os.environ.pop("CELERY_BROKER_URL", None)
    import django

    django.setup()
    from django.core.management import call_command

    from annotator import services

    call_command("migrate", verbosity=0)
    project = services.project_create(name="concurrency")
    call_command("import_scans", args.source, project=project.name, no_progress=True,
                 layout=args.layout, stdout=open(os.devnull, "w"))
    if not project.label_classes.exists():
        for name in ("normal", "abnormal"):
            services.label_class_get_or_create(project=project, name=name)
    from annotator.models import Annotation

    Annotation.objects.filter(scan__project=project).delete()   # readers label from scratch
    scans = list(project.scans.order_by("pk").values_list("pk", flat=True)[:args.scans])
    make_readers(project, args.clients)
    port = free_port()
    log = open(workdir / "gunicorn.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "medsite.wsgi", "-b", f"127.0.0.1:{port}",
         "-w", str(args.workers), "--threads", str(args.threads), "--timeout", "120"],
        cwd=REPO, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port)
        base = f"http://127.0.0.1:{port}"
        outcome = hammer(base, project, clients=args.clients, scans=scans,
                         webhook_secret="concurrency-secret")
    finally:
        server.terminate()
        server.wait(timeout=30)
    summary = verify(project, outcome, clients=args.clients, scans=scans)
    summary.update({"clients": args.clients, "scans": len(scans),
                    "database": "postgresql" if postgres else "sqlite",
                    "gunicorn": f"{args.workers} workers x {args.threads} threads",
                    "answers_per_second": round(summary["answers_sent"] / max(
                        outcome["seconds"], 1e-9), 1)})
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2))
    from django.db import connections

    connections.close_all()
    if postgres:
        with psycopg.connect(f"{admin_url}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}"')
    ok = (summary["duplicates"] == 0 and summary["lost"] == 0 and summary["server_errors"] == 0
          and summary["webhook_duplicates"] == 0 and not summary["login_errors"]
          and summary["stored_with_another_class"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
