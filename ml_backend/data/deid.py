"""De-identification of what ``ml_backend.data.decode`` keeps from an uploaded file.

Pure functions: no Django, no settings, no logging of element values. The caller passes the
de-identification salt explicitly.

- DICOM is rewritten from a whitelist of technical attributes (``KEEP_KEYWORDS``) with fresh
  UIDs (``deidentified_dicom``), so every attribute of the DICOM PS3.15 Annex E Basic Profile
  (names, IDs, dates, addresses, accession numbers, institutions, physicians, private tags,
  ...) is dropped. Each element is copied fresh, only with its dictionary VR; the two LUT
  sequences' items are rebuilt from their own whitelist (``ITEM_KEYWORDS``). Pixels are
  always written uncompressed from the decoded array, never as the original encapsulated
  stream (whose JPEG frames can hold comments and EXIF).
- PNG and TIFF become a PNG of pixels only (``png_without_metadata``): no text chunks, no
  EXIF, no ICC profile.
- JPEG keeps only what decoding needs (``strip_jpeg_metadata``): tables, frame and scan
  headers, restart intervals and the entropy-coded data, untouched (not re-compressed), plus
  rebuilt minimal JFIF/Adobe segments when the original had them; every other APPn, COM and
  whatever follows EOI is dropped.
- ``patient_pseudonym``: HMAC-SHA256 of the DICOM PatientID (+ issuer) under the caller's
  salt — same patient, same key; the ID itself never leaves here.
- ``clean_text``: a short printable version of a technical attribute, for metadata.

Failures raise ``DeidentificationError``; ``str(exc)`` is a reason a user can act on.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import numbers
import re
import struct
import warnings

import numpy as np
from PIL import Image

__all__ = [
    "DeidentificationError",
    "ITEM_KEYWORDS",
    "KEEP_KEYWORDS",
    "PHI_KEYWORDS",
    "clean_text",
    "deidentified_dicom",
    "group_bucket",
    "patient_pseudonym",
    "png_without_metadata",
    "strip_jpeg_metadata",
    "study_pseudonym",
    "study_series_pseudonyms",
]


class DeidentificationError(Exception):
    """A de-identified copy cannot be made. ``str(exc)`` is a reason a user can act on."""


# --- DICOM -----------------------------------------------------------------

# The only attributes copied into the stored (de-identified) DICOM. Everything
# else — every Basic Profile attribute, every private tag, every sequence that
# is not a LUT — is dropped by construction.
KEEP_KEYWORDS = (
    "SOPClassUID",
    "Modality",
    "Manufacturer",
    "ManufacturerModelName",
    "BodyPartExamined",
    "ImageType",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "SliceThickness",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
    "RescaleIntercept",
    "RescaleSlope",
    "RescaleType",
    "ModalityLUTSequence",
    "PresentationLUTShape",
    "RedPaletteColorLookupTableDescriptor",
    "GreenPaletteColorLookupTableDescriptor",
    "BluePaletteColorLookupTableDescriptor",
    "RedPaletteColorLookupTableData",
    "GreenPaletteColorLookupTableData",
    "BluePaletteColorLookupTableData",
    "SegmentedRedPaletteColorLookupTableData",
    "SegmentedGreenPaletteColorLookupTableData",
    "SegmentedBluePaletteColorLookupTableData",
    "LossyImageCompression",
    "LossyImageCompressionRatio",
    "LossyImageCompressionMethod",
    "BurnedInAnnotation",
)

# The items of the sequences above are rebuilt from these lists, element by element: free
# text (LUTExplanation), private tags and nested sequences inside an item are dropped.
ITEM_KEYWORDS = {
    "VOILUTSequence": ("LUTDescriptor", "LUTData"),
    "ModalityLUTSequence": ("LUTDescriptor", "ModalityLUTType", "LUTData"),
}

# Attributes of the PS3.15 Annex E Basic Application Level Confidentiality
# Profile that hold identifying values most often (the profile lists ~300; the
# whitelist above drops all of them). Used by tests and by log scrubbing.
PHI_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "OtherPatientIDsSequence",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "PatientAge",
    "PatientSex",
    "PatientSize",
    "PatientWeight",
    "EthnicGroup",
    "Occupation",
    "MilitaryRank",
    "MedicalRecordLocator",
    "PatientComments",
    "AdditionalPatientHistory",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
    "StudyTime",
    "SeriesTime",
    "AcquisitionTime",
    "ContentTime",
    "AcquisitionDateTime",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "ReferringPhysicianName",
    "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "PhysiciansOfRecord",
    "OperatorsName",
    "RequestingPhysician",
    "ScheduledPerformingPhysicianName",
    "StationName",
    "DeviceSerialNumber",
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
    "RequestAttributesSequence",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
    "ImageComments",
    "DerivationDescription",
)

_SAFE_TEXT = re.compile(r"[^\w .,:;()/+\-]")


def clean_text(value: object, limit: int = 64) -> str:
    """A short, printable version of a technical string attribute.

    Only text and numbers count: anything else (a sequence, bytes) gives ``""``, as its
    ``str()`` would show the values nested inside it.
    """
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value if isinstance(v, (str, numbers.Number)))
    elif not isinstance(value, (str, numbers.Number)):
        return ""
    return _SAFE_TEXT.sub("", str(value)).strip()[:limit]


def _raw_text(value: object) -> str:
    if value is None:
        return ""
    return str(value).strip()


def _pseudonym(salt: str, *parts: str) -> str:
    message = "\x1f".join(parts).encode("utf-8")
    return hmac.new(salt.encode("utf-8"), message, hashlib.sha256).hexdigest()[:32]


def patient_pseudonym(ds, *, salt: str) -> str:
    """Keyed hash of the dataset's PatientID (+ issuer); ``""`` without a PatientID."""
    patient_id = _raw_text(ds.get("PatientID"))
    issuer = _raw_text(ds.get("IssuerOfPatientID"))
    return _pseudonym(salt, "patient", issuer, patient_id) if patient_id else ""


def study_series_pseudonyms(ds, *, salt: str) -> tuple[str, str]:
    """Keyed hashes of the StudyInstanceUID and SeriesInstanceUID (``""`` where absent):
    scans of one study or series share a key, and the UIDs themselves never leave here."""
    study = _raw_text(ds.get("StudyInstanceUID"))
    series = _raw_text(ds.get("SeriesInstanceUID"))
    return (study_pseudonym(study, salt=salt) if study else "",
            _pseudonym(salt, "series", series) if series else "")


def study_pseudonym(study_uid: str, *, salt: str) -> str:
    """The study key of a StudyInstanceUID (what ``study_series_pseudonyms`` gives its
    scans): how a PACS pull recognises a study it already has without storing the UID."""
    return _pseudonym(salt, "study", str(study_uid).strip())


def group_bucket(salt: str, key: str) -> float:
    """A stable number in [0, 1) for a group key (a patient, a study, a file): the same key
    always lands in the same bucket, so an automatic eval split keeps whole patients on one
    side across imports."""
    digest = _pseudonym(salt, "split", key)
    return int(digest[:12], 16) / float(16 ** 12)


def deidentified_dicom(ds, raw: np.ndarray, *, salt: str, patient_key: str) -> bytes:
    """Write a new, uncompressed DICOM holding only the whitelist, new UIDs and the pseudonym.

    The pixels are always ``raw`` (the decoded array) in Explicit VR Little Endian: an
    encapsulated stream is never copied, as its JPEG frames can carry comments and EXIF.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings can quote element values
        new = _whitelisted(ds, KEEP_KEYWORDS)
    _set_identity(new, ds, raw, salt=salt, patient_key=patient_key)
    _mark_lossy(new, getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None))
    try:
        _set_pixels(new, ds, raw)
        buffer = io.BytesIO()
        new.save_as(buffer, enforce_file_format=True)
    except Exception as exc:  # pydicom raises many types when a dataset is unusual
        raise DeidentificationError(
            f"cannot write a de-identified copy of this DICOM ({type(exc).__name__})"
        ) from None
    _check_copy(buffer.getvalue(), raw)
    return buffer.getvalue()


def _whitelisted(source, keywords):
    """A new dataset holding fresh copies of ``source``'s elements named in ``keywords``.

    An element is copied only with the VR the DICOM dictionary gives its keyword, so a
    whitelisted keyword holding a sequence (or a sequence holding a value) is dropped. A
    sequence is kept only when ``ITEM_KEYWORDS`` names it, and each of its items is rebuilt
    the same way from its own list: nothing nested is copied as a whole.
    """
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    new = Dataset()
    for keyword in keywords:
        try:
            element = source[keyword] if keyword in source else None
        except Exception:  # a value pydicom cannot convert is not copied
            continue
        if element is None or not _vr_fits(element):
            continue
        if element.VR != "SQ":
            new.add(DataElement(element.tag, element.VR, element.value, already_converted=True))
            continue
        if keyword not in ITEM_KEYWORDS:
            continue
        items = [_whitelisted(item, ITEM_KEYWORDS[keyword]) for item in element.value]
        items = [item for item in items if len(item)]
        if items:
            new.add(DataElement(element.tag, "SQ", Sequence(items)))
    return new


def _vr_fits(element) -> bool:
    """Whether ``element`` has the VR (or one of the VRs) the DICOM dictionary gives its tag."""
    from pydicom.datadict import dictionary_VR

    expected = dictionary_VR(element.tag)
    return element.VR == expected or element.VR in expected.split(" or ")


def _set_identity(new, ds, raw: np.ndarray, *, salt: str, patient_key: str) -> None:
    from pydicom.uid import generate_uid

    original_uid = _raw_text(ds.get("SOPInstanceUID")) or hashlib.sha256(raw.tobytes()).hexdigest()
    new.SOPInstanceUID = generate_uid(entropy_srcs=[salt, "sop", original_uid])
    new.StudyInstanceUID = generate_uid(
        entropy_srcs=[salt, "study", _raw_text(ds.get("StudyInstanceUID")) or original_uid]
    )
    new.SeriesInstanceUID = generate_uid(
        entropy_srcs=[salt, "series", _raw_text(ds.get("SeriesInstanceUID")) or original_uid]
    )
    if "SOPClassUID" not in new:
        new.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    new.PatientIdentityRemoved = "YES"
    new.DeidentificationMethod = "medsite: PS3.15 Basic Profile via attribute whitelist"
    new.PatientID = patient_key[:16] if patient_key else ""
    new.PatientName = "ANONYMOUS"


# Transfer syntaxes that always lose information, with their PS3.16 CID 7201 method.
_LOSSY_METHODS = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",  # JPEG Extended
}


def _mark_lossy(new, transfer_syntax) -> None:
    """The copy is uncompressed, but pixels once JPEG-compressed stay lossy: say so."""
    method = _LOSSY_METHODS.get(str(transfer_syntax or ""))
    if method is None or clean_text(new.get("LossyImageCompression")) == "01":
        return
    new.LossyImageCompression = "01"
    if "LossyImageCompressionMethod" not in new:
        new.LossyImageCompressionMethod = method


def _set_pixels(new, ds, raw: np.ndarray) -> None:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = new.SOPClassUID
    meta.MediaStorageSOPInstanceUID = new.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    new.file_meta = meta
    photometric = clean_text(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric.startswith("YBR") and raw.ndim >= 3 and raw.shape[-1] == 3:
        photometric = "RGB"  # pixel_array already converted YBR to RGB
    new.PhotometricInterpretation = photometric
    if int(ds.get("SamplesPerPixel", 1) or 1) > 1:
        new.PlanarConfiguration = 0  # pixel_array is (rows, cols, samples)
    new.PixelData = _pixel_bytes(raw, bits_allocated=int(ds.BitsAllocated))
    new["PixelData"].VR = "OB" if int(ds.BitsAllocated) <= 8 else "OW"


def _check_copy(data: bytes, raw: np.ndarray) -> None:
    """Re-read the stored copy: valid DICOM whose pixels are exactly ``raw``."""
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            same = np.array_equal(pydicom.dcmread(io.BytesIO(data)).pixel_array, raw)
    except Exception as exc:  # any failure to read back means the copy is unusable
        raise DeidentificationError(
            f"de-identified copy of this DICOM is unreadable ({type(exc).__name__})"
        ) from None
    if not same:
        raise DeidentificationError("de-identified copy of this DICOM changed its pixels")


def _pixel_bytes(raw: np.ndarray, *, bits_allocated: int) -> bytes:
    """Native little-endian Pixel Data for an uncompressed copy (even length)."""
    from pydicom.pixels import pack_bits

    if bits_allocated == 1:
        payload = pack_bits(raw)
    else:
        little = raw.dtype.newbyteorder("<") if raw.dtype.itemsize > 1 else raw.dtype
        payload = np.ascontiguousarray(raw, dtype=little).tobytes()
    if len(payload) % 2:
        payload += b"\x00"
    return payload


# --- rasters ---------------------------------------------------------------


def png_without_metadata(image: Image.Image) -> bytes:
    """``image`` (in a PNG-writable mode) as a PNG of its pixels only.

    Pillow writes ``image.info["icc_profile"]`` (which can name a person in its description)
    unless told otherwise, so the PNG is written from a copy whose ``info`` holds nothing but
    the transparency (part of the pixels), with no ICC profile, EXIF, text chunks or dpi.
    """
    clean = image.copy()
    transparency = image.info.get("transparency")
    clean.info = {} if transparency is None else {"transparency": transparency}
    buffer = io.BytesIO()
    clean.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


# --- JPEG ------------------------------------------------------------------

_JPEG_FRAMES = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # SOFn
# Segments a decoder needs, copied as they are: SOFn, DHT, DAC, DQT, DNL, DRI.
_JPEG_TABLES = _JPEG_FRAMES | {0xC4, 0xCC, 0xDB, 0xDC, 0xDD}
# Segments dropped: APPn (EXIF, XMP, JFIF thumbnails, ICC, Photoshop...) and COM.
_JPEG_DROPPED = set(range(0xE0, 0xF0)) | {0xFE}
# Markers without a segment that carry nothing: TEM, RSTn outside a scan.
_JPEG_BARE = {0x01} | set(range(0xD0, 0xD8))
# Entropy-coded data ends at 0xFF followed by neither 0x00 (stuffing) nor RSTn.
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7]")


def strip_jpeg_metadata(data: bytes) -> bytes:
    """A JPEG holding only what decoding needs, its compressed data untouched.

    Kept: SOI, the tables (DQT, DHT, DAC), frame headers (SOFn), restart intervals (DRI), DNL,
    each scan (SOS and its entropy-coded data, RSTn included) and EOI. APP0 (JFIF) and APP14
    (Adobe) are rebuilt holding only the fact of their presence and the colour-transform
    byte, as decoders pick the colour space from them. Every other APPn, COM, and anything
    after EOI is dropped. Damaged structure raises ``DeidentificationError``.
    """
    if not data.startswith(b"\xff\xd8"):
        raise DeidentificationError("JPEG structure is damaged (no start-of-image marker)")
    kept, colour, pos = [], {}, 2
    frame = scans = 0
    while True:
        marker, pos = _next_marker(data, pos)
        if marker == 0xD9:  # EOI: whatever follows is dropped
            break
        if marker in _JPEG_BARE:
            continue
        segment, pos = _segment(data, pos, marker)
        if marker == 0xDA:
            if not frame:
                raise DeidentificationError("JPEG structure is damaged (scan before frame header)")
            end = _SCAN_END.search(data, pos)
            if end is None:
                raise DeidentificationError("JPEG is truncated (scan data has no end)")
            kept.append(segment + data[pos : end.start()])
            pos, scans = end.start(), scans + 1
        elif marker in _JPEG_TABLES:
            kept.append(segment)
            frame = frame or marker in _JPEG_FRAMES
        elif marker in (0xE0, 0xEE) and not scans:
            colour.update(_colour_flag(marker, segment))
        elif marker not in _JPEG_DROPPED:
            raise DeidentificationError(f"JPEG holds an unsupported marker (0xFF{marker:02X})")
    if not scans:
        raise DeidentificationError("JPEG structure is damaged (no start-of-scan segment)")
    return b"\xff\xd8" + _colour_segments(colour) + b"".join(kept) + b"\xff\xd9"


def _next_marker(data: bytes, pos: int) -> tuple[int, int]:
    """The marker at ``pos`` (after any 0xFF fill bytes) and the position after it."""
    if pos >= len(data):
        raise DeidentificationError("JPEG is truncated (no end-of-image marker)")
    if data[pos] != 0xFF:
        raise DeidentificationError("JPEG structure is damaged (bytes outside any segment)")
    while pos < len(data) and data[pos] == 0xFF:
        pos += 1
    if pos >= len(data) or data[pos] == 0x00:
        raise DeidentificationError("JPEG structure is damaged (marker expected)")
    return data[pos], pos + 1


def _segment(data: bytes, pos: int, marker: int) -> tuple[bytes, int]:
    """The whole segment (marker, length, payload) whose length field is at ``pos``."""
    if pos + 2 > len(data):
        raise DeidentificationError("JPEG is truncated (segment without a length)")
    length = struct.unpack(">H", data[pos : pos + 2])[0]
    if length < 2 or pos + length > len(data):
        raise DeidentificationError(f"JPEG structure is damaged (bad length in 0xFF{marker:02X})")
    return bytes([0xFF, marker]) + data[pos : pos + length], pos + length


def _colour_flag(marker: int, segment: bytes) -> dict:
    """What a decoder takes from APP0 (JFIF present) or APP14 (Adobe colour transform)."""
    payload = segment[4:]
    if marker == 0xE0 and payload.startswith(b"JFIF\x00"):
        return {"jfif": True}
    if marker == 0xEE and payload.startswith(b"Adobe") and len(payload) >= 12:
        return {"adobe": payload[11]}
    return {}


def _colour_segments(flags: dict) -> bytes:
    """Minimal JFIF 1.01 (no density, no thumbnail) and Adobe segments for ``flags``."""
    out = b""
    if flags.get("jfif"):
        out += b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    if "adobe" in flags:
        out += b"\xff\xee\x00\x0eAdobe" + struct.pack(">HHHB", 100, 0, 0, flags["adobe"])
    return out
