"""Proxus on the shared parts: an alert cursor of the old layout is still read, times parse by the shared rules,
and a page's lines keep their dead-letter, copy and count semantics through `valid_all` and `PageBuilder`."""

from __future__ import annotations

from typing import Any

from syncd.settings import ProxusSource as ProxusConfig
from syncd.sim.common import sims_in_thread
from syncd.sim.proxus import ProxusSim
from syncd.sources.base import PageBuilder
from syncd.sources.proxus import BUCKET_MS, ProxusAlert, ProxusSource, TelemetryRow, alert_cursor
from tests.test_proxus_quirks import ALERT, FakeClock, connector, drain


def _old_layout(cursor: dict[str, Any]) -> dict[str, Any]:
    """What the connector stored before the AlertTracker: {"since", "seen": {id: [Status, CreatedOn]}}."""
    return {"since": cursor["since"], "seen": {k: mark for k, (mark, _) in cursor["open"].items()}}


async def test_an_old_layout_alert_cursor_is_read() -> None:
    clock = FakeClock()
    sim = ProxusSim(seed=41, clock=clock, rows=100, alerts=20)
    with sims_in_thread([sim]):
        async with connector(sim, clock) as src:
            await src.discover()
            first, _, cursor = await drain(src, ALERT)
            old = _old_layout(cursor)
            assert len(first) == 20 and len(old["seen"]) == 20
            again, _, converted = await drain(src, ALERT, old)
            assert again == [] and converted == cursor  # nothing new, and the cursor comes back in today's layout
            changed = dict(old, seen=dict(old["seen"], **{"3": ["Unheard-of", old["seen"]["3"][1]]}))
            third, _, _ = await drain(src, ALERT, changed)  # a status stored in the old cursor that has moved since
    (before,) = [e for e in first if e.attrs["alert_id"] == "3"]
    assert [e.attrs["alert_id"] for e in third] == ["3"] and third[0].event_id == before.event_id


def test_alert_cursor_conversion() -> None:
    old = {"since": 1_700_000_000_000, "seen": {"7": ["Active", 1_700_000_100_000], "x\\ud83d": ["Resolved", 5]}}
    assert alert_cursor(old) == {"since": 1_700_000_000_000, "closed": {},
                                 "open": {"7": [["Active", 1_700_000_100_000], 1_700_000_100_000],
                                          "x\\ud83d": [["Resolved", 5], 5]}}
    new = {"since": 1, "open": {}, "closed": {}}
    assert alert_cursor(new) is new and alert_cursor(None) is None


def test_times_parse_by_the_shared_rules() -> None:
    row = TelemetryRow.model_validate({"Time": "2025-02-25 09:36:00.123", "DeviceId": 1, "Key": "k"})
    assert row.Time == 1_740_476_160_123
    created = {"Id": 1, "CreatedOn": "2025-02-25T11:36:00.1236789+02:00"}  # .NET writes 7 fraction digits
    assert ProxusAlert.model_validate(created).CreatedOn == 1_740_476_160_124  # half-even (was truncated: 123)
    created["CreatedOn"] = "2025-02-25T09:36:00.1225000Z"
    assert ProxusAlert.model_validate(created).CreatedOn == 1_740_476_160_122  # a tie goes to the even ms


def test_a_page_of_lines_keeps_dead_letters_copies_and_counts() -> None:
    cfg = ProxusConfig.model_validate({"vendor": "proxus", "name": "px", "base_url": "https://p", "username": "u",
                                       "password": "p"})
    src = ProxusSource(cfg, client=None)  # type: ignore[arg-type]

    def line(time: str, device: Any, key: str = "t") -> dict[str, Any]:
        return {"Time": time, "DeviceId": device, "DeviceName": "d", "Key": key, "DataType": "Double",
                "NumericValue": 1.5, "StringValue": ""}

    a, b = line("2025-02-25 09:36:00.000", 1), line("2025-02-25 09:37:00.000", 1)
    records = [a, line("0000-00-00 00:00:00.000", 1), dict(a), {"_line": "{\"Time\":\"\xff"}, line(a["Time"], None),
               b, dict(b, Key="u")]
    counts: dict[str, int] = {}
    builder = PageBuilder(src)
    dead = src._add_rows(builder, "px", records, counts, 0)
    events = builder.page(None, True).events
    # the copy of `a` is adjacent to it among the readable lines (unreadable ones between do not part them)
    assert [(e.device, e.metric, e.ts_ms) for e in events] == [("1", "t", 1_740_476_160_000),
                                                               ("1", "t", 1_740_476_220_000),
                                                               ("1", "u", 1_740_476_220_000)]
    assert [d.reason.split(":")[0] for d in dead] == ["line is not a JSON object", "Time", "DeviceId"]
    minute = 1_740_476_160_000 // BUCKET_MS
    assert counts == {str(minute): 5, str(minute + 1): 2}  # every line counted, unreadable ones with their neighbours
