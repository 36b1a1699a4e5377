"""Proxus IIoT: JWT login, OData `Device` and `Alert`, and `telemetry` by keyset SQL over DeviceRawData (NDJSON).

Brief: shared/vendors/proxus.md. Assumptions live in the constants below. The SQL sent to the telemetry endpoint
is built only from integers (times, device ids, limits): no vendor or config text ever reaches a statement.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import calendar
import copy
import operator
import re
import time
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import orjson
import structlog
from pydantic import BaseModel, ConfigDict, field_validator

from syncd.errors import MalformedResponse, RequestRejected, VendorAuthError
from syncd.events import Event
from syncd.http import Response, default_error
from syncd.settings import ProxusSource as ProxusConfig
from syncd.sources.base import DeadLetter, Page, Source, Stream, loads_lenient, mapped, spoolable_text

log = structlog.get_logger("syncd.proxus")

LOGIN_PATH = "/api/Authentication/Authenticate"
ODATA_PATH = "/api/odata/"
TELEMETRY_PATH = "/api/Telemetry/execute"
PAGE_SIZE = 10_000  # telemetry rows per query: the maxRows default [S]
MAX_ROWS = 50_000  # the maxRows maximum [S]

# -- assumptions [A] (brief §1, §2, §8) --------------------------------------------------------------
REFRESH_BEFORE_EXP_S = 60  # no refresh endpoint: log in again this long before the JWT's exp [A]
WRITE_LAG_MS = 10_000  # inserts are micro-batched (1-5 s [D1][D2]): read only up to now minus this [A]
OVERLAP_MS = 300_000  # inserts buffered in NATS land late: each run checks this far back for late rows [A]
BUCKET_MS = 5_000  # resolution of the per-time row counts that tell whether late rows arrived [A]
ODATA_TOP = 1_000  # $top per OData request; a server page size shows up as @odata.nextLink [A]
ODATA_KEY = "Id"  # key property the OData pages are ordered by (real $metadata unseen) [A]
ALERT_TIME = "CreatedOn"  # Alert fields are undocumented; names from the brief's assumed shape [A]
ALERT_WATCH_MS = 86_400_000  # alerts this young are re-read so a status change is re-emitted [A]
STRING_DATA_TYPES = ("String", 9)  # DataType Enum8 arrives as its name; the number for String is assumed [A]

COLUMNS = "Time, DeviceId, DeviceName, Key, DataType, NumericValue, StringValue"
# OData casing is undocumented: properties are matched case-insensitively onto these spellings [A]
CANON = {k.lower(): k for k in ("Id", "Name", "DeviceName", "DeviceId", "RuleId", "Severity", "Message", "Status",
                                "CreatedOn")} | {"oid": "Id"}
_CH_TIME = re.compile(r"(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?")
_FRACTION = re.compile(r"(\.\d{6})\d+")  # .NET renders 7 fractional digits; datetime reads at most 6


def _check_year(year: int) -> None:
    if not 1900 <= year <= 2299:  # DateTime64's range: anything outside is a placeholder such as 0001-01-01
        raise ValueError(f"year {year} is outside 1900-2299")


@lru_cache(maxsize=8192)
def _second_ms(text: str) -> int:
    dt = datetime.strptime(text, "%Y-%m-%d %H:%M:%S")
    _check_year(dt.year)
    return calendar.timegm(dt.timetuple()) * 1000


def ch_time_ms(text: str) -> int:
    """ClickHouse DateTime64 text `YYYY-MM-DD hh:mm:ss.fff` (no zone: UTC [A]) to epoch ms."""
    m = _CH_TIME.fullmatch(text)
    if m is None:
        raise ValueError(f"{text!r} is not a DateTime64 like '2025-02-25 09:36:00.000'")
    return _second_ms(m.group(1)) + int((m.group(2) or "")[:3].ljust(3, "0"))


def iso_ms(text: str) -> int:
    """OData DateTimeOffset (ISO 8601, `Z` or offset; naive = UTC) to epoch ms, exactly."""
    dt = datetime.fromisoformat(_FRACTION.sub(r"\1", text))
    _check_year(dt.year)
    dt = dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
    return calendar.timegm(dt.timetuple()) * 1000 + dt.microsecond // 1000


def _sql_time(ms: int) -> str:
    """A DateTime64 literal made from an int only (operator.index refuses anything else)."""
    ms = operator.index(ms)
    return f"toDateTime64('{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(ms // 1000))}.{ms % 1000:03d}', 3)"


def page_sql(frm: int, after: tuple[int, int] | None, upper: int, limit: int) -> str:
    """Keyset page: from `frm`, or strictly after (Time, DeviceId) `after`; Key is never part of the statement."""
    if after is None:
        where = f"Time >= {_sql_time(frm)}"
    else:
        t = _sql_time(after[0])
        where = f"(Time > {t} OR (Time = {t} AND DeviceId > {operator.index(after[1])}))"
    return (f"SELECT {COLUMNS} FROM DeviceRawData WHERE {where} AND Time < {_sql_time(upper)} "
            f"ORDER BY Time, DeviceId, Key LIMIT {operator.index(limit)}")


def count_sql(lo: int, hi: int) -> str:
    return f"SELECT count() FROM DeviceRawData WHERE Time >= {_sql_time(lo)} AND Time < {_sql_time(hi)}"


def jwt_claims(token: str) -> dict[str, Any] | None:
    """The payload of a JWT, unverified (only `exp`/`iat` are read); None if it is not one."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = orjson.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError):
        return None
    return claims if isinstance(claims, dict) else None


def token_text(body: bytes) -> str | None:
    """The JWT from a login body: bare, or a JSON string literal (every official sample strips quotes [S])."""
    text = body.decode("utf-8", "replace").strip()
    if text.startswith('"'):
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError:
            return None
        text = value.strip() if isinstance(value, str) else ""
    return text or None


def proxus_error(status: int, headers: Mapping[str, str], body: bytes, url: str) -> Exception | None:
    """Vendor answers → our errors; a 200 that is cut short (NDJSON, token) is malformed, so the client retries it."""
    if status < 300:
        # `body` is the first line here (the client streams NDJSON and itself refuses a last line cut short)
        if url.endswith(TELEMETRY_PATH) and body and body[:1] != b"{":
            return MalformedResponse("telemetry answer is not NDJSON (JSONEachRow)",
                                     status=status, body=body[-200:].decode("utf-8", "replace"), url=url)
        if url.endswith(LOGIN_PATH):
            token = token_text(body)
            if token is None or ("." in token and jwt_claims(token) is None):
                return MalformedResponse("login answer is not a whole token (cut short?)", status=status, url=url)
        return None
    if status == 401:  # the JwtBearer challenge says why (expired, invalid); the body is empty
        why = headers.get("WWW-Authenticate", "")
        return VendorAuthError(f"credential refused (401) by {url}{': ' + why if why else ''}", status=status, url=url)
    return default_error(status, headers, body, url)


class TelemetryRow(BaseModel):
    """One DeviceRawData line (JSONEachRow) [D1]."""

    model_config = ConfigDict(extra="ignore")

    Time: int
    DeviceId: int
    DeviceName: str = ""
    Key: str
    DataType: str | int = ""
    NumericValue: float | None = None
    StringValue: str = ""

    @field_validator("Time", mode="before")
    @classmethod
    def _time(cls, v: Any) -> int:
        if not isinstance(v, str):
            raise ValueError("must be a DateTime64 string")
        return ch_time_ms(v)


class ProxusAlert(BaseModel):
    """An OData Alert (shape assumed, brief §2.1), properties already mapped onto CANON spellings."""

    model_config = ConfigDict(extra="ignore")

    Id: int | str
    DeviceId: int | str | None = None
    RuleId: int | str | None = None
    Severity: str | int | None = None
    Message: str | None = None
    Status: str | None = None
    CreatedOn: int

    @field_validator("CreatedOn", mode="before")
    @classmethod
    def _created(cls, v: Any) -> int:
        if not isinstance(v, str):
            raise ValueError("must be an ISO 8601 DateTimeOffset string")
        return iso_ms(v)


def _canon(record: dict[str, Any]) -> dict[str, Any]:
    return {CANON.get(k.lower(), k): v for k, v in record.items()}


def _line_time(record: dict[str, Any]) -> int | None:
    try:
        return ch_time_ms(record["Time"])
    except (KeyError, TypeError, ValueError):
        return None


def _position(record: dict[str, Any]) -> tuple[int, int] | None:
    """(Time ms, DeviceId) of a line: its keyset position, or None when either is unreadable."""
    ts, device = _line_time(record), record.get("DeviceId")
    return (ts, device) if ts is not None and isinstance(device, int) and not isinstance(device, bool) else None


def _keep(records: list[dict[str, Any]], start: int) -> tuple[int, tuple[int, int] | None, int]:
    """For a full page: where to cut, the position to go on after, and how many unreadable lines before the cut
    may come again at the head of the next page. The last (Time, DeviceId) group may continue in the next page, so
    it is left for that page; unreadable lines right after the kept part are kept (they may belong to its group)."""
    positions = [_position(r) for r in records]
    tail = next((p for p in reversed(positions[start:]) if p is not None), None)
    if tail is None:
        raise MalformedResponse("a full telemetry page without one readable Time and DeviceId")
    for i in range(len(records) - 1, start - 1, -1):
        p = positions[i]
        if p is not None and p < tail:
            j = i + 1
            while positions[j] is None:  # stops at the tail group, which is readable
                j += 1
            return j, p, j - i - 1
    return start, None, 0


def _count_lines(records: list[dict[str, Any]], counts: dict[str, int], count_from: int) -> None:
    """Count every line, readable or not, in its time bucket from `count_from` on (what `count()` says later)."""
    bucket, counted, pending = None, False, 0
    for record in records:
        ts, lines = _line_time(record), 1
        if ts is not None:
            bucket, counted, lines, pending = ts // BUCKET_MS, ts >= count_from, 1 + pending, 0
        elif bucket is None:  # an unreadable Time counts in its neighbour's bucket (rows arrive sorted by Time)
            pending, lines = pending + 1, 0
        if lines and counted:
            counts[str(bucket)] = counts.get(str(bucket), 0) + lines


class ProxusSource(Source):
    vendor = "proxus"
    default_streams = ("telemetry", "alert")
    default_rate = 5.0  # none documented; a self-hosted box [A, brief §4]
    default_burst = 10
    map_error = staticmethod(proxus_error)

    config: ProxusConfig

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.token: str | None = None
        self.refresh_at = 0.0
        self.devices: dict[str, str] = {}  # OData Device key → name, for alert attrs
        self.page_size = min(self.config.page_size or PAGE_SIZE, MAX_ROWS)
        self._login_lock = asyncio.Lock()
        self._attrs: dict[tuple[str, str | int], dict[str, str]] = {}

    # -- auth -----------------------------------------------------------------------------------------

    async def login(self) -> None:
        await self._login()

    async def relogin(self) -> bool:
        await self._login()
        return True

    async def _login(self) -> None:
        cfg = self.config
        resp = await self.client.request(
            "POST", f"{cfg.base_url}{LOGIN_PATH}", json={"userName": cfg.username, "password": cfg.password.get_secret_value()},
            headers={"Accept": "application/json, text/plain"},
        )
        token = token_text(resp.body)
        if token is None:
            raise VendorAuthError("login answered without a token", status=resp.status, url=resp.url)
        now, claims = self.clock(), jwt_claims(token) or {}
        exp, iat = claims.get("exp"), claims.get("iat")
        self.token, self.refresh_at = token, float("inf")
        if isinstance(exp, int | float):
            # the lifetime in the server's own clock frame (exp - iat) keeps a skewed server clock harmless
            lifetime = exp - iat if isinstance(iat, int | float) else exp - now
            if lifetime > 0:
                self.refresh_at = now + lifetime - min(REFRESH_BEFORE_EXP_S, lifetime / 2)

    async def _call(self, method: str, url: str, **kw: Any) -> Response:
        if self.token is None or self.clock() >= self.refresh_at:
            async with self._login_lock:  # streams share the token: one of them logs in
                if self.token is None or self.clock() >= self.refresh_at:
                    await self._login()
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        return await self.client.request(method, url, headers=headers, **kw)

    # -- OData ----------------------------------------------------------------------------------------

    async def _odata(self, entity: str, params: dict[str, str]) -> AsyncIterator[list[Any]]:
        """Every item of an entity set: $top/$skip windows, each followed through the server's @odata.nextLink."""
        skip = 0
        while True:
            url = f"{self.config.base_url}{ODATA_PATH}{entity}"
            query: dict[str, str] | None = {**params, "$orderby": ODATA_KEY, "$top": str(ODATA_TOP), "$skip": str(skip)}
            got = 0
            while url:
                doc = (await self._call("GET", url, params=query, expect_json=True)).data
                if not isinstance(doc, dict) or not isinstance(doc.get("value"), list):
                    raise MalformedResponse(f"OData answer for {entity} has no value array", url=url)
                got += len(doc["value"])
                yield doc["value"]
                link = doc.get("@odata.nextLink")
                if link is not None and not isinstance(link, str):
                    raise MalformedResponse(f"OData answer for {entity}: @odata.nextLink is not a URL", url=url)
                url, query = (self._rebase(link), None) if link else ("", None)
            if got != ODATA_TOP:  # a short window is the last; more than $top means $top was ignored
                return
            skip += got

    def _rebase(self, link: str) -> str:
        """A nextLink onto the configured base URL: a server behind a proxy may print its inner origin."""
        if ODATA_PATH not in link:
            raise MalformedResponse(f"@odata.nextLink outside {ODATA_PATH}: {link[:200]}")
        return self.config.base_url + ODATA_PATH + link.split(ODATA_PATH, 1)[1]

    async def discover(self) -> list[Stream]:
        devices: dict[str, str] = {}
        async for items in self._odata("Device", {}):
            for raw in items:
                rec = _canon(raw) if isinstance(raw, dict) else {}
                if rec.get("Id") is not None:
                    devices[str(rec["Id"])] = str(rec.get("Name") or rec.get("DeviceName") or "")
        self.devices = devices
        return [Stream(kind, kind, self.name) for kind in self.enabled_kinds if kind in ("telemetry", "alert")]

    async def fetch(self, stream: Stream, cursor: Any) -> Page:
        cursor = copy.deepcopy(cursor)  # the engine retries with the same cursor after a re-login
        if stream.kind == "alert":
            return await self._fetch_alerts(stream, cursor)
        return await self._fetch_telemetry(stream, cursor)

    # -- alerts ---------------------------------------------------------------------------------------

    async def _fetch_alerts(self, stream: Stream, cursor: dict[str, Any] | None) -> Page:
        """Alerts created since the watch window; new ones and status changes are emitted (same event id)."""
        now = self.now_ms()
        cursor = cursor or {"since": self.first_ms(now, stream.name), "seen": {}}
        since, seen = int(cursor["since"]), dict(cursor["seen"])
        iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(since // 1000)) + f".{since % 1000:03d}Z"
        events: list[Event] = []
        dead: list[DeadLetter] = []
        async for items in self._odata("Alert", {"$filter": f"{ALERT_TIME} ge {iso}"}):
            for alert, event in mapped(items, dead, lambda raw: self._alert(stream.tenant, raw)):
                state = [alert.Status or "", alert.CreatedOn]
                key = spoolable_text(str(alert.Id))  # the cursor is spooled as UTF-8 JSON
                if seen.get(key) == state:
                    continue
                seen[key] = state
                events.append(event)
        since = max(since, now - ALERT_WATCH_MS)
        cursor = {"since": since, "seen": {k: v for k, v in seen.items() if v[1] >= since}}
        return Page(events, cursor, done=True, dead=dead, lag_s=0.0)

    def _alert(self, tenant: str, raw: Any) -> tuple[ProxusAlert, Event]:
        """One OData Alert as (alert, event); raises on anything unreadable (the caller dead-letters it)."""
        alert = ProxusAlert.model_validate(_canon(raw) if isinstance(raw, dict) else raw)
        return alert, self._alert_event(tenant, alert, raw)

    def _alert_event(self, tenant: str, alert: ProxusAlert, raw: dict[str, Any]) -> Event:
        device = "" if alert.DeviceId is None else str(alert.DeviceId)
        attrs = {"alert_id": str(alert.Id)}
        for key, value in (("rule_id", alert.RuleId), ("severity", alert.Severity), ("status", alert.Status),
                           ("device_name", self.devices.get(device))):
            if value is not None:
                attrs[key] = str(value)
        for key, value in raw.items():  # fields the brief does not know yet are kept, not dropped
            if key.lower() not in CANON and not key.startswith("@") and value is not None:
                attrs[key] = value if isinstance(value, str) else orjson.dumps(value).decode()
        return self.event("alert", tenant, device, "alert", alert.CreatedOn, None, alert.Message, attrs)

    # -- telemetry ------------------------------------------------------------------------------------
    # cursor: done_to (rows before it were scanned), counts {bucket: rows} over [floor, done_to) for the late-row
    # check, and while a run is under way run = {from, upper, count_from, after}: `upper` is pinned for the run.

    async def _fetch_telemetry(self, stream: Stream, cursor: dict[str, Any] | None) -> Page:
        now = self.now_ms()
        if cursor is None:
            frm = self.first_ms(now, stream.name)
            cursor = {"done_to": frm, "floor": frm, "counts": {}, "run": None}
        if cursor["run"] is None:
            upper = now - WRITE_LAG_MS
            if upper <= int(cursor["done_to"]):
                return Page([], cursor, done=True, lag_s=max(0.0, (now - int(cursor["done_to"])) / 1000))
            frm = await self._late_rows_start(cursor)
            count_from = max(int(cursor["floor"]), (upper - OVERLAP_MS) // BUCKET_MS * BUCKET_MS)
            cursor["run"] = {"from": frm, "upper": upper, "count_from": count_from, "after": None}
        run = cursor["run"]
        after = (int(run["after"][0]), int(run["after"][1])) if run["after"] else None
        limit, seen_unreadable = self.page_size, int(run.get("skip", 0))
        while True:
            records = await self._rows(page_sql(int(run["from"]), after, int(run["upper"]), limit), limit)
            head = 0  # unreadable lines the last page already took (they sort after its position, so they come again)
            while head < min(seen_unreadable, len(records)) and _position(records[head]) is None:
                head += 1
            if len(records) < limit:  # the server cuts at maxRows without a marker: only a short page is the last
                cut, last, unreadable = len(records), None, 0
                break
            cut, last, unreadable = _keep(records, head)
            if cut > head:
                break
            if limit >= MAX_ROWS:  # one device with > 50 000 keys at one millisecond: keys would have to enter the SQL
                raise RequestRejected(f"more than {MAX_ROWS} rows share Time and DeviceId {records[0].get('DeviceId')}")
            limit = min(MAX_ROWS, limit * 2)  # the whole page is one group: ask for more rows at once
        events, dead = self._normalize(stream.tenant, records[head:cut], cursor["counts"], int(run["count_from"]))
        if last is not None:
            run.update(after=list(last), skip=unreadable)
            return Page(events, cursor, done=False, dead=dead, lag_s=max(0.0, (now - last[0]) / 1000))
        floor = int(run["count_from"])
        cursor.update(done_to=int(run["upper"]), floor=floor, run=None,
                      counts={b: n for b, n in cursor["counts"].items() if int(b) >= floor // BUCKET_MS})
        return Page(events, cursor, done=True, dead=dead, lag_s=max(0.0, (now - int(cursor["done_to"])) / 1000))

    async def _late_rows_start(self, cursor: dict[str, Any]) -> int:
        """Where this run starts: `done_to`, or the overlap window's start when the server holds rows we never saw."""
        done_to = int(cursor["done_to"])
        lo = max(int(cursor["floor"]), (done_to - OVERLAP_MS) // BUCKET_MS * BUCKET_MS)
        counts = {b: n for b, n in cursor["counts"].items() if int(b) >= lo // BUCKET_MS}
        cursor.update(floor=lo, counts=counts)
        if lo >= done_to:
            return done_to
        rows = await self._rows(count_sql(lo, done_to), 1)
        try:
            stored = int(rows[0]["count()"])  # UInt64 arrives quoted
        except (IndexError, KeyError, TypeError, ValueError):
            raise MalformedResponse(f"count() answer unreadable: {str(rows)[:200]}") from None
        if stored == sum(counts.values()):
            return done_to
        log.info("proxus.late_rows", window_s=(done_to - lo) / 1000, server_rows=stored, seen_rows=sum(counts.values()))
        cursor["counts"] = {}
        return lo

    async def _rows(self, sql: str, max_rows: int) -> list[dict[str, Any]]:
        """One statement's NDJSON lines, read as they stream (the client refuses a body cut mid-line)."""
        resp = await self._call("POST", f"{self.config.base_url}{TELEMETRY_PATH}", params={"maxRows": str(max_rows)},
                                json={"query": sql}, expect_lines=True)
        out = []
        for line in resp.lines or ():
            if not line.strip():
                continue
            try:
                record = loads_lenient(line)  # NaN, Infinity, lone surrogates: the guard decides about them
            except ValueError:
                record = None
            out.append(record if isinstance(record, dict) else {"_line": line.decode("utf-8", "replace")})
        return out

    def _normalize(self, tenant: str, records: list[dict[str, Any]], counts: dict[str, int],
                   count_from: int) -> tuple[list[Event], list[DeadLetter]]:
        """Events of a page's rows; every line is counted per time bucket (what `count()` will say later)."""
        _count_lines(records, counts, count_from)
        events: list[Event] = []
        dead = [DeadLetter("line is not a JSON object", r["_line"][:2000]) for r in records if "_line" in r]
        previous: tuple[int, int, str] | None = None
        rows = (r for r in records if "_line" not in r)
        for ident, event in mapped(rows, dead, lambda record: self._telemetry(tenant, record)):
            if ident == previous:  # an exact copy from a retried insert (rows arrive sorted, so copies are adjacent)
                continue
            previous = ident
            events.append(event)
        return events, dead

    def _telemetry(self, tenant: str, record: dict[str, Any]) -> tuple[tuple[int, int, str], Event]:
        """One line as (its identity, event); raises on anything unreadable (the caller dead-letters it)."""
        row = TelemetryRow.model_validate(record)
        return (row.Time, row.DeviceId, row.Key), self._telemetry_event(tenant, row)

    def _telemetry_event(self, tenant: str, row: TelemetryRow) -> Event:
        is_text = row.DataType in STRING_DATA_TYPES
        attrs = self._attrs.get((row.DeviceName, row.DataType))
        if attrs is None:  # shared by every row of the device and type: events never mutate attrs
            attrs = self._attrs[(row.DeviceName, row.DataType)] = {"data_type": str(row.DataType),
                                                                    "device_name": row.DeviceName}
        return self.event("telemetry", tenant, str(row.DeviceId), row.Key, row.Time,
                          None if is_text else row.NumericValue, row.StringValue if row.StringValue or is_text else None,
                          attrs)
