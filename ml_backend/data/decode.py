"""Decode DICOM / PNG / JPEG / TIFF bytes into a display-ready greyscale array.

Pure functions: no Django, no settings, no logging of element values. The
caller passes limits and the de-identification salt explicitly; what is kept
is de-identified by ``ml_backend.data.deid``.

What ``decode_scan`` returns for a file:

- ``pixels``: float32 array ``(H, W)`` in ``[0, 1]``, 1.0 = bright on screen. For
  DICOM: modality LUT (RescaleSlope/Intercept or Modality LUT Sequence), then
  VOI (WindowCenter/Width, LINEAR / LINEAR_EXACT / SIGMOID, or VOI LUT
  Sequence; percentile window when absent), then MONOCHROME1 inversion. A
  multi-frame image contributes its middle frame. Colour images become luma.
- ``stored_bytes``: what may be kept on disk, de-identified (``deid``): DICOM
  rewritten from a whitelist of technical attributes with fresh UIDs; PNG and
  TIFF re-encoded losslessly as PNG without text chunks; JPEG without its
  APP1-APP15 and COM segments, not re-compressed.
- ``meta``: only modality, manufacturer, model, body part, photometric
  interpretation, pixel spacing, bits stored, frame count, transfer syntax,
  and the burned-in-annotation flag.
- ``patient_key``: a keyed hash of the DICOM PatientID (+ issuer) under the
  caller's salt (``deid.patient_pseudonym``); the ID itself never leaves here.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ml_backend.data.deid import (
    KEEP_KEYWORDS,  # re-exported
    PHI_KEYWORDS,  # re-exported
    DeidentificationError,
    clean_text,
    deidentified_dicom,
    patient_pseudonym,
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


# --- format sniffing -------------------------------------------------------

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*")
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
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(_JPEG_MAGIC):
        return "jpeg"
    if data[:4] in _TIFF_MAGICS:
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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
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


def decode_scan(
    data: bytes,
    *,
    name: str = "",
    salt: str,
    max_pixels: int = 64_000_000,
) -> DecodedScan:
    """Decode one file's bytes. Raises ``ScanDecodeError`` with a clear reason."""
    if not data:
        raise ScanDecodeError("empty file (0 bytes)")
    kind = sniff_format(data, name)
    if kind is None:
        raise ScanDecodeError(
            "unsupported or unrecognised file type: expected DICOM, PNG, JPEG or TIFF "
            "(checked the file's content, not its name)"
        )
    if kind in ("dicom", "dicom?"):
        return _decode_dicom(data, salt=salt, max_pixels=max_pixels, sure=kind == "dicom")
    return _decode_raster(data, kind=kind, max_pixels=max_pixels)


# --- rasters ---------------------------------------------------------------


def _decode_raster(data: bytes, *, kind: str, max_pixels: int) -> DecodedScan:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            frames = int(getattr(image, "n_frames", 1) or 1)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ScanDecodeError(
                "image dimensions are too large to be a scan (possible decompression bomb)"
            ) from None
        except (OSError, ValueError, SyntaxError, struct.error) as exc:
            raise ScanDecodeError(f"not a readable {kind.upper()} image: {exc}") from None
        if width <= 0 or height <= 0:
            raise ScanDecodeError(f"{kind.upper()} declares an empty image ({width}x{height})")
        if width * height * frames > max_pixels:
            raise ScanDecodeError(
                f"{kind.upper()} declares {width}x{height} pixels"
                f"{f' x {frames} frames' if frames > 1 else ''}, above the limit of "
                f"{max_pixels:,} pixels (possible decompression bomb)"
            )
        try:
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ScanDecodeError("image is too large to decode (possible decompression bomb)")
        except (OSError, ValueError, SyntaxError, struct.error, EOFError) as exc:
            raise ScanDecodeError(f"{kind.upper()} image data is damaged: {exc}") from None

    pixels, bits = _raster_to_unit(image)
    if kind == "jpeg":
        try:
            stored, ext = strip_jpeg_metadata(data), ".jpg"
        except DeidentificationError as exc:
            raise ScanDecodeError(str(exc)) from None
    else:
        stored, ext = _encode_png_lossless(image), ".png"
    meta = {
        "photometric": "RGB" if image.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr") else "MONOCHROME2",
        "bits_stored": bits,
    }
    return DecodedScan(
        pixels=pixels,
        file_format=kind,
        stored_bytes=stored,
        stored_ext=ext,
        width=width,
        height=height,
        num_frames=frames,
        meta=meta,
    )


def _raster_to_unit(image: Image.Image) -> tuple[np.ndarray, int]:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float32)
        bits = 16 if mode.startswith("I;16") else 32
        return _percentile_window(array), bits
    if mode != "L":
        image = image.convert("L")
    array = np.asarray(image, dtype=np.float32) / 255.0
    return array, 8


def _encode_png_lossless(image: Image.Image) -> bytes:
    if image.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I"):
        image = image.convert("RGB")
    if image.mode == "I":
        image = image.convert("I;16") if np.asarray(image).max() < 65536 else image.convert("F")
    if image.mode == "F":
        array = _percentile_window(np.asarray(image, dtype=np.float32))
        image = Image.fromarray((array * 65535).round().astype(np.uint16))
    return png_without_metadata(image)


def _percentile_window(array: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    finite = array[np.isfinite(array)]
    if finite.size == 0:
        return np.zeros(array.shape, dtype=np.float32)
    lo, hi = np.percentile(finite, [low, high])
    if hi <= lo:
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros(array.shape, dtype=np.float32)
    out = (array - lo) / (hi - lo)
    return np.clip(np.nan_to_num(out), 0.0, 1.0).astype(np.float32)


# --- DICOM -----------------------------------------------------------------


def _decode_dicom(data: bytes, *, salt: str, max_pixels: int, sure: bool = True) -> DecodedScan:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, struct.error) as exc:
        raise ScanDecodeError(f"not a readable DICOM file: {type(exc).__name__}") from None
    except Exception as exc:  # pydicom raises assorted types on hostile input
        raise ScanDecodeError(f"not a readable DICOM file: {type(exc).__name__}") from None

    if "PixelData" not in ds and not sure:
        raise ScanDecodeError(
            "not a DICOM file: no 'DICM' header and no image elements "
            "(is it a different file type with a .dcm name?)"
        )
    if "PixelData" not in ds:
        sop = clean_text(ds.get("SOPClassUID", ""))
        what = ""
        if sop:
            try:
                what = f" ({pydicom.uid.UID(sop).name})"
            except Exception:  # an unknown UID name is not an error
                what = ""
        raise ScanDecodeError(f"DICOM object has no image (no Pixel Data){what}")

    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        raise ScanDecodeError("DICOM image is missing Rows/Columns") from None
    if rows <= 0 or cols <= 0 or frames <= 0:
        raise ScanDecodeError(f"DICOM declares an empty image ({cols}x{rows}x{frames})")
    if rows * cols * frames > max_pixels:
        raise ScanDecodeError(
            f"DICOM declares {cols}x{rows} pixels x {frames} frames, above the limit of "
            f"{max_pixels:,} pixels"
        )

    transfer_syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    ts_name = clean_text(getattr(transfer_syntax, "name", "") or "", 80)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
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

    photometric = clean_text(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    frame = raw
    if frames > 1 and raw.ndim >= 3 and raw.shape[0] == frames:
        frame = raw[frames // 2]

    pixels = _dicom_to_unit(ds, frame, photometric=photometric, samples=samples)
    if pixels.shape[:2] != (rows, cols):
        raise ScanDecodeError("DICOM pixel data does not match its declared Rows/Columns")

    patient_key = patient_pseudonym(ds, salt=salt)
    try:
        stored = deidentified_dicom(ds, raw, salt=salt, patient_key=patient_key)
    except DeidentificationError as exc:
        raise ScanDecodeError(str(exc)) from None

    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    meta = {
        "modality": clean_text(ds.get("Modality")),
        "manufacturer": clean_text(ds.get("Manufacturer")),
        "manufacturer_model": clean_text(ds.get("ManufacturerModelName")),
        "body_part": clean_text(ds.get("BodyPartExamined")),
        "photometric": photometric,
        "pixel_spacing": _spacing(spacing),
        "bits_stored": int(ds.get("BitsStored", 0) or 0),
        "transfer_syntax": ts_name,
        "burned_in_annotation": clean_text(ds.get("BurnedInAnnotation", "")).upper() == "YES",
    }
    notes = []
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
    )


def _spacing(value: object) -> list[float] | None:
    if value is None:
        return None
    try:
        numbers = [float(v) for v in value][:2]
    except (TypeError, ValueError):
        return None
    if len(numbers) != 2 or not all(np.isfinite(numbers)):
        return None
    return numbers


def _dicom_to_unit(ds, frame: np.ndarray, *, photometric: str, samples: int) -> np.ndarray:
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(frame, ds).astype(np.float32)
        return _percentile_window(_luma(rgb), 0.0, 100.0)
    if samples == 3 or frame.ndim == 3:
        return _percentile_window(_luma(frame.astype(np.float32)), 0.0, 100.0)

    values = apply_modality_lut(frame, ds).astype(np.float32)
    center, width = _first_number(ds.get("WindowCenter")), _first_number(ds.get("WindowWidth"))
    function = clean_text(ds.get("VOILUTFunction", "LINEAR")).upper() or "LINEAR"
    if center is not None and width is not None and width > 0:
        unit = _window(values, center, width, function)
    elif "VOILUTSequence" in ds:
        lut = apply_voi_lut(frame, ds, prefer_lut=True).astype(np.float32)
        unit = _percentile_window(lut, 0.0, 100.0)
    else:
        unit = _percentile_window(values)
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit
    return unit.astype(np.float32)


def _first_number(value: object) -> float | None:
    if value is None or value == "":
        return None
    try:
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = value[0]
        number = float(value)
    except (TypeError, ValueError, IndexError):
        return None
    return number if np.isfinite(number) else None


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """VOI windowing per DICOM PS3.3 C.11.2.1.2, mapped to [0, 1]."""
    if function == "SIGMOID":
        return (1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))).astype(np.float32)
    if function == "LINEAR_EXACT":
        out = (values - center) / width + 0.5
    else:  # LINEAR
        if width < 1:
            width = 1.0
        out = (values - (center - 0.5)) / max(width - 1.0, 1e-6) + 0.5
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _luma(rgb: np.ndarray) -> np.ndarray:
    return (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]).astype(np.float32)


# --- previews --------------------------------------------------------------


def render_preview(pixels: np.ndarray, *, max_side: int = 1024) -> bytes:
    """8-bit greyscale PNG of a ``[0, 1]`` image, longest side at most ``max_side``."""
    if pixels.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {pixels.shape}")
    if max_side < 1:
        raise ValueError("max_side must be positive")
    image = Image.fromarray((np.clip(pixels, 0.0, 1.0) * 255.0).round().astype(np.uint8), mode="L")
    longest = max(image.size)
    if longest > max_side:
        scale = max_side / longest
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
