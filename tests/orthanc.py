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
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from dataclasses import dataclass, field
from pathlib import Path

from federation import stop_pids

#: Debian installs the server in /usr/sbin, which is not on every user's PATH.
ORTHANC_BINARY = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
#: Why the Orthanc tests skip, where they do (the Makefile's system-tools target installs both packages as root).
SKIP_REASON = "missing system tool or test dependency: Orthanc PACS (apt-get install orthanc orthanc-dicomweb; `make test` does it as root)"
PACS_AET = "ORTHANC"
#: The calling AE title the tests' site uses; registered in Orthanc as a modality on 127.0.0.1.
CLIENT_AET = "FEDCT"


def orthanc_available() -> bool:
    """True when the Orthanc binary and its DICOMweb plugin are installed."""
    return os.access(ORTHANC_BINARY, os.X_OK) and Path(DICOMWEB_PLUGIN).is_file()


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
    process: subprocess.Popen | None = field(default=None, compare=False, repr=False)

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
            request.add_header(
                "Authorization", "Basic " + b64encode(f"{self.user[0]}:{self.user[1]}".encode()).decode()
            )
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

    def clear(self) -> None:
        """Delete every stored study (REST), so that one server can serve several tests."""
        for patient in self.rest("/patients"):  # type: ignore[union-attr]
            self.rest(f"/patients/{patient}", method="DELETE")

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
    server = OrthancServer(http_port, dicom_port, folder, process.pid, user, move_port, process)
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
    if server.process is not None:
        server.process.wait(timeout=5)  # already reaped: this only records the exit for Popen


class FaultyProxy:
    """An HTTP reverse proxy in front of a PACS (a thread of the test process) that counts requests and can fail them.

    ``fail_status`` answers every request with that status; ``fail_first`` fails only the first N requests;
    ``wado_budget`` lets that many WADO-RS requests through, then fails every later one (a PACS going down mid-pull).
    ``counts`` maps 'qido' / 'wado' / 'stow' / 'other' to the number of requests forwarded; ``failed`` counts refusals.
    """

    def __init__(self, upstream: str, *, fail_status: int = 503) -> None:
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        self.upstream = urlsplit(upstream)
        self.fail_status = fail_status
        self.fail_all = False
        self.fail_first = 0
        self.wado_budget: int | None = None
        self.counts: dict[str, int] = {"qido": 0, "wado": 0, "stow": 0, "other": 0}
        self.failed = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                return

            def _handle(self) -> None:
                body = self._body()
                kind = proxy._kind(self.command, self.path)
                if proxy._should_fail(kind):
                    payload = b"service unavailable (test proxy)"
                    self.send_response(proxy.fail_status)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                skip = ("host", "connection", "transfer-encoding", "content-length")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                conn.request(self.command, self.path, body=body, headers=headers)
                reply = conn.getresponse()
                data = reply.read()
                self.send_response(reply.status)
                for key, value in reply.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            def _body(self) -> bytes | None:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":  # STOW-RS from dicomweb-client
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(chunks)
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else None

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: object, client_address: object) -> None:  # a client hanging up is fine
                if not isinstance(sys.exc_info()[1], ConnectionError):
                    super().handle_error(request, client_address)

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        """The proxy's DICOMweb base URL (same path as upstream)."""
        return f"http://127.0.0.1:{self.server.server_address[1]}{self.upstream.path}"

    @staticmethod
    def _kind(method: str, path: str) -> str:
        """stow: POST; wado: GET of .../series/UID or .../instances/UID; qido: GET of .../studies|series|instances."""
        parts = path.partition("?")[0].rstrip("/").split("/")
        if method == "POST":
            return "stow"
        if len(parts) >= 2 and parts[-2] in ("series", "instances"):
            return "wado"
        return "qido" if parts[-1] in ("studies", "series", "instances") else "other"

    def _should_fail(self, kind: str) -> bool:
        with self._lock:
            if self.fail_all or self.fail_first > 0:
                self.fail_first = max(0, self.fail_first - 1)
                self.failed += 1
                return True
            if kind == "wado" and self.wado_budget is not None:
                if self.wado_budget <= 0:
                    self.failed += 1
                    return True
                self.wado_budget -= 1
            self.counts[kind] += 1
            return False

    def reset(self) -> None:
        """Pass everything through again and zero the counters."""
        with self._lock:
            self.fail_all, self.fail_first, self.wado_budget, self.failed = False, 0, None, 0
            self.counts = dict.fromkeys(self.counts, 0)

    def close(self) -> None:
        """Stop serving (the thread ends)."""
        self.server.shutdown()
        self.server.server_close()
