"""No PHI from pydicom's test files reaches the database, media, previews or logs."""

from __future__ import annotations

import io
import logging
import shutil

import pydicom
from django.core.management import call_command
from pydicom.multival import MultiValue

from annotator.models import Scan
from ml_backend.data.decode import PHI_KEYWORDS
from tests.base import pydicom_test_files
from tests.conftest import run_import

# Values so short or generic that they occur by chance (e.g. sex "M", age "000Y").
MIN_LENGTH = 4
# Technical attributes the tool keeps on purpose. Fixed here, not read from the code under
# test, so widening the code's whitelist to an identifying attribute fails this test.
TECHNICAL = ("Modality", "Manufacturer", "ManufacturerModelName", "BodyPartExamined")


def phi_values(paths) -> set[str]:
    """Identifying values in the files: Basic Profile attributes and every person name.

    Private tags are dropped wholesale by the whitelist; their values are not collected
    because they repeat public non-identifying values (manufacturer, numbers).
    """
    values: set[str] = set()
    kept: set[str] = set()  # values we store on purpose (e.g. Manufacturer "TOSHIBA")
    for path in paths:
        try:
            ds = pydicom.dcmread(path, force=True)
        except Exception:
            continue
        kept.update(str(ds[k].value).strip() for k in TECHNICAL if k in ds)
        for element in ds.iterall():
            if element.tag.is_private or element.value in (None, ""):
                continue
            if element.keyword not in PHI_KEYWORDS and element.VR not in ("PN", "DA", "DT"):
                continue
            raw = element.value if isinstance(element.value, (list, MultiValue)) else [element.value]
            for item in raw:
                text = str(item).strip()
                if not _distinctive(text):
                    continue
                values.add(text)
                if element.VR == "PN":  # each part of a person's name on its own
                    values.update(p for p in text.replace("^", " ").split() if len(p) >= 6)
    return {v for v in values if not any(v in k for k in kept)}


def _distinctive(text: str) -> bool:
    """Long enough not to occur by chance (a 4-digit ID would match any number)."""
    if not any(ch.isalnum() for ch in text) or text.upper() in ("ANONYMOUS", "NONE"):
        return False
    core = text.replace(".", "").replace(":", "").replace("-", "")
    if len(set(core)) <= 1:  # '00000000', '11111111': placeholders, not identifiers
        return False
    return len(text) >= (6 if core.isdigit() else MIN_LENGTH)


def stored_text(path) -> bytes:
    """What a stored file says: DICOM metadata (not pixel bytes, where digits recur by
    chance); the whole file for PNG/JPEG."""
    if path.suffix != ".dcm":
        return path.read_bytes()
    ds = pydicom.dcmread(path)
    del ds.PixelData
    return "\n".join(str(element.value) for element in ds.iterall()).encode()


def test_no_phi_in_database_media_previews_or_logs(project, tmp_path, settings, caplog):
    source = tmp_path / "dicom"
    source.mkdir()
    paths = pydicom_test_files()
    for path in paths:
        shutil.copy(path, source / path.name)
    phi = phi_values(paths)
    assert {"CompressedSamples^CT1", "Lastname^Firstname"} & phi  # the test data holds PHI
    assert len(phi) > 20

    with caplog.at_level(logging.DEBUG):
        job = run_import(project, source)
    assert job.imported >= 40, job.errors

    out = io.StringIO()
    call_command("dumpdata", "annotator", "ml_backend", stdout=out)
    database = out.getvalue()
    stored = {p.relative_to(settings.MEDIA_ROOT).as_posix(): stored_text(p)
              for p in settings.MEDIA_ROOT.rglob("*") if p.is_file()}
    assert any(name.startswith("previews/") for name in stored)
    assert any(name.endswith(".dcm") for name in stored)
    logs = caplog.text

    # Beyond the import: a project backup, the audit CSV, the label page's data and what
    # would go to Label Studio (task data, predictions) carry no PHI either.
    import json
    import tarfile

    from annotator import label_page, label_studio
    from annotator.audit import to_csv
    from annotator.backup import export_project
    from annotator.models import AuditEvent

    archive = tmp_path / "backup.tar.gz"
    export_project(project, archive)
    with tarfile.open(archive) as tar:
        manifest = tar.extractfile("manifest.json").read().decode()
    shown = [json.dumps(label_page.label_payload(project=project, scan=scan))
             + json.dumps(label_studio._task_data(scan))
             for scan in Scan.objects.filter(project=project, quarantined=False)]
    exports = {"backup manifest": manifest, "audit CSV": to_csv(AuditEvent.objects.all()),
               "label pages and Label Studio tasks": "\n".join(shown)}

    leaks = []
    for value in phi:
        for where, text in exports.items():
            if value in text:
                leaks.append(f"{where}: {value!r}")
    for value in phi:
        needle = value.encode("utf-8", "ignore")
        if value in database:
            leaks.append(f"database: {value!r}")
        if value in logs:
            leaks.append(f"logs: {value!r}")
        for name, data in stored.items():
            if needle in data:
                leaks.append(f"{name}: {value!r}")
    assert leaks == [], "\n".join(sorted(leaks))

    # The pseudonymous key links files of one patient without revealing the ID.
    keys = set(Scan.objects.exclude(patient_key="").values_list("patient_key", flat=True))
    assert keys and all(len(k) == 32 for k in keys)
    mr_keys = set(Scan.objects.filter(modality="MR", width=64).values_list("patient_key", flat=True))
    assert len(mr_keys) == 1   # MR_small in its encodings is one patient
