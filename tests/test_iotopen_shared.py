"""IoT Open on the shared parts, in process against the simulator (one clock for both): the v3 log pages through
an OffsetPaginator kept in the log cursor (a cursor stored with a bare `offset` before it is read on), dead letters
count in the offset, and the status cursor (a ChangeTracker) keeps the layout earlier versions stored."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from pydantic import TypeAdapter

from syncd.http import TokenBucket, VendorClient
from syncd.settings import SourceSettings
from syncd.sim.common import start_sims
from syncd.sim.iotopen import POISONS, IotOpenSim
from syncd.sources.base import Page, Stream, guard_page
from syncd.sources.iotopen import IotOpenSource
from tests.helpers import truth_keys

LOG, STATUS = Stream("log/10", "log", "10"), Stream("status/10", "status", "10")
Key = tuple[str, str, str, str, int]


class Clock:
    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def served() -> AsyncIterator[tuple[IotOpenSim, aiohttp.ClientSession]]:
    sim = IotOpenSim(seed=81, clock=Clock(), installations=1, topics_per_installation=4, log_points=900,
                     poison=list(POISONS))
    runners = await start_sims([sim])
    try:
        async with aiohttp.ClientSession() as session:
            yield sim, session
    finally:
        for r in runners:
            await r.cleanup()


def source(sim: IotOpenSim, session: aiohttp.ClientSession) -> IotOpenSource:
    """A fresh source (as after a restart) on the simulator's clock, reading 100 log rows a page."""
    config = TypeAdapter(SourceSettings).validate_python({"name": "io", **sim.source_config(), "page_size": 100})
    client = VendorClient(session, TokenBucket(1000, 1000), timeout=10, map_error=IotOpenSource.map_error)
    return IotOpenSource(config, client, clock=sim.clock)


async def fetch(src: IotOpenSource, stream: Stream, cursor: Any) -> Page:
    """One page as the engine commits it (through the guard)."""
    return guard_page(await src.fetch(stream, cursor))


def keys(page: Page) -> list[Key]:
    return [(e.kind, e.tenant, e.device, e.metric, e.ts_ms) for e in page.events]


def seen(page: Page) -> tuple[list[Key], list[Any], Any, bool]:
    return keys(page), page.dead, page.cursor, page.done


def bare_offset(cursor: dict[str, Any]) -> dict[str, Any]:
    """`cursor` in the layout stored before the paginator: the open window's offset as a bare `offset` key."""
    old = {k: v for k, v in cursor.items() if k != "pager"}
    return old | {"offset": cursor["pager"]["offset"] if cursor["pager"] else 0}


def log_offsets(sim: IotOpenSim) -> list[int]:
    return [int(dict(r.query)["offset"]) for r in sim.requests if r.path == "/api/v3beta/log/10"]


async def test_a_log_cursor_with_a_bare_offset_reads_on_from_it(
        served: tuple[IotOpenSim, aiohttp.ClientSession]) -> None:
    sim, session = served
    first = await fetch(source(sim, session), LOG, None)
    total = first.cursor["pager"]["total"]
    assert not first.done and "offset" not in first.cursor and total > 300
    assert first.cursor["pager"] == {"limit": 100, "offset": 100, "total": total, "done": False,
                                     "confirm_empty": False}
    old = bare_offset(first.cursor)
    assert "pager" not in old and old["offset"] == 100
    # the old layout reads exactly as the new one: the same page and cursor
    assert seen(await fetch(source(sim, session), LOG, old)) == seen(await fetch(source(sim, session), LOG,
                                                                                  first.cursor))
    sim.requests.clear()
    src, got, cursor, dead = source(sim, session), keys(first), old, len(first.dead)
    while True:
        page = await fetch(src, LOG, cursor)
        got, cursor, dead = got + keys(page), page.cursor, dead + len(page.dead)
        if page.done:
            break
    assert log_offsets(sim) == list(range(100, total, 100))  # on from 100, never from 0 again
    assert len(got) + dead == total  # each row of the window once, dead letters counted in the offset too
    assert dead >= len([p for p in sim.poisoned if p.key[0] == "log" and p.field is not None]) > 0
    assert cursor["pager"] is None and cursor["to"] is None
    # a closed window stored with `offset: 0` reads as the new layout too; the next window reads the rest
    sim.clock.now += 60  # type: ignore[attr-defined]
    closed = bare_offset(cursor)
    assert seen(await fetch(source(sim, session), LOG, closed)) == seen(await fetch(source(sim, session), LOG, cursor))
    page = await fetch(src, LOG, closed)
    assert page.done
    assert sorted(got + keys(page)) == sorted(k for k in truth_keys(sim) if k[0] == "log")


async def test_the_status_cursor_is_each_topics_last_timestamp_as_before(
        served: tuple[IotOpenSim, aiohttp.ClientSession]) -> None:
    sim, session = served
    page = await fetch(source(sim, session), STATUS, None)
    assert sorted(keys(page)) == sorted(k for k in truth_keys(sim) if k[0] == "status")
    latest = {k[3]: k[4] for k in keys(page)}
    assert latest.items() <= page.cursor.items() and all(type(ts) is int for ts in page.cursor.values())
    # a cursor stored by an earlier version (topic → last timestamp): only a topic whose timestamp moved is emitted
    moved = sorted(latest)[0]
    again = await fetch(source(sim, session), STATUS, page.cursor | {moved: latest[moved] - 1})
    assert [k[3] for k in keys(again)] == [moved] and again.cursor == page.cursor
    assert keys(await fetch(source(sim, session), STATUS, page.cursor)) == []


@pytest.mark.parametrize("bad", [False, True], ids=["clean", "with_poison"])
async def test_log_pages_read_a_column_at_a_time_are_what_entry_by_entry_reading_gives(
        bad: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path (`_log_columns`) against the entry-by-entry one, over the same windows: every page's rows
    (ids, values, texts, attrs), dead letters and cursor are equal, late values and the edge second included."""
    import syncd.sources.iotopen as iotopen

    sim = IotOpenSim(seed=83, clock=Clock(), installations=1, topics_per_installation=4, log_points=900,
                     poison=list(POISONS) if bad else [], late_by=600, late_points=4)
    runners = await start_sims([sim])
    read_fast = iotopen._log_columns
    taken: list[bool] = []

    def counted(data: list[Any]) -> Any:
        columns = read_fast(data)
        taken.append(columns is not None)
        return columns

    async def windows(session: aiohttp.ClientSession) -> list[tuple[bytes, list[Any], Any]]:
        """Three windows, 10 minutes apart (the late values become visible), read to the end."""
        src, cursor, out = source(sim, session), None, []
        start = sim.clock.now
        for step in range(3):
            sim.clock.now = start + 600 * step
            while True:
                page = await fetch(src, LOG, cursor)
                rows = page.columns.rows() if page.columns is not None else [e.row() for e in page.events]
                out.append((orjson.dumps(rows), page.dead, page.cursor))  # as spooled: 255.0 is not 255
                cursor = page.cursor
                if page.done:
                    break
        sim.clock.now = start
        return out

    try:
        async with aiohttp.ClientSession() as session:
            monkeypatch.setattr(iotopen, "_log_columns", counted)
            fast = await windows(session)
            fast_taken = list(taken)
            monkeypatch.setattr(iotopen, "_log_columns", lambda data: None)
            slow = await windows(session)
    finally:
        for r in runners:
            await r.cleanup()
    assert fast == slow
    stored = {(r[6], r[7]) for rows, _, _ in fast for r in orjson.loads(rows)}
    truth = {(t.metric, t.ts_ms) for t in sim.ground_truth() if t.kind == "log"}
    assert stored == truth
    if bad:  # the pages holding a poisoned value go entry by entry, the others a column at a time
        assert sum(1 for rows, dead, _ in fast if dead) == fast_taken.count(False) > 0 and True in fast_taken
    else:
        assert all(fast_taken) and len(fast_taken) == len(fast)
