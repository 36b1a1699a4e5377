"""ClickHouse sink: columnar batched inserts with the spool batch id as insert_deduplication_token.

One code path for the embedded engine (`chdb://path`) and servers (`http(s)://`); the chdb client
is synchronous, so every call runs on the sink's own thread.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog

from syncd.errors import RowsRefused, SchemaMismatch
from syncd.events import COLUMNS, TS_MAX_MS, TS_MIN_MS
from syncd.sinks import engine_pages
from syncd.sinks.base import Sink
from syncd.sinks.schema import fresh_schema, migrations, migrations_table
from syncd.spool import Batch, page_columns, page_len

log = structlog.get_logger("syncd.clickhouse")

EVENT_COLUMNS = [*COLUMNS, "ingested_at"]
DEAD_COLUMNS = ["at", "source", "vendor", "stream", "reason", "payload", "sink"]
# The order the syncer spools a status record in (scheduler.Syncer._finish), plus the instance added here.
STATUS_COLUMNS = ["source", "vendor", "stream", "kind", "ok", "cursor", "events", "pages", "duration_s",
                  "lag_s", "error", "last_success", "updated_at", "instance"]


# What each column of `events` must be for our inserts to mean what we think (checked when an insert fails).
EVENT_TYPES = {
    "event_id": "UInt64", "source": "LowCardinality(String)", "vendor": "LowCardinality(String)",
    "kind": "LowCardinality(String)", "tenant": "String", "device": "String", "metric": "String",
    "ts": "DateTime64(3, 'UTC')", "value": "Nullable(Float64)", "text": "Nullable(String)",
    "attrs": "Map(LowCardinality(String), String)", "ingested_at": "DateTime64(3, 'UTC')",
}
# ClickHouse error codes, by what they mean for a batch (the class of failure, never the message text):
SCHEMA_CODES = frozenset({
    8,  # THERE_IS_NO_COLUMN
    10,  # NOT_FOUND_COLUMN_IN_BLOCK
    16,  # NO_SUCH_COLUMN_IN_TABLE
    20,  # NUMBER_OF_COLUMNS_DOESNT_MATCH
    44,  # ILLEGAL_COLUMN
    47,  # UNKNOWN_IDENTIFIER
    53,  # TYPE_MISMATCH
    60,  # UNKNOWN_TABLE
    81,  # UNKNOWN_DATABASE
})
DATA_CODES = frozenset({
    6,  # CANNOT_PARSE_TEXT
    27,  # CANNOT_PARSE_INPUT_ASSERTION_FAILED
    38,  # CANNOT_PARSE_DATE
    41,  # CANNOT_PARSE_DATETIME
    69,  # ARGUMENT_OUT_OF_BOUND
    72,  # CANNOT_PARSE_NUMBER
    117,  # INCORRECT_DATA
    131,  # TOO_LARGE_STRING_SIZE
    321,  # VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
    349,  # CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN
    407,  # DECIMAL_OVERFLOW
})
# Everything else (connection, timeout, 5xx, TOO_MANY_PARTS, MEMORY_LIMIT_EXCEEDED, auth) is transient: retried.
# The client refuses a value it cannot serialize with one of these before anything is sent:


@functools.cache
def _driver() -> tuple[Any, Any]:
    """clickhouse-connect and its exceptions module, imported when first needed: the driver costs a tenth of syncd's
    start-up, and the store opens on its own thread while the sources discover."""
    import clickhouse_connect
    from clickhouse_connect.driver import exceptions

    return clickhouse_connect, exceptions


def _client_data_errors() -> tuple[type[Exception], ...]:
    """What the client raises for a value it cannot encode (the row's fault, not the server's)."""
    return (_driver()[1].DataError, TypeError, ValueError, OverflowError, struct.error)
# toYYYYMM partitions one insert may touch (the server refuses more than max_partitions_per_insert_block, 100).
PARTITIONS_PER_INSERT = 90
FRESH_WAIT_S = 30.0  # syncd tables without recorded versions: how long to wait for the replica creating them


class StoreLocked(RuntimeError):
    """The embedded store's data path is held by another process (a running daemon)."""


def connect(dsn: str, database: str = "default") -> Any:
    """A clickhouse-connect client for `chdb://path` or `http(s)://user:pass@host:port[/db]`."""
    if dsn.startswith("chdb://"):
        path = dsn[len("chdb://"):]
        if _held_by_another_process(Path(path) / "status"):
            raise StoreLocked(
                f"the embedded ClickHouse at {path} is in use by another process "
                "(is `syncd run` or `syncd demo` running on this data dir? stop it, or query a server DSN)"
            )
        return _driver()[0].get_client(dsn=dsn)
    parts = urlsplit(dsn)
    return _driver()[0].get_client(
        host=parts.hostname or "localhost", port=parts.port or (8443 if parts.scheme == "https" else 8123),
        username=parts.username or "default", password=parts.password or "", secure=parts.scheme == "https",
        # The session's default database only: every statement of syncd names `[clickhouse] database` itself,
        # which may not exist yet (the first migration creates it), so it must not be the connection's default.
        database=parts.path.strip("/") or "default",
    )


def _held_by_another_process(status_file: Path) -> bool:
    """The engine keeps an exclusive flock on `<path>/status` while it runs (how ClickHouse guards a data dir)."""
    try:
        fd = os.open(status_file, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _partition_groups(stamps: list[int]) -> list[list[int]]:
    """Row indices in groups touching at most PARTITIONS_PER_INSERT monthly partitions (one group in the usual case)."""
    months = [_month(t) for t in stamps]
    order = sorted(set(months))
    if len(order) <= PARTITIONS_PER_INSERT:
        return [list(range(len(stamps)))] if stamps else []
    group_of = {m: i // PARTITIONS_PER_INSERT for i, m in enumerate(order)}
    groups: list[list[int]] = [[] for _ in range(group_of[order[-1]] + 1)]
    for i, m in enumerate(months):
        groups[group_of[m]].append(i)
    return groups


def _month(ts_ms: int) -> int:
    """toYYYYMM of an epoch-ms timestamp, as an ordinal (days/month arithmetic is enough for grouping)."""
    return int(time.strftime("%Y%m", time.gmtime(ts_ms / 1000)))


def _short(err: Exception) -> str:
    return str(err).splitlines()[0][:300] if str(err) else err.__class__.__name__


def redact_dsn(dsn: str) -> str:
    parts = urlsplit(dsn)
    if parts.password:
        return dsn.replace(f":{parts.password}@", ":***@")
    return dsn


class ClickHouseSink(Sink):
    name = "clickhouse"

    def __init__(self, dsn: str, database: str, *, cluster: str = "", ttl: str = "", batch_rows: int = 50_000,
                 batch_age: float = 2.0, instance: str = "syncd-0") -> None:
        self.dsn, self.database, self.cluster, self.ttl = dsn, database, cluster, ttl
        self.batch_rows, self.batch_age, self.instance = batch_rows, batch_age, instance
        self.client: Any = None
        self._migrated = False
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="syncd-clickhouse")
        # An embedded store whose directory does not exist yet holds no events: nothing to resume from, and no
        # need to wait for the engine to open before the first fetch.
        self.empty_store = dsn.startswith("chdb://") and not Path(dsn[len("chdb://"):]).exists()

    async def _call(self, fn: Any, *args: Any, **kw: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, lambda: fn(*args, **kw))

    async def open(self) -> None:
        await self._call(self.open_sync)

    def open_sync(self) -> list[int]:
        """Connect and migrate (once per connection); returns the migration versions applied now."""
        if self.client is not None and self._migrated:
            return []
        if self.client is None:
            self.client = connect(self.dsn, self.database)
        applied = self.migrate()
        self._migrated = True
        if self.dsn.startswith("chdb://"):
            released = engine_pages.release()
            log.info("clickhouse.engine_pages_released", mb=released >> 20)
        return applied

    def migrate(self) -> list[int]:
        """Apply migrations not yet recorded; idempotent. Returns the versions applied now."""
        client = self.client
        first, *rest = migrations(self.database, self.cluster, self.ttl)
        client.command(str(first.statements[0]))  # the database must exist before the migrations table
        client.command(migrations_table(self.database, self.cluster))
        done = self._versions_done()
        tables = client.query(f"SELECT count() FROM system.tables WHERE database = '{self.database}' "
                              "AND name NOT LIKE '.inner%' AND name != 'schema_migrations'").result_rows[0][0]
        if not done and tables:
            # Replicas started together (a StatefulSet) race for an empty store: the first builds the fresh layout
            # and records every version at its end. One that finds those tables before the versions waits for them
            # instead of running the stepwise migrations (DROP VIEW latest_mv, rekeys) under the others' inserts.
            deadline = time.monotonic() + FRESH_WAIT_S
            while not done and time.monotonic() < deadline:
                time.sleep(0.5)
                done = self._versions_done()
            if not done:
                log.warning("clickhouse.tables_without_versions", database=self.database, next="stepwise migrations")
        if not done and not tables:
            # a store without syncd tables: build the final layout at once (no copies, no rekeys), record every version
            for stmt in fresh_schema(self.database, self.cluster, self.ttl):
                client.command(stmt)
            now = int(time.time() * 1000)
            client.insert(f"`{self.database}`.schema_migrations", [[m.version, m.name, now] for m in [first, *rest]],
                          column_names=["version", "name", "applied_at"])
            applied = [m.version for m in [first, *rest]]
            log.info("clickhouse.created", versions=applied, database=self.database)
            return applied
        applied = []
        for m in [first, *rest]:
            if m.version in done:
                continue
            if m.done_if and client.query(m.done_if).result_rows[0][0]:
                log.info("clickhouse.migration_found_in_place", version=m.version, name=m.name)
            else:
                for step in m.statements:
                    stmt, already = (step, "") if isinstance(step, str) else step
                    if not (already and client.query(already).result_rows[0][0]):
                        client.command(stmt)
            client.insert(f"`{self.database}`.schema_migrations", [[m.version, m.name, int(time.time() * 1000)]],
                          column_names=["version", "name", "applied_at"])
            applied.append(m.version)
            log.info("clickhouse.migrated", version=m.version, name=m.name)
        return applied

    def _versions_done(self) -> set[int]:
        return {r[0] for r in self.client.query(f"SELECT version FROM `{self.database}`.schema_migrations").result_rows}

    async def write(self, batch: Batch) -> None:
        await self._call(self._write, batch)

    def _write(self, batch: Batch) -> None:
        now_ms = int(time.time() * 1000)
        try:
            per_page = [page_columns(p) for p in batch.pages if page_len(p)]
        except ValueError as err:  # rows of the wrong length (a spool written by hand, or damaged)
            raise RowsRefused(f"events: {err}") from err
        columns = [list(chain.from_iterable(c[i] for c in per_page)) for i in range(len(COLUMNS))]
        stamps = columns[COLUMNS.index("ts")]
        if not all(type(t) is int for t in stamps) or (stamps and not (
                TS_MIN_MS <= min(stamps) and max(stamps) <= TS_MAX_MS)):
            # the engine stores an out-of-range DateTime64 without a word, then cannot read it back
            bad = next(t for t in stamps if not (type(t) is int and TS_MIN_MS <= t <= TS_MAX_MS))
            raise RowsRefused(f"events: ts {bad!r} is outside DateTime64(3) (1900-01-01..2299-12-31)")
        # rows spanning under (PARTITIONS_PER_INSERT - 2) × 28 days touch at most PARTITIONS_PER_INSERT months
        one = bool(stamps) and max(stamps) - min(stamps) < (PARTITIONS_PER_INSERT - 2) * 28 * 86_400_000
        groups = [columns] if one else [[[c[i] for i in index] for c in columns] for index in _partition_groups(stamps)]
        for i, group in enumerate(groups):
            group = [*group, [now_ms] * len(group[0])]
            token = batch.token if i == 0 else f"{batch.token}/p{i}"
            self._insert("events", group, EVENT_COLUMNS, token, column_oriented=True)
        dead = [[now_ms, p["src"], p["vendor"], p["stream"], d[0], d[1], d[2] if len(d) > 2 else ""]
                for p in batch.pages for d in p.get("d", ())]
        if dead:
            self._insert("dead_letter", dead, DEAD_COLUMNS, batch.token + "-d")
        status = [[*s, self.instance] for p in batch.pages for s in p.get("s", ())]
        if status:
            self._insert("sync_status", status, STATUS_COLUMNS, batch.token + "-s")

    def _insert(self, table: str, data: list[Any], columns: list[str], token: str, column_oriented: bool = False) -> None:
        """One insert; its failure becomes RowsRefused, SchemaMismatch, or stays what it was (transient)."""
        try:
            settings: dict[str, Any] = {"insert_deduplication_token": token}
            if self.cluster:  # a batch is delivered only once the Distributed table has passed it on to the shards
                settings["insert_distributed_sync"] = 1
            self.client.insert(f"`{self.database}`.{table}", data, column_names=columns, column_oriented=column_oriented,
                               settings=settings)
        except _driver()[1].DatabaseError as err:
            exc, code = _driver()[1], getattr(err, "code", None)
            if code in SCHEMA_CODES or (isinstance(err, exc.ProgrammingError) and code is None) or code in DATA_CODES \
                    or isinstance(err, exc.DataError):
                self._raise_schema_mismatch(table, err)
            if code in DATA_CODES or isinstance(err, exc.DataError):
                raise RowsRefused(f"{table}: {_short(err)}") from err
            raise
        except _client_data_errors() as err:
            self._raise_schema_mismatch(table, err)
            raise RowsRefused(f"{table}: {err.__class__.__name__}: {_short(err)}") from err

    def _raise_schema_mismatch(self, table: str, err: Exception) -> None:
        """Compare the table with what syncd writes: a missing table or a changed column is a SchemaMismatch."""
        try:
            described = {r[0]: r[1] for r in self.client.query(f"DESCRIBE TABLE `{self.database}`.`{table}`").result_rows}
        except _driver()[1].DatabaseError as check:
            if getattr(check, "code", None) in (60, 81):  # UNKNOWN_TABLE, UNKNOWN_DATABASE
                raise SchemaMismatch(f"table {self.database}.{table} does not exist", table=table) from err
            if getattr(err, "code", None) in SCHEMA_CODES:
                raise SchemaMismatch(f"{self.database}.{table}: {_short(err)}", table=table) from err
            return  # the check itself failed (connection?): let the original error decide
        expected = EVENT_TYPES if table == "events" else {}
        columns = {"events": EVENT_COLUMNS, "dead_letter": DEAD_COLUMNS, "sync_status": STATUS_COLUMNS}.get(table, [])
        for column in columns:
            if column not in described:
                raise SchemaMismatch(f"{self.database}.{table} has no column {column}", table=table, column=column) from err
            want = expected.get(column)
            if want is not None and described[column].replace(" ", "") != want.replace(" ", ""):
                raise SchemaMismatch(f"{self.database}.{table}.{column} is {described[column]}, syncd writes {want}",
                                     table=table, column=column) from err
        if getattr(err, "code", None) in SCHEMA_CODES:
            raise SchemaMismatch(f"{self.database}.{table}: {_short(err)}", table=table) from err

    async def newest(self, source: str) -> dict[tuple[str, str], int]:
        """(kind, tenant) -> epoch ms of the newest stored event of `source` (where a stream with no cursor resumes)."""
        if self.empty_store:
            return {}
        await self.open()
        return await self._call(self._newest, source)

    def _newest(self, source: str) -> dict[tuple[str, str], int]:
        rows = self.client.query(
            f"SELECT kind, tenant, toUnixTimestamp64Milli(max(ts)) FROM `{self.database}`.events "
            "WHERE source = {source:String} AND ts <= now64(3) GROUP BY kind, tenant",  # a future stamp is no resume point
            parameters={"source": source}).result_rows
        return {(kind, tenant): int(ms) for kind, tenant, ms in rows}

    def query(self, sql: str) -> Any:
        return self.client.query(sql)

    async def close(self) -> None:
        await self._call(self.close_sync)
        self._thread.shutdown(wait=True)

    def close_sync(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
            self._migrated = False

