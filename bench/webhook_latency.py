"""Label Studio's webhook as the demo server answers it: how long Label Studio waits per
annotation, with the ingest (and any refit it makes due) off the request or inline.

    python -m bench.webhook_latency [--annotations 30] [--out bench/results/webhook_latency.json]

In a throw-away folder: ``manage.py migrate`` and ``manage.py demo_setup`` as ``make demo``
runs them, the demo project linked to a (pretend) Label Studio project id with a webhook
secret and ``refit_every`` 5, then ``manage.py runserver`` with no broker, once per mode on
its own copy of the database:

* ``background`` — the demo's defaults: the webhook is answered at once, a background thread
  of the server ingests, refits go to the background worker process;
* ``inline`` — ``ML_TASKS_IN_THREAD=0``: everything inside the webhook's request (what the
  issue saw before: a first ingest of about 7 s and a due refit of 19 s in the request).

Per annotation it POSTs Label Studio's ANNOTATION_CREATED payload (the scan's true class,
the demo clinician's e-mail) and records the time to the response; Label Studio gives up on
a webhook after about a second. At the end it waits for every annotation to be stored and
every refit to finish, and reports both.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench._server import start_runserver, throwaway_site_env
from bench.demo_walkthrough import fixture_truth

REPO = Path(__file__).resolve().parent.parent
SECRET = "bench-webhook-secret"
LS_PROJECT = 7


def _post(url: str, body: dict) -> tuple[float, int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              "X-MedLabel-Secret": SECRET})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.loads(response.read() or b"{}")
        return time.perf_counter() - started, response.status, answer


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_mode(mode: str, *, workdir: Path, base_env: dict, annotations: int,
             drain_timeout: float) -> dict:
    from django.db import connections

    from annotator.management.commands.demo_setup import DEMO_PROJECT
    from annotator.models import Annotation, Project
    from ml_backend.models import TrainingRun

    db = workdir / f"db-{mode}.sqlite3"
    shutil.copyfile(workdir / "db.sqlite3", db)
    env = {**base_env, "DATABASE_URL": f"sqlite:///{db}"}
    if mode == "inline":
        env["ML_TASKS_IN_THREAD"] = "0"
    connections.close_all()              # this process reads the mode's own copy too
    connections["default"].settings_dict["NAME"] = str(db)
    project = Project.objects.get(name=DEMO_PROJECT)
    from django.contrib.auth import get_user_model

    clinician = get_user_model().objects.get(username="clinician")
    truth_by_hash = fixture_truth(REPO / "fixtures")
    pool = [(pk, truth_by_hash.get(sha)) for pk, sha in project.scans.filter(
        split="pool").order_by("pk").values_list("pk", "sha256")]
    # round robin over (label set, class), as a reader's worklist mixes them
    groups: dict = {}
    for pk, truth in pool:
        if truth:
            groups.setdefault(truth, []).append((pk, truth))
    pool = [item for batch in zip(*groups.values()) for item in batch][:annotations]
    runs_before = set(TrainingRun.objects.filter(project=project).values_list("pk", flat=True))

    server, base = start_runserver(REPO, env, workdir / f"server-{mode}.log")
    url = f"{base}/labelstudio/{project.pk}/webhook/"
    rows = []
    try:
        for index, (scan_id, (_, true_class)) in enumerate(pool):
            body = {"action": "ANNOTATION_CREATED",
                    "project": {"id": LS_PROJECT},
                    "task": {"id": 5000 + index, "data": {"scan_id": scan_id}},
                    "annotation": {"id": 9000 + index, "lead_time": 3.0, "result": [{
                        "from_name": "diagnosis", "to_name": "image", "type": "choices",
                        "value": {"choices": [true_class]}}],
                        "completed_by": {"id": 1, "email": clinician.email}}}
            seconds, status, answer = _post(url, body)
            rows.append({"annotation": index + 1, "scan": scan_id, "seconds": round(seconds, 4),
                         "status": status, "queued": answer.get("queued")})
            time.sleep(0.2)       # a reader's pace is far slower; enough to interleave
        deadline = time.monotonic() + drain_timeout
        ids = [str(9000 + i) for i in range(len(pool))]
        while time.monotonic() < deadline:
            stored = Annotation.objects.filter(source="label_studio", external_id__in=ids).count()
            busy = TrainingRun.objects.filter(project=project,
                                              status__in=["queued", "running"]).exists()
            if stored == len(ids) and not busy:
                break
            time.sleep(1)
        drained = time.monotonic() - (deadline - drain_timeout)
    finally:
        server.terminate()
        server.wait(timeout=30)
    stored = Annotation.objects.filter(source="label_studio", external_id__in=ids).count()
    refits = list(TrainingRun.objects.filter(project=project, kind="refit").exclude(
        pk__in=runs_before).values("pk", "status"))
    times = [r["seconds"] for r in rows]
    return {"mode": mode, "annotations": len(rows), "stored": stored,
            "response_seconds": {"median": round(statistics.median(times), 4),
                                 "p95": round(_percentile(times, 0.95), 4),
                                 "max": round(max(times), 4), "first": times[0]},
            "over_1s": sum(t > 1.0 for t in times),
            "refits": len(refits), "refits_succeeded": sum(r["status"] == "succeeded"
                                                           for r in refits),
            "seconds_until_all_stored_and_refits_done": round(drained, 1), "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", type=int, default=30)
    parser.add_argument("--modes", default="background,inline")
    parser.add_argument("--drain-timeout", type=float, default=600.0)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="webhook-latency-"))
    env = throwaway_site_env(workdir, LABEL_STUDIO_WEBHOOK_SECRET=SECRET)
    for name in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY",
                 "ML_TASKS_IN_THREAD", "ML_TASKS_IN_PROCESS"):
        os.environ.pop(name, None)
    base_env = {**os.environ, **env}
    started = time.perf_counter()
    for command in (["migrate", "--noinput"], ["demo_setup"]):
        subprocess.run([sys.executable, "manage.py", *command], cwd=REPO, env=base_env,
                       check=True, stdout=subprocess.DEVNULL)
    import django

    django.setup()
    from annotator.management.commands.demo_setup import DEMO_PROJECT
    from annotator.models import Project

    Project.objects.filter(name=DEMO_PROJECT).update(label_studio_project_id=LS_PROJECT,
                                                     refit_every=5)
    print(f"demo ready in {time.perf_counter() - started:.0f} s", flush=True)
    results = []
    for mode in args.modes.split(","):
        result = run_mode(mode, workdir=workdir, base_env=base_env,
                          annotations=args.annotations, drain_timeout=args.drain_timeout)
        t = result["response_seconds"]
        print(f"{mode}: webhook answered in median {t['median'] * 1000:.0f} ms, p95 "
              f"{t['p95'] * 1000:.0f} ms, max {t['max'] * 1000:.0f} ms (first "
              f"{t['first'] * 1000:.0f} ms), {result['over_1s']} of {result['annotations']} "
              f"over 1 s; {result['stored']} stored, {result['refits']} refits "
              f"({result['refits_succeeded']} succeeded), all done after "
              f"{result['seconds_until_all_stored_and_refits_done']} s", flush=True)
        results.append(result)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "benchmark": "webhook_latency", "annotations": args.annotations,
            "cpu_count": os.cpu_count(), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
