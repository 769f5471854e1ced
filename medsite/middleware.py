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
- a multipart or urlencoded POST is parsed here, once (the CSRF check would parse it next,
  where a form field over that size, more fields than DATA_UPLOAD_MAX_NUMBER_FIELDS, more
  files than DATA_UPLOAD_MAX_NUMBER_FILES or a broken body becomes Django's bare 400 page
  and an ERROR with a traceback): 413 for a field too large, 400 with the reason for the
  rest. The parsed form and files stay on the request for the view (DRF reads them too).
  A query string, or an urlencoded body sent with another method (DRF's FormParser reads a
  PUT's), of more than DATA_UPLOAD_MAX_NUMBER_FIELDS fields: the same 400. These refusals
  are logged at WARNING (``django.security.<the exception>``, as Django names them), never
  as an ERROR: the request is refused, nothing failed.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote_plus

from django.conf import settings
from django.core.exceptions import (BadRequest, RequestDataTooBig, TooManyFieldsSent,
                                    TooManyFilesSent)
from django.http.multipartparser import MultiPartParserError
from django.http import HttpResponse, JsonResponse, QueryDict

# Unicode's control characters (category Cc): C0, DEL and C1
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

URLENCODED = "application/x-www-form-urlencoded"
FORMS = ("multipart/form-data", URLENCODED)

TITLES = {400: "Bad request", 404: "Not found", 413: "Content too large"}

# the callers that read ``{"error": …}``: Label Studio (our ML backend, and the webhook it
# calls on the site)
JSON_PATHS = ("/ml/", "/labelstudio/")


def refusal(request, status: int, detail: str) -> HttpResponse:
    """``detail`` as the caller of ``request`` reads an error."""
    path = request.path_info or ""
    if path.startswith("/api/"):
        return JsonResponse({"type": "about:blank", "title": TITLES.get(status, "Error"),
                             "status": status, "detail": detail}, status=status,
                            content_type="application/problem+json")
    if reads_json(request):
        return JsonResponse({"error": detail}, status=status)
    return HttpResponse(detail, status=status, content_type="text/plain; charset=utf-8")


def reads_json(request) -> bool:
    """Whether the caller of ``request`` reads an error as JSON (the API, Label Studio, a
    page's script) rather than as a page."""
    path = request.path_info or ""
    return path.startswith("/api/") or path.startswith(JSON_PATHS) or _wants_json(request)


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


def _suspicious(request, exc: Exception, detail: str) -> HttpResponse:
    """The 400 for a request Django calls suspicious (too many fields or files), logged where
    Django logs it (``django.security.<class>``) but at WARNING: it was refused, nothing
    failed, and there is no traceback to read."""
    logging.getLogger(f"django.security.{type(exc).__name__}").warning(
        "%s refused: %s", request.path, detail)
    return refusal(request, 400, detail)


def _too_many_fields(request, exc: TooManyFieldsSent, where: str) -> HttpResponse:
    return _suspicious(request, exc, f"{where} has more than "
                                     f"{settings.DATA_UPLOAD_MAX_NUMBER_FIELDS:,} fields, the "
                                     "most accepted here: send fewer")


# A part header of a multipart body (the line naming a field and its file): Django decodes
# each as UTF-8 and silently drops one it cannot, so a file name sent in Latin-1 made its
# file vanish ("choose at least one file") or its bytes read as headers ("max total header
# size exceeded")
_PART_HEADER = re.compile(rb"(?im)^content-(?:disposition|type):[^\r\n]*\r\n")
NOT_UTF8_PART = ("a file name (or another part header) of the form is not UTF-8 text: it was "
                 "sent in another character set (such as Latin-1). Send the name UTF-8 "
                 "encoded, as browsers do (a script: filename*=UTF-8''…), or rename the file")


class _PartHeaderWatch:
    """The request's body stream, read through unchanged, noting a multipart part header
    that is not UTF-8 text (``bad``)."""

    def __init__(self, stream):
        self._stream = stream
        self._tail = b""
        self.bad = False

    def _scan(self, data: bytes) -> bytes:
        if data and not self.bad:
            buffer = self._tail + data
            for match in _PART_HEADER.finditer(buffer):
                try:
                    match.group().decode("utf-8")
                except UnicodeDecodeError:
                    self.bad = True
                    break
            self._tail = buffer[-2048:]
        return data

    def read(self, *args, **kwargs):
        return self._scan(self._stream.read(*args, **kwargs))

    def readline(self, *args, **kwargs):
        return self._scan(self._stream.readline(*args, **kwargs))

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _parse_form(request) -> HttpResponse | None:
    """Parse a multipart or urlencoded POST now; the refusal when it cannot be read."""
    watch = None
    if request.META.get("CONTENT_TYPE", "").startswith("multipart/") and hasattr(
            request, "_stream"):
        watch = request._stream = _PartHeaderWatch(request._stream)
    try:
        request.POST  # noqa: B018 (reading it parses the body, files included)
    except RequestDataTooBig:
        return refusal(request, 413, "a form field is larger than the "
                                     f"{settings.DATA_UPLOAD_MAX_MEMORY_SIZE:,} bytes accepted "
                                     "here (files aside)")
    except TooManyFilesSent as exc:
        return _suspicious(request, exc, f"at most {settings.DATA_UPLOAD_MAX_NUMBER_FILES} "
                                         "files per upload: send them in several")
    except TooManyFieldsSent as exc:
        return _too_many_fields(request, exc, "the form")
    except MultiPartParserError as exc:
        if watch is not None and watch.bad:
            return refusal(request, 400, NOT_UTF8_PART)
        return refusal(request, 400, f"the multipart body cannot be read ({exc})")
    except BadRequest as exc:       # an urlencoded body declared in another charset than UTF-8
        return refusal(request, 400, f"the form cannot be read ({exc})")
    if watch is not None and watch.bad:
        return refusal(request, 400, NOT_UTF8_PART)
    return None


def _count_fields(request) -> HttpResponse | None:
    """The query string's fields, and an urlencoded body's when it is not a POST (DRF parses
    a PUT's itself, and would raise TooManyFieldsSent there), against
    DATA_UPLOAD_MAX_NUMBER_FIELDS (Django's own count)."""
    try:
        request.GET  # noqa: B018 (reading it parses the query string)
    except TooManyFieldsSent as exc:
        return _too_many_fields(request, exc, "the query string")
    if request.method != "POST" and request.content_type == URLENCODED:
        try:
            QueryDict(request.body, encoding="utf-8")    # the body stays cached for the view
        except TooManyFieldsSent as exc:
            return _too_many_fields(request, exc, "the form")
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
        refused = _count_fields(request)
        if refused is None and request.method == "POST" and request.content_type in FORMS:
            refused = _parse_form(request)
        return refused

    def process_exception(self, request, exception):
        # a body Django found too big only while reading it (no Content-Length, or a form)
        if isinstance(exception, RequestDataTooBig):
            return _too_big(request)
        if isinstance(exception, TooManyFieldsSent):    # a body parsed only by the view
            return _too_many_fields(request, exception, "the request")
        return None
