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

import datetime
import logging
import re
import shutil
import socket
import tempfile
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings
from pydicom.datadict import (
    dictionary_has_tag, dictionary_VR, keyword_for_tag, tag_for_keyword,
)

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
    not_images: int = 0       # reports, key objects, presentation states, documents
    errors: list[str] = field(default_factory=list)

    def words(self) -> str:
        text = (f"{self.studies_found} stud{'y' if self.studies_found == 1 else 'ies'} found, "
                f"{self.studies_pulled} pulled ({self.instances_retrieved} instances), "
                f"{self.studies_already_here} already here; {self.imported} scans imported, "
                f"{self.duplicates} duplicates, {self.failed} failed"
                + (f"; {self.not_images} non-image instance(s) (reports, key objects, "
                   "presentation states, documents) not imported" if self.not_images else ""))
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
        problem = _date_problem(keyword, value)
        if problem:
            problems.append(f"{key}={value[:40]!r}: {problem}")
            continue
        filters[keyword] = value      # a tag number is sent as its keyword
    if problems:
        raise PacsError(f"query {query[:200]!r} refused: {'; '.join(problems)}")
    if not filters:
        raise PacsError(EMPTY_QUERY)
    return filters


_DA = re.compile(r"([0-9]{4})([0-9]{2})([0-9]{2})")
_TM = re.compile(r"([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:\.[0-9]{1,6})?)?)?")
_DT = re.compile(r"([0-9]{4})(?:([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})"
                 r"(?:\.[0-9]{1,6})?)?)?)?)?)?(?:[+-](?:[01][0-9]|2[0-3])[0-5][0-9])?")
_DATE_WORDS = {"DA": "a date as YYYYMMDD", "TM": "a time as HHMMSS (HH, HHMM also)",
               "DT": "a date and time as YYYYMMDDHHMMSS (a prefix such as YYYYMMDD also)"}


def _date_problem(keyword: str, value: str) -> str | None:
    """Why a date, time or date-time filter (``StudyDate=20240101-20241231``) is not one a
    PACS reads as meant, or None. DICOM writes dates without dashes and ranges with one
    (PS3.4 C.2.2.2.5): an ISO date, a 30 February or a reversed range would be refused,
    match nothing or be ignored, depending on the PACS."""
    try:
        vr = dictionary_VR(keyword)
    except KeyError:
        return None
    if vr not in _DATE_WORDS:
        return None
    ends = value.split("-") if vr != "DT" else _dt_range(value)
    if ends is None or len(ends) > 2 or not any(ends):
        return f"not {_DATE_WORDS[vr]} or a range of them (A-B, A-, -B)"
    for end in ends:
        if end and not _valid_moment(vr, end):
            return f"{end[:40]!r} is not {_DATE_WORDS[vr]}"
    if len(ends) == 2 and all(ends) and _sortable(vr, ends[0]) > _sortable(vr, ends[1]):
        return "the range ends before it starts"
    return None


def _dt_range(value: str) -> list[str] | None:
    """A DT range splits at the dash that is not part of a -HHMM offset (one value that
    reads whole, offset and all, is one value)."""
    if _DT.fullmatch(value):
        return [value]
    for at in range(len(value) + 1):
        if at == len(value) or value[at] == "-":
            first, rest = value[:at], value[at + 1:]
            if (not first or _DT.fullmatch(first)) and (not rest or _DT.fullmatch(rest)):
                return [first, rest] if at < len(value) else [first]
    return None


def _valid_moment(vr: str, text: str) -> bool:
    if vr == "TM":
        match = _TM.fullmatch(text)
        return bool(match) and int(match[1]) < 24 and int(match[2] or 0) < 60 \
            and int(match[3] or 0) < 61
    match = (_DA if vr == "DA" else _DT).fullmatch(text)
    if not match:
        return False
    if vr == "DT" and not (int(match[4] or 0) < 24 and int(match[5] or 0) < 60
                           and int(match[6] or 0) < 61):
        return False
    try:     # a real calendar day (no 30 February); a DT's missing month or day is the first
        datetime.date(int(match[1]), int(match[2] or 1), int(match[3] or 1))
    except ValueError:
        return False
    return True


def _sortable(vr: str, text: str) -> str:
    """Comparable text of one end (zone offsets aside)."""
    return re.split(r"[+-]", text)[0].split(".")[0].ljust(14, "0") if vr == "DT" else text


PACS_TIMEOUT = (5, 30)     # seconds: to connect, and between two reads of an answer
PACS_ATTEMPTS = 3
# A Study Instance UID as DICOM defines it (PS3.5 9.1): digits and dots, at most 64 characters.
# Anything else a PACS answers (a path such as ../../etc, a query string) never reaches a URL.
UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")


def shown_url(url: str) -> str:
    """``url`` as a message or a log line may show it: without a user name and password
    written into it (``http://user:secret@pacs/…``)."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query,
                                    parts.fragment))


class _AnswerGuard:
    """Bounds one PACS answer as it is read: its bytes after decompression (a gzip bomb
    counts as what it inflates to), each part of a multipart answer (one instance), and the
    time it takes as a whole (a watchdog cuts the connection at the deadline: a server
    sending a byte a second never trips the read timeout). Notes whether a multipart answer
    ended with its closing boundary: one that did not was cut short (``complete``)."""

    def __init__(self, response, *, max_bytes: int, max_part: int, seconds: float,
                 what: str):
        self.max_bytes, self.max_part, self.what = max_bytes, max_part, what
        self.seconds = seconds
        self.total = self.part = 0
        self.tail = b""
        self.complete = False
        self.timed_out = False
        boundary = None
        media, *params = [p.strip() for p in response.headers.get("Content-Type", "").split(";")]
        if media.lower().startswith("multipart/"):
            for param in params:
                key, _, value = param.partition("=")
                if key.strip().lower() == "boundary":
                    boundary = value.strip().strip('"').encode("latin-1", "replace")
        self.delimiter = b"\r\n--" + boundary if boundary else None
        self.timer = threading.Timer(seconds, self._cut, args=(response,))
        self.timer.daemon = True
        self.timer.start()

    def _cut(self, response) -> None:
        self.timed_out = True
        sock = _socket_of(response.raw)
        try:
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)    # the blocked read returns at once
        except OSError:
            pass

    def take(self, chunk: bytes) -> None:
        if self.timed_out:
            raise PacsError(f"the PACS took more than {self.seconds:.0f} s to send {self.what} "
                            "(a stalled or very slow server): cut off")
        self.total += len(chunk)
        if self.total > self.max_bytes:
            raise PacsError(f"the PACS sent more than {self.max_bytes:,} bytes for {self.what}: "
                            "cut off (a damaged or hostile answer)")
        if self.delimiter is None:
            return
        window = self.tail + chunk
        at = window.rfind(self.delimiter)
        if at >= 0:
            self.part = len(window) - at - len(self.delimiter)
            if window.find(self.delimiter + b"--", at) == at:
                self.complete = True
        else:
            self.part += len(chunk)
        if self.part > self.max_part:
            raise PacsError(f"one instance of {self.what} is larger than {self.max_part:,} "
                            "bytes (UPLOAD_MAX_FILE_BYTES): cut off")
        self.tail = window[-(len(self.delimiter) + 2):]

    def finish(self) -> None:
        self.timer.cancel()
        if self.timed_out:
            raise PacsError(f"the PACS took more than {self.seconds:.0f} s to send {self.what} "
                            "(a stalled or very slow server): cut off")


def _socket_of(raw):
    """The socket under a response's raw stream (urllib3's connection while it holds one,
    else the http.client response's socket), or None."""
    connection = getattr(raw, "connection", None) or getattr(raw, "_connection", None)
    sock = getattr(connection, "sock", None)
    if sock is None:
        buffered = getattr(getattr(raw, "_fp", None), "fp", None)   # http.client.HTTPResponse
        sock = getattr(getattr(buffered, "raw", None), "_sock", None)
    return sock


class _GuardedRaw:
    """A response's raw stream, read through an ``_AnswerGuard``."""

    def __init__(self, raw, guard: _AnswerGuard):
        self._raw, self.guard = raw, guard

    def stream(self, amt=2 ** 16, decode_content=None):
        try:
            for chunk in self._raw.stream(amt, decode_content=decode_content):
                self.guard.take(chunk)
                yield chunk
        except PacsError:
            raise
        except Exception:
            if self.guard.timed_out:      # the watchdog cut the connection: say so
                self.guard.finish()
            raise
        finally:
            self.guard.timer.cancel()
        self.guard.finish()

    def __getattr__(self, name):
        return getattr(self._raw, name)


def _guard_answer(response, *args, **kwargs):
    """Every answer of the PACS session: a redirect is refused (never followed: a push would
    send reports with the patients' names to wherever the PACS points, a search would take
    another server's studies), and the body is read through an ``_AnswerGuard``."""
    if response.is_redirect or 300 <= response.status_code < 400:
        where = urllib.parse.urlsplit(response.headers.get("Location", "")).netloc
        response.close()
        raise PacsError(f"the PACS answered with a redirect (HTTP {response.status_code}"
                        + (f" to {where[:80]}" if where else "") + "), which is not followed: "
                        "give the DICOMweb URL the server really answers on")
    multipart = response.headers.get("Content-Type", "").lower().startswith("multipart/")
    guard = _AnswerGuard(
        response,
        max_bytes=settings.PACS_MAX_STUDY_BYTES if multipart else settings.PACS_MAX_ANSWER_BYTES,
        max_part=settings.UPLOAD_MAX_FILE_BYTES,
        seconds=settings.PACS_STUDY_SECONDS if multipart else settings.PACS_SEARCH_SECONDS,
        what="a study" if multipart else "an answer")
    response.raw = _GuardedRaw(response.raw, guard)
    if multipart:
        _retrieval.guard = guard        # the study being retrieved on this thread
    return response


_retrieval = threading.local()


def _last_guard(client) -> _AnswerGuard | None:
    """The guard of the last multipart (study) answer read on this thread."""
    return getattr(_retrieval, "guard", None)


def client_for(url: str):
    """A DICOMweb client for ``url`` with the environment's credentials (if any), whose
    answers are bounded and never redirected (``_guard_answer``)."""
    import requests
    from dicomweb_client.api import DICOMwebClient
    from requests.auth import HTTPBasicAuth

    if not url.startswith(("http://", "https://")):
        raise PacsError(f"{shown_url(url)[:80]!r} is not a DICOMweb URL (http:// or "
                        "https://…/dicom-web)")
    session = requests.Session()
    user, password = settings.PACS_USERNAME, settings.PACS_PASSWORD
    if user:
        session.auth = HTTPBasicAuth(user, password)
    session.max_redirects = 0
    session.hooks["response"].append(_guard_answer)
    client = DICOMwebClient(url=url.rstrip("/"), session=session, timeout=PACS_TIMEOUT)
    # dicomweb-client retries any failed request 5 times, waiting 2, 4, 8 and 16 s: a PACS
    # that refuses the connection took 30 s to say so. A busy one (429/503) still gets two
    # more tries, 0.5 and 1 s apart.
    client.set_http_retry_params(retry=True, max_attempts=PACS_ATTEMPTS,
                                 wait_exponential_multiplier=250)
    return client


def failure_words(exc: BaseException) -> str:
    """Why a PACS request failed, in words: an HTTP status named, a busy PACS (the client's
    retries exhausted), a refusal of ours (``PacsError``), else the exception's kind."""
    from requests.exceptions import ConnectionError as RequestsConnectionError
    from requests.exceptions import HTTPError, Timeout
    from retrying import RetryError

    if isinstance(exc, PacsError):
        return str(exc)
    if isinstance(exc, RetryError):
        value = getattr(getattr(exc, "last_attempt", None), "value", None)
        status = getattr(value, "status_code", None)
        return (f"the PACS stayed busy (HTTP {status}) after {PACS_ATTEMPTS} tries: try "
                "again later" if status else "the PACS kept failing after "
                f"{PACS_ATTEMPTS} tries")
    if isinstance(exc, HTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status in (401, 403):
            return (f"the PACS refused the credentials (HTTP {status}): check PACS_USERNAME "
                    "and PACS_PASSWORD")
        return f"the PACS answered HTTP {status}"
    if isinstance(exc, Timeout):
        return "the PACS did not answer in time"
    if isinstance(exc, RequestsConnectionError):
        return "the PACS could not be reached (connection refused or broken)"
    return f"{type(exc).__name__}"


def _value(result, tag: str):
    """The first value of ``tag`` in a DICOM JSON object, or None: also where the PACS's
    answer is not shaped as the standard says (not an object, no list of values)."""
    element = result.get(tag) if isinstance(result, dict) else None
    values = element.get("Value") if isinstance(element, dict) else None
    return values[0] if isinstance(values, list) and values else None


def _count(value) -> int | None:
    """A count the PACS gave (NumberOf…Instances), or None where it is not a number."""
    try:
        count = int(value)
    except (TypeError, ValueError):
        return None
    return count if count >= 0 else None


QIDO_PAGE = 500       # studies asked for per QIDO-RS request; the server may answer fewer


def find_studies(client, filters: dict, *, limit: int | None = None) -> list[dict]:
    """Every study matching ``filters`` (at most ``limit``, and at most PACS_MAX_STUDIES),
    asked for a page at a time (QIDO-RS ``limit`` / ``offset``): a PACS that answers at most
    N per request (most cap their answers) is asked again from where it stopped, until it
    answers nothing new. A server that ignores ``offset`` (the same page again) ends the
    search rather than looping. A PACS that caps the whole search (Orthanc's
    ``LimitFindResults``) cannot be paged past its cap: narrow the query (README "PACS").
    Only each study's UID and instance count are kept; an answer that is not a list of
    DICOM JSON objects is a PacsError in words."""
    cap = settings.PACS_MAX_STUDIES if limit is None else min(limit, settings.PACS_MAX_STUDIES)
    found, seen, offset = [], set(), 0
    while len(found) < cap:
        ask = min(QIDO_PAGE, cap - len(found))
        page = client.search_for_studies(search_filters=filters, limit=ask, offset=offset,
                                         fields=[STUDY_INSTANCES, MODALITIES_IN_STUDY])
        if not isinstance(page, list) or not all(isinstance(row, dict) for row in page):
            raise PacsError("the PACS's answer to the study search is not a list of DICOM "
                            "JSON objects (PS3.18 F.2): it cannot be read")
        new = []
        for study in page:
            uid = _value(study, STUDY_UID)
            if uid is None or uid in seen:
                continue
            seen.add(uid)
            new.append({STUDY_UID: {"Value": [uid]},
                        STUDY_INSTANCES: {"Value": [_value(study, STUDY_INSTANCES)]}})
        if not new:
            if page and len(page) >= ask:
                logger.warning(
                    "the PACS answered the same studies again at offset %d: it ignores "
                    "QIDO-RS offset, so only the first %d studies were found; narrow the "
                    "query (StudyDate ranges) to reach the others", offset, len(found))
            break
        found.extend(new)
        offset += len(page)
    if len(found) >= settings.PACS_MAX_STUDIES and (limit is None
                                                    or limit > settings.PACS_MAX_STUDIES):
        logger.warning("the study search stopped at PACS_MAX_STUDIES (%d): narrow the query "
                       "(StudyDate ranges) to pull the others", settings.PACS_MAX_STUDIES)
    return found[:cap]


def images_held(client, study_uid: str, *, fallback: int) -> int:
    """How many of a study's instances on the PACS are images (series of any modality but
    ``NOT_IMAGES``), asked per series; ``fallback`` where the PACS will not say."""
    try:
        series = client.search_for_series(study_uid, fields=[MODALITY, SERIES_INSTANCES])
    except (PacsError, Exception):  # noqa: BLE001 - any answer it cannot give: the fallback
        return fallback
    if not isinstance(series, list):
        return fallback
    total = 0
    for row in series:
        count = _count(_value(row, SERIES_INSTANCES))
        if count is None:
            return fallback
        if str(_value(row, MODALITY) or "").upper() not in NOT_IMAGES:
            total += count
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
    from annotator import services
    from ml_backend.data.deid import study_pseudonym

    services.parse_split(split)                      # a bad split is refused first
    filters = parse_query(query)
    client = client or client_for(url)
    summary = PullSummary()
    try:
        studies = find_studies(client, filters, limit=limit)
    except Exception as exc:  # noqa: BLE001 - whatever the PACS answered: said in words
        raise PacsError(f"the PACS at {shown_url(url)} did not answer the study query "
                        f"({failure_words(exc)[:200]})") from None
    summary.studies_found = len(studies)
    log(f"{len(studies)} {'study matches' if len(studies) == 1 else 'studies match'} "
        f"{filters or 'everything'}")
    dataset_name = dataset_name or f"PACS {urllib.parse.urlsplit(url).hostname or 'pull'}"
    refusal = services.dataset_name_refusal(dataset_name)   # before any study is retrieved
    if refusal is not None:
        raise PacsError(refusal)
    for number, study in enumerate(studies, start=1):
        uid = str(_value(study, STUDY_UID) or "")
        if len(uid) > 64 or not UID.fullmatch(uid):
            summary.errors.append(f"study {number}: the PACS gave a Study Instance UID that "
                                  "is not one (digits and dots, at most 64 characters): "
                                  "not asked for")
            log(summary.errors[-1])
            continue
        key = study_pseudonym(uid, salt=settings.DEID_SALT)
        have = instances_here(project, key)
        held = _count(_value(study, STUDY_INSTANCES))
        if have and held is not None and have < held:
            # more instances there than scans here: are the others images, or reports
            # (the results pushed back into this study, a radiologist's SR)?
            held_images = images_held(client, uid, fallback=held)
        else:
            held_images = held
        if have and (held_images is None or have >= held_images):
            summary.studies_already_here += 1
            log(f"study {number}/{len(studies)}: already here ({have} instance(s))")
            continue
        Path(settings.INCOMING_ROOT).mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="pacs-", dir=settings.INCOMING_ROOT))
        try:
            retrieved, skipped = _retrieve_study(client, uid, folder, held=held)
        except Exception as exc:  # noqa: BLE001 - one study's failure never stops the pull
            shutil.rmtree(folder, ignore_errors=True)     # the raw files hold PHI: gone now
            summary.errors.append(f"study {number}: could not be retrieved "
                                  f"({failure_words(exc)[:200]}); nothing of it was kept")
            log(summary.errors[-1])
            continue
        summary.instances_retrieved += retrieved
        summary.not_images += skipped
        if not retrieved:
            shutil.rmtree(folder, ignore_errors=True)
            log(f"study {number}/{len(studies)}: no image instance ({skipped} report(s), key "
                "object(s), presentation state(s) or document(s) not imported)")
            continue
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
            f"{job.imported} imported, {job.duplicates} duplicates, {job.failed} failed"
            + (f"; {skipped} non-image instance(s) not imported" if skipped else ""))
    return summary


# A study may grow between its search and its retrieval: this many instances more than the
# search said are taken; beyond that the PACS is sending something else (a loop, an attack).
EXTRA_INSTANCES = 16


def _retrieve_study(client, uid: str, folder: Path, *, held: int | None) -> tuple[int, int]:
    """Retrieve study ``uid`` into ``folder`` (streamed WADO-RS, one instance decoded at a
    time and written out: a CT study of a thousand slices never sits in memory whole).
    Returns ``(image instances written, non-image instances skipped)``. Raises PacsError
    when the answer is not that study, whole: an instance of another study, an answer cut
    short (no closing multipart boundary: the connection dropped, the PACS stopped or the
    study was deleted meanwhile), fewer instances than the search said, or far more; the
    caller removes the folder."""
    written = skipped = seen = 0
    _retrieval.guard = None
    stream = client.iter_study(uid)
    for instance in stream:
        seen += 1
        if held is not None and seen > held + EXTRA_INSTANCES:
            raise PacsError(f"the PACS sent more than {held + EXTRA_INSTANCES} instances for "
                            f"a study it said holds {held}: stopped")
        if str(instance.get("StudyInstanceUID", "")) != uid:
            raise PacsError("the PACS sent an instance of another study than the one asked for")
        modality = str(instance.get("Modality", "")).upper()
        if modality in NOT_IMAGES or "PixelData" not in instance and \
                "FloatPixelData" not in instance and "DoubleFloatPixelData" not in instance:
            skipped += 1            # a report, key object, presentation state, document
            continue
        instance.save_as(folder / f"{written:06d}.dcm", enforce_file_format=True)
        written += 1
    guard = _last_guard(client)
    if guard is not None and guard.delimiter is not None and not guard.complete:
        raise PacsError(f"the study's answer was cut short after {seen} instance(s) (no "
                        "closing boundary: the connection dropped, or the PACS stopped or "
                        "deleted the study meanwhile)")
    if held is not None and seen < held:
        raise PacsError(f"the PACS sent {seen} of the {held} instances it said the study "
                        "holds (the study changed or the answer was cut short)")
    return written, skipped


# --- a PACS, out: results as DICOM structured reports ---------------------------------------

@dataclass
class PushSummary:
    candidates: int = 0
    sent: int = 0
    unchanged: int = 0
    no_linkage: int = 0
    no_result: int = 0
    not_sent: int = 0           # due, but refused, unconfirmed, or not tried after a stop
    stopped: str = ""           # why the push stopped before the end (every report would fail)
    errors: list[str] = field(default_factory=list)

    def words(self) -> str:
        text = (f"{self.sent} report(s) sent, {self.unchanged} unchanged since the last push, "
                f"{self.no_result} scan(s) without a result yet, {self.no_linkage} without a "
                "linkage (imported before LINKAGE_KEY was set, or not DICOM)")
        if self.not_sent:
            text += (f"; {self.not_sent} report(s) NOT sent (they are sent again by the next "
                     "push)")
        if self.stopped:
            text += f"; push stopped: {self.stopped}"
        return text + (f"; errors: {'; '.join(self.errors[:3])}" if self.errors else "")

    @property
    def incomplete(self) -> bool:
        """Whether any report could not be sent (the command then exits non-zero)."""
        return bool(self.not_sent or self.stopped or self.errors)


def scan_results(project: Project) -> dict[int, dict]:
    """Each scan's result as the project stands: ``{scan id: {"result": words, "codes":
    [(code, meaning)], "role": reader role}}``, from the label export's rows (the same rules
    as training: the adjudication, else the readers' majority; for a findings set the
    findings present, "no finding" when every finding read is absent). Scans with no settled
    result are left out; roles, never names. A code is ``label_code(name)`` (unique per
    name, a valid SH), its meaning the name."""
    from annotator.exports import label_rows
    from annotator.models import Annotation, Membership

    roles = dict(Membership.objects.filter(project=project).values_list("user__username",
                                                                        "role"))
    results = {}
    for row in label_rows(project):
        if row["kind"] == "class":
            words, codes = row["label"], [(label_code(row["label"]), row["label"])]
        else:
            present = [name for name, state in row["findings"].items() if state == "present"]
            if present:
                words, codes = ", ".join(present), [(label_code(n), n) for n in present]
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
                      model_version: str, series_uid: str, previous: dict | None = None):
    """A DICOM Comprehensive SR (``highdicom``) for one scan, filed in the original study of
    the original patient: the result and who settled it (a role, never a name), the model's
    suggestion and confidence and its version, and a reference to the image it is about.

    Written in UTF-8 (``SpecificCharacterSet`` ISO_IR 192: names in any script arrive as they
    are); a report that replaces an earlier one for the scan names it (``previous``: its
    ``SeriesInstanceUID`` and ``SOPInstanceUID``) in its Predecessor Documents Sequence."""
    import highdicom as hd
    from pydicom.dataset import Dataset
    from pydicom.uid import ComprehensiveSRStorage, generate_uid

    evidence = Dataset()
    for keyword in ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate",
                    "PatientSex", "StudyInstanceUID", "StudyID", "StudyDate", "StudyTime",
                    "AccessionNumber", "ReferringPhysicianName", "SeriesInstanceUID",
                    "SOPInstanceUID", "SOPClassUID", "Modality"):
        setattr(evidence, keyword, identifiers.get(keyword, ""))
    ours = "99MEDLABEL"
    items = [hd.sr.CodeContentItem(
        name=hd.sr.CodedConcept("121071", "DCM", "Finding"),
        value=hd.sr.CodedConcept(code, ours, _dicom_lo(meaning)),
        relationship_type="CONTAINS") for code, meaning in result["codes"]]
    for code, meaning in result["codes"]:
        if _dicom_lo(meaning) != meaning:     # cut at 64 characters: the whole name as text
            items.append(hd.sr.TextContentItem(
                name=hd.sr.CodedConcept("LABELNAME", ours, "Finding (whole name)"),
                value=_dicom_text(meaning), relationship_type="CONTAINS"))
    items.append(hd.sr.TextContentItem(
        name=hd.sr.CodedConcept("READROLE", ours, "Reader role"),
        value=_dicom_text(result["role"]), relationship_type="CONTAINS"))
    if suggestion is not None:
        name, confidence = suggestion
        items.append(hd.sr.TextContentItem(
            name=hd.sr.CodedConcept("MLSUGGEST", ours, "Model suggestion"),
            value=_dicom_text(name), relationship_type="CONTAINS"))
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
            name=hd.sr.CodedConcept("111003", "DCM", "Algorithm Version"),
            value=_dicom_text(model_version), relationship_type="CONTAINS"))
    if identifiers.get("SOPInstanceUID") and identifiers.get("SOPClassUID"):
        items.append(hd.sr.CompositeContentItem(
            name=hd.sr.CodedConcept("260753009", "SCT", "Source"),
            referenced_sop_class_uid=identifiers["SOPClassUID"],
            referenced_sop_instance_uid=identifiers["SOPInstanceUID"],
            relationship_type="CONTAINS"))
    root = hd.sr.ContainerContentItem(
        name=hd.sr.CodedConcept("18748-4", "LN", "Diagnostic imaging report"), template_id=None)
    root.ContentSequence = items
    predecessors = None
    if previous and previous.get("SeriesInstanceUID") and previous.get("SOPInstanceUID"):
        earlier = Dataset()
        earlier.StudyInstanceUID = identifiers.get("StudyInstanceUID", "")
        earlier.SeriesInstanceUID = previous["SeriesInstanceUID"]
        earlier.SOPInstanceUID = previous["SOPInstanceUID"]
        earlier.SOPClassUID = ComprehensiveSRStorage
        predecessors = [earlier]
    report = hd.sr.ComprehensiveSR(
        evidence=[evidence], content=root, series_instance_uid=series_uid, series_number=990,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="MedLabel",
        series_description="MedLabel results", is_complete=True, is_final=False,
        previous_versions=predecessors)
    # every text value (the patient's name from the linkage, class names) is written as UTF-8
    report.SpecificCharacterSet = "ISO_IR 192"
    return report


def label_code(name: str) -> str:
    """The report code of the class or finding ``name``: ``ML`` and 12 hex digits of the
    name's SHA-256. One per name (two long names that begin alike stay apart), the same for
    the same name at every push, at most 16 characters and no backslash: a valid SH of one
    value. The name itself is the code's meaning."""
    import hashlib

    return "ML" + hashlib.sha256(str(name).encode("utf-8")).hexdigest()[:12].upper()


def _dicom_text(value) -> str:
    """``value`` as one DICOM text value: a backslash (DICOM's value separator, which would
    split ``a\\b`` in two) becomes the fullwidth reverse solidus."""
    return str(value).replace("\\", "\uff3c")


def _dicom_lo(value) -> str:
    """``value`` as one LO value (a code meaning): no backslash, at most 64 characters."""
    return _dicom_text(value)[:64]


def _results_series_uid(project: Project, study_uid: str) -> str:
    """The series our reports in ``study_uid`` are filed in: one per project and study, the
    same at every push (made from secrets, so it does not reveal the study's UID)."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["medlabel-results-series", settings.DEID_SALT,
                                      str(settings.LINKAGE_KEY or ""), str(project.pk),
                                      str(study_uid)])


class _PushStop(Exception):
    """An answer that every report would get (credentials refused, no STOW-RS service at
    the URL, the PACS unreachable or busy): the push stops; ``str(exc)`` says why."""


def _stow_dataset(response):
    """The DICOM response (PS3.18 10.5.3) in a STOW-RS answer, as a pydicom Dataset; None
    when the answer is not one (an HTML page, no body, unparsable)."""
    from pydicom.dataset import Dataset

    media = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    try:
        if media in ("application/dicom+json", "application/json"):
            answer = response.json()
            return Dataset.from_json(answer) if isinstance(answer, dict) else None
        if media in ("application/dicom+xml", "application/xml", "text/xml"):
            from xml.etree.ElementTree import fromstring

            from dicomweb_client.web import _load_xml_dataset

            return _load_xml_dataset(fromstring(response.content))
    except Exception:                        # whatever a damaged answer makes the parsers do
        return None
    return None


def _failure_reason(answer) -> str:
    for item in (answer.get("FailedSOPSequence") or []) if answer is not None else []:
        reason = item.get("FailureReason")
        if reason is not None:
            return f", failure reason 0x{int(reason):04X}"
    return ""


def _store_report(client, report) -> str | None:
    """Send ``report`` with STOW-RS. None when the PACS's answer is a DICOM response that
    names the report as stored (Referenced SOP Sequence) and not as failed; else why not, in
    words. Raises ``_PushStop`` for an answer every report would get."""
    from requests.exceptions import ConnectionError as RequestsConnectionError
    from requests.exceptions import HTTPError, RequestException, Timeout
    from retrying import RetryError

    answers = []

    def keep(response, *args, **kwargs):
        answers.append(response)
        return response

    session = getattr(client, "_session", None)
    hooks = session.hooks.setdefault("response", []) if session is not None else None
    if hooks is not None:
        hooks.append(keep)
    try:
        returned = client.store_instances(datasets=[report])
    except RetryError as exc:
        status = getattr(getattr(exc.last_attempt, "value", None), "status_code", None)
        raise _PushStop(f"the PACS is busy (HTTP {status}) and still was after "
                        f"{PACS_ATTEMPTS} tries: push again later") from None
    except HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise _PushStop(f"the PACS refused the credentials (HTTP {status}): set "
                            "PACS_USERNAME / PACS_PASSWORD") from None
        if status in (404, 405):
            raise _PushStop(f"the PACS has no STOW-RS service at this URL (HTTP {status}): "
                            "check the DICOMweb URL (…/dicom-web)") from None
        if status in (408, 429, 503, 504):
            raise _PushStop(f"the PACS is busy (HTTP {status}): push again later") from None
        reason = _failure_reason(_stow_dataset(exc.response)) if exc.response is not None \
            else ""
        return f"the PACS refused the report (HTTP {status}{reason})"
    except Timeout:
        raise _PushStop("the PACS did not answer in time") from None
    except RequestsConnectionError:
        raise _PushStop("the PACS could not be reached (connection refused or broken)") from None
    except PacsError as exc:                 # a redirect, an answer too large or too slow
        raise _PushStop(str(exc)) from None
    except (RequestException, OSError, ValueError) as exc:
        return (f"the PACS did not confirm it stored the report (its answer could not be "
                f"read: {type(exc).__name__})")
    finally:
        if hooks is not None and keep in hooks:
            hooks.remove(keep)
    if answers:
        response = answers[-1]
        answer = _stow_dataset(response)
        if answer is None:
            media = response.headers.get("Content-Type", "").split(";")[0].strip()[:60]
            return ("the PACS did not confirm it stored the report (HTTP "
                    f"{response.status_code} with {media or 'no'} content, not a DICOM "
                    "response)")
    else:                                     # a client of another kind: what it returned
        answer = returned if returned is not None and len(returned) else None
        if answer is None:
            return "the PACS did not confirm it stored the report (no DICOM response)"
    ours = str(report.SOPInstanceUID)
    failed = [item for item in answer.get("FailedSOPSequence") or []
              if str(item.get("ReferencedSOPInstanceUID", ours)) == ours]
    if failed:
        return ("the PACS did not confirm it stored the report (it listed it as failed"
                f"{_failure_reason(answer)})")
    stored = {str(item.get("ReferencedSOPInstanceUID", ""))
              for item in answer.get("ReferencedSOPSequence") or []}
    if ours not in stored:
        return ("the PACS did not confirm it stored the report (its answer does not name "
                "it as stored)")
    return None


def pacs_push(*, project: Project, url: str, client=None,
              log: Callable[[str], None] = lambda line: None) -> PushSummary:
    """Send each scan's result to the PACS as a structured report in its original study
    (STOW-RS), once per result: a scan whose result or model version has not changed since
    its last report is not sent again. A report counts as sent only when the PACS's answer
    names it as stored; one it refused or did not confirm is not recorded, so the next push
    sends it again. A report that replaces an earlier one names it as its predecessor, and
    every report of a study goes into one MedLabel series. An answer that every report would
    get (credentials refused, no STOW-RS service, the PACS unreachable or busy) stops the
    push at once (``summary.stopped``)."""
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
        if summary.stopped:                  # due, but not tried: every try would fail
            summary.not_sent += 1
            continue
        try:
            identifiers = linkage_read(scan)
        except LinkageError as exc:
            summary.no_linkage += 1
            if "another key" in str(exc):
                summary.errors.append(str(exc))
            continue
        study = identifiers.get("StudyInstanceUID", "")
        series_uid = _results_series_uid(project, study)
        previous = ({"SeriesInstanceUID": last.series_instance_uid,
                     "SOPInstanceUID": last.sop_instance_uid}
                    if last is not None and last.series_instance_uid else None)
        report = structured_report(identifiers, result, suggestion=suggestions.get(scan.pk),
                                   model_version=version, series_uid=series_uid,
                                   previous=previous)
        try:
            problem = _store_report(client, report)
        except _PushStop as stop:
            summary.stopped = str(stop)
            summary.not_sent += 1
            log(f"scan {scan.pk}: not sent: {stop}; push stopped")
            continue
        if problem is not None:
            summary.not_sent += 1
            summary.errors.append(f"scan {scan.pk}: {problem}")
            log(f"scan {scan.pk}: not sent: {problem}")
            continue
        PacsReport.objects.create(scan=scan, result=result["result"][:400],
                                  model_version=version,
                                  sop_instance_uid=str(report.SOPInstanceUID),
                                  series_instance_uid=series_uid)
        summary.sent += 1
        log(f"scan {scan.pk}: {result['result']} ({result['role']}) sent")
    return summary
