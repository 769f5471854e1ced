from django.urls import path

from annotator import (
    views,
    views_account,
    views_clusters,
    views_label,
    views_reports,
    views_review,
    views_status,
)
from annotator.label_studio import views as views_ls

app_name = "annotator"

urlpatterns = [
    path("", views.project_list, name="project_list"),
    path("account/", views_account.account, name="account"),
    path("projects/<int:project_id>/", views.project_detail, name="project_detail"),
    path("projects/<int:project_id>/upload/", views.upload, name="upload"),
    path("projects/<int:project_id>/jobs.json", views.project_jobs, name="project_jobs"),
    path("scans/<int:scan_id>/", views.scan_detail, name="scan_detail"),
    path("scans/<int:scan_id>/preview.png", views.scan_preview, name="scan_preview"),
    path("imports/<int:job_id>/", views.import_job_detail, name="import_job_detail"),
    # The labeling loop: worklist → next scan (leased) → label page → answer → next.
    path("projects/<int:project_id>/worklist/", views_label.worklist, name="worklist"),
    path("projects/<int:project_id>/next/", views_label.next_scan, name="next_scan"),
    path("projects/<int:project_id>/query/", views_label.query_new, name="query_new"),
    path("projects/<int:project_id>/label/<int:scan_id>/", views_label.label_page, name="label"),
    path("projects/<int:project_id>/label/<int:scan_id>/answer/", views_label.answer,
         name="answer"),
    path("projects/<int:project_id>/answers/<int:annotation_id>/undo/", views_label.answer_undo,
         name="answer_undo"),
    path("scans/<int:scan_id>/gradcam.png", views_label.gradcam, name="gradcam"),
    path("scans/<int:scan_id>/window.png", views_label.scan_window, name="scan_window"),
    # Polled by the label page while a refit runs in the background.
    path("projects/<int:project_id>/model-status/", views_status.model_status,
         name="model_status"),
    path("projects/<int:project_id>/models/<int:version_id>/promote/", views.model_promote,
         name="model_promote"),
    # New anomaly types and their candidates.
    path("projects/<int:project_id>/classes/new/", views_label.class_create, name="class_create"),
    path("projects/<int:project_id>/classes/<int:class_id>/", views_label.class_detail,
         name="class_detail"),
    path("projects/<int:project_id>/classes/<int:class_id>/confirm/", views_label.class_confirm,
         name="class_confirm"),
    # Classify an uploaded scan.
    path("projects/<int:project_id>/classify/", views_label.classify, name="classify"),
    path("projects/<int:project_id>/classify/add/", views_label.classify_add, name="classify_add"),
    # Label Studio: signed image URLs and the webhook (no login; token / shared secret).
    path("ls/image/<str:token>.png", views_ls.ls_image, name="ls_image"),
    path("labelstudio/<int:project_id>/webhook/", views_ls.ls_webhook, name="ls_webhook"),
    # --- the label-free view (annotator/views_clusters.py) ---
    path("projects/<int:project_id>/clusters/", views_clusters.clusters, name="clusters"),
    path("projects/<int:project_id>/clusters/map.png", views_clusters.clusters_map,
         name="clusters_map"),
    # --- reports (annotator/views_reports.py) ---
    path("projects/<int:project_id>/reports/", views_reports.reports, name="reports"),
    path("projects/<int:project_id>/export/labels/", views_reports.export_labels,
         name="export_labels"),
    path("projects/<int:project_id>/reports/<str:name>.png", views_reports.chart,
         name="report_chart"),
    # --- review (annotator/views_review.py) ---
    path("projects/<int:project_id>/review/", views_review.review, name="review"),
    path("projects/<int:project_id>/readers/", views_review.readers, name="readers"),
    path("projects/<int:project_id>/review/<int:scan_id>/adjudicate/", views_review.adjudicate,
         name="adjudicate"),
    path("projects/<int:project_id>/review/quality-check/", views_review.run_quality_check,
         name="review_quality_check"),
]
