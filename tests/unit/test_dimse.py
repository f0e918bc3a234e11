"""node/dimse.py against pynetdicom's and pydicom's encoding of the same command sets."""

from __future__ import annotations

import struct
from io import BytesIO

import pytest
from pydicom.uid import CTImageStorage
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import decode as pydicom_decode
from pynetdicom.dsutils import encode as pydicom_encode

from core.errors import ProtocolError
from node import dimse


def _store_rq(message_id: int = 7) -> bytes:
    prim = C_STORE()
    prim.MessageID = message_id
    prim.AffectedSOPClassUID = CTImageStorage
    prim.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.10.1533.99.1"
    prim.Priority = 2
    prim.MoveOriginatorApplicationEntityTitle = "MOVER"
    prim.MoveOriginatorMessageID = 3
    prim.DataSet = BytesIO(b"\x08\x00\x16\x00")
    msg = C_STORE_RQ()
    msg.primitive_to_message(prim)
    encoded = pydicom_encode(msg.command_set, True, True)
    assert encoded is not None
    return encoded


def test_a_c_store_request_encoded_by_pynetdicom_is_read() -> None:
    command = dimse.decode(_store_rq())
    assert command == dimse.Command(
        field=dimse.C_STORE_RQ,
        message_id=7,
        has_dataset=True,
        sop_class_uid=CTImageStorage,
        sop_instance_uid="1.2.826.0.1.3680043.10.1533.99.1",
    )


def test_a_c_echo_request_says_no_data_set_follows() -> None:
    prim = C_ECHO()
    prim.MessageID = 65535
    prim.AffectedSOPClassUID = "1.2.840.10008.1.1"
    msg = C_ECHO_RQ()
    msg.primitive_to_message(prim)
    encoded = pydicom_encode(msg.command_set, True, True)
    assert encoded is not None
    command = dimse.decode(encoded)
    assert (command.field, command.message_id, command.has_dataset) == (dimse.C_ECHO_RQ, 65535, False)
    assert command.sop_class_uid == "1.2.840.10008.1.1" and command.sop_instance_uid == ""


@pytest.mark.parametrize("code", [0x0000, 0xA700, 0xB006, 0xC000])
def test_a_response_reads_back_with_pydicom_and_its_group_length_is_right(code: int) -> None:
    request = dimse.decode(_store_rq(message_id=300))
    encoded = dimse.response(request, code)
    ds = pydicom_decode(BytesIO(encoded), True, True)
    assert ds.CommandField == 0x8001
    assert ds.MessageIDBeingRespondedTo == 300
    assert ds.CommandDataSetType == dimse.NO_DATASET
    assert ds.Status == code
    assert ds.AffectedSOPClassUID == CTImageStorage
    assert ds.AffectedSOPInstanceUID == "1.2.826.0.1.3680043.10.1533.99.1"
    assert ds.CommandGroupLength == len(encoded) - 12  # everything after the group length element
    assert len(encoded) % 2 == 0


def test_an_echo_response_carries_no_instance_uid() -> None:
    request = dimse.Command(field=dimse.C_ECHO_RQ, message_id=1, has_dataset=False, sop_class_uid="1.2.840.10008.1.1")
    ds = pydicom_decode(BytesIO(dimse.response(request, 0)), True, True)
    assert ds.CommandField == 0x8030 and "AffectedSOPInstanceUID" not in ds


@pytest.mark.parametrize(
    "data",
    [
        _store_rq()[:-3],  # cut inside an element's value
        _store_rq() + b"\x00\x00",  # a stray half element header
        struct.pack("<HHL", 0x0008, 0x0016, 2) + b"1\x00",  # not group 0000
        struct.pack("<HHL", 0x0000, 0x0100, 2) + b"\x01\x00",  # no Message ID, no data set type
        struct.pack("<HHL", 0x0000, 0x0100, 0xFFFFFFFF),  # a length past the end
        b"",
    ],
    ids=["cut", "stray-header", "not-group-0000", "missing-fields", "huge-length", "empty"],
)
def test_what_is_not_a_command_set_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        dimse.decode(data)
