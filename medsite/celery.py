"""Celery application. Workers: ``celery -A medsite worker -Q default``."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "medsite.settings")

app = Celery("medsite")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
