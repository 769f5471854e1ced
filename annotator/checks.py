"""Start-up checks (``manage.py check``, every ``runserver`` and worker start): settings that
would lose data quietly are refused or flagged here, in words."""

from __future__ import annotations

from django.conf import settings
from django.core.checks import Error, Warning, register

from annotator import pacs


@register()
def label_studio_settings(app_configs, **kwargs):
    """A site linked to Label Studio needs the API key (to name each annotation's reader:
    without it the webhook's annotations arrive with no reader) and the webhook secret (to
    accept the webhook at all)."""
    if not settings.LABEL_STUDIO_URL:
        return []
    problems = []
    if not settings.LABEL_STUDIO_API_KEY:
        problems.append(Error(
            "LABEL_STUDIO_URL is set but LABEL_STUDIO_API_KEY is not",
            hint="Set LABEL_STUDIO_API_KEY (Label Studio → Account & Settings → access token) "
                 "on every web server and worker: without it annotations from Label Studio "
                 "arrive without their reader, and agreement and audit lose who answered.",
            id="medlabel.E001"))
    if not settings.LABEL_STUDIO_WEBHOOK_SECRET:
        problems.append(Error(
            "LABEL_STUDIO_URL is set but LABEL_STUDIO_WEBHOOK_SECRET is not",
            hint="Set the same LABEL_STUDIO_WEBHOOK_SECRET on the server that ran "
                 "`labelstudio_sync` and on every web server: the webhook proves itself with it, "
                 "and without it every Label Studio annotation is refused.",
            id="medlabel.E002"))
    if settings.LABEL_STUDIO_URL and not settings.SITE_URL:
        problems.append(Warning("SITE_URL is empty", hint="Label Studio reaches images, the ML "
                                "backend and the webhook at SITE_URL.", id="medlabel.W001"))
    return problems


@register()
def linkage_key(app_configs, **kwargs):
    """A linkage key protects patients' identifiers: a short one is refused."""
    key = getattr(settings, "LINKAGE_KEY", None)
    if key and len(key) < 32:
        return [Error("LINKAGE_KEY is too short to protect patient identifiers",
                      hint="Use a Fernet key (python -c \"from cryptography.fernet import "
                           "Fernet; print(Fernet.generate_key().decode())\") or another random "
                           "secret of at least 32 characters.", id="medlabel.E003")]
    return []


@register()
def pacs_pull_query(app_configs, **kwargs):
    """The scheduled PACS pull's PACS_PULL_QUERY, checked as ``pacs_pull --query`` is: a
    typo'd key or a key without a value would otherwise pull more than was meant, every
    PACS_PULL_MINUTES (unset means every study, on purpose)."""
    if not settings.PACS_PULL_MINUTES or settings.PACS_PULL_QUERY is None:
        return []
    try:
        pacs.parse_query(settings.PACS_PULL_QUERY)
    except pacs.PacsError as exc:
        return [Error(f"PACS_PULL_QUERY: {exc}",
                      hint="Give study filters as DICOM keywords with values, each once, e.g. "
                           "PACS_PULL_QUERY='Modality=CR&StudyDate=20240101-', or unset it to "
                           "pull every study.", id="medlabel.E004")]
    return []


@register(deploy=True)
def shared_cache(app_configs, **kwargs):
    """``check --deploy``: the API's throttle counts in Django's cache; a cache of each
    process's own memory lets every user make API_THROTTLE_USER calls per web process."""
    backend = settings.CACHES["default"]["BACKEND"]
    if settings.DEBUG or not backend.endswith("LocMemCache"):
        return []
    return [Warning("The cache is each process's own memory (CACHE_URL unset)",
                    hint="Set CACHE_URL=redis://host:6379/N (the broker's Redis will do) on every "
                         "web server: the API's per-user limit (API_THROTTLE_USER) is counted "
                         "there, and in each process's memory it is multiplied by the number "
                         "of web processes.", id="medlabel.W002")]
