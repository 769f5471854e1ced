"""No planted marker survives de-identification, in any container a scan file can carry.

Each test generates hostile files (hypothesis draws the image, its encoding and where the
plants go) with a unique marker, ``PHIMARKER<random>`` plus a label naming the place, in
every place metadata can hide: DICOM private creators and tags, free text and nested
sequences inside the LUT sequences, whitelisted keywords holding sequences, JPEG frames
inside encapsulated DICOM; JPEG APPn/COM anywhere, thumbnails, ICC profiles, bytes after
EOI; PNG text, ICC and EXIF chunks; TIFF tags. Each file goes through ``decode_scan``, and
the marker (plain, UTF-16, inflated from zlib streams) must not be in the stored bytes,
the metadata or the preview, while the stored copy still decodes to the same pixels.
"""

from __future__ import annotations

import io
import json
import re
import string
import struct
import zlib

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from PIL import Image, PngImagePlugin, TiffImagePlugin
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from ml_backend.data.decode import decode_scan, render_preview
from ml_backend.data.deid import DeidentificationError, strip_jpeg_metadata

SALT = "x" * 16
HOSTILE = hsettings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
markers = st.text(string.ascii_letters + string.digits, min_size=8, max_size=12).map(
    lambda suffix: "PHIMARKER" + suffix)


# --- finding a marker ------------------------------------------------------


def forms(text: str) -> list[bytes]:
    return [text.encode(), text.encode("utf-16-le"), text.encode("utf-16-be"),
            zlib.compress(text.encode())]


def expanded(data: bytes) -> list[bytes]:
    """``data`` and, for a PNG, each chunk's payload with its zlib stream inflated."""
    if not data.startswith(b"\x89PNG"):
        return [data]
    views, idat, pos = [data], b"", 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        payload = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IDAT":
            idat += payload
        elif kind in (b"iCCP", b"zTXt"):
            views.append(zlib.decompress(payload.split(b"\0", 1)[1][1:]))
        elif kind == b"iTXt" and payload.split(b"\0", 1)[1][0] == 1:
            views.append(zlib.decompress(payload.split(b"\0", 1)[1][2:].split(b"\0", 2)[2]))
    return views + [zlib.decompress(idat)]


def found(text: str, data: bytes) -> bool:
    return any(form in view for view in expanded(data) for form in forms(text))


def assert_planted(data: bytes, base: str, labels: list[str]) -> None:
    """Each plant really is in the hostile input (else the test proves nothing)."""
    missing = [label for label in labels if not found(base + label, data)]
    assert missing == [], f"the builder failed to plant {missing}"


def assert_no_marker(base: str, decoded) -> None:
    """``base`` is nowhere in what is kept: stored file, metadata, warnings, preview."""
    kept = {"stored_bytes": decoded.stored_bytes,
            "meta": json.dumps(decoded.meta).encode(),
            "warnings": json.dumps(decoded.warnings).encode(),
            "preview": render_preview(decoded.pixels)}
    leaks = []
    for where, data in kept.items():
        for view in expanded(data):
            for form in forms(base):
                at = view.find(form)
                if at >= 0:
                    leaks.append(f"{where}: {view[at : at + len(form) + 24]!r}")
    assert leaks == [], "\n".join(leaks)


# --- DICOM -----------------------------------------------------------------


def nested(base: str, label: str, depth: int) -> Dataset:
    """An item holding free text and a private tag, and ``depth - 1`` more levels below."""
    item = Dataset()
    item.TextValue = f"{base}{label}{depth}"
    item.private_block(0x0011, f"{base}{label}Creator{depth}", create=True).add_new(
        0x01, "LO", f"{base}{label}Private{depth}")
    if depth > 1:
        item.ReferencedImageSequence = Sequence([nested(base, label, depth - 1)])
    return item


def hostile_lut_item(base: str, label: str, depth: int, descriptor, data) -> Dataset:
    item = Dataset()
    item.add(DataElement(0x00283002, "US", descriptor))  # LUTDescriptor
    item.add(DataElement(0x00283006, "US", data))        # LUTData
    item.LUTExplanation = f"{base}{label}Explanation"
    item.RescaleType = f"{base}{label}NotInItemList"
    item.private_block(0x0013, f"{base}{label}Creator", create=True).add_new(
        0x01, "UT", f"{base}{label}Private")
    item.ReferencedImageSequence = Sequence([nested(base, label + "Nested", depth)])
    return item


def plant_dicom(ds: Dataset, base: str, depth: int) -> list[str]:
    """Identifying attributes, private creators/tags and whitelisted keywords holding
    sequences, each with its own labelled marker; returns the labels."""
    for keyword in ("PatientName", "PatientID", "InstitutionName", "StudyDescription",
                    "ImageComments", "OperatorsName"):
        setattr(ds, keyword, f"{base}{keyword}")
    block = ds.private_block(0x0009, f"{base}PrivateCreator", create=True)
    block.add_new(0x01, "LO", f"{base}PrivateLO")
    block.add_new(0x02, "OB", f"{base}PrivateOB".encode("utf-16-le"))
    block.add_new(0x03, "SQ", Sequence([nested(base, "PrivateSQ", depth)]))
    # Whitelisted keywords holding a sequence where a value is expected.
    ds.add(DataElement(0x00080070, "SQ", Sequence([nested(base, "ManufacturerSQ", depth)])))
    ds.add(DataElement(0x00180015, "SQ", Sequence([nested(base, "BodyPartSQ", depth)])))
    ds.add(DataElement(0x60000022, "LO", f"{base}OverlayDescription"))
    return ["PatientName", "InstitutionName", "ImageComments", "PrivateCreator", "PrivateLO",
            "PrivateOB", f"PrivateSQ{depth}", "PrivateSQPrivate1", f"ManufacturerSQ{depth}",
            "ManufacturerSQ1", "BodyPartSQCreator1", "OverlayDescription"]


def dicom_bytes(ds: Dataset, transfer_syntax) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@HOSTILE
@given(base=markers, depth=st.integers(3, 5), rows=st.integers(2, 12), cols=st.integers(2, 12),
       seed=st.integers(0, 2**16), type_as_sequence=st.booleans())
def test_lut_sequences_and_private_tags_are_rebuilt_from_whitelists(
        base, depth, rows, cols, seed, type_as_sequence):
    """Plants: LUTExplanation, a non-item keyword, a private creator and tag, and nested
    sequences (depth >= 3, each level with text and private tags) inside both LUT
    sequences' items, a second VOI LUT item with nothing but hostile content, a
    ModalityLUTType holding a sequence, and ``plant_dicom``'s top-level plants."""
    rng = np.random.default_rng(seed)
    ds = Dataset()
    ds.Modality = "CT"
    ds.set_pixel_data(rng.integers(0, 256, (rows, cols), dtype=np.uint16), "MONOCHROME2", 16)
    modality = hostile_lut_item(base, "ModalityLUT", depth, [256, 0, 16],
                                rng.integers(0, 4096, 256).tolist())
    if type_as_sequence:
        modality.add(DataElement(0x00283004, "SQ", Sequence([nested(base, "LUTTypeSQ", 2)])))
    else:
        modality.ModalityLUTType = "HU"
    ds.ModalityLUTSequence = Sequence([modality])
    voi = hostile_lut_item(base, "VOILUT", depth, [256, 0, 8], rng.integers(0, 256, 256).tolist())
    voi.ModalityLUTType = f"{base}VOIItemModalityLUTType"
    only_hostile = nested(base, "SecondVOIItem", depth)
    only_hostile.LUTExplanation = f"{base}SecondVOIItemExplanation"
    ds.VOILUTSequence = Sequence([voi, only_hostile])
    labels = plant_dicom(ds, base, depth)
    labels += [f"{where}{what}" for where in ("ModalityLUT", "VOILUT")
               for what in ("Explanation", "NotInItemList", "Creator", "Private",
                            f"Nested{depth}", "NestedPrivate1", "NestedCreator1")]
    labels += ["VOIItemModalityLUTType", "SecondVOIItemExplanation", "SecondVOIItem1"]
    data = dicom_bytes(ds, ExplicitVRLittleEndian)
    assert_planted(data, base, labels)

    decoded = decode_scan(data, name="x.dcm", salt=SALT)

    assert_no_marker(base, decoded)
    original = pydicom.dcmread(io.BytesIO(data))
    stored = pydicom.dcmread(io.BytesIO(decoded.stored_bytes))
    assert np.array_equal(stored.pixel_array, original.pixel_array)
    assert np.array_equal(apply_modality_lut(stored.pixel_array, stored),
                          apply_modality_lut(original.pixel_array, original))
    assert np.array_equal(apply_voi_lut(stored.pixel_array, stored, prefer_lut=True),
                          apply_voi_lut(original.pixel_array, original, prefer_lut=True))
    assert [set(item.dir()) for item in stored.VOILUTSequence] == [{"LUTDescriptor", "LUTData"}]
    expected = {"LUTDescriptor", "LUTData"} | (set() if type_as_sequence else {"ModalityLUTType"})
    assert [set(item.dir()) for item in stored.ModalityLUTSequence] == [expected]
    assert "Manufacturer" not in stored and "BodyPartExamined" not in stored
    assert not any(element.tag.is_private for element in stored.iterall())
    assert decoded.meta["manufacturer"] == "" and decoded.meta["body_part"] == ""


@HOSTILE
@given(base=markers, frames=st.integers(1, 3), colour=st.booleans(), size=st.integers(8, 24),
       seed=st.integers(0, 2**16), source_says_lossy=st.booleans())
def test_encapsulated_jpeg_frames_are_stored_decoded_without_their_segments(
        base, frames, colour, size, seed, source_says_lossy):
    """Plants: in every JPEG frame of a JPEG Baseline DICOM, COM, APP1 EXIF (with a UTF-16
    XPComment), APP1 XMP, APP2 ICC, APP0 thumbnail, APP13, APP15, an extended APP14, COM
    before EOI and bytes after EOI; plus ``plant_dicom``'s top-level plants."""
    rng = np.random.default_rng(seed)
    mode = "RGB" if colour else "L"
    shape = (size, size, 3) if colour else (size, size)
    jpegs, labels = [], []
    for index in range(frames):
        image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
        frame, frame_labels = hostile_jpeg(image, f"{base}F{index}", {"quality": 90}, seed)
        jpegs.append(frame)
        labels += [f"F{index}{label}" for label in frame_labels]
    ds = Dataset()
    ds.Modality = "OT"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = "YBR_FULL_422" if colour else "MONOCHROME2"
    if colour:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = frames
    if source_says_lossy:
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = 7.5
        ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.PixelData = encapsulate(jpegs)
    ds["PixelData"].VR = "OB"
    labels += plant_dicom(ds, base, 3)
    data = dicom_bytes(ds, JPEGBaseline8Bit)
    assert_planted(data, base, labels)

    decoded = decode_scan(data, name="x.dcm", salt=SALT)

    assert_no_marker(base, decoded)
    original = pydicom.dcmread(io.BytesIO(data))
    stored = pydicom.dcmread(io.BytesIO(decoded.stored_bytes))
    assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(stored.pixel_array, original.pixel_array)
    assert stored.LossyImageCompression == "01"
    assert stored.LossyImageCompressionMethod == "ISO_10918_1"
    assert ("LossyImageCompressionRatio" in stored) == source_says_lossy


# --- JPEG ------------------------------------------------------------------

_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7]")
ALLOWED_JPEG = ({0xD8, 0xD9, 0xDA, 0xDB, 0xC4, 0xDD, 0xDC, 0xCC, 0xE0, 0xEE}
                | (set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}))
MINIMAL_JFIF = b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"


def segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment of a well-formed JPEG up to EOI, a scan with
    its entropy-coded data."""
    out, pos = [(0xD8, 0, 2)], 2
    while True:
        while data[pos + 1] == 0xFF:
            pos += 1
        marker = data[pos + 1]
        if marker == 0xD9:
            return out + [(0xD9, pos, pos + 2)]
        end = pos + 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        if marker == 0xDA:
            end = _SCAN_END.search(data, end).start()
        out.append((marker, pos, end))
        pos = end


def exif_bytes(text: str) -> bytes:
    exif = Image.Exif()
    exif[0x010E] = text + "ImageDescription"
    exif[0x013B] = text + "Artist"
    exif[0x9C9C] = (text + "XPComment").encode("utf-16-le") + b"\0\0"  # UCS-2
    return exif.tobytes()


def xmp(text: str) -> bytes:
    return (f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/'
            f'02/22-rdf-syntax-ns#"><rdf:Description><dc:creator>{text}</dc:creator>'
            f'</rdf:Description></rdf:RDF></x:xmpmeta>').encode()


def icc_profile(text: str, colour_space: bytes = b"GRAY") -> bytes:
    """A small ICC v2 profile whose description ('desc', ASCII and UCS-2) names ``text``."""
    name = (text + "ICCdesc").encode()
    desc = (b"desc\0\0\0\0" + struct.pack(">I", len(name) + 1) + name + b"\0"
            + struct.pack(">II", 0, len(name) + 1) + (text + "ICCdesc").encode("utf-16-be")
            + b"\0\0" + b"\0" * 70)
    desc += b"\0" * (-len(desc) % 4)
    header_size = 128 + 4 + 12
    header = (struct.pack(">I", header_size + len(desc)) + b"lcms" + b"\x02\x10\0\0" + b"mntr"
              + colour_space + b"XYZ " + b"\0" * 12 + b"acsp" + b"\0" * 88)
    return header + struct.pack(">I", 1) + b"desc" + struct.pack(">II", header_size,
                                                                  len(desc)) + desc


def hostile_jpeg(image: Image.Image, base: str, options: dict, position: int
                 ) -> tuple[bytes, list[str]]:
    """``image`` as a JPEG with every kind of metadata segment planted; returns the file and
    the labels planted."""
    buffer = io.BytesIO()
    space = b"GRAY" if image.mode == "L" else b"RGB "
    image.save(buffer, "JPEG", comment=(base + "COM").encode(), exif=exif_bytes(base),
               xmp=xmp(base + "XMP"), icc_profile=icc_profile(base, space), **options)
    data = buffer.getvalue()
    segments = jpeg_segments(data)
    adobe = [data[s + 4 : e] for m, s, e in segments if m == 0xEE]
    transform = adobe[0][11] if adobe else (1 if image.mode == "RGB" else 0)
    thumbnail = (base + "APP0Thumb").encode()
    thumbnail += b" " * (-len(thumbnail) % 3)
    jfif = any(m == 0xE0 for m, _, _ in segments)  # a JFIF marker implies YCbCr: no new one
    header = (segment(0xE0, b"JFIF\0\x01\x02\0\0\x01\0\x01" + bytes([len(thumbnail) // 3, 1])
                      + thumbnail) * jfif
              + segment(0xE0, b"JFXX\0\x10" + (base + "JFXX").encode())
              + segment(0xED, b"Photoshop 3.0\0" + (base + "APP13").encode())
              + b"\xff\xff" + segment(0xEF, (base + "APP15").encode())
              + segment(0xEE, b"Adobe" + struct.pack(">HHHB", 100, 0x8000, 0, transform)
                        + (base + "APP14").encode())
              + segment(0xFE, (base + "COMheader").encode()))
    first_scan = next(i for i, (m, _, _) in enumerate(segments) if m == 0xDA)
    at = segments[1 + position % first_scan][1]  # before any segment between SOI and SOS
    out, scans = bytearray(data[:at] + header), 0
    for marker, start, end in segments:
        if end <= at:
            continue
        if marker == 0xDA and scans:
            out += segment(0xFE, f"{base}COMscan{scans}".encode())
            out += segment(0xE1, b"Exif\0\0" + f"{base}APP1scan{scans}".encode())
        if marker == 0xD9:
            out += segment(0xFE, (base + "COMbeforeEOI").encode())
        scans += marker == 0xDA
        out += data[max(start, at) : end]
    out += (base + "AfterEOI").encode() + segment(0xFE, (base + "AfterEOIcom").encode())
    labels = ["COM", "ImageDescription", "Artist", "XPComment", "XMP", "ICCdesc", "JFXX",
              "APP13", "APP15", "APP14", "COMheader", "COMbeforeEOI", "AfterEOI"]
    labels += ["APP0Thumb"] * jfif + [f"COMscan{n}" for n in range(1, scans)]
    return bytes(out), labels


def decoded_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


@HOSTILE
@given(base=markers, mode=st.sampled_from(["L", "RGB", "CMYK"]), keep_rgb=st.booleans(),
       progressive=st.booleans(), restart=st.integers(0, 3), quality=st.integers(40, 95),
       width=st.integers(8, 40), height=st.integers(8, 40), seed=st.integers(0, 2**16),
       position=st.integers(0, 50))
def test_jpeg_keeps_only_what_decoding_needs(base, mode, keep_rgb, progressive, restart,
                                             quality, width, height, seed, position):
    """Plants (anywhere between SOI and the first SOS): COM, APP1 EXIF (ImageDescription,
    Artist, UTF-16 XPComment), APP1 XMP, APP2 ICC description, APP0 JFIF thumbnail, APP0
    JFXX, APP13, APP15, APP14 with extra bytes; COM and APP1 between progressive scans;
    COM before EOI; bytes and a COM after EOI."""
    rng = np.random.default_rng(seed)
    bands = {"L": (height, width), "RGB": (height, width, 3), "CMYK": (height, width, 4)}
    image = Image.fromarray(rng.integers(0, 256, bands[mode], dtype=np.uint8), mode)
    options = {"quality": quality, "progressive": progressive,
               "restart_marker_blocks": restart, "keep_rgb": keep_rgb and mode == "RGB"}
    clean = io.BytesIO()
    image.save(clean, "JPEG", **options)
    data, labels = hostile_jpeg(image, base, options, position)
    assert_planted(data, base, labels)

    decoded = decode_scan(data, name="x.jpg", salt=SALT)

    assert_no_marker(base, decoded)
    stored = decoded.stored_bytes
    assert np.array_equal(decoded_pixels(stored), decoded_pixels(data))
    assert np.array_equal(decoded_pixels(stored), decoded_pixels(clean.getvalue()))
    kept = jpeg_segments(stored)
    assert {m for m, _, _ in kept} <= ALLOWED_JPEG
    for marker, start, end in kept:
        if marker == 0xE0:
            assert stored[start:end] == MINIMAL_JFIF
        if marker == 0xEE:
            assert end - start == 16 and stored[start + 4 : start + 9] == b"Adobe"
    scans = [clean.getvalue()[s:e] for m, s, e in jpeg_segments(clean.getvalue()) if m == 0xDA]
    assert [stored[s:e] for m, s, e in kept if m == 0xDA] == scans  # not re-compressed


def _clean_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).save(buffer, "JPEG")
    return buffer.getvalue()


def _before_first(data: bytes, marker: int, insert: bytes) -> bytes:
    at = next(s for m, s, _ in jpeg_segments(data) if m == marker)
    return data[:at] + insert + data[at:]


DAMAGED = {
    "no SOI": (lambda d: d[2:], "no start-of-image"),
    "truncated scan": (lambda d: d[:-2], "truncated"),
    "cut in a header": (lambda d: d[:30], "bad length|truncated"),
    "length below 2": (lambda d: d[:2] + b"\xff\xe1\x00\x01" + d[2:], "bad length"),
    "length past end": (lambda d: d[:2] + b"\xff\xfe\x7f\xff" + d[2:40], "bad length"),
    "no scan": (lambda d: d[: jpeg_segments(d)[-2][1]] + b"\xff\xd9", "no start-of-scan"),
    "scan before frame": (lambda d: _before_first(d, 0xC0, d[jpeg_segments(d)[-2][1]:]),
                          "scan before frame header"),
    "unknown marker": (lambda d: _before_first(d, 0xDA, segment(0xF0, b"JPG0")),
                       "unsupported marker"),
    "bytes outside a segment": (lambda d: _before_first(d, 0xC0, b"junk"), "outside"),
}


@pytest.mark.parametrize("damage", DAMAGED)
def test_damaged_jpeg_structure_is_refused_with_a_reason(damage):
    """A JPEG whose structure cannot be parsed (a marker follows it) is refused with a
    reason, never copied as far as the parser got."""
    damaged = DAMAGED[damage][0](_clean_jpeg()) + b"PHIMARKERtail"
    with pytest.raises(DeidentificationError, match=DAMAGED[damage][1]):
        strip_jpeg_metadata(damaged)


# --- PNG / TIFF ------------------------------------------------------------

PNG_MODES = {"L": (), "LA": (2,), "RGB": (3,), "RGBA": (4,), "I;16": (), "P": ()}


def random_image(mode: str, width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode == "P":
        image = Image.fromarray(rng.integers(0, 16, (height, width), dtype=np.uint8), "L")
        image = image.convert("P")
        image.putpalette(rng.integers(0, 256, 48, dtype=np.uint8).tobytes())
        return image
    shape = (height, width) + PNG_MODES[mode]
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def same_pixels(stored: bytes, original: bytes) -> None:
    a, b = Image.open(io.BytesIO(stored)), Image.open(io.BytesIO(original))
    assert a.mode == b.mode and np.array_equal(np.asarray(a), np.asarray(b))
    assert a.getpalette() == b.getpalette()


def png_chunks(data: bytes) -> list[bytes]:
    kinds, pos = [], 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        kinds.append(kind)
        pos += 12 + length
    return kinds


@HOSTILE
@given(base=markers, mode=st.sampled_from(sorted(PNG_MODES)), width=st.integers(1, 24),
       height=st.integers(1, 24), seed=st.integers(0, 2**16), transparent=st.booleans())
def test_png_keeps_pixels_only(base, mode, width, height, seed, transparent):
    """Plants: tEXt (keyword and text), zTXt, iTXt (plain and compressed, translated
    keyword), a tEXt after IDAT, an XMP iTXt, iCCP (profile description), eXIf
    (ImageDescription, Artist, UTF-16 XPComment), sPLT name and a private chunk."""
    image = random_image(mode, width, height, seed)
    info = PngImagePlugin.PngInfo()
    info.add_text(base + "Key", base + "tEXt")
    info.add_text("Comment", base + "zTXt", zip=True)
    info.add_itxt("Title", base + "iTXt", lang="en", tkey=base + "iTXtKey")
    info.add_itxt("Author", base + "iTXtZip", zip=True)
    info.add_itxt("XML:com.adobe.xmp", xmp(base + "XMP").decode())
    info.add(b"sPLT", (base + "sPLT").encode() + b"\0\x08" + b"\0\0\0\xff\0\x01")
    info.add(b"prVt", (base + "PrivateChunk").encode())
    info.add(b"tEXt", b"Comment\0" + (base + "AfterIDAT").encode(), after_idat=True)
    extra = {}
    if transparent and mode in ("L", "P"):
        extra["transparency"] = 3
    if transparent and mode == "RGB":
        extra["transparency"] = (1, 2, 3)
    buffer = io.BytesIO()
    space = b"RGB " if mode in ("RGB", "RGBA", "P") else b"GRAY"
    image.save(buffer, "PNG", pnginfo=info, icc_profile=icc_profile(base, space),
               exif=exif_bytes(base), **extra)
    data = buffer.getvalue()
    assert_planted(data, base, ["Key", "tEXt", "zTXt", "iTXt", "iTXtKey", "iTXtZip", "XMP",
                                "sPLT", "PrivateChunk", "AfterIDAT", "ICCdesc",
                                "ImageDescription", "Artist", "XPComment"])

    decoded = decode_scan(data, name="x.png", salt=SALT)

    assert_no_marker(base, decoded)
    same_pixels(decoded.stored_bytes, data)
    assert set(png_chunks(decoded.stored_bytes)) <= {b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND"}
    assert Image.open(io.BytesIO(decoded.stored_bytes)).info.get("transparency") == \
        Image.open(io.BytesIO(data)).info.get("transparency")


@HOSTILE
@given(base=markers, mode=st.sampled_from(["L", "RGB", "I;16"]), width=st.integers(1, 24),
       height=st.integers(1, 24), seed=st.integers(0, 2**16),
       compression=st.sampled_from([None, "tiff_deflate", "tiff_lzw", "packbits"]))
def test_tiff_becomes_a_png_without_its_tags(base, mode, width, height, seed, compression):
    """Plants: ImageDescription, Artist, Copyright, DocumentName, Software, HostComputer,
    XMP (tag 700), ICC profile description (tag 34675), UTF-16 XPComment and a private
    ASCII tag."""
    image = random_image(mode, width, height, seed)
    tags = TiffImagePlugin.ImageFileDirectory_v2()
    for tag, name in ((270, "ImageDescription"), (315, "Artist"), (33432, "Copyright"),
                      (269, "DocumentName"), (305, "Software"), (316, "HostComputer"),
                      (65000, "PrivateTag")):
        tags[tag] = base + name
        tags.tagtype[tag] = 2  # ASCII
    tags[700] = xmp(base + "XMP")
    tags.tagtype[700] = 1  # BYTE
    tags[40092] = (base + "XPComment").encode("utf-16-le") + b"\0\0"
    tags.tagtype[40092] = 1
    buffer = io.BytesIO()
    space = b"RGB " if mode == "RGB" else b"GRAY"
    image.save(buffer, "TIFF", tiffinfo=tags, icc_profile=icc_profile(base, space),
               compression=compression)
    data = buffer.getvalue()
    assert_planted(data, base, ["ImageDescription", "Artist", "Copyright", "DocumentName",
                                "Software", "HostComputer", "PrivateTag", "XMP", "ICCdesc",
                                "XPComment"])

    decoded = decode_scan(data, name="x.tif", salt=SALT)

    assert_no_marker(base, decoded)
    assert decoded.stored_ext == ".png"
    same_pixels(decoded.stored_bytes, data)
    assert set(png_chunks(decoded.stored_bytes)) <= {b"IHDR", b"IDAT", b"IEND"}
