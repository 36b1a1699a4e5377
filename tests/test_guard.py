"""The guard before the spool, the time parsers and the per-record isolation, tested directly (no I/O)."""

from __future__ import annotations

import decimal
import json
import math

import orjson
import pytest
from pydantic import BaseModel

from syncd.errors import MalformedResponse
from syncd.events import TS_MAX_MS, TS_MIN_MS, Event, ms_to_iso
from syncd.http import Response
from syncd.sources.base import (
    DeadLetter,
    FieldError,
    Page,
    dead_letter,
    guard_page,
    loads_lenient,
    mapped,
    payload_json,
    valid,
)
from syncd.sources.times import iso_field_ms, parse_iso_ms, seconds_to_ms

SURROGATE = "\ud83d"  # the high half of 😀, what a cut emoji leaves behind


def ev(**kw: object) -> Event:
    fields: dict[str, object] = {"source": "s", "vendor": "iotopen", "kind": "log", "tenant": "10", "device": "d",
                                 "metric": "m", "ts_ms": 1_700_000_000_000, "value": 1.5, "text": None, "attrs": {}}
    return Event(**{**fields, **kw})  # type: ignore[arg-type]


def spoolable(page: Page) -> None:
    """What the spool does with a page: one orjson document (it refuses lone surrogates)."""
    orjson.dumps({"e": [e.row() for e in page.events], "d": [[d.reason, d.payload] for d in page.dead],
                  "c": page.cursor})


def test_good_events_pass_unchanged_and_the_page_is_not_modified() -> None:
    events = [ev(), ev(ts_ms=TS_MIN_MS, text="Öl"), ev(ts_ms=TS_MAX_MS, value=None, attrs={"unit": "°C"}), ev(value=3)]
    page = Page(list(events), {"from": 1}, done=True, lag_s=2.0)
    out = guard_page(page)
    assert out.events == events and out.dead == [] and out.cursor == {"from": 1} and out.done and out.lag_s == 2.0
    assert page.events == events and page.dead == []


@pytest.mark.parametrize(("change", "reason"), [
    ({"ts_ms": 1_000_000_000_000_000}, "ts: 33658-09-27T01:46:40Z is outside 1900-01-01..2299-12-31 (DateTime64(3))"),
    ({"ts_ms": TS_MAX_MS + 1}, "ts: 2300-01-01T00:00:00Z is outside 1900-01-01..2299-12-31 (DateTime64(3))"),
    ({"ts_ms": TS_MIN_MS - 1}, "ts: 1899-12-31T23:59:59.999Z is outside 1900-01-01..2299-12-31 (DateTime64(3))"),
    ({"ts_ms": True}, "ts: must be integer epoch milliseconds (got True)"),
    ({"ts_ms": 1.7e12}, "ts: must be integer epoch milliseconds (got 1700000000000.0)"),
    ({"device": "dev" + SURROGATE}, "device: contains a lone surrogate"),
    ({"tenant": SURROGATE}, "tenant: contains a lone surrogate"),
    ({"metric": "a/" + SURROGATE}, "metric: contains a lone surrogate"),
    ({"text": "cut " + SURROGATE}, "text: contains a lone surrogate"),
    ({"attrs": {"name": "x" + SURROGATE}}, "attrs.name: contains a lone surrogate"),
    ({"attrs": {"k" + SURROGATE: "v"}}, "attrs: key \"k\\ud83d\" contains a lone surrogate"),
    ({"attrs": {"n": 5}}, "attrs.n: must be a string (got int)"),
    ({"device": 17}, "device: must be a string (got int)"),
    ({"value": "12"}, "value: must be a number or null (got str)"),
])
def test_an_event_no_sink_can_hold_becomes_a_dead_letter_naming_the_field(change: dict[str, object], reason: str) -> None:
    bad = ev(**change)
    out = guard_page(Page([ev(), bad, ev(ts_ms=1_700_000_000_001)], None, done=True))
    assert [e.ts_ms for e in out.events] == [1_700_000_000_000, 1_700_000_000_001]
    assert [d.reason for d in out.dead] == [reason]
    payload = json.loads(out.dead[0].payload)  # the evidence: the whole event, readable back
    assert payload["source"] == "s" and payload["kind"] == "log"
    spoolable(out)


@pytest.mark.parametrize(("value", "raw"), [(math.nan, "NaN"), (math.inf, "Infinity"), (-math.inf, "-Infinity"),
                                            (10**400, "1" + "0" * 400)])
def test_a_reading_that_is_no_number_is_stored_null_with_its_raw_text(value: float, raw: str) -> None:
    attrs = {"unit": "W"}
    out = guard_page(Page([ev(value=value, attrs=attrs)], None, done=True))
    assert out.dead == []
    (event,) = out.events
    assert event.value is None and event.attrs == {"unit": "W", "raw_value": raw}
    assert attrs == {"unit": "W"}  # shared attrs of the other events are not touched
    spoolable(out)


def test_dead_letters_and_cursor_already_on_the_page_are_made_spoolable() -> None:
    page = Page([], {"topic" + SURROGATE: 5, "edge": ["a" + SURROGATE + "@1"]}, done=True,
                dead=[DeadLetter("topic: bad " + SURROGATE, '{"topic":"x' + SURROGATE + '"}'), DeadLetter("ok", "{}")])
    out = guard_page(page)
    spoolable(out)
    assert out.dead[0].reason == "topic: bad \\ud83d" and out.dead[1] == DeadLetter("ok", "{}")
    assert out.cursor == {"topic\\ud83d": 5, "edge": ["a\\ud83d@1"]}


def test_payload_json_never_raises_and_keeps_the_evidence() -> None:
    assert payload_json({"a": 1, "t": "Öl"}) == '{"a":1,"t":"Öl"}'
    assert payload_json({"t": "Öl " + SURROGATE}) == '{"t":"\\u00d6l \\ud83d"}'  # escaped: the spool writes UTF-8
    assert payload_json({"v": math.nan, "w": -math.inf}) == '{"v":NaN,"w":-Infinity}'  # orjson would write null
    assert json.loads(payload_json({"big": 10**30}))["big"] == 10**30
    assert payload_json({(1, 2): "tuple key"}) == "{(1, 2): 'tuple key'}"
    assert payload_json({"when": decimal.Decimal("1.5")}) == '{"when":"1.5"}'
    letter = dead_letter({"id": "x" + SURROGATE, "v": math.nan}, ValueError("bad " + SURROGATE))
    assert letter.reason == "ValueError: bad \\ud83d"
    orjson.dumps([letter.reason, letter.payload])


@pytest.mark.parametrize("bad", [True, False, math.nan, math.inf, -math.inf, "NaN", "Infinity", "1e300", 1e300,
                                 -5, -0.5, "-1", 253402300799, "abc", "", None, [1]])
def test_seconds_to_ms_refuses_what_is_no_epoch_time_quoting_it(bad: object) -> None:
    with pytest.raises(ValueError):
        seconds_to_ms(bad)


def test_seconds_to_ms_reads_what_vendors_send() -> None:
    assert seconds_to_ms(1_700_000_000) == 1_700_000_000_000
    assert seconds_to_ms(1_700_000_000.123) == 1_700_000_000_123
    assert seconds_to_ms("1700000000.5") == 1_700_000_000_500
    assert seconds_to_ms(1_700_000_000.0125) == 1_700_000_000_012  # half-even
    assert seconds_to_ms(0) == 0
    assert seconds_to_ms(10_413_791_999.999) == TS_MAX_MS
    with pytest.raises(ValueError, match="are outside 1900-01-01..2299-12-31"):
        seconds_to_ms(10_413_792_000)


def test_iso_parsers_refuse_dates_outside_datetime64_quoting_the_text() -> None:
    assert parse_iso_ms("2025-01-01T00:00:00.123Z") == 1_735_689_600_123
    assert parse_iso_ms("2025-01-01T01:00:00+01:00") == 1_735_689_600_000
    assert parse_iso_ms("1950-06-01T00:00:00Z") < 0  # before 1970 is a date DateTime64 holds
    for text in ("9999-12-31T23:59:59Z", "1899-12-31T23:59:59Z", "0001-01-01T00:00:00+01:00"):
        with pytest.raises(ValueError, match="is outside 1900-01-01"):
            iso_field_ms(text)
    for bad in ("yesterday", True, 17, None):
        with pytest.raises(ValueError):
            iso_field_ms(bad)
    assert ms_to_iso(TS_MAX_MS) == "2299-12-31T23:59:59.999Z"


class Rec(BaseModel):
    ts: int
    name: str


def test_mapped_turns_any_exception_into_a_dead_letter_and_keeps_the_rest() -> None:
    def read(raw: dict[str, object]) -> int:
        if raw.get("boom") == "overflow":
            return int(math.inf)
        if raw.get("boom") == "decimal":
            return int((decimal.Decimal("1e300") * 1000).quantize(decimal.Decimal(1)))
        if raw.get("boom") == "field":
            raise FieldError("values.v", "missing")
        return int(str(raw["ts"]))

    records = [{"ts": 1}, {"boom": "overflow"}, {"boom": "decimal"}, {"nots": 1}, {"boom": "field"}, {"ts": 2}]
    dead: list[DeadLetter] = []
    assert list(mapped(records, dead, read, lambda r: {"wrapped": r})) == [1, 2]
    assert [d.reason.split(":")[0] for d in dead] == ["OverflowError", "InvalidOperation", "KeyError", "values.v"]
    assert dead[3].reason == "values.v: missing" and json.loads(dead[0].payload) == {"wrapped": {"boom": "overflow"}}
    dead = []
    assert [r.ts for r in valid(Rec, [{"ts": 1, "name": "a"}, {"ts": "x", "name": "b"}], dead)] == [1]
    assert dead[0].reason.startswith("ts: ")


def test_pages_javascript_servers_write_are_read_and_garbage_is_still_malformed() -> None:
    body = b'{"data":[{"value":NaN,"t":Infinity,"topic":"a\\ud83d"}],"total":123456789012345678901234567890}'
    parsed = Response(200, {}, body, "http://x").json()
    item = parsed["data"][0]
    assert math.isnan(item["value"]) and item["t"] == math.inf and item["topic"] == "a" + SURROGATE
    assert parsed["total"] == 123456789012345678901234567890
    assert loads_lenient(b'{"v":NaN}')["v"] != loads_lenient(b'{"v":NaN}')["v"]
    for garbage in (b'{"data":[1,2', b"<html>502</html>", b"\xff\xfe{}"):
        with pytest.raises(MalformedResponse):
            Response(200, {}, garbage, "http://x").json()
        with pytest.raises(ValueError):
            loads_lenient(garbage)
