"""Metrics (Prometheus, through prometheus-client), /healthz and /readyz, and logging set-up."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import orjson
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from aiohttp import web

log = structlog.get_logger("syncd.observability")

TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes; every Prometheus reads it


@dataclass(frozen=True)
class Family:
    """One metric family: its type, its HELP text and the label names every series of it carries."""

    type: Literal["counter", "gauge", "histogram"]
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


# Fetches include throttle waits, retries and Retry-After pauses, hence the long tail.
FETCH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
WRITE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# Every series syncd exports. Labels stay bounded: a `stream` label only on per-stream counters and gauges (one
# series per stream, 10,000 streams fit), never on a histogram (13 buckets per stream would not).
FAMILIES: dict[str, Family] = {
    # pollers
    "syncd_events_total": Family("counter", "Events fetched, normalized and committed to the spool.", ("kind", "source")),
    "syncd_pages_total": Family("counter", "Pages fetched and committed to the spool, each with its cursor.", ("source",)),
    "syncd_page_fetch_seconds": Family(
        "histogram", "Seconds to fetch one page from the vendor, throttle waits, retries and re-logins included.",
        ("kind", "source"), FETCH_BUCKETS),
    "syncd_late_rows_total": Family(
        "counter", "Rows a re-read of the late window found that earlier reads had missed.", ("source", "stream")),
    "syncd_dead_letters_total": Family(
        "counter", "Records stored in the dead_letter table instead of events (not normalizable, or refused by a sink).",
        ("source", "stream")),
    "syncd_stream_errors_total": Family(
        "counter", "Stream runs that failed, by error class; the cursor stays where it was.", ("error", "source", "stream")),
    "syncd_stream_lag_seconds": Family(
        "gauge", "How far behind now the stream was when its last run ended.", ("source", "stream")),
    "syncd_stream_cursor_timestamp_seconds": Family(
        "gauge", "Unix time the stream's stored data reaches: when its last page was stored, minus that page's lag.",
        ("source", "stream")),
    "syncd_discovery_errors_total": Family(
        "counter", "Stream discoveries of a source that failed, by error class.", ("error", "source")),
    "syncd_source_auth_failed": Family(
        "gauge", "1 while the source's credential is refused (re-checked with backoff), else 0.", ("source",)),
    "syncd_http_requests_total": Family(
        "counter", "HTTP requests sent to the source's vendor, retries and logins included (read at scrape time).",
        ("source",)),
    "syncd_throttle_rate": Family(
        "gauge", "Requests per second the source's throttle allows now (halved on a 429, then climbing back with time).",
        ("source",)),
    "syncd_throttle_max_rate": Family(
        "gauge", "Requests per second configured for the source (its rate setting or the vendor's default).", ("source",)),
    # spool
    "syncd_spool_bytes": Family("gauge", "Bytes of spooled pages that some sink has not delivered yet."),
    "syncd_spool_backlog_rows": Family(
        "gauge", "Events in the spool the sink has not delivered yet (read at scrape time).", ("sink",)),
    "syncd_spool_backlog_bytes": Family(
        "gauge", "Bytes (as spooled) of the pages the sink has not delivered yet (read at scrape time).", ("sink",)),
    "syncd_spool_backlog_age_seconds": Family(
        "gauge", "Age of the oldest spooled page the sink has not delivered yet, 0 when none waits (read at scrape "
        "time).", ("sink",)),
    "syncd_spool_dropped_rows_total": Family(
        "counter", "Events given up for a failing sink because the spool was full (spool.on_full = drop_oldest).",
        ("sink",)),
    "syncd_pollers_paused": Family("gauge", "1 while the pollers wait because the spool is full (spool.on_full = block)."),
    # sinks
    "syncd_sink_rows_total": Family("counter", "Events written to the sink.", ("sink",)),
    "syncd_sink_batches_total": Family("counter", "Batches written to the sink.", ("sink",)),
    "syncd_sink_write_seconds": Family(
        "histogram", "Seconds to write one batch to the sink and record it delivered in the spool.", ("sink",),
        WRITE_BUCKETS),
    "syncd_sink_last_write_seconds": Family("gauge", "Seconds the sink's last successful batch write took.", ("sink",)),
    "syncd_sink_skipped_rows_total": Family(
        "counter", "Events the sink left out on purpose (reason max_age: too old for MQTT).", ("reason", "sink")),
    "syncd_sink_refused_rows_total": Family(
        "counter", "Events the sink refused; each was found by splitting its batch and became a dead letter.", ("sink",)),
    "syncd_sink_errors_total": Family("counter", "Failed batch writes by error class; the batch is retried.", ("error", "sink")),
    "syncd_sink_up": Family("gauge", "1 while the sink's last write succeeded, 0 while it fails.", ("sink",)),
    "syncd_sink_stopped": Family("gauge", "1 while the sink is stopped on a schema mismatch, else 0.", ("sink",)),
}


class Metrics:
    """The daemon's series (`FAMILIES`) in a registry of its own: several daemons may share a process (tests).

    A name missing from `FAMILIES`, or labels other than its label names, raise: a typo fails loudly.
    """

    def __init__(self) -> None:
        # Per-stream gauges (one series per stream, 10,000 streams) are plain values collected at scrape time: a
        # prometheus-client child per series costs about a kilobyte and a lock.
        self._plain: dict[str, dict[tuple[str, ...], float]] = {
            name: {} for name, f in FAMILIES.items() if f.type == "gauge" and "stream" in f.labels}
        self._families: dict[str, Any] = {name: _metric(name, f) for name, f in FAMILIES.items()
                                          if name not in self._plain}
        self._children: dict[tuple[Any, ...], Any] = {}  # (name, *label items) -> its series
        self._on_scrape: list[Callable[[], Awaitable[None]]] = []
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(self._families, self._plain))

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        self._series(name, labels).inc(amount)

    def set(self, name: str, value: float, **labels: str) -> None:
        plain = self._plain.get(name)
        if plain is not None:
            plain[_plain_key(name, labels)] = value
            return
        self._series(name, labels).set(value)

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        """One observation of a histogram family."""
        self._series(name, labels).observe(seconds)

    def count_to(self, name: str, total: float, **labels: str) -> None:
        """Bring a counter up to a running total kept elsewhere (a client's request count)."""
        self._series(name, labels).inc(max(0.0, total - self.get(name, **labels)))

    def get(self, name: str, **labels: str) -> float:
        """A counter's or gauge's value for exactly these labels; 0 for a series not seen yet."""
        if name in self._plain:
            return self._plain[name].get(_plain_key(name, labels), 0.0)
        return next((s.value for s in self._samples(name) if s.name == name and s.labels == labels), 0.0)

    def total(self, name: str) -> float:
        """The sum of a counter over all its series."""
        return sum((s.value for s in self._samples(name) if s.name == name), 0.0)

    def on_scrape(self, refresh: Callable[[], Awaitable[None]]) -> None:
        """Have `refresh` set what is only worth reading when someone asks (backlogs, throttles) before each scrape."""
        self._on_scrape.append(refresh)

    async def refresh(self) -> None:
        for refresh in self._on_scrape:
            try:
                await refresh()
            except Exception as err:  # noqa: BLE001 - a scrape shows what it has rather than failing (shutdown, spool busy)
                log.warning("metrics.refresh_failed", error=f"{err.__class__.__name__}: {err}")

    def render(self) -> str:
        """The Prometheus text format (0.0.4): HELP and TYPE for every family, then its series."""
        return generate_latest(self.registry).decode()

    def _series(self, name: str, labels: dict[str, str]) -> Any:
        key = (name, *labels.items())
        series = self._children.get(key)
        if series is None:  # prometheus-client checks the labels once; a run then finds its series in one lookup
            try:
                metric = self._families[name]
            except KeyError:
                raise KeyError(f"metric {name!r} is not declared in syncd.observability.FAMILIES") from None
            series = self._children[key] = metric.labels(**labels) if labels else metric
        return series

    def _samples(self, name: str) -> Iterator[Any]:
        if name in self._plain:
            yield from _plain_family(name, self._plain[name]).samples
            return
        if name not in self._families:
            raise KeyError(f"metric {name!r} is not declared in syncd.observability.FAMILIES")
        for family in self._families[name].collect():
            yield from family.samples


def _metric(name: str, family: Family) -> Any:
    """The prometheus-client object of a family, in no registry (a `Metrics` instance collects its own)."""
    if family.type == "counter":
        return Counter(name, family.help, family.labels, registry=None)
    if family.type == "gauge":
        return Gauge(name, family.help, family.labels, registry=None)
    return Histogram(name, family.help, family.labels, registry=None, buckets=family.buckets)


def _plain_key(name: str, labels: dict[str, str]) -> tuple[str, ...]:
    names = FAMILIES[name].labels
    if set(labels) != set(names):
        raise ValueError(f"metric {name!r} takes the labels {names}, not {tuple(sorted(labels))}")
    return tuple(labels[n] for n in names)


def _plain_family(name: str, values: dict[tuple[str, ...], float]) -> Metric:
    family = GaugeMetricFamily(name, FAMILIES[name].help, labels=FAMILIES[name].labels)
    for key, value in list(values.items()):
        family.add_metric(key, value)
    return family


class _Collector:
    """Collects the families without their `_created` series (in the classic text format each would become a
    gauge family of its own, doubling every counter and histogram for a value nobody graphs), and the plain
    per-stream gauges."""

    def __init__(self, families: dict[str, Any], plain: dict[str, dict[tuple[str, ...], float]]) -> None:
        self.families, self.plain = families, plain

    def collect(self) -> Iterator[Metric]:
        for metric in self.families.values():
            for family in metric.collect():
                family.samples = [s for s in family.samples if not s.name.endswith("_created")]
                yield family
        for name, values in self.plain.items():
            yield _plain_family(name, values)


async def serve_http(address: str, metrics: Metrics, ready: Callable[[], tuple[bool, str]]) -> web.AppRunner | None:
    """Serve /metrics, /healthz and /readyz on `host:port`; "" turns the endpoint off."""
    if not address:
        return None
    from aiohttp import web  # here, not at the top: `--once` and a daemon without the endpoint start ~15 ms sooner

    host, _, port = address.rpartition(":")

    async def h_metrics(_: web.Request) -> web.Response:
        await metrics.refresh()
        return web.Response(body=metrics.render().encode(), headers={"Content-Type": TEXT_FORMAT})

    async def h_health(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def h_ready(_: web.Request) -> web.Response:
        ok, why = ready()
        return web.Response(text=why + "\n", status=200 if ok else 503)

    app = web.Application()
    app.router.add_get("/metrics", h_metrics)
    app.router.add_get("/healthz", h_health)
    app.router.add_get("/readyz", h_ready)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host or "127.0.0.1", int(port)).start()
    return runner


def configure_logging(fmt: str = "auto", secrets: list[str] | None = None, level: int = logging.INFO) -> None:
    """structlog once per process: JSON when stderr is not a TTY (or asked), console otherwise; secrets masked."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = structlog.processors.JSONRenderer(serializer=_json_line) if use_json \
        else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _Redactor(secrets or []),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,  # the program configures once, before its first line; a bind per call is CPU
    )
    # Libraries log through stdlib logging (APScheduler, aiomqtt, paho): same format, same redaction.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name,
                           structlog.processors.TimeStamper(fmt="iso", utc=True)],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, _Redactor(secrets or []), renderer],
    ))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(max(level, logging.WARNING))
    # "skipped: maximum number of running instances" is the design (one run per stream at a time), not news;
    # a stream that cannot keep up shows in syncd_stream_lag_seconds instead.
    logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)


def _json_line(event: Any, **kw: Any) -> str:
    """A log line as JSON, by orjson (a line per stream run: the fast path counts); what it refuses (a lone
    surrogate, an int past 64 bits) goes through the standard library."""
    try:
        return orjson.dumps(event, default=kw.get("default"), option=orjson.OPT_NON_STR_KEYS).decode()
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(event, **kw)


def redactor(secrets: list[str]) -> Callable[[str], str]:
    """A function that replaces every configured secret (4+ characters) in a text by '***'."""
    kept = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def redact(text: str) -> str:
        for secret in kept:
            if secret in text:
                text = text.replace(secret, "***")
        return text

    return redact


class _Redactor:
    """Last line of defence: a configured secret that reached a log field is replaced by '***'."""

    def __init__(self, secrets: list[str]) -> None:
        self.redact = redactor(secrets)
        self.active = any(len(s) >= 4 for s in secrets)

    def __call__(self, _: Any, __: str, event: Any) -> Any:
        if not self.active:
            return event
        for key, value in event.items():
            if isinstance(value, str):
                event[key] = self.redact(value)
        return event
