"""Navixy IoT Logic fake: REST inventory under /v2 and NGP JSON pushed to the MQTT output endpoints.

Choices the connector must mirror where the brief's §8 leaves room (ground_truth() follows them):
- tenant = str(user_info.id) from `GET|POST /v2/user/get_info` (the account's user id).
- device = the NGP `device_id` (a tracker's `source.device_id`, an IMEI), the id every message carries: the
  brief's source id would give a series a second key when tracker/list starts listing its tracker. One emulator
  ("ngp-emu-NNNN") publishes through the MQTT flow but is never in tracker/list.
- metric = attribute name, nested objects flattened with "." (`location.speed`); `device_id`, `message_time`,
  `version`, `event_id` are attrs, never metrics; arrays (`mobile_cells`) and JSON null produce no event.
- ts = `message_time` (whole seconds) in ms; numbers -> value float; bools -> 1.0/0.0; strings -> text.
- Each message goes to every topic of the endpoint and QoS 1 redelivers some: one row per key.
- kind=status (status_truth(), not a default stream here): `flow:<id>`/`enabled` value 1/0 at `modified`;
  `endpoint:<id>`/`status` text=status, value None, at poll time; status is only in endpoint/read.
- `poison="ngp_ts_9999,..."` (off by default, names in POISONS): the messages published 6th, 17th, 28th, ... (one
  per variant) carry that bad value written raw (a NaN literal, a `\ud83d` escape); `poisoned` lists them once
  published; ground_truth() leaves out what a sync must dead-letter and holds value None for a NaN reading.
- Worse than the connector assumes: `unlisted=(0, 2)` keeps those trackers out of tracker/list and the mapping list
  until `list_trackers()` (a tracker list that lags the devices publishing); `redeliver()` publishes every message
  sent so far once more (QoS 1 after a reconnect).
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import hashlib
import json
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
from aiohttp import web

from syncd.sim.common import Poisoned, SlidingWindowLimit, TruthRow, VendorSim, poison_list, raw_json, splice_raw

API = "/v2"
FLOW_MQTT, FLOW_DEFAULT, FLOW_STAGING = 4101, 4087, 4123
EP_DEFAULT, EP_MQTT, EP_STAGING = 1701, 1723, 1731
TOPICS = ["fleet/navixy/ngp", "fleet/navixy/ngp-mirror"]
STAGING_TOPIC = "staging/navixy/ngp"
NOT_METRICS = {"device_id", "message_time", "version", "event_id"}
ODD_ATTR = 'custom_Füllstand "Silo/2" #+$'  # passed through unchanged by NGP; sanitising is syncd's job
ODD_LABEL = 'Kran "Nord" #2 / Süd+$'
CALCULATED = ["engine_temperature_celsius", "fuel_economy_l_100km"]
RAW_ATTRS = ["latitude", "longitude", "altitude", "speed", "heading", "satellites", "hdop", "event_id",
             "is_moving", "battery_level", "board_voltage", "input_status", "temperature_2", "hardware_key"]
CODES = {400: (7, "Invalid parameters"), 401: (14, "Invalid session"), 403: (7, "Access denied"),
         404: (201, "Not found in the database"), 429: (15, "Too many requests (rate limit exceeded)"),
         500: (1, "Database error"), 503: (8, "Queue service error")}


# variant -> (NGP attribute replaced, raw JSON text ("{}" = the good value's text), metric/field the dead letter
# names: "*" = the whole message is dead-lettered, naming `field`; None: the reading is stored with value NULL)
POISONS: dict[str, tuple[str, str, str | None]] = {
    "ngp_ts_9999": ("message_time", '"9999-12-31T23:59:59Z"', "message_time"),
    "ngp_id_infinity": ("device_id", "Infinity", "device_id"),
    "ngp_value_nan": ("temperature_2", "NaN", None),
    "ngp_surrogate": ("location.fix_type", '"{}\\ud83d"', "text"),
}
POISON_FIRST, POISON_EVERY = 5, 11  # emission index of the first poisoned message, and the distance between them


class Fail(Exception):
    """A Navixy error; `errors` is only rendered on HTTP 400, as the API does."""

    def __init__(self, http: int, code: int, description: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(description)
        self.http, self.code, self.description, self.errors = http, code, description, errors


class Query(dict[str, Any]):
    """GET parameters: the only place where integers arrive as strings."""


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _h(*parts: object) -> int:
    return int.from_bytes(hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest(), "big")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))  # raw UTF-8, like the real API


def _leaves(name: str, v: Any) -> Iterator[tuple[str, float | None, str | None]]:
    if isinstance(v, dict):
        for k, sub in v.items():
            yield from _leaves(f"{name}.{k}", sub)
    elif v is None or isinstance(v, list):
        return
    elif isinstance(v, bool | int | float):
        yield name, float(v), None
    else:
        yield name, None, str(v)


class NavixySim(VendorSim):
    """One Navixy account: trackers, three flows (MQTT, default, disabled MQTT) and their endpoints."""

    vendor = "navixy"

    def __init__(
        self,
        seed: int = 1,
        *,
        clock: Callable[[], float] = time.time,
        live: bool = False,
        trackers: int = 6,
        mqtt_url: str | None = None,
        login: str = "demo@fleet.example",
        password: str = "demo-password",
        session_idle: float = 30 * 86400,
        publish_rate: float = 2.0,
        rate_limit: int | None = 50,
        poison: str | list[str] = "",
        unlisted: tuple[int, ...] = (),
    ) -> None:
        super().__init__(seed, clock=clock)
        self.anchor = clock()
        self.live, self.n, self.mqtt_url = live, max(1, trackers), mqtt_url
        self.login, self.password, self.session_idle, self.rate_limit = login, password, session_idle, rate_limit
        self.publish_rate = publish_rate  # messages/s streamed while served when live and mqtt_url (0: off)
        self.user_id = 40000 + _h(seed, "user") % 9000
        self.api_key = hashlib.md5(f"navixy-key-{seed}".encode()).hexdigest()
        self.revoked_key = hashlib.md5(f"navixy-revoked-{seed}".encode()).hexdigest()
        self.keys = {self.api_key: False, self.revoked_key: True}  # key -> revoked
        self.sessions: dict[str, float] = {}  # hash -> last use
        self._ip_limits: dict[str, SlidingWindowLimit] = {}
        self._key_limits: dict[str, SlidingWindowLimit] = {}
        self._t0 = 10_191_086 + 2 * (_h(seed, "t") % 50_000)  # even: tracker ids
        self._s0 = 10_118_727 + 2 * (_h(seed, "s") % 50_000)  # odd: source ids, never equal to a tracker id
        self.endpoints = self._make_endpoints()
        self.orphan = f"ngp-emu-{seed % 10000:04d}"
        self._published: dict[int, list[int]] = {}  # publisher index (-1 = orphan) -> message_time seconds
        self._last: dict[int, int] = {}
        self._rr = 0
        self._reconnecting = False
        self._task: asyncio.Task[None] | None = None
        self._burst = 0
        self._variants = poison_list(poison, POISONS, "navixy")
        self._emitted = 0  # messages published so far (their index picks the poisoned ones)
        self._poison: dict[tuple[int, int], str] = {}  # (publisher, message second) -> variant
        self.poisoned: list[Poisoned] = []
        self.unlisted = set(unlisted)

    def list_trackers(self) -> None:
        """The trackers held back by `unlisted` appear in tracker/list and the mapping list."""
        self.unlisted = set()

    def listed(self) -> list[int]:
        return [i for i in range(self.n) if i not in self.unlisted]

    # -- generated account ------------------------------------------------
    def flow_of(self, i: int) -> int:
        if self.n >= 3 and i == self.n - 1:
            return FLOW_STAGING
        return FLOW_DEFAULT if i % 4 == 3 else FLOW_MQTT

    def source_id(self, i: int) -> int:
        return self._s0 + 2 * i

    def imei(self, i: int) -> str:
        return f"3596321{self.seed % 100:02d}{i:06d}"

    def tracker(self, i: int) -> dict[str, Any]:
        names = ["Volvo FH16", "Kran", "Chevrolet Equinox", "Scania R450", "Reefer trailer"]
        label = ODD_LABEL if i == 1 else f"{names[i % len(names)]} {i + 1:03d}"
        created = time.strftime("%Y-%m-%d", time.gmtime(self.anchor - 86400 * (30 + i % 700)))
        return {"id": self._t0 + 2 * i, "label": label, "group_id": 0 if i % 3 else 167, "clone": False,
                "source": {"id": self.source_id(i), "device_id": self.imei(i),
                           "model": ["telfmm00a", "navixy_ngp", "qlgv300"][i % 3], "blocked": False,
                           "tariff_id": 345678, "status_listing_id": None, "creation_date": created,
                           "tariff_end_date": None, "phone": f"4917{_h(self.seed, i, 'p') % 10**8:08d}"},
                "tag_bindings": []}

    def flows(self) -> list[dict[str, Any]]:
        counts = {FLOW_MQTT: 0, FLOW_DEFAULT: 0, FLOW_STAGING: 0}
        for i in range(self.n):
            counts[self.flow_of(i)] += 1
        spec = [(FLOW_DEFAULT, "Default flow", None, True, True),
                (FLOW_MQTT, "Fleet → MQTT #1 (prod)", "NGP to the operator's broker", True, False),
                (FLOW_STAGING, "Staging → MQTT", "paused while the broker moves", False, False)]
        return [{"id": fid, "title": t, "description": d, "enabled": on, "default_flow": dflt,
                 "modified": _iso(int(self.anchor) - 86400 - _h(self.seed, fid) % (90 * 86400)),
                 "devices_count": counts[fid]} for fid, t, d, on, dflt in spec]

    def _make_endpoints(self) -> dict[int, dict[str, Any]]:
        u = urlsplit(self.mqtt_url or "mqtt://127.0.0.1:1883")
        props = {"protocol": "NGP", "domain": u.hostname or "127.0.0.1", "port": u.port or 1883,
                 "qos": 1, "version": "5.0", "use_ssl": u.scheme == "mqtts", "mqtt_auth": bool(u.username),
                 "user_name": u.username or "", "user_password": u.password or ""}
        return {
            EP_DEFAULT: {"id": EP_DEFAULT, "type": "output_default", "title": "Navixy platform", "status": "active",
                         "description": None},
            EP_MQTT: {"id": EP_MQTT, "type": "output_mqtt_client", "title": "Operator broker", "status": "active",
                      "description": "syncd pulls from here",
                      "properties": {**props, "client_id": f"navixy-{self.user_id}-prod", "topics": list(TOPICS)}},
            EP_STAGING: {"id": EP_STAGING, "type": "output_mqtt_client", "title": "Staging broker",
                         "status": "suspend", "description": None,
                         "properties": {**props, "client_id": f"navixy-{self.user_id}-staging", "version": "3.1.1",
                                        "topics": [STAGING_TOPIC]}},
        }

    def endpoint_status(self, eid: int) -> str:
        if eid == EP_MQTT and (self._reconnecting or self._outage()):
            return "waiting_reconnect"
        return str(self.endpoints[eid]["status"])

    def _outage(self) -> bool:
        """Live mode: the MQTT endpoint reconnects for one minute in every 15 (counted from the anchor)."""
        return self.live and int(self.clock() - self.anchor) // 60 % 15 == 14

    def flow_read(self, fid: int) -> dict[str, Any]:
        info = next(f for f in self.flows() if f["id"] == fid)
        sources = [] if fid == FLOW_DEFAULT else [self.source_id(i) for i in range(self.n) if self.flow_of(i) == fid]
        out_data: dict[str, Any] = {"title": "Navixy platform", "output_endpoint_type": "output_default"}
        if fid != FLOW_DEFAULT:
            eid = EP_MQTT if fid == FLOW_MQTT else EP_STAGING
            out_data = {"title": self.endpoints[eid]["title"], "output_endpoint_type": "output_mqtt_client",
                        "output_endpoint_id": eid}
        nodes: list[dict[str, Any]] = [
            {"id": 1, "type": "data_source", "data": {"title": "Trackers", "source_ids": sources},
             "view": {"position": {"x": 50, "y": 50}}},
            {"id": 2, "type": "output_endpoint", "data": out_data, "view": {"position": {"x": 450, "y": 50}}}]
        edges: list[dict[str, Any]] = [{"from": 1, "to": 2, "type": "simple_edge"}]
        if fid == FLOW_MQTT:
            items = [{"name": "engine_temperature_celsius", "value": "temperature_2 * 1.1 + 80",
                      "generation_time": None, "server_time": None},
                     {"name": "fuel_economy_l_100km", "value": "fuel_rate / speed * 100",
                      "generation_time": None, "server_time": None}]
            nodes.insert(1, {"id": 3, "type": "initiate_attributes", "data": {"title": "Derived", "items": items},
                             "view": {"position": {"x": 250, "y": 50}}})
            edges = [{"from": 1, "to": 3, "type": "simple_edge"}, {"from": 3, "to": 2, "type": "simple_edge"}]
        keys = ("id", "title", "description", "enabled", "default_flow")
        return {**{k: info[k] for k in keys}, "nodes": nodes, "edges": edges}

    # -- NGP messages -------------------------------------------------------
    def publishers(self) -> list[int]:
        return [i for i in range(self.n) if self.flow_of(i) == FLOW_MQTT] + [-1]

    def message(self, p: int, ts: int) -> dict[str, Any]:
        """The NGP message of publisher `p` at second `ts`; a pure function of (seed, p, ts)."""
        r = random.Random(f"{self.seed}:{p}:{ts}")
        moving = r.random() < 0.7
        speed = round(r.uniform(5, 90), 1) if moving else 0.0
        loc = {"latitude": round(52.40 + (p % 17) * 0.01 + 0.02 * math.sin(ts / 900), 6),
               "longitude": round(13.30 + (p % 13) * 0.01 + 0.02 * math.cos(ts / 900), 6),
               "altitude": r.randint(30, 120), "speed": speed, "heading": r.randint(1, 360),
               "satellites": r.randint(3, 14), "hdop": round(r.uniform(0.4, 2.5), 2), "fix_type": "HAS_FIX",
               "gnss_time": _iso(ts - 1)}
        t2 = round(r.uniform(-20, 35), 1)
        msg: dict[str, Any] = {"message_time": _iso(ts), "device_id": self.orphan if p < 0 else self.imei(p),
                               "version": "1.2", "location": loc}
        if r.random() < 0.5:
            msg["event_id"] = r.choice([402, 406, 10001])
        msg.update({"is_moving": moving, "battery_level": r.randint(20, 100),
                    "board_voltage": round(r.uniform(11.8, 14.2), 2), "input_status": r.randint(0, 3),
                    "temperature_2": t2, "engine_temperature_celsius": round(t2 * 1.1 + 80, 1),
                    # the flow's expression divides by speed: null while parked
                    "fuel_economy_l_100km": round(r.uniform(18, 40), 1) if moving else None})
        if r.random() < 0.2:
            msg["hardware_key"] = f"{r.getrandbits(40):010X}"
        if r.random() < 0.2:
            msg["mobile_cells"] = [{"mcc": 262, "mnc": 1, "lac": 32445, "cell_id": r.randint(1, 99999),
                                    "rssi": -r.randint(50, 110), "type": "LTE"}]
        if p == 1:
            msg[ODD_ATTR] = round(r.uniform(0, 100), 1)
        return msg

    def _plan(self, n: int) -> list[tuple[int, int]]:
        """n messages round-robin over publishers; times end at now and never go back per device."""
        pubs = self.publishers()
        counts = dict.fromkeys(pubs, n // len(pubs))
        for j in range(n % len(pubs)):
            counts[pubs[(self._rr + j) % len(pubs)]] += 1
        self._rr = (self._rr + n) % len(pubs)
        now = int(self.clock())
        start = {p: max(self._last.get(p, -(10**12)) + 1, now - m + 1) for p, m in counts.items()}
        return [(p, start[p] + k) for k in range(max(counts.values(), default=0)) for p in pubs if k < counts[p]]

    def _targets(self) -> list[dict[str, Any]]:
        """MQTT endpoints reached by enabled flows (the only egress that publishes)."""
        enabled = {f["id"] for f in self.flows() if f["enabled"]}
        return [self.endpoints[EP_MQTT]] if FLOW_MQTT in enabled else []

    def _client(self, ep: dict[str, Any], suffix: str = "") -> aiomqtt.Client:
        if not self.mqtt_url:
            raise RuntimeError("NavixySim needs mqtt_url to publish")
        pr = ep["properties"]
        version = aiomqtt.ProtocolVersion.V5 if pr["version"] == "5.0" else aiomqtt.ProtocolVersion.V311
        client = aiomqtt.Client(pr["domain"], pr["port"], username=pr["user_name"] or None,
                                password=pr["user_password"] or None, identifier=pr["client_id"] + suffix,
                                protocol=version, max_inflight_messages=100, timeout=10)
        client.pending_calls_threshold = 10_000  # bursts keep a few hundred PUBACKs in flight on purpose
        return client

    async def _emit(self, clients: list[tuple[aiomqtt.Client, dict[str, Any]]], plan: list[tuple[int, int]]) -> None:
        if not clients:  # no enabled MQTT flow: nothing leaves Navixy
            return
        for lo in range(0, len(plan), 200):
            chunk = plan[lo:lo + 200]
            calls: list[Awaitable[None]] = []
            for p, ts in chunk:
                body = self._body(p, ts)
                for client, ep in clients:
                    pr = ep["properties"]
                    calls += [client.publish(t, body, qos=pr["qos"]) for t in pr["topics"]]
                    if _h(self.seed, p, ts, "dup") % 20 == 0:  # QoS 1 may deliver twice
                        calls.append(client.publish(pr["topics"][0], body, qos=pr["qos"]))
            await asyncio.gather(*calls)
            for p, ts in chunk:
                self._published.setdefault(p, []).append(ts)
                self._last[p] = ts

    def _body(self, p: int, ts: int) -> bytes:
        """The payload of one message; a message picked by the `poison` option carries its bad value raw."""
        k, self._emitted = self._emitted - POISON_FIRST, self._emitted + 1
        if k < 0 or k % POISON_EVERY or k // POISON_EVERY >= len(self._variants):
            return _dumps(self.message(p, ts)).encode()
        variant = self._variants[k // POISON_EVERY]
        attr, raw, named = POISONS[variant]
        msg = self.message(p, ts)
        outer, _, inner = attr.partition(".")
        holder = msg[outer] if inner else msg
        good = holder[inner or outer]
        holder[inner or outer] = raw_json(raw.replace("{}", json.dumps(str(good))[1:-1]))
        self._poison[(p, ts)] = variant
        device = self.orphan if p < 0 else self.imei(p)
        metric = attr if named in (None, "text") else "*"
        self.poisoned.append(Poisoned(variant, ("telemetry", str(self.user_id), device, metric, ts * 1000), named, raw))
        return splice_raw(_dumps(msg)).encode()

    async def redeliver(self) -> None:
        """Every message published so far, once more (what QoS 1 may do after a reconnect)."""
        plan = [(p, ts) for p, stamps in self._published.items() for ts in sorted(set(stamps))]
        self._burst += 1
        async with contextlib.AsyncExitStack() as stack:
            clients = [(await stack.enter_async_context(self._client(ep, f"-r{self._burst}")), ep)
                       for ep in self._targets()]
            for lo in range(0, len(plan), 200):
                calls = [client.publish(t, _dumps(self.message(p, ts)).encode(), qos=ep["properties"]["qos"])
                         for p, ts in plan[lo:lo + 200] for client, ep in clients for t in ep["properties"]["topics"]]
                await asyncio.gather(*calls)

    async def publish(self, n: int) -> None:
        """Publish n NGP messages now to every topic of every enabled flow's MQTT endpoint."""
        self._burst += 1
        try:
            async with contextlib.AsyncExitStack() as stack:
                clients = [(await stack.enter_async_context(self._client(ep, f"-b{self._burst}")), ep)
                           for ep in self._targets()]
                await self._emit(clients, self._plan(n))
        except aiomqtt.MqttError:
            self._reconnecting = True
            raise
        self._reconnecting = False

    async def start_publishing(self, rate_per_s: float = 5.0) -> None:
        """Background stream of `rate_per_s` messages/s until stop_publishing()."""
        if not self.mqtt_url:
            raise RuntimeError("NavixySim needs mqtt_url to publish")
        if self._task is None:
            self._task = asyncio.create_task(self._live_loop(rate_per_s))

    async def stop_publishing(self) -> None:
        task, self._task = self._task, None
        if task:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _live_loop(self, rate: float) -> None:
        period, carry = max(0.05, 1 / rate), 0.0
        while True:
            try:
                async with contextlib.AsyncExitStack() as stack:
                    clients = [(await stack.enter_async_context(self._client(ep)), ep) for ep in self._targets()]
                    self._reconnecting = False
                    while True:
                        carry += rate * period
                        k, carry = int(carry), carry - int(carry)
                        if k and not self._outage():
                            await self._emit(clients, self._plan(k))
                        await asyncio.sleep(period)
            except aiomqtt.MqttError:
                self._reconnecting = True  # endpoint shows waiting_reconnect until the broker is back
                await asyncio.sleep(1.0)

    # -- truth ------------------------------------------------------------
    def ground_truth(self) -> list[TruthRow]:
        rows: dict[tuple[str, str, int], TruthRow] = {}
        tenant = str(self.user_id)
        for p, stamps in list(self._published.items()):  # the live publisher may append meanwhile
            device = self.orphan if p < 0 else self.imei(p)
            for ts in set(stamps):
                msg = self.message(p, ts)
                variant = self._poison.get((p, ts)) if self._poison else None
                attr, _, named = POISONS[variant] if variant else ("", "", None)
                if variant and named not in (None, "text"):
                    continue  # the whole message is dead-lettered
                for key, v in msg.items():
                    if key in NOT_METRICS:
                        continue
                    for metric, value, text in _leaves(key, v):
                        if metric == attr and named == "text":
                            continue  # that reading is dead-lettered, the rest of the message stored
                        rows[(device, metric, ts * 1000)] = TruthRow(
                            "navixy", "telemetry", tenant, device, metric, ts * 1000, None if metric == attr else value,
                            text)
        return list(rows.values())

    def status_truth(self, poll_ms: int) -> list[TruthRow]:
        """kind=status rows of one poll of flow/list + endpoint/read at `poll_ms`."""
        tenant = str(self.user_id)
        out = [TruthRow("navixy", "status", tenant, f"flow:{f['id']}", "enabled",
                        calendar.timegm(time.strptime(f["modified"], "%Y-%m-%dT%H:%M:%SZ")) * 1000,
                        1.0 if f["enabled"] else 0.0, None) for f in self.flows()]
        return out + [TruthRow("navixy", "status", tenant, f"endpoint:{eid}", "status", poll_ms, None,
                               self.endpoint_status(eid)) for eid in self.endpoints]

    def source_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"vendor": "navixy", "base_url": self.url + API, "api_key": self.api_key}
        if self.mqtt_url:
            u = urlsplit(self.mqtt_url)
            cfg["mqtt_url"] = f"{u.scheme}://{u.hostname}:{u.port or 1883}"
            if u.username:
                cfg.update(mqtt_username=u.username, mqtt_password=u.password or "")
            cfg["topics"] = [t for ep in self._targets() for t in ep["properties"]["topics"]]
        return cfg

    # -- HTTP ---------------------------------------------------------------
    def error(self, status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
        code, desc = CODES.get(status, (1, message))
        errors = [{"message": message}] if status == 400 else None
        return self._fail_response(Fail(status, code, desc, errors), headers)

    def _fail_response(self, f: Fail, headers: dict[str, str] | None = None) -> web.Response:
        body: dict[str, Any] = {"success": False, "status": {"code": f.code, "description": f.description}}
        if f.http == 400:
            body["errors"] = f.errors or [{"message": f.description}]
        return web.json_response(body, status=f.http, headers=headers, dumps=_dumps)

    def add_routes(self, app: web.Application) -> None:
        # path -> (methods, handler, auth: None = public, "any" = key or hash, "session" = hash only)
        self.routes: dict[str, tuple[tuple[str, ...], Callable[..., Any], str | None]] = {
            "/user/auth": (("POST",), self._user_auth, None),
            "/user/get_info": (("GET", "POST"), self._get_info, "any"),
            "/user/api_key/list": (("POST",), lambda q: {"list": [
                {"hash": k, "label": f"key {i + 1}"} for i, (k, gone) in enumerate(self.keys.items()) if not gone]},
                "session"),
            "/user/api_key/delete": (("POST",), self._key_delete, "session"),
            "/tracker/list": (("GET", "POST"), lambda q: {"list": [self.tracker(i) for i in self.listed()]}, "any"),
            "/iot/logic/flow/list": (("GET",), lambda q: {"list": self.flows()}, "any"),
            "/iot/logic/flow/read": (("GET",), self._flow_read, "any"),
            "/iot/logic/flow/sources/list": (("GET",), self._sources_list, "any"),
            "/iot/logic/flow/sources/mapping/list": (("GET",), self._mapping_list, "any"),
            "/iot/logic/flow/sources/attribute/list": (("POST",), self._attribute_list, "any"),
            "/iot/logic/flow/endpoint/list": (("POST",), lambda q: {"list": [
                {k: ep[k] for k in ("id", "title", "type", "description")} for ep in self.endpoints.values()]}, "any"),
            "/iot/logic/flow/endpoint/read": (("POST",), self._endpoint_read, "any"),
            "/iot/logic/flow/endpoint/create": (("POST",), self._endpoint_create, "any"),
        }
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        if self.live and self.mqtt_url and self.publish_rate > 0:  # `syncd sim --live` shows a live stream
            app.on_startup.append(lambda _app: self.start_publishing(self.publish_rate))
            app.on_cleanup.append(lambda _app: self.stop_publishing())

    def _limit(self, table: dict[str, SlidingWindowLimit], key: str) -> None:
        if self.rate_limit is None:
            return
        if key not in table:
            table[key] = SlidingWindowLimit(self.rate_limit, 1.0, self.clock)
        if not table[key].allow():
            raise Fail(429, *CODES[429])

    async def _dispatch(self, request: web.Request) -> web.Response:
        try:
            self._limit(self._ip_limits, request.remote or "?")
            path = request.path[len(API):] if request.path.startswith(API + "/") else None
            if path not in self.routes:
                raise Fail(404, *CODES[404])
            methods, handler, auth = self.routes[path]
            if request.method not in methods:
                raise Fail(400, 112, "Wrong method", [{"message": f"{path} accepts {'/'.join(methods)} only"}])
            params = await self._params(request)
            if auth:
                cred = self._authenticate(request, params, auth)
                self._limit(self._key_limits, cred)
            return web.json_response({"success": True, **handler(params)}, dumps=_dumps)
        except Fail as f:
            return self._fail_response(f)

    async def _params(self, request: web.Request) -> dict[str, Any]:
        if request.method == "GET":
            return Query(request.query)
        raw = await request.read()
        if not raw.strip():
            return {}
        if request.content_type != "application/json":
            raise Fail(400, 7, "Invalid parameters", [{"message": "Content-Type must be application/json"}])
        try:
            body = json.loads(raw)
        except ValueError as err:
            raise Fail(400, 7, "Invalid parameters", [{"message": f"malformed JSON: {err}"}]) from None
        if not isinstance(body, dict):
            raise Fail(400, 7, "Invalid parameters", [{"message": "body must be a JSON object"}])
        return body

    def _authenticate(self, request: web.Request, params: dict[str, Any], need: str) -> str:
        header = request.headers.get("Authorization")
        if header is not None:  # a malformed header is refused even if a hash is sent elsewhere
            if not header.startswith("NVX ") or not header[4:].strip():
                raise Fail(401, 14, "Invalid session")
            cred = header[4:].strip()
        elif request.method == "POST" and isinstance(params.get("hash"), str):
            cred = params["hash"]
        elif "hash" in request.query:
            cred = request.query["hash"]
        else:
            raise Fail(401, 14, "Invalid session")
        if cred in self.sessions:
            if self.faults.expired or self.clock() - self.sessions[cred] > self.session_idle:
                self.sessions.pop(cred)
                raise Fail(401, 14, "Invalid session")
            self.sessions[cred] = self.clock()
        elif cred in self.keys:
            if self.keys[cred] or self.faults.expired:
                raise Fail(401, 4, "User or API key not found or session ended")
            if need == "session":
                raise Fail(403, 7, "Access denied")
        else:
            raise Fail(401, 3, "Wrong hash")
        return cred

    # -- handlers (params in, envelope fields out) --------------------------------
    def _user_auth(self, q: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(q.get("login"), str) or not isinstance(q.get("password"), str):
            raise Fail(400, 7, "Invalid parameters", [{"message": "login and password are required"}])
        if (q["login"], q["password"]) != (self.login, self.password):
            raise Fail(401, 4, "User or API key not found or session ended")
        h = hashlib.md5(f"{self.seed}:{self.login}:{len(self.sessions)}:{self.clock()}".encode()).hexdigest()
        self.sessions[h] = self.clock()
        return {"hash": h}

    def _get_info(self, q: dict[str, Any]) -> dict[str, Any]:
        return {"paas_id": 7, "user_info": {
            "id": self.user_id, "login": self.login, "title": "Fleet Demo GmbH", "locale": "en_US", "demo": False,
            "time_zone": "Europe/Berlin", "creation_date": time.strftime(
                "%Y-%m-%d %H:%M:%S", time.gmtime(self.anchor - 400 * 86400))}}

    def _key_delete(self, q: dict[str, Any]) -> dict[str, Any]:
        if q.get("api_key") not in self.keys or self.keys[q["api_key"]]:
            raise Fail(404, *CODES[404])
        self.keys[q["api_key"]] = True
        return {}

    def _flow_read(self, q: dict[str, Any]) -> dict[str, Any]:
        fid = _int(q, "flow_id")
        if fid not in (FLOW_MQTT, FLOW_DEFAULT, FLOW_STAGING):
            raise Fail(404, *CODES[404])
        return {"value": self.flow_read(fid)}

    def _sources_list(self, q: dict[str, Any]) -> dict[str, Any]:
        fid = _int(q, "flow_id")
        if fid == 0:  # the default flow: every tracker not in a custom flow
            return {"value": [self.source_id(i) for i in range(self.n) if self.flow_of(i) == FLOW_DEFAULT]}
        if fid not in (FLOW_MQTT, FLOW_DEFAULT, FLOW_STAGING):
            raise Fail(404, *CODES[404])
        return {"value": self.flow_read(fid)["nodes"][0]["data"]["source_ids"]}

    def _mapping_list(self, q: dict[str, Any]) -> dict[str, Any]:
        offset, limit = _int(q, "offset", 0), _int(q, "limit", 10_000)
        if offset < 0 or limit < 1:
            raise Fail(400, 7, "Invalid parameters", [{"message": "offset >= 0 and limit >= 1"}])
        if limit > 100_000:
            raise Fail(400, 212, "Requested limit is too big", [{"message": "limit must be <= 100000"}])
        titles = {f["id"]: f["title"] for f in self.flows()}
        rows, listed = [], self.listed()
        for i in listed[offset:offset + limit]:
            t, fid = self.tracker(i), self.flow_of(i)
            rows.append({"device_id": t["source"]["id"], "device_title": t["label"],
                         "model_code": t["source"]["model"], "flow_id": fid, "flow_title": titles[fid],
                         "node_id": 1, "node_title": "Trackers"})
        return {"list": rows, "count": len(listed)}

    def _attribute_list(self, q: dict[str, Any]) -> dict[str, Any]:
        ids = q.get("source_ids")
        if ids is not None and (not isinstance(ids, list) or not 1 <= len(ids) <= 25_000
                                or not all(isinstance(x, int) and not isinstance(x, bool) for x in ids)):
            raise Fail(400, 7, "Invalid parameters", [{"message": "source_ids: 1..25000 integers"}])
        known = {self.source_id(i) for i in range(self.n)}
        chosen = known if ids is None else known & set(ids)  # tracker ids silently match nothing
        if not chosen:
            return {"list": []}
        names = [{"name": n, "in_iot_flow": True, "received": True} for n in CALCULATED]
        if not q.get("include_only_iot_flow_attributes", False):
            raw = RAW_ATTRS + ([ODD_ATTR] if self.n > 1 and self.source_id(1) in chosen else [])
            names += [{"name": n, "received": True} for n in raw]
        return {"list": names}

    def _endpoint_read(self, q: dict[str, Any]) -> dict[str, Any]:
        eid = _int(q, "endpoint_id")
        if eid not in self.endpoints:
            raise Fail(404, *CODES[404])
        return {"value": {**self.endpoints[eid], "status": self.endpoint_status(eid)}}

    def _endpoint_create(self, q: dict[str, Any]) -> dict[str, Any]:
        ep = q.get("endpoint")
        if not isinstance(ep, dict):
            raise Fail(400, 7, "Invalid parameters", [{"message": "endpoint object is required"}])
        problems = [f"{k} is required" for k in ("type", "title", "status") if k not in ep]
        if ep.get("type") not in ("output_default", "output_mqtt_client"):
            problems.append("type must be output_default or output_mqtt_client")
        if ep.get("status", "active") not in ("active", "waiting_reconnect", "suspend", "disabled"):
            problems.append("unknown status")
        if ep.get("type") == "output_mqtt_client":
            pr = ep.get("properties")
            pr = pr if isinstance(pr, dict) else {}
            need = ("protocol", "domain", "port", "client_id", "qos", "topics", "version", "use_ssl", "mqtt_auth")
            problems += [f"properties.{k} is required" for k in need if k not in pr]
            if pr.get("qos", 0) not in (0, 1):
                problems.append("qos must be 0 or 1 (2 is unsupported)")
            if pr.get("version", "5.0") not in ("3.1.1", "5.0"):
                problems.append('version must be "3.1.1" or "5.0"')
        if problems:
            raise Fail(400, 293, "IoT Endpoint Invalid", [{"message": m} for m in problems])
        eid = max(self.endpoints) + 1
        self.endpoints[eid] = {"description": None, **ep, "id": eid}
        return {"id": eid}


def _int(q: dict[str, Any], name: str, default: int | None = None) -> int:
    """An integer parameter: digits in a query string, a JSON integer in a body."""
    v = q.get(name)
    if v is None and default is not None:
        return default
    if isinstance(q, Query) and isinstance(v, str) and v.lstrip("-").isdigit():
        return int(v)
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    raise Fail(400, 7, "Invalid parameters", [{"message": f"{name} must be an integer"}])
