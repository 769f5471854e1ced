"""The small linear fits of a refit run on one BLAS thread.

A refit's head is a logistic regression on a few hundred labels by ~1,800 features, fit ten
times (four out-of-fold folds and the full fit, with and without the thumbnail): matrices
of a few hundred rows by four classes. OpenBLAS splits products of that size over every
core, and waking and joining its threads for each L-BFGS step costs more than the
arithmetic: on the 2-core machine a 200-label brain MRI head took 7.7 s with two BLAS
threads and 0.9 s with one (docs/benchmarks.md, "A refit slowed by its own threads"). The
encoder's convolutions use torch's own thread pool, which this leaves alone.
"""

from __future__ import annotations

from functools import wraps

from threadpoolctl import threadpool_limits


def one_blas_thread(fit):
    """``fit`` run with the BLAS libraries (numpy's and scipy's OpenBLAS) held to one thread,
    restored afterwards (nesting is fine)."""

    @wraps(fit)
    def wrapper(*args, **kwargs):
        with threadpool_limits(limits=1, user_api="blas"):
            return fit(*args, **kwargs)

    return wrapper
