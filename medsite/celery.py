"""Celery application. Workers: ``celery -A medsite worker -Q default``."""

from __future__ import annotations

import logging
import os

from celery import Celery
from celery.signals import worker_init

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "medsite.settings")

app = Celery("medsite")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


def threads_per_process(concurrency: int, cpus: int | None = None) -> int:
    """Threads each of a worker's ``concurrency`` processes gives torch: the machine's cores
    shared out, at least one (``-c 2`` on 2 cores: 1 each, not 2 each fighting over 2)."""
    return max(1, (cpus or os.cpu_count() or 1) // max(1, concurrency))


@worker_init.connect
def _share_the_cores(sender=None, **kwargs) -> None:
    """Before the worker forks its processes: unless OMP_NUM_THREADS is set, each process's
    torch / OpenMP / MKL threads = cores // concurrency (read by torch when a process first
    imports it). A prefork worker of N processes otherwise runs N × cores threads."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    concurrency = getattr(sender, "concurrency", 1) or 1
    threads = str(threads_per_process(concurrency))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = threads
    logging.getLogger(__name__).info("%s process(es), %s torch thread(s) each",
                                     concurrency, threads)
