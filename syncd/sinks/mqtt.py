"""MQTT sink: every fresh event to `{prefix}/{vendor}/{tenant}/{device}/{metric}`, at-least-once.

A batch counts as delivered only when the broker acknowledged every publish of it (QoS >= 1); any
error drops the connection and the drainer sends the whole batch again after a capped backoff.
`status` events are retained (newest value per topic); a will marks the instance `offline`.

Topic levels (`topic_level`) are made from any name, one-to-one:
- `%`, `/`, `+`, `#`, and every code point a broker refuses in a topic (Mosquitto disconnects the client
  for them) are percent-encoded as their UTF-8 bytes: the C0 controls and NUL (U+0000..U+001F), DEL and
  the C1 controls (U+007F..U+009F), the non-characters (U+FDD0..U+FDEF, U+xFFFE, U+xFFFF), and lone
  surrogates (U+D800..U+DFFF, encoded as their "surrogatepass" bytes, e.g. `%ED%A0%BD`); a leading `$`
  becomes `%24`. `topic_name(level)` gives the name back.
- A level longer than `MAX_LEVEL_BYTES` (256 UTF-8 bytes) once encoded is shortened: the level of the
  longest prefix of the name that leaves room (whole characters), then `%~`, then 32 hex digits of a
  BLAKE2b-128 hash of the whole encoded level. The same name always gives the same level and two names
  two levels (`%~` never occurs in an unshortened level, where every `%` starts a two-hex-digit escape);
  `topic_name` of such a level gives the prefix followed by `%~<hash>`, not the name: consumers find the
  full name in ClickHouse by `event_id`. Five levels of at most 256 bytes keep every topic far below MQTT's
  65,535-byte limit.

A row that can never become a message (a name that is not a string, a `ts` outside the years 1..9999
an ISO 8601 date-time can show, a string that is not valid Unicode, an integer JSON cannot carry, a
message over MQTT's packet limit) makes `write` raise `RowsRefused` naming the field, before anything
of the batch is published; the drainer then splits the batch and dead-letters that row alone.

Memory while the broker is down: `write` connects before it builds a single message, so a batch that
cannot go out costs no payloads; one connection object (and one TLS context) serves every connection
attempt, and a dropped connection is aborted with whatever it had not sent, so a long outage holds nothing
here but the batch the drainer retries (the backlog waits in the spool, on disk).

The wire protocol is `mqtt_protocol` (MQTT 3.1.1 on asyncio): a window of publishes in flight, their
acknowledgements read in bulk, which is what makes the rate (`bench/bench_mqtt.py`).
"""

from __future__ import annotations

import hashlib
import re
import ssl
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson
import structlog

from syncd.errors import RowsRefused
from syncd.events import COLUMNS
from syncd.mqtt_protocol import Connection, MqttError, Will
from syncd.settings import MqttSettings
from syncd.sinks.base import Sink
from syncd.spool import Batch, page_len, page_rows

log = structlog.get_logger("syncd.mqtt")

_EVENT_ID, _SOURCE, _VENDOR, _KIND, _TENANT, _DEVICE, _METRIC, _TS, _VALUE, _TEXT, _ATTRS = range(len(COLUMNS))
PUBLISH_WINDOW = 1_000  # publishes in flight at once (bounded memory, enough to keep the broker busy)
ACK_TIMEOUT = 30.0  # seconds without any acknowledgement (or to connect) before the connection counts as dead
KEEPALIVE_S = 30
MAX_LEVEL_BYTES = 256  # a longer topic level is shortened to a prefix and a hash of the whole name
MAX_PACKET = 268_435_455  # MQTT's largest remaining length: topic, packet id and payload must fit

# Percent-encoding keeps the mapping one-to-one: `%` itself is escaped, so no two names share a level.
_NONCHARS = "".join(f"{chr(plane * 0x10000 + 0xFFFE)}-{chr(plane * 0x10000 + 0xFFFF)}" for plane in range(17))
_UNSAFE = re.compile(f"[%/+#\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef{_NONCHARS}]")
_SHORTENED = "%~"  # never in an unshortened level: there every `%` starts a two-hex-digit escape
_HASH_HEX = 32
_CACHED_NAME = 512  # names up to this many characters are cached (a flood of huge names must not pin memory)
_EPOCH = datetime(1970, 1, 1)


def _escape(m: re.Match[str]) -> str:
    return "".join(f"%{b:02X}" for b in m.group().encode("utf-8", "surrogatepass"))


def _level(name: str) -> str:
    out = _UNSAFE.sub(_escape, name)
    if out.startswith("$"):
        out = "%24" + out[1:]
    raw = out.encode()
    if len(raw) <= MAX_LEVEL_BYTES:
        return out
    # shortened: the level of the longest prefix of the name that fits (whole characters, whole escapes), a hash
    budget, used, head = MAX_LEVEL_BYTES - len(_SHORTENED) - _HASH_HEX, 0, []
    for i, ch in enumerate(name):
        piece = "%24" if i == 0 and ch == "$" else _UNSAFE.sub(_escape, ch)
        used += len(piece.encode())
        if used > budget:
            break
        head.append(piece)
    return "".join(head) + _SHORTENED + hashlib.blake2b(raw, digest_size=_HASH_HEX // 2).hexdigest()


_cached_level = lru_cache(maxsize=65_536)(_level)


def topic_level(name: str) -> str:
    """One topic level for any name: no `/`, `+`, `#`, control or non-character, no leading `$`, at most
    `MAX_LEVEL_BYTES` bytes; distinct names stay distinct (see the module docstring)."""
    if not isinstance(name, str):
        raise TypeError(f"a topic level is made from a string, not {type(name).__name__}")
    return _cached_level(name) if len(name) <= _CACHED_NAME else _level(name)


def topic_name(level: str) -> str:
    """The name a level was made from (for consumers that want it back; a shortened level has lost it)."""
    return unquote(level, errors="surrogatepass")


def iso_ms(ts_ms: int) -> str:
    """Epoch ms to ISO 8601 UTC with milliseconds and a four-digit year; OverflowError outside years 1..9999."""
    return (_EPOCH + timedelta(milliseconds=ts_ms)).isoformat(timespec="milliseconds") + "Z"


def payload(row: Sequence[Any]) -> bytes:
    """The JSON payload of DESIGN.md; event_id as a decimal string because UInt64 exceeds JSON-safe integers.

    Raises RowsRefused naming the field when the row cannot become a payload.
    """
    ts = row[_TS]
    if type(ts) is not int:
        raise RowsRefused(f"ts: must be integer epoch milliseconds (got {type(ts).__name__})")
    try:
        when = iso_ms(ts)
    except OverflowError:
        raise RowsRefused(f"ts: {ts} ms is outside the years 1..9999 an ISO 8601 date-time can show") from None
    eid = row[_EVENT_ID]
    if type(eid) is not int or not 0 <= eid < 2**64:
        raise RowsRefused(f"event_id: must be a UInt64 (got {_excerpt(eid)})")
    fields = {"event_id": str(eid), "source": row[_SOURCE], "kind": row[_KIND], "ts": when,
              "value": row[_VALUE], "text": row[_TEXT], "attrs": row[_ATTRS]}
    try:
        return orjson.dumps(fields)
    except orjson.JSONEncodeError as err:
        for key, value in fields.items():  # name the field that cannot be encoded
            try:
                orjson.dumps(value)
            except orjson.JSONEncodeError as one:
                raise RowsRefused(f"{key}: cannot be encoded as JSON ({one})") from None
        raise RowsRefused(f"payload: cannot be encoded as JSON ({err})") from None


def _excerpt(value: Any) -> str:
    text = repr(value) if not isinstance(value, int) or value.bit_length() < 256 else f"an integer of {value.bit_length()} bits"
    return text if len(text) <= 60 else text[:57] + "..."


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
        self.client: Connection | None = None  # connected
        self._idle: Connection | None = None  # never connected: the next attempt reuses it
        self._tls_context: ssl.SSLContext | None = None  # one for every connection (it holds the loaded CA store)
        self.clients_made = 0
        self.retained_ts: dict[str, int] = {}  # newest ts published retained per status topic
        self.published = 0
        self.skipped_old = 0

    def _tls(self) -> ssl.SSLContext:
        if self._tls_context is None:
            s = self.settings
            context = ssl.create_default_context(cafile=s.ca_file or None)
            if s.cert_file:
                context.load_cert_chain(s.cert_file, s.key_file or None)
            if not s.tls_verify:  # an operator's explicit choice, e.g. a lab broker with a self-signed cert
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._tls_context = context
        return self._tls_context

    def _make_client(self) -> Connection:
        self.clients_made += 1
        return Connection(self.settings.client_id or f"syncd-{self.instance}", username=self.username,
                          password=self.password, clean_session=True, keepalive=KEEPALIVE_S,
                          will=Will(self.state_topic, b"offline", qos=1, retain=True))

    async def open(self) -> None:
        """Connect (no-op when connected). While the broker is down every attempt reuses one connection object:
        a failed attempt leaves nothing in it. One that was connected and is lost is dropped and replaced."""
        if self.client is not None:
            return
        client, self._idle = self._idle or self._make_client(), None
        try:
            await client.connect(self.host, self.port, tls=self._tls() if self.tls else None, timeout=ACK_TIMEOUT)
        except MqttError:
            self._idle = client
            raise
        try:
            await client.publish([(self.state_topic, b"online", True)], 1, timeout=ACK_TIMEOUT)
        except BaseException:
            client.abort()
            raise
        self.client = client
        log.info("mqtt.connected", broker=f"{self.host}:{self.port}", tls=self.tls)

    async def write(self, batch: Batch) -> int:
        """Publish the batch's fresh events; returns how many were too old for the bus (ClickHouse-only).

        Connects first (while the broker is down nothing is built), then builds every message, raising
        RowsRefused before anything is published when a row cannot become one, then publishes.
        """
        if not any(page_len(page) for page in batch.pages):
            return 0  # only dead letters or stream status: nothing for the bus, no need for the broker
        await self.open()
        assert self.client is not None
        messages, retained, skipped = self._messages(batch)
        try:
            await self.client.publish(messages, self.settings.qos, window=PUBLISH_WINDOW, timeout=ACK_TIMEOUT)
        except BaseException:
            self._drop_connection()
            raise
        self.retained_ts.update(retained)
        self.published += len(messages)
        self.skipped_old += skipped
        return skipped
    def _messages(self, batch: Batch) -> tuple[list[tuple[str, bytes, bool]], dict[str, int], int]:
        """(topic, payload, retain) per fresh event, the retained ts per status topic, and the count too old.

        Raises RowsRefused (naming the field) when any row cannot become a message.
        """
        max_age_ms = int(self.settings.max_age * 1000)
        out: list[tuple[str, bytes, bool]] = []
        retained: dict[str, int] = {}
        levels: dict[str, str] = {}  # name -> level within this batch (long names are not in topic_level's cache)
        skipped = 0
        for page in batch.pages:
            fetched_ms = int(page.get("at", self.clock()) * 1000)
            for row in page_rows(page):
                if not isinstance(row, list | tuple) or len(row) != len(COLUMNS):
                    raise RowsRefused(f"row: must hold the {len(COLUMNS)} event columns (got {_excerpt(row)})")
                ts = row[_TS]
                if type(ts) is not int:
                    raise RowsRefused(f"ts: must be integer epoch milliseconds (got {type(ts).__name__})")
                if fetched_ms - ts > max_age_ms:  # backfill: already old when syncd fetched it
                    skipped += 1
                    continue
                parts = [self.prefix]
                for field, col in (("vendor", _VENDOR), ("tenant", _TENANT), ("device", _DEVICE), ("metric", _METRIC)):
                    name = row[col]
                    level = levels.get(name) if isinstance(name, str) else None
                    if level is None:
                        if not isinstance(name, str):
                            raise RowsRefused(f"{field}: must be a string (got {type(name).__name__})")
                        level = levels[name] = topic_level(name)
                    parts.append(level)
                topic = "/".join(parts)
                body = payload(row)
                if len(topic.encode()) + len(body) + 4 > MAX_PACKET:
                    big = max(("text", "attrs", "source", "kind"), key=lambda f: len(orjson.dumps(row[COLUMNS.index(f)])))
                    raise RowsRefused(f"{big}: the message would be {len(body)} bytes, over MQTT's {MAX_PACKET}")
                retain = False
                if row[_KIND] == "status":
                    newest = max(self.retained_ts.get(topic, -1), retained.get(topic, -1))
                    retain = ts >= newest  # an older state never overwrites a newer retained one
                    if retain:
                        retained[topic] = ts
                out.append((topic, body, retain))
        return out, retained, skipped

    def _drop_connection(self) -> None:
        """Abort: the unsent rest of a failed batch goes with the socket (the spool still holds the batch)."""
        client, self.client = self.client, None
        if client is not None:
            client.abort()

    async def close(self) -> None:
        """A clean stop leaves `offline` on the state topic (the will covers an unclean one)."""
        client, self.client, self._idle = self.client, None, None
        if client is None:
            return
        try:
            await client.publish([(self.state_topic, b"offline", True)], 1, timeout=5)
        except MqttError as err:
            log.warning("mqtt.offline_not_published", error=str(err))
        await client.disconnect()
