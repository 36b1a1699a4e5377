"""IoT Open "Lynx" simulator: /api/v2 + /api/v3beta on one host, static API key or Basic login (+ SMS 2FA).

Choices the connector must mirror (brief §8 leaves them open):
- tenant = str(installation_id); device = str(client_id), the installation's MQTT client id, for every topic
  (the brief's FunctionX id would change a series' key when a FunctionX is mapped to its topic later);
  metric = the full topic string; ts_ms = timestamp seconds * 1000 rounded half-even; value = float(value);
  text = msg if non-empty, else None.
- A point becomes visible (status AND log) 5 s after its timestamp; ground truth holds only visible points.
- status truth: one row per topic, its newest visible point (a live connector may also hold older "newest" rows).
- v3 log `from` and `to` are both inclusive, compared in milliseconds; equal timestamps sort by topic position.
- Timestamps/values are Go-style JSON numbers: whole numbers print without ".0" (1700000000, 255).
- `poison="ts_9999,value_nan_literal,..."` (off by default, names in POISONS) serves, per variant, one mid-history
  log point and the latest point of another topic (so its status entry too) with that bad value written raw
  (a NaN literal, a `\ud83d` escape really go over the wire). `poisoned` lists them; ground_truth() leaves out the
  ones a sync must dead-letter and holds value None for a NaN reading. `envelope="data_object"` (or
  "total_string") makes every v3 log page's envelope malformed; set `sim.envelope = ""` to heal it.
Worse than the connector assumes (all off by default; the extra points are log points only, never a topic's status):
- `future_stamped=(YEAR, 200 * YEAR)`: per offset, one extra value from a device with a wrong clock: received
  mid-history, stamped that many seconds after it. The log files a value under min(its timestamp, when it arrived)
  (`from`/`to` and the order go by that), so it shows among the values received with it.
- `late_by=7200, late_points=6`: extra values stamped within the history's last `late_by` seconds that show up in
  the log only `late_by` after their timestamp (a gateway uploading a buffer): none is visible when the sim starts.
- `hidden_functions=2`: the first 2 FunctionX of each installation are missing from `functionx` until
  `add_functions()` (a mapping added after the first sync).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from syncd.sim.common import Clock, Poisoned, SlidingWindowLimit, TruthRow, VendorSim, poison_list, raw_json, splice_raw

PROPAGATION_MS = 5_000  # "approximately 5 seconds for a value to propagate" [S]
DAY = 86_400
YEAR = 365 * DAY  # lifetime of keys obtained through /api/v2/auth [D2]
DEFAULT_LIMIT = 10_000
MASK = (1 << 64) - 1

ORGS = [{"id": 2, "name": "Fastighets AB Exempel", "parent": 0}, {"id": 5, "name": "Region Norr", "parent": 2}]
INST_NAMES = ["Kv. Björken 3", 'Pannrum #2 / "Nord" +$', "Skolan Östra", "Lager Syd", "Villa Ekbacken"]
CAPS = [["zwave", "knx"], ["zigbee"], ["zwave", "modbus"]]
# (kind, topic path after "{client_id}/obj/", FunctionX type or None, unit, node number base, name, device type)
TEMPLATES = [
    ("temperature", "zwave/{n}/temperature", "temperature", "°C", 12, "Temperatur vardagsrum", "zwave"),
    ("humidity", "zwave/{n}/humidity", "humidity", "%", 12, "Luftfuktighet vardagsrum", "zwave"),
    ("switch", "knx/0/2/{n}", "switch", "", 4, "Taklampa kök", "knx"),
    ("power", "modbus/{n}/power", "power_meter", "W", 3, "Elmätare effekt", "modbus"),
    ("door", "zigbee/{n}/door", "door_switch", "", 7, "Ytterdörr", "zigbee"),
    ("flow", 'house/källare/pump "P{n}" $flow', "flow", "m³/h", 2, 'Pump #{n} / "Källare" +flöde', "modbus"),
    ("energy", "house/hemma/{n}/energy", "energy_meter", "kWh", 5, "Energi totalt", "modbus"),
    ("alarm", "alarm/{n}/fire", None, "", 1, "Brandlarm", None),  # no FunctionX: device falls back to client_id
]


# variant -> (record field replaced, raw JSON text sent, field the dead letter names; None: stored with value NULL)
POISONS: dict[str, tuple[str, str, str | None]] = {
    "ts_9999": ("timestamp", "253402300799", "timestamp"),  # 9999-12-31T23:59:59Z
    "ts_33658": ("timestamp", "1000000000000", "timestamp"),  # milliseconds sent as seconds: year 33658
    "ts_huge": ("timestamp", "1e300", "timestamp"),
    "ts_nan_string": ("timestamp", '"NaN"', "timestamp"),
    "ts_nan_literal": ("timestamp", "NaN", "timestamp"),  # the page is no longer JSON orjson reads
    "ts_true": ("timestamp", "true", "timestamp"),
    "ts_negative": ("timestamp", "-1700000000", "timestamp"),
    "id_infinity": ("client_id", "Infinity", "client_id"),
    "value_nan_literal": ("value", "NaN", None),
    "value_infinity": ("value", "-Infinity", None),
    "value_nan_string": ("value", '"NaN"', None),
    "surrogate_msg": ("msg", '"smoke \\ud83d"', "text"),  # a cut emoji: a lone high surrogate escape
    "surrogate_topic": ("topic", "", "metric"),  # the topic itself, cut after its first character's emoji
}
ENVELOPES = ("", "data_object", "total_string")


class ApiError(Exception):
    """Raised by handlers; rendered as the vendor's MessageResponse."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Token:
    user: str
    serial: int  # issue order; the "expired" fault kills serials issued before it was switched on
    expires: int  # unix s, 0 = never
    scope: str  # "api" (full) or "sms" (only good for PUT /api/v2/auth)


@dataclass(frozen=True)
class Topic:
    inst: int  # index into self.insts
    local: int  # position inside its installation: tie-break for equal timestamps
    gk: int  # global index (hash input)
    group: int  # topics of one node share jitter, so they land in the same whole second
    shift: int  # ms added to the group's jitter
    kind: str
    topic: str
    cap: int | None  # history points; None = unbounded (live)
    function: dict[str, Any] | None
    jkey: int = 0  # per-group hash key of the timestamp jitter
    vkey: int = 0  # per-topic hash key of the values


@dataclass(frozen=True)
class Extra:
    """A log value outside a topic's regular series (`future_stamped`, `late_by`)."""

    topic: Topic
    j: int  # negative: never a regular point's index (its value is hashed from it)
    ts_ms: int  # the timestamp it carries
    filed_ms: int  # where the log files it: min(timestamp, when the cloud received it)
    visible_ms: int  # from when the log shows it


def _mix(*parts: int) -> int:
    """Cheap deterministic 64-bit hash (splitmix-style) for lazily generated points."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ (p & MASK)) * 0xBF58476D1CE4E5B9) & MASK
        h ^= h >> 31
    return h


def _step(key: int, j: int) -> int:
    """One splitmix round: the per-point hash, kept to a single call because the backlog can be huge."""
    h = ((key ^ j) * 0x94D049BB133111EB) & MASK
    return h ^ (h >> 29)


def _num(x: float) -> int | float:
    """Go's float64 JSON form: integral values print without a fraction."""
    return int(x) if float(x).is_integer() else x


def _ts_json(ts_ms: int) -> int | float:
    return ts_ms // 1000 if ts_ms % 1000 == 0 else ts_ms / 1000


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    body = splice_raw(json.dumps(data, ensure_ascii=False, separators=(",", ":")))  # raw UTF-8 like the Go server
    return web.Response(text=body, status=status, headers=headers, content_type="application/json")


def _param(query: Any, name: str, default: Any, cast: Any = float, minimum: float | None = None) -> Any:
    """A numeric query parameter; anything unparsable or out of range is a 400 MessageResponse."""
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = cast(raw)
    except ValueError:
        raise ApiError(400, f"invalid value for '{name}'") from None
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        raise ApiError(400, f"invalid value for '{name}'")
    return value


def _bool(raw: str | None, default: bool, name: str) -> bool:
    if raw is None or raw == "":
        return default
    if raw.lower() in ("true", "1"):
        return True
    if raw.lower() in ("false", "0"):
        return False
    raise ApiError(400, f"invalid value for '{name}'")


def _meta_filter(items: list[dict[str, Any]], query: Any, meta_key: str = "meta") -> list[dict[str, Any]]:
    """`type=` and `{meta-key}=value` filters, `*` wildcard in values [S]."""
    for key, value in query.items():
        if key == "type":
            items = [x for x in items if x.get("type") == value]
        else:
            rx = re.compile(".*".join(map(re.escape, value.split("*"))), re.S)
            items = [x for x in items if key in x[meta_key] and rx.fullmatch(str(x[meta_key][key]))]
    return items


class IotOpenSim(VendorSim):
    """A fake Lynx cloud: installations of MQTT topics whose history is a lazily computed arithmetic series."""

    vendor = "iotopen"

    def __init__(
        self,
        seed: int = 1,
        *,
        clock: Clock = time.time,
        live: bool = False,
        installations: int = 3,
        topics_per_installation: int = 8,
        log_points: int = 5_000,
        history: float = 6 * 3600.0,
        assigned_ratio: float = 0.67,
        max_url: int = 2048,
        rate_limit: float | None = None,
        poison: str | list[str] = "",
        envelope: str = "",
        future_stamped: Sequence[float] = (),
        late_by: float = 0.0,
        late_points: int = 0,
        hidden_functions: int = 0,
    ) -> None:
        super().__init__(seed, clock=clock)
        if installations < 1 or topics_per_installation < 1 or log_points < 0 or history <= 120:
            raise ValueError("need installations >= 1, topics_per_installation >= 1, history > 120 s")
        self.live = live
        self.anchor = clock()
        self.max_url = max_url  # GETs with a longer path+query answer 414 (exercises the POST fallback)
        if rate_limit:  # none documented [S]: off unless asked for
            burst = max(1, round(rate_limit))
            self.limits.append(SlidingWindowLimit(burst, burst / rate_limit, clock))

        digest = hashlib.sha256(f"iotopen:{seed}".encode()).hexdigest()
        self.api_key = digest[:32]
        self.username, self.password = "syncd@example.com", "pw-" + digest[32:44]
        self.sms_username, self.sms_password = "ops@example.com", "pw-" + digest[44:56]
        self.sms_code = f"{int(digest[56:62], 16) % 1_000_000:06d}"
        self._users = {self.username: (self.password, False), self.sms_username: (self.sms_password, True)}
        self._tokens: dict[str, Token] = {self.api_key: Token(self.username, 0, 0, "api")}
        self._serial = 1
        self._flip: int | None = None  # first serial still valid while faults.expired is on

        self._build_inventory(installations, topics_per_installation, assigned_ratio)
        n_topics = len(self.topics)
        per, extra = divmod(log_points, n_topics)
        span = int(history * 1000) - 60_000  # history ends 60 s before the anchor, so it is stable
        self.start_ms = int(self.anchor * 1000) - int(history * 1000)
        self.period = span // max(1, per + (1 if extra else 0))
        if self.period < 4:
            raise ValueError("log_points too dense for history; raise history")
        self.spread = max(1, min(300, self.period // 4))  # room kept for partner shifts
        for i, t in enumerate(self.topics):
            cap = None if live else per + (1 if t.gk < extra else 0)
            shift = min(40, self.spread - 1) if t.kind == "humidity" else 0
            self.topics[i] = Topic(t.inst, t.local, t.gk, t.group, shift, t.kind, t.topic, cap, t.function,
                                   _mix(seed, t.group), _mix(seed, t.gk, 7))
        self.by_inst = [[t for t in self.topics if t.inst == i] for i in range(len(self.insts))]
        self.tpi = topics_per_installation
        if envelope not in ENVELOPES:
            raise ValueError(f"envelope must be one of {ENVELOPES}")
        self.envelope = envelope
        self._poison: dict[tuple[int, int], str] = {}  # (topic gk, point index) -> variant
        self.poisoned: list[Poisoned] = []
        self._plant(poison_list(poison, POISONS, "iotopen"))
        self.extras: list[Extra] = []
        self._plant_future([float(x) for x in future_stamped])
        self._plant_late(float(late_by), int(late_points))
        self._hidden = {f["id"] for fns in self.functions for f in fns[:max(0, hidden_functions)]}

    def add_functions(self) -> None:
        """The FunctionX held back by `hidden_functions` appear (a mapping added after the first sync)."""
        self._hidden = set()

    def _functions_of(self, i: int) -> list[dict[str, Any]]:
        return [f for f in self.functions[i] if f["id"] not in self._hidden]

    def _function(self, t: Topic) -> dict[str, Any] | None:
        return None if t.function is None or t.function["id"] in self._hidden else t.function

    # -- inventory ----------------------------------------------------------------
    def _build_inventory(self, n: int, per_inst: int, ratio: float) -> None:
        rng = self.rng
        n_assigned = min(n, max(0, round(n * ratio)))
        self.insts: list[dict[str, Any]] = []
        self.devices: list[list[dict[str, Any]]] = []
        self.functions: list[list[dict[str, Any]]] = []
        self.topics: list[Topic] = []
        dev_id, fn_id = 200, 1000
        for i in range(n):
            iid = 10 * (i + 1)
            name = INST_NAMES[i % len(INST_NAMES)] + (f" {i // len(INST_NAMES) + 1}" if i >= len(INST_NAMES) else "")
            self.insts.append({
                "id": iid, "name": name, "client_id": 1000 + iid, "organization_id": ORGS[i % 2]["id"],
                "capabilities": CAPS[i % len(CAPS)], "assigned": i < n_assigned,
                "created": int(self.anchor) - DAY * (400 - 17 * i), "notes": f"Anläggning {rng.randint(100, 999)}",
            })
            cid = 1000 + iid
            devs: list[dict[str, Any]] = []
            fns: list[dict[str, Any]] = []
            node_dev: dict[tuple[str, int], int] = {}
            for t in range(per_inst):
                kind, path, ftype, unit, base, fname, dtype = TEMPLATES[t % len(TEMPLATES)]
                cycle = t // len(TEMPLATES)
                number = base + cycle
                topic = f"{cid}/obj/" + path.format(n=number)
                group = len(self.topics) - 1 if kind == "humidity" and t % len(TEMPLATES) == 1 else len(self.topics)
                function = None
                if ftype is not None:
                    node = (dtype or "", number if dtype == "zwave" else t)
                    if node not in node_dev:
                        meta: dict[str, Any] = {"name": f"{dtype} {number}", "manufacturer": "Acme",
                                                "description": fname.split(" ")[0]}
                        if dtype == "zwave":
                            meta["node_id"] = number  # a number although meta is typed string [S]
                        devs.append({"id": dev_id, "installation_id": iid, "type": dtype, "meta": meta,
                                     "protected_meta": {}})
                        node_dev[node] = dev_id
                        dev_id += 1
                    fmeta: dict[str, Any] = {
                        "name": fname.format(n=number) + (f" {cycle + 1}" if cycle else ""), "topic_read": topic,
                        "unit": unit, "format": "%.1f" if unit else "%d", "device_id": str(node_dev[node]),
                    }
                    if kind == "switch":
                        fmeta["device_id"] = node_dev[node]  # mimics the doc example's numeric id [S]
                        fmeta["topic_set"] = f"{cid}/set/obj/" + path.format(n=number)
                    if kind == "door":
                        fmeta.update(state_open="1", text_open="Öppen", state_closed="0", text_closed="Stängd")
                    function = {"id": fn_id, "installation_id": iid, "type": ftype, "meta": fmeta,
                                "protected_meta": {}}
                    fns.append(function)
                    fn_id += 1
                self.topics.append(Topic(i, t, len(self.topics), group, 0, kind, topic, None, function))
            self.devices.append(devs)
            self.functions.append(fns)

    def _plant(self, variants: list[str]) -> None:
        """Per variant: a mid-history point, and the latest point of a topic whose last second is not the log's last
        (the connector re-reads that second on the next run)."""
        if not variants:
            return
        if self.live or any(t.cap is None or t.cap < 2 * len(variants) + 4 for t in self.topics):
            raise ValueError("poison needs a history (not live) of at least 2 points per variant on every topic")
        n = len(self.topics)
        last_second = max(self._ts(t, t.cap - 1) for t in self.topics if t.cap) // 1000
        tails = [t for t in self.topics if t.cap and self._ts(t, t.cap - 1) // 1000 < last_second]
        for k, variant in enumerate(variants):
            mid = self.topics[(7 * k + 3) % n]
            assert mid.cap is not None
            self._poison[(mid.gk, mid.cap // 2 + k)] = variant
            if k < len(tails):
                tail = tails[k]
                assert tail.cap is not None
                self._poison[(tail.gk, tail.cap - 1)] = variant
        for (gk, j), variant in sorted(self._poison.items()):
            t = self.topics[gk]
            field, raw = POISONS[variant][2], self._raw(t, variant)
            self.poisoned.append(Poisoned(variant, ("log", *self._keys(t), self._ts(t, j)), field, raw))
            if j == (t.cap or 0) - 1:  # the latest point: the status list serves it too
                self.poisoned.append(Poisoned(variant, ("status", *self._keys(t), self._ts(t, j)), field, raw))

    def _keys(self, t: Topic) -> tuple[str, str, str]:
        inst = self.insts[t.inst]
        return str(inst["id"]), str(inst["client_id"]), t.topic

    def _plant_future(self, offsets: list[float]) -> None:
        """Per offset a value received right after a mid-history point of a topic, stamped `offset` s after that."""
        n = len(self.topics)
        for k, offset in enumerate(offsets):
            if offset <= 0:
                raise ValueError("future_stamped offsets are seconds ahead (> 0)")
            t = self.topics[(3 * k + 2) % n]
            j = (t.cap if t.cap is not None else self._count_le(t, int(self.anchor * 1000) - 60_000)) // 2
            received = self._ts(t, j) + 1
            self.extras.append(Extra(t, -1 - len(self.extras), received + int(offset * 1000), received,
                                     received + PROPAGATION_MS))

    def _plant_late(self, late_by: float, points: int) -> None:
        """`points` values stamped within the last `late_by` s of history, each visible `late_by` s after its stamp."""
        if points <= 0:
            return
        if late_by <= 0:
            raise ValueError("late_points needs late_by > 0")
        end, late_ms = int(self.anchor * 1000) - 60_000, int(late_by * 1000)
        span = min(late_ms - 60_000, end - self.start_ms)
        if span < points:
            raise ValueError("late_by must leave room for the late points (more than 61 s, inside the history)")
        n = len(self.topics)
        for k in range(points):
            t = self.topics[(5 * k + 1) % n]
            ts = end - (k + 1) * span // (points + 1) + 7
            while self._count_le(t, ts) != self._count_le(t, ts - 1):  # never on a regular point's millisecond
                ts += 1
            self.extras.append(Extra(t, -1 - len(self.extras), ts, ts, ts + late_ms))

    @staticmethod
    def _raw(t: Topic, variant: str) -> str:
        if variant == "surrogate_topic":
            return json.dumps(t.topic[:1], ensure_ascii=False)[:-1] + '\\ud83d' + json.dumps(t.topic[1:])[1:]
        return POISONS[variant][1]

    def _inst(self, request: web.Request) -> int:
        """Index of the installation in the path; 403 for an id this key may not see."""
        try:
            iid = int(request.match_info["installation_id"])
        except ValueError:
            raise ApiError(400, "invalid installation_id") from None
        for i, inst in enumerate(self.insts):
            if inst["id"] == iid:
                return i
        raise ApiError(403, "Forbidden")

    # -- data -------------------------------------------------------------------
    def _ts(self, t: Topic, j: int) -> int:
        return self.start_ms + j * self.period + _step(t.jkey, j) % (self.period - self.spread) + t.shift

    def _count_le(self, t: Topic, at_ms: int) -> int:
        """Number of points of `t` with timestamp <= at_ms (O(1): the series is monotonic)."""
        if at_ms < self.start_ms:
            return 0
        j = (at_ms - self.start_ms) // self.period
        n = j + (1 if self._ts(t, j) <= at_ms else 0)
        return n if t.cap is None else min(n, t.cap)

    def _visible_ms(self) -> int:
        return int(self.clock() * 1000) - PROPAGATION_MS

    def _value(self, t: Topic, j: int, ts_ms: int) -> tuple[int | float, str]:
        h = _step(t.vkey, j)
        kind = t.kind
        if kind == "temperature" or kind == "humidity":
            daily = math.sin(2 * math.pi * (ts_ms % (DAY * 1000)) / (DAY * 1000) + t.inst)
            if kind == "temperature":
                return _num(round(21 + 2.5 * daily + (h % 100 - 50) / 100, 1)), ""
            return _num(round(45 - 8 * daily + (h % 60) / 10, 1)), ""
        if kind == "switch":
            return (255 if h % 3 else 0), ""
        if kind == "power":
            return 400 + h % 2600, ""
        if kind == "door":
            return (1, "open") if h % 4 == 0 else (0, "closed")
        if kind == "flow":
            return _num(round(3 + (h % 700) / 100, 2)), ""
        if kind == "energy":
            return _num(round(1000 + t.gk * 37 + j * 0.05, 3)), ""
        return (1, "smoke detected") if h % 97 == 0 else (0, "")

    def _record(self, t: Topic, j: int, ts_ms: int, with_empty_msg: bool) -> dict[str, Any]:
        inst = self.insts[t.inst]
        value, msg = self._value(t, j, ts_ms)
        rec: dict[str, Any] = {"client_id": inst["client_id"], "installation_id": inst["id"],
                               "timestamp": _ts_json(ts_ms), "topic": t.topic, "value": value}
        if msg or with_empty_msg:  # log entries always carry msg, status only when set (both as in [S])
            rec["msg"] = msg
        variant = self._poison.get((t.gk, j)) if self._poison else None
        if variant is not None:
            rec[POISONS[variant][0]] = raw_json(self._raw(t, variant))
        return rec

    def _page(self, topics: list[Topic], from_ms: int, to_ms: int, offset: int, limit: int, desc: bool
              ) -> tuple[int, list[tuple[Topic, int, int]]]:
        """(total, page of (topic, j, ts_ms)) over the merged, time-ordered series; O(topics*log + page)."""
        if self.extras:
            return self._page_with_extras(topics, from_ms, to_ms, offset, limit, desc)
        hi_ms = min(to_ms, self._visible_ms())
        wins = [(t, self._count_le(t, from_ms - 1), self._count_le(t, hi_ms)) for t in topics]
        wins = [w for w in wins if w[2] > w[1]]
        total = sum(hi - lo for _, lo, hi in wins)
        start = max(0, total - offset - limit) if desc else offset
        n = min(limit, total - offset)
        if n <= 0:
            return total, []
        m, base = self.tpi, sum(lo for _, lo, _ in wins)

        def below(key: int) -> list[int]:  # per topic: index of the first point with (ts, local) key >= key
            at, r = divmod(key, m)
            return [min(max(self._count_le(t, at if t.local < r else at - 1), lo), hi) for t, lo, hi in wins]

        a, b = from_ms * m, hi_ms * m + m - 1  # binary search for the key of the start-th entry
        while a < b:
            mid = (a + b) // 2
            if sum(below(mid + 1)) - base > start:
                b = mid
            else:
                a = mid + 1
        heap = [(self._ts(t, i), t.local, i, w) for w, ((t, _, hi), i) in enumerate(zip(wins, below(a), strict=True))
                if i < hi]
        heapq.heapify(heap)
        out: list[tuple[Topic, int, int]] = []
        while len(out) < n:
            ts, _, i, w = heapq.heappop(heap)
            t, _, hi = wins[w]
            out.append((t, i, ts))
            if i + 1 < hi:
                heapq.heappush(heap, (self._ts(t, i + 1), t.local, i + 1, w))
        if desc:
            out.reverse()
        return total, out

    def _page_with_extras(self, topics: list[Topic], from_ms: int, to_ms: int, offset: int, limit: int, desc: bool
                          ) -> tuple[int, list[tuple[Topic, int, int]]]:
        """`_page` with the extra values filed among the regular ones: every row of the window, then the slice."""
        hi_ms, now_ms = min(to_ms, self._visible_ms()), int(self.clock() * 1000)
        rows = [(self._ts(t, j), t.local, 0, j, t) for t in topics
                for j in range(self._count_le(t, from_ms - 1), self._count_le(t, hi_ms))]
        wanted = {t.gk for t in topics}
        rows += [(e.filed_ms, e.topic.local, 1, e.j, e.topic) for e in self.extras
                 if e.topic.gk in wanted and from_ms <= e.filed_ms <= to_ms and e.visible_ms <= now_ms]
        rows.sort(key=lambda r: r[:4], reverse=desc)
        stamps = {e.j: e.ts_ms for e in self.extras}
        return len(rows), [(t, j, stamps[j] if j < 0 else ts) for ts, _, _, j, t in rows[offset:offset + limit]]

    # -- auth -------------------------------------------------------------------
    def _cutoff(self) -> int | None:
        """Serials below this are expired; set lazily when the expired fault is first seen on."""
        if not self.faults.expired:
            self._flip = None
        elif self._flip is None:
            self._flip = self._serial
        return self._flip

    def _auth(self, request: web.Request, scope: str = "api") -> Token:
        """X-API-Key, Bearer, or Basic with the key as password [S][D1][C1]; anything else 401."""
        raw = request.headers.get("X-API-Key", "").strip()
        if not raw:
            scheme, _, rest = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() == "bearer":
                raw = rest.strip()
            elif scheme.lower() == "basic":
                raw = (_basic(rest) or ("", ""))[1]
        token = self._tokens.get(raw) if raw else None
        cutoff = self._cutoff()
        if (token is None or token.scope != scope or (cutoff is not None and token.serial < cutoff)
                or (token.expires and token.expires <= self.clock())):
            raise ApiError(401, "Unauthorized")
        return token

    def _issue(self, user: str, scope: str) -> str:
        self._cutoff()  # a login after the expired fault flipped on yields a working token
        raw = hashlib.md5(f"iotopen:{self.seed}:{self._serial}".encode()).hexdigest()
        self._tokens[raw] = Token(user, self._serial, int(self.clock()) + YEAR, scope)
        self._serial += 1
        return raw

    async def _h_login(self, request: web.Request) -> web.Response:
        scheme, _, rest = request.headers.get("Authorization", "").partition(" ")
        creds = _basic(rest) if scheme.lower() == "basic" else None  # only HTTP Basic, no JSON body [D2]
        if creds is None or creds[0] not in self._users or self._users[creds[0]][0] != creds[1]:
            raise ApiError(401, "Unauthorized")
        if self._users[creds[0]][1]:
            return _json({"token": self._issue(creds[0], "sms"), "nextstep": "smslogin"})
        return _json({"token": self._issue(creds[0], "api")})

    async def _h_challenge(self, request: web.Request) -> web.Response:
        token = self._auth(request, scope="sms")
        try:
            challenge = (await request.json()).get("challenge")
        except (ValueError, AttributeError):
            raise ApiError(400, "invalid body") from None
        if challenge != self.sms_code:
            raise ApiError(401, "Unauthorized")
        self._tokens = {k: v for k, v in self._tokens.items() if v is not token}  # one-shot
        return _json({"token": self._issue(token.user, "api")})

    async def _h_logout(self, request: web.Request) -> web.Response:
        token = self._auth(request)
        if token.serial:  # the static web-UI key survives; login tokens are revoked
            self._tokens = {k: v for k, v in self._tokens.items() if v is not token}
        return web.Response(status=200)

    # -- inventory routes -------------------------------------------------------
    def _info(self, inst: dict[str, Any]) -> dict[str, Any]:
        keys = ("id", "name", "client_id", "organization_id", "capabilities", "assigned")
        return {k: inst[k] for k in keys}

    async def _h_installationinfo(self, request: web.Request) -> web.Response:
        self._auth(request)
        assigned = _bool(request.query.get("assigned"), True, "assigned")  # default true [S]
        try:
            orgs = {int(float(x)) for x in request.query.getall("organization_id", [])}
        except ValueError:
            raise ApiError(400, "invalid value for 'organization_id'") from None
        out = [self._info(i) for i in self.insts
               if (i["assigned"] or not assigned) and (not orgs or i["organization_id"] in orgs)]
        return _json(out)

    async def _h_installationinfo_one(self, request: web.Request) -> web.Response:
        self._auth(request)
        cid = int(request.match_info["client_id"])
        for inst in self.insts:
            if inst["client_id"] == cid:
                return _json(self._info(inst))
        raise ApiError(403, "Forbidden")

    async def _h_installation(self, request: web.Request) -> web.Response:
        self._auth(request)
        out = [{"id": i["id"], "name": i["name"], "client_id": i["client_id"], "created": i["created"],
                "organization_id": i["organization_id"], "notes": i["notes"],
                "users": [1] if i["assigned"] else [],  # user 1 owns the keys; every sim user sees the same
                "meta": {"address": f"Storgatan {i['id']}", "customer_ref": f"C-{i['client_id']}"}}
               for i in self.insts]
        return _json(_meta_filter(out, request.query))

    async def _h_organization(self, request: web.Request) -> web.Response:
        self._auth(request)
        if _bool(request.query.get("minimal"), False, "minimal"):
            return _json(ORGS)
        return _json([{**o, "email": "", "phone": "", "force_sms_login": False, "notes": "", "meta": {},
                       "protected_meta": {}, "password_valid_days": 0, "address": {},
                       "children": [{"id": c["id"], "name": c["name"]} for c in ORGS if c["parent"] == o["id"]]}
                      for o in ORGS])

    def _modelx_list(self, store: Any) -> Any:
        async def handler(request: web.Request) -> web.Response:
            self._auth(request)
            return _json(_meta_filter(store(self._inst(request)), request.query))
        return handler

    def _modelx_one(self, store: Any) -> Any:
        async def handler(request: web.Request) -> web.Response:
            self._auth(request)
            items = store(self._inst(request))
            found = [x for x in items if str(x["id"]) == request.match_info["item_id"]]
            if not found:
                raise ApiError(404, "Not found")
            return _json(found[0])
        return handler

    # -- data routes -------------------------------------------------------------
    async def _topics_body(self, request: web.Request) -> set[str]:
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "invalid body") from None
        if not isinstance(body, list) or not all(isinstance(x, str) for x in body):
            raise ApiError(400, "body must be an array of topics")
        return set(body)

    async def _h_status(self, request: web.Request) -> web.Response:
        self._auth(request)
        i = self._inst(request)
        if request.method == "POST":
            wanted = await self._topics_body(request)
        else:  # repeated only; a comma is part of a topic here (only v3 log documents comma lists)
            wanted = {x for x in request.query.getall("topics", []) if x}
        visible, out = self._visible_ms(), []
        for t in self.by_inst[i]:
            n = self._count_le(t, visible)
            if n and (not wanted or t.topic in wanted):
                out.append(self._record(t, n - 1, self._ts(t, n - 1), with_empty_msg=False))
        return _json(out)

    async def _window(self, request: web.Request, comma_lists: bool) -> tuple[int, list[Topic], int, int]:
        i = self._inst(request)
        now = self.clock()
        q = request.query  # from/to are numbers: integer seconds per [S], fractional from the TS client [C2]
        from_ms = math.ceil(round(_param(q, "from", now - DAY) * 1000, 3))
        to_ms = math.floor(round(_param(q, "to", now) * 1000, 3))
        if request.method == "POST":
            wanted = await self._topics_body(request)
        else:
            raw = q.getall("topics", [])
            wanted = {p for x in raw for p in (x.split(",") if comma_lists else [x]) if p}
        return i, [t for t in self.by_inst[i] if not wanted or t.topic in wanted], from_ms, to_ms

    async def _h_log_v3(self, request: web.Request) -> web.Response:
        self._auth(request)
        q = request.query
        limit = _param(q, "limit", DEFAULT_LIMIT, int, 1)
        offset = _param(q, "offset", 0, int, 0)
        order = q.get("order") or "desc"
        if order not in ("asc", "desc"):
            raise ApiError(400, "invalid value for 'order'")
        _, topics, from_ms, to_ms = await self._window(request, comma_lists=True)
        total, page = self._page(topics, from_ms, to_ms, offset, limit, order == "desc")
        data = [self._record(t, j, ts, with_empty_msg=True) for t, j, ts in page]
        last = _ts_json(min(ts for _, _, ts in page)) if page else 0
        if self.envelope == "data_object":  # what a buggy gateway might send: the rows keyed by position
            return _json({"count": len(data), "last": last, "total": total, "data": dict(enumerate(data))})
        if self.envelope == "total_string":
            return _json({"count": len(data), "last": last, "total": str(total), "data": data})
        return _json({"count": len(data), "last": last, "total": total, "data": data})

    async def _h_log_v2(self, request: web.Request) -> web.Response:
        """Deprecated: newest `limit` rows are kept BEFORE dropping rows without a FunctionX [S]."""
        self._auth(request)
        limit = min(_param(request.query, "limit", DEFAULT_LIMIT, int, 1), DEFAULT_LIMIT)
        _, topics, from_ms, to_ms = await self._window(request, comma_lists=False)
        _, page = self._page(topics, from_ms, to_ms, 0, limit, desc=True)
        out = []
        for t, j, ts in page:
            fn = self._function(t)
            if fn is None:
                continue
            value, msg = self._value(t, j, ts)
            out.append({"id": t.gk * 10_000_000 + j + 1, "function_id": fn["id"],
                        "function_type": fn["type"], "log_item_type": "functionx",
                        "name": fn["meta"]["name"], "unit": "", "icon": "", "alarm_type": "",
                        "value": value, "timestamp": _ts_json(ts), "value_id": "", "message": msg})
        return _json(out)

    # -- VendorSim hooks ---------------------------------------------------------
    def add_routes(self, app: web.Application) -> None:
        app.middlewares.append(self._vendor_middleware)
        r = app.router
        r.add_post("/api/v2/auth", self._h_login)
        r.add_put("/api/v2/auth", self._h_challenge)
        r.add_delete("/api/v2/auth", self._h_logout)
        r.add_get("/api/v2/installationinfo", self._h_installationinfo)
        r.add_get(r"/api/v2/installationinfo{slashes:/+}{client_id:\d+}", self._h_installationinfo_one)
        r.add_get("/api/v2/installation", self._h_installation)
        r.add_get("/api/v2/organization", self._h_organization)
        r.add_get("/api/v2/devicex/{installation_id}", self._modelx_list(self.devices.__getitem__))
        r.add_get("/api/v2/devicex/{installation_id}/{item_id}", self._modelx_one(self.devices.__getitem__))
        r.add_get("/api/v2/functionx/{installation_id}", self._modelx_list(self._functions_of))
        r.add_get("/api/v2/functionx/{installation_id}/{item_id}", self._modelx_one(self._functions_of))
        for path, handler in (("/api/v2/status/{installation_id}", self._h_status),
                              ("/api/v2/log/{installation_id}", self._h_log_v2),
                              ("/api/v3beta/log/{installation_id}", self._h_log_v3)):
            r.add_get(path, handler)
            r.add_post(path, handler)

    @web.middleware
    async def _vendor_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Renders ApiError and aiohttp's 404/405 as {"message"}; 414 on over-long GETs."""
        if request.path.startswith("/_sim/"):
            return await handler(request)
        try:
            if request.method == "GET" and len(request.raw_path) > self.max_url:
                raise ApiError(414, "Request-URI Too Long")
            return await handler(request)
        except ApiError as err:
            return self.error(err.status, err.message)
        except web.HTTPNotFound:
            return self.error(404, "Not found")
        except web.HTTPMethodNotAllowed:
            return self.error(405, "Method Not Allowed")

    def error(self, status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
        return _json({"message": message}, status=status, headers=headers)

    def ground_truth(self) -> list[TruthRow]:
        # (kind, tenant, device, metric, ts) is unique by construction: a topic's timestamps strictly increase
        # and every topic maps to one device, so no dedup pass is needed (the tests check it).
        # A poisoned point a sync must dead-letter is left out (and so is its topic's status when it is the latest);
        # a NaN reading is stored with value None.
        visible, rows = self._visible_ms(), []
        for t in self.topics:
            tenant, device, _ = self._keys(t)
            row = None
            for j in range(self._count_le(t, visible)):
                ts = self._ts(t, j)
                value, msg = self._value(t, j, ts)
                variant = self._poison.get((t.gk, j)) if self._poison else None
                row = TruthRow("iotopen", "log", tenant, device, t.topic, ts, float(value), msg or None)
                if variant is not None and POISONS[variant][2] is not None:
                    row = None
                    continue
                if variant is not None:
                    row = TruthRow("iotopen", "log", tenant, device, t.topic, ts, None, msg or None)
                rows.append(row)
            if row is not None:
                rows.append(TruthRow("iotopen", "status", tenant, device, t.topic, row.ts_ms, row.value, row.text))
        now_ms = int(self.clock() * 1000)
        for e in self.extras:
            if e.visible_ms <= now_ms:
                value, msg = self._value(e.topic, e.j, e.ts_ms)
                rows.append(TruthRow("iotopen", "log", *self._keys(e.topic), e.ts_ms, float(value), msg or None))
        return rows

    def source_config(self) -> dict[str, Any]:
        return {"vendor": "iotopen", "base_url": self.url, "api_key": self.api_key}


def _basic(encoded: str) -> tuple[str, str] | None:
    try:
        user, sep, password = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep else None
