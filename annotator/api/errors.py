"""Errors as problem JSON (RFC 9457): ``{"type", "title", "status", "detail"}`` with a
message a person can act on, for every API error (validation, auth, 404, throttling)."""

from __future__ import annotations

from rest_framework.views import exception_handler


def problem_handler(exc, context):
    response = exception_handler(exc, context)
    if response is None:
        return None
    data = response.data
    if isinstance(data, dict) and set(data) == {"detail"}:
        detail = str(data["detail"])
        fields = None
    else:
        fields = data
        detail = _words(data if isinstance(data, dict) else {"request": data})
    if response.status_code == 406:     # DRF: "Could not satisfy the request Accept header."
        detail = (f"{detail.rstrip('.')}: this API answers JSON only (Accept: "
                  "application/json, or no Accept header)")
    title = {400: "Bad request", 401: "Not signed in", 403: "Not allowed", 404: "Not found",
             405: "Method not allowed", 406: "Not acceptable", 409: "Conflict",
             413: "Content too large",
             415: "Unsupported media type",
             429: "Too many requests"}.get(response.status_code, "Error")
    body = {"type": "about:blank", "title": title, "status": response.status_code,
            "detail": detail}
    if fields is not None:
        body["errors"] = fields
    response.data = body
    response.content_type = "application/problem+json"
    return response


def _words(errors) -> str:
    """Validation errors as plain text, nested ones too (a findings answer's
    ``{"shown_scores": {"13": ["A valid number is required."]}}`` reads
    ``shown_scores: 13: A valid number is required.``), never a Python repr."""
    if isinstance(errors, dict):
        return "; ".join(f"{k}: {_words(v)}" for k, v in errors.items())
    if isinstance(errors, (list, tuple)):
        return " ".join(_words(v) for v in errors)
    return str(errors)


def problem(status: int, detail: str, title: str = "Conflict"):
    """A problem-JSON response from a view (for answers that are not exceptions)."""
    from rest_framework.response import Response

    return Response({"type": "about:blank", "title": title, "status": status,
                     "detail": detail}, status=status, content_type="application/problem+json")

