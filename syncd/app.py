"""Wiring and lifecycle: start order, the run loop, SIGTERM, stop order."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import signal
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import structlog

from syncd.observability import Metrics, redactor, serve_http
from syncd.scheduler import StreamState, Syncer, describe
from syncd.settings import Settings
from syncd.sinks import build_sinks
from syncd.sinks.base import Drainer, Sink
from syncd.sinks.clickhouse import ClickHouseSink
from syncd.sources import build_source
from syncd.spool import Spool

log = structlog.get_logger("syncd.app")

FLUSH_TIMEOUT = 30.0  # bound on draining the spool at shutdown
TRIM_EVERY_S = 60.0  # hand memory glibc keeps after freeing back to the system this often (measured: 50-60 MB)
INFLIGHT_TIMEOUT = 60.0  # bound on waiting for in-flight pages at shutdown


class Daemon:
    """One syncd process: spool, sinks with their drainers, sources and their jobs."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time,
                 sinks: list[Sink] | None = None) -> None:
        self.settings = settings
        self.clock = clock
        self.metrics = Metrics()
        self.spool = Spool(settings.syncd.data_dir / "state.db")
        self.sinks = sinks if sinks is not None else build_sinks(settings)
        self.drainers = [Drainer(s, self.spool, self.metrics, redact=redactor(settings.secrets())) for s in self.sinks]
        self.syncer = Syncer(self.spool, self.metrics, instance=settings.syncd.instance, wake=self._wake,
                             room=self._room, shard=settings.syncd.shard_index, redact=redactor(settings.secrets()),
                             newest=self._newest if any(isinstance(s, ClickHouseSink) for s in self.sinks) else None)
        self.session: aiohttp.ClientSession | None = None
        self.drain_stop = asyncio.Event()
        self.drain_tasks: list[asyncio.Task[None]] = []
        self.http_runner: Any = None
        self._full_logged = False
        self.metrics.on_scrape(self._scrape_metrics)

    # -- start / stop -------------------------------------------------------------------------------

    async def start(self) -> None:
        self.spool.register_sinks([s.name for s in self.sinks])
        self.session = aiohttp.ClientSession(headers={"User-Agent": "syncd/0.1"})
        for cfg in self.settings.sources:
            if not cfg.enabled:
                continue
            self.syncer.add_source(build_source(cfg, self.session, clock=self.clock))
        for sink in self.sinks:  # the engine opens (and migrates) on its own thread while the sources discover
            if isinstance(sink, ClickHouseSink):
                self.drain_tasks.append(asyncio.create_task(self._open_early(sink), name=f"open:{sink.name}"))
        for d in self.drainers:
            self.drain_tasks.append(asyncio.create_task(d.run(self.drain_stop), name=f"drain:{d.sink.name}"))
        self.http_runner = await serve_http(self.settings.syncd.http, self.metrics, self.ready)
        self.drain_tasks.append(asyncio.create_task(self._trim_memory(), name="malloc_trim"))
        log.info("syncd.started", instance=self.settings.syncd.instance, sources=len(self.syncer.sources),
                 sinks=[s.name for s in self.sinks])

    async def stop(self, flush_timeout: float = FLUSH_TIMEOUT) -> bool:
        """Stop scheduling, let in-flight pages finish, flush the drainers (bounded). True if all was flushed."""
        await self.syncer.stop_and_wait(INFLIGHT_TIMEOUT)
        self.drain_stop.set()
        await asyncio.gather(*self.drain_tasks, return_exceptions=True)
        deadline = time.monotonic() + flush_timeout
        done = await asyncio.gather(*(d.flush(deadline) for d in self.drainers))
        flushed = all(done)
        for drainer, ok in zip(self.drainers, done, strict=True):
            if not ok:
                rows, _ = await self.spool.run(self.spool.backlog, drainer.sink.name)
                log.warning("syncd.flush_incomplete", sink=drainer.sink.name, rows_waiting=rows,
                            hint="they stay in the spool and go out on the next start (`syncd status` shows them)")
        for sink in self.sinks:
            try:
                await sink.close()
            except Exception as err:  # closing must not hide the rest of the shutdown
                log.warning("sink.close_failed", sink=sink.name, error=str(err))
        if self.session is not None:
            await self.session.close()
        if self.http_runner is not None:
            await self.http_runner.cleanup()
        self.spool.close()
        log.info("syncd.stopped", flushed=flushed)
        return flushed

    # -- modes --------------------------------------------------------------------------------------

    async def run_once(self) -> dict[str, str]:
        """Sync every stream until caught up; returns {"source" or "source stream": reason} for each failure.

        Each source discovers and runs on its own: a slow or failing one never holds back another.
        """
        async def one(name: str) -> list[StreamState]:
            await self.syncer.discover(name)
            streams = list(self.syncer.sources[name].streams)
            return list(await asyncio.gather(*(self.syncer.run_stream(name, s) for s in streams)))

        states = [s for per in await asyncio.gather(*(one(n) for n in self.syncer.sources)) for s in per]
        failed = {name: (f"auth_failed: {st.failed}" if st.failed else st.discovery_error)
                  for name, st in self.syncer.sources.items() if st.failed or st.discovery_error}
        for state in states:
            if state.failing:
                failed[f"{state.source} {state.stream}"] = state.error
        return failed

    async def run_forever(self, stop: asyncio.Event) -> None:
        """Schedule first, then let each source's discovery add its streams as soon as it is done."""
        self.syncer.schedule()
        first = [asyncio.create_task(self.syncer.rediscover(name)) for name in self.syncer.sources]
        try:
            await stop.wait()
        finally:
            for task in first:
                task.cancel()

    # -- pieces the syncer calls back ---------------------------------------------------------------

    def _wake(self) -> None:
        for d in self.drainers:  # only a drainer with a batch due; the others look again after batch_age / 4
            if d.due():
                d.wake.set()
        self.metrics.set("syncd_spool_bytes", self.spool.pending_bytes)

    async def _scrape_metrics(self) -> None:
        """What /metrics reads when scraped: each source's throttle and each sink's backlog in the spool."""
        for name, st in self.syncer.sources.items():
            client = st.source.client
            self.metrics.count_to("syncd_http_requests_total", client.requests, source=name)
            self.metrics.set("syncd_throttle_rate", client.bucket.rate_at(client.bucket.clock()), source=name)
            self.metrics.set("syncd_throttle_max_rate", client.bucket.max_rate, source=name)
        for sink, (rows, size, age) in (await self.spool.run(self.spool.backlogs)).items():
            self.metrics.set("syncd_spool_backlog_rows", rows, sink=sink)
            self.metrics.set("syncd_spool_backlog_bytes", size, sink=sink)
            self.metrics.set("syncd_spool_backlog_age_seconds", age or 0.0, sink=sink)

    async def _room(self) -> None:
        """Back-pressure: wait (block) or drop the laggard's oldest page (drop_oldest) while the spool is full."""
        limit = self.settings.spool.max_bytes
        while self.spool.pending_bytes >= limit and not self.syncer.stop.is_set():
            if self.settings.spool.on_full == "drop_oldest":
                # Only a failing sink gives up data; a healthy one that is merely behind is waited for.
                lagging = await self.spool.run(self.spool.laggards)
                failing = [d.sink.name for d in self.drainers if not d.healthy and d.sink.name in lagging]
                if failing:
                    rows = await self.spool.run(self.spool.drop_oldest, failing[0])
                    self.metrics.inc("syncd_spool_dropped_rows_total", rows, sink=failing[0])
                    log.warning("spool.full_dropped_oldest", sink=failing[0], rows=rows, limit=limit)
                    continue
            if not self._full_logged:
                log.warning("spool.full_pausing_pollers", pending_bytes=self.spool.pending_bytes, limit=limit)
                self._full_logged = True
            self.metrics.set("syncd_pollers_paused", 1)
            await asyncio.sleep(0.2)
        if self._full_logged:
            log.info("spool.room_again", pending_bytes=self.spool.pending_bytes)
            self._full_logged = False
            self.metrics.set("syncd_pollers_paused", 0)

    async def _trim_memory(self) -> None:
        """Return freed heap to the system now and then: the backlog lives on disk, not in a bloated heap."""
        trim = _malloc_trim()
        while trim is not None and not self.drain_stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.drain_stop.wait(), TRIM_EVERY_S)
            trim(0)

    @staticmethod
    async def _open_early(sink: ClickHouseSink) -> None:
        try:
            await sink.open()
        except Exception as err:  # noqa: BLE001 - only a head start: the drainer opens it again and owns the failure
            log.info("sink.early_open_failed", sink=sink.name, error=describe(err))

    async def _newest(self, source: str) -> dict[tuple[str, str], int]:
        sink = next(s for s in self.sinks if isinstance(s, ClickHouseSink))
        return await sink.newest(source)

    def ready(self) -> tuple[bool, str]:
        problems = [f"source {n} auth_failed: {self.syncer.redact(st.failed)}"
                    for n, st in self.syncer.sources.items() if st.failed]
        problems += [f"sink {d.sink.name} stopped: {d.stopped}" for d in self.drainers if d.stopped]
        if problems:
            return False, "; ".join(problems)
        return True, "ready"


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where there is none (musl, macOS)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


def install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def run(settings: Settings, *, once: bool) -> int:
    """`syncd run`: 0 when every source synced, 1 naming the failed ones (--once), 0 after a clean SIGTERM."""
    daemon = Daemon(settings)
    stop = asyncio.Event()
    install_signal_handlers(stop)
    await daemon.start()
    failed: dict[str, str] = {}
    try:
        if once:
            job = asyncio.create_task(daemon.run_once())
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait([job, stopper], return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if job.done():
                failed = job.result()
            else:
                daemon.syncer.stop.set()
                await asyncio.wait([job], timeout=INFLIGHT_TIMEOUT)
        else:
            await daemon.run_forever(stop)
    finally:
        flushed = await daemon.stop(flush_timeout=600.0 if once else FLUSH_TIMEOUT)
    for name, reason in failed.items():
        source, _, stream = name.partition(" ")
        if stream:
            log.error("run.stream_failed", source=source, stream=stream, reason=reason)
        else:
            log.error("run.source_failed", source=source, reason=reason)
    if once and not flushed:
        return 1
    return 1 if failed else 0
