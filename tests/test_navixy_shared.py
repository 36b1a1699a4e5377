"""Navixy on the shared parts: the status cursor (two change trackers) read in the layout earlier versions stored,
endpoints that fail validation as dead letters, telemetry as one columnar page per MQTT batch."""

from __future__ import annotations

import calendar
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
from syncd.sim.navixy import EP_DEFAULT, EP_MQTT, EP_STAGING, NavixySim
from syncd.sources.base import DeadLetter, Stream
from syncd.sources.navixy import NavixySource

STATUS = Stream("status", "status", "u1")


@pytest.fixture
async def served() -> AsyncIterator[tuple[NavixySim, NavixySource]]:
    sim = NavixySim(seed=41, rate_limit=None)
    runners = await start_sims([sim])
    try:
        async with aiohttp.ClientSession() as session:
            config = TypeAdapter(SourceSettings).validate_python({"name": "nx", **sim.source_config(), "streams": ["status"]})
            client = VendorClient(session, TokenBucket(1000, 1000), timeout=10, map_error=NavixySource.map_error)
            yield sim, NavixySource(config, client)
    finally:
        for r in runners:
            await r.cleanup()


def old_cursor(sim: NavixySim) -> dict[str, Any]:
    """The status cursor as the connector before the shared trackers wrote it: "modified ms/enabled" per flow id,
    status text per endpoint id."""
    flows = {str(f["id"]): f"{calendar.timegm(time.strptime(f['modified'], '%Y-%m-%dT%H:%M:%SZ')) * 1000}/{int(f['enabled'])}"
             for f in sim.flows()}
    return {"flows": flows, "endpoints": {str(eid): sim.endpoint_status(eid) for eid in sim.endpoints}}


async def test_a_status_cursor_of_the_old_layout_is_read(served: tuple[NavixySim, NavixySource]) -> None:
    sim, source = served
    first = await source.fetch(STATUS, None)
    assert sorted(e.device for e in first.events) == sorted(
        [f"flow:{f['id']}" for f in sim.flows()] + [f"endpoint:{eid}" for eid in sim.endpoints])
    stored = orjson.loads(orjson.dumps(first.cursor))  # as the spool gives it back
    assert stored == old_cursor(sim)  # the layout did not change
    old = old_cursor(sim)
    again = await source.fetch(STATUS, old)
    assert (len(again), again.dead, again.cursor, again.done) == (0, [], old, True)

    sim.endpoints[EP_MQTT]["status"] = "suspend"
    moved = await source.fetch(STATUS, old)
    assert [(e.device, e.metric, e.value, e.text) for e in moved.events] == [(f"endpoint:{EP_MQTT}", "status", None, "suspend")]
    assert moved.cursor["endpoints"][str(EP_MQTT)] == "suspend"

    no_endpoints = await source.fetch(STATUS, {"flows": old["flows"]})  # a key missing: all of its part is new
    assert sorted(e.device for e in no_endpoints.events) == [f"endpoint:{eid}" for eid in sorted(sim.endpoints)]


async def test_endpoints_that_fail_validation_are_dead_letters_and_the_others_still_count(
        served: tuple[NavixySim, NavixySource]) -> None:
    sim, source = served
    sim.endpoints[EP_STAGING]["title"] = 5  # bad in endpoint/list: never read
    sim.endpoints[EP_MQTT]["properties"] = "oops"  # bad only in endpoint/read
    page = await source.fetch(STATUS, None)
    assert [e.device for e in page.events if e.device.startswith("endpoint:")] == [f"endpoint:{EP_DEFAULT}"]
    assert sorted(d.reason.split(":")[0] for d in page.dead) == ["properties", "title"]
    assert any('"oops"' in d.payload for d in page.dead) and any('"title":5' in d.payload for d in page.dead)
    assert page.cursor["endpoints"] == {str(EP_DEFAULT): "active"}  # a dead-lettered endpoint is tried again next poll


def offline() -> NavixySource:
    cfg = TypeAdapter(SourceSettings).validate_python(
        {"vendor": "navixy", "name": "nx", "api_key": "k", "mqtt_url": "mqtt://127.0.0.1:1", "topics": ["t"]})
    return NavixySource(cfg, client=None, clock=lambda: 1_700_000_000.0)  # type: ignore[arg-type]


def test_one_mqtt_batch_is_one_columnar_page_with_all_metrics_of_each_message() -> None:
    source = offline()
    batch: list[dict[str, Any] | DeadLetter] = [
        {"device_id": "a", "message_time": "2025-01-01T00:00:00.0005Z", "event_id": 7,
         "location": {"latitude": 1.5, "fix_type": "3d"}, "is_moving": True},
        {"device_id": "b", "message_time": "yesterday", "temperature_2": 4},
        DeadLetter("payload: not JSON", "{"),
    ]
    page = source._page(Stream("telemetry", "telemetry", "u1", push=True), batch)
    assert page.columns is not None and len(page) == 3
    ts = 1_735_689_600_000  # .0005 rounds half-even to .000
    assert [(e.device, e.metric, e.ts_ms, e.value, e.text) for e in page.events] == [
        ("a", "location.latitude", ts, 1.5, None), ("a", "location.fix_type", ts, None, "3d"), ("a", "is_moving", ts, 1.0, None)]
    assert page.events[0].attrs == {"device_id": "a", "event_id": "7"}
    assert [d.reason.split(":")[0] for d in page.dead] == ["payload", "message_time"]
    assert page.cursor == {"session": "syncd-syncd-0-nx", "newest_ms": ts}


async def test_a_device_id_that_is_no_string_does_not_stop_the_batch() -> None:
    """Unhashable ids (a list) used to raise TypeError in the device lookup before the message could be
    dead-lettered, failing the batch again on every redelivery. No string id asks for no tracker/list refresh."""
    source = offline()
    await source._refresh_devices([{"device_id": [1], "message_time": "2025-01-01T00:00:00Z"}])  # client=None: no call
    page = source._page(Stream("telemetry", "telemetry", "u1", push=True), [{"device_id": [1], "message_time": "x"}])
    assert (len(page), [d.reason.split(":")[0] for d in page.dead]) == (0, ["device_id"])
