"""IXON on the shared parts: cursors written before them are still read, and both event sinks of `_points` agree."""

from __future__ import annotations

from typing import Any

from syncd.events import Event
from syncd.settings import IxonSource as IxonConfig
from syncd.sim.ixon import IxonSim
from syncd.sources.base import DeadLetter, LateTally, PageBuilder, Stream
from syncd.sources.ixon import DataTag, IxonSource
from tests.test_ixon_quirks import connector

Row = tuple[str, str, str, str, int, float | None, str | None, tuple[tuple[str, str], ...]]


def old_layout(cursor: dict[str, Any]) -> dict[str, Any]:
    """An alert cursor as the code before the shared parts wrote it: `after` is `moreAfter` itself (or None) and
    `open` maps an occurrence to its occurredOn."""
    after = cursor["after"]
    return {"since": cursor["since"], "after": after["cursor"] if after else None, "newest": cursor["newest"],
            "open": {pid: mark_ts[1] for pid, mark_ts in cursor["open"].items()}, "closed": dict(cursor["closed"])}


async def drain(src: IxonSource, stream: Stream, cursor: Any) -> tuple[list[Row], Any]:
    """Every page from `cursor` until done: the events in order (attrs included) and the last cursor."""
    rows: list[Row] = []
    while True:
        page = await src.fetch(stream, cursor)
        rows += [(e.kind, e.tenant, e.device, e.metric, e.ts_ms, e.value, e.text, tuple(sorted(e.attrs.items())))
                 for e in page.events]
        cursor = page.cursor
        if page.done:
            return rows, cursor


async def test_an_alert_cursor_of_the_old_layout_is_read_mid_listing_and_between_runs() -> None:
    sim = IxonSim(seed=42, agents=1, tags_per_agent=1, points_per_tag=5, alarms=5)
    async with connector(sim, page_size=2, streams=["alert"]) as src:
        (stream,) = await src.discover()
        first = await src.fetch(stream, None)
        assert not first.done and isinstance(first.cursor["after"]["cursor"], str)
        # mid-listing: the rest of the listing is the same from either layout, and so is the cursor it ends with
        rest, end = await drain(src, stream, first.cursor)
        assert rest and (rest, end) == await drain(src, stream, old_layout(first.cursor))
        assert end["after"] is None
        (open_at,) = [at for _, at in end["open"].values()]  # the last stays open: the next run reads it again
        assert end["since"] == min(open_at, max(end["floor"], end["newest"] - 3_600_000))  # and the late window
        # between runs (an open occurrence carried as {id: occurredOn}): nothing new either way, same cursor
        again = await drain(src, stream, end)
        from_old = await drain(src, stream, old_layout(end))
        assert again == ([], end)
        # the old layout had no `floor` (the stream's start): its own `since` stands in, the rest is the same
        assert from_old == ([], {**end, "floor": old_layout(end)["since"]})


async def test_the_status_cursor_keeps_its_layout() -> None:
    """ChangeTracker's state is the cursor the code before it wrote: {agent: [value, activeStatus, mqttChangedOn]}."""
    sim = IxonSim(seed=43, agents=3, tags_per_agent=1, points_per_tag=5)
    async with connector(sim, streams=["status"]) as src:
        (stream,) = await src.discover()
        page = await src.fetch(stream, None)
        assert page.cursor == {e.device: [e.value, e.text, e.ts_ms] for e in page.events}
        assert {e.device for e in page.events} == {a["publicId"] for a in sim.agent_objs}
        old = {agent: list(mark) for agent, mark in page.cursor.items()}
        again = await src.fetch(stream, old)
        assert len(again.events) == 0 and again.cursor == old


def test_points_give_the_same_events_into_a_page_builder_or_a_list() -> None:
    cfg = IxonConfig.model_validate({"vendor": "ixon", "name": "ix", "application_id": "a", "company_id": "c",
                                     "token": "t"})
    src = IxonSource(cfg, client=None)  # type: ignore[arg-type]
    tag = DataTag.model_validate({"tagId": 5, "slug": "temp", "source": {"publicId": "dev"},
                                  "variable": {"type": "float", "unit": "C"}})
    points = [{"time": "2025-04-08T00:00:01Z", "values": {"v": 1.5}}, {"time": "bad", "values": {"v": 2}},
              {"time": "2025-04-08T00:00:02.0005Z", "values": {"v": "on"}},
              {"time": "2025-04-08T00:00:03Z", "values": {"v": True}}]
    b = PageBuilder(src)
    listed: list[Event] = []
    dead_b: list[DeadLetter] = []
    dead_l: list[DeadLetter] = []
    end = 1_744_070_403_000  # the last point is at `end`: stored, but not the newest read
    for sink, dead in ((b, dead_b), (listed, dead_l)):
        newest = src._points("c", "a1", tag, points, "5", end, None, 0, None, {}, LateTally(None, 3_600_000), sink,
                             dead)
        assert newest == 1_744_070_402_000  # .0005 s rounds half-even to .000
    events: list[Event] = b.page(None, True).events
    assert events == listed and dead_b == dead_l and len(dead_b) == 1
    assert [(e.ts_ms, e.value, e.text) for e in events] == [(1_744_070_401_000, 1.5, None),
                                                            (1_744_070_402_000, None, "on"),
                                                            (1_744_070_403_000, 1.0, None)]
