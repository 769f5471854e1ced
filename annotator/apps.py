import logging

from django.apps import AppConfig


class AnnotatorConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "annotator"
    verbose_name = "Annotation"

    def ready(self) -> None:
        # pydicom resets its logger to WARNING on import and its warnings can quote
        # element values (names, dates): keep only errors, which carry no values.
        import pydicom  # noqa: F401

        logging.getLogger("pydicom").setLevel(logging.ERROR)
        from annotator import audit  # noqa: F401  (signal receivers)
