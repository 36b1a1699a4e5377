"""Property tests: random vendor pages through every connector's normalizer (no HTTP).

Hypothesis builds records that are mostly well-formed (the vendor's field names as each connector's pydantic
models declare them) but with fields randomly missing, of the wrong type (str/int/float/bool/None/list/dict),
NaN/±Infinity, huge strings, arbitrary unicode with lone surrogates and control characters, and whole pages with
duplicated and reordered records. Per connector, the narrowest entry point that maps parsed records to events and
dead letters is called, and the properties are:

- it never raises;
- every input record is accounted for: the exact rule is stated per connector (1:1 for single-value records,
  1:n for records carrying several values, and the connector's documented de-duplication where it has one);
- after `guard_page`, nothing is lost either (events + dead letters keep their total), every event has an int
  `ts_ms` within TS_MIN_MS..TS_MAX_MS, UTF-8-encodable strings, `value` None or a finite float, and every dead
  letter's reason and payload are str that both orjson and json encode.
"""

from __future__ import annotations

import asyncio
import json
import math
import string
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from syncd.events import TS_MAX_MS, TS_MIN_MS, Event
from syncd.settings import IotOpenSource as IotOpenConfig
from syncd.settings import IotoSource as IotoConfig
from syncd.settings import IxonSource as IxonConfig
from syncd.settings import NavixySource as NavixyConfig
from syncd.settings import ProxusSource as ProxusConfig
from syncd.sources import ioto, ixon
from syncd.sources.base import DeadLetter, LateTally, Page, Stream, guard_page, mapped, valid
from syncd.sources.ioto import IotoSource
from syncd.sources.iotopen import FunctionX, Installation, IotOpenSource
from syncd.sources.ixon import DataTag, IxonSource
from syncd.sources.navixy import NGP_HEADER, NavixySource
from syncd.sources.proxus import ProxusSource

EXAMPLES = 200
PROPS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])

# -- value strategies ------------------------------------------------------------------------------------------

SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
CONTROL = st.characters(min_codepoint=0, max_codepoint=0x1F)
WEIRD_CHAR = st.one_of(st.characters(), SURROGATES, CONTROL, st.sampled_from(["\u202e", "\ufeff", "\U0001f600", "é"]))
weird_text = st.one_of(
    st.text(WEIRD_CHAR, max_size=12),
    st.sampled_from(["", "\ud83d", "a\udc00b", "\x00\x1f\x7f", "NaN", "Infinity", "-1", "1e400", "null"]),
)
huge_text = st.integers(1_000, 100_000).map(lambda n: ("\u00e9x\ud83d" * (n // 3 + 1))[:n])
plain = st.text(string.ascii_letters + string.digits + "/._-", min_size=1, max_size=10)
text = st.one_of(plain, plain, plain, weird_text)  # mostly clean, a quarter weird
bad_float = st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308, -1e308, 5e-324])
scalar_junk = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from([10**400, -(10**30)]),
                        st.floats(allow_nan=True, allow_infinity=True), bad_float, weird_text, huge_text)
junk = st.one_of(scalar_junk, st.lists(scalar_junk, max_size=3), st.dictionaries(weird_text, scalar_junk, max_size=3))
number = st.one_of(st.integers(-(10**6), 10**6), st.floats(allow_nan=False, allow_infinity=False, width=64))

# times well inside DateTime64(3): 1971..2200
dt = st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1))
iso_z = dt.map(lambda d: d.isoformat(timespec="milliseconds") + "Z")
iso_any = st.one_of(iso_z, dt.map(lambda d: d.isoformat()),
                    st.builds(lambda d, h: d.replace(tzinfo=timezone(timedelta(hours=h))).isoformat(), dt, st.integers(-12, 12)))
epoch_s = st.one_of(st.integers(0, 7_000_000_000), st.floats(0, 7_000_000_000, allow_nan=False).map(lambda f: round(f, 3)),
                    st.integers(0, 7_000_000_000).map(str))
ch_time = dt.map(lambda d: d.strftime("%Y-%m-%d %H:%M:%S.") + f"{d.microsecond // 1000:03d}")
CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _ulid(ms: int, rest: str) -> str:
    return "".join(CROCKFORD[(ms >> (5 * (9 - i))) & 31] for i in range(10)) + rest


ulid = st.builds(_ulid, st.integers(0, 7_000_000_000_000), st.text(CROCKFORD, min_size=16, max_size=16))


@st.composite
def record(draw: st.DrawFn, fields: dict[str, st.SearchStrategy[Any]], extra: bool = True) -> Any:
    """Mostly well-formed: every field good, then 0-3 of them (0 half the time) missing or junk; sometimes extra keys."""
    out: dict[str, Any] = {name: draw(good) for name, good in fields.items()}
    for _ in range(draw(st.sampled_from([0, 0, 0, 0, 1, 1, 2, 3]))):
        name = draw(st.sampled_from(sorted(fields)))
        if draw(st.booleans()):
            out.pop(name, None)
        else:
            out[name] = draw(junk)
    if extra and draw(st.integers(0, 5)) == 0:
        out[draw(weird_text)] = draw(junk)
    return out


@st.composite
def page(draw: st.DrawFn, rec: st.SearchStrategy[Any], non_dict: bool = True, max_size: int = 6) -> list[Any]:
    """A page of records with some duplicated, the whole reordered, and (optionally) a few that are no object."""
    n = draw(st.integers(0, max_size))
    base = [draw(junk) if non_dict and draw(st.integers(0, 7)) == 7 else draw(rec) for _ in range(n)]
    dups = [base[i] for i in draw(st.lists(st.integers(0, len(base) - 1), max_size=3))] if base else []
    return draw(st.permutations(base + dups))


# -- the properties after the guard ----------------------------------------------------------------------------

def _utf8(s: Any) -> bool:
    if type(s) is not str:
        return False
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_guarded(events: list[Event], dead: list[DeadLetter]) -> Page:
    """guard_page keeps the total, and everything it lets through is storable."""
    guarded = guard_page(Page(list(events), None, True, list(dead)))
    assert len(guarded.events) + len(guarded.dead) == len(events) + len(dead)
    for e in guarded.events:
        assert type(e.ts_ms) is int and TS_MIN_MS <= e.ts_ms <= TS_MAX_MS, e
        for s in (e.source, e.vendor, e.kind, e.tenant, e.device, e.metric):
            assert _utf8(s), e
        assert e.text is None or _utf8(e.text), e
        assert isinstance(e.attrs, dict) and all(_utf8(k) and _utf8(v) for k, v in e.attrs.items()), e
        assert e.value is None or (type(e.value) is float and math.isfinite(e.value)), e
        orjson.dumps(e.row())  # the spool's encoder takes the whole row
    for d in guarded.dead:
        assert type(d.payload) is str and type(d.reason) is str
        orjson.dumps([d.reason, d.payload])
        json.dumps([d.reason, d.payload])
        assert _utf8(d.payload) and _utf8(d.reason)
    return guarded


# -- IoT Open: `IotOpenSource._read(kind, tenant, raw)` via `mapped`, as `_fetch_status` / `_fetch_log` call it ---

LYNX = {"installation_id": st.integers(1, 10**6), "client_id": st.integers(1, 10**6), "timestamp": epoch_s,
        "topic": text, "value": st.one_of(st.none(), number), "msg": st.one_of(st.none(), text)}


def _iotopen() -> IotOpenSource:
    src = IotOpenSource(IotOpenConfig(name="io", vendor="iotopen", api_key=SecretStr("k" * 8)), client=None)  # type: ignore[arg-type]
    src.installations = {"7": Installation(id=7, name="i", client_id=42, organization_id=3)}
    src.functions = {"7": {"obj/temp": FunctionX(id=1, type="temp", meta={"topic_read": "obj/temp", "unit": "C",
                                                                          "name": "\ud83d"})}}
    return src


@PROPS
@given(records=page(record(LYNX | {"topic": st.one_of(text, st.just("obj/temp"))})),
       kind=st.sampled_from(["status", "log"]))
def test_iotopen_every_record_is_one_event_or_one_dead_letter(records: list[Any], kind: str) -> None:
    src = _iotopen()
    for raw in records:  # 1:1: one value per entry
        dead: list[DeadLetter] = []
        out = list(mapped([raw], dead, lambda r: src._read(kind, "7", r)))
        assert (len(out), len(dead)) in ((1, 0), (0, 1)), raw
    dead = []
    events = [event for _, event in mapped(records, dead, lambda r: src._read(kind, "7", r))]
    assert len(events) + len(dead) == len(records)
    check_guarded(events, dead)


# -- Proxus: `ProxusSource._normalize` (telemetry lines) and `_alert` via `mapped` (OData alerts) ------------------

ROW = {"Time": ch_time, "DeviceId": st.integers(0, 10**9), "DeviceName": text, "Key": text,
       "DataType": st.sampled_from(["Float", "Int32", "Boolean", "String", 9, 4]),
       "NumericValue": st.one_of(st.none(), number, bad_float), "StringValue": text}
ALERT = {"Id": st.one_of(st.integers(0, 10**9), text), "DeviceId": st.one_of(st.integers(0, 10**6), text),
         "RuleId": st.one_of(st.integers(0, 10**6), text), "Severity": st.one_of(text, st.integers(0, 5)),
         "Message": text, "Status": st.sampled_from(["Active", "Resolved", "Acknowledged"]), "CreatedOn": iso_any}


def _proxus() -> ProxusSource:
    cfg = ProxusConfig(vendor="proxus", name="px", base_url="https://p", username="u", password=SecretStr("p"))
    return ProxusSource(cfg, client=None)  # type: ignore[arg-type]


def _recase(rec: Any, upper: bool) -> Any:
    """OData property casing is undocumented: the connector matches names case-insensitively."""
    return {(k.upper() if upper else k.lower()): v for k, v in rec.items()} if isinstance(rec, dict) else rec


@PROPS
@given(records=page(st.one_of(record(ROW), st.builds(lambda s: {"_line": s}, st.one_of(text, huge_text))),
                    non_dict=False, max_size=8))
def test_proxus_telemetry_lines_are_events_dead_letters_or_adjacent_copies(records: list[dict[str, Any]]) -> None:
    """1:1, except a line whose (Time, DeviceId, Key) equals the previous readable line's (a retried insert's copy,
    dropped by design). Oracle: the per-line mapping `_telemetry`, each line alone."""
    src = _proxus()
    expected_events = expected_dead = 0
    previous = None
    for raw in records:
        if "_line" in raw:
            expected_dead += 1
            continue
        try:
            ident, _ = src._telemetry("px", raw)
        except Exception:
            expected_dead += 1
            continue
        if ident != previous:
            expected_events += 1
        previous = ident
    counts: dict[str, int] = {}
    events, dead = src._normalize("px", records, counts, 0)
    assert (len(events), len(dead)) == (expected_events, expected_dead)
    check_guarded(events, dead)


@PROPS
@given(records=page(record(ALERT)), upper=st.booleans())
def test_proxus_every_alert_is_one_event_or_one_dead_letter(records: list[Any], upper: bool) -> None:
    src = _proxus()
    src.devices = {"1": "pump \ud83d"}
    records = [_recase(r, upper) for r in records]
    dead: list[DeadLetter] = []
    events = [event for _, event in mapped(records, dead, lambda r: src._alert("px", r))]
    assert len(events) + len(dead) == len(records)  # 1:1
    check_guarded(events, dead)


# -- Ioto: the per-item mappings `fetch` passes to `mapped` (Store, Log, Alert) and the metric series/points -----

ioto_date = st.one_of(iso_any, st.integers(0, 7_000_000_000), st.floats(0, 7_000_000_000, allow_nan=False),
                      st.integers(10**11, 7 * 10**12))  # ISO text, epoch seconds (number), epoch ms
STORE = {"accountId": text, "deviceId": text, "cloudId": text, "key": text, "type": st.sampled_from(["number", "string"]),
         "value": st.one_of(number, text, st.none()), "updated": ioto_date}
LOG = {"id": st.one_of(ulid, text), "accountId": text, "deviceId": text, "message": text,
       "context": st.dictionaries(text, scalar_junk, max_size=3), "updated": ioto_date}
IOTO_ALERT = {"id": text, "accountId": text, "cloudId": text, "name": text, "seq": text, "message": text, "subject": text,
              "severity": st.sampled_from(["info", "warning", "critical"]), "count": st.integers(0, 100),
              "context": st.fixed_dictionaries({"deviceId": text}), "resolved": st.booleans(), "timestamp": ioto_date}
POINT = {"value": st.one_of(st.none(), number, bad_float), "timestamp": ioto_date, "count": st.integers(0, 1000)}
SERIES = {"metric": text, "namespace": st.just(ioto.METRIC_NAMESPACE), "dimensions": st.fixed_dictionaries({"Device": text}),
          "period": st.just(300), "samples": st.integers(0, 100),
          "points": st.lists(st.one_of(record(POINT), junk), max_size=4)}


def _ioto() -> IotoSource:
    cfg = IotoConfig(vendor="ioto", name="io", base_url="https://i", token=SecretStr("t"))
    return IotoSource(cfg, client=None)  # type: ignore[arg-type]


def _store(src: IotoSource) -> Any:
    stream = Stream("status/d1", "status", "a1", {"device": "d1"})
    return lambda raw: src._store_event(stream, ioto.StoreItem.model_validate(raw))  # as `_fetch_latest`'s `read`


@PROPS
@given(records=page(st.one_of(record(STORE), record(LOG), record(IOTO_ALERT))),
       which=st.sampled_from(["store", "log", "alert"]))
def test_ioto_every_item_is_one_event_or_one_dead_letter(records: list[Any], which: str) -> None:
    src = _ioto()
    fn = {"store": _store(src), "log": src._log_event, "alert": lambda r: src._alert(r)[2]}[which]
    dead: list[DeadLetter] = []
    events = list(mapped(records, dead, fn))
    assert len(events) + len(dead) == len(records)  # 1:1
    check_guarded(events, dead)


@PROPS
@given(records=page(record(SERIES)))
def test_ioto_metric_series_is_one_dead_letter_or_one_event_per_point(records: list[Any]) -> None:
    """1:n as `_fetch_metric` maps it: a series that does not validate is one dead letter; one that does gives one
    event per valid point and one dead letter per invalid point."""
    src = _ioto()
    events: list[Event] = []
    dead: list[DeadLetter] = []
    for raw in records:
        before_e, before_d = len(events), len(dead)
        for series, attrs in mapped([raw], dead, ioto._series):
            for point in valid(ioto.MetricPoint, series.points, dead, ioto._point_of(series.metric)):
                events.append(src.event("metric", "a1", "d1", f"{series.metric}.avg.300", point.timestamp,
                                        point.value, None, attrs))
            assert len(events) - before_e + len(dead) - before_d == len(series.points), raw
            break
        else:
            assert (len(events), len(dead)) == (before_e, before_d + 1), raw
    check_guarded(events, dead)


# -- IXON: `IxonSource._points` (one tag's DataList points) -----------------------------------------------------

IXON_POINT = {"time": iso_any,
              "values": st.fixed_dictionaries({ixon.REF: st.one_of(number, st.booleans(), text, bad_float)},
                                              optional={"other": scalar_junk})}


def _ixon() -> tuple[IxonSource, DataTag]:
    cfg = IxonConfig(vendor="ixon", name="ix", application_id="a", company_id="c", token=SecretStr("t"))
    tag = DataTag.model_validate({"tagId": 5, "slug": "temp", "name": "T\ud83d", "source": {"publicId": "dev"},
                                  "variable": {"type": "float", "unit": "°C"}})
    return IxonSource(cfg, client=None), tag  # type: ignore[arg-type]


@PROPS
@given(records=page(record(IXON_POINT)))
def test_ixon_every_point_is_an_event_a_dead_letter_or_an_already_stored_time(records: list[Any]) -> None:
    """A point that does not read (`_point` raises) is one dead letter; a readable one is one event unless its time
    is at or before the newest time this round already stored for the tag (a re-read page overlap, by design)."""
    src, tag = _ixon()
    expected_events = expected_dead = 0
    newest = TS_MIN_MS - 1
    for raw in records:
        try:
            point, _, _ = ixon._point(raw)
        except Exception:
            expected_dead += 1
            continue
        if point.time > newest:
            expected_events += 1
            newest = point.time
    events: list[Event] = []
    dead: list[DeadLetter] = []
    src._points("t", "dev", tag, records, "5", TS_MAX_MS + 1, None, TS_MIN_MS - 1, None, {}, LateTally(None, 3_600_000),
                events, dead)
    assert (len(events), len(dead)) == (expected_events, expected_dead)
    check_guarded(events, dead)


@PROPS
@given(records=page(record(IXON_POINT), non_dict=False).map(
    lambda rs: sorted({r["time"]: r for r in rs if isinstance(r.get("time"), str) and r["time"].endswith("Z")}.values(),
                      key=lambda r: r["time"])))
def test_ixon_ascending_points_are_one_event_or_one_dead_letter_each(records: list[Any]) -> None:
    """With distinct times in ascending order (what the DataList request asks for), strictly 1:1."""
    src, tag = _ixon()
    events: list[Event] = []
    dead: list[DeadLetter] = []
    src._points("t", "dev", tag, records, "5", TS_MAX_MS + 1, None, TS_MIN_MS - 1, None, {}, LateTally(None, 3_600_000),
                events, dead)
    assert len(events) + len(dead) == len(records)
    check_guarded(events, dead)


# -- Navixy: `NavixySource._page(stream, records)` (one MQTT batch of NGP messages) --------------------------------

leaf = st.one_of(number, st.booleans(), text, st.none(), bad_float, st.lists(number, max_size=2))
NGP = {"device_id": text, "message_time": iso_any, "version": junk, "event_id": junk,
       "params": st.dictionaries(text, st.one_of(leaf, st.dictionaries(text, leaf, max_size=3)), max_size=4),
       "lat": number, "lng": number, "ignition": st.booleans(), "name": text}


def _leaves(value: Any) -> int:
    """How many metrics an NGP attribute gives (`flatten`): numbers, bools and strings; null and arrays none."""
    if isinstance(value, dict):
        return sum(_leaves(v) for v in value.values())
    return 1 if isinstance(value, bool | int | float | str) else 0


def _navixy() -> NavixySource:
    cfg = NavixyConfig(vendor="navixy", name="nx", api_key=SecretStr("k"), mqtt_url="mqtt://127.0.0.1:1", topics=["t"])
    src = NavixySource(cfg, client=None, clock=lambda: 1_700_000_000.0)  # type: ignore[arg-type]
    src.devices = {"dev": {"device_id": "dev", "label": "\ud83d"}}
    return src


@PROPS
@given(records=page(record(NGP | {"device_id": st.one_of(text, st.just("dev"))}), max_size=5),
       dead_in=st.lists(st.builds(DeadLetter, text, st.one_of(text, huge_text)), max_size=2))
def test_navixy_every_message_is_its_metrics_or_one_dead_letter(records: list[Any], dead_in: list[DeadLetter]) -> None:
    """1:n: a message either gives one event per metric its non-header attributes flatten to (numbers, bools,
    strings; nested objects joined by dots; null and arrays give none, so a message of header fields only gives
    zero events and no dead letter) or exactly one dead letter. Dead letters of the batch (`_record`) pass through."""
    stream = Stream("telemetry", "telemetry", "u1", push=True)
    src = _navixy()
    for raw in records:
        page_ = src._page(stream, [raw])
        n = sum(_leaves(v) for k, v in raw.items() if k not in NGP_HEADER) if isinstance(raw, dict) else -1
        assert (len(page_.events), len(page_.dead)) in ((n, 0), (0, 1)), raw
    page_ = src._page(stream, [*records, *dead_in])
    assert len(page_.dead) >= len(dead_in)
    check_guarded(page_.events, page_.dead)
    orjson.dumps(guard_page(page_).cursor)


# -- the dead letter of every record shape is storable -----------------------------------------------------------

@PROPS
@given(raw=junk)
def test_a_dead_letter_of_anything_is_storable(raw: Any) -> None:
    """Any value as a record (no object at all, NaN, huge ints, surrogates): one dead letter, storable."""
    dead: list[DeadLetter] = []
    assert list(mapped([raw], dead, ioto.LogItem.model_validate)) == []
    assert len(dead) == 1
    check_guarded([], dead)


@pytest.mark.parametrize("vendor", ["iotopen", "proxus", "ioto", "ixon", "navixy"])
def test_sources_build_without_a_client(vendor: str) -> None:
    """The normalizers above never touch the HTTP client: the sources are built with client=None."""
    build = {"iotopen": _iotopen, "proxus": _proxus, "ioto": _ioto, "ixon": lambda: _ixon()[0], "navixy": _navixy}
    assert build[vendor]().client is None


# -- whole fetches over a stubbed transport: the bookkeeping after the mapping must not fail either ---------------

def _stub(records: list[Any], nxt: str | None = None) -> Any:
    async def answer(*args: Any, **kw: Any) -> Any:
        return list(records), nxt
    return answer


def _fetched(page_: Page, records: list[Any]) -> None:
    """A fetch's page: no record adds more than it may (events per record as its mapping gives), all storable."""
    assert len(page_.dead) <= len(records)
    guarded = check_guarded(page_.events, page_.dead)
    orjson.dumps(guarded.cursor)


@PROPS
@given(records=page(record(LYNX | {"topic": st.sampled_from(["obj/temp", "a", "b"])}), max_size=8))
def test_iotopen_status_fetch_never_raises(records: list[Any]) -> None:
    """`_fetch_status`: an entry is one event, one dead letter, or skipped because its topic was already emitted at
    the same timestamp (the cursor keeps each topic's last time)."""
    src = _iotopen()

    async def get(path: str, params: Any = None) -> Any:
        return list(records)

    src._get = get  # type: ignore[method-assign]
    page_ = asyncio.run(src._fetch_status(Stream("status/7", "status", "7"), {}))
    assert len(page_.events) + len(page_.dead) <= len(records)
    _fetched(page_, records)


@PROPS
@given(records=page(st.one_of(record(STORE | {"key": st.sampled_from(["k1", "k2"])}), record(LOG), record(IOTO_ALERT)),
                    max_size=8),
       feed=st.sampled_from(["status", "log", "alert"]), more=st.booleans())
def test_ioto_fetches_never_raise(records: list[Any], feed: str, more: bool) -> None:
    """`fetch` of the Store, Log and Alert lists with the page transport stubbed: at most one event or dead letter
    per item (items are skipped only as already stored), and everything storable."""
    src = _ioto()
    src._page = _stub(records, "n2" if more else None)  # type: ignore[method-assign]
    stream = Stream("alert", "alert", "") if feed == "alert" else Stream(f"{feed}/d1", feed, "a1", {"device": "d1"})
    page_ = asyncio.run(src.fetch(stream, None))
    assert len(page_.events) + len(page_.dead) <= len(records)
    _fetched(page_, records)


@PROPS
@given(records=page(record({"publicId": text, "alarm": st.fixed_dictionaries({"name": text, "severity": text}),
                            "occurredOn": iso_any, "rtnOn": st.one_of(st.none(), iso_any), "acknowledged": st.booleans(),
                            "comment": st.one_of(st.none(), text)}), max_size=8),
       more=st.booleans())
def test_ixon_alert_fetch_never_raises(records: list[Any], more: bool) -> None:
    """`_fetch_alerts`: an occurrence is one dead letter, or an open event and/or a close event (`rtnOn`), or
    skipped as already closed: at most two events per occurrence."""
    src, _ = _ixon()
    src._list_page = _stub(records, "after" if more else None)  # type: ignore[method-assign]
    page_ = asyncio.run(src._fetch_alerts(Stream("alert/dev", "alert", "t", {"agent": "dev"}), None))
    assert len(page_.events) + 2 * len(page_.dead) <= 2 * len(records)
    _fetched(page_, records)


@given(stamps=st.lists(st.integers(1_700_000_000_000, 1_700_020_000_000), max_size=300),
       found=st.lists(st.integers(1_700_000_000_000, 1_700_020_000_000), max_size=50),
       covered=st.integers(1_700_000_000_000, 1_700_030_000_000))
def test_late_tally_cursor_keeps_every_bucket_a_reread_may_compare(stamps: list[int], found: list[int],
                                                                    covered: int) -> None:
    """The tally's cursor (dense lists) holds exactly the counts in the kept range, survives JSON, and reads the
    map form cursors held before it the same way."""
    window = 3_600_000
    tally = LateTally(None, window)
    tally.add_all(stamps)
    tally.add_all(found, min(found, default=0), max(found, default=0) + 1)
    state = orjson.loads(orjson.dumps(tally.state(covered)))
    back = LateTally(state, window)
    low, high = covered - 2 * window - tally.size, covered + window
    for mine, theirs in ((tally.stored, back.stored), (tally.found, back.found)):
        assert {b: n for b, n in theirs.items() if n} == {b: n for b, n in mine.items() if low <= b <= high}
    legacy = {"size": tally.size, "stored": {str(b): n for b, n in tally.stored.items()}, "found": {}}
    assert LateTally(legacy, window).stored == tally.stored
