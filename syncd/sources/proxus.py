"""Proxus IIoT: JWT login, OData `Device` and `Alert`, and `telemetry` by keyset SQL over DeviceRawData (NDJSON).

Brief: shared/vendors/proxus.md. Assumptions live in the constants below. The SQL sent to the telemetry endpoint
is built only from integers (times, limits): no vendor or config text ever reaches a statement, and it uses only
what the brief's own query does (Time compared by >= and <, joined by AND; ORDER BY; LIMIT; count()), so a
stricter SQL guard refuses none of it (no OR, IN or tuple comparison).

Telemetry pages are keyed by Time alone (`KeysetPaginator`): the server cuts at maxRows (or a lower cap of its
own) without a marker, and a body can end early exactly at a line boundary, so a page is never the end by its
length. Rows before the page's last Time are kept; that Time is read again. A short page ends the run's range only
when `count()` over the range it asked for equals its lines; a ClickHouse exception line in a 200 fails the page
(retried, then the run fails with the cursor where it was).

Late rows: every run compares `count()` over the last OVERLAP_MS before its cursor with the rows it read there,
and every `reconcile_every` (default RECONCILE_EVERY_S) over the whole `late_window` (default LATE_WINDOW_S);
a difference re-reads from the window's start (event ids make the overlap free) and is reported as `Page.late`.
A row that lands later than `late_window` after its Time, or between two reconciles more than `late_window` late,
is not found. (Not `LateTally`: that compares a re-read with what was stored; this server can count, so a re-read
happens only when its count says rows are missing.)
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import operator
import time
from collections.abc import Mapping
from typing import Any

import orjson
import structlog
from pydantic import BaseModel, ConfigDict

from syncd.errors import MalformedResponse, VendorAuthError, VendorUnavailable
from syncd.events import Event
from syncd.http import Response, default_error
from syncd.settings import ProxusSource as ProxusConfig
from syncd.sources.base import DeadLetter, Page, PageBuilder, Source, Stream, late_settings, loads_lenient, mapped, valid_all
from syncd.sources.paging import KeysetPaginator, ODataPaginator, collect
from syncd.sources.times import ClickHouseMs, IsoMs, clickhouse_ms
from syncd.sources.track import AlertTracker

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
LATE_WINDOW_S = 3_600.0  # `late_window` default: how far back a reconcile looks for late rows [A: NATS buffering]
RECONCILE_EVERY_S = 600.0  # `reconcile_every` default: how often the whole late window is checked [A]
BUCKET_MS = 60_000  # resolution of the per-time row counts that tell whether late rows arrived (60 per hour) [A]
COUNT_ATTEMPTS = 6  # a count() answer without its line (cut before it) is asked this often, then the run fails
ODATA_TOP = 1_000  # $top per OData request; a server page size shows up as @odata.nextLink [A]
ODATA_KEY = "Id"  # key property the OData pages are ordered by (real $metadata unseen) [A]
ALERT_TIME = "CreatedOn"  # Alert fields are undocumented; names from the brief's assumed shape [A]
ALERT_WATCH_MS = 86_400_000  # alerts this young are re-read so a status change is re-emitted [A]
STRING_DATA_TYPES = ("String", 9)  # DataType Enum8 arrives as its name; the number for String is assumed [A]

COLUMNS = "Time, DeviceId, DeviceName, Key, DataType, NumericValue, StringValue"
# OData casing is undocumented: properties are matched case-insensitively onto these spellings [A]
CANON = {k.lower(): k for k in ("Id", "Name", "DeviceName", "DeviceId", "RuleId", "Severity", "Message", "Status",
                                "CreatedOn")} | {"oid": "Id"}


def _sql_time(ms: int) -> str:
    """A DateTime64 literal made from an int only (operator.index refuses anything else)."""
    ms = operator.index(ms)
    return f"toDateTime64('{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(ms // 1000))}.{ms % 1000:03d}', 3)"


def _range(lo: int, after: bool, hi: int) -> str:
    return f"Time {'>' if after else '>='} {_sql_time(lo)} AND Time < {_sql_time(hi)}"


def page_sql(lo: int, after: bool, upper: int, limit: int) -> str:
    """Keyset page from Time `lo` (rows at `lo` included unless `after`): the brief's own query (§2.3)."""
    return (f"SELECT {COLUMNS} FROM DeviceRawData WHERE {_range(lo, after, upper)} "
            f"ORDER BY Time, DeviceId, Key LIMIT {operator.index(limit)}")


def count_sql(lo: int, hi: int, after: bool = False) -> str:
    return f"SELECT count() FROM DeviceRawData WHERE {_range(lo, after, hi)}"


def server_error(line: bytes) -> str | None:
    """The message of a ClickHouse exception line (what it streams when a query fails part-way), else None.

    As text (`Code: 241. DB::Exception: ...`), or inside the output format as newer servers write it
    (`{"exception": "Code: 241. DB::Exception: ..."}`) [A: ClickHouse HTTP behaviour; the brief is silent].
    """
    line = line.strip()
    if line.startswith(b'{"exception"'):
        try:
            record = loads_lenient(line)
        except ValueError:
            return None
        message = record.get("exception") if isinstance(record, dict) else None
        return message if isinstance(message, str) else None
    if line[:1] != b"{" and (line.startswith(b"Code: ") or b"DB::Exception" in line[:300]):  # never a row's text
        return line.decode("utf-8", "replace")
    return None


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
        if url.endswith(TELEMETRY_PATH) and body:  # the whole NDJSON body: a page is judged before any row is taken
            if not body.endswith(b"\n"):
                return MalformedResponse("telemetry answer cut mid-line", status=status,
                                         body=body[-200:].decode("utf-8", "replace"), url=url)
            end = len(body)
            while end and body[end - 1] in b" \t\r\n":
                end -= 1
            last = body[body.rfind(b"\n", 0, end) + 1:end]
            why = server_error(last)
            if why is not None:  # rows so far, then the query died: the page is no page
                return VendorUnavailable(f"telemetry query failed part-way (status {status}): {why[:300]}",
                                         status=status, body=why, url=url)
            if body[:1] != b"{" or last[:1] != b"{":
                return MalformedResponse("telemetry answer is not NDJSON (JSONEachRow)",
                                         status=status, body=body[:200].decode("utf-8", "replace"), url=url)
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

    Time: ClickHouseMs
    DeviceId: int
    DeviceName: str = ""
    Key: str
    DataType: str | int = ""
    NumericValue: float | None = None
    StringValue: str = ""


class ProxusAlert(BaseModel):
    """An OData Alert (shape assumed, brief §2.1), properties already mapped onto CANON spellings."""

    model_config = ConfigDict(extra="ignore")

    Id: int | str
    DeviceId: int | str | None = None
    RuleId: int | str | None = None
    Severity: str | int | None = None
    Message: str | None = None
    Status: str | None = None
    CreatedOn: IsoMs


def _canon(record: dict[str, Any]) -> dict[str, Any]:
    return {CANON.get(k.lower(), k): v for k, v in record.items()}


def _line_time(record: dict[str, Any]) -> int | None:
    try:
        return clickhouse_ms(record["Time"])
    except (KeyError, ValueError):
        return None


def _bucket_start(ms: int) -> int:
    return ms // BUCKET_MS * BUCKET_MS


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


def alert_cursor(cursor: Any) -> Any:
    """An alert cursor in today's layout; carried over: {"since", "seen": {id: [Status, CreatedOn]}}."""
    if isinstance(cursor, dict) and "seen" in cursor:
        return {"since": cursor["since"], "open": {k: [v, v[1]] for k, v in cursor["seen"].items()}, "closed": {}}
    return cursor


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
        self.late_window_ms, every_s = late_settings(self.config, LATE_WINDOW_S, RECONCILE_EVERY_S)
        self.reconcile_every_ms = int(every_s * 1000)

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

    async def _odata(self, entity: str, params: dict[str, str]) -> list[Any]:
        """Every item of an entity set, in key order ($top/$skip windows through the server's @odata.nextLink)."""
        where = f"OData answer for {entity}"

        async def page(pager: ODataPaginator) -> list[Any]:
            window = pager.params()  # None: the next link is the whole request
            url = self._rebase(pager.link) if pager.link else f"{self.config.base_url}{ODATA_PATH}{entity}"
            query = None if window is None else {**params, "$orderby": ODATA_KEY, **window}
            doc = (await self._call("GET", url, params=query, expect_json=True)).data
            if not isinstance(doc, dict) or not isinstance(doc.get("value"), list):
                raise MalformedResponse(f"{where} has no value array", url=url)
            pager.update_state(len(doc["value"]), doc.get("@odata.nextLink"), where)
            return doc["value"]

        return await collect(ODataPaginator(ODATA_TOP), page)

    def _rebase(self, link: str) -> str:
        """A nextLink onto the configured base URL: a server behind a proxy may print its inner origin."""
        if ODATA_PATH not in link:
            raise MalformedResponse(f"@odata.nextLink outside {ODATA_PATH}: {link[:200]}")
        return self.config.base_url + ODATA_PATH + link.split(ODATA_PATH, 1)[1]

    async def discover(self) -> list[Stream]:
        devices: dict[str, str] = {}
        for raw in await self._odata("Device", {}):
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
    # cursor: since (alerts created before it are no longer read) and the AlertTracker's state, keyed by alert id,
    # each with the [Status, CreatedOn] it was last emitted in; no alert is ever "closed" (Resolved is a status).

    async def _fetch_alerts(self, stream: Stream, cursor: dict[str, Any] | None) -> Page:
        """Alerts created since the watch window; new ones and status changes are emitted (same event id)."""
        now = self.now_ms()
        cursor = alert_cursor(cursor) or {"since": self.first_ms(now, stream.name)}
        since, alerts = int(cursor["since"]), AlertTracker(cursor)
        iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(since // 1000)) + f".{since % 1000:03d}Z"
        b, dead = PageBuilder(self), list[DeadLetter]()
        items = await self._odata("Alert", {"$filter": f"{ALERT_TIME} ge {iso}"})
        for alert, fields in mapped(items, dead, lambda raw: self._alert_fields(stream.tenant, raw)):
            if alerts.update(str(alert.Id), [alert.Status or "", alert.CreatedOn], alert.CreatedOn):
                b.add(*fields)
        since = max(since, now - ALERT_WATCH_MS)
        alerts.forget(since, open_too=True)
        return b.page({"since": since, **alerts.state()}, done=True, dead=dead, lag_s=0.0)

    def _alert_fields(self, tenant: str, raw: Any) -> tuple[ProxusAlert, tuple[Any, ...]]:
        """One OData Alert as (alert, its event's fields); raises on anything unreadable (the caller dead-letters it)."""
        alert = ProxusAlert.model_validate(_canon(raw) if isinstance(raw, dict) else raw)
        device = "" if alert.DeviceId is None else str(alert.DeviceId)
        attrs = {"alert_id": str(alert.Id)}
        for key, value in (("rule_id", alert.RuleId), ("severity", alert.Severity), ("status", alert.Status),
                           ("device_name", self.devices.get(device))):
            if value is not None:
                attrs[key] = str(value)
        for key, value in raw.items():  # fields the brief does not know yet are kept, not dropped
            if key.lower() not in CANON and not key.startswith("@") and value is not None:
                attrs[key] = value if isinstance(value, str) else orjson.dumps(value).decode()
        return alert, ("alert", tenant, device, "alert", alert.CreatedOn, None, alert.Message, attrs)

    def _alert(self, tenant: str, raw: Any) -> tuple[ProxusAlert, Event]:
        """`_alert_fields` as an Event (the property tests' entry point)."""
        alert, fields = self._alert_fields(tenant, raw)
        return alert, Event(self.name, self.vendor, *fields)

    # -- telemetry ------------------------------------------------------------------------------------
    # cursor: done_to (rows before it were scanned), counts {bucket: lines} over [floor, done_to) for the late-row
    # checks, reconciled_at (when the whole late window was last checked), and while a run is under way
    # run = {from, upper, count_from, page}: `upper` is pinned for the run, `page` is its KeysetPaginator.

    async def _fetch_telemetry(self, stream: Stream, cursor: dict[str, Any] | None) -> Page:
        now = self.now_ms()
        if cursor is None:
            frm = self.first_ms(now, stream.name)
            cursor = {"done_to": frm, "floor": frm, "counts": {}, "run": None, "reconciled_at": now}
        elif cursor.get("bucket_ms") != BUCKET_MS:  # counts of another resolution (or a run paged another way)
            cursor.update(floor=int(cursor["done_to"]), counts={}, run=None)
        cursor["bucket_ms"] = BUCKET_MS
        late = 0
        if cursor["run"] is None:
            upper = now - WRITE_LAG_MS
            if upper <= int(cursor["done_to"]):
                return Page([], cursor, done=True, lag_s=max(0.0, (now - int(cursor["done_to"])) / 1000))
            frm, late = await self._late_rows_start(cursor, now)
            count_from = max(int(cursor["floor"]), _bucket_start(upper - self.late_window_ms))
            pager = KeysetPaginator(frm, self.page_size, MAX_ROWS)
            cursor["run"] = {"from": frm, "upper": upper, "count_from": count_from, "page": pager.state()}
        run = cursor["run"]
        upper, pager = int(run["upper"]), KeysetPaginator(**run["page"])
        while True:
            records = await self._rows(page_sql(int(pager.key), pager.after, upper, pager.limit), pager.limit)
            keys = [_line_time(r) for r in records]
            whole = None  # a short page (empty too) is the end only when count() agrees: it may be a cut or a cap
            if pager.short(keys):
                whole = await self._count(int(pager.key), upper, pager.after) == len(records)
            kept = pager.update_state(keys, whole)
            if kept.stop > kept.start or pager.done:
                break
        b = PageBuilder(self)
        dead = self._add_rows(b, stream.tenant, records[kept], cursor["counts"], int(run["count_from"]))
        if not pager.done:
            run["page"] = pager.state()
            return b.page(cursor, done=False, dead=dead, lag_s=max(0.0, (now - int(pager.key)) / 1000), late=late)
        floor = int(run["count_from"])
        cursor.update(done_to=upper, floor=floor, run=None,
                      counts={k: n for k, n in cursor["counts"].items() if int(k) >= floor // BUCKET_MS})
        return b.page(cursor, done=True, dead=dead, lag_s=max(0.0, (now - upper) / 1000), late=late)

    async def _late_rows_start(self, cursor: dict[str, Any], now: int) -> tuple[int, int]:
        """Where this run starts, and how many late rows the server holds that no read saw.

        `done_to`, unless count() over the checked window (OVERLAP_MS; the whole late window when a reconcile is
        due) differs from the lines read there: then the window's start, and the difference is the late rows.
        """
        done_to, window = int(cursor["done_to"]), self.late_window_ms
        floor = max(int(cursor["floor"]), _bucket_start(done_to - window))  # counts are kept over the late window
        counts = {b: n for b, n in cursor["counts"].items() if int(b) >= floor // BUCKET_MS}
        cursor.update(floor=floor, counts=counts)
        reconcile = now - int(cursor.get("reconciled_at") or 0) >= self.reconcile_every_ms
        if reconcile:
            cursor["reconciled_at"] = now
        else:
            window = min(window, OVERLAP_MS)
        lo = max(floor, _bucket_start(done_to - window))
        if lo >= done_to:
            return done_to, 0
        stored = await self._count(lo, done_to)
        seen = sum(n for b, n in counts.items() if int(b) >= lo // BUCKET_MS)
        if stored == seen:
            return done_to, 0
        late = max(0, stored - seen)
        log.info("proxus.late_rows", window_s=(done_to - lo) / 1000, server_rows=stored, seen_rows=seen, late=late,
                 reconcile=reconcile)
        cursor["counts"] = {b: n for b, n in counts.items() if int(b) < lo // BUCKET_MS}  # the re-read counts again
        return lo, late

    async def _count(self, lo: int, hi: int, after: bool = False) -> int:
        """count() of the rows in [lo, hi) (or (lo, hi)); an answer cut before its one line is asked again."""
        for _ in range(COUNT_ATTEMPTS):
            rows = await self._rows(count_sql(lo, hi, after), 1)
            if rows:
                try:
                    return int(rows[0]["count()"])  # UInt64 arrives quoted
                except (KeyError, TypeError, ValueError):
                    raise MalformedResponse(f"count() answer unreadable: {str(rows)[:200]}") from None
        raise MalformedResponse(f"count() answered without a row {COUNT_ATTEMPTS} times")

    async def _rows(self, sql: str, max_rows: int) -> list[dict[str, Any]]:
        """One statement's NDJSON lines. The body is read whole, so the error mapping has judged all of it (cut
        mid-line, an exception line at the end) before a line is taken."""
        resp = await self._call("POST", f"{self.config.base_url}{TELEMETRY_PATH}", params={"maxRows": str(max_rows)},
                                json={"query": sql})
        out = []
        for line in resp.body.split(b"\n"):
            if not line.strip():
                continue
            try:
                record = loads_lenient(line)  # NaN, Infinity, lone surrogates: the guard decides about them
            except ValueError:
                record = None
            if isinstance(record, dict) and "exception" not in record:
                out.append(record)
                continue
            why = server_error(line)
            if why is not None or line[:1] != b"{":  # not a row: the query failed, or this is no JSONEachRow at all
                raise VendorUnavailable(f"telemetry answer holds a line that is no row: {(why or repr(line))[:300]}",
                                        body=line[:300].decode("utf-8", "replace"), url=resp.url)
            out.append({"_line": line.decode("utf-8", "replace")})  # a row ClickHouse wrote as no valid JSON (bad UTF-8)
        return out

    def _add_rows(self, b: PageBuilder, tenant: str, records: list[dict[str, Any]], counts: dict[str, int],
                  count_from: int) -> list[DeadLetter]:
        """A page's lines as events on `b` (and its dead letters); every line is counted per time bucket (what
        `count()` will say later)."""
        _count_lines(records, counts, count_from)
        dead = [DeadLetter("line is not a JSON object", r["_line"][:2000]) for r in records if "_line" in r]
        previous: tuple[int, int, str] | None = None
        for row in valid_all(TelemetryRow, [r for r in records if "_line" not in r], dead):
            ident = (row.Time, row.DeviceId, row.Key)
            if ident != previous:  # else an exact copy from a retried insert (rows arrive sorted: copies are adjacent)
                b.add(*self._telemetry_fields(tenant, row))
            previous = ident
        return dead

    def _telemetry_fields(self, tenant: str, row: TelemetryRow) -> tuple[Any, ...]:
        is_text = row.DataType in STRING_DATA_TYPES
        attrs = self._attrs.get((row.DeviceName, row.DataType))
        if attrs is None:  # shared by every row of the device and type: events never mutate attrs
            attrs = self._attrs[(row.DeviceName, row.DataType)] = {"data_type": str(row.DataType),
                                                                    "device_name": row.DeviceName}
        return ("telemetry", tenant, str(row.DeviceId), row.Key, row.Time,
                None if is_text else row.NumericValue, row.StringValue if row.StringValue or is_text else None, attrs)

    # the property tests' entry points: a page's lines, and one line alone, as Event objects

    def _normalize(self, tenant: str, records: list[dict[str, Any]], counts: dict[str, int],
                   count_from: int) -> tuple[list[Event], list[DeadLetter]]:
        b = PageBuilder(self)
        dead = self._add_rows(b, tenant, records, counts, count_from)
        return b.page(None, True).events, dead

    def _telemetry(self, tenant: str, record: dict[str, Any]) -> tuple[tuple[int, int, str], Event]:
        """Raises where `_add_rows` dead-letters the line."""
        row = TelemetryRow.model_validate(record)
        return (row.Time, row.DeviceId, row.Key), Event(self.name, self.vendor, *self._telemetry_fields(tenant, row))
