"""Readers for the places scans come from. Pure: no Django.

A *source spec* is one of:

- a folder: every file below it (any depth). DICOM files (``.dcm`` or no
  extension, found by content) are never labelled from folder names. PNG / JPEG
  / TIFF files one level below the folder, when the folder has no images of its
  own, take the sub-folder's name as their label ("class folders", as in
  ``brain_mri/Training/<class>/``); ``layout="flat"`` turns that off.
- a CSV file with ``filename,label`` rows, paths relative to the CSV.
- ``file.npz#split``: a MedMNIST archive (``<split>_images`` and ``<split>_labels``).
- a single image or DICOM file.

``labels_csv`` (``filename,label``) adds or overrides labels for a folder;
rows match a file's path relative to the folder, or its bare name when that
is unique. A labels CSV (or a CSV source) with a header may also name each
file's patient (a ``patient`` / ``patient_id`` / ``Patient ID`` column): files
without DICOM identity are then grouped by patient (a keyed hash) in an
automatic eval split.

The same readers serve ``manage.py import_scans`` and the benchmarks.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ml_backend.data.decode import DICOM_EXTENSIONS, RASTER_EXTENSIONS

__all__ = ["SourceError", "SourceItem", "SourceListing", "read_source", "MEDMNIST_CLASSES",
           "medmnist_classes"]


class SourceError(Exception):
    """The source as a whole cannot be read (missing path, bad CSV, unknown split)."""


# Class names of MedMNIST v2 single-label sets, by label index (from the
# MedMNIST v2 paper's INFO table); other archives get class_0, class_1, ...
MEDMNIST_CLASSES: dict[str, list[str]] = {
    "pneumoniamnist": ["normal", "pneumonia"],
    "breastmnist": ["malignant", "normal_or_benign"],
    "bloodmnist": ["basophil", "eosinophil", "erythroblast", "immature_granulocytes",
                   "lymphocyte", "monocyte", "neutrophil", "platelet"],
    "pathmnist": ["adipose", "background", "debris", "lymphocytes", "mucus", "smooth_muscle",
                  "normal_colon_mucosa", "cancer_associated_stroma",
                  "colorectal_adenocarcinoma_epithelium"],
    "dermamnist": ["actinic_keratoses_and_intraepithelial_carcinoma", "basal_cell_carcinoma",
                   "benign_keratosis_like_lesions", "dermatofibroma", "melanoma",
                   "melanocytic_nevi", "vascular_lesions"],
    "octmnist": ["choroidal_neovascularization", "diabetic_macular_edema", "drusen", "normal"],
    "retinamnist": ["grade_0", "grade_1", "grade_2", "grade_3", "grade_4"],
    "tissuemnist": ["collecting_duct_connecting_tubule", "distal_convoluted_tubule",
                    "glomerular_endothelial_cells", "interstitial_endothelial_cells",
                    "leukocytes", "podocytes", "proximal_tubule_segments",
                    "thick_ascending_limb"],
    **{name: ["bladder", "femur_left", "femur_right", "heart", "kidney_left", "kidney_right",
              "liver", "lung_left", "lung_right", "pancreas", "spleen"]
       for name in ("organamnist", "organcmnist", "organsmnist")},
}


def medmnist_classes(name: str) -> list[str] | None:
    """The MedMNIST class names for an archive's name: an exact set name, or a file named
    after one (``pneumoniamnist_test.npz``, ``bloodmnist_pbc.npz``): the longest set name the
    stem starts with."""
    stem = name.lower()
    if stem in MEDMNIST_CLASSES:
        return MEDMNIST_CLASSES[stem]
    matches = [key for key in MEDMNIST_CLASSES if stem.startswith(key)]
    return MEDMNIST_CLASSES[max(matches, key=len)] if matches else None

SCAN_EXTENSIONS = DICOM_EXTENSIONS | RASTER_EXTENSIONS
# Files that commonly sit beside scans and are not scans: skipped, not failed.
_SIDECAR_EXTENSIONS = {".csv", ".txt", ".md", ".json", ".xml", ".html", ".pdf", ".db", ".ini"}


@dataclass(frozen=True)
class SourceItem:
    """One file-to-be-scan. ``load()`` reads its bytes lazily."""

    name: str
    label: str | None
    load: Callable[[], bytes] = field(repr=False, compare=False)
    digest_hint: str | None = field(default=None, compare=False)
    # the patient as the source's table names them (a 'Patient ID' column, a ChestX-ray14 or
    # CheXpert file name): never stored, only its keyed hash (``source_patient_pseudonym``)
    # for files that carry no DICOM PatientID, so auto splits keep each patient on one side
    patient: str | None = field(default=None, repr=False, compare=False)


@dataclass
class SourceListing:
    items: list[SourceItem]
    skipped: list[str] = field(default_factory=list)
    unmatched_label_rows: list[str] = field(default_factory=list)
    # files the labels CSV lists more than once with different labels or patients: the
    # disagreeing value is not used
    conflicting_label_rows: list[str] = field(default_factory=list)
    layout: str = "flat"
    default_dataset_name: str = ""


def read_source(
    spec: str | os.PathLike,
    *,
    labels_csv: str | os.PathLike | None = None,
    layout: str = "auto",
    class_names: list[str] | None = None,
) -> SourceListing:
    """List the items of a source spec (see module docstring)."""
    if layout not in ("auto", "class-folders", "flat"):
        raise SourceError(f"unknown layout {layout!r}: use auto, class-folders or flat")
    text = os.fspath(spec)
    if "#" in text and text.split("#", 1)[0].lower().endswith(".npz"):
        path, split = text.split("#", 1)
        split, _, query = split.partition("?")
        if query:
            key, _, value = query.partition("=")
            if key != "set" or not value:
                raise SourceError(f"{text}: after '?' only set=NAME is understood "
                                  "(e.g. file.npz#test?set=pneumoniamnist)")
            names = medmnist_classes(value)
            if names is None:
                raise SourceError(f"{text}: unknown MedMNIST set {value!r}; known: "
                                  f"{', '.join(sorted(MEDMNIST_CLASSES))}")
            class_names = class_names or names
        return _read_npz(Path(path), split, class_names=class_names)
    path = Path(text)
    if path.suffix.lower() == ".npz":
        raise SourceError(f"{path.name}: name the split to import, e.g. {path.name}#train")
    if not path.exists():
        raise SourceError(f"{text}: no such file or folder")
    if path.is_dir():
        listing = _read_folder(path, layout=layout)
    elif path.suffix.lower() == ".csv":
        listing = _read_csv_source(path)
    else:
        listing = SourceListing(
            items=[SourceItem(name=path.name, label=None, load=path.read_bytes)],
            default_dataset_name=path.parent.name or "import",
        )
    if labels_csv is not None:
        _apply_labels_csv(listing, Path(labels_csv))
    return listing


def storable_text(text: str) -> str:
    """``text`` as a database and a page can hold it: a file or folder name whose bytes are
    not UTF-8 (``M\\xfcller.png`` written by an old system in Latin-1) reaches Python with
    surrogate escapes, which no UTF-8 column, JSON value or page can store; each such byte
    becomes U+FFFD. NUL (which PostgreSQL's text cannot hold) becomes U+FFFD too."""
    if text.isascii() and "\x00" not in text:
        return text
    try:
        clean = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:      # a surrogate not made by surrogateescape
        clean = text.encode("utf-8", "replace").decode("utf-8")
    return clean.replace("\x00", "\ufffd")


def _read_folder(root: Path, *, layout: str) -> SourceListing:
    files: list[Path] = []
    skipped: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in sorted(filenames):
            if filename.startswith("."):
                continue
            full = Path(dirpath) / filename
            if full.is_symlink() or not full.is_file():
                skipped.append(_rel(full, root))
                continue
            ext = full.suffix.lower() if "." in filename.lstrip(".") else ""
            if ext in _SIDECAR_EXTENSIONS:
                skipped.append(_rel(full, root))
                continue
            files.append(full)

    def is_raster(p: Path) -> bool:
        return p.suffix.lower() in RASTER_EXTENSIONS

    top_level_images = any(p.parent == root and is_raster(p) for p in files)
    class_folders = layout == "class-folders" or (
        layout == "auto"
        and not top_level_images
        and any(p.parent.parent == root and is_raster(p) for p in files)
    )
    items = []
    for p in files:
        label = None
        if class_folders and is_raster(p) and p.parent.parent == root:
            label = storable_text(p.parent.name)
        # the name as stored and shown; the file is read by its path, whatever its bytes
        items.append(SourceItem(name=_rel(p, root), label=label, load=p.read_bytes))
    if not items and not skipped:
        raise SourceError(f"{root}: the folder holds no files")
    return SourceListing(
        items=items,
        skipped=skipped,
        layout="class-folders" if class_folders else "flat",
        default_dataset_name=storable_text(root.name),
    )


def _rel(path: Path, root: Path) -> str:
    return storable_text(path.relative_to(root).as_posix())


def _header_word(cell: str) -> str:
    """A header cell as compared: case-blind, spaces, '_' and '-' alike."""
    return " ".join(re.split(r"[\s_\-]+", cell.strip().lower())).strip()


# a labels CSV's header: which column names the file, its label and (optionally) its patient.
# The patient (never stored: its keyed hash groups the patient's files in an automatic eval
# split, ``SourceItem.patient``) is never read as a label.
FILE_COLUMNS = ("filename", "file", "file name", "path", "file path", "image", "image name",
                "image index", "image id", "image path")
LABEL_COLUMNS = ("label", "class", "class name", "diagnosis", "finding", "category", "target")
PATIENT_COLUMNS = ("patient", "patient id", "patientid", "patient name", "patientname",
                   "mrn", "patient mrn", "subject", "subject id")
# separators a spreadsheet writes where the comma is the decimal mark
_SEPARATORS = (";", "\t")


def csv_dialect(text: str) -> str:
    """The separator of a CSV: a comma, unless its first line has none and has a ';' or a tab
    (how spreadsheets in many locales save 'CSV')."""
    first = text.lstrip("\ufeff").split("\n", 1)[0]
    if "," not in first:
        for separator in _SEPARATORS:
            if separator in first:
                return separator
    return ","


@dataclass
class LabelRows:
    """A labels CSV read: ``{filename: (label, patient)}`` in file order, and the files whose
    rows disagree (their disagreeing label or patient is not used)."""

    rows: dict[str, tuple[str, str | None]]
    conflicts: list[str] = field(default_factory=list)


def _label_columns(csv_name: str, header: list[str]) -> tuple[int, int, int | None]:
    words = [_header_word(cell) for cell in header]
    file_at = next((i for i, w in enumerate(words) if w in FILE_COLUMNS), 0)
    patient_at = next((i for i, w in enumerate(words) if w in PATIENT_COLUMNS), None)
    label_at = next((i for i, w in enumerate(words) if w in LABEL_COLUMNS), None)
    if label_at is None:
        others = [i for i in range(len(words)) if i not in (file_at, patient_at)]
        if len(words) == 2 and len(others) == 1:
            label_at = others[0]                # 'filename,tumour_type': unambiguous
        else:
            raise SourceError(
                f"{csv_name}: its header ({', '.join(cell.strip() for cell in header)}) names "
                "no label column: call it 'label' (or class, diagnosis)"
                + (" — the patient column is never read as a label" if patient_at is not None
                   else ""))
    return file_at, label_at, patient_at


def _is_header(row: list[str]) -> bool:
    words = [_header_word(cell) for cell in row]
    return words[0] in FILE_COLUMNS or any(
        w in LABEL_COLUMNS or w in PATIENT_COLUMNS for w in words)


def _read_label_rows(csv_path: Path) -> LabelRows:
    """A labels CSV: ``filename,label`` rows with an optional header (comma, or ';' / tab
    where the first line has no comma). A header's filename, label and patient columns are
    found by name (``FILE_COLUMNS``, ``LABEL_COLUMNS``, ``PATIENT_COLUMNS``); a header with
    no label column is refused unless it has just two columns. Without a header a row has
    two columns, filename and label: more is refused (which column is the label?). A file
    listed twice with different labels (or patients) gets neither, and is named in
    ``conflicts``."""
    if not csv_path.is_file():
        raise SourceError(f"{csv_path}: labels CSV not found")
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise SourceError(f"{csv_path}: labels CSV is not UTF-8 text") from None
    separator = csv_dialect(text)
    seen: dict[str, list[tuple[str, str | None]]] = {}
    columns = None
    for number, row in enumerate(csv.reader(io.StringIO(text), delimiter=separator), start=1):
        if not row or all(not cell.strip() for cell in row):
            continue
        if columns is None:
            if _is_header(row):
                columns = _label_columns(csv_path.name, row)
                continue
            columns = (0, 1, None)
        if len(row) < 2:
            raise SourceError(f"{csv_path.name} line {number}: expected 'filename,label'"
                              + ("" if separator != "," else
                                 " (columns separated by commas, or by ';' or tabs when the "
                                 "first line has no comma)"))
        if columns == (0, 1, None) and any(cell.strip() for cell in row[2:]):
            raise SourceError(
                f"{csv_path.name} line {number}: {len(row)} columns and no header: write a "
                "first line naming the columns (filename, label and, if one names the "
                "patient, patient), so that no other column is read as a label")
        file_at, label_at, patient_at = columns
        filename = row[file_at].strip() if file_at < len(row) else ""
        if not filename:
            raise SourceError(f"{csv_path.name} line {number}: empty filename")
        filename = filename.replace("\\", "/")
        label = row[label_at].strip() if label_at < len(row) else ""
        patient = (row[patient_at].strip() or None) if (
            patient_at is not None and patient_at < len(row)) else None
        seen.setdefault(filename, []).append((label, patient))
    if not seen:
        raise SourceError(f"{csv_path}: labels CSV has no rows")
    rows: dict[str, tuple[str, str | None]] = {}
    conflicts = []
    for filename, given in seen.items():
        labels: dict[str, str] = {}
        for label, _ in given:       # the first spelling of each (classes match case-blind)
            if label:
                labels.setdefault(label.casefold(), label)
        patients = {patient for _, patient in given if patient}
        if len(labels) > 1 or len(patients) > 1:
            conflicts.append(filename)
        rows[filename] = (next(iter(labels.values())) if len(labels) == 1 else "",
                          next(iter(patients)) if len(patients) == 1 else None)
    return LabelRows(rows=rows, conflicts=conflicts)


def _read_csv_source(csv_path: Path) -> SourceListing:
    base = csv_path.parent
    items = []
    read = _read_label_rows(csv_path)
    for filename, (label, patient) in read.rows.items():
        target = (base / filename).resolve()
        if base.resolve() not in target.parents:
            raise SourceError(f"{csv_path.name}: {filename!r} points outside the CSV's folder")
        items.append(
            SourceItem(name=filename, label=label or None, load=_reader(target, filename),
                       patient=patient)
        )
    return SourceListing(items=items, default_dataset_name=csv_path.stem,
                         conflicting_label_rows=read.conflicts)


def _reader(path: Path, name: str) -> Callable[[], bytes]:
    def load() -> bytes:
        if not path.is_file():
            # no name in the message: a DICOM's name may be the patient's
            raise FileNotFoundError("listed in the labels CSV but not found")
        return path.read_bytes()

    return load


def _apply_labels_csv(listing: SourceListing, csv_path: Path) -> None:
    read = _read_label_rows(csv_path)
    by_name = {item.name: i for i, item in enumerate(listing.items)}
    by_base: dict[str, list[int]] = {}
    for i, item in enumerate(listing.items):
        by_base.setdefault(item.name.rsplit("/", 1)[-1], []).append(i)
    conflicts = set(read.conflicts)
    for filename, (label, patient) in read.rows.items():
        index = by_name.get(filename)
        if index is None:
            candidates = by_base.get(filename.rsplit("/", 1)[-1], [])
            index = candidates[0] if len(candidates) == 1 else None
        if index is None:
            listing.unmatched_label_rows.append(filename)
            continue
        item = listing.items[index]
        if filename in conflicts:
            listing.conflicting_label_rows.append(filename)
        listing.items[index] = replace(item, label=label or None,
                                       patient=patient or item.patient)


def _read_npz(path: Path, split: str, *, class_names: list[str] | None) -> SourceListing:
    if not path.is_file():
        raise SourceError(f"{path}: no such file")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise SourceError(f"{path.name}: not a readable .npz archive ({exc})") from None
    splits = sorted(k[: -len("_images")] for k in archive.files if k.endswith("_images"))
    if f"{split}_images" not in archive.files:
        raise SourceError(
            f"{path.name}: no split {split!r}; it has {', '.join(splits) or 'no *_images arrays'}"
        )
    images = archive[f"{split}_images"]
    labels = archive[f"{split}_labels"] if f"{split}_labels" in archive.files else None
    if images.ndim not in (3, 4):
        raise SourceError(f"{path.name}: {split}_images has shape {images.shape}, expected (N, H, W)")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim == 2 and labels.shape[1] != 1:
            raise SourceError(
                f"{path.name}: {split}_labels is multi-label {labels.shape}; "
                "import it without labels or as one CSV per finding"
            )
        labels = labels.reshape(-1)
        if len(labels) != len(images):
            raise SourceError(f"{path.name}: {len(images)} images but {len(labels)} labels")
    names = class_names or medmnist_classes(path.stem)

    def label_name(value: int) -> str:
        if names is not None and 0 <= value < len(names):
            return names[value]
        return f"class_{value}"

    width = len(str(len(images)))
    items = []
    for index in range(len(images)):
        array = images[index]
        digest = hashlib.sha256(
            f"{array.dtype.str}{array.shape}".encode() + np.ascontiguousarray(array).tobytes()
        ).hexdigest()
        items.append(
            SourceItem(
                name=f"{path.name}#{split}/{index:0{width}d}",
                label=label_name(int(labels[index])) if labels is not None else None,
                load=_png_encoder(array),
                digest_hint=digest,
            )
        )
    return SourceListing(items=items, default_dataset_name=f"{path.stem}-{split}")


def _png_encoder(array: np.ndarray) -> Callable[[], bytes]:
    def load() -> bytes:
        from PIL import Image

        data = array
        if data.dtype != np.uint8:
            data = np.clip(data, 0, 255).astype(np.uint8)
        image = Image.fromarray(data if data.ndim == 2 else data[..., :3])
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    return load


def iter_arrays(listing: SourceListing) -> Iterator[tuple[SourceItem, bytes]]:
    """Yield ``(item, bytes)``; convenience for benchmarks."""
    for item in listing.items:
        yield item, item.load()
