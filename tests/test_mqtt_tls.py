"""mqtts:// with a CA file, a client certificate, a password, and the server name checked by default."""

from __future__ import annotations

import asyncio
import getpass
import shutil
import ssl
import subprocess
import time
from pathlib import Path

import aiomqtt
import pytest

from syncd.events import Event
from syncd.settings import MqttSettings
from syncd.sinks.mqtt import MqttSink
from syncd.spool import Batch
from tests.conftest import Mosquitto


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def tls_broker(tmp_path: Path) -> object:
    d = tmp_path / "tls"
    d.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=syncd test CA", cwd=d)
    (d / "san.ext").write_text("subjectAltName = DNS:localhost\n")
    for name, cn in (("server", "localhost"), ("client", "syncd-client")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj",
                 f"/CN={cn}", cwd=d)
        ext = ["-extfile", "san.ext"] if name == "server" else []
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "2", *ext, cwd=d)
    passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    subprocess.run([passwd, "-b", "-c", str(d / "passwd"), "syncd", "s3cret-pass"], check=True, capture_output=True)
    broker = Mosquitto(d)
    broker.conf.write_text(
        f"user {getpass.getuser()}\nlistener {broker.port} 127.0.0.1\nallow_anonymous false\npassword_file {d}/passwd\n"
        f"cafile {d}/ca.crt\ncertfile {d}/server.crt\nkeyfile {d}/server.key\nrequire_certificate true\n"
    )
    broker.start()
    try:
        yield broker, d
    finally:
        broker.stop()


def _settings(port: int, d: Path, host: str = "localhost", **kw: object) -> MqttSettings:
    base: dict[str, object] = dict(url=f"mqtts://{host}:{port}", username="syncd", password="s3cret-pass",
                                   ca_file=str(d / "ca.crt"), cert_file=str(d / "client.crt"),
                                   key_file=str(d / "client.key"))
    base.update(kw)
    return MqttSettings(**base)  # type: ignore[arg-type]


def _batch() -> Batch:
    now = int(time.time() * 1000)
    rows = [Event("s", "iotopen", "status", "1", "2", f"m{i}", now).row() for i in range(50)]
    return Batch("mqtt", 1, 1, "t", [{"e": rows, "at": time.time()}])


async def _write(settings: MqttSettings) -> None:
    sink = MqttSink(settings, instance="tls-test")
    try:
        await sink.write(_batch())
    finally:
        await sink.close()


def test_mqtts_with_ca_client_cert_and_password_delivers(tls_broker: tuple[Mosquitto, Path]) -> None:
    broker, d = tls_broker
    asyncio.run(_write(_settings(broker.port, d)))

    async def read_retained() -> int:
        ctx = ssl.create_default_context(cafile=str(d / "ca.crt"))
        ctx.load_cert_chain(str(d / "client.crt"), str(d / "client.key"))
        n = 0
        async with aiomqtt.Client("localhost", broker.port, username="syncd", password="s3cret-pass",
                                  tls_context=ctx) as sub:
            await sub.subscribe("syncd/iotopen/#", qos=1)
            try:
                async with asyncio.timeout(2):
                    async for _ in sub.messages:
                        n += 1
            except TimeoutError:
                pass
        return n

    assert asyncio.run(read_retained()) == 50  # retained status values, read back over TLS


def test_server_name_is_checked_by_default(tls_broker: tuple[Mosquitto, Path]) -> None:
    broker, d = tls_broker
    # the certificate names `localhost`; connecting by IP must fail verification unless the operator opts out
    with pytest.raises((aiomqtt.MqttError, ssl.SSLError, OSError)) as err:
        asyncio.run(_write(_settings(broker.port, d, host="127.0.0.1")))
    assert "certificate" in str(err.value).lower() or "hostname" in str(err.value).lower()
    asyncio.run(_write(_settings(broker.port, d, host="127.0.0.1", tls_verify=False)))


def test_wrong_password_is_refused(tls_broker: tuple[Mosquitto, Path]) -> None:
    broker, d = tls_broker
    with pytest.raises(aiomqtt.MqttError):
        asyncio.run(_write(_settings(broker.port, d, password="wrong")))
