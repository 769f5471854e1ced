"""The push against a PACS that does not store what it is sent, or refuses everything: a real
HTTP server on loopback answers each STOW-RS request as the case needs. A report counts as
sent only when the answer names it as stored; an answer every report would get stops the
push at once, in words, and the command exits non-zero after its summary."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pydicom
import pytest
from django.core.management import CommandError, call_command

from annotator import pacs
from annotator.models import Annotation, LabelClass, PacsReport, Scan
from bench.dicom_series import write_series
from tests.conftest import run_import

pytestmark = [pytest.mark.django_db]

KEY = "k" * 12 + "a-long-random-linkage-secret-for-tests"


class FakeStow:
    """A STOW-RS server: ``mode`` says how it answers; ``received`` keeps every instance
    it was sent (read as DICOM), ``posts`` counts the requests."""

    def __init__(self):
        self.mode = "ok"
        self.received: list[pydicom.Dataset] = []
        self.posts = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def answer(self, code, body=b"", ctype="application/dicom+json"):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

            def do_POST(self):
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    body = b""
                    while True:
                        size = int(self.rfile.readline().strip() or b"0", 16)
                        if not size:
                            self.rfile.readline()
                            break
                        body += self.rfile.read(size)
                        self.rfile.readline()
                else:
                    body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fake.posts += 1
                uids = fake.read_instances(self.headers.get("Content-Type", ""), body)
                mode = fake.mode
                status = {"s401": 401, "s403": 403, "s404": 404, "s503": 503, "s500": 500}
                if mode in status:
                    return self.answer(status[mode], b"<html>nope</html>", "text/html")
                if mode == "html200":
                    return self.answer(200, b"<html>Welcome to the hospital portal</html>",
                                       "text/html")
                if mode == "empty200":
                    return self.answer(200, b"")
                if mode in ("failed200", "failed202"):     # the failure list names no UID
                    return self.answer(int(mode[-3:]), json.dumps({"00081198": {
                        "vr": "SQ", "Value": [{"00081197": {"vr": "US", "Value": [0xC000]}}]}})
                        .encode())
                if mode == "failed_ours":                   # names ours as failed, with 409
                    return self.answer(409, json.dumps({"00081198": {"vr": "SQ", "Value": [
                        {"00081155": {"vr": "UI", "Value": [uid]},
                         "00081197": {"vr": "US", "Value": [0x0110]}} for uid in uids]}})
                        .encode())
                if mode == "other_uid":                     # "stored" someone else's
                    return self.answer(200, json.dumps({"00081199": {"vr": "SQ", "Value": [
                        {"00081155": {"vr": "UI", "Value": ["1.2.3.4"]}}]}}).encode())
                # ok: a DICOM response naming what was stored (with a charset parameter, as
                # some servers send it)
                return self.answer(200, json.dumps({"00081199": {"vr": "SQ", "Value": [
                    {"00081150": {"vr": "UI", "Value": [pydicom.uid.ComprehensiveSRStorage]},
                     "00081155": {"vr": "UI", "Value": [uid]}} for uid in uids]}}).encode(),
                    "application/dicom+json; charset=utf-8")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/dicom-web"

    def read_instances(self, content_type: str, body: bytes) -> list[str]:
        boundary = None
        for param in content_type.split(";")[1:]:
            key, _, value = param.strip().partition("=")
            if key.lower() == "boundary":
                boundary = value.strip('"').encode()
        uids = []
        for part in body.split(b"--" + boundary)[1:] if boundary else []:
            head, _, data = part.partition(b"\r\n\r\n")
            if not data:
                continue
            ds = pydicom.dcmread(io.BytesIO(data.removesuffix(b"\r\n")))
            self.received.append(ds)
            uids.append(str(ds.SOPInstanceUID))
        return uids

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stow():
    server = FakeStow()
    yield server
    server.close()


@pytest.fixture
def labelled(project, users, settings, tmp_path):
    """Four DICOM scans (four studies) imported with the linkage on, each with a reader's
    label."""
    settings.LINKAGE_KEY = KEY
    write_series(tmp_path / "ct", patients=4, slices=1, first_patient=40)
    run_import(project, tmp_path / "ct", layout="flat")
    scans = list(Scan.objects.filter(project=project).order_by("pk"))
    assert len(scans) == 4
    normal = LabelClass.objects.create(project=project, name="normal", created_by=users["dora"])
    for scan in scans:
        Annotation.objects.create(scan=scan, label_class=normal, reader=users["alice"])
    return scans


def _push(project, url):
    return pacs.pacs_push(project=project, url=url)


@pytest.mark.parametrize("mode", ["html200", "empty200", "failed200", "failed202",
                                  "failed_ours", "other_uid"])
def test_a_report_the_pacs_did_not_confirm_is_not_recorded_and_is_sent_again(
        stow, labelled, project, mode):
    stow.mode = mode
    summary = _push(project, stow.url)
    assert stow.posts == 4                        # each report tried (none of these stops)
    assert summary.sent == 0 and summary.not_sent == 4 and not PacsReport.objects.exists()
    assert "did not confirm it stored the report" in summary.words() or \
        "refused the report (HTTP 409, failure reason 0x0110)" in summary.words()
    # the next push (the PACS working again) sends them, and only then they count as sent
    stow.mode = "ok"
    summary = _push(project, stow.url)
    assert summary.sent == 4 and summary.not_sent == 0 and not summary.incomplete
    assert PacsReport.objects.count() == 4
    assert _push(project, stow.url).unchanged == 4


def test_the_command_prints_the_summary_then_exits_non_zero(stow, labelled, project, capsys):
    stow.mode = "failed200"
    with pytest.raises(CommandError, match="4 report.s. not sent: scan .*did not confirm"):
        call_command("pacs_push", "--project", project.name, "--dicomweb", stow.url)
    out = capsys.readouterr().out
    assert "0 report(s) sent" in out and "4 report(s) NOT sent" in out
    stow.mode = "ok"
    call_command("pacs_push", "--project", project.name, "--dicomweb", stow.url)
    assert "4 report(s) sent" in capsys.readouterr().out


@pytest.mark.parametrize("mode, words", [
    ("s401", "the PACS refused the credentials (HTTP 401): set PACS_USERNAME / PACS_PASSWORD"),
    ("s403", "the PACS refused the credentials (HTTP 403)"),
    ("s404", "no STOW-RS service at this URL (HTTP 404)"),
    ("s503", "the PACS is busy (HTTP 503)"),
])
def test_an_answer_every_report_would_get_stops_the_push(stow, labelled, project, capsys,
                                                         mode, words):
    stow.mode = mode
    with pytest.raises(CommandError, match=r"4 report\(s\) not sent") as raised:
        call_command("pacs_push", "--project", project.name, "--dicomweb", stow.url)
    assert words in str(raised.value)
    out = capsys.readouterr().out
    assert "0 report(s) sent" in out and "push stopped" in out and words in out
    # one report tried (a busy PACS: that one report's tries), not one per scan
    assert stow.posts == (pacs.PACS_ATTEMPTS if mode == "s503" else 1)
    assert not PacsReport.objects.exists()


def test_a_server_error_for_one_report_does_not_stop_the_others(stow, labelled, project):
    stow.mode = "s500"
    summary = _push(project, stow.url)
    assert stow.posts == 4 and summary.not_sent == 4 and not summary.stopped
    assert "the PACS refused the report (HTTP 500)" in summary.words()


def test_a_pacs_that_is_down_is_tried_once(labelled, project):
    with socket.socket() as s:                    # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    summary = _push(project, f"http://127.0.0.1:{port}/dicom-web")
    assert time.monotonic() - started < 5         # one report's tries, not four
    assert summary.not_sent == 4 and summary.sent == 0
    assert "could not be reached" in summary.stopped
    assert not PacsReport.objects.exists()


def test_class_names_become_valid_distinct_codes(stow, labelled, project, users):
    long1 = "pleural effusion long name beyond sixteen chars"
    long2 = "pleural effusion long name other"
    names = [long1, long2, "a\\b", "x" * 100]
    classes = [LabelClass.objects.create(project=project, name=n, created_by=users["dora"])
               for n in names]
    for scan, label_class in zip(labelled, classes):
        Annotation.objects.create(scan=scan, label_class=label_class, reader=users["bob"],
                                  source=Annotation.Source.ADJUDICATION)
    assert _push(project, stow.url).sent == 4
    findings = {}
    for ds in stow.received:
        ds = pydicom.dcmread(io.BytesIO(_encoded(ds)))            # as the PACS reads it
        for item in ds.ContentSequence:
            if item.ConceptNameCodeSequence[0].CodeMeaning == "Finding":
                code = item.ConceptCodeSequence[0]
                findings[code.CodeValue] = code.CodeMeaning
                assert isinstance(code.CodeValue, str) and isinstance(code.CodeMeaning, str)
                assert len(code.CodeValue) <= 16 and "\\" not in code.CodeValue
                assert len(code.CodeMeaning) <= 64
    assert len(findings) == 4                     # four classes, four codes
    assert set(findings.values()) == {long1, long2, "a\uff3cb", "x" * 64}


def _encoded(ds) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()
