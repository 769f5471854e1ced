"""Shared plumbing for the ML management commands: run in-process with a progress bar, or
enqueue to Celery with --async."""

from __future__ import annotations

import argparse
import math
import signal
import threading

from django.core.management.base import CommandError
from tqdm import tqdm

from annotator.models import Project
from ml_backend import services
from ml_backend.models import TrainingRun


def int_between(low: int, high: int):
    """An argparse ``type``: a whole number from ``low`` to ``high``, or a usage error that
    says so (``manage.py`` prints it; ``call_command`` raises it as a CommandError)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range: use {low} to {high}")
        return value

    parse.__name__ = f"whole number {low}-{high}"
    return parse


def float_between(low: float, high: float, *, above: bool = False):
    """An argparse ``type``: a finite number from ``low`` (or, with ``above``, more than
    ``low``) to ``high``; nan, inf and anything out of range are a usage error that says so
    (a NaN would otherwise reach the run's JSON params and fail there, as a traceback)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if not (low < value if above else low <= value) or value > high:
            span = f"more than {low:g} up to {high:g}" if above else f"{low:g} to {high:g}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: use {span}")
        return value

    parse.__name__ = f"number {low:g}-{high:g}"
    return parse


def finite_float(text: str) -> float:
    """An argparse ``type``: any finite number (nan and inf refused); its range is checked
    by the run's own config, built before the run is made (``distill``)."""
    return float_between(-math.inf, math.inf)(text)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


MAX_EPOCHS = 10_000
MAX_BATCH = 65_536
MAX_SEED = 2 ** 32 - 1                  # numpy's seeds end here
MAX_ID = 2 ** 63 - 1                    # a database primary key


def get_project(name: str) -> Project:
    project = Project.objects.filter(name=name).first()
    if project is None:
        raise CommandError(f"No project named {name!r}.")
    return project


def add_common_arguments(parser) -> None:
    parser.add_argument("--project", required=True, help="project name")
    parser.add_argument("--async", dest="run_async", action="store_true",
                        help="queue the run for a Celery worker instead of running it here")
    parser.add_argument("--no-progress", action="store_true")


def run(command, *, project: Project, kind: str, params: dict, opts: dict,
        label: str | None = None) -> TrainingRun | None:
    """Make the run and execute or queue it; a run of its kind already queued or running for
    the project is said ("Refit skipped: …", exit 0, as ``retrain`` does for cron) and
    nothing is made."""
    try:
        created = services.training_run_start(project=project, kind=kind, params=params)
    except services.RunBusy as exc:
        command.stdout.write(f"{(label or kind).capitalize()} skipped: {exc}.")
        return None
    return run_existing(command, created, opts, label=label)


def run_existing(command, created: TrainingRun, opts: dict, *,
                 label: str | None = None) -> TrainingRun:
    """Execute a created run here (progress bar) or queue it for a worker (--async).
    ``label`` names the run in what is printed (``finetune`` makes a ``retrain`` run)."""
    kind = label or created.kind
    if opts.get("run_async"):
        from ml_backend.tasks import run_training

        run_training.delay(created.pk)
        command.stdout.write(f"Queued {kind} run #{created.pk}; follow it in the admin "
                             "(ML backend → Training runs).")
        return created
    bar = None

    def progress(event: dict) -> None:
        nonlocal bar
        if opts.get("no_progress"):
            return
        if "epochs" in event:
            total = event["epochs"] * event.get("steps", 1)
            done = (event["epoch"] - 1) * event.get("steps", 1) + event.get("step", 1)
            unit = "step" if "steps" in event else "epoch"
        else:
            total, done, unit = event["total"], event["done"], "scan"
        if bar is None or bar.total != total or bar.desc != event["stage"]:
            if bar is not None:
                bar.close()
            # start the bar where the run is: a rate counts only what happens after it is
            # drawn (a first event of 4,000 scans done at once is not "4,000,000 scan/s")
            bar = tqdm(total=total, initial=done, desc=event["stage"], unit=unit,
                       file=command.stderr._out)
        bar.update(done - bar.n)
        bar.set_postfix({k: f"{event[k]:.3g}" for k in ("loss", "images_per_s") if k in event})

    # SIGTERM (a cron timeout, `kill`, a container stop) as Ctrl+C: the run's row is marked
    # stopped on the way out instead of "running" for the rest of its lease
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        finished = services.training_run_execute(created.pk, progress=progress)
    except KeyboardInterrupt:
        raise CommandError(f"{kind} run #{created.pk} stopped by a signal; it is marked "
                           "abandoned and the next run may start") from None
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)
    if bar is not None:
        bar.close()
    command.stdout.write(finished.log.rstrip())
    if finished.status != TrainingRun.Status.SUCCEEDED:
        raise CommandError(f"{kind} run #{finished.pk} failed: {finished.last_error}")
    version = finished.model_version
    if version is not None:
        command.stdout.write(command.style.SUCCESS(
            f"{kind} run #{finished.pk} succeeded: {version.version} ({version.status})"))
    return finished
