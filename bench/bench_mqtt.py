"""MQTT publish rate (QoS 1, every publish acknowledged) beside the ClickHouse insert rate, same batches, one run.

Both sinks get the very same spooled batches of fresh events, one after the other in this process; the
ratio publish/insert says whether the bus or the store limits a syncd that feeds both.
Usage: python bench/bench_mqtt.py [--events 200000] [--batch 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from syncd.events import Event
from syncd.settings import MqttSettings
from syncd.sim.broker import LocalMosquitto
from syncd.sinks.base import Sink
from syncd.sinks.clickhouse import ClickHouseSink
from syncd.sinks.mqtt import MqttSink
from syncd.spool import Batch


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


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=5_000)
    args = parser.parse_args()
    batches = _batches(args.events, args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        broker = LocalMosquitto(Path(tmp) / "mosquitto")
        broker.start()
        try:
            t_ch = await _timed(ClickHouseSink(f"chdb://{tmp}/clickhouse", "bench"), batches)
            t_mq = await _timed(MqttSink(MqttSettings(url=broker.url), instance="bench"), batches)
        finally:
            broker.stop()
    n = args.events
    print(f"{n} fresh events in batches of {args.batch}")
    print(f"clickhouse insert (embedded chdb)   : {n / t_ch:10.0f} events/s  ({t_ch:.2f} s)")
    print(f"mqtt publish (QoS 1, all acked)     : {n / t_mq:10.0f} events/s  ({t_mq:.2f} s)")
    print(f"ratio mqtt/clickhouse: {(n / t_mq) / (n / t_ch):.2f}")


if __name__ == "__main__":
    asyncio.run(main())
