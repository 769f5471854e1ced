"""Signing in for the pages' JSON endpoints: a request from a page's script whose session has
ended (signed out, expired) gets 401 with a reason and the sign-in URL, not a redirect to the
login page that ``fetch`` follows and cannot read."""

from __future__ import annotations

from functools import wraps

from django.conf import settings
from django.contrib.auth.views import redirect_to_login
from django.http import JsonResponse
from django.shortcuts import resolve_url

SESSION_ENDED = ("Your session has ended (you were signed out or it timed out): sign in "
                 "again, then repeat what you did. Nothing was saved from this request.")


def wants_json(request) -> bool:
    """Whether the request comes from a page's script (or a client) that reads JSON: a JSON
    body, ``Accept: application/json``, ``?format=json`` or an XMLHttpRequest."""
    return (request.content_type == "application/json"
            or "application/json" in request.headers.get("Accept", "")
            or request.GET.get("format") == "json"
            or request.headers.get("X-Requested-With") == "XMLHttpRequest")


def login_required_json(view):
    """``login_required`` for views a page's script calls: a signed-out request that wants
    JSON gets 401 ``{"error", "login"}`` (``login``: the sign-in page, to return to the page
    the script runs on); any other is redirected to the sign-in page as usual."""

    @wraps(view)
    def checked(request, *args, **kwargs):
        if request.user.is_authenticated:
            return view(request, *args, **kwargs)
        if wants_json(request):
            response = JsonResponse({"error": SESSION_ENDED,
                                     "login": resolve_url(settings.LOGIN_URL)}, status=401)
            response["Cache-Control"] = "no-store"
            return response
        return redirect_to_login(request.get_full_path(), settings.LOGIN_URL)

    return checked
