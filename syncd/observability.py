"""Metrics (Prometheus text), /healthz and /readyz, and logging set-up."""

from __future__ import annotations

import logging
import sys
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import web

Labels = tuple[tuple[str, str], ...]


class Metrics:
    """A tiny registry: counters and gauges keyed by name and labels, rendered in the text format."""

    def __init__(self) -> None:
        self.counters: dict[str, dict[Labels, float]] = defaultdict(dict)
        self.gauges: dict[str, dict[Labels, float]] = defaultdict(dict)
        self.help: dict[str, str] = {}

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        series = self.counters[name]
        series[key] = series.get(key, 0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        self.gauges[name][tuple(sorted(labels.items()))] = value

    def get(self, name: str, **labels: str) -> float:
        key = tuple(sorted(labels.items()))
        return self.counters.get(name, {}).get(key, self.gauges.get(name, {}).get(key, 0.0))

    def total(self, name: str) -> float:
        return sum(self.counters.get(name, {}).values())

    def render(self) -> str:
        lines = []
        for kind, table in (("counter", self.counters), ("gauge", self.gauges)):
            for name, series in sorted(table.items()):
                lines.append(f"# TYPE {name} {kind}")
                for labels, value in sorted(series.items()):
                    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
                    lines.append(f"{name}{{{inner}}} {value:g}" if inner else f"{name} {value:g}")
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


async def serve_http(address: str, metrics: Metrics, ready: Callable[[], tuple[bool, str]]) -> web.AppRunner | None:
    """Serve /metrics, /healthz and /readyz on `host:port`; "" turns the endpoint off."""
    if not address:
        return None
    host, _, port = address.rpartition(":")

    async def h_metrics(_: web.Request) -> web.Response:
        return web.Response(text=metrics.render(), content_type="text/plain")

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
    renderer: Any = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=False)
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
        cache_logger_on_first_use=False,
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
