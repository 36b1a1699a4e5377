"""MQTT publish rate (QoS 1, every publish acknowledged) beside its target and the ClickHouse insert rate, one run.

Both sinks get the very same spooled batches of fresh events, one after the other in this process; the
ratio publish/insert says whether the bus or the store limits a syncd that feeds both. The reference line
publishes the same messages (built by the sink, before the clock starts) through paho-mqtt's public API
driven from asyncio, the client the sink used before `mqtt_protocol`: same broker, same window, same run.
Usage: python bench/bench_mqtt.py [--events 200000] [--batch 5000] [--reference 50000]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from syncd.events import COLUMNS, Event
from syncd.settings import MqttSettings
from syncd.sim.broker import LocalMosquitto
from syncd.sinks.base import Sink
from syncd.sinks.clickhouse import ClickHouseSink
from syncd.sinks.mqtt import PUBLISH_WINDOW, MqttSink, payload, topic_level
from syncd.spool import Batch

TARGET = 20_000  # events/s, QoS 1, all acknowledged, one core (issue 10)


def _batches(n: int, size: int) -> list[Batch]:
    now = int(time.time() * 1000)
    rows = [Event("bench", "iotopen", "log", str(i % 4), str(i % 40), f"sensor/{i % 10}", now - i, float(i), None,
                  {"unit": "C"}).row() for i in range(n)]
    return [Batch("x", i, i, f"bench-{i}", [{"e": rows[i:i + size], "at": time.time()}]) for i in range(0, n, size)]


async def _timed(sink: Sink, batches: list[Batch]) -> float:
    """Seconds to write every batch (the connection is opened before the clock starts)."""
    await sink.open()
    t0 = time.perf_counter()
    for b in batches:
        await sink.write(b)
    elapsed = time.perf_counter() - t0
    await sink.close()
    return elapsed


def _messages(batches: list[Batch]) -> list[tuple[str, bytes, bool]]:
    """The sink's (topic, payload, retain) for every event, from its public topic and payload functions."""
    cols = [COLUMNS.index(c) for c in ("vendor", "tenant", "device", "metric")]
    return [("/".join(["syncd", *(topic_level(row[c]) for c in cols)]), payload(row), False)
            for b in batches for page in b.pages for row in page["e"]]


async def _paho(port: int, messages: list[tuple[str, bytes, bool]]) -> float:
    """Seconds for paho-mqtt (public API: add_reader/add_writer, on_publish) to get every message acknowledged."""
    loop = asyncio.get_running_loop()
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-paho")
    client.max_inflight_messages_set(0)  # our window bounds it; paho's own limit rescans its queue per ack
    connected: asyncio.Future[None] = loop.create_future()
    waiting: set[int] = set()
    progress = asyncio.Event()

    def on_socket_open(c: paho.Client, _u: Any, sock: Any) -> None:
        loop.add_reader(sock, c.loop_read)

    def on_socket_close(_c: paho.Client, _u: Any, sock: Any) -> None:
        loop.remove_reader(sock)

    def on_register_write(c: paho.Client, _u: Any, sock: Any) -> None:
        loop.add_writer(sock, c.loop_write)

    def on_unregister_write(_c: paho.Client, _u: Any, sock: Any) -> None:
        loop.remove_writer(sock)

    def on_connect(*_: Any) -> None:
        if not connected.done():
            connected.set_result(None)

    def on_publish(_c: Any, _u: Any, mid: int, _rc: Any, _p: Any) -> None:
        waiting.discard(mid)
        progress.set()

    client.on_socket_open, client.on_socket_close = on_socket_open, on_socket_close
    client.on_socket_register_write, client.on_socket_unregister_write = on_register_write, on_unregister_write
    client.on_connect, client.on_publish = on_connect, on_publish
    client.connect("127.0.0.1", port, keepalive=30)
    await asyncio.wait_for(connected, 10)
    t0 = time.perf_counter()
    for topic, body, retain in messages:
        while len(waiting) >= PUBLISH_WINDOW:
            progress.clear()
            await asyncio.wait_for(progress.wait(), 30)
        waiting.add(client.publish(topic, body, 1, retain).mid)
    while waiting:
        progress.clear()
        await asyncio.wait_for(progress.wait(), 30)
    elapsed = time.perf_counter() - t0
    client.disconnect()
    return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=5_000)
    parser.add_argument("--reference", type=int, default=50_000, help="events for the paho reference (0: skip)")
    args = parser.parse_args()
    batches = _batches(args.events, args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        broker = LocalMosquitto(Path(tmp) / "mosquitto")
        broker.start()
        try:
            t_ch = await _timed(ClickHouseSink(f"chdb://{tmp}/clickhouse", "bench"), batches)
            sink = MqttSink(MqttSettings(url=broker.url), instance="bench")
            t_mq = await _timed(sink, batches)
            reference = _messages(batches)[:args.reference]
            t_ref = await _paho(broker.port, reference) if reference else 0.0
        finally:
            broker.stop()
    n, rate = args.events, args.events / t_mq
    print(f"{n} fresh events in batches of {args.batch}")
    print(f"clickhouse insert (embedded chdb)   : {n / t_ch:10.0f} events/s  ({t_ch:.2f} s)")
    print(f"mqtt publish (QoS 1, all acked)     : {rate:10.0f} events/s  ({t_mq:.2f} s)  "
          f"target ≥ {TARGET:,} ev/s: {'met' if rate >= TARGET else 'NOT met'}")
    if reference:
        print(f"reference: paho-mqtt public API     : {len(reference) / t_ref:10.0f} events/s  "
              f"({len(reference)} of the same messages, same broker and window)")
    print(f"ratio mqtt/clickhouse: {rate / (n / t_ch):.2f}")


if __name__ == "__main__":
    asyncio.run(main())
