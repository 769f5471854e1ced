from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.http import HttpResponse
from django.urls import include, path
from django.views.decorators.cache import cache_control
from django.views.decorators.http import require_GET
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from annotator.auth import SitePasswordChangeView

# The site's icon (a scan frame), for the pages that do not link one (Django admin): a
# browser asks for /favicon.ico on every site, and a 404 there is noise in its console.
ICON = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
        '<rect x="1" y="1" width="14" height="14" rx="2" fill="#123"/>'
        '<circle cx="8" cy="8" r="4" fill="none" stroke="#9cf" stroke-width="2"/></svg>')


@require_GET
@cache_control(public=True, max_age=86400)
def favicon(request):
    return HttpResponse(ICON, content_type="image/svg+xml")


urlpatterns = [
    path("favicon.ico", favicon, name="favicon"),
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
