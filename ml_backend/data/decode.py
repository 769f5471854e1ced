"""Decode DICOM / PNG / JPEG / TIFF bytes into a display-ready greyscale array.

Pure functions: no Django, no settings, no logging of element values. The
caller passes limits and the de-identification salt explicitly; what is kept
is de-identified by ``ml_backend.data.deid``.

What ``decode_scan`` returns for a file:

- ``pixels``: float32 array ``(H, W)`` in ``[0, 1]``, 1.0 = bright on screen, or
  ``(H, W, 3)`` RGB for a colour image. For greyscale DICOM: modality LUT
  (RescaleSlope/Intercept or Modality LUT Sequence), then VOI (WindowCenter/Width,
  LINEAR / LINEAR_EXACT / SIGMOID, or VOI LUT Sequence; percentile window when
  absent, pixel padding left out of it), then MONOCHROME1 or Presentation LUT Shape
  INVERSE inversion; Float and Double Float Pixel Data (parametric maps) too. An
  enhanced (multi-frame) image takes rescale, window and pixel spacing from the shown
  frame's functional groups. A multi-frame image contributes its middle frame. A DICOM
  without file meta (an old raw dataset) is read in the encoding of its dataset, one
  whose preamble was cut off (starting 'DICM') as if it had one. Non-finite values (a
  rescale to infinity, NaN pixels) are refused. A TIFF (or BigTIFF) is its first page when
  the other pages are smaller (thumbnails, pyramid levels); a stack of full-size pages is
  refused. A JPEG or PNG is turned upright as its EXIF orientation says (Pillow does the
  same for a TIFF's Orientation tag), with a note; a JPEG of more than 8 bits is refused.
  Colour is kept where the source is colour: RGB / RGBA / palette PNG, JPEG, TIFF;
  DICOM RGB, YBR_* (converted to RGB) and PALETTE COLOR. A colour-encoded image whose
  channels agree (greyscale saved as RGB, like most MRI exported to JPEG) is detected
  and kept as one grey channel. ``meta["colour"]`` says which (``"colour"`` /
  ``"grey"``) and ``meta["colour_reason"]`` why. Colour images above
  ``COLOUR_MAX_SIDE`` are reduced for display and training (the stored copy keeps
  every pixel).
- ``stored_bytes``: what may be kept on disk, de-identified (``deid``): DICOM
  rewritten, uncompressed, from a whitelist of technical attributes with fresh
  UIDs; PNG and TIFF re-encoded losslessly as a PNG of pixels only; JPEG
  reduced to the segments decoding needs, not re-compressed, except one its EXIF
  orientation turns: its upright pixels as a PNG (``stored_ext`` ".png").
- ``meta``: only modality, manufacturer, model, body part, photometric
  interpretation, pixel spacing, bits stored, frame count, transfer syntax,
  the burned-in-annotation flag, and for DICOM the study and series pseudonyms (keyed
  hashes of the UIDs, ``deid.study_series_pseudonyms``), series and instance numbers,
  the slice position along the series and the slice spacing (mm).
- ``patient_key``: a keyed hash of the DICOM PatientID (+ issuer) under the
  caller's salt (``deid.patient_pseudonym``); the ID itself never leaves here.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ml_backend.data.deid import (
    DEFINED_TERMS,
    KEEP_KEYWORDS,  # re-exported
    PHI_KEYWORDS,  # re-exported
    DeidentificationError,
    clean_text,
    deidentified_dicom,
    kept_text,
    patient_pseudonym,
    photometric_of,
    study_series_pseudonyms,
    png_without_metadata,
    strip_jpeg_metadata,
)

__all__ = [
    "DecodedScan",
    "ScanDecodeError",
    "decode_scan",
    "render_preview",
    "sniff_format",
    "probe_raw_dicom",
    "KEEP_KEYWORDS",
    "PHI_KEYWORDS",
]


# Colour detection: a colour-encoded image is grey when, over a sample of its pixels, the
# channels differ by at most this much (8-bit levels) at the 99.5th percentile: JPEG's chroma
# noise on a grey picture stays within a few levels, stained tissue differs by tens.
GREY_CHANNEL_TOLERANCE = 6
# Colour pixels are decoded to at most this side (a whole-slide image is not a scan here).
COLOUR_MAX_SIDE = 4096


def colour_decision(rgb: np.ndarray, *, max_value: float = 255.0) -> bool:
    """Whether an ``(H, W, 3)`` image carries colour (its channels differ beyond JPEG noise),
    judged on at most ~262k pixels (a strided sample)."""
    step = max(1, int(np.ceil(np.sqrt(rgb.shape[0] * rgb.shape[1] / 262_144))))
    sample = rgb[::step, ::step].astype(np.float32) * (255.0 / max_value)
    spread = sample.max(axis=-1) - sample.min(axis=-1)
    return bool(np.percentile(spread, 99.5) > GREY_CHANNEL_TOLERANCE)


class ScanDecodeError(Exception):
    """A file cannot become a scan. ``str(exc)`` is a reason a user can act on."""


@dataclass
class DecodedScan:
    pixels: np.ndarray
    file_format: str
    stored_bytes: bytes
    stored_ext: str
    width: int
    height: int
    num_frames: int = 1
    meta: dict = field(default_factory=dict)
    patient_key: str = ""
    warnings: list[str] = field(default_factory=list)
    # DICOM only, and only when asked (``decode_scan(linkage=True)``): the original
    # identifiers a report sent back to the PACS needs (LINKAGE_FIELDS). PHI: the caller
    # encrypts it at once (annotator/linkage.py) and never logs, shows or stores it in clear.
    linkage: dict | None = field(default=None, repr=False)


# What an honest-broker linkage keeps of the original DICOM: enough for a structured report
# to be filed next to the original study, for the original patient.
LINKAGE_FIELDS = ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate",
                  "PatientSex", "StudyInstanceUID", "StudyID", "StudyDate", "StudyTime",
                  "AccessionNumber", "ReferringPhysicianName", "SeriesInstanceUID",
                  "SOPInstanceUID", "SOPClassUID", "Modality")


# --- format sniffing -------------------------------------------------------

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*")
_BIGTIFF_MAGICS = (b"II+\x00", b"MM\x00+")   # BigTIFF: 64-bit offsets, read the same way
_DICM_WITHOUT_PREAMBLE = b"DICM\x02\x00"   # 'DICM', then the file meta's group 0x0002
DICOM_EXTENSIONS = {".dcm", ".dicom", ".dic", ""}
RASTER_EXTENSIONS = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}


def sniff_format(data: bytes, name: str = "") -> str | None:
    """Return 'dicom', 'png', 'jpeg', 'tiff' from the content (not the name), or None.

    A DICOM file without the 128-byte preamble ("raw" dataset) is only tried when
    the name has a DICOM-like extension or none, as pydicom would accept nearly
    any bytes when forced.
    """
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if data.startswith(_DICM_WITHOUT_PREAMBLE):  # a Part 10 file whose preamble was cut off
        return "dicom"
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(_JPEG_MAGIC):
        return "jpeg"
    if data[:4] in _TIFF_MAGICS or data[:4] in _BIGTIFF_MAGICS:
        return "tiff"
    ext = _extension(name)
    if ext in DICOM_EXTENSIONS:
        # Preamble-less ("raw") datasets exist in the wild; pydicom decides.
        return "dicom" if _looks_like_raw_dicom(data) else "dicom?"
    return None


def probe_raw_dicom(data: bytes) -> bool:
    """Whether header-less bytes parse as a DICOM dataset with image attributes."""
    import pydicom

    try:
        header = _undeflate(data, budget=None)  # a deflated dataset: its header only
    except ScanDecodeError:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            source = io.BytesIO(data if header is None else header)
            ds = pydicom.dcmread(source, force=True, stop_before_pixels=True)
            return "Rows" in ds and "Columns" in ds
    except Exception:  # any parse failure means "no"
        return False


def _extension(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    if "." not in base.lstrip("."):
        return ""
    return "." + base.rsplit(".", 1)[-1].lower()


def _looks_like_raw_dicom(data: bytes) -> bool:
    # A preamble-less dataset starts with a group 0x0002 or 0x0008 element
    # (little or big endian), which is what pydicom's own reader checks.
    if len(data) < 8:
        return False
    group_le = struct.unpack("<H", data[:2])[0]
    group_be = struct.unpack(">H", data[:2])[0]
    return group_le in (0x0002, 0x0008) or group_be in (0x0002, 0x0008)


# --- what a file will cost, checked before anything large is allocated --------------------
#
# A few hundred bytes can declare gigabytes: a deflated DICOM inflates ~1000:1, a JPEG or
# JPEG 2000 frame inside a DICOM declares its own size whatever Rows/Columns say, a cut
# JPEG still makes the decoder allocate (and fill with grey) the size it declares, and a
# TIFF can chain tens of thousands of directories. Each is checked against the pixel budget
# from the file's own headers, in time linear in the header bytes, before pydicom or Pillow
# sees the file; what slips past still meets the budget check on the decoded size.

MAX_FRAMES = 4096
"""Most frames in an encapsulated (compressed) DICOM or pages in a TIFF. Decoders spend
time per frame and Pillow's page count is quadratic, so a file of many tiny frames costs
minutes whatever its pixel count; real multi-frame scans stay far below this."""

_DEFLATED_TS = "1.2.840.10008.1.2.1.99"
_DEFLATE_HEADER_LIMIT = 32 << 20   # inflated bytes allowed before the Pixel Data element
_DEFLATE_TRAILER_SLACK = 1 << 20   # and after the bytes the declared image needs
_DEFLATE_BYTES_PER_PIXEL = 4       # cap when the inflated header cannot be walked
_INFLATE_CHUNK = 1 << 20
_JPEG_PIXELS_PER_BYTE = 1024       # Huffman JPEG: >= 1 bit per 8x8 block, so >= pixels / 512 bytes
_DEFLATE_MAX_RATIO = 1032          # zlib's ceiling (258-byte matches in 2 bits)
_JPEG_MAX_SEGMENTS = 4096
_J2K_MAX_TILES = 4096
_TIFF_MAX_ENTRIES = 1 << 20


@dataclass(frozen=True)
class _Budget:
    """The pixel budget of one ``decode_scan`` call and how to word a refusal."""

    pixels: int
    note: str = ""

    def refuse(self, what: str, count: int, *, bomb: bool = True) -> None:
        if count > self.pixels:
            raise ScanDecodeError(
                f"{what}, above the limit of {self.pixels:,} pixels{self.note}"
                + (" (possible decompression bomb)" if bomb else "")
            )


def _budget(max_pixels: int, request_max_pixels: int | None) -> _Budget:
    if request_max_pixels is not None and request_max_pixels < max_pixels:
        return _Budget(
            max(1, int(request_max_pixels)),
            " for an image decoded in a web request (import larger scans instead)",
        )
    return _Budget(max(1, int(max_pixels)))


def _reason(exc: BaseException, limit: int = 200) -> str:
    """A library's own words for a failure, without the object reprs some of them contain."""
    text = clean_text(str(exc).split(" <", 1)[0], limit)
    return text or type(exc).__name__


# JPEG / JPEG-LS / JPEG 2000 frame headers --------------------------------------------------

# SOF0-3, 5-7, 9-11, 13-15; JPEG-LS SOF55 (0xF7); hierarchical DHP (0xDE) sizes the frames.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7, 0xDE}
_HUFFMAN_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7})


@dataclass(frozen=True)
class _Codestream:
    codec: str
    width: int
    height: int
    components: int
    min_bytes: int = 0  # the fewest bytes a complete stream of this size can have
    scan_bytes: int = 0  # bytes from the first scan on (entropy-coded data and after)
    tiles: int = 1
    precision: int = 8  # bits per sample (a JPEG frame header's P)

    def check_complete(self) -> None:
        """Refuse a stream far smaller than any complete one of its declared size: a
        Huffman-coded JPEG spends at least a bit per 8x8 block (pixels / 512 bytes), so
        below pixels / 1024 it is cut short, and the decoder would still allocate (and fill
        with grey) the whole declared image."""
        if self.scan_bytes < self.min_bytes:
            raise ScanDecodeError(
                f"{self.codec} holds {self.scan_bytes:,} bytes of image data, far too few for "
                f"the {self.width}x{self.height} pixels it declares: the file is truncated "
                "or hostile"
            )


def _jpeg_codestream(data: bytes) -> _Codestream:
    """Frame header of a JPEG or JPEG-LS stream: its markers up to the first scan."""
    n = len(data)
    if data[:2] != b"\xff\xd8":
        raise ScanDecodeError("not a JPEG stream (no start-of-image marker)")
    pos, sof, segments = 2, None, 0
    while pos + 4 <= n:
        if data[pos] != 0xFF:  # junk between segments: decoders skip to the next marker
            pos = data.find(b"\xff", pos)
            if pos < 0:
                break
            continue
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
            continue
        if marker == 0xD9:
            break
        segments += 1
        if segments > _JPEG_MAX_SEGMENTS:
            raise ScanDecodeError(
                f"JPEG has more than {_JPEG_MAX_SEGMENTS:,} segments before its image data "
                "(damaged or hostile)"
            )
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if length < 2:
            raise ScanDecodeError("JPEG structure is damaged (a segment of length < 2)")
        if marker in _SOF_MARKERS and sof is None and pos + 10 <= n:
            precision, height, width, components = struct.unpack_from(">BHHB", data, pos + 4)
            sof = (marker, width, height, components, precision)
        if marker == 0xDA:
            if sof is None:
                break
            marker, width, height, components, precision = sof
            if width == 0 or height == 0:
                raise ScanDecodeError(
                    f"JPEG declares an empty or deferred size ({width}x{height}); "
                    "a height given later by a DNL marker is not supported"
                )
            codec = "JPEG-LS" if marker == 0xF7 else "JPEG"
            minimum = 0
            if marker in _HUFFMAN_SOF:  # arithmetic coding and JPEG-LS can go below a bit a block
                minimum = -(-width * height // _JPEG_PIXELS_PER_BYTE)
            return _Codestream(codec, width, height, components, minimum, scan_bytes=n - pos,
                               precision=precision)
        pos += 2 + length
    if sof is None:
        raise ScanDecodeError("JPEG has no frame header (SOF) before its image data")
    raise ScanDecodeError("JPEG ends before its image data starts (truncated)")


def _j2k_codestream(data: bytes) -> _Codestream:
    """Image and tile size from a JPEG 2000 codestream's SIZ marker (or a JP2 file's)."""
    start = 0
    if data[4:8] == b"jP  ":  # a JP2 wrapper: the codestream is in the jp2c box
        start = data.find(b"\xff\x4f\xff\x51", 0, 1 << 20)
        if start < 0:
            raise ScanDecodeError("JPEG 2000 file has no codestream header (SIZ marker)")
    if data[start : start + 4] != b"\xff\x4f\xff\x51" or len(data) < start + 42:
        raise ScanDecodeError("JPEG 2000 stream is damaged (no SIZ marker after its start)")
    (_lsiz, _rsiz, xsiz, ysiz, xo, yo, xt, yt, xto, yto, components) = struct.unpack_from(
        ">HHIIIIIIIIH", data, start + 4
    )
    width, height = xsiz - xo, ysiz - yo
    if width <= 0 or height <= 0 or xt == 0 or yt == 0 or xto > xo or yto > yo:
        raise ScanDecodeError(
            f"JPEG 2000 stream declares an invalid image or tile size ({width}x{height})"
        )
    tiles = -(-(xsiz - xto) // xt) * -(-(ysiz - yto) // yt)
    return _Codestream("JPEG 2000", width, height, components, tiles=tiles)


def _frame_codestream(frame: bytes) -> _Codestream | None:
    if frame[:2] == b"\xff\xd8":
        return _jpeg_codestream(frame)
    if frame[:4] == b"\xff\x4f\xff\x51" or frame[4:8] == b"jP  ":
        return _j2k_codestream(frame)
    return None


def _check_encapsulated(ds, *, rows: int, cols: int, frames: int, samples: int,
                        transfer_syntax, ts_name: str) -> None:
    """Each frame's own header (JPEG SOF, JPEG-LS SOF55, JPEG 2000 SIZ) against
    Rows/Columns/SamplesPerPixel, and its size against what a complete stream needs.
    Frames are split exactly as pydicom's decoders will split them."""
    from pydicom.encaps import generate_frames
    from pydicom.uid import (
        JPEG2000TransferSyntaxes,
        JPEGLSTransferSyntaxes,
        JPEGTransferSyntaxes,
    )

    if frames > MAX_FRAMES:
        raise ScanDecodeError(
            f"compressed DICOM declares {frames:,} frames, above the limit of {MAX_FRAMES:,} "
            "frames in one file"
        )
    expected = {
        **{uid: "JPEG" for uid in JPEGTransferSyntaxes},
        **{uid: "JPEG-LS" for uid in JPEGLSTransferSyntaxes},
        **{uid: "JPEG 2000" for uid in JPEG2000TransferSyntaxes},
    }.get(transfer_syntax)
    extended = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    what = f"compressed DICOM ({ts_name or 'unknown transfer syntax'})"
    try:
        encoded = generate_frames(ds.PixelData, number_of_frames=frames, extended_offsets=extended)
        for index in range(frames):
            frame = next(encoded, None)
            if frame is None:
                return  # fewer frames than declared: the decoder reports it
            label = f"frame {index + 1:,}" if frames > 1 else "its image"
            info = _frame_codestream(frame)
            if info is None:
                if expected is None:
                    return  # RLE (sized by Rows/Columns) or a codec no installed decoder reads
                raise ScanDecodeError(f"{what}: {label} is not a {expected} stream")
            if (info.width, info.height) != (cols, rows):
                raise ScanDecodeError(
                    f"{what}: {label} is encoded as {info.width}x{info.height} pixels but the "
                    f"header declares {cols}x{rows} (Columns x Rows); refused (possible "
                    "decompression bomb)"
                )
            if info.components != samples:
                raise ScanDecodeError(
                    f"{what}: {label} has {info.components} colour components but the header "
                    f"declares {samples} (Samples per Pixel)"
                )
            if info.tiles > _J2K_MAX_TILES:
                raise ScanDecodeError(
                    f"{what}: {label} is cut into {info.tiles:,} tiles, above the limit of "
                    f"{_J2K_MAX_TILES:,} (damaged or hostile)"
                )
            info.check_complete()
    except ScanDecodeError as exc:
        if str(exc).startswith(what):
            raise
        raise ScanDecodeError(f"{what}: {str(exc)}") from None
    except Exception as exc:  # a damaged item structure raises assorted types
        raise ScanDecodeError(
            f"{what}: the encapsulated pixel data is damaged ({_reason(exc)})"
        ) from None


# Deflated DICOM ------------------------------------------------------------------------------

_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
# Pixel Data, and the float kinds parametric maps use (PS3.3 C.7.6.3.1.4)
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_GEOMETRY_TAGS = {0x00280010: "rows", 0x00280011: "cols", 0x00280008: "frames",
                  0x00280002: "samples", 0x00280100: "bits"}


class _NeedMore(Exception):
    """The inflated bytes so far end inside the element being read."""


class _Unwalkable(Exception):
    """The inflated dataset is not plain Explicit VR Little Endian."""


def _element_header(buf, pos: int) -> tuple[int, int, int, bytes]:
    if pos + 8 > len(buf):
        raise _NeedMore
    group, element = struct.unpack_from("<HH", buf, pos)
    tag = group << 16 | element
    if group == 0xFFFE:  # items and delimiters: tag and a 4-byte length
        return tag, struct.unpack_from("<I", buf, pos + 4)[0], 8, b""
    vr = bytes(buf[pos + 4 : pos + 6])
    if not (vr.isalpha() and vr.isupper()):
        raise _Unwalkable
    if vr in _LONG_VRS:
        if pos + 12 > len(buf):
            raise _NeedMore
        return tag, struct.unpack_from("<I", buf, pos + 8)[0], 12, vr
    return tag, struct.unpack_from("<H", buf, pos + 6)[0], 8, vr


def _skip_sequence(buf, pos: int, depth: int) -> int:
    """Position after the Sequence Delimitation Item of an undefined-length value at ``pos``."""
    if depth > 32:
        raise _Unwalkable
    while True:
        tag, length, header, _vr = _element_header(buf, pos)
        pos += header
        if tag == 0xFFFEE0DD:
            return pos
        if tag != 0xFFFEE000:
            raise _Unwalkable
        if length != 0xFFFFFFFF:
            pos += length
            continue
        while True:  # an item of undefined length: elements up to its delimiter
            tag, length, header, _vr = _element_header(buf, pos)
            pos += header
            if tag == 0xFFFEE00D:
                break
            pos = _skip_sequence(buf, pos, depth + 1) if length == 0xFFFFFFFF else pos + length


class _PixelDataWalker:
    """Walks the top-level elements of an Explicit VR Little Endian dataset as it grows
    (values are skipped by their length, not read), resuming where the bytes ran out, up
    to the Pixel Data element; records Rows, Columns, frames, samples and bits on the way."""

    def __init__(self, start: int):
        self.pos = start
        self.geometry: dict[str, int] = {}

    def walk(self, buf) -> tuple[int, int]:
        """``(offset of the pixel value, its length)``; raises _NeedMore or _Unwalkable."""
        while True:
            pos = self.pos
            tag, length, header, vr = _element_header(buf, pos)
            if tag in _PIXEL_TAGS:
                return pos + header, length
            if tag >> 16 == 0xFFFE:
                raise _Unwalkable
            if length == 0xFFFFFFFF:
                self.pos = _skip_sequence(buf, pos + header, 0)
                continue
            if tag in _GEOMETRY_TAGS:
                if pos + header + length > len(buf):
                    raise _NeedMore
                value = bytes(buf[pos + header : pos + header + length])
                try:
                    number = struct.unpack("<H", value[:2])[0] if vr == b"US" else int(
                        value.strip(b" \x00") or b"1")
                except (struct.error, ValueError):
                    raise _Unwalkable from None
                self.geometry[_GEOMETRY_TAGS[tag]] = number
            self.pos = pos + header + length


def _undeflate(data: bytes, *, budget: _Budget | None) -> bytes | None:
    """A Deflated Explicit VR Little Endian DICOM as the same file in Explicit VR Little
    Endian, inflated in chunks under a cap, or None when ``data`` is not deflated.

    pydicom inflates the whole dataset in one call, however large it becomes; here the
    dataset is inflated a chunk at a time while its top-level elements are walked. Once the
    Pixel Data element is reached, its Rows/Columns/frames are checked against ``budget``
    and the cap becomes what that image needs plus 1 MiB; until then at most 32 MiB of
    header may inflate. With ``budget`` None only the header is wanted: inflation stops at
    the Pixel Data element (the result is cut there).
    """
    import pydicom
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.filewriter import write_file_meta_info

    fp = io.BytesIO(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            read_preamble(fp, True)
            head_end = fp.tell()
            meta = _read_file_meta_info(fp)
            body_start = fp.tell()
            transfer_syntax = str(meta.get("TransferSyntaxUID", "") or "").strip("\x00 ")
    except Exception:  # an unreadable header: pydicom's own read reports it
        return None
    if transfer_syntax != _DEFLATED_TS:
        return None
    try:
        meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        header = io.BytesIO()
        header.write(data[:head_end])
        write_file_meta_info(header, meta, enforce_standard=False)
    except Exception as exc:
        raise ScanDecodeError(
            f"deflated DICOM has an unreadable header ({_reason(exc)})"
        ) from None

    out = bytearray(header.getvalue())
    base = len(out)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    source: bytes | memoryview = memoryview(data)[body_start:]
    absolute = _DEFLATE_HEADER_LIMIT + _DEFLATE_BYTES_PER_PIXEL * (budget.pixels if budget else 0)
    limit, located, next_walk, image = base + _DEFLATE_HEADER_LIMIT, False, base + (64 << 10), ""
    walker = _PixelDataWalker(base)
    while True:
        try:
            chunk = inflater.decompress(source, min(_INFLATE_CHUNK, limit + 1 - len(out)))
        except zlib.error as exc:
            raise ScanDecodeError(f"deflated DICOM is damaged ({_reason(exc)})") from None
        source = inflater.unconsumed_tail
        out += chunk
        finished = inflater.eof or not (source or chunk)
        if not located and (finished or len(out) >= next_walk or len(out) > limit):
            next_walk = 2 * len(out)
            try:
                value_at, _length = walker.walk(out)
                geometry = walker.geometry
            except _NeedMore:
                pass
            except _Unwalkable:
                located, limit = True, base + absolute
                if budget is None:
                    return bytes(out)
            else:
                located = True
                if budget is None:
                    return bytes(out)
                rows, cols = geometry.get("rows", 0), geometry.get("cols", 0)
                frames = geometry.get("frames", 1) or 1
                if rows and cols:
                    budget.refuse(f"DICOM declares {cols}x{rows} pixels x {frames} frames",
                                  rows * cols * frames, bomb=False)
                    bits = geometry.get("bits", 16) or 16
                    samples = geometry.get("samples", 1) or 1
                    needed = -(-rows * cols * frames * samples * bits // 8)
                    limit = value_at + needed + _DEFLATE_TRAILER_SLACK
                    image = f", more than its {cols}x{rows}" + (
                        f"x{frames}" if frames > 1 else "") + " image needs"
                else:
                    limit = base + absolute
        if len(out) > limit:
            if not located:
                raise ScanDecodeError(
                    f"deflated DICOM inflates to more than {_DEFLATE_HEADER_LIMIT >> 20} MiB "
                    "before its pixel data (possible decompression bomb)"
                )
            raise ScanDecodeError(
                f"deflated DICOM inflates to more than {(limit - base) / 2**20:,.1f} MiB"
                f"{image} (possible decompression bomb)"
            )
        if finished:
            return bytes(out)


# TIFF and PNG ---------------------------------------------------------------------------------


def _tiff_pages(data: bytes) -> list[tuple[int, int]]:
    """``(width, height)`` of every page, from the directory chain walked once (Pillow's
    page count re-walks it per page), with loop detection and a cap on pages and entries."""
    order = "<" if data[:2] == b"II" else ">"
    big = data[:4] in _BIGTIFF_MAGICS
    if big:  # BigTIFF: 8-byte offsets and counts, 20-byte directory entries
        if len(data) < 16 or struct.unpack_from(order + "HH", data, 4) != (8, 0):
            raise ScanDecodeError("BigTIFF header is damaged (its offset size is not 8 bytes)")
        entry = np.dtype([("tag", order + "u2"), ("type", order + "u2"),
                          ("count", order + "u8"), ("value", "V8")])
        offset_format, count_format, offset_size = order + "Q", order + "Q", 8
        (offset,) = struct.unpack_from(offset_format, data, 8)
    else:
        entry = np.dtype([("tag", order + "u2"), ("type", order + "u2"),
                          ("count", order + "u4"), ("value", "V4")])
        offset_format, count_format, offset_size = order + "I", order + "H", 4
        (offset,) = struct.unpack_from(offset_format, data, 4)
    count_size = struct.calcsize(count_format)
    seen: set[int] = set()
    pages: list[tuple[int, int]] = []
    entries_seen = 0
    while offset:
        page = len(pages) + 1
        if offset in seen:
            raise ScanDecodeError(
                f"TIFF page directories loop back on themselves at page {page:,} "
                "(damaged or hostile file)"
            )
        if page > MAX_FRAMES:
            raise ScanDecodeError(
                f"TIFF has more than {MAX_FRAMES:,} pages, above the limit for one file"
            )
        seen.add(offset)
        if offset + count_size > len(data):
            if pages:
                break  # a dangling pointer after the last page: the pages before it stand
            raise ScanDecodeError("TIFF is truncated: its first page directory is missing")
        (count,) = struct.unpack_from(count_format, data, offset)
        end = offset + count_size + entry.itemsize * count
        if end + offset_size > len(data):
            if pages:
                break
            raise ScanDecodeError("TIFF is truncated: its first page directory is cut short")
        entries_seen += count
        if entries_seen > _TIFF_MAX_ENTRIES:
            raise ScanDecodeError(
                "TIFF page directories hold too many entries (damaged or hostile)"
            )
        table = np.frombuffer(data, dtype=entry, count=count, offset=offset + count_size)
        size = [_tiff_number(table, tag, order) for tag in (256, 257)]
        if None in size:
            raise ScanDecodeError(
                f"TIFF page {page:,} does not declare its width and height (damaged file)"
            )
        if size[0] <= 0 or size[1] <= 0:
            raise ScanDecodeError(
                f"TIFF page {page:,} declares an empty image ({size[0]}x{size[1]})"
            )
        pages.append((size[0], size[1]))
        (offset,) = struct.unpack_from(offset_format, data, end)
    if not pages:
        raise ScanDecodeError("TIFF has no pages")
    return pages


def _tiff_number(table: np.ndarray, tag: int, order: str) -> int | None:
    hits = np.flatnonzero(table["tag"] == tag)
    if not hits.size:
        return None
    item = table[hits[0]]
    raw = item["value"].tobytes()
    if int(item["type"]) == 3:
        return struct.unpack(order + "H", raw[:2])[0]
    if int(item["type"]) == 4:
        return struct.unpack(order + "I", raw[:4])[0]
    if int(item["type"]) == 16:  # LONG8, BigTIFF only
        return struct.unpack(order + "Q", raw[:8])[0]
    return None


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def _check_png(data: bytes, budget: _Budget) -> None:
    """The declared size against the budget, and the compressed image data against what
    deflate (at most ~1032:1) needs to hold it."""
    if len(data) < 33 or data[12:16] != b"IHDR":
        return  # Pillow explains what is wrong
    width, height, depth, colour = struct.unpack_from(">IIBB", data, 16)
    if width == 0 or height == 0:
        raise ScanDecodeError(f"PNG declares an empty image ({width}x{height})")
    budget.refuse(f"PNG declares {width}x{height} pixels", width * height)
    raw = height * (1 + -(-width * _PNG_CHANNELS.get(colour, 1) * max(depth, 1) // 8))
    needed = -(-raw // _DEFLATE_MAX_RATIO)
    total, pos = 0, 8
    while pos + 8 <= len(data) and total < needed:
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"IDAT":
            total += min(length, len(data) - pos - 8)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if total < needed:
        raise ScanDecodeError(
            f"PNG holds {total:,} bytes of image data, too few for the {width}x{height} pixels "
            "it declares: the file is truncated (or a decompression bomb)"
        )


def decode_scan(
    data: bytes,
    *,
    name: str = "",
    salt: str,
    max_pixels: int = 64_000_000,
    request_max_pixels: int | None = None,
    keep_copy: bool = True,
    window: tuple[float, float] | None = None,
    frame: int | None = None,
    linkage: bool = False,
) -> DecodedScan:
    """Decode one file's bytes. Raises ``ScanDecodeError`` with a clear reason.

    ``max_pixels`` bounds width x height x frames (TIFF: the pixels of all pages) of what
    will be decoded, checked from the file's own headers before any large allocation: an
    encapsulated frame's JPEG / JPEG-LS / JPEG 2000 header must match Rows/Columns, a
    deflated DICOM is inflated under a cap derived from it, every TIFF page is counted.
    ``request_max_pixels``: a smaller budget for decoding a single image inside a web
    request (the classify page); a refusal under it says so. ``keep_copy=False``: no stored
    copy is made (``stored_bytes`` empty) — for an image that is only looked at, never kept.
    ``window=(center, width)``: a greyscale image is windowed linearly on its own values
    (DICOM: after the modality LUT, in its units, e.g. HU; rasters: their stored 8- or
    16-bit values) instead of by its default; colour images ignore it. ``meta["window"]``
    (the default window) and ``meta["value_range"]`` describe a greyscale image's values.
    ``linkage=True``: a DICOM's original identifiers come back in ``DecodedScan.linkage``
    (for the encrypted honest-broker table; nothing else may read them).
    ``frame``: which frame of a multi-frame DICOM (a stacked series) ``pixels`` shows,
    counted from 0; default the middle one, the representative slice the models see.
    Any failure of pydicom or Pillow becomes a ``ScanDecodeError``.
    """
    if window is not None:
        center, width = (float(v) for v in window)
        if not (np.isfinite(center) and np.isfinite(width) and width > 0):
            raise ScanDecodeError("a window needs a finite centre and a positive width")
        window = (center, width)
    if not data:
        raise ScanDecodeError("empty file (0 bytes)")
    kind = sniff_format(data, name)
    if kind is None:
        raise ScanDecodeError(
            "unsupported or unrecognised file type: expected DICOM, PNG, JPEG or TIFF "
            "(checked the file's content, not its name)"
        )
    budget = _budget(max_pixels, request_max_pixels)
    try:
        if kind in ("dicom", "dicom?"):
            decoded = _decode_dicom(data, salt=salt, budget=budget, sure=kind == "dicom",
                                    keep_copy=keep_copy, window=window, frame=frame,
                                    linkage=linkage)
            return decoded
        return _decode_raster(data, kind=kind, budget=budget, keep_copy=keep_copy,
                              window=window)
    except ScanDecodeError:
        raise
    except DeidentificationError as exc:
        raise ScanDecodeError(str(exc)) from None
    except MemoryError:
        raise ScanDecodeError("not enough memory to decode this image") from None
    except Exception as exc:  # a library failing on hostile input: a refusal, never a crash
        label = "DICOM" if kind.startswith("dicom") else kind.upper()
        raise ScanDecodeError(f"{label} file could not be decoded ({type(exc).__name__})") from None


# --- rasters ---------------------------------------------------------------


def _decode_raster(data: bytes, *, kind: str, budget: _Budget,
                   keep_copy: bool = True, window=None) -> DecodedScan:
    # The file's own headers first: the size a JPEG declares (and whether its data could
    # hold it), every TIFF page (Pillow would re-walk the page chain per page), a PNG's
    # size against its compressed data.
    pages = None
    if kind == "jpeg":
        info = _jpeg_codestream(data)
        budget.refuse(f"JPEG declares {info.width}x{info.height} pixels", info.width * info.height)
        info.check_complete()
        if info.codec == "JPEG" and info.precision != 8:
            # Pillow (libjpeg) reads 8-bit JPEG only; DICOM's decoders read the others
            raise ScanDecodeError(
                f"{info.precision}-bit JPEG files are not supported outside DICOM (only "
                "8-bit JPEG can be read here): save the image as a 16-bit PNG or TIFF, or "
                "as DICOM, and import that")
    elif kind == "tiff":
        pages = _tiff_pages(data)
        total = sum(w * h for w, h in pages)
        budget.refuse(
            f"TIFF declares {pages[0][0]}x{pages[0][1]} pixels"
            + (f" x {len(pages)} pages ({total:,} pixels in all)" if len(pages) > 1 else ""),
            total,
        )
    elif kind == "png":
        _check_png(data, budget)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            frames = len(pages) if pages is not None else int(getattr(image, "n_frames", 1) or 1)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ScanDecodeError(
                "image dimensions are too large to be a scan (possible decompression bomb)"
            ) from None
        except Exception as exc:  # Pillow raises assorted types on hostile input
            raise ScanDecodeError(f"not a readable {kind.upper()} image: {_reason(exc)}") from None
        if width <= 0 or height <= 0:
            raise ScanDecodeError(f"{kind.upper()} declares an empty image ({width}x{height})")
        if pages is None:
            budget.refuse(
                f"{kind.upper()} declares {width}x{height} pixels"
                f"{f' x {frames} frames' if frames > 1 else ''}",
                width * height * frames,
            )
        try:
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ScanDecodeError("image is too large to decode (possible decompression bomb)")
        except Exception as exc:
            raise ScanDecodeError(
                f"{kind.upper()} image data is damaged: {_reason(exc)}"
            ) from None

    notes = _pages_note(kind, pages, frames)
    turned = None
    if kind in ("jpeg", "png"):   # Pillow turns a TIFF by its Orientation tag itself
        image, turned = _exif_upright(image)
        if turned is not None:
            width, height = image.size
            notes.append(turned)
    values: dict = {}
    pixels, bits, colour, colour_reason, reduced = _raster_to_unit(image, window=window,
                                                                   values=values)
    if reduced:
        notes.append(f"colour image reduced to {COLOUR_MAX_SIDE} px on its longest side for "
                     "display and training (the stored copy keeps every pixel)")
    if not keep_copy:
        stored, ext = b"", ""
    elif kind == "jpeg" and turned is None:
        try:
            stored, ext = strip_jpeg_metadata(data), ".jpg"
        except DeidentificationError as exc:
            raise ScanDecodeError(str(exc)) from None
    else:
        stored, ext = _encode_png_lossless(image), ".png"
    meta = {
        "photometric": "RGB" if image.mode in ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr")
        else "MONOCHROME2",
        "bits_stored": bits,
        "colour": "colour" if colour else "grey",
        "colour_reason": colour_reason,
        **values,
    }
    return DecodedScan(
        pixels=pixels,
        file_format=kind,
        stored_bytes=stored,
        stored_ext=ext,
        width=width,
        height=height,
        num_frames=1,            # the stored copy holds one image (``_pages_note``)
        meta=meta,
        warnings=notes,
    )


# EXIF Orientation (0x0112): how the stored rows must be turned to show the picture upright.
_EXIF_ORIENTATION = 0x0112
_EXIF_TURNS = {
    2: "mirrored left to right",
    3: "rotated 180°",
    4: "mirrored top to bottom",
    5: "mirrored across its diagonal (transposed)",
    6: "rotated 90° clockwise",
    7: "mirrored across its other diagonal (transversed)",
    8: "rotated 90° counter-clockwise",
}


def _exif_upright(image: Image.Image) -> tuple[Image.Image, str | None]:
    """A JPEG or PNG turned upright as its EXIF Orientation says, and a note for the import
    report; ``(image, None)`` when it says nothing or 1 (upright already). Cameras and phones
    write the pixels as the sensor read them and the turn in EXIF, which the stored copy
    cannot keep (EXIF is dropped as metadata): the pixels are turned here instead, so the
    previews, the label page, the model and the stored copy all see the picture upright (a
    mirrored orientation, 2/4/5/7, would otherwise swap left and right)."""
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # noqa: BLE001 - damaged EXIF: the pixels are shown as stored
        return image, None
    if orientation not in _EXIF_TURNS:
        return image, None
    from PIL import ImageOps

    upright = ImageOps.exif_transpose(image)
    return upright, (f"turned upright as its EXIF orientation ({orientation}: "
                     f"{_EXIF_TURNS[orientation]}) says; the stored copy holds the upright "
                     "pixels, losslessly as PNG")


def _pages_note(kind: str, pages: list[tuple[int, int]] | None, frames: int) -> list[str]:
    """A raster holding more than one image: what is used of it (on import and on the
    classify page alike), or a refusal.

    A TIFF whose later pages are all smaller than the first (the thumbnails and pyramid
    levels of a slide or a camera image, a slide's label and overview images) is its first,
    full-resolution page, and the report says the others were not kept. A TIFF with another
    page as large as the first is a stack (slices, channels, time points, focal planes): its
    first page alone would stand for the whole under one label, so it is refused with what
    to do instead. An animated PNG is its first (default) frame, with a note."""
    if kind == "tiff" and pages is not None and len(pages) > 1:
        (width, height), rest = pages[0], pages[1:]
        large = sum(1 for w, h in rest if w * h >= width * height or w > width or h > height)
        if large:
            raise ScanDecodeError(
                f"multi-page TIFF: {len(pages):,} pages, {large + 1:,} of them full-size images "
                f"({width}x{height} first): a stack of slices, channels or time points cannot "
                "be imported as one image, and its first page alone would misrepresent it. "
                "Save each page as its own TIFF or PNG file (or a CT/MR series as DICOM) "
                "and import those")
        return [f"multi-page TIFF: only the first, full-resolution page ({width}x{height}) "
                f"is used; its {len(rest):,} smaller page(s) (thumbnails, pyramid levels "
                "or a slide's label and overview images) were not kept"]
    if frames > 1:
        return [f"{kind.upper()} holds {frames:,} frames (animated): only its first frame "
                "is used"]
    return []


COLOUR_MODES = ("RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV")


def _raster_to_unit(image: Image.Image, *, window=None, values: dict | None = None
                    ) -> tuple[np.ndarray, int, bool, str, bool]:
    """``(pixels, bits, colour, reason, reduced)``. One float32 array, scaled in place:
    Pillow's copy of the pixels plus 4 bytes a pixel (12 for colour, after reducing a colour
    image beyond COLOUR_MAX_SIDE), and the percentile pass's 4 for 16-bit images.
    ``values`` receives a greyscale image's default window and value range."""
    values = {} if values is None else values
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.array(image, dtype=np.float32)
        bits = 16 if mode.startswith("I;16") else 32
        _describe_values(array, values)
        # float values (mode F) are windowed exactly: LINEAR's 1-unit minimum width would
        # flatten a map whose values span less than one unit
        unit = (_window(array, window[0], window[1],
                        "LINEAR_EXACT" if mode == "F" else "LINEAR") if window is not None
                else _percentile_window(array, in_place=True))
        return unit, bits, False, f"{bits}-bit greyscale {mode}", False
    reduced = False
    if mode in COLOUR_MODES:
        source = {"P": "palette", "PA": "palette"}.get(mode, mode)
        if mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        rgb = image.convert("RGB")
        if colour_decision(np.asarray(rgb)):
            if max(rgb.size) > COLOUR_MAX_SIDE:
                rgb.thumbnail((COLOUR_MAX_SIDE, COLOUR_MAX_SIDE), Image.Resampling.LANCZOS)
                reduced = True
            array = np.array(rgb, dtype=np.float32)
            np.divide(array, 255.0, out=array)
            return array, 8, True, f"{source} image with distinct colour channels", reduced
        reason = f"{source} image whose channels agree: greyscale stored as colour"
        image = rgb
    else:
        reason = f"greyscale ({mode})"
    if image.mode != "L":
        image = image.convert("L")
    array = np.array(image, dtype=np.float32)
    values.update({"window": [127.5, 255.0], "value_range": [0.0, 255.0]})
    if window is not None:
        return _window(array, window[0], window[1], "LINEAR"), 8, False, reason, reduced
    np.divide(array, 255.0, out=array)
    return array, 8, False, reason, reduced


def _describe_values(values: np.ndarray, out: dict, window=None,
                     exclude: np.ndarray | None = None) -> None:
    """A greyscale image's value range and its default window (the file's, else the
    0.5–99.5 percentile one, without the pixels ``exclude`` marks), in its own units,
    rounded for display."""
    step = max(1, int(np.ceil(np.sqrt(values.size / 262_144))))
    sample = values[::step, ::step]
    if exclude is not None:
        kept = sample[~exclude[::step, ::step]]
        sample = kept if kept.size else sample
    low, high = float(np.min(values)), float(np.max(values))
    if not (np.isfinite(low) and np.isfinite(high)):   # NaN spreads to min and max
        raise ScanDecodeError(
            "the image holds non-finite pixel values (NaN or infinity, or beyond the float "
            "range): they cannot be windowed, shown or stored")
    if window is None:
        with np.errstate(over="ignore", invalid="ignore"):
            p_low, p_high = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
        window = ((p_low + p_high) / 2, max(p_high - p_low, 1e-3))
    described = [float(window[0]), float(window[1]), low, high]
    if not all(np.isfinite(v) for v in described):
        raise ScanDecodeError(
            "the image's window or value range is not finite (its values span more than "
            "the float range): refused, as it cannot be windowed or shown")
    out["window"] = [round(described[0], 3), round(described[1], 3)]
    out["value_range"] = [round(low, 3), round(high, 3)]


def _encode_png_lossless(image: Image.Image) -> bytes:
    if image.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I"):
        image = image.convert("RGB")
    if image.mode == "I":
        image = image.convert("I;16") if np.asarray(image).max() < 65536 else image.convert("F")
    if image.mode == "F":
        array = _percentile_window(np.asarray(image, dtype=np.float32))
        image = Image.fromarray((array * 65535).round().astype(np.uint16))
    return png_without_metadata(image)


def _percentile_window(
    array: np.ndarray, low: float = 0.5, high: float = 99.5, *, in_place: bool = False,
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """``array`` mapped so its ``low`` / ``high`` percentiles become 0 / 1, as float32.
    ``in_place``: ``array`` is a float32 array of the caller's to overwrite (no copy);
    the percentiles themselves need one temporary copy (0 / 100 need none). ``exclude``:
    pixels left out of the percentiles (DICOM pixel padding), mapped like the others."""
    if not (in_place and array.dtype == np.float32 and array.flags.writeable):
        array = np.array(array, dtype=np.float32)
    finite_mask = np.isfinite(array)
    if exclude is not None:
        finite_mask &= ~exclude
    finite = array if finite_mask.all() else array[finite_mask]
    del finite_mask
    if finite.size == 0:
        array[...] = 0.0
        return array
    if low <= 0.0 and high >= 100.0:
        lo, hi = float(finite.min()), float(finite.max())
    else:
        lo, hi = (float(v) for v in np.percentile(finite, [low, high]))
    if hi <= lo:
        lo, hi = float(finite.min()), float(finite.max())
    del finite
    if hi <= lo:
        array[...] = 0.0
        return array
    np.subtract(array, lo, out=array)
    np.divide(array, hi - lo, out=array)
    np.nan_to_num(array, copy=False)
    np.clip(array, 0.0, 1.0, out=array)
    return array


# --- DICOM -----------------------------------------------------------------

DEFER_BYTES = 1 << 20
"""Without a stored copy to write, values larger than this are read from the file only
when used (pydicom's ``defer_size``)."""


def _decode_dicom(data: bytes, *, salt: str, budget: _Budget, sure: bool = True,
                  keep_copy: bool = True, window=None, frame: int | None = None,
                  linkage: bool = False) -> DecodedScan:
    import pydicom
    from pydicom.errors import InvalidDicomError

    file_notes = []
    if data.startswith(_DICM_WITHOUT_PREAMBLE):
        data = bytes(128) + data   # the 128-byte preamble pydicom looks for before 'DICM'
        file_notes.append("DICOM file lacks its 128-byte preamble (it starts with 'DICM'): "
                          "read as if it had one")
    # A deflated dataset is inflated here, under a cap, not by pydicom (which would
    # inflate all of it at once): pydicom reads the same file as Explicit VR LE.
    inflated = _undeflate(data, budget=budget)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # no stored copy to write: large values (the Pixel Data of a stacked series) are
            # read only if asked for, so one frame of it costs one frame
            ds = pydicom.dcmread(io.BytesIO(data if inflated is None else inflated), force=True,
                                 defer_size=None if keep_copy else DEFER_BYTES)
            if inflated is not None:
                ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, struct.error) as exc:
        raise ScanDecodeError(f"not a readable DICOM file: {type(exc).__name__}") from None
    except Exception as exc:  # pydicom raises assorted types on hostile input
        raise ScanDecodeError(f"not a readable DICOM file: {type(exc).__name__}") from None
    one_source = inflated is None        # the bytes pydicom reads are the file itself
    del inflated  # the dataset holds its own copy of every value (or reads it from data)

    has_pixels = any(keyword in ds for keyword in _PIXEL_KEYWORDS)
    if not has_pixels and not sure:
        raise ScanDecodeError(
            "not a DICOM file: no 'DICM' header and no image elements "
            "(is it a different file type with a .dcm name?)"
        )
    if not has_pixels:
        sop = clean_text(ds.get("SOPClassUID", ""))
        what = ""
        if sop:
            try:   # named only when the standard defines it (an unknown UID is not echoed)
                uid = pydicom.uid.UID(sop)
                what = f" ({uid.name})" if uid.type else ""
            except Exception:  # an unknown UID name is not an error
                what = ""
        raise ScanDecodeError(f"DICOM object has no image (no Pixel Data, Float Pixel Data "
                              f"or Double Float Pixel Data){what}")

    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        raise ScanDecodeError("DICOM image is missing Rows/Columns") from None
    if rows <= 0 or cols <= 0 or frames <= 0:
        raise ScanDecodeError(f"DICOM declares an empty image ({cols}x{rows}x{frames})")
    budget.refuse(f"DICOM declares {cols}x{rows} pixels x {frames} frames", rows * cols * frames,
                  bomb=False)

    transfer_syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if not transfer_syntax:
        transfer_syntax = _assumed_transfer_syntax(ds)
        file_notes.append(f"DICOM has no file meta header (no preamble, no 'DICM', no "
                          f"transfer syntax), as old systems write: read as "
                          f"{transfer_syntax.name}, the encoding of its dataset")
    ts_name = clean_text(getattr(transfer_syntax, "name", "") or "", 80)
    try:
        encapsulated = bool(transfer_syntax) and transfer_syntax.is_compressed and not (
            transfer_syntax.is_deflated)
        samples_declared = int(ds.get("SamplesPerPixel", 1) or 1)
    except (TypeError, ValueError):  # not a transfer syntax pydicom knows: it cannot decode it
        encapsulated, samples_declared = False, 1
    photometric_notes = _check_photometric(ds, samples_declared)
    if encapsulated:  # the size each frame will really decode to, before the decoder runs
        _check_encapsulated(ds, rows=rows, cols=cols, frames=frames, samples=samples_declared,
                            transfer_syntax=transfer_syntax, ts_name=ts_name)
    chosen = frames // 2 if frame is None else int(frame)
    if frame is not None and not 0 <= chosen < frames:
        raise ScanDecodeError(f"frame {chosen} asked of an image with {frames} frame(s)")
    _frame_functional_groups(ds, chosen)
    # Without a stored copy to write, a multi-frame image (a stacked CT series) decodes only
    # the frame it shows: scrolling a 600-slice series reads one slice's pixels a step, not
    # all of them.
    one_frame = not keep_copy and frames > 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # frames beyond Number of Frames are not decoded (pydicom's default is to add them)
            raw = None
            if one_frame and one_source and not photometric_notes:
                # straight from the file: only that frame's bytes are read
                from pydicom.pixels import pixel_array
                try:
                    raw = pixel_array(io.BytesIO(data), index=chosen, allow_excess_frames=False)
                except Exception:  # noqa: BLE001 - the dataset's own decoder below says why
                    raw = None
            if raw is None:
                ds.pixel_array_options(allow_excess_frames=False,
                                       **({"index": chosen} if one_frame else {}))
                raw = ds.pixel_array
    except NotImplementedError:
        raise ScanDecodeError(
            f"compressed DICOM ({ts_name or 'unknown transfer syntax'}) cannot be decoded: "
            "no installed decoder supports it (install pylibjpeg plugins or python-gdcm)"
        ) from None
    except RuntimeError as exc:
        message = str(exc)
        if "no pixel data decoders" in message.lower() or "missing required dependencies" in message.lower():
            raise ScanDecodeError(
                f"compressed DICOM ({ts_name or 'unknown transfer syntax'}) cannot be decoded: "
                "no installed decoder supports it (install pylibjpeg plugins or python-gdcm)"
            ) from None
        # The decoders' own reasons (damaged stream, unsupported precision) carry
        # no element values; keep the first line of each so the user sees why.
        reasons = "; ".join(
            line.strip() for line in message.splitlines()[1:] if line.strip()
        ) or type(exc).__name__
        raise ScanDecodeError(
            f"compressed DICOM ({ts_name or 'unknown transfer syntax'}) could not be decoded "
            f"by any installed decoder: {clean_text(reasons, 300)}"
        ) from None
    except Exception as exc:  # truncated/mutated pixel data raises many types
        raise ScanDecodeError(
            f"DICOM pixel data is damaged or truncated ({type(exc).__name__})"
        ) from None
    except BaseException as exc:
        # Decoders written in Rust (pylibjpeg-rle) turn a panic on a damaged stream into
        # pyo3's PanicException, which is not an Exception: a bad file must not stop an import.
        if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        raise ScanDecodeError(
            f"compressed DICOM ({ts_name or 'unknown transfer syntax'}) is damaged: the "
            f"decoder gave up ({type(exc).__name__})"
        ) from None

    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = photometric_of(ds, samples=samples)   # a made-up value is never kept
    if one_frame:
        frame = raw
    elif frames > 1 and raw.ndim >= 3 and raw.shape[0] == frames:
        frame = raw[chosen]
    else:
        frame = raw

    try:
        values: dict = {}
        pixels, colour_reason = _dicom_to_unit(ds, frame, photometric=photometric,
                                               samples=samples, window=window, values=values)
    except (MemoryError, ScanDecodeError):
        raise
    except Exception as exc:  # LUTs and rescale values come from the file
        raise ScanDecodeError(
            f"DICOM pixel values cannot be mapped to grey levels ({type(exc).__name__}): check "
            "its Modality LUT, Rescale, VOI LUT and palette elements"
        ) from None
    if pixels.shape[:2] != (rows, cols):
        raise ScanDecodeError("DICOM pixel data does not match its declared Rows/Columns")

    patient_key = patient_pseudonym(ds, salt=salt)
    try:
        stored = deidentified_dicom(ds, raw, salt=salt, patient_key=patient_key) if keep_copy \
            else b""
    except DeidentificationError as exc:
        raise ScanDecodeError(str(exc)) from None

    spacing = _spacing(ds.get("PixelSpacing")) or _spacing(ds.get("ImagerPixelSpacing"))
    study_key, series_key = study_series_pseudonyms(ds, salt=salt)
    meta = {
        "study_key": study_key,
        "series_key": series_key,
        "series_number": _integer(ds.get("SeriesNumber")),
        "instance_number": _integer(ds.get("InstanceNumber")),
        "slice_position": _slice_position(ds),
        "slice_spacing": _positive(ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")),
        # the values the de-identified copy keeps (``deid.kept_value``), nothing else
        "modality": kept_text(ds, "Modality"),
        "manufacturer": kept_text(ds, "Manufacturer"),
        "manufacturer_model": kept_text(ds, "ManufacturerModelName"),
        "body_part": kept_text(ds, "BodyPartExamined"),
        "photometric": photometric,
        "pixel_spacing": spacing,
        "bits_stored": (raw.dtype.itemsize * 8 if raw.dtype.kind == "f"
                        else int(ds.get("BitsStored", 0) or 0)),
        "transfer_syntax": ts_name,
        "burned_in_annotation": clean_text(ds.get("BurnedInAnnotation", "")).upper() == "YES",
        "colour": "colour" if pixels.ndim == 3 else "grey",
        "colour_reason": colour_reason,
        **values,
    }
    notes = file_notes + photometric_notes
    if meta["burned_in_annotation"]:
        notes.append("DICOM flags burned-in annotation: text in the pixels may identify the patient")
    return DecodedScan(
        pixels=pixels,
        file_format="dicom",
        stored_bytes=stored,
        stored_ext=".dcm",
        width=cols,
        height=rows,
        num_frames=frames,
        meta=meta,
        patient_key=patient_key,
        warnings=notes,
        linkage=_linkage(ds) if linkage else None,
    )


# What an enhanced (multi-frame) image's functional groups say of a frame's pixel values,
# window and pixel size (PS3.3 C.7.6.16.2), and the attributes each sets.
_FRAME_GROUPS = {
    "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept", "RescaleType"),
    "FrameVOILUTSequence": ("WindowCenter", "WindowWidth", "VOILUTFunction"),
    "PixelMeasuresSequence": ("PixelSpacing", "SliceThickness"),
}


def _frame_functional_groups(ds, index: int) -> None:
    """An enhanced CT / MR / ... image keeps its rescale, window and pixel spacing in
    functional groups, not at the top level: the frame's own per-frame group, else the
    shared one, is set on ``ds`` at the top level (over what is there), so the frame is
    decoded in its real units (HU, not stored values) with its own window. Each frame
    gets its own values (per-frame rescale may differ from frame to frame); the stored copy
    keeps these groups (``deid.ITEM_KEYWORDS``), so any frame of it decodes the same."""
    groups = []
    for keyword, position in (("PerFrameFunctionalGroupsSequence", index),
                              ("SharedFunctionalGroupsSequence", 0)):
        try:
            items = ds[keyword].value if keyword in ds else None
            if items is not None and 0 <= position < len(items):
                groups.append(items[position])
        except Exception:  # noqa: BLE001 - an unreadable group is not used
            continue
    for sequence, keywords in _FRAME_GROUPS.items():
        for group in groups:
            try:
                items = group[sequence].value if sequence in group else None
                if not items:
                    continue
                item = items[0]
                found = {k: item[k].value for k in keywords
                         if k in item and item[k].value not in (None, "")}
            except Exception:  # noqa: BLE001 - a damaged group item is not used
                continue
            if not found:
                continue
            for keyword in keywords:
                if keyword in ds:
                    del ds[keyword]
            for keyword, value in found.items():
                setattr(ds, keyword, value)
            break


def _assumed_transfer_syntax(ds):
    """The transfer syntax of a dataset without file meta (a raw dataset as old systems
    write it): the encoding pydicom found reading it (``original_encoding``), set on the
    dataset so its pixels can be read. Compressed (encapsulated) pixel data is refused:
    which codec made it is written nowhere else."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    implicit, little = getattr(ds, "original_encoding", (None, None))
    syntax = {(True, True): ImplicitVRLittleEndian, (False, True): ExplicitVRLittleEndian,
              (False, False): ExplicitVRBigEndian}.get((implicit, little))
    pixel = next((keyword for keyword in _PIXEL_KEYWORDS if keyword in ds), None)
    undefined = pixel is not None and getattr(ds[pixel], "is_undefined_length", False)
    if syntax is None or undefined:
        raise ScanDecodeError(
            "DICOM has no file meta header (transfer syntax unknown)"
            + (": its pixel data is compressed, and the codec is not written anywhere else"
               if undefined else "") + ". Re-export it from the PACS or viewer as a DICOM "
            "Part 10 file")
    if not isinstance(getattr(ds, "file_meta", None), FileMetaDataset):
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    return syntax


# Samples per pixel each Photometric Interpretation takes (PS3.3 C.7.6.3.1.2)
_PHOTOMETRIC_SAMPLES = {"MONOCHROME1": 1, "MONOCHROME2": 1, "PALETTE COLOR": 1, "ARGB": 4,
                        "CMYK": 4}


def _check_photometric(ds, samples: int) -> list[str]:
    """How the file says its pixels are coded, checked before any decoder reads them (a
    decoder's own failure reads like damage). Absent: read as MONOCHROME2 or RGB from the
    samples per pixel, with a warning; a value the standard does not define, or one that
    disagrees with the samples per pixel: refused with that reason (the value itself is not
    echoed: a made-up one may carry anything)."""
    declared = clean_text(ds.get("PhotometricInterpretation", "") or "").upper()
    if not declared:
        inferred = {1: "MONOCHROME2", 3: "RGB"}.get(samples)
        if inferred is None:
            raise ScanDecodeError(
                f"DICOM image has no Photometric Interpretation and {samples} samples per "
                "pixel: cannot tell how its pixels are coded")
        ds.PhotometricInterpretation = inferred
        return [f"DICOM has no Photometric Interpretation: read as {inferred} from its "
                f"{samples} sample(s) per pixel (check the image is not inverted)"]
    defined = DEFINED_TERMS["PhotometricInterpretation"]
    if declared not in defined:
        raise ScanDecodeError(
            "DICOM Photometric Interpretation is not a value the standard defines ("
            + ", ".join(sorted(defined)) + "): cannot tell how its pixels are coded")
    needed = _PHOTOMETRIC_SAMPLES.get(declared, 3)
    if samples != needed:
        raise ScanDecodeError(
            f"DICOM Photometric Interpretation {declared} takes {needed} sample(s) per pixel, "
            f"but this file declares {samples}: its pixels cannot be read consistently")
    return []


def _linkage(ds) -> dict:
    """The original identifiers of LINKAGE_FIELDS as plain strings (absent ones left out)."""
    found = {}
    for keyword in LINKAGE_FIELDS:
        value = ds.get(keyword)
        if value is not None and str(value).strip():
            found[keyword] = str(value).strip()
    return found


def _integer(value: object) -> int | None:
    """A DICOM IS value as an int, or None (absent or not a number)."""
    try:
        number = int(float(str(value).strip())) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
    return number if number is not None and abs(number) < 2 ** 31 else None


def _positive(value: object) -> float | None:
    try:
        number = float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
    return number if number is not None and np.isfinite(number) and number > 0 else None


def _slice_position(ds) -> float | None:
    """Where the slice sits along the series: the projection of ImagePositionPatient on the
    slice normal (from ImageOrientationPatient), else SliceLocation; None for projection
    images. In mm, comparable within one series only."""
    try:
        position = [float(v) for v in ds.get("ImagePositionPatient") or []]
        orientation = [float(v) for v in ds.get("ImageOrientationPatient") or []]
        if len(position) == 3 and len(orientation) == 6:
            normal = np.cross(orientation[:3], orientation[3:])
            value = float(np.dot(normal, position))
            if np.isfinite(value):
                return round(value, 4)
        location = ds.get("SliceLocation")
        if location not in (None, ""):
            value = float(location)
            return round(value, 4) if np.isfinite(value) else None
    except (TypeError, ValueError):
        return None
    return None


def _spacing(value: object) -> list[float] | None:
    if value is None:
        return None
    try:
        numbers = [float(v) for v in value][:2]
    except (TypeError, ValueError):
        return None
    if len(numbers) != 2 or not all(np.isfinite(numbers)) or min(numbers) <= 0:
        return None   # a size of 0 or below is no size: the scan is shown without one
    return numbers


def _dicom_colour(rgb: np.ndarray, max_value: float, source: str) -> tuple[np.ndarray, str]:
    """An RGB frame as ``[0, 1]`` colour, or as grey when its channels agree."""
    if colour_decision(rgb, max_value=max_value):
        array = rgb.astype(np.float32)
        np.divide(array, max_value, out=array)
        np.clip(array, 0.0, 1.0, out=array)
        return array, f"DICOM {source} with distinct colour channels"
    grey = _luma(rgb)
    np.divide(grey, max_value, out=grey)
    np.clip(grey, 0.0, 1.0, out=grey)
    return grey, f"DICOM {source} whose channels agree: greyscale stored as colour"


def _dicom_to_unit(ds, frame: np.ndarray, *, photometric: str, samples: int, window=None,
                   values: dict | None = None) -> tuple[np.ndarray, str]:
    """``(pixels, colour reason)``: grey ``(H, W)`` or RGB ``(H, W, 3)`` in ``[0, 1]``."""
    from pydicom.pixels import apply_color_lut

    # One float32 array (4 bytes a pixel) is made from the stored frame and every later
    # step (rescale, window, inversion) works in place on it; the percentile window needs
    # one temporary copy more. pydicom's rescale would make a float64 copy (8 bytes a pixel).
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(frame, ds)       # 8- or 16-bit palette entries
        descriptor = ds.get("RedPaletteColorLookupTableDescriptor") or [0, 0, 16]
        entry_bits = int(descriptor[2]) if len(descriptor) > 2 else 16
        return _dicom_colour(rgb, 255.0 if entry_bits == 8 else 65535.0, "PALETTE COLOR")
    if samples == 3 or frame.ndim == 3:
        # pydicom returns YBR_* as RGB (its default conversion); values use BitsStored
        bits = int(ds.get("BitsStored", 8) or 8)
        max_value = float(2 ** min(max(bits, 1), 32) - 1)
        return _dicom_colour(frame, max_value, photometric or "RGB")
    return (_dicom_grey(ds, frame, photometric=photometric, window=window, info=values),
            f"DICOM {photometric or 'MONOCHROME2'}")


def _dicom_grey(ds, frame: np.ndarray, *, photometric: str, window=None,
                info: dict | None = None) -> np.ndarray:
    """Modality LUT, then the VOI window (``window`` when given, linear, in modality units),
    then MONOCHROME1 or Presentation LUT Shape INVERSE inversion; ``info`` receives the
    default window and value range. Pixel padding (PixelPaddingValue, up to
    PixelPaddingRangeLimit: the area outside a CT's field of view) is left out of the
    automatic (percentile) window, which it would otherwise stretch over air and beyond."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    padding = _padding_mask(ds, frame)

    if "ModalityLUTSequence" in ds:
        values = apply_modality_lut(frame, ds).astype(np.float32)
    else:
        values = frame.astype(np.float32)
        if "RescaleSlope" in ds and "RescaleIntercept" in ds:
            slope = _rescale_number(ds, "RescaleSlope")
            intercept = _rescale_number(ds, "RescaleIntercept")
            with np.errstate(over="ignore", invalid="ignore"):
                if slope is not None and slope != 1.0:
                    np.multiply(values, slope, out=values)
                if intercept:
                    np.add(values, intercept, out=values)
            if not (np.isfinite(values.min()) and np.isfinite(values.max())):
                raise ScanDecodeError(
                    "DICOM has a non-finite rescale slope/intercept: RescaleSlope x stored value "
                    "+ RescaleIntercept is beyond any finite number for its pixels (refused: "
                    "its values cannot be windowed, shown or stored)")
    center, width = _first_number(ds.get("WindowCenter")), _first_number(ds.get("WindowWidth"))
    function = clean_text(ds.get("VOILUTFunction", "LINEAR")).upper() or "LINEAR"
    has_window = center is not None and width is not None and width > 0
    _describe_values(values, {} if info is None else info,
                     (center, width) if has_window else None, exclude=padding)
    if window is not None:
        # float pixel data (parametric maps) is windowed exactly (PS3.3 C.11.2.1.3.2)
        unit = _window(values, window[0], window[1],
                       "LINEAR_EXACT" if frame.dtype.kind == "f" else "LINEAR")
    elif has_window:
        unit = _window(values, center, width, function)
    elif "VOILUTSequence" in ds:
        del values
        lut = apply_voi_lut(frame, ds, prefer_lut=True).astype(np.float32)
        unit = _percentile_window(lut, 0.0, 100.0, in_place=True)
    else:
        unit = _percentile_window(values, in_place=True, exclude=padding)
    shape = clean_text(ds.get("PresentationLUTShape", "")).upper()
    # MONOCHROME1 shows low values bright; so does INVERSE, which DX and MG require beside
    # MONOCHROME1 (the same inversion, not a second one)
    if photometric == "MONOCHROME1" or shape == "INVERSE":
        np.subtract(1.0, unit, out=unit)
    return unit


def _padding_mask(ds, frame: np.ndarray) -> np.ndarray | None:
    """Where ``frame`` (stored values) holds pixel padding: PixelPaddingValue, or the range
    from it to PixelPaddingRangeLimit (PS3.3 C.7.5.1.1.2); None when there is none."""
    pad = _first_number(ds.get("PixelPaddingValue"))
    if pad is None or frame.dtype.kind == "f":
        return None
    limit = _first_number(ds.get("PixelPaddingRangeLimit"))
    if limit is None:
        mask = frame == pad
    else:
        low, high = min(pad, limit), max(pad, limit)
        mask = (frame >= low) & (frame <= high)
    if not mask.any() or mask.all():   # padding everywhere: nothing else to window on
        return None
    return mask


def _rescale_number(ds, keyword: str) -> float | None:
    """RescaleSlope / RescaleIntercept as a float (None when absent or not a number);
    an infinite or NaN value is refused, not ignored."""
    number = _first_number(ds.get(keyword), finite_only=False)
    if number is not None and not np.isfinite(number):
        raise ScanDecodeError(
            f"DICOM has a non-finite rescale slope/intercept ({keyword} is infinite or not a "
            "number): its pixel values cannot be computed")
    return number


def _first_number(value: object, *, finite_only: bool = True) -> float | None:
    """A DICOM value (or the first of several) as a float; None when absent, not a number,
    or (``finite_only``) infinite or NaN."""
    if value is None or value == "":
        return None
    try:
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = value[0]
        number = float(value)
    except (TypeError, ValueError, IndexError):
        return None
    return number if np.isfinite(number) or not finite_only else None


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """VOI windowing per DICOM PS3.3 C.11.2.1.2, mapped to [0, 1], in place on the float32
    ``values`` (which it returns)."""
    out = values
    if function == "SIGMOID":
        np.subtract(out, center, out=out)
        np.multiply(out, -4.0, out=out)
        np.divide(out, width, out=out)
        with np.errstate(over="ignore"):
            np.exp(out, out=out)
        np.add(out, 1.0, out=out)
        np.divide(1.0, out, out=out)
        return out
    if function == "LINEAR_EXACT":
        np.subtract(out, center, out=out)
        np.divide(out, width, out=out)
    else:  # LINEAR
        if width < 1:
            width = 1.0
        np.subtract(out, center - 0.5, out=out)
        np.divide(out, max(width - 1.0, 1e-6), out=out)
    np.add(out, 0.5, out=out)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def _luma(rgb: np.ndarray) -> np.ndarray:
    """Rec. 601 luma of an ``(..., 3)`` array as float32, one channel at a time (8 bytes a
    pixel, not a float copy of all three channels)."""
    out = rgb[..., 0].astype(np.float32)
    np.multiply(out, 0.299, out=out)
    channel = rgb[..., 1].astype(np.float32)
    np.multiply(channel, 0.587, out=channel)
    np.add(out, channel, out=out)
    channel[...] = rgb[..., 2]
    np.multiply(channel, 0.114, out=channel)
    np.add(out, channel, out=out)
    return out


# --- previews --------------------------------------------------------------


def render_preview(pixels: np.ndarray, *, max_side: int = 1024) -> bytes:
    """8-bit PNG of a ``[0, 1]`` image (greyscale ``(H, W)`` or RGB ``(H, W, 3)``), longest
    side at most ``max_side``."""
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] != 3):
        raise ValueError(f"expected an (H, W) or (H, W, 3) image, got shape {pixels.shape}")
    if max_side < 1:
        raise ValueError("max_side must be positive")
    image = Image.fromarray((np.clip(pixels, 0.0, 1.0) * 255.0).round().astype(np.uint8),
                            mode="L" if pixels.ndim == 2 else "RGB")
    longest = max(image.size)
    if longest > max_side:
        scale = max_side / longest
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
