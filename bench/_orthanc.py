"""A real Orthanc PACS for benchmarks: Debian's ``orthanc`` and ``orthanc-dicomweb`` packages,
on loopback, with a throwaway storage folder (the same set-up as the PACS tests'
``tests/pacs/conftest.py``; a benchmark does not import from ``tests/``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from bench._server import free_port

ORTHANC = os.environ.get("ORTHANC_PATH", "/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class Orthanc:
    """``Orthanc(folder)`` starts one on free loopback ports, its storage and index under
    ``folder``; ``stop()`` ends it (its process group). ``url`` is the REST root,
    ``dicomweb`` the DICOMweb root. ``config`` adds to or overrides its configuration."""

    def __init__(self, folder: Path, *, config: dict | None = None, timeout: float = 60.0):
        if not Path(ORTHANC).exists() or not DICOMWEB_PLUGIN.exists():
            raise SystemExit(f"{ORTHANC} or its DICOMweb plugin not found: install them with "
                             "`apt-get install -y orthanc orthanc-dicomweb`")
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        http, dicom = free_port(), free_port()
        settings = {"Name": "medlabel-bench", "StorageDirectory": str(folder / "db"),
                    "IndexDirectory": str(folder / "db"), "HttpPort": http,
                    "DicomPort": dicom, "RemoteAccessAllowed": False,
                    "AuthenticationEnabled": False, "Plugins": [str(DICOMWEB_PLUGIN)],
                    "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, **(config or {})}
        (folder / "config.json").write_text(json.dumps(settings))
        self.log = folder / "orthanc.log"
        self.process = subprocess.Popen([ORTHANC, str(folder / "config.json")], cwd=folder,
                                        stdout=open(self.log, "wb"), stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self.url = f"http://127.0.0.1:{http}"
        self.dicomweb = f"{self.url}/dicom-web"
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.get("/system")
                break
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"Orthanc did not start on {self.url}:\n"
                                 f"{self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.3)

    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(f"{self.url}{path}", timeout=timeout) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict, timeout: float = 60):
        request = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body).encode(),
                                         method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def store(self, data: bytes) -> dict:
        """Store one DICOM file (its REST API, as a modality's gateway would)."""
        request = urllib.request.Request(f"{self.url}/instances", data=data, method="POST",
                                         headers={"Content-Type": "application/dicom"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait(timeout=10)
