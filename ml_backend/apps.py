from django.apps import AppConfig


class MlBackendConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "ml_backend"
    verbose_name = "ML backend"
