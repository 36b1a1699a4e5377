"""EmbedThis Ioto device cloud: POST-only `/tok` API; Store values, device logs, rolling metrics and alerts.

Brief: shared/vendors/ioto.md. Assumptions live in the constants below.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import orjson
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationInfo, field_validator

from syncd.errors import MalformedResponse, RateLimited, RequestRejected, VendorAuthError, VendorUnavailable
from syncd.events import TS_MAX_MS, TS_RANGE, Event, describe_ms
from syncd.http import retry_after
from syncd.settings import IotoSource as IotoConfig
from syncd.sources.base import (
    DeadLetter,
    FieldError,
    LateTally,
    Page,
    PageBuilder,
    Source,
    Stream,
    first_in_past,
    late_settings,
    mapped,
    reconcile_due,
    spoolable_text,
    valid,
    valid_all,
)
from syncd.sources.paging import CursorPaginator, collect
from syncd.sources.times import iso_or_epoch_ms, ulid_ms
from syncd.sources.track import CHANGED, CLOSED, NEW, AlertTracker, ChangeTracker

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
LOG_SETTLE_MS = 60_000  # [A] logs dated in the last minute before a pass may still be arriving: remembered by id
AHEAD_KEEP = 1000  # ids dated after a pass that are remembered; more (a device far ahead) are sent again, ids dedup
# Late logs [A: none documented]: every RECONCILE_EVERY_S a pass from the top also stores the logs dated up to
# LATE_WINDOW_S before the last pass; a log that shows up at most LATE_WINDOW_S - RECONCILE_EVERY_S (30 min) after its
# time always arrives. `late_window` and `reconcile_every` in the config override them.
LATE_WINDOW_S = 3600.0
RECONCILE_EVERY_S = 1800.0


# an Ioto `date`: ISO 8601 [A], or an epoch number in seconds or ms (MS_THRESHOLD); epoch ms once read
Ms = Annotated[int, BeforeValidator(iso_or_epoch_ms(MS_THRESHOLD))]
Row = tuple[str, str, str, str, int, float | None, str | None, dict[str, str]]  # what PageBuilder.add takes


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
        """None once resolved; otherwise what a change of an open alert would touch (its AlertTracker mark)."""
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
        self.pending_dead: list[DeadLetter] = []  # inventory records that failed validation, out with the next page

    # -- HTTP -----------------------------------------------------------------------------------------

    async def _post(self, path: str, body: dict[str, Any], params: dict[str, str] | None = None) -> Any:
        resp = await self.client.request(
            "POST", f"{self.config.base_url}/tok{path}", params=params, json=body, expect_json=True,
            headers={"Authorization": self.config.token.get_secret_value(), "Accept": "application/json"},
        )
        return resp.data

    async def _page(self, path: str, body: dict[str, Any], nxt: str | None) -> tuple[list[Any], Any]:
        """One page of a paged list: its items and the answer's `next` as sent (a pager judges it)."""
        params = {"limit": str(self.config.page_size or PAGE_LIMIT), "paged": "true"}
        if nxt is not None:
            params["next"] = nxt
        out = await self._post(path, body, params)
        items = out.get("data") if isinstance(out, dict) else None
        if not isinstance(items, list):
            raise MalformedResponse(f"{path}: paged response without a data array", body=str(out)[:200])
        return items, out.get("next")

    async def _paged(self, path: str, body: dict[str, Any], pager: CursorPaginator) -> list[Any]:
        """The page `pager` stands at; the pager moves on."""
        items, following = await self._page(path, body, pager.cursor)
        pager.update_state(following, path)
        return items

    async def _all(self, path: str, body: dict[str, Any]) -> list[Any]:
        return await collect(_pager(None), functools.partial(self._paged, path, body))

    # -- inventory ------------------------------------------------------------------------------------

    async def discover(self) -> list[Stream]:
        # device/find needs an accountId with a CloudAPI token [D-dev]; the Device records name the accounts.
        # A record that does not validate is a dead letter and loses only its streams until it is fixed.
        records = valid_all(DeviceRecord, await self._all("/generic/find", {"_type": "Device"}), self.pending_dead)
        devices: dict[str, str] = {}
        for acct in sorted({r.accountId for r in records}):
            registry = await self._all("/device/find", {"accountId": acct})
            for reg in valid_all(DeviceRecord, registry, self.pending_dead):
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
            items, _ = await self._page(path, body, None)  # the first page names the cloud
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
            page = await self._fetch_latest(cursor, body, StoreItem, self._store_row)
        elif feed == "connection":
            body = {"_type": "Device", "accountId": stream.tenant}
            page = await self._fetch_latest(cursor, body, DeviceRecord, self._connection_row)
        elif feed == "log":
            page = await self._fetch_log(stream, cursor)
        elif feed == "metric":
            page = await self._fetch_metric(stream, cursor or {})
        else:
            page = await self._fetch_alerts(cursor)
        if self.pending_dead:
            page.dead[:0], self.pending_dead = self.pending_dead, []
        return page

    async def _fetch_latest(self, cursor: dict[str, Any] | None, body: dict[str, Any],
                            model: type[StoreItem] | type[DeviceRecord], to_row: Callable[[Any], Row | None]) -> Page:
        """Latest-state lists: emit an item only when its `updated` moved (the cursor keeps each one's)."""
        cursor = cursor or {"seen": {}, "next": None}
        pager = _pager(cursor["next"])
        items = await self._paged("/generic/find", body, pager)
        seen, b = ChangeTracker(cursor["seen"]), PageBuilder(self)
        dead: list[DeadLetter] = []

        def read(raw: Any) -> tuple[StoreItem | DeviceRecord, Row | None]:
            item = model.model_validate(raw)
            return item, to_row(item)

        for item, row in mapped(items, dead, read):
            if row is not None and seen.moved(item.key if isinstance(item, StoreItem) else item.id, row[4]):
                b.add(*row)
        done = not pager.has_next_page
        return b.page({"seen": seen.state(), "next": pager.cursor}, done, dead, 0.0 if done else None)

    def _store_row(self, item: StoreItem) -> Row:
        number = item.value if isinstance(item.value, float) else None
        text = item.value if isinstance(item.value, str) else None
        attrs = {"type": item.type or ("number" if number is not None else "string")}
        if item.cloudId:
            attrs["cloudId"] = item.cloudId
        return "status", item.accountId, item.deviceId, item.key, item.updated, number, text, attrs

    def _connection_row(self, item: DeviceRecord) -> Row | None:
        if item.connection is None or item.updated is None:
            return None  # a device record without state says nothing to record
        attrs = {k: v for k, v in (("name", item.name), ("model", item.model), ("product", item.product)) if v}
        return "status", item.accountId, item.id, "connection", item.updated, None, item.connection, attrs

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
        pager = _pager(p["next"])  # the pass's place in the list is the pager's cursor
        sent, bound, since, frm, wm = pager.cursor, p["bound"], p["since"], c["from"], c["wm"]
        items = await self._paged("/generic/find", {"_type": "Log", "deviceId": stream.params["device"]}, pager)
        ahead, fresh = c["ahead"], dict(p["ahead"])
        asc, prev, newest = p["asc"], p["prev"], p["newest"]
        b = PageBuilder(self)
        dead: list[DeadLetter] = []
        for raw, row in mapped(items, dead, lambda r: (r, self._log_row(r))):
            rid = raw["id"]
            at, key = row[4], spoolable_text(rid)
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
                b.add(*row)
                tally.recount(at)
                continue
            else:
                continue  # stored by an earlier pass
            b.add(*row)
            tally.add(at)
        covered = max(wm, newest if newest is not None else wm)
        fresh = {k: at for k, at in fresh.items() if at > covered - LOG_SETTLE_MS}  # what the next watermark keeps
        if pager.has_next_page:
            p = {**p, "next": pager.cursor, "asc": asc, "prev": prev, "newest": newest, "ahead": fresh}
            return b.page({**c, "pass": p, "tally": tally.state(covered)}, False, dead)
        if not p["top"] and not asc:  # resumed at the last page, but the list is not oldest first: from the top
            p = {**p, "next": None, "top": True, "asc": True, "prev": "", "newest": newest, "ahead": fresh}
            return b.page({**c, "sorted": False, "pass": p, "tally": tally.state(covered)}, False, dead)
        late = tally.settle(since, wm) if since is not None else 0
        wm = max(wm, covered - LOG_SETTLE_MS)
        kept = sorted(((at, k) for k, at in {**ahead, **fresh}.items() if at > wm))[:AHEAD_KEEP]
        c = {**c, "wm": wm, "ahead": {k: at for at, k in kept}, "sorted": asc, "resume": sent, "pass": None,
             "tally": tally.state(covered)}
        return b.page(c, True, dead, 0.0, late)

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

    def _log_row(self, raw: Any) -> Row:
        item = LogItem.model_validate(raw)
        attrs = {"id": item.id}
        if item.context is not None:
            attrs["context"] = orjson.dumps(item.context).decode()
        return "log", item.accountId, item.deviceId, "log", item.ts_ms(), None, item.message, attrs

    async def _fetch_metric(self, stream: Stream, cursor: dict[str, Any]) -> Page:
        """Rolling aggregates: the newest point changes until its span closes, so re-emit a point whose value moved.

        The cursor keeps, per series, the value of each point the last answer held (older points have left it).
        """
        dev = stream.params["device"]
        b = PageBuilder(self)
        if not self.metric_names:
            return b.page(cursor, True, lag_s=0.0)
        requests = [{"namespace": METRIC_NAMESPACE, "metric": m, "dimensions": {DEVICE_DIMENSION: dev},
                     "statistic": METRIC_STATISTIC, "period": METRIC_PERIOD} for m in self.metric_names]
        out = await self._post("/metric/fetch", {"deviceId": dev, "items": requests})
        data = out.get("data") if isinstance(out, dict) else None
        if not isinstance(data, list):
            raise MalformedResponse("/metric/fetch: response without a data array", body=str(out)[:200])
        trackers: dict[str, ChangeTracker] = {}  # one per series: its points by time
        dead: list[DeadLetter] = []
        for series, attrs in mapped(data, dead, _series):
            name = f"{series.metric}.{METRIC_STATISTIC}.{series.period}"
            points = trackers.setdefault(name, ChangeTracker(cursor.get(name)))
            for point in valid(MetricPoint, series.points, dead, _point_of(series.metric)):
                if points.moved(str(point.timestamp), point.value):
                    extra = {**attrs, "count": str(point.count)} if point.count is not None else attrs
                    b.add("metric", stream.tenant, dev, name, point.timestamp, point.value, None, extra)
        return b.page({name: t.state(seen_only=True) for name, t in trackers.items()}, True, dead, 0.0)

    async def _fetch_alerts(self, cursor: dict[str, Any] | None) -> Page:
        """The whole list every pass (no filters [D-alr]): an alert newer than the last pass's newest is new, an
        older one is emitted again only when its state changed (CHANGED, CLOSED, or NEW and open).

        A change re-emits under the same key (`timestamp` stays [A]), so ReplacingMergeTree keeps the newest state.
        The watermark moves only when a pass ends, so the list order does not matter; closed alerts dated before it
        are forgotten then (read again, one that opened again is NEW and open).
        """
        c = self._alert_cursor(cursor)
        frm, wm, edge, top, top_edge = c["from"], c["wm"], set(c["edge"]), c["top"], set(c["top_edge"])
        pager, alerts = _pager(c["next"]), AlertTracker(c["alerts"])
        items = await self._paged("/alert/find", {}, pager)
        b = PageBuilder(self)
        dead: list[DeadLetter] = []
        for alert, mark, row in mapped(items, dead, self._alert_row):
            ts, key = alert.timestamp, spoolable_text(alert.id)  # ids go into the cursor, spooled as UTF-8 JSON
            if ts < frm:
                continue
            if ts > top:
                top, top_edge = ts, {key}
            elif ts == top:
                top_edge.add(key)
            fresh = ts > wm or (ts == wm and key not in edge)
            news = alerts.update(key, mark, ts, closed=alert.resolved)
            if fresh or news in (CHANGED, CLOSED) or (news == NEW and not alert.resolved):
                b.add(*row)
        done = not pager.has_next_page
        if done:  # pass complete: the next run starts from the top with this pass's newest as the watermark
            wm, edge = top, top_edge
            alerts.forget(wm)
        c = {"next": pager.cursor, "from": frm, "wm": wm, "edge": sorted(edge), "top": top,
             "top_edge": sorted(top_edge), "alerts": alerts.state()}
        return b.page(c, done, dead, 0.0 if done else None)

    def _alert_cursor(self, cursor: dict[str, Any] | None) -> dict[str, Any]:
        """The alert cursor; one written before AlertTracker (`open`: id → fingerprint) is carried over."""
        if cursor is None:
            frm = self.first_ms(self.now_ms(), "alert")
            return {"next": None, "from": frm, "wm": frm - 1, "edge": [], "top": frm - 1, "top_edge": [],
                    "alerts": None}
        if "open" in cursor:  # an open alert's time was not kept: the watermark stands in (nothing reads it here)
            old = {k: v for k, v in cursor.items() if k != "open"}
            opened = {k: [fp, cursor["wm"]] for k, fp in cursor["open"].items()}
            return {**old, "alerts": {"open": opened, "closed": {}}}
        return cursor

    def _alert_row(self, raw: Any) -> tuple[AlertItem, int | None, Row]:
        """One alert, its state fingerprint and its event's fields; raises on anything unreadable."""
        a = AlertItem.model_validate(raw)
        device = (a.context or {}).get("deviceId")
        attrs = {"id": a.id, "resolved": "true" if a.resolved else "false"}
        for key, value in (("severity", a.severity), ("subject", a.subject), ("seq", a.seq), ("count", a.count),
                           ("cloudId", a.cloudId)):
            if value is not None:
                attrs[key] = str(value)
        device = device if isinstance(device, str) else ""
        return a, a.fingerprint(), ("alert", a.accountId, device, a.name or a.seq or "", a.timestamp, None, a.message,
                                    attrs)

    # -- the mappings above as Events: the entry points of tests/test_properties.py ---------------------------

    def _store_event(self, stream: Stream, item: StoreItem) -> Event:
        return Event(self.name, self.vendor, *self._store_row(item))

    def _log_event(self, raw: Any) -> Event:
        return Event(self.name, self.vendor, *self._log_row(raw))

    def _alert(self, raw: Any) -> tuple[AlertItem, int | None, Event]:
        alert, mark, row = self._alert_row(raw)
        return alert, mark, Event(self.name, self.vendor, *row)


def _pager(cursor: str | None) -> CursorPaginator:
    """Ioto's opaque `next`: typed "object" in one document, so an object is passed back as its JSON text [A]."""
    return CursorPaginator(cursor, json_objects=True)


def _series(raw: Any) -> tuple[MetricSeries, dict[str, str]]:
    """A metric series and the attrs its points share; raises on anything unreadable."""
    series = MetricSeries.model_validate(raw)
    attrs = {"namespace": series.namespace, "dimensions": orjson.dumps(series.dimensions).decode()}
    if series.samples is not None:
        attrs["samples"] = str(series.samples)
    return series, attrs
