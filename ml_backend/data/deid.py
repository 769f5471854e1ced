"""De-identification of what ``ml_backend.data.decode`` keeps from an uploaded file.

Pure functions: no Django, no settings, no logging of element values. The caller passes the
de-identification salt explicitly.

- DICOM is rewritten from a whitelist of technical attributes (``KEEP_KEYWORDS``) with fresh
  UIDs (``deidentified_dicom``), so every attribute of the DICOM PS3.15 Annex E Basic Profile
  (names, IDs, dates, addresses, accession numbers, institutions, physicians, private tags,
  ...) is dropped.
- PNG and TIFF become a PNG holding only image data (``png_without_metadata``): no text
  chunks, no EXIF.
- JPEG keeps its entropy-coded data but loses APP1-APP15 and COM segments (EXIF, XMP,
  comments) (``strip_jpeg_metadata``), so it is not re-compressed.
- ``patient_pseudonym``: HMAC-SHA256 of the DICOM PatientID (+ issuer) under the caller's
  salt — same patient, same key; the ID itself never leaves here.
- ``clean_text``: a short printable version of a technical attribute, for metadata.

Failures raise ``DeidentificationError``; ``str(exc)`` is a reason a user can act on.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import re
import struct

import numpy as np
from PIL import Image

__all__ = [
    "DeidentificationError",
    "KEEP_KEYWORDS",
    "PHI_KEYWORDS",
    "clean_text",
    "deidentified_dicom",
    "patient_pseudonym",
    "png_without_metadata",
    "strip_jpeg_metadata",
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
    """A short, printable version of a technical string attribute."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
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


def deidentified_dicom(ds, raw: np.ndarray, *, salt: str, patient_key: str) -> bytes:
    """Write a new DICOM holding only ``KEEP_KEYWORDS``, new UIDs, and the pseudonym."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    original_uid = _raw_text(ds.get("SOPInstanceUID")) or hashlib.sha256(raw.tobytes()).hexdigest()
    new = Dataset()
    for keyword in KEEP_KEYWORDS:
        if keyword in ds and keyword != "PixelData":
            new[keyword] = ds[keyword]
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

    transfer_syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = new.SOPClassUID
    meta.MediaStorageSOPInstanceUID = new.SOPInstanceUID
    compressed = bool(transfer_syntax) and transfer_syntax.is_compressed and not transfer_syntax.is_deflated
    try:
        if compressed:
            meta.TransferSyntaxUID = transfer_syntax
            new.PixelData = ds.PixelData
            new["PixelData"].VR = "OB"
            new.file_meta = meta
        else:
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
        buffer = io.BytesIO()
        new.save_as(buffer, enforce_file_format=True)
    except Exception as exc:  # pydicom raises many types when a dataset is unusual
        raise DeidentificationError(
            f"cannot write a de-identified copy of this DICOM ({type(exc).__name__})"
        ) from None
    # Re-read to prove the stored copy is valid DICOM.
    check = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    if "PixelData" not in check:
        raise DeidentificationError("de-identified copy lost its pixel data")
    return buffer.getvalue()


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
    """``image`` (in a PNG-writable mode) as a PNG with no text chunks and no EXIF: Pillow
    writes those only when asked to (``pnginfo=``, ``exif=``), and this never asks."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


_JPEG_DROP = {0xFE} | set(range(0xE1, 0xEE)) | {0xEF}  # COM, APP1..APP13, APP15 (APP14 = Adobe colour)


def strip_jpeg_metadata(data: bytes) -> bytes:
    """Copy a JPEG without EXIF/XMP/comment segments; the image data is untouched."""
    out = bytearray(data[:2])
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            break
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:  # start of scan: the rest is image data
            out += data[pos:]
            return bytes(out)
        length = struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        segment = data[pos : pos + 2 + length]
        if marker not in _JPEG_DROP:
            out += segment
        pos += 2 + length
    raise DeidentificationError("JPEG structure is damaged (no start-of-scan segment)")
