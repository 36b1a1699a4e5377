"""The parts every connector shares: paginators, trackers, time parsers, columnar pages and the page guard."""

from __future__ import annotations

import math

import orjson
import pytest

from syncd.errors import MalformedResponse
from syncd.events import Event
from syncd.sources.base import DeadLetter, Page, PageBuilder, guard_page
from syncd.sources.paging import CursorPaginator, ODataPaginator, OffsetPaginator, collect
from syncd.sources.times import clickhouse_ms, epoch_ms, iso_or_epoch_ms, parse_iso_ms, seconds_to_ms
from syncd.sources.track import CHANGED, CLOSED, NEW, AlertTracker, ChangeTracker


def _json(state: dict) -> dict:
    """A state as it reads back from the spool."""
    return orjson.loads(orjson.dumps(state))


# -- paginators -------------------------------------------------------------------------------------------------------

def test_offset_paginator_ends_at_the_total_not_at_a_short_page() -> None:
    p = OffsetPaginator(limit=100)
    p.update_state(60, 250)  # short of the limit: a server cap or a cut, not the end
    assert (p.has_next_page, p.params()) == (True, {"offset": 60, "limit": 100})
    p = OffsetPaginator(**_json(p.state()))
    p.update_state(100, 250)
    p.update_state(90, 250)
    assert (p.has_next_page, p.offset) == (False, 250)


def test_offset_paginator_ends_on_an_empty_page_and_can_insist_on_one() -> None:
    p = OffsetPaginator(limit=10)
    p.update_state(0, 50)
    assert not p.has_next_page
    q = OffsetPaginator(limit=10, confirm_empty=True)
    q.update_state(10, 10)
    assert q.has_next_page  # the total says done, but only an empty page is believed
    q.update_state(0, 10)
    assert not q.has_next_page


@pytest.mark.parametrize("total", [None, "12", True, -1, 1.5])
def test_offset_paginator_refuses_a_page_without_a_numeric_total(total: object) -> None:
    with pytest.raises(MalformedResponse, match="numeric total"):
        OffsetPaginator(limit=10).update_state(3, total, "/log")


def test_cursor_paginator_follows_until_no_cursor_and_refuses_other_types() -> None:
    p = CursorPaginator()
    p.update_state("abc+/=")
    assert (p.has_next_page, p.cursor) == (True, "abc+/=")
    p.update_state("")
    assert not p.has_next_page
    with pytest.raises(MalformedResponse, match="not a string"):
        CursorPaginator().update_state(17, "/agents")
    q = CursorPaginator(json_objects=True)
    q.update_state({"pk": "x", "sk": 1})
    assert q.cursor == '{"pk":"x","sk":1}'


def test_odata_paginator_follows_links_inside_a_window_and_ends_on_a_short_window() -> None:
    p = ODataPaginator(top=4)
    assert p.params() == {"$top": "4", "$skip": "0"}
    p.update_state(2, "http://x/api/odata/Alert?$skiptoken=2")  # a server page size below $top
    assert p.params() is None and p.link
    p.update_state(2, None)  # the window held 4 = $top: never the last by its length
    assert (p.has_next_page, p.params()) == (True, {"$top": "4", "$skip": "4"})
    p.update_state(0, None)
    assert not p.has_next_page
    with pytest.raises(MalformedResponse, match="nextLink"):
        ODataPaginator(top=4).update_state(1, 5)


async def test_collect_reads_every_page() -> None:
    pages = {None: (["a", "b"], "c1"), "c1": (["c"], "c2"), "c2": ([], None)}

    async def fetch(p: CursorPaginator) -> list[str]:
        items, nxt = pages[p.cursor]
        p.update_state(nxt)
        return items

    assert await collect(CursorPaginator(), fetch) == ["a", "b", "c"]


# -- trackers ---------------------------------------------------------------------------------------------------------

def test_change_tracker_emits_only_moved_marks_and_survives_the_spool() -> None:
    t = ChangeTracker()
    assert t.moved("temp", (1, "x")) and not t.moved("temp", [1, "x"])
    t = ChangeTracker(_json(t.state()))
    assert not t.moved("temp", (1, "x"))  # a tuple mark equals its JSON list after a restart
    assert t.moved("temp", (2, "x"))
    assert t.moved("cut \ud83d", 1)  # a vendor key with a lone surrogate is kept spoolable
    orjson.dumps(t.state())
    u = ChangeTracker({"old": 1, "kept": 2})
    u.moved("kept", 2)
    assert u.state(seen_only=True) == {"kept": 2}
    u.keep(lambda key, mark: key != "old")
    assert u.state() == {"kept": 2}


def test_alert_tracker_open_change_close_and_forget() -> None:
    t = AlertTracker()
    assert t.update("a1", "hi", 1000) == NEW
    assert t.update("a1", "hi", 1000) is None
    assert t.update("a1", "HI", 1000) == CHANGED
    assert t.update("a2", "x", 500, closed=True) == NEW  # first seen already closed
    t = AlertTracker(_json(t.state()))
    assert t.oldest_open() == 1000
    assert t.update("a1", "HI", 1000, closed=True) == CLOSED
    assert t.update("a1", "HI", 1000, closed=True) is None  # read again: nothing new
    assert t.oldest_open() is None
    assert t.update("a2", "x", 500) == CHANGED  # opened again
    t.forget(900)
    assert t.state() == {"open": {"a2": ["x", 500]}, "closed": {"a1": 1000}}
    t.forget(900, open_too=True)
    assert t.state()["open"] == {}


# -- time parsers -----------------------------------------------------------------------------------------------------

def test_every_wire_format_rounds_half_even_on_the_decimal_text() -> None:
    assert seconds_to_ms(1.0005) == 1000 and seconds_to_ms(1.0015) == 1002 and seconds_to_ms("1.00150001") == 1002
    assert parse_iso_ms("2025-01-01T00:00:00.1235Z") == 1_735_689_600_124  # .NET writes 7 digits: 123.5 → 124
    assert parse_iso_ms("2025-01-01T00:00:00.1245000Z") == 1_735_689_600_124  # 124.5 → 124 (even)
    assert parse_iso_ms("2025-01-01T01:00:00.1245001+01:00") == 1_735_689_600_125
    assert clickhouse_ms("2025-01-01 00:00:00.1245") == 1_735_689_600_124
    assert clickhouse_ms("2025-01-01 00:00:00.5") == 1_735_689_600_500
    assert epoch_ms(1_735_689_600_124.5, 1e11) == 1_735_689_600_124 and epoch_ms(1_735_689_600.1245, 1e11) == 1_735_689_600_124
    assert iso_or_epoch_ms(1e11)("2025-01-01T00:00:00Z") == 1_735_689_600_000


@pytest.mark.parametrize("bad", ["", "2025-13-01 00:00:00", "0001-01-01 00:00:00.000", "2025-01-01T00:00:00", None, 5])
def test_clickhouse_time_refuses_what_is_no_datetime64(bad: object) -> None:
    with pytest.raises(ValueError):
        clickhouse_ms(bad)


@pytest.mark.parametrize("bad", [True, math.nan, math.inf, -1, 1e300, "soon"])
def test_epoch_numbers_refuse_what_is_no_date(bad: object) -> None:
    with pytest.raises(ValueError):
        iso_or_epoch_ms(1e11)(bad)


# -- columnar pages ---------------------------------------------------------------------------------------------------

class _Src:
    name, vendor = "plant-a", "iotopen"


def test_a_columnar_page_spools_the_same_rows_as_events() -> None:
    b = PageBuilder(_Src())  # type: ignore[arg-type]
    shared = {"unit": "C"}
    events = []
    for i in range(50):
        args = ("log", "10", f"dev{i % 3}", f"t/{i % 4}", 1_700_000_000_000 + i, i / 3, None, shared)
        b.add(*args)
        events.append(Event("plant-a", "iotopen", *args))
    page = b.page({"c": 1}, done=True)
    assert len(page) == 50 and page.rows() == [e.row() for e in events]
    assert page.events == events  # made when asked


def test_the_guard_checks_a_columnar_page_row_by_row() -> None:
    b = PageBuilder(_Src())  # type: ignore[arg-type]
    ok = {"unit": "C"}
    b.add("log", "10", "dev", "t", 1_700_000_000_000, 1.0, None, ok)
    b.add("log", "10", "dev", "t", 10**15, 2.0, None, ok)  # beyond 2299
    b.add("log", "10", "dev", "t", 1_700_000_000_001, math.nan, None, ok)
    b.add("log", "10", "dev\ud83d", "t", 1_700_000_000_002, 3.0, None, ok)
    b.add("log", "10", "dev", "t", 1_700_000_000_003, True, None, ok)
    page = b.page({"k": "cut \ud83d"}, done=False, dead=[DeadLetter("x", "y")])
    guarded = guard_page(page)
    assert [r[7] for r in guarded.rows()] == [1_700_000_000_000, 1_700_000_000_001]
    assert guarded.rows()[1][8] is None and guarded.rows()[1][10] == {"unit": "C", "raw_value": "NaN"}
    assert ok == {"unit": "C"} and page.columns is not None and math.isnan(page.columns.value[2])  # input untouched
    assert [d.reason.split(":")[0] for d in guarded.dead] == ["x", "ts", "device", "value"]
    assert guarded.cursor == {"k": "cut \\ud83d"} and not guarded.done


def test_a_page_of_events_still_works_as_before() -> None:
    e = Event("s", "ixon", "telemetry", "c", "a1", "tag", 1_700_000_000_000, math.inf)
    page = guard_page(Page([e], {"wm": 1}, True))
    assert page.rows()[0][8] is None and page.rows()[0][10] == {"raw_value": "Infinity"} and page.done


def test_time_key_paginator_continues_full_answers_that_moved_and_ends_the_rest() -> None:
    from syncd.sources.paging import TimeKeyPaginator

    p = TimeKeyPaginator(key=1000, limit=3)
    p.update_state(3, 1300)
    assert (p.has_next_page, p.key, p.moved) == (True, 1300, True)
    p = TimeKeyPaginator(**_json(p.state()))
    p.update_state(3, 1300)  # full, but nothing new readable: asking again would give the same answer
    assert not p.has_next_page
    q = TimeKeyPaginator(key=1000, limit=3)
    q.update_state(2, 1100)  # short: the vendor had no more
    assert not q.has_next_page and not q.moved
    r = TimeKeyPaginator(key=1000, limit=3)
    r.update_state(3, None)  # full of unreadable points
    assert not r.has_next_page


@pytest.mark.parametrize("bad", [
    ("ts", 2**70), ("ts", 1.5), ("ts", True), ("value", math.inf), ("value", -math.inf), ("value", math.nan),
    ("value", 10**400), ("value", "1"), ("value", False), ("device", "x\udc00"), ("text", "\ud83d"), ("metric", 7),
    ("attrs", {"k\ud83d": "v"}), ("attrs", {"k": 1}), ("attrs", ["k"]),
])
def test_the_column_checks_pass_a_clean_page_whole_and_send_any_flaw_row_by_row(bad: tuple[str, object]) -> None:
    def build(flaw: tuple[str, object] | None) -> Page:
        b = PageBuilder(_Src())  # type: ignore[arg-type]
        for i in range(5):
            row = {"tenant": "10", "device": "dev", "metric": "t", "ts": 1_700_000_000_000 + i, "value": i / 2,
                   "text": "ok", "attrs": {"unit": "C"}}
            if flaw is not None and i == 3:
                row[flaw[0]] = flaw[1]
            b.add("log", row["tenant"], row["device"], row["metric"], row["ts"], row["value"], row["text"], row["attrs"])
        return b.page(None, True)

    clean = build(None)
    assert guard_page(clean).columns is clean.columns  # nothing to change: the very columns go on
    flawed = guard_page(build(bad))
    kept_values = [r[8] for r in flawed.rows()]
    if bad[0] == "value" and bad[1] in (math.inf, -math.inf) or (isinstance(bad[1], float) and math.isnan(bad[1])):
        assert len(kept_values) == 5 and kept_values[3] is None and "raw_value" in flawed.rows()[3][10]
    elif bad == ("value", 10**400):
        assert len(kept_values) == 5 and flawed.rows()[3][10]["raw_value"] == str(10**400)
    else:
        assert len(kept_values) == 4 and len(flawed.dead) == 1 and flawed.dead[0].reason.startswith(bad[0])
