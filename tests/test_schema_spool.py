"""Migrations are idempotent; the spool commits pages with cursors and replays a batch with the same token."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from syncd.spool import Spool
from tests.helpers import syncd


def test_schema_prints_and_applies_idempotently(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[syncd]\ndata_dir = "{tmp_path}/data"\n')
    printed = syncd("schema", "--config", str(cfg))
    assert printed.returncode == 0 and "ReplacingMergeTree(ingested_at)" in printed.stdout
    assert "non_replicated_deduplication_window" in printed.stdout
    first = syncd("schema", "--config", str(cfg), "--apply")
    assert first.returncode == 0 and "[1, 2, 3, 4, 5, 6, 7]" in first.stdout, first.stderr
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


UPGRADE_SCRIPT = r"""
import json, sys, time
from syncd.sinks.clickhouse import ClickHouseSink
from syncd.sinks.schema import migrations, migrations_table
sink = ClickHouseSink(f"chdb://{sys.argv[1]}", "syncd")
sink.client = client = __import__("clickhouse_connect").get_client(dsn=f"chdb://{sys.argv[1]}")
old = [m for m in migrations("syncd") if m.version <= 5]  # a store as the previous release left it
client.command(str(old[0].statements[0]))
client.command(migrations_table("syncd"))
for m in old:
    for step in m.statements:
        client.command(step if isinstance(step, str) else step[0])
    client.insert("syncd.schema_migrations", [[m.version, m.name, int(time.time() * 1000)]],
                  column_names=["version", "name", "applied_at"])
rows = [[i, src, "iotopen", "log", "10", "d", "m", 1_700_000_000_000 + i, float(i), None, {}, 1_700_000_000_000]
        for i in range(100) for src in ("a",)]
cols = ["event_id", "source", "vendor", "kind", "tenant", "device", "metric", "ts", "value", "text", "attrs", "ingested_at"]
client.insert("syncd.events", rows, column_names=cols)
applied = sink.migrate()
again = sink.migrate()
client.insert("syncd.events", [[1000, "b", "iotopen", "log", "10", "d", "m", 1_700_000_000_000, 5.0, None, {}, 1]],
              column_names=cols)  # another deployment, the same installation id, the same instant
out = [applied, again] + [client.query(q).result_rows for q in (
    "SELECT sorting_key FROM system.tables WHERE database = 'syncd' AND name IN ('events', 'latest') ORDER BY name",
    "SELECT count() FROM syncd.events FINAL",
    "SELECT source, value FROM syncd.latest FINAL ORDER BY source",
    "SELECT count() FROM system.tables WHERE database = 'syncd' AND name LIKE '%rekeyed%'")]
print(json.dumps(out, default=str))
"""


def test_upgrade_moves_events_and_latest_to_sort_keys_with_the_source(tmp_path: Path) -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", UPGRADE_SCRIPT, str(tmp_path / "ch")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    applied, again, keys, count, latest, leftovers = json.loads(r.stdout.splitlines()[-1])
    assert applied == [6, 7] and again == []
    assert keys == [["source, vendor, tenant, device, metric, kind, ts"], ["source, vendor, tenant, device, metric, kind"]]
    assert count == [[101]]  # the 100 rows kept, and source b's row beside source a's, not over it
    assert latest == [["a", 99.0], ["b", 5.0]]  # the view feeds the rekeyed latest
    assert leftovers == [[0]]


def test_drainers_get_this_process_pages_from_memory_and_the_same_from_the_file_after_a_restart(tmp_path: Path) -> None:
    import syncd.spool as spool_module

    spool = Spool(tmp_path / "state.db")
    spool.register_sinks(["a", "b"])
    rows = [[2**64 - 1 - i, "s", "iotopen", "log", "1", "d", "m", 1_700_000_000_000 + i, i / 3, None, {"u": "C"}]
            for i in range(3)]
    for n in range(4):
        spool.commit_page("s", "log/1", {"src": "s", "vendor": "iotopen", "stream": "log/1", "e": rows[: n % 3 + 1],
                                         "d": [["r", f"p{n}"]]}, {"n": n})
    fresh = spool.next_batch("a", 100)
    assert fresh is not None and fresh.pages[0]["e"][0] is rows[0]  # the very objects committed: nothing decoded
    spool.ack(fresh)
    spool.close()
    again = Spool(tmp_path / "state.db")
    from_file = again.next_batch("b", 100)
    assert from_file is not None and from_file.pages == fresh.pages and from_file.token == fresh.token.replace("-a-", "-b-")
    again.ack(from_file)
    assert again.next_batch("a", 100) is None and again.pending_bytes == 0
    # past the budget the oldest pages are read back from the file, the same pages
    budget, spool_module.FRESH_BYTES = spool_module.FRESH_BYTES, 1
    try:
        small = Spool(tmp_path / "small.db")
        small.register_sinks(["a"])
        small.commit_page("s", "log/1", {"e": rows}, None)
        batch = small.next_batch("a", 100)
        assert batch is not None and batch.pages[0]["e"] == rows and batch.pages[0]["e"][0] is not rows[0]
    finally:
        spool_module.FRESH_BYTES = budget


FRESH_SCRIPT = r"""
import json, sys, time
from syncd.sinks.clickhouse import ClickHouseSink
from syncd.sinks.schema import migrations, migrations_table
sink = ClickHouseSink(f"chdb://{sys.argv[1]}", "quick")
applied = sink.open_sync()  # a store without syncd tables: the final layout at once
client = sink.client
steps = migrations("stepwise")  # every migration in order, as an upgrade from the first release does
client.command(str(steps[0].statements[0]))
client.command(migrations_table("stepwise"))
for m in steps:
    for step in m.statements:
        client.command(step if isinstance(step, str) else step[0])
def tables(db):
    return [[name, engine, key, q.replace(f"`{db}`", "DB").replace(f"{db}.", "DB.")] for name, engine, key, q in client.query(
        "SELECT name, engine_full, sorting_key, create_table_query FROM system.tables WHERE database = {db:String} "
        "AND name != 'schema_migrations' AND name NOT LIKE '.inner%' ORDER BY name", parameters={"db": db}).result_rows]
versions = [r[0] for r in client.query("SELECT version FROM quick.schema_migrations FINAL ORDER BY version").result_rows]
print(json.dumps([applied, versions, sink.migrate(), tables("quick"), tables("stepwise")]))
"""


def test_a_fresh_store_gets_at_once_the_tables_every_migration_in_order_builds(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", FRESH_SCRIPT, str(tmp_path / "ch")], capture_output=True, text=True,
                         check=True)
    applied, versions, again, quick, stepwise = json.loads(out.stdout.strip().splitlines()[-1])
    assert applied == versions == list(range(1, len(versions) + 1)) and again == []
    assert [t[0] for t in quick] == ["dead_letter", "events", "latest", "latest_mv", "sync_status"]
    assert quick == stepwise


def test_column_pages_and_row_pages_read_alike_split_alike_and_survive_a_restart(tmp_path: Path) -> None:
    from syncd.events import Columns
    from syncd.spool import page_columns, page_len, page_rows

    cols = Columns("s", "iotopen")
    for i in range(5):
        cols.append("log", "1", f"d{i % 2}", "m", 1_700_000_000_000 + i, i / 4, None, {"u": "C"})
    rows = cols.rows()  # what a spool written before columns holds
    spool = Spool(tmp_path / "state.db")
    spool.register_sinks(["a", "b"])
    spool.commit_page("s", "log/1", {"src": "s", "vendor": "iotopen", "stream": "log/1", "c": cols.spooled()}, {"n": 1})
    spool.commit_page("s", "log/1", {"src": "s", "vendor": "iotopen", "stream": "log/1", "e": rows[:2]}, {"n": 2})
    spool.commit_page("s", "log/1", {"src": "s", "vendor": "iotopen", "stream": "log/1", "c": []}, {"n": 3})  # nothing
    fresh = spool.next_batch("a", 100)
    assert fresh is not None and fresh.rows == 7 and [page_len(p) for p in fresh.pages] == [5, 2]
    assert [r for p in fresh.pages for r in page_rows(p)] == rows + rows[:2]
    assert [c for c in page_columns(fresh.pages[0])] == [list(c) for c in zip(*rows, strict=True)]
    # a part across both kinds of page holds exactly the rows of its range, with its own token
    part = fresh.part(3, 6)
    assert [r for p in part.pages for r in page_rows(p)] == rows[3:5] + rows[:1] and part.rows == 3
    assert part.token.endswith("/3-6")
    assert spool.ack(fresh, 100, 0.0) is None  # nothing left to write
    spool.close()
    again = Spool(tmp_path / "state.db")  # after a restart the file is read: the same pages
    from_file = again.next_batch("b", 100)
    assert from_file is not None and [r for p in from_file.pages for r in page_rows(p)] == rows + rows[:2]


def test_an_ack_brings_the_next_batch_only_when_one_is_due(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "state.db")
    spool.register_sinks(["a"])
    page = {"src": "s", "vendor": "v", "stream": "t", "e": [[1, "s", "v", "log", "1", "d", "m", 1, None, None, {}]]}
    for n in range(3):
        spool.commit_page("s", "t", dict(page), {"n": n})
    first = spool.next_batch("a", 1)
    assert first is not None and first.rows == 1
    second = spool.ack(first, 1, 3600.0)  # one row waiting: a full batch is due
    assert second is not None and second.first == first.last + 1 and second.rows == 1
    assert spool.next_batch("a", 1) == second  # its range is recorded: a crash now re-sends the same batch
    assert spool.ack(second, 5, 3600.0) is None  # one row waiting, five wanted, not old enough: not due yet
    third = spool.next_batch("a", 5)
    assert third is not None and third.rows == 1


def _counting_groups(tmp_path: Path) -> tuple[Spool, list[int]]:
    """A spool with one sink, and the size of every group it commits, in order."""
    spool = Spool(tmp_path / "state.db")
    spool.register_sinks(["a"])
    groups: list[int] = []
    commit_group = spool._commit_group

    def counted(items: list[Any]) -> list[Any]:
        groups.append(len(items))
        return commit_group(items)

    spool._commit_group = counted  # type: ignore[method-assign]
    return spool, groups


async def test_pages_committed_together_each_return_when_durable_and_a_bad_one_fails_alone(tmp_path: Path) -> None:
    """Group commit: 60 streams commit at once; they share transactions (fewer groups than pages), every page and
    cursor is in the file when its caller returns, and the one page that cannot be stored fails its caller only."""
    import asyncio

    spool, groups = _counting_groups(tmp_path)

    async def one(n: int) -> int | None:
        rows = [[n, "s", "v", "log", "1", "d", "m", 1_700_000_000_000 + n, None, None, {}]]
        if n == 13:
            rows[0][10] = {1j}  # no JSON for it: this page cannot be stored
        page_id = await spool.commit("s", f"log/{n}", {"src": "s", "vendor": "v", "stream": f"log/{n}", "e": rows},
                                     {"n": n})
        assert spool.get_cursor("s", f"log/{n}") == {"n": n}  # durable (and visible) before the caller goes on
        return page_id

    results = await asyncio.gather(*(one(n) for n in range(60)), return_exceptions=True)
    assert isinstance(results[13], TypeError)
    ids = [r for i, r in enumerate(results) if i != 13]
    assert len(set(ids)) == 59 and all(isinstance(i, int) for i in ids)
    assert sum(groups) == 60 and len(groups) < 60
    assert spool.get_cursor("s", "log/13") is None  # its cursor did not move without its page
    batch = spool.next_batch("a", 1000)
    assert batch is not None and batch.rows == 59
    assert spool.due("a", 59, 3600.0) and not spool.due("a", 60, 3600.0)
    spool.ack(batch)
    assert not spool.due("a", 1, 0.0)
    spool.close()
    with pytest.raises(RuntimeError):  # a closed spool refuses at once, it does not leave the caller waiting
        await asyncio.wait_for(spool.commit("s", "log/x", {"src": "s", "vendor": "v", "stream": "log/x"}, {"n": 1}), 5)


async def test_a_stream_of_commits_never_starves_other_spool_work(tmp_path: Path) -> None:
    """Pages keep coming (a new one every turn of the loop, while the spool thread commits the last group); a
    drainer's call to the spool thread runs between two groups, not after the last commit."""
    import asyncio

    spool = Spool(tmp_path / "state.db")
    spool.register_sinks(["a"])
    done: list[int | None] = []
    first = asyncio.Event()

    async def one(k: int) -> None:
        rows = [[k, "s", "v", "log", "1", "d", "m", 1_700_000_000_000 + k, None, None, {}]]
        done.append(await spool.commit("s", f"log/{k}", {"src": "s", "vendor": "v", "stream": f"log/{k}", "e": rows},
                                       {"k": k}))
        first.set()

    async def produce() -> list[asyncio.Task[None]]:
        tasks = []
        for k in range(1500):
            tasks.append(asyncio.create_task(one(k)))
            await asyncio.sleep(0)
        return tasks

    producer = asyncio.create_task(produce())
    await asyncio.wait_for(first.wait(), 30)  # the first group has committed; the next ones are coming
    rows, _ = await asyncio.wait_for(spool.run(spool.backlog, "a"), 30)
    seen = len(done)
    await asyncio.gather(*await producer)
    assert seen < 1500 and len(done) == 1500  # answered while pages were still coming
    assert rows >= seen  # and exact at its time: every page its caller had heard of, at least
    spool.close()


async def test_a_group_waits_for_pages_still_being_fetched_and_for_nothing_else(tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The runs of a phase tick answer over some milliseconds: while `expecting` says pages are on their way, the
    first page waits for them and they commit in one transaction; the page that leaves nothing expected sends the
    group at once; with nothing expected a page commits at once; a page expected that does not come holds the group
    one COMMIT_GAP_S; and pages that never stop coming hold it COMMIT_LINGER_S at most."""
    import asyncio

    import syncd.spool

    monkeypatch.setattr(syncd.spool, "COMMIT_LINGER_S", 3600.0)  # below, only `expecting` can end a wait
    monkeypatch.setattr(syncd.spool, "COMMIT_GAP_S", 3600.0)
    spool, groups = _counting_groups(tmp_path)
    fetching = 5
    spool.expecting = lambda: fetching > 0

    def commit(n: int) -> asyncio.Task[int | None]:
        rows = [[n, "s", "v", "log", "1", "d", "m", 1_700_000_000_000 + n, None, None, {}]]
        return asyncio.create_task(spool.commit("s", f"log/{n}", {"src": "s", "vendor": "v", "stream": f"log/{n}",
                                                                  "e": rows}, {"n": n}))

    tasks = []
    for n in range(4):  # four runs have their page, one is still fetching
        fetching -= 1
        tasks.append(commit(n))
        for _ in range(20):
            await asyncio.sleep(0)  # turns of the loop, not a wait for the spool thread: nothing was handed to it
    assert groups == [] and not any(t.done() for t in tasks)
    fetching -= 1
    tasks.append(commit(4))  # the last page expected
    ids = await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert groups == [5] and len(set(ids)) == 5
    assert all(spool.get_cursor("s", f"log/{n}") == {"n": n} for n in range(5))
    await asyncio.wait_for(commit(5), 30)  # nothing expected: at once, alone
    assert groups == [5, 1]
    monkeypatch.setattr(syncd.spool, "COMMIT_GAP_S", 0.01)
    fetching = 1  # a fetch that never ends (its run hangs on the vendor): the page waits one gap, no longer
    await asyncio.wait_for(commit(6), 30)
    assert groups == [5, 1, 1] and spool.get_cursor("s", "log/6") == {"n": 6}
    monkeypatch.setattr(syncd.spool, "COMMIT_LINGER_S", 0.05)
    committed: list[int | None] = []
    first = asyncio.Event()

    async def one(n: int) -> None:
        committed.append(await commit(n))
        first.set()

    async def produce() -> list[asyncio.Task[None]]:  # a page every turn of the loop, and always one more expected
        made: list[asyncio.Task[None]] = []
        while not first.is_set() and len(made) < 200_000:
            made.append(asyncio.create_task(one(7 + len(made))))
            await asyncio.sleep(0)
        return made

    made = await asyncio.wait_for(produce(), 60)
    assert first.is_set() and len(made) < 200_000  # a group committed while pages still came
    await asyncio.wait_for(asyncio.gather(*made), 60)
    assert len(committed) == len(made) and sum(groups) == 7 + len(made)
    spool.close()
