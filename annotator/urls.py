from django.urls import path

from annotator import views

app_name = "annotator"

urlpatterns = [
    path("", views.project_list, name="project_list"),
    path("projects/<int:project_id>/", views.project_detail, name="project_detail"),
    path("projects/<int:project_id>/upload/", views.upload, name="upload"),
    path("scans/<int:scan_id>/", views.scan_detail, name="scan_detail"),
    path("scans/<int:scan_id>/preview.png", views.scan_preview, name="scan_preview"),
    path("imports/<int:job_id>/", views.import_job_detail, name="import_job_detail"),
]
