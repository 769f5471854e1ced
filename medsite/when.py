"""Times in words: the site's zone, always named.

Every time a person reads (pages, notes, messages, run logs) is shown in ``TIME_ZONE`` with
its zone written after it ("2026-12-07 14:03 GMT", "2026-12-08 10:16 +14"), so that a reader
in another zone, or in the repeated hour when the clocks go back, can tell what it means.
Machine-readable outputs (CSV, JSON, the API) keep ISO 8601 with the offset.
"""
from __future__ import annotations

import datetime

from django.utils import timezone


def in_words(moment: datetime.datetime | None = None, *, seconds: bool = False,
             date: bool = True) -> str:
    """``moment`` (default: now) in the site's zone, e.g. ``2026-12-07 14:03 GMT``."""
    local = timezone.localtime(moment if moment is not None else timezone.now())
    shape = ("%Y-%m-%d " if date else "") + ("%H:%M:%S" if seconds else "%H:%M")
    return f"{local.strftime(shape)} {local.strftime('%Z') or local.strftime('%z')}"
