"""The Navixy simulator against its brief: auth forms, envelopes, methods, paging, errors, limits, faults, MQTT."""

from __future__ import annotations

import asyncio
import calendar
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import aiomqtt
import pytest

from syncd.sim.common import sims_in_thread, start_sims
from syncd.sim.navixy import NavixySim


class FakeClock:
    def __init__(self, t: float = 1_750_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def call(sim: NavixySim, method: str, path: str, body: Any = None, *, key: str | None = "default",
         headers: dict[str, str] | None = None, raw: bytes | None = None) -> tuple[int, Any, dict[str, str]]:
    """One request; `key` goes in `Authorization: NVX <key>` (None: no header)."""
    hdrs = dict(headers or {})
    if key is not None:
        hdrs.setdefault("Authorization", f"NVX {sim.api_key if key == 'default' else key}")
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    if data is not None:
        hdrs.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(sim.url + path, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            status, payload, rh = resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as err:
        status, payload, rh = err.code, err.read(), dict(err.headers)
    try:
        return status, json.loads(payload), rh
    except ValueError:
        return status, payload, rh


@pytest.fixture
def sim() -> Iterator[NavixySim]:
    with sims_in_thread([NavixySim(seed=3, clock=FakeClock())]) as (s,):
        yield s  # type: ignore[misc]


def assert_fail(resp: tuple[int, Any, dict[str, str]], http: int, code: int) -> None:
    status, body, _ = resp
    assert status == http, body
    assert body["success"] is False and body["status"]["code"] == code
    assert isinstance(body["status"]["description"], str)
    assert ("errors" in body) == (http == 400)


# -- auth ---------------------------------------------------------------------------
def test_auth_forms(sim: NavixySim) -> None:
    assert call(sim, "GET", "/v2/iot/logic/flow/list")[0] == 200
    assert call(sim, "POST", "/v2/iot/logic/flow/endpoint/list", {"hash": sim.api_key}, key=None)[0] == 200
    assert call(sim, "GET", f"/v2/iot/logic/flow/list?hash={sim.api_key}", key=None)[0] == 200
    assert_fail(call(sim, "GET", "/v2/iot/logic/flow/list", headers={"Authorization": f"NVX{sim.api_key}"}), 401, 14)
    assert_fail(call(sim, "GET", "/v2/iot/logic/flow/list", headers={"Authorization": f"Bearer {sim.api_key}"}),
                401, 14)
    assert_fail(call(sim, "GET", "/v2/iot/logic/flow/list", key=None), 401, 14)
    assert_fail(call(sim, "GET", "/v2/iot/logic/flow/list", key="0" * 32), 401, 3)
    assert_fail(call(sim, "GET", "/v2/iot/logic/flow/list", key=sim.revoked_key), 401, 4)
    # a hash in a GET body is not a credential
    assert_fail(call(sim, "GET", f"/v2/tracker/list?x={sim.api_key}", key=None), 401, 14)


def test_session_hash_login_idle_expiry_and_key_revocation(sim: NavixySim) -> None:
    assert_fail(call(sim, "POST", "/v2/user/auth", {"login": sim.login, "password": "nope"}, key=None), 401, 4)
    assert_fail(call(sim, "POST", "/v2/user/auth", {"login": sim.login}, key=None), 400, 7)
    status, body, _ = call(sim, "POST", "/v2/user/auth", {"login": sim.login, "password": sim.password}, key=None)
    assert status == 200 and body["success"] is True and len(body["hash"]) == 32
    session = body["hash"]
    assert call(sim, "GET", "/v2/iot/logic/flow/list", key=session)[0] == 200
    # managing keys needs a session hash, not a key
    assert_fail(call(sim, "POST", "/v2/user/api_key/list", {}), 403, 7)
    assert [k["hash"] for k in call(sim, "POST", "/v2/user/api_key/list", {}, key=session)[1]["list"]] == [sim.api_key]
    assert call(sim, "POST", "/v2/user/api_key/delete", {"api_key": sim.api_key}, key=session)[0] == 200
    assert_fail(call(sim, "GET", "/v2/iot/logic/flow/list"), 401, 4)
    clock: FakeClock = sim.clock  # type: ignore[assignment]
    clock.t += 29 * 86400  # activity inside the window keeps the hash alive
    assert call(sim, "GET", "/v2/iot/logic/flow/list", key=session)[0] == 200
    clock.t += 30 * 86400 + 1
    assert_fail(call(sim, "GET", "/v2/iot/logic/flow/list", key=session), 401, 14)


# -- envelopes, ids, methods ----------------------------------------------------------
def test_inventory_envelopes(sim: NavixySim) -> None:
    flows = call(sim, "GET", "/v2/iot/logic/flow/list")[1]
    assert flows["success"] is True
    by_id = {f["id"]: f for f in flows["list"]}
    assert {(f["enabled"], f["default_flow"]) for f in by_id.values()} == {(True, True), (True, False), (False, False)}
    for f in by_id.values():
        assert set(f) == {"id", "title", "description", "enabled", "default_flow", "modified", "devices_count"}
        time.strptime(f["modified"], "%Y-%m-%dT%H:%M:%SZ")
    trackers = call(sim, "POST", "/v2/tracker/list", {})[1]["list"]
    assert call(sim, "GET", "/v2/tracker/list")[1]["list"] == trackers
    assert not {t["id"] for t in trackers} & {t["source"]["id"] for t in trackers}
    assert all(isinstance(t["source"]["device_id"], str) for t in trackers)
    assert any('"' in t["label"] and "#" in t["label"] for t in trackers)
    assert sum(f["devices_count"] for f in by_id.values()) == len(trackers)

    endpoints = call(sim, "POST", "/v2/iot/logic/flow/endpoint/list", {})[1]["list"]
    assert {e["type"] for e in endpoints} == {"output_default", "output_mqtt_client"}
    assert all(set(e) == {"id", "title", "type", "description"} for e in endpoints)
    for e in endpoints:
        value = call(sim, "POST", "/v2/iot/logic/flow/endpoint/read", {"endpoint_id": e["id"]})[1]["value"]
        assert value["status"] in {"active", "waiting_reconnect", "suspend", "disabled"}
        if e["type"] == "output_mqtt_client":
            assert value["properties"]["qos"] == 1 and value["properties"]["topics"]
    assert_fail(call(sim, "POST", "/v2/iot/logic/flow/endpoint/read", {"endpoint_id": 1}), 404, 201)
    assert_fail(call(sim, "POST", "/v2/iot/logic/flow/endpoint/read", {"endpoint_id": "1723"}), 400, 7)

    for fid, f in by_id.items():
        value = call(sim, "GET", f"/v2/iot/logic/flow/read?flow_id={fid}")[1]["value"]
        assert value["id"] == fid and value["enabled"] == f["enabled"] and value["edges"]
        kinds = {n["type"] for n in value["nodes"]}
        assert {"data_source", "output_endpoint"} <= kinds
    assert_fail(call(sim, "GET", "/v2/iot/logic/flow/read?flow_id=999"), 404, 201)
    assert_fail(call(sim, "GET", "/v2/iot/logic/flow/read"), 400, 7)

    default_id = next(fid for fid, f in by_id.items() if f["default_flow"])
    unassigned = call(sim, "GET", "/v2/iot/logic/flow/sources/list?flow_id=0")[1]["value"]
    assert len(unassigned) == by_id[default_id]["devices_count"] > 0
    assert set(unassigned) <= {t["source"]["id"] for t in trackers}

    attrs = call(sim, "POST", "/v2/iot/logic/flow/sources/attribute/list", {})[1]["list"]
    assert {"name": "engine_temperature_celsius", "in_iot_flow": True, "received": True} in attrs
    assert {"name": "speed", "received": True} in attrs  # false flags are omitted
    only = call(sim, "POST", "/v2/iot/logic/flow/sources/attribute/list", {"include_only_iot_flow_attributes": True})
    assert all(a.get("in_iot_flow") for a in only[1]["list"])
    tracker_ids = call(sim, "POST", "/v2/iot/logic/flow/sources/attribute/list", {"source_ids": [trackers[0]["id"]]})
    assert tracker_ids[1]["list"] == []  # a tracker id is not a source id: silently nothing
    assert_fail(call(sim, "POST", "/v2/iot/logic/flow/sources/attribute/list", {"source_ids": []}), 400, 7)

    info = call(sim, "GET", "/v2/user/get_info")[1]
    assert info["user_info"]["id"] == sim.user_id


def test_endpoint_create(sim: NavixySim) -> None:
    props = {"protocol": "NGP", "domain": "broker.example", "port": 1883, "client_id": "c", "qos": 1,
             "topics": ["a/b"], "version": "5.0", "use_ssl": False, "mqtt_auth": False}
    ep = {"type": "output_mqtt_client", "title": "New", "status": "active", "properties": props}
    status, body, _ = call(sim, "POST", "/v2/iot/logic/flow/endpoint/create", {"endpoint": ep})
    assert status == 200 and body == {"success": True, "id": body["id"]} and isinstance(body["id"], int)
    read = call(sim, "POST", "/v2/iot/logic/flow/endpoint/read", {"endpoint_id": body["id"]})[1]["value"]
    assert read["properties"]["topics"] == ["a/b"]
    bad = {**ep, "properties": {**props, "qos": 2}}
    resp = call(sim, "POST", "/v2/iot/logic/flow/endpoint/create", {"endpoint": bad})
    assert_fail(resp, 400, 293)
    assert "qos" in resp[1]["errors"][0]["message"]


def test_wrong_method_bad_json_unknown_path(sim: NavixySim) -> None:
    assert_fail(call(sim, "GET", "/v2/iot/logic/flow/endpoint/list"), 400, 112)
    assert_fail(call(sim, "POST", "/v2/iot/logic/flow/list", {}), 400, 112)
    assert_fail(call(sim, "POST", "/v2/iot/logic/flow/sources/attribute/list", raw=b'{"source_ids": [1,'), 400, 7)
    assert_fail(call(sim, "POST", "/v2/iot/logic/flow/endpoint/list", raw=b"[]"), 400, 7)
    assert_fail(call(sim, "POST", "/v2/iot/logic/flow/endpoint/list", raw=b"{}",
                     headers={"Content-Type": "text/plain"}), 400, 7)
    assert_fail(call(sim, "GET", "/v2/iot/logic/flow/nope"), 404, 201)
    assert_fail(call(sim, "GET", "/iot/logic/flow/list"), 404, 201)  # the /v2 prefix is part of the API root


# -- paging ---------------------------------------------------------------------------
def test_mapping_list_paging() -> None:
    with sims_in_thread([NavixySim(seed=5, clock=FakeClock(), trackers=25_000)]) as (s,):
        first = call(s, "GET", "/v2/iot/logic/flow/sources/mapping/list")[1]  # type: ignore[arg-type]
        assert first["count"] == 25_000 and len(first["list"]) == 10_000  # default limit
        seen, offset = [], 0
        while True:
            page = call(s, "GET", f"/v2/iot/logic/flow/sources/mapping/list?offset={offset}&limit=7000")[1]  # type: ignore[arg-type]
            seen += page["list"]
            offset += len(page["list"])
            if offset >= page["count"]:
                break
        assert len({r["device_id"] for r in seen}) == 25_000
        assert set(seen[0]) == {"device_id", "device_title", "model_code", "flow_id", "flow_title", "node_id",
                                "node_title"}
        tail = call(s, "GET", "/v2/iot/logic/flow/sources/mapping/list?offset=30000")[1]  # type: ignore[arg-type]
        assert tail["list"] == [] and tail["count"] == 25_000
        assert_fail(call(s, "GET", "/v2/iot/logic/flow/sources/mapping/list?limit=100001"), 400, 212)  # type: ignore[arg-type]
        assert_fail(call(s, "GET", "/v2/iot/logic/flow/sources/mapping/list?offset=-1"), 400, 7)  # type: ignore[arg-type]
        assert_fail(call(s, "GET", "/v2/iot/logic/flow/sources/mapping/list?limit=0"), 400, 7)  # type: ignore[arg-type]


# -- limits and faults ------------------------------------------------------------------
def test_rate_limit_per_key_and_ip(sim: NavixySim) -> None:
    for _ in range(50):
        assert call(sim, "GET", "/v2/iot/logic/flow/list")[0] == 200
    status, body, headers = call(sim, "GET", "/v2/iot/logic/flow/list")
    assert_fail((status, body, headers), 429, 15)
    assert "Retry-After" not in headers
    assert_fail(call(sim, "POST", "/v2/user/auth", {"login": sim.login, "password": sim.password}, key=None), 429, 15)
    sim.clock.t += 1.01  # type: ignore[attr-defined]
    assert call(sim, "GET", "/v2/iot/logic/flow/list")[0] == 200


def test_rate_limit_can_be_disabled() -> None:
    with sims_in_thread([NavixySim(clock=FakeClock(), rate_limit=None)]) as (s,):
        assert all(call(s, "GET", "/v2/iot/logic/flow/list")[0] == 200 for _ in range(60))  # type: ignore[arg-type]


def test_faults(sim: NavixySim) -> None:
    status, switches, _ = call(sim, "POST", "/_sim/faults", {"storm_429": 1}, key=None)  # the control plane
    assert status == 200 and switches["storm_429"] == 1
    assert_fail(call(sim, "GET", "/v2/iot/logic/flow/list"), 429, 15)
    sim.faults.update({"error_5xx": 2})
    assert_fail(call(sim, "GET", "/v2/iot/logic/flow/list"), 503, 8)
    assert_fail(call(sim, "GET", "/v2/iot/logic/flow/list"), 500, 1)
    sim.faults.update({"truncate": 1})
    status, body, _ = call(sim, "GET", "/v2/iot/logic/flow/list")
    assert status == 200 and isinstance(body, bytes)
    with pytest.raises(ValueError):
        json.loads(body)
    sim.faults.update({"expired": True})
    assert_fail(call(sim, "GET", "/v2/iot/logic/flow/list"), 401, 4)
    sim.faults.update({"expired": False, "slow": 0.2})
    t0 = time.monotonic()
    assert call(sim, "GET", "/v2/iot/logic/flow/list")[0] == 200
    assert time.monotonic() - t0 >= 0.2


def test_deterministic_and_source_config() -> None:
    a, b = NavixySim(seed=9, clock=FakeClock()), NavixySim(seed=9, clock=FakeClock())
    assert a.message(0, 1_750_000_000) == b.message(0, 1_750_000_000) and a.flows() == b.flows()
    assert NavixySim(seed=10).message(0, 1_750_000_000) != a.message(0, 1_750_000_000)
    a.url = "http://127.0.0.1:1"
    assert a.source_config() == {"vendor": "navixy", "base_url": "http://127.0.0.1:1/v2", "api_key": a.api_key}
    c = NavixySim(mqtt_url="mqtt://u:p@127.0.0.1:1884")
    c.url = "http://h:2"
    cfg = c.source_config()
    assert cfg["mqtt_url"] == "mqtt://127.0.0.1:1884" and cfg["mqtt_username"] == "u" and cfg["mqtt_password"] == "p"
    assert cfg["topics"] == ["fleet/navixy/ngp", "fleet/navixy/ngp-mirror"]


# -- MQTT push -------------------------------------------------------------------------
def flatten(prefix: str, v: Any) -> Iterator[tuple[str, float | None, str | None]]:
    """The test's own reading of §8: dotted keys; lists and nulls dropped; bools 1/0."""
    if isinstance(v, dict):
        for k, sub in v.items():
            yield from flatten(f"{prefix}.{k}" if prefix else k, sub)
    elif isinstance(v, bool):
        yield prefix, 1.0 if v else 0.0, None
    elif isinstance(v, int | float):
        yield prefix, float(v), None
    elif isinstance(v, str):
        yield prefix, None, v


async def collect(url: str, got: list[aiomqtt.Message], ready: asyncio.Event, mirrored: asyncio.Event,
                  want: int) -> None:
    """Subscribe to everything; set `mirrored` once `want` messages arrived on the mirror topic."""
    u = urlsplit(url)
    async with aiomqtt.Client(u.hostname or "", u.port or 1883) as client:
        await client.subscribe("#", qos=1)
        ready.set()
        async for msg in client.messages:
            got.append(msg)
            if sum(m.topic.value.endswith("-mirror") for m in got) >= want:
                mirrored.set()


async def received_truth(sim: NavixySim, got: list[aiomqtt.Message]) -> set[tuple[Any, ...]]:
    async with aiohttp.ClientSession(headers={"Authorization": f"NVX {sim.api_key}"}) as http:
        async with http.get(sim.url + "/v2/user/get_info") as r:
            tenant = str((await r.json())["user_info"]["id"])
    rows = set()
    for m in got:
        ngp = json.loads(m.payload)  # type: ignore[arg-type]
        ts = calendar.timegm(time.strptime(ngp["message_time"], "%Y-%m-%dT%H:%M:%SZ")) * 1000
        device = ngp["device_id"]  # listed in tracker/list or not: the one id every message carries
        body = {k: v for k, v in ngp.items() if k not in ("device_id", "message_time", "version", "event_id")}
        rows |= {("navixy", "telemetry", tenant, device, metric, ts, val, text)
                 for metric, val, text in flatten("", body)}
    return rows


async def test_publish_reaches_mqtt_topics_and_truth_matches(mosquitto: Any) -> None:
    sim = NavixySim(seed=4, clock=FakeClock(), mqtt_url=mosquitto.url)
    runners = await start_sims([sim])
    got: list[aiomqtt.Message] = []
    ready, mirrored = asyncio.Event(), asyncio.Event()
    sub = asyncio.create_task(collect(mosquitto.url, got, ready, mirrored, want=15))
    try:
        await asyncio.wait_for(ready.wait(), 5)
        await sim.publish(12)
        sim.clock.t += 5  # type: ignore[attr-defined]
        await sim.publish(3)
        await asyncio.wait_for(mirrored.wait(), 5)
        await asyncio.sleep(0.1)  # stragglers on the other topic
        topics = {m.topic.value for m in got}
        assert topics == {"fleet/navixy/ngp", "fleet/navixy/ngp-mirror"}  # never the disabled flow's topic
        assert len(got) >= 30  # 15 messages x 2 topics (+ QoS 1 repeats)
        per_device: dict[str, list[str]] = {}
        for m in got:
            if m.topic.value == "fleet/navixy/ngp-mirror":
                ngp = json.loads(m.payload)  # type: ignore[arg-type]
                per_device.setdefault(ngp["device_id"], []).append(ngp["message_time"])
                assert isinstance(ngp["location"], dict) and isinstance(ngp["is_moving"], bool)
        assert all(t == sorted(t) and len(set(t)) == len(t) for t in per_device.values())
        assert sim.orphan in per_device and len(per_device) == len(sim.publishers())
        truth = {tuple(vars(r).values()) for r in sim.ground_truth()}
        assert len(truth) == len(sim.ground_truth())  # already deduplicated
        assert truth == await received_truth(sim, got)
        metrics = {r[4] for r in truth}
        assert {"location.speed", "engine_temperature_celsius", 'custom_Füllstand "Silo/2" #+$'} <= metrics
        assert not any(m.startswith("mobile_cells") for m in metrics)
        assert sim.orphan in {r[3] for r in truth}
    finally:
        sub.cancel()
        for r in runners:
            await r.cleanup()


async def test_live_publishing_and_endpoint_status(mosquitto: Any) -> None:
    sim = NavixySim(seed=2, live=True, mqtt_url=mosquitto.url, publish_rate=40)
    runners = await start_sims([sim])  # serving a live sim starts the stream
    await asyncio.sleep(0.4)
    for r in runners:
        await r.cleanup()
    assert sim._task is None and sim.ground_truth() and sim.endpoint_status(1723) == "active"
    count = len(sim.ground_truth())
    await sim.start_publishing(40)
    await asyncio.sleep(0.2)
    await sim.stop_publishing()
    assert len(sim.ground_truth()) > count
    dead = NavixySim(mqtt_url="mqtt://127.0.0.1:1")
    with pytest.raises(aiomqtt.MqttError):
        await dead.publish(1)
    assert dead.endpoint_status(1723) == "waiting_reconnect" and dead.ground_truth() == []
    clock = FakeClock()
    outage = NavixySim(live=True, clock=clock)
    clock.t += 14 * 60 + 1
    assert outage.endpoint_status(1723) == "waiting_reconnect"
    poll = outage.status_truth(123)
    assert {r.device for r in poll} == {"flow:4087", "flow:4101", "flow:4123", "endpoint:1701", "endpoint:1723",
                                        "endpoint:1731"}


# -- worse than the connector assumes -------------------------------------------------------------------------------
def test_unlisted_trackers_appear_on_list_trackers() -> None:
    sim = NavixySim(seed=6, trackers=7, rate_limit=None, unlisted=(0, 2))
    with sims_in_thread([sim]):
        first = call(sim, "POST", "/v2/tracker/list", {})[1]["list"]
        mapping = call(sim, "GET", "/v2/iot/logic/flow/sources/mapping/list?limit=2&offset=3")[1]
        sim.list_trackers()
        later = call(sim, "POST", "/v2/tracker/list", {})[1]["list"]
    assert [t["source"]["device_id"] for t in first] == [sim.imei(i) for i in (1, 3, 4, 5, 6)]
    assert mapping["count"] == 5 and [r["device_id"] for r in mapping["list"]] == [sim.source_id(5), sim.source_id(6)]
    assert [t["id"] for t in later] == [sim.tracker(i)["id"] for i in range(7)]
    assert 0 in sim.publishers()  # it publishes all along


async def test_redeliver_publishes_every_message_again(mosquitto: Any) -> None:
    sim = NavixySim(seed=7, clock=FakeClock(), trackers=3, mqtt_url=mosquitto.url)
    runners = await start_sims([sim])
    got: list[aiomqtt.Message] = []
    ready, mirrored = asyncio.Event(), asyncio.Event()
    sub = asyncio.create_task(collect(mosquitto.url, got, ready, mirrored, want=12))
    try:
        await asyncio.wait_for(ready.wait(), 5)
        await sim.publish(6)
        truth = sim.ground_truth()
        await sim.redeliver()
        await asyncio.wait_for(mirrored.wait(), 5)
        mirror = [json.loads(m.payload) for m in got if m.topic.value.endswith("-mirror")]  # type: ignore[arg-type]
        assert len(mirror) == 12 and sorted(map(str, mirror[6:])) == sorted(map(str, mirror[:6]))
        assert sim.ground_truth() == truth  # nothing new: the same messages again
    finally:
        sub.cancel()
        for r in runners:
            await r.cleanup()
