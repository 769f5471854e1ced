"""A PACS, in: find studies with QIDO-RS and retrieve them with WADO-RS (``dicomweb-client``),
then import them exactly like a folder (de-identified at ingest by the same pipeline).

The retrieved instances wait in ``INCOMING_ROOT`` (like a browser upload) only until their
import has run, and are deleted then, whatever happened. Study UIDs live in memory only:
what is stored is the study's pseudonymous key (``Scan.study_key``), which is also how a
second pull recognises a study it already has (idempotent: nothing is downloaded twice
unless the PACS holds more instances of it than we do).

Credentials come from the environment (``PACS_USERNAME`` / ``PACS_PASSWORD``, HTTP Basic), never
from the command line.
"""

from __future__ import annotations

import logging
import tempfile
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings
from pydicom.datadict import dictionary_has_tag, keyword_for_tag, tag_for_keyword

from annotator.models import ImportJob, Project, Scan

logger = logging.getLogger(__name__)

STUDY_UID = "0020000D"
STUDY_INSTANCES = "00201208"
MODALITIES_IN_STUDY = "00080061"
MODALITY = "00080060"
SERIES_INSTANCES = "00201209"
# series that hold no image to import: reports (our own pushed results among them), key
# object selections, presentation states, encapsulated documents
NOT_IMAGES = frozenset({"SR", "KO", "PR", "DOC", "RWV", "AU"})


class PacsError(Exception):
    """The PACS cannot be queried or read; ``str(exc)`` says why in words."""


@dataclass
class PullSummary:
    studies_found: int = 0
    studies_pulled: int = 0
    studies_already_here: int = 0
    instances_retrieved: int = 0
    jobs: list[int] = field(default_factory=list)
    imported: int = 0
    duplicates: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    def words(self) -> str:
        text = (f"{self.studies_found} stud{'y' if self.studies_found == 1 else 'ies'} found, "
                f"{self.studies_pulled} pulled ({self.instances_retrieved} instances), "
                f"{self.studies_already_here} already here; {self.imported} scans imported, "
                f"{self.duplicates} duplicates, {self.failed} failed")
        return text + (f"; errors: {'; '.join(self.errors[:3])}" if self.errors else "")


def command_target(project_name: str, url: str | None) -> tuple[Project, str]:
    """The project and DICOMweb URL a ``pacs_pull`` / ``pacs_push`` names (``--dicomweb`` or
    PACS_DICOMWEB_URL); PacsError in words when either is missing."""
    url = url or settings.PACS_DICOMWEB_URL
    if not url:
        raise PacsError("no DICOMweb server: pass --dicomweb URL or set PACS_DICOMWEB_URL")
    project = Project.objects.filter(name=project_name).first()
    if project is None:
        raise PacsError(f"no project named {project_name!r}")
    return project, url


EMPTY_QUERY = ("the query is empty: give study filters such as 'Modality=CR', or leave the "
               "query out (no --query; PACS_PULL_QUERY unset) to pull every study")


# QIDO-RS's own request options (PS3.18 8.3.4): not filters; the pull sets what it needs.
QIDO_OPTIONS = ("limit", "offset", "includefield", "fuzzymatching")


def parse_query(query: str | None) -> dict[str, str]:
    """``"Modality=CR&StudyDate=20240101-20241231"`` → QIDO-RS study search filters. Keys are
    DICOM keywords or tags (pydicom's data dictionary; ``Modality`` is asked as
    ``ModalitiesInStudy``); a value may be a range or a wildcard, as QIDO-RS allows.

    ``None`` (no query given) asks for every study. A query that is given must say what it
    filters: an empty or blank one (an unset shell variable), a key without a value
    (``Modality=``), a key that is not a DICOM keyword (``Modalty``) and a key given twice
    (``Modality=CR&Modality=MR``, where only the last would count) are refused with a
    PacsError that names them, never sent as a wider query than was meant."""
    if query is None:
        return {}
    if not query.strip():
        raise PacsError(EMPTY_QUERY)
    filters: dict[str, str] = {}
    asked: dict[str, str] = {}          # the attribute each filter asks for → the key given
    problems = []
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True,
                                             strict_parsing=False):
        key, value = key.strip(), value.strip()
        if not key:
            problems.append(f"a filter has no key (={value[:40]!r})")
            continue
        if len(key) == 8 and all(c in "0123456789abcdefABCDEF" for c in key) \
                and dictionary_has_tag(int(key, 16)):
            keyword = keyword_for_tag(int(key, 16)) or key
        elif key.isidentifier() and tag_for_keyword(key) is not None:
            keyword = key
        elif key.lower() in QIDO_OPTIONS:
            problems.append(f"{key!r} is a QIDO-RS option, not a study filter"
                            + (" (use --limit)" if key.lower() in ("limit", "offset") else ""))
            continue
        else:
            problems.append(f"query key {key[:40]!r} is not a DICOM keyword or tag")
            continue
        if not value:
            problems.append(f"{key} has no value")
            continue
        # a study-level query: "Modality" means the study holds a series of that modality
        keyword = "ModalitiesInStudy" if keyword == "Modality" else keyword
        if keyword in asked:
            problems.append(f"{key} is given twice (only the last would count): name each key "
                            "once" if asked[keyword] == key else
                            f"{asked[keyword]} and {key} ask for the same attribute: name it once")
            continue
        asked[keyword] = key
        filters[keyword] = value      # a tag number is sent as its keyword
    if problems:
        raise PacsError(f"query {query[:200]!r} refused: {'; '.join(problems)}")
    if not filters:
        raise PacsError(EMPTY_QUERY)
    return filters


PACS_TIMEOUT = (5, 30)     # seconds: to connect, and between two reads of an answer
PACS_ATTEMPTS = 3


def client_for(url: str):
    """A DICOMweb client for ``url`` with the environment's credentials (if any)."""
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session_from_auth
    from requests.auth import HTTPBasicAuth

    if not url.startswith(("http://", "https://")):
        raise PacsError(f"{url[:80]!r} is not a DICOMweb URL (http:// or https://…/dicom-web)")
    user, password = settings.PACS_USERNAME, settings.PACS_PASSWORD
    session = create_session_from_auth(HTTPBasicAuth(user, password)) if user else None
    client = DICOMwebClient(url=url.rstrip("/"), session=session, timeout=PACS_TIMEOUT)
    # dicomweb-client retries any failed request 5 times, waiting 2, 4, 8 and 16 s: a PACS
    # that refuses the connection took 30 s to say so. A busy one (429/503) still gets two
    # more tries, 0.5 and 1 s apart.
    client.set_http_retry_params(retry=True, max_attempts=PACS_ATTEMPTS,
                                 wait_exponential_multiplier=250)
    return client


def _value(result: dict, tag: str):
    values = (result.get(tag) or {}).get("Value") or []
    return values[0] if values else None


QIDO_PAGE = 500       # studies asked for per QIDO-RS request; the server may answer fewer


def find_studies(client, filters: dict, *, limit: int | None = None) -> list[dict]:
    """Every study matching ``filters`` (at most ``limit``), asked for a page at a time
    (QIDO-RS ``limit`` / ``offset``): a PACS that answers at most N per request (most cap
    their answers) is asked again from where it stopped, until it answers nothing new. A
    server that ignores ``offset`` (the same page again) ends the search rather than
    looping. A PACS that caps the whole search (Orthanc's ``LimitFindResults``) cannot be
    paged past its cap: narrow the query (README "PACS")."""
    found, seen, offset = [], set(), 0
    while limit is None or len(found) < limit:
        ask = QIDO_PAGE if limit is None else min(QIDO_PAGE, limit - len(found))
        page = client.search_for_studies(search_filters=filters, limit=ask, offset=offset,
                                         fields=[STUDY_INSTANCES, MODALITIES_IN_STUDY])
        new = [study for study in page if _value(study, STUDY_UID) not in seen]
        if not new:
            if page and len(page) >= ask:
                logger.warning(
                    "the PACS answered the same studies again at offset %d: it ignores "
                    "QIDO-RS offset, so only the first %d studies were found; narrow the "
                    "query (StudyDate ranges) to reach the others", offset, len(found))
            break
        seen.update(_value(study, STUDY_UID) for study in new)
        found.extend(new)
        offset += len(page)
    return found if limit is None else found[:limit]


def images_held(client, study_uid: str, *, fallback: int) -> int:
    """How many of a study's instances on the PACS are images (series of any modality but
    ``NOT_IMAGES``), asked per series; ``fallback`` where the PACS will not say."""
    from requests.exceptions import RequestException

    try:
        series = client.search_for_series(study_uid, fields=[MODALITY, SERIES_INSTANCES])
    except (RequestException, OSError, ValueError):
        return fallback
    total = 0
    for row in series:
        count = _value(row, SERIES_INSTANCES)
        if count is None:
            return fallback
        if str(_value(row, MODALITY) or "").upper() not in NOT_IMAGES:
            total += int(count)
    return total


def instances_here(project: Project, study_key: str) -> int:
    """How many of a study's DICOM instances the project's scans hold: one per scan, or one
    per slice of a series imported as one scan (its ``slices``)."""
    return sum(len(slices) if isinstance(slices, list) and slices else 1
               for slices in Scan.objects.filter(project=project, study_key=study_key)
               .values_list("slices", flat=True))


def pacs_pull(*, project: Project, url: str, query: str | None = None, dataset_name: str = "",
              split: str = "pool", created_by=None, limit: int | None = None,
              log: Callable[[str], None] = lambda line: None, client=None) -> PullSummary:
    """Find the studies matching ``query`` on the DICOMweb server at ``url`` and import
    every study not already here, one import job per study (so each has its report).
    ``query=None`` asks for every study; a given query is checked first (``parse_query``)."""
    from requests.exceptions import RequestException

    from annotator import services
    from ml_backend.data.deid import study_pseudonym

    services.parse_split(split)                      # a bad split is refused first
    filters = parse_query(query)
    client = client or client_for(url)
    summary = PullSummary()
    try:
        studies = find_studies(client, filters, limit=limit)
    except (RequestException, OSError, ValueError) as exc:
        raise PacsError(f"the PACS at {url} did not answer the study query "
                        f"({type(exc).__name__}: {str(exc)[:200]})") from None
    summary.studies_found = len(studies)
    log(f"{len(studies)} {'study matches' if len(studies) == 1 else 'studies match'} "
        f"{filters or 'everything'}")
    dataset_name = dataset_name or f"PACS {urllib.parse.urlsplit(url).hostname or 'pull'}"
    refusal = services.dataset_name_refusal(dataset_name)   # before any study is retrieved
    if refusal is not None:
        raise PacsError(refusal)
    for number, study in enumerate(studies, start=1):
        uid = _value(study, STUDY_UID)
        if not uid:
            continue
        key = study_pseudonym(str(uid), salt=settings.DEID_SALT)
        have = instances_here(project, key)
        held = _value(study, STUDY_INSTANCES)
        if have and held is not None and have < int(held):
            # more instances there than scans here: are the others images, or reports
            # (the results pushed back into this study, a radiologist's SR)?
            held = images_held(client, str(uid), fallback=int(held))
        if have and (held is None or have >= int(held)):
            summary.studies_already_here += 1
            log(f"study {number}/{len(studies)}: already here ({have} scans)")
            continue
        Path(settings.INCOMING_ROOT).mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="pacs-", dir=settings.INCOMING_ROOT))
        retrieved = 0
        try:
            # streamed (chunked WADO-RS, one instance decoded at a time and written out):
            # a CT study of a thousand slices never sits in memory whole
            for instance in client.iter_study(str(uid)):
                instance.save_as(folder / f"{retrieved:06d}.dcm", enforce_file_format=True)
                retrieved += 1
        except (RequestException, OSError, ValueError) as exc:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
            summary.errors.append(f"study {number}: could not be retrieved "
                                  f"({type(exc).__name__})")
            log(summary.errors[-1])
            continue
        summary.instances_retrieved += retrieved
        job = services.import_job_create(project=project, source=str(folder),
                                         dataset_name=dataset_name, split=split, layout="flat",
                                         created_by=created_by, source_is_upload=True)
        job = services.import_job_run(job_id=job.pk) or ImportJob.objects.get(pk=job.pk)
        summary.studies_pulled += 1
        summary.jobs.append(job.pk)
        summary.imported += job.imported
        summary.duplicates += job.duplicates
        summary.failed += job.failed
        log(f"study {number}/{len(studies)}: {retrieved} instances → import #{job.pk}: "
            f"{job.imported} imported, {job.duplicates} duplicates, {job.failed} failed")
    return summary


# --- a PACS, out: results as DICOM structured reports ---------------------------------------

@dataclass
class PushSummary:
    candidates: int = 0
    sent: int = 0
    unchanged: int = 0
    no_linkage: int = 0
    no_result: int = 0
    errors: list[str] = field(default_factory=list)

    def words(self) -> str:
        text = (f"{self.sent} report(s) sent, {self.unchanged} unchanged since the last push, "
                f"{self.no_result} scan(s) without a result yet, {self.no_linkage} without a "
                "linkage (imported before LINKAGE_KEY was set, or not DICOM)")
        return text + (f"; errors: {'; '.join(self.errors[:3])}" if self.errors else "")


def scan_results(project: Project) -> dict[int, dict]:
    """Each scan's result as the project stands: ``{scan id: {"result": words, "codes":
    [(code, meaning)], "role": reader role}}``, from the label export's rows (the same rules
    as training: the adjudication, else the readers' majority; for a findings set the
    findings present, "no finding" when every finding read is absent). Scans with no settled
    result are left out; roles, never names."""
    from annotator.exports import label_rows
    from annotator.models import Annotation, Membership

    roles = dict(Membership.objects.filter(project=project).values_list("user__username",
                                                                        "role"))
    results = {}
    for row in label_rows(project):
        if row["kind"] == "class":
            words, codes = row["label"], [(row["label"], row["label"])]
        else:
            present = [name for name, state in row["findings"].items() if state == "present"]
            if present:
                words, codes = ", ".join(present), [(n, n) for n in present]
            elif all(state == "absent" for state in row["findings"].values()):
                words, codes = "no finding", [("no_finding", "No finding")]
            else:
                continue                    # only uncertain findings: nothing settled
        readers = {"import" if a["source"] == Annotation.Source.IMPORT
                   else roles.get(a["reader"], "reader") for a in row["answers"]
                   if a["outcome"] in Annotation.LABELLING
                   and a["source"] != Annotation.Source.ADJUDICATION}
        results[row["scan"]] = {"result": words, "codes": codes, "role": (
            "reviewer (adjudicated)" if row["adjudicated"]
            else " and ".join(sorted(readers or {"reader"})))}
    return results


def structured_report(identifiers: dict, result: dict, *, suggestion: tuple | None,
                      model_version: str, series_uid: str):
    """A DICOM Comprehensive SR (``highdicom``) for one scan, filed in the original study of
    the original patient: the result and who settled it (a role, never a name), the model's
    suggestion and confidence and its version, and a reference to the image it is about."""
    import highdicom as hd
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    evidence = Dataset()
    for keyword in ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate",
                    "PatientSex", "StudyInstanceUID", "StudyID", "StudyDate", "StudyTime",
                    "AccessionNumber", "ReferringPhysicianName", "SeriesInstanceUID",
                    "SOPInstanceUID", "SOPClassUID", "Modality"):
        setattr(evidence, keyword, identifiers.get(keyword, ""))
    ours = "99MEDLABEL"
    items = [hd.sr.CodeContentItem(
        name=hd.sr.CodedConcept("121071", "DCM", "Finding"),
        value=hd.sr.CodedConcept(code[:16], ours, meaning[:64]),
        relationship_type="CONTAINS") for code, meaning in result["codes"]]
    items.append(hd.sr.TextContentItem(
        name=hd.sr.CodedConcept("READROLE", ours, "Reader role"), value=result["role"],
        relationship_type="CONTAINS"))
    if suggestion is not None:
        name, confidence = suggestion
        items.append(hd.sr.TextContentItem(
            name=hd.sr.CodedConcept("MLSUGGEST", ours, "Model suggestion"), value=name,
            relationship_type="CONTAINS"))
        items.append(hd.sr.NumContentItem(
            name=hd.sr.CodedConcept("MLCONF", ours, "Model confidence"),
            value=round(float(confidence), 4),
            unit=hd.sr.CodedConcept("1", "UCUM", "no units"), relationship_type="CONTAINS"))
    if model_version:
        items.append(hd.sr.TextContentItem(
            name=hd.sr.CodedConcept("111001", "DCM", "Algorithm Name"),
            value="MedLabel (SimCLRv2 encoder, active-learning classifier)",
            relationship_type="CONTAINS"))
        items.append(hd.sr.TextContentItem(
            name=hd.sr.CodedConcept("111003", "DCM", "Algorithm Version"), value=model_version,
            relationship_type="CONTAINS"))
    if identifiers.get("SOPInstanceUID") and identifiers.get("SOPClassUID"):
        items.append(hd.sr.CompositeContentItem(
            name=hd.sr.CodedConcept("260753009", "SCT", "Source"),
            referenced_sop_class_uid=identifiers["SOPClassUID"],
            referenced_sop_instance_uid=identifiers["SOPInstanceUID"],
            relationship_type="CONTAINS"))
    root = hd.sr.ContainerContentItem(
        name=hd.sr.CodedConcept("18748-4", "LN", "Diagnostic imaging report"), template_id=None)
    root.ContentSequence = items
    return hd.sr.ComprehensiveSR(
        evidence=[evidence], content=root, series_instance_uid=series_uid, series_number=990,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="MedLabel",
        series_description="MedLabel results", is_complete=True, is_final=False)


def pacs_push(*, project: Project, url: str, client=None,
              log: Callable[[str], None] = lambda line: None) -> PushSummary:
    """Send each scan's result to the PACS as a structured report in its original study
    (STOW-RS), once per result: a scan whose result or model version has not changed since
    its last report is not sent again."""
    from pydicom.uid import generate_uid
    from requests.exceptions import RequestException

    from annotator.linkage import LinkageError, linkage_enabled, linkage_read
    from annotator.models import PacsReport

    if not linkage_enabled():
        raise PacsError("LINKAGE_KEY is not set: without the honest-broker linkage the "
                        "original studies are unknown, so no report can be sent back")
    client = client or client_for(url)
    model = project.active_model
    version = model.version if model is not None else ""
    suggestions = {}
    if model is not None:
        from ml_backend.models import Prediction

        suggestions = {scan_id: (name, conf) for scan_id, name, conf in Prediction.objects
                       .filter(model_version=model).values_list(
                           "scan_id", "predicted_class__name", "confidence")}
    results = scan_results(project)
    summary = PushSummary()
    series_per_study: dict[str, str] = {}
    scans = Scan.objects.filter(project=project, file_format="dicom", quarantined=False)
    for scan in scans.order_by("pk"):
        summary.candidates += 1
        result = results.get(scan.pk)
        if result is None:
            summary.no_result += 1
            continue
        last = PacsReport.objects.filter(scan=scan).first()
        if last is not None and last.result == result["result"][:400] and \
                last.model_version == version:
            summary.unchanged += 1
            continue
        try:
            identifiers = linkage_read(scan)
        except LinkageError as exc:
            summary.no_linkage += 1
            if "another key" in str(exc):
                summary.errors.append(str(exc))
            continue
        study = identifiers.get("StudyInstanceUID", "")
        series_uid = series_per_study.setdefault(study, generate_uid())
        report = structured_report(identifiers, result, suggestion=suggestions.get(scan.pk),
                                   model_version=version, series_uid=series_uid)
        try:
            client.store_instances(datasets=[report])
        except (RequestException, OSError, ValueError) as exc:
            summary.errors.append(f"scan {scan.pk}: the PACS refused the report "
                                  f"({type(exc).__name__})")
            continue
        PacsReport.objects.create(scan=scan, result=result["result"][:400],
                                  model_version=version,
                                  sop_instance_uid=str(report.SOPInstanceUID))
        summary.sent += 1
        log(f"scan {scan.pk}: {result['result']} ({result['role']}) sent")
    return summary
