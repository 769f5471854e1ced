"""Requests refused before any view sees them, with a clear answer in the shape the caller
reads: problem JSON on the API (``/api/``), ``{"error": …}`` on the Label Studio ML backend
(``/ml/``) and to a page's script, a short plain-text page elsewhere — never a 500 or
Django's HTML error page.

- a path or query string holding a control character (NUL and the rest of Unicode's Cc
  class, percent-encoded or not): 400. No URL of the site takes one, and PostgreSQL refuses
  a NUL in a text comparison with a ``DataError`` (a 500) wherever a query parameter or
  URL part reaches a filter;
- a ``Content-Length`` that is not a number: 400;
- a body larger than DATA_UPLOAD_MAX_MEMORY_SIZE (multipart uploads aside: Django bounds
  their form fields and the upload views their files): 413, before it is read — and the
  same answer when Django raises ``RequestDataTooBig`` further in (a body with no length);
- a multipart POST is parsed here, once (the CSRF check would parse it next, where a form
  field over that size, more files than DATA_UPLOAD_MAX_NUMBER_FILES or a broken body
  becomes Django's bare 400 page): 413 for a field too large, 400 with the reason for the
  rest. The parsed form and files stay on the request for the view (DRF reads them too).
"""

from __future__ import annotations

import re
from urllib.parse import unquote_plus

from django.conf import settings
from django.core.exceptions import RequestDataTooBig, TooManyFilesSent
from django.http.multipartparser import MultiPartParserError
from django.http import HttpResponse, JsonResponse

# Unicode's control characters (category Cc): C0, DEL and C1
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

TITLES = {400: "Bad request", 413: "Content too large"}


def refusal(request, status: int, detail: str) -> HttpResponse:
    """``detail`` as the caller of ``request`` reads an error."""
    path = request.path_info or ""
    if path.startswith("/api/"):
        return JsonResponse({"type": "about:blank", "title": TITLES.get(status, "Error"),
                             "status": status, "detail": detail}, status=status,
                            content_type="application/problem+json")
    if path.startswith("/ml/") or _wants_json(request):
        return JsonResponse({"error": detail}, status=status)
    return HttpResponse(detail, status=status, content_type="text/plain; charset=utf-8")


def _wants_json(request) -> bool:
    """A page's script or a client that reads JSON (as ``annotator.auth.wants_json``, read
    from the headers alone: the query string may be what is refused)."""
    return ("application/json" in request.META.get("CONTENT_TYPE", "")
            or "application/json" in request.META.get("HTTP_ACCEPT", "")
            or request.META.get("HTTP_X_REQUESTED_WITH") == "XMLHttpRequest")


def _too_big(request) -> HttpResponse:
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    return refusal(request, 413, f"the request body is larger than the {limit:,} bytes "
                                 "accepted here")


def _parse_form(request) -> HttpResponse | None:
    """Parse a multipart POST now; the refusal when it cannot be read."""
    try:
        request.POST  # noqa: B018 (reading it parses the body, files included)
    except RequestDataTooBig:
        return refusal(request, 413, "a form field is larger than the "
                                     f"{settings.DATA_UPLOAD_MAX_MEMORY_SIZE:,} bytes accepted "
                                     "here (files aside)")
    except TooManyFilesSent:
        return refusal(request, 400, f"at most {settings.DATA_UPLOAD_MAX_NUMBER_FILES} files "
                                     "per upload: send them in several")
    except MultiPartParserError as exc:
        return refusal(request, 400, f"the multipart body cannot be read ({exc})")
    return None


class RequestGuardMiddleware:
    """See the module's docstring. Placed right after SecurityMiddleware: nothing else
    (sessions, CSRF, authentication, a view) reads a refused request."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        refused = self._check(request)
        if refused is not None:
            return refused
        return self.get_response(request)

    @staticmethod
    def _check(request) -> HttpResponse | None:
        if CONTROL.search(request.path_info or ""):
            return refusal(request, 400, "the URL holds a control character (such as NUL): "
                                         "no address of this site has one")
        query = request.META.get("QUERY_STRING", "")
        if query and CONTROL.search(unquote_plus(query, errors="replace")):
            return refusal(request, 400, "a query parameter holds a control character (such "
                                         "as NUL): no parameter of this site takes one")
        length = request.META.get("CONTENT_LENGTH") or ""
        if length:
            if not length.strip().isdigit():
                return refusal(request, 400, "the Content-Length header is not a number")
            limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
            multipart = request.META.get("CONTENT_TYPE", "").startswith("multipart/")
            if limit is not None and not multipart and int(length) > limit:
                return _too_big(request)
        if request.method == "POST" and request.META.get("CONTENT_TYPE", "").startswith(
                "multipart/form-data"):
            return _parse_form(request)
        return None

    def process_exception(self, request, exception):
        # a body Django found too big only while reading it (no Content-Length, or a form)
        if isinstance(exception, RequestDataTooBig):
            return _too_big(request)
        return None
