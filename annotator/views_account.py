"""The user's own page: their projects and roles, and their API token (README "API")."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods
from rest_framework.authtoken.models import Token

from annotator import auth, selectors


@login_required
@require_http_methods(["GET", "HEAD", "POST"])
def account(request):
    """GET: the page. POST ``action=token``: make a token (or replace the one there is: the old
    one stops working at once; one made seconds ago is kept, ``auth.token_make``);
    ``action=revoke``: delete it."""
    if request.method == "POST":
        action = request.POST.get("action")
        if action == "token":
            _, made = auth.token_make(user=request.user)
            if not made:
                messages.info(request, "A token was made seconds ago (a second click, or "
                                       "another tab): that one is kept and shown below.")
            request.session["token_shown"] = True
        elif action == "revoke":
            auth.token_revoke(user=request.user)
        return redirect("annotator:account")
    token = Token.objects.filter(user=request.user).first()
    fresh = bool(request.session.pop("token_shown", False))
    projects = [(p, p.role_of(request.user)) for p in
                selectors.project_list_for_user(request.user).order_by("name")]
    return render(request, "annotator/account.html", {
        "token": token, "show_key": fresh, "projects": projects})
