from django.urls import path

from annotator.api import views

app_name = "api"

urlpatterns = [
    path("projects/", views.ProjectList.as_view(), name="projects"),
    path("projects/<int:project_id>/", views.ProjectDetail.as_view(), name="project"),
    path("projects/<int:project_id>/datasets/", views.DatasetList.as_view(), name="datasets"),
    path("projects/<int:project_id>/classes/", views.ClassList.as_view(), name="classes"),
    path("projects/<int:project_id>/scans/", views.ScanList.as_view(), name="scans"),
    path("projects/<int:project_id>/worklist/", views.Worklist.as_view(), name="worklist"),
    path("projects/<int:project_id>/annotations/", views.AnnotationList.as_view(),
         name="annotations"),
    path("projects/<int:project_id>/models/", views.ModelList.as_view(), name="models"),
    path("projects/<int:project_id>/predictions/", views.PredictionList.as_view(),
         name="predictions"),
    path("projects/<int:project_id>/runs/", views.RunList.as_view(), name="runs"),
    path("projects/<int:project_id>/refit/", views.RefitStart.as_view(), name="refit"),
    path("scans/<int:scan_id>/", views.ScanDetail.as_view(), name="scan"),
]
