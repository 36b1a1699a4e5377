"""`syncd backfill`: fill a past range [since, until) of a source's history streams, leaving the live cursors alone.

How it stays out of the daemon's way:
- its own spool, `<data_dir>/backfill.db` (same format as state.db): the pages it fetched and, per stream, its job
  (range, connector cursor, counts) commit in one transaction, so a crash or Ctrl-C loses nothing and the same command
  continues where it stopped. state.db is never opened, so the live cursors cannot move.
- its own token bucket of `rate × (1 - live_share)`: whatever the backfill does, `live_share` of the source's budget
  stays free for live polling (a 429 slows the backfill too, AIMD as usual).
- it writes to ClickHouse only: its events are history (MQTT carries live data, and `mqtt.max_age` would skip them),
  and a second MQTT connection under the daemon's client id would take the daemon's session over.
- the embedded store takes one process at a time: while a daemon holds it, the backfill refuses and says what to do
  (stop the daemon, or use a ClickHouse server, where daemon and backfill run side by side).

How a connector fetches a past range: the stream starts with no cursor from `Source.resume[stream] = since`, and the
source's clock is set back so that its "now" is `until` plus the connector's own read lag (`WINDOW_END_S`): every
connector pins the end of its window at "now minus lag" when the window opens, so the range ends when the vendor says
so (the connector's own `Page.done`), exactly past `until`. Events outside [since, until) are dropped before the spool.
Event ids are the live ones, so a range filled twice (or also synced live) adds nothing after FINAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import functools
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import structlog

from syncd.events import COLUMNS, TS_MAX_MS, TS_MIN_MS, TS_RANGE
from syncd.observability import Metrics, redactor
from syncd.scheduler import describe
from syncd.settings import Settings, start_ms
from syncd.sinks.base import Drainer
from syncd.sinks.clickhouse import ClickHouseSink, StoreLocked
from syncd.sources import build_source, iotopen, ixon, proxus
from syncd.sources.base import Source, Stream, guard_page
from syncd.spool import Spool

log = structlog.get_logger("syncd.backfill")

SPOOL_FILE = "backfill.db"
DEFAULT_LIVE_SHARE = 0.5  # of the source's rate kept for live polling while a backfill runs
# The stream kinds that hold history a past range can be read from; status, alert, metric and push streams hold
# latest values, open/close state or live subscriptions: there is nothing in the past to fill.
HISTORY_KINDS: dict[str, tuple[str, ...]] = {"iotopen": ("log",), "ioto": ("log",), "ixon": ("telemetry",),
                                             "proxus": ("telemetry",)}
# How far before its "now" each connector ends a window, plus a second for windows counted in whole seconds.
WINDOW_END_S: dict[str, float] = {"iotopen": iotopen.PROPAGATION_LAG_S + 1.0, "ixon": ixon.DATA_LAG_S + 1.0,
                                  "proxus": proxus.WRITE_LAG_MS / 1000 + 1.0, "ioto": 1.0}  # Ioto logs: whole lists
FLUSH_TIMEOUT_S = 600.0  # bound on delivering what was fetched once every stream is done
PLAIN_EVERY_S = 10.0  # without a terminal, a progress line per stream this often
ROOM_POLL_S = 0.2  # while the backfill spool is full, how often to look again
TS = COLUMNS.index("ts")


class BackfillError(Exception):
    """A backfill that cannot start: the message for the user and the exit code (2: usage, 1: environment)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Range:
    since_ms: int
    until_ms: int

    def __str__(self) -> str:
        return f"[{iso(self.since_ms)}, {iso(self.until_ms)})"


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_when(text: str, now_ms: int) -> int:
    """A --since/--until DATE as epoch ms: an ISO date or date-time (UTC unless it says otherwise), a duration back
    from now ('7d', '36h', '90m'), or 'now'."""
    if text.strip().lower() == "now":
        return now_ms
    try:
        ms = start_ms(text.strip(), now_ms)
    except ValueError:
        raise BackfillError(f"{text!r} is no date: use an ISO date ('2024-05-01'), a date-time "
                            "('2024-05-01T12:00:00Z'), a duration back from now ('7d', '36h') or 'now'") from None
    if not TS_MIN_MS <= ms <= TS_MAX_MS:
        raise BackfillError(f"{text!r} is outside the times syncd stores ({TS_RANGE})")
    return ms


def job_key(stream: str, rng: Range) -> str:
    """Where a stream's job lives in backfill.db (its `stream` column): one job per stream and range."""
    return f"{stream}@{rng.since_ms}-{rng.until_ms}"


def matches(stream: str, glob: str) -> bool:
    """`--stream` names streams by glob; a bare kind ('log') names all of that kind ('log/*')."""
    return fnmatch.fnmatchcase(stream, glob) or fnmatch.fnmatchcase(stream, f"{glob}/*")


def run_backfill(settings: Settings, source: str, stream_glob: str | None, since: str, until: str | None, *,
                 progress: bool = True, live_share: float = DEFAULT_LIVE_SHARE,
                 out: TextIO | None = None) -> int:
    """`syncd backfill`: 0 when every stream of the range is filled and delivered, 1 on a failure (the same command
    continues), 2 on a usage error, 130 when interrupted (the same command continues)."""
    out = out or sys.stdout
    try:
        job = Backfill(settings, source, stream_glob or "*", since, until, live_share=live_share, out=out)
        return asyncio.run(job.run(progress))
    except BackfillError as err:
        print(f"backfill: {err}", file=sys.stderr)
        return err.code


# -- progress -------------------------------------------------------------------------------------------------------

def _iotopen_done(c: dict[str, Any]) -> float | None:
    pager = c["pager"]
    return (pager["offset"] / pager["total"] if pager["total"] else 0.0) if c["to"] is not None and pager else None


def _proxus_done(c: dict[str, Any]) -> float | None:
    run = c["run"]
    if run is None:
        return None
    return (int(run["page"]["key"]) - int(run["from"])) / (int(run["upper"]) - int(run["from"]))


def _ixon_done(c: dict[str, Any]) -> float | None:
    if c["todo"] is None or not c["base"]:
        return None
    first, end, todo, pos = int(c["start"]), int(c["end"]), set(c["todo"]), c["pos"]
    return sum(1.0 if k not in todo else (int(pos.get(k, first)) - first) / (end - first) for k in c["base"]) / len(c["base"])


# How much of a job a connector's cursor has read, by vendor (a look into each cursor's layout; a cursor that does not
# read as expected only costs the ETA). Ioto logs have no time filter nor a known length: rows and rate only.
FRACTIONS: dict[str, Callable[[dict[str, Any]], float | None]] = {
    "iotopen": _iotopen_done, "proxus": _proxus_done, "ixon": _ixon_done}


def fraction(vendor: str, cursor: Any) -> float | None:
    estimate = FRACTIONS.get(vendor)
    if estimate is None or not isinstance(cursor, dict):
        return None
    try:
        done = estimate(cursor)
    except (KeyError, TypeError, ValueError, ZeroDivisionError, AttributeError):
        return None
    return None if done is None else min(1.0, max(0.0, done))


@dataclass
class _Bar:
    """One stream's progress in this run: rows and rate since it started, ETA from the fraction read since then."""

    name: str
    estimable: bool
    rows: int = 0  # stored by this run
    rows_before: int = 0  # stored by the runs this one continues
    done: float = 0.0
    done_before: float = 0.0
    started: float = field(default_factory=time.monotonic)
    shown: float = 0.0  # when its last plain line was printed (the first comes PLAIN_EVERY_S after the start)
    note: str = ""

    def __post_init__(self) -> None:
        self.shown = self.started

    def fields(self) -> dict[str, str]:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        gained = self.done - self.done_before
        eta = "-:--:--"
        if self.note:
            eta = "0:00:00" if self.note == "done" else "-:--:--"
        elif self.estimable and gained > 0:
            eta = _clock(elapsed * (1.0 - self.done) / gained)
        pct = f"{self.done * 100:3.0f}%" if self.estimable or self.note == "done" else "  ?%"
        return {"pct": pct, "rows": f"{self.rows_before + self.rows:,}", "rate": f"{self.rows / elapsed:,.0f}",
                "eta": eta, "note": self.note}

    def line(self, source: str) -> str:
        f = self.fields()
        return (f"backfill {source} {self.name}: {f['pct']} {f['rows']} rows {f['rate']} rows/s ETA {f['eta']}"
                + (f" ({f['note']})" if f["note"] else ""))


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """A bar per stream (rich) on a terminal, else a line per stream every PLAIN_EVERY_S and when it ends."""

    def __init__(self, source: str, enabled: bool, stream: TextIO | None = None) -> None:
        self.source, self.enabled = source, enabled
        self.stream = stream or sys.stderr
        self.rich: Any = None
        self.tasks: dict[str, Any] = {}
        if enabled and self.stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, TextColumn
            from rich.progress import Progress as RichProgress

            self.rich = RichProgress(
                TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[pct]}"),
                TextColumn("{task.fields[rows]:>12} rows"), TextColumn("{task.fields[rate]:>8} rows/s"),
                TextColumn("ETA {task.fields[eta]}"), TextColumn("{task.fields[note]}"),
                console=Console(file=self.stream), refresh_per_second=4)
            self.rich.start()
        self.bars: dict[str, _Bar] = {}

    def add(self, name: str, estimable: bool, rows_before: int, done_before: float) -> None:
        bar = self.bars[name] = _Bar(name, estimable, rows_before=rows_before, done=done_before,
                                     done_before=done_before)
        if self.rich is not None:
            self.tasks[name] = self.rich.add_task(name, total=1000 if estimable else None,
                                                  completed=int(done_before * 1000), **bar.fields())

    def update(self, name: str, rows: int, done: float | None) -> None:
        bar = self.bars[name]
        bar.rows += rows
        if done is not None:
            bar.done = max(bar.done, done)
        self._show(bar)

    def end(self, name: str, note: str) -> None:
        bar = self.bars[name]
        bar.note = note
        if note == "done":
            bar.done = 1.0
        self._show(bar, final=True)

    def _show(self, bar: _Bar, final: bool = False) -> None:
        if self.rich is not None:
            total = 1000 if bar.estimable or bar.note == "done" else None
            self.rich.update(self.tasks[bar.name], total=total, completed=int(bar.done * 1000), **bar.fields())
            return
        now = time.monotonic()
        if self.enabled and (final or now - bar.shown >= PLAIN_EVERY_S):
            bar.shown = now
            print(bar.line(self.source), file=self.stream, flush=True)

    def close(self) -> None:
        if self.rich is not None:
            self.rich.stop()


# -- the job ----------------------------------------------------------------------------------------------------------

@dataclass
class _Outcome:
    stream: str
    state: str  # done | already | failed | interrupted
    rows: int = 0
    pages: int = 0
    error: str = ""


class Backfill:
    """One `syncd backfill` of one source: the range resolved, its spool opened; `run` does the rest."""

    def __init__(self, settings: Settings, source: str, glob: str, since: str, until: str | None, *,
                 live_share: float = DEFAULT_LIVE_SHARE, out: TextIO | None = None) -> None:
        self.settings, self.glob, self.out = settings, glob, out or sys.stdout
        found = [s for s in settings.sources if s.name == source]
        if not found:
            names = ", ".join(s.name for s in settings.sources) or "none"
            raise BackfillError(f"no source named {source!r} in the configuration (sources: {names})")
        self.cfg = found[0]
        kinds = HISTORY_KINDS.get(self.cfg.vendor)
        if kinds is None:
            known = ", ".join(f"{vendor} {'/'.join(k)}" for vendor, k in HISTORY_KINDS.items())
            raise BackfillError(f"{self.cfg.vendor} sources have no history streams to backfill (backfill reads {known})")
        self.kinds = kinds
        if not 0.0 <= live_share < 1.0:
            raise BackfillError(f"the live share must be at least 0 and below 1 (got {live_share})")
        self.live_share = live_share
        self.redact = redactor(settings.secrets())
        self.args = [since, until]
        self.spool = Spool(settings.syncd.data_dir / SPOOL_FILE)
        try:
            self.range, self.jobs = self._resolve(since, until)
        except BackfillError:
            self.spool.close()
            raise
        self.interrupted = False
        self.drainer: Drainer | None = None
        self.latest: dict[str, dict[str, Any]] = {}  # each stream's job as last committed (for the summary)

    def _resolve(self, since: str, until: str | None) -> tuple[Range, dict[str, dict[str, Any]]]:
        """The range, and the jobs of a run this command continues (same arguments or range, some stream not done):
        then a relative date means what it meant when that run began. Otherwise no jobs: every stream starts over."""
        now_ms = int(time.time() * 1000)
        wanted = Range(parse_when(since, now_ms), parse_when(until, now_ms) if until else now_ms)
        same: dict[Range, dict[str, dict[str, Any]]] = {}
        for (src, _), job in self.spool.cursors().items():
            if src != self.cfg.name or not isinstance(job, dict) or not matches(job.get("stream", ""), self.glob):
                continue
            rng = Range(int(job["since"]), int(job["until"]))
            if job.get("args") == self.args or (rng == wanted and until is not None):
                same.setdefault(rng, {})[job["stream"]] = job
        unfinished = [r for r, jobs in same.items() if any(not j["done"] for j in jobs.values())]
        rng = max(unfinished, key=lambda r: r.until_ms) if unfinished else wanted
        jobs = same[rng] if unfinished else {}
        if rng.since_ms >= rng.until_ms:
            raise BackfillError(f"--since must come before --until (got {rng})")
        if rng.until_ms > now_ms + 1000 and not jobs:
            raise BackfillError(f"--until {iso(rng.until_ms)} is in the future; leave it out to fill up to now")
        return rng, jobs

    # -- run --------------------------------------------------------------------------------------------------------

    async def run(self, progress: bool) -> int:
        sink = ClickHouseSink(self.settings.clickhouse_dsn, self.settings.clickhouse.database,
                              cluster=self.settings.clickhouse.cluster, ttl=self.settings.clickhouse.ttl,
                              batch_rows=self.settings.clickhouse.batch_rows,
                              batch_age=self.settings.clickhouse.batch_age,
                              instance=f"{self.settings.syncd.instance}-backfill")
        try:
            try:
                await sink.open()  # first: a store held by a running daemon refuses before any vendor call
            except StoreLocked as err:
                raise BackfillError(
                    f"refused: {err}. The embedded store takes one process at a time and a daemon holds its lock "
                    f"({Path(self.settings.clickhouse_dsn[len('chdb://'):]) / 'status'}). Stop the daemon "
                    "(SIGTERM; it flushes and exits), run the backfill, then start the daemon again; or set "
                    "[clickhouse] dsn to a ClickHouse server, where the daemon and a backfill run side by side. "
                    "The live cursors are untouched either way.", code=1) from None
            except Exception as err:  # noqa: BLE001 - the store is down or refuses: nothing fetched yet, say why
                raise BackfillError(f"cannot open ClickHouse: {describe(err)}", code=1) from None
            async with aiohttp.ClientSession(headers={"User-Agent": "syncd/0.1 backfill"}) as session:
                return await self._run(session, sink, progress)
        finally:
            with contextlib.suppress(Exception):
                await sink.close()
            self.spool.close()

    def _source(self, session: aiohttp.ClientSession) -> tuple[Source, float]:
        cfg = self.cfg
        # "now" for the connector: `until` plus its read lag, moving with real time (token lifetimes stay true)
        shift = self.range.until_ms / 1000 + WINDOW_END_S[cfg.vendor] - time.time()
        source = build_source(cfg, session, share=1.0 - self.live_share, clock=lambda: time.time() + shift)
        source.instance = f"{self.settings.syncd.instance}-backfill"
        return source, source.client.bucket.rate

    async def _run(self, session: aiohttp.ClientSession, sink: ClickHouseSink, progress: bool) -> int:
        source, rate = self._source(session)
        try:
            await source.login()
            streams = await source.relogged(source.discover)
        except Exception as err:  # noqa: BLE001 - nothing fetched yet: say why and stop
            raise BackfillError(f"discovering {source.name} failed: {self.redact(describe(err))}", code=1) from None
        named = [s for s in streams if matches(s.name, self.glob)]
        chosen = [s for s in named if s.kind in self.kinds and not s.push]
        refused = sorted({s.kind for s in named if s not in chosen})
        if refused:
            print(f"not backfilled: {', '.join(refused)} streams ({len(named) - len(chosen)}): latest values, "
                  "open/close state or pushed data hold no past range to fill", file=self.out)
        if not chosen:
            raise BackfillError(f"no {'/'.join(self.kinds)} stream of {source.name} matches {self.glob!r} "
                                f"(streams: {', '.join(sorted(s.name for s in streams)) or 'none'})")
        verb = "continuing" if self.jobs else "filling"
        print(f"backfill {source.name}: {verb} {len(chosen)} stream(s) over {self.range}; at most {rate:g} req/s "
              f"({1 - self.live_share:.0%} of the source's rate, {self.live_share:.0%} kept for live polling); "
              f"spool {self.spool.path}", file=self.out, flush=True)
        self.spool.register_sinks([sink.name])
        self.drainer = Drainer(sink, self.spool, Metrics(), redact=self.redact)
        drain_stop = asyncio.Event()
        drain = asyncio.create_task(self.drainer.run(drain_stop))
        bars = Progress(source.name, progress)
        tasks = [asyncio.create_task(self._fill(source, s, bars)) for s in chosen]
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, functools.partial(self._interrupt, tasks))
        try:
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            bars.close()
            drain_stop.set()
            await asyncio.gather(drain, return_exceptions=True)
        results = [o if isinstance(o, _Outcome) else self._stopped(s.name, o) for s, o in zip(chosen, outcomes, strict=True)]
        flushed = await self.drainer.flush(time.monotonic() + (30.0 if self.interrupted else FLUSH_TIMEOUT_S))
        return self._report(source.name, results, flushed)

    def _stopped(self, stream: str, err: BaseException) -> _Outcome:
        """The outcome of a stream whose task ended by an exception (Ctrl-C cancels them), with what it committed."""
        job = self.latest.get(stream, {})
        return _Outcome(stream, "interrupted" if self.interrupted else "failed", job.get("rows", 0), job.get("pages", 0),
                        "" if isinstance(err, asyncio.CancelledError) else describe(err))

    def _interrupt(self, tasks: list[asyncio.Task[_Outcome]]) -> None:
        """Ctrl-C / SIGTERM: stop fetching now (a page not yet committed is fetched again by the next run)."""
        self.interrupted = True
        for task in tasks:
            task.cancel()

    async def _fill(self, source: Source, stream: Stream, bars: Progress) -> _Outcome:
        """Page one stream through the range; each page's in-range events and the job commit in one transaction."""
        rng, key, vendor = self.range, job_key(stream.name, self.range), source.vendor
        job = self.jobs.get(stream.name)
        bars.add(stream.name, vendor in FRACTIONS, job["rows"] if job else 0, (job or {}).get("progress") or 0.0)
        if job is not None and job["done"]:
            bars.end(stream.name, "done")
            return _Outcome(stream.name, "already", job["rows"], job["pages"])
        if job is None:
            job = {"stream": stream.name, "args": self.args, "since": rng.since_ms, "until": rng.until_ms,
                   "cursor": None, "pages": 0, "rows": 0, "done": False, "progress": 0.0}
        source.resume[stream.name] = rng.since_ms
        self.latest[stream.name] = job
        try:
            while True:
                await self._room()
                page = guard_page(await source.relogged(functools.partial(source.fetch, stream, job["cursor"])))
                rows = [r for r in page.rows() if rng.since_ms <= r[TS] < rng.until_ms]
                done = 1.0 if page.done else fraction(vendor, page.cursor)
                job = {**job, "cursor": page.cursor, "pages": job["pages"] + 1, "rows": job["rows"] + len(rows),
                       "done": page.done, "progress": done if done is not None else job["progress"]}
                payload = {"src": source.name, "vendor": vendor, "stream": stream.name, "e": rows,
                           "d": [[self.redact(d.reason), self.redact(d.payload)] for d in page.dead]}
                await self.spool.run(self.spool.commit_page, source.name, key, payload, job)
                self.latest[stream.name] = job
                if self.drainer is not None:
                    self.drainer.wake.set()
                bars.update(stream.name, len(rows), done)
                if page.done:
                    bars.end(stream.name, "done")
                    return _Outcome(stream.name, "done", job["rows"], job["pages"])
        except asyncio.CancelledError:
            bars.end(stream.name, "interrupted")
            raise
        except Exception as err:  # noqa: BLE001 - one stream's failure never stops the others; its job stays resumable
            error = self.redact(describe(err))
            log.warning("backfill.stream_failed", source=source.name, stream=stream.name, error=error)
            bars.end(stream.name, f"failed: {error}")
            return _Outcome(stream.name, "failed", job["rows"], job["pages"], error)

    async def _room(self) -> None:
        """Back-pressure: while the backfill spool holds `[spool] max_bytes` undelivered, wait for the drainer."""
        while self.spool.pending_bytes >= self.settings.spool.max_bytes:  # noqa: ASYNC110 - no drainer hook says
            await asyncio.sleep(ROOM_POLL_S)  # "room again"; the daemon looks the same way (app.Daemon._room)

    def _report(self, source: str, results: list[_Outcome], flushed: bool) -> int:
        rows = sum(r.rows for r in results)
        for r in results:
            if r.state == "failed":
                print(f"backfill {source} {r.stream}: failed after {r.pages} page(s): {r.error}", file=self.out)
        counts = {state: sum(1 for r in results if r.state == state) for state in ("done", "already", "failed",
                                                                                   "interrupted")}
        summary = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
        print(f"backfill {source} {self.range}: {summary}; {rows:,} rows in range "
              f"(live cursors untouched)", file=self.out)
        if not flushed:
            print(f"backfill: some fetched rows are not in ClickHouse yet; they wait in {self.spool.path} and go out "
                  "with the next backfill run", file=self.out)
        if counts["interrupted"] or self.interrupted:
            print("backfill: interrupted; run the same command again to continue where it stopped", file=self.out)
            return 130
        if counts["failed"]:
            print("backfill: run the same command again to continue the failed streams where they stopped",
                  file=self.out)
            return 1
        return 0 if flushed else 1

