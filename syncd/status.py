"""`syncd status`: streams, sinks and sources as tables, beside a running daemon or after it.

Everything comes from state.db, opened read-only in one read transaction (SQLite WAL lets a reader see a
consistent snapshot beside the daemon's writes without blocking them), and, when the daemon's `[syncd] http`
endpoint answers, from /metrics: late rows, the achieved request rate and the throttle's current rate live only
in the running process. The embedded ClickHouse is locked by a running daemon, so nothing here reads it.
"""

from __future__ import annotations

import os
import re
import sqlite3
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from syncd.observability import redactor
from syncd.settings import Settings

SCRAPE_TIMEOUT_S = 1.0
RATE_WINDOW_S = 1.0  # achieved request rate: two scrapes this far apart
# Columns of a spooled status row ("s" in a page), as the syncer writes them (sinks/clickhouse.py STATUS_COLUMNS).
STATUS_FIELDS = ("source", "vendor", "stream", "kind", "ok", "cursor", "events", "pages", "duration_s", "lag_s",
                 "error", "last_success", "updated_at")
# Cursors are the connectors' own JSON; these keys name how far one has read, the most telling first.
POSITION_KEYS = ("hw", "done_to", "wm", "from", "since", "seen", "newest", "top", "start")
REQUESTS = ("syncd_http_requests_total", "req/s")  # preferred; else pages (each page is at least one request)
PAGES = ("syncd_pages_total", "pages/s")

Samples = dict[str, list[tuple[dict[str, str], float]]]


@dataclass
class StreamRow:
    source: str
    stream: str
    cursor: str = "-"
    ok: bool | None = None  # None: no run recorded
    last_success: float | None = None  # unix time
    lag_s: float | None = None
    error: str = ""
    late: int | None = None  # None: the daemon does not answer (the count lives in its metrics)
    dead: int = 0


@dataclass
class SinkRow:
    sink: str
    state: str
    detail: str
    rows: int
    bytes: int
    pages: int
    oldest_s: float | None
    dropped: int


@dataclass
class SourceRow:
    source: str
    vendor: str
    auth: str
    detail: str
    streams: int
    limit: float | None
    achieved: str = "-"
    allowed: float | None = None  # what the throttle lets through now (below `limit` after 429s)


@dataclass
class Status:
    state: Path
    daemon: str
    streams: list[StreamRow] = field(default_factory=list)
    sinks: list[SinkRow] = field(default_factory=list)
    sources: list[SourceRow] = field(default_factory=list)


# -- reading -------------------------------------------------------------------------------------------


def read_state(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """The tables `syncd status` shows, read in one snapshot; a table an older syncd did not have reads empty."""
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0, isolation_level=None)
    try:
        have = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        queries = {
            "cursors": "SELECT source, stream, cursor FROM cursors",
            "stream_status": "SELECT source, stream, status FROM stream_status",
            "health": "SELECT scope, name, state, detail FROM health",
            "dead_seen": "SELECT source, stream, COUNT(*) FROM dead_seen GROUP BY source, stream",
            "sinks": """SELECT s.name, COALESCE(SUM(p.rows), 0), COALESCE(SUM(p.bytes), 0), COUNT(p.id), MIN(p.created),
                               s.dropped_rows
                        FROM sinks s LEFT JOIN pages p ON p.id > s.delivered GROUP BY s.name ORDER BY s.name""",
        }
        out: dict[str, list[tuple[Any, ...]]] = {}
        db.execute("BEGIN")
        for table, sql in queries.items():
            out[table] = list(db.execute(sql)) if table in have else []
        db.execute("COMMIT")
        return out
    finally:
        db.close()


_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> Samples:
    """The Prometheus text format as {name: [(labels, value)]} (comments and unparsable lines skipped)."""
    out: Samples = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None or line.startswith("#"):
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        labels = {k: v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
                  for k, v in _LABEL.findall(m.group(2) or "")}
        out.setdefault(m.group(1), []).append((labels, value))
    return out


def by(samples: Samples, name: str, *keys: str) -> dict[tuple[str, ...], float]:
    """A metric summed by the given labels."""
    out: dict[tuple[str, ...], float] = {}
    for labels, value in samples.get(name, ()):
        key = tuple(labels.get(k, "") for k in keys)
        out[key] = out.get(key, 0.0) + value
    return out


def metrics_url(address: str) -> str:
    """http://host:port of `[syncd] http`; a wildcard listen address is asked on loopback."""
    host, _, port = address.rpartition(":")
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "[::]": "[::1]", "::": "[::1]"}.get(host, host)
    return f"http://{host}:{port}"


def scrape(url: str, timeout: float = SCRAPE_TIMEOUT_S) -> Samples | None:
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=timeout) as resp:
            return parse_metrics(resp.read().decode("utf-8", "replace"))
    except (OSError, urllib.error.URLError, ValueError):
        return None


def _readiness(url: str) -> str:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=SCRAPE_TIMEOUT_S) as resp:
            return resp.read().decode("utf-8", "replace").strip()
    except urllib.error.HTTPError as err:  # 503: not ready, and why
        return f"not ready: {err.read().decode('utf-8', 'replace').strip()}"
    except (OSError, ValueError):
        return "?"


def collect(settings: Settings, *, window: float = RATE_WINDOW_S) -> Status | None:
    """What `syncd status` shows; None when there is no state file."""
    path = settings.syncd.data_dir / "state.db"
    if not path.exists():
        return None
    address = settings.syncd.http
    url = metrics_url(address) if address else ""
    first, started = (scrape(url), time.monotonic()) if url else (None, 0.0)
    state = read_state(path)
    second, elapsed = None, 0.0
    if first is not None:
        remaining = window - (time.monotonic() - started)
        if remaining > 0:
            time.sleep(remaining)  # a measurement window, not synchronisation
        second, elapsed = scrape(url), time.monotonic() - started
    if first is None:
        daemon = f"daemon not answering at {url} (late rows and rates need it)" if url else \
            "[syncd] http is off: late rows and rates are not available"
    else:
        daemon = f"daemon answering at {url} ({_readiness(url)})"
    status = Status(path, daemon)
    status.streams = _streams(state, second or first)
    status.sinks = _sinks(state)
    status.sources = _sources(settings, state, status.streams, first, second, elapsed)
    return status


def _streams(state: dict[str, list[tuple[Any, ...]]], samples: Samples | None) -> list[StreamRow]:
    rows: dict[tuple[str, str], StreamRow] = {}

    def row(source: str, stream: str) -> StreamRow:
        return rows.setdefault((source, stream), StreamRow(source, stream))

    for source, stream, cursor in state["cursors"]:
        row(source, stream).cursor = short_cursor(cursor)
    for source, stream, text in state["stream_status"]:
        s = dict(zip(STATUS_FIELDS, orjson.loads(text), strict=False))
        r = row(source, stream)
        r.ok, r.lag_s, r.error = bool(s["ok"]), s["lag_s"], s["error"] or ""
        r.last_success = s["last_success"] / 1000 if s["last_success"] else None
        if r.cursor == "-" and s["cursor"]:
            r.cursor = short_cursor(s["cursor"])
    for source, stream, count in state["dead_seen"]:
        row(source, stream).dead = int(count)
    if samples is not None:
        late = by(samples, "syncd_late_rows_total", "source", "stream")
        lag = by(samples, "syncd_stream_lag_seconds", "source", "stream")
        for key, r in rows.items():
            r.late = int(late.get(key, 0))
            if key in lag:  # the running daemon's view is the newer one
                r.lag_s = lag[key]
    return [rows[k] for k in sorted(rows)]


def _sinks(state: dict[str, list[tuple[Any, ...]]]) -> list[SinkRow]:
    health = {name: (st, detail) for scope, name, st, detail in state["health"] if scope == "sink"}
    now = time.time()
    return [SinkRow(name, *health.get(name, ("ok", "")), int(rows), int(size), int(pages),
                    now - oldest if oldest is not None else None, int(dropped))
            for name, rows, size, pages, oldest, dropped in state["sinks"]]


def _sources(settings: Settings, state: dict[str, list[tuple[Any, ...]]], streams: list[StreamRow],
             first: Samples | None, second: Samples | None, elapsed: float) -> list[SourceRow]:
    from syncd.sources import SOURCES

    health = {name: (st, detail) for scope, name, st, detail in state["health"] if scope == "source"}
    counts: dict[str, int] = {}
    for r in streams:
        counts[r.source] = counts.get(r.source, 0) + 1
    configured = {cfg.name: cfg for cfg in settings.sources}
    failed = by(second or first or {}, "syncd_source_auth_failed", "source")
    allowed = by(second or first or {}, "syncd_throttle_rate", "source")
    metric, unit = REQUESTS if REQUESTS[0] in (second or {}) else PAGES
    rates: dict[str, float] = {}
    if first is not None and second is not None and elapsed > 0:
        before, after = by(first, metric, "source"), by(second, metric, "source")
        rates = {k[0]: (v - before.get(k, 0.0)) / elapsed for k, v in after.items()}
    out = []
    for name in sorted(set(configured) | set(counts) | set(health)):
        cfg = configured.get(name)
        vendor = cfg.vendor if cfg is not None else "?"
        limit = (cfg.rate or SOURCES[cfg.vendor].default_rate) if cfg is not None and cfg.vendor in SOURCES else None
        auth, detail = health.get(name, ("", ""))
        if failed.get((name,)) == 1:
            auth = "auth_failed"
        elif failed.get((name,)) == 0 and auth == "auth_failed":  # recovered; its state row is on its way
            auth, detail = "ok", ""
        if not auth:
            auth = "ok" if counts.get(name) else "unknown"
        if cfg is not None and not cfg.enabled:
            auth = "disabled"
        elif cfg is None:
            detail = detail or "not in this configuration"
        row = SourceRow(name, vendor, auth, detail, counts.get(name, 0), limit, allowed=allowed.get((name,)))
        if second is not None:
            row.achieved = f"{rates.get(name, 0.0):.1f} {unit}"
        out.append(row)
    return out


def short_cursor(text: str, width: int = 30) -> str:
    """A cursor as the time it has read to (`key time`) when it names one, else its JSON cut to `width`."""
    try:
        cursor = orjson.loads(text)
    except orjson.JSONDecodeError:
        return _cut(text, width)
    if isinstance(cursor, int | float) and not isinstance(cursor, bool) and _when(cursor):
        return _when(cursor)
    if isinstance(cursor, dict):
        for key in POSITION_KEYS:
            value = cursor.get(key)
            if isinstance(value, dict):
                times = [v for v in value.values() if isinstance(v, int | float) and _when(v)]
                value = max(times) if times else None
            if isinstance(value, int | float) and _when(value):
                return f"{key} {_when(value)}"
        times = list(_times(cursor))
        if times:  # {series: time} or {series: {time: value}} (latest-value and aggregate streams)
            return f"max {_when(max(times))}"
    return _cut(text, width)


def _times(cursor: dict[str, Any], depth: int = 2) -> Iterator[float]:
    """Epoch-like numbers among a cursor's values and keys, `depth` levels down."""
    for key, value in cursor.items():
        if key.isdigit() and _when(int(key)):
            yield int(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and _when(value):
            yield value
        elif isinstance(value, dict) and depth > 1:
            yield from _times(value, depth - 1)


def _when(value: float) -> str:
    """An epoch in seconds or milliseconds as UTC, '' when the number is neither."""
    if 1e9 <= value < 1e11:
        seconds = value
    elif 1e12 <= value < 1e14:
        seconds = value / 1000
    else:
        return ""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


# -- rendering -----------------------------------------------------------------------------------------


def duration_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _table(title: str, *columns: str, wide: tuple[str, ...] = ()) -> Table:
    """One line per row (cells cut with an ellipsis), so a row is a line to grep."""
    table = Table(title=title, title_justify="left", expand=False)
    for name in columns:
        numeric = name in ("late rows", "dead letters", "backlog rows", "backlog bytes", "pages", "dropped rows",
                           "streams", "achieved", "throttle now", "limit", "lag", "oldest waiting")
        table.add_column(name, no_wrap=True, overflow="ellipsis", justify="right" if numeric else "left",
                         max_width=60 if name in wide else None)
    return table


def tables(status: Status, redact: Callable[[str], str] = str, now: float | None = None) -> RenderableType:
    now = time.time() if now is None else now
    failing = sum(1 for r in status.streams if r.ok is False)
    ok = sum(1 for r in status.streams if r.ok)
    streams = _table(f"streams: {len(status.streams)} ({ok} ok, {failing} failing, "
                     f"{len(status.streams) - ok - failing} without a recorded run)",
                     "source", "stream", "cursor", "last success", "lag", "last error", "late rows", "dead letters",
                     wide=("last error",))
    for r in status.streams:
        _row(streams, r.source, r.stream, r.cursor,
             f"{duration_text(now - r.last_success)} ago" if r.last_success else "-", duration_text(r.lag_s),
             (redact(r.error), "red") if r.error else "-", "-" if r.late is None else str(r.late), str(r.dead))
    sinks = _table("sinks", "sink", "state", "backlog rows", "backlog bytes", "pages", "oldest waiting",
                   "dropped rows", "detail", wide=("detail",))
    for s in status.sinks:
        _row(sinks, s.sink, (s.state, "" if s.state == "ok" else "red"), str(s.rows), size(s.bytes), str(s.pages),
             duration_text(s.oldest_s), str(s.dropped), redact(s.detail) or "-")
    sources = _table("sources", "source", "vendor", "auth", "streams", "achieved", "throttle now", "limit", "detail",
                     wide=("detail",))
    for src in status.sources:
        _row(sources, src.source, src.vendor, (src.auth, "" if src.auth in ("ok", "disabled") else "red"),
             str(src.streams), src.achieved, "-" if src.allowed is None else f"{src.allowed:.1f} req/s",
             "-" if src.limit is None else f"{src.limit:g} req/s", redact(src.detail) or "-")
    return Group(Text(f"state {status.state} · {redact(status.daemon)}"), streams, sinks, sources)


def _row(table: Table, *cells: str | tuple[str, str]) -> None:
    """Cells as Text, never markup: an error message with brackets in it is shown as it is."""
    table.add_row(*(Text(c[0], style=c[1]) if isinstance(c, tuple) else Text(c) for c in cells))


def render_status(settings: Settings, *, console: Console | None = None, window: float = RATE_WINDOW_S) -> int:
    """Print the status tables; 1 when there is no state file, or it cannot be read."""
    if console is None:  # piped: wide enough that rows are not cut (COLUMNS still wins)
        console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 200)
    try:
        status = collect(settings, window=window)
    except sqlite3.Error as err:  # unreadable (permissions, not a database): say so instead of a traceback
        console.print(Text(f"cannot read {settings.syncd.data_dir / 'state.db'}: {err}"))
        return 1
    if status is None:
        console.print(Text(f"no state file at {settings.syncd.data_dir / 'state.db'}: syncd has not run with this data_dir"))
        return 1
    console.print(tables(status, redactor(settings.secrets())))
    return 0
