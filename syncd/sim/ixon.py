"""IXON Cloud APIv2 simulator (brief: shared/vendors/ixon.md), strict enough that connector misreadings fail.

Served under /api: discovery (GET /api/), access tokens, companies, agents, data sources, data tags,
alarm occurrences and DataList. Only discovery hrefs are authoritative: DataList and alarm occurrences live
at non-obvious paths, hrefs carry `{agentId}` / `{publicId}` templates. Credentials: the service-account
`token` (works only with `application_id`), or Basic logins demo@example.com::demo-pass (no 2FA) and
ops@example.com:123456:ops:pass (2FA) whose tokens work with any registered application.

Choices the connector must mirror (the brief's §8 leaves them open):
- telemetry: tenant = company publicId, device = agent publicId, metric = tag `slug` (unique per agent),
  ts = point `time` in UTC ms, value = number (bool -> 1.0/0.0), text = value of `str` tags (value None).
- alert: one event at `occurredOn`, and a second at `rtnOn` once the occurrence has closed; metric =
  `alarm.name` verbatim (hostile characters included), value None, text = severity, or "severity: comment"
  when the occurrence has a comment (same text on both events).
- agent status (kind=status) is not a default stream and is not in ground_truth (its ts is poll time).
- Data becomes visible `lag` (60 s) after it happens (live) / history ends at anchor - lag; DataList windows are
  [start, end); a query without `limit` gets 5000; lists are ordered, cursors are opaque base64 containing
  `+` and `/` (so unencoded query strings fail); page-size above the maximum is clamped, not refused.
- 429 bodies are text/plain (undocumented shape, no Retry-After); 500 uses the error envelope, 503 is an
  HTML gateway page.
- `poison="point_ts_9999,..."` (off by default, names in POISONS): per variant one DataList point (mid-history, of a
  tag of a fitting type) is served with that bad value written raw (a NaN literal, a `\ud83d` escape); `poisoned`
  lists them; ground_truth() leaves out the ones a sync must dead-letter and holds value None for a NaN reading.
- Worse than the connector assumes: `lag=300` makes every point visible 5 minutes after its time; with `lag_max`
  each point has its own lag between `lag` and `lag_max` (hashed), so one tag's points show up out of order (an
  upload landing point by point): a point may appear after a later one of its tag has been read.

The request languages (fields, filters, list paging, DataList requests and queries) are in syncd.sim.ixon_query.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from syncd.sim.common import (
    Faults,
    Poisoned,
    SlidingWindowLimit,
    TruthRow,
    VendorSim,
    dumps,
    poison_list,
    raw_json,
    splice_raw,
)
from syncd.sim.ixon_query import ApiError, DataQuery, DataRequest, iso, list_page, selected

LAG_MS = 60_000  # propagation lag (default of `lag`): data is visible once it is this old
MAX_QUEUE_S = 5.0  # longest a buffered request may wait before it is refused
APP_RE = re.compile(r"[A-Za-z0-9]{12}")
COMPANY_RE = re.compile(r"\d{4}(-\d{4}){4}")
MASK, GOLDEN = (1 << 64) - 1, 0x9E3779B97F4A7C15
ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

# (name, slug, unit, variable type)
TAG_BASES = [
    ("Oven temperature", "oven-temperature", "°C", "float"),
    ("Motor current", "motor-current", "A", "float"),
    ("Parts produced", "parts-produced", "pcs", "int"),
    ("Machine state", "machine-state", "", "str"),
    ("Door closed", "door-closed", "", "bool"),
    ('Druck "Einlauf" #1 / Pumpe +$', "druck-einlauf", "bar", "float"),
    ("Energy total", "energy-total", "kWh", "float"),
    ("Error code", "error-code", "", "int"),
]
# variant -> (point field replaced, raw JSON text ("{}" = the good value's text), tag types it fits, field the dead
# letter names; None: stored with value NULL)
POISONS: dict[str, tuple[str, str, tuple[str, ...], str | None]] = {
    "point_ts_9999": ("time", '"9999-12-31T23:59:59Z"', ("float", "int", "str", "bool"), "time"),
    "point_value_nan": ("value", "NaN", ("float",), None),
    "point_value_infinity": ("value", "Infinity", ("float", "int"), None),
    "point_surrogate": ("value", '"{}\\ud83d"', ("str",), "text"),
}
STATES = ["RUNNING", "IDLE", "SETUP", 'FAULT E42: "overheat" / #2']
SOURCES = [("PLC", "plc", "modbus"), ("Energy meter", "energy-meter", "opc-ua")]
AGENT_NAMES = ["Press line 1", 'Linie 3/Presse "Süd" #2 +$', "Packaging robot", "Chiller östlich"]
ALARMS = [("High temperature", "high", "threshold"), ('Druck > 5 bar / "Pumpe #2" +$ ✓', "medium", "threshold"),
          ("Door open", "low", "state")]


@dataclass
class IxonFaults(Faults):
    drop: bool = False  # requests beyond the 250/s buffer lose their connection instead of getting a 429


class BufferedLimit(SlidingWindowLimit):
    """A window the buffer can wait on and pre-admit into, so the base middleware's check agrees."""

    def __init__(self, limit: int, window: float, clock: Any) -> None:
        super().__init__(limit, window, clock)
        self.tickets = 0

    def wait(self) -> float:
        now = self.clock()
        while self.hits and self.hits[0] <= now - self.window:
            self.hits.popleft()
        return 0.0 if len(self.hits) < self.limit else self.hits[-self.limit] + self.window - now + 1e-4

    def admit(self) -> None:
        self.hits.append(self.clock())
        self.tickets += 1

    def allow(self) -> bool:
        if self.tickets:
            self.tickets -= 1
            return True
        return super().allow()


@dataclass
class Tag:
    agent: int
    k: int
    obj: dict[str, Any]
    type: str
    step: int  # ms between points
    t0: int  # ms of point 0
    n: int  # points in the history
    salt: int  # per-tag hash seed for values

    def t(self, i: int) -> int:
        return self.t0 + i * self.step


@dataclass
class Token:
    public_id: str
    secret: str
    expires_ms: int | None
    application: str | None  # service-account tokens only work with their own application
    name: str | None = None


class IxonSim(VendorSim):
    """One IXON company with `agents` agents, each with two data sources, logged tags and alarms."""

    vendor = "ixon"

    def __init__(self, seed: int = 1, *, clock: Any = time.time, live: bool = False, agents: int = 3,
                 tags_per_agent: int = 24, points_per_tag: int = 240, history: float = 86400.0, alarms: int = 6,
                 page_size: int = 20, max_page_size: int = 4000,
                 rate_limit: tuple[int, int] | None = (50, 3000), buffer: int = 250,
                 rels: dict[str, str] | None = None, poison: str | list[str] = "", lag: float = LAG_MS / 1000,
                 lag_max: float | None = None) -> None:
        super().__init__(seed, clock=clock)
        self.rels = {**self.RELS, **(rels or {})}  # rel -> path under /api/: serve a rel elsewhere to test discovery
        self.faults = IxonFaults()
        self.live, self.page_size, self.max_page_size = live, page_size, max_page_size
        self.anchor = clock()
        self.lag_ms = int(lag * 1000)
        self.lag_spread = max(0, int((lag_max if lag_max is not None else lag) * 1000) - self.lag_ms)
        self.hist_end = int(self.anchor * 1000) - self.lag_ms
        self.history_ms = max(1, int(history * 1000))
        self.alarms = max(1, alarms)
        if rate_limit:
            self.limits = [BufferedLimit(rate_limit[0], 1.0, clock), BufferedLimit(rate_limit[1], 60.0, clock)]
        self.intake = SlidingWindowLimit(buffer, 1.0, clock)
        self.company_id = "-".join(f"{self.rng.randrange(10000):04d}" for _ in range(5))
        self.company_name = "Acme Machines B.V."
        self.application_id = self._pid("app")
        self.other_application_id = self._pid("app2")  # a registered app for personal (Basic-login) tokens
        self.token = self._pid("sa-secret", size=32)
        service_account = Token(self._pid("sa-token"), self.token, None, self.application_id)
        self.tokens: dict[str, Token] = {self.token: service_account}
        self.minted = 0  # personal tokens issued so far (their ids derive from it)
        self.users = {"demo@example.com": ("demo-pass", None), "ops@example.com": ("ops:pass", "123456")}
        self.agent_objs: list[dict[str, Any]] = []
        self.sources: dict[str, dict[str, Any]] = {}  # publicId -> data source object
        self.tags: list[list[Tag]] = []
        for a in range(agents):
            self._build_agent(a, tags_per_agent, max(1, points_per_tag))
        self.agent_index = {o["publicId"]: a for a, o in enumerate(self.agent_objs)}
        self._poison: dict[tuple[str, int], tuple[str, str]] = {}  # (tag publicId, point ms) -> (field, raw JSON text)
        self.poisoned: list[Poisoned] = []
        self._plant(poison_list(poison, POISONS, "ixon"))

    def _plant(self, variants: list[str]) -> None:
        """Per variant one mid-history point of a tag of a fitting type (never a tag's newest: that one is re-read)."""
        if variants and self.live:
            raise ValueError("poison needs a fixed history (not live)")
        tags = [t for ts in self.tags for t in ts]
        for k, variant in enumerate(variants):
            field, raw, types, named = POISONS[variant]
            fits = [t for t in tags if t.type in types]
            if not fits or fits[0].n < 4:
                raise ValueError(f"poison {variant}: no tag of type {types} with history")
            tag = fits[(3 * k) % len(fits)]
            i = tag.n // 2 + k % (tag.n // 4)
            while (tag.obj["publicId"], tag.t(i)) in self._poison:
                i += 1
            good = self._series(tag, range(i, i + 1))[0]
            text = raw.replace("{}", json.dumps(str(good))[1:-1])
            self._poison[(tag.obj["publicId"], tag.t(i))] = (field, text)
            dev = self.agent_objs[tag.agent]["publicId"]
            self.poisoned.append(Poisoned(variant, ("telemetry", self.company_id, dev, tag.obj["slug"], tag.t(i)), named,
                                          text))

    # -- deterministic data -------------------------------------------------
    def _h(self, *parts: Any) -> int:
        return int.from_bytes(hashlib.blake2b(repr((self.seed, *parts)).encode(), digest_size=8).digest(), "big")

    def _pid(self, *parts: Any, size: int = 12) -> str:
        digest = hashlib.blake2b(repr((self.seed, *parts)).encode(), digest_size=size).digest()
        return "".join(ALNUM[b % 62] for b in digest)

    def _build_agent(self, a: int, ntags: int, npoints: int) -> None:
        pid = self._pid("agent", a)
        name = AGENT_NAMES[a % len(AGENT_NAMES)] + (f" {a // len(AGENT_NAMES) + 1}" if a >= len(AGENT_NAMES) else "")
        ref = {"publicId": pid, "name": name}
        sources = []
        for s, (sname, slug, proto) in enumerate(SOURCES):
            src = {"publicId": self._pid("source", a, s), "name": sname, "slug": slug, "disabled": False,
                   "protocol": {"publicId": proto, "name": proto}, "valuesPerHour": 60, "agent": ref,
                   "device": {"publicId": self._pid("device", a, s), "name": sname}}
            self.sources[src["publicId"]] = src  # type: ignore[index]
            sources.append(src)
        changed = self.hist_end - self.history_ms // 3 + a * 7_001
        self.agent_objs.append({
            "publicId": pid, "name": name, "deviceId": str(1_000_000 + self._h("dev", a) % 9_000_000),
            "serialNumber": f"IX2-{self._h('sn', a) % 10**8:08d}",
            "macAddress": ":".join(f"{b:02x}" for b in [0, 0x60, 0x35, a % 256, (a * 7) % 256, 0x11]),
            "activeStatus": "inactive" if a % 3 == 2 else "active",
            "activeVpnSession": {"publicId": self._pid("vpn", a), "startedOn": iso(changed)} if a == 0 else None,
            "vpnChangedOn": iso(changed), "mqttChangedOn": iso(changed + 1_234), "timeZone": "Europe/Amsterdam",
            "company": {"publicId": self.company_id, "name": self.company_name},
            "dataSources": [{k: s[k] for k in ("publicId", "name", "slug")} for s in sources]})
        step = max(1, self.history_ms // npoints)
        tags = []
        for k in range(ntags):
            name, slug, unit, vtype = TAG_BASES[k % len(TAG_BASES)]
            if k >= len(TAG_BASES):
                name, slug = f"{name} {k // len(TAG_BASES) + 1}", f"{slug}-{k // len(TAG_BASES) + 1}"
            src, h = sources[k % 2], self._h("jitter", a, k)
            if k % 2 and step >= 1000:  # odd tags log on whole seconds: their times carry no milliseconds
                kstep = step - step % 1000
                last = self.hist_end - self.hist_end % 1000 - 1000 * (h % (kstep // 1000))
            else:  # the newest point lies within one step before the history end, the next one after it
                kstep, last = step, self.hist_end - h % step
            obj = {"publicId": self._pid("tag", a, k), "tagId": k + 1, "name": name, "slug": slug,
                   "source": {k2: src[k2] for k2 in ("publicId", "name", "slug")}, "retentionPolicy": "52w",
                   "logEvent": "change" if vtype in ("str", "bool") else "interval", "loggingInterval": f"{kstep}ms",
                   "variable": {"variableId": 100 + k, "name": name, "slug": slug, "type": vtype, "unit": unit,
                                "factor": 1}}
            tags.append(Tag(a, k, obj, vtype, kstep, last - (npoints - 1) * kstep, npoints, _mix(self.seed, a, k)))
        self.tags.append(tags)

    def _bound(self) -> int:
        """Newest visible ms: the history end, or now minus the propagation lag when live."""
        return int(self.clock() * 1000) - self.lag_ms if self.live else self.hist_end

    def _visible(self, tag: Tag, idx: range) -> Sequence[int]:
        """The points of `idx` visible now: all of them unless points have their own lags (`lag_max`)."""
        if not self.lag_spread:
            return idx
        now, spread, salt = int(self.clock() * 1000) - self.lag_ms, self.lag_spread + 1, tag.salt ^ 0x5EED
        return [i for i in idx if tag.t(i) <= now - _mix(salt, i) % spread]

    def _count(self, tag: Tag) -> int:
        if not self.live:
            return tag.n
        return max(0, (self._bound() - tag.t0) // tag.step + 1)

    @staticmethod
    def _series(tag: Tag, idx: Sequence[int]) -> list[Any]:
        """Values of points `idx`, in one pass per type (200k points of ground truth must stay cheap)."""
        salt, k = tag.salt, tag.k
        hs = [(x ^ (x >> 31)) * 0xBF58476D1CE4E5B9 & MASK for x in ((salt + i * GOLDEN) & MASK for i in idx)]
        if tag.type == "float":  # whole thousandths divided once: the shortest repr survives JSON unchanged
            base, sin = 20_000 + 1_000 * (k % 7), math.sin
            return [(base + int(5_000 * sin(i / 15.3 + k)) + h % 1000) / 1000 for i, h in zip(idx, hs, strict=True)]
        if tag.type == "int":  # a counter: monotonic
            return [1000 * k + 3 * i + h % 3 for i, h in zip(idx, hs, strict=True)]
        if tag.type == "bool":
            return [bool(h >> 40 & 1) for h in hs]
        return [STATES[h >> 40 & 3] for h in hs]

    def _occurrences(self, a: int) -> list[dict[str, Any]]:
        """Alarm occurrences of agent `a` visible now; each closes within its slot, the last historical stays open."""
        bound, slot = self._bound(), self.history_ms / self.alarms
        start = self.hist_end - self.history_ms + self._h("aoff", a) % max(1, int(slot * 0.1))
        out, j = [], 0
        while j < self.alarms or self.live:
            h = self._h("occ", a, j)
            occ = start + int(j * slot + (h % 1000) / 1000 * 0.3 * slot) + 1
            if occ > bound:
                break
            dur = int(slot * 1.5) if j == self.alarms - 1 else int(slot * (0.2 + (h >> 10) % 400 / 1000))
            rtn = occ + max(1, dur)
            name, severity, atype = ALARMS[j % len(ALARMS)]
            closed = rtn <= bound
            comment = 'Checked on site, reset by "operator" #7' if j % 3 == 0 else None
            out.append({"publicId": self._pid("occ", a, j),
                        "alarm": {"publicId": self._pid("alarm", a, j % len(ALARMS)), "name": name, "type": atype,
                                  "severity": severity},
                        "occurredOn": iso(occ), "rtnOn": iso(rtn) if closed else None,
                        "acknowledged": closed, "acknowledgedOn": iso((occ + rtn) // 2) if closed else None,
                        "silenced": False, "stillActiveOn": None if closed else iso(bound), "comment": comment,
                        "_occ": occ, "_rtn": rtn if closed else None})
            j += 1
        return out

    # -- contract with the harness ---------------------------------------------
    def ground_truth(self) -> list[TruthRow]:
        out: list[TruthRow] = []
        rows: dict[tuple[str, str, str, str, int], TruthRow] = {}
        cid = self.company_id
        poisoned = {p.key: p for p in self.poisoned}
        for a, tags in enumerate(self.tags):
            dev = self.agent_objs[a]["publicId"]
            for tag in tags:  # no dedup needed: slugs are unique per agent and a tag's times are distinct
                slug, t0, step, idx = tag.obj["slug"], tag.t0, tag.step, self._visible(tag, range(self._count(tag)))
                if tag.type == "str":
                    out += [TruthRow("ixon", "telemetry", cid, dev, slug, t0 + i * step, None, v)
                            for i, v in zip(idx, self._series(tag, idx), strict=True)]
                else:
                    out += [TruthRow("ixon", "telemetry", cid, dev, slug, t0 + i * step, float(v), None)
                            for i, v in zip(idx, self._series(tag, idx), strict=True)]
            for o in self._occurrences(a):
                alarm = o["alarm"]
                text = f"{alarm['severity']}: {o['comment']}" if o["comment"] else alarm["severity"]
                for ts in (o["_occ"], o["_rtn"]):
                    if ts is not None:
                        key = ("alert", self.company_id, dev, alarm["name"], ts)
                        rows[key] = TruthRow("ixon", "alert", cid, dev, alarm["name"], ts, None, text)
        if poisoned:  # dead-lettered by a sync, or stored with value NULL (a NaN reading)
            kept = []
            for r in out:
                p = poisoned.get((r.kind, r.tenant, r.device, r.metric, r.ts_ms))
                if p is None:
                    kept.append(r)
                elif p.field is None:
                    kept.append(TruthRow(r.vendor, r.kind, r.tenant, r.device, r.metric, r.ts_ms, None, r.text))
            out = kept
        return out + list(rows.values())

    def source_config(self) -> dict[str, Any]:
        return {"vendor": "ixon", "base_url": f"{self.url}/api", "application_id": self.application_id,
                "company_id": self.company_id, "token": self.token}

    def error(self, status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
        if status == 429:  # undocumented body: a bare gateway answer, not the JSON envelope
            return web.Response(status=429, text="429 Too Many Requests", headers=headers)
        if status == 503:
            return web.Response(status=503, text="<html><body><h1>503 Service Unavailable</h1></body></html>",
                                content_type="text/html", headers=headers)
        return self._error(status, message, headers=headers)

    def _error(self, status: int, message: str, prop: str | None = None, index: int | None = None,
               headers: dict[str, str] | None = None) -> web.Response:
        body = {"status": "error", "type": "Error", "data": [{"message": message, "propertyName": prop,
                                                              "listIndex": index}]}
        return web.Response(status=status, text=dumps(body), content_type="application/json", headers=headers)

    # -- app wiring ---------------------------------------------------------------
    def make_app(self) -> web.Application:
        app = super().make_app()
        app.middlewares.insert(0, self._buffer)  # outermost: queue before the base's strict limit check
        return app

    @web.middleware
    async def _buffer(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Brief §4: beyond 50/s or 3000/min requests are delayed, beyond 250/s dropped (429 or cut)."""
        windows = [w for w in self.limits if isinstance(w, BufferedLimit)]
        if request.path.startswith("/_sim/") or not windows:
            return await handler(request)
        deadline = time.monotonic() + MAX_QUEUE_S
        ok = self.intake.allow()
        while ok and (wait := max(w.wait() for w in windows)) > 0:
            ok = time.monotonic() + wait <= deadline
            if ok:
                before = self.clock()
                await asyncio.sleep(wait)
                ok = self.clock() - before >= wait / 2  # a frozen test clock would never free a slot
        if not ok:
            if self.faults.drop:  # type: ignore[attr-defined]
                if request.transport:
                    request.transport.close()
                raise asyncio.CancelledError
            return self.error(429, "Too Many Requests")
        for w in windows:
            w.admit()
        return await handler(request)

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/api/", self._wrap(self._h_discovery, bearer=False))
        r.add_post(self._path("AccessTokenList"), self._wrap(self._h_login, bearer=False))
        r.add_delete(self._path("AccessToken"), self._wrap(self._h_delete_token))
        r.add_get(self._path("CompanyList"), self._wrap(self._h_companies))
        r.add_get(self._path("AgentList"), self._wrap(self._h_agents, company=True))
        r.add_get(self._path("Agent").replace("{publicId}", "{agentId}"), self._wrap(self._h_agent, company=True))
        r.add_get(self._path("AgentDataSourceList"), self._wrap(self._h_sources, company=True))
        r.add_get(self._path("AgentDataTagList"), self._wrap(self._h_tags, company=True))
        r.add_get(self._path("AgentDataAlarmOccurrenceList"), self._wrap(self._h_alarms, company=True))
        r.add_post(self._path("DataList"), self._wrap(self._h_data, company=True))
        r.add_route("*", "/{tail:.*}", self._wrap(self._h_missing, bearer=False, headers=False))

    RELS = {"AccessRecoverList": "access-recover", "AccessTokenList": "access-tokens",
            "AccessToken": "access-tokens/{publicId}", "CompanyList": "companies", "AgentList": "agents",
            "Agent": "agents/{publicId}", "AgentDataSourceList": "agents/{agentId}/data-sources",
            "AgentDataTagList": "agents/{agentId}/data-tags",
            "AgentDataAlarmOccurrenceList": "agents/{agentId}/data-alarm-occurrences",
            "DataList": "cloud-logging/data-lists"}

    def _path(self, rel: str) -> str:
        return f"/api/{self.rels[rel]}"

    def _wrap(self, fn: Any, *, bearer: bool = True, company: bool = False, headers: bool = True) -> Any:
        async def handler(request: web.Request) -> web.StreamResponse:
            try:
                token = self._auth(request, bearer, company) if headers else None
                return await fn(request, token)
            except ApiError as e:
                return self._error(e.status, e.message, e.prop, e.index)
        return handler

    def _auth(self, request: web.Request, bearer: bool, company: bool) -> Token | None:
        h = request.headers
        if h.get("Api-Version") != "2":
            raise ApiError(400, "Header Api-Version must be 2", "Api-Version")
        app = h.get("Api-Application", "")
        if not APP_RE.fullmatch(app):
            raise ApiError(400, "Header Api-Application must be 12 alphanumeric characters", "Api-Application")
        if app not in (self.application_id, self.other_application_id):
            raise ApiError(401, "Unknown application", "Api-Application")
        accept = h.get("Accept", "application/json")
        if not any(m in accept for m in ("application/json", "*/*", "application/*")):
            raise ApiError(406, "Only application/json can be produced", "Accept")
        token = None
        if bearer:
            scheme, _, secret = h.get("Authorization", "").partition(" ")
            token = self.tokens.get(secret.strip()) if scheme.lower() == "bearer" else None
            if token is None or self.faults.expired or (token.expires_ms or 1 << 62) <= self.clock() * 1000:
                raise ApiError(401, "Invalid, expired or revoked access token", "Authorization")
            if token.application and token.application != app:
                raise ApiError(401, "Access token does not belong to this application", "Api-Application")
        if company:
            cid = h.get("Api-Company")
            if not cid or not COMPANY_RE.fullmatch(cid):
                raise ApiError(400, "Header Api-Company must be a company publicId", "Api-Company")
            if cid != self.company_id:
                raise ApiError(403, "No access to this company", "Api-Company")
        return token

    # -- handlers ---------------------------------------------------------------------
    def _ok(self, rtype: str, data: Any, more_after: str | None = None, status: int = 200) -> web.Response:
        body = {"type": rtype, "data": data, "moreAfter": more_after, "status": "success"}
        return web.Response(status=status, text=splice_raw(dumps(body)), content_type="application/json")

    def _root(self, request: web.Request) -> str:
        return self.url or f"{request.scheme}://{request.host}"

    async def _h_missing(self, request: web.Request, _: Any) -> web.Response:
        raise ApiError(404, f"No resource at {request.path}")

    async def _h_discovery(self, request: web.Request, _: Any) -> web.Response:
        root = self._root(request)
        data = [{"rel": rel, "href": f"{root}/api/{path}"} for rel, path in self.rels.items()]
        return self._ok("Discovery", data)

    async def _h_login(self, request: web.Request, _: Any) -> web.Response:
        scheme, _, cred = request.headers.get("Authorization", "").partition(" ")
        try:
            email, otp, password = base64.b64decode(cred.strip(), validate=True).decode().split(":", 2)
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise ApiError(401, "Basic credentials must be email:otp:password", "Authorization") from None
        user = self.users.get(email)
        if scheme.lower() != "basic" or user is None or user[0] != password:
            raise ApiError(401, "Invalid email or password", "Authorization")
        if user[1] is not None and otp != user[1]:
            raise ApiError(401, "Two-factor authentication code missing or wrong", "otp")
        body = await _json(request)
        exp = body.get("expiresIn") if isinstance(body, dict) else None
        if not isinstance(exp, int) or isinstance(exp, bool) or not 60 <= exp <= 5_184_000:
            raise ApiError(400, "expiresIn must be an integer from 60 to 5184000", "expiresIn")
        now = self.clock()
        self.minted += 1
        tok = Token(self._pid("token", self.minted), self._pid("secret", self.minted, size=32),
                    int(now * 1000) + exp * 1000, None, body.get("trustedDeviceName"))
        self.tokens[tok.secret] = tok
        obj = {"publicId": tok.public_id, "secretId": tok.secret, "expiresOn": iso(tok.expires_ms or 0),
               "lastUsedOn": None, "trustedDeviceName": tok.name}
        return self._ok("AccessToken", selected(obj, request.query.get("fields"), "AccessToken"), status=201)

    async def _h_delete_token(self, request: web.Request, _: Any) -> web.Response:
        pid = request.match_info["publicId"]
        for secret, tok in list(self.tokens.items()):
            if tok.public_id == pid:
                del self.tokens[secret]
                return self._ok("AccessToken", None)
        raise ApiError(404, "Access token not found")

    async def _h_companies(self, request: web.Request, _: Any) -> web.Response:
        items = [{"publicId": self.company_id, "name": self.company_name, "custom": False,
                  "branding": {"publicId": self._pid("branding"), "name": "Acme"}}]
        return self._list(request, "CompanyList", "Company", items, lambda o: [o["publicId"]])

    def _agent(self, request: web.Request) -> int:
        a = self.agent_index.get(request.match_info["agentId"])
        if a is None:
            raise ApiError(404, "Agent not found")
        return a

    async def _h_agents(self, request: web.Request, _: Any) -> web.Response:
        return self._list(request, "AgentList", "Agent", self.agent_objs, lambda o: [self.agent_index[o["publicId"]]])

    async def _h_agent(self, request: web.Request, _: Any) -> web.Response:
        a = self._agent(request)
        return self._ok("Agent", selected(self.agent_objs[a], request.query.get("fields"), "Agent"))

    async def _h_sources(self, request: web.Request, _: Any) -> web.Response:
        pid = self.agent_objs[self._agent(request)]["publicId"]
        items = [s for s in self.sources.values() if s["agent"]["publicId"] == pid]
        return self._list(request, "AgentDataSourceList", "DataSource", items, lambda o: [o["slug"]])

    async def _h_tags(self, request: web.Request, _: Any) -> web.Response:
        items = [t.obj for t in self.tags[self._agent(request)]]
        return self._list(request, "AgentDataTagList", "DataTag", items, lambda o: [o["tagId"]])

    async def _h_alarms(self, request: web.Request, _: Any) -> web.Response:
        items = self._occurrences(self._agent(request))
        return self._list(request, "AgentDataAlarmOccurrenceList", "AlarmOccurrence", items,
                          lambda o: [o["_occ"], o["publicId"]])

    def _list(self, request: web.Request, rtype: str, kind: str, items: list[dict[str, Any]], key: Any) -> web.Response:
        return self._ok(rtype, *list_page(request.query, kind, items, key, self.page_size, self.max_page_size))

    async def _h_data(self, request: web.Request, _: Any) -> web.Response:
        body = await _json(request)
        if isinstance(body, list):
            if not body:
                raise ApiError(400, "At least one data request is required")
            return self._ok("DataList", [self._data_one(r, i) for i, r in enumerate(body)], status=201)
        return self._ok("DataList", self._data_one(body, None), status=201)

    def _data_one(self, r: Any, idx: int | None) -> dict[str, Any]:
        req = DataRequest.parse(r, idx, self.sources)
        src = req.source
        tags = [t for t in self.tags[self.agent_index[src["agent"]["publicId"]]]
                if t.obj["source"]["publicId"] == src["publicId"]]
        points: dict[int, dict[str, Any]] = {}
        bad_times: dict[int, str] = {}  # poisoned points whose time goes out broken
        desc = None
        for tag, ref, query in req.queries(tags):
            desc = query.order == "desc" if desc is None else desc
            for ms, v in self._query(tag, req.start, req.end, query):
                bad = self._poison.get((tag.obj["publicId"], ms)) if self._poison else None
                if bad is not None:
                    field, raw = bad
                    v = raw_json(raw) if field == "value" else v
                    if field == "time":
                        bad_times[ms] = raw_json(raw)
                points.setdefault(ms, {})[ref] = v
        return req.answer(points, bad_times, bool(desc))

    def _query(self, tag: Tag, start: int, end: int, query: DataQuery) -> list[tuple[int, Any]]:
        """One DataList query over the points of `tag` in [start, end)."""
        count = self._count(tag)
        lo = min(count, max(0, -((tag.t0 - start) // tag.step)))
        hi = min(count, max(0, -((tag.t0 - end) // tag.step)))
        if query.extended:
            lo, hi = max(0, lo - 1), min(count, hi + 1)
        seen = self._visible(tag, range(lo, hi))
        if query.raw:  # the fast path: values only for the page, found by arithmetic slicing
            page = query.page(seen)
            return query.shaped(zip((tag.t(i) for i in page), self._series(tag, page), strict=True))
        return query.run(list(zip((tag.t(i) for i in seen), self._series(tag, seen), strict=True)), start)


# -- helpers -------------------------------------------------------------------------------------
def _mix(*parts: int) -> int:
    """splitmix64 folded over integer parts."""
    x = 0
    for p in parts:
        x = (x ^ (p & MASK)) * GOLDEN & MASK
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & MASK
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & MASK
    return x ^ (x >> 31)


async def _json(request: web.Request) -> Any:
    try:
        return json.loads(await request.read() or b"null")
    except ValueError:
        raise ApiError(400, "Request body is not valid JSON") from None
