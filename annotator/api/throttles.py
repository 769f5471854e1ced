"""The API's per-user and anonymous limits (API_THROTTLE_USER / _ANON), counted in Django's
cache (CACHE_URL: Redis in production). A cache that cannot be reached does not take the API
down with it: the call is let through and the fault logged, at most once a minute."""

from __future__ import annotations

import logging
import time

from rest_framework.throttling import AnonRateThrottle, UserRateThrottle

log = logging.getLogger(__name__)
_last_warned = [0.0]


def _cache_faults() -> tuple[type[BaseException], ...]:
    from redis.exceptions import RedisError

    return (RedisError, OSError)


def _let_through(exc: BaseException) -> bool:
    now = time.monotonic()
    if now - _last_warned[0] > 60:
        _last_warned[0] = now
        log.warning("the API's call limit could not be counted (the cache at CACHE_URL did not "
                    "answer: %s); calls are let through until it answers", type(exc).__name__)
    return True


class _CountedOrLetThrough:
    """A throttle whose cache fault lets the call through (logged) instead of failing it."""

    def allow_request(self, request, view):
        try:
            return super().allow_request(request, view)
        except _cache_faults() as exc:
            return _let_through(exc)


class SiteUserRateThrottle(_CountedOrLetThrough, UserRateThrottle):
    pass


class SiteAnonRateThrottle(_CountedOrLetThrough, AnonRateThrottle):
    pass
