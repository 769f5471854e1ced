"""Content-addressed files under MEDIA_ROOT, written atomically (temp file + rename)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from django.conf import settings


def media_path(name: str) -> Path:
    root = Path(settings.MEDIA_ROOT).resolve()
    path = (root / name).resolve()
    if root not in path.parents:
        raise ValueError(f"media name escapes MEDIA_ROOT: {name!r}")
    return path


def scan_file_name(sha256: str, ext: str) -> str:
    return f"scans/{sha256[:2]}/{sha256}{ext}"


def preview_file_name(sha256: str) -> str:
    return f"previews/{sha256[:2]}/{sha256}.png"


def write_atomic(name: str, data: bytes) -> bool:
    """Write ``data`` to media ``name`` unless it is already there.

    Returns True when this call created the file (so a failed import knows what
    to remove). Content addressing makes an existing file identical by design.
    """
    path = media_path(name)
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def remove_if_unreferenced(name: str) -> None:
    """Delete a media file no Scan row points at (used to roll back a failed import)."""
    from annotator.models import Scan

    if Scan.objects.filter(file=name).exists() or Scan.objects.filter(preview=name).exists():
        return
    media_path(name).unlink(missing_ok=True)
