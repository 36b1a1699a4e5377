"""MQTT sink: every fresh event to `{prefix}/{vendor}/{tenant}/{device}/{metric}`, at-least-once.

A batch counts as delivered only when the broker acknowledged every publish of it (QoS >= 1); any
error drops the connection and the drainer sends the whole batch again after a capped backoff.
`status` events are retained (newest value per topic); a will marks the instance `offline`.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from functools import lru_cache
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomqtt
import orjson
import paho.mqtt.client as mqtt
import structlog

from syncd.events import COLUMNS, ms_to_iso
from syncd.settings import MqttSettings
from syncd.sinks.base import Sink
from syncd.spool import Batch

log = structlog.get_logger("syncd.mqtt")

_EVENT_ID, _SOURCE, _VENDOR, _KIND, _TENANT, _DEVICE, _METRIC, _TS, _VALUE, _TEXT, _ATTRS = range(len(COLUMNS))
PUBLISH_WINDOW = 200  # publishes in flight at once; paho scans its queue per ack, so keep it modest
ACK_TIMEOUT = 30.0  # seconds without any acknowledgement before the connection counts as dead

# Percent-encoding keeps the mapping one-to-one: `%` itself is escaped, so no two names share a level.
_ESCAPES = {"%": "%25", "/": "%2F", "+": "%2B", "#": "%23", "\x00": "%00"}


@lru_cache(maxsize=65_536)
def topic_level(name: str) -> str:
    """One topic level for any name: no `/`, `+`, `#`, NUL, no leading `$`; distinct names stay distinct."""
    out = "".join(_ESCAPES.get(ch, ch) for ch in name)
    if out.startswith("$"):
        out = "%24" + out[1:]
    return out


def topic_name(level: str) -> str:
    """The name a level was made from (for consumers that want it back)."""
    return unquote(level)


def payload(row: list[Any]) -> bytes:
    """The JSON payload of DESIGN.md; event_id as a decimal string because UInt64 exceeds JSON-safe integers."""
    return orjson.dumps({
        "event_id": str(row[_EVENT_ID]), "source": row[_SOURCE], "kind": row[_KIND], "ts": ms_to_iso(row[_TS]),
        "value": row[_VALUE], "text": row[_TEXT], "attrs": row[_ATTRS],
    })


class MqttSink(Sink):
    name = "mqtt"
    batch_rows = 5_000
    batch_age = 0.2  # alert pipelines want events promptly

    def __init__(self, settings: MqttSettings, *, instance: str, clock: Any = time.time) -> None:
        self.settings, self.instance, self.clock = settings, instance, clock
        url = urlsplit(settings.url)
        self.host = url.hostname or "127.0.0.1"
        self.tls = url.scheme == "mqtts"
        self.port = url.port or (8883 if self.tls else 1883)
        # credentials in the URL (mqtt://user:pass@host) count when the username/password keys are not set
        self.username = settings.username or unquote(url.username or "")
        self.password = settings.password.get_secret_value() or unquote(url.password or "")
        self.prefix = topic_level(settings.prefix) if settings.prefix else "syncd"
        self.state_topic = f"{self.prefix}/_syncd/{topic_level(instance)}/state"
        self.client: aiomqtt.Client | None = None
        self.acks: _Acks | None = None
        self.retained_ts: dict[str, int] = {}  # newest ts published retained per status topic
        self.published = 0
        self.skipped_old = 0

    def _make_client(self) -> aiomqtt.Client:
        s = self.settings
        tls_context = None
        if self.tls:
            tls_context = ssl.create_default_context(cafile=s.ca_file or None)
            if s.cert_file:
                tls_context.load_cert_chain(s.cert_file, s.key_file or None)
            if not s.tls_verify:  # an operator's explicit choice, e.g. a lab broker with a self-signed cert
                tls_context.check_hostname = False
                tls_context.verify_mode = ssl.CERT_NONE
        client = aiomqtt.Client(
            self.host, self.port, username=self.username or None, password=self.password or None,
            identifier=s.client_id or f"syncd-{self.instance}", clean_session=True, timeout=ACK_TIMEOUT,
            will=aiomqtt.Will(self.state_topic, b"offline", qos=1, retain=True), tls_context=tls_context,
            max_inflight_messages=0, keepalive=30,  # 0: unlimited in paho; our window bounds it, and paho skips a per-ack scan
        )
        return client

    async def open(self) -> None:
        if self.client is not None:
            return
        client = self._make_client()
        try:
            await client.__aenter__()
            await client.publish(self.state_topic, b"online", qos=1, retain=True)
        except BaseException:
            await _quietly_close(client)
            raise
        self.client, self.acks = client, _Acks(client)
        log.info("mqtt.connected", broker=f"{self.host}:{self.port}", tls=self.tls)

    async def write(self, batch: Batch) -> int:
        """Publish the batch's fresh events; returns how many were too old for the bus (ClickHouse-only)."""
        messages, retained, skipped = self._messages(batch)
        await self.open()
        assert self.client is not None and self.acks is not None
        try:
            await self.acks.publish_all(messages, self.settings.qos)
        except BaseException:
            await self._drop_connection()
            raise
        self.retained_ts.update(retained)
        self.published += len(messages)
        self.skipped_old += skipped
        return skipped

    def _messages(self, batch: Batch) -> tuple[list[tuple[str, bytes, bool]], dict[str, int], int]:
        """(topic, payload, retain) per fresh event, the retained ts per status topic, and the count too old."""
        max_age_ms = int(self.settings.max_age * 1000)
        out: list[tuple[str, bytes, bool]] = []
        retained: dict[str, int] = {}
        skipped = 0
        for page in batch.pages:
            fetched_ms = int(page.get("at", self.clock()) * 1000)
            for row in page.get("e", ()):
                if fetched_ms - row[_TS] > max_age_ms:  # backfill: already old when syncd fetched it
                    skipped += 1
                    continue
                topic = "/".join((self.prefix, topic_level(row[_VENDOR]), topic_level(row[_TENANT]),
                                  topic_level(row[_DEVICE]), topic_level(row[_METRIC])))
                retain = False
                if row[_KIND] == "status":
                    newest = max(self.retained_ts.get(topic, -1), retained.get(topic, -1))
                    retain = row[_TS] >= newest  # an older state never overwrites a newer retained one
                    if retain:
                        retained[topic] = row[_TS]
                out.append((topic, payload(row), retain))
        return out, retained, skipped

    async def _drop_connection(self) -> None:
        client, self.client, self.acks = self.client, None, None
        if client is not None:
            await _quietly_close(client)

    async def close(self) -> None:
        """A clean stop leaves `offline` on the state topic (the will covers an unclean one)."""
        client, self.client, self.acks = self.client, None, None
        if client is None:
            return
        try:
            await client.publish(self.state_topic, b"offline", qos=1, retain=True, timeout=5)
        except aiomqtt.MqttError as err:
            log.warning("mqtt.offline_not_published", error=str(err))
        await _quietly_close(client)


class _Acks:
    """A sliding window of publishes on the paho client under aiomqtt, finished when the broker acked each.

    aiomqtt's own `publish()` is one awaited call per message and scans every pending call each time,
    which turns thousands in flight into quadratic work; this keeps its connection handling and reads
    acknowledgements straight from paho's `on_publish` (called on the event loop, by aiomqtt's reader).
    """

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.paho = client._client
        self.waiting: set[int] = set()
        self.progress = asyncio.Event()
        self._chained: Any = self.paho.on_publish
        self.paho.on_publish = self._on_publish

    def _on_publish(self, paho: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        self._chained(paho, userdata, mid, reason, properties)
        if mid in self.waiting:
            self.waiting.discard(mid)
            self.progress.set()

    async def publish_all(self, messages: list[tuple[str, bytes, bool]], qos: int) -> None:
        for topic, body, retain in messages:
            while len(self.waiting) >= PUBLISH_WINDOW:
                await self._progress()
            info = self.paho.publish(topic, body, qos, retain)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise aiomqtt.MqttCodeError(info.rc, f"could not publish to {topic}")
            if qos > 0 and not info.is_published():
                self.waiting.add(info.mid)
        while self.waiting:
            await self._progress()

    async def _progress(self) -> None:
        """Wait for at least one acknowledgement; a lost connection or a silent broker raises."""
        self.progress.clear()
        gone = self.client._disconnected
        if gone.done():
            raise aiomqtt.MqttError("connection lost with publishes unacknowledged")
        waiter: asyncio.Future[Any] = asyncio.ensure_future(self.progress.wait())
        either: list[asyncio.Future[Any]] = [waiter, gone]
        try:
            done, _ = await asyncio.wait(either, timeout=ACK_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if waiter not in done:
            raise aiomqtt.MqttError(f"{len(self.waiting)} publishes unacknowledged (connection lost or broker silent)")


async def _quietly_close(client: aiomqtt.Client) -> None:
    try:
        await client.__aexit__(None, None, None)
    except Exception:  # the connection is already gone; nothing more to release
        pass
