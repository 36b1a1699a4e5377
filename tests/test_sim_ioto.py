"""The Ioto simulator over real sockets: auth forms, gateway facade, paging, envelopes, errors, faults, truth."""

from __future__ import annotations

import base64
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from syncd.sim.common import TruthRow, sims_in_thread
from syncd.sim.ioto import IotoSim

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
NS = "Embedthis/Device"


class FakeClock:
    def __init__(self, t: float = 1_732_356_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def call(sim: IotoSim, path: str, body: Any = None, *, token: str | None = "", method: str = "POST",
         query: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> tuple[int, str, bytes, Any]:
    """One HTTP request; token "" means the sim's CloudAPI token, None means no Authorization header."""
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    if token is not None:
        hdrs["Authorization"] = token or sim.token
    url = sim.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers.get_content_type(), resp.read(), resp.headers
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get_content_type(), err.read(), err.headers


def ok(sim: IotoSim, path: str, body: Any = None, **kw: Any) -> Any:
    status, ctype, raw, _ = call(sim, path, body, **kw)
    assert (status, ctype) == (200, "application/json"), raw
    return json.loads(raw)


def crawl(sim: IotoSim, path: str, body: Any, limit: int = 50) -> list[dict[str, Any]]:
    items, query = [], {"limit": limit}
    while True:
        page = ok(sim, path, body, query=query)
        assert page["paged"] is True
        items += page["data"]
        if "next" not in page:
            return items
        query = {"limit": limit, "next": page["next"]}


@pytest.fixture(scope="module")
def sim() -> Iterator[IotoSim]:
    with sims_in_thread([IotoSim(seed=7, rate_limit=None)]) as (s,):
        yield s


def test_source_config(sim: IotoSim) -> None:
    assert sim.source_config() == {"vendor": "ioto", "base_url": sim.url, "token": sim.token}
    assert IotoSim(seed=7).token == sim.token and IotoSim(seed=8).token != sim.token
    other_day = IotoSim(seed=7, clock=lambda: 1.7e9)  # ids do not depend on when the sim starts
    assert (other_day.account_ids, other_day.device_ids, other_day.cloud_id) == (sim.account_ids, sim.device_ids,
                                                                                 sim.cloud_id)


@pytest.mark.parametrize(
    ("token", "headers", "why"),
    [(None, {}, "missing"), ("Bearer {tok}", {}, "bearer"), ("{disabled}", {}, "disabled"),
     ("{expired}", {}, "expired"), ("{login}", {}, "login without Origin"),
     ("{login}", {"Origin": "https://evil.example"}, "wrong Origin"), ("nope", {}, "unknown")],
)
def test_auth_rejected_is_403_text(sim: IotoSim, token: str | None, headers: dict[str, str], why: str) -> None:
    if token is not None:
        token = token.format(tok=sim.token, disabled=sim.disabled_token, expired=sim.expired_token,
                             login=sim.login_token)
    status, ctype, raw, _ = call(sim, "/tok/generic/find", {"_type": "Device"}, token=token, headers=headers)
    assert (status, ctype) == (403, "text/plain"), why
    assert raw and not raw.startswith(b"{")


def test_auth_accepted_forms(sim: IotoSim) -> None:
    everything = crawl(sim, "/tok/generic/find", {"_type": "Device"})
    assert len(everything) == 6 and len({d["accountId"] for d in everything}) == 2
    # a login token needs the app's Origin and sees its own account only
    page = ok(sim, "/tok/generic/find", {"_type": "Device"}, token=sim.login_token, headers={"Origin": sim.origin},
              query={"limit": 100})
    assert {d["accountId"] for d in page["data"]} == {sim.account_ids[0]} and len(page["data"]) == 3


def test_gateway_facade(sim: IotoSim) -> None:
    for method, path in [("GET", "/tok/generic/find"), ("PUT", "/tok/alert/find"), ("POST", "/nothing/here/at/all")]:
        status, ctype, raw, _ = call(sim, path, {}, method=method)
        assert (status, ctype) == (403, "application/json")
        assert json.loads(raw) == {"message": "Missing Authentication Token"}
    status, ctype, _, _ = call(sim, "/generic/find", {"_type": "Store"})  # documented path without /tok
    assert (status, ctype) == (403, "text/plain")
    status, ctype, _, _ = call(sim, "/tok/widget/find", {})
    assert (status, ctype) == (400, "text/plain")


def test_bad_requests_are_400_text(sim: IotoSim) -> None:
    dev = sim.device_ids[0]
    cases = [("/tok/generic/find", {}), ("/tok/generic/find", {"_type": "Widget"}), ("/tok/device/find", {}),
             ("/tok/metric/fetch", {"items": [{"namespace": NS, "metric": "Temperature"}]}),
             ("/tok/metric/fetch", {"deviceId": dev, "items": [{"namespace": "AWS/EC2", "metric": "Temperature"}]}),
             ("/tok/metric/fetch", {"deviceId": dev, "items": [{"namespace": NS, "metric": "Temperature",
                                                                "statistic": "p99"}]}),
             ("/tok/metric/getMetricList", {})]
    for path, body in cases:
        status, ctype, raw, _ = call(sim, path, body)
        assert (status, ctype) == (400, "text/plain"), (path, body, raw)
    status, ctype, _, _ = call(sim, "/tok/generic/find", {"_type": "Log"}, query={"limit": "ten"})
    assert (status, ctype) == (400, "text/plain")
    req = urllib.request.Request(sim.url + "/tok/alert/find", data=b"{nope", method="POST",
                                 headers={"Authorization": sim.token})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)
    assert err.value.code == 400


def test_limit_defaults_to_one(sim: IotoSim) -> None:
    page = ok(sim, "/tok/generic/find", {"_type": "Log", "deviceId": sim.device_ids[1]})
    assert len(page["data"]) == 1 and isinstance(page["next"], str) and "prev" not in page


def test_paging_cursors(sim: IotoSim) -> None:
    body = {"_type": "Log", "deviceId": sim.device_ids[2]}
    logs = crawl(sim, "/tok/generic/find", body, limit=7)
    assert len(logs) == 100 and len({x["id"] for x in logs}) == 100
    assert [x["id"] for x in logs] == sorted(x["id"] for x in logs)  # ULIDs, oldest first
    first = ok(sim, "/tok/generic/find", body, query={"limit": 7})
    assert first["next"].startswith("+/")  # opaque base64: must be URL-encoded when sent back
    second = ok(sim, "/tok/generic/find", body, query={"limit": 7, "next": first["next"]})
    assert second["data"] == logs[7:14]
    back = ok(sim, "/tok/generic/find", body, query={"limit": 7, "prev": second["prev"]})
    assert back["data"] == logs[:7] and "prev" not in back
    # an exactly full last page still carries next; the page after it is empty and ends the list
    last = ok(sim, "/tok/generic/find", body, query={"limit": 50, "next": ok(sim, "/tok/generic/find", body,
                                                                               query={"limit": 50})["next"]})
    assert len(last["data"]) == 50 and "next" in last
    tail = ok(sim, "/tok/generic/find", body, query={"limit": 50, "next": last["next"]})
    assert tail["data"] == [] and "next" not in tail
    # unencoded "+" arrives as a space; cursors of another query or direction are refused
    raw_url = f"{sim.url}/tok/generic/find?limit=7&next={first['next']}"
    req = urllib.request.Request(raw_url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": sim.token})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)
    assert err.value.code == 400
    for query, other in [({"next": first["next"]}, {"_type": "Log", "deviceId": sim.device_ids[3]}),
                         ({"next": second["prev"]}, body), ({"next": "bm9wZQ=="}, body)]:
        status, ctype, _, _ = call(sim, "/tok/generic/find", other, query={"limit": 7, **query})
        assert (status, ctype) == (400, "text/plain")


def test_page_byte_cap_gives_short_pages_with_next() -> None:
    with sims_in_thread([IotoSim(seed=3, rate_limit=None, page_bytes=2000)]) as (sim,):
        body = {"_type": "Log"}
        page = ok(sim, "/tok/generic/find", body, query={"limit": 100})
        assert 1 < len(page["data"]) < 100 and "next" in page
        assert len(crawl(sim, "/tok/generic/find", body, limit=100)) == 600


def test_envelopes_and_fields(sim: IotoSim) -> None:
    dev, acct = sim.device_ids[0], sim.account_ids[0]
    device = ok(sim, "/tok/generic/find", {"_type": "Device", "id": dev}, query={"limit": 5})["data"]
    assert len(device) == 1 and device[0]["connection"] in ("online", "offline") and ISO.match(device[0]["updated"])
    store = crawl(sim, "/tok/generic/find", {"_type": "Store", "deviceId": dev})
    assert {s["type"] for s in store} == {"number", "string"} and all(ISO.match(s["updated"]) for s in store)
    assert any(set('+#/$"') <= set(s["key"]) for s in store)  # hostile key reaches the connector
    log = ok(sim, "/tok/generic/find", {"_type": "Log", "deviceId": dev}, query={"limit": 1})["data"][0]
    assert set(log) >= {"id", "accountId", "deviceId", "message", "context", "updated"} and len(log["id"]) == 26
    reg = ok(sim, "/tok/device/find", {"accountId": acct}, query={"limit": 10})
    assert reg["paged"] and {d["accountId"] for d in reg["data"]} == {acct}
    assert set(reg["data"][0]) == {"id", "accountId", "product", "productId", "created", "accessed", "version",
                                   "checked", "test"}
    alerts = crawl(sim, "/tok/alert/find", None)
    assert len(alerts) == 24 and {type(a["resolved"]) for a in alerts} == {bool}
    assert set(alerts[0]) == {"id", "accountId", "cloudId", "name", "message", "subject", "severity", "seq", "count",
                              "context", "resolved", "timestamp"}
    listing = ok(sim, "/tok/metric/getMetricList", {"cloudId": sim.cloud_id})["data"]
    assert listing == {"namespaces": [NS], "metrics": ["Temperature", "Humidity", 'Δp Filter/2 #"A"+']}
    assert ok(sim, "/tok/metric/getMetricList", {"cloudId": "other"})["data"]["metrics"] == []


def test_metric_fetch_shapes(sim: IotoSim) -> None:
    dev = sim.device_ids[0]
    item = {"namespace": NS, "metric": "Temperature", "dimensions": {"Device": dev}}
    data = ok(sim, "/tok/metric/fetch", {"deviceId": dev, "items": [item, {**item, "statistic": "max", "period": 3600},
                                                                     {**item, "dimensions": {}}]})["data"]
    five, hour, account = data
    assert (five["period"], five["samples"], len(five["points"])) == (300, 5, 5)  # statistic avg, period 300 by default
    stamps = [p["timestamp"] for p in five["points"]]
    assert stamps == sorted(stamps) and stamps[1] - stamps[0] == 60 and stamps[0] < 1e11  # seconds
    assert (hour["period"], len(hour["points"])) == (3600, 12)
    assert [p["value"] for p in account["points"]] != [p["value"] for p in five["points"]]
    assert all(isinstance(p["count"], int) for p in five["points"])


def test_metric_ms_and_live_open_point() -> None:
    clock = FakeClock()
    with sims_in_thread([IotoSim(seed=2, clock=clock, live=True, metric_ms=True, rate_limit=None)]) as (sim,):
        dev = sim.device_ids[0]
        body = {"deviceId": dev, "items": [{"namespace": NS, "metric": "Humidity", "dimensions": {"Device": dev}}]}
        clock.t += 5
        before = ok(sim, "/tok/metric/fetch", body)["data"][0]["points"]
        clock.t += 20
        after = ok(sim, "/tok/metric/fetch", body)["data"][0]["points"]
        assert before[-1]["timestamp"] > 1e11  # milliseconds
        assert before[-1]["timestamp"] == after[-1]["timestamp"] and before[-1] != after[-1]
        assert before[:-1] == after[:-1]


def test_live_mode_grows_and_resolves() -> None:
    clock = FakeClock()
    with sims_in_thread([IotoSim(seed=4, clock=clock, live=True, rate_limit=None)]) as (sim,):
        logs0, alerts0 = crawl(sim, "/tok/generic/find", {"_type": "Log"}, 500), crawl(sim, "/tok/alert/find", {})
        truth0 = sim.ground_truth()
        clock.t += 6 * 3600
        logs1, alerts1 = crawl(sim, "/tok/generic/find", {"_type": "Log"}, 500), crawl(sim, "/tok/alert/find", {})
        assert len(logs1) > len(logs0) and logs1[: len(logs0)] == logs0
        assert len(alerts1) > len(alerts0)
        assert any(a["resolved"] and not b["resolved"] for a, b in zip(alerts1, alerts0, strict=False))
        truth1 = sim.ground_truth()
        keys0 = {(r.kind, r.tenant, r.device, r.metric, r.ts_ms) for r in truth0 if r.kind in ("log", "alert")}
        assert keys0 <= {(r.kind, r.tenant, r.device, r.metric, r.ts_ms) for r in truth1}
        assert max(r.ts_ms for r in truth1 if r.kind == "log") <= (clock.t - 60) * 1000


def test_faults_and_rate_limit() -> None:
    with sims_in_thread([IotoSim(seed=5, rate_limit=5)]) as (sim,):
        statuses = [call(sim, "/tok/alert/find", {})[0] for _ in range(7)]
        assert statuses[:5] == [200] * 5 and statuses[5:] == [429, 429]
        status, ctype, raw, headers = call(sim, "/tok/alert/find", {})
        assert (status, ctype, json.loads(raw)) == (429, "application/json", {"message": "Too Many Requests"})
        assert "Retry-After" not in headers
        sim.limits.clear()
        sim.faults.storm_429 = 1
        assert call(sim, "/tok/alert/find", {})[:2] == (429, "application/json")
        sim.faults.error_5xx = 2
        assert {call(sim, "/tok/alert/find", {})[:2] for _ in range(2)} == {(503, "application/json"),
                                                                           (500, "text/plain")}
        sim.faults.truncate = 1
        status, _, raw, _ = call(sim, "/tok/alert/find", {}, query={"limit": 5})
        with pytest.raises(ValueError):
            json.loads(raw)
        sim.faults.expired = True
        assert call(sim, "/tok/alert/find", {})[:2] == (403, "text/plain")
        sim.faults.expired = False
        ok(sim, "/_sim/ioto", {"gateway_timeouts": 1, "gateway_delay": 0.1}, token=None)
        started = time.monotonic()
        status, ctype, raw, _ = call(sim, "/tok/alert/find", {})
        assert (status, ctype, json.loads(raw)) == (504, "application/json", {"message": "Endpoint request timed out"})
        assert time.monotonic() - started >= 0.1
        sim.faults.slow = 0.1
        started = time.monotonic()
        assert call(sim, "/tok/alert/find", {})[0] == 200 and time.monotonic() - started >= 0.1


def test_ground_truth_matches_a_full_crawl(sim: IotoSim) -> None:
    """Sync the default streams through the API with the documented mapping; it must equal ground_truth()."""

    def ms(iso: str) -> int:
        at = datetime.fromisoformat(iso.replace("Z", "+00:00"))
        return int(at.timestamp()) * 1000 + at.microsecond // 1000

    def ulid_ms(ulid: str) -> int:  # the first 10 Crockford base32 chars are the ms timestamp
        return sum("0123456789ABCDEFGHJKMNPQRSTVWXYZ".index(c) << (5 * (9 - i)) for i, c in enumerate(ulid[:10]))

    rows: set[TruthRow] = set()
    devices = crawl(sim, "/tok/generic/find", {"_type": "Device"})
    cloud = None
    for dev in devices:
        d, acct = dev["id"], dev["accountId"]
        for s in crawl(sim, "/tok/generic/find", {"_type": "Store", "deviceId": d}):
            cloud = s["cloudId"]
            num = s["type"] == "number"
            rows.add(TruthRow("ioto", "status", s["accountId"], d, s["key"], ms(s["updated"]),
                              float(s["value"]) if num else None, None if num else s["value"]))
        for x in crawl(sim, "/tok/generic/find", {"_type": "Log", "deviceId": d}, limit=1000):
            assert ms(x["updated"]) > ulid_ms(x["id"])
            rows.add(TruthRow("ioto", "log", x["accountId"], d, "log", ulid_ms(x["id"]), None, x["message"]))
        names = ok(sim, "/tok/metric/getMetricList", {"cloudId": cloud})["data"]["metrics"]
        items = [{"namespace": NS, "metric": m, "dimensions": {"Device": d}, "statistic": "avg", "period": 300}
                 for m in names]
        for it in ok(sim, "/tok/metric/fetch", {"deviceId": d, "items": items})["data"]:
            for p in it["points"]:
                rows.add(TruthRow("ioto", "metric", acct, d, f"{it['metric']}.avg.{it['period']}",
                                  p["timestamp"] * 1000, float(p["value"]), None))
    for a in crawl(sim, "/tok/alert/find", None):
        rows.add(TruthRow("ioto", "alert", a["accountId"], a["context"].get("deviceId", ""), a["name"],
                          ms(a["timestamp"]), None, a["message"]))
    truth = sim.ground_truth()
    assert len(truth) == len(set(truth)) == len(rows)
    assert set(truth) == rows
    assert any(r.device == "" for r in truth if r.kind == "alert")
    assert IotoSim(seed=7).ground_truth() != IotoSim(seed=8).ground_truth()


def test_large_backlog_is_cheap() -> None:
    started = time.monotonic()
    big = IotoSim(seed=9, logs=200_000, history=30 * 86400, rate_limit=None)
    assert len(big.ground_truth()) > 200_000
    with sims_in_thread([big]) as (sim,):
        first = ok(sim, "/tok/generic/find", {"_type": "Log"}, query={"limit": 1000})
        assert len(first["data"]) == 1000
        cursor = base64.b64encode(b"\xfb\xff" + json.dumps({"q": 0}).encode()).decode()
        assert call(sim, "/tok/generic/find", {"_type": "Log"}, query={"next": cursor})[0] == 400
    assert time.monotonic() - started < 4


# -- worse than the connector assumes -------------------------------------------------------------------------------
def log_ids(sim: IotoSim, device: str, limit: int = 7) -> list[str]:
    return [x["id"] for x in crawl(sim, "/tok/generic/find", {"_type": "Log", "deviceId": device}, limit=limit)]


def test_log_order_newest_first_or_shuffled_serves_the_same_logs() -> None:
    sims = [IotoSim(seed=40, clock=FakeClock(), devices=2, logs=60, rate_limit=None, log_order=order)
            for order in ("oldest", "newest", "shuffled")]
    with sims_in_thread(sims):
        oldest, newest, shuffled = (log_ids(s, s.device_ids[0]) for s in sims)
    assert len(oldest) == 30 and oldest == sorted(oldest)
    assert newest == oldest[::-1] and sorted(shuffled) == oldest and shuffled not in (oldest, newest)
    assert all(s.ground_truth() == sims[0].ground_truth() for s in sims)


def test_future_logs_keep_their_place_and_late_logs_show_up_late() -> None:
    clock = FakeClock()
    sim = IotoSim(seed=41, clock=clock, devices=2, logs=60, rate_limit=None, future_logs=(3600.0, 365 * 86400.0),
                  late_by=7200.0, late_logs=2)
    with sims_in_thread([sim]):
        before = log_ids(sim, sim.device_ids[0]), log_ids(sim, sim.device_ids[1])
        clock.t += 7200
        after = log_ids(sim, sim.device_ids[0]), log_ids(sim, sim.device_ids[1])
    future, late = sim.extra_logs[:2], sim.extra_logs[2:]
    assert [len(b) for b in before] == [31, 31] and [len(a) for a in after] == [31, 33]
    for e in future:  # kept where it was written, dated ahead of the sim's start
        ids = before[e.d]
        i = next(i for i, x in enumerate(ids) if x.startswith(_crockford(e.ts_ms)))
        assert all(x[:10] < _crockford(e.written_ms) for x in ids[:i]) and ids[i] == max(ids)
        assert e.ts_ms > clock.t * 1000 - 7_200_000 and e.ts_ms - e.written_ms in (3_600_000, 365 * 86_400_000)
    assert all(e.d == 1 and e.visible_ms == e.ts_ms + 7_200_000 for e in late)
    truth = {r.ts_ms for r in sim.ground_truth() if r.kind == "log"}
    assert {e.ts_ms for e in sim.extra_logs} <= truth and len(truth) == 64


def _crockford(ms: int) -> str:
    return "".join("0123456789ABCDEFGHJKMNPQRSTVWXYZ"[(ms >> (5 * i)) & 31] for i in range(9, -1, -1))
