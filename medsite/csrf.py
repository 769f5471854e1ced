"""A refused CSRF check, said in words to the page that asked.

Django's own failure page is HTML: the label page's script, asking for JSON, could only say
"the server answered 403: your answer may or may not have been saved", and pressing again
never helps (the request never reached a view). A request that asks for JSON gets JSON that
says nothing was saved and that the page must be reloaded; any other keeps Django's page.
"""
from __future__ import annotations

from django.http import JsonResponse
from django.views.csrf import csrf_failure as django_csrf_failure

NOT_SAVED = ("Nothing was saved: this page's security token is missing or out of date "
             "(you signed out or in again in another tab, or the browser's cookies were "
             "cleared). Reload the page, then try again.")


def csrf_failure(request, reason: str = ""):
    asks_json = ("application/json" in request.headers.get("Accept", "")
                 or request.content_type == "application/json")
    if asks_json:
        return JsonResponse({"error": NOT_SAVED, "csrf": True, "reason": reason}, status=403)
    return django_csrf_failure(request, reason=reason)
