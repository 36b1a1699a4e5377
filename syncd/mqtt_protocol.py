"""MQTT 3.1.1 over asyncio: the client side syncd needs and nothing more.

Publishing (the sink): QoS 0, 1 or 2 with a window of publishes in flight; `publish` returns once the
broker acknowledged every message (QoS 0: once a PINGRESP shows the broker has read them all).
Subscribing (push streams): QoS 1 messages that are acknowledged only when the caller says so (`ack`).
Also TLS (an `ssl.SSLContext`), user name and password, a will, and keepalive pings.

A `Connection` serves one broker session. A failed connect leaves nothing in it, so the same object may try
again; once it was connected and is lost, make a new one. `abort` discards whatever is still unsent.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import aiomqtt

# packet types (the high nibble of the first byte)
CONNACK, PUBLISH, PUBACK, PUBREC, PUBCOMP, SUBACK, PINGRESP = 2, 3, 4, 5, 7, 9, 13
PINGREQ_PACKET, DISCONNECT_PACKET = b"\xc0\x00", b"\xe0\x00"
MAX_ID = 65_535  # packet identifiers are 16 bits, 0 is not one
# MQTT 3.1.1 has no "receive maximum": Mosquitto still keeps one (max_inflight_messages, 20 by default) for QoS 2
# publishes awaiting PUBREL, and one over it is dropped yet acknowledged. QoS 1 publishes it takes without limit.
QOS2_WINDOW = 10
CHUNK = 128  # publishes written to the socket at once: one send per chunk, not per message
# A broker that leaves Nagle on (Mosquitto's default: set_tcp_nodelay false) holds its next PUBACKs until our
# TCP ACK arrives, and Linux delays that ACK up to 40 ms while we have nothing to send: ask for it at once.
QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
CONNACK_CODES = {1: "unacceptable protocol version", 2: "client identifier rejected", 3: "server unavailable",
                 4: "bad user name or password", 5: "not authorized"}


class MqttError(aiomqtt.MqttError):
    """The connection failed or was lost. A subclass of aiomqtt's, so code that catches that keeps working."""


class ConnectRefused(MqttError):
    """The broker answered CONNECT with a refusal `code` (4: bad user name or password, 5: not authorized)."""

    def __init__(self, code: int) -> None:
        super().__init__(f"connection refused ({code}: {CONNACK_CODES.get(code, 'unknown reason')})")
        self.code = code


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class Received(NamedTuple):
    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int


def _length(n: int) -> bytes:
    """MQTT's variable-length "remaining length"."""
    if n < 128:
        return bytes((n,))
    out = bytearray()
    while n:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
    return bytes(out)


def _text(raw: bytes) -> bytes:
    return len(raw).to_bytes(2, "big") + raw


class Connection(asyncio.Protocol):
    """One MQTT 3.1.1 client session on one socket."""

    def __init__(self, client_id: str, *, username: str = "", password: str = "", clean_session: bool = True,
                 keepalive: int = 30, will: Will | None = None) -> None:
        self.client_id, self.username, self.password = client_id, username, password
        self.clean_session, self.keepalive, self.will = clean_session, keepalive, will
        self.inbox: asyncio.Queue[Received] = asyncio.Queue()
        self.was_connected = False
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._unacked: set[int] = set()  # packet ids of publishes not yet acknowledged
        self._subacks: dict[int, asyncio.Future[list[int]]] = {}
        self._pongs: deque[asyncio.Future[None] | None] = deque()  # one per PINGREQ sent, in order
        self._next_id = 0
        self._acked = 0  # publishes acknowledged so far: progress, for the ack timeout
        self._settled: tuple[asyncio.Future[None], int] | None = None  # resolved once unacked <= the int
        self._resume: asyncio.Future[None] | None = None  # set while the transport asks us to stop writing
        self._connack: asyncio.Future[tuple[int, int]] | None = None
        self._lost: asyncio.Future[str] | None = None  # resolved with the reason when the connection ends
        self._wrote = False
        self._pings_unanswered = 0
        self._timer: asyncio.TimerHandle | None = None
        self._quickack: Any = None  # the TCP socket, where the OS can be asked to acknowledge at once

    # -- connecting --------------------------------------------------------------------------------

    async def connect(self, host: str, port: int, *, tls: ssl.SSLContext | None = None, timeout: float = 30.0) -> bool:
        """Open the socket, send CONNECT, wait for CONNACK; returns the broker's "session present" flag."""
        if self.was_connected:
            raise RuntimeError("a Connection serves one session; make a new one to reconnect")
        loop = asyncio.get_running_loop()
        self._buffer.clear()
        self._connack, self._lost = loop.create_future(), loop.create_future()
        try:
            async with asyncio.timeout(timeout):
                await loop.create_connection(lambda: self, host, port, ssl=tls, server_hostname=host if tls else None)
                flags, code = await self._until(self._connack)
        except TimeoutError:
            self.abort()
            raise MqttError(f"no connection to {host}:{port} within {timeout:g} s") from None
        except OSError as err:  # refused, unreachable, or TLS (certificate, host name) failed
            self.abort()
            raise MqttError(f"cannot connect to {host}:{port}: {err}") from err
        except BaseException:
            self.abort()
            raise
        if code:
            self.abort()
            raise ConnectRefused(code)
        self.was_connected = True
        if self.keepalive:
            self._timer = loop.call_later(self.keepalive / 2, self._tick)
        return bool(flags & 1)

    def _connect_packet(self) -> bytes:
        flags = 0x02 if self.clean_session else 0
        body = _text(self.client_id.encode())
        if self.will is not None:
            flags |= 0x04 | self.will.qos << 3 | (0x20 if self.will.retain else 0)
            body += _text(self.will.topic.encode()) + _text(self.will.payload)
        if self.username:  # MQTT 3.1.1 allows a password only with a user name
            flags |= 0x80
            body += _text(self.username.encode())
            if self.password:
                flags |= 0x40
                body += _text(self.password.encode())
        head = b"\x00\x04MQTT\x04" + bytes((flags,)) + self.keepalive.to_bytes(2, "big")
        return b"\x10" + _length(len(head) + len(body)) + head + body

    async def disconnect(self, timeout: float = 5.0) -> None:
        """A clean end: DISCONNECT (the broker drops the will), then close once the socket is flushed."""
        if self._transport is not None and self._lost is not None and not self._lost.done():
            self._transport.write(DISCONNECT_PACKET)
            self._transport.close()
            try:
                await asyncio.wait_for(asyncio.shield(self._lost), timeout)
            except TimeoutError:
                pass
        self.abort()

    def abort(self) -> None:
        """Drop the socket at once with everything still unsent (the broker then publishes the will)."""
        if self._transport is not None:
            self._transport.abort()
        self._transport = None
        if self._timer is not None:
            self._timer.cancel()

    # -- publishing --------------------------------------------------------------------------------

    async def publish(self, messages: Iterable[tuple[str, bytes, bool]], qos: int, *, window: int = 1000,
                      timeout: float = 30.0) -> None:
        """Send every (topic, payload, retain); return once the broker has acknowledged each one.

        At most `window` publishes (QoS 2: `QOS2_WINDOW`) wait for their acknowledgement at once. Raises
        MqttError when the connection is lost or `timeout` seconds pass without any acknowledgement.
        """
        if not 0 < window < MAX_ID // 2:
            raise ValueError(f"window must be between 1 and {MAX_ID // 2 - 1}")
        self._check_open()
        if qos == 2:
            window = min(window, QOS2_WINDOW)
        header, unacked = 0x30 | qos << 1, self._unacked
        chunk: list[bytes] = []
        for topic, body, retain in messages:
            name = topic.encode()
            if qos:
                if len(unacked) >= window:
                    await self._send(chunk, timeout)
                    chunk = []
                    # go on once a chunk's worth is acknowledged: the broker always has the next publishes to read
                    await self._settle(window - CHUNK if window > 2 * CHUNK else window // 2, timeout)
                mid = self._new_id()
                unacked.add(mid)
                chunk.append(bytes((header | retain,)) + _length(len(name) + len(body) + 4) + len(name).to_bytes(2, "big")
                             + name + mid.to_bytes(2, "big") + body)
            else:
                chunk.append(bytes((header | retain,)) + _length(len(name) + len(body) + 2) + len(name).to_bytes(2, "big")
                             + name + body)
            if len(chunk) >= CHUNK:
                await self._send(chunk, timeout)
                chunk = []
        await self._send(chunk, timeout)
        if qos:
            await self._settle(0, timeout)
        else:  # the broker answers a PINGREQ after it has read everything sent before it
            await self._ping(timeout)

    def _new_id(self) -> int:
        while True:
            self._next_id = self._next_id % MAX_ID + 1
            if self._next_id not in self._unacked and self._next_id not in self._subacks:
                return self._next_id

    async def _send(self, chunk: list[bytes], timeout: float) -> None:
        if chunk:
            self._write(b"".join(chunk))
        while self._resume is not None:  # the transport's buffer is full: wait until the broker reads on
            try:
                await self._until(self._resume, timeout)
            except TimeoutError:
                raise MqttError(f"the broker read nothing for {timeout:g} s") from None

    async def _settle(self, left: int, timeout: float) -> None:
        """Wait until at most `left` publishes are unacknowledged; MqttError after `timeout` s without progress."""
        while len(self._unacked) > left:
            before = self._acked
            future = asyncio.get_running_loop().create_future()
            self._settled = (future, left)
            try:
                await self._until(future, timeout)
            except TimeoutError:
                if self._acked == before:
                    raise MqttError(f"{len(self._unacked)} publishes unacknowledged for {timeout:g} s") from None
            finally:
                self._settled = None

    async def _ping(self, timeout: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pongs.append(future)
        self._write(PINGREQ_PACKET)
        try:
            await self._until(future, timeout)
        except TimeoutError:
            raise MqttError(f"no PINGRESP within {timeout:g} s") from None

    # -- subscribing -------------------------------------------------------------------------------

    async def subscribe(self, topics: list[tuple[str, int]], timeout: float = 30.0) -> list[int]:
        """SUBSCRIBE to (filter, QoS) pairs; the broker's return code per filter (0x80: refused)."""
        self._check_open()
        mid = self._new_id()
        body = b"".join(_text(t.encode()) + bytes((q,)) for t, q in topics)
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._subacks[mid] = future
        self._write(b"\x82" + _length(len(body) + 2) + mid.to_bytes(2, "big") + body)
        try:
            return await self._until(future, timeout)
        except TimeoutError:
            raise MqttError(f"no SUBACK within {timeout:g} s") from None
        finally:
            self._subacks.pop(mid, None)

    async def receive(self) -> Received:
        """The next message from the subscriptions; MqttError once the connection is lost (cancelling is safe)."""
        if self.inbox.empty():
            self._check_open()
        getter = asyncio.ensure_future(self.inbox.get())
        try:
            return await self._until(getter)
        finally:
            getter.cancel()  # a cancelled Queue.get leaves its message in the queue

    def ack(self, mid: int, qos: int) -> None:
        """Acknowledge a received QoS 1 message (QoS 0 needs none); a no-op once the connection is lost."""
        if qos == 1 and self._transport is not None:
            self._write(b"\x40\x02" + mid.to_bytes(2, "big"))

    # -- the socket --------------------------------------------------------------------------------

    async def _until(self, future: asyncio.Future[Any], timeout: float | None = None) -> Any:
        """`future`'s result; MqttError if the connection ends first, TimeoutError after `timeout` seconds."""
        assert self._lost is not None
        if not future.done():
            await asyncio.wait((future, self._lost), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if future.done():
            return future.result()
        if self._lost.done():
            raise MqttError(self._lost.result())
        raise TimeoutError

    def _check_open(self) -> None:
        if self._transport is None or self._lost is None or self._lost.done():
            raise MqttError(self._lost.result() if self._lost is not None and self._lost.done() else "not connected")

    def _write(self, data: bytes) -> None:
        if self._transport is None:
            self._check_open()  # raises: why there is no socket
        assert self._transport is not None
        self._transport.write(data)
        self._wrote = True

    def _tick(self) -> None:
        """Keepalive: ping when nothing was sent for half the interval; a ping unanswered that long means dead."""
        if self._pings_unanswered:
            self._close(f"no PINGRESP within {self.keepalive / 2:g} s")
            return
        if not self._wrote and self._transport is not None:
            self._pongs.append(None)
            self._pings_unanswered += 1
            self._write(PINGREQ_PACKET)
        self._wrote = False
        self._timer = asyncio.get_running_loop().call_later(self.keepalive / 2, self._tick)

    def _close(self, reason: str) -> None:
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(reason)
        self.abort()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if QUICKACK is not None and sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            self._quickack = sock
        transport.write(self._connect_packet())

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._timer is not None:
            self._timer.cancel()
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(f"connection lost ({exc})" if exc else "connection closed by the broker")
        if self._resume is not None:
            self._resume.set_result(None)
            self._resume = None

    def pause_writing(self) -> None:
        self._resume = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._resume is not None:
            self._resume.set_result(None)
            self._resume = None

    def data_received(self, data: bytes) -> None:
        if self._quickack is not None:
            try:  # not sticky: Linux falls back to delayed ACKs, so ask again after every read
                self._quickack.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)
            except OSError:
                self._quickack = None
        buf = self._buffer
        buf += data
        pos, end, acked = 0, len(buf), 0
        while end - pos >= 2:
            size, start, shift = 0, pos + 1, 0
            while start < end and start - pos <= 4:  # remaining length: up to 4 bytes, low 7 bits first
                byte = buf[start]
                size |= (byte & 0x7F) << shift
                shift += 7
                start += 1
                if not byte & 0x80:
                    break
            else:
                if start - pos > 4:
                    self._close("malformed packet from the broker")
                    return
                break
            if start + size > end:
                break
            kind, first = buf[pos] >> 4, buf[pos]
            pos = start + size
            if kind == PUBACK or kind == PUBCOMP:
                mid = buf[start] << 8 | buf[start + 1]
                if mid in self._unacked:
                    self._unacked.remove(mid)
                    acked += 1
            elif kind == PUBLISH:
                if not self._received(first, bytes(buf[start:pos])):
                    return
            elif kind == PUBREC:  # QoS 2, step two: release it
                self._write(b"\x62\x02" + bytes(buf[start:start + 2]))
            elif kind == PINGRESP:
                pong = self._pongs.popleft() if self._pongs else None
                if pong is None:
                    self._pings_unanswered = 0
                elif not pong.done():
                    pong.set_result(None)
            elif kind == SUBACK:
                future = self._subacks.get(buf[start] << 8 | buf[start + 1])
                if future is not None and not future.done():
                    future.set_result(list(buf[start + 2:pos]))
            elif kind == CONNACK and self._connack is not None and not self._connack.done():
                self._connack.set_result((buf[start], buf[start + 1]))
            else:
                self._close(f"unexpected packet type {kind} from the broker")
                return
        del buf[:pos]
        if acked:
            self._acked += acked
            if self._settled is not None and len(self._unacked) <= self._settled[1] and not self._settled[0].done():
                self._settled[0].set_result(None)

    def _received(self, first: int, body: bytes) -> bool:
        qos, size = (first >> 1) & 3, int.from_bytes(body[:2], "big")
        if qos > 1:  # we subscribe at QoS 1 at most: a broker that sends QoS 2 breaks the protocol
            self._close("the broker sent a QoS 2 message to a QoS 1 subscription")
            return False
        mid = int.from_bytes(body[2 + size:4 + size], "big") if qos else 0
        topic = body[2:2 + size].decode("utf-8", "replace")
        self.inbox.put_nowait(Received(topic, body[2 + size + (2 if qos else 0):], qos, bool(first & 1), mid))
        return True
