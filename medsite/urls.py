from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.http import HttpResponse, HttpResponseBadRequest
from django.shortcuts import render
from django.template import loader
from django.urls import Resolver404, include, path
from django.views.decorators.cache import cache_control
from django.views.decorators.http import require_GET
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from annotator.auth import SitePasswordChangeView
from medsite.middleware import reads_json, refusal

# The site's icon (a scan frame), for the pages that do not link one (Django admin): a
# browser asks for /favicon.ico on every site, and a 404 there is noise in its console.
ICON = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
        '<rect x="1" y="1" width="14" height="14" rx="2" fill="#123"/>'
        '<circle cx="8" cy="8" r="4" fill="none" stroke="#9cf" stroke-width="2"/></svg>')


@require_GET
@cache_control(public=True, max_age=86400)
def favicon(request):
    return HttpResponse(ICON, content_type="image/svg+xml")


# What an address that leads nowhere means, by who asks (a view's own Http404 says more).
NOT_FOUND = {
    "/api/": "no such API path: see /api/schema/ or /api/docs/",
    "/ml/": "no such ML backend address: it answers /ml/<project id>/ followed by health, "
            "setup, predict, webhook or versions (no trailing slash)",
}
NOT_FOUND_ELSEWHERE = "no such page, or it belongs to a project you are not a member of"


def not_found(request, exception=None):
    """handler404 (DEBUG off): problem JSON on the API, ``{"error": …}`` to Label Studio and
    a page's script, the 404 page elsewhere. It says what the view's ``Http404`` said; an
    address no URL pattern matches (Django passes a ``Resolver404``, whose text is only a
    dict of the patterns tried) gets the sentence for its part of the site."""
    path = request.path_info or ""
    said = ""
    if exception is not None and not isinstance(exception, Resolver404):
        message = exception.args[0] if exception.args else ""
        said = message if isinstance(message, str) else ""
    if reads_json(request):
        generic = next((words for prefix, words in NOT_FOUND.items()
                        if path.startswith(prefix)), NOT_FOUND_ELSEWHERE)
        return refusal(request, 404, said or generic)
    return render(request, "404.html", {"exception": said}, status=404)


def bad_request(request, exception=None):
    """handler400 (DEBUG off): a request Django could not read and no guard caught first
    (medsite/middleware.py refuses the known ones with their reason). JSON for the callers
    that read it, the 400 page elsewhere."""
    if reads_json(request):
        return refusal(request, 400, "the request was refused as malformed (a host name this "
                                     "site does not serve, or a body that cannot be read): "
                                     "nothing was saved")
    # rendered without the request, as Django's own handler: it may be what is broken
    return HttpResponseBadRequest(loader.render_to_string("400.html"))


handler404 = not_found
handler400 = bad_request

urlpatterns = [
    path("favicon.ico", favicon, name="favicon"),
    # the admin's own password page too: a wrong old password counts as a failed sign-in
    # there as on the site's (Django's admin form would let an open session guess freely)
    path("admin/password_change/", SitePasswordChangeView.as_view(
        success_url="/admin/password_change/done/"), name="admin_password_change_throttled"),
    path("admin/", admin.site.urls),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    # the site's own templates: the admin app ships registration/password_change_*.html,
    # found first, which need the admin's context
    path("accounts/password_change/", SitePasswordChangeView.as_view(), name="password_change"),
    path("accounts/password_change/done/", auth_views.PasswordChangeDoneView.as_view(
        template_name="registration/site_password_changed.html"), name="password_change_done"),
    path("ml/", include("ml_backend.urls")),
    path("api/v1/", include("annotator.api.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    path("", include("annotator.urls")),
]
