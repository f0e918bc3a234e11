"""Issue 19, items 2, 4 and 5: what a peer may not send, through real associations with a
running node. pynetdicom sends each file's data set bytes exactly as they are
(STORE_SEND_CHUNKED_DATASET), which is how a misbehaving sender is made."""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config

from node.instance import file_meta
from storage.filestore import content_matches_name
from tests.dicom_factory import UID_ROOT, ct_slice, encode_explicit_le
from tests.helpers import NodeProcess, peak_rss, wait_for
from tests.onnx_models import identity

GIB = 1 << 30


@pytest.fixture(autouse=True)
def raw_file_sending() -> Iterator[None]:
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    yield
    _config.STORE_SEND_CHUNKED_DATASET = before


def send(port: int, path: Path, ts: str = ExplicitVRLittleEndian) -> int:
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage, ts)
    ae.dimse_timeout = ae.network_timeout = 120
    assoc = ae.associate("127.0.0.1", port, ae_title="ENHANCE")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()


def write(tmp: Path, name: str, sop: str, body: bytes, ts: str = ExplicitVRLittleEndian) -> Path:
    path = tmp / name
    path.write_bytes(file_meta(CTImageStorage, sop, ts, "SENDER") + body)
    return path


def slice_bytes(rows: int = 32, **changes: object) -> tuple[str, bytes]:
    ds = ct_slice(generate_uid(UID_ROOT), generate_uid(UID_ROOT), 0, rows=rows, cols=rows)
    for key, value in changes.items():
        setattr(ds, key, value)
    return str(ds.SOPInstanceUID), encode_explicit_le(ds)


def refusals(node: NodeProcess) -> list[tuple[str, int, str]]:
    kinds = "('store.refused', 'instance.malformed', 'instance.elements_discarded')"
    return node.query(f"SELECT kind, status, detail FROM events WHERE kind IN {kinds} ORDER BY id")  # type: ignore[return-value]


def identity_node(node_factory, tmp_path: Path) -> NodeProcess:  # type: ignore[no-untyped-def]
    """A node whose one route sends every series through an identity model (a worker runs)."""
    identity(tmp_path / "models" / "identity")
    return node_factory(  # type: ignore[no-any-return]
        idle_seconds=0.5,
        worker_processes=1,
        worker=f'models_dir = "{tmp_path / "models"}"\nheartbeat_seconds = 0.2\nstale_after_seconds = 1.5',
        extra='[[routes]]\nname = "ct"\nmodel = "identity"\ndestinations = []\n',
    ).start()


def test_a_deflate_bomb_is_refused_without_the_node_holding_it(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """1 MB of Deflated Explicit VR Little Endian that inflates to 1 GiB: 0xC000, an event,
    nothing stored, and no receiving process grew by 100 MB."""
    node = node_factory(receive_processes=1).start()
    ds = ct_slice(generate_uid(UID_ROOT), generate_uid(UID_ROOT), 0, rows=8, cols=8)
    del ds.PixelData
    head = encode_explicit_le(ds) + struct.pack("<HH", 0x7FE0, 0x0010) + b"OW\x00\x00" + struct.pack("<L", GIB)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    body = packer.compress(head) + b"".join(packer.compress(zeros) for _ in range(GIB >> 20)) + packer.flush()
    assert len(body) < 2 << 20
    path = write(tmp_path, "bomb.dcm", str(ds.SOPInstanceUID), body, DeflatedExplicitVRLittleEndian)
    receivers = node.receivers()
    before = peak_rss(receivers)

    assert send(node.port, path, DeflatedExplicitVRLittleEndian) == 0xC000

    assert peak_rss(receivers) - before < 100 << 20
    assert node.query("SELECT count(*) FROM instances") == [(0,)]
    [(kind, status, detail)] = refusals(node)
    assert (kind, status) == ("store.refused", 0xC000)
    assert "inflates beyond 512 MiB (node.max_inflated_mb)" in detail
    assert list((node.storage / "objects").rglob("*.dcm")) == []


def test_a_small_deflated_data_set_is_stored(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    node = node_factory().start()
    sop, body = slice_bytes()
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    path = write(tmp_path, "ok.dcm", sop, packer.compress(body) + packer.flush(), DeflatedExplicitVRLittleEndian)
    assert send(node.port, path, DeflatedExplicitVRLittleEndian) == 0x0000
    assert node.query("SELECT count(*) FROM instances") == [(1,)]


def test_file_meta_inside_the_data_set_is_dropped_and_the_node_keeps_its_own(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A peer's data set that starts with (0002,0016) Source AE "SPOOF" (pynetdicom encodes the
    element it is given): stored without it, 0xB006, and the stored file's meta is the node's."""
    node = node_factory().start()
    ds = ct_slice(generate_uid(UID_ROOT), generate_uid(UID_ROOT), 0, rows=32, cols=32)
    body = encode_explicit_le(ds)
    ds.add_new(0x00020016, "AE", "SPOOF")  # in the data set itself, not in its file meta
    _config.STORE_SEND_CHUNKED_DATASET = False
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="ENHANCE")
    assert assoc.is_established
    status = assoc.send_c_store(ds).Status
    assoc.release()
    assert status == 0xB006
    [(rel, ae_title, sha)] = node.query("SELECT path, calling_ae, sha256 FROM instances")
    stored = node.storage / rel
    assert ae_title == "STORESCU"
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == sha  # not what arrived: that held the element
    assert content_matches_name(rel, sha)
    assert dcmread(stored).file_meta.SourceApplicationEntityTitle.strip() == "STORESCU"
    assert stored.read_bytes().endswith(body)  # the rest byte for byte
    assert refusals(node) == [
        ("instance.elements_discarded", 0xB006, "1 File Meta element(s) (group 0002) in the data set dropped")
    ]


def test_pixel_data_cut_mid_element_is_refused(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    node = node_factory().start()
    sop, body = slice_bytes()
    assert send(node.port, write(tmp_path, "cut.dcm", sop, body[:-100])) == 0xC000
    assert node.query("SELECT count(*) FROM instances") == [(0,)]
    [(kind, status, detail)] = refusals(node)
    assert (kind, status) == ("store.refused", 0xC000)
    assert "data set ends inside element (7FE0,0010): 2048 bytes said, 1948 there" in detail


@pytest.mark.parametrize("uid", ["1.2.3.abc", "1.2..3", "1.2.3/../4"])
def test_a_uid_with_characters_a_uid_may_not_hold_is_refused(node_factory, tmp_path: Path, uid: str) -> None:  # type: ignore[no-untyped-def]
    node = node_factory().start()
    sop, body = slice_bytes(StudyInstanceUID=uid)
    assert send(node.port, write(tmp_path, "uid.dcm", sop, body)) == 0xA900
    assert node.query("SELECT count(*) FROM instances") == [(0,)]
    [(_, status, detail)] = refusals(node)
    assert (status, detail) == (0xA900, "StudyInstanceUID holds characters a UID may not")


def test_pixel_data_of_the_wrong_length_is_stored_with_a_warning_and_its_series_fails_with_the_reason(
    node_factory,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    node = identity_node(node_factory, tmp_path)
    sop, body = slice_bytes(rows=64, Rows=63)  # 64 x 64 pixels sent for a 63 x 64 image
    assert send(node.port, write(tmp_path, "long.dcm", sop, body)) == 0xB007
    [(kind, status, detail)] = refusals(node)
    assert (kind, status) == ("instance.malformed", 0xB007)
    assert detail == "Pixel Data holds 8192 bytes, Rows x Columns x frames x samples x bits say 8064"
    rows = wait_for(lambda: node.query("SELECT state, attempts, error FROM jobs WHERE state = 'failed'"), timeout=60)
    assert rows[0][1] == 1 and detail in rows[0][2]  # permanent, with the reason


def test_a_jpeg2000_bomb_fails_its_job_without_being_decoded(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A 64x64 JPEG 2000 slice whose codestream declares 65535 x 65535 (8 GiB decoded): stored
    as sent, and its job fails at once with the reason; the worker process stays up."""
    from pydicom.encaps import encapsulate, generate_frames
    from pydicom.uid import JPEG2000Lossless

    node = identity_node(node_factory, tmp_path)
    ds = ct_slice(generate_uid(UID_ROOT), generate_uid(UID_ROOT), 0, rows=64, cols=64)
    ds.compress(JPEG2000Lossless)
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    at = frame.find(b"\xff\x4f\xff\x51")
    frame[at + 8 : at + 16] = struct.pack(">LL", 65535, 65535)
    ds.PixelData = encapsulate([bytes(frame)])
    path = tmp_path / "bomb.dcm"
    ds.save_as(path, enforce_file_format=True)
    _config.STORE_SEND_CHUNKED_DATASET = False
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage, JPEG2000Lossless)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="ENHANCE")
    assert assoc.is_established
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    rows = wait_for(lambda: node.query("SELECT attempts, error FROM jobs WHERE state = 'failed'"), timeout=60)
    assert rows[0][0] == 1
    assert "JPEG 2000 frame 0 declares 65535x65535 with 1 component(s), the image is 64x64 with 1" in rows[0][1]
    assert "worker process 0 exited" not in node.log_text()
