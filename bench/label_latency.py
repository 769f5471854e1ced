"""Save an answer → next scan on screen: the label page's latency in a real browser.

    python -m bench.label_latency [--source fixtures/brain_mri/pool] [--answers 40] \
        [--refit-every 0] [--out bench/results/label_latency.json]

Builds a throwaway project (SQLite and media in a temp folder), imports ``--source`` (a class
folder tree: the class names are the oracle), pretrains a small encoder (1 epoch, 64 px),
labels 5 scans per class and refits, so the label page shows everything it shows in use: the
model's suggestion with its top classes, the Grad-CAM link, the similar labeled scans (FAISS)
and why the scan was chosen. Then it starts ``manage.py runserver`` on localhost, drives
Debian's Chromium with Playwright (log in, open the worklist's next scan, answer by hotkey
``--answers`` times) and records, per answer, the time from the key press to the next
scan's image having loaded (measured in the page: ``window.medlabel.timings``) and the
server's own time for the answer request. ``--refit-every N`` (default 0: no refit during
the run) makes every N-th answer trigger a refit, which with in-process tasks (no broker)
runs inside that request: those answers are reported separately.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._server import free_port, wait_for_port

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "latency-bench-password"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {"n": len(values), "median": round(statistics.median(values), 1),
            "p95": round(_percentile(values, 0.95), 1), "max": round(max(values), 1),
            "min": round(min(values), 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(REPO / "fixtures" / "brain_mri" / "pool"),
                        help="class-folder tree of scans (names are the classes)")
    parser.add_argument("--eval-source", default=str(REPO / "fixtures" / "brain_mri" / "eval"),
                        help="labeled class-folder tree for the eval split (the gate needs it)")
    parser.add_argument("--answers", type=int, default=40)
    parser.add_argument("--refit-every", type=int, default=0)
    parser.add_argument("--chromium", default=os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="label-latency-"))
    env = {"DATABASE_URL": f"sqlite:///{workdir / 'db.sqlite3'}",
           "MEDIA_ROOT": str(workdir / "media"), "ARTIFACTS_ROOT": str(workdir / "artifacts"),
           "INCOMING_ROOT": str(workdir / "incoming"), "DJANGO_SETTINGS_MODULE": "medsite.settings",
           "LOG_LEVEL": "WARNING", "DEBUG": "1"}
    os.environ.update(env)
    os.environ.pop("CELERY_BROKER_URL", None)
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from annotator import services
    from annotator.models import LabelClass, Membership
    from ml_backend import services as ml

    devnull = open(os.devnull, "w")
    call_command("migrate", verbosity=0)
    project = services.project_create(name="latency")
    call_command("import_scans", args.source, project=project.name, layout="class-folders",
                 no_progress=True, stdout=devnull)
    # the oracle: keep the folder labels aside, then remove them so the pool is unlabeled
    from annotator.models import Annotation

    truth = dict(Annotation.objects.filter(scan__project=project, source="import")
                 .values_list("scan_id", "label_class_id"))
    Annotation.objects.filter(scan__project=project).delete()
    call_command("import_scans", args.eval_source, project=project.name, split="eval",
                 layout="class-folders", no_progress=True, stdout=devnull)
    call_command("pretrain", project=project.name, epochs=1, image_size=64, batch_size=64,
                 no_progress=True, stdout=devnull)
    reader = get_user_model().objects.create_user("reader", password=PASSWORD)
    services.membership_set(project=project, user=reader, role=Membership.Role.CLINICIAN)
    project.refresh_from_db()
    project.refit_every = 10 ** 6
    project.gate_tolerance = 1.0
    project.query_batch_size = args.answers + 10
    project.save()
    classes = list(LabelClass.objects.filter(project=project))
    pool_ids = set(project.scans.filter(split="pool").values_list("pk", flat=True))
    for label_class in classes:
        for scan_id in [s for s, c in truth.items() if c == label_class.pk and s in pool_ids][:5]:
            services.annotation_create(scan=project.scans.get(pk=scan_id), reader=reader,
                                       label_class=label_class)
    call_command("refit", project=project.name, stdout=devnull)
    project.refresh_from_db()
    project.refit_every = args.refit_every or 10 ** 6
    project.save()
    ml.query_round_create(project=project)
    print(f"project ready: {project.scans.count()} scans, model {project.active_model.version}",
          flush=True)

    port = free_port()
    log = open(workdir / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}",
                               "--noreload"], cwd=REPO, env={**os.environ, **env},
                              stdout=log, stderr=subprocess.STDOUT)
    rows = []
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_port(port)
        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=args.chromium,
                args=["--headless", "--no-sandbox", "--disable-gpu",
                      "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{base}/accounts/login/")
            page.fill("input[name=username]", "reader")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url(lambda url: "/accounts/login/" not in url)
            page.goto(f"{base}/projects/{project.pk}/next/")
            page.wait_for_function("window.medlabel && document.body.dataset.scan")
            for index in range(args.answers):
                payload = page.evaluate("window.medlabel.payload")
                scan_id = payload["scan"]["id"]
                key = next(c["key"] for c in payload["classes"] if c["id"] == truth[scan_id])
                before = page.evaluate("window.medlabel.timings.length")
                model_before = payload["model_version"]
                page.keyboard.press(key)
                page.wait_for_function(f"window.medlabel.timings.length > {before}",
                                       timeout=120_000)
                swap = page.evaluate("window.medlabel.timings[window.medlabel.timings.length-1]")
                server_ms = page.evaluate("window.medlabel.lastServerMs")
                model_after = page.evaluate("window.medlabel.payload.model_version")
                rows.append({"answer": index + 1, "swap_ms": swap, "server_ms": server_ms,
                             "refit": model_after != model_before})
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=20)
    plain = [r for r in rows if not r["refit"]]
    refits = [r for r in rows if r["refit"]]
    result = {"args": vars(args), "cpu_count": os.cpu_count(), "scans": project.scans.count(),
              "rows": rows,
              "swap_ms": _summary([r["swap_ms"] for r in plain]),
              "server_ms": _summary([r["server_ms"] for r in plain]),
              "swap_ms_with_refit": _summary([r["swap_ms"] for r in refits])}
    print(json.dumps({k: result[k] for k in ("swap_ms", "server_ms", "swap_ms_with_refit")},
                     indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
