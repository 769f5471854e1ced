"""ml_backend.data.decode on what sites really send: EXIF-rotated photos, enhanced
(multi-frame) CT/MR with functional groups, DICOM without file meta, BigTIFF and 12-bit
JPEG, display attributes (Presentation LUT Shape, pixel padding, pixel spacing), non-ASCII
text and people's names in kept free text."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from ml_backend.data.decode import ScanDecodeError, decode_scan, sniff_format
from ml_backend.data.deid import identifier_reason, kept_value, strip_jpeg_metadata

SALT = "test-salt-0123456789"


# --- A. EXIF orientation ------------------------------------------------------------------

# What undoes each EXIF orientation (PIL.ImageOps.exif_transpose) and what makes it.
_SHOW = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
         4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
         6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
         8: Image.Transpose.ROTATE_90}
_MAKE = {**_SHOW, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def _upright() -> Image.Image:
    """A 96 x 64 (wide) grey picture with a white block at its top-left corner only."""
    array = np.full((64, 96), 60, dtype=np.uint8)
    array[4:20, 4:20] = 255
    return Image.fromarray(array)


def _with_orientation(fmt: str, orientation: int | None) -> bytes:
    image = _upright()
    buffer = io.BytesIO()
    kwargs = {"quality": 95} if fmt == "JPEG" else {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        exif[0x010E] = "Doe^John"              # metadata the stored copy must not keep
        image = image.transpose(_MAKE[orientation]) if orientation != 1 else image
        kwargs["exif"] = exif.tobytes()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _white_corner(pixels: np.ndarray) -> tuple[int, int]:
    ys, xs = np.nonzero(pixels > 0.9)
    return int(ys.mean() > pixels.shape[0] / 2), int(xs.mean() > pixels.shape[1] / 2)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
def test_exif_orientation_is_applied_and_the_stored_copy_is_upright(fmt, orientation):
    data = _with_orientation(fmt, orientation)
    decoded = decode_scan(data, name=f"x.{fmt.lower()}", salt=SALT)
    assert decoded.pixels.shape == (64, 96)                 # upright: wide, as taken
    assert (decoded.width, decoded.height) == (96, 64)
    assert _white_corner(decoded.pixels) == (0, 0)          # the marker top-left, not mirrored
    assert any(f"EXIF orientation ({orientation}:" in note for note in decoded.warnings)
    # the stored copy holds the upright pixels, losslessly, with no EXIF left to lose
    assert decoded.stored_ext == ".png"
    stored = Image.open(io.BytesIO(decoded.stored_bytes))
    assert stored.size == (96, 64) and not stored.getexif()
    assert b"Doe^John" not in decoded.stored_bytes
    again = decode_scan(decoded.stored_bytes, name="x.png", salt=SALT)
    np.testing.assert_allclose(again.pixels, decoded.pixels, atol=1 / 255 + 1e-6)
    assert again.warnings == []


@pytest.mark.parametrize("orientation", [None, 1])
def test_jpeg_without_a_turn_is_stored_as_before(orientation):
    data = _with_orientation("JPEG", orientation)
    decoded = decode_scan(data, name="x.jpg", salt=SALT)
    assert decoded.stored_ext == ".jpg"
    assert decoded.stored_bytes == strip_jpeg_metadata(data)
    assert _white_corner(decoded.pixels) == (0, 0) and decoded.warnings == []


# --- B. enhanced (multi-frame) CT / MR functional groups -----------------------------------

def _ct_stored() -> np.ndarray:
    hu = np.linspace(-1000, 1000, 32 * 32).reshape(32, 32)
    return (hu + 1024).astype(np.uint16)              # stored 24 .. 2024


def _dataset(sop: str, pixels: np.ndarray, *, bits: int = 12, **elements) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID-0001"
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.set_pixel_data(pixels, "MONOCHROME2", bits)
    return ds


def _bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _item(**elements) -> Dataset:
    item = Dataset()
    for key, value in elements.items():
        setattr(item, key, value)
    return item


def _enhanced_ct(frames: int = 3, per_frame_intercepts: list[float] | None = None) -> Dataset:
    stored = np.stack([_ct_stored()] * frames)
    ds = _dataset("1.2.840.10008.5.1.4.1.1.2.1", stored)      # Enhanced CT Image Storage
    shared = Dataset()
    measures = _item(PixelSpacing=[0.5, 0.7], SliceThickness=2.5)
    measures.ReferencedImageSequence = Sequence([_item(PatientName="Nested^Name")])
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.FrameVOILUTSequence = Sequence([_item(WindowCenter=40, WindowWidth=400)])
    per_frame = []
    for index in range(frames):
        item = Dataset()
        item.FrameContentSequence = Sequence([_item(FrameComments="Comment about Doe")])
        if per_frame_intercepts is not None:
            item.PixelValueTransformationSequence = Sequence([_item(
                RescaleIntercept=per_frame_intercepts[index], RescaleSlope=1, RescaleType="HU")])
        per_frame.append(item)
    if per_frame_intercepts is None:
        shared.PixelValueTransformationSequence = Sequence([_item(
            RescaleIntercept=-1024, RescaleSlope=1, RescaleType="HU")])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    return ds


def test_enhanced_ct_shared_functional_groups_decode_like_the_classic_twin():
    classic = decode_scan(_bytes(_dataset(
        "1.2.840.10008.5.1.4.1.1.2", _ct_stored(), RescaleIntercept=-1024, RescaleSlope=1,
        WindowCenter=40, WindowWidth=400, PixelSpacing=[0.5, 0.7])), salt=SALT)
    enhanced = decode_scan(_bytes(_enhanced_ct()), salt=SALT)
    assert enhanced.meta["value_range"] == classic.meta["value_range"] == [-1000.0, 1000.0]
    assert enhanced.meta["window"] == classic.meta["window"] == [40.0, 400.0]
    assert enhanced.meta["pixel_spacing"] == [0.5, 0.7]
    np.testing.assert_allclose(enhanced.pixels, classic.pixels, atol=1e-6)
    # the stored (de-identified) copy decodes to the same values ...
    again = decode_scan(enhanced.stored_bytes, salt=SALT)
    assert again.meta["value_range"] == [-1000.0, 1000.0]
    assert again.meta["window"] == [40.0, 400.0]
    assert again.meta["pixel_spacing"] == [0.5, 0.7]
    np.testing.assert_allclose(again.pixels, enhanced.pixels, atol=1e-6)
    # ... and keeps nothing of the groups but pixel values, window and measures
    assert b"Doe" not in enhanced.stored_bytes and b"Nested" not in enhanced.stored_bytes
    stored = pydicom.dcmread(io.BytesIO(enhanced.stored_bytes))
    shared = stored.SharedFunctionalGroupsSequence[0]
    assert sorted(shared.dir()) == ["FrameVOILUTSequence", "PixelMeasuresSequence",
                                    "PixelValueTransformationSequence"]
    assert sorted(shared.PixelMeasuresSequence[0].dir()) == ["PixelSpacing", "SliceThickness"]


def test_enhanced_per_frame_rescale_is_each_frames_own():
    intercepts = [-1024, -1000, 0]
    data = _bytes(_enhanced_ct(per_frame_intercepts=intercepts))
    decoded = decode_scan(data, salt=SALT)
    stored = decoded.stored_bytes
    for index, intercept in enumerate(intercepts):
        for source, keep in ((data, False), (stored, False), (data, True)):
            frame = decode_scan(source, salt=SALT, frame=index, keep_copy=keep)
            low = float(_ct_stored().min()) + intercept
            assert frame.meta["value_range"][0] == pytest.approx(low)
            assert frame.meta["window"] == [40.0, 400.0]
    # the stored copy keeps one (possibly empty) per-frame item per frame
    assert len(pydicom.dcmread(io.BytesIO(stored)).PerFrameFunctionalGroupsSequence) == 3


def test_enhanced_single_frame_slices_stack_without_their_per_frame_groups():
    from ml_backend.data.series import stack_series

    slices = []
    for index in range(3):
        ds = _enhanced_ct(frames=1, per_frame_intercepts=[-1024])
        ds.ImagePositionPatient = [0, 0, float(index)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        slices.append(decode_scan(_bytes(ds), salt=SALT))
    stack = stack_series(slices, [str(i) for i in range(3)])
    assert "PerFrameFunctionalGroupsSequence" not in pydicom.dcmread(io.BytesIO(stack.data))
    for index in range(3):
        frame = decode_scan(stack.data, salt=SALT, frame=index, keep_copy=False)
        assert frame.meta["value_range"] == [-1000.0, 1000.0]


# --- C. DICOM without file meta -------------------------------------------------------------

def _reference_dicom() -> tuple[Dataset, np.ndarray]:
    ramp = np.tile(np.arange(0, 4000, 250, dtype=np.uint16), (16, 1))
    return _dataset("1.2.840.10008.5.1.4.1.1.1", ramp, Modality="CR"), ramp


@pytest.mark.parametrize("name", ["old.dcm", "old"])
def test_dicom_without_file_meta_is_read_as_its_dataset_is_encoded(name):
    ds, ramp = _reference_dicom()
    reference = decode_scan(_bytes(ds), salt=SALT)
    del ds.file_meta
    buffer = pydicom.filebase.DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    pydicom.filewriter.write_dataset(buffer, ds)
    raw = buffer.getvalue()
    assert sniff_format(raw, name) == "dicom"
    decoded = decode_scan(raw, name=name, salt=SALT)
    np.testing.assert_allclose(decoded.pixels, reference.pixels)
    assert any("no file meta header" in note for note in decoded.warnings)
    assert pydicom.dcmread(io.BytesIO(decoded.stored_bytes)).pixel_array.tolist() == ramp.tolist()
    assert decoded.meta["transfer_syntax"] == ImplicitVRLittleEndian.name


def test_dicom_starting_with_dicm_without_its_preamble_is_read():
    ds, _ramp = _reference_dicom()
    data = _bytes(ds)[128:]
    assert data.startswith(b"DICM")
    assert sniff_format(data, "x.dcm") == "dicom" and sniff_format(data, "x") == "dicom"
    decoded = decode_scan(data, name="x.dcm", salt=SALT)
    np.testing.assert_allclose(decoded.pixels, decode_scan(_bytes(ds), salt=SALT).pixels)


# --- D. BigTIFF, 12-bit JPEG -------------------------------------------------------------------

def test_bigtiff_is_read_within_the_pixel_budget():
    image = _upright()
    buffer = io.BytesIO()
    image.save(buffer, "TIFF", big_tiff=True)
    data = buffer.getvalue()
    assert data[:4] == b"II+\x00"
    assert sniff_format(data, "x.tif") == "tiff"
    decoded = decode_scan(data, name="x.tif", salt=SALT)
    assert decoded.pixels.shape == (64, 96) and _white_corner(decoded.pixels) == (0, 0)
    with pytest.raises(ScanDecodeError, match="TIFF declares 96x64 pixels, above the limit"):
        decode_scan(data, name="x.tif", salt=SALT, max_pixels=1000)


def test_twelve_bit_jpeg_outside_dicom_is_refused_with_what_to_do():
    buffer = io.BytesIO()
    _upright().save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 1] = 0xC1                 # extended sequential,
    data[sof + 4] = 12                   # 12-bit precision
    with pytest.raises(ScanDecodeError, match="12-bit JPEG files are not supported outside "
                                              "DICOM") as refused:
        decode_scan(bytes(data), name="x.jpg", salt=SALT)
    assert "16-bit PNG" in str(refused.value)


# --- E. display attributes ----------------------------------------------------------------------

def test_presentation_lut_shape_inverse_inverts_monochrome2():
    ds, _ramp = _reference_dicom()
    plain = decode_scan(_bytes(ds), salt=SALT)
    ds.PresentationLUTShape = "INVERSE"
    inverse = decode_scan(_bytes(ds), salt=SALT)
    np.testing.assert_allclose(inverse.pixels, 1.0 - plain.pixels, atol=1e-6)
    again = decode_scan(inverse.stored_bytes, salt=SALT)
    np.testing.assert_allclose(again.pixels, inverse.pixels, atol=1e-6)
    # MONOCHROME1 with INVERSE (what DX requires) is shown as MONOCHROME1, not twice inverted
    ds.PhotometricInterpretation = "MONOCHROME1"
    mono1 = decode_scan(_bytes(ds), salt=SALT)
    np.testing.assert_allclose(mono1.pixels, inverse.pixels, atol=1e-6)


def test_pixel_padding_is_left_out_of_the_automatic_window():
    hu = np.tile(np.linspace(-1000, 1000, 64), (64, 1))
    stored = (hu + 1024).astype(np.int16)
    stored[:, :24] = -2000                        # outside the field of view: padding
    ds = _dataset("1.2.840.10008.5.1.4.1.1.2", stored, bits=16, RescaleIntercept=-1024,
                  RescaleSlope=1)
    ds.PixelPaddingValue = -2000
    decoded = decode_scan(_bytes(ds), salt=SALT)
    inside = hu[:, 24:]
    center, width = decoded.meta["window"]
    assert center - width / 2 >= inside.min() - 20       # the window spans the tissue only
    assert decoded.pixels[:, 24:].max() > 0.95 and decoded.pixels[:, 24:].min() < 0.05
    assert decoded.meta["value_range"][0] == -3024.0     # the range still tells the truth
    again = decode_scan(decoded.stored_bytes, salt=SALT)
    assert again.meta["window"] == decoded.meta["window"]
    # a padding range (PixelPaddingRangeLimit) is left out too
    stored[:, :12] = -1900
    ds = _dataset("1.2.840.10008.5.1.4.1.1.2", stored, bits=16, RescaleIntercept=-1024,
                  RescaleSlope=1)
    ds.PixelPaddingValue = -2000
    ds.PixelPaddingRangeLimit = -1900
    ranged = decode_scan(_bytes(ds), salt=SALT)
    assert ranged.meta["window"] == decoded.meta["window"]


@pytest.mark.parametrize("spacing", [[0, 0], [-0.5, -0.5], [0.5, 0]])
def test_non_positive_pixel_spacing_is_dropped(spacing):
    ds, _ramp = _reference_dicom()
    ds.PixelSpacing = spacing
    assert decode_scan(_bytes(ds), salt=SALT).meta["pixel_spacing"] is None
    ds.PixelSpacing = [0.2, 0.3]
    assert decode_scan(_bytes(ds), salt=SALT).meta["pixel_spacing"] == [0.2, 0.3]


# --- F. character sets -----------------------------------------------------------------------

@pytest.mark.parametrize("charset, manufacturer", [
    ("ISO_IR 192", "Sïemens Ünïcode"),
    ("GB18030", "联影"),
    ("ISO_IR 100", "Ünïcode Medical"),
])
def test_non_ascii_kept_text_survives_in_the_stored_copy(charset, manufacturer):
    ds, _ramp = _reference_dicom()
    ds.SpecificCharacterSet = charset
    ds.Manufacturer = manufacturer
    ds.PatientName = "Müller^Jürgen"
    decoded = decode_scan(_bytes(ds), salt=SALT)
    assert decoded.meta["manufacturer"] == manufacturer
    stored = pydicom.dcmread(io.BytesIO(decoded.stored_bytes))
    assert stored.SpecificCharacterSet == "ISO_IR 192"
    assert stored.Manufacturer == manufacturer
    assert decode_scan(decoded.stored_bytes, salt=SALT).meta["manufacturer"] == manufacturer
    assert "Müller".encode() not in decoded.stored_bytes


def test_ascii_only_copy_declares_no_character_set():
    ds, _ramp = _reference_dicom()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.Manufacturer = "SIEMENS"
    stored = pydicom.dcmread(io.BytesIO(decode_scan(_bytes(ds), salt=SALT).stored_bytes))
    assert "SpecificCharacterSet" not in stored and stored.Manufacturer == "SIEMENS"


# --- G. people in kept free text ----------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "ZQXPHI Dr Smith Ward 3", "Dr. Jones", "DR. JONES", "Prof Brown's scanner", "Mrs Patel",
    "Mr. O'Neil", "Ms Lee", "Ward 7B", "ward C", "Room 12", "Rm 4", "Bed 3", "SMITH^JOHN",
])
def test_kept_free_text_naming_a_person_or_a_place_is_dropped(text):
    assert identifier_reason(text, attribute=True) is not None
    assert kept_value("ManufacturerModelName", text) is None
    assert kept_value("Manufacturer", text) is None


@pytest.mark.parametrize("text", ["Dr Smith", "Mrs. Patel", "Prof Brown"])
def test_a_title_and_a_name_is_a_person_in_any_name(text):
    assert identifier_reason(text) is not None
    assert identifier_reason(f"{text} collection", file_name=True) is not None


def test_a_ward_names_a_collection_but_not_a_scanner():
    """A dataset or folder called 'ward 3' is a collection's name; a model name holding one
    was typed in at the site, where a patient lies."""
    assert identifier_reason("ward 3", file_name=True) is None
    assert identifier_reason("Room 12") is None
    assert identifier_reason("ward 3", attribute=True) is not None


REAL_MODEL_NAMES = [
    "SOMATOM Definition AS+", "SOMATOM Force", "Ingenuity CT", "DRX-Revolution",
    "DRX-Evolution", "Signa HDxt", "MAGNETOM Skyra", "MAGNETOM Prisma_fit", "AeroDR",
    "Discovery MR750w", "Optima MR450w", "Revolution EVO", "Brilliance 64", "iCT 256",
    "Aquilion ONE", "Achieva dStream", "Ingenia", "LightSpeed VCT", "Definium 8000",
    "DigitalDiagnost", "CXDI-710C Wireless", "FDR D-EVO II", "Selenia Dimensions",
    "Mammomat Inspiration", "Lumify", "EPIQ 7G", "Vivid E95", "Voluson E10",
    "Biograph mCT", "Discovery NM/CT 670", "Ysio Max", "MR Solutions", "DR 600",
    "Carestream DRX-1", "uMR 780", "Prime SP", "Drystar 5302", "FORWARD Scan", "Edward",
]


@pytest.mark.parametrize("model", REAL_MODEL_NAMES)
def test_real_scanner_model_names_are_kept(model):
    assert identifier_reason(model) is None, model
    assert kept_value("ManufacturerModelName", model) == model


@pytest.mark.parametrize("name", ["Nurse Triage", "MS Lesion", "MR Brain", "Sr imaging",
                                  "Drusen", "Mass", "DR follow-up"])
def test_class_and_folder_names_that_only_look_titled_stay(name):
    """A title rule for kept DICOM text also reads class folders and CSV labels: a class that
    only starts like a title is not a person."""
    assert identifier_reason(name) is None, name
