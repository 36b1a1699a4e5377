"""Migrations are idempotent; the spool commits pages with cursors and replays a batch with the same token."""

from __future__ import annotations

import json
import re
from pathlib import Path

from syncd.spool import Spool
from tests.helpers import ch, syncd

DASHBOARD = Path(__file__).parent.parent / "deploy" / "grafana" / "syncd-overview.json"


def test_schema_prints_and_applies_idempotently(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[syncd]\ndata_dir = "{tmp_path}/data"\n')
    printed = syncd("schema", "--config", str(cfg))
    assert printed.returncode == 0 and "ReplacingMergeTree(ingested_at)" in printed.stdout
    assert "non_replicated_deduplication_window" in printed.stdout
    first = syncd("schema", "--config", str(cfg), "--apply")
    assert first.returncode == 0 and "[1, 2, 3, 4, 5]" in first.stdout, first.stderr
    again = syncd("schema", "--config", str(cfg), "--apply")
    assert again.returncode == 0 and "up to date" in again.stdout


def test_spool_page_and_cursor_commit_together_and_batches_replay(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "state.db")
    spool.register_sinks(["clickhouse"])
    spool.commit_page("s", "log/1", {"e": [[1], [2]]}, {"offset": 2})
    spool.commit_page("s", "log/1", {"e": [[3]]}, {"offset": 3})
    assert spool.get_cursor("s", "log/1") == {"offset": 3}
    batch = spool.next_batch("clickhouse", 10)
    assert batch is not None and batch.rows == 3
    spool.close()
    # a crash before ack: the same range comes back with the same token
    spool = Spool(tmp_path / "state.db")
    spool.commit_page("s", "log/1", {"e": [[4]]}, {"offset": 4})
    again = spool.next_batch("clickhouse", 10)
    assert again is not None and again.token == batch.token and again.rows == 3
    spool.ack(again)
    rest = spool.next_batch("clickhouse", 10)
    assert rest is not None and rest.rows == 1 and rest.token != batch.token
    spool.ack(rest)
    assert spool.next_batch("clickhouse", 10) is None and spool.pending_bytes == 0
    spool.close()


def test_deploy_ddl_is_what_syncd_schema_prints() -> None:
    """deploy/clickhouse/schema.sql is generated (`syncd schema > ...`); it must not drift from the migrations."""
    from syncd.sinks.schema import ddl_script

    shipped = (Path(__file__).parent.parent / "deploy" / "clickhouse" / "schema.sql").read_text()
    assert shipped == ddl_script("syncd")


def test_grafana_dashboard_queries_run_against_the_schema(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[syncd]\ndata_dir = "{tmp_path}/data"\n')
    assert syncd("schema", "--config", str(cfg), "--apply").returncode == 0
    queries = [t["rawSql"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    assert len(queries) >= 6
    # Grafana's macro, expanded the way the ClickHouse plugin does for a fixed range
    sql = [re.sub(r"\$__timeFilter\((\w+)\)", r"\1 >= now() - INTERVAL 1 DAY AND \1 <= now()", q) for q in queries]
    assert len(ch(tmp_path / "data", *sql)) == len(sql)  # every query parses and names real columns
