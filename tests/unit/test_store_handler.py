"""node/handlers.py's C-STORE handler on a real file store and SQLite ledger: which sha256 it
records, the one computed while the data set arrived (handle_receiving) or one of its own."""

from __future__ import annotations

import hashlib
import multiprocessing
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from node import dimse
from node.handlers import OpenAssociations, handle_receiving, handle_store
from node.instance import file_meta
from node.ul import Association, Context
from storage.db import make_engine, migrate
from storage.filestore import FileStore
from storage.ledger import Ledger
from tests.dicom_factory import ct_slice, encode_explicit_le

CONTEXT = Context(CTImageStorage, ExplicitVRLittleEndian)


@pytest.fixture
def stored(tmp_path: Path) -> tuple[FileStore, Ledger]:
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    migrate(engine)
    return FileStore(tmp_path / "storage", 0), Ledger(engine)


SLICE = ct_slice("1.2.3", "1.2.3.4", 0, rows=16, cols=16)
DATA = encode_explicit_le(SLICE)
META = file_meta(CTImageStorage, str(SLICE.SOPInstanceUID), ExplicitVRLittleEndian, "STORESCU")


def send(stored: tuple[FileStore, Ledger], data: bytes, arrived: list[bytes]) -> tuple[int, str, bytes]:
    """handle_store as the upper layer calls it, the sink fed `arrived`; (status, sha, file)."""
    store, ledger = stored
    assoc = Association(None, "127.0.0.1", 104)
    assoc.calling_ae = "STORESCU"
    slots = OpenAssociations(4, multiprocessing.Array("i", 1), 0)
    rq = dimse.Command(dimse.C_STORE_RQ, 1, True, CTImageStorage, str(SLICE.SOPInstanceUID))
    running = handle_receiving(assoc, rq, CONTEXT)
    assert running is not None
    for fragment in arrived:
        running.update(memoryview(fragment))
    code = handle_store(
        assoc,
        rq,
        CONTEXT,
        bytearray(data),
        running,
        store=store,
        ledger=ledger,
        open_assocs=slots,
        max_inflated=1 << 20,
    )
    with ledger.engine.connect() as conn:
        path, sha = conn.exec_driver_sql("SELECT path, sha256 FROM instances").one()
    return code, sha, (store.root / path).read_bytes()


def test_the_hash_computed_on_arrival_is_the_one_recorded(stored: tuple[FileStore, Ledger]) -> None:
    code, sha, written = send(stored, DATA, [DATA[:100], DATA[100:]])
    assert code == 0 and written == META + DATA and sha == hashlib.sha256(written).hexdigest()


def test_the_hash_on_arrival_is_used_not_recomputed(stored: tuple[FileStore, Ledger]) -> None:
    """Fed other bytes than the data set, the running hash is what gets recorded: proof that
    the handler took it (the file meta matching, nothing dropped) instead of hashing again."""
    code, sha, _ = send(stored, DATA, [b"something else"])
    assert code == 0 and sha == hashlib.sha256(META + b"something else").hexdigest()
