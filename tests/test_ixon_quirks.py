"""IXON quirks a connector could get wrong, each proved against the simulator over real sockets."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest

from syncd.errors import VendorAuthError
from syncd.events import Event
from syncd.http import TokenBucket, VendorClient
from syncd.settings import IxonSource as IxonConfig
from syncd.sim.common import TruthRow, start_sims
from syncd.sim.ixon import IxonSim
from syncd.sources.base import DeadLetter
from syncd.sources.ixon import IxonSource
from tests.helpers import max_in_window

Key = tuple[str, str, str, str, int]


class FakeTime:
    """A clock that only moves when someone sleeps (or a test moves it)."""

    def __init__(self, now: float = 1_760_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


@asynccontextmanager
async def connector(sim: IxonSim, clock: Callable[[], float] | None = None, **cfg: Any) -> AsyncIterator[IxonSource]:
    """The simulator on a free port and an IxonSource on the engine's own client, with the class's default throttle."""
    runners = await start_sims([sim])
    session = aiohttp.ClientSession()
    try:
        config = IxonConfig.model_validate({"name": "ixon-test", "start": "48h", **sim.source_config(), **cfg})
        bucket = TokenBucket(IxonSource.default_rate, IxonSource.default_burst)
        client = VendorClient(session, bucket, timeout=10, concurrency=config.concurrency, map_error=IxonSource.map_error,
                              seed=1)
        yield IxonSource(config, client, **({"clock": clock} if clock else {}))
    finally:
        await session.close()
        for r in runners:
            await r.cleanup()


async def sync(src: IxonSource, cursors: dict[str, Any] | None = None) -> tuple[dict[Key, Event], list[DeadLetter], dict[str, Any]]:
    """What one `--once` run does: discover, then page every stream until done."""
    cursors = dict(cursors or {})
    events: dict[Key, Event] = {}
    dead: list[DeadLetter] = []
    for stream in await src.discover():
        while True:
            page = await src.fetch(stream, cursors.get(stream.name))
            json.dumps(page.cursor)  # cursors must be JSON
            for e in page.events:
                events[(e.kind, e.tenant, e.device, e.metric, e.ts_ms)] = e
            dead += page.dead
            cursors[stream.name] = page.cursor
            if page.done:
                break
    return events, dead, cursors


def truth(sim: IxonSim) -> dict[Key, TruthRow]:
    return {(t.kind, t.tenant, t.device, t.metric, t.ts_ms): t for t in sim.ground_truth()}


def assert_complete(events: dict[Key, Event], sim: IxonSim, kinds: tuple[str, ...] = ("telemetry", "alert")) -> None:
    expected = {k: row for k, row in truth(sim).items() if k[0] in kinds}
    assert events.keys() == expected.keys()
    for key, row in expected.items():
        assert (events[key].value, events[key].text) == (row.value, row.text), key


async def test_api_version_application_company_and_bearer_headers_are_sent() -> None:
    sim = IxonSim(seed=31, agents=2, tags_per_agent=3, points_per_tag=20, alarms=2)
    async with connector(sim) as src:
        events, _, _ = await sync(src)
        assert_complete(events, sim)
        assert sim.requests
        for r in sim.requests:
            assert r.headers["Api-Version"] == "2" and r.headers["Api-Application"] == sim.application_id
            assert r.headers["Api-Company"] == sim.company_id and r.headers["Authorization"] == f"Bearer {sim.token}"
        # ...and the simulator refuses a request without them: what the connector gets right is what is enforced
        async with aiohttp.ClientSession() as s:
            for missing in ("Api-Version", "Api-Application"):
                headers = {k: v for k, v in src._headers().items() if k != missing}
                async with s.get(src._href("AgentList"), headers=headers) as resp:
                    body = await resp.json()
                    assert resp.status == 400 and body["data"][0]["propertyName"] == missing


async def test_more_after_paging_with_small_page_sizes() -> None:
    sim = IxonSim(seed=32, agents=5, tags_per_agent=7, points_per_tag=10, alarms=5)
    async with connector(sim, page_size=2) as src:
        events, _, cursors = await sync(src)
    assert_complete(events, sim)
    lists = [r for r in sim.requests if r.method == "GET" and r.path != "/api/"]
    afters = [dict(r.query)["page-after"] for r in lists if "page-after" in dict(r.query)]
    assert afters and all(a.startswith("+/+/") for a in afters)  # opaque cursors survived URL encoding
    assert all(dict(r.query)["page-size"] == "2" for r in lists)
    # 5 agents at 2 per page = 3 agent pages; 7 tags at 2 per page = 4 tag pages per agent
    assert sum(r.path == "/api/agents" for r in lists) == 3
    assert sum(r.path.endswith("/data-tags") for r in lists) == 5 * 4
    # alarm occurrences page inside the stream: each page is a fetch with the cursor holding `moreAfter`
    alarm_pages = [r for r in lists if r.path.endswith("/data-alarm-occurrences")]
    assert len(alarm_pages) == 5 * 3
    assert all(c["after"] is None for name, c in cursors.items() if name.startswith("alert/"))


async def test_datalist_answers_201_with_an_object_or_a_list() -> None:
    for tags, form in ((1, dict), (3, list)):
        sim = IxonSim(seed=33, agents=2, tags_per_agent=tags, points_per_tag=30, alarms=1)
        async with connector(sim) as src:
            events, dead, _ = await sync(src)
        assert_complete(events, sim)
        assert not dead
        posts = [json.loads(r.body) for r in sim.requests if r.method == "POST"]
        assert len(posts) == 2 and all(isinstance(p, form) for p in posts)  # one request object → object answer


async def test_more_than_5000_points_are_split_without_loss() -> None:
    sim = IxonSim(seed=34, agents=1, tags_per_agent=2, points_per_tag=12_001, alarms=1, rate_limit=None)
    async with connector(sim) as src:
        events, dead, cursors = await sync(src)
        assert_complete(events, sim)
        assert sum(k[0] == "telemetry" for k in events) == 2 * 12_001 and not dead
        posts = [json.loads(r.body) for r in sim.requests if r.method == "POST"]
        assert len(posts) == 3  # 5000 + 5000 + 2001 per tag, both tags in each POST
        queries = [q for p in posts for req in p for t in req["tags"] for q in t["queries"]]
        assert all(q["limit"] == 5000 and q["postAggr"] == "raw" and q["order"] == "asc" for q in queries)
        # a second run asks each tag from its watermark once and gets only the already-stored point back
        again, _, _ = await sync(src, cursors)
        assert again == {}
        assert len([r for r in sim.requests if r.method == "POST"]) == 4


async def test_discovery_hrefs_are_followed_not_hard_coded() -> None:
    moved = {"AgentList": "fleet/v7/agents", "AgentDataTagList": "fleet/v7/agents/{agentId}/tags",
             "AgentDataAlarmOccurrenceList": "alarms/{agentId}/occurrences", "DataList": "history/query"}
    sim = IxonSim(seed=35, agents=2, tags_per_agent=3, points_per_tag=20, alarms=2, rels=moved)
    async with connector(sim) as src:
        events, _, _ = await sync(src)
        assert_complete(events, sim)
        paths = {r.path for r in sim.requests}
        agents = [a["publicId"] for a in sim.agent_objs]
        assert paths == {"/api/", "/api/fleet/v7/agents", "/api/history/query",
                         *(f"/api/fleet/v7/agents/{a}/tags" for a in agents),
                         *(f"/api/alarms/{a}/occurrences" for a in agents)}
        # the discovery map is cached between fetches and read again on every discover()
        assert sum(r.path == "/api/" for r in sim.requests) == 1
        await src.discover()
        assert sum(r.path == "/api/" for r in sim.requests) == 2


async def test_429_without_retry_after_slows_down_and_recovers() -> None:
    calm = IxonSim(seed=36, agents=2, tags_per_agent=3, points_per_tag=20, alarms=2)
    async with connector(calm) as src:
        await sync(src)
    sim = IxonSim(seed=36, agents=2, tags_per_agent=3, points_per_tag=20, alarms=2)
    async with connector(sim) as src:
        sim.faults.update({"storm_429": 4})  # text/plain bodies, no Retry-After header
        events, _, _ = await sync(src)
        assert_complete(events, sim)
        rate = src.client.bucket.rate
    assert len(sim.requests) == len(calm.requests) + 4  # each 429 retried, nothing else repeated
    # no Retry-After: the throttle halves its rate per 429 (49 → 24.5 → 12.25 → 6.1 → 3.1/s) and waits one slot of it
    gaps = [b.at - a.at for a, b in zip(sim.requests[:4], sim.requests[1:5], strict=True)]
    pauses = [2**n / IxonSource.default_rate for n in (1, 2, 3, 4)]
    assert [g >= pause * 0.9 for g, pause in zip(gaps, pauses, strict=True)] == [True] * 4
    assert IxonSource.default_rate / 16 < rate < IxonSource.default_rate  # and climbs back with time since


async def test_default_throttle_never_exceeds_50_per_second_or_3000_per_minute() -> None:
    t = FakeTime()
    bucket = TokenBucket(IxonSource.default_rate, IxonSource.default_burst, clock=t, sleep=t.sleep)
    sent = []
    for _ in range(10 * 3000):  # ten minutes of a stream that is always behind
        await bucket.acquire()
        sent.append(t.now)
    assert max_in_window(sent, 1.0) <= 50 and max_in_window(sent, 60.0) <= 3000
    # and against the simulator's sliding windows, with its 250/s buffer cut to 50/s so any excess is a 429
    sim = IxonSim(seed=37, agents=3, tags_per_agent=2, points_per_tag=5, buffer=50)
    async with connector(sim, concurrency=8) as src:
        await asyncio.gather(*(src.discover() for _ in range(30)))  # 30 × 5 requests, all at once
        assert src.client.requests == len(sim.requests) == 150  # none refused, none retried
        assert max_in_window([r.at for r in sim.requests], 1.0) <= 50



async def test_alarm_opens_then_closes_between_polls() -> None:
    clock = FakeTime()
    sim = IxonSim(seed=38, clock=clock, live=True, agents=1, tags_per_agent=1, points_per_tag=60, history=3600,
                  alarms=3, rate_limit=None)
    async with connector(sim, clock=clock, streams=["alert"]) as src:
        first, _, cursors = await sync(src)
        assert_complete(first, sim, ("alert",))
        still_open = [o for o in sim._occurrences(0) if o["rtnOn"] is None]
        assert len(still_open) == 1 and len(first) == 2 * 2 + 1
        clock.now += 3600
        second, _, cursors = await sync(src, cursors)
        name = still_open[0]["alarm"]["name"]
        closes = [e for e in second.values() if e.metric == name and e.attrs["state"] == "closed"
                  and e.attrs["occurrence"] == still_open[0]["publicId"]]
        assert len(closes) == 1  # the close arrives, the open is not emitted twice
        assert not first.keys() & second.keys()
        assert_complete({**first, **second}, sim, ("alert",))
        third, _, _ = await sync(src, cursors)
        assert third == {}


async def test_live_history_resumes_from_each_tags_watermark() -> None:
    clock = FakeTime()
    sim = IxonSim(seed=39, clock=clock, live=True, agents=2, tags_per_agent=3, points_per_tag=60, history=3600,
                  rate_limit=None)
    # no re-read of the late window falls due in between: the forward reads alone
    async with connector(sim, clock=clock, streams=["telemetry"], reconcile_every="2h") as src:
        first, _, cursors = await sync(src)
        clock.now += 1800
        second, _, _ = await sync(src, cursors)
    assert first and second and not first.keys() & second.keys()
    expected = {k for k in truth(sim) if k[0] == "telemetry"}
    assert first.keys() | second.keys() == expected  # nothing lost at the seams, nothing read twice


async def test_status_stream_maps_agents_and_emits_only_changes() -> None:
    sim = IxonSim(seed=40, agents=3, tags_per_agent=1, points_per_tag=5)
    async with connector(sim, streams=["status"]) as src:
        events, _, cursors = await sync(src)
        assert len(events) == 3 and {k[3] for k in events} == {"online"}
        by_agent = {e.device: e for e in events.values()}
        for obj in sim.agent_objs:
            e = by_agent[obj["publicId"]]
            assert e.value == (1.0 if obj["activeVpnSession"] else 0.0) and e.text == obj["activeStatus"]
            assert e.attrs["serialNumber"] == obj["serialNumber"]
        again, _, _ = await sync(src, cursors)
        assert again == {}


async def test_refused_token_is_terminal_with_the_envelope_message() -> None:
    sim = IxonSim(seed=41, agents=1, tags_per_agent=1, points_per_tag=5)
    async with connector(sim) as src:
        sim.faults.update({"expired": True})
        with pytest.raises(VendorAuthError, match=r"expired or revoked access token \(Authorization\)"):
            await src.discover()
        assert await src.relogin() is False  # a service-account token has nothing to log in again with
