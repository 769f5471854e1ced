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
        from django.core.signals import request_finished
        from django.db.models.signals import post_save

        from medsite import gcfreeze

        request_finished.connect(gcfreeze.on_request_finished, dispatch_uid="medsite_gc_freeze")

        from annotator import (
            audit,  # noqa: F401  (signal receivers)
            auth,  # noqa: F401  (a password change revokes the API token)
            checks,  # noqa: F401  (start-up checks)
            label_studio,
        )
        from annotator.models import LabelClass

        post_save.connect(label_studio.follow_class_changes, sender=LabelClass,
                          dispatch_uid="label_studio_follow_class_changes")
        from ml_backend.signals import classifier_published, round_created

        classifier_published.connect(label_studio.follow_new_classifier,
                                     dispatch_uid="label_studio_follow_new_classifier")
        round_created.connect(label_studio.follow_new_round,
                              dispatch_uid="label_studio_follow_new_round")
