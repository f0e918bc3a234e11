"""A seeded mutation fuzzer for the SCP (issue 19, item 7): real data sets and a real
A-ASSOCIATE-RQ, mutated (bytes flipped, lengths overwritten, cut, spliced), sent to a running
node over real associations. Each case must get a DIMSE status or a clean abort, the node must
keep answering C-ECHO, and its ledger must stay consistent with its storage. Used by
tests/integration/test_fuzz.py (a few hundred cases) and bench/fuzz.py (as many as asked)."""

from __future__ import annotations

import hashlib
import socket
import sqlite3
import struct
import tempfile
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.instance import file_meta
from tests.dicom_factory import UID_ROOT, ct_slice, encode_explicit_le
from tests.helpers import temp_files

SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)


def _implicit(ds: object) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, ds)  # type: ignore[arg-type]
    return fp.getvalue()


def seeds() -> list[tuple[str, str, bytes]]:
    """(SOP Instance UID, transfer syntax, data set bytes) of valid CT slices, one in each
    syntax the fuzzer uses."""
    out = []
    for ts in SYNTAXES:
        ds = ct_slice(generate_uid(UID_ROOT), generate_uid(UID_ROOT), 0, rows=16, cols=16)
        explicit = encode_explicit_le(ds)
        if ts == ImplicitVRLittleEndian:
            body = _implicit(ds)
        elif ts == DeflatedExplicitVRLittleEndian:
            packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
            body = packer.compress(explicit) + packer.flush()
        else:
            body = explicit
        out.append((str(ds.SOPInstanceUID), ts, body))
    return out


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One to three random mutations: flipped bytes, an overwritten 16/32-bit field (lengths),
    a cut, an inserted run, a duplicated chunk."""
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        if not out:
            break
        kind = int(rng.integers(5))
        at = int(rng.integers(len(out)))
        if kind == 0:
            for _ in range(int(rng.integers(1, 9))):
                out[int(rng.integers(len(out)))] ^= int(rng.integers(1, 256))
        elif kind == 1:
            value = int(rng.choice([0, 1, 0xFFFF, 0xFFFFFFFF, int(rng.integers(1 << 31))]))
            out[at : at + 4] = struct.pack("<L", value)[: len(out[at : at + 4])]
        elif kind == 2:
            del out[at:]
        elif kind == 3:
            out[at:at] = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
        else:
            end = min(len(out), at + int(rng.integers(1, 256)))
            out[at:at] = out[at:end]
    return bytes(out)


def association_rq(calling: str = "STORESCU", called: str = "ENHANCE") -> bytes:
    """A valid A-ASSOCIATE-RQ PDU proposing Verification, as pynetdicom encodes it."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    context = build_context(Verification)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    length = MaximumLengthNotification()
    length.maximum_length_received = 16384
    primitive.user_information = [length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


@dataclass
class Report:
    cases: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    pdu_answers: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)


class Fuzzer:
    """Sends mutated data sets (C-STORE) and mutated A-ASSOCIATE-RQs to the node on `port`."""

    def __init__(self, port: int, seed: int, timeout: float = 30.0) -> None:
        self.port = port
        self.rng = np.random.default_rng(seed)
        self.timeout = timeout
        self.seeds = seeds()
        self.rq = association_rq()
        self.report = Report()
        self._tmp = Path(tempfile.mkdtemp(prefix="fuzz-"))

    def _ae(self) -> AE:
        ae = AE(ae_title="STORESCU")
        for ts in SYNTAXES:
            ae.add_requested_context(CTImageStorage, ts)
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        return ae

    def echo(self) -> bool:
        assoc = self._ae().associate("127.0.0.1", self.port, ae_title="ENHANCE")
        if not assoc.is_established:
            return False
        status = assoc.send_c_echo()
        assoc.release()
        return bool(status) and int(status.Status) == 0

    def store_case(self, assoc: object) -> str:
        sop, ts, body = self.seeds[int(self.rng.integers(len(self.seeds)))]
        path = self._tmp / "case.dcm"
        path.write_bytes(file_meta(CTImageStorage, sop, ts, "FUZZ") + mutate(body, self.rng))
        status = assoc.send_c_store(path)  # type: ignore[attr-defined]
        return f"0x{int(status.Status):04X}" if status and "Status" in status else "no answer"

    def pdu_case(self) -> str:
        data = mutate(self.rq, self.rng)
        with socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout) as s:
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)  # nothing more will come: a stall is the node's to end
                first = s.recv(1)
            except (TimeoutError, OSError) as exc:
                return f"error {type(exc).__name__}" if not isinstance(exc, TimeoutError) else "timeout"
        return {b"\x02": "A-ASSOCIATE-AC", b"\x03": "A-ASSOCIATE-RJ", b"\x07": "A-ABORT", b"": "closed"}.get(
            first, f"PDU 0x{first.hex()}"
        )

    def run(self, cases: int, progress: Callable[[int], None] = lambda _n: None) -> Report:
        before = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True  # send each case's bytes as they are
        assoc = None
        try:
            for n in range(cases):
                if n % 4 == 3:
                    answer = self.pdu_case()
                    self.report.pdu_answers[answer] += 1
                    if answer == "timeout":
                        self.report.problems.append(f"case {n}: the node neither answered nor closed")
                else:
                    if assoc is None or not assoc.is_established:
                        assoc = self._ae().associate("127.0.0.1", self.port, ae_title="ENHANCE")
                        if not assoc.is_established:
                            self.report.problems.append(f"case {n}: association refused")
                            assoc = None
                            continue
                    self.report.statuses[self.store_case(assoc)] += 1
                self.report.cases += 1
                if n % 50 == 49:
                    if not self.echo():
                        self.report.problems.append(f"case {n}: the node stopped answering C-ECHO")
                    progress(n + 1)
        finally:
            if assoc is not None and assoc.is_established:
                assoc.release()
            _config.STORE_SEND_CHUNKED_DATASET = before
        if not self.echo():
            self.report.problems.append("the node does not answer C-ECHO after the run")
        return self.report


def ledger_problems(ledger: Path, storage: Path) -> list[str]:
    """Rows whose file is missing or holds other bytes, files no row names, temp files left."""
    problems = []
    with sqlite3.connect(ledger, timeout=30) as conn:
        rows = conn.execute("SELECT path, sha256, size FROM instances").fetchall()
        older = {p for (p,) in conn.execute("SELECT path FROM superseded_instances").fetchall()}
    named = set()
    for rel, sha, size in rows:
        named.add(rel)
        path = storage / rel
        if not path.exists():
            problems.append(f"missing file {rel}")
            continue
        data = path.read_bytes()
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha:
            problems.append(f"file {rel} differs from its ledger row")
    on_disk = {str(p.relative_to(storage)) for p in (storage / "objects").rglob("*.dcm")}
    problems += [f"file {rel} in no ledger row" for rel in sorted(on_disk - named - older)]
    problems += [f"temp file {p.name} left" for p in temp_files(storage)]
    return problems
