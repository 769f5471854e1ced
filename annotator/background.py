"""Light tasks (Label Studio ingest and pushes) off the request, in every mode.

* A real broker: ``task.delay`` (a Celery worker on the ``default`` queue runs it).
* No broker (eager Celery: the demo, a laptop) and ``settings.ML_TASKS_IN_THREAD``: one
  process-wide thread ("light-task-0") runs them one at a time, so a Label Studio webhook is
  answered at once instead of waiting for the ingest (Label Studio gives up after about a
  second). It is a thread of its own, not the ML worker: an ingest never queues behind a
  refit.
* No broker and ``ML_TASKS_IN_THREAD`` off (the test suite): inline, as ``.delay`` does.

Each task is idempotent (a Label Studio annotation is keyed by its id), so a task lost with
the process is recovered by the next reconciliation.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from django.conf import settings
from django.db import connections

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_pending: set[Future] = set()


def in_background(task) -> bool:
    """Whether ``send`` hands ``task`` to the light-task thread (no broker, threads on)."""
    return bool(task.app.conf.task_always_eager and getattr(settings, "ML_TASKS_IN_THREAD", False))


def send(task, *args) -> None:
    """Run the Celery task ``task(*args)`` without holding up the caller where there is a
    way to: a worker with a broker, the light-task thread without one."""
    if not in_background(task):
        task.delay(*args)
        return
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="light-task")
        future = _executor.submit(_run, task, args)
        _pending.add(future)
    future.add_done_callback(_forget)


def _run(task, args) -> None:
    try:
        task.apply(args=args, throw=True)
    except Exception:   # noqa: BLE001 - logged with the task's name; the thread goes on
        logger.exception("background task %s%r failed", task.name, args[:1])
    finally:
        connections.close_all()       # this thread's database connections


def _forget(future: Future) -> None:
    with _lock:
        _pending.discard(future)


def wait_idle(timeout: float) -> bool:
    """Wait until every task handed to the thread has finished. False on timeout."""
    from ml_backend.dispatch import wait_all

    return wait_all(_lock, _pending, timeout)
