"""Named users and small factories shared by the tests.

alice   — clinician in the project (labels scans)
bob     — reviewer in the project
charlie — outsider: a user with no membership
dora    — site admin (superuser)
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "fixtures"
# The real data sets sit beside the checkout (CI: ../shared/data); SHARED_DATA overrides.
SHARED_DATA = Path(os.environ.get("SHARED_DATA", REPO.parent / "shared" / "data"))
PASSWORD = "correct-horse-battery-staple"


def pydicom_test_files() -> list[Path]:
    """The DICOM test files shipped inside the installed pydicom package (no download)."""
    import pydicom

    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == ".dcm")


def png_bytes(array: np.ndarray | None = None, *, size: int = 32, seed: int = 0) -> bytes:
    if array is None:
        array = np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares ``width`` x ``height`` with almost no data (a bomb header)."""
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def media_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def wait_for(condition, timeout: float = 20.0, what: str = "condition"):
    """Poll ``condition`` until it returns something truthy (returned), or fail after
    ``timeout`` seconds naming ``what``."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def patient_sides(scans) -> dict[str, set[str]]:
    """Each patient key of ``scans`` with the splits its scans landed in: an automatic
    eval split that keeps patients whole gives every key exactly one side."""
    sides: dict[str, set[str]] = {}
    for scan in scans:
        sides.setdefault(scan.patient_key, set()).add(scan.split)
    return sides
