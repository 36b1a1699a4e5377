"""EmbedThis Ioto device cloud: POST-only `/tok` API; Store values, device logs, rolling metrics and alerts.

Brief: shared/vendors/ioto.md. Assumptions live in the constants below.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import orjson
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, ValidationInfo, field_validator

from syncd.errors import MalformedResponse, RateLimited, RequestRejected, VendorAuthError, VendorUnavailable
from syncd.events import TS_MAX_MS, TS_RANGE, Event, describe_ms
from syncd.http import retry_after
from syncd.settings import IotoSource as IotoConfig
from syncd.sources.base import (
    DeadLetter,
    FieldError,
    LateTally,
    Page,
    Source,
    Stream,
    first_in_past,
    late_settings,
    mapped,
    reconcile_due,
    spoolable_text,
    valid,
)
from syncd.sources.times import parse_iso_ms

PAGE_LIMIT = 1000  # always sent: the Builder docs default `limit` to 1 [D-gen]; no maximum documented [A]
METRIC_NAMESPACE = "Embedthis/Device"  # the only namespace metric/fetch accepts [D-met]
METRIC_STATISTIC = "avg"  # [A] one statistic per series keeps the table small; avg is the documented default
METRIC_PERIOD = 300  # [A] the finest live span (5 min): its points are the closest thing to history
MS_THRESHOLD = 1e11  # [A] point timestamps are "seconds" or "milli-seconds" depending on the document: above is ms
DEVICE_DIMENSION = "Device"  # [A] the dimension that names a device's own series
# [A] list order is undocumented [D-gen], and logs have no time filter: a pass reads a device's whole Log list, and
# a log is new when its time (ULID, else `updated`) is after the last complete pass started (see _fetch_log). When a
# pass from the top found the list oldest first, the next pass starts at its last page (where new logs land) and
# checks that the order still holds; it starts again from the top when it does not.
# Alerts do not rely on order (see _fetch_alerts) but on `timestamp` staying put when `resolved` flips [A].
CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
LOG_SETTLE_MS = 60_000  # [A] logs dated in the last minute before a pass may still be arriving: remembered by id
AHEAD_KEEP = 1000  # ids dated after a pass that are remembered; more (a device far ahead) are sent again, ids dedup
# Late logs [A: none documented]: every RECONCILE_EVERY_S a pass from the top also stores the logs dated up to
# LATE_WINDOW_S before the last pass; a log that shows up at most LATE_WINDOW_S - RECONCILE_EVERY_S (30 min) after its
# time always arrives. `late_window` and `reconcile_every` in the config override them.
LATE_WINDOW_S = 3600.0
RECONCILE_EVERY_S = 1800.0


def to_ms(value: Any) -> int:
    """An Ioto `date`: ISO 8601 [A], or an epoch number in seconds or milliseconds (never before 1970).

    Raises ValueError naming the value for anything else: a bool, NaN, Infinity, a negative or far-off number.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a date: {value!r}")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"not an epoch date: {value!r}"[:200])
        ms = int(value) if value > MS_THRESHOLD else round(value * 1000)
        if ms > TS_MAX_MS:
            raise ValueError(f"epoch date {value!r} is outside {TS_RANGE}"[:200])
        return ms
    if isinstance(value, str) and value:
        return parse_iso_ms(value)  # raises ValueError naming the text
    raise ValueError(f"not a date: {value!r}"[:200])


def ulid_ms(ulid: str) -> int | None:
    """The millisecond time in the first 10 characters of a ULID, None when it is not one."""
    if len(ulid) != 26:
        return None
    try:
        return sum(CROCKFORD.index(c) << (5 * (9 - i)) for i, c in enumerate(ulid[:10].upper()))
    except ValueError:
        return None


Ms = Annotated[int, BeforeValidator(to_ms)]


class _Item(BaseModel):
    model_config = ConfigDict(extra="ignore")


class DeviceRecord(_Item):
    """Generic `Device` item [C] (also the registry item of `device/find` [D-dev])."""

    id: str
    accountId: str
    connection: str | None = None
    updated: Ms | None = None
    name: str | None = None
    model: str | None = None
    product: str | None = None


class StoreItem(_Item):
    """Generic `Store` item: one key's latest value [D-sto][C]."""

    accountId: str
    deviceId: str
    cloudId: str | None = None
    key: str
    type: str | None = None
    value: float | str | None = None
    updated: Ms

    @field_validator("value", mode="before")
    @classmethod
    def _typed(cls, v: Any, info: ValidationInfo) -> Any:
        kind = info.data.get("type")
        if isinstance(v, bool) or not isinstance(v, int | float | str | None):
            raise ValueError(f"neither number nor string: {v!r}")
        if kind == "number" and isinstance(v, str):
            return float(v)  # a numeric string still counts; other text fails here, naming `value`
        if kind == "string" and v is not None:
            return str(v)
        return v


class LogItem(_Item):
    """Generic `Log` item; the ULID `id` carries the time, `updated` is a fallback [C]."""

    id: str
    accountId: str
    deviceId: str
    message: str | None = None
    context: dict[str, Any] | None = None
    updated: Ms | None = None

    def ts_ms(self) -> int:
        ts = ulid_ms(self.id)
        if ts is not None:
            if ts > TS_MAX_MS:
                raise FieldError("id", f"ULID time {describe_ms(ts)} is outside {TS_RANGE}")
            return ts
        if self.updated is None:
            raise FieldError("id", "not a ULID and no updated date")
        return self.updated


class MetricSeries(_Item):
    """A `metric/fetch` item [D-met]; points are validated one by one."""

    metric: str
    namespace: str = METRIC_NAMESPACE
    dimensions: dict[str, Any] = {}
    period: int
    samples: int | None = None
    points: list[Any]


class MetricPoint(_Item):
    value: float | None
    timestamp: Ms  # seconds or ms (MS_THRESHOLD)
    count: int | None = None


class AlertItem(_Item):
    """An `alert/find` item [D-alr]."""

    id: str
    accountId: str
    cloudId: str | None = None
    name: str | None = None
    seq: str | None = None
    message: str | None = None
    subject: str | None = None
    severity: str | None = None
    count: int | None = None
    context: dict[str, Any] | None = None
    resolved: bool = False
    timestamp: Ms

    def fingerprint(self) -> int | None:
        """None once resolved; otherwise what a change of an open alert would touch."""
        if self.resolved:
            return None
        return zlib.crc32(orjson.dumps([self.count, self.severity, self.message, self.subject]))


def map_error(status: int, headers: Mapping[str, str], body: bytes, url: str) -> Exception | None:
    """Ioto errors are text/plain (403 = auth); the AWS gateway in front answers JSON `{"message"}` [S][A]."""
    if status < 400:
        return None
    text = body[:300].decode("utf-8", "replace").strip()
    gateway = headers.get("Content-Type", "").startswith("application/json")
    if gateway:  # read the message only; the status decides what it means
        try:
            text = str(orjson.loads(body).get("message", text))
        except (orjson.JSONDecodeError, AttributeError):
            pass
    if status == 429:
        return RateLimited(f"rate limited by {url}: {text}", retry_after=retry_after(headers), status=status, body=text,
                           url=url)
    if status == 403 and gateway:  # "Missing Authentication Token": unknown path or method, i.e. a wrong base_url
        return RequestRejected(f"gateway refused {url} ({text}): check base_url", status=status, body=text, url=url)
    if status in (401, 403):
        return VendorAuthError(f"token refused ({status}) by {url}: {text}", status=status, body=text, url=url)
    if status >= 500 or status == 408:
        return VendorUnavailable(f"vendor error {status} from {url}: {text}", status=status, body=text, url=url)
    return RequestRejected(f"request rejected ({status}) by {url}: {text}", status=status, body=text, url=url)


def _point_of(metric: str) -> Callable[[Any], dict[str, Any]]:
    """How a bad metric point is kept as a dead letter: with the metric it belongs to."""
    return lambda point: {"metric": metric, "point": point}


class IotoSource(Source):
    vendor = "ioto"
    default_streams = ("status", "log", "metric", "alert")  # `connection` (Device online state) is opt-in
    default_rate = 5.0  # none documented; AWS gateway in front [A]
    default_burst = 10
    map_error = staticmethod(map_error)

    config: IotoConfig

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.metric_names: list[str] = []

    # -- HTTP -----------------------------------------------------------------------------------------

    async def _post(self, path: str, body: dict[str, Any], params: dict[str, str] | None = None) -> Any:
        resp = await self.client.request(
            "POST", f"{self.config.base_url}/tok{path}", params=params, json=body, expect_json=True,
            headers={"Authorization": self.config.token.get_secret_value(), "Accept": "application/json"},
        )
        return resp.data

    async def _page(self, path: str, body: dict[str, Any], nxt: str | None) -> tuple[list[Any], str | None]:
        """One page of a paged list; returns its items and the opaque `next` (None on the last page)."""
        params = {"limit": str(self.config.page_size or PAGE_LIMIT), "paged": "true"}
        if nxt is not None:
            params["next"] = nxt
        out = await self._post(path, body, params)
        items = out.get("data") if isinstance(out, dict) else None
        if not isinstance(items, list):
            raise MalformedResponse(f"{path}: paged response without a data array", body=str(out)[:200])
        following = out.get("next")
        if following is not None and not isinstance(following, str):
            following = orjson.dumps(following).decode()  # typed "object" in one document: pass it back as JSON [A]
        return items, following

    async def _crawl(self, path: str, body: dict[str, Any]) -> list[Any]:
        items, nxt = await self._page(path, body, None)
        while nxt is not None:
            more, nxt = await self._page(path, body, nxt)
            items.extend(more)
        return items

    # -- inventory ------------------------------------------------------------------------------------

    async def discover(self) -> list[Stream]:
        # device/find needs an accountId with a CloudAPI token [D-dev]; the Device records name the accounts.
        records = _valid(DeviceRecord, await self._crawl("/generic/find", {"_type": "Device"}))
        devices: dict[str, str] = {}
        for acct in sorted({r.accountId for r in records}):
            for reg in _valid(DeviceRecord, await self._crawl("/device/find", {"accountId": acct})):
                devices[reg.id] = reg.accountId
        for r in records:
            devices.setdefault(r.id, r.accountId)
        kinds = self.enabled_kinds
        if "metric" in kinds:
            self.metric_names = await self._metric_names()
        streams = [Stream(f"{kind}/{dev}", kind, acct, {"device": dev})
                   for dev, acct in sorted(devices.items()) for kind in ("status", "log", "metric") if kind in kinds]
        if "alert" in kinds:
            streams.append(Stream("alert", "alert", ""))
        if "connection" in kinds:
            streams += [Stream(f"connection/{acct}", "status", acct) for acct in sorted(set(devices.values()))]
        return streams

    async def _metric_names(self) -> list[str]:
        """getMetricList needs the cloudId, which only Store and Alert items carry [D-met][C]."""
        cloud = None
        for path, body in (("/generic/find", {"_type": "Store"}), ("/alert/find", {})):
            items, _ = await self._page(path, body, None)
            cloud = next((i["cloudId"] for i in items if isinstance(i, dict) and isinstance(i.get("cloudId"), str)), None)
            if cloud:
                break
        if cloud is None:
            return []
        listing = await self._post("/metric/getMetricList", {"cloudId": cloud, "namespace": METRIC_NAMESPACE})
        data = listing.get("data") if isinstance(listing, dict) else None
        names = data.get("metrics") if isinstance(data, dict) else None
        return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []

    # -- data -----------------------------------------------------------------------------------------

    async def fetch(self, stream: Stream, cursor: Any) -> Page:
        feed = stream.name.split("/", 1)[0]
        if feed == "status":
            body = {"_type": "Store", "deviceId": stream.params["device"]}
            return await self._fetch_latest(stream, cursor, body, StoreItem, self._store_event)
        if feed == "connection":
            body = {"_type": "Device", "accountId": stream.tenant}
            return await self._fetch_latest(stream, cursor, body, DeviceRecord, self._connection_event)
        if feed == "log":
            return await self._fetch_log(stream, cursor)
        if feed == "metric":
            return await self._fetch_metric(stream, cursor or {})
        return await self._fetch_alerts(cursor)

    async def _fetch_latest(self, stream: Stream, cursor: dict[str, Any] | None, body: dict[str, Any],
                            model: type[StoreItem] | type[DeviceRecord], to_event: Callable[..., Event | None]) -> Page:
        """Latest-state lists: emit an item only when its `updated` moved (the cursor keeps each one's)."""
        cursor = cursor or {"seen": {}, "next": None}
        items, nxt = await self._page("/generic/find", body, cursor["next"])
        seen, events = dict(cursor["seen"]), []
        dead: list[DeadLetter] = []

        def read(raw: Any) -> tuple[StoreItem | DeviceRecord, Event | None]:
            item = model.model_validate(raw)
            return item, to_event(stream, item)

        for item, event in mapped(items, dead, read):
            key = spoolable_text(item.key if isinstance(item, StoreItem) else item.id)  # spooled as UTF-8 JSON
            if event is None or seen.get(key) == event.ts_ms:
                continue
            seen[key] = event.ts_ms
            events.append(event)
        return Page(events, {"seen": seen, "next": nxt}, done=nxt is None, dead=dead, lag_s=0.0 if nxt is None else None)

    def _store_event(self, stream: Stream, item: StoreItem) -> Event:
        number = item.value if isinstance(item.value, float) else None
        text = item.value if isinstance(item.value, str) else None
        attrs = {"type": item.type or ("number" if number is not None else "string")}
        if item.cloudId:
            attrs["cloudId"] = item.cloudId
        return self.event("status", item.accountId, item.deviceId, item.key, item.updated, number, text, attrs)

    def _connection_event(self, stream: Stream, item: DeviceRecord) -> Event | None:
        if item.connection is None or item.updated is None:
            return None  # a device record without state says nothing to record
        attrs = {k: v for k, v in (("name", item.name), ("model", item.model), ("product", item.product)) if v}
        return self.event("status", item.accountId, item.id, "connection", item.updated, None, item.connection, attrs)

    async def _fetch_log(self, stream: Stream, cursor: dict[str, Any] | None) -> Page:
        """Logs have no time filter [D-gen] and no documented order: passes over a device's Log list.

        `wm` is the newest log date the last complete pass saw, less LOG_SETTLE_MS: a log dated after it is new,
        and is remembered by id (`ahead`) once stored, until the watermark passes it. Only logs dated before the
        pass began move the watermark: a device with a wrong clock (a log dated next year) is stored, and hides no
        log after it. A pass starts at the last page of the one before when that one found the list oldest first,
        else at the top; a reconcile pass (every `reconcile_every`) starts at the top and also stores the logs dated
        in the `late_window` before the watermark (ids make the overlap free), counting the ones no pass had stored.
        """
        now_s = self.clock()
        now_ms = int(now_s * 1000)
        window_ms, every = late_settings(self.config, LATE_WINDOW_S, RECONCILE_EVERY_S)
        c = self._log_cursor(stream, cursor, now_s, window_ms)
        tally = LateTally(c["tally"], window_ms)
        p = c["pass"]
        if p is None:  # a new pass
            reread = reconcile_due(c["reconciled"], now_s, every)
            since = max(c["from"], tally.align(c["wm"] - window_ms)) if reread else None
            top = reread or not c["sorted"] or c["resume"] is None
            p = {"next": None if top else c["resume"], "bound": now_ms, "top": top, "asc": True, "prev": "",
                 "newest": None, "since": since, "ahead": {}}
            if reread:
                c = {**c, "reconciled": now_s}
        sent, bound, since, frm, wm = p["next"], p["bound"], p["since"], c["from"], c["wm"]
        items, nxt = await self._page("/generic/find", {"_type": "Log", "deviceId": stream.params["device"]}, sent)
        ahead, fresh = c["ahead"], dict(p["ahead"])
        asc, prev, newest = p["asc"], p["prev"], p["newest"]
        events: list[Event] = []
        dead: list[DeadLetter] = []
        for raw, event in mapped(items, dead, lambda r: (r, self._log_event(r))):
            rid = raw["id"]
            at, key = event.ts_ms, spoolable_text(rid)
            if at <= bound:  # logs dated after the pass began neither move the watermark nor judge the order
                newest = at if newest is None else max(newest, at)
                if ulid_ms(rid) is not None:
                    asc, prev = asc and rid >= prev, rid
            if at < frm:
                continue
            if key in ahead or key in fresh:
                continue  # dated after the watermark, and stored already
            if at > wm:  # new since the last pass: remembered by id until the watermark passes it
                if len(fresh) < AHEAD_KEEP:
                    fresh[key] = at
            elif since is not None and at >= since:  # the late window, read again
                events.append(event)
                tally.recount(at)
                continue
            else:
                continue  # stored by an earlier pass
            events.append(event)
            tally.add(at)
        covered = max(wm, newest if newest is not None else wm)
        fresh = {k: at for k, at in fresh.items() if at > covered - LOG_SETTLE_MS}  # what the next watermark keeps
        if nxt is not None:
            p = {**p, "next": nxt, "asc": asc, "prev": prev, "newest": newest, "ahead": fresh}
            return Page(events, {**c, "pass": p, "tally": tally.state(covered)}, done=False, dead=dead)
        if not p["top"] and not asc:  # resumed at the last page, but the list is not oldest first: from the top
            p = {**p, "next": None, "top": True, "asc": True, "prev": "", "newest": newest, "ahead": fresh}
            return Page(events, {**c, "sorted": False, "pass": p, "tally": tally.state(covered)}, done=False, dead=dead)
        late = tally.settle(since, wm) if since is not None else 0
        wm = max(wm, covered - LOG_SETTLE_MS)
        kept = sorted(((at, k) for k, at in {**ahead, **fresh}.items() if at > wm))[:AHEAD_KEEP]
        c = {**c, "wm": wm, "ahead": {k: at for at, k in kept}, "sorted": asc, "resume": sent, "pass": None,
             "tally": tally.state(covered)}
        return Page(events, c, done=True, dead=dead, lag_s=0.0, late=late)

    def _log_cursor(self, stream: Stream, cursor: dict[str, Any] | None, now_s: float, window_ms: int
                    ) -> dict[str, Any]:
        """The log cursor; a new one starts at `first_ms`, one written before passes re-read anything is carried over."""
        now_ms = int(now_s * 1000)
        if cursor is None:
            frm = first_in_past(self, now_ms, stream.name, window_ms)
            return {"from": frm, "wm": frm - 1, "ahead": {}, "sorted": False, "resume": None, "reconciled": now_s,
                    "pass": None, "tally": None}
        if "wm" not in cursor:  # {next, last, from}: `last` is the newest id read, perhaps dated ahead
            last = ulid_ms(cursor.get("last") or "")
            wm = min(last if last is not None else cursor["from"] - 1, now_ms - LOG_SETTLE_MS)
            return {"from": cursor["from"], "wm": wm, "ahead": {}, "sorted": False, "resume": None,
                    "reconciled": None, "pass": None, "tally": None}  # a pass from the top that re-reads at once
        return cursor

    def _log_event(self, raw: Any) -> Event:
        item = LogItem.model_validate(raw)
        attrs = {"id": item.id}
        if item.context is not None:
            attrs["context"] = orjson.dumps(item.context).decode()
        return self.event("log", item.accountId, item.deviceId, "log", item.ts_ms(), None, item.message, attrs)

    async def _fetch_metric(self, stream: Stream, cursor: dict[str, Any]) -> Page:
        """Rolling aggregates: the newest point changes until its span closes, so re-emit a point whose value moved."""
        dev = stream.params["device"]
        if not self.metric_names:
            return Page([], cursor, done=True, lag_s=0.0)
        requests = [{"namespace": METRIC_NAMESPACE, "metric": m, "dimensions": {DEVICE_DIMENSION: dev},
                     "statistic": METRIC_STATISTIC, "period": METRIC_PERIOD} for m in self.metric_names]
        out = await self._post("/metric/fetch", {"deviceId": dev, "items": requests})
        data = out.get("data") if isinstance(out, dict) else None
        if not isinstance(data, list):
            raise MalformedResponse("/metric/fetch: response without a data array", body=str(out)[:200])
        seen: dict[str, dict[str, float | None]] = {}
        events: list[Event] = []
        dead: list[DeadLetter] = []
        for series, attrs in mapped(data, dead, _series):
            name = f"{series.metric}.{METRIC_STATISTIC}.{series.period}"
            before, now = cursor.get(name, {}), seen.setdefault(name, {})
            for point in valid(MetricPoint, series.points, dead, _point_of(series.metric)):
                now[str(point.timestamp)] = point.value
                if str(point.timestamp) in before and before[str(point.timestamp)] == point.value:
                    continue
                extra = {**attrs, "count": str(point.count)} if point.count is not None else attrs
                events.append(self.event("metric", stream.tenant, dev, name, point.timestamp, point.value, None, extra))
        return Page(events, seen, done=True, dead=dead, lag_s=0.0)

    async def _fetch_alerts(self, cursor: dict[str, Any] | None) -> Page:
        """The whole list every pass (no filters [D-alr]): an alert newer than the last pass's newest is new, an
        older one is emitted again only when its state changed.

        `open` holds a fingerprint per unresolved alert; an older alert missing from it is expected resolved. A change
        re-emits under the same key (`timestamp` stays [A]), so ReplacingMergeTree keeps the newest state. The
        watermark moves only when a pass ends, so the list order does not matter.
        """
        if cursor is None:
            frm = self.first_ms(self.now_ms(), "alert")
            cursor = {"next": None, "from": frm, "wm": frm - 1, "edge": [], "top": frm - 1, "top_edge": [], "open": {}}
        frm, wm, edge, opened = cursor["from"], cursor["wm"], set(cursor["edge"]), dict(cursor["open"])
        top, top_edge = cursor["top"], set(cursor["top_edge"])
        items, nxt = await self._page("/alert/find", {}, cursor["next"])
        events: list[Event] = []
        dead: list[DeadLetter] = []
        for alert, state, event in mapped(items, dead, self._alert):
            ts, key = alert.timestamp, spoolable_text(alert.id)  # ids go into the cursor, spooled as UTF-8 JSON
            if ts < frm:
                continue
            if ts > top:
                top, top_edge = ts, {key}
            elif ts == top:
                top_edge.add(key)
            fresh = ts > wm or (ts == wm and key not in edge)
            if not fresh and opened.get(key) == state:
                continue
            if state is None:
                opened.pop(key, None)
            else:
                opened[key] = state
            events.append(event)
        if nxt is None:  # pass complete: the next run starts from the top with this pass's newest as the watermark
            wm, edge = top, top_edge
        cursor = {"next": nxt, "from": frm, "wm": wm, "edge": sorted(edge), "top": top, "top_edge": sorted(top_edge),
                  "open": opened}
        return Page(events, cursor, done=nxt is None, dead=dead, lag_s=0.0 if nxt is None else None)

    def _alert(self, raw: Any) -> tuple[AlertItem, int | None, Event]:
        """One alert as (alert, its state fingerprint, event); raises on anything unreadable."""
        alert = AlertItem.model_validate(raw)
        return alert, alert.fingerprint(), self._alert_event(alert)

    def _alert_event(self, a: AlertItem) -> Event:
        device = (a.context or {}).get("deviceId")
        attrs = {"id": a.id, "resolved": "true" if a.resolved else "false"}
        for key, value in (("severity", a.severity), ("subject", a.subject), ("seq", a.seq), ("count", a.count),
                           ("cloudId", a.cloudId)):
            if value is not None:
                attrs[key] = str(value)
        return self.event("alert", a.accountId, device if isinstance(device, str) else "", a.name or a.seq or "",
                          a.timestamp, None, a.message, attrs)


def _series(raw: Any) -> tuple[MetricSeries, dict[str, str]]:
    """A metric series and the attrs its points share; raises on anything unreadable."""
    series = MetricSeries.model_validate(raw)
    attrs = {"namespace": series.namespace, "dimensions": orjson.dumps(series.dimensions).decode()}
    if series.samples is not None:
        attrs["samples"] = str(series.samples)
    return series, attrs


def _valid(model: type[DeviceRecord], raw: list[Any]) -> list[DeviceRecord]:
    """Inventory records that validate; a bad one only loses its streams until it is fixed."""
    out = []
    for r in raw:
        with contextlib.suppress(ValidationError):
            out.append(model.model_validate(r))
    return out
