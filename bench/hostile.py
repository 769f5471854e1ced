"""Hostile inputs shared by ``bench/fuzz.py`` and the tests, as plain Python (seeded
``random.Random``), so the long runs and hypothesis draw from the same classes.

- JSON request bodies: ``FIXED_NUMBERS``, ``ODD_VALUES`` and the body templates below are
  what ``tests/test_hostile_requests.py`` builds its hypothesis strategies from
  (``hostile_numbers``, ``odd_values``, ``hostile_bodies``); ``hostile_body(rng)`` draws from
  the same classes without hypothesis, and ``structured_body`` puts one odd value at a time
  into an otherwise valid request (real ids), so the value reaches the endpoint's own checks.
- Credentials: ``hostile_text(rng)`` (non-ASCII, control, right-to-left, surrogates).
- PHI-marker files (``phi_corpus``): every container ``tests/ml_backend/test_deid_markers.py``
  plants (its builders are reused), plus markers in DICOM file names; ``marker_hits`` finds
  a marker plain, as UTF-16, with NULs stripped and inside any zlib / gzip stream.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import string
import zlib
from dataclasses import dataclass, field

# --- JSON bodies ------------------------------------------------------------------------------

FIXED_NUMBERS = ["1e400", "-1e400", "NaN", "Infinity", "-Infinity", "1e16", "9" * 5000,
                 "-" + "9" * 41, "1" + "0" * 60 + ".5"]
LONG_DIGITS = (41, 6000)          # "7" * n for n in this range
BIG_EXPONENTS = (309, 5000)       # f"1e{e}" for e in this range

# values the parser accepts but no field should: they reach the endpoints' own checks
ODD_VALUES = ['"x"', '[1]', '{"a": 1}', "9" * 30, "-5", "0", "true", "1e300", "1e16",
              "12345678901234567890", '"' + "9" * 40 + '"', "null", '"\\u0000"',
              '"' + "x" * 5000 + '"']

# more of them, beyond the suite's list: escapes the database driver cannot store (lone
# surrogates, NUL inside text), ids as strings with spaces or decimals, -0, underflow,
# bidi and non-BMP text, booleans where ids go
EXTRA_VALUES = ['"\\ud800"', '"\\udfff\\ud800"', '"a\\u0000b"', '"\\u0000"', '" 41"',
                '"41.0"', '"0x29"', '"-1"', '"+1"', "-0", "-0.0", "1e-400", "4.9e-324", "0.5",
                "2147483648", "9223372036854775807", "9223372036854775808",
                "-9223372036854775809", '"NaN"', '"Infinity"', '"1e400"', "false", "{}", "[]",
                '[[[[[[1]]]]]]', '{"id": 1}', '"\\u202egpj.exe"', '"\\ud83d\\ude00"',
                '"<script>alert(1)</script>"', '"' + "\\u00e9" * 300 + '"', '"x\\ny"',
                '"%00"', '"../../etc/passwd"', '"label"', '"skip"', '"LABEL"', '""']

NOT_OBJECTS = ["[]", '"text"', "42", "null", "{", '{"a": }', "\x00", "", "   "]


def answer_fields(v: str) -> str:
    return (f'{{"outcome": "label", "class_id": {v}, "duration_ms": {v}, '
            f'"shown_confidence": {v}, "query_round": {v}}}')


def predict_tasks(v: str) -> str:
    return f'{{"tasks": [{{"id": {v}, "data": {{"scan_id": {v}}}}}]}}'


def tasks_value(v: str) -> str:
    return f'{{"tasks": {v}}}'


def annotation_event(v: str) -> str:
    return ('{"action": "ANNOTATION_CREATED", "project": {"id": 7}, '
            f'"annotation": {{"id": {v}, "lead_time": {v}, "result": {v}, '
            f'"completed_by": {v}, "prediction": {v}}}, '
            f'"task": {{"id": {v}, "data": {{"scan_id": {v}}}}}}}')


def bulk_event(v: str) -> str:
    return (f'{{"action": "ANNOTATIONS_CREATED", "project": {{"id": 7}}, '
            f'"annotation": {v}, "task": {v}, "annotations": {v}}}')


def answer_number(n: str) -> str:
    return f'{{"outcome": "label", "class_id": {n}, "duration_ms": {n}}}'


def event_number(n: str) -> str:
    return ('{"action": "ANNOTATION_CREATED", "annotation": '
            f'{{"id": 1, "lead_time": {n}}}, "task": {{"id": {n}}}}}')


ODD_VALUE_TEMPLATES = (answer_fields, predict_tasks, tasks_value, annotation_event, bulk_event)
NUMBER_TEMPLATES = (answer_number, predict_tasks, event_number)
NESTED_ARRAYS = (33, 100_000)     # depth range
NESTED_OBJECTS = (33, 20_000)


def nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


def nested_objects(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def is_utf8_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw.decode("utf-8")), dict)
    except (UnicodeDecodeError, ValueError):
        return False


def long_digits(n: int) -> str:
    return "7" * n


def big_exponent(e: int) -> str:
    return f"1e{e}"


def hostile_number(rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        return rng.choice(FIXED_NUMBERS)
    if kind == 1:
        return long_digits(rng.randint(*LONG_DIGITS))
    return big_exponent(rng.randint(*BIG_EXPONENTS))


def hostile_body(rng: random.Random) -> tuple[str, str | bytes]:
    """``(class, body)``: one draw from the classes of the suite's ``hostile_bodies``."""
    kind = rng.randrange(12)
    if kind < 5:
        template = ODD_VALUE_TEMPLATES[kind]
        return f"odd:{template.__name__}", template(rng.choice(ODD_VALUES))
    if kind < 8:
        template = NUMBER_TEMPLATES[kind - 5]
        return f"number:{template.__name__}", template(hostile_number(rng))
    if kind == 8:
        return "nested_arrays", nested(rng.randint(*NESTED_ARRAYS))
    if kind == 9:
        return "nested_objects", nested_objects(rng.randint(*NESTED_OBJECTS))
    if kind == 10:
        return "not_an_object", rng.choice(NOT_OBJECTS)
    while True:
        raw = rng.randbytes(rng.randint(1, 64))
        if not is_utf8_object(raw):
            return "binary", raw


# the text fields of each endpoint: where NUL and lone surrogates are each tried once
TEXT_FIELDS = {
    "answer": ["outcome", "shown_model_version", "submission_id", "note", "class_id",
               "shown_suggestion", "query_round", "duration_ms"],
    "ls_webhook": ["annotation.id", "annotation.choice", "annotation.email",
                   "annotation.model_version", "annotation.lead_time", "task.id",
                   "task.scan_id", "action", "project.id"],
    "predict": ["id", "scan_id"],
    "ml_webhook": ["action", "project"],
}
UNSTORABLE = ['"a\\u0000b"', '"\\ud800"']


def structured_body(rng: random.Random, endpoint: str, ids: dict, *, key: str | None = None,
                    value: str | None = None) -> tuple[str, str]:
    """``(class, body)``: a valid request for ``endpoint`` (``answer``, ``ls_webhook``,
    ``predict``, ``ml_webhook``, ``setup``) with one field (``key``, else drawn) replaced by
    an odd value (``value``, else drawn). ``ids``: ``class_id``, ``class_name``,
    ``scan_id``, ``other_scan_id`` (another project's), ``model_version``, ``ls_project``,
    ``annotation_id`` (fresh per call)."""
    value = value or rng.choice(ODD_VALUES + EXTRA_VALUES + [hostile_number(rng)])
    if endpoint == "answer":
        body = {"outcome": '"label"', "class_id": str(ids["class_id"]),
                "duration_ms": "1200", "shown_confidence": "0.7",
                "submission_id": json.dumps(f"fuzz-{ids['annotation_id']}")}
        key = key or rng.choice(["outcome", "class_id", "duration_ms", "shown_confidence",
                                 "shown_acquisition_score", "shown_model_version",
                                 "shown_suggestion", "query_round", "submission_id", "note",
                                 "scan_id"])
        body[key] = value
        return f"structured:answer.{key}", "{" + ", ".join(
            f'"{k}": {v}' for k, v in body.items()) + "}"
    if endpoint in ("predict", "setup"):
        task = {"id": "1", "data": {"scan_id": str(ids[rng.choice(["scan_id", "other_scan_id"])])}}
        key = key or rng.choice(["id", "scan_id", "data", "task", "extra"])
        if key == "id":
            task["id"] = value
        elif key == "scan_id":
            task["data"]["scan_id"] = value
        data = "{" + ", ".join(f'"{k}": {v}' for k, v in task["data"].items()) + "}"
        one = f'{{"id": {task["id"]}, "data": {value if key == "data" else data}}}'
        many = [one] * rng.choice([1, 2, 50])
        if key == "task":
            many[0] = value
        extra = f', "label_config": {value}, "project": {value}' if key == "extra" else ""
        return (f"structured:{endpoint}.{key}",
                f'{{"tasks": [{", ".join(many)}], "model_version": "x"{extra}}}')
    if endpoint == "ml_webhook":
        key = key or rng.choice(["action", "project", "annotation"])
        fields = {"action": '"ANNOTATION_CREATED"', "project": '{"id": 7}',
                  "annotation": '{"id": 1}'}
        fields[key] = value
        return f"structured:ml_webhook.{key}", "{" + ", ".join(
            f'"{k}": {v}' for k, v in fields.items()) + "}"
    # the Label Studio webhook: an ANNOTATION_CREATED event a real export would carry
    result = (f'[{{"from_name": "diagnosis", "to_name": "image", "type": "choices", '
              f'"value": {{"choices": [{json.dumps(ids["class_name"])}]}}}}]')
    annotation = {"id": str(ids["annotation_id"]), "lead_time": "2.5", "result": result,
                  "completed_by": '{"email": "alice@example.org"}', "was_cancelled": "false",
                  "prediction": '{"model_version": "none", "score": 0.5, "result": []}'}
    task = {"id": str(900 + ids["annotation_id"]), "scan_id": str(ids["scan_id"])}
    top = {"action": '"ANNOTATION_CREATED"', "project": f'{{"id": {ids["ls_project"]}}}'}
    key = key or rng.choice(["annotation.id", "annotation.lead_time", "annotation.result",
                             "annotation.completed_by", "annotation.was_cancelled",
                             "annotation.prediction", "annotation.choice", "annotation.email",
                             "annotation.score", "annotation.model_version", "task.id",
                             "task.scan_id", "action", "project", "project.id"])
    where, _, name = key.partition(".")
    if key == "annotation.choice":
        annotation["result"] = (f'[{{"from_name": "diagnosis", "to_name": "image", "type": '
                                f'"choices", "value": {{"choices": [{value}]}}}}]')
    elif key == "annotation.email":
        annotation["completed_by"] = f'{{"email": {value}}}'
    elif key == "annotation.score":
        annotation["prediction"] = f'{{"model_version": "none", "score": {value}, "result": []}}'
    elif key == "annotation.model_version":
        annotation["prediction"] = f'{{"model_version": {value}, "score": 0.5, "result": []}}'
    elif where == "annotation":
        annotation[name] = value
    elif where == "task":
        task[name] = value
    elif key == "project.id":
        top["project"] = f'{{"id": {value}}}'
    else:
        top[where] = value
    event = ", ".join(f'"{k}": {v}' for k, v in top.items())
    event += ', "annotation": {' + ", ".join(f'"{k}": {v}' for k, v in annotation.items()) + "}"
    event += f', "task": {{"id": {task["id"]}, "data": {{"scan_id": {task["scan_id"]}}}}}'
    return f"structured:ls_webhook.{key}", "{" + event + "}"


def oversized_body(rng: random.Random, max_bytes: int) -> tuple[str, str]:
    """A body just over the size limit, or just under it with one long array or string."""
    size = max_bytes + rng.choice([1, 1000, -1000, -10_000])
    if rng.random() < 0.5:
        body = '{"tasks": [' + ",".join(['{"id": 1, "data": {"scan_id": 1}}'] * (size // 34)) + "]}"
    else:
        body = '{"a": "' + "x" * max(0, size - 9) + '"}'
    return ("oversized" if len(body.encode()) > max_bytes else "near_limit"), body


def hostile_text(rng: random.Random, max_length: int = 24, *, surrogates: bool = True) -> str:
    """Credential-like text: ASCII, Latin-1, Greek, CJK, emoji, right-to-left, control
    characters, NUL, ':' and (``surrogates``) lone surrogates, which only a body or a
    base64-encoded credential can carry: a WSGI or ASGI server hands Django every header
    as Latin-1 text, so a header value never holds one."""
    alphabet = (string.ascii_letters + string.digits + ":@%+/= \t"
                + "éüßøÅ" + "Ωπλ" + "中文字" + "\u202e\u200f\u2028" + "\x00\x01\x7f"
                + "😀🔐" + ("\udcff\ud800" if surrogates else ""))
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, max_length)))


# --- PHI markers ------------------------------------------------------------------------------


def new_marker(rng: random.Random) -> str:
    return "PHIMARKER" + "".join(rng.choice(string.ascii_letters + string.digits)
                                 for _ in range(10))


@dataclass
class PhiFile:
    """One file of the corpus: ``name`` (may itself carry ``marker``), ``data``, the
    ``labels`` planted after ``marker`` in the content (``+ name_labels`` in the name),
    and ``expect``: ``imported`` / ``refused`` / ``duplicate``."""

    name: str
    data: bytes
    kind: str
    marker: str
    labels: list[str]
    name_labels: list[str] = field(default_factory=list)
    expect: str = "imported"


def _deid_builders():
    """The builders of ``tests/ml_backend/test_deid_markers.py`` (one place plants)."""
    from tests.ml_backend import test_deid_markers as builders

    return builders


def phi_dicom_lut(marker: str, rng: random.Random, *, depth: int = 3, size: int = 8) -> tuple[
        bytes, list[str]]:
    """A native 16-bit DICOM with Modality and VOI LUT sequences whose items hold nested
    sequences, private creators and tags, plus the identifying attributes and private
    tags of ``plant_dicom`` (test_deid_markers' LUT test, one draw)."""
    import numpy as np
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian

    b = _deid_builders()
    np_rng = np.random.default_rng(rng.randrange(2**16))
    ds = Dataset()
    ds.Modality = "CT"
    ds.set_pixel_data(np_rng.integers(0, 256, (size, size), dtype=np.uint16), "MONOCHROME2", 16)
    modality = b.hostile_lut_item(marker, "ModalityLUT", depth, [256, 0, 16],
                                  np_rng.integers(0, 4096, 256).tolist())
    modality.ModalityLUTType = "HU"
    ds.ModalityLUTSequence = Sequence([modality])
    voi = b.hostile_lut_item(marker, "VOILUT", depth, [256, 0, 8],
                             np_rng.integers(0, 256, 256).tolist())
    voi.ModalityLUTType = f"{marker}VOIItemModalityLUTType"
    ds.VOILUTSequence = Sequence([voi])
    labels = b.plant_dicom(ds, marker, depth)
    labels += [f"{where}{what}" for where in ("ModalityLUT", "VOILUT")
               for what in ("Explanation", "NotInItemList", "Creator", "Private",
                            f"Nested{depth}", "NestedPrivate1", "NestedCreator1")]
    labels += ["VOIItemModalityLUTType"]
    return b.dicom_bytes(ds, ExplicitVRLittleEndian), labels


def phi_dicom_jpeg_frames(marker: str, rng: random.Random, *, frames: int = 2, size: int = 16,
                          colour: bool = False) -> tuple[bytes, list[str]]:
    """A JPEG Baseline DICOM whose every frame carries COM, APP1 EXIF/XMP, APP2 ICC, a
    JFIF thumbnail, APP13-15 and bytes after EOI, plus ``plant_dicom``'s plants."""
    import numpy as np
    from PIL import Image
    from pydicom.dataset import Dataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    b = _deid_builders()
    np_rng = np.random.default_rng(rng.randrange(2**16))
    shape, mode = ((size, size, 3), "RGB") if colour else ((size, size), "L")
    jpegs, labels = [], []
    for index in range(frames):
        image = Image.fromarray(np_rng.integers(0, 256, shape, dtype=np.uint8), mode)
        frame, frame_labels = b.hostile_jpeg(image, f"{marker}F{index}", {"quality": 90},
                                             rng.randrange(50))
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
    ds.PixelData = encapsulate(jpegs)
    ds["PixelData"].VR = "OB"
    labels += b.plant_dicom(ds, marker, 3)
    return b.dicom_bytes(ds, JPEGBaseline8Bit), labels


def phi_dicom_plain(marker: str, rng: random.Random, *, size: int = 8, broken: bool = False
                    ) -> tuple[bytes, list[str]]:
    """A small 8-bit DICOM with ``plant_dicom``'s plants; ``broken``: its Pixel Data is
    cut short (a refusal: the file's name and tags must not reach the error either)."""
    import numpy as np
    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian

    b = _deid_builders()
    ds = Dataset()
    ds.Modality = "MR"
    pixels = np.random.default_rng(rng.randrange(2**16)).integers(0, 256, (size, size),
                                                                  dtype=np.uint8)
    ds.set_pixel_data(pixels, "MONOCHROME2", 8)
    labels = b.plant_dicom(ds, marker, 3)
    if broken:
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    return b.dicom_bytes(ds, ExplicitVRLittleEndian), labels


def phi_jpeg(marker: str, rng: random.Random, *, progressive: bool, mode: str = "L",
             size: int = 24) -> tuple[bytes, list[str]]:
    """A JPEG with COM, APP1 EXIF/XMP, APP2 ICC, thumbnail, APP13-15, COM / APP1 between
    progressive scans, COM before EOI and bytes after it."""
    import numpy as np
    from PIL import Image

    b = _deid_builders()
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    image = Image.fromarray(np.random.default_rng(rng.randrange(2**16)).integers(
        0, 256, shape, dtype=np.uint8), mode)
    return b.hostile_jpeg(image, marker, {"quality": 85, "progressive": progressive},
                          rng.randrange(50))


def phi_png(marker: str, rng: random.Random, *, mode: str = "RGB", size: int = 16) -> tuple[
        bytes, list[str]]:
    """A PNG with tEXt (keyword and text), zTXt, iTXt (plain, compressed, translated
    keyword), XMP, sPLT, a private chunk, tEXt after IDAT, iCCP and eXIf."""
    from PIL import PngImagePlugin

    b = _deid_builders()
    image = b.random_image(mode, size, size, rng.randrange(2**16))
    info = PngImagePlugin.PngInfo()
    info.add_text(marker + "Key", marker + "tEXt")
    info.add_text("Comment", marker + "zTXt", zip=True)
    info.add_itxt("Title", marker + "iTXt", lang="en", tkey=marker + "iTXtKey")
    info.add_itxt("Author", marker + "iTXtZip", zip=True)
    info.add_itxt("XML:com.adobe.xmp", b.xmp(marker + "XMP").decode())
    info.add(b"sPLT", (marker + "sPLT").encode() + b"\0\x08" + b"\0\0\0\xff\0\x01")
    info.add(b"prVt", (marker + "PrivateChunk").encode())
    info.add(b"tEXt", b"Comment\0" + (marker + "AfterIDAT").encode(), after_idat=True)
    buffer = io.BytesIO()
    space = b"RGB " if mode in ("RGB", "RGBA", "P") else b"GRAY"
    image.save(buffer, "PNG", pnginfo=info, icc_profile=b.icc_profile(marker, space),
               exif=b.exif_bytes(marker))
    return buffer.getvalue(), ["Key", "tEXt", "zTXt", "iTXt", "iTXtKey", "iTXtZip", "XMP",
                               "sPLT", "PrivateChunk", "AfterIDAT", "ICCdesc",
                               "ImageDescription", "Artist", "XPComment"]


def phi_tiff(marker: str, rng: random.Random, *, mode: str = "L", size: int = 16,
             compression: str | None = None) -> tuple[bytes, list[str]]:
    """A TIFF with ImageDescription, Artist, Copyright, DocumentName, Software,
    HostComputer, a private ASCII tag, XMP (700), ICC (34675) and UTF-16 XPComment."""
    from PIL import TiffImagePlugin

    b = _deid_builders()
    image = b.random_image(mode, size, size, rng.randrange(2**16))
    tags = TiffImagePlugin.ImageFileDirectory_v2()
    for tag, name in ((270, "ImageDescription"), (315, "Artist"), (33432, "Copyright"),
                      (269, "DocumentName"), (305, "Software"), (316, "HostComputer"),
                      (65000, "PrivateTag")):
        tags[tag] = marker + name
        tags.tagtype[tag] = 2
    tags[700] = b.xmp(marker + "XMP")
    tags.tagtype[700] = 1
    tags[40092] = (marker + "XPComment").encode("utf-16-le") + b"\0\0"
    tags.tagtype[40092] = 1
    buffer = io.BytesIO()
    space = b"RGB " if mode == "RGB" else b"GRAY"
    image.save(buffer, "TIFF", tiffinfo=tags, icc_profile=b.icc_profile(marker, space),
               compression=compression)
    return buffer.getvalue(), ["ImageDescription", "Artist", "Copyright", "DocumentName",
                               "Software", "HostComputer", "PrivateTag", "XMP", "ICCdesc",
                               "XPComment"]


def phi_corpus(rng: random.Random, *, repeat: int = 1, small: bool = False) -> list[PhiFile]:
    """Every container with a unique marker, ``repeat`` times with fresh markers and draws.
    DICOM files carry a marker in their names too (a patient's name often is the file's
    name): ``<marker>FileName^Doe.dcm``, in a sub-folder, with no extension, under a raster
    extension (content says DICOM), refused, and a duplicate under another name. Raster
    names are shown by design (``name_may_be_shown``) and carry no marker."""
    files: list[PhiFile] = []
    for round_ in range(repeat):
        m = new_marker(rng)
        data, labels = phi_dicom_lut(m, rng, depth=3 if small else rng.choice([3, 4, 5]))
        files.append(PhiFile(f"{m}FileName^Doe.dcm", data, "dicom_lut_sequences", m, labels,
                             ["FileName"]))
        duplicate = new_marker(rng)
        files.append(PhiFile(f"sub/{duplicate}DuplicateName.DCM", data, "dicom_duplicate",
                             duplicate, [], ["DuplicateName"], expect="duplicate"))
        m = new_marker(rng)
        data, labels = phi_dicom_jpeg_frames(m, rng, frames=1 if small else rng.choice([1, 3]),
                                             colour=rng.random() < 0.5)
        files.append(PhiFile(f"{m}Frames^Roe.dcm", data, "dicom_jpeg_frames", m, labels,
                             ["Frames"]))
        m = new_marker(rng)
        data, labels = phi_dicom_plain(m, rng)
        files.append(PhiFile(f"nested/{m}NoExtension", data, "dicom_no_extension", m, labels,
                             ["NoExtension"]))
        m = new_marker(rng)
        data, labels = phi_dicom_plain(m, rng, size=12)
        files.append(PhiFile(f"{m}ClaimsPng.png", data, "dicom_named_png", m, labels,
                             ["ClaimsPng"]))
        m = new_marker(rng)
        data, labels = phi_dicom_plain(m, rng, size=16, broken=True)
        files.append(PhiFile(f"{m}Refused.dcm", data, "dicom_refused", m, labels, ["Refused"],
                             expect="refused"))
        for progressive in (False, True):
            m = new_marker(rng)
            data, labels = phi_jpeg(m, rng, progressive=progressive,
                                    mode=rng.choice(["L", "RGB"]))
            files.append(PhiFile(f"jpeg-{round_}-{int(progressive)}.jpg", data,
                                 "jpeg_progressive" if progressive else "jpeg_baseline",
                                 m, labels))
        m = new_marker(rng)
        data, labels = phi_png(m, rng, mode=rng.choice(["L", "RGB", "RGBA", "I;16"]))
        files.append(PhiFile(f"png-{round_}.png", data, "png_chunks", m, labels))
        m = new_marker(rng)
        data, labels = phi_tiff(m, rng, mode=rng.choice(["L", "RGB"]),
                                compression=rng.choice([None, "tiff_deflate", "tiff_lzw"]))
        files.append(PhiFile(f"tiff-{round_}.tif", data, "tiff_tags", m, labels))
    return files


# --- finding markers --------------------------------------------------------------------------

_ZLIB_HEADS = {bytes([0x78, b]) for b in range(256) if (0x78 * 256 + b) % 31 == 0}


def inflated_views(data: bytes, *, limit: int = 4000, max_out: int = 32 << 20) -> list[bytes]:
    """Every zlib or gzip stream found anywhere in ``data``, inflated (bounded): PNG text,
    ICC and image chunks, TIFF deflate strips, tar.gz members."""
    views, tried, buffer = [], 0, memoryview(data)
    at = data.find(b"\x78")
    while at >= 0 and tried < limit:
        if data[at:at + 2] in _ZLIB_HEADS:
            tried += 1
            try:
                out = zlib.decompressobj().decompress(buffer[at:], max_out)
            except zlib.error:
                out = b""
            if len(out) >= 8:
                views.append(out)
        at = data.find(b"\x78", at + 1)
    at = data.find(b"\x1f\x8b")
    while at >= 0 and tried < limit:
        tried += 1
        try:
            views.append(gzip.GzipFile(fileobj=io.BytesIO(data[at:])).read(max_out))
        except (OSError, EOFError, zlib.error):
            pass
        at = data.find(b"\x1f\x8b", at + 2)
    return views


def marker_hits(markers: list[str], data: bytes | str, where: str, *,
                inflate: bool = True) -> list[dict]:
    """Where each marker occurs in ``data``: plain, UTF-16 LE / BE, with every NUL removed
    (UTF-16 or UCS-2 text read as bytes), or (``inflate``) inside a zlib / gzip stream. One
    hit per (marker, form, context): the context is the text that follows (the plant's
    label), so every leaking place shows."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    views = [("plain", data)]
    if b"\x00" in data:
        views.append(("nul-stripped", data.replace(b"\x00", b"")))
    if inflate:
        views += [("inflated", view) for view in inflated_views(data)]
    hits, seen = [], set()
    for marker in markers:
        forms = [("", marker.encode()), ("utf-16-le", marker.encode("utf-16-le")),
                 ("utf-16-be", marker.encode("utf-16-be"))]
        for view_name, view in views:
            for form_name, needle in forms:
                at, count = view.find(needle), 0
                while at >= 0 and count < 50:
                    count += 1
                    tail = bytes(view[at + len(needle):at + len(needle) + 64])
                    if form_name:
                        tail = tail.decode(form_name, "replace").encode()
                    context = tail.split(b"\x00")[0][:32].decode("ascii", "replace")
                    context = "".join(ch if ch.isalnum() or ch in "^_-." else "|" for ch in context)
                    key = (marker, context.split("|")[0])
                    if key not in seen:
                        seen.add(key)
                        hits.append({"marker": marker, "where": where,
                                     "form": f"{form_name} {view_name}".strip(),
                                     "context": context})
                    at = view.find(needle, at + 1)
    return hits


def planted_missing(item: PhiFile) -> list[str]:
    """Labels the builder failed to plant (each must really be in the hostile input)."""
    views = [item.data, item.data.replace(b"\x00", b"")] + inflated_views(item.data)
    missing = []
    for label in item.labels:
        needle = item.marker + label
        forms = (needle.encode(), needle.encode("utf-16-le"), needle.encode("utf-16-be"))
        if not any(form in view for view in views for form in forms):
            missing.append(label)
    missing += [label for label in item.name_labels if item.marker + label not in item.name]
    return missing
