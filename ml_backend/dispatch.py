"""Where a TrainingRun's work goes once its row is committed.

* A real broker: the Celery task ``run_training`` on the ``train`` queue (a worker runs it).
* No broker (eager Celery: the demo, a laptop) and ``settings.ML_TASKS_IN_THREAD``: one
  process-wide worker thread ("ml-worker-0") runs the queued runs one at a time, so a refit
  never holds up the request that triggered it. The page polls the run's row for progress.
  With ``ML_TASKS_IN_PROCESS`` that thread hands each run to ONE spawned worker process and
  waits for it; the thread stays the queue (order, ``wait_idle``, ``shutdown``).
  A run that queues another (a refit's follow-up: labels arrived while it ran) puts it at the
  back of that same queue: the worker process sends it back with its result and never starts
  a worker of its own; a worker thread of a stopped server abandons it. A worker process that
  dies (killed, out of memory) fails the run it had with that reason; the next run starts a
  new one.
* No broker and ``ML_TASKS_IN_THREAD`` off (the test suite, benchmarks that want synchronous
  refits): the eager task runs inline, in the caller, as before.

``wait_idle`` lets tests and benchmarks wait for the thread's queue to drain.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import BrokenExecutor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures

from django.conf import settings
from django.db import connections

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None     # the worker thread: THE queue of runs
_in_process = False                  # its runs go to the worker process (ML_TASKS_IN_PROCESS)
_process: ProcessPoolExecutor | None = None     # the one worker process, started on first use
_pending: dict[Future, int] = {}        # submitted, not finished yet → run id
_local = threading.local()              # .worker: set in the worker thread
# In the worker process only (_child_start): the runs the current job queued, sent back to the
# server's worker thread with the job's result.
_follow_ups: list[int] | None = None


def queue_for(kind: str) -> str:
    """The Celery queue of a run kind: refits and embeddings on ``refit``, so a refit never
    waits behind an hours-long pretraining on ``train`` (settings.ML_RUN_QUEUES)."""
    return settings.ML_RUN_QUEUES.get(kind, "train")


def enqueue_training_run(run_id: int) -> None:
    """Start TrainingRun ``run_id``: send the Celery task to its kind's queue, or hand it to
    the worker thread."""
    if _follow_ups is not None:
        # in the worker process (a refit queued the next one): it goes back with this job's
        # result to the server's queue; a worker process never starts workers of its own
        _follow_ups.append(run_id)
        return
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
        try:
            run_training.apply_async(args=[run_id], queue=queue_for(kind or ""))
        except Exception as exc:       # noqa: BLE001 - kombu/redis errors: the send boundary
            _not_sent(run_id, exc)
        return
    _submit(run_id)


def _not_sent(run_id: int, exc: Exception) -> None:
    """A run the broker would not take (down, refusing): marked abandoned now, in words, so
    nothing waits on a "queued" run no worker will ever get — a retrain blocked every
    retrain after it, and the label page said "Model updating…" for ever — and the answer or
    request that asked for it is not a 500 (its own rows are committed; tenth probe). The
    next answer that makes a refit due, or the next retrain, asks again."""
    from django.utils import timezone

    from ml_backend.models import ModelVersion, TrainingRun

    logger.warning("training run %s could not be sent to a worker: %s", run_id,
                   type(exc).__name__)
    reason = ("could not be handed to a worker: the task broker did not answer "
              f"({type(exc).__name__}); start it again once the site's workers are back")
    run = TrainingRun.objects.filter(pk=run_id, status=TrainingRun.Status.QUEUED).first()
    if run is None:
        return
    TrainingRun.objects.filter(pk=run_id, status=TrainingRun.Status.QUEUED).update(
        status=TrainingRun.Status.ABANDONED, last_error=reason, finished_at=timezone.now())
    if run.model_version_id:
        ModelVersion.objects.filter(pk=run.model_version_id).exclude(
            status=ModelVersion.Status.ACTIVE).update(status=ModelVersion.Status.FAILED,
                                                     status_reason=reason)


def _submit(run_id: int) -> None:
    """Queue ``run_id`` behind the runs already handed to the worker thread."""
    with _lock:
        executor = _pool()
        if executor is not None:
            try:
                future = executor.submit(_job, run_id, _in_process)
            except RuntimeError:        # the interpreter is exiting
                executor = None
            else:
                _pending[future] = run_id
    if executor is None:
        _abandon([run_id])
        return
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
    """Stop the worker thread (and its worker process): runs not started yet are cancelled
    and marked abandoned (so the project is not left "updating" and can refit again), and so
    are the runs the running one queues; the one running finishes."""
    global _executor, _process
    with _lock:
        executor, _executor = _executor, None
        pending = list(_pending.items())
    if executor is not None:
        queued = [run_id for future, run_id in pending if future.cancel()]
        executor.shutdown(wait=wait, cancel_futures=True)
        if queued:
            _abandon(queued)
    with _lock:
        process, _process = _process, None
    if process is not None:
        process.shutdown(wait=wait, cancel_futures=True)


def _child_start() -> None:
    """A worker process (ML_TASKS_IN_PROCESS): lower priority, Django set up once; it keeps
    its loaded models between runs. Marked as the worker: the runs its jobs queue go back to
    the server (``enqueue_training_run``), never to a pool of its own."""
    global _follow_ups
    _follow_ups = []
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


def _pool() -> ThreadPoolExecutor | None:
    """The worker thread's executor (under ``_lock``), started on first use; None when the
    caller is the worker thread of one that was shut down: the server is stopping, and the
    run its job queued must not start a new worker."""
    global _executor, _in_process
    if _executor is None and not getattr(_local, "worker", False):
        # with ML_TASKS_IN_PROCESS the runs execute in a process of their own (_on_process):
        # the refit's Python does not share the server's interpreter lock (measured in
        # docs/benchmarks.md)
        _in_process = bool(getattr(settings, "ML_TASKS_IN_PROCESS", False))
        _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ml-worker",
                                       initializer=_worker_start)
        # Before the interpreter joins the pool's thread at exit (which would first run
        # every queued job): threading's exit hooks run before atexit's, the last first
        # (concurrent.futures' own are registered on import, before this one).
        register = getattr(threading, "_register_atexit", None)
        if register is not None:
            register(shutdown)
        else:  # pragma: no cover - CPython < 3.9
            import atexit

            atexit.register(shutdown)
    return _executor


def _worker_start() -> None:
    _local.worker = True
    _lower_priority()


def _lower_priority() -> None:
    """The worker thread yields the CPU to the threads serving readers: a lower scheduling
    priority for this thread (Linux nice values are per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 15)
    except (AttributeError, OSError):   # not Linux, or not permitted: same priority then
        pass


def _job(run_id: int, in_process: bool) -> None:
    """In the worker thread: run ``run_id`` here or in the worker process; the runs it
    queued join the back of the queue."""
    if not in_process:
        _execute(run_id)        # what it queues comes to _submit from this thread
        return
    try:
        for follow_up in _on_process(run_id):
            _submit(follow_up)
    except Exception:   # noqa: BLE001 - e.g. a result that could not come back; logged
        logger.exception("training run %s failed in the background worker", run_id)
    finally:
        connections.close_all()     # this thread's, if it abandoned a run


def _on_process(run_id: int) -> list[int]:
    """Run ``run_id`` in THE worker process (spawned on first use: no server thread or
    connection is inherited) and wait; the runs it queued come back. One that dies (killed,
    out of memory) fails the run it had with that reason, and the next run spawns a new one."""
    for _attempt in (1, 2):
        process = _worker_process()
        try:
            future = process.submit(_child_job, run_id)
        except BrokenExecutor:      # it died between runs: this run never reached it
            _drop_process(process)
            continue
        except RuntimeError:        # the interpreter is exiting
            _abandon([run_id])
            return []
        try:
            return future.result()
        except BrokenExecutor:
            logger.error("the ML worker process stopped while it had training run %s "
                         "(killed? out of memory?); the next run starts a new one", run_id)
            _drop_process(process)
            _abandon([run_id], running=True,
                     reason="the ML worker process stopped before this run finished "
                            "(killed? out of memory?); start it again")
            return []
    _abandon([run_id], reason="the ML worker process could not be started (see the "
                              "server's log); start this run again")
    return []


def _worker_process() -> ProcessPoolExecutor:
    global _process
    with _lock:
        if _process is None:
            import multiprocessing

            _process = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                initializer=_child_start)
        return _process


def _drop_process(process: ProcessPoolExecutor) -> None:
    global _process
    with _lock:
        if _process is process:
            _process = None
    process.shutdown(wait=True, cancel_futures=True)   # a broken pool: its worker is gone


def _child_job(run_id: int) -> list[int]:
    """In the worker process: run ``run_id``; return the runs it queued."""
    _execute(run_id)
    queued = list(_follow_ups)
    _follow_ups.clear()
    return queued


def _execute(run_id: int) -> None:
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


def _abandon(run_ids: list[int], *, running: bool = False,
             reason: str = "the server stopped before this run started") -> None:
    """Mark runs that will not run (queued ones; with ``running`` also one a dead worker
    process had, and the version it was making) abandoned, saying why: the project is not
    left "updating" and can refit again."""
    from django.utils import timezone

    from ml_backend.models import ModelVersion, TrainingRun

    statuses = [TrainingRun.Status.QUEUED] + ([TrainingRun.Status.RUNNING] if running else [])
    try:
        runs = TrainingRun.objects.filter(pk__in=run_ids, status__in=statuses)
        versions = list(runs.exclude(model_version=None).values_list("model_version",
                                                                     flat=True))
        runs.update(status=TrainingRun.Status.ABANDONED, finished_at=timezone.now(),
                    lease_expires_at=None, last_error=reason)
        ModelVersion.objects.filter(pk__in=versions).exclude(
            status=ModelVersion.Status.ACTIVE).update(status=ModelVersion.Status.FAILED,
                                                     status_reason=reason)
    except Exception:  # at exit the database may be gone already
        logger.warning("training runs %s were abandoned (%s)", run_ids, reason)
