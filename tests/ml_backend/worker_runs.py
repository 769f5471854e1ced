"""Run bodies for the worker-process tests in test_background.py, imported in the spawned
worker process of ml_backend/dispatch.py (so: light, no test fixtures). That process cannot
see the test database; ``install`` replaces its ``services.training_run_execute`` with a body
that does what a refit's end does to the dispatcher (queues the follow-up run from inside
the run) and notes which process ran each run, and when."""

from __future__ import annotations

import os
import signal
import time


def install(log: str, follow_ups: dict[int, int] | None = None, die_on: int | None = None,
            seconds: float = 0.2) -> int:
    """In the worker process: each run takes ``seconds``, queues ``follow_ups[run_id]`` while
    it runs (as training_run_execute's refit_start_if_due does) and appends
    ``run_id pid began ended`` to ``log``; run ``die_on`` is killed as the kernel's
    out-of-memory killer would. Returns the worker's pid."""
    from ml_backend import dispatch, services

    follow_ups = follow_ups or {}

    def execute(run_id: int, **kwargs) -> None:
        if run_id == die_on:
            os.kill(os.getpid(), signal.SIGKILL)
        began = time.time()
        time.sleep(seconds)
        if run_id in follow_ups:
            dispatch.enqueue_training_run(follow_ups[run_id])
        with open(log, "a") as out:
            out.write(f"{run_id} {os.getpid()} {began} {time.time()}\n")

    services.training_run_execute = execute
    return os.getpid()
