from django.urls import path

from ml_backend import views

app_name = "ml_backend"

# Label Studio appends the endpoint names to the URL it was given (ml/<project id>/).
urlpatterns = [
    path("<int:project_id>/", views.health, name="root"),
    path("<int:project_id>/health", views.health, name="health"),
    path("<int:project_id>/setup", views.setup, name="setup"),
    path("<int:project_id>/predict", views.predict, name="predict"),
    path("<int:project_id>/webhook", views.webhook, name="webhook"),
    path("<int:project_id>/versions", views.versions, name="versions"),
]
