"""A push stream's broker side: a persistent QoS 1 subscription that acknowledges a message only once it is spooled.

The broker session is the stream's cursor: with clean_session=False and a stable client id the broker keeps
the subscriptions and queues what arrives while syncd is away, and a message that was delivered but not
acknowledged (the process died before the spool commit) is delivered again on the next connection.
The MQTT 3.1.1 client is the sink's (`syncd.mqtt_protocol`), whose `ack` sends a PUBACK when we say so;
messages are handed over as `aiomqtt.Message` objects, the type the push connectors are written against.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
import structlog

from syncd.errors import RequestRejected, VendorAuthError, VendorConnectionError
from syncd.mqtt_protocol import Connection, ConnectRefused, MqttError, Received

log = structlog.get_logger("syncd.mqtt_push")

KEEPALIVE_S = 30
MAX_BATCH = 500  # messages handed over (and committed as one spool page) at most at once
LINGER_S = 0.02  # a batch is handed over once no further message arrived for this long
SEEN_MAX = 100_000  # payload digests remembered to drop repeats (several topics, QoS 1 redelivery)
AUTH_CONNACK = {4, 5}  # bad user name or password / not authorised (MQTT 3.1.1 CONNACK codes)

Handler = Callable[[list[aiomqtt.Message]], Awaitable[None]]


class MqttSubscription:
    """Subscribe to `topics` at QoS 1 in a persistent session and hand over batches of new messages."""

    def __init__(self, url: str, topics: list[str], *, client_id: str, username: str = "", password: str = "",
                 timeout: float = 30.0, tls_verify: bool = True) -> None:
        self.url, self.topics, self.client_id = url, topics, client_id
        self.username, self.password, self.timeout, self.tls_verify = username, password, timeout, tls_verify
        self.where = url.split("@")[-1]  # never log credentials from the URL
        self._seen: set[bytes] = set()
        self._seen_order: deque[bytes] = deque()

    def _tls(self) -> ssl.SSLContext | None:
        if urlsplit(self.url).scheme != "mqtts":
            return None
        tls = ssl.create_default_context()
        if not self.tls_verify:
            tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
        return tls

    async def run(self, handle: Handler, stop: asyncio.Event, idle: float | None) -> None:
        """Until `stop` (or `idle` quiet seconds): `await handle(new_messages)` per batch, then ack the batch."""
        u, tls = urlsplit(self.url), self._tls()
        client = Connection(self.client_id, username=self.username or u.username or "",
                            password=self.password or u.password or "", clean_session=False, keepalive=KEEPALIVE_S)
        try:
            await client.connect(u.hostname or "127.0.0.1", u.port or (8883 if tls else 1883), tls=tls,
                                 timeout=self.timeout)
            try:
                granted = await client.subscribe([(t, 1) for t in self.topics], timeout=self.timeout)
                refused = [t for t, rc in zip(self.topics, granted, strict=False) if rc >= 128]
                if refused:
                    raise RequestRejected(f"broker {self.where} refused the subscription to {refused}")
                log.info("mqtt_push.subscribed", broker=self.where, topics=self.topics, client_id=self.client_id)
                await self._pump(client, handle, stop, idle)
            finally:
                await client.disconnect(timeout=self.timeout)
        except ConnectRefused as err:
            if err.code in AUTH_CONNACK:
                raise VendorAuthError(f"broker {self.where} refused the MQTT credentials: {err}") from None
            raise VendorConnectionError(f"broker {self.where}: {err}") from None
        except MqttError as err:
            raise VendorConnectionError(f"broker {self.where}: {err}") from None

    async def _pump(self, client: Connection, handle: Handler, stop: asyncio.Event, idle: float | None) -> None:
        stopping: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        # The pending read is kept across batches and cancelled on exit (it then leaves its message in the queue,
        # and a message not acked comes again on the next connection anyway).
        pending: asyncio.Future[Any] | None = None
        try:
            while not stop.is_set():
                pending = pending or asyncio.ensure_future(client.receive())
                done, _ = await asyncio.wait({pending, stopping}, timeout=idle, return_when=asyncio.FIRST_COMPLETED)
                if pending not in done:
                    return  # stopping, or quiet for `idle` seconds
                batch, pending = [_message(pending.result())], None
                while len(batch) < MAX_BATCH:
                    pending = asyncio.ensure_future(client.receive())
                    done, _ = await asyncio.wait({pending}, timeout=LINGER_S)
                    if pending not in done:
                        break
                    batch.append(_message(pending.result()))
                    pending = None
                fresh, digests = self._new(batch)
                if fresh:
                    await handle(fresh)
                for m in batch:
                    client.ack(m.mid, m.qos)
                self._remember(digests)
        finally:
            stopping.cancel()
            if pending is not None:
                pending.cancel()

    def _new(self, batch: list[aiomqtt.Message]) -> tuple[list[aiomqtt.Message], list[bytes]]:
        """Messages whose payload was not handed over before (same payload twice = the same record)."""
        fresh, digests = [], []
        for m in batch:
            digest = hashlib.blake2b(payload_bytes(m.payload), digest_size=16).digest()
            if digest not in self._seen and digest not in digests:
                fresh.append(m)
                digests.append(digest)
        return fresh, digests

    def _remember(self, digests: list[bytes]) -> None:
        """Only after the commit: a payload seen but not committed must be handled when it comes again."""
        for d in digests:
            self._seen.add(d)
            self._seen_order.append(d)
        while len(self._seen_order) > SEEN_MAX:
            self._seen.discard(self._seen_order.popleft())


def _message(m: Received) -> aiomqtt.Message:
    return aiomqtt.Message(m.topic, m.payload, m.qos, m.retain, m.mid, None)


def payload_bytes(payload: Any) -> bytes:
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    return str(payload).encode() if payload is not None else b""


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT topic filter matching (`+` one level, `#` the rest)."""
    p, t = pattern.split("/"), topic.split("/")
    for k, level in enumerate(p):
        if level == "#":
            return True
        if k >= len(t) or (level != "+" and level != t[k]):
            return False
    return len(p) == len(t)
