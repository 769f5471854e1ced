"""PHI markers end to end: the fast version of ``python -m bench.fuzz --target phi``.

One small corpus (bench/hostile.py ``phi_corpus``, seeded; the builders are those of
tests/ml_backend/test_deid_markers.py) plants a unique marker in every container a scan
file can carry — DICOM identifying and private tags, nested sequences inside the VOI /
Modality LUT sequences, encapsulated JPEG frames with COM / APP1; JPEG COM / APP1 / APP2
ICC / thumbnail / after EOI / between progressive scans; PNG tEXt / iTXt / zTXt / iCCP /
eXIf; TIFF ImageDescription / Artist / XMP / ICC — and in DICOM file names (in a sub-folder,
without an extension, under a ``.png`` name, refused, duplicated, named in a labels CSV that
matches no file, uploaded as junk or empty). The files go through the import service and the
upload view; then no marker (plain, UTF-16 LE / BE, NUL-stripped, inside any zlib / gzip
stream) may be in the database dump, any file under MEDIA_ROOT / ARTIFACTS_ROOT /
INCOMING_ROOT, the logs, a project backup, Label Studio's task data and labeling config, or
the pages (project, import jobs, scans, label page and its JSON, worklist, jobs.json).

Pillow's DEBUG records (every TIFF / EXIF tag value) are kept out of the logs by
``medsite/settings.py``; a source naming one DICOM file keeps only its folder once read.
"""

from __future__ import annotations

import json
import logging
import random
import zlib

import pytest
from django.test import Client

from annotator import services
from bench.fuzz import _brain_scans, phi_import, phi_import_sources, phi_search, phi_upload, \
    phi_write
from bench.hostile import PhiFile, marker_hits, new_marker, phi_corpus, phi_dicom_plain, \
    planted_missing

pytestmark = pytest.mark.django_db
SEED = 20261202


@pytest.fixture
def admin_client(project, users):
    """A project admin's session (admins also see quarantined scans)."""
    services.membership_set(project=project, user=users["dora"], role="admin")
    client = Client()
    client.force_login(users["dora"])
    return client


def _by_level(caplog) -> dict[str, str]:
    """Captured records: what production logs (INFO and above, LOG_LEVEL's default) and the
    DEBUG records on their own."""
    records = caplog.get_records("setup") + caplog.get_records("call")   # the fixture's too
    info = [r for r in records if r.levelno >= logging.INFO]
    debug = [r for r in records if r.levelno < logging.INFO]
    return {"logs (INFO and above)": "\n".join(f"{r.name}: {r.getMessage()}" for r in info),
            "logs (DEBUG records)": "\n".join(f"{r.name}: {r.getMessage()}" for r in debug)}


def _where(hits: list[dict]) -> list[str]:
    return sorted({f"{h['kind']} ({h['file'][:40]}) @ {h['where'][:70]}: {h['context']}"
                   for h in hits})


@pytest.fixture
def imported_everywhere(project, admin_client, tmp_path, caplog,
                        django_capture_on_commit_callbacks):
    """The corpus imported through the import service (a folder with a labels CSV) and
    uploaded through the upload view; everything logged at DEBUG is captured."""
    rng = random.Random(SEED)
    caplog.set_level(logging.DEBUG)
    _brain_scans(project, tmp_path / "brain", per_class=1)   # classes, so every page has some
    imported, uploaded = phi_corpus(rng, small=True), phi_corpus(rng, small=True)
    assert {f.name: planted_missing(f) for f in imported + uploaded
            if planted_missing(f)} == {}, "a builder failed to plant (the test proves nothing)"
    jobs, extra = phi_import(project, imported, tmp_path, rng)
    pages, extra_upload = phi_upload(
        admin_client, project, uploaded, rng,
        commit_scope=lambda: django_capture_on_commit_callbacks(execute=True))
    return {"rng": rng, "jobs": jobs, "pages": pages, "imported": imported,
            "plants": imported + uploaded + extra + extra_upload}


def test_no_marker_in_the_database_files_logs_backup_label_studio_or_pages(
        project, admin_client, tmp_path, caplog, imported_everywhere):
    run = imported_everywhere
    job = run["jobs"][0]
    # the import did what the corpus asks: one refused DICOM (with a reason), one duplicate,
    # and the labels CSV rows that name DICOM files not there are counted, not named
    assert (job.status, job.imported, job.duplicates, job.failed) == ("succeeded", 8, 1, 1), (
        job.errors, job.warnings)
    assert job.errors[0]["reason"] and job.errors[0]["name"].startswith("file ")
    assert any("3 labels CSV rows matched no file" in w for w in job.warnings), job.warnings
    answer, redirect, refusal = (where for where, _ in run["pages"])
    assert answer == "upload answer (302)" and refusal == "upload refusal page (400)"
    uploaded = project.import_jobs.get(pk=int(redirect.rstrip("/").rsplit("/", 1)[-1]))
    assert (uploaded.imported, uploaded.duplicates, uploaded.failed) == (8, 1, 1)
    assert b"name not shown" in run["pages"][-1][1]      # the refused DICOM names

    logs = _by_level(caplog)
    result = phi_search(run["plants"], [project], admin_client,
                        logs={"logs (INFO and above)": logs["logs (INFO and above)"]},
                        workdir=tmp_path)
    markers = sorted({p.marker for p in run["plants"]})
    for where, page in run["pages"]:
        result["hits"] += [dict(h, kind="upload page", file="") for h in
                           marker_hits(markers, page, f"page {where}", inflate=False)]
    assert result["page_errors"] == []
    assert result["places_searched"] > 60
    assert caplog.get_records("setup"), "nothing was logged: the log search would prove nothing"
    assert _where(result["hits"]) == []


def test_with_the_linkage_kept_and_series_stacked_no_marker_leaks_either(
        project, admin_client, tmp_path, caplog, settings, django_capture_on_commit_callbacks):
    """The same corpus with an honest-broker linkage kept (LINKAGE_KEY) and DICOM series
    stacked into one scan: the linkage rows exist, and still no marker is found anywhere,
    the database dump (with the encrypted linkage) and the backup included."""
    from annotator.models import DicomLinkage

    settings.LINKAGE_KEY = "a-linkage-key-for-the-phi-test-" * 2
    project.dicom_grouping = "series"
    project.save(update_fields=["dicom_grouping"])
    caplog.set_level(logging.INFO)
    rng = random.Random(SEED + 3)
    _brain_scans(project, tmp_path / "brain", per_class=1)
    imported = phi_corpus(rng, small=True)
    jobs, extra = phi_import(project, imported, tmp_path, rng)
    assert jobs[0].imported >= 1
    assert DicomLinkage.objects.filter(scan__project=project).exists(), \
        "no linkage was kept: the test would prove nothing about it"
    result = phi_search(imported + extra, [project], admin_client,
                        logs={"logs": _by_level(caplog)["logs (INFO and above)"]},
                        workdir=tmp_path)
    assert result["page_errors"] == []
    assert _where(result["hits"]) == []


def test_no_marker_in_debug_logs(project, admin_client, tmp_path, caplog, imported_everywhere):
    plants = imported_everywhere["plants"]
    debug = _by_level(caplog)["logs (DEBUG records)"]
    # Pillow would log every TIFF / EXIF tag value at DEBUG: its logger stays at INFO
    assert not logging.getLogger("PIL.TiffImagePlugin").isEnabledFor(logging.DEBUG)
    logging.getLogger("annotator").debug("debug records are captured")
    assert "debug records are captured" in caplog.text
    hits = marker_hits(sorted({p.marker for p in plants}), debug, "logs (DEBUG)", inflate=False)
    assert [h["context"] for h in hits] == []


@pytest.mark.parametrize("kind", ["csv_source_missing_dicom", "single_file_source",
                                  "missing_file_source", "csv_source_listed_dicom"])
def test_no_dicom_name_from_the_other_source_kinds(project, admin_client, tmp_path, kind):
    """A CSV source listing DICOM files (one missing), one DICOM file as the source, and a
    DICOM path that does not exist."""
    rng = random.Random(SEED + 1)
    jobs, plants = phi_import_sources(project, tmp_path, rng)
    assert [(j.imported, j.failed) for j in jobs] == [(1, 1), (1, 0), (0, 0)]
    assert jobs[-1].status == "failed" and jobs[-1].last_error
    plants = [p for p in plants if p.kind == kind]
    result = phi_search(plants, [project], admin_client, logs={}, workdir=tmp_path)
    assert _where(result["hits"]) == []


# --- the search itself finds what it must ------------------------------------------------------


def test_the_search_finds_a_dicom_name_stored_in_an_import_error(
        project, admin_client, tmp_path, monkeypatch):
    """If an import error named the file (as it did before ``_file_ref``), the search says
    where: the database and the import job's page."""
    monkeypatch.setattr(services, "_file_ref",
                        lambda number, item, data, sha: f"file {number} {item.name}")
    rng = random.Random(SEED + 2)
    marker = new_marker(rng)
    data, labels = phi_dicom_plain(marker, rng, broken=True)
    item = PhiFile(f"{marker}Refused^Doe.dcm", data, "dicom_refused", marker, labels,
                   ["Refused^Doe.dcm"], expect="refused")
    phi_write(tmp_path / "source", [item])
    job = services.import_job_create(project=project, source=str(tmp_path / "source"),
                                     layout="flat")
    assert services.import_job_run(job_id=job.pk).failed == 1
    result = phi_search([item], [project], admin_client, logs={}, workdir=tmp_path)
    places = {h["where"].split(" (")[0] for h in result["hits"]}
    assert {"database dump", f"page /imports/{job.pk}/"} <= places, places
    assert all(h["context"].startswith("Refused^Doe.dcm") for h in result["hits"])


def test_the_search_sees_utf16_compressed_and_nul_spread_forms():
    marker = "PHIMARKERcanary0001"
    png_text = b"\x89PNG\r\n\x1a\n" + b"zTXtComment\x00\x00" + zlib.compress(
        (marker + "zTXt").encode())
    samples = {"utf16le": b"\x00\x01" + (marker + "LE").encode("utf-16-le"),
               "utf16be": (marker + "BE").encode("utf-16-be"),
               "zlib": png_text,
               "json": json.dumps({"a": marker + "Json"})}
    for where, data in samples.items():
        contexts = [h["context"] for h in marker_hits([marker], data, where)]
        assert any(c.startswith({"utf16le": "LE", "utf16be": "BE", "zlib": "zTXt",
                                 "json": "Json"}[where]) for c in contexts), (where, contexts)
    assert marker_hits([marker], b"PHIMARKERcanary0002", "other") == []
