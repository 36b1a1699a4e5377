"""IoT Open Lynx: installations → FunctionX topics; `status` (latest values) and v3 `log` (history).

Brief: shared/vendors/iotopen.md. Assumptions live in the constants below.
"""

from __future__ import annotations

import base64
import math
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from syncd.errors import MalformedResponse, VendorAuthError
from syncd.events import Event, seconds_to_ms
from syncd.settings import IotOpenSource as IotOpenConfig
from syncd.sources.base import DeadLetter, Page, Source, Stream, mapped, spoolable_text

# Values need ~5 s to show up after publishing [S]; read the log only up to now minus this.
PROPAGATION_LAG_S = 10
PAGE_SIZE = 10_000  # the v3 log default; no maximum documented [S]


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"must be a finite number (got {value!r})")
    return value


EpochMs = Annotated[int, BeforeValidator(seconds_to_ms)]  # Unix seconds on the wire, epoch ms once read
Id = Annotated[int | float | None, BeforeValidator(_finite)]  # ids are numbers; an Infinity is a bad record


class LynxValue(BaseModel):
    """A Status / v3 log entry [S §2]; `timestamp` is read into epoch ms (a bad one fails naming the field)."""

    model_config = ConfigDict(extra="ignore")

    installation_id: int
    client_id: Id = None
    timestamp: EpochMs
    topic: str
    value: float | None = None
    msg: str | None = None


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
            return await self._fetch_status(stream, cursor or {})
        return await self._fetch_log(stream, cursor)

    async def _fetch_status(self, stream: Stream, seen: dict[str, int]) -> Page:
        """Latest values; only values whose timestamp moved are emitted (the cursor remembers each topic's)."""
        path = f"/api/v2/status/{stream.tenant}"
        raw = await self._get(path)
        if not isinstance(raw, list):
            raise MalformedResponse(f"{path}: status answer is not a JSON array", body=str(raw)[:200])
        events, cursor = [], dict(seen)
        dead: list[DeadLetter] = []
        for item, event in mapped(raw, dead, lambda r: self._read("status", stream.tenant, r)):
            key = spoolable_text(item.topic)  # the cursor is spooled as UTF-8 JSON
            if cursor.get(key) == event.ts_ms:
                continue
            cursor[key] = event.ts_ms
            events.append(event)
        return Page(events, cursor, done=True, dead=dead, lag_s=0.0)

    async def _fetch_log(self, stream: Stream, cursor: dict[str, Any] | None) -> Page:
        """v3 log, oldest first, `to` pinned while paging; the boundary second is re-read and filtered."""
        now_s = self.clock()
        if cursor is None:
            cursor = {"from": self.first_ms(int(now_s * 1000), stream.name) // 1000, "to": None, "offset": 0,
                      "max_ms": None, "edge": []}
        frm, offset = int(cursor["from"]), int(cursor["offset"])
        to = cursor["to"] if cursor["to"] is not None else int(now_s - PROPAGATION_LAG_S)
        if to <= frm:
            return Page([], cursor, done=True, lag_s=max(0.0, now_s - frm))
        limit = self.config.page_size or PAGE_SIZE
        body = await self._get(
            f"/api/v3beta/log/{stream.tenant}",
            {"from": frm, "to": to, "order": "asc", "limit": limit, "offset": offset},
        )
        data, total = _log_envelope(body, stream.tenant)
        max_ms, edge = cursor["max_ms"], set(cursor["edge"])
        new_max, new_edge = max_ms, set(edge)
        events: list[Event] = []
        dead: list[DeadLetter] = []
        # a dead-lettered record counts in `offset` like any other; only readable times move `max_ms`
        for item, event in mapped(data, dead, lambda r: self._read("log", stream.tenant, r)):
            ts_ms = event.ts_ms
            key = f"{spoolable_text(item.topic)}@{ts_ms}"
            if max_ms is not None and (ts_ms < max_ms or (ts_ms == max_ms and key in edge)):
                continue  # read by an earlier run (the re-read boundary second)
            events.append(event)
            if new_max is None or ts_ms > new_max:
                new_max, new_edge = ts_ms, {key}
            elif ts_ms == new_max:
                new_edge.add(key)
        count = len(data)
        if count == 0 or offset + count >= total:
            next_from = new_max // 1000 if new_max is not None else frm
            nxt = {"from": next_from, "to": None, "offset": 0, "max_ms": new_max, "edge": sorted(new_edge)}
            lag = max(0.0, now_s - new_max / 1000) if new_max is not None else 0.0
            return Page(events, nxt, done=True, dead=dead, lag_s=lag)
        nxt = {"from": frm, "to": to, "offset": offset + count, "max_ms": new_max, "edge": sorted(new_edge)}
        lag = max(0.0, now_s - new_max / 1000) if new_max is not None else now_s - frm
        return Page(events, nxt, done=False, dead=dead, lag_s=lag)

    def _read(self, kind: str, tenant: str, raw: Any) -> tuple[LynxValue, Event]:
        """One raw entry as (entry, event); raises on anything unreadable (the caller dead-letters it)."""
        item = LynxValue.model_validate(raw)
        key = (tenant, item.topic, item.client_id)
        found = self._labels.get(key)
        if found is None:
            found = self._labels[key] = self._label(tenant, item)
        device, attrs = found
        return item, self.event(kind, tenant, device, item.topic, item.timestamp, item.value, item.msg or None, attrs)

    def _label(self, tenant: str, item: LynxValue) -> tuple[str, dict[str, str]]:
        """Device and attrs of a topic (cached: the same for every value of the topic until rediscovery)."""
        fn = self.functions.get(tenant, {}).get(item.topic)
        inst = self.installations.get(tenant)
        attrs: dict[str, str] = {}
        if item.client_id is not None:
            attrs["client_id"] = str(int(item.client_id))
        if inst is not None and inst.organization_id is not None:
            attrs["organization_id"] = str(int(inst.organization_id))
        if fn is not None:
            device = str(fn.id)
            attrs["function_type"] = fn.type
            for key in ("name", "unit", "device_id"):
                if fn.meta.get(key) not in (None, ""):
                    attrs[key] = str(fn.meta[key])
        else:
            device = attrs.get("client_id", "")
        return device, attrs


def _log_envelope(body: Any, tenant: str) -> tuple[list[Any], int]:
    """`data` and `total` of a v3 log page; any other shape is malformed (retried, then the run fails)."""
    data = body.get("data") if isinstance(body, dict) else None
    total = body.get("total") if isinstance(body, dict) else None
    if not isinstance(data, list) or isinstance(total, bool) or not isinstance(total, int):
        raise MalformedResponse(f"/api/v3beta/log/{tenant}: a log page needs a data array and a numeric total",
                                body=str(body)[:200])
    return data, total
