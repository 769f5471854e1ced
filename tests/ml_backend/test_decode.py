"""ml_backend.data.decode on real pydicom test files and on hand-built edge cases."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from ml_backend.data.decode import ScanDecodeError, decode_scan, render_preview, sniff_format
from tests.base import png_bytes, png_header_only, pydicom_test_files

SALT = "test-salt-0123456789"


def _dicom(pixels: np.ndarray, **elements) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR image storage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID-0001"
    for key, value in elements.items():
        setattr(ds, key, value)
    photometric = elements.get("PhotometricInterpretation", "MONOCHROME2")
    ds.set_pixel_data(pixels, photometric, 12 if pixels.dtype == np.uint16 else 8)
    if "PhotometricInterpretation" in elements:
        ds.PhotometricInterpretation = photometric
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _ramp() -> np.ndarray:
    return np.tile(np.arange(0, 4000, 1000, dtype=np.uint16), (4, 1))  # 0, 1000, 2000, 3000


def test_monochrome1_is_inverted():
    mono2 = decode_scan(_dicom(_ramp()), salt=SALT).pixels
    mono1 = decode_scan(_dicom(_ramp(), PhotometricInterpretation="MONOCHROME1"), salt=SALT).pixels
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)
    assert mono2[0, 0] < mono2[0, -1]  # brighter values are brighter on screen


def test_photometric_interpretation_is_checked_before_the_pixels_are_read():
    """Absent: read as MONOCHROME2 with a warning; made up or at odds with the samples per
    pixel: refused with that reason, not as damaged pixel data."""
    ramp = _ramp()

    def declared(value: str | None) -> bytes:
        ds = pydicom.dcmread(io.BytesIO(_dicom(ramp)))
        if value is None:
            del ds.PhotometricInterpretation
        else:
            ds.PhotometricInterpretation = value
        buffer = io.BytesIO()
        ds.save_as(buffer)
        return buffer.getvalue()

    read = decode_scan(declared(None), salt=SALT)
    np.testing.assert_allclose(read.pixels, decode_scan(_dicom(ramp), salt=SALT).pixels)
    assert read.meta["photometric"] == "MONOCHROME2"
    assert any("no Photometric Interpretation" in note for note in read.warnings)
    stored = pydicom.dcmread(io.BytesIO(read.stored_bytes))
    assert stored.PhotometricInterpretation == "MONOCHROME2"
    with pytest.raises(ScanDecodeError, match="not a value the standard defines") as made_up:
        decode_scan(declared("DOE^JANE"), salt=SALT)
    assert "DOE" not in str(made_up.value)          # an unknown value is not echoed
    with pytest.raises(ScanDecodeError, match="RGB takes 3 sample"):
        decode_scan(declared("RGB"), salt=SALT)


def test_rescale_slope_intercept_then_window():
    # Stored 0..3000, slope 2, intercept -1000 -> -1000..5000. Window centre 2000, width 2001
    # (LINEAR) maps 1000 -> 0 and 3000 -> 1; stored 1000 -> 1000 -> 0.0, stored 2000 -> 3000 -> 1.0.
    data = _dicom(_ramp(), RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=2000,
                  WindowWidth=2001)
    row = decode_scan(data, salt=SALT).pixels[0]
    assert row[0] == pytest.approx(0.0)       # -1000 below the window
    assert row[1] == pytest.approx(0.0, abs=1e-3)  # 1000 at the window's bottom (PS3.3 C.11.2.1.2)
    assert row[2] == pytest.approx(1.0)       # 3000 at the top
    assert row[3] == pytest.approx(1.0)       # 5000 above


def test_window_linear_exact_and_sigmoid():
    exact = decode_scan(_dicom(_ramp(), WindowCenter=1500, WindowWidth=1000,
                               VOILUTFunction="LINEAR_EXACT"), salt=SALT).pixels[0]
    np.testing.assert_allclose(exact, [0.0, 0.0, 1.0, 1.0], atol=1e-6)
    sigmoid = decode_scan(_dicom(_ramp(), WindowCenter=1500, WindowWidth=1000,
                                 VOILUTFunction="SIGMOID"), salt=SALT).pixels[0]
    assert np.all(np.diff(sigmoid) > 0) and 0 < sigmoid[1] < 0.5 < sigmoid[2] < 1


def test_no_window_uses_percentiles():
    pixels = decode_scan(_dicom(_ramp()), salt=SALT).pixels
    assert pixels.min() == pytest.approx(0.0) and pixels.max() == pytest.approx(1.0)


def test_compressed_transfer_syntaxes_decode_to_the_same_image():
    """pydicom ships MR_small in several encodings: all must give the same pixels."""
    files = {p.name: p for p in pydicom_test_files()}
    reference = decode_scan(files["MR_small.dcm"].read_bytes(), salt=SALT)
    for name in ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
                 "MR_small_jpeg_ls_lossless.dcm", "MR_small_bigendian.dcm",
                 "MR_small_implicit.dcm", "MR_small_expb.dcm"]:
        other = decode_scan(files[name].read_bytes(), salt=SALT)
        np.testing.assert_allclose(other.pixels, reference.pixels, atol=1e-6, err_msg=name)
        assert other.patient_key == reference.patient_key  # same patient -> same key


def test_stored_dicom_is_deidentified_and_valid():
    source = {p.name: p for p in pydicom_test_files()}["CT_small.dcm"]
    original = pydicom.dcmread(source)
    decoded = decode_scan(source.read_bytes(), salt=SALT)
    stored = pydicom.dcmread(io.BytesIO(decoded.stored_bytes))
    np.testing.assert_array_equal(stored.pixel_array, original.pixel_array)
    assert stored.PatientIdentityRemoved == "YES"
    for keyword in ("PatientName", "PatientID", "StudyDate", "InstitutionName"):
        if keyword in stored and keyword in original:
            assert stored.data_element(keyword).value != original.data_element(keyword).value
    assert "PatientBirthDate" not in stored
    assert not any(element.tag.is_private for element in stored)
    assert stored.SOPInstanceUID != original.SOPInstanceUID
    assert decoded.meta["modality"] == "CT"


def test_patient_key_depends_on_salt_and_patient():
    data_a = _dicom(_ramp(), PatientID="A-1")
    data_b = _dicom(_ramp(), PatientID="B-2")
    key_a = decode_scan(data_a, salt=SALT).patient_key
    assert key_a == decode_scan(_dicom(_ramp(), PatientID="A-1"), salt=SALT).patient_key
    assert key_a != decode_scan(data_b, salt=SALT).patient_key
    assert key_a != decode_scan(data_a, salt="another-salt-xxxxxx").patient_key
    assert "A-1" not in key_a


@pytest.mark.parametrize("data,name,reason", [
    (b"", "x.png", "empty file"),
    (b"hello, I am text", "notes.dcm", "not a DICOM file"),
    (b"hello, I am text", "notes.bin", "unsupported or unrecognised"),
    (png_header_only(50_000, 50_000), "bomb.png", "decompression bomb"),
    (png_bytes()[:60], "cut.png", "PNG"),
])
def test_bad_input_gives_clear_reason(data, name, reason):
    with pytest.raises(ScanDecodeError, match=reason):
        decode_scan(data, name=name, salt=SALT)


def test_truncated_dicom_is_refused():
    files = {p.name: p for p in pydicom_test_files()}
    data = files["CT_small.dcm"].read_bytes()
    with pytest.raises(ScanDecodeError, match="damaged or truncated|not a readable DICOM"):
        decode_scan(data[: len(data) // 2], name="cut.dcm", salt=SALT)


def test_pixel_limit_is_configurable():
    with pytest.raises(ScanDecodeError, match="above the limit"):
        decode_scan(png_bytes(size=64), salt=SALT, max_pixels=1000)


def test_jpeg_metadata_is_stripped_without_recompression():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 40), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x010E] = "Jane Doe 1970-01-01"  # ImageDescription
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif, comment=b"patient Jane Doe")
    data = buffer.getvalue()
    assert b"Jane Doe" in data
    decoded = decode_scan(data, name="x.jpg", salt=SALT)
    assert b"Jane Doe" not in decoded.stored_bytes
    reread = np.asarray(Image.open(io.BytesIO(decoded.stored_bytes)))
    np.testing.assert_array_equal(reread, np.asarray(Image.open(io.BytesIO(data))))


def test_sixteen_bit_png_and_preview():
    array = (np.linspace(0, 60000, 64 * 48).reshape(48, 64)).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    decoded = decode_scan(buffer.getvalue(), name="x.png", salt=SALT)
    assert decoded.meta["bits_stored"] == 16 and decoded.pixels.max() == pytest.approx(1.0)
    preview = Image.open(io.BytesIO(render_preview(decoded.pixels, max_side=32)))
    assert preview.mode == "L" and preview.size == (32, 24)


def test_sniff_uses_content_not_name():
    assert sniff_format(png_bytes(), "scan.dcm") == "png"
    assert sniff_format(b"\xff\xd8\xff\xe0" + b"0" * 10, "a.png") == "jpeg"
    assert sniff_format(b"GIF89a....", "a.png") is None


def test_one_frame_of_a_multi_frame_image_is_read_alone_when_no_copy_is_kept():
    """The label page scrolls a stacked series a slice at a time (``keep_copy=False`` with a
    frame): only that frame's bytes are read and decoded, and it is the same frame a full
    decode gives, for native, compressed, big-endian and colour files alike."""
    import tracemalloc

    volume = np.stack([np.full((256, 256), 40 * k, np.uint16) + _ramp()[0, 0]
                       for k in range(100)])                     # 100 frames, 12.5 MB
    volume[:, :8, :8] = np.arange(100, dtype=np.uint16)[:, None, None] * 7
    data = _dicom(volume, Modality="CT", RescaleIntercept=-1024, RescaleSlope=1)
    for frame in (0, 37, 99):
        full = decode_scan(data, salt=SALT, frame=frame, window=(40, 400))
        alone = decode_scan(data, salt=SALT, frame=frame, window=(40, 400), keep_copy=False)
        np.testing.assert_array_equal(alone.pixels, full.pixels)
        assert alone.num_frames == 100 and alone.stored_bytes == b""
    decode_scan(data, salt=SALT, frame=50, keep_copy=False)       # imports settle first
    tracemalloc.start()
    try:
        decode_scan(data, salt=SALT, frame=50, keep_copy=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * 2 ** 20, f"{peak / 2 ** 20:.1f} MB for one 128 KB frame of 12.5 MB"
    with pytest.raises(ScanDecodeError, match="frame 100 asked of an image with 100"):
        decode_scan(data, salt=SALT, frame=100, keep_copy=False)

    files = {p.name: p for p in pydicom_test_files()}
    for name, frames in (("rtdose.dcm", 15), ("rtdose_rle.dcm", 15), ("rtdose_expb.dcm", 15),
                         ("SC_rgb_rle_2frame.dcm", 2), ("examples_ybr_color.dcm", 30)):
        raw = files[name].read_bytes()
        for frame in {0, frames // 2, frames - 1}:
            full = decode_scan(raw, salt=SALT, frame=frame)
            alone = decode_scan(raw, salt=SALT, frame=frame, keep_copy=False)
            np.testing.assert_array_equal(alone.pixels, full.pixels, err_msg=f"{name} {frame}")
