"""The honest-broker linkage: a DICOM scan's original identifiers, encrypted with LINKAGE_KEY.

A structured report sent back to the PACS must carry the original patient and study (so the
PACS files it next to the original images), which de-identification removed on purpose.
With ``LINKAGE_KEY`` set, the import keeps them here, encrypted (Fernet: AES-128-CBC with
HMAC-SHA256 authentication, from the ``cryptography`` package); without it nothing is kept
and nothing can be sent back. ``linkage_read`` is for the PACS push only (annotator/pacs.py):
nothing else decrypts, shows, exports, logs or backs these up.
"""

from __future__ import annotations

import base64
import hashlib
import json

from django.conf import settings

from annotator.models import DicomLinkage, Scan


class LinkageError(Exception):
    """No key, a wrong key, or no linkage: ``str(exc)`` says which."""


def linkage_enabled() -> bool:
    return bool(getattr(settings, "LINKAGE_KEY", None))


def _key_material() -> bytes:
    key = getattr(settings, "LINKAGE_KEY", None)
    if not key:
        raise LinkageError("LINKAGE_KEY is not set: no linkage is kept, and nothing can be sent "
                           "back to a PACS")
    try:                                  # a Fernet key as made by Fernet.generate_key()
        raw = base64.urlsafe_b64decode(key.encode())
        if len(raw) == 32:
            return key.encode()
    except (ValueError, TypeError):
        pass
    # any other secret: a key derived from it (keep it long and random)
    return base64.urlsafe_b64encode(hashlib.sha256(b"medlabel-linkage\x1f" + key.encode())
                                    .digest())


def key_id() -> str:
    """A short, non-secret name of the current key (which key encrypted a row)."""
    return hashlib.sha256(b"id\x1f" + _key_material()).hexdigest()[:16]


def linkage_store(scan: Scan, identifiers: dict) -> DicomLinkage | None:
    """Encrypt and keep ``identifiers`` for ``scan`` (nothing without a key or identifiers)."""
    from cryptography.fernet import Fernet

    if not linkage_enabled() or not identifiers:
        return None
    token = Fernet(_key_material()).encrypt(json.dumps(identifiers, sort_keys=True).encode())
    link, _ = DicomLinkage.objects.update_or_create(
        scan=scan, defaults={"token": token.decode("ascii"), "key_id": key_id()})
    return link


def linkage_seal(identifiers: dict | None) -> dict | None:
    """``identifiers`` encrypted as ``linkage_store`` keeps them (``{"token", "key_id"}``),
    for a de-identified copy that waits on disk before its import (the classify page's);
    None without a key or identifiers. Only ``linkage_store_sealed`` takes it."""
    from cryptography.fernet import Fernet

    if not linkage_enabled() or not identifiers:
        return None
    token = Fernet(_key_material()).encrypt(json.dumps(identifiers, sort_keys=True).encode())
    return {"token": token.decode("ascii"), "key_id": key_id()}


def linkage_store_sealed(scan: Scan, sealed: dict | None) -> DicomLinkage | None:
    """Keep for ``scan`` what ``linkage_seal`` encrypted, as it is (nothing is decrypted)."""
    if not sealed or not sealed.get("token"):
        return None
    link, _ = DicomLinkage.objects.update_or_create(
        scan=scan, defaults={"token": str(sealed["token"]),
                             "key_id": str(sealed.get("key_id", ""))[:16]})
    return link


def linkage_read(scan: Scan) -> dict:
    """The original identifiers of ``scan`` — for the PACS push only."""
    from cryptography.fernet import Fernet, InvalidToken

    link = DicomLinkage.objects.filter(scan=scan).first()
    if link is None:
        raise LinkageError(f"scan {scan.pk} has no linkage (imported without LINKAGE_KEY, or "
                           "not DICOM)")
    try:
        return json.loads(Fernet(_key_material()).decrypt(link.token.encode("ascii")))
    except InvalidToken:
        raise LinkageError(f"scan {scan.pk}'s linkage was encrypted with another key "
                           f"({link.key_id}, not {key_id()})") from None
