"""Annotation → refreshed predictions: the fast loop's latency on a real project.

    python -m bench.refit_latency --source ../shared/data/pneumoniamnist/pneumoniamnist.npz#train \
        [--eval-source '...#val'] [--labels 20,50,100] [--repeats 3] [--out results.json]

Builds a throwaway project (SQLite and media in a temp folder): imports the scans, pretrains
a small encoder for one epoch (the latency does not depend on its quality), embeds all scans,
then for each label count (every refit promoted: gate tolerance 1.0) saves annotations through ``annotation_create`` (the service the UI
and Label Studio use) with ``refit_every`` set so the last one triggers the refit, and times
from that save until the new model's predictions for every pool scan are stored and the next
query round exists. Tasks run in-process (as with no broker), so the time is the work itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench._server import throwaway_site_env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="pool scans (any import source)")
    parser.add_argument("--eval-source", default=None, help="labeled eval scans")
    parser.add_argument("--labels", default="20,50,100")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="default: a temp folder, removed after")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="refit-latency-"))
    # the clock runs while annotation_create refits inline (not in the background thread)
    throwaway_site_env(workdir, ML_TASKS_IN_THREAD="0")
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import transaction

    from annotator import services as annotator_services
    from annotator.models import Annotation, LabelClass, Scan
    from ml_backend.models import Prediction, QueryRound

    call_command("migrate", verbosity=0)
    project = annotator_services.project_create(name="latency")
    started = time.perf_counter()
    call_command("import_scans", args.source, project=project.name, layout="flat",
                 no_progress=True, stdout=open(os.devnull, "w"))
    truth = _truth(args.source)
    if args.eval_source:
        call_command("import_scans", args.eval_source, project=project.name, split="eval",
                     no_progress=True, stdout=open(os.devnull, "w"))
    import_s = time.perf_counter() - started
    pool = list(Scan.objects.filter(project=project, split="pool").order_by("pk"))
    print(f"{len(pool)} pool + {Scan.objects.filter(split='eval').count()} eval scans "
          f"imported in {import_s:.0f}s", flush=True)
    started = time.perf_counter()
    call_command("pretrain", project=project.name, epochs=1, image_size=32, batch_size=256,
                 small_input="no", no_progress=True, stdout=open(os.devnull, "w"))
    print(f"encoder pretrained + {len(pool) + Scan.objects.filter(split='eval').count()} scans "
          f"embedded in {time.perf_counter() - started:.0f}s", flush=True)

    classes = {c.name: c for c in LabelClass.objects.filter(project=project)}
    for name in sorted(set(truth.values())):
        if name not in classes:
            classes[name], _ = annotator_services.label_class_get_or_create(project=project,
                                                                            name=name)
    from django.contrib.auth import get_user_model

    reader = get_user_model().objects.create_user("reader")
    rows = []
    labeled = 0
    for target in [int(n) for n in args.labels.split(",")]:
        for repeat in range(args.repeats):
            Annotation.objects.filter(scan__project=project, scan__split="pool").delete()
            project.refit_every = target
            # Latency, not model quality: every refit is promoted, so each save is followed
            # by fresh predictions and a new round (the gate's check itself is included).
            project.gate_tolerance = 1.0
            project.save(update_fields=["refit_every", "gate_tolerance"])
            chosen = _sample(pool, truth, target, seed=repeat)
            for scan in chosen[:-1]:
                annotator_services.annotation_create(
                    scan=scan, reader=reader, label_class=classes[truth[scan.source_name]])
            rounds_before = QueryRound.objects.count()
            last = chosen[-1]
            t0 = time.perf_counter()
            with transaction.atomic():  # the view's request transaction; on_commit fires after
                annotator_services.annotation_create(
                    scan=last, reader=reader, label_class=classes[truth[last.source_name]])
            seconds = time.perf_counter() - t0
            project.refresh_from_db()
            fresh = Prediction.objects.filter(model_version=project.active_model).count()
            ok = fresh == len(pool) and QueryRound.objects.count() == rounds_before + 1
            rows.append({"labels": target, "repeat": repeat, "seconds": seconds,
                         "predictions": fresh, "complete": ok,
                         "model_version": project.active_model.version if project.active_model else None})
            print(f"{target:5d} labels  refit + {fresh} predictions + next round: {seconds:.2f}s"
                  f"{'' if ok else '  (INCOMPLETE)'}", flush=True)
            labeled = target
    summary = {}
    for target in sorted({r["labels"] for r in rows}):
        times = sorted(r["seconds"] for r in rows if r["labels"] == target)
        summary[target] = {"median_s": times[len(times) // 2], "max_s": times[-1]}
    payload = {"args": vars(args), "pool_scans": len(pool), "rows": rows, "summary": summary,
               "cpu_count": os.cpu_count()}
    if args.out:
        Path(args.out).write_text(json.dumps(payload, indent=2))
    print(json.dumps(summary, indent=2))
    return 0 if all(r["complete"] for r in rows) and labeled else 1


def _sample(pool, truth, count: int, *, seed: int):
    """A seeded random sample of ``count`` scans holding at least two classes."""
    import random

    rng = random.Random(seed)
    for _ in range(100):
        chosen = rng.sample(pool, count)
        if len({truth[s.source_name] for s in chosen}) >= 2:
            return chosen
    raise SystemExit("could not draw a sample with two classes")


def _truth(source: str) -> dict[str, str]:
    """The oracle labels of the pool, by source name (imported unlabeled)."""
    from ml_backend.data.datasets import read_source

    return {item.name: item.label for item in read_source(source).items}


if __name__ == "__main__":
    sys.exit(main())
