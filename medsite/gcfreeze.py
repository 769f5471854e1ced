"""Keep Python's cyclic garbage collector off the objects that heavy libraries leave behind.

The label page's process imports torch, scipy and scikit-learn lazily, the first time an
answer starts a new query round or loads a model (issue 12 keeps them out of start-up). After
that the process tracks about 400,000 more Python objects (functions, classes, type tables),
and every full collection walks all of them: about 200 ms, in roughly one answer of a hundred
(docs/benchmarks.md, "100,000 scans with the wider vectors"). Those objects live as long as
the process, so collecting them is wasted work.

After a request that left the process with ``settings.GC_FREEZE_NEW_MODULES`` or more newly
imported modules, one full collection clears the garbage of the moment and ``gc.freeze()``
moves every object still alive into the collector's permanent generation, which later
collections do not walk (the technique large Django deployments use before forking workers;
Python's documentation of ``gc.freeze``). Frozen objects are still freed by reference
counting; only a frozen object that later becomes part of an unreachable reference cycle is
never reclaimed, so this runs once per burst of imports (a handful of times in a process's
life), not per request. The collection runs after the response has been handed to the server
(``request_finished``), on the request that did the imports.
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
import time

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_modules_at_freeze = 0           # len(sys.modules) when this process last froze


def freeze_if_modules_grew(min_new_modules: int) -> bool:
    """Collect and freeze once ``min_new_modules`` modules were imported since the last
    freeze (0 turns it off). Returns whether it froze."""
    global _modules_at_freeze
    if min_new_modules <= 0 or len(sys.modules) - _modules_at_freeze < min_new_modules:
        return False
    with _lock:
        loaded = len(sys.modules)
        if loaded - _modules_at_freeze < min_new_modules:      # another thread just did
            return False
        started = time.perf_counter()
        gc.collect()
        gc.freeze()
        _modules_at_freeze = loaded
    logger.info("gc: froze %d long-lived objects after %d modules were loaded (%.0f ms)",
                gc.get_freeze_count(), loaded, (time.perf_counter() - started) * 1000)
    return True


def on_request_finished(sender, **kwargs) -> None:
    from django.conf import settings

    freeze_if_modules_grew(getattr(settings, "GC_FREEZE_NEW_MODULES", 0))
