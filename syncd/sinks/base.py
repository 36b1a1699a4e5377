"""A sink writes spooled batches somewhere; its drainer feeds it in order and retries without loss.

The drainer is the one place that decides what a sink failure means, by the error's class:
- `RowsRefused`: the sink refuses some row of the batch. The batch is split in halves until the refused
  rows are found; each goes to `dead_letter` (through the spool) naming the sink and the reason, the rest
  is delivered, and the drainer moves on. Parts carry tokens derived from their range, so a crash in the
  middle of the search repeats the same parts with the same deduplication tokens.
- `SchemaMismatch`: the sink's table changed under us. Only this sink stops (loudly: log, metric,
  /readyz, `syncd status`); it re-checks every `SCHEMA_RECHECK_S`, its backlog waits in the spool.
- anything else is transient: the same batch (kept in memory, not re-read) is retried with capped backoff.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import orjson
import structlog

from syncd.errors import RowsRefused, SchemaMismatch
from syncd.events import COLUMNS
from syncd.observability import Metrics
from syncd.spool import Batch, Spool, page_len, page_rows

log = structlog.get_logger("syncd.sink")

FLUSH_GIVE_UP_S = 30.0  # at shutdown, a sink failing this long keeps its backlog spooled instead of holding the exit
SCHEMA_RECHECK_S = 60.0  # a sink stopped on a schema mismatch tries again this often (the operator may fix the table)


class Sink(ABC):
    """Receives whole batches; raising means "not written", and the same batch comes again."""

    name: str
    batch_rows: int = 50_000
    batch_age: float = 2.0
    schema_recheck: float = SCHEMA_RECHECK_S

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Connect / prepare; may raise, the drainer retries."""

    @abstractmethod
    async def write(self, batch: Batch) -> int | None:
        """Write every row of the batch; returns the rows deliberately left out (counted, e.g. too old for MQTT).

        Raise `RowsRefused` when the data itself is refused, `SchemaMismatch` when the target changed.
        """

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class Drainer:
    """Moves batches from the spool to one sink: size/age batching, retry with capped backoff, ack after success."""

    def __init__(self, sink: Sink, spool: Spool, metrics: Metrics, *, max_backoff: float = 30.0,
                 redact: Callable[[str], str] = str) -> None:
        self.sink, self.spool, self.metrics, self.redact = sink, spool, metrics, redact
        self.wake = asyncio.Event()
        self.max_backoff = max_backoff
        self.healthy = True
        self.failing_since: float | None = None  # monotonic time the current run of failures began
        self.stopped = ""  # non-empty: stopped on a schema mismatch, with what changed
        self.error = ""  # the last failure, for /readyz and status
        self.opened = False
        self.delivered_rows = 0
        self.refused_rows = 0
        self._batch: Batch | None = None  # the batch being written, kept across retries (never re-decoded)
        self._rng = random.Random()

    async def run(self, stop: asyncio.Event) -> None:
        """Drain until `stop` is set (then return; flush() empties what is left)."""
        while not stop.is_set():
            if self._batch is None and not self.due():
                await self._wait(stop)
                continue
            await self.step(stop)

    async def flush(self, deadline: float, give_up_after: float = FLUSH_GIVE_UP_S) -> bool:
        """Write everything spooled for this sink before `deadline` (monotonic); True when empty.

        A sink that keeps failing for `give_up_after` seconds (or is stopped on a schema mismatch) is not
        waited for any longer: its pages stay in the spool for the next start, and the caller says so.
        """
        gate = asyncio.Event()
        while time.monotonic() < deadline:
            if self._batch is None:
                self._batch = await self.spool.run(self.spool.next_batch, self.sink.name, self.sink.batch_rows)
                if self._batch is None:
                    return True
            if self.stopped or (self.failing_since is not None and time.monotonic() - self.failing_since >= give_up_after):
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
                if self._batch is None:
                    self._batch = await self.spool.run(self.spool.next_batch, self.sink.name, self.sink.batch_rows)
                if self._batch is None:
                    return
                batch, started = self._batch, time.monotonic()
                skipped, refused = await self._deliver(batch, meta=True)
                # the next batch, when one is due, comes with the ack (one transaction): `run` writes it at once
                self._batch = await self.spool.run(self.spool.ack, batch, self.sink.batch_rows, self.sink.batch_age)
            except asyncio.CancelledError:
                raise
            except SchemaMismatch as err:
                await self._stop_on_schema(err)
                delay = self.sink.schema_recheck
                if deadline is not None:
                    return  # shutdown does not wait for an operator to fix a table
            except Exception as err:  # any other sink failure keeps the batch and retries; the loop must survive
                attempt += 1
                await self._failing(err)
                delay = self._rng.uniform(0.5, 1.0) * min(self.max_backoff, 0.2 * 2**attempt)
            else:
                await self._recovered(attempt)
                rows = batch.rows - skipped - refused
                if skipped:
                    self.metrics.inc("syncd_sink_skipped_rows_total", skipped, sink=self.sink.name, reason="max_age")
                self.delivered_rows += rows
                self.metrics.inc("syncd_sink_rows_total", rows, sink=self.sink.name)
                self.metrics.inc("syncd_sink_batches_total", sink=self.sink.name)
                took = time.monotonic() - started
                self.metrics.set("syncd_sink_last_write_seconds", took, sink=self.sink.name)
                self.metrics.observe("syncd_sink_write_seconds", took, sink=self.sink.name)
                return
            if deadline is not None:
                delay = min(delay, max(0.0, deadline - time.monotonic()))
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
            except TimeoutError:
                pass

    async def _deliver(self, batch: Batch, *, meta: bool) -> tuple[int, int]:
        """Write `batch`, splitting it on a refusal until the refused rows are found: (skipped, refused) rows."""
        try:
            return (await self.sink.write(batch)) or 0, 0
        except RowsRefused as err:
            n = batch.rows
            if n == 0:  # only our own rows (dead letters, status) and the sink refuses them: its table is wrong
                raise SchemaMismatch(f"{self.sink.name} refuses syncd's own rows: {err}") from err
            if n > 1:
                mid = n // 2
                s1, r1 = await self._deliver(batch.part(0, mid, meta=meta), meta=meta)
                s2, r2 = await self._deliver(batch.part(mid, n), meta=False)
                return s1 + s2, r1 + r2
            await self._dead_letter(batch, err)
            if meta:  # the batch's own dead letters and status rows still go out
                await self._deliver(batch.part(0, 0, meta=True), meta=False)
            return 0, 1

    async def _dead_letter(self, batch: Batch, err: RowsRefused) -> None:
        """The one refused row of `batch` becomes a dead letter (through the spool, so it survives a crash)."""
        page = next(p for p in batch.pages if page_len(p))
        row = page_rows(page)[0]
        reason = self.redact(f"{self.sink.name} refused the row: {err}")
        payload = {"src": page.get("src", ""), "vendor": page.get("vendor", ""), "stream": page.get("stream", ""),
                   "d": [[reason[:2000], safe_json(dict(zip(COLUMNS, row, strict=False))), self.sink.name]]}
        await self.spool.run(self.spool.commit_page, payload["src"], payload["stream"], payload, None)
        self.refused_rows += 1
        self.metrics.inc("syncd_sink_refused_rows_total", sink=self.sink.name)
        if payload["d"]:  # not already held (the same row refused again after a restart)
            self.metrics.inc("syncd_dead_letters_total", source=payload["src"], stream=payload["stream"])
        log.warning("sink.row_refused", sink=self.sink.name, source=payload["src"], stream=payload["stream"],
                    reason=str(err)[:300])

    async def _failing(self, err: Exception) -> None:
        self.metrics.inc("syncd_sink_errors_total", sink=self.sink.name, error=err.__class__.__name__)
        self.error = f"{err.__class__.__name__}: {err}"[:500]
        if self.healthy:
            log.warning("sink.failing", sink=self.sink.name, error=self.error)
            self.healthy, self.failing_since = False, time.monotonic()
            self.metrics.set("syncd_sink_up", 0, sink=self.sink.name)
            await self._health("failing", self.error)

    async def _stop_on_schema(self, err: SchemaMismatch) -> None:
        self.metrics.inc("syncd_sink_errors_total", sink=self.sink.name, error=err.__class__.__name__)
        if not self.stopped:
            await self._health("stopped", f"schema mismatch: {err}")
            log.error("sink.stopped_schema_mismatch", sink=self.sink.name, table=err.table, column=err.column,
                      error=str(err), hint="fix the table (or run `syncd schema --apply`); the backlog waits in the spool",
                      recheck_every_s=self.sink.schema_recheck)
        self.stopped = self.error = f"schema mismatch: {err}"[:500]
        self.healthy = False
        if self.failing_since is None:
            self.failing_since = time.monotonic()
        self.metrics.set("syncd_sink_stopped", 1, sink=self.sink.name)
        self.metrics.set("syncd_sink_up", 0, sink=self.sink.name)

    async def _recovered(self, attempts: int) -> None:
        if not self.healthy:
            log.info("sink.recovered", sink=self.sink.name, attempts=attempts, was=self.error)
            self.healthy, self.failing_since, self.stopped, self.error = True, None, "", ""
            self.metrics.set("syncd_sink_stopped", 0, sink=self.sink.name)
            await self._health("ok", "")
        self.metrics.set("syncd_sink_up", 1, sink=self.sink.name)

    async def _health(self, state: str, detail: str) -> None:
        try:
            await self.spool.run(self.spool.set_health, "sink", self.sink.name, state, self.redact(detail))
        except Exception as err:  # noqa: BLE001 - the state file may be what failed; the log line still tells
            log.warning("sink.health_not_saved", sink=self.sink.name, error=str(err))

    def due(self) -> bool:
        """A batch is waiting: `batch_rows` rows, or a page older than `batch_age` (asked from memory)."""
        return self.spool.due(self.sink.name, self.sink.batch_rows, self.sink.batch_age)

    async def _wait(self, stop: asyncio.Event) -> None:
        self.wake.clear()
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.wake.wait())]
        await asyncio.wait(waiters, timeout=max(0.05, self.sink.batch_age / 4), return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()


def safe_json(value: Any) -> str:
    """JSON text of anything, never raising: lone surrogates and odd types are escaped, not refused."""
    try:
        return orjson.dumps(value, default=str).decode()
    except (TypeError, ValueError):
        return json.dumps(value, ensure_ascii=True, default=str)
