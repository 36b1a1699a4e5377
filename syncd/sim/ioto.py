"""Fake EmbedThis Ioto device cloud (shared/vendors/ioto.md): POST-only `/tok/...` API behind an AWS-gateway facade.

Choices the connector must mirror (ground truth covers the default streams log, status, metric, alert):
- tenant is always the record's `accountId` (metric points: the device's `accountId`, from the Device records).
- status = Store items only (Device `connection` is not in the truth); metric = `key`, ts = `updated`,
  value = float(`value`) if `type == "number"` else None, text = `value` if `type == "string"` else None.
- log: metric "log", ts = the ULID time of `id` (`updated` is deliberately 1..1500 ms later), text = `message`.
- metric: every device x every name of `metric/getMetricList`, request `{"namespace": "Embedthis/Device", "metric": m,
  "dimensions": {"Device": <deviceId>}, "statistic": "avg", "period": 300}`; metric = f"{m}.avg.{item period}" with no
  dims suffix (only the device's own `Device` dimension is served per device); ts = point `timestamp` (seconds unless
  `metric_ms`, then ms; interval start); value = point `value`. Empty `dimensions` is the account-wide series.
  `cloudId` (needed by getMetricList) is only on Store and Alert items. Live: a point leaves the span after 5 min.
- alert: metric = `name`, device = `context.deviceId` or "" (account-level alerts), ts = `timestamp` (unchanged when
  `resolved` flips), text = `message`.
Paging: `next`/`prev` are opaque base64 strings (they contain `+`, `/`, `=`, so they must be URL-encoded), `next` is
present whenever a page is full, so the last page can be empty; a page also ends early at `page_bytes` (DynamoDB's
1 MB cap). Live mode: the API shows the world at clock(); the truth is the world at clock() - LAG (snapshots for
status and the open metric point, so compare keys only there).
`poison="store_ts_9999,..."` (off by default, names in POISONS): per variant one Store, Log or alert item is served
with that bad value written raw (a NaN literal, a `\ud83d` escape); `poisoned` lists them; ground_truth() leaves out
the ones a sync must dead-letter and holds value None for a NaN reading.
Worse than the connector assumes (all off by default): `log_order="newest"` serves each Log list newest first,
`"shuffled"` in no order (a fixed hash of each log); `future_logs=(3600, YEAR)`: per offset one more log, written
k + 1 minutes before the history ends by a device whose clock is that many seconds ahead (its ULID id, so its time,
is dated ahead of the sim's start; the list keeps it where it was written, before the logs written after it);
`late_by=7200, late_logs=4`: more logs dated within the history's last `late_by` seconds that show up only
`late_by` after their time (by the sim's clock, live or not).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import math
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from syncd.sim.common import Clock, Poisoned, SlidingWindowLimit, TruthRow, VendorSim, poison_list, raw_json, splice_raw

NS = "Embedthis/Device"
LAG = 60.0  # seconds between a record happening and the truth counting it (live mode)
DAY_MS = 86_400_000
ID_EPOCH_MS = 1_704_067_200_000  # 2024-01-01: time part of account/cloud/product ULIDs
SPANS = ((300, 5), (3600, 12), (86400, 24), (604800, 7), (2592000, 30), (31536000, 12))  # (period s, points)
STATS = ("avg", "min", "max", "count", "sum")
CONTROLLERS = {"account", "action", "alert", "dashboard", "device", "generic", "metric", "provision", "store", "user"}
CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
MAGIC = b"\xfb\xff"  # cursor prefix: base64 then starts with "+/", so an unencoded `?next=` breaks visibly
M64 = (1 << 64) - 1
EPOCH = dt.datetime(1970, 1, 1)

DEVICE_NAMES = ['Kühlhaus "Nord" #3 / Tür+$', "Pump station 7", "Line-2 PLC", "Boiler Ost", "Compressor C1", "Gate ☂ 4"]
# (key, offset, scale) for numbers (int offset => int values), (key, choices) for strings
STORE_KEYS: list[tuple[Any, ...]] = [
    ("temperature", 18.0, 8.0), ('zone/1 "Kühl+raum" #$', ("geschlossen", "offen – „Tür“", "alarm #1")),
    ("firmware", ("1.4.2", "1.4.3", "1.5.0-rc1")), ("uptime", 0, 1_000_000), ("mode", ("auto", "manual", "off")),
    ("setpoint", 4.0, 2.0), ("battery", 20, 80), ("rssi", -95, 40),
]
METRICS = [("Temperature", 21.0, 3.0), ("Humidity", 45.0, 10.0), ('Δp Filter/2 #"A"+', 120.0, 15.0),
           ("Power", 350.0, 80.0), ("Vibration", 0.8, 0.3)]
LOG_MESSAGES = ["Booted firmware 1.4.{n}", "Sensor read failed: code {n}", 'Door "north" opened',
                "Temperatur über Grenzwert: {n} °C", "MQTT reconnect after {n} ms", "Config applied #{n} / profile+eco"]
# (name, severity, about a device?, message)
ALERTS = [("HighTemperature", "warning", True, "Temperature {n} °C above limit"),
          ("DeviceOffline", "error", True, 'Device "{dev}" went offline'),
          ("LowBattery", "info", True, "Battery at {n} %"),
          ("TokenExpiring", "warning", False, "CloudAPI token expires in {n} days")]


# variant -> (item list, field replaced, raw JSON text ("{}" = the good value's text), field the dead letter names;
# None: stored with value NULL)
POISONS: dict[str, tuple[str, str, str, str | None]] = {
    "store_ts_9999": ("Store", "updated", '"9999-12-31T23:59:59.000Z"', "updated"),
    "store_value_nan": ("Store", "value", "NaN", None),
    "store_id_infinity": ("Store", "deviceId", "Infinity", "deviceId"),
    "log_id_9999": ("Log", "id", '"{}"', "id"),  # a ULID dated 9999: it must not move the cursor past later logs
    "log_ts_true": ("Log", "updated", "true", "updated"),  # with an id that is no ULID, `updated` is the time
    "log_surrogate": ("Log", "message", '"{}\\ud83d"', "text"),
    "alert_ts_negative": ("Alert", "timestamp", "-5", "timestamp"),
}


LOG_ORDERS = ("oldest", "newest", "shuffled")


@dataclass(frozen=True)
class ExtraLog:
    """A log outside the regular series (`future_logs`, `late_by`)."""

    d: int  # device index
    written_ms: int  # where the list keeps it (when it was written)
    ts_ms: int  # its ULID time
    visible_ms: int  # from when the list shows it (sim clock)
    h: int  # its hash (id, message)


def _mix(*parts: int) -> int:
    """Cheap deterministic 64-bit hash of a few ints (splitmix64 finaliser)."""
    x = 0
    for p in parts:
        x = (x * 0x100000001B3 + (p & M64) + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def _mix2(a: int, b: int) -> int:
    """A cheaper two-int hash for the per-record hot path (200k-record truths)."""
    x = (b * 0x9E3779B97F4A7C15 + a) & M64
    x = ((x ^ (x >> 32)) * 0xD6E8FEB86659FD93) & M64
    return x ^ (x >> 32)


def _unit(h: int) -> float:
    return (h >> 11) / 2**53


def _iso(ms: int) -> str:
    return (EPOCH + dt.timedelta(milliseconds=ms)).isoformat(timespec="milliseconds") + "Z"


def _ulid(ms: int, rnd: int) -> str:
    v = (ms << 80) | ((rnd * 0x9E3779B97F4A7C15) & ((1 << 80) - 1))
    return "".join(CROCKFORD[(v >> (5 * i)) & 31] for i in range(25, -1, -1))


def _token(seed: int, n: int) -> str:
    return f"{_mix(seed, 10, n):016X}{_mix(seed, 11, n):016X}"


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


class _Fail(Exception):
    """An Ioto application error (text/plain)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class _Series:
    """Record j happens at start + (j + jitter_j) * step ms: O(1) time of any record, O(1) count up to any time."""

    def __init__(self, salt: int, start_ms: int, span_ms: int, size: int) -> None:
        self.salt, self.start, self.size = salt, start_ms, size
        self.step = span_ms / max(size, 1)

    def at(self, j: int) -> tuple[int, int]:
        h = _mix2(self.salt, j)
        return self.start + int((j + _unit(h)) * self.step), h

    def count(self, world_ms: int, live: bool) -> int:
        if not live or not self.size:
            return self.size
        m = int((world_ms - self.start) // self.step)
        return max(self.size, m if self.at(m)[0] > world_ms else m + 1)


class IotoSim(VendorSim):
    """One Ioto device cloud: accounts, claimed devices, Store, Log, rolling metrics and alerts."""

    vendor = "ioto"

    def __init__(self, seed: int = 1, *, clock: Clock = time.time, live: bool = False, accounts: int = 2,
                 devices: int = 6, logs: int = 600, store_keys: int = 5, metrics: int = 3, alerts: int = 24,
                 history: float = 2 * 86400.0, metric_ms: bool = False, page_bytes: int = 1_000_000,
                 token: str | None = None, rate_limit: int | None = 20, poison: str | list[str] = "",
                 log_order: str = "oldest", future_logs: Sequence[float] = (), late_by: float = 0.0,
                 late_logs: int = 0) -> None:
        super().__init__(seed, clock=clock)
        if history < 7200 or devices < 1 or accounts < 1:
            raise ValueError("ioto sim needs history >= 7200 s and at least one device and account")
        self.live, self.metric_ms, self.page_bytes = live, metric_ms, page_bytes
        self.n_accounts, self.n_devices, self.n_keys, self.n_metrics = accounts, devices, store_keys, metrics
        self.anchor = clock()
        self.end_ms = int((self.anchor - 60) * 1000)
        self.start_ms = int((self.anchor - history) * 1000)
        span = self.end_ms - self.start_ms
        self._logs = _Series(_mix(seed, 30), self.start_ms, span, logs)
        self._alerts = _Series(_mix(seed, 50), self.start_ms, span, alerts)
        # ids hang off a fixed date, not the anchor, so they are the same in every run of a seed
        self.cloud_id = _ulid(ID_EPOCH_MS, _mix(seed, 1))
        self.account_ids = [_ulid(ID_EPOCH_MS + (a + 1) * 7_919_000, _mix(seed, 2, a)) for a in range(accounts)]
        self.product_id = _ulid(ID_EPOCH_MS + DAY_MS, _mix(seed, 4))
        ids: dict[str, None] = {}
        attempt = 0
        while len(ids) < devices:  # claim ids: "Z" + 9 Crockford chars, unique
            ids.setdefault("Z" + _ulid(0, _mix(seed, 3, attempt))[-9:])
            attempt += 1
        self.device_ids = list(ids)
        self._dev_index = {d: i for i, d in enumerate(ids)}
        self.token = token or _token(seed, 0)  # CloudAPI token: admin over the whole cloud
        self.login_token, self.disabled_token, self.expired_token = (_token(seed, x) for x in (1, 2, 3))
        self.origin = "https://app.example.com"  # the device app domain login tokens must come from
        self._tokens = {self.token: "cloud", self.login_token: "login", self.disabled_token: "disabled",
                        self.expired_token: "expired"}
        self.limits = [SlidingWindowLimit(rate_limit, 1.0, clock)] if rate_limit else []
        self.gateway_timeouts = 0  # next N requests: 504 gateway JSON after gateway_delay seconds
        self.gateway_delay = 1.0
        self._metric_s0 = self._world_ms() // 1000 // 60 * 60 - 240  # first 5-min span the truth covers
        self._routes: dict[str, Callable[[web.Request, dict[str, Any], int | None], web.Response]] = {
            "/device/find": self._device_find, "/generic/find": self._generic_find, "/alert/find": self._alert_find,
            "/metric/fetch": self._metric_fetch, "/metric/getMetricList": self._metric_list}
        self._poison: dict[tuple[str, str, str], dict[str, str]] = {}  # item identity -> {field: raw JSON text}
        self.poisoned: list[Poisoned] = []
        self._plant(poison_list(poison, POISONS, "ioto"))
        if log_order not in LOG_ORDERS:
            raise ValueError(f"log_order must be one of {LOG_ORDERS}")
        self.log_order = log_order
        self.extra_logs: list[ExtraLog] = []
        for k, offset in enumerate(future_logs):
            if offset <= 0:
                raise ValueError("future_logs offsets are seconds ahead (> 0)")
            written = self.end_ms - (k + 1) * 60_000 + 3  # near the end: dated ahead of the sim's start
            self.extra_logs.append(ExtraLog(k % devices, written, written + int(offset * 1000), written,
                                            _mix(seed, 70, k)))
        if late_logs > 0:
            late_ms = int(late_by * 1000)
            span = min(late_ms - 60_000, self.end_ms - self.start_ms)
            if span < late_logs:
                raise ValueError("late_logs needs late_by of more than 61 s, inside the history")
            for k in range(late_logs):
                ts = self.end_ms - (k + 1) * span // (late_logs + 1) + 5
                self.extra_logs.append(ExtraLog((2 * k + 1) % devices, ts, ts, ts + late_ms, _mix(seed, 71, k)))

    def _extra_log(self, e: ExtraLog) -> dict[str, Any]:
        msg = LOG_MESSAGES[(e.h >> 3) % len(LOG_MESSAGES)].format(n=e.h % 100)
        return {"id": _ulid(e.ts_ms, e.h), "accountId": self.account_ids[self._acct(e.d)],
                "deviceId": self.device_ids[e.d], "message": msg, "context": {"level": "warn", "seq": -1},
                "updated": _iso(e.ts_ms + 1 + (e.h >> 20) % 1500), "expires": _iso(e.ts_ms + 30 * DAY_MS)}

    def _log_list(self, d: int | None, n: int) -> list[dict[str, Any]]:
        """The Log list (one device's, or all) in the served order, with the extra logs the clock shows."""
        now = int(self.clock() * 1000)
        devices = range(self.n_devices) if d is None else [d]
        rows = [(self._logs.at(j)[0], 0, j, self._log(j)) for dv in devices for j in range(dv, n, self.n_devices)]
        rows += [(e.written_ms, 1, i, self._extra_log(e)) for i, e in enumerate(self.extra_logs)
                 if e.d in devices and e.visible_ms <= now]
        if self.log_order == "shuffled":
            rows.sort(key=lambda r: zlib.crc32(r[3]["id"].encode()))
        else:
            rows.sort(key=lambda r: r[:3], reverse=self.log_order == "newest")
        return [r[3] for r in rows]

    def _plant(self, variants: list[str]) -> None:
        """Per variant one item, spread over devices, logs and alerts (a fixed history only, not live)."""
        if variants and self.live:
            raise ValueError("poison needs a fixed history (not live)")
        w = self._truth_ms()
        for k, variant in enumerate(variants):
            kind, field, raw, named = POISONS[variant]
            if kind == "Store":
                d = k % self.n_devices  # key 0 ("temperature") is a number
                key, _, _, t = self._store_parts(d, 0, w)
                identity, fields = ("Store", self.device_ids[d], key), {field: raw}
                key4 = ("status", self.account_ids[self._acct(d)], self.device_ids[d], key, t)
            elif kind == "Log":
                j = self._logs.size * (k + 1) // (len(variants) + 2)
                d, ts, h, msg = self._log_parts(j)
                fields = {field: raw.replace("{}", json.dumps(msg, ensure_ascii=False)[1:-1])}
                if variant == "log_id_9999":
                    fields[field] = json.dumps(_ulid(253_402_300_799_000, h))
                if variant == "log_ts_true":  # an id that is no ULID: the time would come from `updated`
                    fields["id"] = json.dumps("not-a-ulid-" + self._log(j)["id"][10:])
                identity = ("Log", "", self._log(j)["id"])
                key4 = ("log", self.account_ids[self._acct(d)], self.device_ids[d], "log", ts)
            else:
                alert, ts = self._alert((k * 5) % self._alerts.size, w)
                identity, fields = ("Alert", "", alert["id"]), {field: raw}
                key4 = ("alert", alert["accountId"], alert["context"].get("deviceId", ""), alert["name"], ts)
            self._poison[identity] = fields
            self.poisoned.append(Poisoned(variant, key4, named, ", ".join(fields.values())))

    def _served(self, item: dict[str, Any]) -> dict[str, Any]:
        """The item as it goes over the wire: a planted bad value in place of its own (written raw by splice_raw)."""
        if "key" in item:
            fields = self._poison.get(("Store", item.get("deviceId", ""), item["key"]))
        else:
            fields = self._poison.get(("Alert" if "seq" in item else "Log", "", item.get("id", "")))
        if not fields:
            return item
        return {**item, **{f: raw_json(raw) for f, raw in fields.items()}}

    # -- world ---------------------------------------------------------------
    def _world_ms(self) -> int:
        """The instant the API shows: frozen at anchor - 60 s unless live."""
        return int(self.clock() * 1000) if self.live else self.end_ms

    def _truth_ms(self) -> int:
        return int((self.clock() - LAG) * 1000) if self.live else self.end_ms

    def _acct(self, d: int) -> int:
        return d % self.n_accounts

    def _tick(self, w: int, lo: int, hi: int, *salt: int) -> tuple[int, int]:
        """Index and time of the latest change at or before w of something that changes every lo..hi s."""
        period = lo * 1000 + _mix(self.seed, *salt) % ((hi - lo) * 1000)
        base = self.start_ms + _mix(self.seed, *salt, 1) % period
        i = (w - base) // period
        return i, base + i * period

    def _device(self, d: int, w: int) -> dict[str, Any]:
        i, t = self._tick(w, 1800, 3600, 20, d)
        name = self._name(d)
        return {"id": self.device_ids[d], "accountId": self.account_ids[self._acct(d)],
                "connection": "offline" if (i + d) % 4 == 0 else "online", "name": name, "model": "ioto-esp32",
                "description": f"{name} sensor hub", "product": "Cold Chain Monitor",
                "created": _iso(self.start_ms - (40 + d) * DAY_MS), "updated": _iso(t)}

    def _name(self, d: int) -> str:
        return DEVICE_NAMES[d] if d < len(DEVICE_NAMES) else f"Device {d}"

    def _registry(self, d: int, w: int) -> dict[str, Any]:
        t = self._tick(w, 1800, 3600, 20, d)[1]
        return {"id": self.device_ids[d], "accountId": self.account_ids[self._acct(d)], "product": "Cold Chain Monitor",
                "productId": self.product_id, "created": _iso(self.start_ms - (40 + d) * DAY_MS), "accessed": _iso(t),
                "version": "1.4.2", "checked": _iso(t), "test": d == self.n_devices - 1}

    def _store_parts(self, d: int, k: int, w: int) -> tuple[str, str, Any, int]:
        spec = STORE_KEYS[k] if k < len(STORE_KEYS) else (f"reg{k}", 0.0, 100.0)
        i, t = self._tick(w, 300, 3600, 21, d, k)
        u = _unit(_mix(self.seed, 22, d, k, i))
        if len(spec) == 2:
            return spec[0], "string", spec[1][int(u * len(spec[1]))], t
        key, off, scale = spec
        return key, "number", (off + int(u * scale) if isinstance(off, int) else round(off + u * scale, 2)), t

    def _store(self, d: int, k: int, w: int) -> dict[str, Any]:
        key, type_, value, t = self._store_parts(d, k, w)
        item = {"accountId": self.account_ids[self._acct(d)], "cloudId": self.cloud_id, "deviceId": self.device_ids[d],
                "key": key, "value": value, "type": type_, "updated": _iso(t)}
        if k % 2:
            item["expires"] = _iso(t + 30 * DAY_MS)
        return item

    def _log_parts(self, j: int) -> tuple[int, int, int, str]:
        ts, h = self._logs.at(j)
        return j % self.n_devices, ts, h, LOG_MESSAGES[(h >> 3) % len(LOG_MESSAGES)].format(n=h % 100)

    def _log(self, j: int) -> dict[str, Any]:
        d, ts, h, msg = self._log_parts(j)
        return {"id": _ulid(ts, h), "accountId": self.account_ids[self._acct(d)], "deviceId": self.device_ids[d],
                "message": msg, "context": {"level": ("info", "warn", "error", "debug")[(h >> 9) % 4], "seq": j},
                "updated": _iso(ts + 1 + (h >> 20) % 1500), "expires": _iso(ts + 30 * DAY_MS)}

    def _alert(self, k: int, w: int) -> tuple[dict[str, Any], int]:
        ts, h = self._alerts.at(k)
        name, severity, on_device, text = ALERTS[(h >> 3) % len(ALERTS)]
        d = (h >> 8) % self.n_devices
        acct = self._acct(d) if on_device else (h >> 8) % self.n_accounts
        context: dict[str, Any] = {"deviceId": self.device_ids[d], "value": h % 100} if on_device else {"days": h % 9}
        dev_name = self._name(d)
        resolve_ms = None if (h >> 40) % 5 == 0 else ts + (300 + (h >> 16) % 43200) * 1000
        return {"id": _ulid(ts, h), "accountId": self.account_ids[acct], "cloudId": self.cloud_id, "name": name,
                "message": text.format(n=h % 100, dev=dev_name),
                "subject": f"{name}: {dev_name if on_device else 'account'}", "severity": severity,
                "seq": f"{name}:{self.device_ids[d] if on_device else self.account_ids[acct]}",
                "count": 1 + (h >> 48) % 4,
                "context": context, "resolved": resolve_ms is not None and resolve_ms <= w, "timestamp": _iso(ts)}, ts

    def _point(self, salt: int, m: int, iv: int, s: int, w: int, stat: str) -> tuple[float, int]:
        """Rolling statistic of interval [s, s+iv) as seen at w: the open interval's value moves as samples arrive."""
        _, base, amp = METRICS[m] if m < len(METRICS) else (f"Metric{m}", 10.0, 2.0)
        n_full = max(1, iv // 5)  # devices sample every 5 s
        count = min(n_full, 1 + int((w / 1000 - s) / iv * n_full))
        u1, u2 = _unit(_mix(self.seed, 40, salt, m, s)), _unit(_mix(self.seed, 41, salt, m, s, count))
        avg = base + amp * math.sin(2 * math.pi * (s + iv / 2) / 86400 + salt) + amp * 0.1 * (u1 - 0.5)
        avg += (1 - count / n_full) * amp * 0.2 * (u2 - 0.5)
        spread = amp * (0.02 + 0.05 * u1)
        value = {"avg": avg, "min": avg - spread, "max": avg + spread, "sum": avg * count, "count": count}[stat]
        return round(value, 3), count

    def _metric_name(self, m: int) -> str:
        return METRICS[m][0] if m < len(METRICS) else f"Metric{m}"

    # -- HTTP ----------------------------------------------------------------
    def add_routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/_sim/ioto", self._h_control)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)

    def error(self, status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
        if status in (429, 503, 504):  # produced by the AWS gateway in front of Ioto: JSON
            return _gateway(status, message, headers)
        return web.Response(status=status, text=message, content_type="text/plain", headers=headers)

    async def _h_control(self, request: web.Request) -> web.Response:
        """Sim-only switch for the gateway-timeout fault (not part of common Faults)."""
        if request.method == "POST":
            changes = await request.json()
            self.gateway_timeouts = int(changes.get("gateway_timeouts", self.gateway_timeouts))
            self.gateway_delay = float(changes.get("gateway_delay", self.gateway_delay))
        return web.json_response({"gateway_timeouts": self.gateway_timeouts, "gateway_delay": self.gateway_delay})

    async def _dispatch(self, request: web.Request) -> web.Response:
        if self.gateway_timeouts > 0:
            self.gateway_timeouts -= 1
            await asyncio.sleep(self.gateway_delay)
            return _gateway(504, "Endpoint request timed out")
        path = request.path
        if request.method != "POST":
            return _gateway(403, "Missing Authentication Token")
        if not path.startswith("/tok/"):
            parts = path.strip("/").split("/")
            if len(parts) == 2 and parts[0] in CONTROLLERS:  # the session (cookie) API: no session here
                return self.error(403, "Not authenticated: use the /tok prefix with a token")
            return _gateway(403, "Missing Authentication Token")
        try:
            scope = self._auth(request)
            raw = await request.read()
            try:
                body = json.loads(raw) if raw.strip() else {}
            except ValueError:
                raise _Fail(400, "Invalid JSON request body") from None
            if not isinstance(body, dict):
                raise _Fail(400, "Request body must be a JSON object")
            route = self._routes.get(path[4:])
            if route is None:
                raise _Fail(400, f"Unknown API {path[4:]}")
            return route(request, body, scope)
        except _Fail as fail:
            return self.error(fail.status, fail.message)

    def _auth(self, request: web.Request) -> int | None:
        """Account index a login token is scoped to, None for the CloudAPI token; raises 403 otherwise."""
        token = request.headers.get("Authorization", "")
        kind = self._tokens.get(token)
        if not token:
            raise _Fail(403, "Missing authorization token")
        if kind is None:
            raise _Fail(403, "Invalid authorization token")
        if kind == "disabled":
            raise _Fail(403, "Authorization token is disabled")
        if kind == "expired" or self.faults.expired:
            raise _Fail(403, "Authorization token has expired")
        if kind == "login":
            if request.headers.get("Origin") != self.origin:
                raise _Fail(403, "Invalid Origin for login token")
            return 0
        return None

    def _page(self, request: web.Request, body: dict[str, Any], total: int,
              get: Callable[[int], dict[str, Any]], filters: dict[str, Any]) -> web.Response:
        """Ioto paged list: `limit` (default 1), opaque `next`/`prev` cursors, equality filters on item fields."""
        q = request.query
        try:
            limit = int(q.get("limit", "1"))
        except ValueError:
            raise _Fail(400, "Invalid limit") from None
        if limit < 1:
            raise _Fail(400, "Invalid limit")
        if q.get("index", "primary") not in ("primary", "gs1"):
            raise _Fail(400, "Unknown index")
        if "next" in q and "prev" in q:
            raise _Fail(400, "Cannot use both next and prev")
        qkey = zlib.crc32(json.dumps([request.path, body], sort_keys=True).encode())
        back = "prev" in q
        pos = self._decode(q["next"], "after", qkey) + 1 if "next" in q else 0
        if back:
            pos = self._decode(q["prev"], "before", qkey)
        picked: list[int] = []
        parts: list[str] = []
        size, full = 0, False
        for i in (range(min(pos, total) - 1, -1, -1) if back else range(pos, total)):
            item = get(i)
            if any(item.get(k, None) != v for k, v in filters.items()):
                continue
            text = splice_raw(_dumps(self._served(item))) if self._poison else _dumps(item)
            picked.append(i)
            parts.append(text)
            size += len(text)
            if len(parts) >= limit or size >= self.page_bytes:
                full = True
                break
        if back:
            picked.reverse()
            parts.reverse()
        out = '{"data":[' + ",".join(parts) + "]"
        if back:
            nxt, prv = (picked[-1] if picked else pos - 1), (picked[0] if full and picked[0] > 0 else None)
        else:
            nxt, prv = (picked[-1] if full else None), ((picked[0] if picked else pos) if pos > 0 else None)  # type: ignore[assignment]
        if nxt is not None:
            out += ',"next":' + _dumps(_cursor("after", nxt, qkey))
        if prv is not None:
            out += ',"prev":' + _dumps(_cursor("before", prv, qkey))
        return web.Response(text=out + ',"paged":true}', content_type="application/json")

    def _decode(self, raw: str, where: str, qkey: int) -> int:
        try:
            blob = base64.b64decode(raw, validate=True)
            obj = json.loads(blob[2:]) if blob[:2] == MAGIC else None
        except ValueError:
            obj = None
        if not isinstance(obj, dict) or obj.get("q") != qkey or not isinstance(obj.get(where), int):
            raise _Fail(400, f"Invalid {'next' if where == 'after' else 'prev'} cursor")
        return int(obj[where])

    def _scoped(self, filters: dict[str, Any], scope: int | None) -> dict[str, Any]:
        if scope is not None:  # a login token sees its own account only
            mine = self.account_ids[scope]
            filters["accountId"] = mine if filters.get("accountId", mine) == mine else "\0other account"
        return filters

    def _device_find(self, request: web.Request, body: dict[str, Any], scope: int | None) -> web.Response:
        if scope is None and "accountId" not in body:
            raise _Fail(400, "Missing accountId")
        w = self._world_ms()
        filters = self._scoped(dict(body), scope)
        return self._page(request, body, self.n_devices, lambda d: self._registry(d, w), filters)

    def _generic_find(self, request: web.Request, body: dict[str, Any], scope: int | None) -> web.Response:
        filters = self._scoped(dict(body), scope)
        model = filters.pop("_type", None)
        if model is None:
            raise _Fail(400, "Missing _type")
        w, n_dev, n_keys = self._world_ms(), self.n_devices, self.n_keys
        dev = filters.get("deviceId")
        d = self._dev_index.get(dev) if isinstance(dev, str) else None
        get: Callable[[int], dict[str, Any]]
        if model == "Device":
            total, get = n_dev, lambda i: self._device(i, w)
        elif model == "Store" and "deviceId" in filters:  # key condition: only that device's partition
            total, get = (n_keys if d is not None else 0), lambda i: self._store(d, i, w)  # type: ignore[arg-type]
        elif model == "Store":
            total, get = n_dev * n_keys, lambda i: self._store(i // n_keys, i % n_keys, w)
        elif model == "Log" and (self.extra_logs or self.log_order != "oldest"):
            n = self._logs.count(w, self.live)
            if "deviceId" in filters:
                listed = self._log_list(d, n) if d is not None else []
            else:
                listed = self._log_list(None, n)
            total, get = len(listed), listed.__getitem__
        elif model == "Log":
            n = self._logs.count(w, self.live)
            if "deviceId" in filters:
                total, get = (len(range(d, n, n_dev)) if d is not None else 0), lambda i: self._log(d + i * n_dev)  # type: ignore[operator]
            else:
                total, get = n, self._log
        else:
            raise _Fail(400, f"Unknown model {model}")
        return self._page(request, body, total, get, filters)

    def _alert_find(self, request: web.Request, body: dict[str, Any], scope: int | None) -> web.Response:
        w = self._world_ms()
        total = self._alerts.count(w, self.live)
        return self._page(request, body, total, lambda k: self._alert(k, w)[0], self._scoped({}, scope))

    def _metric_fetch(self, request: web.Request, body: dict[str, Any], scope: int | None) -> web.Response:
        dev = body.get("deviceId")
        if not isinstance(dev, str) or not dev:
            raise _Fail(400, "Missing deviceId")
        if dev not in self._dev_index:
            raise _Fail(400, "Unknown device")
        acct = self._acct(self._dev_index[dev])
        if scope is not None and acct != scope:
            raise _Fail(403, "Access denied")
        items = body.get("items")
        if not isinstance(items, list) or not items:
            raise _Fail(400, "Missing items")
        names = {self._metric_name(m): m for m in range(self.n_metrics)}
        w, out = self._world_ms(), []
        for req in items:
            if not isinstance(req, dict) or req.get("namespace") != NS:
                raise _Fail(400, f"Invalid namespace, must be {NS}")
            metric, stat, period = req.get("metric"), req.get("statistic", "avg"), req.get("period", 300)
            dims = req.get("dimensions", {})
            if not isinstance(metric, str) or not metric:
                raise _Fail(400, "Missing metric")
            if stat not in STATS:
                raise _Fail(400, f"Invalid statistic {stat}")
            if isinstance(period, bool) or not isinstance(period, int | float) or period <= 0:
                raise _Fail(400, "Invalid period")
            if not isinstance(dims, dict):
                raise _Fail(400, "Invalid dimensions")
            span, samples = next(((p, n) for p, n in SPANS if p >= period), SPANS[-1])
            salt = -1 - acct if not dims else self._dims_device(dims)
            item = {"namespace": NS, "metric": metric, "dimensions": dims, "owner": "account", "period": span,
                    "samples": samples, "points": []}
            if salt is not None and metric in names:
                iv = span // samples
                c = w // 1000 // iv * iv
                starts = range(c - (samples - 1) * iv, c + 1, iv)
                pts = [(s, *self._point(salt, names[metric], iv, s, w, stat)) for s in starts]
                if req.get("accumulate"):
                    vals, counts = [p[1] for p in pts], sum(p[2] for p in pts)
                    agg = {"avg": sum(v * p[2] for v, p in zip(vals, pts, strict=True)) / counts, "min": min(vals),
                           "max": max(vals), "sum": sum(vals), "count": counts}[stat]
                    pts = [(pts[0][0], round(agg, 3), counts)]
                unit = 1000 if self.metric_ms else 1
                points = [{"value": v, "timestamp": s * unit, "count": n} for s, v, n in pts]
                if isinstance(req.get("start"), int | float):
                    points = [p for p in points if p["timestamp"] >= req["start"]]
                if isinstance(req.get("limit"), int) and req["limit"] > 0:
                    points = points[-req["limit"]:]
                item["points"] = points
            out.append(item)
        return _json({"data": out})

    def _dims_device(self, dims: dict[str, Any]) -> int | None:
        """Series index for `{"Device": id}`; any other dimension set has no data."""
        dev = dims.get("Device")
        return self._dev_index.get(dev) if list(dims) == ["Device"] and isinstance(dev, str) else None

    def _metric_list(self, request: web.Request, body: dict[str, Any], scope: int | None) -> web.Response:
        cloud = body.get("cloudId")
        if not isinstance(cloud, str) or not cloud:
            raise _Fail(400, "Missing cloudId")
        if cloud != self.cloud_id:
            return _json({"data": {"namespaces": [], "metrics": []}})
        ns, metric = body.get("namespace"), body.get("metric")
        names = [self._metric_name(m) for m in range(self.n_metrics)] if ns in (None, NS) else []
        data: dict[str, Any] = {"namespaces": [NS], "metrics": names}
        if metric is not None:
            devs = [i for i in range(self.n_devices) if scope is None or self._acct(i) == scope]
            data["dimensions"] = [{}] + [{"Device": self.device_ids[i]} for i in devs] if metric in names else []
        return _json({"data": data})

    # -- contract ------------------------------------------------------------
    def ground_truth(self) -> list[TruthRow]:
        w = self._truth_ms()
        rows: dict[tuple[str, str, str, str, int], TruthRow] = {}

        def add(kind: str, tenant: str, device: str, metric: str, ts: int, value: float | None, text: Any) -> None:
            rows[(kind, tenant, device, metric, ts)] = TruthRow("ioto", kind, tenant, device, metric, ts, value, text)

        accts, devs = [self.account_ids[self._acct(d)] for d in range(self.n_devices)], self.device_ids
        lg, n_dev, n_msg = self._logs, self.n_devices, len(LOG_MESSAGES)
        msgs = [t.format(n=n) for n in range(100) for t in LOG_MESSAGES]  # the hot loop below indexes, not formats
        for j in range(lg.count(w, self.live)):  # _log_parts inlined: this loop is the cost of a big backlog
            h = _mix2(lg.salt, j)
            ts = lg.start + int((j + (h >> 11) / 2**53) * lg.step)
            d = j % n_dev
            if ts <= w:
                acct, dev, msg = accts[d], devs[d], msgs[h % 100 * n_msg + (h >> 3) % n_msg]
                rows[("log", acct, dev, "log", ts)] = TruthRow("ioto", "log", acct, dev, "log", ts, None, msg)
        for d in range(self.n_devices):
            for k in range(self.n_keys):
                key, type_, value, t = self._store_parts(d, k, w)
                num = type_ == "number"
                add("status", accts[d], devs[d], key, t, float(value) if num else None, None if num else value)
            for m in range(self.n_metrics):
                for s in range(self._metric_s0, w // 1000 // 60 * 60 + 1, 60):
                    value = self._point(d, m, 60, s, w, "avg")[0]
                    add("metric", accts[d], devs[d], f"{self._metric_name(m)}.avg.300", s * 1000, float(value), None)
        for k in range(self._alerts.count(w, self.live)):
            alert, ts = self._alert(k, w)
            if ts <= w:
                add("alert", alert["accountId"], alert["context"].get("deviceId", ""), alert["name"], ts, None,
                    alert["message"])
        now = int(self.clock() * 1000)
        for e in self.extra_logs:
            if e.visible_ms <= now:
                log = self._extra_log(e)
                add("log", log["accountId"], log["deviceId"], "log", e.ts_ms, None, log["message"])
        for p in self.poisoned:  # dead-lettered by a sync, or stored with value NULL (a NaN reading)
            row = rows.pop(p.key, None)
            if row is not None and p.field is None:
                rows[p.key] = TruthRow(row.vendor, row.kind, row.tenant, row.device, row.metric, row.ts_ms, None, row.text)
        return list(rows.values())

    def source_config(self) -> dict[str, Any]:
        return {"vendor": "ioto", "base_url": self.url, "token": self.token}


def _gateway(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """AWS API Gateway's own errors are JSON `{"message": ...}`, unlike Ioto's text/plain."""
    return _json({"message": message}, status, headers)


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=_dumps(obj), content_type="application/json", headers=headers)


def _cursor(where: str, pos: int, qkey: int) -> str:
    return base64.b64encode(MAGIC + _dumps({where: pos, "q": qkey}).encode()).decode()
