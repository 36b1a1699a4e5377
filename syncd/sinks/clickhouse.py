"""ClickHouse sink: columnar batched inserts with the spool batch id as insert_deduplication_token.

One code path for the embedded engine (`chdb://path`) and servers (`http(s)://`); the chdb client
is synchronous, so every call runs on the sink's own thread.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import clickhouse_connect
import structlog

from syncd.events import COLUMNS
from syncd.sinks.base import Sink
from syncd.sinks.schema import migrations, migrations_table
from syncd.spool import Batch

log = structlog.get_logger("syncd.clickhouse")

EVENT_COLUMNS = [*COLUMNS, "ingested_at"]
DEAD_COLUMNS = ["at", "source", "vendor", "stream", "reason", "payload"]
# The order the syncer spools a status record in (scheduler.Syncer._finish), plus the instance added here.
STATUS_COLUMNS = ["source", "vendor", "stream", "kind", "ok", "cursor", "events", "pages", "duration_s",
                  "lag_s", "error", "last_success", "updated_at", "instance"]


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
        return clickhouse_connect.get_client(dsn=dsn)
    parts = urlsplit(dsn)
    return clickhouse_connect.get_client(
        host=parts.hostname or "localhost", port=parts.port or (8443 if parts.scheme == "https" else 8123),
        username=parts.username or "default", password=parts.password or "", secure=parts.scheme == "https",
        database=(parts.path.strip("/") or database),
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
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="syncd-clickhouse")

    async def _call(self, fn: Any, *args: Any, **kw: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, lambda: fn(*args, **kw))

    async def open(self) -> None:
        await self._call(self.open_sync)

    def open_sync(self) -> list[int]:
        """Connect and migrate; returns the migration versions applied now."""
        if self.client is None:
            self.client = connect(self.dsn, self.database)
        return self.migrate()

    def migrate(self) -> list[int]:
        """Apply migrations not yet recorded; idempotent. Returns the versions applied now."""
        client = self.client
        first, *rest = migrations(self.database, self.cluster, self.ttl)
        for stmt in first.statements[:1]:  # the database must exist before the migrations table
            client.command(stmt)
        client.command(migrations_table(self.database, self.cluster))
        done = {r[0] for r in client.query(f"SELECT version FROM `{self.database}`.schema_migrations").result_rows}
        applied = []
        for m in [first, *rest]:
            if m.version in done:
                continue
            for stmt in m.statements:
                client.command(stmt)
            client.insert(f"`{self.database}`.schema_migrations", [[m.version, m.name, int(time.time() * 1000)]],
                          column_names=["version", "name", "applied_at"])
            applied.append(m.version)
            log.info("clickhouse.migrated", version=m.version, name=m.name)
        return applied

    async def write(self, batch: Batch) -> None:
        await self._call(self._write, batch)

    def _write(self, batch: Batch) -> None:
        now_ms = int(time.time() * 1000)
        rows = [r for page in batch.pages for r in page.get("e", ())]
        if rows:
            columns = [list(c) for c in zip(*rows, strict=True)]
            columns.append([now_ms] * len(rows))
            self.client.insert(
                f"`{self.database}`.events", columns, column_names=EVENT_COLUMNS, column_oriented=True,
                settings={"insert_deduplication_token": batch.token},
            )
        dead = [[now_ms, p["src"], p["vendor"], p["stream"], d[0], d[1]] for p in batch.pages for d in p.get("d", ())]
        if dead:
            self.client.insert(f"`{self.database}`.dead_letter", dead, column_names=DEAD_COLUMNS,
                               settings={"insert_deduplication_token": batch.token + "-d"})
        status = [[*s, self.instance] for p in batch.pages for s in p.get("s", ())]
        if status:
            self.client.insert(f"`{self.database}`.sync_status", status,
                               column_names=STATUS_COLUMNS, settings={"insert_deduplication_token": batch.token + "-s"})

    def query(self, sql: str) -> Any:
        return self.client.query(sql)

    async def close(self) -> None:
        await self._call(self.close_sync)
        self._thread.shutdown(wait=True)

    def close_sync(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

