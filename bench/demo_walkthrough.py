"""The demo as a new user meets it: `make demo`'s setup, then a clinician labels 30 scans in a
real browser while the model refits behind them.

    python -m bench.demo_walkthrough [--answers 30] [--think-ms 1500] \
        [--out bench/results/demo_walkthrough.json]

In a throw-away folder (SQLite, media, artifacts): ``manage.py migrate`` and ``manage.py
demo_setup`` exactly as ``make demo`` runs them (the shipped starter encoder embeds the
fixtures; no pretraining), then ``manage.py runserver`` with the demo's defaults (no broker:
refits in the server's background worker process). Debian's Chromium (Playwright) logs in as
``clinician``, opens the worklist and answers ``--answers`` scans by hotkey, each after
looking at it for ``--think-ms``, with the scan's true class (the fixture folder it came from, matched by sha256). Per answer it records what
the page offered (the classes and the model's suggestion, checked against the scan's own
label set), the key press → next scan time and the model status line. At the end: every
refit the answers queued, promoted or held back, with the reason the project shows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._server import open_label_page, start_runserver, throwaway_site_env
from bench.label_latency import _summary, _wait

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "walkthrough-password"
SETS = {"chest_xray": "Chest X-ray", "brain_mri": "Brain MRI"}


def fixture_truth(root: Path) -> dict[str, tuple[str, str]]:
    """sha256 of every pool fixture → (label set, class folder)."""
    truth = {}
    for folder, label_set in SETS.items():
        for path in sorted((root / folder / "pool").glob("*/*")):
            truth[hashlib.sha256(path.read_bytes()).hexdigest()] = (label_set, path.parent.name)
    return truth


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", type=int, default=30)
    parser.add_argument("--think-ms", type=int, default=1500,
                        help="the reader looks at each scan this long before answering")
    parser.add_argument("--drain-timeout", type=float, default=300.0)
    parser.add_argument("--chromium", default=os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="demo-walkthrough-"))
    env = throwaway_site_env(workdir)
    server_env = {**os.environ, **env}        # the demo's own defaults for background work
    for name in ("ML_TASKS_IN_THREAD", "ML_TASKS_IN_PROCESS"):
        server_env.pop(name, None)
    started = time.perf_counter()
    for command in (["migrate", "--noinput"], ["demo_setup"]):
        subprocess.run([sys.executable, "manage.py", *command], cwd=REPO, env=server_env,
                       check=True, stdout=subprocess.DEVNULL)
    setup_seconds = time.perf_counter() - started
    os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    import django

    django.setup()
    from django.contrib.auth import get_user_model

    from annotator.management.commands.demo_setup import DEMO_PROJECT
    from annotator.models import Project
    from ml_backend.models import ModelVersion, TrainingRun

    project = Project.objects.get(name=DEMO_PROJECT)
    encoder = project.active_encoder
    clinician = get_user_model().objects.get(username="clinician")
    clinician.set_password(PASSWORD)
    clinician.save()
    truth_by_hash = fixture_truth(REPO / "fixtures")
    truth = {pk: truth_by_hash.get(sha) for pk, sha in
             project.scans.filter(split="pool").values_list("pk", "sha256")}
    print(f"demo ready in {setup_seconds:.0f} s: {project.scans.count()} scans, encoder "
          f"{encoder.version if encoder else None} ({(encoder.config or {}).get('start_from')})",
          flush=True)

    def busy() -> bool:
        return TrainingRun.objects.filter(project=project, status__in=["queued", "running"]
                                          ).exists()

    server, base = start_runserver(REPO, server_env, workdir / "server.log")
    rows, final_line = [], ""
    served_from = time.time()
    try:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            browser, page = open_label_page(playwright, chromium=args.chromium, base=base,
                                            username="clinician", password=PASSWORD,
                                            project_id=project.pk)
            for index in range(args.answers):
                payload = page.evaluate("window.medlabel.payload")
                scan_id = payload["scan"]["id"]
                label_set, true_class = truth.get(scan_id) or (None, None)
                offered = [c["name"] for c in payload["classes"]]
                suggestion = payload.get("suggestion") or {}
                suggested = suggestion.get("class_name")
                key = next(c["key"] for c in payload["classes"] if c["name"] == true_class)
                page.wait_for_timeout(args.think_ms)
                before = page.evaluate("window.medlabel.timings.length")
                busy_before = busy()
                pressed = time.perf_counter()
                page.keyboard.press(key)
                # the next scan swaps in place; at the end of a round the page moves on to
                # the worklist instead (what a reader sees then is recorded, then /next/)
                page.wait_for_function(
                    f"!window.medlabel || window.medlabel.timings.length > {before}",
                    timeout=120_000)
                left = page.evaluate("!window.medlabel")
                if left:
                    page.wait_for_load_state()
                    landed = {"url": page.url.replace(base, ""),
                              "text": page.inner_text("main")[:300] if page.query_selector(
                                  "main") else ""}
                    page.goto(f"{base}/projects/{project.pk}/next/")
                    page.wait_for_function("window.medlabel && document.body.dataset.scan",
                                           timeout=120_000)
                rows.append({
                    "left_label_page": landed if left else None,
                    "answer": index + 1, "scan": scan_id, "label_set": label_set,
                    "shown_label_set": payload["scan"]["label_set"], "truth": true_class,
                    "offered": offered, "suggested": suggested,
                    "suggested_p": suggestion.get("confidence"),
                    "suggestion_unreliable": bool(suggestion.get("unreliable")),
                    "suggestion_right": suggested == true_class if suggested else None,
                    "swap_ms": (round((time.perf_counter() - pressed) * 1000, 1) if left else
                                page.evaluate("window.medlabel.timings[window.medlabel.timings"
                                              ".length-1]")),
                    "refit_running": busy_before or page.evaluate(
                        "window.medlabel.lastUpdating === true"),
                    "status_line": page.inner_text("#model-status")})
                print(f"answer {index + 1}: {label_set} {true_class}, suggested {suggested}, "
                      f"{rows[-1]['swap_ms']} ms{' (left the page)' if left else ''}; "
                      f"{rows[-1]['status_line'][:100]!r}", flush=True)
            if _wait(lambda: not busy(), args.drain_timeout):
                try:
                    page.wait_for_function(
                        "!document.getElementById('model-status').textContent"
                        ".startsWith('Model updating')", timeout=15_000)
                except Exception:
                    pass
                final_line = page.inner_text("#model-status")
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=20)

    sets = {"Chest X-ray": {"normal", "pneumonia"},
            "Brain MRI": {"glioma_tumor", "meningioma_tumor", "no_tumor", "pituitary_tumor"}}
    wrong_offered = sum(1 for r in rows if r["label_set"] and
                        set(r["offered"]) - sets[r["label_set"]])
    wrong_suggested = sum(1 for r in rows if r["suggested"] and r["label_set"] and
                          r["suggested"] not in sets[r["label_set"]])
    suggested = [r for r in rows if r["suggested"]]
    refits = []
    for run in (TrainingRun.objects.filter(project=project, kind="refit")
                .select_related("model_version").order_by("pk")):
        model = run.model_version
        refits.append({
            "run": run.pk, "status": run.status,
            "version": model.version if model else None,
            "outcome": (None if model is None else
                        "promoted" if model.promoted_at else
                        "failed" if model.status == ModelVersion.Status.FAILED else "held back"),
            "reason": (model.status_reason if model else run.last_error)[:600],
            "queued_by_answers": run.created_at.timestamp() >= served_from,
            "ran_s": None if not (run.started_at and run.finished_at) else
            round((run.finished_at - run.started_at).total_seconds(), 2)})
    result = {
        "args": vars(args), "setup_seconds": round(setup_seconds, 1),
        "encoder": {"version": encoder.version, "start_from": encoder.config.get("start_from")}
        if encoder else None,
        "answers": len(rows), "rows": rows,
        "classes_from_another_set_offered": wrong_offered,
        "suggestions_from_another_set": wrong_suggested,
        "suggestions_shown": len(suggested),
        "suggestions_right": sum(1 for r in suggested if r["suggestion_right"]),
        "swap_ms": _summary([r["swap_ms"] for r in rows]),
        "swap_ms_during_refit": _summary([r["swap_ms"] for r in rows if r["refit_running"]]),
        "status_lines": sorted({r["status_line"] for r in rows}),
        "final_status_line": final_line, "refits": refits,
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "args")}, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
