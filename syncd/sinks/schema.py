"""ClickHouse DDL as versioned, idempotent migrations (single server, embedded engine, or cluster)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

EVENTS_ORDER = "source, vendor, tenant, device, metric, kind, ts"
LATEST_ORDER = "source, vendor, tenant, device, metric, kind"
# Sharding keys of the Distributed fronts (cluster mode): a ReplacingMergeTree only merges rows within one shard,
# so every row it may replace must land on the shard of its twin: the key is made of sort key columns.
SERIES_KEY = "cityHash64(vendor, tenant, device)"  # events and latest: a series' latest row beside its events
DEAD_KEY = "cityHash64(source, stream)"  # dead_letter: one row per distinct letter, whichever run re-read it
Step = str | tuple[str, str]  # a statement, or (statement, query answering non-zero when it is already done)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[Step, ...]
    done_if: str = ""  # a query answering non-zero when the change is already in place (a crash before recording it)


def fresh_schema(database: str, cluster: str = "", ttl: str = "") -> list[str]:
    """The statements that build, on a server with no syncd tables, what every migration in order builds: each table
    created at once with its latest layout (no copy, no rekey), for a quick first start. `migrations` stays the truth;
    a test checks that both give the same tables."""
    return [stmt for m in migrations(database, cluster, ttl, fresh=True) for stmt in m.statements
            if isinstance(stmt, str)]


def migrations(database: str, cluster: str = "", ttl: str = "", fresh: bool = False) -> list[Migration]:
    """Every migration in order. With `cluster`, tables are Replicated with a Distributed front. With `fresh`, the
    same tables built directly in their final layout (see `fresh_schema`)."""
    on = f" ON CLUSTER `{cluster}`" if cluster else ""
    db = f"`{database}`"

    def engine(kind: str, args: str = "") -> str:
        if not cluster:
            return f"{kind}({args})"
        path = f"'/clickhouse/tables/{{shard}}/{database}/{{table}}', '{{replica}}'"
        return f"Replicated{kind}({path}{', ' + args if args else ''})"

    def table(name: str) -> str:
        return f"{db}.`{name}_local`" if cluster else f"{db}.`{name}`"

    def front(name: str) -> str:
        """What reads or writes the whole table: its Distributed front on a cluster, the table itself on one node."""
        return f"{db}.`{name}`"

    def copy(into: str, select: str, columns: str = "") -> str:
        """INSERT ... SELECT of a whole table. An INSERT runs on one node only, so on a cluster the copy goes from
        Distributed front to Distributed front (each row to its shard), waiting until every shard has it."""
        settings = " SETTINGS insert_distributed_sync = 1" if cluster else ""
        return f"INSERT INTO {front(into)}{columns}{settings} {select}"

    def distributed(name: str, key: str) -> tuple[str, ...]:
        if not cluster:
            return ()
        return (
            f"CREATE TABLE IF NOT EXISTS {db}.`{name}`{on} AS {table(name)} "
            f"ENGINE = Distributed(`{cluster}`, {database}, `{name}_local`, {key})",
        )

    # Dedup of retried inserts by insert_deduplication_token: replicated tables do it by default,
    # single servers and the embedded engine only with a window set.
    dedup = "" if cluster else ", non_replicated_deduplication_window = 10000"
    ttl_clause = f" TTL toDateTime(ts) + INTERVAL {ttl}" if ttl else ""

    def events_table(name: str, order: str) -> str:
        return f"""CREATE TABLE IF NOT EXISTS {table(name)}{on} (
    event_id UInt64,
    source LowCardinality(String),
    vendor LowCardinality(String),
    kind LowCardinality(String),
    tenant String,
    device String,
    metric String,
    ts DateTime64(3, 'UTC') CODEC(Delta, ZSTD),
    value Nullable(Float64) CODEC(Gorilla, ZSTD),
    text Nullable(String),
    attrs Map(LowCardinality(String), String),
    ingested_at DateTime64(3, 'UTC') CODEC(Delta, ZSTD)
) ENGINE = {engine('ReplacingMergeTree', 'ingested_at')}
PARTITION BY toYYYYMM(ts)
ORDER BY ({order}){ttl_clause}
SETTINGS index_granularity = 8192{dedup}"""

    def latest_table(name: str, order: str) -> str:
        return f"""CREATE TABLE IF NOT EXISTS {table(name)}{on} (
    vendor LowCardinality(String),
    tenant String,
    device String,
    metric String,
    kind LowCardinality(String),
    source LowCardinality(String),
    ts DateTime64(3, 'UTC'),
    value Nullable(Float64),
    text Nullable(String),
    attrs Map(LowCardinality(String), String)
) ENGINE = {engine('ReplacingMergeTree', 'ts')}
ORDER BY ({order})"""

    latest_view = (f"CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.`latest_mv`{on} TO {table('latest')} AS\n"
                   f"SELECT vendor, tenant, device, metric, kind, source, ts, value, text, attrs FROM {table('events')}")

    def rekey(name: str, ddl: Callable[[str, str], str], order: str, key: str) -> tuple[Step, ...]:
        """Move a table to a new sort key: copy into a new table, swap the names, drop the old one.
        Each step knows when it is already done, so a crash part-way is finished by the next start."""
        local = f"{name}_local" if cluster else name
        moved = (f"SELECT count() FROM system.tables WHERE database = '{database}' AND name = '{local}' "
                 f"AND sorting_key = '{order}'")
        new = f"{name}_rekeyed"
        return (
            (ddl(new, order), moved),
            *((stmt, moved) for stmt in distributed(new, key)),
            (copy(new, f"SELECT * FROM {front(name)}"), moved),
            (f"EXCHANGE TABLES {table(name)} AND {table(new)}{on}", moved),
            *((f"DROP TABLE IF EXISTS {front(new)}{on}",) if cluster else ()),
            f"DROP TABLE IF EXISTS {table(new)}{on}",
        )

    return [
        Migration(1, "events", (
            f"CREATE DATABASE IF NOT EXISTS {db}{on}",
            events_table("events", EVENTS_ORDER if fresh else "vendor, tenant, device, metric, kind, ts"),
            *distributed("events", SERIES_KEY),
        )),
        Migration(2, "latest", (
            latest_table("latest", LATEST_ORDER if fresh else "vendor, tenant, device, metric, kind"),
            *distributed("latest", SERIES_KEY),
            # Fed by every insert into events, so "current state" needs no second write path.
            latest_view,
        )),
        Migration(3, "dead_letter", () if fresh else (
            f"""CREATE TABLE IF NOT EXISTS {table('dead_letter')}{on} (
    at DateTime64(3, 'UTC'),
    source LowCardinality(String),
    vendor LowCardinality(String),
    stream String,
    reason String,
    payload String
) ENGINE = {engine('MergeTree')}
PARTITION BY toYYYYMM(at)
ORDER BY (source, stream, at)
SETTINGS index_granularity = 8192{dedup}""",
            *distributed("dead_letter", DEAD_KEY),
        )),
        Migration(4, "sync_status", (
            f"""CREATE TABLE IF NOT EXISTS {table('sync_status')}{on} (
    source LowCardinality(String),
    vendor LowCardinality(String),
    stream String,
    kind LowCardinality(String),
    instance LowCardinality(String),
    ok UInt8,
    cursor String,
    events UInt64,
    pages UInt32,
    duration_s Float64,
    lag_s Nullable(Float64),
    error String,
    last_success Nullable(DateTime64(3, 'UTC')),
    updated_at DateTime64(3, 'UTC')
) ENGINE = {engine('ReplacingMergeTree', 'updated_at')}
ORDER BY (source, stream)
SETTINGS index_granularity = 8192{dedup}""",
            *distributed("sync_status", "cityHash64(source)"),
        )),
        # One row per distinct letter (a re-read page adds none), and which sink refused the row, if one did.
        Migration(5, "dead_letter_distinct", (
            f"""CREATE TABLE IF NOT EXISTS {table('dead_letter' if fresh else 'dead_letter_v5')}{on} (
    at DateTime64(3, 'UTC'),
    source LowCardinality(String),
    vendor LowCardinality(String),
    stream String,
    sink LowCardinality(String),
    reason String,
    payload String
) ENGINE = {engine('ReplacingMergeTree')}
ORDER BY (source, stream, sink, reason, cityHash64(payload))
SETTINGS index_granularity = 8192{dedup}""",
            *(distributed("dead_letter", DEAD_KEY) if fresh else (
                *distributed("dead_letter_v5", DEAD_KEY),
                copy("dead_letter_v5", f"SELECT at, source, vendor, stream, '', reason, payload FROM {front('dead_letter')}",
                     " (at, source, vendor, stream, sink, reason, payload)"),
                f"EXCHANGE TABLES {table('dead_letter')} AND {table('dead_letter_v5')}{on}",
                *((f"DROP TABLE IF EXISTS {front('dead_letter_v5')}{on}",) if cluster else ()),
                f"DROP TABLE IF EXISTS {table('dead_letter_v5')}{on}",
                *((f"DROP TABLE IF EXISTS {db}.`dead_letter`{on}", *distributed("dead_letter", DEAD_KEY))
                  if cluster else ()))),
        ), done_if=f"SELECT count() FROM system.columns WHERE database = '{database}' "
                   f"AND table = '{'dead_letter_local' if cluster else 'dead_letter'}' AND name = 'sink'"),
        # The source joins the sort keys (and event_id): two deployments with equal ids never replace each
        # other's rows. Existing rows are copied once into tables with the new key.
        Migration(6, "source_in_sort_keys", () if fresh else (
            f"DROP VIEW IF EXISTS {db}.`latest_mv`{on}",
            *rekey("events", events_table, EVENTS_ORDER, SERIES_KEY),
            *rekey("latest", latest_table, LATEST_ORDER, SERIES_KEY),
            latest_view,
        )),
        # Removing more than 100 outdated parts at once starts a pool of up to 127 threads that is then kept
        # (about 30 MB in the embedded engine, measured); one remover thread is plenty at syncd's insert rate.
        Migration(7, "single_part_remover", tuple(
            f"ALTER TABLE {table(name)}{on} MODIFY SETTING concurrent_part_removal_threshold = 1000000000"
            for name in ("events", "latest", "dead_letter", "sync_status")) if not cluster else ()),
    ]


def migrations_table(database: str, cluster: str = "") -> str:
    on = f" ON CLUSTER `{cluster}`" if cluster else ""
    replicated = f"ReplicatedReplacingMergeTree('/clickhouse/tables/{{shard}}/{database}/schema_migrations', '{{replica}}', applied_at)"
    engine = replicated if cluster else "ReplacingMergeTree(applied_at)"
    return (f"CREATE TABLE IF NOT EXISTS `{database}`.`schema_migrations`{on} "
            f"(version UInt32, name String, applied_at DateTime64(3, 'UTC')) ENGINE = {engine} ORDER BY version")


def ddl_script(database: str, cluster: str = "", ttl: str = "") -> str:
    """Everything as one SQL script, for `syncd schema` and deploy/clickhouse."""
    out = [f"-- syncd schema for database `{database}`" + (f" on cluster `{cluster}`" if cluster else "")]
    first = True
    for m in migrations(database, cluster, ttl):
        out.append(f"\n-- migration {m.version}: {m.name}")
        for stmt in m.statements:
            out.append((stmt if isinstance(stmt, str) else stmt[0]) + ";")
        if first:
            out.append(migrations_table(database, cluster) + ";")
            first = False
    return "\n".join(out) + "\n"
