"""The Label Studio SDK client and the two ways we call it (errors become LabelStudioError)."""

from __future__ import annotations

import logging

from django.conf import settings

logger = logging.getLogger(__name__)


class LabelStudioError(Exception):
    """Label Studio is unreachable, refused a call, or is not configured; the message says
    what to do."""


def client(url: str | None = None, api_key: str | None = None):
    """A label-studio-sdk client; the key may be a personal access token or a legacy token."""
    from label_studio_sdk import LabelStudio

    url = url or settings.LABEL_STUDIO_URL
    api_key = api_key or settings.LABEL_STUDIO_API_KEY
    if not url or not api_key:
        raise LabelStudioError("set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (an access token "
                               "from Label Studio → Account & Settings)")
    return LabelStudio(base_url=url.rstrip("/"), api_key=api_key, timeout=60)


def _raw(ls, method: str, path: str, **kwargs):
    """An API call the SDK has no method for, through the SDK's own authenticated client."""
    response = ls._client_wrapper.httpx_client.request(path.lstrip("/"), method=method, **kwargs)
    if response.status_code >= 400:
        raise LabelStudioError(f"Label Studio answered {response.status_code} to {method} "
                               f"{path}: {response.text[:300]}")
    return response.json() if response.content else None


def _call(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except LabelStudioError:
        raise
    except Exception as exc:  # the SDK raises ApiError / httpx errors: say what failed
        status = getattr(exc, "status_code", None)
        body = str(getattr(exc, "body", "") or exc)[:300]
        raise LabelStudioError(f"Label Studio could not {what}"
                               f"{f' (HTTP {status})' if status else ''}: {body}") from exc
