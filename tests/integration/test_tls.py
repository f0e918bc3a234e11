"""DICOM TLS (PS3.15 B.1): `[node.tls]` with DCMTK storescu as the peer.

The test makes its own CA, server and client certificates in tmp_path (the `cryptography`
package); nothing is downloaded. Without ca_file the node authenticates itself only; with
ca_file it also requires a client certificate signed by that CA.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.dicom_factory import write_ct_series
from tests.helpers import NodeProcess, dcmtk_env, require, wait_for


@dataclass(frozen=True)
class Pem:
    key: Path
    cert: Path


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "enhance-node tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _write(folder: Path, stem: str, key: rsa.RSAPrivateKey, cert: x509.Certificate) -> Pem:
    pem = Pem(folder / f"{stem}.key", folder / f"{stem}.pem")
    pem.key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    pem.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return pem


def _builder(subject: str, issuer: x509.Name, public_key: rsa.RSAPublicKey, *, ca: bool) -> x509.CertificateBuilder:
    """What the CA and the certificates it issues share: a day's validity, constraints, usage."""
    now = dt.datetime.now(dt.UTC)
    usage = dict.fromkeys(
        ("content_commitment", "data_encipherment", "key_agreement", "encipher_only", "decipher_only"), False
    )
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_encipherment=not ca, key_cert_sign=ca, crl_sign=ca, **usage),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


class CA:
    """A throw-away certification authority."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.cert = _builder(name, _name(name), self.key.public_key(), ca=True).sign(self.key, hashes.SHA256())
        self.pem = _write(folder, name, self.key, self.cert)

    def issue(self, name: str, *, server: bool) -> Pem:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        builder = (
            _builder(name, self.cert.subject, key.public_key(), ca=False)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        return _write(self.folder, name, key, builder.sign(self.key, hashes.SHA256()))


@dataclass(frozen=True)
class Pki:
    ca: CA
    server: Pem
    client: Pem
    rogue_client: Pem  # signed by another CA, which the node does not trust


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    folder = tmp_path / "pki"
    folder.mkdir()
    ca = CA(folder, "ca")
    return Pki(
        ca,
        ca.issue("server", server=True),
        ca.issue("client", server=False),
        CA(folder, "rogue-ca").issue("rogue-client", server=False),
    )


def tls_node(node_factory, pki: Pki, *, verify_clients: bool) -> NodeProcess:
    lines = ["[node.tls]", f'cert_file = "{pki.server.cert}"', f'key_file = "{pki.server.key}"']
    if verify_clients:
        lines.append(f'ca_file = "{pki.ca.pem.cert}"')
    # [node.tls] is a sub-table: extra_node goes after the [node] keys; [[node.allowed]] follows.
    return node_factory(extra_node="\n".join(lines)).start()


def storescu_tls(port: int, files: list[Path], *tls: str, timeout: int = 10) -> subprocess.CompletedProcess[str]:
    """storescu with `tls` options; every network wait bounded by `timeout` seconds."""
    t = str(timeout)
    cmd = [require("storescu"), "-aet", "STORESCU", "-aec", "ENHANCE", "-to", t, "-ts", t, "-ta", t, "-td", t]
    cmd += [*tls, "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(
        cmd, capture_output=True, text=True, env=dcmtk_env(), timeout=timeout * 4, stdin=subprocess.DEVNULL
    )


def test_dcmtk_has_tls() -> None:
    """The other tests need a DCMTK built with OpenSSL; say so plainly when it is not."""
    r = subprocess.run([require("storescu"), "--version"], capture_output=True, text=True, timeout=30)
    assert "OpenSSL" in r.stdout + r.stderr, f"this DCMTK has no TLS support (storescu --version):\n{r.stdout}"


def test_tls_store_succeeds_and_is_recorded_as_tls(node_factory, pki: Pki, tmp_path: Path) -> None:
    node = tls_node(node_factory, pki, verify_clients=False)
    _study, _series, paths = write_ct_series(tmp_path / "ct", 2, rows=64, cols=64)

    r = storescu_tls(node.port, paths, "+tls", str(pki.client.key), str(pki.client.cert), "+cf", str(pki.ca.pem.cert))
    assert r.returncode == 0, r.stderr
    assert node.query("SELECT count(*), min(calling_ae), max(calling_ae) FROM instances") == [
        (2, "STORESCU", "STORESCU")
    ]
    # Without ca_file a client needs no certificate (the node authenticates itself only).
    anonymous = write_ct_series(tmp_path / "ct2", 1, rows=64, cols=64)[2]
    r = storescu_tls(node.port, anonymous, "+tla", "+cf", str(pki.ca.pem.cert))
    assert r.returncode == 0, r.stderr
    assert node.query("SELECT count(*) FROM instances") == [(3,)]
    wait_for(
        lambda: (
            node.query("SELECT tls, outcome, instances_stored FROM associations ORDER BY id")
            == [(1, "released", 2), (1, "released", 1)]
        ),
        what="both associations recorded as TLS and released",
    )


def test_plain_tcp_to_the_tls_port_stores_nothing(node_factory, pki: Pki, tmp_path: Path) -> None:
    node = tls_node(node_factory, pki, verify_clients=False)
    _study, _series, paths = write_ct_series(tmp_path / "ct", 1, rows=64, cols=64)

    r = storescu_tls(node.port, paths)  # no TLS options: plain DICOM
    assert r.returncode != 0
    assert "Association Accepted" not in r.stdout + r.stderr
    assert node.query("SELECT count(*) FROM instances") == [(0,)]
    assert node.query("SELECT count(*) FROM associations") == [(0,)]
    assert list((node.storage / "objects").rglob("*.dcm")) == []
    wait_for(
        lambda: node.query("SELECT count(*) FROM events WHERE kind = 'association.rejected'") == [(1,)],
        what="the failed handshake to be recorded",
    )
    # The node still serves TLS peers afterwards.
    r = storescu_tls(node.port, paths, "+tla", "+cf", str(pki.ca.pem.cert))
    assert r.returncode == 0, r.stderr
    assert node.query("SELECT count(*) FROM instances") == [(1,)]


def test_client_certificate_required_when_ca_file_is_set(node_factory, pki: Pki, tmp_path: Path) -> None:
    node = tls_node(node_factory, pki, verify_clients=True)
    _study, _series, paths = write_ct_series(tmp_path / "ct", 1, rows=64, cols=64)
    ca = ("+cf", str(pki.ca.pem.cert))

    no_cert = storescu_tls(node.port, paths, "+tla", *ca)
    assert no_cert.returncode != 0
    assert "Association Accepted" not in no_cert.stdout + no_cert.stderr
    untrusted = storescu_tls(node.port, paths, "+tls", str(pki.rogue_client.key), str(pki.rogue_client.cert), *ca)
    assert untrusted.returncode != 0
    assert "Association Accepted" not in untrusted.stdout + untrusted.stderr
    assert node.query("SELECT count(*) FROM instances") == [(0,)]
    assert node.query("SELECT count(*) FROM associations") == [(0,)]

    def rejections() -> list[tuple[str, str]] | None:
        rows = node.query("SELECT peer_host, detail FROM events WHERE kind = 'association.rejected'")
        return rows if len(rows) == 2 else None

    refused = wait_for(rejections, what="both failed handshakes to be recorded")
    assert all(h == "127.0.0.1" and "TLS handshake failed" in d for h, d in refused), refused

    trusted = storescu_tls(node.port, paths, "+tls", str(pki.client.key), str(pki.client.cert), *ca)
    assert trusted.returncode == 0, trusted.stderr
    assert node.query("SELECT count(*) FROM instances") == [(1,)]
    wait_for(
        lambda: node.query("SELECT tls, outcome FROM associations") == [(1, "released")],
        what="the TLS association to be recorded",
    )


def test_a_stalled_tls_handshake_does_not_block_other_peers(node_factory, pki: Pki, tmp_path: Path) -> None:
    """A peer that opens a TCP connection and never starts the TLS handshake (a port scanner,
    a hung client) must not stop the node from accepting others."""
    tls = ["[node.tls]", f'cert_file = "{pki.server.cert}"', f'key_file = "{pki.server.key}"']
    node = node_factory(receive_processes=1, extra_node="\n".join(tls)).start()
    _study, _series, paths = write_ct_series(tmp_path / "ct", 1, rows=64, cols=64)
    with socket.create_connection(("127.0.0.1", node.port)):  # the silent peer, connected first
        try:
            r = storescu_tls(node.port, paths, "+tla", "+cf", str(pki.ca.pem.cert), timeout=5)
        except subprocess.TimeoutExpired:
            pytest.fail("storescu hung while another peer held an unfinished TLS connection")
    assert r.returncode == 0, r.stderr
    assert node.query("SELECT count(*) FROM instances") == [(1,)]


def test_a_tls_handshake_dripped_a_byte_at_a_time_is_closed_at_the_negotiation_deadline(
    node_factory,  # type: ignore[no-untyped-def]
    pki: Pki,
) -> None:
    """Each byte arrives well within the per-read timeout, but the handshake as a whole is under
    node.negotiation_timeout (2 s here): the node closes the connection."""
    import socket
    import time

    lines = [
        "negotiation_timeout = 2",
        "[node.tls]",
        f'cert_file = "{pki.server.cert}"',
        f'key_file = "{pki.server.key}"',
    ]
    node = node_factory(extra_node="\n".join(lines)).start()
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64)  # the start of a ClientHello, never finished
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as s:
        started, closed = time.monotonic(), False
        for byte in hello:
            try:
                s.sendall(bytes([byte]))
                s.settimeout(0.5)
                closed = s.recv(1) == b""
            except TimeoutError:
                continue
            except OSError:
                closed = True
            if closed:
                break
        took = time.monotonic() - started
    assert closed, "the node kept a dripped handshake open"
    assert 1.5 < took < 6, took
