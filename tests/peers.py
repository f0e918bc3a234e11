"""Real DICOM peers the node delivers to: Orthanc (Debian package) started on loopback with a
temp config and storage, and pynetdicom storage SCPs whose answers a test chooses (a status
such as 0xA700, an abort after some instances, a slow store) for faults Orthanc does not make
on demand. Both are real associations on loopback."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.helpers import free_port, wait_for


@dataclass
class Orthanc:
    """Orthanc as a PACS: DICOM on `dicom_port` (AE `aet`), REST on `http_port`."""

    tmp: Path
    aet: str = "ORTHANC"
    check_called_aet: bool = False
    modalities: dict[str, tuple[str, int]] = field(default_factory=dict)  # name -> (AE, port) on 127.0.0.1
    store_delay: float = 0.0  # seconds each received instance takes (a Lua filter), for a slow PACS
    # log the SOP Instance UID of every C-STORE received, resends of stored instances included
    # (Orthanc keeps one copy and counts one: only its filter sees the second); see received()
    log_received: bool = False
    lua: str = ""  # a Lua script Orthanc runs (e.g. auto-routing with OnStoredInstance)
    dicom_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Orthanc:
        binary = shutil.which("Orthanc")
        if binary is None:
            pytest.fail("Orthanc not found: `make test` installs the Debian package orthanc")
        self.tmp.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "enhance-node-test",
            "StorageDirectory": str(self.tmp / "storage"),
            "IndexDirectory": str(self.tmp / "index"),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "HttpServerEnabled": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
            "DicomCheckCalledAet": self.check_called_aet,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowMove": True,
            "DicomModalities": {name: [ae, "127.0.0.1", port] for name, (ae, port) in self.modalities.items()},
            "StorageCompression": False,
            "SaveJobs": False,
        }
        scripts = []
        if self.store_delay or self.log_received:
            body = []
            if self.log_received:
                body.append(f'  local log = io.open("{self.received_log}", "a")')
                body.append('  log:write(dicom.SOPInstanceUID, "\\n")')
                body.append("  log:close()")
            if self.store_delay:
                body.append(f'  os.execute("sleep {self.store_delay}")')
            received = self.tmp / "received.lua"
            received.write_text(
                "function ReceivedInstanceFilter(dicom, origin, info)\n" + "\n".join(body) + "\n  return true\nend\n"
            )
            scripts.append(str(received))
        if self.lua:
            script = self.tmp / "script.lua"
            script.write_text(self.lua)
            scripts.append(str(script))
        if scripts:
            config["LuaScripts"] = scripts
        path = self.tmp / "orthanc.json"
        path.write_text(json.dumps(config))
        log = (self.tmp / "orthanc.log").open("ab")
        self.proc = subprocess.Popen([binary, str(path)], stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._ready, timeout=60, what="Orthanc to answer")
        return self

    @property
    def received_log(self) -> Path:
        return self.tmp / "received.txt"

    def received(self) -> list[str]:
        """SOP Instance UIDs of every C-STORE Orthanc received (with `log_received`), in order,
        each as often as it was sent."""
        return self.received_log.read_text().split() if self.received_log.exists() else []

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"Orthanc exited {self.proc.returncode}: {(self.tmp / 'orthanc.log').read_text()}")
        try:
            self.get("/system")
            return True
        except (urllib.error.URLError, ConnectionError):
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def kill(self) -> None:
        """SIGKILL: Orthanc crashes mid-association (a clean stop waits for associations)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=60)

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=30) as rsp:
            return json.loads(rsp.read())

    def post(self, path: str, body: str) -> Any:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body.encode(), method="POST")
        with urllib.request.urlopen(req, timeout=30) as rsp:
            return json.loads(rsp.read())

    def series(self, series_uid: str) -> dict[str, Any] | None:
        """Orthanc's record of a series by its DICOM UID (with its instance ids), or None."""
        found = [r for r in self.post("/tools/lookup", series_uid) if r["Type"] == "Series"]
        return self.get(f"/series/{found[0]['ID']}") if found else None

    def instance_count(self, series_uid: str) -> int:
        s = self.series(series_uid)
        return len(s["Instances"]) if s else 0


class StoreSCP:
    """A pynetdicom storage SCP that records what it was sent and answers what `answer`
    returns for each C-STORE (0x0000 by default); `abort_after` aborts the association after
    that many stores, `delay` makes each store slow."""

    def __init__(self, ae_title: str = "PEER") -> None:
        self.ae_title = ae_title
        self.port = free_port()
        self.answer = lambda _ds: 0x0000
        self.abort_after: int | None = None
        self.delay = 0.0
        self.received: list[str] = []  # SOP Instance UIDs answered success, in order
        self.requests = 0
        self._lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        self._ae = ae
        self._server: Any = None

    def _on_store(self, event: Any) -> int:
        time.sleep(self.delay)
        with self._lock:
            self.requests += 1
            if self.abort_after is not None and self.requests > self.abort_after:
                self.abort_after = None
                event.assoc.abort()
                return 0xA700
            ds = event.dataset
            status = self.answer(ds)
            if status in (0x0000, 0xB000, 0xB006, 0xB007):
                self.received.append(str(ds.SOPInstanceUID))
            return status

    def start(self) -> StoreSCP:
        self._server = self._ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
