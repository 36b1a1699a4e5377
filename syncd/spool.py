"""The write-ahead spool: cursors and undelivered pages in one SQLite file (WAL, synchronous=FULL).

A page's events and its stream's next cursor commit in one transaction, so a cursor never runs
ahead of data that is safe on disk. Each sink drains pages in id order; a sink's in-flight range
is recorded before it is written so a retry after a crash sends the same range with the same
deduplication token.

A page's events are columns, `c` (PAGE_COLUMNS; the source and vendor once, in `src` and `vendor`), or rows,
`e` (COLUMNS order: spools written before columns, and pages built from events). `page_len`, `page_rows`,
`page_columns` and `page_slice` read both.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import sqlite3
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import orjson

from syncd.events import COLUMNS

P = ParamSpec("P")
FRESH_BYTES = 64 * 2**20  # encoded bytes of just-committed pages kept decoded for the drainers (~1.5x in memory, attrs shared)
COMMIT_LINGER_S = 0.05  # a group commit waits at most this long for pages still being fetched (`Spool.expecting`)
COMMIT_GAP_S = 0.005  # ... and only while they keep coming: this long without a new page sends the group
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cursors (
    source TEXT NOT NULL, stream TEXT NOT NULL, cursor TEXT NOT NULL, updated REAL NOT NULL,
    PRIMARY KEY (source, stream));
CREATE TABLE IF NOT EXISTS pages (
    id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL, rows INTEGER NOT NULL,
    bytes INTEGER NOT NULL, source TEXT NOT NULL, stream TEXT NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS health (
    scope TEXT NOT NULL, name TEXT NOT NULL, state TEXT NOT NULL, detail TEXT NOT NULL, updated REAL NOT NULL,
    PRIMARY KEY (scope, name));
CREATE TABLE IF NOT EXISTS dead_seen (
    source TEXT NOT NULL, stream TEXT NOT NULL, hash INTEGER NOT NULL, PRIMARY KEY (source, stream, hash))
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS stream_status (
    source TEXT NOT NULL, stream TEXT NOT NULL, status TEXT NOT NULL, PRIMARY KEY (source, stream));
CREATE TABLE IF NOT EXISTS sinks (
    name TEXT PRIMARY KEY, delivered INTEGER NOT NULL, inflight_first INTEGER, inflight_last INTEGER,
    dropped_rows INTEGER NOT NULL DEFAULT 0);
"""


PAGE_COLUMNS = tuple(c for c in COLUMNS if c not in ("source", "vendor"))


def page_len(page: dict[str, Any]) -> int:
    """The number of events of a spooled page."""
    columns = page.get("c")
    return len(columns[0]) if columns else len(page.get("e", ()))


def page_rows(page: dict[str, Any]) -> list[Any]:
    """A page's events as rows in COLUMNS order."""
    columns = page.get("c")
    if not columns:
        return list(page.get("e", ()))
    src, vendor = page["src"], page["vendor"]
    return [[i, src, vendor, k, t, d, m, ts, v, x, a] for i, k, t, d, m, ts, v, x, a in zip(*columns, strict=True)]


def page_columns(page: dict[str, Any]) -> list[list[Any]]:
    """A page's events as the COLUMNS columns; ValueError when its columns or rows do not line up."""
    columns = page.get("c")
    if columns:
        n = len(columns[0])
        if len(columns) != len(PAGE_COLUMNS) or len(set(map(len, columns))) != 1:
            raise ValueError(f"page columns: {len(PAGE_COLUMNS)} of {n} values each expected")
        return [columns[0], [page["src"]] * n, [page["vendor"]] * n, *columns[1:]]
    rows = page.get("e", ())
    return [list(c) for c in zip(*rows, strict=True)] if rows else [[] for _ in COLUMNS]


def page_slice(page: dict[str, Any], start: int, end: int) -> dict[str, Any]:
    """Events start..end of a page, as its own `c` or `e` entry."""
    columns = page.get("c")
    if columns:
        return {"c": [c[start:end] for c in columns]} if start < end else {}
    events = page.get("e", ())
    return {"e": events[start:end] if start < end else []}


@dataclass(frozen=True)
class Batch:
    """A contiguous range of pages for one sink; `token` is stable across retries of the same range."""

    sink: str
    first: int
    last: int
    token: str
    pages: list[dict[str, Any]]

    @property
    def rows(self) -> int:
        return sum(page_len(p) for p in self.pages)

    def part(self, lo: int, hi: int, *, meta: bool = False) -> Batch:
        """Events lo..hi (in batch order) as a batch of their own, with the dead letters and status rows only
        when `meta`; its token derives from the range, so a retried part is deduplicated like a retried batch."""
        pages, at = [], 0
        for page in self.pages:
            n = page_len(page)
            start, end = max(lo - at, 0), min(hi - at, n)
            at += n
            sub = {k: v for k, v in page.items() if k not in ("e", "c", "d", "s")}
            sub.update(page_slice(page, start, end))
            if meta:
                sub["d"], sub["s"] = page.get("d", []), page.get("s", [])
            if page_len(sub) or sub.get("d") or sub.get("s"):
                pages.append(sub)
        return Batch(self.sink, self.first, self.last, f"{self.token}/{lo}-{hi}{'m' if meta else ''}", pages)


class Spool:
    """Synchronous SQLite access; call it from async code through `run` (one worker thread, one connection)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
        if row is None:
            self.epoch = uuid.uuid4().hex[:12]
            self._db.execute("INSERT INTO meta VALUES ('epoch', ?)", (self.epoch,))
        else:
            self.epoch = row[0]
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="syncd-spool")
        self.pending_bytes = int(self._db.execute("SELECT COALESCE(SUM(bytes), 0) FROM pages").fetchone()[0])
        # Pages this process committed, as the objects it committed (id -> created, size, payload): a drainer gets
        # them without decoding what was just encoded. Only after a restart, or past FRESH_BYTES, is the file read.
        self._fresh: OrderedDict[int, tuple[float, int, dict[str, Any]]] = OrderedDict()
        self._fresh_bytes = 0
        # Per sink, (rows, created of the oldest page) not delivered yet: `due` answers from memory, with no trip
        # to the spool thread. Kept by commits and acks; counted from the file when the sinks are registered.
        self._waiting: dict[str, tuple[int, float | None]] = {}
        for (name,) in self._db.execute("SELECT name FROM sinks").fetchall():
            self._waiting[name] = self._count_waiting(name)
        # group commit (`commit`): pages queued for the spool thread, and whether it is draining the queue
        self._queue: list[tuple[str, str, dict[str, Any], Any, asyncio.Future[int | None]]] = []
        self._queue_lock = threading.Lock()
        self._committing = False
        # Whether more pages are on their way (the syncer's runs fetching one). A group then waits for them while
        # they keep coming (COMMIT_GAP_S), up to COMMIT_LINGER_S, instead of committing alone: the ~40 runs of a
        # phase tick answer over some milliseconds, and a commit each was a transaction and an fsync each (measured
        # at 10,000 streams: 1.2 pages a group, the spool thread 0.28 ms of CPU a run). Called on the event loop.
        self.expecting: Callable[[], bool] = lambda: False
        self._linger: asyncio.TimerHandle | None = None

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a spool method on the spool's own thread (SQLite fsyncs must not block the event loop)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._db.close()

    # -- cursors and pages ------------------------------------------------------------------------

    def get_cursor(self, source: str, stream: str) -> Any:
        row = self._db.execute("SELECT cursor FROM cursors WHERE source=? AND stream=?", (source, stream)).fetchone()
        return orjson.loads(row[0]) if row else None

    def cursors(self) -> dict[tuple[str, str], Any]:
        return {(s, t): orjson.loads(c) for s, t, c in self._db.execute("SELECT source, stream, cursor FROM cursors")}

    def commit_page(self, source: str, stream: str, payload: dict[str, Any], cursor: Any) -> int | None:
        """Store a page (events `c` or `e`, dead letters `d`, stream status `s`) and the stream's cursor atomically.

        A dead letter already stored for the stream (same reason and payload: a re-read page) is left out;
        `payload["d"]` holds only the new ones afterwards. `cursor` may come as its JSON already (bytes: the
        scheduler encodes it once for its own cache), else it is encoded here.
        """
        with self._tx():
            stored = self._store(source, stream, payload, cursor)
        self._stored(stored, payload)
        return stored[0]

    async def commit(self, source: str, stream: str, payload: dict[str, Any], cursor: Any) -> int | None:
        """`commit_page` from async code, with group commit: pages that come while the spool thread is busy wait
        for it, or while more are expected and coming (`expecting`, `_linger_on`), then commit together in one
        transaction (one fsync). Each caller returns once its page and cursor are durable, and one page's failure
        is its caller's alone (each page is a savepoint)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[int | None] = loop.create_future()
        with self._queue_lock:
            self._queue.append((source, stream, payload, cursor, done))
            start, self._committing = not self._committing, True
        if start and self.expecting():
            self._linger = loop.call_later(COMMIT_GAP_S, self._linger_on, loop, loop.time(), 1)
        elif start or (self._linger is not None and not self.expecting()):  # the last page expected is here
            self._flush(loop)
        return await done

    def _linger_on(self, loop: asyncio.AbstractEventLoop, since: float, seen: int) -> None:
        """A waiting group goes on waiting while pages are still expected and still coming (one came in the last
        COMMIT_GAP_S), for COMMIT_LINGER_S at most: a run hanging on a slow vendor holds back no other's page
        longer than a gap."""
        with self._queue_lock:
            queued = len(self._queue)
        if queued > seen and self.expecting() and loop.time() - since < COMMIT_LINGER_S:
            self._linger = loop.call_later(COMMIT_GAP_S, self._linger_on, loop, since, queued)
        else:
            self._flush(loop)

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        """The group waiting on the event loop goes to the spool thread now."""
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        self._next_group(loop)

    def _next_group(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hand the queue's next group to the spool thread; when the spool is closed, what is queued can never
        commit and its callers hear so at once."""
        try:
            self._executor.submit(self._commit_queued, loop)
        except RuntimeError as err:
            with self._queue_lock:
                items, self._queue, self._committing = self._queue, [], False
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(_settle, [item[4] for item in items], [err] * len(items))

    def _commit_queued(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the spool thread: commit what is queued as one group. What comes meanwhile is the next group, queued
        behind the spool work already waiting (a drainer's ack is never starved by a stream of commits)."""
        with self._queue_lock:
            items, self._queue = self._queue, []
        results: list[Any]
        try:
            results = self._commit_group(items)
        except BaseException as err:  # noqa: BLE001 - the transaction failed: every caller of the group hears it
            results = [err] * len(items)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(_settle, [item[4] for item in items], results)
        with self._queue_lock:
            more = bool(self._queue)
            self._committing = more
        if more:
            self._next_group(loop)

    def _commit_group(self, items: list[tuple[str, str, dict[str, Any], Any, Any]]) -> list[Any]:
        results: list[Any] = []
        stored = []
        with self._tx():
            for source, stream, payload, cursor, _ in items:
                self._db.execute("SAVEPOINT page")
                try:
                    stored.append((self._store(source, stream, payload, cursor), payload))
                    results.append(stored[-1][0][0])
                except Exception as err:  # noqa: BLE001 - this page's caller gets the error, the others commit
                    self._db.execute("ROLLBACK TO page")
                    results.append(err)
                self._db.execute("RELEASE page")
        for one, payload in stored:
            self._stored(one, payload)
        return results

    def _store(self, source: str, stream: str, payload: dict[str, Any], cursor: Any) -> tuple[int | None, float, int, int]:
        """Inside a transaction: the page (if it holds anything), its status row and the cursor.
        Returns (page id, created, bytes, rows)."""
        page_id, size, created = None, 0, time.time()
        if payload.get("d"):
            payload["d"] = [d for d in payload["d"] if self._first_sighting(source, stream, d)]
        rows = page_len(payload)
        if rows or payload.get("d") or payload.get("s"):
            data = orjson.dumps(payload)
            size = len(data)
            cur = self._db.execute(
                "INSERT INTO pages (created, rows, bytes, source, stream, data) VALUES (?,?,?,?,?,?)",
                (created, rows, size, source, stream, data),
            )
            page_id = cur.lastrowid
        if payload.get("s"):  # the stream's last run, kept after the page is delivered: `syncd status` reads it
            self._db.execute("INSERT INTO stream_status VALUES (?,?,?) ON CONFLICT(source, stream) DO UPDATE "
                             "SET status=excluded.status", (source, stream, orjson.dumps(payload["s"][-1]).decode()))
        if cursor is not None:
            self._db.execute(
                "INSERT INTO cursors VALUES (?,?,?,?) ON CONFLICT(source, stream) DO UPDATE "
                "SET cursor=excluded.cursor, updated=excluded.updated",
                (source, stream, (cursor if isinstance(cursor, bytes) else orjson.dumps(cursor)).decode(), time.time()),
            )
        return page_id, created, size, rows

    def _stored(self, stored: tuple[int | None, float, int, int], payload: dict[str, Any]) -> None:
        """After the commit: from now on a drainer may have the page. Past the budget the newest pages are not kept
        in memory (the drainers take the oldest first, so those are the ones worth having)."""
        page_id, created, size, rows = stored
        if page_id is None:
            return
        self.pending_bytes += size
        for sink, (waiting, oldest) in list(self._waiting.items()):
            self._waiting[sink] = (waiting + rows, created if oldest is None else oldest)
        if self._fresh_bytes + size <= FRESH_BYTES:
            self._fresh[page_id] = (created, size, dict(payload))
            self._fresh_bytes += size

    def due(self, sink: str, max_rows: int, max_age: float) -> bool:
        """Whether the sink has a batch to write: `max_rows` rows waiting, or a page older than `max_age` seconds.
        From memory: safe to ask from the event loop."""
        rows, oldest = self._waiting.get(sink, (0, None))
        return rows >= max_rows or (oldest is not None and time.time() - oldest >= max_age)

    def _count_waiting(self, sink: str) -> tuple[int, float | None]:
        rows, oldest = self._db.execute("SELECT COALESCE(SUM(rows), 0), MIN(created) FROM pages WHERE id > ?",
                                        (self._delivered(sink),)).fetchone()
        return int(rows), oldest

    def _first_sighting(self, source: str, stream: str, letter: list[Any]) -> bool:
        digest = hashlib.blake2b("\x1f".join(str(x) for x in letter).encode("utf-8", "backslashreplace"), digest_size=8)
        cur = self._db.execute("INSERT OR IGNORE INTO dead_seen VALUES (?,?,?)",
                               (source, stream, int.from_bytes(digest.digest(), "little", signed=True)))
        return cur.rowcount == 1

    def dead_counts(self) -> dict[tuple[str, str], int]:
        """Distinct dead letters ever stored, per (source, stream)."""
        return {(s, t): int(n) for s, t, n in
                self._db.execute("SELECT source, stream, COUNT(*) FROM dead_seen GROUP BY source, stream")}

    # -- health (what `syncd status` shows of sources and sinks) ---------------------------------

    def set_health(self, scope: str, name: str, state: str, detail: str) -> None:
        with self._tx():
            self._db.execute("INSERT INTO health VALUES (?,?,?,?,?) ON CONFLICT(scope, name) DO UPDATE SET "
                             "state=excluded.state, detail=excluded.detail, updated=excluded.updated",
                             (scope, name, state, detail[:500], time.time()))

    def health(self) -> list[tuple[str, str, str, str, float]]:
        return list(self._db.execute("SELECT scope, name, state, detail, updated FROM health ORDER BY scope, name"))

    # -- sinks ------------------------------------------------------------------------------------

    def register_sinks(self, names: list[str]) -> None:
        """Keep a delivery position per enabled sink; a sink no longer configured stops holding pages."""
        with self._tx():
            for name in names:
                self._db.execute("INSERT OR IGNORE INTO sinks (name, delivered) VALUES (?, 0)", (name,))
            marks = ",".join("?" for _ in names) or "''"
            self._db.execute(f"DELETE FROM sinks WHERE name NOT IN ({marks})", names)
            self._collect()
        self._waiting = {name: self._count_waiting(name) for name in names}

    def sink_names(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT name FROM sinks ORDER BY name")]

    def backlog(self, sink: str) -> tuple[int, float | None]:
        """(rows waiting, age in seconds of the oldest waiting page) for one sink."""
        rows, oldest = self._count_waiting(sink)
        return rows, (time.time() - oldest) if oldest is not None else None

    def backlogs(self) -> dict[str, tuple[int, int, float | None]]:
        """Per sink: (rows, bytes, age in seconds of the oldest page) it has not delivered yet, in one query."""
        now = time.time()
        return {name: (int(rows), int(size), now - oldest if oldest is not None else None)
                for name, rows, size, oldest in self._db.execute(
                    "SELECT s.name, COALESCE(SUM(p.rows), 0), COALESCE(SUM(p.bytes), 0), MIN(p.created) "
                    "FROM sinks s LEFT JOIN pages p ON p.id > s.delivered GROUP BY s.name")}

    def pages_waiting(self, sink: str) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM pages WHERE id > ?", (self._delivered(sink),)).fetchone()[0])

    def next_batch(self, sink: str, max_rows: int) -> Batch | None:
        """The sink's in-flight range if one is recorded, else the next pages up to `max_rows` rows."""
        with self._tx():
            return self._next_batch(sink, max_rows)

    def _next_batch(self, sink: str, max_rows: int) -> Batch | None:
        delivered, first, last = self._db.execute(
            "SELECT delivered, inflight_first, inflight_last FROM sinks WHERE name=?", (sink,)
        ).fetchone()
        if first is None:
            total, first, last = 0, None, None
            for page_id, rows in self._db.execute("SELECT id, rows FROM pages WHERE id > ? ORDER BY id", (delivered,)):
                if first is not None and total + rows > max_rows:
                    break
                first = page_id if first is None else first
                last, total = page_id, total + rows
            if first is None:
                return None
            self._db.execute("UPDATE sinks SET inflight_first=?, inflight_last=? WHERE name=?", (first, last, sink))
        return Batch(sink, first, last, f"{self.epoch}-{sink}-{first}-{last}", self._pages(first, last))

    def _pages(self, first: int, last: int) -> list[dict[str, Any]]:
        """Pages first..last, each with `at` (when syncd stored it: how old an event was when fetched, for
        mqtt.max_age); the ones this process committed from memory, the others decoded from the file."""
        fresh = self._fresh
        ids = [r[0] for r in self._db.execute("SELECT id FROM pages WHERE id BETWEEN ? AND ? ORDER BY id", (first, last))]
        missing = [i for i in ids if i not in fresh]
        read: dict[int, dict[str, Any]] = {}
        if missing:
            for page_id, created, data in self._db.execute(
                    "SELECT id, created, data FROM pages WHERE id BETWEEN ? AND ? ORDER BY id", (missing[0], missing[-1])):
                if page_id not in fresh:
                    page = orjson.loads(data)
                    page["at"] = created
                    read[page_id] = page
        return [{**fresh[i][2], "at": fresh[i][0]} if i in fresh else read[i] for i in ids]

    def ack(self, batch: Batch, next_rows: int = 0, next_age: float = math.inf) -> Batch | None:
        """The sink has every page of the batch: advance it and delete pages every sink has.

        With `next_rows`, the sink's next batch comes back when one is due (`next_rows` rows waiting, or the oldest
        page older than `next_age` seconds), its range recorded in the same transaction: one fsync between two
        writes of a busy sink, not three.
        """
        with self._tx():
            self._db.execute(
                "UPDATE sinks SET delivered=?, inflight_first=NULL, inflight_last=NULL WHERE name=?",
                (batch.last, batch.sink),
            )
            self._collect()
            waiting = self._waiting.get(batch.sink, (0, None))[0] - batch.rows
            oldest = self._db.execute("SELECT created FROM pages WHERE id > ? ORDER BY id LIMIT 1", (batch.last,)).fetchone()
            if oldest is None or waiting < 0:  # nothing left, or a count that went wrong: count again
                self._waiting[batch.sink] = self._count_waiting(batch.sink)
            else:
                self._waiting[batch.sink] = (waiting, oldest[0])
            if next_rows and self.due(batch.sink, next_rows, next_age):
                return self._next_batch(batch.sink, next_rows)
            return None

    def drop_oldest(self, sink: str) -> int:
        """Give up the sink's oldest undelivered page (on_full=drop_oldest); returns the rows dropped."""
        delivered = self._delivered(sink)
        row = self._db.execute("SELECT id, rows FROM pages WHERE id > ? ORDER BY id LIMIT 1", (delivered,)).fetchone()
        if row is None:
            return 0
        with self._tx():
            self._db.execute(
                "UPDATE sinks SET delivered=?, inflight_first=NULL, inflight_last=NULL, "
                "dropped_rows=dropped_rows+? WHERE name=?",
                (row[0], row[1], sink),
            )
            self._collect()
            self._waiting[sink] = self._count_waiting(sink)
        return int(row[1])

    def laggards(self) -> list[str]:
        """The sinks holding the oldest undelivered page (the ones a full spool waits for)."""
        return [r[0] for r in self._db.execute(
            "SELECT name FROM sinks WHERE delivered = (SELECT MIN(delivered) FROM sinks) ORDER BY name")]

    def _delivered(self, sink: str) -> int:
        return int(self._db.execute("SELECT delivered FROM sinks WHERE name=?", (sink,)).fetchone()[0])

    def _collect(self) -> None:
        (low,) = self._db.execute("SELECT MIN(delivered) FROM sinks").fetchone()
        if low is None:
            return
        (freed,) = self._db.execute("SELECT COALESCE(SUM(bytes), 0) FROM pages WHERE id <= ?", (low,)).fetchone()
        if freed:
            self._db.execute("DELETE FROM pages WHERE id <= ?", (low,))
            self.pending_bytes -= int(freed)
        while self._fresh and next(iter(self._fresh)) <= low:
            self._fresh_bytes -= self._fresh.popitem(last=False)[1][1]

    def _tx(self) -> _Transaction:
        return _Transaction(self._db)


def _settle(futures: list[asyncio.Future[Any]], results: list[Any]) -> None:
    for future, result in zip(futures, results, strict=True):
        if future.done():  # its caller was cancelled: the page is committed all the same
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
