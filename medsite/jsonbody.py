"""One parser for every JSON request body (the answer endpoint, the Label Studio webhook,
the ML-backend endpoints): a size limit, a nesting limit, numbers of at most 40 characters
and finite, no NaN or Infinity, and a top-level type (a field's range is checked where it is
read: ``number()``, ``db_id()``, or the service that stores it) — so an odd body is a clear
4xx with a reason, never a 500.

    try:
        body = parse_json(request.body, expect=dict)
    except BodyError as exc:
        return JsonResponse({"error": str(exc)}, status=exc.status)
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_BYTES = 1_000_000          # a label, a webhook event or a predict call is far smaller
MAX_DEPTH = 32                 # Label Studio's payloads nest about 6 deep
MAX_NUMBER_CHARS = 40          # a 40-digit integer is already beyond every column we have
MAX_ABS_NUMBER = 1e15          # the default bound of ``number()`` fields (seconds, ids, scores)

_STRING = re.compile(r'"(?:\\.|[^"\\])*"', re.S)


class BodyError(ValueError):
    """The body is not acceptable JSON; ``status`` is 400 (malformed) or 413 (too large)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _number(text: str, kind: type):
    if len(text) > MAX_NUMBER_CHARS:
        raise BodyError(f"a number of {len(text)} characters is not accepted")
    value = kind(text)
    if kind is float and not math.isfinite(value):          # 1e400 → inf
        raise BodyError(f"the number {text[:20]} is out of range")
    return value


def _constant(name: str):
    raise BodyError(f"{name} is not a JSON value we accept")


def _depth(text: str) -> int:
    """The deepest nesting of arrays and objects, strings ignored (without recursion)."""
    stripped = _STRING.sub('""', text)
    depth = deepest = 0
    for char in stripped:
        if char in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_DEPTH:
                    return deepest
        elif char in "]}":
            depth -= 1
    return deepest


def parse_json(raw: bytes | str | None, *, expect: type | tuple[type, ...] | None = dict,
               max_bytes: int = MAX_BYTES, empty: Any = None) -> Any:
    """Parse a request body. ``expect``: the type the top level must have (None: any).
    ``empty``: what an empty body means (None: an empty body is refused)."""
    raw = raw or b""
    if len(raw) > max_bytes:
        raise BodyError(f"the body is {len(raw)} bytes; at most {max_bytes} are accepted", 413)
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BodyError("the body is not UTF-8 text") from None
    else:
        text = raw
    if not text.strip():
        if empty is not None:
            return empty
        raise BodyError("the body is empty: send a JSON object")
    if _depth(text) > MAX_DEPTH:
        raise BodyError(f"the JSON nests deeper than {MAX_DEPTH} levels")
    try:
        value = json.loads(text, parse_int=lambda s: _number(s, int),
                           parse_float=lambda s: _number(s, float), parse_constant=_constant)
    except BodyError:
        raise
    except (json.JSONDecodeError, ValueError, RecursionError, OverflowError) as exc:
        raise BodyError(f"the body is not valid JSON ({type(exc).__name__})") from None
    check_text(value)
    if expect is not None and not isinstance(value, expect):
        names = " or ".join(t.__name__ for t in (expect if isinstance(expect, tuple) else (expect,)))
        words = {"dict": "a JSON object", "list": "a JSON array"}
        raise BodyError(f"send {words.get(names, names)}, not {type(value).__name__}")
    return value


def check_text(value: Any) -> None:
    """Refuse text no database column can hold: a NUL (PostgreSQL refuses it) or a lone
    surrogate (not encodable as UTF-8), in any key or string value, at any depth."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            if "\x00" in item:
                raise BodyError("text with a NUL character is not accepted")
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise BodyError("text with an unpaired surrogate is not accepted") from None


def number(value: Any, *, name: str, minimum: float | None = None,
           maximum: float | None = None, integer: bool = False, default: Any = None):
    """A field that must be a finite number in [minimum, maximum] (None/absent: ``default``).
    Raises BodyError naming the field."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BodyError(f"{name} must be a number, not {type(value).__name__}")
    if integer and not float(value).is_integer():
        raise BodyError(f"{name} must be a whole number")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise BodyError(f"{name} must be between {minimum} and {maximum}")
    return int(value) if integer else float(value)


def text(value: Any, *, name: str, max_length: int, default: str = "") -> str:
    """A field that must be a string of at most ``max_length`` characters."""
    if value is None:
        return default
    if not isinstance(value, str):
        raise BodyError(f"{name} must be text, not {type(value).__name__}")
    if len(value) > max_length:
        raise BodyError(f"{name} is longer than {max_length} characters")
    return value


DB_ID_MAX = 2**63 - 1          # PostgreSQL bigint (every primary key here)


def db_id(value: Any) -> int | None:
    """A row id from a request: a positive whole number a bigint column can hold (an int or
    its decimal string), else None — so a lookup never overflows the database."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) <= 19:
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        value = int(value)
    if isinstance(value, int) and 0 < value <= DB_ID_MAX:
        return value
    return None
