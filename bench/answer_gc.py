"""The label page's answer in a web process that has loaded the ML modules, with the
garbage collector's freeze (medsite/gcfreeze.py) off and on.

    python -m bench.scale --sizes 100000 ... --workdir /tmp/scale-work     # builds and keeps
    python -m bench.answer_gc --workdir /tmp/scale-work --answers 300 --repeats 2 \\
        [--out bench/results/answer-gc.json]

It runs on the project ``bench.scale`` built and kept (its ``--workdir`` and its database
``medlabel_scale``; nothing is built again). Each run is a fresh process, as a web worker
is, after a refit in a process of its own (as a worker runs it, so the labels of the runs
before are in the model, as in a project that refits every few answers): it loads the ML
modules the way the label page's process does the first time an answer
starts a new query round (one ``query_round_create``), then times ``--answers`` answers →
next scan through the real view (``bench.scale.answers``: each answer with the full
garbage collections that ran inside it), with ``MEDLABEL_GC_FREEZE_MODULES`` 0 (off) or
its default (on). The settings alternate, ``--repeats`` runs each, so drift in the
database (the answers label pool scans) falls on both. A full collection comes about once
in a hundred answers, so this takes hundreds of answers where ``bench.scale`` takes 40.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.scale import ROOT, _p, answers, bench_env

SETTINGS = {"off": "0", "on": "50"}


def refit_child(args) -> dict:
    """A refit in a process of its own, as a worker runs it: the labels so far are then in the
    active model, so an answer's "is a refit due" reads only the labels since (a project
    refits every few answers; without it every earlier run's answers would count)."""
    import django

    django.setup()
    from annotator.models import Project
    from bench.scale import refit

    return refit(Project.objects.get(name=args.project))


def child(args) -> dict:
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.test import Client

    from annotator.models import LabelClass, Project
    from ml_backend.services.queries import query_round_create

    project = Project.objects.get(name=args.project)
    client = Client()
    client.force_login(get_user_model().objects.get(username="reader"))
    started = time.perf_counter()
    query_round_create(project=project)      # what the first answer of a new round does
    loaded = time.perf_counter() - started
    first = LabelClass.objects.filter(project=project).order_by("pk").first()
    # every answer labels its scan with the same class: the timing does not depend on it
    truth = collections.defaultdict(lambda: first.name)
    result = answers(client, project, truth, {first.name: first.pk}, args.answers)
    result["ml_load_s"] = round(loaded, 2)
    result["modules"] = len(sys.modules)
    return result


def summary(runs: list[dict]) -> dict:
    each = [a for run in runs for a in run["each"]]
    ms = [a["ms"] for a in each]
    with_gc = [a["ms"] for a in each if a["full_gc"]]
    without = [a["ms"] for a in each if not a["full_gc"]]
    return {"answers": len(ms), "median_ms": round(statistics.median(ms), 1),
            "p95_ms": round(_p(ms, 0.95), 1), "p99_ms": round(_p(ms, 0.99), 1),
            "max_ms": round(max(ms), 1),
            "with_full_gc": len(with_gc),
            "with_full_gc_median_ms": round(statistics.median(with_gc), 1) if with_gc else None,
            "without_full_gc_p95_ms": round(_p(without, 0.95), 1),
            # the time the database spent on the answer's queries (Django's own count)
            "db_median_ms": round(statistics.median(a["db_ms"] for a in each), 1),
            "db_p95_ms": round(_p([a["db_ms"] for a in each], 0.95), 1),
            "gc_tracked": [run["gc_tracked"] for run in runs],
            "gc_frozen": [run["gc_frozen"] for run in runs]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="bench.scale's kept --workdir")
    parser.add_argument("--database", default="postgres://postgres@127.0.0.1:5432",
                        help="the PostgreSQL server bench.scale built medlabel_scale on")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--project", default="scale")
    parser.add_argument("--answers", type=int, default=300, help="answers per run")
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", choices=[*sorted(SETTINGS), "refit"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    if not (workdir / "artifacts").is_dir():
        parser.error(f"{workdir}: not a workdir bench.scale kept (no artifacts folder)")
    if args.child:
        os.environ.update(bench_env(f"{args.database}/medlabel_scale", args.broker, workdir,
                                    "scale", MEDLABEL_GC_FREEZE_MODULES=SETTINGS.get(
                                        args.child, SETTINGS["on"])))
        print(json.dumps(refit_child(args) if args.child == "refit" else child(args)))
        return 0

    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for repeat in range(args.repeats):
        for name in (("off", "on") if repeat % 2 == 0 else ("on", "off")):
            _run_child("refit", args)
            run = _run_child(name, args)
            runs[name].append(run)
            print(f"[{time.strftime('%H:%M:%S')}] freeze {name}: median {run['median_ms']} ms, "
                  f"p95 {run['p95_ms']} ms, full collections in "
                  f"{sum(bool(a['full_gc']) for a in run['each'])} of {run['answers']} answers, "
                  f"{run['gc_tracked']} objects walked, {run['gc_frozen']} frozen", flush=True)
    result = {"args": vars(args), "runs": runs,
              "summary": {name: summary(r) for name, r in runs.items()}}
    for name, s in result["summary"].items():
        print(name, json.dumps({k: v for k, v in s.items() if not k.startswith("gc_")}))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


def _run_child(name: str, args) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "bench.answer_gc", "--child", name, *argv_of(args)],
        cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"run {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def argv_of(args) -> list[str]:
    return ["--workdir", args.workdir, "--database", args.database, "--broker", args.broker,
            "--project", args.project, "--answers", str(args.answers)]


if __name__ == "__main__":
    raise SystemExit(main())
