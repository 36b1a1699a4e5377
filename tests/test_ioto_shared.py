"""Ioto on the shared parts: an alert cursor of the old layout is still read, a bad inventory record is a dead letter
with the next page, the metric cursor keeps only the current points, and dates parse by the shared rules."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr, ValidationError

from syncd.events import Event
from syncd.http import TokenBucket, VendorClient
from syncd.settings import IotoSource as IotoConfig
from syncd.sim.common import sims_in_thread
from syncd.sim.ioto import IotoSim
from syncd.sources.base import Stream
from syncd.sources.ioto import AlertItem, IotoSource, MetricPoint
from tests.helpers import drain
from tests.test_ioto_quirks import FakeClock

ALERTS = Stream("alert", "alert", "")


async def _no_sleep(_: float) -> None:
    """Retry backoff without waiting."""


@asynccontextmanager
async def connector(sim: IotoSim, clock: Callable[[], float] = time.time, **cfg: Any) -> AsyncIterator[IotoSource]:
    async with aiohttp.ClientSession() as session:
        client = VendorClient(session, TokenBucket(1000, 1000), timeout=10, map_error=IotoSource.map_error,
                              sleep=_no_sleep)
        config = IotoConfig(vendor="ioto", name="io", base_url=sim.url, token=SecretStr(sim.token),
                            start="2020-01-01", **cfg)
        yield IotoSource(config, client, clock=clock)


def _old_layout(cursor: dict[str, Any]) -> dict[str, Any]:
    """What the connector stored before the AlertTracker: `open` is {id: fingerprint}, closed alerts not kept."""
    old = {k: v for k, v in cursor.items() if k != "alerts"}
    return {**old, "open": {k: mark for k, (mark, _) in cursor["alerts"]["open"].items()}}


def _rows(events: list[Event]) -> list[tuple[Any, ...]]:
    return sorted((e.event_id, e.ts_ms, e.text, tuple(sorted(e.attrs.items()))) for e in events)


async def test_an_old_layout_alert_cursor_is_read() -> None:
    clock = FakeClock()
    sim = IotoSim(seed=81, clock=clock, live=True, devices=3, logs=30, alerts=40, rate_limit=None)
    with sims_in_thread([sim]):
        async with connector(sim, clock, page_size=7) as src:
            first, _, cursor = await drain(src, ALERTS)
            old = _old_layout(cursor)
            assert len(first) == 40 and old["open"] and "closed" not in old
            again, _, converted = await drain(src, ALERTS, old)
            assert again == []  # nothing changed: nothing sent again
            assert {k: mark for k, (mark, _) in converted["alerts"]["open"].items()} == old["open"]
            clock.t += 12 * 3600  # open alerts resolve, new ones are raised
            from_new, _, after_new = await drain(src, ALERTS, cursor)
            from_old, _, after_old = await drain(src, ALERTS, old)
    assert any(e.attrs["resolved"] == "true" and e.ts_ms <= cursor["wm"] for e in from_new)  # a close re-emitted
    assert _rows(from_old) == _rows(from_new)
    assert after_old["alerts"]["open"].keys() == after_new["alerts"]["open"].keys()
    assert {k: v for k, v in after_old.items() if k != "alerts"} == {k: v for k, v in after_new.items() if k != "alerts"}


def test_alert_cursor_conversion() -> None:
    cfg = IotoConfig.model_validate({"vendor": "ioto", "name": "io", "base_url": "https://i", "token": "t"})
    src = IotoSource(cfg, client=None)  # type: ignore[arg-type]
    old = {"next": "abc", "from": 5, "wm": 9, "edge": ["a"], "top": 12, "top_edge": ["b"],
           "open": {"a": 123, "x\\ud83d": 7}}
    assert src._alert_cursor(old) == {"next": "abc", "from": 5, "wm": 9, "edge": ["a"], "top": 12, "top_edge": ["b"],
                                      "alerts": {"open": {"a": [123, 9], "x\\ud83d": [7, 9]}, "closed": {}}}
    new = {k: v for k, v in old.items() if k != "open"} | {"alerts": {"open": {}, "closed": {}}}
    assert src._alert_cursor(new) is new


class BadDeviceSim(IotoSim):
    """A Device record without accountId (the device's registry entry stays good)."""

    def _device(self, d: int, w: int) -> dict[str, Any]:
        rec = super()._device(d, w)
        if d == 1:
            del rec["accountId"]
        return rec


async def test_an_invalid_inventory_record_is_a_dead_letter_with_the_next_page() -> None:
    sim = BadDeviceSim(seed=83, devices=3, accounts=1, logs=30, rate_limit=None)
    with sims_in_thread([sim]):
        async with connector(sim, streams=["status"]) as src:
            streams = await src.discover()
            first = await src.fetch(streams[0], None)
            second = await src.fetch(streams[1], None)
    # device 1 is still found through device/find of its account (the other devices name it)
    assert [s.name for s in streams] == [f"status/{d}" for d in sorted(sim.device_ids)]
    assert [d.reason for d in first.dead] == ["accountId: Field required"]
    assert sim.device_ids[1] in first.dead[0].payload
    assert second.dead == [] and len(first.events) == len(second.events) == 5


async def test_the_metric_cursor_keeps_the_current_points_and_a_moved_value_is_sent_again() -> None:
    clock = FakeClock()
    sim = IotoSim(seed=84, clock=clock, live=True, devices=1, logs=30, rate_limit=None)
    with sims_in_thread([sim]):
        async with connector(sim, clock, streams=["metric"]) as src:
            (stream,) = await src.discover()
            first, _, cursor = await drain(src, stream)
            again, _, same = await drain(src, stream, cursor)
            clock.t += 600  # two spans on: points leave the answer, new ones arrive, the open one moves
            later, _, moved = await drain(src, stream, cursor)
    assert again == [] and same == cursor
    assert len(first) == 3 * 5 and sorted(cursor) == sorted({e.metric for e in first})
    for name, points in cursor.items():
        assert points == {str(e.ts_ms): e.value for e in first if e.metric == name}
    now = {(e.metric, str(e.ts_ms)): e.value for e in later}
    assert later and all(moved[m][t] == v for (m, t), v in now.items())
    assert all(len(points) == 5 for points in moved.values())  # only the points the last answer held
    for name, points in moved.items():
        for ts, value in points.items():  # every point not sent again is one the cursor held with that value
            assert (name, ts) in now or cursor[name].get(ts) == value


def test_dates_parse_by_the_shared_rules() -> None:
    def point(ts: Any) -> int:
        return MetricPoint.model_validate({"value": 1.0, "timestamp": ts}).timestamp

    assert point(1_732_356_000) == 1_732_356_000_000  # seconds at or below MS_THRESHOLD
    assert point(1_732_356_000_123) == 1_732_356_000_123  # milliseconds above it
    assert point(1_732_356_000.0005) == 1_732_356_000_000  # half-even on the decimal text: a tie goes to even
    assert point(1_732_356_000.0015) == 1_732_356_000_002
    assert point("2024-11-23T10:00:00.1235Z") == 1_732_356_000_124
    for bad in (True, -5, 1e11, float("nan"), float("inf"), "yesterday", ""):
        with pytest.raises(ValidationError):
            point(bad)
    alert = {"id": "a", "accountId": "b", "timestamp": "2024-11-23T10:00:00.000Z"}
    assert AlertItem.model_validate(alert).timestamp == 1_732_356_000_000
