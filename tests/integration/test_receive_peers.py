"""Receiving from real peers on loopback: DCMTK echoscu/storescu, pynetdicom as an SCU and the
`enhance-node echo` command, against `enhance-node serve` run as a subprocess.

Each test checks what the peer was answered and what the ledger and the file store hold
afterwards (DESIGN 3.3, 3.7). Nothing is mocked; the pydicom files are those shipped inside
the installed pydicom package (never downloaded).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.sender import peer_answer
from tests.dicom_factory import UID_ROOT, ct_slice, write_ct_series
from tests.helpers import REPO, NodeProcess, dcmtk_env, free_port, require, storescu, temp_files, wait_for

# One file per transfer syntax, all with distinct SOP Instance UIDs (several pydicom files
# share one), each with its study and series UIDs (the node refuses instances without them).
PYDICOM_FILES = {
    "CT_small.dcm": ExplicitVRLittleEndian,
    "SC_rgb_jpeg_dcmd.dcm": ImplicitVRLittleEndian,
    "ExplVR_BigEnd.dcm": ExplicitVRBigEndian,
    "image_dfl.dcm": DeflatedExplicitVRLittleEndian,
    "SC_rgb_jpeg_dcmtk.dcm": JPEGBaseline8Bit,
    "JPEG-lossy.dcm": JPEGExtended12Bit,
    "MR_small_jpeg_ls_lossless.dcm": JPEGLSLossless,
    "GDCMJ2K_TextGBR.dcm": JPEG2000Lossless,
    "JPEG2000.dcm": JPEG2000,
    "SC_rgb_rle.dcm": RLELossless,
}

# storescu option that makes the file's own transfer syntax the preferred one; with -R
# (only the SOP classes of the files) storescu then picks the context in that syntax.
STORESCU_TS_OPTION = {
    ImplicitVRLittleEndian: "-xi",
    ExplicitVRLittleEndian: "-xe",
    ExplicitVRBigEndian: "-xb",
    DeflatedExplicitVRLittleEndian: "-xd",
    JPEGBaseline8Bit: "-xy",
    JPEGExtended12Bit: "-xx",
    JPEGLSLossless: "-xt",
    JPEG2000Lossless: "-xv",
    JPEG2000: "-xw",
    RLELossless: "-xr",
}


def pydicom_file(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.fail(f"{name} is not shipped in the installed pydicom package (nothing may be downloaded)")
    return Path(str(path))


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a Part 10 file: everything after the File Meta Information."""
    _meta, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def differing_elements(a: Dataset, b: Dataset, where: str = "") -> list[str]:
    """Elements whose values differ, recursing into sequences.

    Group lengths (gggg,0000) and Data Set Trailing Padding (FFFC,FFFC) are left out: a
    sender may drop them on the network (DCMTK does). VRs are not compared: DCMTK corrects
    a wrong VR (OW for encapsulated Pixel Data) when it re-encodes a file.
    """
    tags = sorted({t for t in (*a.keys(), *b.keys()) if t.element != 0 and t != 0xFFFCFFFC})
    diffs: list[str] = []
    for tag in tags:
        if tag not in a or tag not in b:
            diffs.append(f"{where}{tag} present on one side only")
            continue
        x, y = a[tag], b[tag]
        if x.VR == "SQ" or y.VR == "SQ":
            if len(x.value) != len(y.value):
                diffs.append(f"{where}{tag} has {len(x.value)} vs {len(y.value)} items")
                continue
            for i, (p, q) in enumerate(zip(x.value, y.value, strict=True)):
                diffs += differing_elements(p, q, f"{where}{tag}[{i}].")
        elif x.value != y.value:
            diffs.append(f"{where}{tag} {x.keyword or 'private'}")
    return diffs


def instance_row(node: NodeProcess, sop_uid: str) -> tuple[str, str, str, int, str]:
    rows = node.query(
        "SELECT transfer_syntax_uid, path, sha256, size, calling_ae FROM instances WHERE sop_instance_uid = ?", sop_uid
    )
    assert len(rows) == 1, f"{sop_uid}: {len(rows)} ledger rows"
    return rows[0]  # type: ignore[return-value]


def object_files(node: NodeProcess) -> list[Path]:
    return sorted((node.storage / "objects").rglob("*.dcm"))


def events(node: NodeProcess, kind: str) -> list[tuple[str | None, str | None, str | None, int | None, str]]:
    return node.query(  # type: ignore[return-value]
        "SELECT calling_ae, peer_host, sop_instance_uid, status, detail FROM events WHERE kind = ? ORDER BY id", kind
    )


def scu(ae_title: str = "STORESCU", *contexts: tuple[str, str]) -> AE:
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for abstract, ts in contexts:
        ae.add_requested_context(abstract, ts)
    return ae


def accepts(ae: AE, port: int) -> bool:
    """Whether the node accepts a new association now (released at once when it does)."""
    assoc = ae.associate("127.0.0.1", port, ae_title="ENHANCE")
    if assoc.is_established:
        assoc.release()
        return True
    return False


@pytest.fixture
def raw_file_sending() -> Iterator[None]:
    """pynetdicom sends a file's dataset bytes exactly as they are in the file, undecoded.

    With this option the C-STORE's Affected SOP Class/Instance UIDs and the context come
    from the File Meta Information, not from the dataset: how a misbehaving sender is made.
    """
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    yield
    _config.STORE_SEND_CHUNKED_DATASET = before


# -- C-ECHO ----------------------------------------------------------------------------------


def test_echoscu_gets_success(node_factory) -> None:
    node = node_factory().start()
    r = subprocess.run(
        [require("echoscu"), "-aet", "STORESCU", "-aec", "ENHANCE", "127.0.0.1", str(node.port)],
        capture_output=True,
        text=True,
        env=dcmtk_env(),
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    wait_for(
        lambda: node.query("SELECT outcome FROM associations WHERE calling_ae = 'STORESCU'") == [("released",)],
        what="the echo association to be recorded as released",
    )


def _enhance_node(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def test_enhance_node_echo_exit_codes(node_factory) -> None:
    node = node_factory().start()

    ok = _enhance_node("echo", f"ENHANCE@127.0.0.1:{node.port}", "--calling-ae", "STORESCU")
    assert ok.returncode == 0, ok.stderr
    assert "success" in ok.stdout

    closed = _enhance_node("echo", f"ENHANCE@127.0.0.1:{free_port()}", "--calling-ae", "STORESCU", "--timeout", "5")
    assert closed.returncode == 1, closed.stdout + closed.stderr
    assert "cannot connect" in closed.stderr

    wrong = _enhance_node("echo", f"NOTTHENODE@127.0.0.1:{node.port}", "--calling-ae", "STORESCU")
    assert wrong.returncode == 1, wrong.stdout + wrong.stderr
    assert "association rejected" in wrong.stderr and "Called AE title not recognised" in wrong.stderr, wrong.stderr

    for bad in ("ENHANCE-127.0.0.1-11112", "ENHANCE@127.0.0.1", "ENHANCE@127.0.0.1:99999", "@127.0.0.1:104"):
        r = _enhance_node("echo", bad, "--calling-ae", "STORESCU")
        assert r.returncode == 2, (bad, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "AE@HOST:PORT" in lines[0], (bad, r.stderr)


# -- C-STORE from DCMTK and pynetdicom ---------------------------------------------------------


def test_storescu_sends_pydicom_files_in_their_own_transfer_syntax(node_factory) -> None:
    """Uncompressed, deflated, big-endian and compressed files, each in its own syntax.

    DCMTK re-encodes a file before sending it (drops trailing padding, writes sequences with
    explicit lengths, fixes VRs), so the stored dataset is compared element by element with
    the original here; the next test checks byte-for-byte storage with a sender that sends
    the file's bytes unchanged.
    """
    node = node_factory().start()
    for name, ts in PYDICOM_FILES.items():
        path = pydicom_file(name)
        assert dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == ts, name
        r = storescu(node.port, [path], "-v", "-R", STORESCU_TS_OPTION[ts], timeout=60)
        assert r.returncode == 0, f"{name}: storescu exit {r.returncode}\n{r.stderr}"
        assert "Received Store Response (Success)" in r.stdout + r.stderr, f"{name}:\n{r.stdout}{r.stderr}"

    assert node.query("SELECT count(*) FROM instances") == [(len(PYDICOM_FILES),)]
    for name, ts in PYDICOM_FILES.items():
        original = dcmread(pydicom_file(name))
        row_ts, rel, sha, size, calling = instance_row(node, str(original.SOPInstanceUID))
        assert (row_ts, calling) == (ts, "STORESCU"), name
        stored_path = node.storage / rel
        data = stored_path.read_bytes()
        assert (hashlib.sha256(data).hexdigest(), len(data)) == (sha, size), name
        stored = dcmread(stored_path)
        assert stored.file_meta.TransferSyntaxUID == ts, name
        assert stored.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID, name
        assert differing_elements(stored, original) == [], name
        assert stored.PixelData == original.PixelData, name


def test_stored_dataset_is_byte_for_byte_what_was_sent(node_factory, raw_file_sending) -> None:
    """pynetdicom sends each file's dataset bytes verbatim; the node must store exactly them."""
    node = node_factory().start()
    files = {name: pydicom_file(name) for name in PYDICOM_FILES}
    contexts = {
        (str(dcmread(p, stop_before_pixels=True).SOPClassUID), ts)
        for p, ts in zip(files.values(), PYDICOM_FILES.values(), strict=True)
    }
    assoc = scu("STORESCU", *sorted(contexts)).associate("127.0.0.1", node.port, ae_title="ENHANCE")
    assert assoc.is_established
    try:
        statuses = {name: assoc.send_c_store(path).get("Status") for name, path in files.items()}
    finally:
        assoc.release()
    assert statuses == dict.fromkeys(files, 0x0000)

    for name, path in files.items():
        sop_uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        row_ts, rel, sha, size, _ = instance_row(node, sop_uid)
        assert row_ts == PYDICOM_FILES[name], name
        stored_path = node.storage / rel
        data = stored_path.read_bytes()
        assert (hashlib.sha256(data).hexdigest(), len(data)) == (sha, size), name
        assert dataset_bytes(stored_path) == dataset_bytes(path), (
            f"{name}: stored dataset bytes differ from the sent ones"
        )


def test_pynetdicom_scu_stores_synthetic_ct(node_factory, tmp_path: Path) -> None:
    node = node_factory().start()
    _study, series_uid, paths = write_ct_series(tmp_path / "ct", 3, rows=64, cols=64)
    assoc = scu("STORESCU", (CTImageStorage, ExplicitVRLittleEndian)).associate(
        "127.0.0.1", node.port, ae_title="ENHANCE"
    )
    assert assoc.is_established
    try:
        statuses = [assoc.send_c_store(dcmread(p)).get("Status") for p in paths]
    finally:
        assoc.release()
    assert statuses == [0x0000] * 3

    sent = sorted(str(dcmread(p).SOPInstanceUID) for p in paths)
    rows = node.query(
        "SELECT i.sop_instance_uid, i.calling_ae, i.sop_class_uid, s.series_instance_uid, s.instance_count, s.modality "
        "FROM instances i JOIN series s ON s.id = i.series_id ORDER BY i.sop_instance_uid"
    )
    assert [r[0] for r in rows] == sent
    assert {r[1:] for r in rows} == {("STORESCU", CTImageStorage, series_uid, 3, "CT")}
    assert len(object_files(node)) == 3
    wait_for(
        lambda: (
            node.query("SELECT outcome, instances_stored, tls, peer_host FROM associations")
            == [("released", 3, 0, "127.0.0.1")]
        ),
        what="the association to be recorded as released with 3 instances",
    )


# -- association policy ------------------------------------------------------------------------


def test_unknown_calling_or_called_ae_is_rejected_and_recorded(node_factory, tmp_path: Path) -> None:
    node = node_factory().start()
    _study, _series, paths = write_ct_series(tmp_path / "ct", 1, rows=32, cols=32)
    for calling, called, dcmtk_says in (
        ("UNKNOWN", "ENHANCE", "Reason: Calling AE Title Not Recognized"),
        ("STORESCU", "WRONG", "Reason: Called AE Title Not Recognized"),
    ):
        r = storescu(node.port, paths, calling=calling, called=called, timeout=60)
        assert r.returncode != 0, (calling, called, r.stderr)
        assert "Association Rejected" in r.stderr and dcmtk_says in r.stderr, r.stderr
        assert "Rejected Permanent" in r.stderr, r.stderr

    rejected = wait_for(
        lambda: (rows := events(node, "association.rejected")) and len(rows) == 2 and rows,
        what="two association.rejected events",
    )
    assert [(ae, host) for ae, host, *_ in rejected] == [("UNKNOWN", "127.0.0.1"), ("STORESCU", "127.0.0.1")]
    assert "calling AE 'UNKNOWN' is not in node.allowed" in rejected[0][4]
    assert "called AE 'WRONG'" in rejected[1][4]
    assert node.query("SELECT count(*) FROM instances") == [(0,)]
    assert node.query("SELECT count(*) FROM associations") == [(0,)]
    assert object_files(node) == []


def test_allowed_ae_from_another_host_is_rejected(node_factory, tmp_path: Path) -> None:
    node = node_factory(allowed=[("STORESCU", "127.0.0.2")]).start()
    _study, _series, paths = write_ct_series(tmp_path / "ct", 1, rows=32, cols=32)

    r = storescu(node.port, paths, timeout=60)  # from 127.0.0.1
    assert r.returncode != 0, r.stderr
    assert "Association Rejected" in r.stderr and "Calling AE Title Not Recognized" in r.stderr, r.stderr
    rejected = wait_for(lambda: events(node, "association.rejected"), what="an association.rejected event")
    assert [(e[0], e[1]) for e in rejected] == [("STORESCU", "127.0.0.1")]
    assert "not allowed from 127.0.0.1" in rejected[0][4]
    assert node.query("SELECT count(*) FROM instances") == [(0,)]

    # The same AE from its own address is accepted: the rejection was about the host.
    assoc = scu("STORESCU", (CTImageStorage, ExplicitVRLittleEndian)).associate(
        "127.0.0.1", node.port, ae_title="ENHANCE", bind_address=("127.0.0.2", 0)
    )
    assert assoc.is_established
    try:
        assert assoc.send_c_store(dcmread(paths[0])).get("Status") == 0x0000
    finally:
        assoc.release()
    assert node.query("SELECT calling_ae FROM instances") == [("STORESCU",)]
    assert node.query("SELECT peer_host FROM associations") == [("127.0.0.2",)]


def test_max_associations_refuses_the_next_one(node_factory) -> None:
    node = node_factory(extra_node="max_associations = 1").start()
    ae = scu("STORESCU", (Verification, ExplicitVRLittleEndian))
    held = ae.associate("127.0.0.1", node.port, ae_title="ENHANCE")
    assert held.is_established
    try:
        second = ae.associate("127.0.0.1", node.port, ae_title="ENHANCE")
        assert not second.is_established
        # pynetdicom's requestor can mislay a fast rejection in its queue (node/sender.py)
        rj = peer_answer(second)
        assert rj is not None
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)  # transient, local limit
        rejected = wait_for(lambda: events(node, "association.rejected"), what="an association.rejected event")
        assert len(rejected) == 1 and rejected[0][0] == "STORESCU"
        assert "too many associations" in rejected[0][4]
        assert held.send_c_echo().get("Status") == 0x0000  # the held one is unaffected
    finally:
        held.release()

    wait_for(lambda: accepts(ae, node.port), timeout=10, interval=0.2, what="an association after the release")
    assert node.query("SELECT count(*) FROM associations") == [(2,)]


def test_slots_of_a_receiving_process_that_died_are_given_back(node_factory) -> None:
    """A receiving process killed while it holds an association (OOM killer, crash) is
    replaced, and its node-wide slot with it: the node does not refuse everyone forever, and
    it still stops cleanly on SIGTERM."""
    node = node_factory(receive_processes=1, extra_node="max_associations = 1").start()
    ae = scu("STORESCU", (Verification, ExplicitVRLittleEndian))
    held = ae.associate("127.0.0.1", node.port, ae_title="ENHANCE")
    assert held.is_established
    (receiver,) = node.receivers()
    os.kill(receiver, signal.SIGKILL)
    wait_for(lambda: node.receivers() not in ([], [receiver]), timeout=30, what="the receiver to be replaced")

    wait_for(lambda: accepts(ae, node.port), timeout=30, interval=0.5, what="an association after the restart")
    held.abort()
    assert node.stop() == 0


def test_rejected_peer_is_told_why(node_factory) -> None:
    """Every rejected peer gets an A-ASSOCIATE-RJ with the reason, not a closed connection.

    Regression: the A-ASSOCIATE-RJ used to race the socket close and was lost most times."""
    node = node_factory(extra_node="max_associations = 1").start()

    def echoscu(calling: str, called: str) -> tuple[int, str]:
        r = subprocess.run(
            [require("echoscu"), "-aet", calling, "-aec", called, "127.0.0.1", str(node.port)],
            capture_output=True,
            text=True,
            env=dcmtk_env(),
            timeout=60,
        )
        return r.returncode, r.stderr.strip()

    # A race could pass once by chance: several attempts of each.
    outputs = {
        "Reason: Calling AE Title Not Recognized": [echoscu("UNKNOWN", "ENHANCE") for _ in range(5)],
        "Reason: Called AE Title Not Recognized": [echoscu("STORESCU", "WRONG") for _ in range(5)],
    }
    held = scu("STORESCU", (Verification, ExplicitVRLittleEndian)).associate("127.0.0.1", node.port, ae_title="ENHANCE")
    assert held.is_established
    try:
        outputs["Reason: Local Limit Exceeded"] = [echoscu("STORESCU", "ENHANCE") for _ in range(5)]
    finally:
        held.release()
    not_told = {
        reason: [out for rc, out in results if rc == 0 or "Association Rejected" not in out or reason not in out]
        for reason, results in outputs.items()
    }
    assert not_told == {reason: [] for reason in outputs}


# -- refused datasets --------------------------------------------------------------------------


def _write_mislabelled(
    path: Path,
    *,
    dataset_sop_class: str | None = None,
    dataset_sop_uid: str | None = None,
    garbage: bytes | None = None,
) -> str:
    """A CT Part 10 file whose File Meta Information (what pynetdicom puts in the C-STORE
    request in raw mode) disagrees with its dataset, or whose dataset is `garbage`.
    Returns the request's Affected SOP Instance UID."""
    ds = ct_slice(generate_uid(UID_ROOT), generate_uid(UID_ROOT), 0, rows=32, cols=32)
    if dataset_sop_class is not None:
        ds.SOPClassUID = dataset_sop_class
    if dataset_sop_uid is not None:
        ds.SOPInstanceUID = dataset_sop_uid
    ds.preamble = b"\x00" * 128
    ds.save_as(path, enforce_file_format=False)  # keeps the File Meta Information as it is
    if garbage is not None:
        _meta, offset = split_dataset(path)
        path.write_bytes(path.read_bytes()[:offset] + garbage)
    meta, _offset = split_dataset(path)
    assert meta.MediaStorageSOPClassUID == CTImageStorage
    return str(meta.MediaStorageSOPInstanceUID)


BAD_DATASETS = {  # name: (how the file is made, status expected, reason recorded)
    "sop-class": ({"dataset_sop_class": MRImageStorage}, 0xA900, "is not the requested"),
    "sop-instance": ({"dataset_sop_uid": f"{UID_ROOT}999"}, 0xA900, "SOP Instance UID differs"),
    "unparsable": ({"garbage": b"this is not a DICOM data set, only some text...."}, 0xC000, "cannot parse"),
}


def test_datasets_not_matching_the_request_are_refused_and_recorded(
    node_factory, tmp_path: Path, raw_file_sending
) -> None:
    node = node_factory().start()
    request_uids = {
        name: _write_mislabelled(tmp_path / f"{name}.dcm", **how) for name, (how, _, _) in BAD_DATASETS.items()
    }
    good = ct_slice(generate_uid(UID_ROOT), generate_uid(UID_ROOT), 0, rows=32, cols=32)
    assoc = scu("STORESCU", (CTImageStorage, ExplicitVRLittleEndian)).associate(
        "127.0.0.1", node.port, ae_title="ENHANCE"
    )
    assert assoc.is_established
    try:
        statuses = {name: assoc.send_c_store(tmp_path / f"{name}.dcm").get("Status") for name in BAD_DATASETS}
        # The association survives refused instances: a good one is still stored.
        good_status = assoc.send_c_store(good).get("Status")
    finally:
        assoc.release()

    assert statuses == {name: status for name, (_, status, _) in BAD_DATASETS.items()}
    assert good_status == 0x0000
    assert node.query("SELECT sop_instance_uid FROM instances") == [(str(good.SOPInstanceUID),)]
    assert len(object_files(node)) == 1
    assert temp_files(node.storage) == []
    refused = events(node, "store.refused")
    assert len(refused) == len(BAD_DATASETS)
    for (ae, host, sop_uid, code, detail), (name, (_, status, reason)) in zip(
        refused, BAD_DATASETS.items(), strict=True
    ):
        assert (ae, host, sop_uid, code) == ("STORESCU", "127.0.0.1", request_uids[name], status), name
        assert reason in detail, (name, detail)


# -- re-sends ----------------------------------------------------------------------------------


def test_resending_identical_files_stores_them_once(node_factory, tmp_path: Path) -> None:
    node = node_factory().start()
    _study, series_uid, paths = write_ct_series(tmp_path / "ct", 3, rows=64, cols=64)
    first = storescu(node.port, paths, timeout=60)
    assert first.returncode == 0, first.stderr
    before = node.query("SELECT sop_instance_uid, path, sha256 FROM instances ORDER BY sop_instance_uid")
    assert len(before) == 3

    again = storescu(node.port, paths, timeout=60)
    assert again.returncode == 0, again.stderr
    assert node.query("SELECT sop_instance_uid, path, sha256 FROM instances ORDER BY sop_instance_uid") == before
    assert node.query("SELECT instance_count FROM series WHERE series_instance_uid = ?", series_uid) == [(3,)]
    assert len(object_files(node)) == 3
    assert node.query("SELECT count(*) FROM superseded_instances") == [(0,)]
    duplicates = events(node, "instance.duplicate")
    assert sorted(e[2] for e in duplicates) == [r[0] for r in before]
    assert {(e[0], e[1]) for e in duplicates} == {("STORESCU", "127.0.0.1")}


def test_resending_changed_bytes_replaces_and_keeps_the_old_version(node_factory, tmp_path: Path) -> None:
    node = node_factory().start()
    study_uid, series_uid = generate_uid(UID_ROOT), generate_uid(UID_ROOT)
    sop_uid = generate_uid(UID_ROOT)
    v1, v2 = tmp_path / "v1.dcm", tmp_path / "v2.dcm"
    for path, seed in ((v1, 0), (v2, 1)):  # same UIDs, different noise: different bytes
        ct_slice(study_uid, series_uid, 0, rows=64, cols=64, seed=seed, sop_uid=sop_uid).save_as(
            path, enforce_file_format=True
        )

    assert storescu(node.port, [v1], timeout=60).returncode == 0
    _ts, old_path, old_sha, old_size, _ae = instance_row(node, sop_uid)
    r = storescu(node.port, [v2], timeout=60)
    assert r.returncode == 0, r.stderr

    _ts, new_path, new_sha, new_size, _ae = instance_row(node, sop_uid)
    assert new_sha != old_sha and new_path != old_path
    assert hashlib.sha256((node.storage / new_path).read_bytes()).hexdigest() == new_sha
    assert dataset_bytes(node.storage / new_path) == dataset_bytes(v2)
    assert hashlib.sha256((node.storage / old_path).read_bytes()).hexdigest() == old_sha  # kept, untouched
    assert dataset_bytes(node.storage / old_path) == dataset_bytes(v1)
    assert node.query("SELECT path, sha256, size FROM superseded_instances") == [(old_path, old_sha, old_size)]
    assert node.query("SELECT instance_count FROM series WHERE series_instance_uid = ?", series_uid) == [(1,)]
    assert sorted(object_files(node)) == sorted([node.storage / old_path, node.storage / new_path])
    replaced = events(node, "instance.replaced")
    assert len(replaced) == 1
    assert replaced[0][:3] == ("STORESCU", "127.0.0.1", sop_uid)
    assert old_sha[:12] in replaced[0][4] and new_sha[:12] in replaced[0][4]
    assert new_size > 0
