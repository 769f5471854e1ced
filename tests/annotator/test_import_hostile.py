"""Hostile files at import (a probe's findings): non-finite values refused with a reason and
never counted as duplicates, raster names that carry identifiers not stored, DICOM coded
values kept only as the standard's terms, float pixel data decoded, multi-page TIFFs judged.

Real files are written into tmp dirs with pydicom and Pillow, imported by the import
service (``run_import``) or uploaded through the page, on the test database."""

from __future__ import annotations

import io
import re

import numpy as np
import pydicom
import pytest
from django.core.management import call_command
from PIL import Image
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from annotator import services
from annotator.models import ImportJob, LabelClass, Scan
from ml_backend.data.decode import decode_scan
from ml_backend.data.deid import file_name_identifiers
from tests.base import FIXTURES, PASSWORD, media_files, png_bytes
from tests.conftest import run_import

PHI_NAME = "Doe_John_MRN987654_DOB19650312.png"


def dicom_bytes(pixels: np.ndarray | None = None, *, elements: dict | None = None,
                float_kind: str | None = None) -> bytes:
    """A small CT slice (16-bit unless ``float_kind`` names Float / Double Float Pixel
    Data); ``elements``: keyword -> value, or keyword -> (tag, VR, raw value) written as is."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"          # CT Image Storage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.PatientName = "Doe^John"
    ds.PatientID = "MRN987654"
    if float_kind is None:
        pixels = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 700
                  if pixels is None else pixels)
        ds.set_pixel_data(pixels, "MONOCHROME2", 16)
    else:
        double = float_kind == "DoubleFloatPixelData"
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.30"     # Parametric Map Storage
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 64 if double else 32
        setattr(ds, float_kind, pixels.astype("<f8" if double else "<f4").tobytes())
    for keyword, value in (elements or {}).items():
        if isinstance(value, tuple):
            ds.add(DataElement(*value))
        else:
            setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def referenced_files() -> set[str]:
    names = set()
    for file_name, preview_name in Scan.objects.values_list("file", "preview"):
        names.update([file_name, preview_name])
    return names


def database_text() -> str:
    out = io.StringIO()
    call_command("dumpdata", "annotator", stdout=out)
    return out.getvalue()


# --- 1. non-finite values: refused with a reason, never a "duplicate" ----------------------


@pytest.mark.parametrize("slope,intercept", [
    ("1e308", "1e308"),      # the probe's file: the rescaled values overflow to infinity
    ("1e38", "0"),           # finite, but beyond float32 once multiplied
    ("NaN", "0"),
    ("1", "-inf"),
])
def test_a_rescale_to_infinity_is_refused_with_its_reason(project, users, tmp_path, settings,
                                                          slope, intercept):
    source = tmp_path / "rescale"
    source.mkdir()
    (source / "overflow.dcm").write_bytes(dicom_bytes(elements={
        "RescaleSlope": (0x00281053, "DS", slope),
        "RescaleIntercept": (0x00281052, "DS", intercept)}))
    job = run_import(project, source, created_by=users["dora"])
    assert (job.imported, job.duplicates, job.failed) == (0, 0, 1)
    assert "non-finite rescale slope/intercept" in job.errors[0]["reason"]
    assert job.headline == "Nothing imported: no file could be read"
    assert not Scan.objects.exists()
    assert media_files(settings.MEDIA_ROOT) == set()


def test_nan_pixels_are_refused(project, tmp_path, settings):
    pixels = np.linspace(-1, 1, 20).reshape(4, 5)
    pixels[1, 2] = np.nan
    source = tmp_path / "nan"
    source.mkdir()
    (source / "map.dcm").write_bytes(dicom_bytes(pixels, float_kind="FloatPixelData"))
    tiff = io.BytesIO()
    Image.fromarray(pixels.astype(np.float32), mode="F").save(tiff, format="TIFF")
    (source / "map.tif").write_bytes(tiff.getvalue())
    job = run_import(project, source)
    assert (job.imported, job.duplicates, job.failed) == (0, 0, 2)
    assert all("non-finite pixel values" in e["reason"] for e in job.errors)
    assert media_files(settings.MEDIA_ROOT) == set()


def test_a_row_the_database_refuses_is_a_failure_with_a_reason_not_a_duplicate(
        project, tmp_path, settings, monkeypatch):
    """A decoded scan whose row the database refuses (here a NaN window, as the decoder
    gave before it refused non-finite values: SQLite's JSON check raises IntegrityError,
    PostgreSQL's json type DataError) is a failed file with a reason in words; its stored
    copy and preview are removed."""
    real_decode = services.decode_scan

    def nan_window(*args, **kwargs):
        decoded = real_decode(*args, **kwargs)
        decoded.meta["window"] = [float("nan"), float("nan")]
        decoded.meta["value_range"] = [float("inf"), float("inf")]
        return decoded

    monkeypatch.setattr(services, "decode_scan", nan_window)
    source = tmp_path / "refused"
    source.mkdir()
    (source / "slice.dcm").write_bytes(dicom_bytes())
    job = run_import(project, source)
    assert (job.imported, job.duplicates, job.failed) == (0, 0, 1), job.errors
    reason = job.errors[0]["reason"]
    assert "could not be stored" in reason and "not a duplicate" in reason
    assert "Traceback" not in reason and "CHECK" not in reason and "json" not in reason.lower()
    assert job.headline != "Nothing new: every file was already in the project"
    assert not Scan.objects.exists()
    assert media_files(settings.MEDIA_ROOT) == set()


def test_a_duplicate_stored_meanwhile_is_still_a_duplicate(project, tmp_path, settings,
                                                           monkeypatch):
    """The same content stored by another import between the check and the insert: the
    insert's IntegrityError is a duplicate (a scan with that sha256 is in the project)."""
    real_decode = services.decode_scan
    source = tmp_path / "race"
    source.mkdir()
    (source / "slice.dcm").write_bytes(dicom_bytes())
    raced = []

    def racing_decode(*args, **kwargs):
        if not raced:                      # the other import lands first
            raced.append(None)
            raced[0] = run_import(project, source)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(services, "decode_scan", racing_decode)
    job = run_import(project, source)
    assert raced[0].imported == 1
    assert (job.imported, job.duplicates, job.failed) == (0, 1, 0)
    assert Scan.objects.count() == 1
    assert media_files(settings.MEDIA_ROOT) == referenced_files()


# --- 2. identifiers in raster file names ---------------------------------------------------


@pytest.mark.parametrize("name", [
    PHI_NAME, "987654.png", "Doe_John_19650312/scan.png", "scan_1965-03-12.png",
    "12.03.1965 chest.png", "xray_12Mar1965.png", "PatientName_chest.png", "Doe^John.png",
    "1.2.840.113619.2.55.3.png", "export_010365.png", "patientID_3.png",
])
def test_names_that_look_like_identifiers_are_hidden(name):
    assert file_name_identifiers(name) is not None


@pytest.mark.parametrize("name", [
    "train_0001.png", "val_0040.png", "p (565).jpg", "image(12).jpg", "Tr-gl_0010.jpg",
    "normal/val_0001.png", "glioma_tumor/gg (12).jpg", "lungn2389.jpeg", "s0012345.png",
    "00000181_023.png", "img_000123.png", "pneumoniamnist.npz#train/123456", "slice_1_2_3.png",
])
def test_names_without_identifiers_are_kept(name):
    assert file_name_identifiers(name) is None


def test_the_fixtures_keep_their_names_except_six_digit_ones():
    """The demo's chest and brain fixtures keep their names; the blood smears' PBC names
    (``BA_100102.jpg``) hold a 6-digit number, which the rule cannot tell from an MRN."""
    for folder in ("chest_xray", "brain_mri"):
        names = [p.relative_to(FIXTURES / folder).as_posix()
                 for p in (FIXTURES / folder).rglob("*") if p.suffix in (".png", ".jpg")]
        assert names and [n for n in names if file_name_identifiers(n)] == []
    smears = [p.name for p in (FIXTURES / "blood_smear").rglob("*.jpg")]
    six_digits = [n for n in smears if re.search(r"_[1-9]\d{5}\.jpg$", n)]
    assert six_digits and all(file_name_identifiers(n) for n in six_digits)


def test_an_import_stores_no_identifying_name_and_says_how_many(project, users, tmp_path,
                                                                settings):
    source = tmp_path / "export_MRN123456"          # its name would have named the dataset
    (source / "Smith_Jane_19700101").mkdir(parents=True)
    (source / PHI_NAME).write_bytes(png_bytes(seed=1))
    (source / "12.03.1965_chest.png").write_bytes(png_bytes(seed=2))
    (source / "Smith_Jane_19700101" / "scan.png").write_bytes(png_bytes(seed=3))
    (source / "xray_0001.png").write_bytes(png_bytes(seed=4))
    (source / "MRN555444_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    job = run_import(project, source, layout="flat", created_by=users["dora"])
    assert (job.imported, job.failed) == (4, 1), job.errors
    names = sorted(Scan.objects.values_list("source_name", flat=True))
    assert names == ["", "", "", "xray_0001.png"]
    assert any("3 image file name(s) not kept" in w for w in job.warnings), job.warnings
    assert "MRN555444" not in job.errors[0]["name"]           # a failed file's name too
    assert Scan.objects.first().dataset.name == "import"
    assert "MRN123456" not in job.source and "(name not kept)" in job.source
    text = database_text()
    for marker in ("MRN987654", "19650312", "12.03.1965", "Smith_Jane", "MRN555444",
                   "MRN123456"):
        assert marker not in text, marker
    assert media_files(settings.MEDIA_ROOT) == referenced_files()


def test_a_class_folder_that_looks_like_an_identifier_is_not_a_label(project, tmp_path):
    source = tmp_path / "classes"
    (source / "Doe_John_19650312").mkdir(parents=True)
    (source / "normal").mkdir()
    (source / "Doe_John_19650312" / "a.png").write_bytes(png_bytes(seed=5))
    (source / "normal" / "b.png").write_bytes(png_bytes(seed=6))
    job = run_import(project, source, layout="class-folders")
    assert job.imported == 2 and job.labels_added == 1
    assert list(LabelClass.objects.values_list("name", flat=True)) == ["normal"]
    assert any("1 label(s) not used" in w for w in job.warnings), job.warnings
    assert "19650312" not in database_text()


def test_an_upload_keeps_no_identifying_name_anywhere(client, users, project, settings,
                                                      django_capture_on_commit_callbacks):
    from django.urls import reverse

    assert client.login(username=users["alice"].username, password=PASSWORD)
    files = [(PHI_NAME, png_bytes(seed=11)), ("xray.png", png_bytes(seed=12)),
             ("Roe_Jane_MRN112233.png", b"")]              # empty: refused at once
    handles = []
    for name, content in files:
        handle = io.BytesIO(content)
        handle.name = name
        handles.append(handle)
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(reverse("annotator:upload", args=[project.pk]),
                               {"dataset": "ward 3", "split": "pool", "label": "",
                                "files": handles})
    page = response.content.decode() if response.status_code == 200 else ""
    job = ImportJob.objects.get(project=project)
    job.refresh_from_db()
    assert (job.imported, job.failed) == (2, 0), job.errors
    assert sorted(Scan.objects.values_list("source_name", flat=True)) == ["", "xray.png"]
    assert any("1 image file name(s) not kept" in w for w in job.warnings)
    report = client.get(job.get_absolute_url()).content.decode()
    assert "name not shown: it looks like it carries patient identifiers" in report  # refused
    for text in (page, report, database_text()):
        assert "MRN987654" not in text and "MRN112233" not in text and "Doe_John" not in text
    assert list(settings.INCOMING_ROOT.iterdir()) == []


# --- 3. DICOM coded values: only the standard's terms ---------------------------------------


def test_coded_values_keep_only_defined_terms(project, tmp_path, settings):
    source = tmp_path / "coded"
    source.mkdir()
    (source / "planted.dcm").write_bytes(dicom_bytes(elements={
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL", "ZQXPHIIMGTYPE"],
        "BodyPartExamined": "ZQXPHIBODY",
        "Manufacturer": "Doe^John",
        "ManufacturerModelName": "scanner of MRN987654",
        "RescaleType": "ZQXPHIRT",
        "VOILUTFunction": "ZQXPHIVOI",
        "PresentationLUTShape": "ZQXPHIPLS",
        "LossyImageCompressionMethod": "ZQXPHILICM",
        "SOPClassUID": "1.2.840.987654.1",
        "WindowCenter": (0x00281050, "DS", "NaN"),
        "WindowWidth": "400"}))
    (source / "modality.dcm").write_bytes(dicom_bytes(
        np.ones((8, 8), np.uint16), elements={
            "Modality": "ZQXPHIMOD", "ImageType": ["ZQXPHI1", "PRIMARY"],
            "BodyPartExamined": "whole body", "Manufacturer": "SIEMENS"}))
    job = run_import(project, source)
    assert job.imported == 2, job.errors
    planted = Scan.objects.get(modality="CT")
    stored = pydicom.dcmread(settings.MEDIA_ROOT / planted.file.name)
    assert list(stored.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    for keyword in ("BodyPartExamined", "Manufacturer", "ManufacturerModelName", "RescaleType",
                    "VOILUTFunction", "PresentationLUTShape", "LossyImageCompressionMethod",
                    "WindowCenter"):
        assert keyword not in stored, keyword
    assert stored.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"          # secondary capture
    assert (planted.body_part, planted.manufacturer, planted.manufacturer_model) == ("", "", "")
    other = Scan.objects.exclude(pk=planted.pk).get()
    stored = pydicom.dcmread(settings.MEDIA_ROOT / other.file.name)
    assert "ImageType" not in stored
    assert (other.modality, other.body_part, other.manufacturer) == ("", "WHOLEBODY", "SIEMENS")
    assert stored.BodyPartExamined == "WHOLEBODY"
    files = b"".join(p.read_bytes() for p in settings.MEDIA_ROOT.rglob("*") if p.is_file())
    text = database_text()
    for marker in ("ZQXPHI", "Doe^John", "MRN987654", "987654"):
        assert marker.encode() not in files and marker not in text, marker


# --- 4. float pixel data, multi-page TIFF -------------------------------------------------


@pytest.mark.parametrize("kind", ["FloatPixelData", "DoubleFloatPixelData"])
def test_float_pixel_data_is_imported_and_windowed(project, tmp_path, settings, kind):
    pixels = (np.arange(20, dtype=np.float64).reshape(4, 5) - 3.5) * 0.00025   # an ADC map
    source = tmp_path / "float"
    source.mkdir()
    (source / "adc.dcm").write_bytes(dicom_bytes(pixels, float_kind=kind))
    job = run_import(project, source)
    assert (job.imported, job.failed) == (1, 0), job.errors
    scan = Scan.objects.get()
    assert scan.bits_stored == (64 if kind.startswith("Double") else 32)
    low, high = scan.display["value_range"]
    assert low == pytest.approx(pixels.min(), abs=1e-3) and high == pytest.approx(
        pixels.max(), abs=1e-3)
    stored = (settings.MEDIA_ROOT / scan.file.name).read_bytes()
    ds = pydicom.dcmread(io.BytesIO(stored))
    assert kind in ds and "PixelData" not in ds and "BitsStored" not in ds
    assert ds.SOPClassUID.name == "Parametric Map Storage"
    np.testing.assert_allclose(ds.pixel_array, pixels, rtol=1e-6)
    # the viewer's own window, narrower than one unit, still spreads the map's values
    shown = decode_scan(stored, salt="s", window=(0.0, 0.005)).pixels
    assert shown.min() < 0.35 and shown.max() > 0.65


def test_a_multi_page_tiff_stack_is_refused_and_a_pyramid_is_its_first_page(project, tmp_path,
                                                                          settings):
    source = tmp_path / "tiffs"
    source.mkdir()
    rng = np.random.default_rng(0)
    pages = [Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)) for _ in range(300)]
    buffer = io.BytesIO()
    pages[0].save(buffer, format="TIFF", save_all=True, append_images=pages[1:])
    (source / "stack.tif").write_bytes(buffer.getvalue())
    base = Image.fromarray(rng.integers(0, 255, (64, 96), dtype=np.uint8))
    buffer = io.BytesIO()
    base.save(buffer, format="TIFF", save_all=True,
              append_images=[base.resize((48, 32)), base.resize((24, 16))])
    (source / "slide.tif").write_bytes(buffer.getvalue())
    job = run_import(project, source)
    assert (job.imported, job.failed) == (1, 1), job.errors
    assert job.errors[0]["name"].endswith("stack.tif")
    assert "multi-page TIFF: 300 pages" in job.errors[0]["reason"]
    assert "save each page as its own" in job.errors[0]["reason"].lower()
    scan = Scan.objects.get()
    assert (scan.width, scan.height, scan.num_frames) == (96, 64, 1)
    assert any("only the first, full-resolution page (96x64) is used" in w
               and "2 smaller page(s)" in w for w in job.warnings), job.warnings
    assert media_files(settings.MEDIA_ROOT) == referenced_files()
