"""Django settings: all deployment configuration comes from the environment.

The demo runs with no environment at all (SQLite, tasks run in-process, media
and artifacts under ``var/``). Production must set ``DEBUG=0``, ``SECRET_KEY``
and ``DEID_SALT``; see README.md ("Production").
"""

from __future__ import annotations

import os
import zoneinfo
from datetime import timedelta
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from medsite.env import env_bool, env_float, env_int, env_list, env_path, env_str
from ml_backend.ssl.config import check_layers, check_scales  # dataclasses only: no torch here

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = BASE_DIR / "var"

DEBUG = env_bool("DEBUG", default=True)

SECRET_KEY = env_str("SECRET_KEY", required=not DEBUG) or "insecure-demo-key-only-for-debug"
# Salt for the pseudonymous patient key (HMAC-SHA256 of the DICOM PatientID).
# Changing it changes every key, so keep it stable for the life of a deployment.
DEID_SALT = env_str("DEID_SALT", required=not DEBUG) or "demo-salt-not-for-production"
if not DEBUG and len(DEID_SALT) < 16:
    raise ImproperlyConfigured("DEID_SALT must be at least 16 characters when DEBUG is off.")

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "testserver"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "axes",   # failed sign-ins per username and client IP (LOGIN_FAILURE_LIMIT below)
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "annotator",
    "ml_backend",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # a control character in the URL, a body over DATA_UPLOAD_MAX_MEMORY_SIZE: a clear 400 /
    # 413 (problem JSON on the API) before anything reads the request (medsite/middleware.py)
    "medsite.middleware.RequestGuardMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "annotator.audit.AuditActorMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # last: turns a sign-in refused for too many failures into the 429 page (annotator/auth.py)
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "medsite.urls"
WSGI_APPLICATION = "medsite.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


def _database_from_env() -> dict:
    url = env_str("DATABASE_URL", f"sqlite:///{VAR_DIR / 'db.sqlite3'}")
    try:
        config = dj_database_url.parse(url, conn_max_age=env_int("DB_CONN_MAX_AGE", 0, minimum=0))
    except ValueError as exc:
        raise ImproperlyConfigured(f"DATABASE_URL is not a valid database URL: {exc}") from None
    if config["ENGINE"] == "django.db.backends.sqlite3":
        Path(config["NAME"]).parent.mkdir(parents=True, exist_ok=True)
        # Several threads (runserver, eager tasks) write to the demo database.
        config.setdefault("OPTIONS", {})["timeout"] = 30
        # The refit thread and requests both write: a transaction that reads then writes
        # must take the write lock up front, or SQLite fails it at once ("database is
        # locked") instead of waiting out the timeout.
        config["OPTIONS"]["transaction_mode"] = "IMMEDIATE"
    elif config["ENGINE"] == "django.db.backends.postgresql":
        # a database that does not answer: a request fails in words after this many seconds
        # instead of psycopg's 130 s, and a connection whose peer vanished is noticed by TCP
        # keepalives in about a minute instead of never (tenth probe)
        options = config.setdefault("OPTIONS", {})
        options.setdefault("connect_timeout", env_int("DB_CONNECT_TIMEOUT", 10, minimum=1))
        options.setdefault("keepalives", 1)
        options.setdefault("keepalives_idle", 30)
        options.setdefault("keepalives_interval", 10)
        options.setdefault("keepalives_count", 3)
    return config


DATABASES = {"default": _database_from_env()}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
CSRF_FAILURE_VIEW = "medsite.csrf.csrf_failure"   # JSON in words to pages that ask for JSON
TIME_ZONE = env_str("TIME_ZONE", "UTC").strip() or "UTC"
try:   # an IANA name ("Europe/London"), checked here so a typo is one line, not a traceback
    if TIME_ZONE.startswith(("/", ".")) or ".." in TIME_ZONE:
        raise ValueError(TIME_ZONE)
    zoneinfo.ZoneInfo(TIME_ZONE)
except (ValueError, zoneinfo.ZoneInfoNotFoundError):
    raise ImproperlyConfigured(
        f"TIME_ZONE={TIME_ZONE!r} is not a time zone name: use an IANA name such as "
        "'UTC', 'Europe/London' or 'America/New_York' (times on pages are shown in it)"
    ) from None
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = env_path("STATIC_ROOT", VAR_DIR / "static")

# Media (stored scans and previews) is never served from a public path: the
# views in annotator/ check project membership before sending a file.
MEDIA_ROOT = env_path("MEDIA_ROOT", VAR_DIR / "media")
MEDIA_URL = "/media-not-public/"
# Model checkpoints, embeddings and FAISS indexes: ARTIFACTS_ROOT/models/<version>/.
ARTIFACTS_ROOT = env_path("ARTIFACTS_ROOT", VAR_DIR / "artifacts")
# Raw uploads wait here (they may still hold PHI) until the import job has
# de-identified them; the job deletes them whatever its outcome.
INCOMING_ROOT = env_path("INCOMING_ROOT", VAR_DIR / "incoming")

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "annotator:project_list"
LOGOUT_REDIRECT_URL = "login"
# Failed sign-ins (the login page, the admin's; django-axes): after LOGIN_FAILURE_LIMIT failures
# for one username, each within LOGIN_LOCKOUT_MINUTES of the last, that username is refused
# (429, "try again in N minutes") until LOGIN_LOCKOUT_MINUTES after its last counted failure;
# tries while refused do not extend it. An admin clears one with
# `manage.py axes_reset_username NAME` or in the admin (Access attempts). Each attempt records
# the client's address; behind a reverse proxy every request comes from the proxy, so it is
# read from X-Forwarded-For: LOGIN_PROXY_COUNT is the number of proxies in front of gunicorn
# that append to it (production, DEBUG=0, is behind one TLS proxy: 1; 0: the socket's address).
AUTHENTICATION_BACKENDS = ["axes.backends.AxesStandaloneBackend",
                           "django.contrib.auth.backends.ModelBackend"]
AXES_HANDLER = "axes.handlers.database.AxesDatabaseHandler"   # shared by every web process
AXES_FAILURE_LIMIT = env_int("LOGIN_FAILURE_LIMIT", 5, minimum=1)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("LOGIN_LOCKOUT_MINUTES", 15, minimum=1))
# Per username only: an address shared by a whole hospital (NAT) or a proxy that does not
# forward the client's address would otherwise lock everyone out after anyone's five typos.
# The address is recorded with each attempt (admin → Access attempts).
AXES_LOCKOUT_PARAMETERS = ["username"]
# axes.W006 asks for the address among the parameters, since rotating user agents or cookies
# would dodge a lock on those; a lock on the username holds from any agent, cookie or address.
SILENCED_SYSTEM_CHECKS = ["axes.W006"]
AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT = False
AXES_LOCKOUT_CALLABLE = "annotator.auth.lockout_response"
AXES_CLIENT_IP_CALLABLE = "annotator.auth.client_ip"
AXES_VERBOSE = False   # no "AXES: BEGIN" line at every start; failures are still logged
# what an attempt records of the form it came from: never a password, whichever form posted it
AXES_SENSITIVE_PARAMETERS = ["username", "ip_address", "old_password", "new_password1",
                             "new_password2", "password1", "password2"]
LOGIN_PROXY_COUNT = env_int("LOGIN_PROXY_COUNT", 0 if DEBUG else 1, minimum=0)

# Import limits. A decoded scan larger than IMPORT_MAX_PIXELS (width x height x
# frames) is refused before its pixels are decoded (decompression bombs).
IMPORT_MAX_PIXELS = env_int("IMPORT_MAX_PIXELS", 64_000_000, minimum=1)
# A DICOM series read as one scan (DICOM grouping "series") may hold up to this many pixels
# in all its slices: 600 slices of 512 x 512 (a thin-slice chest CT). Its slices are checked
# one by one against IMPORT_MAX_PIXELS; stacking one costs about 3 x 2 bytes a pixel of
# memory at its peak (docs/benchmarks.md, "PACS pull and push"). A larger series is imported
# slice by slice, with the reason in the import report.
IMPORT_MAX_SERIES_PIXELS = env_int("IMPORT_MAX_SERIES_PIXELS", 600 * 512 * 512, minimum=1)
# How long a scan served to one reader is held back from the others (seconds).
LABEL_LEASE_SECONDS = env_int("LABEL_LEASE_SECONDS", 300, minimum=10)
# How many scans one reader may hold at once in a project (the scan on screen, a second tab):
# taking another releases their oldest, so a script or link prefetch cannot lock others out.
LABEL_LEASES_PER_READER = env_int("LABEL_LEASES_PER_READER", 2, minimum=1)
# A refit still queued after this long was never picked up (its server stopped): abandoned.
REFIT_QUEUED_STALE = timedelta(minutes=env_int("REFIT_QUEUED_STALE_MINUTES", 15, minimum=1))
# An import of more files than this is split into chunks of this many that Celery workers
# import in parallel (only with a broker; 0: never split).
IMPORT_CHUNK_SIZE = env_int("IMPORT_CHUNK_SIZE", 1000, minimum=0)
IMPORT_QUEUE = env_str("IMPORT_QUEUE") or "default"
# Embedding a whole project and scoring the pool with a fine-tuned network go in chunks of
# this many scans that every worker of SPREAD_QUEUE helps with (ml_backend/services/spread.py):
# up to SPREAD_HELPERS helper tasks are queued per job (0, the default: no split — on one
# machine a second process only competes for its cores; set it when workers on other
# machines can help); a chunk claimed longer than SPREAD_LEASE_S seconds without a result
# is taken over.
SPREAD_CHUNK_SIZE = env_int("SPREAD_CHUNK_SIZE", 2000, minimum=0)
SPREAD_HELPERS = env_int("SPREAD_HELPERS", 0, minimum=0)
SPREAD_LEASE_S = env_int("SPREAD_LEASE_S", 900, minimum=10)
SPREAD_QUEUE = env_str("SPREAD_QUEUE") or "train"
UPLOAD_MAX_FILE_BYTES = env_int("UPLOAD_MAX_FILE_BYTES", 200 * 1024 * 1024, minimum=1)
UPLOAD_MAX_FILES = env_int("UPLOAD_MAX_FILES", 500, minimum=1)
PREVIEW_MAX_SIDE = env_int("PREVIEW_MAX_SIDE", 1024, minimum=32)
# A single image decoded inside a web request (the classify page): a smaller budget than imports.
CLASSIFY_MAX_PIXELS = env_int("CLASSIFY_MAX_PIXELS", 16_000_000, minimum=1)
# The classify page keeps each upload for "add it to the pool" (one per user and project, 6 h);
# all kept together stay under this many bytes, the oldest dropped first.
CLASSIFY_STAGING_MAX_BYTES = env_int("CLASSIFY_STAGING_MAX_BYTES", 1024 * 1024 * 1024,
                                     minimum=1)
DATA_UPLOAD_MAX_NUMBER_FILES = UPLOAD_MAX_FILES
FILE_UPLOAD_TEMP_DIR = None  # Django's default temp dir; files are moved to INCOMING_ROOT.

# Celery: with no broker configured every task runs eagerly in-process (demo,
# laptop). With a broker, tasks go to workers by queue (deploy/run.sh starts one of each):
# `default` imports and Label Studio sync; `refit` the seconds-long ML runs a reader waits
# for (refits with their predictions and next round, embeddings of new scans); `train` the
# long ones (pretraining, fine-tuning, distillation: minutes to hours, a GPU host). A refit
# never waits behind a pretraining.
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL")
CELERY_TASK_ALWAYS_EAGER = CELERY_BROKER_URL is None
if CELERY_TASK_ALWAYS_EAGER:
    # Celery's eager path still acquires a producer; kombu's in-memory transport keeps it
    # from building an AMQP connection (and kombu from warning "No hostname was supplied")
    CELERY_BROKER_URL = "memory://localhost/"
CELERY_TASK_EAGER_PROPAGATES = True
# With no broker, training runs (refits after answers, retrains) go to one background worker
# thread of the server (ml_backend/dispatch.py), so an answer never waits for a refit; off,
# they run inline in the request that queued them (the test suite turns it off).
ML_TASKS_IN_THREAD = env_bool("ML_TASKS_IN_THREAD", CELERY_TASK_ALWAYS_EAGER)
# ...in one background worker PROCESS (spawned once, keeps its models loaded) rather than a
# thread: no shared interpreter lock with the threads serving readers, which is what keeps
# the label page fast while refits run (docs/benchmarks.md "Refits in the background").
ML_TASKS_IN_PROCESS = env_bool("ML_TASKS_IN_PROCESS", True)
CELERY_RESULT_BACKEND = env_str("CELERY_RESULT_BACKEND")
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_TASK_SOFT_TIME_LIMIT = env_int("CELERY_TASK_SOFT_TIME_LIMIT", 30 * 60, minimum=1)
CELERY_TASK_TIME_LIMIT = env_int("CELERY_TASK_TIME_LIMIT", 35 * 60, minimum=1)
# Training runs get far longer limits than imports and predictions.
TRAIN_TASK_SOFT_TIME_LIMIT = env_int("TRAIN_TASK_SOFT_TIME_LIMIT", 6 * 3600, minimum=1)
TRAIN_TASK_TIME_LIMIT = env_int("TRAIN_TASK_TIME_LIMIT", 6 * 3600 + 600, minimum=1)
# Scheduled retrain (Celery beat): every RETRAIN_EVERY_HOURS hours, projects with at least
# RETRAIN_IF_NEW_LABELS new labels are retrained. 0 turns it off (the demo default).
RETRAIN_EVERY_HOURS = env_int("RETRAIN_EVERY_HOURS", 0, minimum=0)
RETRAIN_IF_NEW_LABELS = env_int("RETRAIN_IF_NEW_LABELS", 20, minimum=1)
# A PACS over DICOMweb (`manage.py pacs_pull`; README "Connect your PACS"): the default
# server URL and HTTP Basic credentials (from the environment only, never the command line).
PACS_DICOMWEB_URL = env_str("PACS_DICOMWEB_URL")
PACS_USERNAME = env_str("PACS_USERNAME")
PACS_PASSWORD = env_str("PACS_PASSWORD") or ""
# What one PACS answer may cost (annotator/pacs.py): a study search at most
# PACS_MAX_ANSWER_BYTES (after decompression) within PACS_SEARCH_SECONDS; a study's retrieval
# at most PACS_MAX_STUDY_BYTES within PACS_STUDY_SECONDS, each instance of it at most
# UPLOAD_MAX_FILE_BYTES; a pull finds at most PACS_MAX_STUDIES studies (narrow the query for
# more). A PACS that sends more, or longer, is cut off and the study fails in words.
PACS_MAX_ANSWER_BYTES = env_int("PACS_MAX_ANSWER_BYTES", 32 * 1024 * 1024, minimum=1024)
PACS_SEARCH_SECONDS = env_int("PACS_SEARCH_SECONDS", 120, minimum=1)
PACS_MAX_STUDY_BYTES = env_int("PACS_MAX_STUDY_BYTES", 4 * 1024 ** 3, minimum=1024)
PACS_STUDY_SECONDS = env_int("PACS_STUDY_SECONDS", 1800, minimum=1)
PACS_MAX_STUDIES = env_int("PACS_MAX_STUDIES", 100_000, minimum=1)
# The honest-broker linkage (annotator/linkage.py): with a key, a DICOM's original patient
# and study identifiers are kept, encrypted, so results can go back to the PACS as structured
# reports (`manage.py pacs_push`). Without it nothing is kept and nothing can be sent back.
# A Fernet key (`python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key()
# .decode())"`) or any long random secret; keep it out of backups and stable.
LINKAGE_KEY = env_str("LINKAGE_KEY")
# Scheduled pull (Celery beat): every PACS_PULL_MINUTES, the studies matching PACS_PULL_QUERY
# (e.g. "Modality=CR") that are not here yet go into the project PACS_PULL_PROJECT. Unset:
# every study; set but blank (an unset shell variable) is refused, not read as "every study";
# its keys are checked against DICOM's at start-up (annotator/checks.py) and by each pull.
PACS_PULL_MINUTES = env_int("PACS_PULL_MINUTES", 0, minimum=0)
PACS_PULL_PROJECT = env_str("PACS_PULL_PROJECT")
PACS_PULL_QUERY = os.environ.get("PACS_PULL_QUERY")         # None: every study
if PACS_PULL_MINUTES and PACS_PULL_QUERY is not None and not PACS_PULL_QUERY.strip():
    raise ImproperlyConfigured("PACS_PULL_QUERY is set but empty: unset it to pull every "
                               "study, or give study filters such as Modality=CR")
# Label Studio as a second labeling UI (README, "Label Studio"). SITE_URL is how Label
# Studio (and its annotators' browsers) reach this site: image URLs, ML backend, webhook.
LABEL_STUDIO_URL = env_str("LABEL_STUDIO_URL")
LABEL_STUDIO_API_KEY = env_str("LABEL_STUDIO_API_KEY")
LABEL_STUDIO_WEBHOOK_SECRET = env_str("LABEL_STUDIO_WEBHOOK_SECRET") or (
    "demo-webhook-secret" if DEBUG else None)
LABEL_STUDIO_IMAGE_URL_MAX_AGE = env_int("LABEL_STUDIO_IMAGE_URL_MAX_AGE", 7 * 24 * 3600,
                                         minimum=60)
LABEL_STUDIO_RECONCILE_MINUTES = env_int("LABEL_STUDIO_RECONCILE_MINUTES", 0, minimum=0)
SITE_URL = (env_str("SITE_URL") or "http://127.0.0.1:8000").rstrip("/")
# Optional HTTP Basic auth on the ML backend endpoints (/ml/...), as "user:password".
ML_BACKEND_BASIC_AUTH = env_str("ML_BACKEND_BASIC_AUTH")

# The REST API (annotator/api/, README "API"): per-user tokens or the browser session,
# pages of API_PAGE_SIZE, throttled per user, errors as problem JSON.
# Django's cache holds the API's throttle counts (API_THROTTLE_*), nothing the site cannot
# lose. Every web process must count in one place, or a user gets API_THROTTLE_USER once
# per process: CACHE_URL=redis://host:6379/N in production (deploy/run.sh uses the broker's
# Redis when it is one; `check --deploy` warns without it). Unset or locmem://, each process
# counts on its own (the one-process demo, the tests).
CACHE_URL = env_str("CACHE_URL")
if CACHE_URL and CACHE_URL.startswith(("redis://", "rediss://", "unix://")):
    # half a second to connect or answer: a Redis that is down or stalled lets the API's
    # calls through (annotator/api/throttles.py) instead of holding them
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                          "LOCATION": CACHE_URL, "KEY_PREFIX": "medlabel",
                          "OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 0.5}}}
elif CACHE_URL in (None, "", "locmem://"):
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
else:
    raise ImproperlyConfigured(f"CACHE_URL={CACHE_URL!r}: use redis://host:port/db (every web "
                               "process counts API calls there) or locmem:// (each on its own)")
API_PAGE_SIZE = env_int("API_PAGE_SIZE", 50, minimum=1)
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": API_PAGE_SIZE,
    "DEFAULT_THROTTLE_CLASSES": ["annotator.api.throttles.SiteUserRateThrottle",
                                 "annotator.api.throttles.SiteAnonRateThrottle"],
    "DEFAULT_THROTTLE_RATES": {"user": env_str("API_THROTTLE_USER") or "5000/hour",
                               "anon": env_str("API_THROTTLE_ANON") or "60/hour"},
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "annotator.api.errors.problem_handler",
    # JSON bodies through the site's one JSON parser (medsite/jsonbody.py): its size, nesting
    # and number limits, a clear 400 / 413 instead of a RecursionError
    "DEFAULT_PARSER_CLASSES": ["annotator.api.parsers.JSONBodyParser",
                               "rest_framework.parsers.FormParser",
                               "rest_framework.parsers.MultiPartParser"],
    # ?format= is ours (labels: csv / jsonl, models: onnx / torchscript), not DRF's renderer
    # switch; the Accept header still picks one
    "URL_FORMAT_OVERRIDE": None,
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer",
                                 "rest_framework.renderers.BrowsableAPIRenderer"],
}
SPECTACULAR_SETTINGS = {
    "TITLE": "MedLabel API",
    "DESCRIPTION": "Active-learning annotation of medical scans: projects, scans, classes and "
                   "findings, answers, the worklist, model versions, predictions and training "
                   "runs. Authenticate with `Authorization: Token <your token>`.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",          # served from this site, no CDN
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {"ImportStatusEnum": "annotator.models.ImportJob.Status",
                            "ScanSplitEnum": "annotator.models.Split",
                            "UploadSplitEnum": ["pool", "eval", "auto:0.2"]},
    "POSTPROCESSING_HOOKS": ["drf_spectacular.hooks.postprocess_schema_enums",
                             "annotator.api.schema.add_problem_responses"],
}

# Always: what waits in INCOMING_ROOT past its time goes (annotator/uploads.py incoming_sweep).
CELERY_BEAT_SCHEDULE = {"incoming-sweep": {"task": "annotator.tasks.incoming_sweep",
                                           "schedule": 15 * 60.0}}
if RETRAIN_EVERY_HOURS:
    CELERY_BEAT_SCHEDULE["scheduled-retrain"] = {
        "task": "ml_backend.tasks.scheduled_retrain", "schedule": RETRAIN_EVERY_HOURS * 3600.0,
        "kwargs": {"if_new_labels": RETRAIN_IF_NEW_LABELS}}
if LABEL_STUDIO_RECONCILE_MINUTES:
    CELERY_BEAT_SCHEDULE["label-studio-reconcile"] = {
        "task": "annotator.tasks.label_studio_reconcile_all",
        "schedule": LABEL_STUDIO_RECONCILE_MINUTES * 60.0}
if PACS_PULL_MINUTES and PACS_PULL_PROJECT and PACS_DICOMWEB_URL:
    CELERY_BEAT_SCHEDULE["pacs-pull"] = {
        "task": "annotator.tasks.pacs_pull_scheduled", "schedule": PACS_PULL_MINUTES * 60.0}
CELERY_TASK_ROUTES = {
    "annotator.tasks.*": {"queue": "default"},
    "ml_backend.tasks.*": {"queue": "train"},
}
# Which queue a training run goes to, by its kind (ml_backend/dispatch.py).
ML_RUN_QUEUES = {"refit": "refit", "embed": "refit", "pretrain": "train", "retrain": "train",
                 "distill": "train"}
# After a request that imported this many modules (torch, scikit-learn: the ML code the web
# process loads lazily), collect once and freeze what is left, so that later full garbage
# collections skip those long-lived objects (medsite/gcfreeze.py). 0: off.
GC_FREEZE_NEW_MODULES = env_int("MEDLABEL_GC_FREEZE_MODULES", 50, minimum=0)
# Loaded models, heads, embeddings and indexes kept per process (ml_backend/services/inference.py).
ML_CACHE_SIZE = env_int("ML_CACHE_SIZE", 12, minimum=1)
# Unit vectors of the labeled scans the label page's "similar scans" scores on every answer,
# kept per encoder in each web process (ml_backend/index/unit_rows.py): at most this many MB
# (64 MB: about 10,000 labeled scans at 1,536 numbers each); beyond it they are read each time.
ML_SIMILAR_CACHE_MB = env_int("MEDLABEL_SIMILAR_CACHE_MB", 64, minimum=0)
# DataLoader worker processes for training and embedding (0: in the training process).
ML_DATALOADER_WORKERS = env_int("MEDLABEL_DATALOADER_WORKERS", 0, minimum=0)
# How much of the class-balanced logit offsets (fit on out-of-fold logits) a refit head applies:
# 0 = the classes' own counts decide, 1 = the full balanced-error correction; the default is
# the same as ml_backend.active.refit.PRODUCT_BALANCE (docs/benchmarks.md, "Balancing the head").
REFIT_BALANCE = env_float("MEDLABEL_REFIT_BALANCE", 0.5, minimum=0.0, maximum=1.0)
# The refit head's pixel block: a 16 x 16 thumbnail of each scan beside its embedding, with
# this weight against it (ml_backend/active/features.py; docs/benchmarks.md "A head on the
# embedding and the pixels"). 0: the embedding alone, as before.
REFIT_PIXEL_WEIGHT = env_float("MEDLABEL_REFIT_PIXEL_WEIGHT", 1.0, minimum=0.0, maximum=10.0)
# auto: each label set's head keeps the thumbnail only where it predicts the set's own labels
# better out of fold; always: every head reads it (docs/benchmarks.md, "A head on the
# embedding and the pixels", compares them).
REFIT_PIXELS = env_str("MEDLABEL_REFIT_PIXELS", "auto")
if REFIT_PIXELS not in ("auto", "always"):
    raise ImproperlyConfigured(f"MEDLABEL_REFIT_PIXELS={REFIT_PIXELS!r}: use auto or always "
                               "(MEDLABEL_REFIT_PIXEL_WEIGHT=0 turns the thumbnail off)")
# The cluster view (annotator "Clusters", services.embeddings.scan_clusters) clusters the
# embedding and the same thumbnail side by side, standardised, the thumbnail at this weight
# (ml_backend/active/features.py cluster_inputs; docs/benchmarks.md "Label-free: the embedding
# and the pixels together"). 0: the embedding alone, as before.
CLUSTER_PIXEL_WEIGHT = env_float("MEDLABEL_CLUSTER_PIXEL_WEIGHT", 1.0, minimum=0.0,
                                 maximum=10.0)
# The worklist's typical picks cluster that same joined input for a label set's first batch
# only (no label in the set yet), then the embedding alone: the first batch gains on brain MRI
# and blood smears, later typical batches on the joined input cost brain MRI 1.4 points of
# macro-F1 over the curve (docs/benchmarks.md, "The first batch only"). 0: every typical
# batch on the joined input.
QUERY_TYPICAL_PIXELS_FIRST_ONLY = env_bool("MEDLABEL_QUERY_TYPICAL_PIXELS_FIRST_ONLY", True)
# The sizes a new encoder version embeds each scan at, as multiples of the size it was trained
# at, its pooled features side by side (ml_backend/ssl/encoder.py MultiScaleEncoder): "1,2"
# reads the 64 px starter at 64 and 128 px (docs/benchmarks.md, "One encoder read at two
# sizes"); "1": the training size alone, as before. Recorded on each encoder version when it
# is made (its config's embed_scales), so a change applies to encoders made after it.
_scales = env_str("MEDLABEL_EMBED_SCALES", "1,2")
try:
    EMBED_SCALES = list(check_scales([v for v in _scales.split(",") if v.strip()]))
except ValueError as exc:
    raise ImproperlyConfigured(f"MEDLABEL_EMBED_SCALES={_scales!r}: whole numbers between 1 "
                               f"and 8, each dividing the largest, e.g. 1,2 or 1,2,4 ({exc})"
                               ) from None
# The encoder's residual stages a new encoder version pools into each scan's embedding, at
# every one of its EMBED_SCALES (ml_backend/ssl/encoder.py MultiScaleEncoder): "3,4" adds the
# third stage's pooled output beside the encoder's own (docs/benchmarks.md, "The encoder's
# third stage beside its output"); "4": the output alone, as before. Recorded on each encoder
# version when it is made (its config's embed_layers), like the scales.
_layers = env_str("MEDLABEL_EMBED_LAYERS", "3,4")
try:
    EMBED_LAYERS = list(check_layers([v for v in _layers.split(",") if v.strip()]))
except ValueError as exc:
    raise ImproperlyConfigured(f"MEDLABEL_EMBED_LAYERS={_layers!r}: the encoder's stages "
                               f"1 to 4, 4 among them, e.g. 4 or 3,4 ({exc})") from None
# The hybrid worklist picks typical scans (TypiClust) while a label set has fewer labeled scans
# than this per class, and the most uncertain after; 0: uncertainty as soon as a head exists.
# The default is ml_backend.active.strategies.PRODUCT_TYPICAL_BELOW (docs/benchmarks.md).
QUERY_TYPICAL_BELOW = env_int("MEDLABEL_QUERY_TYPICAL_BELOW", 10, minimum=0)
# The shipped starter encoder new projects pretrain from (ml_backend/starter/, rebuilt by
# `make starter-encoder`); empty: every project pretrains from scratch.
STARTER_ENCODER = os.environ.get(
    "MEDLABEL_STARTER_ENCODER", str(BASE_DIR / "ml_backend" / "starter" / "simclr-resnet18-64px.pt"))
# ...and colour projects' (`make starter-encoder-colour`); empty or missing: colour projects
# start from the greyscale one, its first convolution spread over R, G and B.
STARTER_ENCODER_COLOUR = os.environ.get(
    "MEDLABEL_STARTER_ENCODER_COLOUR",
    str(BASE_DIR / "ml_backend" / "starter" / "simclr-resnet18-rgb-64px.pt"))

LOG_LEVEL = env_str("LOG_LEVEL", "INFO")
LOG_FILE = env_str("LOG_FILE")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain"},
        **(
            {"file": {"class": "logging.FileHandler", "filename": LOG_FILE, "formatter": "plain"}}
            if LOG_FILE
            else {}
        ),
    },
    "root": {"handlers": ["console", *(["file"] if LOG_FILE else [])], "level": LOG_LEVEL},
    # pydicom logs element values on some parse warnings: keep it quiet.
    # pydicom logs element values on some parse warnings, Pillow every TIFF / EXIF tag value
    # at DEBUG: keep both quiet whatever LOG_LEVEL says (the values may be PHI).
    # faiss's loader says at INFO that the AVX512 build is absent before it loads AVX2 (or the
    # generic build): expected on most CPUs, and not a failure
    "loggers": {"faiss.loader": {"level": "WARNING", "propagate": True},
                "pydicom": {"level": "ERROR", "propagate": True},
                # the DICOM networking libraries name the original UIDs (identifiers,
                # deid.PHI_KEYWORDS) at INFO: highdicom "copy Patient-related attributes
                # from dataset <SOPInstanceUID>" for every report pushed, dicomweb-client
                # each study it retrieves; our own lines say what happened without them
                "highdicom": {"level": "ERROR", "propagate": True},
                "dicomweb_client": {"level": "ERROR", "propagate": True},
                "PIL": {"level": "INFO", "propagate": True},
                # django-axes: each failed sign-in and lockout at WARNING, not its INFO chatter
                "axes": {"level": "WARNING", "propagate": True}},
}

if not DEBUG:
    SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", True)
    CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", True)
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31_536_000, minimum=0)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", True)
    SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", True)
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
