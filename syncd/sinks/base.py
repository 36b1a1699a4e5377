"""A sink writes spooled batches somewhere; its drainer feeds it in order and retries without loss."""

from __future__ import annotations

import asyncio
import math
import random
import time
from abc import ABC, abstractmethod

import structlog

from syncd.observability import Metrics
from syncd.spool import Batch, Spool

log = structlog.get_logger("syncd.sink")

FLUSH_GIVE_UP_S = 30.0  # at shutdown, a sink failing this long keeps its backlog spooled instead of holding the exit


class Sink(ABC):
    """Receives whole batches; raising means "not written", and the same batch comes again."""

    name: str
    batch_rows: int = 50_000
    batch_age: float = 2.0

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Connect / prepare; may raise, the drainer retries."""

    @abstractmethod
    async def write(self, batch: Batch) -> int | None:
        """Write every row of the batch; returns the rows deliberately left out (counted, e.g. too old for MQTT)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class Drainer:
    """Moves batches from the spool to one sink: size/age batching, retry with capped backoff, ack after success."""

    def __init__(self, sink: Sink, spool: Spool, metrics: Metrics, *, max_backoff: float = 30.0) -> None:
        self.sink, self.spool, self.metrics = sink, spool, metrics
        self.wake = asyncio.Event()
        self.max_backoff = max_backoff
        self.healthy = True
        self.failing_since: float | None = None  # monotonic time the current run of failures began
        self.opened = False
        self.delivered_rows = 0
        self._rng = random.Random()

    async def run(self, stop: asyncio.Event) -> None:
        """Drain until `stop` is set (then return; flush() empties what is left)."""
        while not stop.is_set():
            if not await self._ready_to_write():
                await self._wait(stop)
                continue
            await self.step(stop)

    async def flush(self, deadline: float, give_up_after: float = FLUSH_GIVE_UP_S) -> bool:
        """Write everything spooled for this sink before `deadline` (monotonic); True when empty.

        A sink that keeps failing for `give_up_after` seconds is not waited for any longer: its pages
        stay in the spool for the next start, and the caller says so.
        """
        gate = asyncio.Event()
        while time.monotonic() < deadline:
            if await self.spool.run(self.spool.next_batch, self.sink.name, self.sink.batch_rows) is None:
                return True
            if self.failing_since is not None and time.monotonic() - self.failing_since >= give_up_after:
                return False
            await self.step(gate, deadline=deadline, give_up_after=give_up_after)
        return False

    async def step(self, stop: asyncio.Event, deadline: float | None = None, give_up_after: float | None = None) -> None:
        """Write one batch, retrying it until it lands, `stop` is set, or the deadline passes.

        With `give_up_after`, the deadline also comes that many seconds after the sink began failing.
        """
        attempt = 0
        while not stop.is_set():
            if give_up_after is not None and self.failing_since is not None:
                deadline = min(deadline or math.inf, self.failing_since + give_up_after)
            if deadline is not None and time.monotonic() >= deadline:
                return
            try:
                if not self.opened:
                    await self.sink.open()
                    self.opened = True
                batch = await self.spool.run(self.spool.next_batch, self.sink.name, self.sink.batch_rows)
                if batch is None:
                    return
                started = time.monotonic()
                skipped = await self.sink.write(batch)
                await self.spool.run(self.spool.ack, batch)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # any sink failure keeps the batch and retries; the loop must survive
                attempt += 1
                self.metrics.inc("syncd_sink_errors_total", sink=self.sink.name)
                if self.healthy:
                    log.warning("sink.failing", sink=self.sink.name, error=f"{err.__class__.__name__}: {err}")
                    self.healthy, self.failing_since = False, time.monotonic()
                delay = self._rng.uniform(0.5, 1.0) * min(self.max_backoff, 0.2 * 2**attempt)
                if deadline is not None:
                    delay = min(delay, max(0.0, deadline - time.monotonic()))
                try:
                    await asyncio.wait_for(stop.wait(), timeout=delay)
                except TimeoutError:
                    pass
                continue
            if not self.healthy:
                log.info("sink.recovered", sink=self.sink.name, attempts=attempt)
                self.healthy, self.failing_since = True, None
            rows = batch.rows - (skipped or 0)
            if skipped:
                self.metrics.inc("syncd_sink_skipped_rows_total", skipped, sink=self.sink.name, reason="max_age")
            self.delivered_rows += rows
            self.metrics.inc("syncd_sink_rows_total", rows, sink=self.sink.name)
            self.metrics.inc("syncd_sink_batches_total", sink=self.sink.name)
            self.metrics.set("syncd_sink_last_write_seconds", time.monotonic() - started, sink=self.sink.name)
            return

    async def _ready_to_write(self) -> bool:
        rows, age = await self.spool.run(self.spool.backlog, self.sink.name)
        return rows >= self.sink.batch_rows or (age is not None and age >= self.sink.batch_age)

    async def _wait(self, stop: asyncio.Event) -> None:
        self.wake.clear()
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.wake.wait())]
        await asyncio.wait(waiters, timeout=max(0.05, self.sink.batch_age / 4), return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
