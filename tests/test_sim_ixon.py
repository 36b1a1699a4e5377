"""The IXON simulator against its brief (shared/vendors/ixon.md §7), over real sockets."""

from __future__ import annotations

import asyncio
import base64
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from yarl import URL

from syncd.sim.common import TruthRow, start_sims
from syncd.sim.ixon import IxonSim
from syncd.sim.ixon_query import (
    SCHEMAS,
    ApiError,
    DataQuery,
    field_spec,
    matches,
    parse_fields,
    parse_filters,
    project,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_760_000_000.0

    def __call__(self) -> float:
        return self.now


class Api:
    """A bare client: discovery, headers, and (status, body) answers."""

    def __init__(self, sim: IxonSim, session: aiohttp.ClientSession) -> None:
        self.sim, self.s, self.rels = sim, session, {}

    def headers(self, **over: str | None) -> dict[str, str]:
        h = {"Api-Version": "2", "Api-Application": self.sim.application_id, "Api-Company": self.sim.company_id,
             "Authorization": f"Bearer {self.sim.token}", "Accept": "application/json"}
        h.update(over)  # type: ignore[arg-type]
        return {k: v for k, v in h.items() if v is not None}

    async def call(self, method: str, url: Any, *, json: Any = None, params: Any = None,
                   **hdr: str | None) -> tuple[int, Any, aiohttp.ClientResponse]:
        async with self.s.request(method, url, json=json, params=params, headers=self.headers(**hdr)) as r:
            text = await r.text()
            body = await r.json(content_type=None) if r.content_type == "application/json" else text
            return r.status, body, r

    async def get(self, rel: str, agent: str | None = None, **kw: Any) -> tuple[int, Any, aiohttp.ClientResponse]:
        return await self.call("GET", self.href(rel, agent), **kw)

    def href(self, rel: str, agent: str | None = None) -> str:
        return self.rels[rel].replace("{agentId}", agent or "").replace("{publicId}", agent or "")

    async def discover(self) -> None:
        status, body, _ = await self.call("GET", f"{self.sim.url}/api/")
        assert status == 200
        self.rels = {d["rel"]: d["href"] for d in body["data"]}


async def serve(sim: IxonSim) -> Any:
    runners = await start_sims([sim])
    session = aiohttp.ClientSession()
    api = Api(sim, session)
    await api.discover()

    async def close() -> None:
        await session.close()
        for r in runners:
            await r.cleanup()

    return api, close


@pytest.fixture
async def api() -> Any:
    a, close = await serve(IxonSim(seed=3, agents=5, tags_per_agent=9, points_per_tag=30, rate_limit=None))
    yield a
    await close()


def assert_error(status: int, body: Any, code: int, prop: str | None = None, index: int | None = None) -> None:
    assert status == code, body
    assert body["status"] == "error" and body["type"] == "Error"
    assert body["data"][0]["message"]
    assert body["data"][0]["propertyName"] == prop and body["data"][0]["listIndex"] == index


async def test_discovery_lists_templated_absolute_hrefs(api: Api) -> None:
    status, body, _ = await api.call("GET", f"{api.sim.url}/api/", Authorization=None, **{"Api-Company": None})
    assert status == 200 and body["type"] == "Discovery" and body["moreAfter"] is None and body["status"] == "success"
    for rel in ("AccessTokenList", "CompanyList", "AgentList", "AgentDataSourceList", "AgentDataTagList",
                "AgentDataAlarmOccurrenceList", "DataList"):
        assert api.rels[rel].startswith(f"{api.sim.url}/api/")
    assert "{agentId}" in api.rels["AgentDataTagList"]
    assert not api.rels["DataList"].endswith("/api/data")  # hard-coded paths must fail
    assert_error(*(await api.call("POST", f"{api.sim.url}/api/data", json={}))[:2], 404)
    agent = api.sim.agent_objs[0]["publicId"]
    assert_error(*(await api.call("GET", f"{api.sim.url}/api/agents/{agent}/alarm-occurrences"))[:2], 404)
    assert api.sim.source_config() == {"vendor": "ixon", "base_url": f"{api.sim.url}/api",
                                       "application_id": api.sim.application_id,
                                       "company_id": api.sim.company_id, "token": api.sim.token}


async def test_headers_and_bearer_are_enforced(api: Api) -> None:
    assert_error(*(await api.get("AgentList", **{"Api-Version": None}))[:2], 400, "Api-Version")
    assert_error(*(await api.get("AgentList", **{"Api-Version": "1"}))[:2], 400, "Api-Version")
    assert_error(*(await api.get("AgentList", **{"Api-Application": "short"}))[:2], 400, "Api-Application")
    assert_error(*(await api.get("AgentList", **{"Api-Application": "ZZZZZZZZZZZZ"}))[:2], 401, "Api-Application")
    assert_error(*(await api.get("AgentList", **{"Api-Company": None}))[:2], 400, "Api-Company")
    assert_error(*(await api.get("AgentList", **{"Api-Company": "1111-2222-3333-4444-5555"}))[:2], 403, "Api-Company")
    assert_error(*(await api.get("AgentList", Authorization=None))[:2], 401, "Authorization")
    assert_error(*(await api.get("AgentList", Authorization="Bearer " + "x" * 32))[:2], 401, "Authorization")
    # the service account's token only works with its own application
    other = {"Api-Application": api.sim.other_application_id}
    assert_error(*(await api.get("AgentList", **other))[:2], 401, "Api-Application")
    assert (await api.get("CompanyList", **{"Api-Company": None}))[1]["data"][0]["publicId"] == api.sim.company_id
    api.sim.faults.expired = True
    assert_error(*(await api.get("AgentList"))[:2], 401, "Authorization")


async def test_access_tokens_basic_login_expiry_and_delete() -> None:
    clock = FakeClock()
    api, close = await serve(IxonSim(clock=clock, agents=1))
    try:
        url, app = api.rels["AccessTokenList"], {"Api-Application": api.sim.other_application_id}

        def basic(cred: str) -> str:
            return "Basic " + base64.b64encode(cred.encode()).decode()

        demo = basic("demo@example.com::demo-pass")
        status, body, _ = await api.call("POST", url, json={"expiresIn": 120}, Authorization=demo, **app)
        assert status == 201 and body["type"] == "AccessToken" and len(body["data"]["secretId"]) == 32
        datetime.fromisoformat(body["data"]["expiresOn"])
        secret, public = body["data"]["secretId"], body["data"]["publicId"]
        status, body, _ = await api.call("POST", url, params={"fields": "secretId"}, json={"expiresIn": 60},
                                         Authorization=basic("demo@example.com::demo-pass"), **app)
        assert status == 201 and set(body["data"]) == {"publicId", "secretId"}
        for exp in (None, 59, 5_184_001, "600"):
            r = await api.call("POST", url, json={"expiresIn": exp}, Authorization=basic("demo@example.com::demo-pass"))
            assert_error(*r[:2], 400, "expiresIn")
        assert_error(*(await api.call("POST", url, json={"expiresIn": 60},
                                      Authorization=basic("ops@example.com::ops:pass")))[:2], 401, "otp")
        assert (await api.call("POST", url, json={"expiresIn": 60},
                               Authorization=basic("ops@example.com:123456:ops:pass")))[0] == 201
        assert_error(*(await api.call("POST", url, json={"expiresIn": 60},
                                      Authorization=basic("demo@example.com::wrong")))[:2], 401, "Authorization")
        # personal tokens work with any registered application, until they expire or are deleted
        assert (await api.get("AgentList", Authorization=f"Bearer {secret}", **app))[0] == 200
        clock.now += 121
        assert_error(*(await api.get("AgentList", Authorization=f"Bearer {secret}"))[:2], 401, "Authorization")
        clock.now -= 121
        status, _, _ = await api.call("DELETE", api.href("AccessToken", public), Authorization=f"Bearer {secret}")
        assert status == 200
        assert_error(*(await api.get("AgentList", Authorization=f"Bearer {secret}"))[:2], 401, "Authorization")
    finally:
        await close()


async def test_list_paging_with_cursor() -> None:
    api, close = await serve(IxonSim(agents=5, tags_per_agent=24, max_page_size=2))
    try:
        seen, after, pages = [], None, 0
        while True:
            params = {"page-size": "50", **({"page-after": after} if after else {})}
            status, body, _ = await api.get("AgentList", params=params)
            assert status == 200 and body["type"] == "AgentList" and len(body["data"]) <= 2
            seen += [a["publicId"] for a in body["data"]]
            pages, after = pages + 1, body["moreAfter"]
            if after is None:
                break
            assert after.startswith("+/+/")  # opaque, and only survives URL encoding
        assert pages == 3 and seen == [a["publicId"] for a in api.sim.agent_objs]
        # an unencoded cursor turns '+' into ' ' and is refused; so is a forged one
        _, body, _ = await api.get("AgentList", params={"page-size": "2"})
        raw = URL(f"{api.href('AgentList')}?page-after={body['moreAfter']}", encoded=True)
        assert_error(*(await api.call("GET", raw))[:2], 400, "page-after")
        assert_error(*(await api.get("AgentList", params={"page-after": "abc"}))[:2], 400, "page-after")
        assert_error(*(await api.get("AgentList", params={"page-size": "0"}))[:2], 400, "page-size")
    finally:
        await close()
    api, close = await serve(IxonSim(agents=1, tags_per_agent=24))
    try:  # default page size 20
        agent = api.sim.agent_objs[0]["publicId"]
        _, body, _ = await api.get("AgentDataTagList", agent)
        assert len(body["data"]) == 20 and body["moreAfter"]
        _, body, _ = await api.get("AgentDataTagList", agent, params={"page-after": body["moreAfter"]})
        assert len(body["data"]) == 4 and body["moreAfter"] is None
    finally:
        await close()


async def test_fields_and_filters(api: Api) -> None:
    _, body, _ = await api.get("AgentList")
    assert all(set(a) == {"publicId", "name"} for a in body["data"])
    fields = "activeStatus,activeVpnSession,mqttChangedOn,company.name,dataSources(slug)"
    _, body, _ = await api.get("AgentList", params={"fields": fields})
    a0 = body["data"][0]
    assert set(a0) == {"publicId", "activeStatus", "activeVpnSession", "mqttChangedOn", "company", "dataSources"}
    assert a0["company"] == {"publicId": api.sim.company_id, "name": api.sim.company_name}
    assert {s["slug"] for s in a0["dataSources"]} == {"plc", "energy-meter"}
    assert a0["activeStatus"] in ("active", "inactive") and set(a0["activeVpnSession"]) == {"publicId"}
    assert any(a["activeVpnSession"] is None for a in body["data"])
    assert_error(*(await api.get("AgentList", params={"fields": "nope"}))[:2], 400, "fields")
    assert_error(*(await api.get("AgentList", params={"fields": "name.x"}))[:2], 400, "fields")
    ids = [a["publicId"] for a in api.sim.agent_objs]
    _, body, _ = await api.get("AgentList", params={"filters": f'eq(publicId,"{ids[1]}")'})
    assert [a["publicId"] for a in body["data"]] == [ids[1]]
    _, body, _ = await api.get("AgentList", params={"filters": f'in(publicId,"{ids[0]}","{ids[3]}")'})
    assert [a["publicId"] for a in body["data"]] == [ids[0], ids[3]]
    _, body, _ = await api.get("AgentDataAlarmOccurrenceList", ids[0])
    occ = body["data"]
    cut = occ[2]["occurredOn"]
    _, body, _ = await api.get("AgentDataAlarmOccurrenceList", ids[0], params={"filters": f'gt(occurredOn,"{cut}")'})
    assert [o["publicId"] for o in body["data"]] == [o["publicId"] for o in occ[3:]]
    _, body, _ = await api.get("AgentDataAlarmOccurrenceList", ids[0], params={"filters": "isnull(rtnOn)"})
    assert len(body["data"]) == 1
    assert_error(*(await api.get("AgentList", params={"filters": 'eq(nope,"x")'}))[:2], 400, "filters")
    _, body, _ = await api.call("GET", api.href("Agent", ids[2]), params={"fields": "*"})
    assert body["type"] == "Agent" and body["data"]["publicId"] == ids[2] and "mqttChangedOn" in body["data"]
    assert_error(*(await api.get("AgentList", params={"filters": 'like(name,"x")'}))[:2], 400, "filters")


async def test_tags_and_alarm_occurrences_shape(api: Api) -> None:
    agent = api.sim.agent_objs[0]["publicId"]
    _, body, _ = await api.get("AgentDataTagList", agent, params={"fields": "tagId,slug,source.publicId,variable.type"})
    tags = body["data"]
    assert all(isinstance(t["tagId"], int) for t in tags) and len({t["slug"] for t in tags}) == len(tags)
    assert {t["variable"]["type"] for t in tags} == {"float", "int", "bool", "str"}
    _, body, _ = await api.get("AgentDataAlarmOccurrenceList", agent, params={"fields": "*,alarm(name,severity)"})
    o = body["data"][0]
    assert set(o["alarm"]) == {"publicId", "name", "severity"} and o["alarm"]["severity"] in ("low", "medium", "high")
    assert {"occurredOn", "rtnOn", "acknowledged", "stillActiveOn", "comment"} <= set(o)
    assert any('"' in x["alarm"]["name"] and "+" in x["alarm"]["name"] for x in body["data"])  # hostile name


# -- the query languages, directly ---------------------------------------------------------------------------------
def test_fields_parse_to_nested_specs_and_refuse_bad_syntax() -> None:
    assert parse_fields("a,b.c,d(e,f.g),b(h),a.i") == {"a": {"i": None}, "b": {"c": None, "h": None},
                                                        "d": {"e": None, "f": {"g": None}}}
    assert field_spec(None, "DataTag") == {"publicId": None, "tagId": None, "name": None, "slug": None}
    for text, message in (("a(b", "Malformed fields parameter"), ("a,,b", "Malformed fields parameter"),
                          ("name.x", "Unknown field name"), ("variable.nope", "Unknown field variable.nope")):
        with pytest.raises(ApiError) as e:
            field_spec(text, "DataTag")
        assert (e.value.status, e.value.message, e.value.prop, e.value.index) == (400, message, "fields", None)


def test_projection_keeps_public_id_and_names_references() -> None:
    tag = {"publicId": "T1", "tagId": 4, "name": "Oven", "slug": "oven", "retentionPolicy": "52w",
           "source": {"publicId": "S1", "name": "PLC", "slug": "plc"},
           "variable": {"variableId": 9, "name": "Oven", "slug": "oven", "type": "float", "unit": "°C", "factor": 1}}
    schema = SCHEMAS["DataTag"]
    assert project(tag, parse_fields("slug,source,variable.unit"), schema) == {
        "publicId": "T1", "slug": "oven", "source": {"publicId": "S1", "name": "PLC"},
        "variable": {"unit": "°C"}}  # a variable has no publicId or name in its schema: only what was asked
    got = project(tag, parse_fields("*,source(slug)"), schema)
    assert list(got) == list(schema) and got["source"] == {"publicId": "S1", "slug": "plc"} and got["logEvent"] is None
    assert project([tag, None], {"tagId": None}, schema) == [{"publicId": "T1", "tagId": 4}, None]


def test_filters_evaluate_and_refuse_unknown_ops_fields_and_literals() -> None:
    schema = SCHEMAS["AlarmOccurrence"]
    occ = {"publicId": "O1", "alarm": {"name": 'Druck > 5 "bar"', "severity": "high"},
           "occurredOn": "2025-10-08T10:00:00.500Z", "rtnOn": None, "acknowledged": False}

    def holds(text: str) -> bool:
        return matches(occ, parse_filters(text, schema))

    assert parse_filters('eq(alarm.severity,"high"),in(publicId,"O1","O2")', schema) == [
        ("eq", "alarm.severity", ["high"]), ("in", "publicId", ["O1", "O2"])]
    assert holds('gt(occurredOn,"2025-10-08T12:00:00+02:00")')  # compared as instants, not text
    assert not holds('lt(occurredOn,"2025-10-08T10:00:00.5Z")')
    assert holds("isnull(rtnOn),eq(acknowledged,false)") and not holds("isnotnull(rtnOn)")
    assert holds(r'contains(alarm.name,"\"bar\"")') and holds('differs(alarm.severity,"low")')
    assert not holds('eq(alarm.severity,"high"),eq(publicId,"O2")')  # all AND-ed
    assert holds("") and matches(occ, [])
    for text, message in (('like(publicId,"x")', "Malformed filters parameter"),
                          ('eq(publicId,"x"', "Malformed filters parameter"),
                          ('eq(alarm.nope,"x")', "Unknown filter field alarm.nope"),
                          ("eq(publicId,O1)", "Filter values must be quoted strings, numbers, true, false or null")):
        with pytest.raises(ApiError) as e:
            parse_filters(text, schema)
        assert (e.value.status, e.value.message, e.value.prop) == (400, message, "filters")


def test_datalist_query_aggregates_shapes_and_refuses_bad_options() -> None:
    series = [(0, 1.0), (10, 3.0), (60_000, 10.0), (70_000, 14.0)]
    q = DataQuery.parse({"postAggr": "mean", "step": "1m", "factor": 2, "decimals": 1}, 0, 120_000, None)
    assert q.run(series, 0) == [(0, 4.0), (60_000, 24.0)]
    diff = DataQuery.parse({"postTransform": "difference", "order": "desc", "limit": 2}, 0, 120_000, None)
    assert diff.run(series, 0) == [(70_000, 4.0), (60_000, 7.0)]
    raw = DataQuery.parse({"offset": 1, "limit": 2}, 0, 120_000, None)
    assert raw.raw and list(raw.page(range(5))) == [1, 2]
    with pytest.raises(ApiError) as e:
        DataQuery.parse({"step": "5 minutes"}, 0, 120_000, 3)
    assert (e.value.status, e.value.prop, e.value.index) == (400, "tags.queries.step", 3)
    assert e.value.message == "step must be a positive number of seconds or a duration like 5m"


def data_request(tag: dict[str, Any], ref: str, start: str = "2000-01-01T00:00:00Z",
                 end: str = "2100-01-01T00:00:00Z", **query: Any) -> dict[str, Any]:
    return {"source": {"publicId": tag["source"]["publicId"]}, "start": start, "end": end, "timeZone": "UTC",
            "tags": [{"id": tag["tagId"], "preAggr": "raw", "queries": [{"ref": ref, "postAggr": "raw", **query}]}]}


async def test_datalist_envelope_validation_and_timezones(api: Api) -> None:
    tags = [t.obj for t in api.sim.tags[0]]
    req = data_request(tags[0], "t1", limit=3)
    status, body, _ = await api.call("POST", api.href("DataList"), json=req)
    assert status == 201 and body["type"] == "DataList" and body["moreAfter"] is None
    assert isinstance(body["data"], dict) and len(body["data"]["points"]) == 3
    assert all(set(p["values"]) == {"t1"} and p["time"].endswith("Z") for p in body["data"]["points"])
    status, body, _ = await api.call("POST", api.href("DataList"), json=[req, data_request(tags[2], "t3", limit=2)])
    assert status == 201 and isinstance(body["data"], list) and len(body["data"]) == 2
    assert [len(d["points"]) for d in body["data"]] == [3, 2]
    amsterdam = dict(req, timeZone="Europe/Amsterdam")
    _, body, _ = await api.call("POST", api.href("DataList"), json=amsterdam)
    assert body["data"]["points"][0]["time"][-6:] in ("+01:00", "+02:00")
    bad = [req, data_request(tags[2], "t3", postAggr="avg")]
    assert_error(*(await api.call("POST", api.href("DataList"), json=bad))[:2], 400, "tags.queries.postAggr", 1)
    r = await api.call("POST", api.href("DataList"), json=data_request(tags[0], "x", limit=5001))
    assert_error(*r[:2], 400, "tags.queries.limit")
    r = await api.call("POST", api.href("DataList"), json=dict(req, timeZone="Mars/Olympus"))
    assert_error(*r[:2], 400, "timeZone")
    assert_error(*(await api.call("POST", api.href("DataList"), json=dict(req, end=req["start"])))[:2], 400, "end")
    status, body, _ = await api.call("POST", api.href("DataList"), json=req, **{"Api-Company": None})
    assert_error(status, body, 400, "Api-Company")
    # windows are [start, end); odd tags log on whole seconds, so their times carry no milliseconds
    tag = api.sim.tags[0][1]
    iso = [datetime.fromtimestamp(tag.t(i) / 1000, UTC).isoformat() for i in (3, 5)]
    _, body, _ = await api.call("POST", api.href("DataList"), json=data_request(tag.obj, "w", iso[0], iso[1]))
    got = [round(datetime.fromisoformat(p["time"]).timestamp() * 1000) for p in body["data"]["points"]]
    assert got == [tag.t(3), tag.t(4)] and "." not in body["data"]["points"][0]["time"]
    # latest value the brief's way: postAggr last, limit 1, order desc
    _, body, _ = await api.call("POST", api.href("DataList"), json=data_request(tags[0], "l", limit=1, order="desc"))
    last = body["data"]["points"]
    _, body, _ = await api.call("POST", api.href("DataList"), json=data_request(tags[0], "l", postAggr="last"))
    assert body["data"]["points"][0]["values"] == last[0]["values"]


async def test_datalist_paging_reproduces_ground_truth(api: Api) -> None:
    got = set()
    for a, tags in enumerate(api.sim.tags):
        for tag in tags:
            offset = 0
            while True:
                req = data_request(tag.obj, "v", limit=7, offset=offset, order="asc")
                _, body, _ = await api.call("POST", api.href("DataList"), json=req)
                points = body["data"]["points"]
                for p in points:
                    v = p["values"]["v"]
                    ts = round(datetime.fromisoformat(p["time"]).timestamp() * 1000)
                    value, text = (None, v) if isinstance(v, str) else (float(v), None)
                    got.add(TruthRow("ixon", "telemetry", api.sim.company_id, api.sim.agent_objs[a]["publicId"],
                                     tag.obj["slug"], ts, value, text))
                if len(points) < 7:
                    break
                offset += 7
    truth = {r for r in api.sim.ground_truth() if r.kind == "telemetry"}
    assert got == truth and len(truth) == 5 * 9 * 30


async def test_alarms_open_and_close_between_polls_when_live() -> None:
    clock = FakeClock()
    sim = IxonSim(clock=clock, live=True, agents=1, tags_per_agent=2, points_per_tag=60, history=3600, alarms=3)
    api, close = await serve(sim)
    try:
        agent = sim.agent_objs[0]["publicId"]
        _, body, _ = await api.get("AgentDataAlarmOccurrenceList", agent)
        first = body["data"]
        assert len(first) == 3 and first[-1]["rtnOn"] is None and all(o["rtnOn"] for o in first[:-1])
        truth = sim.ground_truth()
        clock.now += 3600
        _, body, _ = await api.get("AgentDataAlarmOccurrenceList", agent)
        later = body["data"]
        assert later[2]["publicId"] == first[2]["publicId"] and later[2]["rtnOn"] is not None
        assert len(later) > 3
        grown = sim.ground_truth()
        assert set(truth) < set(grown)
        assert sum(r.kind == "telemetry" for r in grown) == sum(r.kind == "telemetry" for r in truth) + 2 * 60
        alerts = [r for r in grown if r.kind == "alert"]
        assert all(r.value is None and r.text and r.text.split(":")[0] in ("low", "medium", "high") for r in alerts)
    finally:
        await close()


def test_ground_truth_is_deterministic_and_cheap() -> None:
    clock = FakeClock()
    small = {"clock": clock, "agents": 2, "tags_per_agent": 8, "points_per_tag": 50}
    assert IxonSim(seed=5, **small).ground_truth() == IxonSim(seed=5, **small).ground_truth()
    assert IxonSim(seed=5, **small).ground_truth() != IxonSim(seed=6, **small).ground_truth()
    t = time.perf_counter()
    big = IxonSim(clock=clock, agents=1, tags_per_agent=2, points_per_tag=100_000, alarms=2)
    rows = big.ground_truth()
    assert len(rows) == 200_000 + 3 and time.perf_counter() - t < 3
    assert all(clock.now * 1000 - 86_400_000 - 60_000 <= r.ts_ms <= clock.now * 1000 - 60_000 for r in rows)


async def test_rate_limit_buffers_then_refuses() -> None:
    sim = IxonSim(agents=1, rate_limit=(5, 1000), buffer=8)
    api, close = await serve(sim)  # discovery already took one slot
    try:
        t = time.monotonic()
        results = await asyncio.gather(*(api.get("AgentList") for _ in range(9)))
        codes = sorted(r[0] for r in results)
        assert codes == [200] * 7 + [429] * 2 and time.monotonic() - t >= 0.5  # 3 waited for a slot
        refused = next(r for r in results if r[0] == 429)
        assert "Retry-After" not in refused[2].headers and refused[2].content_type == "text/plain"
        for window in (sim.intake, *sim.limits):  # a fresh second, and no 5/s queue this time
            window.hits.clear()
        sim.limits[0].limit = 100
        sim.faults.drop = True  # type: ignore[attr-defined]
        outcomes = await asyncio.gather(*(api.get("AgentList") for _ in range(10)), return_exceptions=True)
        assert sum(isinstance(o, aiohttp.ClientError) for o in outcomes) == 2
    finally:
        await close()


async def test_faults_in_vendor_shapes(api: Api) -> None:
    api.sim.faults.update({"storm_429": 1})
    status, body, r = await api.get("AgentList")
    assert status == 429 and "Retry-After" not in r.headers and isinstance(body, str)
    api.sim.faults.update({"storm_429": 1, "retry_after": 2})
    assert (await api.get("AgentList"))[2].headers["Retry-After"] == "2"
    api.sim.faults.update({"error_5xx": 2})
    status, body, r = await api.get("AgentList")
    assert status == 503 and r.content_type == "text/html"
    assert_error(*(await api.get("AgentList"))[:2], 500)
    api.sim.faults.update({"truncate": 1})
    async with api.s.get(api.href("AgentList"), headers=api.headers()) as r:
        with pytest.raises(ValueError):
            await r.json()
    api.sim.faults.update({"slow": 0.2})
    t = time.monotonic()
    assert (await api.get("AgentList"))[0] == 200 and time.monotonic() - t >= 0.2
    api.sim.faults.update({"slow": 0.0})
    async with api.s.post(f"{api.sim.url}/_sim/faults", json={"drop": True}) as r:
        assert (await r.json())["drop"] is True


# -- worse than the connector assumes -------------------------------------------------------------------------------
async def datalist_times(api: Api, tag: Any) -> list[int]:
    _, body, _ = await api.call("POST", api.href("DataList"), json=data_request(tag.obj, "v", limit=5000))
    return [round(datetime.fromisoformat(p["time"]).timestamp() * 1000) for p in body["data"]["points"]]


async def test_a_longer_lag_and_points_visible_out_of_order() -> None:
    clock = FakeClock()
    slow = IxonSim(seed=8, clock=clock, live=True, agents=1, tags_per_agent=2, points_per_tag=120, history=3600,
                   rate_limit=None, lag=300)
    uneven = IxonSim(seed=8, clock=clock, live=True, agents=1, tags_per_agent=2, points_per_tag=120, history=3600,
                     rate_limit=None, lag=10, lag_max=300)
    api, close = await serve(slow)
    api2, close2 = await serve(uneven)
    try:
        tag, tag2 = slow.tags[0][0], uneven.tags[0][0]
        times = await datalist_times(api, tag)
        assert times == sorted(times) and max(times) <= clock.now * 1000 - 300_000 < max(times) + tag.step
        before = await datalist_times(api2, tag2)
        gaps = [t for t in range(tag2.t0, max(before), tag2.step) if t not in before]
        assert gaps and min(gaps) > clock.now * 1000 - 300_000  # missing only within the last 5 minutes
        clock.now += 300
        after = await datalist_times(api2, tag2)
        assert set(gaps) <= set(after) and after == sorted(after)
        truth = {r.ts_ms for r in uneven.ground_truth() if r.kind == "telemetry" and r.metric == tag2.obj["slug"]}
        assert truth == set(after)
    finally:
        await close()
        await close2()
