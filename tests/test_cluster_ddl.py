"""Cluster mode (`[clickhouse] cluster = "c1"`): the statements syncd generates, read as text and run on the engine.

Every DDL statement carries `ON CLUSTER`; MergeTree tables are Replicated (`<name>_local`) behind a Distributed
front whose sharding key keeps a row's duplicates on one shard (ReplacingMergeTree only merges within a shard);
the materialized view reads the inserts arriving in `events_local` and writes `latest_local` on the same shard
(it never goes through the Distributed tables: an insert into `events` is forwarded to `events_local`, which fires
the view where the rows land, and `latest` shares `events`' sharding key, so a series' latest row sits beside its
events).

The embedded engine runs as a one-shard cluster `c1` (a config with `remote_servers`, the `{shard}`/`{replica}`
macros and ClickHouse's in-memory test Keeper): there every statement parses with `ON CLUSTER` (`formatQuery`) and
runs without it (clickhouse-local has no distributed DDL queue), fresh and stepwise, and the tables come out the
same as the single-node ones apart from the engine. The rekeys' copies are parsed, not run: the tables are empty,
and on a cluster a copy reads and writes Distributed tables, which clickhouse-local serves by connecting to the
cluster's hosts over the native protocol (nothing listens here). That the single-node statements run on the embedded engine and
give the same tables both ways is tests/test_schema_spool.py's
`test_a_fresh_store_gets_at_once_the_tables_every_migration_in_order_builds`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import pytest

from syncd.sinks.schema import ddl_script, fresh_schema, migrations, migrations_table

CLUSTER = "c1"
ON = f" ON CLUSTER `{CLUSTER}`"
ZK = "'/clickhouse/tables/{shard}/syncd/{table}', '{replica}'"  # Keeper path and replica name of every table
TABLES = ("dead_letter", "events", "latest", "sync_status")
# Distributed front -> sharding key: every row a ReplacingMergeTree could replace lands on the shard of its twin
SHARDING = {
    "events": "cityHash64(vendor, tenant, device)",  # the sort key holds these, so duplicates meet
    "latest": "cityHash64(vendor, tenant, device)",  # as events: the view writes a series' latest where its events are
    "sync_status": "cityHash64(source)",  # one row per (source, stream)
    "dead_letter": "cityHash64(source, stream)",  # one row per distinct letter, whichever run re-read it
}
DDL = re.compile(r"^(CREATE|ALTER|DROP|EXCHANGE)\b")


def _statements(cluster: str, fresh: bool = False) -> list[str]:
    return [s if isinstance(s, str) else s[0] for m in migrations("syncd", cluster, fresh=fresh) for s in m.statements]


def _every_cluster_statement() -> list[str]:
    return [*_statements(CLUSTER), *fresh_schema("syncd", CLUSTER), migrations_table("syncd", CLUSTER)]


def test_every_ddl_statement_runs_on_the_cluster() -> None:
    statements = _every_cluster_statement()
    ddl = [s for s in statements if DDL.match(s)]
    assert len(ddl) >= 30 and all(s.count(ON) == 1 for s in ddl), [s[:90] for s in ddl if s.count(ON) != 1]
    # ON CLUSTER right after the object it names, where ClickHouse's grammar puts it
    for s in ddl:
        head = s.split(ON, 1)[0]
        assert re.fullmatch(r"(CREATE (DATABASE|TABLE|MATERIALIZED VIEW) IF NOT EXISTS|DROP (TABLE|VIEW) IF EXISTS"
                            r"|ALTER TABLE|EXCHANGE TABLES `syncd`\.`\w+` AND) `syncd`(\.`\w+`)?", head), s[:120]
    # the rest are the copies of a rekey: an INSERT runs on one node, so each goes front to front (every shard)
    copies = [s for s in statements if not DDL.match(s)]
    front_to_front = re.compile(r"INSERT INTO `syncd`\.`(events|latest)_rekeyed` SETTINGS insert_distributed_sync = 1 "
                                r"SELECT \* FROM `syncd`\.`\1`|INSERT INTO `syncd`\.`dead_letter_v5` \(.*\) SETTINGS "
                                r"insert_distributed_sync = 1 SELECT .* FROM `syncd`\.`dead_letter`")
    assert len(copies) == 3 and all(front_to_front.fullmatch(s) for s in copies), copies
    # nothing is left single-node: no plain MergeTree, no dedup window (replicated tables deduplicate anyway)
    text = "\n".join(statements)
    assert "non_replicated_deduplication_window" not in text and "concurrent_part_removal_threshold" not in text
    engines = re.findall(r"ENGINE = (\w+)\(", text)
    assert set(engines) == {"ReplicatedReplacingMergeTree", "ReplicatedMergeTree", "Distributed"}, engines
    script = ddl_script("syncd", CLUSTER)
    assert script.startswith("-- syncd schema for database `syncd` on cluster `c1`\n")
    shipped = [*_statements(CLUSTER), migrations_table("syncd", CLUSTER)]  # what `syncd schema` prints for it
    assert all(f"\n{s};\n" in script for s in shipped) and script.count(ON) == sum(s.count(ON) for s in shipped)


def test_merge_trees_are_replicated_locals_behind_distributed_fronts() -> None:
    for statements in (_statements(CLUSTER), fresh_schema("syncd", CLUSTER)):
        creates = [s for s in statements if s.startswith("CREATE TABLE")]
        for s in creates:
            name = re.match(r"CREATE TABLE IF NOT EXISTS `syncd`\.`(\w+)`", s)
            assert name is not None, s[:100]
            if " ENGINE = Distributed(" in s:
                front = name.group(1)
                key = SHARDING[re.sub(r"_rekeyed$|_v5$", "", front)]  # a copy's front shards as its table does
                assert f" AS `syncd`.`{front}_local` ENGINE = Distributed(`{CLUSTER}`, syncd, `{front}_local`, {key})" in s, s
            else:
                assert name.group(1).endswith("_local"), s[:100]
                engine = re.search(r"ENGINE = (Replicated\w*MergeTree)\((.*)\)\n", s)
                assert engine is not None and engine.group(2) in (ZK, ZK + ", ingested_at", ZK + ", ts",
                                                                  ZK + ", updated_at"), s
        # the final layout: each table once as <name>_local and once as its Distributed front, nothing else
        made = [re.match(r"CREATE TABLE IF NOT EXISTS `syncd`\.`(\w+)`", s).group(1) for s in creates]  # type: ignore[union-attr]
        assert {m for m in made if "rekeyed" not in m and "_v5" not in m} == {*TABLES, *(f"{t}_local" for t in TABLES)}
    table = migrations_table("syncd", CLUSTER)
    assert table == ("CREATE TABLE IF NOT EXISTS `syncd`.`schema_migrations` ON CLUSTER `c1` (version UInt32, name String, "
                     "applied_at DateTime64(3, 'UTC')) ENGINE = ReplicatedReplacingMergeTree("
                     "'/clickhouse/tables/{shard}/syncd/schema_migrations', '{replica}', applied_at) ORDER BY version")


def test_the_view_reads_events_local_and_writes_latest_local() -> None:
    for statements in (_statements(CLUSTER), fresh_schema("syncd", CLUSTER)):
        views = [s for s in statements if s.startswith("CREATE MATERIALIZED VIEW")]
        assert views and all(v == views[0] for v in views)
        assert views[0] == ("CREATE MATERIALIZED VIEW IF NOT EXISTS `syncd`.`latest_mv` ON CLUSTER `c1` TO `syncd`.`latest_local` AS\n"
                            "SELECT vendor, tenant, device, metric, kind, source, ts, value, text, attrs "
                            "FROM `syncd`.`events_local`")
    assert SHARDING["latest"] == SHARDING["events"]


def test_single_node_statements_name_no_cluster() -> None:
    text = "\n".join([*_statements(""), *fresh_schema("syncd"), migrations_table("syncd"), ddl_script("syncd")])
    assert "ON CLUSTER" not in text and "Replicated" not in text and "Distributed" not in text and "_local" not in text
    assert text.count("non_replicated_deduplication_window = 10000") >= 5


# -- on the engine -----------------------------------------------------------------------------------------------

CONFIG = """<clickhouse>
    <zookeeper><implementation>testkeeper</implementation></zookeeper>
    <macros><shard>01</shard><replica>r1</replica></macros>
    <remote_servers><c1><shard><replica><host>localhost</host><port>9000</port></replica></shard></c1></remote_servers>
</clickhouse>
"""

ENGINE_SCRIPT = r"""
import json, os, sys
from chdb import session
from syncd.sinks.schema import fresh_schema, migrations, migrations_table
db_path, config, cluster = sys.argv[1], sys.argv[2], sys.argv[3]
s = session.Session(f"{db_path}?config-file={config}")
on = f" ON CLUSTER `{cluster}`"
def q(sql, fmt="JSONCompact"):
    return json.loads(s.query(sql, fmt).bytes() or b'{"data": []}')["data"]
def run(stmt):
    s.query(stmt.replace(on, "").replace("`syncd`", "`" + db + "`").replace(" syncd,", f" {db},").replace("/syncd/", f"/{db}/"))
def literal(text):
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
out = {"parsed": []}
# every statement as syncd sends it, ON CLUSTER included, through the engine's parser
for m in migrations("syncd", cluster):
    for st in m.statements:
        out["parsed"].append(q(f"SELECT formatQuery({literal(st if isinstance(st, str) else st[0])})")[0][0])
for db, steps in (("fresh", fresh_schema("syncd", cluster)), ("stepwise", None), ("single", fresh_schema("syncd"))):
    if steps is None:
        run(str(migrations("syncd", cluster)[0].statements[0]))
        run(migrations_table("syncd", cluster))
        steps = [st if isinstance(st, str) else st[0] for m in migrations("syncd", cluster) for st in m.statements]
    elif db != "single":
        run(steps[0])
        run(migrations_table("syncd", cluster))
    for st in steps:
        if not st.startswith("INSERT"):  # a copy of an empty table, parsed above (see the module's docstring)
            run(st)
    out[db] = {
        "tables": q(f"SELECT name, engine, engine_full, sorting_key, partition_key, create_table_query FROM system.tables "
                    f"WHERE database = '{db}' AND name NOT LIKE '.inner%' ORDER BY name"),
        "columns": q(f"SELECT table, name, type, compression_codec FROM system.columns WHERE database = '{db}' "
                     "ORDER BY table, position"),
        "replicas": q(f"SELECT table, zookeeper_path, replica_name FROM system.replicas WHERE database = '{db}' ORDER BY table"),
    }
print(json.dumps(out), flush=True)
os._exit(0)  # clickhouse-local with a test Keeper can hang in its exit handlers; everything is printed
"""


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("cluster")
    (tmp / "config.xml").write_text(CONFIG)
    r = subprocess.run([sys.executable, "-c", ENGINE_SCRIPT, str(tmp / "ch"), str(tmp / "config.xml"), CLUSTER],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def _by_name(rows: list[list[Any]]) -> dict[str, list[Any]]:
    return {r[0]: r[1:] for r in rows}


def _columns(rows: list[list[Any]], table: str) -> list[list[Any]]:
    return [r[1:] for r in rows if r[0] == table]


def test_the_engine_parses_every_cluster_statement(engine: dict[str, Any]) -> None:
    parsed = engine["parsed"]
    ddl = [p for p in parsed if DDL.match(p)]
    copies = [s for s in _statements(CLUSTER) if s.startswith("INSERT INTO")]
    assert len(parsed) == len(_statements(CLUSTER)) and len(ddl) == len(parsed) - len(copies) and len(copies) == 3
    assert all(f"ON CLUSTER {CLUSTER}" in p for p in ddl)


def test_cluster_tables_are_the_single_node_tables_replicated_and_fronted(engine: dict[str, Any]) -> None:
    single = _by_name(engine["single"]["tables"])
    for db in ("fresh", "stepwise"):
        tables, columns = _by_name(engine[db]["tables"]), engine[db]["columns"]
        assert sorted(tables) == sorted([*TABLES, *(f"{t}_local" for t in TABLES), "latest_mv", "schema_migrations"]), db
        for name in TABLES:
            engine_name, _, sorting, partition, _ = tables[f"{name}_local"]
            s_engine, _, s_sorting, s_partition, _ = single[name]
            assert (engine_name, sorting, partition) == ("Replicated" + s_engine, s_sorting, s_partition), (db, name)
            assert _columns(columns, f"{name}_local") == _columns(engine["single"]["columns"], name), (db, name)
            assert _columns(columns, name) == _columns(columns, f"{name}_local"), (db, name)  # the front: same columns
            assert tables[name][0] == "Distributed"
            assert tables[name][1] == f"Distributed('c1', '{db}', '{name}_local', {SHARDING[name]})", (db, name)
        view = tables["latest_mv"][4]
        assert f"TO {db}.latest_local" in view and view.endswith(f"FROM {db}.events_local"), view
    fresh = _by_name(engine["fresh"]["replicas"])
    assert fresh == {f"{t}_local": [f"/clickhouse/tables/01/fresh/{t}_local", "r1"] for t in TABLES} | {
        "schema_migrations": ["/clickhouse/tables/01/fresh/schema_migrations", "r1"]}
    # an upgraded cluster gets the same tables (the Keeper paths aside: see the report on rekeyed tables)
    strip = re.compile(r"Replicated(\w+)\('[^']*', '[^']*'(, )?")

    def shape(db: str) -> dict[str, str]:
        return {name: strip.sub(r"\1(", row[1]).replace(f"'{db}'", "DB") for name, row in _by_name(engine[db]["tables"]).items()}

    assert shape("stepwise") == shape("fresh")
