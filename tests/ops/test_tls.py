"""amqps:// to a broker that requires TLS with client certificates: a second RabbitMQ node on this
host (its own node name, data directory, ports and config; the main broker at 5672 is untouched),
certificates made here with `cryptography`, stopped afterwards.

The project's Client and the worker's `connect` take the TLS settings from the URL
(`amqps://…?cafile=&certfile=&keyfile=`): a client with the CA and its certificate gets in and
round-trips a message; one without a certificate, or trusting another CA, does not.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import aio_pika
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from control.client import Client
from worker.connections import connect

if TYPE_CHECKING:
    from conftest import RoundTrip

pytestmark = pytest.mark.slow  # starts a broker node: ~10-30 s on a busy machine

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
RABBITMQ_HOME = "/var/lib/rabbitmq"  # the broker user's home: its Erlang cookie, which rabbitmqctl shares


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here: trusting only it must fail


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey],
                 *, ca: bool = False, names: list[x509.GeneralName] | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer[0])
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer[1], hashes.SHA256())


def _write(directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> Path:
    path = directory / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        (directory / f"{name}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return path


def make_pki(directory: Path) -> Pki:
    ca_key, other_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("hotswap test CA", ca_key, (_name("hotswap test CA"), ca_key), ca=True)
    other = _certificate("another CA", other_key, (_name("another CA"), other_key), ca=True)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = _certificate("localhost", server_key, (ca.subject, ca_key), names=names)
    client = _certificate("hotswap-worker", client_key, (ca.subject, ca_key))
    return Pki(_write(directory, "ca", ca), _write(directory, "server", server, server_key),
               directory / "server.key", _write(directory, "client", client, client_key), directory / "client.key",
               _write(directory, "other-ca", other))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _config(pki: Pki, port: int) -> str:
    return "\n".join([
        "listeners.tcp = none",  # TLS only: nothing reaches this node in the clear
        f"listeners.ssl.default = 127.0.0.1:{port}",
        f"ssl_options.cacertfile = {pki.ca}", f"ssl_options.certfile = {pki.server_cert}",
        f"ssl_options.keyfile = {pki.server_key}",
        "ssl_options.verify = verify_peer", "ssl_options.fail_if_no_peer_cert = true", "",
    ])


def _await_startup(node: str, server: subprocess.Popen[bytes], output: Path, timeout_s: float = 180) -> None:
    """`await_startup` fails at once while the node is not yet known to epmd: ask until it answers."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert server.poll() is None, f"the TLS node exited: {output.read_text()[-3000:]}"
        started = _ctl(node, "await_startup", "--timeout", "120", timeout_s=150)
        if started.returncode == 0:
            return
        assert time.monotonic() < deadline, f"{started.stdout}{started.stderr}{output.read_text()[-3000:]}"
        time.sleep(1)


@dataclass(frozen=True)
class TlsBroker:
    port: int
    pki: Pki

    def url(self, *, ca: Path | None = None, client_cert: bool = True) -> str:
        query = f"cafile={ca or self.pki.ca}"
        if client_cert:
            query += f"&certfile={self.pki.client_cert}&keyfile={self.pki.client_key}"
        return f"amqps://guest:guest@localhost:{self.port}/?{query}"


def _ctl(node: str, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rabbitmqctl", "-n", node, *args], capture_output=True, text=True, timeout=timeout_s,
                          check=False)


@pytest.fixture(scope="module")
def tls_broker() -> Iterator[TlsBroker]:
    if not (os.path.exists(SERVER) and shutil.which("rabbitmqctl") and shutil.which("runuser")):
        pytest.fail(f"a second broker node needs {SERVER}, rabbitmqctl and runuser")
    # Not under pytest's tmp_path: its parents are root's alone, and the node runs as the broker user.
    base = Path(tempfile.mkdtemp(prefix="hotswap-tls-broker-"))
    try:
        yield from _run_node(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _run_node(base: Path) -> Iterator[TlsBroker]:
    pki, port = make_pki(base), _free_port()
    (base / "rabbitmq.conf").write_text(_config(pki, port))
    (base / "enabled_plugins").write_text("[].\n")
    shutil.chown(base, "rabbitmq")
    for path in base.iterdir():
        shutil.chown(path, "rabbitmq")
    base.chmod(0o700)  # the keys are the broker user's alone
    node = f"hotswap-tls-{uuid.uuid4().hex[:6]}@localhost"
    env = {"PATH": os.environ["PATH"], "HOME": RABBITMQ_HOME, "RABBITMQ_NODENAME": node,
           "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
           "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
           "RABBITMQ_MNESIA_BASE": str(base / "mnesia"), "RABBITMQ_LOG_BASE": str(base / "log"),
           "RABBITMQ_DIST_PORT": str(_free_port()), "RABBITMQ_NODE_PORT": str(_free_port()),
           "ERL_EPMD_ADDRESS": "127.0.0.1"}
    with (base / "server.out").open("w") as out:
        server = subprocess.Popen(["runuser", "-u", "rabbitmq", "--", SERVER], env=env, cwd=base,
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        _await_startup(node, server, base / "server.out")
        yield TlsBroker(port, pki)
    finally:
        _ctl(node, "stop", timeout_s=60)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


async def test_client_and_worker_connect_over_tls_with_a_client_certificate(
    tls_broker: TlsBroker, round_trip: RoundTrip
) -> None:
    async with Client(tls_broker.url(), namespace=f"tls-{uuid.uuid4().hex[:6]}") as client:
        assert client.reply_queue  # declared over TLS
    connection = await connect(tls_broker.url(), "tls-test", attempts=1)
    async with connection:
        assert await round_trip(connection, b"over tls") == b"over tls"


@pytest.mark.parametrize(("wrong", "refusals"), [
    # The broker's verify_peer + fail_if_no_peer_cert. Under TLS 1.3 the client has finished its
    # side of the handshake when the broker refuses: it reads the alert, or, if it wrote first,
    # the reset of the connection the broker closed. Either way no AMQP connection opens.
    ("no client certificate", ("CERTIFICATE_REQUIRED", "Connection reset by peer")),
    ("another CA", ("CERTIFICATE_VERIFY_FAILED",)),  # the client does not trust the broker's certificate
])
async def test_without_the_certificate_or_the_ca_the_connection_fails(
    tls_broker: TlsBroker, wrong: str, refusals: tuple[str, ...]
) -> None:
    url = tls_broker.url(client_cert=False) if wrong == "no client certificate" else tls_broker.url(
        ca=tls_broker.pki.other_ca)
    with pytest.raises(aio_pika.exceptions.AMQPConnectionError) as caught:
        await connect(url, "tls-test", attempts=1)
    assert any(refusal in repr(caught.value) for refusal in refusals), caught.value
