"""`syncd demo`: simulators + daemon + embedded ClickHouse in one process, a live table per vendor, a summary at the end."""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from syncd.app import Daemon, install_signal_handlers
from syncd.settings import load
from syncd.sim.broker import LocalMosquitto, mosquitto_binary
from syncd.sim.common import start_sims
from syncd.sim.server import config_toml, make_sims
from syncd.sinks.clickhouse import connect
from syncd.sources import SOURCES
from syncd.status import by, duration_text, parse_metrics

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
    progress = Progress(daemon, {cfg.name: cfg.vendor for cfg in settings.sources}, sorted({s.vendor for s in sims}))
    console = Console(file=out)
    live = Live(progress.table(duration, mqtt_url), console=console, refresh_per_second=4) if console.is_terminal else None
    try:
        if live is not None:
            live.start()
        while not stop.is_set() and time.monotonic() - progress.started < duration:
            try:
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            except TimeoutError:
                pass
            progress.sample()
            if live is not None:
                live.update(progress.table(duration, mqtt_url))
            else:  # not a terminal (a log, a pipe, a test): a line per second
                print(progress.line(mqtt_url), file=out, flush=True)
    finally:
        stop.set()
        await runner
        await daemon.stop()
        progress.sample(final=True)  # after the drainers flushed: what ended up stored and published
        if live is not None:
            live.update(progress.table(duration, mqtt_url))
            live.stop()  # the last table stays on the screen
        published = daemon.metrics.get("syncd_sink_rows_total", sink="mqtt")
        too_old = daemon.metrics.get("syncd_sink_skipped_rows_total", sink="mqtt", reason="max_age")
        for r in runners:
            await r.cleanup()
        if broker is not None:
            broker.stop()
    if live is None:
        console.print(progress.table(duration, mqtt_url))
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


@dataclass
class VendorProgress:
    streams: int = 0
    events: float = 0.0
    rate: float = 0.0  # events/s since the previous sample
    lag_s: float | None = None  # the furthest behind of its streams
    failing: int = 0  # streams whose last run failed
    errors: float = 0.0  # failed stream runs so far


class Progress:
    """Samples the in-process daemon once a second: per vendor from its streams and metrics, totals for the sinks."""

    def __init__(self, daemon: Daemon, vendor_of: dict[str, str], vendors: list[str]) -> None:
        self.daemon, self.vendor_of, self.vendors = daemon, vendor_of, vendors
        self.started = self.at = time.monotonic()
        self.rows = {v: VendorProgress() for v in vendors}
        self.stored = self.published = self.publish_rate = 0.0
        self.final = False

    def sample(self, *, final: bool = False) -> None:
        """Read the daemon now; rates are over the last second, or, `final`, means over the whole run."""
        now = time.monotonic()
        elapsed, self.at = max(1e-6, now - (self.started if final else self.at)), now
        self.final = final
        samples = parse_metrics(self.daemon.metrics.render())  # the text /metrics serves: no registry internals
        events = self._per_vendor(by(samples, "syncd_events_total", "source"))
        errors = self._per_vendor(by(samples, "syncd_stream_errors_total", "source"))
        rows = {v: VendorProgress() for v in self.vendors}
        for st in self.daemon.syncer.states.values():
            row = rows.setdefault(self.vendor_of.get(st.source, "?"), VendorProgress())
            row.streams += 1
            row.failing += st.failing
            if st.lag_s is not None:
                row.lag_s = max(row.lag_s or 0.0, st.lag_s)
        for vendor, row in rows.items():
            row.events, row.errors = events.get(vendor, 0.0), errors.get(vendor, 0.0)
            row.rate = (row.events - (0.0 if final else self.rows.get(vendor, VendorProgress()).events)) / elapsed
        self.rows = rows
        sinks = by(samples, "syncd_sink_rows_total", "sink")
        published = sinks.get(("mqtt",), 0.0)
        self.publish_rate = (published - (0.0 if final else self.published)) / elapsed
        self.stored, self.published = sinks.get(("clickhouse",), 0.0), published

    def _per_vendor(self, per_source: dict[tuple[str, ...], float]) -> dict[str, float]:
        out: dict[str, float] = {}
        for (source,), value in per_source.items():
            vendor = self.vendor_of.get(source, "?")
            out[vendor] = out.get(vendor, 0.0) + value
        return out

    def table(self, duration: float, mqtt_url: str) -> Group:
        elapsed = min(duration, time.monotonic() - self.started)
        title = f"syncd demo · {elapsed:.0f}s of {duration:.0f}s" + (" · ended (events/s: mean over the run)"
                                                                       if self.final else "")
        table = Table(title=title, title_justify="left", show_footer=True)
        rows = self.rows.values()
        lags = [r.lag_s for r in rows if r.lag_s is not None]
        footer: list[Any] = ["all", f"{sum(r.streams for r in rows)}", f"{sum(r.events for r in rows):,.0f}",
                             f"{sum(r.rate for r in rows):,.0f}", duration_text(max(lags)) if lags else "-",
                             f"{sum(r.failing for r in rows)}", f"{sum(r.errors for r in rows):,.0f}"]
        for name, foot in zip(("vendor", "streams", "events", "events/s", "lag", "failing", "errors"), footer, strict=True):
            table.add_column(name, foot, justify="left" if name == "vendor" else "right", no_wrap=True)
        for vendor, r in sorted(self.rows.items()):
            table.add_row(vendor, f"{r.streams}", f"{r.events:,.0f}", f"{r.rate:,.0f}", duration_text(r.lag_s),
                          f"{r.failing}", f"{r.errors:,.0f}", style="red" if r.failing else None)
        mqtt = (f"MQTT {self.published:,.0f} published ({self.publish_rate:,.0f}/s)" if mqtt_url
                else "MQTT off (--mqtt URL publishes too)")
        return Group(table, Text(f"ClickHouse {self.stored:,.0f} stored · {mqtt} · spool "
                                 f"{self.daemon.spool.pending_bytes / 1e6:.1f} MB"))

    def line(self, mqtt_url: str) -> str:
        """Today's one-line progress, for output that is not a terminal."""
        rows = self.rows.values()
        mqtt = f"  mqtt {self.publish_rate:7.0f} ev/s" if mqtt_url else ""
        lags = " ".join(f"{v}:{duration_text(r.lag_s)}" for v, r in sorted(self.rows.items()) if r.lag_s is not None)
        return (f"[{time.monotonic() - self.started:5.1f}s] fetched {sum(r.events for r in rows):8.0f}  stored "
                f"{self.stored:8.0f}  {sum(r.rate for r in rows):8.0f} ev/s{mqtt}  spool "
                f"{self.daemon.spool.pending_bytes / 1e6:6.1f} MB  lag {lags or '-'}")
