"""A real Orthanc PACS (Debian's `orthanc` and `orthanc-dicomweb` packages) on loopback with a
throw-away storage, for the PACS tests. `make test` installs the packages when missing (as
root); without them the tests fail loudly with the command to run (never skip)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ORTHANC = os.environ.get("ORTHANC_PATH", "/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def orthanc_server(tmp_path_factory):
    if not Path(ORTHANC).exists() or not DICOMWEB_PLUGIN.exists():
        pytest.fail(f"{ORTHANC} or its DICOMweb plugin not found: the PACS tests need "
                    "`apt-get install -y orthanc orthanc-dicomweb` (`make test` does this as root)")
    folder = tmp_path_factory.mktemp("orthanc")
    http, dicom = _free_port(), _free_port()
    config = {"Name": "medlabel-test", "StorageDirectory": str(folder / "db"),
              "IndexDirectory": str(folder / "db"), "HttpPort": http, "DicomPort": dicom,
              "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
              "Plugins": [str(DICOMWEB_PLUGIN)],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (folder / "config.json").write_text(json.dumps(config))
    process = subprocess.Popen([ORTHANC, str(folder / "config.json")], cwd=folder,
                               stdout=open(folder / "orthanc.log", "wb"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{http}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{url}/system", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            log = (folder / "orthanc.log").read_text(errors="replace")[-3000:]
            process.kill()
            pytest.fail(f"Orthanc did not start on {url}:\n{log}")
        time.sleep(0.3)
    try:
        yield {"url": url, "dicomweb": f"{url}/dicom-web"}
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            process.kill()


def orthanc_store(server: dict, data: bytes) -> dict:
    """Store one DICOM file in Orthanc (its REST API, as a modality would)."""
    request = urllib.request.Request(f"{server['url']}/instances", data=data, method="POST",
                                     headers={"Content-Type": "application/dicom"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def orthanc_delete_all(server: dict) -> None:
    with urllib.request.urlopen(f"{server['url']}/patients", timeout=10) as response:
        patients = json.loads(response.read())
    for patient in patients:
        request = urllib.request.Request(f"{server['url']}/patients/{patient}", method="DELETE")
        urllib.request.urlopen(request, timeout=10).close()
