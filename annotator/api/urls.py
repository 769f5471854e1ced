from django.http import JsonResponse
from django.urls import Resolver404, path, re_path, register_converter, resolve
from django.views.decorators.csrf import csrf_exempt

from annotator.api import views


class SignedInt:
    """Ids as the schema types them (any integer): a negative one reaches the view and gets
    the API's 404, not the site's HTML page."""

    regex = "-?[0-9]{1,18}"

    def to_python(self, value: str) -> int:
        return int(value)

    def to_url(self, value: int) -> str:
        return str(value)


register_converter(SignedInt, "id")


@csrf_exempt    # it writes nothing: a POST / PUT with a token gets this 404, not a CSRF 403
def not_found(request, rest: str = ""):
    detail = "no such API path: see /api/schema/ or /api/docs/"
    path_info = request.path_info
    if not path_info.endswith("/"):
        try:
            match = resolve(path_info + "/")
        except Resolver404:
            match = None
        if match is not None and match.func is not not_found:
            detail = (f"no such API path: add the trailing slash ({request.path}/); see "
                      "/api/schema/ or /api/docs/")
    response = JsonResponse({"type": "about:blank", "title": "Not found", "status": 404,
                             "detail": detail}, status=404)
    response["Content-Type"] = "application/problem+json"
    return response


app_name = "api"

urlpatterns = [
    path("projects/", views.ProjectList.as_view(), name="projects"),
    path("projects/<id:project_id>/", views.ProjectDetail.as_view(), name="project"),
    path("projects/<id:project_id>/datasets/", views.DatasetList.as_view(), name="datasets"),
    path("projects/<id:project_id>/classes/", views.ClassList.as_view(), name="classes"),
    path("projects/<id:project_id>/scans/", views.ScanList.as_view(), name="scans"),
    path("projects/<id:project_id>/worklist/", views.Worklist.as_view(), name="worklist"),
    path("projects/<id:project_id>/annotations/", views.AnnotationList.as_view(),
         name="annotations"),
    path("projects/<id:project_id>/models/", views.ModelList.as_view(), name="models"),
    path("projects/<id:project_id>/models/<str:version>/export/", views.ModelExport.as_view(),
         name="model-export"),
    path("projects/<id:project_id>/labels/", views.LabelExport.as_view(), name="labels"),
    path("projects/<id:project_id>/imports/", views.ImportList.as_view(), name="imports"),
    path("imports/<id:job_id>/", views.ImportDetail.as_view(), name="import"),
    path("projects/<id:project_id>/predictions/", views.PredictionList.as_view(),
         name="predictions"),
    path("projects/<id:project_id>/runs/", views.RunList.as_view(), name="runs"),
    path("projects/<id:project_id>/refit/", views.RefitStart.as_view(), name="refit"),
    path("projects/<id:project_id>/retrain/", views.RetrainStart.as_view(), name="retrain"),
    path("projects/<id:project_id>/query/", views.QueryStart.as_view(), name="query"),
    path("scans/<id:scan_id>/", views.ScanDetail.as_view(), name="scan"),
    re_path(r"^(?P<rest>.*)$", not_found),      # any other path under /api/v1/: problem JSON
]
