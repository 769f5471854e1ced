"""De-identification of what ``ml_backend.data.decode`` keeps from an uploaded file.

Pure functions: no Django, no settings, no logging of element values. The caller passes the
de-identification salt explicitly.

- DICOM is rewritten from a whitelist of technical attributes (``KEEP_KEYWORDS``) with fresh
  UIDs (``deidentified_dicom``), so every attribute of the DICOM PS3.15 Annex E Basic Profile
  (names, IDs, dates, addresses, accession numbers, institutions, physicians, private tags,
  ...) is dropped. Each element is copied fresh, only with its dictionary VR; the items of
  the two LUT sequences and of an enhanced image's functional groups (pixel value
  transformation, frame VOI LUT, pixel measures only) are rebuilt from their own whitelist
  (``ITEM_KEYWORDS``). A kept attribute keeps only values its rule allows (``kept_value``):
  coded ones only terms the standard defines (ImageType, Modality, Body Part Examined, ...),
  free text (Manufacturer, model name) only when it does not look like an identifier (nor a
  person by their title, nor a ward, room or bed), numbers only when finite. Kept text that
  is not ASCII is written as UTF-8 (SpecificCharacterSet ISO_IR 192).
  Pixels are always written uncompressed from the decoded array, never as the original
  encapsulated stream (whose JPEG frames can hold comments and EXIF).
- PNG and TIFF become a PNG of pixels only (``png_without_metadata``): no text chunks, no
  EXIF, no ICC profile.
- JPEG keeps only what decoding needs (``strip_jpeg_metadata``): tables, frame and scan
  headers, restart intervals and the entropy-coded data, untouched (not re-compressed), plus
  rebuilt minimal JFIF/Adobe segments when the original had them; every other APPn, COM and
  whatever follows EOI is dropped.
- ``patient_pseudonym``: HMAC-SHA256 of the DICOM PatientID (+ issuer) under the caller's
  salt — same patient, same key; the ID itself never leaves here.
- ``clean_text``: a short printable version of a technical attribute, for metadata.
- ``file_name_identifiers`` / ``identifier_reason``: whether a raster's file name (or a
  free-text value) looks like it carries a patient's identifiers (a number of 6+ digits, a
  date, MRN, DOB, ...); the import then stores no name, as for DICOM.

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
    "file_name_identifiers",
    "group_bucket",
    "identifier_reason",
    "kept_text",
    "kept_value",
    "patient_pseudonym",
    "photometric_of",
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
# is not a LUT or a functional group rebuilt from ITEM_KEYWORDS — is dropped by
# construction.
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
    "PixelPaddingValue",
    "PixelPaddingRangeLimit",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
)

# The items of the sequences above are rebuilt from these lists, element by element: free
# text (LUTExplanation), private tags and nested sequences inside an item are dropped.
ITEM_KEYWORDS = {
    "VOILUTSequence": ("LUTDescriptor", "LUTData"),
    "ModalityLUTSequence": ("LUTDescriptor", "ModalityLUTType", "LUTData"),
    # An enhanced (multi-frame) image's functional groups keep only what its pixel values,
    # window and pixel size need (PS3.3 C.7.6.16.2): no frame content, plane position,
    # referenced images or anything else a group can hold.
    "SharedFunctionalGroupsSequence": ("PixelValueTransformationSequence",
                                       "FrameVOILUTSequence", "PixelMeasuresSequence"),
    "PerFrameFunctionalGroupsSequence": ("PixelValueTransformationSequence",
                                         "FrameVOILUTSequence", "PixelMeasuresSequence"),
    "PixelValueTransformationSequence": ("RescaleIntercept", "RescaleSlope", "RescaleType"),
    "FrameVOILUTSequence": ("WindowCenter", "WindowWidth", "VOILUTFunction"),
    "PixelMeasuresSequence": ("PixelSpacing", "SliceThickness"),
}
# Sequences whose items stand for frames by their position: an emptied item stays.
_ITEM_PER_POSITION = frozenset({"PerFrameFunctionalGroupsSequence"})

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


def source_patient_pseudonym(patient_id: str, *, salt: str) -> str:
    """Keyed hash of a patient identifier a source's table gives for a file without DICOM
    identity (a CSV's 'Patient ID' column, a ChestX-ray14 ``<patient>_<film>.png`` name): the
    same key a DICOM file of that PatientID (no issuer) gets; ``""`` for an empty one."""
    patient_id = str(patient_id or "").strip()
    return _pseudonym(salt, "patient", "", patient_id) if patient_id else ""


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
    _declare_character_set(new)
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
            value = kept_value(keyword, element.value)
            if value is not None:
                new.add(DataElement(element.tag, element.VR, value,
                                    already_converted=value is element.value))
            continue
        if keyword not in ITEM_KEYWORDS:
            continue
        items = [_whitelisted(item, ITEM_KEYWORDS[keyword]) for item in element.value]
        if keyword not in _ITEM_PER_POSITION:
            items = [item for item in items if len(item)]
        if any(len(item) for item in items):
            new.add(DataElement(element.tag, "SQ", Sequence(items)))
    return new


_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})


def _declare_character_set(new) -> None:
    """The kept text as it reads (pydicom has decoded it from the original's character set,
    Latin-1, GB18030, ...), written as UTF-8 (ISO_IR 192) when any of it is not ASCII: the
    original's SpecificCharacterSet is not copied, and without one a reader takes the
    bytes for ASCII (a Chinese manufacturer's name would be written as '??'). An all-ASCII
    copy declares none, as before. Only the top level holds text: items keep numbers and
    coded terms."""
    for element in new:
        if element.VR in _TEXT_VRS and not str(element.value).isascii():
            new.SpecificCharacterSet = "ISO_IR 192"
            return


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
    if "SOPClassUID" in new and not _known_sop_class(new.SOPClassUID):
        del new.SOPClassUID  # a UID the standard does not define can carry digits of an ID
    if "SOPClassUID" not in new:
        new.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    new.PatientIdentityRemoved = "YES"
    new.DeidentificationMethod = "medsite: PS3.15 Basic Profile via attribute whitelist"
    new.PatientID = patient_key[:16] if patient_key else ""
    new.PatientName = "ANONYMOUS"


def _known_sop_class(uid) -> bool:
    """Whether ``uid`` is a SOP class of the DICOM standard (pydicom's UID dictionary)."""
    from pydicom.uid import UID

    try:
        return UID(str(uid)).type == "SOP Class"
    except Exception:  # not a UID at all
        return False


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
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = photometric_of(ds, samples=samples)
    if photometric.startswith("YBR") and raw.ndim >= 3 and raw.shape[-1] == 3:
        photometric = "RGB"  # pixel_array already converted YBR to RGB
    new.PhotometricInterpretation = photometric
    if samples > 1:
        new.PlanarConfiguration = 0  # pixel_array is (rows, cols, samples)
    if raw.dtype.kind == "f":  # Float / Double Float Pixel Data (parametric maps)
        double = raw.dtype.itemsize == 8
        for keyword in ("BitsStored", "HighBit", "PixelRepresentation"):
            if keyword in new:  # not allowed beside float pixel data (PS3.3 C.7.6.3)
                delattr(new, keyword)
        new.BitsAllocated = 64 if double else 32
        payload = np.ascontiguousarray(raw, dtype="<f8" if double else "<f4").tobytes()
        setattr(new, "DoubleFloatPixelData" if double else "FloatPixelData", payload)
        return
    new.PixelData = _pixel_bytes(raw, bits_allocated=int(ds.BitsAllocated))
    new["PixelData"].VR = "OB" if int(ds.BitsAllocated) <= 8 else "OW"


def photometric_of(ds, *, samples: int = 1) -> str:
    """The dataset's Photometric Interpretation when the standard defines it, else what
    its samples per pixel imply (MONOCHROME2 or RGB): a made-up value is never kept."""
    value = kept_value("PhotometricInterpretation",
                       clean_text(ds.get("PhotometricInterpretation", "")).upper() or None)
    if isinstance(value, str) and value:
        return value
    return "MONOCHROME2" if samples == 1 else "RGB"


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


# --- what a kept DICOM attribute may hold --------------------------------------------------
#
# The whitelist decides which attributes are kept; these rules decide which values. A coded
# attribute (CS) keeps only terms the DICOM standard defines for it, so a site (or anyone)
# cannot carry a name or an ID through it; a free-text one (Manufacturer, model name) is
# dropped when it looks like it holds identifiers (``identifier_reason``); a number is kept
# only when it is a finite number.

# PS3.3 C.7.3.1.1.1 (Modality), defined terms current and retired.
MODALITIES = frozenset("""
    ANN AR ASMT AU BDUS BI BMD CFM CR CT CTPROTOCOL DMS DG DOC DX ECG EEG EMG EOG EPS ES FID GM
    HC HD IO IOL IVOCT IVUS KER KO LEN LS MG MR M3D NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS
    OT PA PLAN POS PR PT PX REG RESP RF RG RTDOSE RTIMAGE RTINTENT RTPLAN RTRAD RTRECORD
    RTSEGANN RTSTRUCT RWV SEG SM SMR SR SRF STAIN TEXTUREMAP TG US VA XA XAPROTOCOL XC
    AS CD CF CP CS DD DF DM DS EC FA FS LP MA MS OPR ST VF
""".split())

# PS3.16 Annex L (Body Part Examined), compared without spaces, hyphens and underscores.
BODY_PARTS = frozenset("""
    ABDOMEN ABDOMENPELVIS ACETABULUM ACJOINT ADRENAL AMNIOTICFLUID ANKLE ANUS AORTA APPENDIX
    ARM ARTERY AXILLA BACK BILEDUCT BLADDER BRAIN BRAINSTEM BREAST BRONCHUS BUTTOCK CALCANEUS
    CALF CAROTID CEREBELLUM CERVIX CHEEK CHEST CHESTABDOMEN CHESTABDPELVIS CHOROIDPLEXUS
    CIRCLEOFWILLIS CLAVICLE COCCYX COLON CORNEA CORONARYARTERY CSPINE CTSPINE DIAPHRAGM
    DUODENUM EAR ELBOW ENDOMETRIUM ESOPHAGUS EXTREMITY EYE EYELID FACE FEMUR FIBULA FINGER FOOT
    FOREARM GALLBLADDER HAND HEAD HEADNECK HEART HIP HUMERUS IAC ILEUM ILIUM JAW JEJUNUM KIDNEY
    KNEE LARYNX LEG LIVER LOWERLIMB LSPINE LSSPINE LUNG LYMPHNODE MANDIBLE MAXILLA MEDIASTINUM
    MOUTH NASOPHARYNX NECK NECKCHEST NECKCHESTABDOMEN NECKCHESTABDPELV NECKCHESTABDPELVIS NOSE
    ORBIT OVARY PANCREAS PAROTID PATELLA PELVIS PENIS PERINEUM PHARYNX PITUITARY PLACENTA
    PROSTATE RADIUS RADIUSULNA RECTUM RIB SACRUM SCALP SCAPULA SCLERA SCROTUM SELLA SHOULDER
    SIJOINT SKULL SPINALCORD SPINE SPLEEN SSPINE STERNUM STOMACH SUBMANDIBULAR TESTIS THALAMUS
    THIGH THUMB THYMUS THYROID TIBIA TIBIAFIBULA TLSPINE TMJ TOE TONGUE TOOTH TRACHEA TSPINE
    ULNA UPPERLIMB URETER URETHRA UTERUS VAGINA VEIN VULVA WHOLEBODY WRIST ZYGOMA
""".split())

# ImageType (0008,0008): value 1 and 2 are enumerated (PS3.3 C.7.6.1.1.2); values 3 on are
# kept while each is a term the standard defines for some IOD (C.7.6.1.1.2, C.8.2.1.1.1 CT,
# C.8.4.1 NM, C.8.5.5 US, C.8.7.10 XA, C.8.8.2 RT Image, C.8.16.1 enhanced image flavour and
# derived pixel contrast, C.8.12.4 whole slide), and cut at the first one that is not.
IMAGE_TYPE_TERMS = frozenset({
    "", "OTHER", "MIXED", "NONE", "AXIAL", "LOCALIZER", "VOLUME", "LABEL", "OVERVIEW",
    "THUMBNAIL", "RESAMPLED", "STATIC", "DYNAMIC", "GATED", "WHOLE BODY", "TOMO",
    "GATED TOMO", "RECON TOMO", "RECON GATED TOMO", "EMISSION", "TRANSMISSION",
    "SINGLE PLANE", "BIPLANE A", "BIPLANE B", "DRR", "PORTAL", "SIMULATOR", "RADIOGRAPH",
    "BLANK", "FLUENCE", "ANGIO", "CARDIAC", "CARDIAC_GATED", "CARDRESP_GATED", "FLUOROSCOPY",
    "MOTION", "PERFUSION", "PRE_CONTRAST", "POST_CONTRAST", "RESP_GATED", "REST", "STRESS",
    "NON_PARALLEL", "PARALLEL", "WHOLE_BODY", "ATTENUATION", "DIFFUSION", "FLOW_ENCODED",
    "FLUID_ATTENUATED", "FMRI", "MAX_IP", "MIN_IP", "METABOLITE_MAP", "MULTIECHO",
    "PROTON_DENSITY", "REALTIME", "STIR", "T1", "T2", "T2_STAR", "TOF", "VELOCITY", "ADDITION",
    "DIVISION", "MASKED", "MAXIMUM", "MEAN", "MINIMUM", "MULTIPLICATION", "STD_DEVIATION",
    "SUBTRACTION", "QUANTITY", "FILTERED", "MEDIAN", "ENHANCED", "MPR", "MIP", "MINIP",
    "CURVED_MPR", "VOLUME_RENDER", "SURFACE_RENDER", "PROJECTION", "ABDOMINAL", "BREAST",
    "CHEST", "ENDOCAVITARY", "ENDORECTAL", "ENDOVAGINAL", "EPICARDIAL", "FETAL HEART",
    "GYNECOLOGY", "INTRACARDIAC", "INTRAOPERATIVE", "INTRAVASCULAR", "MUSCULOSKELETAL",
    "NEUROLOGY", "OBSTETRICAL", "OPHTHALMIC", "PEDIATRIC", "PELVIC", "RETROPERITONEAL",
    "SCROTAL", "SMALL PARTS", "TEE", "THYROID", "TRANSCRANIAL", "TRANSESOPHAGEAL",
    "TRANSRECTAL", "TRANSTHORACIC", "TRANSVAGINAL", "UROLOGY", "VASCULAR", "CARDIOLOGY",
})

# Rescale Type and an item's Modality LUT Type (PS3.3 C.11.1.1.2): defined terms.
_LUT_TYPES = frozenset({"OD", "HU", "US", "MGML", "Z_EFF", "ED", "EDW", "HU_MOD", "PCT",
                        "CM2", "CM-1", "MM-1", "PSU"})

DEFINED_TERMS = {
    "Modality": MODALITIES,
    "BodyPartExamined": BODY_PARTS,
    "PhotometricInterpretation": frozenset({
        "MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "HSV", "ARGB", "CMYK", "YBR_FULL",
        "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "XYB"}),
    "VOILUTFunction": frozenset({"LINEAR", "LINEAR_EXACT", "SIGMOID"}),
    "PresentationLUTShape": frozenset({"IDENTITY", "INVERSE"}),
    "LossyImageCompression": frozenset({"00", "01"}),
    "LossyImageCompressionMethod": frozenset({
        "ISO_10918_1", "ISO_14495_1", "ISO_15444_1", "ISO_15444_15", "ISO_13818_2",
        "ISO_14496_10", "ISO_23008_2", "ISO_18181_1"}),
    "BurnedInAnnotation": frozenset({"YES", "NO"}),
    "RescaleType": _LUT_TYPES,
    "ModalityLUTType": _LUT_TYPES,
}
FREE_TEXT = ("Manufacturer", "ManufacturerModelName")
NUMBERS = ("PixelSpacing", "ImagerPixelSpacing", "SliceThickness", "WindowCenter",
           "WindowWidth", "RescaleIntercept", "RescaleSlope", "LossyImageCompressionRatio")


def _values(value) -> list:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return list(value)
    return [value]


def _term(keyword: str, value: object) -> str:
    text = str(value).strip().upper()
    if keyword == "BodyPartExamined":
        text = re.sub(r"[\s_-]+", "", text)
    return text


def kept_value(keyword: str, value):
    """What the de-identified copy may hold of a whitelisted attribute's ``value``: the
    value (coded terms in their standard spelling), or None when it must be dropped. A
    keyword with no rule here (binary values, counts, LUT data) is kept as it is."""
    if value is None:
        return None
    if keyword == "ImageType":
        kept = []
        for position, item in enumerate(_values(value)):
            if not isinstance(item, str):
                break
            term = item.strip().upper()
            allowed = ({"ORIGINAL", "DERIVED"} if position == 0 else
                       {"PRIMARY", "SECONDARY"} if position == 1 else IMAGE_TYPE_TERMS)
            if term not in allowed:
                break
            kept.append(term)
        while kept and not kept[-1]:
            kept.pop()
        return None if len(kept) < 2 else kept
    if keyword in DEFINED_TERMS:
        items = _values(value)
        if not items or not all(isinstance(v, str) for v in items):
            return None
        terms = [_term(keyword, v) for v in items]
        if not all(term in DEFINED_TERMS[keyword] for term in terms):
            return None
        return terms if len(terms) > 1 else terms[0]
    if keyword in FREE_TEXT:
        if not isinstance(value, str) or identifier_reason(value, attribute=True) is not None:
            return None
        return value
    if keyword in NUMBERS:
        try:
            finite = all(np.isfinite(float(v)) for v in _values(value))
        except (TypeError, ValueError):
            return None
        return value if finite and _values(value) else None
    return value


def kept_text(ds, keyword: str, limit: int = 64) -> str:
    """A whitelisted attribute of ``ds`` as the de-identified copy keeps it (``kept_value``),
    as short printable text for metadata; ``""`` when absent or dropped."""
    try:
        value = ds.get(keyword)
    except Exception:  # a value pydicom cannot convert is not kept
        return ""
    return clean_text(kept_value(keyword, value) if value not in (None, "") else "", limit)


# --- file names and free text that may carry identifiers ------------------------------------
#
# A raster file's name (and the folders above it) is chosen by whoever exported it, and an
# export often names a file after its patient: ``Doe_John_MRN987654_DOB19650312.png``. A
# person's name alone cannot be told from any other word, so the rule looks for what travels
# with one: a long number, a date, or a word that names an identifier. It is deliberately
# wide (a 6-digit image number is hidden as an MRN would be): a hidden name costs a label on
# a page, a shown one a patient's identity.

_ID_WORDS = frozenset({
    "mrn", "dob", "pid", "ssn", "nhs", "empi", "medrec", "patient", "patientid", "patid",
    "pat", "birth", "birthdate", "dateofbirth", "born", "accession", "accno", "name",
    "surname", "forename", "firstname", "lastname", "fname", "lname",
})
_MONTH = (r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?"
          r"|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)(?![a-z])")
# A number of 6 or more digits once its leading zeros are dropped (an MRN, an accession
# number, a compact date, a phone number); ``0001234`` is a counter, ``987654`` is not.
_LONG_NUMBER = re.compile(r"(?<!\d)0*[1-9]\d{5,}(?!\d)")
_SIX_DIGITS = re.compile(r"(?<!\d)\d{6}(?!\d)")
# Dates with separators: 1965-03-12, 1965_3_12, 12.03.1965, 03-12-1965, 12.03.65; and with
# a month's name: 12Mar1965, 12-Mar-65, Mar 12 1965.
_DATE_YMD = re.compile(r"(?<!\d)(\d{4})([-_. ])(\d{1,2})\2(\d{1,2})(?!\d)")
_DATE_DMY = re.compile(r"(?<!\d)(\d{1,2})([-_. ])(\d{1,2})\2(\d{4})(?!\d)")
_DATE_SHORT = re.compile(r"(?<!\d)(\d{2})([-.])(\d{2})\2(\d{2})(?!\d)")
_DATE_NAMED = re.compile(rf"(?<![a-z])(?:\d{{1,2}}[-_. ]?{_MONTH}[-_. ]?\d{{2,4}}|"
                         rf"{_MONTH}[-_. ]?\d{{1,2}}(?:st|nd|rd|th)?[-_., ]+\d{{4}})(?!\d)",
                         re.IGNORECASE)
# A DICOM person name (Doe^John); in a file name also "Doe, John".
_PERSON_NAME = re.compile(r"[A-Za-z]\^[A-Za-z]")
_PERSON_NAME_COMMA = re.compile(r"[A-Za-z]{2},\s*[A-Za-z]{2}")
_WORDS = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")
# A person by their title: "Dr Smith", "Mrs Patel", "Prof. Brown", "DR. JONES". Without a
# full stop the title must be written as one (Dr, not DR) and the name capitalised, so the
# letters DR / MR / MS in scanner names ("AeroDR", "MR Solutions", "DR 600") do not count.
_TITLE = r"(?:Dr|Mr|Mrs|Ms|Mx|Miss|Prof|Professor|Sister)"
_TITLED_PERSON = re.compile(
    rf"(?<![A-Za-z]){_TITLE}\s+[A-Z][A-Za-z'’-]*[a-z]"
    rf"|(?<![A-Za-z])(?i:{_TITLE})\.\s*[A-Za-z][A-Za-z'’-]*[A-Za-z]")
# Where a patient lies: a ward (any), a room or bed with its number.
_PLACE = re.compile(
    r"(?<![A-Za-z])(?:ward(?![a-z])|(?:room|rm|bed)\s*[#:.-]?\s*(?:no\.?\s*)?\d)",
    re.IGNORECASE)


def _valid_date(year: int, month: int, day: int, *, short: bool = False) -> bool:
    """A plausible date: a real month and day; a 4-digit year between 1880 and 2100."""
    return 1 <= month <= 12 and 1 <= day <= 31 and (short or 1880 <= year <= 2100)


def _short_date(digits: str) -> bool:
    """Whether six digits read as a date: YYMMDD, DDMMYY or MMDDYY (``00`` first is a
    counter's padding, ``000123``, though it could be a YYMMDD of the year 2000)."""
    if digits.startswith("00"):
        return False
    a, b, c = int(digits[:2]), int(digits[2:4]), int(digits[4:])
    return any(_valid_date(y, m, d, short=True) for y, m, d in ((a, b, c), (c, b, a), (c, a, b)))


def identifier_reason(text: str, *, file_name: bool = False,
                      attribute: bool = False) -> str | None:
    """Why ``text`` (a file name or path, or a free-text attribute) may carry a patient's
    identifiers, in words, or None. Looks for a number of 6+ digits (leading zeros not
    counted) or six digits that read as a date, a date with separators or a month's name,
    a person name written ``Last^First`` (in a ``file_name`` also ``Last, First``) or after
    a title (``Dr Smith``, ``Mrs. Patel``), and words that name an identifier (MRN, DOB,
    PID, SSN, NHS, patient, birth, accession, name, ...), also inside camel case
    (``PatientName``) or glued to digits (``MRN987654``). In a kept DICOM free-text
    ``attribute`` (Manufacturer, model name) also a ward, room or bed (``Ward 3``,
    ``Room 12``): no scanner is named so, it was typed in at the site and says where a
    patient lies (a dataset or folder named ``ward 3`` is a collection's name, and stays)."""
    if not text:
        return None
    if _LONG_NUMBER.search(text):
        return "a number of 6 or more digits (an MRN, accession number or date?)"
    if any(_short_date(m.group()) for m in _SIX_DIGITS.finditer(text)):
        return "six digits that read as a date"
    for match in _DATE_YMD.finditer(text):
        if _valid_date(int(match[1]), int(match[3]), int(match[4])):
            return "a date"
    for match in _DATE_DMY.finditer(text):
        day, month, year = int(match[1]), int(match[3]), int(match[4])
        if _valid_date(year, month, day) or _valid_date(year, day, month):
            return "a date"
    for match in _DATE_SHORT.finditer(text):
        if _short_date(match[1] + match[3] + match[4]):
            return "a date"
    if _DATE_NAMED.search(text):
        return "a date"
    if _PERSON_NAME.search(text) or (file_name and _PERSON_NAME_COMMA.search(text)):
        return "a person's name (Last^First or Last, First)"
    if _TITLED_PERSON.search(text):
        return "a person named by their title (Dr, Mr, Mrs, Ms, Prof, ...)"
    if attribute and _PLACE.search(text):
        return "a ward, room or bed (where a patient lies)"
    words = {word.lower() for word in _WORDS.findall(text)}
    found = sorted(words & _ID_WORDS)
    if found:
        return f"the word {found[0].upper()!s} (an identifier's label)"
    return None


# Generated item names: an archive's images are named ``archive.npz#split/index`` by the
# import (the index is ours, not the file's); only the archive's own name is checked.
_ARCHIVE_ITEM = re.compile(r"^(?P<archive>.*\.npz)#[\w-]+/\d+$", re.IGNORECASE)


def file_name_identifiers(name: str) -> str | None:
    """Why a raster file's name or path (``folder/file.png``, every part of it) may carry
    identifiers (``identifier_reason``), or None. The extension is not checked."""
    text = name.replace("\\", "/")
    archive = _ARCHIVE_ITEM.match(text)
    if archive:
        text = archive["archive"]
    head, _, last = text.rpartition("/")
    stem = last.rsplit(".", 1)[0] if "." in last.lstrip(".") else last
    return identifier_reason(f"{head}/{stem}" if head else stem, file_name=True)


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
