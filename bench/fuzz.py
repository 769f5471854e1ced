"""Hostile input against the import service and the upload view: no server error, no partial
row, no orphan file, and a reason for every refusal.

    python -m bench.fuzz --inputs 10000 [--target both|import|upload] [--seed 0] \
        [--out bench/results/fuzz.json]

Each input is generated from a seed (``make_input``): truncated and byte-mutated DICOM (from
pydicom's bundled test files and our fixtures), DICOM with huge declared dimensions or odd
character sets and invalid bytes in text tags, wrong magic bytes (a PNG that is a JPEG, text
named ``.dcm``), decompression-bomb headers (PNG / JPEG / TIFF declaring 60k × 60k), empty
files, zip / tar / gzip archives (and a zip bomb) under scan names, and hostile file names
(``../`` traversal, backslashes, absolute paths, control and right-to-left characters,
reserved device names, 300-character names). The same generator drives the fast test in the
suite (tests/annotator/test_fuzz.py, fewer inputs).

After every input the invariants are checked: the import job finished (never crashed), every
file is either a Scan with both its files on disk or a failure with a non-empty reason, the
media folder holds exactly the files the Scan rows reference, and the upload view answered
302 or 400 (never 5xx) with the reason on the page and nothing left in the staging folder.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import random
import struct
import sys
import tarfile
import tempfile
import time
import zipfile
import zlib
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_SEEDS: list[bytes] | None = None


def seed_files() -> list[bytes]:
    """Real scans to mutate: pydicom's bundled DICOM files and a few fixture PNG/JPEGs."""
    global _SEEDS
    if _SEEDS is None:
        import pydicom

        folder = Path(pydicom.__file__).parent / "data" / "test_files"
        dicoms = sorted(p for p in folder.iterdir() if p.suffix == ".dcm" and p.stat().st_size < 400_000)
        rasters = sorted((REPO / "fixtures" / "chest_xray" / "pool").rglob("*.png"))[:3] + \
            sorted((REPO / "fixtures" / "brain_mri" / "pool").rglob("*.jpg"))[:3]
        _SEEDS = [p.read_bytes() for p in dicoms[:40] + rasters]
    return _SEEDS


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", min(width, 2**31 - 1), min(height, 2**31 - 1), 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _jpeg_header(width: int, height: int) -> bytes:
    width, height = min(width, 65535), min(height, 65535)     # JPEG's fields are 16-bit
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + sof + b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" + b"\x00" * 32 + b"\xff\xd9"


def _tiff_header(width: int, height: int) -> bytes:
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1),
               (262, 3, 1, 1), (273, 4, 1, 8), (277, 3, 1, 1), (279, 4, 1, 16)]
    body = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHII", tag, kind, count, value) for tag, kind, count, value in entries)
    return b"II*\x00" + struct.pack("<I", 24) + b"\x00" * 16 + body + b"\x00\x00\x00\x00"


def _dicom_variant(rng: random.Random) -> bytes:
    """A real DICOM re-saved with huge dimensions, odd character sets or bad text bytes."""
    import pydicom
    from pydicom.dataset import FileMetaDataset

    data = rng.choice([s for s in seed_files() if s[128:132] == b"DICM"])
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    choice = rng.randrange(5)
    if choice == 0 and "PixelData" in ds:            # a bomb: huge declared size
        ds.Rows, ds.Columns = rng.choice([(65535, 65535), (60000, 1), (1, 65535)])
        ds.NumberOfFrames = rng.choice([1, 10000])
    elif choice == 1:                                # a character set nobody supports
        ds.SpecificCharacterSet = rng.choice(["ISO 2022 IR 87", "GB18030", "X-UNKNOWN",
                                              "ISO_IR 192", "\\\\\\"])
        ds.PatientName = rng.choice(["Ω𝔊\u202e^x", "Doe^Jane", "\udcff".encode(
            "utf-8", "surrogatepass").decode("latin-1")])
    elif choice == 2:                                # invalid bytes in text tags
        from pydicom.dataelem import DataElement

        ds[0x00100010] = DataElement(0x00100010, "PN", bytes(rng.randrange(256) for _ in range(40)))
        ds[0x00081030] = DataElement(0x00081030, "LO", b"\xff\xfe\x00" * 30)
    elif choice == 3:                                # photometric / bits nonsense
        ds.PhotometricInterpretation = rng.choice(["PALETTE COLOR", "YBR_FULL", "NONSENSE", ""])
        ds.BitsAllocated = rng.choice([1, 7, 64, 0])
    else:                                            # transfer syntax lies
        meta = getattr(ds, "file_meta", None) or FileMetaDataset()
        meta.TransferSyntaxUID = rng.choice(["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.5",
                                             "1.2.3.4.5", "1.2.840.10008.1.2.4.90"])
        ds.file_meta = meta
    out = io.BytesIO()
    try:
        ds.save_as(out, enforce_file_format=False)
    except Exception:
        return data[: rng.randrange(1, len(data))]
    return out.getvalue()


def _archive(rng: random.Random) -> bytes:
    inner = rng.choice(seed_files())
    kind = rng.randrange(4)
    buffer = io.BytesIO()
    if kind == 0:
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr(rng.choice(["scan.dcm", "../../evil.dcm", "/etc/passwd"]), inner)
    elif kind == 1:                                  # a small zip bomb
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("bomb.dcm", b"\x00" * 20_000_000)
    elif kind == 2:
        with tarfile.open(fileobj=buffer, mode="w") as t:
            info = tarfile.TarInfo(rng.choice(["../x.dcm", "scan.png", "link"]))
            info.size = len(inner)
            t.addfile(info, io.BytesIO(inner))
    else:
        return gzip.compress(inner)
    return buffer.getvalue()


def _mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randrange(1, 12)):
        if not data:
            break
        position = rng.randrange(min(len(data), 4096) if rng.random() < 0.7 else len(data))
        op = rng.randrange(3)
        if op == 0:
            data[position] = rng.randrange(256)
        elif op == 1:
            data[position:position] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
        else:
            del data[position:position + rng.randrange(1, 64)]
    return bytes(data)


NAMES = ["scan.dcm", "scan.png", "scan.jpg", "scan", "IM0001", "image.tiff", "x.DCM",
         "../../../etc/passwd.dcm", "..\\..\\windows\\win.ini.png", "/abs/path/scan.dcm",
         "C:\\scans\\a.dcm", "a/../../b.png", "CON.png", "nul.dcm", ".hidden.dcm",
         "name with spaces.dcm", "\u202egpj.exe.dcm", "scan\x01\x1f.png", "Ωmega-ß.dcm",
         "x" * 300 + ".dcm", "..", ".", "...dcm", "%2e%2e%2fescape.png", "scan.dcm.zip"]


def make_input(seed: int) -> tuple[str, bytes, str]:
    """``(file name, bytes, category)`` for one seed; deterministic."""
    rng = random.Random(seed)
    category = rng.choice(["truncated", "mutated", "dicom_variant", "wrong_magic", "bomb_header",
                           "archive", "empty", "random", "valid"])
    seeds = seed_files()
    if category == "truncated":
        data = rng.choice(seeds)
        data = data[: rng.randrange(0, len(data))]
    elif category == "mutated":
        data = _mutate(rng, rng.choice(seeds))
    elif category == "dicom_variant":
        data = _dicom_variant(rng)
    elif category == "wrong_magic":
        data = rng.choice([b"\x89PNG\r\n\x1a\n" + rng.choice(seeds)[8:],
                           b"\xff\xd8\xff" + rng.randbytes(200), b"hello, this is text\n" * 20,
                           b"DICM" + rng.randbytes(300), b"\x00" * 128 + b"DICM" + b"\x00" * 10,
                           b"<html><script>alert(1)</script></html>", b"%PDF-1.7\n" + rng.randbytes(99)])
    elif category == "bomb_header":
        w, h = rng.choice([(60000, 60000), (100000, 100000), (2 ** 31 - 1, 1), (1, 2 ** 30)])
        data = rng.choice([_png_header, _jpeg_header, _tiff_header])(w, h)
    elif category == "archive":
        data = _archive(rng)
    elif category == "empty":
        data = b""
    elif category == "random":
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 3000)))
    else:
        data = rng.choice(seeds)
    return rng.choice(NAMES), data, category


# --- invariants ------------------------------------------------------------------------


def media_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def check_storage(project) -> list[str]:
    """Every Scan has both files; MEDIA_ROOT holds nothing else (no orphan, no partial)."""
    from django.conf import settings

    from annotator.models import Scan

    problems = []
    referenced = set()
    for scan in Scan.objects.all():
        for name in (scan.file.name, scan.preview.name):
            referenced.add(name)
            if not (Path(settings.MEDIA_ROOT) / name).is_file():
                problems.append(f"scan {scan.pk}: {name} missing")
    orphans = media_files(Path(settings.MEDIA_ROOT)) - referenced
    problems += [f"orphan file {o}" for o in sorted(orphans)]
    return problems


def fuzz_import(project, folder: Path, name: str, data: bytes) -> tuple[str, list[str]]:
    """Import one file through the service; ``(outcome, problems)``."""
    import shutil

    from annotator import services

    safe = "".join(ch if ch.isprintable() and ch not in "/\\\x00" else "_" for ch in name)
    safe = (safe.strip(".") or "file")[:200]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / safe).write_bytes(data)
    job = services.import_job_create(project=project, source=str(folder), layout="flat")
    try:
        job = services.import_job_run(job_id=job.pk)
    except Exception as exc:          # the service must never raise for a bad file
        return "crash", [f"import crashed: {type(exc).__name__}: {exc}"]
    problems = []
    if job.status != "succeeded":
        problems.append(f"job {job.status}: {job.last_error}")
    if job.imported + job.duplicates + job.failed + job.skipped != job.total:
        problems.append(f"counts do not add up: {job.imported}/{job.duplicates}/{job.failed}"
                        f"/{job.skipped} of {job.total}")
    for error in job.errors:
        if not str(error.get("reason", "")).strip():
            problems.append(f"a refusal without a reason: {error}")
    outcome = ("imported" if job.imported else "duplicate" if job.duplicates
               else "refused" if job.failed else "skipped")
    return outcome, problems + check_storage(project)


def fuzz_upload(client, project, name: str, data: bytes,
                commit_scope=None) -> tuple[str, list[str]]:
    """Post one file to the upload view (tasks in-process); ``(outcome, problems)``.
    ``commit_scope``: a context manager around the request after which its on-commit work
    (the import task) has run (tests inside a transaction pass Django's capture helper)."""
    import contextlib

    from django.conf import settings
    from django.urls import reverse

    # the multipart body by hand, so the file name reaches the server as a browser sends it
    boundary = "fuzzBoundary7MA4YWxkTrZu0gW"
    quoted = name.replace("\\", "\\\\").replace('"', '\\"').replace("\r", " ").replace("\n", " ")
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in (("dataset", "fuzz"), ("split", "pool"))]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="files"; '
                 f'filename="{quoted}"\r\nContent-Type: application/octet-stream\r\n\r\n'
                 .encode("utf-8", "surrogateescape") + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    try:
        with (commit_scope or contextlib.nullcontext)():
            response = client.generic("POST", reverse("annotator:upload", args=[project.pk]),
                                      body, content_type=f"multipart/form-data; boundary={boundary}")
    except Exception as exc:
        return "crash", [f"upload view raised {type(exc).__name__}: {exc}"]
    problems = []
    if response.status_code >= 500 or response.status_code not in (302, 400):
        problems.append(f"upload answered {response.status_code}")
    if response.status_code == 400:
        page = response.content.decode(errors="replace")
        import re

        reasons = [r.strip() for r in re.findall(r'class="error">([^<]+)<', page)]
        if not any(reasons):
            problems.append("a 400 without the reason on the page")
    staged = [p for p in Path(settings.INCOMING_ROOT).rglob("*") if p.is_file()]
    if staged:
        problems.append(f"{len(staged)} staged upload file(s) left behind")
    outcome = "accepted" if response.status_code == 302 else "refused"
    return outcome, problems + check_storage(project)


# --- the long run ----------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=10000)
    parser.add_argument("--target", choices=["both", "import", "upload"], default="both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="fuzz-"))
    os.environ.update({
        "DATABASE_URL": os.environ.get("FUZZ_DATABASE_URL", f"sqlite:///{workdir / 'db.sqlite3'}"),
        "MEDIA_ROOT": str(workdir / "media"), "ARTIFACTS_ROOT": str(workdir / "artifacts"),
        "INCOMING_ROOT": str(workdir / "incoming"), "DJANGO_SETTINGS_MODULE": "medsite.settings",
        "LOG_LEVEL": "ERROR",
        # production settings: the error pages users get, not Django's debug pages
        "DEBUG": "0", "SECRET_KEY": "fuzz-" + "x" * 50, "DEID_SALT": "fuzz-deid-salt-0123456789",
        "ALLOWED_HOSTS": "testserver", "SECURE_SSL_REDIRECT": "0",
        "SESSION_COOKIE_SECURE": "0", "CSRF_COOKIE_SECURE": "0"})
    os.environ.pop("CELERY_BROKER_URL", None)
    import logging
    import warnings

    import django

    warnings.filterwarnings("ignore")
    logging.disable(logging.CRITICAL)      # refusals are counted below, not logged
    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.test import Client

    from annotator import services

    call_command("migrate", verbosity=0)
    project = services.project_create(name=f"fuzz-{time.time_ns()}")
    user = get_user_model().objects.create_user(f"fuzzer-{time.time_ns()}", password="fuzz-pass-1")
    services.membership_set(project=project, user=user, role="clinician")
    client = Client()
    client.force_login(user)
    folder = workdir / "source"
    started = time.perf_counter()
    outcomes, categories, failures = Counter(), Counter(), []
    targets = ["import", "upload"] if args.target == "both" else [args.target]
    count = 0
    for i in range(args.inputs):
        name, data, category = make_input(args.seed * 1_000_003 + i)
        target = targets[i % len(targets)]
        if target == "import":
            outcome, problems = fuzz_import(project, folder, name, data)
        else:
            outcome, problems = fuzz_upload(client, project, name, data)
        count += 1
        outcomes[f"{target}:{outcome}"] += 1
        categories[category] += 1
        if problems:
            failures.append({"seed": args.seed * 1_000_003 + i, "target": target,
                             "name": name[:80], "category": category, "problems": problems[:5]})
            print(f"FAIL seed {failures[-1]['seed']} ({target}, {category}): {problems[:2]}",
                  flush=True)
        if (i + 1) % 500 == 0:
            print(f"{i + 1} inputs, {len(failures)} failures, "
                  f"{(i + 1) / (time.perf_counter() - started):.0f}/s", flush=True)
    summary = {"inputs": count, "failures": len(failures), "server_errors": sum(
        1 for f in failures if any("crash" in p or "answered 5" in p for p in f["problems"])),
        "outcomes": dict(outcomes), "categories": dict(categories),
        "seconds": round(time.perf_counter() - started, 1), "first_failures": failures[:20]}
    print(json.dumps({k: v for k, v in summary.items() if k != "first_failures"}, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
