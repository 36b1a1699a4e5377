"""IoT Open Lynx: installations and their topics; `status` (latest values) and v3 `log` (history).

Every event of an installation has its MQTT client id as device and the full topic as metric; the FunctionX
mapped to a topic only adds attrs (see `_label`).

Brief: shared/vendors/iotopen.md. Assumptions live in the constants below.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterator
from typing import Annotated, Any, NotRequired

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError
from typing_extensions import TypedDict  # pydantic reads TypedDicts from here before Python 3.12

from syncd.errors import MalformedResponse, VendorAuthError
from syncd.events import Event
from syncd.settings import IotOpenSource as IotOpenConfig
from syncd.sources.base import (
    DeadLetter,
    FieldError,
    LateTally,
    Page,
    PageBuilder,
    Source,
    Stream,
    dead_letter,
    first_in_past,
    late_settings,
    reconcile_due,
    spoolable_text,
    valid_all,
)
from syncd.sources.paging import OffsetPaginator
from syncd.sources.times import seconds_to_ms, seconds_to_ms_all
from syncd.sources.track import ChangeTracker

# Values need ~5 s to show up after publishing [S]; read the log only up to now minus this.
PROPAGATION_LAG_S = 10
PAGE_SIZE = 10_000  # the v3 log default; no maximum documented [S]
# Late rows [A: none documented]: a gateway that buffers while its uplink is down uploads with the original
# timestamps. Every RECONCILE_EVERY_S the log is re-read from LATE_WINDOW_S before what was read; a row that shows up
# at most LATE_WINDOW_S - RECONCILE_EVERY_S (30 min) after its timestamp always arrives, up to LATE_WINDOW_S it may.
# `late_window` and `reconcile_every` in the config override them.
LATE_WINDOW_S = 3600.0
RECONCILE_EVERY_S = 1800.0


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"must be a finite number (got {value!r})")
    return value


Id = Annotated[int | float | None, AfterValidator(_finite)]  # ids are numbers; an Infinity (or "INFINITY") is a bad record


class LynxValue(TypedDict):
    """A Status / v3 log entry [S §2], as pydantic checks a whole page of them in one call (a TypedDict: no object
    per entry); `timestamp` and `client_id` are then read by `_entry`, which names the field of a bad one."""

    installation_id: int
    client_id: NotRequired[int | float | None]
    timestamp: Any  # Unix seconds with ms decimals (`seconds_to_ms`)
    topic: str
    value: NotRequired[float | None]
    msg: NotRequired[str | None]


def _entries(records: list[Any], dead: list[DeadLetter]) -> Iterator[tuple[LynxValue, int, int | float | None]]:
    """(entry, epoch ms, client id) of a page's entries, validated in one call; a bad one becomes a dead letter."""
    for item in valid_all(LynxValue, records, dead):
        try:
            ts_ms, client = _entry(item)
        except FieldError as err:
            dead.append(dead_letter(item, err))
            continue
        yield item, ts_ms, client


def _log_columns(data: list[Any]) -> tuple[list[str], list[int], list[Any], list[Any], list[str | None]] | None:
    """(topics, epoch ms, client ids, values, texts) of a log page read a column at a time, when every entry is what
    `LynxValue` and `_entry` accept and keep as they are (an int value becomes the float pydantic makes of it);
    None sends the page entry by entry, which names what is wrong. `tests/test_iotopen_shared.py` checks that both
    give the same page."""
    try:
        topics = [r["topic"] for r in data]
        stamps = [r["timestamp"] for r in data]
        clients = [r.get("client_id") for r in data]
        values = [r.get("value") for r in data]
        msgs = [r.get("msg") for r in data]
        installations = [r["installation_id"] for r in data]
    except (TypeError, KeyError, AttributeError):
        return None
    if not (all(type(t) is str for t in topics) and all(type(i) is int for i in installations)
            and all(m is None or type(m) is str for m in msgs)
            and all(c is None or type(c) is int or (type(c) is float and math.isfinite(c)) for c in clients)
            and all(v is None or type(v) is float or (type(v) is int and -_EXACT <= v <= _EXACT) for v in values)):
        return None
    try:
        ms = seconds_to_ms_all(stamps)
    except ValueError:
        return None
    values = [float(v) if type(v) is int else v for v in values]
    return topics, ms, clients, values, [m or None for m in msgs]


_EXACT = 2**53  # ints a float holds exactly (the fast path leaves bigger ones to pydantic)


def _entry(item: LynxValue) -> tuple[int, int | float | None]:
    """(epoch ms, client id) of a validated entry; FieldError for a timestamp outside what syncd stores, or an id
    that is no finite number (`"INFINITY"` converts to one)."""
    try:
        ts_ms = seconds_to_ms(item["timestamp"])
    except ValueError as err:
        raise FieldError("timestamp", str(err)) from None
    client = item.get("client_id")
    if isinstance(client, float) and not math.isfinite(client):
        raise FieldError("client_id", f"must be a finite number (got {client!r})")
    return ts_ms, client


class Installation(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: int
    name: str = ""
    client_id: int | None = None
    organization_id: Id = None


class FunctionX(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: int
    type: str = ""
    meta: dict[str, Any] = {}


class IotOpenSource(Source):
    vendor = "iotopen"
    default_streams = ("status", "log")
    default_rate = 10.0  # none documented [A]; conservative
    default_burst = 20

    config: IotOpenConfig

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.token: str | None = self.config.api_key.get_secret_value() if self.config.api_key else None
        self.installations: dict[str, Installation] = {}
        self.functions: dict[str, dict[str, FunctionX]] = {}  # installation → topic → function
        self._labels: dict[tuple[str, str, Any], tuple[str, dict[str, str]]] = {}

    # -- auth ---------------------------------------------------------------------------------------

    async def login(self) -> None:
        if self.token is None:
            await self._password_login()

    async def relogin(self) -> bool:
        if not (self.config.username and self.config.password):
            return False
        await self._password_login()
        return True

    async def _password_login(self) -> None:
        assert self.config.username and self.config.password
        pair = f"{self.config.username}:{self.config.password.get_secret_value()}".encode()
        resp = await self.client.request(
            "POST", f"{self.config.base_url}/api/v2/auth",
            headers={"Authorization": "Basic " + base64.b64encode(pair).decode(), "Accept": "application/json"},
            expect_json=True,
        )
        body = resp.json()
        if not isinstance(body, dict) or not body.get("token"):
            raise VendorAuthError("login answered without a token", status=resp.status, url=resp.url)
        if body.get("nextstep") or body.get("next_step"):
            raise VendorAuthError(
                f"user {self.config.username!r} has SMS two-factor login; a daemon cannot answer it — "
                "configure an api_key instead", status=resp.status, url=resp.url,
            )
        self.token = str(body["token"])

    def _headers(self) -> dict[str, str]:
        return {"X-API-Key": self.token or "", "Accept": "application/json"}

    async def _get(self, path: str, params: Any = None) -> Any:
        resp = await self.client.request("GET", f"{self.config.base_url}{path}", headers=self._headers(), params=params,
                                         expect_json=True)
        return resp.data

    # -- inventory ----------------------------------------------------------------------------------

    async def discover(self) -> list[Stream]:
        # assigned defaults to true, which hides installations not assigned to this user [S].
        raw = await self._get("/api/v2/installationinfo", {"assigned": "false"})
        self.installations = {str(i.id): i for i in (Installation.model_validate(r) for r in raw)}
        streams = []
        for inst_id in self.installations:
            await self._load_functions(inst_id)
            for kind in self.enabled_kinds:
                streams.append(Stream(f"{kind}/{inst_id}", kind, inst_id))
        return streams

    async def _load_functions(self, inst_id: str) -> None:
        by_topic: dict[str, FunctionX] = {}
        for raw in await self._get(f"/api/v2/functionx/{inst_id}"):
            try:
                fn = FunctionX.model_validate(raw)
            except ValidationError:
                continue  # a function we cannot read only loses enrichment, never data
            topic = fn.meta.get("topic_read")
            if isinstance(topic, str) and topic:
                by_topic[topic] = fn
        self.functions[inst_id] = by_topic
        self._labels = {k: v for k, v in self._labels.items() if k[0] != inst_id}

    # -- data ---------------------------------------------------------------------------------------

    async def fetch(self, stream: Stream, cursor: Any) -> Page:
        if stream.tenant not in self.functions:
            await self._load_functions(stream.tenant)
        if stream.kind == "status":
            return await self._fetch_status(stream, cursor)
        return await self._fetch_log(stream, cursor)

    async def _fetch_status(self, stream: Stream, seen: Any) -> Page:
        """Latest values; only values whose timestamp moved are emitted (the cursor remembers each topic's)."""
        path = f"/api/v2/status/{stream.tenant}"
        raw = await self._get(path)
        if not isinstance(raw, list):
            raise MalformedResponse(f"{path}: status answer is not a JSON array", body=str(raw)[:200])
        tenant, tracker, b = stream.tenant, ChangeTracker(seen), PageBuilder(self)
        dead: list[DeadLetter] = []
        for item, ts_ms, client in _entries(raw, dead):
            topic = item["topic"]
            if tracker.moved(topic, ts_ms):
                device, attrs = self._labelled(tenant, topic, client)
                b.add("status", tenant, device, topic, ts_ms, item.get("value"), item.get("msg") or None, attrs)
        return b.page(tracker.state(), True, dead, 0.0)

    async def _fetch_log(self, stream: Stream, cursor: dict[str, Any] | None) -> Page:
        """v3 log, oldest first, one window [from, to] at a time with `to` pinned while paging.

        `to` is now minus PROPAGATION_LAG_S when the window opens, and the next window starts at it, whatever the
        records' timestamps say: a device with a wrong clock may stamp a value next year, and the rows after it
        must still arrive. The boundary second is re-read; the rows already read in it (`edge`) are skipped. Every
        `reconcile_every` a window starts `late_window` earlier (a re-read): rows that showed up after their time
        was read are stored (same event ids, so the overlap is free) and counted in `Page.late`.
        """
        now_s = self.clock()
        window_ms, every = late_settings(self.config, LATE_WINDOW_S, RECONCILE_EVERY_S)
        limit = self.config.page_size or PAGE_SIZE
        c = self._log_cursor(stream, cursor, now_s, window_ms, limit)
        tally = LateTally(c["tally"], window_ms)
        if c["to"] is None:  # a new window
            hw = c["hw"]
            if hw is not None and reconcile_due(c["reconciled"], now_s, every):
                since = tally.align(hw * 1000 - window_ms) // 1000
                c = {**c, "from": min(c["from"], since), "reread": [since, hw], "reconciled": now_s}
            upper = int(now_s - PROPAGATION_LAG_S)
            if upper <= c["from"]:
                return Page([], c, done=True, lag_s=max(0.0, now_s - c["from"]))
            c = {**c, "to": upper, "pager": OffsetPaginator(limit).state(), "next_edge": []}
        frm, to, tenant = int(c["from"]), int(c["to"]), stream.tenant
        pager = OffsetPaginator(**{**c["pager"], "limit": limit})  # page_size may have changed since
        path = f"/api/v3beta/log/{tenant}"
        body = await self._get(path, {"from": frm, "to": to, "order": "asc", **pager.params()})
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise MalformedResponse(f"{path}: a log page needs a data array", body=str(body)[:200])
        pager.update_state(len(data), body.get("total"), path)  # a dead-lettered record counts in `offset` too
        edge, next_edge = set(c["edge"]), set(c["next_edge"])
        # a row's key is built only when it can be an edge row (the hot path): in `to`'s second or an edge key's
        edge_ts = {int(t) for t in (k.rpartition("@")[2] for k in edge) if t.isascii() and t.isdigit()}
        reread = c["reread"]
        since_ms, upto_ms = (reread[0] * 1000, reread[1] * 1000) if reread else (0, 0)
        edge_lo, edge_hi = to * 1000, (to + 1) * 1000
        dead: list[DeadLetter] = []
        b = PageBuilder(self)
        columns = _log_columns(data)
        if columns is None:  # something in the page is off: entry by entry, each bad one a dead letter naming its field
            entries = list(_entries(data, dead))
            columns = ([e["topic"] for e, _, _ in entries], [ms for _, ms, _ in entries], [c for _, _, c in entries],
                       [e.get("value") for e, _, _ in entries], [e.get("msg") or None for e, _, _ in entries])
        self._log_page(b, tenant, columns, edge, edge_ts, next_edge, edge_lo, edge_hi)
        tally.add_all(b.columns.ts, since_ms, upto_ms)  # a re-read row was stored before, or is late
        if not pager.has_next_page:
            late = tally.settle(since_ms, upto_ms) if reread else 0
            nxt = {**c, "from": to, "to": None, "pager": None, "hw": to, "edge": sorted(next_edge), "next_edge": [],
                   "reread": None, "tally": tally.state(to * 1000)}
            return b.page(nxt, True, dead, max(0.0, now_s - to), late)
        nxt = {**c, "pager": pager.state(), "next_edge": sorted(next_edge), "tally": tally.state(to * 1000)}
        covered = c["hw"] if c["hw"] is not None else frm
        return b.page(nxt, False, dead, max(0.0, now_s - covered))

    def _log_page(self, b: PageBuilder, tenant: str, columns: tuple[list[Any], ...], edge: set[str],
                  edge_ts: set[int], next_edge: set[str], edge_lo: int, edge_hi: int) -> None:
        """A page's rows, given a column at a time, into `b`: rows in `to`'s second are the next window's edge (it
        re-reads that second), rows the window before read as its edge are left out."""
        topics, ms, clients, values, texts = columns
        if ms and ((max(ms) >= edge_lo and min(ms) < edge_hi) or not edge_ts.isdisjoint(ms)):
            keep = []
            for i, (topic, ts_ms) in enumerate(zip(topics, ms, strict=True)):
                last_second = edge_lo <= ts_ms < edge_hi
                if last_second or ts_ms in edge_ts:  # a row's key is built only when it can be an edge row
                    key = f"{spoolable_text(topic)}@{ts_ms}"
                    if last_second:
                        next_edge.add(key)
                    if key in edge:
                        continue
                keep.append(i)
            if len(keep) < len(ms):
                topics, ms, clients, values, texts = ([c[i] for i in keep] for c in columns)
        labels = self._labels
        found = [labels.get((tenant, t, c)) or self._labelled(tenant, t, c) for t, c in zip(topics, clients, strict=True)]
        b.columns.extend("log", tenant, [f[0] for f in found], topics, ms, values, texts, [f[1] for f in found])

    def _log_cursor(self, stream: Stream, cursor: dict[str, Any] | None, now_s: float, window_ms: int, limit: int
                    ) -> dict[str, Any]:
        """The log cursor; a new one starts at `first_ms`, an older layout is carried over."""
        now_ms = int(now_s * 1000)
        if cursor is None:
            frm = first_in_past(self, now_ms, stream.name, window_ms) // 1000
            return {"from": frm, "to": None, "pager": None, "hw": None, "edge": [], "next_edge": [], "reread": None,
                    "reconciled": now_s, "tally": None}
        if "hw" not in cursor:  # {from, to, offset, max_ms, edge}: its `from` may have followed a future stamp
            frm = min(int(cursor["from"]), int(now_s - PROPAGATION_LAG_S))
            return {"from": frm, "to": None, "pager": None, "hw": frm, "edge": list(cursor.get("edge") or []),
                    "next_edge": [], "reread": None, "reconciled": None, "tally": None}  # re-read at once
        if "pager" not in cursor:  # a bare `offset` into the open window, before the paginator
            pager = None if cursor["to"] is None else OffsetPaginator(limit, int(cursor["offset"])).state()
            return {k: v for k, v in cursor.items() if k != "offset"} | {"pager": pager}
        return cursor

    def _read(self, kind: str, tenant: str, raw: Any) -> tuple[LynxValue, Event]:
        """One raw entry as (entry, event), as a page maps it; raises on anything unreadable (the property tests'
        entry point: a page validates all its entries at once)."""
        (item,) = valid_all(LynxValue, [raw], [])  # raises on anything unreadable, as a page would dead-letter it
        ts_ms, client = _entry(item)
        device, attrs = self._labelled(tenant, item["topic"], client)
        return item, self.event(kind, tenant, device, item["topic"], ts_ms, item.get("value"), item.get("msg") or None,
                                attrs)

    def _labelled(self, tenant: str, topic: str, client_id: int | float | None) -> tuple[str, dict[str, str]]:
        key = (tenant, topic, client_id)
        found = self._labels.get(key)
        if found is None:
            found = self._labels[key] = self._label(tenant, topic, client_id)
        return found

    def _label(self, tenant: str, topic: str, client_id: int | float | None) -> tuple[str, dict[str, str]]:
        """Device and attrs of a topic (cached: the same for every value of the topic until rediscovery).

        The device is the installation's MQTT client id: every value carries it and every topic starts with it
        [S]. The brief's FunctionX id [A] would change the key of a series when a function is mapped to its topic
        (or remapped), so the same values read again would land twice; the function's id, type, name, unit and
        DeviceX link go into attrs instead.
        """
        fn = self.functions.get(tenant, {}).get(topic)
        inst = self.installations.get(tenant)
        attrs: dict[str, str] = {}
        client = client_id if client_id is not None else inst.client_id if inst is not None else None
        if client is not None:
            attrs["client_id"] = str(int(client))
        if inst is not None and inst.organization_id is not None:
            attrs["organization_id"] = str(int(inst.organization_id))
        if fn is not None:
            attrs["function_id"] = str(fn.id)
            attrs["function_type"] = fn.type
            for key in ("name", "unit", "device_id"):
                if fn.meta.get(key) not in (None, ""):
                    attrs[key] = str(fn.meta[key])
        return attrs.get("client_id", ""), attrs

