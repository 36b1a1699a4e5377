"""The Proxus simulator over real sockets: login forms, OData paging, the SQL guard, NDJSON shape, faults."""

from __future__ import annotations

import base64
import calendar
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from syncd.sim.common import sims_in_thread
from syncd.sim.proxus import ProxusSim

HOSTILE_DEVICE = "pump'; DROP TABLE x; --"
ODD_KEY = "ns=2;s=Tank #1/Level+'Ω'"
TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{3}$")


class FakeClock:
    def __init__(self, t: float = 1_740_475_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Client:
    """Just enough HTTP for the tests: raw status, headers and body, never raising on 4xx/5xx."""

    def __init__(self, sim: ProxusSim) -> None:
        self.sim = sim
        self.token = ""

    def call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
             raw: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
        hdrs = {"Content-Type": "application/json"} if body is not None else {}
        if self.token:
            hdrs["Authorization"] = f"Bearer {self.token}"
        hdrs.update(headers or {})
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.sim.url + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    def login(self) -> str:
        status, _, body = self.call("POST", "/api/Authentication/Authenticate",
                                    {"userName": "syncd", "password": "sim-password-5c2e"})
        assert status == 200
        self.token = body.decode().strip().strip('"')
        return body.decode()

    def sql(self, query: str, max_rows: int | None = None) -> tuple[int, bytes]:
        path = "/api/Telemetry/execute" + (f"?maxRows={max_rows}" if max_rows is not None else "")
        status, _, body = self.call("POST", path, {"query": query})
        return status, body

    def rows(self, query: str, max_rows: int | None = None) -> list[dict[str, Any]]:
        status, body = self.sql(query, max_rows)
        assert status == 200, body
        assert body == b"" or body.endswith(b"\n")
        return [json.loads(line) for line in body.decode().splitlines()]


@pytest.fixture
def served() -> Iterator[Client]:
    sim = ProxusSim(seed=3, clock=FakeClock(), rows=2000, alerts=30, odata_page_size=7)
    with sims_in_thread([sim]):
        client = Client(sim)
        client.login()
        yield client


def lit(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "''") + "'"


def claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def truth_key(kind: str, device: Any, metric: str, ts_ms: int) -> tuple[str, str, str, int]:
    return kind, str(device), metric, ts_ms


def parse_time(text: str) -> int:
    s, ms = text.split(".")
    return calendar.timegm(time.strptime(s, "%Y-%m-%d %H:%M:%S")) * 1000 + int(ms)


# -- auth -----------------------------------------------------------------
def test_login_alternates_quoted_and_bare_tokens_with_exp() -> None:
    clock = FakeClock()
    sim = ProxusSim(clock=clock, rows=100, token_ttl=600)
    with sims_in_thread([sim]):
        client = Client(sim)
        quoted, bare = client.login(), client.login()
        assert quoted.startswith('"') and quoted.endswith('"') and "\n" not in quoted
        assert not bare.startswith('"') and bare.endswith("\n")
        assert claims(bare.strip())["exp"] == int(clock.t) + 600
        assert client.call("GET", "/api/odata/Device")[0] == 200
        for body in ({"userName": "syncd", "password": "nope"}, {"username": "syncd", "password": "sim-password-5c2e"}):
            status, _, text = client.call("POST", "/api/Authentication/Authenticate", body)
            assert (status, text) == (401, b"")
        form = client.call("POST", "/api/Authentication/Authenticate", raw=b"userName=syncd",
                           headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert form[0] == 415


def test_bearer_rejections_are_empty_401_with_challenge() -> None:
    clock = FakeClock()
    sim = ProxusSim(clock=clock, rows=100, token_ttl=600, token_style="quoted")
    with sims_in_thread([sim]):
        client = Client(sim)
        raw = client.login()
        status, headers, body = Client(sim).call("GET", "/api/odata/Device")
        assert (status, body, headers["WWW-Authenticate"]) == (401, b"", "Bearer")
        client.token = raw  # the JSON quotes left on: a connector bug the server refuses
        status, headers, body = client.call("GET", "/api/odata/Device")
        assert status == 401 and body == b"" and 'error="invalid_token"' in headers["WWW-Authenticate"]
        client.login()
        clock.t += 601
        status, headers, _ = client.call("POST", "/api/Telemetry/execute", {"query": "SELECT * FROM DeviceRawData"})
        assert status == 401 and "The token expired at" in headers["WWW-Authenticate"]
        client.login()
        sim.expire_tokens()  # early expiry: the old token dies, a re-login works
        assert client.call("GET", "/api/odata/Device")[0] == 401
        client.login()
        assert client.call("GET", "/api/odata/Device")[0] == 200
        sim.faults.expired = True
        assert client.call("GET", "/api/odata/Device")[0] == 401


# -- OData ------------------------------------------------------------------
def test_odata_envelope_count_select_filter_orderby(served: Client) -> None:
    status, headers, body = served.call("GET", "/api/odata/Device")
    doc = json.loads(body)
    assert status == 200 and doc["@odata.context"].endswith("/api/odata/$metadata#Device")
    assert [d["Id"] for d in doc["value"]] == [1, 2, 3, 4, 5]
    status, headers, body = served.call("GET", "/api/odata/Device/$count")
    assert (status, body) == (200, b"5") and headers["Content-Type"].startswith("text/plain")
    name = urllib.parse.quote(f"Name eq {lit(HOSTILE_DEVICE)}")
    doc = json.loads(served.call("GET", f"/api/odata/Device?$filter={name}&$select=Id,Name")[2])
    assert doc["value"] == [{"Id": 2, "Name": HOSTILE_DEVICE}] and doc["@odata.context"].endswith("#Device(Id,Name)")
    assert served.call("GET", f"/api/odata/Device/$count?$filter={name}")[2] == b"1"
    doc = json.loads(served.call("GET", "/api/odata/Device?$orderby=Id%20desc&$top=2&$skip=1")[2])
    assert [d["Id"] for d in doc["value"]] == [4, 3]
    for bad in ("$filter=Nope%20eq%201", "$filter=Id%20eq%20'1'", "$filter=contains(Name,'x')", "$select=Nope",
                "$orderby=Nope", "$top=-1", "$expand=Gateway"):
        status, headers, body = served.call("GET", f"/api/odata/Device?{bad}")
        assert status == 400 and set(json.loads(body)["error"]) == {"code", "message"}, bad
    assert served.call("GET", "/api/odata/Nope")[:3:2] == (404, b"")
    assert served.call("GET", "/api/v2/whatever")[:3:2] == (404, b"")


def test_odata_server_page_size_emits_next_link(served: Client) -> None:
    path, seen, count = "/api/odata/Alert?$count=true&$orderby=CreatedOn", [], None
    while path:
        doc = json.loads(served.call("GET", path)[2])
        count = doc.get("@odata.count", count)
        seen += doc["value"]
        assert len(doc["value"]) <= 7
        path = doc.get("@odata.nextLink", "").replace(served.sim.url, "")
    assert count == 30 and [a["Id"] for a in seen] == list(range(1, 31))
    assert all(set(a) == {"Id", "DeviceId", "RuleId", "Severity", "Message", "Status", "CreatedOn"} for a in seen)
    assert any(a["CreatedOn"].endswith("Z") for a in seen) and any(a["CreatedOn"].endswith("+02:00") for a in seen)
    capped = json.loads(served.call("GET", "/api/odata/Alert?$top=10")[2])
    nxt = json.loads(served.call("GET", capped["@odata.nextLink"].replace(served.sim.url, ""))[2])
    assert len(capped["value"]) + len(nxt["value"]) == 10 and "@odata.nextLink" not in nxt
    newer = urllib.parse.quote(f"CreatedOn gt {seen[14]['CreatedOn']}")  # an OData DateTimeOffset literal
    assert served.call("GET", f"/api/odata/Alert/$count?$filter={newer}")[2] == b"15"


# -- telemetry -----------------------------------------------------------------
def test_keyset_paging_with_tuple_reads_every_row_once(served: Client) -> None:
    got: dict[tuple[str, str, str, int], dict[str, Any]] = {}
    where, pages = "", 0
    while True:
        rows = served.rows(f"SELECT * FROM DeviceRawData {where} ORDER BY Time, DeviceId, Key LIMIT 300")
        pages += 1
        for r in rows:
            got[truth_key("telemetry", r["DeviceId"], r["Key"], parse_time(r["Time"]))] = r
        if len(rows) < 300:
            break
        last = rows[-1]
        where = f"WHERE (Time, DeviceId, Key) > ({lit(last['Time'])}, {last['DeviceId']}, {lit(last['Key'])})"
    truth = {truth_key(t.kind, t.device, t.metric, t.ts_ms): t for t in served.sim.ground_truth()
             if t.kind == "telemetry"}
    assert pages > 6 and got.keys() == truth.keys() and len(truth) == 2000
    for key, row in got.items():
        t = truth[key]
        assert t.tenant == "proxus-sim" and t.device == str(row["DeviceId"]) and t.metric == row["Key"]
        if row["DataType"] == "String":
            assert (t.value, t.text) == (None, row["StringValue"])
        else:
            assert t.value == row["NumericValue"] and t.text == (row["StringValue"] or None)
    assert any(r["NumericValue"] is None for r in got.values()) and any(t.text == "" for t in truth.values())
    alerts = [t for t in served.sim.ground_truth() if t.kind == "alert"]
    assert len(alerts) == 30 and all(t.metric == "alert" and t.value is None and t.text for t in alerts)


def test_brief_query_with_inclusive_cursor_and_duplicates(served: Client) -> None:
    truth = {(t.device, t.metric, t.ts_ms) for t in served.sim.ground_truth() if t.kind == "telemetry"}
    first = served.rows("SELECT Time FROM DeviceRawData ORDER BY Time LIMIT 1")[0]["Time"]
    upper = time.strftime("%Y-%m-%d %H:%M:%S.000", time.gmtime(served.sim.clock() - 10))
    cursor, got, lines = first, set(), 0
    while True:
        rows = served.rows(
            "SELECT Time, DeviceId, DeviceName, Key, DataType, NumericValue, StringValue\nFROM DeviceRawData\n"
            f"WHERE Time >= toDateTime64('{cursor}', 3) AND Time < toDateTime64('{upper}', 3)\n"
            "ORDER BY Time, DeviceId, Key\nLIMIT 500")
        lines += len(rows)
        got |= {(str(r["DeviceId"]), r["Key"], parse_time(r["Time"])) for r in rows}
        if len(rows) < 500:
            break
        cursor = rows[-1]["Time"]
    assert got == truth and lines > len(truth)  # re-read cursor rows and a duplicated insert collapse


def test_ndjson_spelling_and_count(served: Client) -> None:
    status, body = served.sql(f"SELECT * FROM DeviceRawData WHERE Key = {lit(ODD_KEY)} LIMIT 3")
    text = body.decode()
    assert status == 200 and text.count("\n") == 3 and text.endswith("}\n") and "\\/" in text and "Ω" in text
    row = json.loads(text.splitlines()[0])
    assert list(row) == ["Time", "DeviceId", "DeviceName", "Key", "DataType", "NumericValue", "StringValue"]
    assert TIME_RE.match(row["Time"]) and row["Key"] == ODD_KEY and row["DataType"] == "Double"
    ints = served.sql("SELECT NumericValue, StringValue FROM DeviceRawData WHERE DataType = 'Boolean' LIMIT 1")[1]
    assert re.fullmatch(rb'\{"NumericValue":[01],"StringValue":"(True|False)"\}\n', ints)
    both = served.sql("SELECT count() FROM DeviceRawData WHERE DataType IN ('Double', 9)")[1]
    assert re.fullmatch(rb'\{"count\(\)":"\d+"\}\n', both)  # UInt64 quoted
    assert both == served.sql("SELECT count(*) FROM DeviceRawData WHERE DataType != 1")[1]
    assert served.sql("SELECT * FROM DeviceRawData WHERE Time > now()")[1] == b""


def test_hostile_names_are_matched_as_data_and_every_statement_is_logged(served: Client) -> None:
    query = f"SELECT DeviceId, DeviceName FROM DeviceRawData WHERE DeviceName = {lit(HOSTILE_DEVICE)} LIMIT 2"
    assert served.rows(query) == [{"DeviceId": 2, "DeviceName": HOSTILE_DEVICE}] * 2
    assert served.sim.statements[-1] == query
    bodies = [json.loads(r.body)["query"] for r in served.sim.requests if r.path == "/api/Telemetry/execute"]
    assert bodies[-1] == query


@pytest.mark.parametrize("query", [
    "DELETE FROM DeviceRawData",
    "WITH x AS (SELECT 1) SELECT * FROM DeviceRawData",
    "SELECT * FROM DeviceRawData; DROP TABLE x",
    "SELECT * FROM DeviceRawData -- trailing comment",
    "SELECT * FROM DeviceRawData /* c */",
    "SELECT * FROM DeviceRawData WHERE DeviceName = 'pump'; DROP TABLE x; --'",
    "SELECT * FROM DeviceRawData WHERE Key = 'unbalanced",
    "SELECT time FROM DeviceRawData",
    "SELECT * FROM Logs",
    "SELECT * FROM system.tables",
    "SELECT * FROM DeviceRawData WHERE lower(Key) = 'x'",
    "SELECT * FROM DeviceRawData FORMAT JSON",
    "SELECT * FROM DeviceRawData SETTINGS max_threads = 1",
    "SELECT * FROM DeviceRawData LIMIT 10 OFFSET 5",
    "SELECT * FROM DeviceRawData WHERE Time > '2025-02-25T09:36:00Z'",
    "SELECT * FROM DeviceRawData WHERE Key = 3",
    "SELECT * FROM DeviceRawData WHERE DataType = 'Decimal'",
    "SELECT * FROM DeviceRawData WHERE Key = 'a\\qb'",
    "SELECT * FROM DeviceRawData UNION ALL SELECT * FROM DeviceRawData",
    "SELECT * FROM (SELECT * FROM DeviceRawData)",
    "SELECT count() FROM DeviceRawData ORDER BY Time",
])
def test_sql_guard_rejects_outside_the_grammar(served: Client, query: str) -> None:
    status, body = served.sql(query)
    assert status == 400 and isinstance(json.loads(body)["error"], str), body
    assert served.sim.statements[-1] == query


def test_max_rows_truncates_silently_and_is_capped(served: Client) -> None:
    assert len(served.rows("SELECT Time FROM DeviceRawData LIMIT 1500", max_rows=1000)) == 1000
    stored = int(served.rows("SELECT count() FROM DeviceRawData")[0]["count()"])
    assert stored > 2000  # a few duplicated inserts
    assert len(served.rows("SELECT Time FROM DeviceRawData", max_rows=50_000)) == stored
    for bad in ("50001", "0", "ten"):
        status, _, body = served.call("POST", f"/api/Telemetry/execute?maxRows={bad}", {"query": "SELECT Time FROM x"})
        assert status == 400 and "maxRows" in json.loads(body)["error"]
    form = served.call("POST", "/api/Telemetry/execute", raw=b"query=SELECT", headers={"Content-Type": "text/plain"})
    assert form[0] == 415


def test_default_max_rows_and_large_backlog_stay_fast() -> None:
    started = time.perf_counter()
    sim = ProxusSim(clock=FakeClock(), rows=200_000, history=7 * 86400)
    with sims_in_thread([sim]):
        client = Client(sim)
        client.login()
        rows = client.rows("SELECT * FROM DeviceRawData ORDER BY Time DESC, DeviceId DESC, Key DESC")
        assert len(rows) == 10_000 and parse_time(rows[0]["Time"]) >= parse_time(rows[-1]["Time"])
        mid = rows[-1]["Time"]
        page = client.rows(f"SELECT Time FROM DeviceRawData WHERE Time >= {lit(mid)} ORDER BY Time LIMIT 5")
        assert page[0]["Time"] == mid
    assert time.perf_counter() - started < 2.5


def test_interval_and_order_by_other_columns(served: Client) -> None:
    now_ms = int(served.sim.clock() * 1000) // 1000 * 1000
    recent = served.rows("SELECT Time FROM DeviceRawData WHERE Time > now() - INTERVAL 1 HOUR LIMIT 5000")
    expect = [t for t in served.sim.ground_truth() if t.kind == "telemetry" and t.ts_ms > now_ms - 3_600_000]
    assert 0 < len(recent) and {parse_time(r["Time"]) for r in recent} == {t.ts_ms for t in expect}
    by_value = served.rows("SELECT NumericValue FROM DeviceRawData WHERE DataType = 'Double' "
                           "AND (DeviceId = 1 OR DeviceId = 3) ORDER BY NumericValue DESC LIMIT 50")
    values = [r["NumericValue"] for r in by_value if r["NumericValue"] is not None]
    assert values == sorted(values, reverse=True)


def test_late_rows_appear_after_newer_rows_were_served() -> None:
    clock = FakeClock()
    sim = ProxusSim(seed=5, clock=clock, rows=4000, history=1200, late=True)
    with sims_in_thread([sim]):
        client = Client(sim)
        client.login()
        query = "SELECT Time, DeviceId, Key FROM DeviceRawData ORDER BY Time, DeviceId, Key LIMIT 50000"
        before = {(r["Time"], r["DeviceId"], r["Key"]) for r in client.rows(query)}
        newest = max(t for t, _, _ in before)
        clock.t += 300
        after = {(r["Time"], r["DeviceId"], r["Key"]) for r in client.rows(query)}
        late = after - before
        assert before < after and late and all(t < newest for t, _, _ in late)
        urllib.request.urlopen(urllib.request.Request(sim.url + "/_sim/proxus", data=b'{"late": false}',
                                                      method="POST")).close()
        assert not sim.late
        assert len({(t.device, t.metric, t.ts_ms) for t in sim.ground_truth() if t.kind == "telemetry"}) == len(after)


def test_data_is_deterministic_per_seed() -> None:
    assert ProxusSim(seed=7, clock=FakeClock()).ground_truth() == ProxusSim(seed=7, clock=FakeClock()).ground_truth()
    assert ProxusSim(seed=7, clock=FakeClock()).ground_truth() != ProxusSim(seed=8, clock=FakeClock()).ground_truth()


def test_live_mode_keeps_producing() -> None:
    clock = FakeClock()
    sim = ProxusSim(clock=clock, live=True, rows=500, history=3600, alerts=5)
    before = len(sim.ground_truth())
    clock.t += 3600
    after = sim.ground_truth()
    assert len(after) > before + 400 and max(t.ts_ms for t in after) <= clock.t * 1000 - 10_000
    assert sum(t.kind == "alert" for t in after) >= 9


# -- faults and limits ----------------------------------------------------------
def test_faults_in_vendor_shapes(served: Client) -> None:
    sim = served.sim
    sim.faults.update({"storm_429": 1, "retry_after": None})
    status, headers, body = served.call("GET", "/api/odata/Device")
    assert (status, body) == (429, b"") and "Retry-After" not in headers
    sim.faults.update({"storm_429": 1, "retry_after": 2})
    assert served.call("GET", "/api/odata/Device")[1]["Retry-After"] == "2"
    sim.faults.error_5xx = 2
    failures = [served.call("GET", "/api/odata/Device") for _ in range(2)]
    assert {f[0] for f in failures} == {500, 503} and all(f[2] for f in failures)  # text bodies
    sim.faults.truncate = 1
    status, body = served.sql("SELECT * FROM DeviceRawData LIMIT 3")
    assert status == 200 and not body.endswith(b"\n")
    with pytest.raises(ValueError):
        [json.loads(line) for line in body.decode().splitlines()]
    sim.faults.slow = 0.2
    started = time.perf_counter()
    served.call("GET", "/api/odata/Device/$count")
    assert time.perf_counter() - started >= 0.2
    sim.faults.slow = 0


def test_rate_limit_option_answers_empty_429() -> None:
    sim = ProxusSim(clock=FakeClock(), rows=100, rate_limit=3)
    with sims_in_thread([sim]):
        client = Client(sim)
        client.login()
        codes = [client.call("GET", "/api/odata/Gateway")[0] for _ in range(3)]
        assert codes == [200, 200, 429]
    assert ProxusSim(rows=100).limits == []  # none documented
    cfg = sim.source_config()
    assert cfg == {"vendor": "proxus", "base_url": sim.url, "username": "syncd", "password": "sim-password-5c2e"}


# -- worse than a connector may assume --------------------------------------------------------------------
PAGE_SQL = "SELECT * FROM DeviceRawData ORDER BY Time, DeviceId, Key LIMIT 400"


def test_cut_at_line_ends_bodies_early_at_a_newline(served: Client) -> None:
    whole = served.sql(PAGE_SQL)[1]
    served.sim.cut_at_line = 6
    cuts = [served.sql(PAGE_SQL)[1] for _ in range(5)] + [served.sql("SELECT count() FROM DeviceRawData")[1]]
    assert served.sim.cut_at_line == 0 and served.sql(PAGE_SQL)[1] == whole  # then whole again
    for body in cuts[:5]:  # a well-formed prefix of whole lines: nothing marks it as cut
        assert len(body) < len(whole) and whole.startswith(body) and (body == b"" or body.endswith(b"\n"))
    assert cuts[5] == b""  # a one-line count() answer cut before its only line
    assert served.sql("SELECT * FROM DeviceRawData WHERE Time > now()")[1] == b""  # an empty body is not cut...
    served.sim.cut_at_line = 1
    served.sql("SELECT * FROM DeviceRawData WHERE Time > now()")
    assert served.sim.cut_at_line == 1  # ...and does not use one up


def test_error_line_ends_a_200_body_with_a_clickhouse_exception(served: Client) -> None:
    whole = served.sql(PAGE_SQL)[1].splitlines(keepends=True)
    served.sim.error_line = 4
    bodies = [served.sql(PAGE_SQL) for _ in range(4)]
    assert served.sim.error_line == 0
    forms = set()
    for status, body in bodies:
        *rows, last = body.splitlines(keepends=True)
        assert status == 200 and rows == whole[: len(rows)] and last.endswith(b"\n")
        if last.startswith(b"Code: 241. DB::Exception: Memory limit (total) exceeded"):
            forms.add("text")
        else:
            assert json.loads(last)["exception"].startswith("Code: 241. DB::Exception:")
            forms.add("json")
        assert b"(MEMORY_LIMIT_EXCEEDED)" in last
    assert forms == {"text", "json"}


def test_row_cap_below_max_rows_is_silent(served: Client) -> None:
    served.sim.row_cap = 150
    assert len(served.rows(PAGE_SQL, max_rows=1000)) == 150
    assert len(served.rows("SELECT * FROM DeviceRawData LIMIT 40")) == 40
    assert served.rows("SELECT count() FROM DeviceRawData")[0]["count()"] != "150"  # one row: not capped


def test_strict_guard_refuses_or_in_and_tuples_but_not_the_brief_query(served: Client) -> None:
    t = lit(time.strftime("%Y-%m-%d %H:%M:%S.000", time.gmtime(served.sim.clock() - 1800)))
    brief = (f"SELECT Time, DeviceId, DeviceName, Key, DataType, NumericValue, StringValue FROM DeviceRawData "
             f"WHERE Time >= toDateTime64({t}, 3) AND Time < now() ORDER BY Time, DeviceId, Key LIMIT 10")
    refused = [f"SELECT * FROM DeviceRawData WHERE Time > {t} OR (Time = {t} AND DeviceId > 2)",
               "SELECT * FROM DeviceRawData WHERE DeviceId in (1, 2)",
               f"SELECT * FROM DeviceRawData WHERE (Time, DeviceId) > ({t}, 2)"]
    assert all(served.sql(q)[0] == 200 for q in [brief, *refused])
    served.sim.strict_guard = True
    assert len(served.rows(brief)) == 10 and served.sql(f"SELECT count() FROM DeviceRawData WHERE Time > {t}")[0] == 200
    assert served.rows("SELECT * FROM DeviceRawData WHERE Key = 'a OR b'") == []  # words inside literals are data
    for query in refused:
        status, body = served.sql(query)
        assert status == 400 and "SQL injection protection" in json.loads(body)["error"], query


def test_late_rows_are_withheld_hours_back_until_they_land() -> None:
    clock = FakeClock()
    sim = ProxusSim(seed=9, clock=clock, rows=3000, history=4 * 3600, late_rows=25, late_by=7200)
    with sims_in_thread([sim]):
        client = Client(sim)
        client.login()
        before = _truth(sim)
        held = {(k[0], k[2], k[3], k[4]) for k in sim.withheld}
        assert len(held) == 25 and not held & before
        ages = [clock.t * 1000 - ts for *_, ts in held]
        assert all(6_600_000 < age < 7_400_000 for age in ages), ages  # about 2 h old
        assert len({(d, m) for _, d, m, _ in held}) > 5  # several devices and keys
        query = "SELECT Time, DeviceId, Key FROM DeviceRawData ORDER BY Time, DeviceId, Key LIMIT 50000"
        rows = {truth_key("telemetry", r["DeviceId"], r["Key"], parse_time(r["Time"])) for r in client.rows(query)}
        assert not rows & held
        reply = urllib.request.urlopen(urllib.request.Request(sim.url + "/_sim/proxus", data=b'{"land_late": true}',
                                                              method="POST"))
        assert json.loads(reply.read())["landed"] == 25
        rows = {truth_key("telemetry", r["DeviceId"], r["Key"], parse_time(r["Time"])) for r in client.rows(query)}
        assert held <= rows and _truth(sim) == before | held
    with pytest.raises(ValueError, match="late_by"):
        ProxusSim(clock=FakeClock(), rows=100, history=3600, late_rows=3, late_by=7200)
    both = ProxusSim(clock=FakeClock(), rows=3000, history=4 * 3600, poison="surrogate_key,value_infinity",
                     late_rows=40, late_by=3 * 3600)  # a poisoned row is never withheld too
    assert len(both.withheld) == 40 and not {p.key for p in both.poisoned} & set(both.withheld)


def _truth(sim: ProxusSim) -> set[tuple[str, str, str, int]]:
    return {truth_key(t.kind, t.device, t.metric, t.ts_ms) for t in sim.ground_truth() if t.kind == "telemetry"}
