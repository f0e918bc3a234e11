"""DIMSE command sets as the storage SCP reads and answers them (PS3.7 9.3, E.1): group 0000
in Implicit VR Little Endian, the few elements C-ECHO and C-STORE carry.

Read and written here, not with pydicom's general reader and writer: this runs twice per
received instance, and element objects with value checks cost more than the rest of the
command path. Tests compare both directions with pydicom.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from core.errors import ProtocolError

# Command Field values (PS3.7 E.1)
C_STORE_RQ = 0x0001
C_ECHO_RQ = 0x0030
C_CANCEL_RQ = 0x0FFF
RESPONSE_BIT = 0x8000
NO_DATASET = 0x0101  # Command Data Set Type when no data set follows

# group 0000 element numbers
_GROUP_LENGTH = 0x0000
_AFFECTED_SOP_CLASS = 0x0002
_COMMAND_FIELD = 0x0100
_MESSAGE_ID = 0x0110
_MESSAGE_ID_RESPONDED = 0x0120
_DATASET_TYPE = 0x0800
_STATUS = 0x0900
_AFFECTED_SOP_INSTANCE = 0x1000

MAX_COMMAND_BYTES = 1 << 16  # a command set is a few hundred bytes; more is not a command


@dataclass(frozen=True)
class Command:
    field: int
    message_id: int
    has_dataset: bool
    sop_class_uid: str = ""
    sop_instance_uid: str = ""


def _text(value: bytes) -> str:
    return value.rstrip(b"\x00 ").decode("ascii", "replace").strip()


def decode(data: bytes) -> Command:
    """A command set's request fields; ProtocolError when it is not one."""
    values: dict[int, bytes] = {}
    offset = 0
    while offset < len(data):
        if offset + 8 > len(data):
            raise ProtocolError("command set ends inside an element header")
        group, element, length = struct.unpack_from("<HHL", data, offset)
        offset += 8
        if group != 0x0000 or offset + length > len(data):
            raise ProtocolError(f"command set element ({group:04X},{element:04X}) is not group 0000 or overruns")
        values[element] = data[offset : offset + length]
        offset += length
    try:
        field, message_id, dataset_type = (
            struct.unpack("<H", values[e])[0] for e in (_COMMAND_FIELD, _MESSAGE_ID, _DATASET_TYPE)
        )
    except (KeyError, struct.error):
        raise ProtocolError("command set lacks Command Field, Message ID or Command Data Set Type") from None
    return Command(
        field=field,
        message_id=message_id,
        has_dataset=dataset_type != NO_DATASET,
        sop_class_uid=_text(values.get(_AFFECTED_SOP_CLASS, b"")),
        sop_instance_uid=_text(values.get(_AFFECTED_SOP_INSTANCE, b"")),
    )


def _uid(value: str) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + b"\x00" if len(raw) % 2 else raw


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


def response(request: Command, status: int) -> bytes:
    """The response command set to `request` (no data set follows) with `status`."""
    elements = [_element(_AFFECTED_SOP_CLASS, _uid(request.sop_class_uid))] if request.sop_class_uid else []
    elements += [
        _element(_COMMAND_FIELD, struct.pack("<H", request.field | RESPONSE_BIT)),
        _element(_MESSAGE_ID_RESPONDED, struct.pack("<H", request.message_id)),
        _element(_DATASET_TYPE, struct.pack("<H", NO_DATASET)),
        _element(_STATUS, struct.pack("<H", status)),
    ]
    if request.sop_instance_uid:
        elements.append(_element(_AFFECTED_SOP_INSTANCE, _uid(request.sop_instance_uid)))
    body = b"".join(elements)
    return _element(_GROUP_LENGTH, struct.pack("<L", len(body))) + body
