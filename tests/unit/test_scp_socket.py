"""The SCP's association socket (node.scp.LargeReadSocket): pynetdicom's recv contract (all of
the bytes asked for, or what came before the peer closed), with large reads."""

from __future__ import annotations

import socket
import threading

from pynetdicom import AE
from pynetdicom.association import Association

from node.scp import READ_CHUNK, LargeReadSocket


def _pair() -> tuple[LargeReadSocket, socket.socket]:
    ours, theirs = socket.socketpair()
    assoc = Association(AE(), "acceptor")
    return LargeReadSocket(assoc, client_socket=ours), theirs


def test_a_pdu_larger_than_one_read_arrives_whole_in_order() -> None:
    sock, peer = _pair()
    payload = bytes(range(256)) * (3 * READ_CHUNK // 256 + 7)  # more than three reads' worth
    sender = threading.Thread(target=peer.sendall, args=(payload,))
    sender.start()
    try:
        assert sock.recv(len(payload)) == payload
    finally:
        sender.join()
        peer.close()
        sock.close()


def test_a_peer_that_closes_mid_pdu_gives_what_came() -> None:
    """A header that claims 2 GiB and 10 bytes behind it: the 10 bytes, nothing held for the rest."""
    sock, peer = _pair()
    peer.sendall(b"0123456789")
    peer.close()
    try:
        assert sock.recv(2**31) == b"0123456789"
        assert sock.recv(6) == b""
    finally:
        sock.close()
