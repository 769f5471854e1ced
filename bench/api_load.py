"""The REST API under load: /api/v1/ served by gunicorn as in production, read by scripts.

    python -m bench.api_load --scans 5000 \\
        --source '../shared/data/pneumoniamnist/pneumoniamnist.npz#train' \\
        --eval-source '../shared/data/pneumoniamnist/pneumoniamnist.npz#val' \\
        [--labels 200] [--workers 2] [--clients 1,4,16] [--seconds 20] \\
        [--out bench/results/api_load.json]
    python -m bench.api_load --table bench/results/api_load.json

The site is grown as bench.scale grows it (its helpers, imported): a throwaway PostgreSQL
database (``--database``, dropped and made again, dropped after), the eval split imported as
it is, the shipped starter encoder (``pretrain --epochs 0``), ``--scans`` distinct real scans
imported by a real Celery worker (2 processes, Redis), ``--labels`` of them labeled through
the product's services, and one refit (predictions for the pool, a query round).

It is served as deploy/run.sh serves it: ``gunicorn medsite.wsgi -w WORKERS --threads 4
--timeout 120 --access-logfile -`` on a free loopback port, DEBUG=0, with one Celery worker
beside it, and Django's cache (where the API's throttle counts) in the broker's Redis, as
deploy/run.sh sets CACHE_URL. The per-user throttle is raised (``--throttle-user``, default 10000/second: the
load measures the server, not the throttle, and the throttle's per-user history stays one
second long at every level); a last run at the product's default throttle (API_THROTTLE_USER
unset) checks that 429s arrive with Retry-After and problem JSON.

``--readers`` clinicians (and a reviewer, whose token downloads the labels: a clinician of
a blind-reading project, the default, is refused them) each get a token through the
product's own path (the account page's "make a token"). For each client count C, C
threads (a ``requests.Session`` each, a reader's token each, round robin) send for
``--seconds`` a mix of the calls a script makes (``MIX``): projects, a random page of
scans, one scan, the worklist, a random page of predictions, a random page of answers, the
labels as JSON lines, and answers (POST, 10%):
the scan's real label on a worklist scan, with the model version, suggestion and confidence
the reader was shown. A warm-up run (not recorded) comes first. Per endpoint: count,
median / p95 / p99 ms, requests/s and status codes; every non-2xx is an error, reported
with its first bodies. Also: the gunicorn processes' RSS before and after, the database
size, and the client process's own CPU time (the clients share the machine with the server).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from bench._server import add_site_options, free_port, wait_for_port, write_result
from bench.scale import (ROOT, Worker, _database, _p, bench_env, import_with_workers,
                         load_source, refit)

# the request mix: weight of each call (percent of requests)
MIX = {"projects": 5, "scans": 20, "scan": 20, "worklist": 15, "predictions": 15,
       "annotations": 10, "labels": 5, "answer": 10}


# --- the pure parts (tests/bench/test_api_load.py) ------------------------------------------


@dataclass
class Site:
    """What the clients know of the site: ids and page counts, read once from the database
    before a level (the scans' count does not shrink during it; the readers' own lists are
    paged as each list's ``count`` says, ``Client.seen``)."""

    project: int
    scan_ids: list[int]
    scan_pages: int
    prediction_pages: int
    annotation_pages: int
    truth: dict[int, int]                   # pool scan id → the class id of its real label
    shown: dict[int, tuple[str, int, float]] = field(default_factory=dict)
    # ^ scan id → (model version, predicted class id, confidence): what the reader was shown
    page_size: int = 50


def pages(count: int, page_size: int) -> int:
    """Pages of a paged list of ``count`` items (page 1 exists even when it is empty)."""
    return max(1, math.ceil(count / page_size))


def choose(rng: random.Random, mix: dict[str, float] = MIX) -> str:
    return rng.choices(list(mix), weights=list(mix.values()))[0]


def answer_target(worklist: list[dict], truth: dict[int, int], rng: random.Random
                  ) -> dict | None:
    """A worklist item to answer: one still open for this reader if there is one, else any
    item whose label is known (a second reading). None: nothing in the worklist to answer."""
    known = [item for item in worklist if item["scan"]["id"] in truth]
    open_ = [item for item in known if item.get("state") == "open"]
    pick = open_ or known
    return rng.choice(pick) if pick else None


def request_for(op: str, site: Site, rng: random.Random, worklist: list[dict] | None = None,
                round_id: int | None = None, seen: dict[str, int] | None = None
                ) -> tuple[str, str, dict | None]:
    """``(method, path, json body)`` of one call of the mix. An answer needs a worklist the
    client has read: without one (or with nothing in it to answer) the call is the worklist.
    ``seen``: the page counts this client's reader was last told (a list's ``count``); a
    reader of a blind-reading project sees only their own answers and the predictions of the
    scans they have not answered, fewer pages than the database holds."""
    seen = seen or {}
    base = f"/api/v1/projects/{site.project}"
    if op == "answer":
        item = answer_target(worklist or [], site.truth, rng)
        if item is None:
            op = "worklist"
        else:
            scan = item["scan"]["id"]
            body = {"scan": scan, "outcome": "label", "class_id": site.truth[scan],
                    "duration_ms": rng.randint(2000, 20000),
                    "submission_id": f"load-{uuid.uuid4().hex}"}
            if round_id is not None:
                body["query_round"] = round_id
            if scan in site.shown:
                version, suggestion, confidence = site.shown[scan]
                body.update(shown_model_version=version, shown_suggestion=suggestion,
                            shown_confidence=round(confidence, 4))
            return "POST", f"{base}/annotations/", body
    if op == "projects":
        return "GET", "/api/v1/projects/", None
    if op == "scans":
        return "GET", f"{base}/scans/?page={rng.randint(1, site.scan_pages)}", None
    if op == "scan":
        return "GET", f"/api/v1/scans/{rng.choice(site.scan_ids)}/", None
    if op == "worklist":
        return "GET", f"{base}/worklist/", None
    if op == "predictions":
        limit = seen.get("predictions", site.prediction_pages)
        return "GET", f"{base}/predictions/?page={rng.randint(1, limit)}", None
    if op == "annotations":
        limit = seen.get("annotations", site.annotation_pages)
        return "GET", f"{base}/annotations/?page={rng.randint(1, limit)}", None
    if op == "labels":
        return "GET", f"{base}/labels/?format=jsonl&split=all", None
    raise ValueError(f"unknown call {op!r}")


def summarize(samples: list[tuple[str, int | str, float]], seconds: float) -> dict:
    """Per endpoint and overall: count, median / p95 / p99 ms, requests/s, status codes.
    ``samples``: ``(endpoint, status, ms)``; a status is an HTTP code or an exception name."""
    by_op: dict[str, list[tuple[int | str, float]]] = {}
    for op, status, ms in samples:
        by_op.setdefault(op, []).append((status, ms))
    endpoints = {op: _stats(rows, seconds) for op, rows in sorted(by_op.items())}
    overall = _stats([(s, ms) for _, s, ms in samples], seconds) if samples else {}
    errors = sum(1 for _, s, _ in samples if not _ok(s))
    return {"seconds": round(seconds, 2), "requests": len(samples),
            "requests_per_s": round(len(samples) / seconds, 1) if seconds else None,
            "errors": errors, "overall": overall, "endpoints": endpoints}


def _ok(status) -> bool:
    return isinstance(status, int) and 200 <= status < 300


def _stats(rows: list[tuple[int | str, float]], seconds: float) -> dict:
    times = [ms for _, ms in rows]
    statuses: dict[str, int] = {}
    for status, _ in rows:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    return {"count": len(rows), "median_ms": round(statistics.median(times), 1),
            "p95_ms": round(_p(times, 0.95), 1), "p99_ms": round(_p(times, 0.99), 1),
            "requests_per_s": round(len(rows) / seconds, 1) if seconds else None,
            "statuses": dict(sorted(statuses.items()))}


def table(path_or_payload) -> str:
    """The docs' table of a result file (``--table FILE``): endpoint × clients, median /
    p95 ms and requests/s."""
    payload = (path_or_payload if isinstance(path_or_payload, dict)
               else json.loads(Path(path_or_payload).read_text()))
    levels = payload["levels"]
    names = [op for op in MIX if any(op in lv["endpoints"] for lv in levels)]
    head = ["| endpoint | " + " | ".join(
        f"{lv['clients']} client{'s' if lv['clients'] != 1 else ''}" for lv in levels) + " |",
        "|---|" + "---:|" * len(levels)]

    def cell(stats: dict | None) -> str:
        if not stats:
            return "–"
        return f"{stats['median_ms']:g} / {stats['p95_ms']:g} ms, {stats['requests_per_s']:g}/s"

    lines = head + [f"| {op} | " + " | ".join(cell(lv["endpoints"].get(op)) for lv in levels)
                    + " |" for op in names]
    lines.append("| **all** | " + " | ".join(cell(lv["overall"]) for lv in levels) + " |")
    lines.append("| errors (non-2xx) | " + " | ".join(str(lv["errors"]) for lv in levels) + " |")
    rss = [lv.get("server_rss_mb", {}).get("after") for lv in levels]
    if any(r is not None for r in rss):
        lines.append("| gunicorn RSS after, MB | " + " | ".join(
            "–" if r is None else f"{r['total']:g}" for r in rss) + " |")
    return "\n".join(lines)


# --- the server -----------------------------------------------------------------------------


class Gunicorn:
    """The site as deploy/run.sh serves it, on a free loopback port."""

    def __init__(self, env: dict, workers: int, threads: int, log: Path):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "gunicorn", "medsite.wsgi",
                        "-b", f"127.0.0.1:{self.port}", "-w", str(workers),
                        "--threads", str(threads), "--timeout", "120", "--access-logfile", "-"]
        self.log = log
        self.process = subprocess.Popen(self.command, cwd=ROOT, env=env,
                                        stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                                        start_new_session=True)
        try:
            wait_for_port(self.port, timeout=120)
            deadline = time.monotonic() + 120     # every worker booted (each loads the app)
            while len(self.workers()) < workers and time.monotonic() < deadline:
                time.sleep(0.2)
        except RuntimeError:
            self.stop()
            raise SystemExit(f"gunicorn did not start:\n{log.read_text()[-2000:]}")

    def workers(self) -> list[int]:
        return _children(self.process.pid)

    def rss_mb(self) -> dict:
        workers = [_rss_mb(pid) for pid in self.workers()]
        master = _rss_mb(self.process.pid)
        return {"master": master, "workers": workers,
                "total": round(master + sum(workers), 1)}

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return sorted(found)


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


# --- the clients ----------------------------------------------------------------------------


class Client:
    """One script: a requests.Session with a reader's token, and the worklist it last read."""

    def __init__(self, base: str, token: str, seed: int, export_token: str | None = None):
        import requests

        self.base = base
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Token {token}"
        # the labels download is a reviewer's (a clinician of a blind-reading project, the
        # default, is refused it: it holds every reader's answers)
        self.export_headers = {"Authorization": f"Token {export_token or token}"}
        self.rng = random.Random(seed)
        self.worklist: list[dict] = []
        self.round_id: int | None = None
        self.samples: list[tuple[str, int | str, float]] = []
        self.errors: list[dict] = []
        self.answers = {"open": 0, "read": 0}
        # the paged lists as this reader sees them: page 1 until a list says its count
        self.seen: dict[str, int] = {"predictions": 1, "annotations": 1}

    def call(self, op: str, site: Site, *, record: bool = True):
        method, path, body = request_for(op, site, self.rng, self.worklist, self.round_id,
                                         self.seen)
        if method == "GET" and path.endswith("/worklist/"):
            op = "worklist"
        target = None
        if method == "POST":
            target = next(i for i in self.worklist if i["scan"]["id"] == body["scan"])
        started = time.perf_counter()
        try:
            response = self.session.request(
                method, self.base + path, json=body, timeout=120,
                headers=self.export_headers if op == "labels" else None)
            content = response.content
            status: int | str = response.status_code
        except Exception as exc:              # noqa: BLE001 - a failed call is a result
            response, content, status = None, str(exc).encode(), type(exc).__name__
        ms = (time.perf_counter() - started) * 1000
        if record:
            self.samples.append((op, status, ms))
            if not _ok(status) and len(self.errors) < 5:
                self.errors.append({"endpoint": op, "method": method, "path": path,
                                    "status": status,
                                    "body": content[:400].decode(errors="replace")})
        if response is not None and _ok(status):
            if op == "worklist":
                data = response.json()
                self.worklist, self.round_id = data["items"], data["round"]
            elif op in self.seen:
                self.seen[op] = pages(response.json()["count"], site.page_size)
            elif target is not None:
                self.answers["open" if target.get("state") == "open" else "read"] += 1
                target["state"] = "answered"       # as the worklist will say when read again
        return status, response

    def run(self, site: Site, deadline: float, *, record: bool = True) -> None:
        while time.monotonic() < deadline:
            self.call(choose(self.rng), site, record=record)


def load(base: str, tokens: list[str], site: Site, clients: int, seconds: float, seed: int,
         *, export_token: str, record: bool = True) -> tuple[list[Client], float]:
    """``clients`` threads for ``seconds``; returns them and the wall time until all ended."""
    workers = [Client(base, tokens[i % len(tokens)], seed * 1000 + i, export_token)
               for i in range(clients)]
    started = time.monotonic()
    deadline = started + seconds
    threads = [threading.Thread(target=w.run, args=(site, deadline), kwargs={"record": record})
               for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return workers, time.monotonic() - started


def throttle_check(base: str, token: str, project: int, seconds: float) -> dict:
    """One script calling the cheapest endpoint as fast as it can until the throttle answers
    429 (or ``seconds`` pass): what the 429 says."""
    import requests

    session = requests.Session()
    session.headers["Authorization"] = f"Token {token}"
    started = time.monotonic()
    counts: dict[str, int] = {}
    first = None
    while time.monotonic() - started < seconds:
        response = session.get(f"{base}/api/v1/projects/", timeout=60)
        counts[str(response.status_code)] = counts.get(str(response.status_code), 0) + 1
        if response.status_code == 429 and first is None:
            try:
                body = response.json()
            except ValueError:
                body = response.text[:400]
            first = {"after_requests": sum(counts.values()) - 1,
                     "after_s": round(time.monotonic() - started, 1),
                     "retry_after": response.headers.get("Retry-After"),
                     "content_type": response.headers.get("Content-Type"), "body": body}
        if counts.get("429", 0) >= 20:
            break
    # the throttle is per user, not per endpoint: another call answers 429 as well
    if first is not None:
        other = session.get(f"{base}/api/v1/projects/{project}/worklist/", timeout=60)
        first["worklist_status_while_throttled"] = other.status_code
    out = {"seconds": round(time.monotonic() - started, 1), "statuses": counts,
           "first_429": first}
    if first is None:
        out["verdict"] = "no 429 within the time given"
    else:
        body = first["body"] if isinstance(first["body"], dict) else {}
        problem_json = (str(first["content_type"]).startswith("application/problem+json")
                        and body.get("status") == 429
                        and {"type", "title", "status", "detail"} <= set(body))
        retry = str(first["retry_after"] or "").isdigit()
        out["verdict"] = ("429 with Retry-After and problem JSON" if problem_json and retry
                          else f"429 but Retry-After={first['retry_after']!r}, "
                               f"problem JSON={problem_json}")
        out["ok"] = bool(problem_json and retry)
    return out


# --- the site -------------------------------------------------------------------------------


def build_site(args, env: dict, workdir: Path, log) -> dict:
    """The project grown as bench.scale grows it; returns what the clients need."""
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.test import Client as DjangoClient
    from django.urls import reverse
    from rest_framework.authtoken.models import Token

    from annotator import services
    from annotator.models import LabelClass, Membership, Project, Scan

    call_command("migrate", verbosity=0)
    images, labels = load_source(args.source)
    project = services.project_create(name="api-load")
    # the answers posted under load start no refit (they would take the same CPUs; refits
    # under load are bench.scale's and bench.refit_latency's)
    Project.objects.filter(pk=project.pk).update(refit_every=10 ** 6, gate_tolerance=1.0)
    User = get_user_model()
    readers = []
    # clinicians, then the throttle run's own clinician, then a reviewer (labels downloads)
    for i in range(args.readers + 2):
        name, role = ((f"reader{i}", Membership.Role.CLINICIAN) if i <= args.readers
                      else ("reviewer", Membership.Role.REVIEWER))
        user = User.objects.create_user(name, password=f"bench-pass-{i}-x")
        services.membership_set(project=project, user=user, role=role)
        readers.append(user)
    tokens = []
    for user in readers:                       # the account page's "make a token"
        client = DjangoClient()
        client.force_login(user)
        response = client.post(reverse("annotator:account"), {"action": "token"})
        if response.status_code != 302:
            raise SystemExit(f"token for {user}: HTTP {response.status_code}")
        tokens.append(Token.objects.get(user=user).key)
    with open(os.devnull, "w") as quiet:
        call_command("import_scans", args.eval_source, project=project.name, split="eval",
                     dataset="eval", no_progress=True, stdout=quiet)
        call_command("pretrain", project=project.name, epochs=0, image_size=64, stdout=quiet)
    project.refresh_from_db()
    truth_names: dict[str, str] = {}
    grown = import_with_workers(env, project, images, labels, truth_names, 0, args.scans,
                                workdir / "grow", workers=2, side=args.side)
    log(f"imported {grown['scans']} scans in {grown['seconds']:.0f}s "
        f"(embedded in {grown['embedding']['seconds']:.0f}s)")
    classes = {c.name: c for c in LabelClass.objects.filter(project=project)}
    pool = Scan.objects.filter(project=project, split="pool")
    labeled = 0
    for name in sorted(classes):
        names = [n for n, t in truth_names.items() if t == name][:args.labels // len(classes)]
        for scan in pool.filter(source_name__in=names):
            services.annotation_create(scan=scan, reader=readers[0], label_class=classes[name])
            labeled += 1
    fitted = refit(project)
    log(f"{labeled} labels, refit {fitted['seconds']:.1f}s ({fitted['version']})")
    truth = {pk: classes[truth_names[source]].pk for pk, source in
             pool.values_list("pk", "source_name") if truth_names.get(source) in classes}
    return {"project": project, "tokens": tokens, "readers": [u.username for u in readers],
            "truth": truth, "import": grown, "labels": labeled, "refit": fitted}


def site_now(project, truth: dict[int, int]) -> Site:
    from django.conf import settings

    from annotator.models import Annotation, Scan
    from ml_backend.models import Prediction

    size = settings.REST_FRAMEWORK["PAGE_SIZE"]
    project.refresh_from_db()
    scan_ids = list(Scan.objects.filter(project=project).values_list("pk", flat=True))
    predictions = Prediction.objects.filter(model_version_id=project.active_model_id)
    shown = {scan: (version, cls, conf) for scan, version, cls, conf in predictions.values_list(
        "scan_id", "model_version__version", "predicted_class_id", "confidence")
        if cls is not None}
    return Site(project=project.pk, page_size=size, scan_ids=scan_ids,
                scan_pages=pages(len(scan_ids), size),
                prediction_pages=pages(predictions.count(), size),
                annotation_pages=pages(Annotation.objects.filter(
                    scan__project=project).count(), size),
                truth=truth, shown=shown)


def database_mb() -> float:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_database_size(current_database())")
        return round(cursor.fetchone()[0] / 2 ** 20, 1)


def check_every_call(base: str, token: str, site: Site, export_token: str) -> None:
    """Each call of the mix once, before any load: all must answer 2xx."""
    client = Client(base, token, seed=0, export_token=export_token)
    for op in ["worklist"] + [op for op in MIX if op != "worklist"]:
        status, response = client.call(op, site)
        if not _ok(status):
            raise SystemExit(f"{op}: HTTP {status} {client.errors[-1]['body']}")


# --- main -----------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=5000, help="pool scans to grow to")
    parser.add_argument("--source", help="images the pool scans are made from")
    parser.add_argument("--eval-source", help="labeled eval scans (as they are)")
    parser.add_argument("--side", type=int, default=64, help="side of the made scans in px")
    parser.add_argument("--labels", type=int, default=200, help="pool labels before the refit")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn worker processes")
    parser.add_argument("--threads", type=int, default=4, help="threads per gunicorn worker "
                        "(deploy/run.sh: 4)")
    parser.add_argument("--clients", default="1,4,16", help="client counts, one level each")
    parser.add_argument("--seconds", type=float, default=20, help="seconds per level")
    parser.add_argument("--warmup", type=float, default=5, help="seconds of unrecorded load "
                        "before the first level")
    parser.add_argument("--readers", type=int, default=4, help="reader users (a token each)")
    parser.add_argument("--throttle-user", default="10000/second",
                        help="API_THROTTLE_USER for the measured levels")
    parser.add_argument("--throttle-seconds", type=float, default=300,
                        help="longest run at the default throttle waiting for a 429 (0: skip)")
    parser.add_argument("--throttle-rate", default="",
                        help="API_THROTTLE_USER for that run (default: unset, the product's "
                             "default)")
    parser.add_argument("--seed", type=int, default=0)
    add_site_options(parser, database_name="medlabel_api_load",
                     broker="redis://127.0.0.1:6379/13")
    args = parser.parse_args(argv)
    if args.table:
        print(table(args.table))
        return 0
    if not args.source or not args.eval_source:
        parser.error("--source and --eval-source are required")
    client_counts = [int(c) for c in args.clients.split(",")]

    command = "python -m bench.api_load " + shlex.join(argv if argv is not None else sys.argv[1:])
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="api-load-"))
    workdir.mkdir(parents=True, exist_ok=True)
    log = lambda text: print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)  # noqa: E731
    os.environ.pop("API_THROTTLE_USER", None)     # this process reads the product's default
    env = bench_env(_database(args.database, "medlabel_api_load"), args.broker, workdir,
                    "api-load", IMPORT_CHUNK_SIZE=os.environ.get("IMPORT_CHUNK_SIZE", "250"),
                    # as deploy/run.sh: every web process counts API calls in the broker's Redis
                    CACHE_URL=args.broker)
    os.environ.update(env)
    import redis

    redis.Redis.from_url(args.broker).flushdb()
    server = worker = None
    try:
        import django

        django.setup()
        from django.conf import settings

        started = time.monotonic()
        site_info = build_site(args, env, workdir, log)
        project, tokens = site_info["project"], site_info["tokens"]
        readers, throttled, reviewer = tokens[:-2], tokens[-2], tokens[-1]
        result = {
            "command": command, "args": vars(args),
            "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version(),
                        "note": "clients run in this process on the same machine as the server"},
            "settings": {
                "gunicorn": f"-w {args.workers} --threads {args.threads} --timeout 120 "
                            "--access-logfile - (deploy/run.sh's flags)",
                "DEBUG": env["DEBUG"], "API_THROTTLE_USER": args.throttle_user,
                "throttle_note": "raised so the load measures the server, not the throttle; "
                                 "the throttle's default is checked in `throttle`",
                "page_size": settings.REST_FRAMEWORK["PAGE_SIZE"],
                "DB_CONN_MAX_AGE": os.environ.get("DB_CONN_MAX_AGE", "0 (unset)"),
                "cache": settings.CACHES["default"]["BACKEND"],
                "mix_percent": MIX, "readers": f"{len(readers)} clinicians (round robin over "
                "the clients); labels downloads with a reviewer's token (a clinician of a "
                "blind-reading project, the default, is refused them)",
                "refit_every": "off (no refit from the answers posted under load)",
                "celery": "1 worker process beside the server (queues default, refit, train)"},
            "site": {"scans": len(site_info["truth"]), "labels": site_info["labels"],
                     "import": site_info["import"], "refit": site_info["refit"],
                     "build_s": round(time.monotonic() - started, 1)},
            "database_mb": {"before": database_mb()}, "levels": []}

        worker = Worker(env, 1, workdir / "celery.log")
        server = Gunicorn({**env, "API_THROTTLE_USER": args.throttle_user}, args.workers,
                          args.threads, workdir / "gunicorn.log")
        result["server_rss_mb"] = {"started": server.rss_mb()}
        site = site_now(project, site_info["truth"])
        result["site"].update(predictions=len(site.shown), scan_pages=site.scan_pages,
                              prediction_pages=site.prediction_pages)
        check_every_call(server.base, readers[0], site, reviewer)
        load(server.base, readers, site, max(client_counts), args.warmup, args.seed,
             export_token=reviewer, record=False)
        result["server_rss_mb"]["after_warmup"] = server.rss_mb()
        log(f"served at {server.base}, {len(site.scan_ids)} scans, "
            f"{len(site.shown)} predictions; warmed up")

        for level, clients in enumerate(client_counts):
            site = site_now(project, site_info["truth"])
            before = server.rss_mb()
            cpu = time.process_time()
            workers, seconds = load(server.base, readers, site, clients, args.seconds,
                                    args.seed + 1 + level, export_token=reviewer)
            row = {"clients": clients, **summarize(
                [s for w in workers for s in w.samples], seconds)}
            row["error_bodies"] = [e for w in workers for e in w.errors][:5]
            row["answers"] = {k: sum(w.answers[k] for w in workers) for k in ("open", "read")}
            row["client_cpu_s"] = round(time.process_time() - cpu, 1)
            row["server_rss_mb"] = {"before": before, "after": server.rss_mb()}
            result["levels"].append(row)
            log(f"{clients} clients: {row['requests_per_s']} req/s, median "
                f"{row['overall']['median_ms']} ms, p95 {row['overall']['p95_ms']} ms, "
                f"{row['errors']} errors")
            _write(args, result)
        result["database_mb"]["after"] = database_mb()
        server.stop()

        if args.throttle_seconds > 0:
            throttle_env = dict(env)
            if args.throttle_rate:
                throttle_env["API_THROTTLE_USER"] = args.throttle_rate
            server = Gunicorn(throttle_env, args.workers, args.threads, workdir / "gunicorn.log")
            check = throttle_check(server.base, throttled, project.pk, args.throttle_seconds)
            check["API_THROTTLE_USER"] = args.throttle_rate or (
                f"unset (the default, {settings.REST_FRAMEWORK['DEFAULT_THROTTLE_RATES']['user']})")
            check["note"] = ("the throttle counts in the default cache "
                             f"({settings.CACHES['default']['BACKEND'].rsplit('.', 1)[-1]}, "
                             "CACHE_URL as deploy/run.sh sets it): one count for every "
                             "gunicorn worker process")
            result["throttle"] = check
            log(f"throttle: {check['verdict']} {check['statuses']}")
            server.stop()
        _write(args, result)
        print(table(result))
        errors = sum(row["errors"] for row in result["levels"])
        return 1 if errors or result.get("throttle", {}).get("ok") is False else 0
    finally:
        if server is not None:
            server.stop()
        if worker is not None:
            worker.stop()
        _cleanup(args, workdir)


def _cleanup(args, workdir: Path) -> None:
    """The database dropped, the broker's db emptied, the temp folder removed."""
    import psycopg
    import redis

    try:
        from django.db import connections

        connections.close_all()
    except Exception:                      # noqa: BLE001 - django may not be set up yet
        pass
    with psycopg.connect(f"{args.database}/postgres", autocommit=True) as conn:
        conn.execute('DROP DATABASE IF EXISTS "medlabel_api_load" WITH (FORCE)')
    redis.Redis.from_url(args.broker).flushdb()
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


def _write(args, result: dict) -> None:
    write_result(args.out, result)


if __name__ == "__main__":
    sys.exit(main())
