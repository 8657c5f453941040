"""A real Orthanc PACS for tests: config on free ports, temporary storage, DICOMweb plugin, started and stopped by PID.

Orthanc 1.10.1 has no bind-address setting: its HTTP and DICOM ports listen on all interfaces while a test runs.
The config keeps the traffic it serves loopback-only: ``RemoteAccessAllowed`` false (HTTP from other hosts refused)
and DIMSE find/get/move only for the one registered modality, checked against host 127.0.0.1
(``DicomCheckModalityHost``); storage (C-STORE) from other hosts is refused too (``DicomAlwaysAllowStore`` false).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from base64 import b64encode
from dataclasses import dataclass
from pathlib import Path

from federation import stop_pids

ORTHANC_BINARY = "Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
#: Why the Orthanc tests skip, where they do (the Makefile's system-tools target installs both packages as root).
SKIP_REASON = "Orthanc PACS not installed (apt-get install orthanc orthanc-dicomweb; `make test` does it as root)"
PACS_AET = "ORTHANC"
#: The calling AE title the tests' site uses; registered in Orthanc as a modality on 127.0.0.1.
CLIENT_AET = "FEDCT"


def orthanc_available() -> bool:
    """True when the Orthanc binary and its DICOMweb plugin are installed."""
    return shutil.which(ORTHANC_BINARY) is not None and Path(DICOMWEB_PLUGIN).is_file()


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class OrthancServer:
    """A running Orthanc: its ports, folder, optional basic-auth user and PID."""

    http_port: int
    dicom_port: int
    folder: Path
    pid: int
    user: tuple[str, str] | None = None
    move_port: int | None = None

    @property
    def url(self) -> str:
        """Base URL of the REST API."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """Base URL of the DICOMweb services (QIDO-RS, WADO-RS, STOW-RS)."""
        return f"{self.url}/dicom-web"

    @property
    def dimse_url(self) -> str:
        """``dicom://AET@host:port`` of the DIMSE services."""
        return f"dicom://{PACS_AET}@127.0.0.1:{self.dicom_port}"

    def rest(self, path: str, *, data: bytes | None = None, method: str | None = None) -> object:
        """Call Orthanc's REST API (JSON reply) as the configured user."""
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if self.user is not None:
            request.add_header("Authorization", "Basic " + b64encode(f"{self.user[0]}:{self.user[1]}".encode()).decode())
        if data is not None:
            request.add_header("Content-Type", "application/dicom")
        with urllib.request.urlopen(request, timeout=30) as reply:
            body = reply.read()
        return json.loads(body) if body else None

    def upload_folder(self, folder: Path) -> int:
        """Upload every file under ``folder`` through the REST API; return the number stored."""
        n = 0
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file() and path.suffix != ".csv":
                self.rest("/instances", data=path.read_bytes())
                n += 1
        return n

    def instance_count(self) -> int:
        """How many instances Orthanc stores."""
        return len(self.rest("/instances"))  # type: ignore[arg-type]


def write_config(
    folder: Path, *, http_port: int, dicom_port: int, user: tuple[str, str] | None = None, move_port: int | None = None
) -> Path:
    """Write an Orthanc configuration (storage under ``folder``, DICOMweb plugin) and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "fedct-test-pacs",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "storage"),
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "DicomServerEnabled": True,
        "DicomAet": PACS_AET,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": True,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": user is not None,
        "RegisteredUsers": {user[0]: user[1]} if user else {},
        "DicomAlwaysAllowEcho": False,
        "DicomAlwaysAllowStore": False,
        "DicomAlwaysAllowFind": False,
        "DicomAlwaysAllowGet": False,
        "DicomAlwaysAllowMove": False,
        "DicomCheckModalityHost": True,
        "DicomModalities": {"fedct": [CLIENT_AET, "127.0.0.1", move_port or 1]},
        "SaveJobs": False,
        "ConcurrentJobs": 1,
        "HttpThreadsCount": 8,
        "StableAge": 1,
        "LimitFindResults": 0,
        "LimitFindInstances": 0,
    }
    path = folder / "orthanc.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def start_orthanc(
    folder: Path, *, user: tuple[str, str] | None = None, move_port: int | None = None, timeout: float = 30.0
) -> OrthancServer:
    """Start Orthanc with a fresh config under ``folder``; wait until ``/system`` answers."""
    http_port, dicom_port = free_port(), free_port()
    config = write_config(folder, http_port=http_port, dicom_port=dicom_port, user=user, move_port=move_port)
    log = open(folder / "orthanc.log", "wb")  # noqa: SIM115 - closed with the process
    # TCP_NODELAY=1: DCMTK (Orthanc's DIMSE layer) then disables Nagle's algorithm; without it every C-GET
    # sub-operation waits ~50 ms for a delayed ACK.
    env = {**os.environ, "TCP_NODELAY": "1"}
    process = subprocess.Popen([ORTHANC_BINARY, str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=folder, env=env)
    log.close()
    server = OrthancServer(http_port, dicom_port, folder, process.pid, user, move_port)
    deadline = time.monotonic() + timeout
    while True:
        try:
            server.rest("/system")
            return server
        except (urllib.error.URLError, ConnectionError, OSError) as exc:
            if process.poll() is not None or time.monotonic() > deadline:
                stop_orthanc(server)
                tail = (folder / "orthanc.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"Orthanc did not start ({exc}); log:\n{tail}") from exc
            time.sleep(0.1)


def stop_orthanc(server: OrthancServer) -> None:
    """Stop the Orthanc process by its PID."""
    stop_pids([server.pid])
