"""`syncd demo`: simulators + daemon + embedded ClickHouse in one process, live progress, a summary at the end."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from syncd.app import Daemon, install_signal_handlers
from syncd.settings import load
from syncd.sim.broker import LocalMosquitto, mosquitto_binary
from syncd.sim.common import start_sims
from syncd.sim.server import config_toml, make_sims
from syncd.sinks.clickhouse import connect
from syncd.sources import SOURCES

SUMMARY_SQL = """
SELECT vendor, kind, count() AS events, uniqExact(device) AS devices,
       formatDateTime(max(ts), '%Y-%m-%d %H:%i:%S') AS newest
FROM {db}.events FINAL GROUP BY vendor, kind ORDER BY vendor, kind
"""


async def demo(data_dir: Path, duration: float, *, mqtt_url: str = "", seed: int = 1) -> int:
    data_dir.mkdir(parents=True, exist_ok=True)
    out = sys.stdout
    vendors = list(SOURCES)  # every vendor that has a connector
    # Navixy only pushes, over an MQTT broker the operator owns: the --mqtt broker, or a private Mosquitto.
    broker: LocalMosquitto | None = None
    push_url = mqtt_url
    if not push_url and mosquitto_binary():
        broker = LocalMosquitto(data_dir / "mosquitto")
        broker.start()
        push_url = broker.url
    if not push_url:
        vendors.remove("navixy")
        print("navixy left out: it pushes over MQTT and no broker is at hand (install mosquitto, or pass --mqtt URL)",
              file=out)
    sims = make_sims(vendors, seed=seed, live=True, options={"navixy": {"mqtt_url": push_url, "publish_rate": 20.0}})
    runners = await start_sims(sims)
    cfg = data_dir / "demo.toml"
    text = config_toml(sims, str(data_dir)).replace('interval = "5s"', 'interval = "2s"')
    if mqtt_url:
        text += f'\n[mqtt]\nurl = "{mqtt_url}"\n'
    cfg.write_text(text)
    settings = load(cfg, {})
    print(f"syncd demo: {', '.join(f'{s.vendor} at {s.url}' for s in sims)}; data in {data_dir}", file=out)
    print(f"running for {duration:.0f}s (Ctrl-C stops early)...", file=out, flush=True)

    daemon = Daemon(settings)
    stop = asyncio.Event()
    install_signal_handlers(stop)
    await daemon.start()
    runner = asyncio.create_task(daemon.run_forever(stop))
    started = time.monotonic()
    last_events, last_published, last_t = 0.0, 0.0, started
    try:
        while not stop.is_set() and time.monotonic() - started < duration:
            try:
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            except TimeoutError:
                pass
            now = time.monotonic()
            events = daemon.metrics.total("syncd_events_total")
            published = daemon.metrics.get("syncd_sink_rows_total", sink="mqtt")
            rate = (events - last_events) / max(1e-6, now - last_t)
            mqtt_text = f"  mqtt {(published - last_published) / max(1e-6, now - last_t):7.0f} ev/s" if mqtt_url else ""
            last_events, last_published, last_t = events, published, now
            lags: dict[str, float] = {}
            for st in daemon.syncer.states.values():
                if st.lag_s is not None:
                    lags[st.source] = max(lags.get(st.source, 0.0), st.lag_s)
            lag_text = " ".join(f"{k}:{v:.0f}s" for k, v in sorted(lags.items())) or "-"
            stored = daemon.metrics.get("syncd_sink_rows_total", sink="clickhouse")
            print(f"[{now - started:5.1f}s] fetched {events:8.0f}  stored {stored:8.0f}  {rate:8.0f} ev/s{mqtt_text}  "
                  f"spool {daemon.spool.pending_bytes / 1e6:6.1f} MB  lag {lag_text}", file=out, flush=True)
    finally:
        stop.set()
        await runner
        await daemon.stop()
        published = daemon.metrics.get("syncd_sink_rows_total", sink="mqtt")
        too_old = daemon.metrics.get("syncd_sink_skipped_rows_total", sink="mqtt", reason="max_age")
        for r in runners:
            await r.cleanup()
        if broker is not None:
            broker.stop()
    client = connect(settings.clickhouse_dsn, settings.clickhouse.database)
    try:
        result = client.query(SUMMARY_SQL.format(db=settings.clickhouse.database))
        status = client.query(f"SELECT count(), sum(ok) FROM {settings.clickhouse.database}.sync_status FINAL")
        dead = client.query(f"SELECT count() FROM {settings.clickhouse.database}.dead_letter")
    finally:
        client.close()
    print("\nsummary (read back from ClickHouse, events FINAL):", file=out)
    print(f"{'vendor':10} {'kind':10} {'events':>10} {'devices':>8}  newest (UTC)", file=out)
    for vendor, kind, events, devices, newest in result.result_rows:
        print(f"{vendor:10} {kind:10} {events:>10} {devices:>8}  {newest}", file=out)
    total, ok = status.result_rows[0]
    print(f"streams: {ok}/{total} healthy; dead letters: {dead.result_rows[0][0]}", file=out)
    if mqtt_url:
        print(f"mqtt: {published:.0f} events published to {mqtt_url} ({too_old:.0f} older than max_age kept "
              "ClickHouse-only)", file=out)
    print(f"query it: syncd query --config {cfg} \"SELECT count() FROM syncd.events\"", file=out)
    return 0
