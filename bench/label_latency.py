"""Save an answer → next scan on screen: the label page's latency in a real browser.

    python -m bench.label_latency [--source fixtures/brain_mri/pool] [--answers 40] \
        [--refit-every 0] [--worker process|thread] [--inline-refits] \
        [--out bench/results/label_latency.json]

Builds a throwaway project (SQLite and media in a temp folder), imports ``--source`` (a class
folder tree: the class names are the oracle), pretrains a small encoder (1 epoch, 64 px),
labels 5 scans per class and refits, so the label page shows everything it shows in use: the
model's suggestion with its top classes, the Grad-CAM link, the similar labeled scans (FAISS)
and why the scan was chosen. Then it starts ``manage.py runserver`` on localhost, drives
Debian's Chromium with Playwright (log in, open the worklist's next scan, answer by hotkey
``--answers`` times) and records, per answer, the time from the key press to the next
scan's image having loaded (measured in the page: ``window.medlabel.timings``) and the
server's own time for the answer request. ``--refit-every N`` (default 0: no refit during
the run) makes every N-th new label queue a refit. With no broker the server runs refits in
its background worker thread (ML_TASKS_IN_THREAD=1, ml_backend/dispatch.py), so answers go
on while a refit runs: the answers served while a refit was queued or running (the server
says so in the answer's ``model_status``, and the run table is checked before each key
press) are summarised apart from the quiet ones, against the target (median ≤ 200 ms,
p95 ≤ 400 ms). ``--inline-refits`` (ML_TASKS_IN_THREAD=0) runs each refit inside the
answer that queued it instead, as before. At the end the bench waits for the last refit to
finish, records the label page's status line ("Model clf-8 is now active" / "… was held
back: …") and lists the refit runs with their durations.

    python -m bench.label_latency --answers 60 --refit-every 5 \
        --out bench/results/label_latency_refit.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench._server import open_label_page, start_runserver, throwaway_site_env

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


def _met(summary: dict) -> bool:
    return bool(summary.get("n")) and summary["median"] <= 200 and summary["p95"] <= 400


def _seconds(start, end) -> float | None:
    return None if start is None or end is None else round((end - start).total_seconds(), 2)


def _wait(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def _series_truth(project, roots) -> dict[int, int]:
    """Scan id → class id for the synthetic series (class = the folder its patient was
    written to), with eval scans labeled by import-like annotations."""
    import pydicom
    from django.conf import settings as django_settings

    from annotator import services
    from annotator.models import Annotation, LabelClass
    from ml_backend.data.deid import patient_pseudonym

    classes = {}
    for root in roots:
        for folder in sorted(Path(root).iterdir()):
            label_class, _ = services.label_class_get_or_create(project=project,
                                                                 name=folder.name)
            for path in sorted(folder.glob("*.dcm"))[:1000]:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                classes[patient_pseudonym(ds, salt=django_settings.DEID_SALT)] = label_class.pk
    truth = {}
    for scan in project.scans.all():
        if scan.patient_key in classes:
            truth[scan.pk] = classes[scan.patient_key]
            if scan.split == "eval":
                Annotation.objects.get_or_create(
                    scan=scan, source="import", label_class_id=classes[scan.patient_key])
    assert LabelClass.objects.filter(project=project).count() == 2 and truth
    return truth


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(REPO / "fixtures" / "brain_mri" / "pool"),
                        help="class-folder tree of scans (names are the classes)")
    parser.add_argument("--eval-source", default=str(REPO / "fixtures" / "brain_mri" / "eval"),
                        help="labeled class-folder tree for the eval split (the gate needs it)")
    parser.add_argument("--answers", type=int, default=40)
    parser.add_argument("--refit-every", type=int, default=0)
    parser.add_argument("--worker", choices=["process", "thread"], default="process",
                        help="the server's background worker for refits: a spawned process "
                             "(ML_TASKS_IN_PROCESS=1, the default) or a thread of the server")
    parser.add_argument("--inline-refits", action="store_true",
                        help="run refits inside the answer request (ML_TASKS_IN_THREAD=0)")
    parser.add_argument("--drain-timeout", type=float, default=300.0,
                        help="seconds to wait at the end for running refits to finish")
    parser.add_argument("--findings", action="store_true",
                        help="the pool read as findings (every class folder but --no-finding "
                             "is a finding, imported from a 0/1 CSV into a findings set): the "
                             "reader marks the scan's finding, or presses 0 for no finding")
    parser.add_argument("--no-finding", default="no_tumor",
                        help="--findings: the class folder that means 'no finding'")
    parser.add_argument("--series", type=int, default=0, metavar="SLICES",
                        help="read CT series instead: a project importing DICOM per series, "
                        "with synthetic CT series of this many slices each (bench/dicom_series.py, "
                        "from pydicom's real CT slice) in two class folders; the label page "
                        "shows the middle slice and scrolls the others")
    parser.add_argument("--chromium", default=os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="label-latency-"))
    env = throwaway_site_env(workdir)
    # this process builds the project with synchronous runs; the server gets its own mode
    os.environ["ML_TASKS_IN_THREAD"] = "0"
    server_env = {**os.environ, **env,
                  "ML_TASKS_IN_THREAD": "0" if args.inline_refits else "1",
                  "ML_TASKS_IN_PROCESS": "1" if args.worker == "process" else "0"}
    import django

    # the run table is read between key presses, while Playwright's sync API keeps an event
    # loop in this thread; those reads are plain synchronous ORM calls
    os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from annotator import services
    from annotator.models import LabelClass, Membership
    from ml_backend import services as ml
    from ml_backend.models import TrainingRun

    def refit_busy() -> bool:
        return TrainingRun.objects.filter(project=project, status__in=["queued", "running"]
                                          ).exists()

    devnull = open(os.devnull, "w")
    call_command("migrate", verbosity=0)
    project = services.project_create(name="latency")
    if args.findings:
        return _findings_run(args, project, workdir, server_env, devnull)
    if args.series:
        from bench.dicom_series import write_series

        per_class = (args.answers + 10) // 2 + 6
        for split, root, offset in (("pool", workdir / "series-pool", 0),
                                    ("eval", workdir / "series-eval", 500)):
            for k, name in enumerate(("normal", "lesion")):
                write_series(root / name, patients=per_class if split == "pool" else 6,
                             slices=args.series, seed=k, first_patient=offset + 100 * k)
        args.source, args.eval_source = str(workdir / "series-pool"), str(workdir / "series-eval")
        project.dicom_grouping = "series"
        project.save(update_fields=["dicom_grouping"])
    call_command("import_scans", args.source, project=project.name, layout="class-folders",
                 no_progress=True, stdout=devnull)
    # the oracle: keep the folder labels aside, then remove them so the pool is unlabeled
    from annotator.models import Annotation

    truth = dict(Annotation.objects.filter(scan__project=project, source="import")
                 .values_list("scan_id", "label_class_id"))
    Annotation.objects.filter(scan__project=project).delete()
    call_command("import_scans", args.eval_source, project=project.name, split="eval",
                 layout="class-folders", no_progress=True, stdout=devnull)
    if args.series:
        # folder names never label DICOM (their paths may carry names): the oracle comes
        # from the generator's patients instead, matched by their pseudonymous keys
        truth = _series_truth(project, (workdir / "series-pool", workdir / "series-eval"))
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

    from django.utils import timezone

    served_from = timezone.now()        # refits after this one were queued by answers
    server, base = start_runserver(REPO, server_env, workdir / "server.log")
    rows = []
    try:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            browser, page = open_label_page(playwright, chromium=args.chromium, base=base,
                                            username="reader", password=PASSWORD,
                                            project_id=project.pk)
            for index in range(args.answers):
                payload = page.evaluate("window.medlabel.payload")
                scan_id = payload["scan"]["id"]
                key = next(c["key"] for c in payload["classes"] if c["id"] == truth[scan_id])
                before = page.evaluate("window.medlabel.timings.length")
                model_before = payload["model_version"]
                busy_before = refit_busy()
                page.keyboard.press(key)
                page.wait_for_function(f"window.medlabel.timings.length > {before}",
                                       timeout=120_000)
                swap = page.evaluate("window.medlabel.timings[window.medlabel.timings.length-1]")
                server_ms = page.evaluate("window.medlabel.lastServerMs")
                model_after = page.evaluate("window.medlabel.payload.model_version")
                updating = page.evaluate("window.medlabel.lastUpdating === true")
                rows.append({"answer": index + 1, "swap_ms": swap, "server_ms": server_ms,
                             # inline refits (--inline-refits) show as a new model
                             "refit_running": busy_before or updating
                             or model_after != model_before,
                             "model_changed": model_after != model_before,
                             "status_line": page.inner_text("#model-status")})
            # the last refit finishes in the background; the page then says what came of it
            drained = _wait(lambda: not refit_busy(), args.drain_timeout)
            final_line = ""
            if drained:
                try:
                    page.wait_for_function(
                        "!document.getElementById('model-status').textContent"
                        ".startsWith('Model updating')", timeout=10_000)
                except Exception:
                    pass
                final_line = page.inner_text("#model-status")
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=20)
    quiet = [r for r in rows if not r["refit_running"]]
    during = [r for r in rows if r["refit_running"]]
    runs = [{"id": run.pk, "status": run.status, "version": getattr(run.model_version, "version",
                                                                    None),
             "promoted": bool(run.model_version and run.model_version.promoted_at),
             "waited_s": _seconds(run.created_at, run.started_at),
             "ran_s": _seconds(run.started_at, run.finished_at), "error": run.last_error[:300]}
            for run in TrainingRun.objects.filter(project=project, kind="refit",
                                                  created_at__gte=served_from)
            .select_related("model_version").order_by("pk")]
    swap = _summary([r["swap_ms"] for r in rows])
    swap_during = _summary([r["swap_ms"] for r in during])
    result = {"args": vars(args), "cpu_count": os.cpu_count(), "scans": project.scans.count(),
              "mode": "inline" if args.inline_refits else f"background {args.worker}",
              "rows": rows,
              "swap_ms": swap,
              "swap_ms_quiet": _summary([r["swap_ms"] for r in quiet]),
              "swap_ms_during_refit": swap_during,
              "server_ms": _summary([r["server_ms"] for r in rows]),
              "server_ms_during_refit": _summary([r["server_ms"] for r in during]),
              "target": {"median_ms": 200, "p95_ms": 400, "met": _met(swap),
                         "met_during_refit": _met(swap_during) if during else None},
              "refits": runs, "drained": drained, "final_status_line": final_line}
    print(json.dumps({k: result[k] for k in (
        "mode", "swap_ms", "swap_ms_quiet", "swap_ms_during_refit", "server_ms",
        "server_ms_during_refit", "target", "drained", "final_status_line")}, indent=2))
    print(f"{len(runs)} refits: " + ", ".join(
        f"{r['version'] or r['status']} {r['ran_s']} s" for r in runs))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


def _findings_csv(source: Path, folder: Path, no_finding: str, *, answered: bool) -> Path:
    """A ``filename,f1,f2,...`` CSV over the class folders of ``source`` (copied into
    ``folder``): each folder but ``no_finding`` is a finding; blank answers unless
    ``answered``. Returns the CSV's path."""
    import shutil

    findings = sorted(d.name for d in source.iterdir() if d.is_dir() and d.name != no_finding)
    rows = ["filename," + ",".join(findings)]
    folder.mkdir(parents=True, exist_ok=True)
    for cls in sorted(d.name for d in source.iterdir() if d.is_dir()):
        for path in sorted((source / cls).iterdir()):
            name = f"{cls}-{path.name}"
            shutil.copy(path, folder / name)
            cells = [("1" if f == cls else "0") if answered else "" for f in findings]
            rows.append(f"{name}," + ",".join(cells))
    (folder / "findings.csv").write_text("\n".join(rows) + "\n")
    return folder / "findings.csv"


def _findings_run(args, project, workdir: Path, server_env: dict, devnull) -> int:
    """The label page in findings mode: each answer marks the scan's finding (or 0 = no
    finding) and saves; the swap is timed by the page as for classes."""
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from annotator import services
    from annotator.findings import findings_answer_create
    from annotator.models import LabelClass, LabelSet, Membership
    from ml_backend import services as ml

    source, evaluation = Path(args.source), Path(args.eval_source)
    truth_by_name = {f"{d.name}-{p.name}": d.name for d in source.iterdir() if d.is_dir()
                     for p in d.iterdir()}
    call_command("import_scans", str(_findings_csv(source, workdir / "pool", args.no_finding,
                                                   answered=False)),
                 project=project.name, label_set="findings", no_progress=True, stdout=devnull)
    call_command("import_scans", str(_findings_csv(evaluation, workdir / "eval", args.no_finding,
                                                   answered=True)),
                 project=project.name, label_set="findings", split="eval", no_progress=True,
                 stdout=devnull)
    call_command("pretrain", project=project.name, epochs=1, image_size=64, batch_size=64,
                 no_progress=True, stdout=devnull)
    reader = get_user_model().objects.create_user("reader", password=PASSWORD)
    services.membership_set(project=project, user=reader, role=Membership.Role.CLINICIAN)
    findings_set = LabelSet.objects.get(project=project, name="findings")
    findings = {c.name: c for c in LabelClass.objects.filter(label_set=findings_set)}
    truth = {s.pk: truth_by_name[s.source_name] for s in project.scans.filter(split="pool")}
    for cls in sorted(set(truth.values())):        # 5 answered scans per class
        for scan_id in [s for s, c in truth.items() if c == cls][:5]:
            findings_answer_create(
                scan=project.scans.get(pk=scan_id), reader=reader,
                no_finding=cls == args.no_finding,
                states={} if cls == args.no_finding else {findings[cls].pk: "present"})
    project.refresh_from_db()
    project.refit_every = 10 ** 6
    project.query_batch_size = args.answers + 10
    project.save()
    call_command("refit", project=project.name, stdout=devnull)
    project.refresh_from_db()
    ml.query_round_create(project=project)
    print(f"findings project ready: {project.scans.count()} scans, model "
          f"{project.active_model.version}", flush=True)
    server, base = start_runserver(REPO, server_env, workdir / "server.log")
    rows = []
    try:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            browser, page = open_label_page(playwright, chromium=args.chromium, base=base,
                                            username="reader", password=PASSWORD,
                                            project_id=project.pk)
            for index in range(args.answers):
                payload = page.evaluate("window.medlabel.payload")
                wanted = truth[payload["scan"]["id"]]
                for row in payload["findings"]:          # clear what the model preselected
                    if row["preselected"] and row["name"] != wanted:
                        page.keyboard.press(row["key"])
                        page.keyboard.press(row["key"])
                before = page.evaluate("window.medlabel.timings.length")
                if wanted == args.no_finding:
                    page.keyboard.press("0")
                else:
                    row = next(r for r in payload["findings"] if r["name"] == wanted)
                    if not row["preselected"]:
                        page.keyboard.press(row["key"])
                    page.keyboard.press("Enter")
                page.wait_for_function(f"window.medlabel.timings.length > {before}",
                                       timeout=120_000)
                rows.append({"answer": index + 1,
                             "swap_ms": page.evaluate(
                                 "window.medlabel.timings[window.medlabel.timings.length-1]"),
                             "server_ms": page.evaluate("window.medlabel.lastServerMs"),
                             "no_finding": wanted == args.no_finding})
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=20)
    swap = _summary([r["swap_ms"] for r in rows])
    result = {"args": vars(args), "cpu_count": os.cpu_count(), "scans": project.scans.count(),
              "mode": "findings", "rows": rows, "swap_ms": swap,
              "server_ms": _summary([r["server_ms"] for r in rows]),
              "target": {"median_ms": 200, "p95_ms": 400, "met": _met(swap)}}
    print(json.dumps({k: result[k] for k in ("mode", "swap_ms", "server_ms", "target")},
                     indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
