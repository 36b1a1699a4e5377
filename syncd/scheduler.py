"""Jobs: one APScheduler job per (source, stream) that pages until caught up, committing each page to the spool."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import random
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from syncd.errors import Terminal, Transient, VendorAuthError
from syncd.observability import Metrics
from syncd.sources.base import Page, Source, Stream, guard_page
from syncd.spool import Spool

if TYPE_CHECKING:
    from apscheduler.events import JobSubmissionEvent
    from apscheduler.schedulers.asyncio import AsyncIOScheduler

log = structlog.get_logger("syncd.sync")

FIRST_RUN_SPREAD_S = 60.0  # first runs of a daemon's streams spread over at most this (see phase_start)
PHASE_TICK_S = 0.25  # phases are multiples of this: streams due in the same tick start in one scheduler wake-up
PUSH_IDLE_S = 2.0  # `--once` on a push stream ends after this long without a message (the broker has sent its backlog)
PUSH_ONCE_LIMIT_S = 300.0  # ... or after this long at most, for a stream that never goes quiet
PUSH_BACKOFF_CAP_S = 60.0  # reconnect backoff cap of a long-running push stream
RESUME_OVERLAP_S = 3600.0  # a stream with no cursor re-reads this much before the sink's newest event of it
AUTH_RECHECK_CAP_S = 1800.0  # a refused credential is re-checked with backoff growing up to this
PROGRESS_EVERY_S = 60.0  # the daemon's `sync.progress` line per source (its runs' own lines are at debug)


@dataclass
class StreamState:
    """What the daemon knows of one stream, for progress, /readyz and sync_status."""

    source: str
    stream: str
    kind: str
    events: int = 0
    pages: int = 0
    lag_s: float | None = None
    failing: bool = False
    last_success: float | None = None
    dead_logged: bool = False
    error: str = ""
    runs: int = 0


def phase_start(job_id: str, interval: float, now: float) -> float:
    """The first run of a job: the next wall-clock time at its phase, a stable hash of its id.

    10,000 streams on a 60 s interval spread evenly over it instead of firing in one burst, and a restart keeps
    each stream's phase (a vendor sees the same steady rate). Phases spread over at most FIRST_RUN_SPREAD_S, so a
    stream on a long interval still starts within a minute.

    Phases lie on a grid of PHASE_TICK_S: the ~40 streams of 10,000 due in a quarter second start together, in
    one wake-up of the scheduler (and their pages commit together: `Spool.expecting`), instead of one by one.
    """
    spread = min(interval, FIRST_RUN_SPREAD_S)
    digest = hashlib.blake2b(job_id.encode("utf-8", "backslashreplace"), digest_size=8).digest()
    tick = min(PHASE_TICK_S, spread)
    phase = (int.from_bytes(digest, "little") * int(spread / tick) >> 64) * tick
    return now + (phase - now) % spread


@dataclass
class _Run:
    """Counts of one stream run, kept outside the loop so the summary sees them after an error."""

    cursor: Any = None
    pages: int = 0
    events: int = 0
    dead: int = 0
    started: float = 0.0  # time.monotonic() when the run began
    status_spooled: bool = False  # its sync_status row went into the last page's transaction
    cursor_json: bytes | None = None  # `cursor` as committed, encoded once
    delay: float | None = None  # seconds between when the scheduler planned the run and when it began


@dataclass
class SourceState:
    source: Source
    streams: dict[str, Stream] = field(default_factory=dict)
    failed: str = ""  # non-empty: the credential was refused (auth_failed); re-checked at `recheck_at`
    recheck_at: float = 0.0  # monotonic time of the next credential re-check
    recheck_delay: float = 0.0
    discovery_error: str = ""  # the last discovery failure, cleared by a successful one
    discovered_at: float | None = None  # monotonic time of the last successful discovery
    newest: dict[tuple[str, str], int] | None = None  # the sink's newest event per (kind, tenant), asked once
    newest_asked: asyncio.Future[dict[tuple[str, str], int]] | None = None  # that question while it is out
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    tally: list[int] = field(default_factory=lambda: [0, 0, 0, 0])  # runs, failed, events, pages since `sync.progress`


def _cursor_text(encoded: bytes | None) -> str:
    """A cursor's JSON as sync_status and the summary line show it (cut at 500 characters)."""
    return encoded.decode()[:500] if encoded is not None else ""


def describe(err: BaseException) -> str:
    """What a failed run says in sync_status and logs: the class and the message (never empty)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{err.__class__.__name__}: {text}"[:500] if text else err.__class__.__name__


def in_shard(source: str, tenant: str, shard: tuple[int, int]) -> bool:
    """hashmod(source/tenant) == shard index: replicas split streams without talking to each other."""
    index, count = shard
    return count == 1 or zlib.crc32(f"{source}/{tenant}".encode()) % count == index


class Syncer:
    """Runs stream jobs: fetch a page, spool it with its cursor, repeat until caught up or stopping."""

    def __init__(self, spool: Spool, metrics: Metrics, *, instance: str, wake: Callable[[], None],
                 room: Callable[[], Awaitable[None]], shard: tuple[int, int] = (0, 1),
                 redact: Callable[[str], str] = str,
                 newest: Callable[[str], Awaitable[dict[tuple[str, str], int]]] | None = None) -> None:
        self.spool, self.metrics, self.instance, self.redact = spool, metrics, instance, redact
        self.newest = newest
        self.wake, self.room, self.shard = wake, room, shard
        self.sources: dict[str, SourceState] = {}
        self.states: dict[tuple[str, str], StreamState] = {}
        self.stop = asyncio.Event()
        self.inflight: set[asyncio.Task[Any]] = set()
        self.scheduler: AsyncIOScheduler | None = None
        self.push_tasks: dict[str, asyncio.Task[StreamState]] = {}  # long-running push streams by job id
        self.rediscover_every = 600.0
        # each stream's cursor as last committed (encoded: a connector may change the object it was given), so a
        # run starts without a trip to the spool thread; the spool is read once per stream after a start
        self._cursors: dict[tuple[str, str], bytes] = {}
        self.fetching = 0  # pull runs fetching a page now: the spool's group commit waits for their pages
        spool.expecting = lambda: self.fetching > 0
        self._planned: dict[str, float] = {}  # job id -> when APScheduler planned the run it just submitted
        self._background: set[asyncio.Task[Any]] = set()
        self._run_ids = itertools.count(random.getrandbits(32))  # a run's id in its log lines (no uuid per run)
        # True once scheduled (the daemon): a run's `sync.finished` line is at debug unless it is the stream's first,
        # failed, recovered or wrote dead letters; `sync.progress` sums the rest per source every PROGRESS_EVERY_S.
        # At 10,000 streams a line per run is 170 lines a second, past what journald keeps by default.
        # `--once` keeps a line per run.
        self.quiet_runs = False

    def health(self, entry: tuple[str, str, str, str]) -> None:
        """Record a change of a source's or sink's state in state.db, where `syncd status` reads it."""
        try:
            scope, name, state, detail = entry
            task = asyncio.get_running_loop().create_task(
                self.spool.run(self.spool.set_health, scope, name, state, self.redact(detail)))
        except RuntimeError:  # no loop (shutting down): the log line and the metric still tell
            return
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def add_source(self, source: Source) -> None:
        source.instance = self.instance
        self.sources[source.name] = SourceState(source)

    # -- discovery --------------------------------------------------------------------------------

    async def discover(self, name: str) -> list[Stream]:
        """Log in (first time, or re-checking a refused key) and list the source's streams in this shard.

        Any failure stays inside this source: a refused key marks it auth_failed (re-checked with capped
        backoff), anything else is a discovery error (the streams known so far keep running).
        """
        st = self.sources[name]
        async with st.lock:
            if st.failed and time.monotonic() < st.recheck_at:
                return []
            try:
                if not st.streams or st.failed:
                    await st.source.login()
                streams = await st.source.relogged(st.source.discover)
            except asyncio.CancelledError:
                raise
            except VendorAuthError as err:
                self._fail_source(st, err)
                return []
            except Exception as err:  # noqa: BLE001 - the boundary: one source's surprise never stops another
                error = describe(err)
                if st.discovery_error != error:
                    log.warning("source.discovery_failed", source=name, error=error)
                self.metrics.inc("syncd_discovery_errors_total", source=name, error=err.__class__.__name__)
                st.discovery_error = f"discovery: {error}"
                return list(st.streams.values())
            if st.failed:
                self._source_recovered(st)
            if st.discovery_error:
                log.info("source.discovery_recovered", source=name)
            st.discovery_error, st.discovered_at = "", time.monotonic()
            mine = [s for s in streams if in_shard(name, s.tenant, self.shard)]
            for s in mine:
                st.streams[s.name] = s
                self.states.setdefault((name, s.name), StreamState(name, s.name, s.kind))
            return mine

    def _fail_source(self, st: SourceState, err: Exception) -> None:
        """A refused credential: the source waits, then tries again (1 min doubling to 30 min), no restart needed."""
        cfg = st.source.config
        first = not st.failed
        st.recheck_delay = cfg.auth_recheck if first else min(AUTH_RECHECK_CAP_S, max(st.recheck_delay * 2, cfg.auth_recheck))
        st.recheck_at = time.monotonic() + st.recheck_delay
        st.failed = describe(err)
        if first:
            log.error("source.failed", source=st.source.name, state="auth_failed", error=st.failed,
                      recheck_in_s=st.recheck_delay, hint="fix the credential; syncd re-checks it by itself, no restart needed")
        self.metrics.set("syncd_source_auth_failed", 1, source=st.source.name)
        self.health(("source", st.source.name, "auth_failed", st.failed))

    def _source_recovered(self, st: SourceState) -> None:
        log.info("source.auth_recovered", source=st.source.name, was=st.failed)
        st.failed, st.recheck_delay, st.recheck_at = "", 0.0, 0.0
        self.metrics.set("syncd_source_auth_failed", 0, source=st.source.name)
        self.health(("source", st.source.name, "ok", ""))

    # -- one stream run ---------------------------------------------------------------------------

    async def run_stream(self, source_name: str, stream_name: str, idle: float | None = PUSH_IDLE_S) -> StreamState:
        """Page until caught up (or stopping); every page and its cursor are one spool transaction.

        A push stream listens instead: until `idle` seconds pass without a message (`--once`), or, with
        `idle=None`, until the daemon stops, reconnecting with capped backoff after broker errors.
        """
        st = self.sources[source_name]
        state = self.states[(source_name, stream_name)]
        if st.failed and time.monotonic() >= st.recheck_at and not self.stop.is_set():
            await self.discover(source_name)  # the credential's re-check is due: a fixed key resumes the stream
        if st.failed or self.stop.is_set():
            return state
        task = asyncio.current_task()
        if task is not None:
            self.inflight.add(task)
        source, stream = st.source, st.streams[stream_name]
        run_id = f"{next(self._run_ids) & 0xFFFFFFFF:08x}"
        structlog.contextvars.bind_contextvars(source=source_name, stream=stream_name, run_id=run_id)
        started = time.monotonic()
        run = _Run(started=started)
        planned = self._planned.pop(f"{source_name}:{stream_name}", None)
        run.delay = time.time() - planned if planned is not None else None
        error = ""
        try:
            known = self._cursors.get((source_name, stream_name))
            run.cursor = (orjson.loads(known) if known is not None
                          else await self.spool.run(self.spool.get_cursor, source_name, stream_name))
            if run.cursor is None and not stream.push:
                await self._resume_point(st, stream)
            if stream.push:
                await self._run_push(st, state, stream, run, idle)
            else:
                await self._run_pull(st, state, stream, run)
        except asyncio.CancelledError:
            error = "cancelled"
            raise
        except VendorAuthError as err:
            error = describe(err)
            self._fail_source(st, err)
        except Exception as err:  # noqa: BLE001 - the job boundary decides: every exception fails the run, visibly
            error = describe(err)
            if not isinstance(err, Transient | Terminal) and not state.failing:  # a surprise: its traceback, once
                log.error("stream.unexpected_error", error=error, exc_info=True)
        finally:
            if task is not None:
                self.inflight.discard(task)
            duration = time.monotonic() - started
            try:
                await self._finish(state, source, stream, error, run, duration)
            except Exception as err:  # noqa: BLE001 - reporting must never turn a run into a crash
                log.error("stream.status_failed", error=describe(err))
            structlog.contextvars.unbind_contextvars("source", "stream", "run_id")
        return state

    async def _resume_point(self, st: SourceState, stream: Stream) -> None:
        """A stream without a cursor (a new one, or state.db lost) resumes from the sink's newest event of it
        minus RESUME_OVERLAP_S; only when (kind, tenant) names this stream alone, else from `start`."""
        if self.newest is None or stream.name in st.source.resume:
            return
        if st.newest is None:
            if st.newest_asked is None:  # one query for all the streams that start without a cursor together
                st.newest_asked = asyncio.ensure_future(self.newest(st.source.name))
            asked = st.newest_asked
            try:
                st.newest = await asyncio.shield(asked)
            except Exception as err:  # noqa: BLE001 - the store is down: `start` bounds the first read instead
                if st.newest_asked is asked:
                    st.newest_asked = None  # the next stream to start asks again
                log.warning("stream.resume_point_unknown", error=describe(err), fallback="start")
                return
        same = [s for s in st.streams.values() if (s.kind, s.tenant) == (stream.kind, stream.tenant)]
        newest = st.newest.get((stream.kind, stream.tenant))
        if newest is not None and len(same) == 1:
            st.source.resume[stream.name] = newest - int(RESUME_OVERLAP_S * 1000)
            log.info("stream.resumed_from_sink", newest_ms=newest, overlap_s=RESUME_OVERLAP_S)

    async def _run_pull(self, st: SourceState, state: StreamState, stream: Stream, run: _Run) -> None:
        while not self.stop.is_set():
            await self.room()
            fetch_started = time.monotonic()
            self.fetching += 1
            try:
                page = await st.source.relogged(functools.partial(st.source.fetch, stream, run.cursor))
            finally:
                self.fetching -= 1
            self.metrics.observe("syncd_page_fetch_seconds", time.monotonic() - fetch_started,
                                 source=st.source.name, kind=stream.kind)
            await self._commit(state, st.source, stream, page, run)
            if page.done:
                break

    async def _run_push(self, st: SourceState, state: StreamState, stream: Stream, run: _Run, idle: float | None) -> None:
        """Listen; `deliver` commits each page (same path as a fetched page) before the source acks it."""
        source = st.source

        async def deliver(page: Page) -> None:
            await self.room()
            await self._commit(state, source, stream, page, run)
            if state.failing and idle is None:  # a long-running stream is back after reconnecting
                log.info("stream.recovered")
                state.failing, state.error = False, ""

        stop, relay, deadline, heartbeat = self.stop, None, None, None
        if idle is not None:  # --once on a stream that never goes quiet still has to end
            stop = asyncio.Event()
            relay = asyncio.create_task(self._relay_stop(stop))
            deadline = asyncio.get_running_loop().call_later(PUSH_ONCE_LIMIT_S, stop.set)
        else:  # a subscription never "finishes": report its health to sync_status every interval meanwhile
            heartbeat = asyncio.create_task(self._heartbeat(state, source, stream, run))
        attempt = 0
        try:
            while not stop.is_set():
                pages = run.pages
                try:
                    await source.listen(stream, deliver, stop, idle)
                    return
                except Exception as err:  # noqa: BLE001 - a long-running subscription reconnects after any failure
                    if idle is not None or isinstance(err, VendorAuthError):
                        raise
                    attempt = 1 if run.pages > pages else attempt + 1  # a connection that delivered resets the backoff
                    delay = min(PUSH_BACKOFF_CAP_S, 0.5 * 2**attempt) * random.uniform(0.5, 1.0)
                    error = describe(err)
                    self.metrics.inc("syncd_stream_errors_total", source=source.name, stream=stream.name,
                                     error=err.__class__.__name__)
                    if not state.failing:
                        log.warning("stream.failing", error=error, reconnect_in=round(delay, 2))
                    state.failing, state.error = True, error
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
        finally:
            for task in (relay, heartbeat):
                if task is not None:
                    task.cancel()
            if deadline is not None:
                deadline.cancel()

    async def _heartbeat(self, state: StreamState, source: Source, stream: Stream, run: _Run) -> None:
        """A sync_status row per interval for a long-running push stream, with what upstream says of its health."""
        started, upstream = time.monotonic(), ""
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), source.config.interval)
            if self.stop.is_set():
                return
            try:
                health = await source.health(stream)
            except Exception as err:  # a health probe (vendor down, odd answer) must never end the subscription
                health = f"health check failed: {err.__class__.__name__}: {err}"
            if health != upstream:
                if health:
                    log.warning("stream.upstream_unhealthy", problem=health)
                else:
                    log.info("stream.upstream_recovered")
                upstream = health
            error = "; ".join(e for e in (state.error, health) if e)
            if not error:
                state.last_success = time.time()
            await self._spool_status(state, source, stream, error, run.cursor, run.events, run.pages,
                                     time.monotonic() - started)

    async def _relay_stop(self, local: asyncio.Event) -> None:
        await self.stop.wait()
        local.set()

    async def _commit(self, state: StreamState, source: Source, stream: Stream, page: Page, run: _Run) -> None:
        """Guard, then spool one page with its cursor (one transaction), wake the drainers, count it."""
        page = guard_page(page)
        payload: dict[str, Any] = {"src": source.name, "vendor": source.vendor, "stream": stream.name,
                                   "d": [[self.redact(d.reason), self.redact(d.payload)] for d in page.dead]}
        columns = page.columns
        if columns is not None and columns.source == source.name and columns.vendor == source.vendor:
            payload["c"] = columns.spooled()  # the drainers get these very lists: no rows built, none decoded
        else:
            payload["e"] = page.rows()
        encoded = orjson.dumps(page.cursor) if page.cursor is not None else None
        if page.done and not stream.push:  # the run ends with this page: its sync_status row commits with it
            state.lag_s = page.lag_s
            text = _cursor_text(encoded)
            payload["s"] = [self._status_row(state, source, stream, "", text, run.events + len(page), run.pages + 1,
                                             time.monotonic() - run.started, time.time())]
            run.status_spooled = True
        await self.spool.commit(source.name, stream.name, payload, encoded)  # the cursor as JSON, encoded once
        if encoded is not None:
            self._cursors[(source.name, stream.name)] = encoded
        self.wake()
        new_dead = len(payload["d"])  # the spool leaves out letters it already holds (a re-read page)
        run.cursor, run.cursor_json = page.cursor, encoded
        run.pages, run.events, run.dead = run.pages + 1, run.events + len(page), run.dead + new_dead
        state.events += len(page)
        state.pages += 1
        state.lag_s = page.lag_s
        self.metrics.inc("syncd_events_total", len(page), source=source.name, kind=stream.kind)
        self.metrics.inc("syncd_pages_total", source=source.name)
        if page.lag_s is not None:
            self.metrics.set("syncd_stream_cursor_timestamp_seconds", time.time() - page.lag_s,
                             source=source.name, stream=stream.name)
        if page.late:
            self.metrics.inc("syncd_late_rows_total", page.late, source=source.name, stream=stream.name)
        if new_dead:
            self._dead_letters(state, page.dead, new_dead)

    async def _finish(self, state: StreamState, source: Source, stream: Stream, error: str, run: _Run,
                      duration: float) -> None:
        now, cursor, events, pages, dead = time.time(), run.cursor, run.events, run.pages, run.dead
        news = bool(error) or state.failing or bool(dead) or state.runs == 0  # worth a line of its own at info
        state.runs += 1
        tally = self.sources[source.name].tally
        tally[0] += 1
        tally[2] += events
        tally[3] += pages
        if error:
            tally[1] += 1
            self.metrics.inc("syncd_stream_errors_total", source=source.name, stream=stream.name,
                             error=error.split(":", 1)[0])
            if not state.failing:
                log.warning("stream.failing", error=error)
            state.failing, state.error = True, error
        else:
            if state.failing:
                log.info("stream.recovered")
            state.failing, state.error, state.last_success = False, "", now
        if run.status_spooled and not error:  # the row went in with the last page (one transaction, one fsync)
            cursor_text = _cursor_text(run.cursor_json)
            self.metrics.set("syncd_stream_lag_seconds", state.lag_s or 0.0, source=source.name, stream=stream.name)
        else:
            cursor_text = await self._spool_status(state, source, stream, error, cursor, events, pages, duration)
        (log.info if news or not self.quiet_runs else log.debug)(
            "sync.finished", events=events, pages=pages, dead_letters=dead, duration_s=round(duration, 3),
            delay_s=None if run.delay is None else round(run.delay, 3), cursor=cursor_text[:200], ok=not error)

    async def _spool_status(self, state: StreamState, source: Source, stream: Stream, error: str, cursor: Any,
                            events: int, pages: int, duration: float) -> str:
        """One sync_status row through the spool (best effort); returns the cursor as text."""
        cursor_text = _cursor_text(orjson.dumps(cursor) if cursor is not None else None)
        status = self._status_row(state, source, stream, error, cursor_text, events, pages, duration,
                                  state.last_success)
        payload = {"src": source.name, "vendor": source.vendor, "stream": stream.name, "s": [status]}
        try:
            await asyncio.shield(self.spool.commit(source.name, stream.name, payload, None))
        except Exception as err:  # status is best effort; the data pages are already safe
            log.warning("status.not_spooled", error=str(err))
        self.wake()
        self.metrics.set("syncd_stream_lag_seconds", state.lag_s or 0.0, source=source.name, stream=stream.name)
        return cursor_text

    def _status_row(self, state: StreamState, source: Source, stream: Stream, error: str, cursor_text: str, events: int,
                    pages: int, duration: float, last_success: float | None) -> list[Any]:
        return [source.name, source.vendor, stream.name, stream.kind, 0 if error else 1, cursor_text, events, pages,
                round(duration, 3), state.lag_s, self.redact(error)[:500],
                int(last_success * 1000) if last_success else None, int(time.time() * 1000)]

    async def progress(self) -> None:
        """`sync.progress`: per source, the runs since the last line (the daemon's runs log at debug). A coroutine,
        so APScheduler runs it on the loop, never on a thread beside the runs that count."""
        for name, st in self.sources.items():
            runs, failed, events, pages = st.tally
            st.tally[:] = [0, 0, 0, 0]
            if runs or st.streams:
                failing = sum(1 for s in st.streams if self.states[(name, s)].failing)
                log.info("sync.progress", source=name, runs=runs, failed=failed, events=events, pages=pages,
                         streams=len(st.streams), failing_streams=failing, every_s=PROGRESS_EVERY_S)

    def _dead_letters(self, state: StreamState, dead: list[Any], new: int) -> None:
        self.metrics.inc("syncd_dead_letters_total", new, source=state.source, stream=state.stream)
        if not state.dead_logged:  # once per stream, with a sample; the rest are counted
            state.dead_logged = True
            log.warning("sync.dead_letters", count=len(dead), reason=dead[0].reason, sample=dead[0].payload[:300])

    # -- schedules --------------------------------------------------------------------------------

    def schedule(self, rediscover_every: float = 600.0) -> AsyncIOScheduler:
        """Start APScheduler with one job per stream (at its stable hash phase, never overlapping) and a discovery
        job per source.

        The discovery job ticks often but only calls the vendor when something is due: a periodic rediscovery,
        a retry after a discovery error, or the re-check of a refused credential.
        """
        from apscheduler.events import EVENT_JOB_SUBMITTED  # here: `--once` starts without APScheduler's ~17 ms import
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        self.rediscover_every = rediscover_every
        self.scheduler = AsyncIOScheduler(timezone="UTC")
        self.scheduler.add_listener(self._on_submitted, EVENT_JOB_SUBMITTED)
        self.quiet_runs = True
        self.scheduler.add_job(self.progress, "interval", seconds=PROGRESS_EVERY_S, id="progress", coalesce=True)
        for name, st in self.sources.items():
            tick = max(0.5, min(15.0, st.source.config.auth_recheck))
            self.scheduler.add_job(self.rediscover, "interval", args=[name], seconds=tick,
                                   id=f"discover:{name}", max_instances=1, coalesce=True)
            for stream in st.streams.values():
                self._add_stream_job(name, stream)
        self.scheduler.start()
        return self.scheduler

    def _on_submitted(self, event: JobSubmissionEvent) -> None:
        """Fired inside APScheduler right before a job's run starts: remember when that run was planned."""
        if event.scheduled_run_times:
            self._planned[event.job_id] = event.scheduled_run_times[-1].timestamp()

    def _add_stream_job(self, source_name: str, stream: Stream) -> None:
        assert self.scheduler is not None
        interval = self.sources[source_name].source.config.interval
        job_id = f"{source_name}:{stream.name}"
        if stream.push:  # a subscription, not an interval job; it ends with stop_and_wait
            if job_id not in self.push_tasks or self.push_tasks[job_id].done():
                self.push_tasks[job_id] = asyncio.create_task(self.run_stream(source_name, stream.name, idle=None),
                                                              name=f"push:{job_id}")
            return
        if self.scheduler.get_job(job_id):
            return
        first = datetime.fromtimestamp(phase_start(job_id, interval, time.time()), tz=UTC)
        self.scheduler.add_job(
            self.run_stream, "interval", args=[source_name, stream.name], seconds=interval, id=job_id,
            max_instances=1, coalesce=True,  # no jitter: APScheduler adds it to the last fire time, so phases drift
            start_date=first, next_run_time=first, misfire_grace_time=None,
        )

    async def rediscover(self, name: str) -> None:
        """Discover a source when due (first time, periodic, after an error, a refused key's re-check); schedule
        what it found."""
        st, now = self.sources[name], time.monotonic()
        due = (now >= st.recheck_at if st.failed else
               bool(st.discovery_error) or st.discovered_at is None or now - st.discovered_at >= self.rediscover_every)
        if not due or self.stop.is_set():
            return
        try:
            for stream in await self.discover(name):
                self._add_stream_job(name, stream)
        except Exception as err:  # noqa: BLE001 - a scheduling surprise must not end the discovery job
            log.error("source.rediscover_failed", source=name, error=describe(err), exc_info=True)

    async def stop_and_wait(self, timeout: float) -> None:
        """Stop scheduling; let in-flight pages finish (bounded)."""
        self.stop.set()
        scheduler = self.scheduler if self.scheduler is not None and self.scheduler.running else None
        if scheduler is not None:
            scheduler.pause()  # not shutdown yet: the asyncio executor's shutdown cancels the jobs still running
        pending = [t for t in self.inflight | set(self.push_tasks.values()) if not t.done()]
        if pending:
            _, still = await asyncio.wait(pending, timeout=timeout)
            for t in still:
                t.cancel()
        if scheduler is not None:
            scheduler.shutdown(wait=False)
        if self.quiet_runs:
            await self.progress()  # the runs since the last line
