"""The IoT Open simulator against its brief (shared/vendors/iotopen.md §7), over real sockets."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from syncd.sim.common import sims_in_thread
from syncd.sim.iotopen import IotOpenSim

T0 = 1_700_000_000.0


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def call(sim: IotOpenSim, method: str, path: str, query: Any = None, body: Any = None,
         headers: dict[str, str] | None = None, key: str | None = "default") -> tuple[int, dict[str, str], Any]:
    """One HTTP request; returns (status, headers, parsed JSON or raw bytes when the body is not JSON)."""
    url = sim.url + path + ("?" + urllib.parse.urlencode(query, doseq=True) if query else "")
    hdrs = {"Accept": "application/json", **(headers or {})}
    if key == "default":
        hdrs["X-API-Key"] = sim.api_key
    elif key is not None:
        hdrs["X-API-Key"] = key
    data = json.dumps(body).encode() if body is not None else None
    if data is not None:
        hdrs["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            status, rh, raw = resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        status, rh, raw = err.code, dict(err.headers), err.read()
    try:
        return status, rh, json.loads(raw) if raw else None
    except ValueError:
        return status, rh, raw


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def sim(clock: Clock) -> Iterator[IotOpenSim]:
    with sims_in_thread([IotOpenSim(seed=3, clock=clock)]) as (s,):
        yield s


def page_all(sim: IotOpenSim, iid: int, limit: int, order: str = "asc", **extra: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    query = {"from": int(sim.anchor) - 86_000, "to": int(sim.anchor), "limit": limit, "order": order, **extra}
    while True:
        status, _, page = call(sim, "GET", f"/api/v3beta/log/{iid}", {**query, "offset": len(out)})
        assert status == 200
        assert page["count"] == len(page["data"])
        out += page["data"]
        if page["count"] == 0 or len(out) >= page["total"]:
            return out


# -- auth -----------------------------------------------------------------------
def test_auth_forms(sim: IotOpenSim) -> None:
    ok = [{"X-API-Key": sim.api_key}, {"Authorization": f"Bearer {sim.api_key}"}, basic("anything", sim.api_key)]
    for headers in ok:
        assert call(sim, "GET", "/api/v2/installationinfo", headers=headers, key=None)[0] == 200
    bad = [{}, {"X-API-Key": "nope"}, {"Authorization": sim.api_key}, basic(sim.username, sim.password),
           {"Authorization": f"Token {sim.api_key}"}]
    for headers in bad:
        assert call(sim, "GET", "/api/v2/installationinfo", headers=headers, key=None)[::2] == (
            401, {"message": "Unauthorized"})
    assert call(sim, "GET", "/api/v2/installationinfo", {"X-API-Key": sim.api_key}, key=None)[0] == 401


def test_login_basic_only_and_logout(sim: IotOpenSim) -> None:
    status, _, body = call(sim, "POST", "/api/v2/auth", headers=basic(sim.username, sim.password), key=None)
    assert status == 200 and set(body) == {"token"} and len(body["token"]) == 32
    token = body["token"]
    assert call(sim, "GET", "/api/v2/organization", {"minimal": "true"}, key=token)[2][0] == {
        "id": 2, "name": "Fastighets AB Exempel", "parent": 0}
    json_login = {"username": sim.username, "password": sim.password}
    assert call(sim, "POST", "/api/v2/auth", body=json_login, key=None)[0] == 401
    assert call(sim, "POST", "/api/v2/auth", headers=basic(sim.username, "wrong"), key=None)[::2] == (
        401, {"message": "Unauthorized"})
    assert call(sim, "DELETE", "/api/v2/auth", key=token)[0] == 200
    assert call(sim, "GET", "/api/v2/installationinfo", key=token)[0] == 401
    assert call(sim, "DELETE", "/api/v2/auth")[0] == 200  # the static key survives a logout
    assert call(sim, "GET", "/api/v2/installationinfo")[0] == 200


def test_sms_two_factor(sim: IotOpenSim) -> None:
    status, _, body = call(sim, "POST", "/api/v2/auth", headers=basic(sim.sms_username, sim.sms_password), key=None)
    assert status == 200 and body["nextstep"] == "smslogin"
    first = body["token"]
    assert call(sim, "GET", "/api/v2/installationinfo", key=first)[0] == 401
    assert call(sim, "PUT", "/api/v2/auth", body={"challenge": "000000x"}, key=first)[0] == 401
    assert call(sim, "PUT", "/api/v2/auth", body={"challenge": sim.sms_code}, key=sim.api_key)[0] == 401
    status, _, body = call(sim, "PUT", "/api/v2/auth", body={"challenge": sim.sms_code}, key=first)
    assert status == 200 and set(body) == {"token"}
    assert call(sim, "GET", "/api/v2/installationinfo", key=body["token"])[0] == 200
    assert call(sim, "PUT", "/api/v2/auth", body={"challenge": sim.sms_code}, key=first)[0] == 401  # one-shot


def test_expired_credentials(sim: IotOpenSim, clock: Clock) -> None:
    old = call(sim, "POST", "/api/v2/auth", headers=basic(sim.username, sim.password), key=None)[2]["token"]
    call(sim, "POST", "/_sim/faults", body={"expired": True}, key=None)
    assert call(sim, "GET", "/api/v2/installationinfo")[::2] == (401, {"message": "Unauthorized"})
    assert call(sim, "GET", "/api/v2/installationinfo", key=old)[0] == 401
    new = call(sim, "POST", "/api/v2/auth", headers=basic(sim.username, sim.password), key=None)[2]["token"]
    assert call(sim, "GET", "/api/v2/installationinfo", key=new)[0] == 200
    call(sim, "POST", "/_sim/faults", body={"expired": False}, key=None)
    assert call(sim, "GET", "/api/v2/installationinfo")[0] == 200
    clock.now += 366 * 86_400  # login keys live one year, web-UI keys forever
    assert call(sim, "GET", "/api/v2/installationinfo", key=new)[0] == 401
    assert call(sim, "GET", "/api/v2/installationinfo")[0] == 200


# -- inventory -------------------------------------------------------------------
def test_installationinfo_assigned_orgs_and_slashes(sim: IotOpenSim) -> None:
    default = call(sim, "GET", "/api/v2/installationinfo")[2]
    everything = call(sim, "GET", "/api/v2/installationinfo", {"assigned": "false"})[2]
    assert [i["id"] for i in default] == [10, 20] and [i["id"] for i in everything] == [10, 20, 30]
    assert everything[2]["assigned"] is False
    assert set(everything[0]) == {"id", "name", "client_id", "organization_id", "capabilities", "assigned"}
    assert any(c in i["name"] for i in everything for c in '#+"$')  # hostile name for sanitisers
    by_org = call(sim, "GET", "/api/v2/installationinfo", {"assigned": "false", "organization_id": [5]})[2]
    assert [i["id"] for i in by_org] == [20]
    both = call(sim, "GET", "/api/v2/installationinfo", {"assigned": "0", "organization_id": [2, 5]})[2]
    assert len(both) == 3
    for path in ("/api/v2/installationinfo/1030", "/api/v2/installationinfo///1030"):
        assert call(sim, "GET", path)[2]["id"] == 30
    assert call(sim, "GET", "/api/v2/installationinfo/9999")[::2] == (403, {"message": "Forbidden"})
    assert call(sim, "GET", "/api/v2/status/990")[::2] == (403, {"message": "Forbidden"})
    full = call(sim, "GET", "/api/v2/installation")[2]
    assert {"created", "users", "meta", "notes"} <= set(full[0]) and isinstance(full[0]["created"], int)


def test_functionx_devicex(sim: IotOpenSim) -> None:
    fns = call(sim, "GET", "/api/v2/functionx/10")[2]
    devs = call(sim, "GET", "/api/v2/devicex/10")[2]
    status = call(sim, "GET", "/api/v2/status/10")[2]
    reads = {f["meta"]["topic_read"] for f in fns}
    assert {s["topic"] for s in status} - reads  # a topic with no FunctionX: device falls back to client_id
    assert len(reads) == len(fns)  # topic_read is unambiguous
    assert any(not isinstance(v, str) for d in devs for v in d["meta"].values())  # numeric meta to coerce
    assert any(not isinstance(f["meta"]["device_id"], str) for f in fns)
    dev_ids = {d["id"] for d in devs}
    assert all(int(f["meta"]["device_id"]) in dev_ids for f in fns)
    assert any('"' in f["meta"]["name"] and "#" in f["meta"]["name"] for f in fns)
    temps = call(sim, "GET", "/api/v2/functionx/10", {"type": "temperature"})[2]
    assert [f["type"] for f in temps] == ["temperature"]
    wild = call(sim, "GET", "/api/v2/functionx/10", {"topic_read": "*/zwave/*"})[2]
    assert len(wild) == 2
    assert call(sim, "GET", f"/api/v2/functionx/10/{fns[0]['id']}")[2] == fns[0]
    assert call(sim, "GET", "/api/v2/devicex/10/77777")[::2] == (404, {"message": "Not found"})


# -- status and logs ---------------------------------------------------------------
def test_status_shape_filters_and_post(sim: IotOpenSim) -> None:
    status = call(sim, "GET", "/api/v2/status/10")[2]
    assert len(status) == 8
    for s in status:
        assert isinstance(s["value"], int | float) and isinstance(s["timestamp"], int | float)
        assert s["client_id"] == 1010 and s["installation_id"] == 10
        assert s.get("msg", "x") != ""  # msg only when set
    assert any("msg" in s for s in status) and any("msg" not in s for s in status)
    two = [status[0]["topic"], status[5]["topic"]]
    assert call(sim, "GET", "/api/v2/status/10", {"topics": two})[2] == [status[0], status[5]]
    assert call(sim, "GET", "/api/v2/status/10", {"topics": ",".join(two)})[2] == []  # repeatable, not a list
    assert call(sim, "POST", "/api/v2/status/10", body=two)[2] == [status[0], status[5]]
    assert call(sim, "POST", "/api/v2/status/10", body={"topics": two})[0] == 400


def test_live_values_appear_after_propagation(clock: Clock) -> None:
    sim = IotOpenSim(seed=5, clock=clock, live=True, installations=1, topics_per_installation=2, log_points=720)
    with sims_in_thread([sim]):
        first = call(sim, "GET", "/api/v2/status/10")[2]
        newest_ms = round(max(s["timestamp"] for s in first) * 1000)
        t = sim.topics[0]  # its next point in the live series:
        nxt = sim._ts(t, sim._count_le(t, int(clock.now * 1000) - 5000))
        assert nxt > newest_ms
        clock.now = nxt / 1000 + 4.9  # generated, not yet propagated
        assert all(round(s["timestamp"] * 1000) != nxt for s in call(sim, "GET", "/api/v2/status/10")[2])
        clock.now = nxt / 1000 + 5.0
        assert any(round(s["timestamp"] * 1000) == nxt for s in call(sim, "GET", "/api/v2/status/10")[2])
        assert max(r.ts_ms for r in sim.ground_truth()) == nxt


def test_log_v3_paging_envelope_and_defaults(sim: IotOpenSim) -> None:
    asc = page_all(sim, 10, limit=97)
    desc = page_all(sim, 10, limit=50, order="desc")
    assert asc == desc[::-1] and len(asc) == len({(r["topic"], r["timestamp"]) for r in asc})
    keys = [(r["timestamp"], r["topic"]) for r in asc]
    assert [k[0] for k in keys] == sorted(k[0] for k in keys)
    assert all("msg" in r for r in asc)
    seconds = [int(r["timestamp"]) for r in asc]
    assert len(set(seconds)) < len(seconds)  # several points share a whole second
    _, _, page = call(sim, "GET", "/api/v3beta/log/10", {"limit": 5, "offset": 3})  # defaults: last 24 h, desc
    assert set(page) == {"count", "last", "total", "data"} and page["total"] == len(asc) and page["count"] == 5
    assert page["data"] == desc[3:8] and page["last"] == page["data"][-1]["timestamp"]
    _, _, asc_page = call(sim, "GET", "/api/v3beta/log/10", {"limit": 4, "order": "asc"})
    assert asc_page["last"] == asc_page["data"][0]["timestamp"]  # oldest, whatever the order
    _, _, empty = call(sim, "GET", "/api/v3beta/log/10", {"offset": 10**6})
    assert empty == {"count": 0, "last": 0, "total": len(asc), "data": []}
    for bad in ({"order": "up"}, {"from": "yesterday"}, {"limit": "-1"}):
        status, _, body = call(sim, "GET", "/api/v3beta/log/10", bad)
        assert status == 400 and set(body) == {"message"}


def test_log_v3_window_topics_and_post(sim: IotOpenSim) -> None:
    rows = page_all(sim, 20, limit=10_000)
    mid = rows[len(rows) // 2]["timestamp"]
    lo, hi = int(mid) - 600, int(mid)  # whole seconds, both ends inclusive
    q = {"from": lo, "to": hi, "order": "asc"}
    window = call(sim, "GET", "/api/v3beta/log/20", q)[2]["data"]
    assert window == [r for r in rows if lo <= r["timestamp"] <= hi]
    frac = call(sim, "GET", "/api/v3beta/log/20", {**q, "from": lo + 0.5, "to": hi + 0.25})[2]["data"]
    assert frac == [r for r in rows if lo + 0.5 <= r["timestamp"] <= hi + 0.25]
    topics = sorted({r["topic"] for r in rows})[:3]
    want = [r for r in rows if r["topic"] in topics]
    repeated = call(sim, "GET", "/api/v3beta/log/20", {"topics": topics, "order": "asc", "limit": 10**6})[2]
    comma = call(sim, "GET", "/api/v3beta/log/20", {"topics": ",".join(topics), "order": "asc", "limit": 10**6})[2]
    posted = call(sim, "POST", "/api/v3beta/log/20?order=asc&limit=1000000", body=topics)[2]
    assert repeated["data"] == comma["data"] == posted["data"] == want and repeated["total"] == len(want)


def test_log_v2_limit_before_function_filter(sim: IotOpenSim) -> None:
    newest = call(sim, "GET", "/api/v3beta/log/10", {"limit": 40})[2]["data"]
    unmatched = sum(1 for r in newest if "/alarm/" in r["topic"])
    v2 = call(sim, "GET", "/api/v2/log/10", {"limit": 40})[2]
    assert unmatched and len(v2) == 40 - unmatched
    assert [e["timestamp"] for e in v2] == [r["timestamp"] for r in newest if "/alarm/" not in r["topic"]]
    fields = {"id", "function_id", "function_type", "log_item_type", "name", "value", "timestamp", "message"}
    assert fields <= set(v2[0])
    assert len(call(sim, "GET", "/api/v2/log/10", {"limit": 50_000})[2]) <= 10_000


def test_ground_truth_matches_a_full_sync(sim: IotOpenSim) -> None:
    truth = sim.ground_truth()
    keys = [(r.kind, r.tenant, r.device, r.metric, r.ts_ms) for r in truth]
    assert len(keys) == len(set(keys))
    got = set()
    for inst in call(sim, "GET", "/api/v2/installationinfo", {"assigned": "false"})[2]:
        for kind, rows in (("log", page_all(sim, inst["id"], limit=1000)),
                           ("status", call(sim, "GET", f"/api/v2/status/{inst['id']}")[2])):
            for r in rows:  # every topic of an installation: device = its MQTT client id, FunctionX or not
                assert r["client_id"] == inst["client_id"] and r["topic"].startswith(f"{inst['client_id']}/")
                got.add(("iotopen", kind, str(r["installation_id"]), str(r["client_id"]),
                         r["topic"], round(r["timestamp"] * 1000), float(r["value"]), r.get("msg") or None))
    assert got == {tuple(vars(r).values()) for r in truth}
    assert sum(r.kind == "log" for r in truth) == 5000 and sum(r.kind == "status" for r in truth) == 24
    assert sim.source_config() == {"vendor": "iotopen", "base_url": sim.url, "api_key": sim.api_key}


def test_deterministic_and_large_backlog_is_cheap() -> None:
    a, b = IotOpenSim(seed=9, clock=lambda: T0), IotOpenSim(seed=9, clock=lambda: T0)
    assert a.ground_truth() == b.ground_truth() and a.api_key == b.api_key
    assert IotOpenSim(seed=10, clock=lambda: T0).ground_truth() != a.ground_truth()
    started = time.perf_counter()
    big = IotOpenSim(clock=lambda: T0, log_points=200_000)
    totals = [big._page(topics, 0, 10**13, 0, 1, desc=True)[0] for topics in big.by_inst]
    total, page = big._page(big.by_inst[1], 0, 10**13, 60_000, 500, desc=False)
    assert sum(totals) == 200_000 and total == totals[1] and len(page) == 500
    assert time.perf_counter() - started < 0.5


# -- errors and faults -------------------------------------------------------------
def test_error_shapes_and_long_get(sim: IotOpenSim) -> None:
    assert call(sim, "GET", "/api/v2/nowhere")[::2] == (404, {"message": "Not found"})
    status, headers, body = call(sim, "POST", "/api/v2/installationinfo", body=[])
    assert (status, body) == (405, {"message": "Method Not Allowed"}) and "json" in headers["Content-Type"]
    topics = [f"1010/obj/zwave/{n}/temperature" for n in range(100)]
    assert call(sim, "GET", "/api/v3beta/log/10", {"topics": topics})[::2] == (414, {"message": "Request-URI Too Long"})
    assert call(sim, "POST", "/api/v3beta/log/10", body=topics)[0] == 200  # the fallback works
    assert call(sim, "GET", "/api/v2/status/10", {"topics": topics})[0] == 414


def test_faults(sim: IotOpenSim) -> None:
    sim.faults.update({"storm_429": 1})
    status, headers, body = call(sim, "GET", "/api/v2/installationinfo")
    assert (status, body) == (429, {"message": "Too Many Requests"}) and "Retry-After" not in headers
    sim.faults.update({"storm_429": 1, "retry_after": 2})
    assert call(sim, "GET", "/api/v2/installationinfo")[1]["Retry-After"] == "2"
    sim.faults.update({"error_5xx": 2})
    codes = [call(sim, "GET", "/api/v2/installationinfo")[:3:2] for _ in range(2)]
    assert {c for c, _ in codes} == {500, 503} and all(b == {"message": "Internal Server Error"} for _, b in codes)
    sim.faults.update({"truncate": 1})
    assert isinstance(call(sim, "GET", "/api/v2/installationinfo")[2], bytes)  # cut JSON
    sim.faults.update({"slow": 0.2})
    started = time.perf_counter()
    assert call(sim, "GET", "/api/v2/installationinfo")[0] == 200
    assert time.perf_counter() - started >= 0.2


def test_optional_rate_limit(clock: Clock) -> None:
    sim = IotOpenSim(clock=clock, rate_limit=2)
    with sims_in_thread([sim]):
        assert [call(sim, "GET", "/api/v2/installationinfo")[0] for _ in range(3)] == [200, 200, 429]
        assert call(sim, "GET", "/api/v2/installationinfo")[2] == {"message": "Too Many Requests"}
        clock.now += 1.01
        assert call(sim, "GET", "/api/v2/installationinfo")[0] == 200
    assert IotOpenSim().limits == []  # none documented: off by default


# -- worse than the connector assumes -------------------------------------------------------------------------------
def test_future_stamped_values_are_filed_under_when_they_arrived() -> None:
    clock = Clock()
    sim = IotOpenSim(seed=5, clock=clock, installations=1, topics_per_installation=4, log_points=400,
                     future_stamped=(365 * 86400, 200 * 365 * 86400))
    with sims_in_thread([sim]):
        rows = page_all(sim, 10, limit=37)
        window = call(sim, "GET", "/api/v3beta/log/10", {"from": T0 - 86400, "to": T0, "order": "asc"})[2]
        status = call(sim, "GET", "/api/v2/status/10")[2]
    assert len(rows) == 402 and window["total"] == 402  # `to` = now: the log files them where they arrived
    stamps = [round(r["timestamp"] * 1000) for r in rows]
    ahead = [i for i, ms in enumerate(stamps) if ms > T0 * 1000]
    assert len(ahead) == 2 and all(0 < i < 401 for i in ahead)  # among the others, with values after them
    assert sorted(stamps[i] - stamps[i - 1] for i in ahead) == [365 * 86400_000 + 1, 200 * 365 * 86400_000 + 1]
    assert {(r.metric, r.ts_ms) for r in sim.ground_truth() if r.kind == "log"} >= {
        (rows[i]["topic"], stamps[i]) for i in ahead}
    assert all(s["timestamp"] < T0 for s in status)  # an extra value is never a topic's latest


def test_late_values_show_up_late_by_after_their_timestamp() -> None:
    clock = Clock()
    sim = IotOpenSim(seed=6, clock=clock, installations=1, topics_per_installation=4, log_points=400,
                     late_by=7200.0, late_points=3)
    late = {(e.topic.topic, e.ts_ms) for e in sim.extras}
    with sims_in_thread([sim]):
        before = {(r["topic"], round(r["timestamp"] * 1000)) for r in page_all(sim, 10, limit=100)}
        clock.now += 3600  # the two stamped over an hour before the anchor show, not the newest
        middle = {(r["topic"], round(r["timestamp"] * 1000)) for r in page_all(sim, 10, limit=100)}
        clock.now += 3600
        after = {(r["topic"], round(r["timestamp"] * 1000)) for r in page_all(sim, 10, limit=100)}
    assert len(before) == 400 and not late & before
    assert len(late & middle) == 2 and late <= after and len(after) == 403
    assert all(T0 * 1000 - 7_200_000 < ms < T0 * 1000 - 60_000 for _, ms in late)  # stamped in the last 2 h
    truth = {(r.metric, r.ts_ms) for r in sim.ground_truth() if r.kind == "log"}
    assert truth == after


def test_hidden_functions_appear_on_add_functions() -> None:
    sim = IotOpenSim(seed=7, clock=Clock(), installations=2, topics_per_installation=8, hidden_functions=2)
    with sims_in_thread([sim]):
        first = [f["id"] for f in call(sim, "GET", "/api/v2/functionx/10")[2]]
        hidden = call(sim, "GET", f"/api/v2/functionx/10/{sim.functions[0][0]['id']}")[0]
        v2 = {r["function_id"] for r in call(sim, "GET", "/api/v2/log/10")[2]}
        sim.add_functions()
        later = [f["id"] for f in call(sim, "GET", "/api/v2/functionx/10")[2]]
    assert later == [f["id"] for f in sim.functions[0]] and first == later[2:] and hidden == 404
    assert v2 == set(first)  # the deprecated log drops rows without a FunctionX
