"""PACS pull and push throughput against a real Orthanc (QIDO-RS + WADO-RS in, STOW-RS out).

    python -m bench.pacs_throughput --studies 50,200 \\
        --source '../shared/data/pneumoniamnist/pneumoniamnist.npz#train' \\
        [--instances 1] [--modality CR --body-part CHEST] [--side 0] [--grouping image] \\
        [--out bench/results/pacs_throughput.json]
    python -m bench.pacs_throughput --table bench/results/pacs_throughput.json

    # multi-slice series (brain MRI scans as slices), in a project that groups per series
    python -m bench.pacs_throughput --studies 20 --source ../shared/data/brain_mri/Training \\
        --modality MR --body-part BRAIN --instances 8 --grouping series

The studies are real scans written as DICOM: each scan of ``--source`` (read with the
product's ``read_source``) becomes the pixels of one instance, ``--instances`` instances of
one class per study (one series), each study its own patient with synthetic but realistic
identifiers in the headers (name, birth date, MRN, other IDs, address, telephone, accession
number, study ID, dates and times, institution, referring physician, operator, station,
descriptions), so the de-identification at import has everything to remove.

At each size N, a fresh Orthanc (Debian's, DICOMweb plugin, loopback, throwaway storage)
and a fresh project on a throwaway PostgreSQL database (``--database``; dropped at the end):

1. the N studies are stored in Orthanc over its REST API, one POST per instance, as a
   modality's gateway would (Orthanc's own ingest, for context);
2. ``pacs_pull`` (the product's service, as ``manage.py pacs_pull`` calls it) of every
   study: QIDO-RS, WADO-RS per study, de-identification and import, one import job per
   study. Studies/s and instances/s, and the wall time split into QIDO-RS, WADO-RS (the
   request and the multipart parse), the import jobs (their own start and end times) and
   the rest (writing each study to the incoming folder, the lookups, job creation);
3. a second pull of the same (every study already here: a scheduled pull with nothing new);
4. every scan labeled (its source class; one reader), then ``pacs_push``: one DICOM
   structured report per scan, STOW-RS into its original study. Reports/s, split into the
   results (label export rules), reading the linkage, building the SR (highdicom), STOW-RS
   and the rest; then a second push (nothing changed: nothing sent);
5. a pull after the push: the reports now in the studies are not images to fetch (the
   next scheduled pull finds every study here).

Checked on the side, and written to the JSON (exit status 1 if one does not hold): every
study imported exactly once, by one import job, with all its instances and a linkage per
scan; no identifier of the headers in the database (``pg_dump --data-only``), the stored
files, the pull's output, the log records of the pull and of the push (at the product's
default ``LOG_LEVEL``, INFO) or the incoming folder; no PHI attribute of the product's list
(``deid.PHI_KEYWORDS``) in a stored file with its original value; the second pull downloads
nothing and the second push sends nothing; each report present in Orthanc, in its original
study of its original patient. ``--orthanc-config`` adds to Orthanc's configuration (e.g. a
PACS that caps its query answers: ``'{"LimitFindResults": 100}'``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import date, timedelta
from pathlib import Path

import numpy as np

from bench._server import add_site_options, write_result

ROOT = Path(__file__).resolve().parents[1]
DATABASE_NAME = "medlabel_pacs_bench"

SOP_CLASSES = {"CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1",
               "CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}

FIRST = ("Anna", "Mateo", "Olivia", "Noah", "Amara", "Liam", "Sofia", "Yusuf", "Mei", "Lucas",
         "Chloe", "Arjun", "Freya", "Kofi", "Isla", "Dmitri", "Leila", "Oscar", "Hana", "Tomas")
LAST = ("Kowalski", "Okafor", "Lindqvist", "Moreau", "Castellano", "Nakamura", "Haddad",
        "Brennan", "Varga", "Osei", "Fitzgerald", "Petrov", "Delacroix", "Szabo", "Mendoza",
        "Achterberg", "Quispe", "Rahimi", "Whitfield", "Ivanova")
STREETS = ("Elm Street", "Harbour Road", "Mill Lane", "Chestnut Avenue", "Station Road")
INSTITUTION = "Riverside Childrens Hospital"
DEVICES = {"CR": ("Agfa", "CR 85-X"), "DX": ("Carestream", "DRX-Evolution"),
           "CT": ("GE MEDICAL SYSTEMS", "LightSpeed VCT"), "MR": ("SIEMENS", "Avanto")}


# --- the studies ----------------------------------------------------------------------------


class SourceImages:
    """The scans of an import source (the product's ``read_source``) as greyscale uint8
    arrays, each decoded when first asked for (a folder of 2,870 brain MRIs at 512 px is
    750 MB decoded; a run uses a few hundred)."""

    def __init__(self, spec: str):
        from ml_backend.data.datasets import read_source

        self.items = read_source(spec).items
        self.labels = [item.label or "" for item in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> np.ndarray:
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(self.items[index].load())).convert("L"))


def synthetic_identity(number: int, *, seed: int = 0) -> dict:
    """A made-up but realistic patient and study for study ``number`` (reproducible)."""
    rng = np.random.default_rng([seed, number])
    study_day = date(2024, 1, 1) + timedelta(days=int(rng.integers(0, 640)))
    born = study_day - timedelta(days=int(rng.integers(365, 90 * 365)))
    age = (study_day - born).days // 365
    first, last = FIRST[rng.integers(len(FIRST))], LAST[rng.integers(len(LAST))]
    middle = "ABCDEFGHJKLMNPRSTW"[rng.integers(18)]
    doctor = f"{LAST[rng.integers(len(LAST))]}^{FIRST[rng.integers(len(FIRST))]}^^Dr"
    clock = f"{int(rng.integers(7, 20)):02d}{int(rng.integers(0, 60)):02d}" \
            f"{int(rng.integers(0, 60)):02d}"
    return {
        "PatientName": f"{last}^{first}^{middle}",
        "PatientID": f"MRN{int(rng.integers(10 ** 7, 10 ** 8))}",
        "IssuerOfPatientID": "RIVERSIDE-CH",
        "OtherPatientIDs": f"NHS{int(rng.integers(10 ** 9, 10 ** 10))}",
        "PatientBirthDate": born.strftime("%Y%m%d"),
        "PatientSex": "MF"[rng.integers(2)],
        "PatientAge": f"{age:03d}Y",
        "PatientAddress": f"{int(rng.integers(1, 300))} {STREETS[rng.integers(len(STREETS))]}"
                          f", Springfield",
        "PatientTelephoneNumbers": f"+44 20 7{int(rng.integers(10 ** 6, 10 ** 7))}",
        "AccessionNumber": f"ACC{int(rng.integers(10 ** 9, 10 ** 10))}",
        "StudyID": f"S{int(rng.integers(10 ** 6, 10 ** 7))}",
        "StudyDate": study_day.strftime("%Y%m%d"), "StudyTime": clock,
        "InstitutionName": INSTITUTION,
        "ReferringPhysicianName": doctor,
        "OperatorsName": f"{LAST[rng.integers(len(LAST))]}^{FIRST[rng.integers(len(FIRST))]}",
        "StationName": f"RAD-ROOM-{int(rng.integers(1, 9))}",
    }


def build_study(images: list[np.ndarray], identity: dict, *, modality: str = "CR",
                body_part: str = "CHEST", side: int = 0):
    """One study of one series, an instance per image (8-bit greyscale, stored as 12 bits in
    16; all resized to ``side`` px, else to the first image's size), carrying ``identity`` in
    its headers. Returns the pydicom datasets."""
    import pydicom
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out = []
    # one matrix size per series, as a scanner writes it: ``side``, else the first image's
    height, width = (side, side) if side else images[0].shape
    for index, image in enumerate(images):
        if image.shape != (height, width):
            image = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
        pixels = image.astype(np.uint16) * 16                      # 12 bits stored
        sop = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SOP_CLASSES[modality]
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID, ds.SOPInstanceUID = SOP_CLASSES[modality], sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        for keyword, value in identity.items():
            setattr(ds, keyword, value)
        ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = identity["StudyDate"]
        ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = identity["StudyTime"]
        ds.Modality, ds.BodyPartExamined = modality, body_part
        ds.Manufacturer, ds.ManufacturerModelName = DEVICES[modality]
        ds.StudyDescription = f"{'XR' if modality in ('CR', 'DX') else modality} {body_part}"
        ds.SeriesDescription = f"{body_part} {modality}"
        ds.SeriesNumber, ds.InstanceNumber = 1, index + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        if modality in ("CR", "DX"):
            ds.PatientOrientation, ds.ViewPosition = ["L", "F"], "PA"
        else:
            ds.FrameOfReferenceUID = frame
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.ImagePositionPatient = [0.0, 0.0, 5.0 * index]
            ds.SliceThickness = 5
        if modality == "CT":
            ds.RescaleIntercept, ds.RescaleSlope = -1024, 1       # stored values → HU
        spacing = round(350.0 / pixels.shape[0], 4)                 # a 35 cm field
        if modality in ("CR", "DX"):
            ds.ImagerPixelSpacing = [spacing, spacing]
        else:
            ds.PixelSpacing = [spacing, spacing]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
        ds.PixelData = pixels.tobytes()
        out.append(ds)
    return out


def dicom_bytes(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def make_studies(images, labels, *, count: int, instances: int, start: int, modality: str,
                 body_part: str, side: int) -> list[dict]:
    """Studies numbered ``start`` to ``start + count - 1``, ``instances`` scans each, all of
    one class (as one patient's views), the classes in turn: study n takes its class's next
    scans, so the studies of one run never share a scan (until a class runs out)."""
    by_class: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    classes = sorted(by_class)
    studies = []
    for number in range(start, start + count):
        label = classes[number % len(classes)]
        pool = by_class[label]
        first = number // len(classes) * instances        # this class's next unused scans
        picked = [pool[(first + i) % len(pool)] for i in range(instances)]
        identity = synthetic_identity(number)
        datasets = build_study([images[i] for i in picked], identity, modality=modality,
                               body_part=body_part, side=side)
        studies.append({"label": label, "identity": identity,
                        "study": str(datasets[0].StudyInstanceUID),
                        "series": str(datasets[0].SeriesInstanceUID),
                        "sops": [str(ds.SOPInstanceUID) for ds in datasets],
                        "files": [dicom_bytes(ds) for ds in datasets]})
    return studies


# --- timing ---------------------------------------------------------------------------------


class TimedClient:
    """The product's DICOMweb client, each request it makes timed (nothing else changed)."""

    TIMED = ("search_for_studies", "iter_study", "store_instances")
    STREAMED = ("iter_study",)      # a generator: the time is spent while it is read

    def __init__(self, client, seconds: Counter):
        self._client, self._seconds = client, seconds

    def __getattr__(self, name):
        attribute = getattr(self._client, name)
        if name not in self.TIMED:
            return attribute

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return attribute(*args, **kwargs)
            finally:
                self._seconds[name] += time.perf_counter() - started

        def streamed(*args, **kwargs):
            items = iter(attribute(*args, **kwargs))
            while True:
                started = time.perf_counter()
                try:
                    item = next(items)
                except StopIteration:
                    return
                finally:
                    self._seconds[name] += time.perf_counter() - started
                yield item
        return streamed if name in self.STREAMED else timed


@contextlib.contextmanager
def timed_functions(seconds: Counter, *targets):
    """Time the real ``module.name`` functions for the duration (restored after)."""
    saved = []
    for module, name in targets:
        original = getattr(module, name)

        def timed(*args, _original=original, _name=name, **kwargs):
            started = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                seconds[_name] += time.perf_counter() - started
        saved.append((module, name, original))
        setattr(module, name, timed)
    try:
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


class CapturedLogs:
    """Every log record of the product and its libraries at the product's default level
    (``LOG_LEVEL`` INFO), kept as text for the identifier check; the console still shows
    warnings only."""

    def __init__(self):
        import logging

        self.records: list[str] = []
        self.handler = logging.Handler(level=logging.INFO)
        self.handler.emit = lambda record: self.records.append(
            f"{record.name}: {record.getMessage()}")

    def __enter__(self):
        import logging

        root = logging.getLogger()
        self.saved = root.level, [(h, h.level) for h in root.handlers]
        for handler in root.handlers:
            handler.setLevel(max(handler.level, logging.WARNING))
        root.addHandler(self.handler)
        root.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc):
        import logging

        root = logging.getLogger()
        root.removeHandler(self.handler)
        level, handlers = self.saved
        root.setLevel(level)
        for handler, was in handlers:
            handler.setLevel(was)
        logging.getLogger().setLevel(level)


class PeakMemory:
    """This process's resident memory sampled every 20 ms while the block runs: the peak,
    and how far it rose above where it started (the studies the bench built are already
    held, so the rise is the pull's own working memory)."""

    def __init__(self):
        self.start_mb = self.peak_mb = 0.0

    @staticmethod
    def rss_mb() -> float:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20

    def __enter__(self):
        import threading

        self.start_mb = self.peak_mb = self.rss_mb()
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.02):
                self.peak_mb = max(self.peak_mb, self.rss_mb())
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self.rss_mb())

    def figures(self) -> dict:
        return {"rss_start_mb": round(self.start_mb, 1), "rss_peak_mb": round(self.peak_mb, 1),
                "rss_rise_mb": round(self.peak_mb - self.start_mb, 1)}


def _rate(count: float, seconds: float) -> float | None:
    return round(count / seconds, 2) if seconds > 0 else None


# --- one size -------------------------------------------------------------------------------


def run_size(args, size: int, start: int, images, labels, workdir: Path, database_url: str,
             log) -> dict:
    from django.contrib.auth import get_user_model

    from django.conf import settings

    from annotator import linkage, pacs, services
    from annotator.models import DicomLinkage, ImportJob, Membership, PacsReport, Project, Scan
    from bench._orthanc import Orthanc

    started = time.perf_counter()
    studies = make_studies(images, labels, count=size, instances=args.instances, start=start,
                           modality=args.modality, body_part=args.body_part, side=args.side)
    n_instances = sum(len(s["files"]) for s in studies)
    size_bytes = sum(len(f) for s in studies for f in s["files"])
    row: dict = {"studies": size, "instances": n_instances, "mb": round(size_bytes / 2 ** 20, 2),
                 "build_s": round(time.perf_counter() - started, 2)}
    orthanc = Orthanc(workdir / f"orthanc-{size}", config=json.loads(args.orthanc_config))
    try:
        row["orthanc_version"] = orthanc.get("/system").get("Version")
        # 1. Orthanc's own ingest, one REST POST per instance
        started = time.perf_counter()
        for study in studies:
            for data in study["files"]:
                orthanc.store(data)
        seconds = time.perf_counter() - started
        stats = orthanc.get("/statistics")
        if stats["CountStudies"] != size or stats["CountInstances"] != n_instances:
            raise SystemExit(f"Orthanc holds {stats['CountStudies']} studies / "
                             f"{stats['CountInstances']} instances, not {size} / {n_instances}")
        row["orthanc_ingest"] = {"seconds": round(seconds, 2),
                                 "instances_per_s": _rate(n_instances, seconds),
                                 "mb_per_s": _rate(size_bytes / 2 ** 20, seconds),
                                 "disk_mb": round(int(stats["TotalDiskSize"]) / 2 ** 20, 2)}
        log(f"{size}: Orthanc stored {n_instances} instances in {seconds:.1f}s")

        project = services.project_create(name=f"pacs-{size}")
        # no refit from the labels below: the bench times the push, not the model
        Project.objects.filter(pk=project.pk).update(refit_every=10 ** 6,
                                                     dicom_grouping=args.grouping)
        project.refresh_from_db()
        reader = get_user_model().objects.create_user(f"reader{size}", password="bench-pass-1")
        services.membership_set(project=project, user=reader, role=Membership.Role.CLINICIAN)

        # 2. the pull of every study, 3. the pull with nothing new
        lines: list[str] = []               # the pull's own lines (the command prints them)
        logged: list[str] = []              # the log records meanwhile
        for name in ("pull", "pull_again"):
            seconds_by = Counter()
            job_before = ImportJob.objects.filter(project=project).count()
            with CapturedLogs() as captured, PeakMemory() as memory:
                started = time.perf_counter()
                summary = pacs.pacs_pull(project=project, url=orthanc.dicomweb,
                                         log=lines.append,
                                         client=TimedClient(pacs.client_for(orthanc.dicomweb),
                                                            seconds_by))
                seconds = time.perf_counter() - started
            logged += captured.records
            jobs = ImportJob.objects.filter(project=project).order_by("pk")[job_before:]
            import_s = sum((j.finished_at - j.started_at).total_seconds() for j in jobs
                           if j.finished_at and j.started_at)
            qido, wado = seconds_by["search_for_studies"], seconds_by["iter_study"]
            row[name] = {"seconds": round(seconds, 3), "summary": summary.words(),
                         "studies_found": summary.studies_found,
                         "studies_pulled": summary.studies_pulled,
                         "already_here": summary.studies_already_here,
                         "instances": summary.instances_retrieved,
                         "imported": summary.imported, "duplicates": summary.duplicates,
                         "failed": summary.failed, "errors": summary.errors[:5],
                         "studies_per_s": _rate(summary.studies_found, seconds),
                         "instances_per_s": _rate(summary.instances_retrieved, seconds),
                         "phases_s": {"qido": round(qido, 3), "wado": round(wado, 3),
                                      "import": round(import_s, 3),
                                      "other": round(seconds - qido - wado - import_s, 3)},
                         "memory": memory.figures()}
            log(f"{size}: {name}: {summary.words()} in {seconds:.1f}s")
        row["checks"] = pull_checks(args, studies, project, lines, workdir, database_url,
                                    settings)
        row["checks"].update(logs_checks("pull", studies, logged))
        # idempotent: the second pull finds every study here and downloads nothing
        row["checks"]["pull_again_fetched_nothing"] = (
            row["pull_again"]["studies_pulled"] == 0
            and row["pull_again"]["already_here"] == size)

        # 4. every scan labeled with its study's class, then the push and a push with nothing new
        by_key = {pacs_study_key(s["study"], settings.DEID_SALT): s for s in studies}
        classes = {}
        for scan in Scan.objects.filter(project=project).order_by("pk"):
            label = by_key[scan.study_key]["label"]
            if label not in classes:
                classes[label], _ = services.label_class_get_or_create(project=project,
                                                                       name=label)
            services.annotation_create(scan=scan, reader=reader, label_class=classes[label])
        logged = []
        for name in ("push", "push_again"):
            seconds_by = Counter()
            with CapturedLogs() as captured, timed_functions(
                    seconds_by, (pacs, "scan_results"), (pacs, "structured_report"),
                    (linkage, "linkage_read")):
                started = time.perf_counter()
                summary = pacs.pacs_push(project=project, url=orthanc.dicomweb,
                                         client=TimedClient(pacs.client_for(orthanc.dicomweb),
                                                            seconds_by))
                seconds = time.perf_counter() - started
            logged += captured.records
            parts = {"results": seconds_by["scan_results"],
                     "linkage": seconds_by["linkage_read"],
                     "build_sr": seconds_by["structured_report"],
                     "stow": seconds_by["store_instances"]}
            parts["other"] = seconds - sum(parts.values())
            row[name] = {"seconds": round(seconds, 3), "summary": summary.words(),
                         "candidates": summary.candidates, "sent": summary.sent,
                         "unchanged": summary.unchanged, "no_result": summary.no_result,
                         "no_linkage": summary.no_linkage, "errors": summary.errors[:5],
                         "reports_per_s": _rate(summary.sent, seconds),
                         "phases_s": {k: round(v, 3) for k, v in parts.items()}}
            log(f"{size}: {name}: {summary.words()} in {seconds:.1f}s")
        row["checks"].update(push_checks(studies, project, orthanc, n_instances, args,
                                         settings))
        row["checks"].update(logs_checks("push", studies, logged))
        row["checks"]["push_again_sent_nothing"] = row["push_again"]["sent"] == 0
        # 5. the next scheduled pull, with the reports now in the studies: nothing fetched
        with CapturedLogs() as captured:
            started = time.perf_counter()
            summary = pacs.pacs_pull(project=project, url=orthanc.dicomweb, log=lines.append)
            seconds = time.perf_counter() - started
        row["pull_after_push"] = {"seconds": round(seconds, 3), "summary": summary.words(),
                                  "studies_pulled": summary.studies_pulled,
                                  "already_here": summary.studies_already_here}
        log(f"{size}: pull_after_push: {summary.words()} in {seconds:.1f}s")
        row["checks"]["pull_after_push_fetched_nothing"] = (
            summary.studies_pulled == 0 and summary.studies_already_here == size)
        row["checks"].update(logs_checks("pull_after_push", studies, captured.records))
        row["checks"]["linkages"] = DicomLinkage.objects.filter(scan__project=project).count()
        row["checks"]["reports_recorded"] = PacsReport.objects.filter(
            scan__project=project).count()
        failed = [k for k, v in row["checks"].items() if v is False]
        row["checks"]["ok"] = not failed
        if failed:
            log(f"{size}: CHECKS FAILED: {failed}")
    finally:
        orthanc.stop()
        shutil.rmtree(workdir / f"orthanc-{size}", ignore_errors=True)
    return row


def pacs_study_key(study_uid: str, salt: str) -> str:
    from ml_backend.data.deid import study_pseudonym

    return study_pseudonym(study_uid, salt=salt)


def expected_scans(args, studies) -> int:
    per_study = 1 if args.grouping == "series" else args.instances
    return per_study * len(studies)


def identifiers_of(studies) -> set[str]:
    """What must never reach our side, searched as text: names, IDs, accession and study
    numbers, addresses, telephones, the institution, the original UIDs. (Dates are checked
    as attributes of the stored files: eight digits turn up in random bytes now and then.)"""
    found = set()
    for study in studies:
        identity = study["identity"]
        found |= {identity[k] for k in ("PatientName", "PatientID", "IssuerOfPatientID",
                                        "OtherPatientIDs", "PatientAddress",
                                        "PatientTelephoneNumbers", "AccessionNumber", "StudyID",
                                        "InstitutionName", "ReferringPhysicianName",
                                        "OperatorsName", "StationName")}
        found |= {study["study"], study["series"], *study["sops"]}
    return found


def pull_checks(args, studies, project, lines, workdir: Path, database_url: str,
                settings) -> dict:
    import pydicom

    from annotator.models import DicomLinkage, ImportJob, Scan
    from ml_backend.data.deid import PHI_KEYWORDS

    checks: dict = {}
    scans = list(Scan.objects.filter(project=project))
    per_study = Counter(s.study_key for s in scans)
    keys = {pacs_study_key(s["study"], settings.DEID_SALT) for s in studies}
    want = 1 if args.grouping == "series" else args.instances
    checks["scans"] = len(scans)
    checks["every_study_once"] = (set(per_study) == keys
                                  and all(n == want for n in per_study.values())
                                  and len(scans) == expected_scans(args, studies))
    jobs = ImportJob.objects.filter(project=project)
    checks["import_jobs_succeeded"] = all(j.status == "succeeded" for j in jobs)
    checks["one_import_job_per_study"] = jobs.count() == len(studies)
    checks["linkage_per_scan"] = DicomLinkage.objects.filter(
        scan__project=project).count() == len(scans)
    checks["incoming_empty"] = not list((workdir / "incoming").glob("pacs-*"))

    identifiers = identifiers_of(studies)
    dump = subprocess.run(["pg_dump", "--data-only", database_url], capture_output=True,
                          check=True).stdout.decode("utf-8", "replace")
    leaks = sorted(i for i in identifiers if i in dump)
    checks["db_identifiers_found"] = len(leaks)
    # the dump is of this project's rows: every study's pseudonymous key is in it
    checks["db_dump_has_the_scans"] = all(key in dump for key in keys)
    checks["db_clean"] = not leaks
    text = "\n".join(lines)
    checks["pull_output_clean"] = not [i for i in identifiers if i in text]
    originals: dict[str, set[str]] = {}          # keyword -> the values the headers held
    for study in studies:
        identity = study["identity"]
        written = {**identity, "StudyInstanceUID": study["study"],
                   "SeriesInstanceUID": study["series"]}
        for prefix in ("Series", "Acquisition", "Content"):
            written[f"{prefix}Date"] = identity["StudyDate"]
            written[f"{prefix}Time"] = identity["StudyTime"]
        for keyword, value in written.items():
            originals.setdefault(keyword, set()).add(value)
        originals.setdefault("SOPInstanceUID", set()).update(study["sops"])
    kept, byte_leaks, read = Counter(), 0, 0
    media = Path(settings.MEDIA_ROOT)
    for path in media.rglob("*"):
        if not path.is_file():
            continue
        data = path.read_bytes()
        read += 1
        byte_leaks += any(i.encode() in data for i in identifiers)
    checks["stored_files_read"] = read
    for scan in scans:
        ds = pydicom.dcmread(scan.file.path, stop_before_pixels=True)
        for keyword in PHI_KEYWORDS:
            value = ds.get(keyword)
            if value not in (None, "") and str(value) in originals.get(keyword, ()):
                kept[keyword] += 1
    checks["stored_files_with_identifiers"] = byte_leaks
    checks["phi_attributes_kept"] = dict(kept)
    checks["files_clean"] = byte_leaks == 0 and not kept and read >= len(scans)
    return checks


def logs_checks(step: str, studies, records: list[str]) -> dict:
    """Whether any log record of ``step`` (at the product's default level, INFO) carried an
    identifier of the headers: the loggers that did and how often (never the values)."""
    identifiers = identifiers_of(studies)
    leaks = Counter(record.split(":", 1)[0] for record in records
                    if any(i in record for i in identifiers))
    return {f"{step}_log_records": len(records),
            f"{step}_log_records_with_identifiers": dict(leaks),
            f"{step}_logs_clean": not leaks}


def push_checks(studies, project, orthanc, n_instances: int, args, settings) -> dict:
    """The reports as Orthanc holds them: one per scan, each in its original study of its
    original patient, each SOP instance UID the product recorded."""
    from annotator.models import PacsReport

    checks: dict = {}
    sent = set(PacsReport.objects.filter(scan__project=project)
                         .values_list("sop_instance_uid", flat=True))
    series = orthanc.post("/tools/find", {"Level": "Series", "Query": {"Modality": "SR"},
                                          "Expand": True})
    by_study = {s["study"]: s for s in studies}
    held, misplaced, per_study = set(), 0, Counter()
    for one in series:
        parent = orthanc.get(f"/studies/{one['ParentStudy']}")
        uid = parent["MainDicomTags"]["StudyInstanceUID"]
        patient = parent["PatientMainDicomTags"].get("PatientID")
        study = by_study.get(uid)
        for instance in one["Instances"]:
            tags = orthanc.get(f"/instances/{instance}")["MainDicomTags"]
            held.add(tags["SOPInstanceUID"])
            per_study[uid] += 1
            misplaced += study is None or patient != study["identity"]["PatientID"]
    want = 1 if args.grouping == "series" else args.instances
    checks["reports_in_orthanc"] = len(held)
    checks["reports_all_present"] = sent == held and len(sent) == expected_scans(args, studies)
    checks["reports_in_original_study"] = misplaced == 0 and all(
        per_study[s["study"]] == want for s in studies)
    checks["orthanc_instances_after_push"] = orthanc.get("/statistics")["CountInstances"]
    return checks


# --- the table ------------------------------------------------------------------------------


ROWS = (
    ("instances (MB)", lambda r: f"{r['instances']:,} ({r['mb']:g} MB)"),
    ("Orthanc ingest, instances/s (REST, one POST each)",
     lambda r: f"{r['orthanc_ingest']['instances_per_s']:.1f}"),
    ("pull: wall s", lambda r: f"{r['pull']['seconds']:.1f}"),
    ("pull: studies/s", lambda r: f"{r['pull']['studies_per_s']:.1f}"),
    ("pull: instances/s", lambda r: f"{r['pull']['instances_per_s']:.1f}"),
    ("pull: QIDO-RS / WADO-RS / import / rest s",
     lambda r: " / ".join(f"{r['pull']['phases_s'][k]:.2f}"
                          for k in ("qido", "wado", "import", "other"))),
    ("pull: resident memory, MB at the start → peak (rise)",
     lambda r: "{rss_start_mb:.0f} → {rss_peak_mb:.0f} (+{rss_rise_mb:.0f})".format(
         **r["pull"]["memory"])),
    ("pull again (nothing new): wall s", lambda r: f"{r['pull_again']['seconds']:.2f}"),
    ("push: reports/s", lambda r: f"{r['push']['reports_per_s']:.1f}"),
    ("push: results / linkage / SR build / STOW-RS / rest s",
     lambda r: " / ".join(f"{r['push']['phases_s'][k]:.2f}"
                          for k in ("results", "linkage", "build_sr", "stow", "other"))),
    ("push again (nothing changed): wall s", lambda r: f"{r['push_again']['seconds']:.2f}"),
    ("pull after the push (its reports in the studies): wall s",
     lambda r: f"{r['pull_after_push']['seconds']:.2f}" if "pull_after_push" in r else "–"),
    ("checks", lambda r: "all hold" if r["checks"].get("ok") else
     "FAILED: " + ", ".join(k for k, v in r["checks"].items() if v is False and k != "ok")),
)


def table(payload: dict) -> str:
    """The docs' table of a result (``--table FILE`` reads it from the JSON)."""
    rows = payload["rows"]
    lines = ["| | " + " | ".join(f"{r['studies']:,} studies" for r in rows) + " |",
             "|---|" + "---:|" * len(rows)]
    for name, read in ROWS:
        cells = []
        for r in rows:
            try:
                cells.append(read(r))
            except (KeyError, TypeError, ValueError):
                cells.append("–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------


def _database(url_base: str, name: str, *, drop_only: bool = False) -> str:
    import psycopg

    with psycopg.connect(f"{url_base}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if not drop_only:
            conn.execute(f'CREATE DATABASE "{name}"')
    return f"{url_base}/{name}"


def machine() -> dict:
    import dicomweb_client
    import pydicom

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "pydicom": pydicom.__version__,
            "dicomweb_client": dicomweb_client.__version__,
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "note": "Orthanc, PostgreSQL and the product share this machine"}


def main(argv=None) -> int:
    argv = list(argv if argv is not None else sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", default="50,200", help="sizes, e.g. 50,200 (smoke: 10)")
    parser.add_argument("--source", default="../shared/data/pneumoniamnist/pneumoniamnist.npz"
                        "#train", help="real scans the instances are made of (read_source)")
    parser.add_argument("--instances", type=int, default=1, help="instances per study")
    parser.add_argument("--modality", default="CR", choices=sorted(SOP_CLASSES))
    parser.add_argument("--body-part", default="CHEST")
    parser.add_argument("--side", type=int, default=0,
                        help="resize each scan to this side in px (0: as the source has it)")
    parser.add_argument("--grouping", default="image", choices=("image", "series"),
                        help="the project's DICOM grouping (series: a study is one scan)")
    parser.add_argument("--orthanc-config", default="{}", metavar="JSON",
                        help='added to Orthanc\'s configuration, e.g. \'{"LimitFindResults": '
                        '100}\' for a PACS that caps its query answers')
    add_site_options(parser, database_name=DATABASE_NAME, broker="redis://127.0.0.1:6379/13")
    args = parser.parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return 0
    sizes = sorted(int(s) for s in args.studies.split(","))
    if args.instances < 1 or min(sizes) < 1:
        parser.error("--studies and --instances take positive numbers")

    from bench.scale import bench_env

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="pacs-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    database_url = _database(args.database, DATABASE_NAME)
    env = bench_env(database_url, args.broker, workdir, "pacs",
                    LINKAGE_KEY="bench-pacs-linkage-key-" + "0123456789abcdef" * 2)
    os.environ.update(env)
    import redis

    broker = redis.Redis.from_url(args.broker)
    log = lambda text: print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)  # noqa: E731
    command = "python -m bench.pacs_throughput " + shlex.join(argv)
    result = {"command": command, "args": vars(args), "machine": machine(), "rows": []}
    try:
        broker.flushdb()
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        # the libraries the pull and the push load on first use (about a second on these
        # cores): loaded here, so the first size's timings are not a process's start-up
        import dicomweb_client.api  # noqa: F401
        from pydicom.uid import generate_uid

        from annotator import pacs

        pacs.structured_report(                    # highdicom's first report builds its tables
            {"SOPClassUID": SOP_CLASSES["CR"], "SOPInstanceUID": generate_uid(),
             "StudyInstanceUID": generate_uid(), "Modality": "CR"},
            {"codes": [("warm", "warm")], "role": "reader"}, suggestion=None,
            model_version="", series_uid=generate_uid())
        images = SourceImages(args.source)
        labels = images.labels
        classes = Counter(labels)
        per_class = -(-sum(sizes) // len(classes)) * args.instances
        if per_class > min(classes.values()):
            log(f"note: {per_class} scans of each class wanted, the smallest class has "
                f"{min(classes.values())}: scans are used again, and the import counts them as "
                "duplicates (the checks then fail)")
        start = 0
        for size in sizes:
            result["rows"].append(run_size(args, size, start, images, labels, workdir,
                                           database_url, log))
            start += size
            _write(args, result)
        print(table(result))
    finally:
        from django.db import connections

        connections.close_all()
        _database(args.database, DATABASE_NAME, drop_only=True)
        broker.flushdb()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if all(r["checks"].get("ok") for r in result["rows"]) else 1


def _write(args, result: dict) -> None:
    write_result(args.out, result)


if __name__ == "__main__":
    sys.exit(main())
