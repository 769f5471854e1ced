"""A PACS that answers badly (the ninth probe): a real HTTP server on loopback plays a broken
or hostile DICOMweb server, each test one answer. What must hold: a study that does not
arrive whole leaves nothing; no redirect is followed; no answer costs unbounded memory or
time; every failure is said in words, never a traceback, and no raw file stays behind."""

from __future__ import annotations

import gzip
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest
from django.core.management import CommandError, call_command
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from annotator import pacs
from annotator.models import ImportJob, Scan
from tests.base import pydicom_test_files

STUDY = "1.2.826.0.1.3680043.8.498.4242"
BOUNDARY = "medlabel-fake"


def _image(study: str = STUDY, n: int = 0) -> bytes:
    path = next(p for p in pydicom_test_files() if p.name == "CT_small.dcm")
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID = study
    ds.SOPInstanceUID = f"{study}.{n + 1}"
    ds.PatientName = "ZQXPHI^DOE"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _report(study: str = STUDY) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    ds.file_meta.MediaStorageSOPInstanceUID = f"{study}.99"
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.33", f"{study}.99"
    ds.StudyInstanceUID, ds.Modality, ds.PatientName = study, "SR", "ZQXPHI^DOE"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _multipart(parts: list[bytes], *, close: bool = True) -> bytes:
    out = b""
    for part in parts:
        out += (f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n").encode() + part + b"\r\n"
    return out + (f"--{BOUNDARY}--\r\n".encode() if close else b"")


def _studies(uid: str = STUDY, count: int = 1) -> bytes:
    return json.dumps([{"0020000D": {"vr": "UI", "Value": [uid]},
                        "00201208": {"vr": "IS", "Value": [count]}}]).encode()


class FakePacs(BaseHTTPRequestHandler):
    """Answers QIDO-RS and WADO-RS as ``self.server.answers`` says: {"search": fn,
    "study": fn}, each ``fn(handler)`` writing a whole answer."""

    protocol_version = "HTTP/1.0"

    def log_message(self, *args):          # quiet
        pass

    def do_GET(self):
        self.server.paths.append(self.path)
        kind = "search" if self.path.split("?")[0].rstrip("/").endswith("/studies") else "study"
        self.server.answers[kind](self)

    def send(self, status: int, body: bytes, content_type: str, **headers) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for key, value in headers.items():
            self.send_header(key.replace("_", "-"), value)
        if "Content_Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def json_answer(body: bytes, status: int = 200, **headers):
    return lambda h: h.send(status, body, "application/dicom+json", **headers)


def study_answer(body: bytes, status: int = 200):
    return lambda h: h.send(status, body,
                            f'multipart/related; type="application/dicom"; boundary={BOUNDARY}')


@pytest.fixture
def fake_pacs():
    servers = []

    def start(**answers):
        server = ThreadingHTTPServer(("127.0.0.1", 0), FakePacs)
        server.daemon_threads = True
        server.answers, server.paths = answers, []
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        server.dicomweb = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _pull(project, url: str):
    lines = []
    try:
        summary = pacs.pacs_pull(project=project, url=url, log=lines.append)
    except pacs.PacsError as exc:
        return None, str(exc), lines
    return summary, "; ".join(summary.errors), lines


def _nothing_left(settings) -> bool:
    return not list(Path(settings.INCOMING_ROOT).glob("pacs-*"))


def test_a_study_cut_short_is_not_imported(project, settings, fake_pacs):
    """The stream ended without its closing boundary (Orthanc stopped, the study deleted
    meanwhile): before, the instances that had arrived were imported as the whole study."""
    server = fake_pacs(search=json_answer(_studies(count=3)),
                       study=study_answer(_multipart([_image(n=0), _image(n=1)], close=False)))
    summary, errors, _ = _pull(project, server.dicomweb)
    assert "cut short" in errors and summary.imported == 0
    assert not Scan.objects.exists() and not ImportJob.objects.exists()
    assert _nothing_left(settings)


def test_fewer_instances_than_the_study_holds_is_not_imported(project, settings, fake_pacs):
    server = fake_pacs(search=json_answer(_studies(count=3)),
                       study=study_answer(_multipart([_image(n=0), _image(n=1)])))
    summary, errors, _ = _pull(project, server.dicomweb)
    assert "sent 2 of the 3 instances" in errors and not Scan.objects.exists()
    assert _nothing_left(settings)


def test_a_whole_study_with_a_report_imports_its_images_and_counts_the_report(
        project, settings, fake_pacs):
    server = fake_pacs(search=json_answer(_studies(count=3)),
                       study=study_answer(_multipart([_image(n=0), _report(), _image(n=1)])))
    summary, errors, _ = _pull(project, server.dicomweb)
    assert not errors and (summary.imported, summary.failed, summary.not_images) == (2, 0, 1)
    assert "1 non-image instance(s)" in summary.words()
    assert _nothing_left(settings)


def test_no_redirect_is_followed(project, settings, fake_pacs):
    """A search or a retrieval redirected elsewhere (another host inside the network) is
    refused; the other host is never asked."""
    inside = fake_pacs(search=json_answer(_studies()), study=study_answer(_multipart([_image()])))
    location = inside.dicomweb + "/studies"
    server = fake_pacs(search=lambda h: h.send(302, b"", "text/plain", Location=location),
                       study=study_answer(b""))
    summary, error, _ = _pull(project, server.dicomweb)
    assert summary is None and "redirect (HTTP 302" in error and "not followed" in error
    assert inside.paths == []
    server.answers["search"] = json_answer(_studies())
    server.answers["study"] = lambda h: h.send(307, b"", "text/plain", Location=location)
    summary, errors, _ = _pull(project, server.dicomweb)
    assert "redirect (HTTP 307" in errors and inside.paths == [] and _nothing_left(settings)


def test_a_gzip_bomb_in_the_search_is_cut_off(project, settings, fake_pacs):
    settings.PACS_MAX_ANSWER_BYTES = 1024 * 1024
    bomb = gzip.compress(b"[" + b" " * (64 * 1024 * 1024) + b"]", compresslevel=9)
    server = fake_pacs(search=json_answer(bomb, Content_Encoding="gzip"), study=None)
    started = time.monotonic()
    summary, error, _ = _pull(project, server.dicomweb)
    assert summary is None and "more than 1,048,576 bytes" in error
    assert time.monotonic() - started < 10


def test_an_instance_that_never_ends_is_cut_off(project, settings, fake_pacs):
    settings.UPLOAD_MAX_FILE_BYTES = 256 * 1024

    def endless(handler):
        handler.send_response(200)
        handler.send_header("Content-Type", f"multipart/related; boundary={BOUNDARY}")
        handler.end_headers()
        handler.wfile.write(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        try:
            for _ in range(10_000):
                handler.wfile.write(b"\0" * 65536)
        except OSError:
            pass

    server = fake_pacs(search=json_answer(_studies()), study=endless)
    summary, errors, _ = _pull(project, server.dicomweb)
    assert "larger than 262,144 bytes" in errors and _nothing_left(settings)


def test_a_server_that_sends_a_byte_a_second_is_cut_off_at_the_deadline(
        project, settings, fake_pacs):
    settings.PACS_SEARCH_SECONDS = 1

    def slow(handler):
        body = _studies()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/dicom+json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        try:
            for byte in body[:20]:
                handler.wfile.write(bytes([byte]))
                handler.wfile.flush()
                time.sleep(0.5)
        except OSError:
            pass

    server = fake_pacs(search=slow, study=None)
    started = time.monotonic()
    summary, error, _ = _pull(project, server.dicomweb)
    assert summary is None and "took more than 1 s" in error
    assert time.monotonic() - started < 8      # the client's own retries included


@pytest.mark.parametrize("uid", ["../../../../etc/passwd", "1.2.3?x=1", "1." * 40 + "1"])
def test_a_study_uid_that_is_not_one_is_never_asked_for(project, settings, fake_pacs, uid):
    server = fake_pacs(search=json_answer(_studies(uid=uid)), study=study_answer(b""))
    summary, errors, _ = _pull(project, server.dicomweb)
    assert "not one (digits and dots" in errors
    assert all("/studies/" not in path for path in server.paths)


def test_an_instance_of_another_study_is_refused(project, settings, fake_pacs):
    server = fake_pacs(search=json_answer(_studies()),
                       study=study_answer(_multipart([_image(study="1.2.3.4.5")])))
    summary, errors, _ = _pull(project, server.dicomweb)
    assert "another study" in errors and not Scan.objects.exists() and _nothing_left(settings)


@pytest.mark.parametrize("answer, words", [
    (study_answer(b"", status=503), "busy (HTTP 503)"),
    (study_answer(_multipart([b"<html><body>ZQXPHI sign in</body></html>"])), "could not be"),
    (study_answer(_multipart([_image(n=0), b"<html>oops</html>"])), "could not be"),
])
def test_a_broken_retrieval_is_said_in_words_and_leaves_no_raw_file(
        project, settings, fake_pacs, answer, words):
    server = fake_pacs(search=json_answer(_studies(count=2)), study=answer)
    summary, errors, _ = _pull(project, server.dicomweb)
    assert words in errors and not Scan.objects.exists() and _nothing_left(settings)


@pytest.mark.parametrize("body", [b"{}", b'["x"]', b'[{"0020000D": "x"}]', b"not json"])
def test_a_search_answer_of_the_wrong_shape_is_said_in_words(project, fake_pacs, body):
    server = fake_pacs(search=json_answer(body), study=None)
    summary, error, _ = _pull(project, server.dicomweb)
    assert (summary is None and "did not answer the study query" in error) or (
        summary is not None and summary.studies_found == 0)


def test_a_password_in_the_url_is_never_shown(project, fake_pacs):
    server = fake_pacs(search=json_answer(b"oops", status=500), study=None)
    url = server.dicomweb.replace("http://", "http://medlabel:s3cret@")
    with pytest.raises(CommandError) as refused:
        call_command("pacs_pull", "--project", project.name, "--dicomweb", url)
    assert "s3cret" not in str(refused.value) and "HTTP 500" in str(refused.value)
