"""Signing in for the pages' JSON endpoints: a request from a page's script whose session has
ended (signed out, expired) gets 401 with a reason and the sign-in URL, not a redirect to the
login page that ``fetch`` follows and cannot read; one whose user is no longer a member of
the project gets 404 with that reason (as JSON with DEBUG on too), and a removed member's
scan leases are released at once.

Also the site's side of django-axes (settings ``AXES_*``): the client's address behind the
proxy, the 429 page of a refused sign-in; the API tokens a password change revokes, and
making one (``token_make``) safe to click twice."""

from __future__ import annotations

import ipaddress
import logging
import math
from functools import wraps

from axes.handlers.proxy import AxesProxyHandler
from axes.helpers import get_client_username, get_cool_off, get_failure_limit
from django.conf import settings
from django.contrib.auth import get_user_model, user_login_failed
from django.contrib.auth.forms import AuthenticationForm, PasswordChangeForm
from django.contrib.auth.hashers import is_password_usable
from django.contrib.auth.views import PasswordChangeView
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Max, Sum
from django.db.models.signals import post_delete, post_save, pre_save
from django.dispatch import receiver
from django.http import Http404, JsonResponse
from django.shortcuts import render, resolve_url
from django.utils import timezone
from rest_framework.authtoken.models import Token

from annotator import labeling
from annotator.models import Membership

log = logging.getLogger(__name__)

# A second "make token" within this time of the last token made (a double click, the form
# sent from two tabs) keeps that token rather than replacing it: every one of the requests
# then leads to the page showing the key that works.
TOKEN_REPEAT_SECONDS = 10

SESSION_ENDED = ("Your session has ended (you were signed out or it timed out): sign in "
                 "again, then repeat what you did. Nothing was saved from this request.")
# The same words whether the project exists or not: a project's id does not leak to outsiders.
NOT_A_MEMBER = ("You are not (or no longer) a member of this project, or it does not exist: "
                "nothing was saved from this request. Ask the project's admin if you should "
                "be reading it.")


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
    the script runs on); any other is redirected to the sign-in page as usual.

    A signed-in one that wants JSON and that the view answers 404 gets ``{"error"}`` with
    the reason, DEBUG on or off (DEBUG's own 404 is a page ``fetch`` cannot read): for a
    user who is not a member of the URL's project (say, removed from it while the label
    page was open) NOT_A_MEMBER, otherwise what the view's ``Http404`` said."""

    @wraps(view)
    def checked(request, *args, **kwargs):
        if request.user.is_authenticated:
            try:
                return view(request, *args, **kwargs)
            except Http404 as exc:
                if not wants_json(request):
                    raise
                said = exc.args[0] if exc.args and isinstance(exc.args[0], str) else ""
                if not _member(request.user, kwargs.get("project_id")):
                    said = NOT_A_MEMBER
                return _no_store(JsonResponse({"error": said or "not found"}, status=404))
        if wants_json(request):
            return _no_store(JsonResponse({"error": SESSION_ENDED,
                                           "login": resolve_url(settings.LOGIN_URL)},
                                          status=401))
        return redirect_to_login(request.get_full_path(), settings.LOGIN_URL)

    return checked


def _member(user, project_id) -> bool:
    """Whether ``user`` may open the project ``project_id`` (True where the URL names none)."""
    return (project_id is None or user.is_superuser
            or Membership.objects.filter(project_id=project_id, user=user).exists())


def _no_store(response):
    response["Cache-Control"] = "no-store"
    return response


def client_ip(request) -> str | None:
    """The client's address for counting failed sign-ins (``AXES_CLIENT_IP_CALLABLE``): with
    ``LOGIN_PROXY_COUNT`` = n proxies in front, the n-th address from the right of
    X-Forwarded-For (the one our outermost proxy saw; what a client puts to its left is
    ignored, so it cannot pick its own address); otherwise, with no such header or where that
    entry is not an IP address, the socket's address."""
    count = settings.LOGIN_PROXY_COUNT
    forwarded = [a.strip() for a in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")
                 if a.strip()]
    if count and forwarded:
        try:
            return str(ipaddress.ip_address(forwarded[-min(count, len(forwarded))]))
        except ValueError:
            pass
    return request.META.get("REMOTE_ADDR")


def _lockout_minutes_left(request, credentials) -> int:
    """Minutes until the refused username / address may sign in again: the cool-off after the
    last failure counted against whichever of them reached the limit."""
    cool_off = get_cool_off(request)
    handler = AxesProxyHandler.get_implementation()
    limit = get_failure_limit(request, credentials)
    ends = []
    for attempts in getattr(handler, "get_user_attempts", lambda *a: [])(request, credentials):
        totals = attempts.aggregate(failures=Sum("failures_since_start"),
                                    last=Max("attempt_time"))
        if (totals["failures"] or 0) >= limit and totals["last"] is not None:
            ends.append(totals["last"] + cool_off)
    seconds = ((max(ends) - timezone.now()).total_seconds() if ends
               else cool_off.total_seconds())
    return max(1, math.ceil(seconds / 60))


def lockout_response(request, original_response=None, credentials=None):
    """A sign-in refused for too many failures (``AXES_LOCKOUT_CALLABLE``): 429 with the reason
    and when to try again, on the login page (or as JSON for a script), and Retry-After."""
    minutes = _lockout_minutes_left(request, credentials)
    message = lockout_message(minutes)
    match = getattr(request, "resolver_match", None)
    if wants_json(request):
        response = JsonResponse({"error": message, "retry_after_minutes": minutes},
                                status=429)
    elif (match is not None and match.url_name == "password_change"
          and request.user.is_authenticated):
        # the old password guessed wrong once too often on the page that changes it
        response = render(request, SitePasswordChangeView.template_name, {
            "form": ThrottledPasswordChangeForm(request.user, request=request),
            "lockout": message}, status=429)
    else:
        form = AuthenticationForm(request, initial={
            "username": get_client_username(request, credentials) or ""})
        response = render(request, "registration/login.html", {
            "form": form, "lockout": message,
            "next": request.POST.get("next") or request.GET.get("next", "")}, status=429)
    response["Retry-After"] = str(minutes * 60)
    return response


def lockout_message(minutes: int) -> str:
    return (f"Too many failed sign-ins; try again in {minutes} minute"
            f"{'' if minutes == 1 else 's'} (or ask an admin to clear the lock).")


class ThrottledPasswordChangeForm(PasswordChangeForm):
    """The password page's form: a wrong old password counts as a failed sign-in of that user
    (django-axes, ``LOGIN_FAILURE_LIMIT``), so a session left open on a shared workstation
    cannot be used to guess the password it was opened with; while the username is locked the
    old password is not checked at all."""

    def __init__(self, user, *args, request=None, **kwargs):
        super().__init__(user, *args, **kwargs)
        self.request = request

    def _credentials(self) -> dict:
        return {settings.AXES_USERNAME_FORM_FIELD: self.user.get_username()}

    def clean_old_password(self):
        throttled = self.request is not None and settings.AXES_ENABLED
        if throttled and not AxesProxyHandler.is_allowed(self.request, self._credentials()):
            raise ValidationError(
                lockout_message(_lockout_minutes_left(self.request, self._credentials())),
                code="locked")
        try:
            return super().clean_old_password()
        except ValidationError:
            if throttled:
                user_login_failed.send(sender=__name__, credentials=self._credentials(),
                                       request=self.request)
            raise


class SitePasswordChangeView(PasswordChangeView):
    """``/accounts/password_change/`` on the site's own template (the admin app ships
    ``registration/password_change_*.html``, found first, which need the admin's context)."""
    template_name = "registration/site_password_change.html"
    form_class = ThrottledPasswordChangeForm

    def get_form_kwargs(self):
        return {**super().get_form_kwargs(), "request": self.request}

    def form_invalid(self, form):
        locked = form.has_error("old_password", code="locked")
        response = self.render_to_response(self.get_context_data(form=form))
        if locked:
            response.status_code = 429
        return response


@receiver(pre_save, sender=settings.AUTH_USER_MODEL,
          dispatch_uid="annotator_note_password_disabled")
def note_password_disabled(sender, instance, raw: bool = False, update_fields=None, **kwargs):
    """``set_unusable_password`` (the admin's "disable password-based authentication", a
    restored account) leaves no new password on the user for the hook below to see: where
    the password being saved is unusable and the stored one was usable, say so for it (one
    that was already disabled is not disabled again). One query, only on such saves."""
    if raw or instance.pk is None or instance.has_usable_password():
        return
    if update_fields is not None and "password" not in update_fields:
        return
    stored = sender.objects.filter(pk=instance.pk).values_list("password", flat=True).first()
    if stored is not None and is_password_usable(stored):
        instance._password_disabled = True


@receiver(post_save, sender=settings.AUTH_USER_MODEL,
          dispatch_uid="annotator_revoke_tokens_on_password_change")
def revoke_tokens_on_password_change(sender, instance, raw: bool = False, **kwargs):
    """A changed or disabled password revokes the user's API token (README "API"), whatever
    changed it: the site's page, the admin (a new password, or password sign-in disabled),
    ``manage.py changepassword``, ``set_password`` / ``set_unusable_password`` + ``save``.
    ``set_password`` keeps the new password on the user until the save that stores it (the
    hook Django's own ``password_changed`` runs from); a hash upgraded at sign-in does not."""
    disabled = (instance.__dict__.pop("_password_disabled", False)
                and not instance.has_usable_password())
    if raw or (getattr(instance, "_password", None) is None and not disabled):
        return
    revoked, _ = Token.objects.filter(user=instance).delete()
    if revoked:
        log.info("password of user %s changed: API token revoked", instance.pk)


@receiver(post_delete, sender=Membership, dispatch_uid="annotator_release_removed_member")
def release_leases_of_removed_member(sender, instance: Membership, **kwargs):
    """A member removed from a project (the admin, a script, any path that deletes the
    membership) gives up the scans they hold there at once: other readers get them now, not
    when the leases run out (LABEL_LEASE_SECONDS), and no page says they have them open.
    In the deletion's transaction: undone with it."""
    released = labeling.leases_release_member(project_id=instance.project_id,
                                              user_id=instance.user_id)
    if released:
        log.info("user %s removed from project %s: %d scan lease(s) released",
                 instance.user_id, instance.project_id, released)


def _user_row_locked(user) -> None:
    """Lock ``user``'s row until the transaction ends: their token requests run one at a
    time (PostgreSQL; SQLite's IMMEDIATE transactions, settings ``transaction_mode``, already
    run one writer at a time)."""
    list(get_user_model().objects.select_for_update().filter(pk=user.pk)
         .values_list("pk", flat=True))


def token_make(*, user) -> tuple[Token, bool]:
    """A new API token for ``user`` in place of the one they have (which stops working at
    once), unless theirs was made under TOKEN_REPEAT_SECONDS ago: then that one is kept.
    ``(token, made)``. Requests at once for one user run one after another (a lock on the
    user's row), so they never collide on the one token a user may have."""
    with transaction.atomic():
        _user_row_locked(user)
        token = Token.objects.filter(user=user).first()
        if token is not None and (timezone.now() - token.created).total_seconds() \
                < TOKEN_REPEAT_SECONDS:
            return token, False
        Token.objects.filter(user=user).delete()
        return Token.objects.create(user=user), True


def token_revoke(*, user) -> bool:
    """Delete ``user``'s API token; whether they had one."""
    with transaction.atomic():
        _user_row_locked(user)
        revoked, _ = Token.objects.filter(user=user).delete()
    return bool(revoked)
