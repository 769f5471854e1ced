"""Hostile input against the import service and the upload view: no server error, no partial
row, no orphan file, and a reason for every refusal.

    python -m bench.fuzz --inputs 10000 [--target both|import|upload] [--seed 0] \
        [--bombs N] [--out bench/results/fuzz.json]
    python -m bench.fuzz --decode-only [--max-pixels 64000000] [--out ...]
    python -m bench.fuzz --target requests --inputs 300 [--out bench/results/fuzz-requests.json]
    python -m bench.fuzz --target phi --rounds 3 [--out bench/results/fuzz-phi.json]

Each input is generated from a seed (``make_input``): truncated and byte-mutated DICOM (from
pydicom's bundled test files and our fixtures), DICOM with huge declared dimensions or odd
character sets and invalid bytes in text tags, wrong magic bytes (a PNG that is a JPEG, text
named ``.dcm``), decompression-bomb headers (PNG / JPEG / TIFF declaring 60k × 60k), empty
files, zip / tar / gzip archives (and a zip bomb) under scan names, and hostile file names
(``../`` traversal, backslashes, absolute paths, control and right-to-left characters,
reserved device names, 300-character names). The same generator drives the fast test in the
suite (tests/annotator/test_fuzz.py, fewer inputs).

Decode bombs (``decode_bomb_corpus``, ``make_bomb_input``) follow the inputs, through every
target: deflated DICOM inflating to 64 MiB - 1 GiB, encapsulated JPEG / JPEG-LS / JPEG 2000
frames declaring 20,000-60,000 squared under a 64 x 64 header, truncated JPEGs declaring 8000 x
8000, TIFFs with 5,000-50,000 page directories, directory loops or pages without dimensions,
frame and page counts over the budget. The summary reports the slowest refusal and the
process's peak RSS. ``--decode-only`` skips Django: each bomb, each large valid scan and each
of pydicom's bundled files is decoded in its own child process, which reports its time and
peak RSS (VmHWM, reset at the start), and the run fails unless every bomb is refused in under
a second and every valid scan decodes.

After every input the invariants are checked: the import job finished (never crashed), every
file is either a Scan with both its files on disk or a failure with a non-empty reason, the
media folder holds exactly the files the Scan rows reference, and the upload view answered
302 or 400 (never 5xx) with the reason on the page and nothing left in the staging folder.

``--target requests`` (``requests_bench``): hostile JSON bodies (bench/hostile.py, the classes
tests/test_hostile_requests.py draws with hypothesis, plus valid requests with one odd field,
every text field once with a NUL and once with a lone surrogate, bodies at the size limit,
form-encoded answers) against every JSON endpoint — the label page's answer (a member's
session), the Label Studio webhook (shared secret), the ML backend's predict / webhook / setup
(HTTP Basic) — then non-ASCII credentials and secrets, and Label Studio annotation ids replayed
through another project's webhook. Reports requests, status codes, server errors (with the
project frames of each traceback), rows written by refused requests (an execute wrapper
counts every INSERT / UPDATE / DELETE), cross-project rewrites, worst and p99 time. On SQLite,
a text parameter PostgreSQL refuses (NUL) raises psycopg's ``DataError``, so the run shows
PostgreSQL's answer.

``--target phi`` (``phi_bench``): the PHI-marker corpus (``phi_corpus``: a unique marker in
every container tests/ml_backend/test_deid_markers.py plants, and in DICOM file names)
through the import service (a folder with a labels CSV, a CSV source, a single file, a
missing path) and the upload view; every marker is then searched for (plain, UTF-16,
NUL-stripped, inside any zlib / gzip stream) in the database dump, every file under
MEDIA_ROOT / ARTIFACTS_ROOT / INCOMING_ROOT, the logs (INFO and above, and DEBUG records on
their own), a project backup, Label Studio payloads and the pages. The fast version is
tests/test_phi_end_to_end.py.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import random
import re
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


# --- decode bombs: small files whose decoding would cost gigabytes or minutes ------------
#
# Each builder makes one file in memory (no pydicom compression, no large buffer): the
# classes an independent probe found (deflated DICOM that inflates to a gigabyte, an
# encapsulated frame larger than Rows/Columns, a truncated JPEG declaring 8000 x 8000, a TIFF
# with tens of thousands of directories or one without dimensions) and their neighbours.
# tests/ml_backend/test_decode_bombs.py draws their parameters with hypothesis; the decode
# benchmark (``--decode-only``) runs each file in a child process and reports time and RSS.

DEFLATED_TS = "1.2.840.10008.1.2.1.99"
_JPEG_TS = {"jpeg": "1.2.840.10008.1.2.4.50", "jpeg-lossless": "1.2.840.10008.1.2.4.70",
            "jpeg-ls": "1.2.840.10008.1.2.4.80", "j2k": "1.2.840.10008.1.2.4.90",
            "htj2k": "1.2.840.10008.1.2.4.201"}


def _bomb_dataset(rows: int, cols: int, *, frames: int = 1, bits: int = 8, samples: int = 1):
    """A minimal image dataset (no Pixel Data yet) with its file meta."""
    from pydicom.dataset import Dataset, FileMetaDataset

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.Modality, ds.PatientID = "OT", "BOMB-0001"
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = "MONOCHROME2" if samples == 1 else "RGB"
    if samples > 1:
        ds.PlanarConfiguration = 0
    if frames != 1:
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    return ds


def _dicom_bytes(ds, transfer_syntax: str) -> bytes:
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _explicit_le(ds) -> bytes:
    """``ds`` (no file meta) encoded as Explicit VR Little Endian."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def _long_element(tag: int, vr: bytes, length: int) -> bytes:
    return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, length)


def _deflate_segment(data: bytes) -> bytes:
    """Raw deflate of ``data``, flushed to a byte boundary with no back-reference out of it:
    such segments can be concatenated (and repeated) into one stream."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush(zlib.Z_FULL_FLUSH)


def _deflate_zeros(count: int, noise: int = 0) -> bytes:
    """A deflate segment of ``count`` mostly-zero bytes built without ever holding them:
    one flushed MiB, repeated. ``noise`` random bytes per MiB lower the ratio from ~1000:1
    (none) to ~300:1 (1,000) or ~30:1 (30,000)."""
    unit = 1 << 20
    full, rest = divmod(count, unit)
    block = bytearray(unit)
    if noise:
        rng = random.Random(noise)
        for _ in range(noise):
            block[rng.randrange(unit)] = rng.randrange(1, 256)
    return _deflate_segment(bytes(block)) * full + (_deflate_segment(bytes(block[:rest])) if rest
                                                    else b"")


def deflate_bomb(inflated_mib: int, *, where: str = "trailing", rows: int = 64,
                 cols: int = 64, noise: int = 0) -> bytes:
    """A Deflated Explicit VR Little Endian DICOM (transfer syntax 1.2.840.10008.1.2.1.99)
    of a ``rows`` x ``cols`` 8-bit image whose dataset inflates to ``inflated_mib`` MiB more
    than the image needs, as zeros: after the pixels (``trailing``, a Data Set Trailing
    Padding element), before them (``header``, a private OB element), inside them
    (``pixels``: Pixel Data longer than Rows x Columns) or, with ``dims``, a Pixel Data whose
    declared Rows x Columns (``rows``, ``cols``) is itself that large. ``noise``: random
    bytes per MiB of filler, for ratios below deflate's ~1000:1."""
    from pydicom.filewriter import write_file_meta_info

    extra = inflated_mib << 20
    if where == "dims":                               # 8-bit pixels, rows x cols bytes
        rows = cols = max(1, int((extra ** 0.5)))
    ds = _bomb_dataset(rows, cols)
    ds.file_meta.TransferSyntaxUID = DEFLATED_TS
    pixel_bytes = rows * cols + (rows * cols) % 2
    parts = [_deflate_segment(_explicit_le(ds))]
    if where == "header":
        from pydicom.dataset import Dataset

        private = Dataset()
        private.add_new(0x00290010, "LO", "BOMB")
        parts += [_deflate_segment(_explicit_le(private) + _long_element(0x00291010, b"OB", extra)),
                  _deflate_zeros(extra, noise)]
    if where in ("pixels",):
        parts += [_deflate_segment(_long_element(0x7FE00010, b"OB", pixel_bytes + extra)),
                  _deflate_zeros(pixel_bytes + extra, noise)]
    elif where == "dims":
        parts += [_deflate_segment(_long_element(0x7FE00010, b"OB", pixel_bytes)),
                  _deflate_zeros(pixel_bytes)]
    else:
        parts += [_deflate_segment(_long_element(0x7FE00010, b"OB", pixel_bytes)
                                   + bytes(range(256)) * (pixel_bytes // 256)
                                   + bytes(pixel_bytes % 256))]
    if where == "trailing":
        parts += [_deflate_segment(_long_element(0xFFFCFFFC, b"OB", extra)),
                  _deflate_zeros(extra, noise)]
    meta = io.BytesIO()
    meta.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    return meta.getvalue() + b"".join(parts) + b"\x03\x00"   # an empty final block ends it


def deflated_dicom(rows: int = 64, cols: int = 64, *, seed: int = 0) -> bytes:
    """A valid deflated DICOM (written by pydicom) of a random 8-bit image."""
    import numpy as np

    ds = _bomb_dataset(rows, cols)
    rng = np.random.default_rng(seed)
    ds.PixelData = rng.integers(0, 255, (rows, cols), dtype=np.uint8).tobytes()
    return _dicom_bytes(ds, DEFLATED_TS)


def jpeg_sof(width: int, height: int, *, marker: int = 0xC0, components: int = 1,
             precision: int = 8) -> bytes:
    """A JPEG (``marker`` 0xC0-0xCF) or JPEG-LS (0xF7) stream that is little more than its
    frame header: the size is declared, the data to fill it is absent."""
    comps = b"".join(bytes([i + 1, 0x11, 0]) for i in range(components))
    sof = bytes([0xFF, marker]) + struct.pack(">HBHHB", 8 + len(comps), precision, height,
                                              width, components) + comps
    sos = b"\xff\xda" + struct.pack(">HB", 6 + 2 * components, components) + b"".join(
        bytes([i + 1, 0]) for i in range(components)) + b"\x00\x3f\x00"
    return b"\xff\xd8" + sof + sos + b"\x00" * 32 + b"\xff\xd9"


def j2k_siz(width: int, height: int, *, components: int = 1, tile: tuple[int, int] | None = None,
            jp2: bool = False) -> bytes:
    """A JPEG 2000 codestream (or a JP2 file with ``jp2``) that declares ``width`` x
    ``height`` in its SIZ marker and holds nothing else of the image."""
    tile_w, tile_h = tile or (width, height)
    siz = struct.pack(">HHIIIIIIIIH", 38 + 3 * components, 0, width, height, 0, 0, tile_w,
                      tile_h, 0, 0, components) + b"\x07\x01\x01" * components
    cod = b"\xff\x52" + struct.pack(">HBHBBBBBBB", 12, 0, 0, 1, 0, 5, 4, 4, 0, 1)
    qcd = b"\xff\x5c" + struct.pack(">HB", 4, 0x40) + b"\x48"
    stream = b"\xff\x4f\xff\x51" + siz + cod + qcd + b"\xff\xd9"
    if not jp2:
        return stream
    signature = struct.pack(">I4s", 12, b"jP  ") + b"\r\n\x87\n"
    ftyp = struct.pack(">I4s4sI4s", 20, b"ftyp", b"jp2 ", 0, b"jp2 ")
    return signature + ftyp + struct.pack(">I4s", 8 + len(stream), b"jp2c") + stream


def real_jpeg(width: int, height: int, *, seed: int = 0, progressive: bool = False,
              mode: str = "L") -> bytes:
    import numpy as np
    from PIL import Image

    shape = (height, width) if mode == "L" else (height, width, 3)
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, progressive=progressive)
    return buffer.getvalue()


def real_j2k(width: int, height: int, *, seed: int = 0) -> bytes:
    """A JPEG 2000 codestream (Pillow / OpenJPEG, lossless) of a random 8-bit image."""
    import numpy as np
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width),
                                                                 dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG2000", no_jp2=True, irreversible=False)
    return buffer.getvalue()


def patched_j2k(width: int, height: int, *, jp2: bool = False) -> bytes:
    """A real 16 x 16 JPEG 2000 codestream whose SIZ marker is patched to declare ``width``
    x ``height`` (one tile): tables and all, what a decoder sets out to fill."""
    stream = bytearray(real_j2k(16, 16))
    struct.pack_into(">II", stream, 8, width, height)          # Xsiz, Ysiz
    struct.pack_into(">II", stream, 24, width, height)         # XTsiz, YTsiz
    if not jp2:
        return bytes(stream)
    signature = struct.pack(">I4s", 12, b"jP  ") + b"\r\n\x87\n"
    ftyp = struct.pack(">I4s4sI4s", 20, b"ftyp", b"jp2 ", 0, b"jp2 ")
    return signature + ftyp + struct.pack(">I4s", 8 + len(stream), b"jp2c") + bytes(stream)


def _jpeg_sof_offset(data: bytes) -> int:
    pos = 2
    while pos + 4 <= len(data):
        marker = data[pos + 1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return pos
        pos += 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
    raise ValueError("no SOF")


def truncated_jpeg(width: int = 8000, height: int = 8000, *, keep: int = 333,
                   progressive: bool = False, seed: int = 0) -> bytes:
    """A real (Pillow-encoded, 16 x 16) JPEG whose frame header is patched to declare
    ``width`` x ``height`` and which is cut after ``keep`` bytes (never before its first
    scan starts): tables and all, what a decoder accepts and fills with grey."""
    data = bytearray(real_jpeg(16, 16, seed=seed, progressive=progressive))
    sof = _jpeg_sof_offset(bytes(data))
    struct.pack_into(">HH", data, sof + 5, height, width)
    sos = bytes(data).find(b"\xff\xda")
    return bytes(data[:max(keep, sos + 16)])


def dicom_encapsulated(frames_data: list[bytes], *, rows: int, cols: int, codec: str = "jpeg",
                       number_of_frames: int | None = None, samples: int = 1,
                       bot: bool = True) -> bytes:
    """A DICOM whose Pixel Data encapsulates ``frames_data`` under ``codec``'s transfer
    syntax, with Rows/Columns as given (whatever the frames themselves declare)."""
    from pydicom.encaps import encapsulate

    ds = _bomb_dataset(rows, cols, frames=number_of_frames or len(frames_data), samples=samples)
    if samples == 3:
        ds.PhotometricInterpretation = "YBR_FULL_422" if codec == "jpeg" else "RGB"
    ds.PixelData = encapsulate(frames_data, has_bot=bot)
    ds["PixelData"].VR = "OB"
    return _dicom_bytes(ds, _JPEG_TS[codec])


def frame_mismatch(codec: str = "jpeg", width: int = 20000, height: int = 20000, *,
                   rows: int = 64, cols: int = 64) -> bytes:
    """A 1 KB DICOM whose header says ``rows`` x ``cols`` but whose encapsulated frame
    declares ``width`` x ``height`` (a JPEG SOF, JPEG-LS SOF55 or JPEG 2000 SIZ)."""
    if codec == "jpeg":                              # real tables, patched size, cut short
        frame = truncated_jpeg(width, height, keep=1000)
    elif codec == "jpeg-lossless":
        frame = jpeg_sof(width, height, marker=0xC3)
    elif codec == "jpeg-ls":
        frame = jpeg_sof(width, height, marker=0xF7)
    elif codec == "jpeg-real":                       # a complete JPEG of another size
        frame, codec = real_jpeg(width, height), "jpeg"
    else:
        frame = patched_j2k(width, height, jp2=codec == "jp2")
        codec = "j2k" if codec == "jp2" else codec
    return dicom_encapsulated([frame], rows=rows, cols=cols, codec=codec)


def j2k_many_tiles(size: int = 256, tile: int = 1) -> bytes:
    """A DICOM whose JPEG 2000 frame has the right size but ``size / tile`` squared tiles
    (OpenJPEG allocates per-tile state for each)."""
    return dicom_encapsulated([j2k_siz(size, size, tile=(tile, tile))], rows=size, cols=size,
                              codec="j2k")


def dicom_frames(frames: int, *, rows: int = 64, cols: int = 64, pixel_frames: int = 1) -> bytes:
    """A native DICOM declaring ``frames`` frames of ``rows`` x ``cols`` but holding only
    ``pixel_frames`` frames of pixel data."""
    ds = _bomb_dataset(rows, cols, frames=frames)
    ds.PixelData = bytes(rows * cols * pixel_frames + (rows * cols * pixel_frames) % 2)
    return _dicom_bytes(ds, "1.2.840.10008.1.2.1")


def dicom_jpeg_frames(count: int = 5000, size: int = 8) -> bytes:
    """An encapsulated JPEG DICOM of ``count`` tiny frames (each decoded on its own)."""
    return dicom_encapsulated([real_jpeg(size, size)] * count, rows=size, cols=size)


def dicom_excess_frames(count: int = 5000, size: int = 8) -> bytes:
    """An encapsulated JPEG DICOM declaring two frames whose Pixel Data (no offset table)
    holds ``count``: pydicom splits them at the JPEG end markers and, by default, decodes
    and returns the excess frames too."""
    frame = real_jpeg(size, size)
    return dicom_encapsulated([frame] * count, rows=size, cols=size, number_of_frames=2,
                              bot=False)


def tiff_chain(pages: int, *, width: int = 8, height: int = 8, loop_to: int | None = None,
               no_dims_at: int | None = None, big_endian: bool = False) -> bytes:
    """A TIFF with ``pages`` directories (one shared 8-bit strip), chained in order;
    ``loop_to``: the last one points back to directory ``loop_to``; ``no_dims_at``: that
    directory has no ImageWidth / ImageLength."""
    order = ">" if big_endian else "<"
    strip_offset, strip = 8, bytes(width * height)
    first = 8 + len(strip) + len(strip) % 2
    ifd_size = lambda entries: 2 + 12 * entries + 4                       # noqa: E731
    offsets, position = [], first
    layouts = []
    for index in range(pages):
        tags = [(256, 4, width), (257, 4, height)] if index != no_dims_at else []
        tags += [(258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, strip_offset),
                 (277, 3, 1), (278, 4, height), (279, 4, len(strip))]
        layouts.append(tags)
        offsets.append(position)
        position += ifd_size(len(tags))
    out = bytearray((b"MM\x00*" if big_endian else b"II*\x00") + struct.pack(order + "I", first))
    out += strip + b"\x00" * (len(strip) % 2)
    for index, tags in enumerate(layouts):
        out += struct.pack(order + "H", len(tags))
        for tag, kind, value in tags:
            packed = struct.pack(order + "H", value) + b"\x00\x00" if kind == 3 else \
                struct.pack(order + "I", value)
            out += struct.pack(order + "HHI", tag, kind, 1) + packed
        if index + 1 < pages:
            following = offsets[index + 1]
        else:
            following = offsets[loop_to] if loop_to is not None else 0
        out += struct.pack(order + "I", following)
    return bytes(out)


def png_truncated(width: int = 8000, height: int = 8000) -> bytes:
    """A PNG declaring ``width`` x ``height`` with a few bytes of image data."""
    return _png_header(width, height)


BOMB_CATEGORIES = ["deflate_bomb", "frame_mismatch", "truncated_jpeg", "tiff_many_ifds",
                   "tiff_loop", "tiff_no_dims", "frames_over_budget", "excess_frames",
                   "truncated_png", "j2k_tiles"]


def decode_bomb_corpus() -> list[tuple[str, bytes, str]]:
    """``(name, bytes, category)`` for every class above with the probe's figures; every
    one must be refused (with IMPORT_MAX_PIXELS = 64,000,000) in under a second."""
    corpus = []
    for mib in (64, 256, 1024):
        for where in ("trailing", "header", "pixels"):
            corpus.append((f"deflate-{where}-{mib}MiB.dcm", deflate_bomb(mib, where=where),
                           "deflate_bomb"))
    corpus.append(("deflate-dims-512MiB.dcm", deflate_bomb(512, where="dims"), "deflate_bomb"))
    for codec in ("jpeg", "jpeg-lossless", "jpeg-ls", "j2k", "jp2", "htj2k"):
        corpus.append((f"mismatch-{codec}-20000.dcm", frame_mismatch(codec), "frame_mismatch"))
    corpus.append(("mismatch-jpeg-60000.dcm", frame_mismatch("jpeg", 60000, 60000),
                   "frame_mismatch"))
    corpus.append(("mismatch-jpeg-real-512.dcm", frame_mismatch("jpeg-real", 512, 512),
                   "frame_mismatch"))
    corpus.append(("j2k-65536-tiles.dcm", j2k_many_tiles(256, 1), "j2k_tiles"))
    corpus.append(("truncated-8000.jpg", truncated_jpeg(8000, 8000), "truncated_jpeg"))
    corpus.append(("truncated-8000-progressive.jpg",
                   truncated_jpeg(8000, 8000, progressive=True), "truncated_jpeg"))
    corpus.append(("truncated-4000x16000.jpg", truncated_jpeg(16000, 4000, keep=2000),
                   "truncated_jpeg"))
    corpus.append(("truncated-8000-in-dicom.dcm", dicom_encapsulated(
        [truncated_jpeg(8000, 8000)], rows=8000, cols=8000), "truncated_jpeg"))
    for pages in (5_000, 50_000):
        corpus.append((f"tiff-{pages}-ifds.tif", tiff_chain(pages), "tiff_many_ifds"))
    corpus.append(("tiff-loop-self.tif", tiff_chain(1, loop_to=0), "tiff_loop"))
    corpus.append(("tiff-loop-3.tif", tiff_chain(3, loop_to=1, big_endian=True), "tiff_loop"))
    corpus.append(("tiff-no-dims-first.tif", tiff_chain(1, no_dims_at=0), "tiff_no_dims"))
    corpus.append(("tiff-no-dims-third.tif", tiff_chain(4, no_dims_at=2), "tiff_no_dims"))
    corpus.append(("tiff-100-pages-of-1000x1000.tif", tiff_chain(100, width=1000, height=1000),
                   "frames_over_budget"))
    corpus.append(("dicom-100000-frames.dcm", dicom_frames(100_000), "frames_over_budget"))
    corpus.append(("dicom-5000-jpeg-frames.dcm", dicom_jpeg_frames(5_000), "frames_over_budget"))
    corpus.append(("truncated-8000.png", png_truncated(8000, 8000), "truncated_png"))
    return corpus


def make_bomb_input(seed: int) -> tuple[str, bytes, str]:
    """One randomised decode bomb (``(name, bytes, category)``), deterministic per seed."""
    rng = random.Random(seed)
    category = rng.choice(BOMB_CATEGORIES)
    if category == "deflate_bomb":
        where = rng.choice(["trailing", "header", "pixels", "dims"])
        # "dims" declares sqrt(mib) squared pixels: 40 MiB would be a blank image within the
        # 64M budget (decoded, bounded by the budget), so dims bombs start at 100 MiB
        mib = rng.choice([100, 300] if where == "dims" else [40, 100, 300])
        return f"deflate-{where}.dcm", deflate_bomb(mib, where=where), category
    if category == "frame_mismatch":
        codec = rng.choice(["jpeg", "jpeg-lossless", "jpeg-ls", "j2k", "jp2", "htj2k"])
        side = rng.choice([65, 1000, 20000, 65535])
        return "mismatch.dcm", frame_mismatch(codec, side, rng.choice([side, 64])), category
    if category == "truncated_jpeg":
        side = rng.choice([3000, 8000])
        return "cut.jpg", truncated_jpeg(side, side, keep=rng.randrange(200, 4000),
                                         progressive=rng.random() < 0.5, seed=seed), category
    if category == "tiff_many_ifds":
        return "pages.tif", tiff_chain(rng.choice([4_097, 20_000])), category
    if category == "tiff_loop":
        pages = rng.randrange(1, 20)
        return "loop.tif", tiff_chain(pages, loop_to=rng.randrange(pages)), category
    if category == "tiff_no_dims":
        pages = rng.randrange(1, 20)
        return "nodims.tif", tiff_chain(pages, no_dims_at=rng.randrange(pages)), category
    if category == "frames_over_budget":
        return "frames.dcm", dicom_frames(rng.choice([20_000, 10**6])), category
    if category == "excess_frames":
        return "excess.dcm", dicom_excess_frames(rng.choice([4_097, 6_000])), category
    if category == "truncated_png":
        return "cut.png", png_truncated(rng.choice([3000, 8000]), 8000), category
    return "tiles.dcm", j2k_many_tiles(256, rng.choice([1, 2])), category


def valid_corpus(side: int = 4096) -> list[tuple[str, bytes, str]]:
    """Large valid scans (``side`` x ``side``, smooth content plus noise) that must still
    decode: where the decode benchmark measures peak memory per pixel."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    ramp = np.add.outer(np.arange(side), np.arange(side)) * (3000.0 / (2 * side))
    grey16 = (ramp + rng.normal(0, 30, (side, side))).clip(0, 4095).astype(np.uint16)
    grey8 = (grey16 >> 4).astype(np.uint8)

    def raster(array, fmt, **options):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format=fmt, **options)
        return buffer.getvalue()

    ct = _bomb_dataset(side, side, bits=16)
    ct.BitsStored, ct.HighBit = 12, 11
    ct.RescaleSlope, ct.RescaleIntercept = 1, -1024
    ct.WindowCenter, ct.WindowWidth = 40, 400
    ct.PixelData = grey16.tobytes()
    plain = _bomb_dataset(side, side, bits=16)
    plain.BitsStored, plain.HighBit = 12, 11
    plain.PixelData = grey16.tobytes()
    deflated = _bomb_dataset(side, side)
    deflated.PixelData = grey8.tobytes()
    return [
        (f"ct-{side}-16bit-window.dcm", _dicom_bytes(ct, "1.2.840.10008.1.2.1"), "dicom"),
        (f"mr-{side}-16bit-percentile.dcm", _dicom_bytes(plain, "1.2.840.10008.1.2.1"), "dicom"),
        (f"deflated-{side}-8bit.dcm", _dicom_bytes(deflated, DEFLATED_TS), "dicom"),
        (f"grey-{side}.jpg", raster(grey8, "JPEG", quality=90), "jpeg"),
        (f"rgb-{side}.jpg", raster(np.stack([grey8, grey8[::-1], grey8.T], -1), "JPEG",
                                   quality=90), "jpeg"),
        (f"grey16-{side}.png", raster(grey16, "PNG"), "png"),
        (f"grey-{side}.tif", raster(grey8, "TIFF"), "tiff"),
    ]


def _memory_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _decode_in_child(connection, name: str, data: bytes, max_pixels: int) -> None:
    """Decode one file in a forked child: outcome, seconds and peak RSS above the start."""
    from ml_backend.data.decode import ScanDecodeError, decode_scan

    try:  # reset this process's peak RSS (VmHWM) to its current RSS
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass
    start_kib = _memory_kib("VmRSS")
    started = time.perf_counter()
    try:
        decoded = decode_scan(data, name=name, salt="bench-salt-0123456789", max_pixels=max_pixels)
        outcome, detail = "decoded", f"{decoded.width}x{decoded.height}"
        pixels = decoded.width * decoded.height * decoded.num_frames
    except ScanDecodeError as exc:
        outcome, detail, pixels = "refused", str(exc), 0
    except BaseException as exc:  # noqa: BLE001 - what escapes is the finding
        outcome, detail, pixels = "error", f"{type(exc).__name__}: {exc}"[:300], 0
    seconds = time.perf_counter() - started
    peak_kib = _memory_kib("VmHWM")
    connection.send({"outcome": outcome, "detail": detail, "seconds": round(seconds, 4),
                     "peak_rss_mb": round(peak_kib / 1024, 1),
                     "peak_above_start_mb": round(max(0, peak_kib - start_kib) / 1024, 1),
                     "pixels": pixels})
    connection.close()


def decode_bench(*, max_pixels: int = 64_000_000, timeout: float = 120.0,
                 side: int = 4096) -> dict:
    """Every decode bomb and every valid scan (ours and pydicom's bundled files), each in
    a forked child process so its time and peak RSS are its own."""
    import multiprocessing
    import warnings

    import pydicom

    from ml_backend.data.decode import decode_scan

    warnings.filterwarnings("ignore")
    for name, data, _category in valid_corpus(64):   # load decoders and plugins before forking
        decode_scan(data, name=name, salt="bench-salt-0123456789")
    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    bundled = [(p.name, p.read_bytes(), "pydicom") for p in sorted(folder.iterdir())
               if p.suffix == ".dcm" and p.stat().st_size < 30_000_000]
    groups = {"bomb": decode_bomb_corpus(), "valid": valid_corpus(side), "pydicom": bundled}
    context = multiprocessing.get_context("fork")
    results: dict[str, list[dict]] = {}
    for group, corpus in groups.items():
        results[group] = []
        for name, data, category in corpus:
            receive, send = context.Pipe(duplex=False)
            child = context.Process(target=_decode_in_child, args=(send, name, data, max_pixels))
            child.start()
            send.close()
            row = {"name": name, "category": category, "bytes": len(data)}
            if receive.poll(timeout):
                row.update(receive.recv())
            else:
                row.update(outcome="timeout", detail=f"over {timeout:.0f} s")
            child.join(5)
            if child.is_alive():
                child.kill()
                child.join()
            if "outcome" in row and row["outcome"] not in ("decoded", "refused", "error",
                                                            "timeout"):
                row["outcome"] = "died"
            results[group].append(row)
            print(f"{group:7s} {name[:40]:40s} {len(data):>11,} B  {row['outcome']:8s} "
                  f"{row.get('seconds', float('nan')):7.3f} s  "
                  f"{row.get('peak_above_start_mb', float('nan')):7.1f} MB  "
                  f"{row['detail'][:70]}", flush=True)
    bombs = results["bomb"]
    refused = [r for r in bombs if r["outcome"] == "refused"]
    slowest = max(bombs, key=lambda r: r.get("seconds", 1e9))
    hungriest = max(bombs, key=lambda r: r.get("peak_above_start_mb", 1e9))
    valid = [r for r in results["valid"] + results["pydicom"] if r["outcome"] == "decoded"]
    per_pixel = {r["name"]: round(r["peak_above_start_mb"] * 2**20 / r["pixels"], 1)
                 for r in results["valid"] if r["outcome"] == "decoded" and r["pixels"]}
    summary = {
        "max_pixels": max_pixels,
        "bombs": len(bombs), "bombs_refused": len(refused),
        "bombs_not_refused": [r["name"] for r in bombs if r["outcome"] != "refused"],
        "worst_refusal_s": slowest.get("seconds"), "worst_refusal": slowest["name"],
        "peak_rss_above_start_mb": hungriest.get("peak_above_start_mb"),
        "peak_rss_file": hungriest["name"],
        "peak_rss_mb": max(r.get("peak_rss_mb", 0) for r in bombs),
        "valid_decoded": len([r for r in results["valid"] if r["outcome"] == "decoded"]),
        "valid": len(results["valid"]),
        "pydicom_decoded": len([r for r in results["pydicom"] if r["outcome"] == "decoded"]),
        "pydicom_files": len(results["pydicom"]),
        "errors": [r["name"] for group in results.values() for r in group
                   if r["outcome"] in ("error", "timeout", "died")],
        "valid_peak_bytes_per_pixel": per_pixel,
        "valid_seconds": {r["name"]: r["seconds"] for r in results["valid"] if "seconds" in r},
        "worst_valid_s": max((r["seconds"] for r in valid), default=None),
    }
    return {"summary": summary, "files": results}


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


# --- a throwaway Django project ---------------------------------------------------------------


def setup_django(workdir: Path, *, log_level: str = "ERROR", extra_env: dict | None = None) -> None:
    """Settings for a throwaway SQLite project under ``workdir`` (``FUZZ_DATABASE_URL``
    overrides the database), production-like (``DEBUG=0``); migrate it."""
    os.environ.update({
        "DATABASE_URL": os.environ.get("FUZZ_DATABASE_URL", f"sqlite:///{workdir / 'db.sqlite3'}"),
        "MEDIA_ROOT": str(workdir / "media"), "ARTIFACTS_ROOT": str(workdir / "artifacts"),
        "INCOMING_ROOT": str(workdir / "incoming"), "DJANGO_SETTINGS_MODULE": "medsite.settings",
        "LOG_LEVEL": log_level,
        # production settings: the error pages users get, not Django's debug pages
        "DEBUG": "0", "SECRET_KEY": "fuzz-" + "x" * 50, "DEID_SALT": "fuzz-deid-salt-0123456789",
        "ALLOWED_HOSTS": "testserver", "SECURE_SSL_REDIRECT": "0",
        "SESSION_COOKIE_SECURE": "0", "CSRF_COOKIE_SECURE": "0", **(extra_env or {})})
    for name in ("CELERY_BROKER_URL", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY"):
        os.environ.pop(name, None)
    import warnings

    import django

    warnings.filterwarnings("ignore")
    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def _peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# --- hostile requests (--target requests) ----------------------------------------------------
#
# Every JSON endpoint through Django's test client on a throwaway project: the label page's
# answer (a member's session), the Label Studio webhook (shared secret), the ML backend's
# predict / webhook / setup (HTTP Basic). Bodies: the suite's classes (bench/hostile.py,
# tests/test_hostile_requests.py), valid requests with one odd field, bodies at the size
# limit; then non-ASCII credentials and secrets, and Label Studio annotation ids replayed
# through another project's webhook.

ML_AUTH = "labelstudio:fuzz-ml-backend-password"
WEBHOOK_SECRET = "fuzz-webhook-secret-0123456789"
_WRITE = re.compile(
    r'^\s*(?:INSERT\s+(?:OR\s+\w+\s+)?INTO|UPDATE|DELETE\s+FROM|REPLACE\s+INTO)\s+"?([\w.]+)"?',
    re.I)


class WriteLog:
    """A database execute wrapper: every INSERT / UPDATE / DELETE with its table and row
    count, and every text parameter PostgreSQL refuses (a NUL character; ``\\u0000`` in a
    jsonb value). On SQLite (``emulate_postgres``) such a statement raises the
    ``DataError`` psycopg raises, so a SQLite run shows PostgreSQL's answer to it."""

    def __init__(self, *, emulate_postgres: bool = True):
        self.emulate = emulate_postgres
        self.writes: list[tuple[str, int]] = []
        self.postgres_refusals: list[str] = []

    def reset(self) -> None:
        self.writes, self.postgres_refusals = [], []

    @staticmethod
    def _refused(params) -> str | None:
        rows = params if isinstance(params, (list, tuple)) else [params]
        for value in rows:
            if isinstance(value, (list, tuple)):
                found = WriteLog._refused(value)
                if found:
                    return found
            elif isinstance(value, str):
                if "\x00" in value:
                    return "PostgreSQL text fields cannot contain NUL (0x00) bytes"
                if value[:1] in "{[" and "\\u0000" in value:
                    return "unsupported Unicode escape sequence (\\u0000 in a jsonb value)"
        return None

    def __call__(self, execute, sql, params, many, context):
        from django.db import connection
        from django.db.utils import DataError

        reason = self._refused(params) if params else None
        if reason:
            self.postgres_refusals.append(f"{reason}: {sql[:80]}")
            if self.emulate and connection.vendor != "postgresql":
                raise DataError(reason)
        result = execute(sql, params, many, context)
        match = _WRITE.match(sql)
        if match:
            rowcount = getattr(context.get("cursor"), "rowcount", None)
            if rowcount is None or rowcount < 0 or (rowcount == 0 and match.group(0)[
                    :10].upper().lstrip().startswith("INSERT")):
                # sqlite3 reports no count for INSERT ... RETURNING: count what was sent
                rowcount = len(params) if many else 1
            self.writes.append((match.group(1), rowcount))
        return result


def _brain_scans(project, workdir: Path, per_class: int = 3) -> dict[int, str]:
    """A few brain-MRI fixture scans (pool, unlabeled) and labeled eval scans, as the
    suite's ``_import_brain``; returns {pool scan id: true class}."""
    import shutil

    from annotator import services

    truth = {}
    for name in ("no_tumor", "pituitary_tumor"):
        for split in ("pool", "eval"):
            folder = workdir / f"brain-{project.pk}-{split}-{name}"
            folder.mkdir(parents=True, exist_ok=True)
            fixtures = sorted((REPO / "fixtures" / "brain_mri" / split / name).iterdir())
            for path in fixtures[:per_class]:
                shutil.copy(path, folder / path.name)
            job = services.import_job_create(project=project, source=str(folder), layout="flat",
                                             dataset_name="brain", split=split,
                                             default_label=name if split == "eval" else "")
            services.import_job_run(job_id=job.pk)
            if split == "pool":
                truth.update({s.pk: name for s in project.scans.filter(import_job=job)})
    return truth


def _fake_classifier(project) -> None:
    """An active classifier with a stored prediction for every scan (no artifacts are
    needed: predict answers from stored predictions)."""
    from ml_backend.models import ModelVersion, Prediction

    classes = list(project.label_classes.order_by("pk"))
    model = ModelVersion.objects.create(
        project=project, kind="classifier", version=f"fuzz-clf-{project.pk}-{time.time_ns()}",
        status="active", config={"classes": [{"id": c.pk, "name": c.name} for c in classes]})
    for index, scan in enumerate(project.scans.order_by("pk")):
        best = classes[index % len(classes)]
        Prediction.objects.create(scan=scan, model_version=model, predicted_class=best,
                                  probabilities={str(best.pk): 0.8}, confidence=0.8,
                                  uncertainty=0.2)
    project.active_model = model
    project.save(update_fields=["active_model"])


class RequestRecorder:
    """Sends requests, times them and checks each answer: no 5xx, nothing written by a
    refusal (a 4xx, or a 5xx), and what PostgreSQL would refuse."""

    def __init__(self):
        import traceback

        from django.db import connection

        self.connection, self.traceback = connection, traceback
        self.log = WriteLog()
        self.statuses: Counter = Counter()
        self.by_endpoint: dict[str, Counter] = {}
        self.by_category: dict[str, Counter] = {}
        self.times: list[float] = []
        self.worst = {"seconds": 0.0}
        self.server_errors: list[dict] = []
        self.refused_writes: list[dict] = []
        self.accepted_writes: Counter = Counter()
        self.postgres_refusals: list[dict] = []
        self.count = 0

    def _where(self, exc: BaseException) -> str:
        """The exception and the project's own frames it passed through (not Django's)."""
        frames = [f"{Path(f.filename).relative_to(REPO)}:{f.lineno} {f.name}: {f.line}"
                  for f in self.traceback.extract_tb(exc.__traceback__)
                  if str(REPO) in f.filename and "/.venv/" not in f.filename
                  and "bench/fuzz.py" not in f.filename]
        return "\n".join(frames[-8:] + [f"{type(exc).__module__}.{type(exc).__name__}: {exc}"])

    def send(self, client, method: str, path: str, endpoint: str, category: str,
             body: bytes | str = b"", content_type: str = "application/json", **headers):
        self.log.reset()
        began = time.perf_counter()
        error = None
        with self.connection.execute_wrapper(self.log):
            try:
                if method == "GET":
                    response = client.get(path, **headers)
                else:
                    response = client.generic(method, path, body, content_type=content_type,
                                              **headers)
                status = response.status_code
            except Exception as exc:       # the test client re-raises a view's exception
                response, status = None, 500
                error = self._where(exc)
        seconds = time.perf_counter() - began
        self.count += 1
        self.times.append(seconds)
        self.statuses[status] += 1
        self.by_endpoint.setdefault(endpoint, Counter())[status] += 1
        self.by_category.setdefault(category, Counter())[status] += 1
        raw = body if isinstance(body, bytes) else body.encode("utf-8", "surrogatepass")
        row = {"endpoint": endpoint, "category": category, "status": status,
               "seconds": round(seconds, 4), "body": repr(raw[:160])[:240],
               "body_bytes": len(raw)}
        if seconds > self.worst["seconds"]:
            self.worst = dict(row)
        if status >= 500:
            row["answer"] = (response.content[:300].decode("utf-8", "replace")
                             if response is not None else "")
            row["traceback"] = error or ""
            self.server_errors.append(row)
        written = sum(count for _, count in self.log.writes)
        if written and status >= 400:        # a refusal or a server error: nothing kept
            self.refused_writes.append(dict(row, writes=self.log.writes[:10]))
        elif written:
            for table, count in self.log.writes:
                self.accepted_writes[f"{endpoint}:{table}"] += count
        if self.log.postgres_refusals:
            self.postgres_refusals.append(dict(row, refusals=self.log.postgres_refusals[:3],
                                               traceback=error or ""))
        return response, status

    def summary(self) -> dict:
        ordered = sorted(self.times)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else 0.0
        return {"requests": self.count, "status_codes": {str(k): v for k, v in sorted(
                    self.statuses.items())},
                "by_endpoint": {e: {str(k): v for k, v in sorted(c.items())}
                                for e, c in self.by_endpoint.items()},
                "by_category": {e: {str(k): v for k, v in sorted(c.items())}
                                for e, c in sorted(self.by_category.items())},
                "server_errors": len(self.server_errors),
                "rows_written_by_refused_requests": sum(
                    sum(n for _, n in r["writes"]) for r in self.refused_writes),
                "rows_written_by_accepted_requests": dict(self.accepted_writes),
                "postgres_would_refuse": len(self.postgres_refusals),
                "worst_seconds": round(ordered[-1], 4) if ordered else 0.0,
                "p99_seconds": round(p99, 4),
                "median_seconds": round(ordered[len(ordered) // 2], 4) if ordered else 0.0,
                "slowest": self.worst}


def _basic(credentials: str) -> str:
    import base64

    return "Basic " + base64.b64encode(credentials.encode("utf-8", "surrogatepass")).decode()


def _wsgi(text: str) -> str:
    """A header value as a WSGI server hands it to Django: the UTF-8 bytes read as Latin-1."""
    return text.encode("utf-8", "surrogatepass").decode("latin-1")


def _ls_event(scan_id: int, annotation_id, choice: str, ls_project, *, bulk: bool = False) -> dict:
    annotation = {"id": annotation_id, "lead_time": 2.0,
                  "completed_by": {"email": "fuzz-reader@example.org"},
                  "result": [{"from_name": "diagnosis", "to_name": "image", "type": "choices",
                              "value": {"choices": [choice]}}]}
    task = {"id": 900, "data": {"scan_id": scan_id}}
    event = {"action": "ANNOTATIONS_CREATED" if bulk else "ANNOTATION_CREATED"}
    if ls_project is not None:
        event["project"] = {"id": ls_project}
    if bulk:
        event.update(annotations=[dict(annotation, task=900)], tasks=[task])
    else:
        event.update(annotation=annotation, task=task)
    return event


def requests_bench(*, inputs: int, seed: int, workdir: Path) -> dict:
    """The hostile-request run; returns the summary (see the module's docstring)."""
    import base64
    import random

    from django.contrib.auth import get_user_model
    from django.test import Client, override_settings

    from annotator import services
    from annotator.models import Annotation, LabelClass
    from bench import hostile
    from medsite import jsonbody

    started = time.perf_counter()
    stamp = time.time_ns()
    a = services.project_create(name=f"fuzz-requests-a-{stamp}")
    b = services.project_create(name=f"fuzz-requests-b-{stamp}")
    truth_a, truth_b = _brain_scans(a, workdir), _brain_scans(b, workdir)
    for project, ls_id in ((a, 7), (b, 8)):
        project.label_studio_project_id = ls_id
        project.save(update_fields=["label_studio_project_id"])
    _fake_classifier(b)
    member = get_user_model().objects.create_user(f"fuzz-member-{stamp}", "fuzz-reader@example.org",
                                                  password="fuzz-pass-1")
    services.membership_set(project=a, user=member, role="clinician")
    logged_in, anonymous = Client(), Client()
    logged_in.force_login(member)
    classes_a = {c.name: c for c in LabelClass.objects.filter(project=a)}
    rng = random.Random(seed)
    recorder = RequestRecorder()
    basic = {"HTTP_AUTHORIZATION": _basic(ML_AUTH)}
    secret = {"HTTP_X_MEDLABEL_SECRET": WEBHOOK_SECRET}
    ml_endpoints = ("predict", "ml_webhook", "setup")
    ml_path = {"predict": "predict", "ml_webhook": "webhook", "setup": "setup"}
    categories: Counter = Counter()
    next_id = [10_000]

    def ids_for(project_scans: dict, other_scans: dict) -> dict:
        scan_id = rng.choice(sorted(project_scans))
        next_id[0] += 1
        return {"scan_id": scan_id, "other_scan_id": rng.choice(sorted(other_scans)),
                "class_id": classes_a[truth_a[scan_id]].pk if scan_id in truth_a else 0,
                "class_name": project_scans[scan_id], "annotation_id": next_id[0],
                "ls_project": 7, "model_version": "none"}

    def send(endpoint: str, category: str, body, *, project=None, content_type="application/json"):
        categories[category] += 1
        if endpoint == "answer":
            scan_id = rng.choice(sorted(truth_a))
            return recorder.send(logged_in, "POST", f"/projects/{a.pk}/label/{scan_id}/answer/",
                                 endpoint, category, body, content_type)
        if endpoint == "ls_webhook":
            project = project or (a if rng.random() < 0.8 else b)
            return recorder.send(anonymous, "POST", f"/labelstudio/{project.pk}/webhook/",
                                 endpoint, category, body, content_type, **secret)
        project = project or rng.choice([a, b])
        return recorder.send(anonymous, "POST", f"/ml/{project.pk}/{ml_path[endpoint]}",
                             endpoint, category, body, content_type, **basic)

    # 0. warm-up, not counted: the first request of each kind loads code a running server
    #    has loaded long before (the Label Studio SDK on a numeric completed_by: ~1 s once)
    cold = RequestRecorder()
    warm_scan = min(truth_a)
    warm_event = _ls_event(warm_scan, 1, truth_a[warm_scan], 7)
    warm_event["annotation"]["completed_by"] = 5
    for path, body, client_, headers in (
            (f"/labelstudio/{a.pk}/webhook/", json.dumps(warm_event), anonymous, secret),
            (f"/projects/{a.pk}/label/{warm_scan}/answer/", '{"outcome": "skip"}', logged_in, {}),
            (f"/ml/{b.pk}/predict", '{"tasks": [{"id": 1, "data": {"scan_id": %d}}]}'
             % min(truth_b), anonymous, basic),
            (f"/ml/{a.pk}/webhook", '{"action": "x"}', anonymous, basic),
            (f"/ml/{a.pk}/setup", "{}", anonymous, basic)):
        cold.send(client_, "POST", path, "warm-up", "warm-up", body, **headers)
    Annotation.objects.filter(scan__project=a).delete()

    # 1. hostile bodies: the suite's classes to every endpoint; one odd field in a valid
    #    request to its own endpoint; bodies at the size limit; form-encoded answers
    for _ in range(inputs):
        roll = rng.random()
        if roll < 0.45:
            category, body = hostile.hostile_body(rng)
            for endpoint in ("answer", "ls_webhook", *ml_endpoints):
                send(endpoint, category, body)
        elif roll < 0.9:
            endpoint = rng.choice(["answer", "answer", "ls_webhook", "ls_webhook", "predict",
                                   "ml_webhook", "setup"])
            project_scans, other = (truth_a, truth_b) if endpoint in ("answer", "ls_webhook") \
                or rng.random() < 0.5 else (truth_b, truth_a)
            category, body = hostile.structured_body(rng, endpoint, ids_for(project_scans, other))
            send(endpoint, category, body, project=a if project_scans is truth_a else b)
        elif roll < 0.95:
            category, body = hostile.oversized_body(rng, jsonbody.MAX_BYTES)
            send(rng.choice(["answer", "ls_webhook", *ml_endpoints]), category, body)
        else:
            from urllib.parse import quote

            value = rng.choice(["%00", "%ED%A0%80", "%FF%FE", quote("\u202e1"), "9" * 50,
                                "1e400", "-1", "", "%C0%AF", quote("é" * 200)])
            field_name = rng.choice(["class_id", "outcome", "duration_ms", "shown_confidence",
                                     "submission_id", "query_round", "shown_model_version"])
            body = f"outcome=label&class_id={classes_a['no_tumor'].pk}&{field_name}={value}"
            send("answer", f"form:{field_name}", body,
                 content_type=rng.choice(["application/x-www-form-urlencoded", "text/plain"]))

    # 1b. every text field once with a NUL and once with a lone surrogate (what neither
    #     PostgreSQL nor SQLite can store), deterministically
    for endpoint, keys in hostile.TEXT_FIELDS.items():
        for key in keys:
            for value in hostile.UNSTORABLE:
                project_scans, other = (truth_a, truth_b) if endpoint != "predict" \
                    else (truth_b, truth_a)
                category, body = hostile.structured_body(
                    rng, endpoint, ids_for(project_scans, other), key=key, value=value)
                send(endpoint, category.replace("structured:", "unstorable:"), body,
                     project=a if project_scans is truth_a else b)

    # 2. credentials and secrets: non-ASCII, control characters, surrogates, as sent by a
    #    client (base64 of UTF-8), not base64 at all, or as a WSGI server decodes them
    wrongly_accepted, rightly_refused, auth_checks = [], 0, 0
    for _ in range(max(20, inputs // 5)):
        user, password = hostile.hostile_text(rng, 12), hostile.hostile_text(rng, 12)
        credentials = rng.choice([f"{user}:{password}", f"{ML_AUTH}{user}",
                                  ML_AUTH[:-1] + password[:1], f"{user}:{ML_AUTH.split(':')[1]}"])
        given = hostile.hostile_text(rng, 40, surrogates=False)
        given = rng.choice([given, WEBHOOK_SECRET + given, WEBHOOK_SECRET[:-1] + given[:1],
                            given + WEBHOOK_SECRET])
        headers = [("b64", _basic(credentials)), ("raw", "Basic " + credentials),
                   ("wsgi", _wsgi("Basic " + credentials)),
                   ("scheme", rng.choice(["basic ", "Bearer ", "Basic  ", "Basic\t", "Basic "])
                    + base64.b64encode(credentials.encode("utf-8", "surrogatepass")).decode()
                    + rng.choice(["", "=", "==", " ", "\u00e9", "\x00"]))]
        for form, header in headers:
            expect_ok = (credentials == ML_AUTH and form in ("b64", "wsgi")
                         and header == _basic(ML_AUTH))
            for method, name in (("GET", "health"), ("POST", "predict")):
                _, status = recorder.send(anonymous, method, f"/ml/{a.pk}/{name}",
                                          f"auth:{name}", f"auth:{form}", b"{}",
                                          HTTP_AUTHORIZATION=header)
                auth_checks += 1
                if 200 <= status < 300 and not expect_ok:
                    wrongly_accepted.append({"form": form, "header": repr(header)[:120],
                                             "status": status})
                rightly_refused += status == 401
        for form, value in (("raw", given), ("wsgi", _wsgi(given))):
            _, status = recorder.send(anonymous, "POST", f"/labelstudio/{a.pk}/webhook/",
                                      "auth:ls_webhook", f"secret:{form}", b"{}",
                                      HTTP_X_MEDLABEL_SECRET=value)
            auth_checks += 1
            if 200 <= status < 300 and value != WEBHOOK_SECRET:
                wrongly_accepted.append({"form": form, "secret": repr(value)[:120],
                                         "status": status})
            rightly_refused += status == 403
    right = {"ml": recorder.send(anonymous, "GET", f"/ml/{a.pk}/health", "auth:health",
                                 "auth:right", **basic)[1],
             "webhook": recorder.send(anonymous, "POST", f"/labelstudio/{a.pk}/webhook/",
                                      "auth:ls_webhook", "secret:right", b"{}", **secret)[1]}
    # configured credentials that are themselves non-ASCII
    unicode_auth, unicode_secret = "ärztin:pässwört-秘密", "geheim-ß-秘密-🔐"
    with override_settings(ML_BACKEND_BASIC_AUTH=unicode_auth,
                           LABEL_STUDIO_WEBHOOK_SECRET=unicode_secret):
        right["ml_non_ascii_b64_utf8"] = recorder.send(
            anonymous, "GET", f"/ml/{a.pk}/health", "auth:health", "auth:non-ascii",
            HTTP_AUTHORIZATION=_basic(unicode_auth))[1]
        right["webhook_non_ascii_as_str"] = recorder.send(
            anonymous, "POST", f"/labelstudio/{a.pk}/webhook/", "auth:ls_webhook",
            "secret:non-ascii", b"{}", HTTP_X_MEDLABEL_SECRET=unicode_secret)[1]
        right["webhook_non_ascii_as_wsgi_latin1"] = recorder.send(
            anonymous, "POST", f"/labelstudio/{a.pk}/webhook/", "auth:ls_webhook",
            "secret:non-ascii-wsgi", b"{}", HTTP_X_MEDLABEL_SECRET=_wsgi(unicode_secret))[1]

    # 3. a Label Studio annotation id replayed through the other project's webhook
    rewrites, replays, replay_setup_failures = [], 0, []
    scan_a, scan_b = min(truth_a), min(truth_b)
    annotation_ids = [41, 10**6, 2**31 + 5] + [rng.choice([rng.randrange(1, 2**31),
                                                          rng.randrange(2**31, 2**62)])
                                               for _ in range(max(0, inputs // 30 - 3))]
    for annotation_id in annotation_ids:
        truth = truth_a[scan_a]
        other = "pituitary_tumor" if truth == "no_tumor" else "no_tumor"
        _, status = recorder.send(anonymous, "POST", f"/labelstudio/{a.pk}/webhook/",
                                  "ls_webhook", "replay:original",
                                  json.dumps(_ls_event(scan_a, annotation_id, truth, 7)), **secret)
        stored = Annotation.objects.filter(source="label_studio",
                                           external_id=str(annotation_id)).first()
        if status != 200 or stored is None:
            replay_setup_failures.append({"id": annotation_id, "status": status})
            continue
        before = (stored.scan_id, stored.label_class_id, stored.outcome, stored.reader_id,
                  stored.note, stored.duration_ms)
        on_a_before = Annotation.objects.filter(scan__project=a).count()
        for scan_id in (scan_a, scan_b):
            for ls_project in (8, 7, None, "8"):
                for sent_id in (annotation_id, str(annotation_id)):
                    for bulk in (False, True):
                        recorder.send(anonymous, "POST", f"/labelstudio/{b.pk}/webhook/",
                                      "ls_webhook", "replay:other-project", json.dumps(
                                          _ls_event(scan_id, sent_id, other, ls_project,
                                                    bulk=bulk)), **secret)
                        replays += 1
        stored.refresh_from_db()
        after = (stored.scan_id, stored.label_class_id, stored.outcome, stored.reader_id,
                 stored.note, stored.duration_ms)
        in_b = Annotation.objects.filter(scan__project=b, source="label_studio",
                                         external_id=str(annotation_id)).count()
        on_a_after = Annotation.objects.filter(scan__project=a).count()
        if after != before or in_b or on_a_after != on_a_before:
            rewrites.append({"id": annotation_id, "before": repr(before), "after": repr(after),
                             "copies_in_b": in_b, "new_on_a": on_a_after - on_a_before})

    summary = recorder.summary()
    summary.update({
        "inputs": inputs, "seconds": round(time.perf_counter() - started, 1),
        "categories": dict(categories.most_common()),
        "auth": {"checks": auth_checks, "refused": rightly_refused,
                 "wrongly_accepted": len(wrongly_accepted), "right_credentials": right,
                 "first_wrongly_accepted": wrongly_accepted[:10]},
        "replay": {"annotation_ids": len(annotation_ids), "replayed_requests": replays,
                   "cross_project_rewrites": len(rewrites), "rewrites": rewrites[:10],
                   "setup_failures": replay_setup_failures[:10]},
        "warm_up": {"requests": cold.count, "worst_seconds": cold.summary()["worst_seconds"],
                    "server_errors": len(cold.server_errors),
                    "statuses": {str(k): v for k, v in cold.statuses.items()}},
        "peak_rss_mb": _peak_rss_mb(),
        "first_server_errors": recorder.server_errors[:25] + cold.server_errors[:5],
        "first_refused_writes": recorder.refused_writes[:10],
        "first_postgres_refusals": recorder.postgres_refusals[:10],
    })
    # distinct server errors by (endpoint, exception line): the findings, deduplicated
    kinds: Counter = Counter()
    for row in recorder.server_errors:
        lines = (row.get("traceback") or "").strip().splitlines()
        origin = lines[-2].split(" ", 1)[0] if len(lines) > 1 else "?"
        kinds[f"{row['endpoint']} at {origin}: {(lines or [''])[-1][:120]}"] += 1
    summary["server_error_kinds"] = dict(kinds.most_common())
    return summary


# --- PHI markers end to end (--target phi) ----------------------------------------------------
#
# Files with a unique marker in every container (bench/hostile.py: phi_corpus), imported
# through the import service (a folder, a labels CSV with unmatched rows, a CSV source, a
# single-file source) and the upload view; then every marker is searched for (plain, UTF-16,
# NUL-stripped, inflated) in the database dump, every file under MEDIA_ROOT, ARTIFACTS_ROOT
# and INCOMING_ROOT, the logs, a project backup, Label Studio payloads and the pages.


def phi_write(folder: Path, files) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for item in files:
        path = folder / item.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(item.data)


def phi_import(project, files, workdir: Path, rng) -> tuple[list, list]:
    """Import ``files`` through the import service as a folder, with a labels CSV that
    names DICOM files which are not there (a warning counts them). Returns (jobs, extra
    plants: markers only in names)."""
    from annotator import services
    from bench.hostile import PhiFile, new_marker

    jobs, extra = [], []
    source = workdir / "phi-source"
    phi_write(source, files)
    unmatched = [new_marker(rng) for _ in range(3)]
    labels = workdir / "phi-labels.csv"
    dicom = next(f for f in files if f.kind == "dicom_lut_sequences")
    labels.write_text("filename,label\n" + f"{dicom.name},no_tumor\n"
                      + f"{unmatched[0]}UnmatchedRow^Doe.dcm,no_tumor\n"
                      + f"{unmatched[1]}UnmatchedNoExtension,no_tumor\n"
                      + f"sub/{unmatched[2]}UnmatchedInSub.dicom,pituitary_tumor\n")
    extra += [PhiFile(f"{m}{label}", b"", "labels_csv_unmatched_row", m, [], [label])
              for m, label in zip(unmatched, ("UnmatchedRow^Doe.dcm", "UnmatchedNoExtension",
                                              "UnmatchedInSub.dicom"))]
    job = services.import_job_create(project=project, source=str(source), layout="flat",
                                     dataset_name="phi", labels_csv=str(labels))
    jobs.append(services.import_job_run(job_id=job.pk))
    return jobs, extra


def phi_import_sources(project, workdir: Path, rng) -> tuple[list, list]:
    """The other source kinds, each with a DICOM name carrying a marker (and fresh DICOMs
    with their own plants, so they are imported, not duplicates): a CSV source listing a
    present and a missing DICOM, one DICOM file as the source, and a DICOM path that does
    not exist. Returns (jobs, plants)."""
    from annotator import services
    from bench.hostile import PhiFile, new_marker, phi_dicom_jpeg_frames, phi_dicom_plain

    jobs, extra = [], []
    listed = workdir / "phi-csv-source"
    listed.mkdir(parents=True, exist_ok=True)
    present, missing = new_marker(rng), new_marker(rng)
    data, labels = phi_dicom_plain(present, rng, size=10)
    (listed / f"{present}ListedPresent.dcm").write_bytes(data)
    (listed / "list.csv").write_text(f"filename,label\n{present}ListedPresent.dcm,\n"
                                     f"{missing}ListedMissing^Doe.dcm,\n")
    extra += [PhiFile(f"{present}ListedPresent.dcm", data, "csv_source_listed_dicom", present,
                      labels, ["ListedPresent.dcm"]),
              PhiFile(f"{missing}ListedMissing^Doe.dcm", b"", "csv_source_missing_dicom",
                      missing, [], ["ListedMissing^Doe.dcm"])]
    job = services.import_job_create(project=project, source=str(listed / "list.csv"),
                                     dataset_name="phi-csv")
    jobs.append(services.import_job_run(job_id=job.pk))
    # one DICOM file as the source, and a DICOM path that does not exist
    single, absent = new_marker(rng), new_marker(rng)
    one = workdir / "phi-single" / f"{single}SingleFile^Doe.dcm"
    one.parent.mkdir(parents=True, exist_ok=True)
    data, labels = phi_dicom_jpeg_frames(single, rng, frames=1)
    one.write_bytes(data)
    extra += [PhiFile(one.name, data, "single_file_source", single, labels,
                      ["SingleFile^Doe.dcm"]),
              PhiFile(f"{absent}AbsentFile^Doe.dcm", b"", "missing_file_source", absent, [],
                      ["AbsentFile^Doe.dcm"])]
    for path in (one, workdir / "phi-single" / f"{absent}AbsentFile^Doe.dcm"):
        job = services.import_job_create(project=project, source=str(path),
                                         dataset_name="phi-single")
        jobs.append(services.import_job_run(job_id=job.pk))
    return jobs, extra


def phi_upload(client, project, files, rng, commit_scope=None) -> tuple[list, list]:
    """Post ``files`` to the upload view in one request (plus a DICOM-named junk file and an
    empty one, refused by the page), follow the redirect, then post only refusals (a 400
    page listing them). Returns ([(where, page bytes)], extra plants)."""
    import contextlib

    from django.core.files.uploadedfile import SimpleUploadedFile
    from django.urls import reverse

    from bench.hostile import PhiFile, new_marker

    junk, empty = new_marker(rng), new_marker(rng)
    extra = [PhiFile(f"{junk}UploadJunk^Doe.dcm", b"not a scan, just text\n" * 8,
                     "upload_refused_junk", junk, [], ["UploadJunk^Doe.dcm"], expect="refused"),
             PhiFile(f"{empty}UploadEmpty^Doe.dcm", b"", "upload_refused_empty", empty, [],
                     ["UploadEmpty^Doe.dcm"], expect="refused")]
    url = reverse("annotator:upload", args=[project.pk])
    pages = []

    def post(items):
        uploads = [SimpleUploadedFile(item.name.rsplit("/", 1)[-1], item.data,
                                      "application/octet-stream") for item in items]
        with (commit_scope or contextlib.nullcontext)():
            return client.post(url, {"dataset": "phi-upload", "split": "pool", "label": "",
                                     "files": uploads})

    response = post(list(files) + extra)
    pages.append((f"upload answer ({response.status_code})", response.content))
    if response.status_code == 302:
        followed = client.get(response["Location"])
        pages.append((f"upload redirect {response['Location']}", followed.content))
    response = post(extra)
    pages.append((f"upload refusal page ({response.status_code})", response.content))
    return pages, extra


def phi_locations(projects, client, *, logs: dict[str, str], workdir: Path):
    """``(where, data, inflate)`` for every place a marker must not be (``logs``: name →
    captured log text)."""
    import io as _io
    import tarfile as _tarfile

    from django.conf import settings
    from django.contrib.sessions.models import Session
    from django.core.management import call_command

    from annotator.backup import export_project
    from annotator.label_studio import LabelStudioError, _task_data, labeling_config
    from annotator.models import ImportJob, Scan

    dump = _io.StringIO()
    call_command("dumpdata", stdout=dump)
    yield "database dump (dumpdata)", dump.getvalue(), False
    sessions = [json.dumps(s.get_decoded(), default=str) for s in Session.objects.all()]
    yield "database: decoded sessions", "\n".join(sessions), False
    for root_name in ("MEDIA_ROOT", "ARTIFACTS_ROOT", "INCOMING_ROOT"):
        root = Path(getattr(settings, root_name))
        paths = sorted(p for p in root.rglob("*")) if root.exists() else []
        yield f"{root_name} file names", "\n".join(p.relative_to(root).as_posix()
                                                   for p in paths), False
        for path in paths:
            if path.is_file():
                yield f"{root_name}/{path.relative_to(root).as_posix()}", path.read_bytes(), True
    for name, text in logs.items():
        yield name, text, False
    for project in projects:
        archive = workdir / f"phi-backup-{project.pk}.tar.gz"
        export_project(project, archive)
        with _tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            yield f"backup {archive.name}: member names", "\n".join(m.name for m in members), False
            for member in members:
                if member.isfile():
                    yield (f"backup {archive.name}: {member.name}",
                           tar.extractfile(member).read(), True)
        try:
            yield f"Label Studio labeling_config({project.pk})", labeling_config(project), False
        except LabelStudioError as exc:
            yield f"Label Studio labeling_config({project.pk}) refused", str(exc), False
        scans = list(Scan.objects.filter(project=project).order_by("pk"))
        yield (f"Label Studio task data ({len(scans)} scans of project {project.pk})",
               "\n".join(json.dumps(_task_data(s)) + json.dumps(_task_data(s, multi_set=True))
                         for s in scans), False)
        pages = [f"/projects/{project.pk}/", f"/projects/{project.pk}/?split=pool",
                 f"/projects/{project.pk}/jobs.json", f"/projects/{project.pk}/worklist/",
                 f"/projects/{project.pk}/upload/"]
        pages += [f"/imports/{job.pk}/" for job in ImportJob.objects.filter(project=project)]
        for scan in scans:
            pages += [f"/scans/{scan.pk}/", f"/projects/{project.pk}/label/{scan.pk}/?format=json",
                      f"/projects/{project.pk}/label/{scan.pk}/"]
        for path in pages:
            try:
                response = client.get(path)
                yield f"page {path} ({response.status_code})", response.content, False
            except Exception as exc:      # a page that crashes is reported, not a stop
                yield f"page {path} (raised {type(exc).__name__}: {exc})", b"", False


def phi_search(plants, projects, client, *, logs: dict[str, str], workdir: Path) -> dict:
    """Search every location for every plant's marker; ``hits`` must be empty."""
    from bench.hostile import marker_hits

    markers = sorted({p.marker for p in plants})
    owner = {}
    for plant in plants:
        owner.setdefault(plant.marker, plant)
    hits, places, page_errors = [], 0, []
    for where, data, inflate in phi_locations(projects, client, logs=logs, workdir=workdir):
        places += 1
        if where.startswith("page ") and ("raised" in where or "(5" in where):
            page_errors.append(where)
        for hit in marker_hits(markers, data, where, inflate=inflate):
            plant = owner[hit["marker"]]
            hit.update(kind=plant.kind, file=plant.name[:100])
            hits.append(hit)
    return {"places_searched": places, "hits": hits, "page_errors": page_errors}


def phi_bench(*, rounds: int, seed: int, workdir: Path) -> dict:
    import logging
    import random

    from django.contrib.auth import get_user_model
    from django.test import Client

    from annotator import services
    from bench.hostile import marker_hits, phi_corpus, planted_missing

    records: list[tuple[int, str]] = []

    class Capture(logging.Handler):
        def emit(self, record):
            try:
                records.append((record.levelno, self.format(record)))
            except Exception:   # noqa: BLE001 - a record that cannot be formatted
                records.append((record.levelno, repr(record.__dict__)))

    root = logging.getLogger()
    capture = Capture(logging.DEBUG)
    capture.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for handler in list(root.handlers):      # the console stays quiet; everything is captured
        root.removeHandler(handler)
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    logging.captureWarnings(True)
    started = time.perf_counter()
    rng = random.Random(seed)
    stamp = time.time_ns()
    project = services.project_create(name=f"fuzz-phi-{stamp}")
    admin = get_user_model().objects.create_user(f"phi-admin-{stamp}", password="fuzz-pass-1")
    services.membership_set(project=project, user=admin, role="admin")
    client = Client()
    client.force_login(admin)
    _brain_scans(project, workdir, per_class=2)        # classes, so the pages have them

    imported = phi_corpus(rng, repeat=rounds)
    uploaded = phi_corpus(rng, repeat=rounds)
    bad = {f.name: planted_missing(f) for f in imported + uploaded if planted_missing(f)}
    timings = {}
    began = time.perf_counter()
    jobs, extra_import = phi_import(project, imported, workdir, rng)
    more_jobs, extra_sources = phi_import_sources(project, workdir, rng)
    jobs += more_jobs
    extra_import += extra_sources
    timings["import_s"] = round(time.perf_counter() - began, 2)
    began = time.perf_counter()
    upload_pages, extra_upload = phi_upload(client, project, uploaded, rng)
    timings["upload_s"] = round(time.perf_counter() - began, 2)
    plants = imported + uploaded + extra_import + extra_upload
    # production logs at INFO (LOG_LEVEL); DEBUG records are searched on their own, so a
    # hit says which level lets it through
    logs = {"logs (INFO and above)": "\n".join(t for level, t in records if level >= logging.INFO),
            "logs (DEBUG records)": "\n".join(t for level, t in records if level < logging.INFO)}
    began = time.perf_counter()
    result = phi_search(plants, [project], client, logs=logs, workdir=workdir)
    for where, page in upload_pages:
        for hit in marker_hits(sorted({p.marker for p in plants}), page, f"page {where}",
                               inflate=False):
            owner = next(p for p in plants if p.marker == hit["marker"])
            hit.update(kind=owner.kind, file=owner.name[:100])
            result["hits"].append(hit)
    timings["search_s"] = round(time.perf_counter() - began, 2)
    from annotator.models import ImportJob, Scan

    all_jobs = list(ImportJob.objects.filter(project=project).order_by("pk"))
    by_kind: Counter = Counter()
    for hit in result["hits"]:
        where = hit["where"] if hit["where"].startswith("logs") else hit["where"].split(" (")[0]
        by_kind[f"{hit['kind']} @ {where[:60]}"] += 1
    return {
        "rounds": rounds, "files": len(imported) + len(uploaded),
        "containers": dict(Counter(f.kind for f in imported + uploaded)),
        "markers_planted": sum(len(p.labels) + len(p.name_labels) for p in plants),
        "distinct_markers": len({p.marker for p in plants}),
        "builder_failures": bad,
        "jobs": [{"id": j.pk, "status": j.status, "total": j.total, "imported": j.imported,
                  "duplicates": j.duplicates, "failed": j.failed, "last_error_chars":
                  len(j.last_error)} for j in all_jobs],
        "scans": Scan.objects.filter(project=project).count(),
        "places_searched": result["places_searched"] + len(upload_pages),
        "markers_found": len(result["hits"]),
        "found_by_kind_and_place": dict(by_kind.most_common()),
        "hits": result["hits"][:200],
        "page_errors": result["page_errors"],
        "log_records": len(records),
        "log_records_below_info": sum(1 for level, _ in records if level < logging.INFO),
        "seconds": round(time.perf_counter() - started, 1), **timings,
        "peak_rss_mb": _peak_rss_mb(),
    }


# --- the long run ----------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=10000)
    parser.add_argument("--target", choices=["both", "import", "upload", "requests", "phi"],
                        default="both",
                        help="requests: hostile JSON bodies, credentials and webhook replays "
                             "against every JSON endpoint; phi: the PHI-marker corpus end to end")
    parser.add_argument("--rounds", type=int, default=3,
                        help="phi: rounds of the marker corpus (each: every container, fresh "
                             "markers) through the import service and again through uploads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    parser.add_argument("--bombs", type=int, default=None,
                        help="randomised decode bombs (make_bomb_input) run after the inputs, "
                             "besides the fixed bomb corpus (default: inputs / 10)")
    parser.add_argument("--decode-only", action="store_true",
                        help="only decode_scan on the bomb corpus and valid scans, each file in "
                             "a child process (time, peak RSS); no Django")
    parser.add_argument("--max-pixels", type=int, default=64_000_000)
    args = parser.parse_args(argv)
    if args.decode_only:
        result = decode_bench(max_pixels=args.max_pixels)
        print(json.dumps(result["summary"], indent=2))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2))
        s = result["summary"]
        ok = (s["bombs_refused"] == s["bombs"] and not s["errors"]
              and s["valid_decoded"] == s["valid"] and s["worst_refusal_s"] < 1.0)
        return 0 if ok else 1

    workdir = Path(tempfile.mkdtemp(prefix="fuzz-"))
    if args.target in ("requests", "phi"):
        extra = {"ML_BACKEND_BASIC_AUTH": ML_AUTH, "LABEL_STUDIO_WEBHOOK_SECRET": WEBHOOK_SECRET}
        setup_django(workdir, log_level="DEBUG" if args.target == "phi" else "ERROR",
                     extra_env=extra)
        if args.target == "requests":
            import logging

            logging.disable(logging.CRITICAL)     # refusals are counted, not logged
            result = requests_bench(inputs=args.inputs, seed=args.seed, workdir=workdir)
            ok = not (result["server_errors"] or result["warm_up"]["server_errors"]
                      or result["rows_written_by_refused_requests"]
                      or result["replay"]["cross_project_rewrites"]
                      or result["auth"]["wrongly_accepted"] or result["postgres_would_refuse"]
                      or result["worst_seconds"] > 1.0)
            shown = {k: v for k, v in result.items() if not k.startswith("first_")}
        else:
            result = phi_bench(rounds=args.rounds, seed=args.seed, workdir=workdir)
            ok = not (result["markers_found"] or result["builder_failures"]
                      or result["page_errors"])
            shown = {k: v for k, v in result.items() if k != "hits"}
            shown["first_hits"] = result["hits"][:15]
        print(json.dumps(shown, indent=2, default=str))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2, default=str))
        return 0 if ok else 1
    import logging

    logging.disable(logging.CRITICAL)      # refusals are counted below, not logged
    setup_django(workdir)
    from django.contrib.auth import get_user_model
    from django.test import Client

    from annotator import services

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
    worst = {"seconds": 0.0}
    worst_bomb = {"seconds": 0.0}
    bombs = args.inputs // 10 if args.bombs is None else args.bombs
    fixed = decode_bomb_corpus()

    def inputs():
        for i in range(args.inputs):
            yield (args.seed * 1_000_003 + i, *make_input(args.seed * 1_000_003 + i))
        for index, (name, data, category) in enumerate(fixed):   # each through every target
            for _ in targets:
                yield (f"corpus:{index}", name, data, f"bomb:{category}")
        for j in range(bombs):
            seed = 7_000_000 + args.seed * 1_000_003 + j
            name, data, category = make_bomb_input(seed)
            yield (f"bomb:{seed}", name, data, f"bomb:{category}")

    import resource

    raised = {"mb": 0.0}
    for i, (seed, name, data, category) in enumerate(inputs()):
        target = targets[i % len(targets)]
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        began = time.perf_counter()
        if target == "import":
            outcome, problems = fuzz_import(project, folder, name, data)
        else:
            outcome, problems = fuzz_upload(client, project, name, data)
        seconds = time.perf_counter() - began
        if outcome == "refused" and seconds > worst["seconds"]:
            worst = {"seconds": round(seconds, 3), "seed": seed, "target": target,
                     "category": category, "name": name[:80]}
        if category.startswith("bomb:") and seconds > worst_bomb["seconds"]:
            worst_bomb = {"seconds": round(seconds, 3), "seed": seed, "target": target,
                          "outcome": outcome, "category": category, "name": name[:80]}
        grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
        if grew > raised["mb"]:   # the input that raised the process's peak RSS the most
            raised = {"mb": round(grew, 1), "seed": seed, "target": target, "outcome": outcome,
                      "category": category, "name": name[:80], "bytes": len(data)}
        count += 1
        outcomes[f"{target}:{outcome}"] += 1
        categories[category] += 1
        if problems:
            failures.append({"seed": seed, "target": target,
                             "name": name[:80], "category": category, "problems": problems[:5]})
            print(f"FAIL seed {failures[-1]['seed']} ({target}, {category}): {problems[:2]}",
                  flush=True)
        if (i + 1) % 500 == 0:
            print(f"{i + 1} inputs, {len(failures)} failures, "
                  f"{(i + 1) / (time.perf_counter() - started):.0f}/s", flush=True)
    summary = {"inputs": count, "failures": len(failures), "server_errors": sum(
        1 for f in failures if any("crash" in p or "answered 5" in p for p in f["problems"])),
        "outcomes": dict(outcomes), "categories": dict(categories),
        "seconds": round(time.perf_counter() - started, 1),
        # the slowest refusal (import job or upload request, end to end) and this process's
        # peak RSS over the whole run (each input runs in this one process)
        "worst_refusal": worst, "slowest_bomb": worst_bomb,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_raised_most_by": raised,
        "first_failures": failures[:20]}
    print(json.dumps({k: v for k, v in summary.items() if k != "first_failures"}, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
