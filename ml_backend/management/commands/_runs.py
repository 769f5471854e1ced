"""Shared plumbing for the ML management commands: run in-process with a progress bar, or
enqueue to Celery with --async."""

from __future__ import annotations

import argparse

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


def run(command, *, project: Project, kind: str, params: dict, opts: dict) -> TrainingRun:
    created = services.training_run_create(project=project, kind=kind, params=params)
    return run_existing(command, created, opts)


def run_existing(command, created: TrainingRun, opts: dict) -> TrainingRun:
    """Execute a created run here (progress bar) or queue it for a worker (--async)."""
    kind = created.kind
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

    finished = services.training_run_execute(created.pk, progress=progress)
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
