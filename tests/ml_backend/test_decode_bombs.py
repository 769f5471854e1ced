"""Decode bombs: small files that would cost gigabytes or minutes to decode are refused from
their own headers, fast and in bounded memory, while normal files still decode.

The files come from bench/fuzz.py's builders (the same corpus the decode benchmark runs,
``python -m bench.fuzz --decode-only``), their parameters drawn here by hypothesis: deflated
DICOM of several inflation ratios, encapsulated JPEG / JPEG-LS / JPEG 2000 frames declaring
another size than Rows/Columns, truncated JPEGs declaring large sizes, TIFFs with many page
directories / directory loops / pages without dimensions, and frame or page counts over the
budget. Each refusal is timed with perf_counter and traced with tracemalloc; the asserted
bounds (5 s, 200 MB) are generous so a busy CI machine does not flake; the benchmark reports
the real figures (docs/reliability.md).
"""

from __future__ import annotations

import io
import time
import tracemalloc

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from PIL import Image

from bench import fuzz
from ml_backend.data import decode as decode_module
from ml_backend.data.decode import MAX_FRAMES, ScanDecodeError, decode_scan, probe_raw_dicom

SALT = "test-salt-0123456789"
BUDGET = 64_000_000  # IMPORT_MAX_PIXELS' default
SECONDS = 5.0  # every refusal takes well under 1 s (the benchmark's figure); CI gets slack
PEAK_BYTES = 200 * 2**20

BOMBS = hsettings(max_examples=12, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def refuse(data: bytes, name: str, *, max_pixels: int = BUDGET, match: str | None = None,
           **options) -> str:
    """Decode ``data`` expecting a refusal; assert its time and traced peak; the reason."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(ScanDecodeError, match=match) as caught:
            decode_scan(data, name=name, salt=SALT, max_pixels=max_pixels, **options)
        seconds = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    reason = str(caught.value)
    assert reason.strip()
    assert seconds < SECONDS, (name, seconds, reason)
    assert peak < PEAK_BYTES, (name, peak / 2**20, reason)
    return reason


# --- the fixed corpus (the probe's figures) -----------------------------------------------

CORPUS = fuzz.decode_bomb_corpus()  # ~1 s to build, ~10 MB


@pytest.mark.parametrize("name,data,category", CORPUS, ids=[name for name, _, _ in CORPUS])
def test_every_corpus_bomb_is_refused_fast_and_small(name, data, category):
    refuse(data, name)


def test_corpus_covers_every_class():
    assert {category for _, _, category in CORPUS} >= {
        "deflate_bomb", "frame_mismatch", "truncated_jpeg", "tiff_many_ifds", "tiff_loop",
        "tiff_no_dims", "frames_over_budget", "truncated_png", "j2k_tiles"}


# --- deflate bombs ----------------------------------------------------------------------------


@BOMBS
@given(mib=st.sampled_from([40, 100, 300, 1024]), where=st.sampled_from(["trailing", "pixels"]),
       noise=st.sampled_from([0, 1000, 30000]))
def test_deflate_bomb_after_or_inside_the_pixels(mib, where, noise):
    """Ratios from ~1000:1 (zeros) down to ~13:1 (noise): the cap is what a 64 x 64 image
    needs plus 1 MiB, whatever the ratio."""
    data = fuzz.deflate_bomb(mib, where=where, noise=noise)
    reason = refuse(data, "bomb.dcm", match="deflated DICOM inflates to more than")
    assert "64x64 image needs" in reason


@BOMBS
@given(mib=st.sampled_from([40, 100, 1024]), noise=st.sampled_from([0, 1000]))
def test_deflate_bomb_before_the_pixels(mib, noise):
    data = fuzz.deflate_bomb(mib, where="header", noise=noise)
    refuse(data, "bomb.dcm", match="before its pixel data")


@BOMBS
@given(mib=st.sampled_from([100, 300, 1024]))
def test_deflated_pixels_declaring_too_many_pixels(mib):
    reason = refuse(fuzz.deflate_bomb(mib, where="dims"), "bomb.dcm", match="above the limit")
    assert "DICOM declares" in reason


def test_deflate_cap_follows_the_budget():
    """The budget, not a constant, decides: a 1,000-pixel budget refuses a 64 x 64 image
    before it inflates."""
    refuse(fuzz.deflated_dicom(64, 64), "small.dcm", max_pixels=1000, match="above the limit")


def test_deflated_header_probe_reads_only_the_header():
    """The upload check (no preamble: probe_raw_dicom) on a 1 GiB deflate bomb."""
    data = fuzz.deflate_bomb(1024, where="trailing")
    started = time.perf_counter()
    assert probe_raw_dicom(data[132:]) is True  # an image header, found without inflating on
    assert probe_raw_dicom(fuzz.deflate_bomb(64, where="header")) is False
    assert time.perf_counter() - started < SECONDS


def test_a_valid_deflated_dicom_decodes_like_its_uncompressed_twin():
    deflated = fuzz.deflated_dicom(64, 48, seed=3)
    ds = pydicom.dcmread(io.BytesIO(deflated))
    twin = fuzz._dicom_bytes(ds, "1.2.840.10008.1.2.1")
    a = decode_scan(deflated, name="a.dcm", salt=SALT)
    b = decode_scan(twin, name="b.dcm", salt=SALT)
    np.testing.assert_array_equal(a.pixels, b.pixels)
    assert (a.width, a.height) == (48, 64)
    assert a.meta["transfer_syntax"] == "Deflated Explicit VR Little Endian"


def test_damaged_or_cut_deflate_stream_is_a_reason():
    from pydicom.filereader import _read_file_meta_info, read_preamble

    data = fuzz.deflated_dicom(64, 64)
    source = io.BytesIO(data)
    read_preamble(source, True)
    _read_file_meta_info(source)
    body = source.tell()
    refuse(data[:body] + b"\xff" + data[body + 1:], "bad.dcm", match="deflated DICOM is damaged")
    refuse(data[: body + 2000], "cut.dcm")


# --- encapsulated frames larger than Rows/Columns --------------------------------------------

sizes = st.tuples(st.integers(65, 65535), st.integers(1, 65535))


@BOMBS
@given(codec=st.sampled_from(["jpeg", "jpeg-lossless", "jpeg-ls", "j2k", "jp2", "htj2k"]),
       size=sizes)
def test_frame_declaring_another_size_than_rows_columns(codec, size):
    width, height = size
    data = fuzz.frame_mismatch(codec, width, height)
    reason = refuse(data, "mismatch.dcm")
    assert f"encoded as {width}x{height} pixels" in reason and "64x64" in reason


@BOMBS
@given(side=st.sampled_from([32, 65, 128, 512]))
def test_complete_jpeg_frame_of_another_size(side):
    refuse(fuzz.frame_mismatch("jpeg-real", side, side), "real.dcm", match="encoded as")


def test_frame_with_other_component_count_and_too_many_tiles():
    rgb = fuzz.real_jpeg(64, 64, mode="RGB")
    refuse(fuzz.dicom_encapsulated([rgb], rows=64, cols=64), "rgb.dcm",
           match="3 colour components but the header declares 1")
    refuse(fuzz.j2k_many_tiles(256, 2), "tiles.dcm", match="16,384 tiles")


@pytest.mark.parametrize("codec,frame", [
    ("jpeg", lambda: fuzz.real_jpeg(64, 48)),
    ("j2k", lambda: fuzz.real_j2k(64, 48)),
])
def test_matching_encapsulated_frames_still_decode(codec, frame):
    data = fuzz.dicom_encapsulated([frame()] * 3, rows=48, cols=64, codec=codec)
    decoded = decode_scan(data, name="ok.dcm", salt=SALT)
    assert decoded.pixels.shape == (48, 64) and decoded.num_frames == 3


# --- truncated JPEGs ---------------------------------------------------------------------------


@st.composite
def truncated_jpegs(draw):
    width = draw(st.integers(1024, 16000))
    height = draw(st.integers(1024, min(16000, BUDGET // width)))
    needed = width * height // 1024
    keep = draw(st.integers(300, max(301, needed // 2)))
    progressive = draw(st.booleans())
    return width, height, fuzz.truncated_jpeg(width, height, keep=keep, progressive=progressive)


@BOMBS
@given(case=truncated_jpegs())
def test_truncated_jpeg_declaring_a_large_size(case):
    width, height, data = case
    reason = refuse(data, "cut.jpg", match="far too few")
    assert f"{width}x{height}" in reason


@BOMBS
@given(case=truncated_jpegs())
def test_truncated_jpeg_frame_in_a_dicom(case):
    width, height, frame = case
    data = fuzz.dicom_encapsulated([frame], rows=height, cols=width)
    refuse(data, "cut.dcm", match="far too few")


@pytest.mark.parametrize("progressive", [False, True])
def test_uniform_jpeg_is_not_mistaken_for_a_truncated_one(progressive):
    """The plausibility bound (pixels / 1024 bytes) is below any complete Huffman JPEG:
    a uniform image at quality 10 with optimised tables still decodes."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((2048, 2048), 128, np.uint8)).save(
        buffer, format="JPEG", quality=10, optimize=True, progressive=progressive)
    decoded = decode_scan(buffer.getvalue(), name="flat.jpg", salt=SALT)
    assert decoded.pixels.shape == (2048, 2048)


# --- TIFF page directories ---------------------------------------------------------------------


@BOMBS
@given(pages=st.integers(MAX_FRAMES + 1, 60_000), big_endian=st.booleans())
def test_tiff_with_too_many_pages(pages, big_endian):
    data = fuzz.tiff_chain(pages, big_endian=big_endian)
    refuse(data, "pages.tif", match=f"more than {MAX_FRAMES:,} pages")


@st.composite
def tiff_loops(draw):
    pages = draw(st.integers(1, 60))
    return fuzz.tiff_chain(pages, loop_to=draw(st.integers(0, pages - 1)),
                           big_endian=draw(st.booleans()))


@BOMBS
@given(data=tiff_loops())
def test_tiff_directory_loop(data):
    refuse(data, "loop.tif", match="loop back")


@st.composite
def tiffs_without_dims(draw):
    pages = draw(st.integers(1, 60))
    at = draw(st.integers(0, pages - 1))
    return at, fuzz.tiff_chain(pages, no_dims_at=at, big_endian=draw(st.booleans()))


@BOMBS
@given(case=tiffs_without_dims())
def test_tiff_page_without_dimensions(case):
    at, data = case
    refuse(data, "nodims.tif", match=f"page {at + 1:,} does not declare its width and height")


def test_tiff_pages_up_to_the_cap_are_judged_fast():
    """Up to the cap, a TIFF's pages are walked, not refused as a bomb: a stack of full-size
    pages is refused for what it is (one page would misrepresent it), fast, whatever its
    page count; a first page followed by smaller ones (a pyramid) decodes as that page
    (tests/annotator/test_import_hostile.py imports both)."""
    refuse(fuzz.tiff_chain(3, width=20, height=10), "three.tif", match="multi-page TIFF: 3 pages")
    started = time.perf_counter()
    refuse(fuzz.tiff_chain(MAX_FRAMES), "many.tif", match=f"{MAX_FRAMES:,} pages")
    assert time.perf_counter() - started < SECONDS
    buffer = io.BytesIO()
    base = Image.fromarray(np.arange(40 * 20, dtype=np.uint8).reshape(20, 40))
    base.save(buffer, format="TIFF", save_all=True,
              append_images=[base.resize((20, 10)), base.resize((10, 5))])
    decoded = decode_scan(buffer.getvalue(), name="pyramid.tif", salt=SALT)
    assert decoded.num_frames == 1 and decoded.pixels.shape == (20, 40)
    assert "only the first, full-resolution page (40x20)" in decoded.warnings[0]


def test_pillow_type_error_on_a_page_is_a_refusal_with_a_reason(monkeypatch):
    """What escaped as TypeError before (a 500 on the classify page) is a ScanDecodeError,
    whatever the library raises."""
    def broken(*args, **kwargs):
        raise TypeError("Missing dimensions")

    monkeypatch.setattr(decode_module.Image, "open", broken)
    reason = refuse(fuzz.tiff_chain(2), "x.tif")
    assert "TIFF" in reason and "Missing dimensions" in reason


# --- frame and page counts over the budget -----------------------------------------------------


@BOMBS
@given(rows=st.integers(8, 4096), cols=st.integers(8, 4096), data=st.data())
def test_dicom_frames_over_budget(rows, cols, data):
    frames = data.draw(st.integers(BUDGET // (rows * cols) + 1, 10**7))
    refuse(fuzz.dicom_frames(frames, rows=rows, cols=cols), "frames.dcm", match="above the limit")


@BOMBS
@given(count=st.integers(MAX_FRAMES + 1, 6000))
def test_too_many_encapsulated_frames(count):
    refuse(fuzz.dicom_jpeg_frames(count), "frames.dcm", match=f"limit of {MAX_FRAMES:,} frames")


@BOMBS
@given(pages=st.integers(2, 200), side=st.integers(600, 8000))
def test_tiff_pages_over_budget(pages, side):
    if pages * side * side <= BUDGET:
        pages = BUDGET // (side * side) + 1
    refuse(fuzz.tiff_chain(pages, width=side, height=side), "pages.tif", match="above the limit")


def test_excess_encapsulated_frames_are_not_decoded():
    """Two frames declared, 5,000 in the Pixel Data (no offset table): pydicom would decode
    and return all of them by default; only the declared two are decoded."""
    started = time.perf_counter()
    decoded = decode_scan(fuzz.dicom_excess_frames(5000), name="excess.dcm", salt=SALT)
    assert decoded.num_frames == 2
    assert time.perf_counter() - started < SECONDS


# --- PNG, the request budget, memory per pixel ----------------------------------------------------


@BOMBS
@given(width=st.integers(2000, 8000), height=st.integers(2000, 8000))
def test_truncated_png_declaring_a_large_size(width, height):
    refuse(fuzz.png_truncated(width, height), "cut.png", match="truncated|above the limit")


def test_request_budget_is_smaller_and_says_so():
    data = fuzz.real_jpeg(500, 400)
    reason = refuse(data, "big.jpg", request_max_pixels=100_000, match="above the limit of 100,000")
    assert "web request" in reason
    assert decode_scan(data, name="big.jpg", salt=SALT, request_max_pixels=16_000_000).width == 500
    # a request budget above the import budget changes nothing
    refuse(data, "big.jpg", max_pixels=1000, request_max_pixels=10**9, match="limit of 1,000 ")


def test_unmappable_dicom_values_are_a_refusal():
    ds = fuzz._bomb_dataset(8, 8)
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ds.PixelData = bytes(64)
    refuse(fuzz._dicom_bytes(ds, "1.2.840.10008.1.2.1"), "palette.dcm")


def test_memory_is_proportional_to_the_pixels():
    """A 1024 x 1024 16-bit CT (rescale + window) and a 16-bit PNG: traced peak bytes per
    pixel stay near what the pipeline holds (stored pixels, one float32 array, the
    de-identified copy) instead of float64 copies (was ~36 B/px for DICOM)."""
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 4095, (1024, 1024), dtype=np.uint16)
    ds = fuzz._bomb_dataset(1024, 1024, bits=16)
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = grey.tobytes()
    ct = fuzz._dicom_bytes(ds, "1.2.840.10008.1.2.1")
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="PNG")
    for name, data in (("ct.dcm", ct), ("grey16.png", buffer.getvalue())):
        tracemalloc.start()
        try:
            decoded = decode_scan(data, name=name, salt=SALT)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert decoded.pixels.dtype == np.float32
        assert peak / (1024 * 1024) < 24, (name, peak / (1024 * 1024))
