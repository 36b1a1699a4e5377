"""Proxus IIoT fake: JWT login, OData Device/Gateway/Rule/Alert, and a strict SQL SELECT over DeviceRawData.

Choices the connector must mirror (brief §8 leaves them open):
- tenant = the configured source name; the sim cannot know it, so ground_truth() uses `tenant` (default
  "proxus-sim") and the harness must name the `[[sources]]` entry the same.
- telemetry: device = str(DeviceId), metric = Key, ts = Time (UTC ms); value = NumericValue unless
  DataType is String or the value is null (NaN); Boolean/Int32/Double all count as numeric (Boolean is 0/1);
  text = StringValue when it is non-empty or DataType is String (so a String row with "" has text "").
- alert: device = str(DeviceId), metric = "alert" (the Alert entity carries only RuleId, no rule name),
  ts = CreatedOn (DateTimeOffset, "Z" or "+02:00", ms precision), value = None, text = Message.
- Duplicate DeviceRawData rows (a retried async insert) are exact copies; ground truth keeps one.
- DataType Enum8 (names assumed, Double = 8 as in [D1]): Boolean 1, Int16 2, UInt16 3, Int32 4, UInt32 5,
  Int64 6, Float 7, Double 8, String 9, DateTime 10.  Device's OData name property is `Name` (seed $filter).
- `malformed_rows=N` (fault injection, off by default): about N rows render with `"DeviceId":null` (a Nullable
  column after a schema change) or the zero DateTime `"0000-00-00 00:00:00.000"`; ground_truth() leaves them out.
- `poison="ts_9999,value_nan_literal,..."` (off by default, names in POISONS): per variant one telemetry row (or
  alert) renders with that bad value written raw (a NaN literal, a `\ud83d` escape); `poisoned` lists them;
  ground_truth() leaves out the ones a sync must dead-letter and holds value None for a NaN reading.
- Visibility: a row is readable 1 s after its Time; with `late` on, ~2.5 % of rows only 90-240 s after.
  ground_truth() = what is readable now with Time <= now - 10 s (all history when not live).

Worse than a connector may assume (all off by default; constructor options, so `syncd sim --option proxus.X=...`,
also switchable at run time as attributes or by POST /_sim/proxus):
- `cut_at_line=N`: the next N telemetry bodies (rows or count()) end early exactly at a line boundary, anywhere
  from before the first line to before the last: a well-formed, shorter (or empty) NDJSON body, status 200.
- `error_line=N`: the next N telemetry bodies stop after some rows (none to all) with the exception ClickHouse
  streams when a query fails part-way, status 200: alternately its text line (`Code: 241. DB::Exception: ...`)
  and, as newer servers write it inside the output format, `{"exception": "Code: 241. ..."}`.
- `row_cap=N`: the server returns at most N rows whatever LIMIT and maxRows say, without a marker.
- `strict_guard=true`: the SQL guard also refuses OR, IN and tuple comparisons (syncd.sim.proxus_sql.Query).
- `late_rows=N`, `late_by=S` (default 7200 s): N rows whose Time lies about S seconds before the sim started are
  withheld until `land_late()` (or `{"land_late": true}`), as if a buffered gateway inserted them that late;
  `withheld` lists their ground-truth keys; ground_truth() holds them only once they landed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import operator
import time
import zlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from functools import lru_cache
from typing import Any

from aiohttp import web

from syncd.sim.common import (
    Clock,
    Poisoned,
    SlidingWindowLimit,
    TruthRow,
    VendorSim,
    dumps,
    poison_list,
    raw_json,
    splice_raw,
)
from syncd.sim.proxus_odata import ODataError, ODataFilter
from syncd.sim.proxus_sql import COLUMNS, DT_NAME, IDX, Query, Row, SqlError

BOOL, INT32, DOUBLE, STRING = 1, 4, 8, 9
NAMES = ["Sensor1", "pump'; DROP TABLE x; --", 'Kühlhaus "Süd" +3/#1 $', "Boiler 2", "Line-4 Press"]
KEYS = [("temperature", DOUBLE), ("ns=2;s=Tank #1/Level+'Ω'", DOUBLE), ("state", STRING),
        ("$SYS/running", BOOL), ("Δp [mbar] #2+", DOUBLE), ("counter", INT32), ("rpm", DOUBLE), ("mode", STRING)]
STATES = ("Normal", "High", "Low", "Fault")
SEVERITIES = ("Info", "Warning", "Critical")
RULES = ["High temperature", "Level 'critical'", "Pump stopped"]
WRITE_MS = 1000  # micro-batched insert: a row is readable this long after its Time
LAG_MS = 10_000  # ground truth stops this far before now (the connector's upper bound lag)
DEFAULT_MAX_ROWS, MAX_ROWS = 10_000, 50_000
NATURAL = [("Time", False), ("DeviceId", False), ("Key", False)]
INVALID_URI = "The query specified in the URI is not valid."
ODATA_OPTIONS = {"$filter", "$select", "$top", "$skip", "$orderby", "$count"}
M64 = (1 << 64) - 1
# what ClickHouse streams as the last line when a query fails part-way (its headers and status 200 already sent)
CH_EXCEPTION = ("Code: 241. DB::Exception: Memory limit (total) exceeded: would use 3.52 GiB (attempt to allocate "
                "chunk of 4194304 bytes), maximum: 3.48 GiB. OvercommitTracker decision: Query was selected to stop by "
                "OvercommitTracker.: While executing JSONEachRowRowOutputFormat. (MEMORY_LIMIT_EXCEEDED) "
                "(version 23.8.2.7 (official build))")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _mix(a: int, b: int) -> int:
    """splitmix64 of two ints: cheap, deterministic per-row randomness without materialising rows."""
    z = (a * 0x9E3779B97F4A7C15 + b * 0xD1B54A32D192ED03 + 0x94D049BB133111EB) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@lru_cache(maxsize=4096)
def _fmt_second(s: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(s))


def _fmt_time(ms: int) -> str:
    return f"{_fmt_second(ms // 1000)}.{ms % 1000:03d}"


@lru_cache(maxsize=4096)
def _json_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False).replace("/", "\\/")  # ClickHouse escapes '/' in JSON strings


def _fmt_float(v: float) -> str:
    """ClickHouse Float64 text: shortest form, no '.0' on whole numbers, nan/inf as null."""
    if math.isnan(v) or math.isinf(v):
        return "null"
    return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


RENDER: dict[str, Callable[[Any], str]] = {  # JSONEachRow spelling of each column
    "Time": lambda v: f'"{_fmt_time(v)}"', "DeviceId": str, "DeviceName": _json_str, "Key": _json_str,
    "DataType": lambda v: f'"{DT_NAME[v]}"', "NumericValue": _fmt_float, "StringValue": _json_str}


# variant -> (column or Alert property replaced, raw JSON text ("{}" = the good value's text), field the dead letter
# names; None: stored with value NULL). Alert variants start with "alert_".
POISONS: dict[str, tuple[str, str, str | None]] = {
    "ts_9999": ("Time", '"9999-12-31 23:59:59.000"', "Time"),
    "value_nan_literal": ("NumericValue", "NaN", None),
    "value_infinity": ("NumericValue", "Infinity", None),
    "id_infinity": ("DeviceId", "Infinity", "DeviceId"),
    "surrogate_key": ("Key", '"{}\\ud83d"', "metric"),
    "surrogate_text": ("StringValue", '"{}\\ud83d"', "text"),
    "alert_ts_9999": ("CreatedOn", '"9999-12-31T23:59:59.000Z"', "CreatedOn"),
    "alert_surrogate": ("Message", '"{}\\ud83d"', "text"),
}


class ProxusSim(VendorSim):
    """A self-hosted Proxus server: history lies in [anchor - history, anchor - 60 s], generated per row on demand."""

    vendor = "proxus"

    def __init__(self, seed: int = 1, *, clock: Clock = time.time, live: bool = False, devices: int = 5,
                 keys_per_device: int = 4, rows: int = 5000, history: float = 3600, alerts: int = 20,
                 late: bool = False, token_style: str = "alternate", token_ttl: float = 3600,
                 odata_page_size: int = 100, username: str = "syncd", password: str = "sim-password-5c2e",
                 tenant: str = "proxus-sim", rate_limit: int | None = None, malformed_rows: int = 0,
                 poison: str | list[str] = "", cut_at_line: int = 0, error_line: int = 0, row_cap: int = 0,
                 strict_guard: bool = False, late_rows: int = 0, late_by: float = 7200.0) -> None:
        super().__init__(seed, clock=clock)
        if token_style not in ("quoted", "bare", "alternate"):
            raise ValueError("token_style must be quoted, bare or alternate")
        self.live, self.late, self.token_style, self.token_ttl = live, late, token_style, token_ttl
        self.malformed_every = max(1, rows // malformed_rows) if malformed_rows > 0 else 0
        self.odata_page_size, self.username, self.password, self.tenant = odata_page_size, username, password, tenant
        self.anchor = clock()
        self.statements: list[str] = []  # every SQL text received, accepted or not
        self.worsened: list[tuple[str, str]] = []  # (fault, SQL text) of each body `error_line`/`cut_at_line` changed
        self.limits = [SlidingWindowLimit(rate_limit, 1.0, clock)] if rate_limit else []  # none documented
        self.series = devices * keys_per_device
        self.n_ticks = -(-rows // self.series)  # whole ticks: every series sampled each tick
        history_ms = int(history * 1000)
        self.t0 = int(self.anchor * 1000) - history_ms
        self.iv = (history_ms - 60_000) // self.n_ticks
        if self.iv < 1:
            raise ValueError("history too short for that many rows")
        self.dev_ids = [d + 1 for d in range(devices)]
        self.dev_names = [NAMES[d] if d < len(NAMES) else f"Device{d + 1}" for d in range(devices)]
        keys = [KEYS[k] if k < len(KEYS) else (f"tag{k}", DOUBLE) for k in range(keys_per_device)]
        phase = [_mix(seed, d) % self.iv for d in range(devices)]
        # slot order inside a tick = ORDER BY Time, DeviceId, Key, so position order is the natural order
        series = sorted((phase[d], self.dev_ids[d], keys[k][0], d, k) for d in range(devices)
                        for k in range(keys_per_device))
        self.slots = [(ph, self.dev_ids[d], self.dev_names[d], key, keys[k][1], 20.0 + 7 * d + k, 1.0 + (d + k) % 5)
                      for ph, _, key, d, k in series]
        self.n_alerts, self.alert_iv = alerts, max(1, (history_ms - 60_000) // max(alerts, 1))
        self._secret = hashlib.sha256(f"proxus-sim-{seed}".encode()).digest()
        self._jti = self._revoked_upto = self._logins = 0
        self._poison_rows: dict[tuple[int, int, str], str] = {}  # (Time, DeviceId, Key) -> variant
        self._poison_alerts: dict[int, str] = {}  # alert Id -> variant
        self.poisoned: list[Poisoned] = []
        self._held: frozenset[int] = frozenset()  # positions withheld by `late_rows` until land_late()
        self.withheld: list[tuple[str, str, str, str, int]] = []
        self._plant(poison_list(poison, POISONS, "proxus"))
        self._withhold(late_rows, late_by)
        self.cut_at_line, self.error_line, self.row_cap, self.strict_guard = cut_at_line, error_line, row_cap, strict_guard
        self._errors_sent = 0

    def _withhold(self, n: int, late_by: float) -> None:
        """`late_rows`: n rows from about `late_by` seconds before the start (never a duplicated, malformed or
        poisoned one), spread over the series, are not readable until land_late()."""
        if n <= 0:
            return
        now_ms, total = int(self.clock() * 1000), self.n_ticks * self.series
        tick = (int(self.anchor * 1000) - int(late_by * 1000) - self.t0) // self.iv
        if tick < 0:
            raise ValueError("late_rows: the history must reach late_by back")
        held: set[int] = set()
        p = tick * self.series
        while len(held) < n:
            if p >= total:
                raise ValueError("late_rows: too few rows after late_by")
            row, dup = self._row(p, now_ms)
            if row is not None and not dup and not self._malformed(row) and (row[0], row[1], row[3]) not in self._poison_rows:
                held.add(p)
                self.withheld.append(("telemetry", self.tenant, str(row[1]), row[3], row[0]))
            p += 3  # every third position: several devices and keys
        self._held = frozenset(held)

    def land_late(self) -> int:
        """The withheld rows become readable (inserted now, their Time `late_by` in the past); returns how many."""
        landed, self._held = len(self._held), frozenset()
        return landed

    def _plant(self, variants: list[str]) -> None:
        """Per variant one row of a fitting type spread over the history (never a duplicated or malformed one)."""
        if variants and self.live:
            raise ValueError("poison needs a fixed history (not live)")
        now_ms, total = int(self.clock() * 1000), self.n_ticks * self.series
        for k, variant in enumerate(variants):
            column, _, field = POISONS[variant]
            if variant.startswith("alert_"):
                alerts = self._alerts(now_ms)
                if k >= len(alerts):
                    raise ValueError("poison: too few alerts")
                a = alerts[(k * 7) % len(alerts)]
                while a["Id"] in self._poison_alerts:
                    a = alerts[a["Id"] % len(alerts)]
                self._poison_alerts[a["Id"]] = variant
                ts = (a["CreatedOn"] - EPOCH) // timedelta(milliseconds=1)
                self.poisoned.append(Poisoned(variant, ("alert", self.tenant, str(a["DeviceId"]), "alert", ts), field,
                                              self._raw(variant, a[column])))
                continue
            want = {"NumericValue": (DOUBLE,), "StringValue": (STRING,)}.get(column, (DOUBLE, INT32, BOOL, STRING))
            p = total * (k + 1) // (len(variants) + 2)
            while True:
                row, dup = self._row(p % total, now_ms)
                if (row is not None and not dup and row[4] in want and not self._malformed(row)
                        and (row[0], row[1], row[3]) not in self._poison_rows and not math.isnan(row[5])):
                    break
                p += 1
            self._poison_rows[(row[0], row[1], row[3])] = variant
            self.poisoned.append(Poisoned(variant, ("telemetry", self.tenant, str(row[1]), row[3], row[0]), field,
                                          self._raw(variant, row[IDX[column]])))

    @staticmethod
    def _raw(variant: str, good: Any) -> str:
        """The raw JSON text of a variant; "{}" in it stands for the good value's text (JSON-escaped)."""
        return POISONS[variant][1].replace("{}", json.dumps(str(good))[1:-1])

    # -- data ------------------------------------------------------------
    def _row(self, p: int, now_ms: int) -> tuple[Row | None, bool]:
        """Position p in natural order → (row or None when not readable yet, is-duplicated)."""
        if self._held and p in self._held:
            return None, False
        j, slot = divmod(p, self.series)
        ph, dev_id, name, key, dtype, base, amp = self.slots[slot]
        ts = self.t0 + j * self.iv + ph
        h = _mix(self.seed * 1_000_003 + slot, j)
        delay = 90_000 + (h >> 12) % 150_000 if self.late and (h >> 4) % 40 == 0 else WRITE_MS
        if ts + delay > now_ms:
            return None, False
        sv = ""
        if dtype == DOUBLE:
            wave = base + amp * math.sin(j / 9 + slot) + (h % 1000) / 2000
            num = math.nan if (h >> 40) % 499 == 0 else round(wave, 3)
        elif dtype == INT32:
            num = float(j * (slot + 1) % 1_000_000)
        elif dtype == BOOL:
            num = float((j // 7 + slot) % 2)
            sv = "True" if num else "False"
        else:
            num, sv = 0.0, "" if (h >> 20) % 97 == 0 else STATES[(j // 5 + slot) % 4]
        return (ts, dev_id, name, key, dtype, num, sv), (h >> 24) % 997 == 0

    def _end(self, now_ms: int) -> int:
        ticks = (now_ms - self.t0) // self.iv + 1 if self.live else self.n_ticks
        return max(0, ticks) * self.series

    def _scan(self, lo: int | None, hi: int | None, reverse: bool, now_ms: int) -> Iterator[Row]:
        start, end = 0, self._end(now_ms)
        if lo is not None:
            start = max(0, ((lo - self.t0) // self.iv - 1) * self.series)
        if hi is not None:
            end = min(end, max(0, ((hi - self.t0) // self.iv + 2) * self.series))
        for p in range(end - 1, start - 1, -1) if reverse else range(start, end):
            row, dup = self._row(p, now_ms)
            if row is not None:
                yield row
                if dup:
                    yield row

    def _alerts(self, now_ms: int) -> list[dict[str, Any]]:
        n = max(self.n_alerts, (now_ms - self.t0) // self.alert_iv + 1) if self.live else self.n_alerts
        out = []
        for i in range(n):
            h = _mix(self.seed + 77, i)
            created = self.t0 + i * self.alert_iv + h % self.alert_iv
            if created > now_ms:
                break
            slot = self.slots[(h >> 8) % self.series]
            tz = timezone(timedelta(hours=2)) if i % 3 == 2 else UTC  # a server in CEST renders its offset
            age = now_ms - created
            status = "Active" if age < 1_800_000 else ("Acknowledged", "Resolved")[(h >> 16) & 1]
            out.append({"Id": i + 1, "DeviceId": slot[1], "RuleId": 1 + (h >> 20) % len(RULES),
                        "Severity": SEVERITIES[(h >> 24) % 3], "Message": f"{slot[3]} out of range on {slot[2]}",
                        "Status": status, "CreatedOn": (EPOCH + timedelta(milliseconds=created)).astimezone(tz)})
        return out

    def _entities(self, name: str, now_ms: int) -> list[dict[str, Any]] | None:
        gateways = max(1, (len(self.dev_ids) + 2) // 3)
        if name == "Device":
            return [{"Id": i, "Name": n, "GatewayId": 1 + k % gateways, "Enabled": True,
                     "Status": "Active" if k % 4 != 3 else "Inactive"}
                    for k, (i, n) in enumerate(zip(self.dev_ids, self.dev_names, strict=True))]
        if name == "Gateway":
            return [{"Id": g + 1, "Name": f"Edge-GW-{g + 1}", "Status": "Active"} for g in range(gateways)]
        if name == "Rule":
            return [{"Id": r + 1, "Name": n, "Enabled": True} for r, n in enumerate(RULES)]
        if name == "Alert":
            return self._alerts(now_ms)
        if name in ("RuleAction", "TargetProfile", "DeviceProfile", "NotificationChannel"):
            return []
        return None

    def ground_truth(self) -> list[TruthRow]:
        now_ms = int(self.clock() * 1000)
        out: dict[tuple[str, str, str, int], TruthRow] = {}
        for r in self._scan(None, now_ms - LAG_MS, False, now_ms):
            variant = self._poison_rows.get((r[0], r[1], r[3])) if self._poison_rows else None
            if variant is not None and POISONS[variant][2] is not None:
                continue
            if r[0] <= now_ms - LAG_MS and not self._malformed(r):
                value = None if r[4] == STRING or math.isnan(r[5]) or variant else r[5]
                text = r[6] if r[6] or r[4] == STRING else None
                out.setdefault(("telemetry", str(r[1]), r[3], r[0]), TruthRow(
                    "proxus", "telemetry", self.tenant, str(r[1]), r[3], r[0], value, text))
        for a in self._alerts(now_ms):
            ts = (a["CreatedOn"] - EPOCH) // timedelta(milliseconds=1)
            if ts <= now_ms - LAG_MS and a["Id"] not in self._poison_alerts:
                out.setdefault(("alert", str(a["DeviceId"]), "alert", ts), TruthRow(
                    "proxus", "alert", self.tenant, str(a["DeviceId"]), "alert", ts, None, a["Message"]))
        return list(out.values())

    def source_config(self) -> dict[str, Any]:
        return {"vendor": "proxus", "base_url": self.url, "username": self.username, "password": self.password}

    def expire_tokens(self) -> None:
        """Revoke every token issued so far (expiry before `exp`); a fresh login works again."""
        self._revoked_upto = self._jti

    # -- HTTP --------------------------------------------------------------
    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/_sim/proxus", self._h_control)
        app.router.add_post("/api/Authentication/Authenticate", self._h_login)
        app.router.add_get(r"/api/odata/{entity}{count:(/\$count)?}", self._h_odata)
        app.router.add_post("/api/Telemetry/execute", self._h_execute)
        app.router.add_route("*", "/{tail:.*}", self._h_missing)

    def error(self, status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
        """ASP.NET Core shapes: OData JSON error on 400, text on 5xx, empty body otherwise."""
        if status == 401:
            headers = {"WWW-Authenticate": "Bearer", **(headers or {})}
        if status == 400:
            return web.json_response({"error": {"code": "", "message": message}}, status=400, headers=headers)
        if status >= 500:
            return web.Response(status=status, text=message, headers=headers)
        return web.Response(status=status, headers=headers)

    async def _h_control(self, request: web.Request) -> web.Response:
        body = await request.json()
        if "late" in body:
            self.late = bool(body["late"])
        if body.get("expire_tokens"):
            self.expire_tokens()
        for key, kind in (("cut_at_line", int), ("error_line", int), ("row_cap", int), ("strict_guard", bool)):
            if key in body:
                setattr(self, key, kind(body[key]))
        landed = self.land_late() if body.get("land_late") else 0
        return web.json_response({"late": self.late, "revoked_upto": self._revoked_upto, "landed": landed,
                                  "cut_at_line": self.cut_at_line, "error_line": self.error_line,
                                  "row_cap": self.row_cap, "strict_guard": self.strict_guard})

    async def _h_missing(self, request: web.Request) -> web.Response:
        return self.error(404, "Not Found")

    async def _h_login(self, request: web.Request) -> web.Response:
        if request.content_type != "application/json":
            return web.Response(status=415)
        try:
            body = json.loads(await request.read())
        except ValueError:
            return self.error(400, "The request body is not valid JSON.")
        if not isinstance(body, dict) or body.get("userName") != self.username or body.get("password") != self.password:
            return web.Response(status=401)
        self._jti += 1
        self._logins += 1
        now = int(self.clock())
        claims = {"unique_name": self.username, "jti": str(self._jti), "nbf": now, "iat": now,
                  "exp": now + int(self.token_ttl), "iss": "Proxus", "aud": "Proxus"}
        signing = _b64(b'{"alg":"HS256","typ":"JWT"}') + "." + _b64(json.dumps(claims).encode())
        token = signing + "." + _b64(hmac.new(self._secret, signing.encode(), hashlib.sha256).digest())
        quoted = self.token_style == "quoted" or (self.token_style == "alternate" and self._logins % 2 == 1)
        if quoted:
            return web.Response(text=json.dumps(token), content_type="application/json")
        return web.Response(text=token + "\n", content_type="text/plain")

    def _unauthorized(self, request: web.Request) -> web.Response | None:
        """None when the bearer token is good, else the JwtBearer 401 challenge."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return self.error(401, "")
        try:
            signing, _, sig = token.strip().rpartition(".")
            good = hmac.new(self._secret, signing.encode(), hashlib.sha256).digest()
            if not hmac.compare_digest(_b64(good).encode(), sig.encode()):
                raise ValueError
            payload = signing.split(".")[1]
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except (ValueError, IndexError):
            return self.error(401, "", {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        exp = int(claims["exp"])
        if self.faults.expired or exp <= self.clock() or int(claims["jti"]) <= self._revoked_upto:
            at = datetime.fromtimestamp(min(exp, self.clock()), UTC).strftime("%m/%d/%Y %H:%M:%S")
            challenge = f'Bearer error="invalid_token", error_description="The token expired at \'{at}\'"'
            return self.error(401, "", {"WWW-Authenticate": challenge})
        return None

    def _odata_items(self, request: web.Request) -> tuple[str, list[dict[str, Any]], set[str]] | web.Response:
        denied = self._unauthorized(request)
        if denied:
            return denied
        name = request.match_info["entity"]
        items = self._entities(name, int(self.clock() * 1000))
        if items is None:
            return self.error(404, "")
        unknown = [k for k in request.query if k.startswith("$") and k not in ODATA_OPTIONS]
        if unknown:
            return self.error(400, f"The query parameter '{unknown[0]}' is not supported.")
        if not items:  # nothing to filter (and no sample row to type-check the filter against)
            return name, [], set()
        props = {k: type(v) for k, v in items[0].items()}
        try:
            if "$filter" in request.query:
                keep = ODataFilter(request.query["$filter"], props).pred
                items = [e for e in items if keep(e)]
        except ODataError as err:
            return self.error(400, f"{INVALID_URI} {err}")
        return name, items, set(props)

    async def _h_odata(self, request: web.Request) -> web.Response:
        got = self._odata_items(request)
        if isinstance(got, web.Response):
            return got
        name, items, props = got
        if request.match_info["count"]:  # /$count: the filtered total as a plain-text integer
            return web.Response(text=str(len(items)), content_type="text/plain")
        q = request.query
        try:
            top = int(q["$top"]) if "$top" in q else None
            skip = int(q.get("$skip", "0"))
            if skip < 0 or (top is not None and top < 0):
                raise ValueError
        except ValueError:
            return self.error(400, f"{INVALID_URI} $top/$skip must be non-negative integers.")
        select = [s.strip() for s in q["$select"].split(",")] if "$select" in q else None
        for clause in reversed([c.strip() for c in q.get("$orderby", "").split(",") if c.strip()]):
            prop, _, direction = clause.partition(" ")
            if prop not in props or direction.strip() not in ("", "asc", "desc"):
                return self.error(400, f"{INVALID_URI} Bad $orderby '{clause}'.")
            items = sorted(items, key=operator.itemgetter(prop), reverse=direction.strip() == "desc")
        if select and any(s not in props for s in select):
            return self.error(400, f"{INVALID_URI} Could not find a property in '{q['$select']}'.")
        window = items[skip: None if top is None else skip + top]
        page = window[: self.odata_page_size]
        base = f"{request.url.origin()}/api/odata/$metadata#{name}" + (f"({','.join(select)})" if select else "")
        out: dict[str, Any] = {"@odata.context": base}
        if q.get("$count") == "true":
            out["@odata.count"] = len(items)
        out["value"] = [{k: _odata_value(e[k]) for k in (select or e)} for e in page]
        if name == "Alert" and self._poison_alerts:
            for item in out["value"]:
                variant = self._poison_alerts.get(item.get("Id", -1))
                column = POISONS[variant][0] if variant else ""
                if variant and column in item:
                    item[column] = raw_json(self._raw(variant, item[column]))
        if len(window) > len(page):
            nxt = dict(q) | {"$skip": str(skip + len(page))}
            if top is not None:
                nxt["$top"] = str(top - len(page))
            out["@odata.nextLink"] = str(request.url.with_query(nxt))
        return web.json_response(out, dumps=lambda obj: splice_raw(dumps(obj)))

    async def _h_execute(self, request: web.Request) -> web.StreamResponse:
        denied = self._unauthorized(request)
        if denied:
            return denied
        if request.content_type != "application/json":
            return web.Response(status=415)
        try:
            body = json.loads(await request.read())
            text = body["query"]
            if not isinstance(text, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": 'Request body must be {"query": "SELECT ..."}'}, status=400)
        self.statements.append(text)
        raw = request.query.get("maxRows", str(DEFAULT_MAX_ROWS))
        max_rows = int(raw) if raw.isdigit() else -1
        now_ms = int(self.clock() * 1000)
        try:
            if not 1 <= max_rows <= MAX_ROWS:
                raise SqlError(f"maxRows must be an integer between 1 and {MAX_ROWS}")
            query = Query(text, now_ms, strict=self.strict_guard)
        except SqlError as err:
            return web.json_response({"error": str(err)}, status=400)
        lines = self._execute(query, max_rows, now_ms)
        if self.error_line > 0 or self.cut_at_line > 0:
            lines = iter(self._worse(list(lines), text))
        if self.faults.truncate > 0:  # a plain body, so the shared middleware cuts it mid-line
            return web.Response(text="".join(line + "\n" for line in lines), content_type="text/plain")
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await response.prepare(request)
        chunk: list[str] = []
        for line in lines:
            chunk.append(line + "\n")
            if len(chunk) >= 500:
                await response.write("".join(chunk).encode())
                chunk.clear()
        if chunk:
            await response.write("".join(chunk).encode())
        await response.write_eof()
        return response

    def _worse(self, lines: list[str], sql: str) -> list[str]:
        """A body's lines as the `error_line` or `cut_at_line` fault sends them (each uses up one of its count)."""
        if self.error_line > 0:
            self.error_line -= 1
            self._errors_sent += 1
            self.worsened.append(("error_line", sql))
            text = CH_EXCEPTION
            return lines[: self.rng.randint(0, len(lines))] + [text if self._errors_sent % 2 else dumps({"exception": text})]
        if lines:  # an empty body cannot end early
            self.cut_at_line -= 1
            self.worsened.append(("cut_at_line", sql))
            return lines[: self.rng.randrange(len(lines))]
        return lines

    def _execute(self, q: Query, max_rows: int, now_ms: int) -> Iterator[str]:
        """JSONEachRow lines; the result is cut at min(LIMIT, maxRows) without any marker."""
        cap = max_rows if q.limit is None else min(q.limit, max_rows)
        if self.row_cap > 0:  # a server-side cap below what the client asked for, equally silent
            cap = min(cap, self.row_cap)
        if cap == 0:
            return
        forward = q.order == NATURAL[: len(q.order)]
        backward = bool(q.order) and q.order == [(c, True) for c, _ in NATURAL[: len(q.order)]]
        matches: Iterator[Row] = (r for r in self._scan(q.lo, q.hi, backward, now_ms) if q.pred(r))
        if q.count:
            yield f'{{"count()":"{sum(1 for _ in matches)}"}}'  # UInt64 is quoted in JSON output
            return
        if not (forward or backward):
            rows = list(matches)
            for col, desc in reversed(q.order):  # stable sorts, last key first
                rows.sort(key=_sort_key(IDX[col]), reverse=desc)
            matches = iter(rows)
        for n, r in enumerate(matches):
            if n >= cap:
                return
            bad = self._malformed(r)
            line = _json_line(r, q.cols) if not bad else _json_line(r, q.cols).replace(*bad, 1)
            variant = self._poison_rows.get((r[0], r[1], r[3])) if self._poison_rows else None
            if variant is not None and POISONS[variant][0] in q.cols:
                column = POISONS[variant][0]
                good = f'"{column}":{RENDER[column](r[IDX[column]])}'
                line = line.replace(good, f'"{column}":{self._raw(variant, r[IDX[column]])}', 1)
            yield line

    def _malformed(self, r: Row) -> tuple[str, str] | None:
        """The (rendered, broken) spelling of a row hit by the `malformed_rows` fault, else None."""
        if not self.malformed_every:
            return None
        h = _mix(self.seed + 991, (r[0] - self.t0) * 64 + r[1] + zlib.crc32(r[3].encode()))  # same rows every run
        if h % self.malformed_every:
            return None
        if h >> 63:
            return f'"DeviceId":{r[1]}', '"DeviceId":null'
        return f'"Time":"{_fmt_time(r[0])}"', '"Time":"0000-00-00 00:00:00.000"'


def _sort_key(i: int) -> Callable[[Row], Any]:
    if COLUMNS[i] == "NumericValue":  # NaN sorts after every number
        return lambda r: (math.isnan(r[5]), r[5])
    return operator.itemgetter(i)


def _json_line(r: Row, cols: list[str]) -> str:
    return "{" + ",".join(f'"{c}":{RENDER[c](r[IDX[c]])}' for c in cols) + "}"


def _odata_value(v: Any) -> Any:
    if isinstance(v, datetime):
        return v.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return v
