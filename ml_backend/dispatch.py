"""Where a TrainingRun's work goes once its row is committed.

* A real broker: the Celery task ``run_training`` on the ``train`` queue (a worker runs it).
* No broker (eager Celery: the demo, a laptop) and ``settings.ML_TASKS_IN_THREAD``: one
  process-wide worker thread ("ml-worker-0") runs the queued runs one at a time, so a refit
  never holds up the request that triggered it. The page polls the run's row for progress.
* No broker and ``ML_TASKS_IN_THREAD`` off (the test suite, benchmarks that want synchronous
  refits): the eager task runs inline, in the caller, as before.

``wait_idle`` lets tests and benchmarks wait for the thread's queue to drain.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures

from django.conf import settings
from django.db import connections

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_pending: dict[Future, int] = {}        # submitted, not finished yet → run id


def queue_for(kind: str) -> str:
    """The Celery queue of a run kind: refits and embeddings on ``refit``, so a refit never
    waits behind an hours-long pretraining on ``train`` (settings.ML_RUN_QUEUES)."""
    return settings.ML_RUN_QUEUES.get(kind, "train")


def enqueue_training_run(run_id: int) -> None:
    """Start TrainingRun ``run_id``: send the Celery task to its kind's queue, or hand it to
    the worker thread."""
    from ml_backend.models import TrainingRun
    from ml_backend.tasks import run_training

    # The Celery app's own flag, not only the setting: it is what ``.delay`` obeys (tests
    # with a real worker switch it off at run time).
    eager = run_training.app.conf.task_always_eager
    if eager and not getattr(settings, "ML_TASKS_IN_THREAD", False):
        run_training.delay(run_id)          # inline, in this process
        return
    if not eager:
        kind = TrainingRun.objects.filter(pk=run_id).values_list("kind", flat=True).first()
        run_training.apply_async(args=[run_id], queue=queue_for(kind or ""))
        return
    executor = _pool()
    with _lock:
        future = executor.submit(_job, run_id)   # a thread or the worker process alike
        _pending[future] = run_id
    future.add_done_callback(_forget)


def wait_idle(timeout: float) -> bool:
    """Wait until every run handed to the worker thread has finished. False on timeout."""
    return wait_all(_lock, _pending, timeout)


def wait_all(lock: threading.Lock, pending, timeout: float) -> bool:
    """Wait until every future in ``pending`` (a set or dict read under ``lock``; new ones
    may join while waiting) is done. False on timeout. Also annotator/background.py's."""
    deadline = time.monotonic() + timeout
    while True:
        with lock:
            waiting = [future for future in pending if not future.done()]
        if not waiting:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        wait_futures(waiting, timeout=left)


def shutdown(*, wait: bool = True) -> None:
    """Stop the worker thread: runs not started yet are cancelled and marked abandoned (so
    the project is not left "updating" and can refit again); the one running finishes."""
    global _executor
    with _lock:
        executor, _executor = _executor, None
        pending = list(_pending.items())
    if executor is None:
        return
    queued = [run_id for future, run_id in pending if future.cancel()]
    executor.shutdown(wait=wait, cancel_futures=True)
    if queued:
        _abandon(queued)


def _child_start() -> None:
    """A worker process (ML_TASKS_IN_PROCESS): lower priority, Django set up once; it keeps
    its loaded models between runs."""
    try:
        os.nice(15)
    except OSError:
        pass
    import django

    django.setup()
    # The server may be stopped without running its exit hooks (SIGTERM, a killed reloader):
    # the worker follows its parent instead of living on as an orphan.
    parent = os.getppid()

    def follow_parent() -> None:
        while True:
            time.sleep(2)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=follow_parent, name="follow-parent", daemon=True).start()


def _pool():
    global _executor
    with _lock:
        if _executor is None and getattr(settings, "ML_TASKS_IN_PROCESS", False):
            # a process of its own: the refit's Python does not share the server's
            # interpreter lock (measured in docs/benchmarks.md); spawned, so no server
            # thread or connection is inherited
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            _executor = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                initializer=_child_start)
            register = getattr(threading, "_register_atexit", None)
            if register is not None:
                register(shutdown)
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ml-worker",
                                           initializer=_lower_priority)
            # Before the interpreter joins the pool's thread at exit (which would first run
            # every queued job): threading's exit hooks run before atexit's.
            register = getattr(threading, "_register_atexit", None)
            if register is not None:
                register(shutdown)
            else:  # pragma: no cover - CPython < 3.9
                import atexit

                atexit.register(shutdown)
        return _executor


def _lower_priority() -> None:
    """The worker thread yields the CPU to the threads serving readers: a lower scheduling
    priority for this thread (Linux nice values are per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 15)
    except (AttributeError, OSError):   # not Linux, or not permitted: same priority then
        pass


def _job(run_id: int) -> None:
    from threadpoolctl import threadpool_limits

    from ml_backend import services

    try:
        # training_run_execute marks the run failed itself; anything escaping it is logged.
        # One BLAS / OpenMP thread while it runs, so a core stays free for the readers.
        with threadpool_limits(1):
            services.training_run_execute(run_id)
    except Exception:
        logger.exception("training run %s failed in the background worker", run_id)
    finally:
        connections.close_all()


def _forget(future: Future) -> None:
    with _lock:
        _pending.pop(future, None)


def _abandon(run_ids: list[int]) -> None:
    from django.utils import timezone

    from ml_backend.models import TrainingRun

    try:
        TrainingRun.objects.filter(pk__in=run_ids, status=TrainingRun.Status.QUEUED).update(
            status=TrainingRun.Status.ABANDONED, finished_at=timezone.now(),
            last_error="the server stopped before this run started")
    except Exception:  # at exit the database may be gone already
        logger.warning("training runs %s were queued when the server stopped", run_ids)
