"""IXON Cloud APIv2: agents → logged data tags (`telemetry` via DataList), alarm occurrences (`alert`), agent `status`.

Brief: shared/vendors/ixon.md. Every path comes from the discovery resource; assumptions live in the constants below.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

import orjson
from pydantic import BaseModel, ConfigDict

from syncd.errors import MalformedResponse, RequestRejected, VendorAuthError
from syncd.events import Event, ms_to_iso
from syncd.http import default_error
from syncd.settings import IxonSource as IxonConfig
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
    valid_all,
)
from syncd.sources.paging import CursorPaginator, TimeKeyPaginator, collect
from syncd.sources.times import IsoMs
from syncd.sources.track import NEW, AlertTracker, ChangeTracker

API_VERSION = "2"  # required header on every call [S]
# Only used when discovery does not name a rel [A: brief §1, "fall back to the paths below"].
FALLBACK_PATHS = {"AgentList": "agents", "AgentDataTagList": "agents/{agentId}/data-tags",
                  "AgentDataAlarmOccurrenceList": "agents/{agentId}/alarm-occurrences", "DataList": "data"}
LIST_PAGE_SIZE = 500  # `page-size`: name, default and maximum undocumented [A]; `page_size` in the config overrides
DATALIST_LIMIT = 5000  # documented maximum points per DataList query [D-oas]
REQUESTS_PER_POST = 20  # DataList request objects (one per tag) per POST [A: bounds one answer to 100k points]
DATA_LAG_S = 60  # history is read up to now minus this: agents upload logged values in batches [A]
# Late points [A: none documented]: a tag's points may become visible out of order (an agent's upload lands point by
# point, a buffer uploaded after a reconnect). Every RECONCILE_EVERY_S a round re-reads LATE_WINDOW_S before the last
# round's end; a point visible at most LATE_WINDOW_S - RECONCILE_EVERY_S (30 min) after its time always arrives.
# `late_window` and `reconcile_every` in the config override them.
LATE_WINDOW_S = 3600.0
RECONCILE_EVERY_S = 1800.0
REF = "v"  # the query `ref` the values come back under; one tag per request object, so one ref suffices
AGENT_FIELDS = "publicId,name,deviceId,serialNumber,activeStatus,activeVpnSession,mqttChangedOn"
TAG_FIELDS = "publicId,tagId,name,slug,source.publicId,retentionPolicy,variable(type,unit)"
ALARM_FIELDS = "publicId,alarm(name,severity),occurredOn,rtnOn,acknowledged,comment"
# Filter functions are documented [S][D-oas]; that `occurredOn` is a filterable field is assumed [A].
ALARM_FILTER = 'gte(occurredOn,"{since}")'


class _Raw(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Agent(_Raw):
    publicId: str
    name: str = ""
    deviceId: str | None = None
    serialNumber: str | None = None
    activeStatus: str | None = None
    activeVpnSession: dict[str, Any] | None = None
    mqttChangedOn: IsoMs | None = None


class PublicRef(_Raw):
    publicId: str


class Variable(_Raw):
    type: str = ""
    unit: str | None = None


class DataTag(_Raw):
    tagId: int
    slug: str
    name: str = ""
    source: PublicRef
    retentionPolicy: str | None = None
    variable: Variable | None = None


class Alarm(_Raw):
    name: str
    severity: str = ""


class Occurrence(_Raw):
    publicId: str
    alarm: Alarm
    occurredOn: IsoMs
    rtnOn: IsoMs | None = None
    acknowledged: bool | None = None
    comment: str | None = None


class Point(_Raw):
    time: IsoMs
    values: dict[str, Any]


def ixon_error(status: int, headers: Mapping[str, str], body: bytes, url: str) -> Exception | None:
    """The default mapping, with the envelope's message and offending property in the text of 4xx errors."""
    err = default_error(status, headers, body, url)
    if not isinstance(err, VendorAuthError | RequestRejected):
        return err  # 429 bodies are not the envelope [S: undocumented]; 5xx may be gateway pages
    try:
        detail = orjson.loads(body)["data"][0]
        reason = f"{detail['message']}" + (f" ({detail['propertyName']})" if detail.get("propertyName") else "")
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return err
    return type(err)(f"{'credential refused' if status == 401 else 'request rejected'} ({status}) by {url}: {reason}",
                     status=status, body=err.body, url=url)


def _items(data: Any) -> list[Any]:
    """`data` is a list, or an object when one value is returned [D-oas]."""
    return data if isinstance(data, list) else [] if data is None else [data]


class IxonSource(Source):
    vendor = "ixon"
    default_streams = ("telemetry", "alert")
    # One bucket must honour 50 req/s AND 3000 req/min [S]. A bucket lets through at most burst + rate·T in any
    # T seconds, plus under half a token taken early (TokenBucket.acquire): 1 + 49 = 50 per second and
    # 1 + 49·60 = 2941 per minute. A burst of 1 costs nothing: a late timer is absorbed by the early token.
    default_rate = 49.0
    default_burst = 1
    map_error = staticmethod(ixon_error)

    config: IxonConfig

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.rels: dict[str, str] = {}  # discovery: rel → href (templated with {agentId} / {publicId})
        self.tags: dict[str, dict[str, DataTag]] = {}  # agent → str(tagId) → tag
        self.pending_dead: list[DeadLetter] = []  # inventory records that failed validation, out with the next page
        self._attrs: dict[tuple[str, str], dict[str, str]] = {}

    # -- requests -----------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Api-Version": API_VERSION, "Api-Application": self.config.application_id,
                "Api-Company": self.config.company_id, "Authorization": f"Bearer {self.config.token.get_secret_value()}",
                "Accept": "application/json"}

    def _href(self, rel: str, agent: str = "") -> str:
        href = self.rels.get(rel) or f"{self.config.base_url}/{FALLBACK_PATHS[rel]}"
        ident = quote(agent, safe="")
        return href.replace("{agentId}", ident).replace("{publicId}", ident)

    async def _call(self, method: str, url: str, params: Any = None, json: Any = None) -> dict[str, Any]:
        resp = await self.client.request(method, url, headers=self._headers(), params=params, json=json, expect_json=True)
        body = resp.data
        if not isinstance(body, dict) or body.get("status") != "success":
            raise MalformedResponse(f"{method} {url.split('?')[0]}: not a success envelope", status=resp.status,
                                    body=str(body)[:200], url=url)
        return body

    async def _list_page(self, rel: str, agent: str, fields: str, after: str | None,
                         filters: str | None = None) -> tuple[list[Any], Any]:
        """One page of a list and its `moreAfter` as answered (a CursorPaginator judges it)."""
        params = {"fields": fields, "page-size": str(self.config.page_size or LIST_PAGE_SIZE)}
        if filters:
            params["filters"] = filters
        if after:
            params["page-after"] = after  # opaque, may hold + and /: sent URL-encoded as a query parameter
        body = await self._call("GET", self._href(rel, agent), params)
        return _items(body.get("data")), body.get("moreAfter")

    async def _list_all(self, rel: str, agent: str, fields: str) -> list[Any]:
        async def page(pager: CursorPaginator) -> list[Any]:
            items, more = await self._list_page(rel, agent, fields, pager.cursor)
            pager.update_state(more, f"GET {self._href(rel, agent)} moreAfter")
            return items

        return await collect(CursorPaginator(), page)

    # -- inventory ----------------------------------------------------------------------------------

    async def _discover_rels(self) -> None:
        body = await self._call("GET", f"{self.config.base_url}/")
        self.rels = {d["rel"]: d["href"] for d in _items(body.get("data"))
                     if isinstance(d, dict) and isinstance(d.get("rel"), str) and isinstance(d.get("href"), str)}

    async def discover(self) -> list[Stream]:
        await self._discover_rels()  # re-read each time: hrefs are the vendor's to move
        # only the id: a bad status field must not hide an agent's data
        agents = [ref.publicId for ref in valid_all(PublicRef, await self._list_all("AgentList", "", "publicId,name"),
                                                    self.pending_dead)]
        tenant, kinds, streams = self.config.company_id, self.enabled_kinds, []
        for pid in agents:
            if "telemetry" in kinds:
                await self._load_tags(pid)
            streams += [Stream(f"{kind}/{pid}", kind, tenant, {"agent": pid}) for kind in ("telemetry", "alert")
                        if kind in kinds]
        if "status" in kinds:
            streams.append(Stream("status", "status", tenant))
        return streams

    async def _load_tags(self, agent: str) -> None:
        raw = await self._list_all("AgentDataTagList", agent, TAG_FIELDS)
        tags = {str(tag.tagId): tag
                for tag in valid_all(DataTag, raw, self.pending_dead, lambda r: {"agent": agent, "tag": r})}
        self.tags[agent] = tags
        self._attrs = {k: v for k, v in self._attrs.items() if k[0] != agent}

    # -- data ---------------------------------------------------------------------------------------

    async def fetch(self, stream: Stream, cursor: Any) -> Page:
        if not self.rels:
            await self._discover_rels()
        if stream.kind == "telemetry":
            page = await self._fetch_telemetry(stream, cursor)
        elif stream.kind == "alert":
            page = await self._fetch_alerts(stream, cursor)
        else:
            page = await self._fetch_status(stream, cursor)
        if self.pending_dead:
            page.dead[:0], self.pending_dead = self.pending_dead, []
        return page

    async def _fetch_telemetry(self, stream: Stream, cursor: dict[str, Any] | None) -> Page:
        """DataList per tag from its watermark (the newest point stored) up to `end`, pinned for a round.

        A round reads every tag from its watermark to now minus DATA_LAG_S; a tag whose answer is full (5000 points)
        is asked again from the newest point read (`pos`). A watermark never passes `end`, whatever a point's time
        says. Every `reconcile_every` a round starts `late_window` before the last round's end instead: points
        that became visible after a later point of their tag had been stored (agents upload in batches, out of
        order) are stored then (same event ids, so the overlap is free) and counted in `Page.late`.
        """
        agent, now_ms = stream.params["agent"], self.now_ms()
        if agent not in self.tags:
            await self._load_tags(agent)
        tags = self.tags[agent]
        window_ms, every = late_settings(self.config, LATE_WINDOW_S, RECONCILE_EVERY_S)
        cur = self._telemetry_cursor(stream, cursor, now_ms, window_ms)
        tally = LateTally(cur["tally"], window_ms)
        first, wm = int(cur["start"]), dict(cur["wm"])
        if cur["todo"] is None:  # a new round
            end, hw, reread = now_ms - DATA_LAG_S * 1000, cur["hw"], None
            if hw is not None and reconcile_due(cur["reconciled"], now_ms / 1000, every):
                reread = [max(first, tally.align(hw - window_ms)), hw]
                cur = {**cur, "reconciled": now_ms / 1000}
            todo = [k for k in sorted(tags, key=int) if wm.get(k, first) < end]
            base = {k: wm.get(k, first - 1) for k in todo}
            pos = {k: min(wm.get(k, first), reread[0]) if reread else wm.get(k, first) for k in todo}
            cur = {**cur, "todo": todo, "end": end, "base": base, "pos": pos, "more": [], "reread": reread}
        end, reread = int(cur["end"]), cur["reread"]
        base, pos, more = dict(cur["base"]), dict(cur["pos"]), set(cur["more"])
        todo = [k for k in cur["todo"] if k in tags]
        batch, rest = todo[:REQUESTS_PER_POST], todo[REQUESTS_PER_POST:]
        b = PageBuilder(self)
        dead: list[DeadLetter] = []
        again: list[str] = []
        if batch:
            requests = [self._data_request(tags[k], pos[k], end) for k in batch]
            # one request object is sent bare (answer: an object), several as a list (answer: a list) [D-oas]
            body = await self._call("POST", self._href("DataList"), json=requests[0] if len(requests) == 1 else requests)
            results = _items(body.get("data"))
            if len(results) != len(batch):
                raise MalformedResponse(f"DataList answered {len(results)} results for {len(batch)} requests",
                                        url=self._href("DataList"))
            for key, result in zip(batch, results, strict=True):
                points = result.get("points") if isinstance(result, dict) else None
                if not isinstance(points, list):  # the envelope, not a record: never taken as "no points"
                    raise MalformedResponse(f"DataList result for tag {key} without a points array",
                                            body=str(result)[:200], url=self._href("DataList"))
                pager = TimeKeyPaginator(pos[key], DATALIST_LIMIT, moved=key in more)  # its state: `pos`, `more`
                read = self._points(stream.tenant, agent, tags[key], points, key, end, reread, base[key],
                                    pager.key if pager.moved else None, wm, tally, b, dead)
                pager.update_state(len(points), read)
                if pager.has_next_page:  # cut at the limit: the next page starts at the newest point read
                    pos[key] = pager.key
                    more.add(key)
                    again.append(key)
        todo = again + rest
        lag = max(0.0, (now_ms - min((wm.get(k, first) for k in todo), default=end)) / 1000)
        if todo:
            cur = {**cur, "wm": wm, "todo": todo, "pos": pos, "more": sorted(more), "tally": tally.state(end)}
            return b.page(cur, False, dead, lag)
        late = tally.settle(reread[0], reread[1]) if reread else 0
        cur = {**cur, "wm": wm, "todo": None, "end": None, "base": {}, "pos": {}, "more": [], "reread": None,
               "hw": end, "tally": tally.state(end)}
        return b.page(cur, True, dead, lag, late)

    def _telemetry_cursor(self, stream: Stream, cursor: dict[str, Any] | None, now_ms: int, window_ms: int
                          ) -> dict[str, Any]:
        """The telemetry cursor; a new one starts at `first_ms`, one written before re-reads existed is carried over."""
        fresh: dict[str, Any] = {"todo": None, "end": None, "base": {}, "pos": {}, "more": [], "reread": None,
                                 "tally": None}
        if cursor is None:
            first = first_in_past(self, now_ms, stream.name, window_ms)
            return {"start": first, "wm": {}, "hw": None, "reconciled": now_ms / 1000, **fresh}
        if "hw" not in cursor:  # {start, wm, todo, end}: a new round, re-reading at once
            hw = max(cursor["wm"].values(), default=int(cursor["start"]))
            return {"start": cursor["start"], "wm": dict(cursor["wm"]), "hw": hw, "reconciled": None, **fresh}
        return cursor

    @staticmethod
    def _data_request(tag: DataTag, start: int, end: int) -> dict[str, Any]:
        # `start` is the watermark itself: whether it is inclusive is undocumented [A], so the overlap is re-read
        # and filtered; ascending raw points let the newest time read be the next page's start.
        return {"source": {"publicId": tag.source.publicId}, "start": ms_to_iso(start), "end": ms_to_iso(end),
                "timeZone": "UTC",
                "tags": [{"id": tag.tagId, "preAggr": "raw",
                          "queries": [{"ref": REF, "postAggr": "raw", "limit": DATALIST_LIMIT, "offset": 0,
                                       "order": "asc"}]}]}

    def _points(self, tenant: str, agent: str, tag: DataTag, points: list[Any], key: str, end: int,
                reread: list[int] | None, base: int, after: int | None, wm: dict[str, int], tally: LateTally,
                events: PageBuilder | list[Event], dead: list[DeadLetter]) -> int | None:
        """Events of one tag's points; returns the newest point time read before `end` (None: none).

        A point at or before `base` (the watermark when the round began) was stored before, unless it is late: it
        is stored again when the round re-reads it. `after` is where a continued page starts (its first point was
        the previous page's last). `events` is the page's builder, or a list of Events (the property tests).
        """
        attrs = self._tag_attrs(agent, tag)
        context = _point_of(agent, tag)
        add = events.add if isinstance(events, PageBuilder) else lambda *row: events.append(self.event(*row))
        newest = None
        for point, value, text in mapped(points, dead, _point, context):
            t = point.time
            if t < end:
                newest = t if newest is None else max(newest, t)
            if after is not None and t <= after:
                continue  # read by the page before
            if t <= base:
                if reread is None or t < reread[0]:
                    continue  # the watermark point, read again
                tally.recount(t)
            elif t > wm.get(key, base):
                tally.add(t)
                if t < end:  # a point past the window (a vendor's bug) is stored, but never moves the watermark
                    wm[key] = t
            else:
                continue  # stored by this round already
            add("telemetry", tenant, agent, tag.slug, t, value, text, attrs)
        return newest

    def _tag_attrs(self, agent: str, tag: DataTag) -> dict[str, str]:
        """Attrs of a tag's points (cached: one dict per tag until its agent's tags are re-read)."""
        found = self._attrs.get((agent, str(tag.tagId)))
        if found is None:
            found = {"tagId": str(tag.tagId), "source": tag.source.publicId, "postAggr": "raw"}
            unit = tag.variable.unit if tag.variable is not None else None
            found |= {k: v for k, v in (("name", tag.name), ("unit", unit), ("retentionPolicy", tag.retentionPolicy)) if v}
            self._attrs[(agent, str(tag.tagId))] = found
        return found

    async def _fetch_alerts(self, stream: Stream, cursor: dict[str, Any] | None) -> Page:
        """Occurrences since the oldest still-open one: an open event once, a close event when `rtnOn` appears.

        The cursor holds `since` (the filter, pinned while a listing is paged), `after` (the listing's
        CursorPaginator while under way, else None), `newest` and the AlertTracker's `open` / `closed`.
        """
        agent, rel = stream.params["agent"], "AgentDataAlarmOccurrenceList"
        cur = self._alert_cursor(stream, cursor)
        if cur["after"] is None:  # a new listing: what was known before it tells a late occurrence
            cur = {**cur, "known": cur["newest"]}
        since, newest, known = int(cur["since"]), cur["newest"], cur.get("known")
        pager, alerts = CursorPaginator(**(cur["after"] or {})), AlertTracker(cur)
        items, more = await self._list_page(rel, agent, ALARM_FIELDS, pager.cursor,
                                            ALARM_FILTER.format(since=ms_to_iso(since)))
        pager.update_state(more, f"GET {self._href(rel, agent)} moreAfter")
        b, tenant, late = PageBuilder(self), stream.tenant, 0
        dead: list[DeadLetter] = []
        for occ in valid_all(Occurrence, items, dead, lambda raw: {"agent": agent, "occurrence": raw}):
            pid = spoolable_text(occ.publicId)  # ids go into the cursor, spooled as UTF-8 JSON
            newest = occ.occurredOn if newest is None else max(newest, occ.occurredOn)
            if pid in alerts.closed:
                continue  # closed is final: an answer showing it open again changes nothing
            # the mark is constant: an open occurrence is emitted once, whatever else about it changes
            change = alerts.update(pid, None, occ.occurredOn, closed=occ.rtnOn is not None)
            if change is None:
                continue
            severity = occ.alarm.severity
            text = f"{severity}: {occ.comment}" if occ.comment else severity
            attrs = {"occurrence": pid, "severity": severity, "acknowledged": str(bool(occ.acknowledged)).lower()}
            if change == NEW:
                b.add("alert", tenant, agent, occ.alarm.name, occ.occurredOn, None, text, {**attrs, "state": "open"})
                late += known is not None and occ.occurredOn < known  # visible only after a newer one was read
            if occ.rtnOn is not None:
                b.add("alert", tenant, agent, occ.alarm.name, occ.rtnOn, None, text, {**attrs, "state": "closed"})
        if pager.has_next_page:
            return b.page({**cur, "after": pager.state(), "newest": newest, **alerts.state()}, False, dead, None, late)
        # The next listing starts `late_window` before the newest occurrence (one that becomes visible late is still
        # found), or at the oldest open one (to see it close), never before `floor` (the stream's start); closed
        # ones before it drop out of the tracker, the others keep a re-read from emitting them again.
        window_ms, _ = late_settings(self.config, LATE_WINDOW_S, RECONCILE_EVERY_S)
        floor = int(cur.get("floor", since))
        since = max(floor, (newest if newest is not None else since) - window_ms)
        oldest = alerts.oldest_open()
        since = min(since, oldest) if oldest is not None else since
        alerts.forget(since)
        return b.page({"since": since, "floor": floor, "after": None, "newest": newest, **alerts.state()}, True, dead,
                      0.0, late)

    def _alert_cursor(self, stream: Stream, cursor: dict[str, Any] | None) -> dict[str, Any]:
        """The alert cursor; one written before the shared parts is carried over: its `after` was `moreAfter`
        itself and its `open` held {occurrence: occurredOn}."""
        if cursor is None:
            first = self.first_ms(self.now_ms(), stream.name)
            return {"since": first, "floor": first, "after": None, "newest": None, "open": {}, "closed": {}}
        after = cursor["after"]
        return {**cursor, "after": CursorPaginator(after).state() if isinstance(after, str) else after,
                "open": {k: v if isinstance(v, list) else [None, v] for k, v in cursor["open"].items()}}

    async def _fetch_status(self, stream: Stream, seen: Any) -> Page:
        """Agent online state (brief §8): emitted when [value, status, mqttChangedOn] changes; ts = `mqttChangedOn`,
        else poll time."""
        tracker, b = ChangeTracker(seen), PageBuilder(self)
        dead: list[DeadLetter] = []
        for agent in valid_all(Agent, await self._list_all("AgentList", "", AGENT_FIELDS), dead):
            # online = an open VPN session [A: the brief names activeVpnSession/mqttChangedOn, not the rule]
            value = 1.0 if agent.activeVpnSession else 0.0
            status = spoolable_text(agent.activeStatus) if agent.activeStatus is not None else None
            if not tracker.moved(agent.publicId, [value, status, agent.mqttChangedOn]):
                continue
            attrs = {k: v for k, v in (("name", agent.name), ("serialNumber", agent.serialNumber),
                                       ("deviceId", agent.deviceId)) if v}
            ts = agent.mqttChangedOn if agent.mqttChangedOn is not None else self.now_ms()
            b.add("status", stream.tenant, agent.publicId, "online", ts, value, agent.activeStatus, attrs)
        return b.page(tracker.state(), True, dead, 0.0)


def _point(raw: Any) -> tuple[Point, float | None, str | None]:
    """One DataList point as (point, value, text); raises on anything unreadable (the caller dead-letters it)."""
    point = Point.model_validate(raw)
    value, text = _value(point.values.get(REF, ...))
    return point, value, text


def _point_of(agent: str, tag: DataTag) -> Callable[[Any], dict[str, Any]]:
    """How a bad point is kept as a dead letter: with its agent and tag."""
    return lambda raw: {"agent": agent, "tagId": tag.tagId, "point": raw}


def _value(raw: Any) -> tuple[float | None, str | None]:
    """A point value: numbers (bool → 1/0) in `value`, strings (tags of type `str`) in `text`."""
    if isinstance(raw, bool | int | float):
        return float(raw), None
    if isinstance(raw, str):
        return None, raw
    if raw is ...:
        raise FieldError(f"values.{REF}", "missing")
    raise FieldError(f"values.{REF}", f"not a number, bool or string: {raw!r}"[:200])
